"""The FlashPortrait renderer live over WebRTC (tiny preset, random weights, CPU): an aiortc client streams lp_d0
to the server and gets avatar frames back, every driving frame once, in order, at a steady pace; when the client
hangs up, the session's renderer state is freed.

The avatar's pixels cannot say which driving frame they render (random weights), so the client stamps a frame
number into each driving frame (tests/avatar_probe.py); the server-side test hooks read it back where the renderer
receives the frame and note which capture pts each video tick sends.
"""
from __future__ import annotations

import asyncio
import fractions
import gc
import time
import weakref

import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, VideoStreamTrack

from avatar_probe import note_packet_arrivals, note_ticks, shown_frames, stamp, stamped_push, tiny_live_renderer
from engine.config import StreamConfig
from live_util import get_stats, post_offer, running_server, wait_for

SIZE = 256  # driving frames as the client sends them
OUT = 64  # avatar size (tiny preset on CPU)
FPS_OUT = 25.0
DRIVE_FPS = 12.5  # every other frame of lp_d0 (25 fps): what two busy CPU cores can extract expressions for
LOOPS = 2  # lp_d0 twice: 78 driving frames, ~6 s
TAIL_S = 2.0  # then hold the last frame, so the avatar's last frames come out of the rolling window


class StampedCamera(VideoStreamTrack):
    """Driving frame n (stamped n) leaves at t0 + n / DRIVE_FPS; after the last one, the last one again."""

    def __init__(self, frames):
        super().__init__()
        self.frames = frames
        self.sent: dict[int, float] = {}
        self.t0: float | None = None
        self.n = 0

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        n = self.n
        if n / DRIVE_FPS > len(self.frames) / DRIVE_FPS + TAIL_S:
            raise MediaStreamError
        await asyncio.sleep(max(0.0, self.t0 + n / DRIVE_FPS - time.monotonic()))
        k = min(n, len(self.frames) - 1)
        frame = av.VideoFrame.from_ndarray(self.frames[k], format="rgb24")
        frame.pts, frame.time_base = round(n * 90_000 / DRIVE_FPS), fractions.Fraction(1, 90_000)
        if n < len(self.frames):
            self.sent[k] = time.monotonic()
        self.n += 1
        return frame


