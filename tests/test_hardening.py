"""Bad input and rough edges of issue 16 (items 5 and 6): each one sentence and a non-zero exit (CLI) or a 4xx JSON
error (HTTP, tests/test_guard.py and tests/test_errors.py), with the server still serving.

Reference images are checked from their header before anything decodes them (pixel limit, truncation, a
directory); `--port` out of range; a damaged `--driving` file loops what decodes and says so; `--record` writes
the `--driving` file's audio; `doctor` exits 1 when it prints FIX and knows a pickle from an ONNX model;
flashportrait's warm-up prints progress; `serve` logs one line per session opening and closing and none of
mediapipe's native log lines."""
from __future__ import annotations

import asyncio
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest

import flashlive
from engine.config import StreamConfig
from engine.file_check import MAX_PIXELS, check_image_file, image_header
from engine.preview import PreviewRenderer, load_reference
from live_util import get_stats, running_server, wait_for
from streaming.capture import AVCapture
from test_errors import assert_one_sentence

ROOT = Path(__file__).resolve().parents[1]


def write_png(path: Path, width: int, height: int) -> Path:
    """A complete, valid 1-bit grey PNG of width x height (black): a few hundred KB for 20000 x 20000."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def render_error(capsys, reference: Path, data, tmp_path) -> tuple[int, str]:
    code = flashlive.main(["render", "--driving", str(data("driving", "lp_d0.mp4")), "--reference", str(reference),
                           "-o", str(tmp_path / "out.mp4"), "-q"])
    err = capsys.readouterr().err.strip()
    assert not (tmp_path / "out.mp4").exists()
    return code, err


@pytest.mark.parametrize("side", [20000, 60000])
def test_huge_reference_is_refused_from_its_header(side, data, capsys, tmp_path):
    path = write_png(tmp_path / f"huge{side}.png", side, side)
    assert path.stat().st_size < 8 * 2**20  # a small file that declares a huge image
    # the size comes from the header alone: a copy cut right after IHDR still tells it
    head = tmp_path / "head.png"
    head.write_bytes(path.read_bytes()[:40])
    assert image_header(head) == (side, side, "png")
    code, err = render_error(capsys, path, data, tmp_path)
    assert code == 1 and f"{side}x{side} pixels" in err and "megapixel" in err, err
    assert_one_sentence(err.split(": ", 1)[1])


def test_truncated_and_directory_references_are_refused(data, capsys, tmp_path):
    whole = data("reference", "lp_s6.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) * 6 // 10])
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(data("reference", "fp_case1.png").read_bytes()[:5000])
    folder = tmp_path / "portraits.jpg"
    folder.mkdir()
    for path, words in [(cut, "truncated JPEG"), (cut_png, "truncated PNG"), (folder, "is a directory")]:
        code, err = render_error(capsys, path, data, tmp_path)
        assert code == 1 and words in err, err
        assert_one_sentence(err.split(": ", 1)[1])
    # the whole files pass, with their real sizes; a JPEG named .png is read as what it is
    assert check_image_file(data("reference", "lp_s6.jpg")) == (725, 725)
    assert image_header(data("reference", "fp_case4.png"))[2] == "jpeg"
    assert MAX_PIXELS >= 50_000_000  # a phone's full-resolution photo still passes


def test_directory_as_driving_video_and_port_out_of_range(tmp_path, data, capsys):
    code = flashlive.main(["render", "--driving", str(tmp_path), "--reference", str(data("reference", "lp_s6.jpg")),
                           "-o", str(tmp_path / "o.mp4"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "is a directory" in err, err
    for port in ("99999", "-1", "http"):
        run = subprocess.run([sys.executable, "-m", "flashlive", "serve", "--port", port], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1 and "--port" in lines[0], run.stderr
        assert "Traceback" not in run.stderr and lines[0].endswith(".")


def truncated_video(src: Path, dst: Path, keep: float = 0.6) -> Path:
    """`src` remuxed with its index first (faststart), then cut: it opens, and decoding fails part way."""
    faststart = dst.with_suffix(".full.mp4")
    with av.open(str(src)) as i, av.open(str(faststart), "w", options={"movflags": "faststart"}) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams if s.type in ("video", "audio")}
        for packet in i.demux():
            if packet.dts is not None and packet.stream.index in streams:
                packet.stream = streams[packet.stream.index]
                o.mux(packet)
    data = faststart.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def test_damaged_driving_file_loops_what_decodes_and_says_so(data, tmp_path, caplog):
    path = truncated_video(data("driving", "lp_d0.mp4"), tmp_path / "cut.mp4")
    frames = []
    capture = AVCapture(str(path), lambda f, pts: frames.append(pts), on_loop=lambda: frames.append("loop"))
    capture.source_fps = 500.0  # play it fast: several loops in a moment
    with caplog.at_level("WARNING", logger="flashlive.capture"):
        capture.start()
        deadline = time.monotonic() + 20
        while frames.count("loop") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        capture.stop()
    loops = [i for i, f in enumerate(frames) if f == "loop"]
    assert len(loops) >= 3, "the capture stopped at the damage instead of looping"
    per_loop = loops[0]
    assert 0 < per_loop < 78 and loops[1] - loops[0] == per_loop + 1  # the same decodable part every time
    messages = [r.getMessage() for r in caplog.records if r.name == "flashlive.capture"]
    assert len(messages) == 1 and f"past frame {per_loop}" in messages[0], messages  # said once, not per loop
    assert_one_sentence(messages[0]) and capture.stats()["capture_error"] == messages[0]


def test_serve_with_a_damaged_driving_file_keeps_the_programme_going(data, tmp_path):
    path = truncated_video(data("driving", "lp_d0.mp4"), tmp_path / "cut.mp4")
    reference = load_reference(data("reference", "lp_s6.jpg"))
    config = StreamConfig(port=0, width=96, height=96, driving=str(path))

    async def scenario():
        async with running_server(config, lambda: PreviewRenderer(reference, 96, 96), reference,
                                  renderer_name="preview") as (server, url):
            # the file has ~45 decodable frames (1.8 s at 25 fps): after 4 s the programme has looped on
            program = await wait_for(lambda: _program_past(url, 60), 20)
            return program, (await get_stats(url))["program"]

    first, later = asyncio.run(scenario())
    assert first is not None, "the programme froze at the damaged part of the driving file"
    assert "cannot be decoded past frame" in later["capture_error"], later
    assert later["frames_out"] > 0


async def _program_past(url: str, frames: int):
    program = (await get_stats(url))["program"]
    return program if program["frames_in"] > frames else None


def test_record_writes_the_driving_files_audio(data, tmp_path):
    """lp_d12 has speech: the recording of the programme carries it (AAC), as long as its video, not silent."""
    src = data("driving", "lp_d12.mp4")
    record = tmp_path / "show.mp4"
    reference = load_reference(data("reference", "lp_s6.jpg"))
    config = StreamConfig(port=0, width=96, height=96, driving=str(src), record=str(record))

    async def scenario():
        async with running_server(config, lambda: PreviewRenderer(reference, 96, 96), reference,
                                  renderer_name="preview") as (server, url):
            await wait_for(lambda: _program_past(url, 75), 30)  # 3 s of the file

    asyncio.run(scenario())
    with av.open(str(record)) as c:
        video = c.streams.video[0]
        video_s = video.frames / float(video.average_rate)
    recorded_s, recorded = audio_of(record)
    _, source = audio_of(src)
    assert recorded is not None, "the recording has no audio track"
    assert video_s >= 2.5 and abs(recorded_s - video_s) < 0.3, (recorded_s, video_s)
    rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
    assert rms(recorded) > 0.2 * rms(source), f"the recorded audio is (nearly) silent: {rms(recorded)} vs the " \
                                              f"file's {rms(source)}"


def audio_of(path: Path) -> tuple[float, np.ndarray | None]:
    """(seconds, samples as float in [-1, 1]) of the first audio stream; (0, None) without one."""
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return 0.0, None
        frames = list(c.decode(audio=0))
    x = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float64)
    if frames[0].format.name.startswith("s16"):
        x /= 32768
    return sum(f.samples for f in frames) / frames[0].sample_rate, x


def test_doctor_exits_1_on_fix_and_spots_a_pickle_posing_as_onnx(tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "face_det.onnx").write_bytes(pickle.dumps({"not": "onnx"}))
    code = flashlive.main(["doctor", "--weights", str(weights), "--preset", "tiny", "--port", "0"])
    out = capsys.readouterr().out
    fix = [ln for ln in out.splitlines() if ln.startswith("FIX")]
    assert code == 1 and fix, out
    det = [ln for ln in out.splitlines() if "face_det.onnx" in ln]
    assert det and det[0].startswith("FIX") and "not an ONNX model" in det[0], det
    # preview needs no GPU and no weights: only packages and the port decide
    code = flashlive.main(["doctor", "--renderer", "preview", "--port", "0"])
    out = capsys.readouterr().out
    assert (code == 1) == any(ln.startswith("FIX") for ln in out.splitlines()), out
    assert "weights" not in out and "gpu" not in out


def test_doctor_accepts_a_real_onnx_model(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx (a test extra) builds the model")
    from onnx import TensorProto, helper

    from engine.weights import _probe

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "face_det.onnx"))
    assert _probe(tmp_path / "face_det.onnx").startswith("ONNX model")


def test_flashportrait_warm_up_prints_progress_before_it_is_warm():
    """The first line of `serve --renderer flashportrait --device cpu --preset tiny --random-weights` comes before
    the warm-up, not after it (before: nothing for 90 s); warm-up steps follow on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "flashlive", "serve", "--renderer", "flashportrait", "--device",
                             "cpu", "--preset", "tiny", "--random-weights", "--port", "0", "--size", "64x64"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        progress = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait(30)
    assert "warming up" in first and "progress follows" in first, first
    assert "warm-up: loading and compiling tiny (random weights)" in progress, progress


