"""An aiortc client streams a real driving video to the server over loopback WebRTC and gets the avatar back."""
from __future__ import annotations

import asyncio
import time

import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.contrib.media import MediaPlayer

from engine.config import StreamConfig
from engine.preview import PreviewRenderer, load_reference
from live_util import get_stats, post_offer, running_server, wait_for

W, H = 320, 256  # not square, not the driving size: proves the configured size is what arrives


def block_change(a: np.ndarray, b: np.ndarray, block: int = 16) -> float:
    """Largest mean |a - b| (grey levels) over block x block tiles of the central face box."""
    ga, gb = a.astype(np.float32).mean(-1), b.astype(np.float32).mean(-1)
    d = np.abs(ga - gb)[H // 8: H - H // 8, W // 5: W - W // 5]
    h, w = (d.shape[0] // block) * block, (d.shape[1] // block) * block
    return float(d[:h, :w].reshape(h // block, block, w // block, block).mean((1, 3)).max())


def driving_frames(path, width, height) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([cv2.resize(f.to_ndarray(format="rgb24"), (width, height)) for f in c.decode(video=0)])


def test_aiortc_client_gets_moving_avatar(data):
    reference = load_reference(data("reference", "lp_s6.jpg"))
    driving = data("driving", "lp_d0.mp4")
    make = lambda: PreviewRenderer(reference, W, H)  # noqa: E731
    idle = make().reference

    async def scenario():
        async with running_server(StreamConfig(port=0, width=W, height=H, fps=25), make, idle,
                                  renderer_name="preview") as (server, url):
            player = MediaPlayer(str(driving), loop=True)
            pc = RTCPeerConnection()
            pc.addTrack(player.video)
            tracks = []
            pc.on("track", tracks.append)
            answer = await post_offer(url, pc)
            assert answer["kind"] == "camera"
            assert await wait_for(lambda: asyncio.sleep(0, tracks), 10), "no avatar track in the answer"
            frames, deadline = [], time.monotonic() + 40
            while len(frames) < 100 and time.monotonic() < deadline:
                frame = await asyncio.wait_for(tracks[0].recv(), 10)
                frames.append(frame.to_ndarray(format="rgb24"))
            stats = await get_stats(url)
            await pc.close()
            player.video.stop()
            closed = await wait_for(lambda: _count_is(url, 0), 10)
            return frames, stats, closed

    frames, stats, closed = asyncio.run(scenario())

    assert len(frames) >= 50, f"only {len(frames)} avatar frames arrived"
    assert all(f.shape == (H, W, 3) for f in frames), {f.shape for f in frames}
    changes = [block_change(a, b) for a, b in zip(frames, frames[1:])]
    moving = sum(c > 5.0 for c in changes)
    # A frozen or constant avatar changes by codec noise only (< 3 grey levels per tile).
    assert moving >= 15, f"only {moving} of {len(changes)} consecutive frame pairs changed: {np.round(changes, 1)}"
    moved_from_reference = max(block_change(f, idle) for f in frames[10:])
    assert moved_from_reference > 8.0, "the avatar never moved away from the reference portrait"
    # Not an echo of the camera: every avatar frame is far from every driving frame.
    drive = driving_frames(driving, W, H).astype(np.int16)
    for f in frames[10::10]:
        nearest = np.abs(drive - f.astype(np.int16)).mean(axis=(1, 2, 3)).min()
        assert nearest > 20, f"an avatar frame is within {nearest:.1f} grey levels of a driving frame"

    assert stats["session_count"] == 1
    (session,) = stats["sessions"]
    assert session["kind"] == "camera" and session["renderer"] == "preview"
    assert session["fps_out"] > 10 and session["fps_in"] > 10, session
    assert session["face_found"] is True
    assert session["fresh"] >= 30, session
    assert "repeats" in session and "latency_ms" in session
    assert closed, "the session was not freed after the client closed its peer connection"


async def _count_is(url: str, n: int) -> bool:
    return (await get_stats(url))["session_count"] == n
