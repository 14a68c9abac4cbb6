"""Files a user hands over, checked before anything loads them: a reference image is a whole JPEG or PNG of a sane
pixel count (read from its header), a `.onnx` file is an ONNX model (not a pickle or a saved error page).

    width, height, kind = image_header(path)     # from the file's header only (a few hundred bytes read)
    check_image_file(path)                       # ValueError (one sentence) or (width, height)
    is_onnx_model(path)                          # True / False, from the protobuf's top-level structure

Why: a 1 MB PNG can declare 20000 x 20000 pixels (decoded: 1.2 GB of RGB, 3.7 GB at the decoder's peak, 11 s);
at 60000 x 60000 OpenCV refuses with a traceback; a truncated JPEG decodes into a half-grey image without a word.
The header gives the size without decoding (PNG: the IHDR chunk; JPEG: the first start-of-frame marker); the end
of the file says whether it is whole (PNG: the IEND chunk; JPEG: an end-of-image marker after the scan data).
"""
from __future__ import annotations

import os
import struct

MAX_PIXELS = 100_000_000  # 100 megapixels (e.g. 12000 x 8000): above any camera's portrait, 300 MB decoded
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): C0-CF but C4, C8, CC
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_segments(f):
    """(marker, payload offset, payload length) of each header segment up to and including start-of-scan."""
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = f.read(1)
        if not byte:
            return
        marker = byte[0]
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            continue
        raw = f.read(2)
        if len(raw) < 2:
            return
        (length,) = struct.unpack(">H", raw)
        offset = f.tell()
        yield marker, offset, length - 2
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        f.seek(offset + length - 2)
        if f.read(1) != b"\xff":
            return
        f.seek(-1, os.SEEK_CUR)


def image_header(path) -> tuple[int, int, str]:
    """(width, height, 'png' | 'jpeg') from the header; ValueError when it is neither or the header is broken."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(PNG_SIGNATURE):
            if head[12:16] != b"IHDR" or len(head) < 24:
                raise ValueError("broken PNG header")
            width, height = struct.unpack(">II", head[16:24])
            return width, height, "png"
        if head.startswith(b"\xff\xd8"):
            for marker, offset, _ in _jpeg_segments(f):
                if marker in _SOF:
                    f.seek(offset)
                    sof = f.read(5)
                    if len(sof) < 5:
                        break
                    _, height, width = struct.unpack(">BHH", sof)
                    return width, height, "jpeg"
            raise ValueError("JPEG without a frame header")
    raise ValueError("not a JPEG or PNG")


def is_whole(path, kind: str) -> bool:
    """True when the file ends as a complete PNG (IEND chunk) or JPEG (end-of-image after the scan data)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if kind == "png":
            f.seek(max(0, size - 12))
            return f.read(12)[4:8] == b"IEND"
        scan = None
        for marker, offset, length in _jpeg_segments(f):
            if marker == 0xDA:
                scan = offset + length
        if scan is None:
            return False
        # In entropy-coded data 0xFF is followed by 0x00 or a restart marker: FF D9 is the end of the image.
        # (Data after it, as some phones append, is allowed; a truncated file has none.)
        f.seek(scan)
        tail = b""
        while chunk := f.read(1 << 20):
            if b"\xff\xd9" in tail[-1:] + chunk:
                return True
            tail = chunk
        return False


def check_image_file(path, what: str = "reference", max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a whole JPEG/PNG of at most `max_pixels`; else ValueError with one sentence."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory: pass the path of a portrait JPEG or PNG file.")
    if not os.path.isfile(path):
        raise ValueError(f"{what} image {path} does not exist: pass the path of a portrait JPEG or PNG.")
    try:
        width, height, kind = image_header(path)
    except (ValueError, struct.error):
        raise ValueError(f"{what} {path} is not a readable image: pass a portrait as a JPEG or PNG file.") from None
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read ({err.strerror}): check its permissions.") from None
    if width == 0 or height == 0 or width * height > max_pixels:
        raise ValueError(f"{what} {path} is {width}x{height} pixels, over the {max_pixels // 10**6} megapixel "
                         "limit: pass a smaller portrait (e.g. 1024x1024).")
    if not is_whole(path, kind):
        raise ValueError(f"{what} {path} is a truncated {kind.upper()} file: pass the complete image.")
    return width, height


def is_onnx_model(path) -> bool:
    """True when the file parses as an ONNX ModelProto: top-level protobuf fields only (numbers 1..32, wire types
    0/1/2/5) up to the last byte, with ir_version (field 1, varint) and a graph (field 7, bytes). Reads the file
    once, decodes nothing inside the graph."""
    with open(path, "rb") as f:
        data = f.read()
    pos, seen = 0, set()

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    try:
        while pos < len(data):
            key = varint()
            field, wire = key >> 3, key & 7
            if not 1 <= field <= 32:
                return False
            if wire == 0:
                varint()
            elif wire == 1:
                pos += 8
            elif wire == 2:
                length = varint()  # (not `pos += varint()`: that would add to pos as it was before the varint)
                pos += length
            elif wire == 5:
                pos += 4
            else:
                return False
            seen.add((field, wire))
        return pos == len(data) and (1, 0) in seen and (7, 2) in seen
    except ValueError:
        return False
