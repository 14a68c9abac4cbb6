"""The glass-to-glass probe: frame numbers stamped into camera frames come back in the avatar frames they drive;
/stats counts cameras and viewers apart; /favicon.ico is served."""
from __future__ import annotations

import asyncio
import fractions
import time

import aiohttp
import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from conftest import video_frames
from engine.config import StreamConfig
from engine.preview import PreviewRenderer, load_reference
from live_util import get_stats, running_server, wait_for
from streaming.probe import ProbedAvatarTrack, noting_stamps, read_stamp, write_stamp

W, H = 320, 320


def test_stamp_survives_a_lossy_codec_and_scaling():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert read_stamp(image) is None  # noise is not a code: the guard blocks fail
    for k in (0, 1, 1234, 4095):
        stamped = write_stamp(image.copy(), k)
        ok, jpeg = cv2.imencode(".jpg", stamped, [cv2.IMWRITE_JPEG_QUALITY, 50])
        lossy = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
        assert read_stamp(lossy) == k
        assert read_stamp(cv2.resize(lossy, (320, 240), interpolation=cv2.INTER_AREA)) == k
    assert read_stamp(write_stamp(image.copy(), 4096 + 7)) == 7  # numbers wrap at 4096


class ListRenderer:
    """The renderer side of an AvatarTrack, fed by hand: push() renders a grey frame (no code), pull() hands it out."""

    def __init__(self):
        self.out: list = []

    def push(self, frame: np.ndarray, pts: float) -> None:
        self.out.append((np.full((H, W, 3), 90, np.uint8), pts))

    def pull(self):
        return self.out.pop(0) if self.out else None


def test_probed_track_stamps_its_frames_not_the_programme():
    renderer, stamps = ListRenderer(), {}
    track = ProbedAvatarTrack(renderer, 25, W, H, playout_frames=1, stamps=stamps)
    push = noting_stamps(renderer.push, stamps)
    camera = np.full((480, 640, 3), 128, np.uint8)
    for k in (17, 18, 19):
        push(write_stamp(camera.copy(), k), 100.0 + k)
        sent = track._image()
        assert read_stamp(sent) == k
        assert read_stamp(track.last_image) is None  # the viewer, virtual camera and recording see no code
    assert read_stamp(track._image()) == 19  # a repeated frame repeats its code


class StampedCamera(VideoStreamTrack):
    """Real driving frames at 25 fps, frame n stamped n; sent[n] = when it left."""

    def __init__(self, frames):
        super().__init__()
        self.frames, self.sent, self.t0 = frames, [], None

    async def recv(self):
        n = len(self.sent)
        self.t0 = self.t0 or time.monotonic()
        await asyncio.sleep(max(0.0, self.t0 + n / 25 - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(write_stamp(self.frames[n % len(self.frames)].copy(), n), format="rgb24")
        frame.pts, frame.time_base = n * 3600, fractions.Fraction(1, 90000)
        self.sent.append(time.monotonic())
        return frame


def test_probed_session_returns_the_codes_and_viewers_are_counted_apart(data):
    reference = load_reference(data("reference", "lp_s6.jpg"))
    make = lambda: PreviewRenderer(reference, W, H)  # noqa: E731
    frames = [cv2.resize(f, (512, 512)) for f in video_frames("lp_d0.mp4", 50)]

    async def offer(url, pc, **extra):
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer", **extra}) as r:
                answer = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        return answer

    async def scenario():
        async with running_server(StreamConfig(port=0, width=W, height=H, fps=25), make, reference,
                                  renderer_name="preview") as (server, url):
            async with aiohttp.ClientSession() as http, http.get(url + "favicon.ico") as resp:
                favicon = (resp.status, resp.content_type, len(await resp.read()))
            camera, pc, tracks = StampedCamera(frames), RTCPeerConnection(), []
            pc.addTrack(camera)
            pc.on("track", tracks.append)
            await offer(url, pc, probe=True)
            viewer = RTCPeerConnection()
            viewer.addTransceiver("video", direction="recvonly")
            viewer_tracks = []
            viewer.on("track", viewer_tracks.append)
            await offer(url, viewer)
            assert await wait_for(lambda: asyncio.sleep(0, tracks and viewer_tracks), 10)
            codes, programme = [], []
            while len(codes) < 60:
                image = (await asyncio.wait_for(tracks[0].recv(), 10)).to_ndarray(format="rgb24")
                codes.append((read_stamp(image), time.monotonic()))
                mirrored = (await asyncio.wait_for(viewer_tracks[0].recv(), 10)).to_ndarray(format="rgb24")
                programme.append(read_stamp(mirrored))
            stats = await get_stats(url)
            await pc.close()
            await viewer.close()
            camera.stop()
            await wait_for(lambda: _count_is(url, 0), 10)
            return favicon, codes, programme, stats, camera.sent

    favicon, codes, programme, stats, sent = asyncio.run(scenario())

    assert favicon[0] == 200 and favicon[1] == "image/vnd.microsoft.icon" and favicon[2] > 100, favicon
    assert stats["session_count"] == 2 and stats["camera_sessions"] == 1 and stats["viewer_sessions"] == 1, stats
    found = [(k, t) for k, t in codes if k is not None]
    assert len(found) >= 30, f"only {len(found)} of {len(codes)} avatar frames carried a code"
    numbers = [k for k, _ in found]
    assert numbers == sorted(numbers) and len(set(numbers)) >= 20, numbers  # frames in order, and fresh ones
    for k, t in found:  # each code names a camera frame that left before the avatar frame came back
        assert k < len(sent) and sent[k] < t
    assert all(k is None for k in programme), "the viewer's programme carries the probe's code"


async def _count_is(url: str, n: int) -> bool:
    return (await get_stats(url))["session_count"] == n
