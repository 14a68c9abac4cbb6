"""Glass-to-glass probe: a frame number stamped into each camera frame comes back in the avatar frame it drives.

    stamps = {}
    push = noting_stamps(renderer.push, stamps)              # what the capture calls: notes {capture pts: code}
    track = ProbedAvatarTrack(renderer, fps, w, h, stamps=stamps)  # writes the code into the frames it sends

The camera page (static/client.js) draws a code into the bottom-left corner of every camera frame it sends and
notes when it sent it; an offer with {"probe": true} gets a probed session. The server notes each driving frame's
code at capture and writes it into the avatar frame rendered from that driving frame as it goes on air, into the
frames this peer receives only: the programme (viewer page, virtual camera, recording) stays clean. The page reads
the code back from every avatar frame it displays (requestVideoFrameCallback) and has the glass-to-glass latency
of every frame, its own jitter buffer, decoder and playout included.

The code: 2 guard blocks (white, black) then BITS data blocks (least significant first, white = 1) in a row along
the bottom edge, each block `width / 40` pixels square, so it survives scaling and a lossy codec.
"""
from __future__ import annotations

import numpy as np

from streaming.tracks import AvatarTrack

BITS = 12  # frame numbers mod 4096: 164 s at 25 fps, far longer than any latency
BLOCKS = BITS + 2
PER_WIDTH = 40  # a block is width / PER_WIDTH pixels square
KEEP = 512  # driving-frame codes remembered (a renderer is never this many frames behind)


def _block(width: int) -> float:
    return width / PER_WIDTH


def write_stamp(image: np.ndarray, k: int) -> np.ndarray:
    """Write code k (mod 4096) into the bottom-left of (H, W, 3) uint8 `image`, in place; returns image."""
    h, w = image.shape[:2]
    size = _block(w)
    top = h - int(round(size))
    for b, white in enumerate([True, False] + [bool((k >> i) & 1) for i in range(BITS)]):
        image[top:, int(round(b * size)):int(round((b + 1) * size))] = 255 if white else 0
    return image


def read_stamp(image: np.ndarray) -> int | None:
    """The code in the bottom-left of (H, W, 3) uint8 `image` (after a lossy codec), or None if there is none."""
    h, w = image.shape[:2]
    size = _block(w)
    if size < 4 or h < 2 * size:
        return None
    inset = size / 4  # the block centres: no codec ringing at the edges
    row = image[h - int(round(size - inset)):h - int(round(inset))]
    values = [float(row[:, int(round(b * size + inset)):int(round((b + 1) * size - inset))].mean())
              for b in range(BLOCKS)]
    if values[0] < 160 or values[1] > 96:
        return None
    return sum(1 << i for i, v in enumerate(values[2:]) if v > 128)


def noting_stamps(push, stamps: dict):
    """A `push(frame, pts)` that notes {pts: code of the frame} in `stamps` (the newest KEEP), then calls `push`."""

    def noted(frame: np.ndarray, pts: float) -> None:
        stamps[pts] = read_stamp(frame)
        if len(stamps) > KEEP:
            del stamps[next(iter(stamps))]
        push(frame, pts)

    return noted


class ProbedAvatarTrack(AvatarTrack):
    """An AvatarTrack whose frames carry the code of the driving frame they render (see the module docstring).

    stamps: {capture pts: code or None}, filled by `noting_stamps`. `last_image` (the programme) stays unstamped.
    """

    def __init__(self, *args, stamps: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamps = stamps

    def _image(self) -> np.ndarray:
        image = super()._image()
        k = None if self.on_air is None else self.stamps.get(self.on_air[0])
        return image if k is None else write_stamp(image.copy(), k)