CLIENT = """
import asyncio, sys
import av
from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack
from streaming.ice import offer_loopback_candidates
from tests.live_util import post_offer

class Camera(VideoStreamTrack):
    def __init__(self, frames):
        super().__init__()
        self.frames, self.n = frames, 0
    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.frames[self.n % len(self.frames)], format="rgb24")
        self.n += 1
        frame.pts, frame.time_base = pts, time_base
        return frame

async def main(url, path):
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(25), c.decode(video=0))]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(Camera(frames))
    offer_loopback_candidates(pc)
    got = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: got.done() or got.set_result(t))
    await post_offer(url, pc)
    track = await asyncio.wait_for(got, 15)
    for _ in range(30):
        await asyncio.wait_for(track.recv(), 15)
    await pc.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("sessions", [2])
def test_serve_logs_one_line_per_session_event_and_no_mediapipe_noise(sessions, data):
    """The real `flashlive serve` (a subprocess, preview renderer): a camera client with a face connects, gets
    frames and hangs up, twice. Its stderr: one 'opened' and one 'closed' line per session; mediapipe's native
    lines (9+ per session before) are gone."""
    server = subprocess.Popen([sys.executable, "-m", "flashlive", "serve", "--port", "0", "--size", "128x128"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stdout:
            if "is serving" in line:
                url = line.split("is serving", 1)[1].split()[0]
                break
        assert url, "the server did not start"
        for _ in range(sessions):
            subprocess.run([sys.executable, "-c", CLIENT, url, str(data("driving", "lp_d0.mp4"))], cwd=ROOT,
                           check=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        stats = asyncio.run(wait_for(lambda: _closed(url, sessions), 15))
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert stats is not None, err
    opened = [ln for ln in lines if " opened" in ln]
    closed = [ln for ln in lines if " closed" in ln]
    assert len(opened) == sessions and len(closed) == sessions, err
    assert not any(("W0000" in ln or "XNNPACK" in ln or "absl::InitializeLog" in ln) for ln in lines), err
    assert len(lines) <= 3 * sessions, f"more than a line per session beyond open/close:\n{err}"


async def _closed(url: str, n: int):
    stats = await get_stats(url)
    return stats if stats["sessions_closed"] >= n and stats["session_count"] == 0 else None
