"""Audio that goes back to the peer delayed by exactly the avatar's latency, so lips and voice stay in sync.

    ring = AudioRing()                                        # 48 kHz stereo s16, keyed by capture time
    AudioInput(remote_audio_track, ring, arrivals, hold).start()   # a browser microphone over WebRTC
    push = FileAudio("talk.mp4", ring).wrap(renderer.push)    # or: a --driving file's audio, frame by frame
    track = DelayedAudioTrack(ring, OnAirLatency(avatar_track))   # -> pc.addTrack(track)

The clock. Every driving video frame carries the `time.monotonic()` at which the server captured it (its pts),
and the avatar track sends it out `latency` seconds later (`OnAirLatency` reads that from the frame on air). Audio
is written into the ring on the same capture clock, and `DelayedAudioTrack` plays, at wall time t, the audio
captured at t - latency: the voice leaves the server together with the face that was captured with it.

Putting microphone audio on the video's capture clock. aiortc's receivers hold media before handing it out: a
video frame until its last packet (streaming/jitter.py; aiortc's own buffer waits for the first packet of the
next frame, one frame interval), an audio packet until four more have arrived (80 ms). Using hand-out times would
put the voice tens of ms off the face. So
`PacketArrivals` notes when the first RTP packet of each timestamp arrived, the video side measures its hold
(hand-out time - arrival), and an audio frame's capture time is its packet arrival + that video hold. Jitter is
removed with the media timestamps: capture = media time + the median (arrival - media time) of the last half
second (the median, not the minimum: video capture times carry the typical delay, not the smallest).

A `--driving` file has no packets: `FileAudio.wrap(push)` writes the audio of video frame i (its 1/fps of samples)
into the ring at the capture time the file capture gives frame i, so it stays in sync across loops by construction.

Drift. `DelayedAudioTrack` reads the ring continuously (the audio is sent unaltered) while the latency it should
play at stays within `deadband_ms` of the one it plays at; beyond that it re-seats the read position, with a 2 ms
crossfade so the step does not click (counted in `audio_resyncs`). No time stretching: it would change the pitch
and smear the waveform. Before the first avatar frame (latency unknown) it sends silence.

Buffers are bounded: the ring holds `seconds` of audio, a remote track is always drained (aiortc queues what
nobody reads without bound), and the pre-decoded file audio is capped at `max_file_s`.
"""
from __future__ import annotations

import asyncio
import collections
import fractions
import statistics
import time
from typing import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

SAMPLE_RATE = 48_000  # Opus / WebRTC
CHANNELS = 2
PTIME = 0.02  # seconds per outgoing audio frame (WebRTC's usual packet time)
SAMPLES_PER_FRAME = int(SAMPLE_RATE * PTIME)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
RTP_WRAP = 1 << 32
# Opus (libopus, as aiortc and browsers use it) looks 312 samples ahead: decoded audio lags its timestamp by 6.5 ms
# per encode. One encode happens before the server (the peer's microphone), one after (our audio track).
OPUS_DELAY_S = 312 / SAMPLE_RATE


