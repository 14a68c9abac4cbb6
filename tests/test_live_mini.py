"""`flashlive serve --renderer flashportrait --preset mini --weights weights/mini --device cpu` over WebRTC: an aiortc
client streams lp_d0 as its camera and gets back avatar frames of the trained mini that move with it."""
from __future__ import annotations

import asyncio
import fractions
import time
from pathlib import Path

import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, VideoStreamTrack

from live_util import get_stats, post_offer, running_server

ROOT = Path(__file__).resolve().parents[1]
DRIVE_FPS = 12.5  # every other frame of lp_d0: what two busy CPU cores extract landmarks for
SECONDS = 7.0


class Camera(VideoStreamTrack):
    def __init__(self, frames):
        super().__init__()
        self.frames, self.n, self.t0 = frames, 0, None

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        if self.n / DRIVE_FPS > SECONDS + 2:
            raise MediaStreamError
        await asyncio.sleep(max(0.0, self.t0 + self.n / DRIVE_FPS - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(self.frames[self.n % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = round(self.n * 90_000 / DRIVE_FPS), fractions.Fraction(1, 90_000)
        self.n += 1
        return frame


def test_serve_mini_streams_moving_avatar_frames(data):
    import flashlive
    from engine.build import idle_image, renderer_factory

    with av.open(str(data("driving", "lp_d0.mp4"))) as c:
        clip = [cv2.resize(f.to_ndarray(format="rgb24"), (256, 256), interpolation=cv2.INTER_AREA)
                for f in c.decode(video=0)][::2]
    reference = clip[0]
    args = flashlive.build_parser().parse_args(
        ["serve", "--renderer", "flashportrait", "--preset", "mini", "--weights", str(ROOT / "weights" / "mini"),
         "--device", "cpu", "--size", "128x128", "--port", "0"])
    cfg = flashlive.stream_config(args)
    make, _ = renderer_factory(args, reference, cfg.width, cfg.height, cfg.input_queue, fps=cfg.fps)
    idle = idle_image(args.renderer, make, reference, cfg.width, cfg.height)

    async def scenario():
        async with running_server(cfg, make, idle, renderer_name="flashportrait") as (server, url):
            pc = RTCPeerConnection()
            camera = Camera(clip)
            pc.addTrack(camera)
            remote: asyncio.Future = asyncio.get_running_loop().create_future()
            pc.on("track", lambda t: remote.done() or remote.set_result(t))
            await post_offer(url, pc)
            track = await asyncio.wait_for(remote, 30)
            received = []
            t_end = time.monotonic() + SECONDS + 30
            while time.monotonic() < t_end and (camera.t0 is None or time.monotonic() < camera.t0 + SECONDS):
                frame = await asyncio.wait_for(track.recv(), 30)
                received.append(frame.to_ndarray(format="rgb24"))
            stats = await get_stats(url)
            await pc.close()
            return received, stats

    received, stats = asyncio.run(scenario())
    (session,) = stats["sessions"]
    rs = session["renderer_stats"]
    assert rs["preset"] == "mini" and rs["random_weights"] is False and rs["decoder"] == "mini", rs
    assert rs["windows"] >= 3, rs
    assert {f.shape for f in received} == {(128, 128, 3)}
    avatar = [f for f in received if np.abs(f.astype(float) - idle.astype(float)).mean() > 1.0]
    assert len(avatar) >= 20, f"only {len(avatar)} of {len(received)} frames differ from the idle portrait"
    distinct = [f for i, f in enumerate(avatar) if i == 0 or np.abs(f.astype(float) - avatar[i - 1]).mean() > 0.2]
    assert len(distinct) >= 15, f"the avatar barely moves: {len(distinct)} distinct frames"
    # it is a face, near the portrait (not noise): PSNR against the reference above 15 dB
    mse = np.mean([(f.astype(float) - idle.astype(float)) ** 2 for f in distinct])
    assert 10 * np.log10(255 ** 2 / mse) > 15
    print(f"{len(received)} frames, {len(distinct)} distinct avatar frames, windows {rs['windows']}, "
          f"budget {session['controller']}")
