"""Sinks: the virtual camera (through a pyvirtualcam backend registered here), the mp4 recording, the /viewer peer.

The server is driven by a looped video file (`--driving`), so this also covers the file capture source.
"""
from __future__ import annotations

import asyncio
import threading
import time

import av
import numpy as np
import pytest
import pyvirtualcam
from aiortc import RTCPeerConnection

from engine.config import StreamConfig
from engine.preview import PreviewRenderer, load_reference
from live_util import get_stats, post_offer, running_server, wait_for
from streaming.sinks import Mp4Writer, RecordSink, VirtualCameraSink

W, H = 256, 256


class MemoryCamera:
    """A pyvirtualcam backend that keeps what it is sent (the interface of pyvirtualcam.Backend)."""

    frames: list = []
    closed = 0
    lock = threading.Lock()

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.shape = (height, width, 3)
        MemoryCamera.frames = []

    def send(self, frame: np.ndarray) -> None:
        with MemoryCamera.lock:
            MemoryCamera.frames.append(frame.reshape(self.shape).copy())

    def close(self) -> None:
        MemoryCamera.closed += 1

    def device(self) -> str:
        return "memory"

    def native_fourcc(self):
        return None


pyvirtualcam.register_backend("flashlive-test-memory", MemoryCamera)


def test_vcam_record_and_viewer_follow_the_driving_video(data, tmp_path):
    reference = load_reference(data("reference", "lp_s6.jpg"))
    make = lambda: PreviewRenderer(reference, W, H)  # noqa: E731
    record = tmp_path / "show.mp4"
    config = StreamConfig(port=0, width=W, height=H, fps=25, driving=str(data("driving", "lp_d0.mp4")), vcam=True,
                          record=str(record))
    closed_before = MemoryCamera.closed

    async def scenario():
        async with running_server(config, make, reference, renderer_name="preview",
                                  vcam_backend="flashlive-test-memory") as (server, url):
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            tracks = []
            pc.on("track", tracks.append)
            answer = await post_offer(url, pc)
            assert answer["kind"] == "viewer"
            await wait_for(lambda: asyncio.sleep(0, tracks), 10)
            viewer = []
            deadline = time.monotonic() + 30
            while (len(viewer) < 40 or len(MemoryCamera.frames) < 50) and time.monotonic() < deadline:
                frame = await asyncio.wait_for(tracks[0].recv(), 10)
                viewer.append(frame.to_ndarray(format="rgb24"))
            stats = await get_stats(url)
            await pc.close()
            return viewer, stats

    viewer, stats = asyncio.run(scenario())

    vcam = MemoryCamera.frames
    assert len(vcam) >= 50, f"the virtual camera got {len(vcam)} frames"
    assert all(f.shape == (H, W, 3) for f in vcam)
    changed = sum(np.abs(a.astype(int) - b).max() > 40 for a, b in zip(vcam[10:], vcam[11:]))
    assert changed >= 10, f"only {changed} virtual-camera frames differ from the one before: the face did not move"
    assert MemoryCamera.closed == closed_before + 1, "the virtual camera was not released on shutdown"

    assert len(viewer) >= 40 and viewer[-1].shape == (H, W, 3)
    assert np.abs(viewer[-1].astype(int) - viewer[5]).max() > 40, "the viewer shows a frozen programme"
    program = stats["program"]
    assert program["face_found"] is True and program["fps_in"] > 10 and program["fps_out"] > 10, program
    (vcam_stats, rec_stats) = stats["sinks"]
    assert vcam_stats["sink"] == "vcam" and vcam_stats["error"] is None
    assert rec_stats["sink"] == "record" and rec_stats["error"] is None

    # The recording was finished on shutdown: a playable mp4 at the output fps, and no partial file beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["show.mp4"]
    with av.open(str(record)) as c:
        assert c.streams.video[0].average_rate == 25
        frames = sum(1 for _ in c.decode(video=0))
    assert frames >= 50