class AudioRing:
    """A bounded ring of (samples, 2) int16 at 48 kHz whose samples are addressed by capture time.

    Sample n of the stream was captured at `t0 + n / 48000` (t0: capture time of the first write). Writes that land
    within `tolerance_s` of the previous write's end are appended contiguously (capture times jitter by a few ms);
    a later write leaves silence in the gap, an earlier one overwrites (a looped file starting again).
    """

    def __init__(self, seconds: float = 10.0, tolerance_s: float = 0.008):
        self.capacity = int(seconds * SAMPLE_RATE)
        self._buf = np.zeros((self.capacity, CHANNELS), np.int16)
        self.tolerance = int(tolerance_s * SAMPLE_RATE)
        self.t0: float | None = None
        self.end = 0  # absolute index one past the last written sample
        self.samples_in = 0
        self.gaps = 0  # writes that left silence behind them (lost or late packets)
        self.rewinds = 0  # writes that went back in time (a file loop)

    def index(self, t: float) -> int:
        return round((t - self.t0) * SAMPLE_RATE)

    def write(self, samples: np.ndarray, captured: float) -> None:
        """samples (k, 2) int16, the first of them captured at `captured` (time.monotonic seconds)."""
        k = len(samples)
        if k == 0:
            return
        if self.t0 is None:
            self.t0 = captured
        n = self.index(captured)
        if abs(n - self.end) <= self.tolerance:
            n = self.end
        elif n > self.end:
            self.gaps += 1
            self._clear(self.end, n)
        else:
            self.rewinds += 1
        if k > self.capacity:
            samples, n = samples[-self.capacity:], n + k - self.capacity
            k = self.capacity
        pos = n % self.capacity
        first = min(k, self.capacity - pos)
        self._buf[pos:pos + first] = samples[:first]
        self._buf[:k - first] = samples[first:]
        self.end = n + k
        self.samples_in += k

    def _clear(self, start: int, stop: int) -> None:
        start = max(start, stop - self.capacity)
        for a in range(start, stop, self.capacity):
            b = min(stop, a + self.capacity)
            pa, pb = a % self.capacity, (b - 1) % self.capacity + 1
            if pa < pb:
                self._buf[pa:pb] = 0
            else:
                self._buf[pa:] = 0
                self._buf[:pb] = 0

    def read(self, n: int, k: int) -> np.ndarray:
        """Samples [n, n + k) as (k, 2) int16; silence where nothing (or nothing still held) was written."""
        out = np.zeros((k, CHANNELS), np.int16)
        lo, hi = max(n, self.end - self.capacity, 0), min(n + k, self.end)
        if self.t0 is None or lo >= hi:
            return out
        idx = np.arange(lo, hi) % self.capacity
        out[lo - n:hi - n] = self._buf[idx]
        return out

    def stats(self) -> dict:
        return {"audio_in_s": round(self.samples_in / SAMPLE_RATE, 2), "audio_gaps": self.gaps,
                "audio_rewinds": self.rewinds}


class OnAirLatency:
    """Capture-to-send latency of the avatar frames going on air (seconds): what the audio must be delayed by.

    track: a streaming.tracks.AvatarTrack (it records `on_air = (capture pts, send time)` for each fresh frame).
    A frame's latency jitters by up to one output tick (it waits for the next tick), so this is the median of the
    last `window` fresh frames; when the last `attack` frames all sit more than `step_s` away from that median,
    or the newest one more than `jump_s` (the renderer's latency stepped: more than tick jitter can explain), the
    older ones are forgotten, so the audio follows the step at once. None until the first avatar frame is sent.
    """

    def __init__(self, track, window: int = 11, attack: int = 3, step_s: float = 0.03, jump_s: float = 0.09):
        self.track = track
        self.attack, self.step_s, self.jump_s = attack, step_s, jump_s
        self._seen = None
        self._recent: collections.deque = collections.deque(maxlen=window)
        self._median: float | None = None
        self.steps = 0

    def __call__(self) -> float | None:
        on_air = getattr(self.track, "on_air", None)
        if on_air is not None and on_air is not self._seen:
            self._seen = on_air
            pts, sent = on_air
            self._recent.append(sent - pts)
            last = list(self._recent)[-self.attack:]
            if self._median is not None and abs(last[-1] - self._median) > self.jump_s:
                last = last[-1:]
            if self._median is not None and len(last) in (1, self.attack) and (
                    all(x > self._median + self.step_s for x in last) or
                    all(x < self._median - self.step_s for x in last)):
                self._recent.clear()
                self._recent.extend(last)
                self.steps += 1
            self._median = statistics.median(self._recent)
        return self._median


class MirrorLatency:
    """The latency a /viewer sees: the programme's on-air latency plus the mirror's lag behind the programme.

    A streaming.tracks.MirrorTrack shows, at each of its ticks, the frame the programme track sent at its own last
    tick: both tick at the same fps on their own clocks, so the mirror lags by their phase difference (constant
    until a clock restarts), up to one frame.
    """

    def __init__(self, program_latency: OnAirLatency, program, mirror):
        self.program_latency, self.program, self.mirror = program_latency, program, mirror

    def __call__(self) -> float | None:
        latency = self.program_latency()
        p, m = getattr(self.program, "_start", None), getattr(self.mirror, "_start", None)
        if latency is None or p is None or m is None:
            return latency
        period = 1.0 / self.mirror.fps
        return latency + (m - p) % period


