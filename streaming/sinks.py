"""Sinks: where avatar frames go besides the WebRTC peer.

The WebRTC sink is a paced track (streaming/tracks.py) handed to a peer connection; aiortc encodes it on its own
thread. The virtual camera and the mp4 recording are `ThreadedSink`s fed from a paced track by `pump()`:

    sinks = [VirtualCameraSink(512, 512, 25), RecordSink("out.mp4", 512, 512, 25)]
    task = asyncio.ensure_future(pump(track, sinks))     # track.next_image() paces at the output fps
    ...; task.cancel(); [s.close() for s in sinks]

`write(image)` never blocks the event loop: a sink keeps at most `queue` frames (dropping the oldest, counted) and
does its blocking I/O (device writes, H.264 encoding) on its own thread. `Mp4Writer` writes into a hidden
`.partial` file beside the target and renames it only on a clean finish, so an error never leaves a half-written
mp4 behind.
"""
from __future__ import annotations

import collections
import fractions
import os
import threading
from pathlib import Path

import av
import numpy as np


class Mp4Writer:
    """H.264 mp4 of (height, width, 3) uint8 RGB frames at a constant `fps`, optionally with copied audio packets.

    Use as a context manager: a clean exit finishes and renames the file, an exception removes it.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps, audio_template=None, crf: int = 18,
                 pcm_audio: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"Output {self.path} is a directory: pass a file name such as {self.path / 'out.mp4'}.")
        if not self.path.parent.is_dir():
            raise ValueError(f"Folder {self.path.parent} does not exist: create it or pass another output path.")
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.fps = fractions.Fraction(fps).limit_denominator(1001)
        self.frames = 0
        self._container = av.open(str(self.partial), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=self.fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._time_base = 1 / self.fps  # frames keep this; the muxer changes the stream's own time base on open
        self._video.time_base = self._time_base
        self._video.options = {"crf": str(crf), "preset": "veryfast"}
        self._audio = self._container.add_stream_from_template(audio_template) if audio_template is not None else None
        if pcm_audio:  # write_audio(): 48 kHz stereo s16 samples, encoded to AAC
            self._audio = self._container.add_stream("aac", rate=48_000, layout="stereo")
        self.audio_samples = 0
        self._closed = False

    def write(self, image: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = self.frames
        frame.time_base = self._time_base
        self._container.mux(self._video.encode(frame))
        self.frames += 1

    def mux_audio(self, packet: av.Packet, shift: int = 0) -> None:
        """Copy one demuxed audio packet (no re-encode), moved `shift` ticks of its time base earlier."""
        if packet.dts is None:  # the demuxer's flush packet
            return
        packet.stream = self._audio
        packet.pts -= shift
        packet.dts -= shift
        self._container.mux(packet)

    def write_audio(self, samples: np.ndarray) -> None:
        """(k, 2) int16 samples at 48 kHz that follow the previous ones (pcm_audio=True)."""
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate = 48_000
        frame.pts = self.audio_samples
        frame.time_base = fractions.Fraction(1, 48_000)
        self.audio_samples += len(samples)
        self._container.mux(self._audio.encode(frame))

    def finish(self) -> Path:
        if not self._closed:
            self._container.mux(self._video.encode(None))
            if self._audio is not None and self.audio_samples:
                self._container.mux(self._audio.encode(None))
            self._container.close()
            self._closed = True
            os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (av.FFmpegError, OSError):
                pass  # the file is being thrown away
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class ThreadedSink:
    """Base class: subclasses implement `_write(image)` and `_close(ok)`; both run on the sink's thread."""

    name = "sink"

    def __init__(self, queue: int = 2):
        self._queue: collections.deque = collections.deque(maxlen=queue)
        self._cv = threading.Condition()
        self._stop = False
        self.frames = 0
        self.dropped = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
        self._thread.start()

    def write(self, image: np.ndarray) -> None:
        with self._cv:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(image)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait(0.5)
                if not self._queue:  # stopped and drained
                    break
                image = self._queue.popleft()
            if self.error is not None:
                continue  # keep draining so the producer never waits; the error is in the stats
            try:
                self._write(image)
                self.frames += 1
            except Exception as err:  # a full disk or a vanished device must not take the server down
                self.error = f"{self.name} sink failed: {err}"
        self._close(ok=self.error is None)

    def close(self) -> None:
        """Write what is queued, then release the device / finish the file; idempotent."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        return {"sink": self.name, "frames": self.frames, "dropped": self.dropped, "error": self.error}

    def _write(self, image: np.ndarray) -> None:
        raise TypeError(f"{type(self).__name__} must implement _write(image)")

    def _close(self, ok: bool) -> None:
        raise TypeError(f"{type(self).__name__} must implement _close(ok)")


class VirtualCameraSink(ThreadedSink):
    """Frames to a virtual camera through pyvirtualcam (v4l2loopback on Linux, OBS on Windows/macOS)."""

    name = "vcam"

    def __init__(self, width: int, height: int, fps: float, device: str | None = None, backend: str | None = None):
        import pyvirtualcam
        from pyvirtualcam.camera import BACKENDS

        if backend is not None and backend not in BACKENDS:  # checked here: pyvirtualcam would fail in __del__ too
            raise ValueError(f"No virtual camera backend {backend!r} (this system has {', '.join(BACKENDS) or 'none'}): "
                             "on Linux load v4l2loopback with `sudo modprobe v4l2loopback devices=1 "
                             "exclusive_caps=1`, elsewhere install OBS.")
        try:
            self.camera = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device,
                                              backend=backend)
        except (RuntimeError, KeyError, ValueError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"No virtual camera is available ({detail}): on Linux load v4l2loopback with "
                             "`sudo modprobe v4l2loopback devices=1 exclusive_caps=1`, elsewhere install OBS."
                             ) from None
        self.device = self.camera.device
        super().__init__()

    def _write(self, image: np.ndarray) -> None:
        self.camera.send(image)

    def _close(self, ok: bool) -> None:
        self.camera.close()


class RecordSink(ThreadedSink):
    """Frames to an H.264 mp4 at a constant `fps` (one frame per tick of the paced track that feeds it).

    With `audio=True` the file gets an AAC track: set `audio_source` (a streaming.audio.TickAudio, before the first
    write) and each frame is written with the audio of the frame on air (silence while it is None)."""

    name = "record"

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float, audio: bool = False):
        self.writer = Mp4Writer(path, width, height, fps, pcm_audio=audio)
        self.audio = audio
        self.audio_source = None
        self._silence = np.zeros((round(48_000 / fps), 2), np.int16)
        super().__init__(queue=8)  # encoding hiccups are absorbed here rather than dropped

    def write(self, image: np.ndarray) -> None:
        if not self.audio:
            return super().write(image)
        chunk = self._silence if self.audio_source is None else self.audio_source.next()  # on the loop: cheap
        super().write((image, chunk))

    def _write(self, item) -> None:
        if not self.audio:
            return self.writer.write(item)
        image, chunk = item
        self.writer.write(image)
        self.writer.write_audio(chunk)

    def _close(self, ok: bool) -> None:
        if ok and self.writer.frames:
            self.writer.finish()
        else:
            self.writer.abort()


async def pump(track, sinks: list[ThreadedSink]) -> None:
    """Feed every sink one image per tick of `track` (a streaming.tracks.PacedTrack) until cancelled."""
    while True:
        image = await track.next_image()
        for sink in sinks:
            sink.write(image)
