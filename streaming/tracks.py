"""Video tracks that pace output at a fixed fps: the avatar of one renderer, and a mirror of any frame source.

    track = AvatarTrack(renderer, fps=25, width=512, height=512, playout_frames=3, idle=reference_rgb)
    image = await track.next_image()   # (height, width, 3) uint8 RGB, paced at `fps`
    frame = await track.recv()         # the same as an av.VideoFrame, for an aiortc RTCRtpSender

Every tick takes the next rendered frame from a small playout buffer; when the renderer is behind (buffer empty)
the last frame is sent again and counted in `repeats`, so a stall is visible in the stats, never silent. Ticks
before the first rendered frame show the idle portrait and are counted in `waiting` instead: the session's start,
which the time to first frame measures, not a renderer that fell behind. Frames
that overflow the playout buffer are dropped oldest-first (counted in `skipped`), which keeps latency bounded when
the renderer produces faster than the output fps. A buffer that has not once been empty after a tick for a whole
second holds a standing queue: frames that only add latency (a burst at the start, a renderer that got faster),
since jitter the buffer is there for would have emptied it. The oldest is dropped (counted in `skipped` and
`drained`), so the stream plays one frame interval sooner from then on. A renderer that paces its own output
(`renderer.pace` true: pull() releases each frame at its due time, engine/renderer.py) already has a playout
buffer; the track then keeps at most 2 frames (one of slack for a frame that became due just before the tick), so the two buffers do not add up.
"""
from __future__ import annotations

import asyncio
import collections
import fractions
import threading
import time
from typing import Callable

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_CLOCK = 90_000  # RTP video clock rate
STANDING_S = 1.0  # a playout buffer never empty after a tick for this long holds a standing queue (AvatarTrack)
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


class RateMeter:
    """Events per second over a sliding window (for fps in / fps out)."""

    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self._times: collections.deque = collections.deque()
        self._lock = threading.Lock()  # capture threads tick, the event loop reads

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            # A source that stopped reads as slowing down, then 0 once the window has passed.
            span = max(now - self._times[0], self._times[-1] - self._times[0])
            return (len(self._times) - 1) / span if span > 0 else 0.0


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (height, width, 3) contiguous uint8 RGB (resized only when the size differs)."""
    if image.shape[0] != height or image.shape[1] != width:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


class PacedTrack(MediaStreamTrack):
    """A video track on its own clock: subclasses implement `_image()`; `next_image()` paces it at `fps`."""

    kind = "video"

    def __init__(self, fps: float, width: int, height: int):
        super().__init__()
        self.fps = float(fps)
        self.width = width
        self.height = height
        self.frames_out = 0
        self.fps_out = RateMeter()
        self._start: float | None = None
        self._index = 0

    async def _tick(self) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now
            return
        self._index += 1
        due = self._start + self._index / self.fps
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.25:
            # The consumer stalled (encoder busy, tab in background): restart the clock rather than burst to catch up.
            self._start = now - self._index / self.fps

    def _image(self) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} must implement _image()")

    async def next_image(self) -> np.ndarray:
        """The next (height, width, 3) uint8 RGB frame, returned at the output fps."""
        if self.readyState != "live":
            raise MediaStreamError
        await self._tick()
        image = self._image()
        self.frames_out += 1
        self.fps_out.tick()
        return image

    async def recv(self) -> av.VideoFrame:
        image = await self.next_image()
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(self._index * VIDEO_CLOCK / self.fps)
        frame.time_base = VIDEO_TIME_BASE
        return frame


class AvatarTrack(PacedTrack):
    """The avatar of one renderer, paced at `fps` from a playout buffer of `playout_frames`.

    renderer: anything with `pull() -> (frame (H, W, 3) uint8 RGB, pts seconds) | None` (engine.base.ThreadedRenderer).
    The pts of a rendered frame is the `time.monotonic()` at which its driving frame was captured, so
    `latency_ms` is the capture-to-send time of the server. `idle` (any size RGB) is shown until the first
    rendered frame arrives (the reference portrait, typically).
    """

    def __init__(self, renderer, fps: float, width: int, height: int, playout_frames: int = 3,
                 idle: np.ndarray | None = None):
        super().__init__(fps, width, height)
        self.renderer = renderer
        if getattr(renderer, "pace", False):
            playout_frames = min(playout_frames, 2)  # the renderer paces already: no second playout delay
        self._buffer: collections.deque = collections.deque(maxlen=max(1, playout_frames))
        self.last_image = fit_image(idle, width, height) if idle is not None else np.zeros((height, width, 3), np.uint8)
        self.fresh = 0  # ticks that sent a newly rendered frame
        self.repeats = 0  # ticks that sent the previous frame again because the renderer was behind
        self.waiting = 0  # ticks before the first rendered frame (the idle portrait was sent)
        self.skipped = 0  # rendered frames dropped because the playout buffer was full or held a standing queue
        self.drained = 0  # of those, dropped to end a standing queue
        self._standing = 0  # consecutive ticks that left a frame in the buffer
        self.latency_ms = 0.0  # moving average, capture -> send on this server
        self.last_fresh_time: float | None = None
        self.on_air: tuple[float, float] | None = None  # (capture pts, send time) of the newest fresh frame

    def _drain(self) -> None:
        while True:
            item = self.renderer.pull()
            if item is None:
                return
            if len(self._buffer) == self._buffer.maxlen:
                self.skipped += 1
            self._buffer.append(item)

    def _image(self) -> np.ndarray:
        self._drain()
        if not self._buffer:
            if self.fresh:
                self.repeats += 1
            else:
                self.waiting += 1
            return self.last_image
        image, pts = self._buffer.popleft()
        self._standing = self._standing + 1 if self._buffer else 0
        if self._standing >= STANDING_S * self.fps:
            image, pts = self._buffer.popleft()  # the older frame is skipped: one frame interval less from now on
            self.skipped += 1
            self.drained += 1
            self._standing = 0
        now = time.monotonic()
        self.last_image = fit_image(image, self.width, self.height)
        self.fresh += 1
        self.last_fresh_time = now
        self.on_air = (pts, now)  # a new tuple per frame: streaming.audio.OnAirLatency delays the audio by this
        ms = (now - pts) * 1e3
        self.latency_ms = ms if self.fresh == 1 else 0.9 * self.latency_ms + 0.1 * ms
        return self.last_image

    def stats(self) -> dict:
        return {"fps_out": round(self.fps_out.rate(), 2), "frames_out": self.frames_out, "fresh": self.fresh,
                "repeats": self.repeats, "waiting": self.waiting, "skipped": self.skipped, "drained": self.drained,
                "playout_queue": len(self._buffer),
                "latency_ms": round(self.latency_ms, 1)}


class MirrorTrack(PacedTrack):
    """Whatever `source()` shows now, paced at `fps` (the /viewer page, the virtual camera, the recording).

    source: () -> (H, W, 3) uint8 RGB; called once per tick on the event loop, so it must be cheap.
    """

    def __init__(self, source: Callable[[], np.ndarray], fps: float, width: int, height: int):
        super().__init__(fps, width, height)
        self.source = source

    def _image(self) -> np.ndarray:
        return fit_image(self.source(), self.width, self.height)

    def stats(self) -> dict:
        return {"fps_out": round(self.fps_out.rate(), 2), "frames_out": self.frames_out}