class PacketArrivals:
    """When the first RTP packet of each RTP timestamp reached an aiortc RTCRtpReceiver (time.monotonic seconds).

    aiortc hands decoded frames out, after its jitter buffer held them, with `frame.pts` = the RTP timestamp minus
    the stream's first one; this wraps the receiver's packet handler (aiortc has no public hook for it) to see the
    packets before that hold, keyed the same way. Bounded: the last `keep` timestamps.
    """

    def __init__(self, receiver, keep: int = 256):
        self._times: collections.OrderedDict = collections.OrderedDict()
        self.keep = keep
        self._first: int | None = None
        handler = getattr(receiver, "_handle_rtp_packet", None)
        self.hooked = handler is not None
        if handler is None:  # another aiortc: capture times fall back to hand-out times
            return

        async def handle(packet, *args, **kwargs):
            if self._first is None:
                self._first = packet.timestamp
            key = (packet.timestamp - self._first) % RTP_WRAP
            if key not in self._times:
                self._times[key] = time.monotonic()
                if len(self._times) > self.keep:
                    self._times.popitem(last=False)
            return await handler(packet, *args, **kwargs)

        receiver._handle_rtp_packet = handle

    def arrival(self, pts: int) -> float | None:
        """Arrival of the first packet of the frame aiortc handed out with this pts (None: not seen, or too old)."""
        return self._times.get(pts % RTP_WRAP)


class VideoHold:
    """How long the video receiver held each frame (hand-out - first packet arrival), moving average (seconds).

    wrap(track) returns a track that measures it on every recv(); give that one to the video capture.
    """

    def __init__(self, arrivals: PacketArrivals | None):
        self.arrivals = arrivals
        self.hold_s = 0.0
        self.frames = 0

    def wrap(self, track) -> MediaStreamTrack:
        hold = self

        class HeldTrack(MediaStreamTrack):
            kind = "video"

            async def recv(self):
                frame = await track.recv()
                arrived = None if hold.arrivals is None else hold.arrivals.arrival(frame.pts)
                if arrived is not None:
                    h = time.monotonic() - arrived
                    hold.hold_s = h if hold.frames == 0 else 0.9 * hold.hold_s + 0.1 * h
                    hold.frames += 1
                return frame

            def stop(self):
                super().stop()
                track.stop()

        return HeldTrack()


def to_s16_stereo(frame: av.AudioFrame, resampler: av.AudioResampler) -> np.ndarray:
    """Any av.AudioFrame -> (k, 2) int16 at 48 kHz (k may differ from frame.samples while resampling)."""
    if frame.format.name == "s16" and frame.layout.name == "stereo" and frame.sample_rate == SAMPLE_RATE:
        return frame.to_ndarray().reshape(-1, CHANNELS)  # packed s16: (1, 2k) interleaved
    chunks = [f.to_ndarray().reshape(-1, CHANNELS) for f in resampler.resample(frame)]
    return np.concatenate(chunks) if chunks else np.zeros((0, CHANNELS), np.int16)


def has_audio(path: str) -> bool:
    """Whether the media file at `path` has an audio stream (False when it cannot be opened)."""
    try:
        with av.open(path) as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, OSError):
        return False


def new_resampler() -> av.AudioResampler:
    return av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE)


class AudioInput:
    """Drains a remote aiortc audio track into an AudioRing on the video's capture clock (see module docstring).

    arrivals: PacketArrivals of the audio receiver (None: hand-out times); hold: the video's VideoHold (None: 0).
    """

    def __init__(self, track, ring: AudioRing, arrivals: PacketArrivals | None = None,
                 hold: VideoHold | None = None, dejitter_frames: int = 25):
        self.track, self.ring, self.arrivals, self.hold = track, ring, arrivals, hold
        self.frames_in = 0
        self._offsets: collections.deque = collections.deque(maxlen=dejitter_frames)
        self._resampler = new_resampler()
        self._last_pts: int | None = None
        self._ext = 0  # unwrapped RTP timestamp (the 32-bit one wraps, from a random origin)
        self._task: asyncio.Task | None = None

    def start(self) -> "AudioInput":
        self._task = asyncio.ensure_future(self._run())
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _media_time(self, frame: av.AudioFrame) -> float:
        pts = frame.pts or 0
        if self._last_pts is not None:
            step = (pts - self._last_pts) % RTP_WRAP
            self._ext += step - RTP_WRAP if step >= RTP_WRAP // 2 else step
        self._last_pts = pts
        time_base = frame.time_base or fractions.Fraction(1, frame.sample_rate)
        return float(self._ext * time_base)

    def capture_time(self, frame: av.AudioFrame, handed_out: float) -> float:
        arrived = None if self.arrivals is None else self.arrivals.arrival(frame.pts)
        captured = (handed_out if arrived is None else arrived) + (self.hold.hold_s if self.hold else 0.0)
        media = self._media_time(frame)
        self._offsets.append(captured - media)
        return media + statistics.median(self._offsets) - OPUS_DELAY_S  # the sound is one encoder lookahead older

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                captured = self.capture_time(frame, time.monotonic())
                self.ring.write(to_s16_stereo(frame, self._resampler), captured)
                self.frames_in += 1
        except MediaStreamError:
            pass  # the peer stopped its microphone

    def stats(self) -> dict:
        return {"audio_frames_in": self.frames_in, **self.ring.stats(),
                "video_hold_ms": None if self.hold is None else round(1e3 * self.hold.hold_s, 1)}