def test_flashportrait_streams_every_frame_in_order_and_frees_the_session(data):

    reference = cv2.imread(str(data("reference", "lp_s6.jpg")))[:, :, ::-1].copy()
    with av.open(str(data("driving", "lp_d0.mp4"))) as c:
        clip = [cv2.resize(f.to_ndarray(format="rgb24"), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                for f in c.decode(video=0)][::2]
    frames = [stamp(f, n) for n, f in enumerate(clip * LOOPS)]
    camera = StampedCamera(frames)
    stamps: dict[float, int] = {}
    ticks: list = []
    renderers = []

    def make():
        r = tiny_live_renderer(reference, OUT, DRIVE_FPS)
        stamped_push(r, stamps)
        renderers.append(r)
        return r

    async def scenario():
        async with running_server(StreamConfig(port=0, width=OUT, height=OUT, fps=FPS_OUT), make,
                                  np.zeros((OUT, OUT, 3), np.uint8), renderer_name="flashportrait") as (server, url):
            pc = RTCPeerConnection()
            pc.addTrack(camera)
            arrivals = note_packet_arrivals(pc)
            remote: asyncio.Future = asyncio.get_running_loop().create_future()
            pc.on("track", lambda t: remote.done() or remote.set_result(t))
            answer = await post_offer(url, pc)
            assert answer["kind"] == "camera"
            note_ticks(server.sessions[answer["session"]].track, ticks)
            track = await asyncio.wait_for(remote, 10)
            received = []  # (pts, frame) of every avatar frame
            while camera.t0 is None or time.monotonic() < camera.t0 + len(frames) / DRIVE_FPS + TAIL_S:
                frame = await asyncio.wait_for(track.recv(), 10)
                received.append((frame.pts, frame.to_ndarray(format="rgb24")))
            stats = await get_stats(url)
            (renderer,) = renderers
            state_before = renderer.session_state_bytes()
            roller = weakref.ref(renderer.roller)
            engine_sessions = renderer.engine.sessions  # the engine is shared per process: other tests may hold one
            await pc.close()
            freed = await wait_for(lambda: _session_count_is(url, 0), 15)
            return received, arrivals, stats, state_before, roller, engine_sessions, freed

    received, arrivals, stats, state_before, roller, engine_sessions, freed = asyncio.run(scenario())
    (session,) = stats["sessions"]
    rs = session["renderer_stats"]
    shown = shown_frames([pts for pts, _ in received], arrivals, ticks, stamps, FPS_OUT)

    # Avatar frames of the configured size, real renderer output (not the idle frame).
    assert len(received) >= 0.8 * FPS_OUT * len(frames) / DRIVE_FPS, f"only {len(received)} frames arrived"
    assert {f.shape for _, f in received} == {(OUT, OUT, 3)}
    assert session["renderer"] == "flashportrait" and rs["random_weights"] is True, rs
    assert session["controller"]["reason"], session["controller"]  # /stats says what budget it runs and why
    gpu = stats["gpu"]  # telemetry: readings, or a plain "no GPU" status on a machine without one
    assert gpu["gpus"] if gpu["available"] else gpu["status"].startswith("no GPU"), gpu

    # Count and order, as the server sent them: every driving frame the renderer got goes on air exactly once, in
    # order (nothing dropped at the input, nothing skipped in the playout buffer).
    on_air = [stamps.get(pts) for _, pts in ticks if pts is not None]
    sent = [k for i, k in enumerate(on_air) if i == 0 or on_air[i - 1] != k]
    assert set(range(len(frames))) <= set(stamps.values()), "the server did not receive every driving frame"
    clip_sent = [k for k in sent if k is not None and k < len(frames)]
    assert clip_sent == list(range(len(frames))), f"frames on air out of order, repeated or missing: {clip_sent}"
    assert rs["dropped_in"] == 0 and session["skipped"] == 0, (rs["dropped_in"], session["skipped"])
    # ... and as the client received them (loopback UDP may lose a packet on a busy machine: nearly all).
    fresh = [k for i, (_, k) in enumerate(shown) if k is not None and (i == 0 or shown[i - 1][1] != k)]
    assert fresh == sorted(fresh) and len(fresh) == len(set(fresh)), f"received out of order or repeated: {fresh}"
    assert len(set(fresh) & set(range(len(frames)))) >= 0.95 * len(frames), f"received only {len(set(fresh))}"

    # Pacing: the output runs at the configured fps, and a rendered window's frames are handed out one per driving
    # frame period, not in bursts: consecutive driving frames appear one driving period apart (within a tick).
    times = np.array([t for t, _ in shown])
    fps = (len(times) - 1) / (times[-1] - times[0])
    assert abs(fps - FPS_OUT) < 1.5, f"output ran at {fps:.1f} fps, not {FPS_OUT}"
    onset = {k: t for t, k in reversed(shown) if k is not None}
    gaps = np.array([onset[k + 1] - onset[k] for k in sorted(onset) if k + 1 in onset and k + 1 < len(frames)])
    steady = np.mean(np.abs(gaps - 1 / DRIVE_FPS) <= 1 / FPS_OUT)
    # bursts (a window's frames handed out at once) give at most 1 / (frames per window) here, ~0.1-0.25; 0.6
    # leaves room for a 2-core machine running other jobs too (0.75 seen with a second test run beside this one)
    assert steady >= 0.6, f"only {100 * steady:.0f} % of frames appeared one driving period after the previous one"
    latency = np.array([onset[k] - camera.sent[k] for k in sorted(onset) if k in camera.sent])
    print(f"{len(received)} frames at {fps:.1f} fps; latency median {np.median(latency) * 1e3:.0f} ms, "
          f"{100 * steady:.0f} % steady; repeats {session['repeats']}, windows {rs['windows']}")

    # Disconnect: the session is gone and its renderer freed its state (rolling latents, caches, tokens).
    assert state_before > 0
    assert freed, "the session was not freed after the client hung up"
    (renderer,) = renderers
    assert renderer.closed and renderer.session_state_bytes() == 0
    assert renderer.engine.sessions == engine_sessions - 1 and renderer._window_thread is None
    gc.collect()
    assert roller() is None, "the closed session's rolling window is still referenced"


async def _session_count_is(url: str, n: int) -> bool:
    return (await get_stats(url))["session_count"] == n