def test_mp4_writer_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(target, 64, 64, 25) as writer:
            for _ in range(30):
                writer.write(np.zeros((64, 64, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [], "a half-written file was left behind"

    sink = RecordSink(target, 64, 64, 25)
    sink.write(np.zeros((64, 64, 3), np.uint8))
    sink.write(np.zeros((10, 10), np.uint8))  # a frame the encoder cannot take: the sink fails, the caller does not
    sink.close()
    assert sink.error is not None and "record sink failed" in sink.error
    assert list(tmp_path.iterdir()) == [], "a failed recording left a file behind"

    sink = RecordSink(target, 64, 64, 25)
    for i in range(10):
        sink.write(np.full((64, 64, 3), 20 * i, np.uint8))
    sink.close()
    assert sink.error is None and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_missing_virtual_camera_is_one_sentence():
    with pytest.raises(ValueError) as err:
        VirtualCameraSink(W, H, 25, backend="no-such-backend")
    message = str(err.value)
    assert "v4l2loopback" in message and message.count("\n") == 0


class ScriptedRenderer:
    """Stands in for a renderer's output queue: pull() hands out what the test put in, then None."""

    def __init__(self):
        self.ready = []

    def pull(self):
        return self.ready.pop(0) if self.ready else None


def test_avatar_track_paces_repeats_and_bounds_the_playout_buffer():
    from streaming.tracks import AvatarTrack

    renderer = ScriptedRenderer()
    idle = np.full((32, 48, 3), 7, np.uint8)
    track = AvatarTrack(renderer, fps=100, width=48, height=32, playout_frames=2, idle=idle)
    frame = lambda v: (np.full((32, 48, 3), v, np.uint8), time.monotonic())  # noqa: E731

    async def scenario():
        shown = []
        t0 = time.monotonic()
        shown.append(await track.next_image())       # nothing rendered yet: the idle portrait, waiting (no repeat)
        renderer.ready += [frame(1), frame(2), frame(3), frame(4)]  # a burst: 2 fit the playout buffer
        for _ in range(4):
            shown.append(await track.next_image())
        renderer.ready += [frame(5)]
        shown.append(await track.next_image())
        return shown, time.monotonic() - t0

    shown, elapsed = asyncio.run(scenario())
    values = [int(img[0, 0, 0]) for img in shown]
    assert values == [7, 3, 4, 4, 4, 5], values  # oldest of the burst dropped, the last frame held while behind
    assert (track.fresh, track.repeats, track.waiting, track.skipped) == (3, 2, 1, 2)
    assert elapsed >= 5 / 100 * 0.9, "six frames at 100 fps must take about 50 ms"


def test_avatar_track_drains_a_standing_queue_but_keeps_a_jitter_buffer():
    """A playout buffer that never empties for a second holds frames that only add latency: the track drops the
    oldest (one frame interval less from then on). A buffer that empties now and then (a renderer with jitter) is
    left alone."""
    from streaming.tracks import AvatarTrack

    fps = 25
    renderer = ScriptedRenderer()
    track = AvatarTrack(renderer, fps=fps, width=8, height=8, playout_frames=3)
    frame = lambda v: (np.full((8, 8, 3), v % 256, np.uint8), float(v))  # noqa: E731
    n = 0

    def tick(new_frames: int) -> int:
        nonlocal n
        for _ in range(new_frames):
            renderer.ready.append(frame(n))
            n += 1
        track._image()
        return n - 1 - int(track.on_air[0])  # frames rendered after the one on air: the queue's latency

    # a burst of 3 at the start, then exactly one frame per tick: 2 frames stand in the buffer (80 ms of latency)
    lags = [tick(3)] + [tick(1) for _ in range(3 * fps)]
    assert lags[1] == 2 and lags[-1] == 0, lags
    assert track.drained == 2 and track.skipped == 2 and track.repeats == 0
    first_drop = next(i for i, lag in enumerate(lags) if lag < 2)
    assert fps - 2 <= first_drop <= fps + 2  # after one second of a buffer that never emptied
    # jitter: 0 or 2 frames per tick, 1 on average; the buffer empties every other tick: nothing is drained
    drained, skipped = track.drained, track.skipped
    for i in range(4 * fps):
        tick(2 if i % 2 == 0 else 0)
    assert track.drained == drained and track.skipped == skipped and track.repeats == 0