class FileAudio:
    """The audio track of a driving video file, fed into an AudioRing in step with that file's video frames.

    `wrap(push)` returns a push function for the file capture: each call pushes video frame i and writes the
    audio of [i / fps, (i + 1) / fps) into the ring at the frame's capture time (its pts), looping with the video.
    A file without audio: `has_audio` is False and `wrap` returns `push` unchanged.
    """

    def __init__(self, path: str, ring: AudioRing, max_file_s: float = 600.0):
        self.path, self.ring = path, ring
        self.truncated = False
        with av.open(path) as container:
            video = container.streams.video[0]
            self.fps = float(video.average_rate or video.guessed_rate or 25)
            self.frames_per_loop = sum(1 for p in container.demux(video) if p.size)
        with av.open(path) as container:
            video = container.streams.video[0]
            v0 = float((video.start_time or 0) * video.time_base)
            self.has_audio = bool(container.streams.audio)
            self.samples = np.zeros((0, CHANNELS), np.int16)
            if self.has_audio:
                self.samples = self._decode(container, v0, max_file_s)
        self._index = 0

    def _decode(self, container, v0: float, max_file_s: float) -> np.ndarray:
        """All of the audio (capped) as (k, 2) int16 at 48 kHz, sample 0 at the video's first frame."""
        audio = container.streams.audio[0]
        resampler = new_resampler()
        chunks, first, total, cap = [], None, 0, int(max_file_s * SAMPLE_RATE)
        try:
            for frame in container.decode(audio):
                if first is None:
                    first = float(frame.time or 0.0)
                chunk = to_s16_stereo(frame, resampler)
                chunks.append(chunk)
                total += len(chunk)
                if total >= cap:
                    self.truncated = True
                    break
        except av.FFmpegError:  # a damaged file: the audio that decodes (the capture loops what decodes too)
            self.truncated = True
        for frame in resampler.resample(None):
            chunks.append(frame.to_ndarray().reshape(-1, CHANNELS))
        samples = np.concatenate(chunks) if chunks else np.zeros((0, CHANNELS), np.int16)
        shift = round(((first or 0.0) - v0) * SAMPLE_RATE)  # audio that starts after the video: lead with silence
        if shift > 0:
            samples = np.concatenate([np.zeros((shift, CHANNELS), np.int16), samples])
        elif shift < 0:
            samples = samples[-shift:]
        return np.ascontiguousarray(samples[:cap])

    def chunk(self, i: int) -> np.ndarray:
        """The samples of video frame i of the file."""
        a, b = round(i * SAMPLE_RATE / self.fps), round((i + 1) * SAMPLE_RATE / self.fps)
        out = self.samples[a:b]
        if len(out) < b - a:  # video longer than audio: silence
            out = np.concatenate([out, np.zeros((b - a - len(out), CHANNELS), np.int16)])
        return out

    def restart(self) -> None:
        """The video starts over (AVCapture's on_loop): the next frame is frame 0 of the file again."""
        self._index = 0

    def wrap(self, push: Callable[[np.ndarray, float], None]) -> Callable[[np.ndarray, float], None]:
        if not self.has_audio:
            return push

        def push_with_audio(frame: np.ndarray, pts: float) -> None:
            push(frame, pts)
            i = self._index % max(1, self.frames_per_loop)
            self._index += 1
            self.ring.write(self.chunk(i), pts)

        return push_with_audio

    def stats(self) -> dict:
        return {"audio_source": "file", "audio_truncated": self.truncated, **self.ring.stats()}


