"""Capture sources: they turn driving video into `push(frame, pts)` calls and nothing else.

    source = WebRTCCapture(track, push)          # a browser camera arriving over WebRTC (asyncio task)
    source = AVCapture("face.mp4", push)         # a video file, looped, paced at its own fps (thread)
    source = AVCapture("/dev/video0", push)      # a V4L2 device through av (thread)
    source.start(); ...; source.stop()

`push(frame (H, W, 3) uint8 RGB, pts)` is a renderer's `push`: its input queue is the bounded queue of the capture
path (it drops the oldest frame when the renderer is behind, and counts the drop). `pts` is the
`time.monotonic()` at which the frame was captured, so the sinks can measure capture-to-send latency.
File and device decoding happen on a thread, so a slow decode never blocks the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError

from streaming.tracks import RateMeter

Push = Callable[[np.ndarray, float], None]
log = logging.getLogger("flashlive.capture")


class WebRTCCapture:
    """Consumes a remote aiortc video track; calls `on_end()` once when the peer stops sending."""

    def __init__(self, track, push: Push, on_end: Callable[[], None] | None = None):
        self.track = track
        self.push = push
        self.on_end = on_end
        self.frames_in = 0
        self.fps_in = RateMeter()
        self.last_frame_time: float | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> "WebRTCCapture":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                now = time.monotonic()
                self.push(frame.to_ndarray(format="rgb24"), now)
                self.frames_in += 1
                self.fps_in.tick(now)
                self.last_frame_time = now
        except MediaStreamError:
            pass  # the peer closed its track
        finally:
            if self.on_end is not None:
                self.on_end()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def stats(self) -> dict:
        return {"fps_in": round(self.fps_in.rate(), 2), "frames_in": self.frames_in}


def is_device(spec: str) -> bool:
    return spec.startswith("/dev/video")


def open_video(spec: str, size: str = "640x480", framerate: int = 30):
    """Open a video file or a V4L2 device with av; a failure is one sentence naming the fix (ValueError)."""
    if is_device(spec):
        if not os.path.exists(spec):
            raise ValueError(f"No camera device at {spec}: plug one in or pass another --driving path.")
        try:
            return av.open(spec, format="v4l2", options={"video_size": size, "framerate": str(framerate)})
        except (av.FFmpegError, OSError) as err:
            raise ValueError(f"Cannot open camera {spec} ({err}): check that no other program holds it.") from None
    if os.path.isdir(spec):
        raise ValueError(f"Driving video {spec} is a directory: pass the path of a video file or /dev/videoN.")
    if not os.path.isfile(spec):
        raise ValueError(f"Driving video {spec} does not exist: pass the path of a video file or /dev/videoN.")
    unreadable = f"Cannot read {spec} as a video: pass an mp4, mkv, webm or mov file with a face in it."
    try:
        container = av.open(spec)
    except (av.FFmpegError, OSError):
        raise ValueError(unreadable) from None
    # A still image (or anything named like one) opens as a one-frame "video": refuse it, and prove the first
    # frame decodes, so a broken file fails here rather than on a capture thread.
    if not container.streams.video or container.format.name.startswith("image2") or \
            container.format.name.endswith("_pipe"):
        container.close()
        raise ValueError(unreadable)
    try:
        next(container.decode(video=0))
        container.seek(0)
    except (av.FFmpegError, StopIteration):
        container.close()
        raise ValueError(unreadable) from None
    return container


class AVCapture:
    """A video file (looped, paced at its own fps) or a V4L2 device (paced by the device), decoded on a thread.

    The file is opened on the caller's thread so a bad path fails at once with `open_video`'s sentence. A file that
    cannot be decoded past frame N (truncated, damaged) loops its first N frames, said once in the log and in
    `stats()["capture_error"]`; `on_loop()` is called whenever the file starts over (its audio follows).
    """

    def __init__(self, spec: str, push: Push, loop: bool = True, on_loop: Callable[[], None] | None = None):
        self.spec = spec
        self.push = push
        self.loop = loop
        self.on_loop = on_loop
        self.frames_in = 0
        self.fps_in = RateMeter()
        self.error: str | None = None
        self._container = open_video(spec)
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 25
        self.source_fps = float(rate)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "AVCapture":
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        device = is_device(self.spec)
        period = 1.0 / self.source_fps
        container = self._container
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                index = -1
                try:
                    for index, frame in enumerate(container.decode(video=0)):
                        if self._stop.is_set():
                            return
                        if not device:  # a file decodes faster than real time: play it at its own fps
                            delay = start + index * period - time.monotonic()
                            if delay > 0:
                                time.sleep(delay)
                        now = time.monotonic()
                        self.push(frame.to_ndarray(format="rgb24"), now)
                        self.frames_in += 1
                        self.fps_in.tick(now)
                except av.FFmpegError as err:
                    if device or index < 0:
                        raise
                    if self.error is None:  # a damaged file: loop the part that decodes, say so once
                        self.error = (f"{self.spec} cannot be decoded past frame {index + 1} ({err.strerror or err}),"
                                      f" so only its first {index + 1} frames loop: re-encode it, e.g. with "
                                      "ffmpeg -i IN -c:v libx264 OUT.mp4.")
                        log.warning(self.error)
                if device or not self.loop:
                    return
                container.seek(0)
                if self.on_loop is not None:
                    self.on_loop()
        except (av.FFmpegError, OSError) as err:
            self.error = f"Capture from {self.spec} stopped ({err}): check the file or device and restart."
            log.error(self.error)
        finally:
            container.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        else:
            self._container.close()

    def stats(self) -> dict:
        return {"fps_in": round(self.fps_in.rate(), 2), "frames_in": self.frames_in, "capture_error": self.error}