class TickAudio:
    """The audio of the frame on air, one video frame's worth per call: for a recording of the programme.

    track: the programme's AvatarTrack (its `on_air` capture pts says which audio goes with the face on air);
    `next()` -> (k, 2) int16 at 48 kHz, k = the samples of one video frame at `fps` (exactly SAMPLE_RATE / fps on
    average). The read position advances continuously and is re-seated on the on-air frame's capture time when it
    drifts more than half a frame (a loop of the file, a skipped frame); silence before the first frame."""

    def __init__(self, ring: AudioRing, track, fps: float):
        self.ring, self.track, self.fps = ring, track, float(fps)
        self.ticks = 0
        self._k: int | None = None
        self.reseats = 0

    def next(self) -> np.ndarray:
        i = self.ticks
        self.ticks += 1
        n = round((i + 1) * SAMPLE_RATE / self.fps) - round(i * SAMPLE_RATE / self.fps)
        on_air = self.track.on_air
        if on_air is None or self.ring.t0 is None:
            return np.zeros((n, CHANNELS), np.int16)
        target = self.ring.index(on_air[0])
        if self._k is None or abs(self._k - target) > SAMPLE_RATE / self.fps / 2:
            self._k = target
            self.reseats += 1
        out = self.ring.read(self._k, n)
        self._k += n
        return out


class DelayedAudioTrack(MediaStreamTrack):
    """48 kHz stereo audio, paced at 20 ms per frame, read from `ring` `latency()` seconds after its capture.

    latency: () -> seconds | None (an OnAirLatency); None sends silence. deadband_ms: how far the latency may move
    before the read position follows it (see the module docstring).
    """

    kind = "audio"

    def __init__(self, ring: AudioRing, latency: Callable[[], float | None], deadband_ms: float = 5.0,
                 crossfade_ms: float = 2.0):
        super().__init__()
        self.ring, self.latency = ring, latency
        self.deadband = int(deadband_ms * SAMPLE_RATE / 1e3)
        self.fade = np.linspace(0.0, 1.0, max(2, int(crossfade_ms * SAMPLE_RATE / 1e3)))[:, None]
        self._cursor: int | None = None  # ring index of the next sample to send
        self._start: float | None = None
        self._sent = 0  # samples sent
        self.frames_out = 0
        self.resyncs = 0
        self.silent_frames = 0
        self.delay_s: float | None = None  # the latency it plays at now
        self.error_ms = 0.0  # |read position - target| at the last frame, before any re-seat
        self.lateness_s = 0.0  # moving average of how late the event loop wakes this track up

    async def _tick(self) -> float:
        """Sleep until this frame is due; returns when it leaves: the due time plus the event loop's typical
        lateness (a busy loop wakes up late; the audio chosen is the audio for the moment it is actually sent, as
        the video frame on air is, and smoothing the lateness keeps that target from jittering)."""
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._sent / SAMPLE_RATE
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.25:  # the sender stalled: restart the clock instead of bursting to catch up
            self._start = now - self._sent / SAMPLE_RATE
            due = now
        self.lateness_s = 0.95 * self.lateness_s + 0.05 * (time.monotonic() - due)
        return due + self.lateness_s

    def _samples(self, now: float) -> np.ndarray:
        latency = self.latency()
        if latency is None or self.ring.t0 is None:
            self.silent_frames += 1
            return np.zeros((SAMPLES_PER_FRAME, CHANNELS), np.int16)
        target = self.ring.index(now - latency + OPUS_DELAY_S)  # our encoder will hold it back by its lookahead
        if self._cursor is None:
            self._cursor, self.delay_s = target, latency
        error = target - self._cursor
        self.error_ms = 1e3 * abs(error) / SAMPLE_RATE
        if abs(error) <= self.deadband:
            block = self.ring.read(self._cursor, SAMPLES_PER_FRAME)
        else:  # re-seat: fade from the old read position into the new one
            self.resyncs += 1
            self.delay_s = latency
            old = self.ring.read(self._cursor, len(self.fade)).astype(np.float32)
            block = self.ring.read(target, SAMPLES_PER_FRAME)
            head = block[:len(self.fade)].astype(np.float32)
            block[:len(self.fade)] = (old * (1 - self.fade) + head * self.fade).round().astype(np.int16)
            self._cursor = target
        self._cursor += SAMPLES_PER_FRAME
        return block

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        samples = self._samples(await self._tick())
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._sent
        frame.time_base = AUDIO_TIME_BASE
        self._sent += SAMPLES_PER_FRAME
        self.frames_out += 1
        return frame

    def stats(self) -> dict:
        return {"audio_frames_out": self.frames_out, "audio_delay_ms": None if self.delay_s is None else
                round(1e3 * self.delay_s, 1), "audio_sync_error_ms": round(self.error_ms, 1),
                "audio_resyncs": self.resyncs, "audio_silent_frames": self.silent_frames}
