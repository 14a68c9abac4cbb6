"""Lip sync over WebRTC: lp_d3's video and audio go to the FlashPortrait server; the avatar and the voice that come
back must stay within one frame of each other for the whole clip (its median within half a frame, 90% of its 1 s
medians within one frame and none beyond two: a stalled second on a shared CPU), although the avatar is ~0.5 s late.

What is measured, from timestamps only:
  * the client sends driving frame k at a time it records, S_v[k], with k stamped into the frame as a 10-bit
    clapperboard in its bottom-left corner; it sends audio sample m of lp_d3 at a recorded time S_a(m);
  * on the server the test notes, for every driving frame the renderer gets, its stamp k (read back from the
    decoded pixels) and capture pts, and for every video tick which capture pts was on air;
  * back at the client every received RTP packet's arrival time is noted before aiortc's jitter buffer (which
    holds video and audio for different times). A received video frame's arrival A_v gives the tick, the tick
    the driving frame k on air. The audio arriving at A_v is located in lp_d3 by cross-correlating the received
    samples with the source: source sample m;
  * sync error = S_a(m) - S_v[k]: how far apart, when the client sent them, are the voice and the face that are
    presented together, judged when driving frame k appears. 0 is perfect; undelayed audio would be off by the
    whole avatar latency (asserted to be many frames). Arrival times are de-jittered per track (sender's media
    clock + the median transit), so the busy receiving event loop is not measured as sync error.
"""
from __future__ import annotations

import asyncio
import fractions
import time

import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.config import StreamConfig
from avatar_probe import (dejitter, note_packet_arrivals, note_ticks, shown_frames, stamp, stamped_push,
                          tiny_live_renderer)
from live_util import post_offer, running_server

SIZE = 256  # driving frames sent by the client
OUT = 64  # avatar size (tiny preset, CPU)
FPS_OUT = 25.0
SR = 48_000
CHUNK = 960
DRIVE_EVERY = 3  # the camera sends every third frame of lp_d3 (10 fps): what 2 slow, busy CPU cores can render
TAIL_S = 2.5  # after the clip: hold the last frame and send silence, so the avatar's tail comes back
LATENCY_TARGET_MS = 350.0  # serve's default: a CPU too slow for every driving frame drops some, latency stays put


def load_clip(path):
    with av.open(str(path)) as c:
        fps = float(c.streams.video[0].average_rate)
        frames = [stamp(cv2.resize(f.to_ndarray(format="rgb24"), (SIZE, SIZE), interpolation=cv2.INTER_AREA), k)
                  for k, f in enumerate(c.decode(video=0))]
    with av.open(str(path)) as c:
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=SR)
        chunks = [g.to_ndarray().reshape(-1, 2) for f in c.decode(audio=0) for g in resampler.resample(f)]
        chunks += [g.to_ndarray().reshape(-1, 2) for g in resampler.resample(None)]
    audio = np.concatenate(chunks)
    return fps, frames, np.clip(audio.astype(np.int32) + audio_marker(len(audio)), -32768, 32767).astype(np.int16)


def audio_marker(n: int, seed: int = 3) -> np.ndarray:
    """(n, 2) int16 band-limited noise (200-3000 Hz, RMS 2000): lp_d3's AAC track is digital silence, which no
    measurement can place in time, so the client's microphone adds this known sound to it (an audible clapperboard
    that Opus keeps well enough for cross-correlation)."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spectrum[(f < 200) | (f > 3000)] = 0
    x = np.fft.irfft(spectrum, n)
    x *= 2000 / np.sqrt((x ** 2).mean())
    return np.repeat(x[:, None], 2, axis=1).astype(np.int32)


class Clip:
    """One clock for the client's camera and microphone: media time m leaves at t0 + m for both."""

    def __init__(self, fps, frames, audio):
        self.fps, self.frames, self.audio = fps, frames, audio
        self.t0: float | None = None
        self.video_sent: dict[int, float] = {}  # driving frame k -> send time
        self.audio_sent: list[float] = []  # audio chunk n -> send time
        self.end = len(frames) / fps + TAIL_S

    async def wait(self, media_time: float) -> float:
        if self.t0 is None:
            self.t0 = time.monotonic()
        delay = self.t0 + media_time - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if media_time > self.end:
            raise MediaStreamError
        return time.monotonic()


class ClipVideo(MediaStreamTrack):
    kind = "video"

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip, self.n = clip, 0

    async def recv(self):
        c, n = self.clip, self.n
        sent = await c.wait(n * DRIVE_EVERY / c.fps)
        k = min(n * DRIVE_EVERY, len(c.frames) - 1)
        frame = av.VideoFrame.from_ndarray(c.frames[k], format="rgb24")
        frame.pts, frame.time_base = round(n * DRIVE_EVERY * 90_000 / c.fps), fractions.Fraction(1, 90_000)
        if n * DRIVE_EVERY < len(c.frames):
            c.video_sent[k] = sent
        self.n += 1
        return frame


class ClipAudio(MediaStreamTrack):
    kind = "audio"

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip, self.n = clip, 0

    async def recv(self):
        c, n = self.clip, self.n
        sent = await c.wait(n * CHUNK / SR)
        block = c.audio[n * CHUNK:(n + 1) * CHUNK]
        if len(block) < CHUNK:
            block = np.concatenate([block, np.zeros((CHUNK - len(block), 2), np.int16)])
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = SR, n * CHUNK, fractions.Fraction(1, SR)
        c.audio_sent.append(sent)
        self.n += 1
        return frame


def locate(received: np.ndarray, source: np.ndarray, block: int = 4800, step: int = 2400) -> list:
    """[(received index b, source index of received[b])] for loud blocks that match the source unambiguously."""
    def mono8k(x):  # 48 kHz -> 8 kHz mono float: enough to place speech to 1/8 ms
        x = x.astype(np.float32).mean(axis=1)
        return x[: len(x) // 6 * 6].reshape(-1, 6).mean(axis=1)

    r, s = mono8k(received), mono8k(source)
    blk, stp = block // 6, step // 6
    n = 1 << int(np.ceil(np.log2(len(s) + blk)))
    S = np.fft.rfft(s, n)
    energy = np.concatenate([[0.0], np.cumsum(s.astype(np.float64) ** 2)])
    out = []
    for b in range(0, len(r) - blk, stp):
        x = r[b:b + blk]
        if np.sqrt((x.astype(np.float64) ** 2).mean()) < 300:  # silence places nothing
            continue
        corr = np.fft.irfft(S * np.conj(np.fft.rfft(x, n)), n)[: len(s) - blk]
        norm = np.sqrt((energy[blk:blk + len(corr)] - energy[: len(corr)]) * float((x ** 2).sum())) + 1e-9
        score = corr / norm
        best = int(np.argmax(score))
        if score[best] > 0.5:
            out.append((b * 6, best * 6))
    # A real match agrees with a neighbour (the audio is sent unaltered between the server's re-seats).
    lags = [src - rx for rx, src in out]
    return [m for i, m in enumerate(out) if any(abs(lags[i] - lags[j]) <= 48 for j in (i - 1, i + 1)
                                                if 0 <= j < len(out))]



def measure(video_rx, audio_rx, arrivals, ticks, stamps, clip: Clip):
    """-> (sync errors s, avatar latencies s, driving frame of each received avatar frame); see module docstring."""
    # --- the audio: where in lp_d3 is the received sample that arrived at time t? -----------------------------------
    received = np.concatenate([a for _, a in audio_rx])
    starts = np.cumsum([0] + [len(a) for _, a in audio_rx])[:-1]
    audio_arrival = np.array([arrivals["audio"].get(pts, np.nan) for pts, _ in audio_rx])
    assert np.isfinite(audio_arrival).mean() > 0.95
    audio_arrival = dejitter(np.array([pts / SR for pts, _ in audio_rx]), audio_arrival)
    matches = locate(received, clip.audio)
    assert len(matches) > 50, f"only {len(matches)} received audio blocks were found in lp_d3's audio"
    m_rx, m_src = np.array(matches).T
    lag = m_src - m_rx  # source index - received index, per located block

    def source_sample_at(t: float) -> int | None:
        i = np.searchsorted(audio_arrival, t) - 1  # the audio frame playing at t (packets arrive in order)
        if i < 0 or not np.isfinite(audio_arrival[i]):
            return None
        r = starts[i] + min(CHUNK - 1, int((t - audio_arrival[i]) * SR))
        j = np.searchsorted(m_rx, r)
        near = [x for x in (j - 1, j) if 0 <= x < len(m_rx) and abs(m_rx[x] - r) <= 4800]
        if not near:  # no loud block near: this moment cannot be placed in the source
            return None
        return int(r + lag[min(near, key=lambda x: abs(m_rx[x] - r))])

    def audio_sent_at(m: int) -> float:
        n = min(max(0, m // CHUNK), len(clip.audio_sent) - 1)  # m < 0: before the clip's first sample
        return clip.audio_sent[n] + (m - n * CHUNK) / SR

    # --- the video: which driving frame is the received avatar frame? ----------------------------------------------
    errors, latencies, seen_k, judged = [], [], [], []
    for arrived, k in shown_frames([pts for pts, _ in video_rx], arrivals, ticks, stamps, FPS_OUT):
        if k is None or k not in clip.video_sent or (seen_k and seen_k[-1] == k):
            continue  # lip sync is judged when a driving frame appears, not while the next tick repeats it
        seen_k.append(k)
        latencies.append(arrived - clip.video_sent[k])
        m = source_sample_at(arrived)
        if m is not None and m < len(clip.audio):
            errors.append(audio_sent_at(m) - clip.video_sent[k])
            judged.append(k)

    return errors, latencies, seen_k, judged


def test_returned_audio_stays_within_one_frame_of_the_avatar(data):

    reference = cv2.imread(str(data("reference", "lp_s6.jpg")))[:, :, ::-1].copy()
    fps, frames, audio = load_clip(data("driving", "lp_d3.mp4"))
    clip = Clip(fps, frames, audio)
    stamps: dict[float, int] = {}  # server capture pts -> driving frame k
    ticks: list[tuple[float, float | None]] = []  # server video tick time -> capture pts on air
    renderers = []

    def make():
        r = tiny_live_renderer(reference, OUT, fps / DRIVE_EVERY, LATENCY_TARGET_MS)
        stamped_push(r, stamps)
        renderers.append(r)
        return r

    async def scenario():
        async with running_server(StreamConfig(port=0, width=OUT, height=OUT, fps=FPS_OUT), make,
                                  np.zeros((OUT, OUT, 3), np.uint8), renderer_name="flashportrait") as (server, url):
            pc = RTCPeerConnection()
            pc.addTrack(ClipVideo(clip))
            pc.addTrack(ClipAudio(clip))
            arrivals = note_packet_arrivals(pc)
            remote: dict = {}
            pc.on("track", lambda t: remote.setdefault(t.kind, t))
            answer = await post_offer(url, pc)
            note_ticks(server.sessions[answer["session"]].track, ticks)
            video_rx, audio_rx = [], []

            async def drain(kind, out):
                while True:
                    frame = await asyncio.wait_for(remote[kind].recv(), 10)
                    out.append((frame.pts, frame.to_ndarray().reshape(-1, 2) if kind == "audio" else None))

            for _ in range(100):
                if len(remote) == 2:
                    break
                await asyncio.sleep(0.05)
            assert set(remote) == {"audio", "video"}, f"the answer sent back {sorted(remote)}, not audio and video"
            tasks = [asyncio.ensure_future(drain("video", video_rx)), asyncio.ensure_future(drain("audio", audio_rx))]
            while clip.t0 is None or time.monotonic() < clip.t0 + clip.end + 0.5:
                await asyncio.sleep(0.2)
            stats = server.stats()
            for t in tasks:
                t.cancel()
            await pc.close()
            return video_rx, audio_rx, arrivals, stats

    video_rx, audio_rx, arrivals, stats = asyncio.run(scenario())
    (session,) = stats["sessions"]
    errors, latencies, seen_k, judged = measure(video_rx, audio_rx, arrivals, ticks, stamps, clip)

    n_frames = len(frames)
    assert all(b >= a for a, b in zip(seen_k, seen_k[1:])), "the avatar's driving frames came back out of order"
    assert seen_k and seen_k[0] < 0.1 * n_frames and seen_k[-1] > 0.9 * n_frames, \
        f"the avatar covered driving frames {seen_k[:1]}..{seen_k[-1:]} of {n_frames}, not the whole clip"
    latency = float(np.median(latencies))
    errors = np.array(errors) * 1e3
    frame_ms = 1e3 / FPS_OUT
    per_second = round(fps / DRIVE_EVERY)  # driving frames in one second of the clip
    windows = np.array([np.median(errors[i:i + per_second]) for i in range(max(1, len(errors) - per_second + 1))])
    within = float((np.abs(errors) <= frame_ms).mean())
    report = (f"avatar latency {latency * 1e3:.0f} ms; sync error over {len(errors)} frames: median "
              f"{np.median(errors):.1f} ms, 1 s medians {windows.min():.1f}..{windows.max():.1f} ms, "
              f"{100 * within:.1f} % of frames within one frame ({frame_ms:.0f} ms), min {errors.min():.1f}, "
              f"max {errors.max():.1f} (driving frame {judged[int(np.argmax(np.abs(errors)))]}); "
              f"server: {session.get('audio_delay_ms')} ms delay, "
              f"{session.get('audio_resyncs')} re-seats, video hold {session.get('video_hold_ms')} ms")
    print(report)
    # Undelayed audio would be off by the avatar's whole latency: make sure that is many frames.
    assert latency > 5 / FPS_OUT, f"the avatar is only {latency * 1e3:.0f} ms late: the test would prove nothing"
    assert len(errors) > 0.8 * len(set(seen_k)), f"only {len(errors)} avatar frames could be matched to audio"
    # The audio's offset from the face over the whole clip: its median within half a frame, and second by second
    # within one frame, but for a second in which the shared 2-core machine stalled the client or the server: a
    # loaded full-suite run once showed one stretch of 1 s medians up to 55 ms with the clip's median at 10 ms
    # (alone the same test stays under 23 ms). So 90% of the 1 s medians within one frame and none beyond two;
    # audio that ignored the avatar's latency would be off by all of it (~20 frames).
    assert abs(np.median(errors)) <= frame_ms / 2, report
    assert np.mean(np.abs(windows) <= frame_ms) >= 0.9 and np.all(np.abs(windows) <= 2 * frame_ms), report
    # Frame by frame: a 10 fps driving frame waits up to one 25 fps tick to go on air (+-20 ms by itself) and two
    # busy CPU cores add jitter (a stalled tick shows one frame late): most frames are within one frame of their
    # audio, and nearly all within three. Sync itself is the medians above; single frames carry the machine's
    # scheduling: idle, 0-1 of ~114 frames lie beyond three frames, but with a second job on the 2 cores a run
    # showed 3 (2.6 %), so the bound is 5 %, which a drifting or jumping sync (every later frame off) still fails.
    assert within >= 0.8 and np.mean(np.abs(errors) <= 3 * frame_ms) >= 0.95, report


def test_driving_file_audio_reaches_viewers_in_step_with_the_programme(data):
    """`--driving FILE`: the file's own audio goes to a receive-only viewer (OBS) delayed by the programme's
    latency. lp_d12 has real speech: the viewer's audio is located in it by cross-correlation and compared with
    the file frame the programme shows at the same moment (both as media time of the file)."""

    reference = cv2.imread(str(data("reference", "lp_s6.jpg")))[:, :, ::-1].copy()
    path = data("driving", "lp_d12.mp4")
    with av.open(str(path)) as c:
        fps = float(c.streams.video[0].average_rate)
        n_frames = c.streams.video[0].frames
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=SR)
        source = np.concatenate([g.to_ndarray().reshape(-1, 2) for f in c.decode(audio=0)
                                 for g in resampler.resample(f)])
    order: dict[float, int] = {}  # programme capture pts -> file frame index (the capture pushes them in order)

    def make():
        r = tiny_live_renderer(reference, OUT, fps, LATENCY_TARGET_MS)
        push = r.push

        def noted(frame, pts):
            order[pts] = len(order)
            push(frame, pts)

        r.push = noted
        return r

    program_ticks: list = []
    viewer_ticks: list[float] = []

    async def scenario():
        config = StreamConfig(port=0, width=OUT, height=OUT, fps=FPS_OUT, driving=str(path))
        async with running_server(config, make, np.zeros((OUT, OUT, 3), np.uint8),
                                  renderer_name="flashportrait") as (server, url):
            note_ticks(server._program, program_ticks)
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            arrivals = note_packet_arrivals(pc)
            remote: dict = {}
            pc.on("track", lambda t: remote.setdefault(t.kind, t))
            answer = await post_offer(url, pc)
            assert answer["kind"] == "viewer"
            mirror = server.sessions[answer["session"]].track
            image = mirror._image

            def noted_image():
                viewer_ticks.append(time.monotonic())
                return image()

            mirror._image = noted_image
            for _ in range(100):
                if len(remote) == 2:
                    break
                await asyncio.sleep(0.05)
            assert set(remote) == {"audio", "video"}, f"the viewer got {sorted(remote)}, not audio and video"
            video_rx, audio_rx = [], []

            async def drain(kind, out):
                while True:
                    frame = await asyncio.wait_for(remote[kind].recv(), 10)
                    out.append((frame.pts, frame.to_ndarray().reshape(-1, 2) if kind == "audio" else None))

            tasks = [asyncio.ensure_future(drain("video", video_rx)), asyncio.ensure_future(drain("audio", audio_rx))]
            # One pass through the file, then the programme's latency: the viewer has seen every frame of the first
            # pass (judged below), however long the programme took to start (a fixed wait judged fewer frames when
            # it started late); bounded whatever the machine.
            deadline = time.monotonic() + 3 * n_frames / fps
            while len(order) < n_frames and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            latency_s = (server.stats()["program"].get("latency_ms") or 0.0) / 1e3
            await asyncio.sleep(min(0.5 + latency_s, 3.0))
            stats = server.stats()
            for t in tasks:
                t.cancel()
            await pc.close()
            return video_rx, audio_rx, arrivals, stats

    video_rx, audio_rx, arrivals, stats = asyncio.run(scenario())
    (viewer,) = stats["sessions"]
    assert stats["program"]["audio_source"] == "file" and viewer["audio_frames_out"] > 0, (stats["program"], viewer)

    received = np.concatenate([a for _, a in audio_rx])
    starts = np.cumsum([0] + [len(a) for _, a in audio_rx])[:-1]
    audio_arrival = dejitter(np.array([pts / SR for pts, _ in audio_rx]),
                             np.array([arrivals["audio"].get(pts, np.nan) for pts, _ in audio_rx]))
    matches = locate(received, source)
    assert len(matches) > 20, f"only {len(matches)} blocks of the viewer's audio were found in lp_d12's audio"
    m_rx, m_src = np.array(matches).T

    # The viewer's frame at time t shows the programme frame on air then: file frame i, media time i / fps.
    program_times = np.array([t for t, _ in program_ticks])
    rx = [(arrivals["video"].get(pts), int(np.searchsorted(viewer_ticks, arrivals["video"].get(pts))) - 1)
          for pts, _ in video_rx if arrivals["video"].get(pts) is not None]
    rx = [(a, i) for a, i in rx if i >= 0]
    shown = dejitter(np.array([viewer_ticks[i] for _, i in rx]), np.array([a for a, _ in rx]))
    errors, last = [], None
    for t_shown, (_, i) in zip(shown, rx):
        j = int(np.searchsorted(program_times, viewer_ticks[i])) - 1
        pts = program_ticks[j][1] if j >= 0 else None
        frame = order.get(pts)
        if frame is None or frame == last or frame >= n_frames:
            continue
        last = frame
        a = int(np.searchsorted(audio_arrival, t_shown)) - 1
        if a < 0:
            continue
        r = starts[a] + min(CHUNK - 1, int((t_shown - audio_arrival[a]) * SR))
        k = int(np.searchsorted(m_rx, r))
        near = [x for x in (k - 1, k) if 0 <= x < len(m_rx) and abs(m_rx[x] - r) <= 4800]
        if near:
            x = min(near, key=lambda x: abs(m_rx[x] - r))
            errors.append(1e3 * ((r + m_src[x] - m_rx[x]) / SR - frame / fps))
    errors = np.array(errors)
    frame_ms = 1e3 / FPS_OUT
    windows = np.array([np.median(errors[i:i + 25]) for i in range(max(1, len(errors) - 24))])
    report = (f"programme latency {stats['program']['latency_ms']} ms, audio delay {viewer['audio_delay_ms']} ms; "
              f"sync error over {len(errors)} frames: median {np.median(errors):.1f} ms, 1 s medians "
              f"{windows.min():.1f}..{windows.max():.1f} ms, {100 * np.mean(np.abs(errors) <= frame_ms):.1f} % "
              f"within one frame, {100 * np.mean(np.abs(errors) <= 2 * frame_ms):.1f} % within two")
    print(report)
    assert len(errors) > 0.5 * n_frames * 0.8, report
    assert viewer["audio_delay_ms"] > 2 * frame_ms, f"the programme is only {viewer['audio_delay_ms']} ms late"
    assert np.all(np.abs(windows) <= frame_ms), report
    # Sync itself is the medians above (a one-frame offset fails them). Single frames also carry this machine's
    # scheduling jitter (91-95 % within one frame on an idle 2-core machine, 78 % once under a full test run's load),
    # so the per-frame bounds leave room for it while a drifting or jumping sync still fails them.
    assert np.mean(np.abs(errors) <= frame_ms) >= 0.7, report
    assert np.mean(np.abs(errors) <= 2 * frame_ms) >= 0.9, report


def test_ring_is_bounded_and_addressed_by_capture_time():
    from streaming.audio import AudioRing

    ring = AudioRing(seconds=1.0)
    rng = np.random.default_rng(0)
    sound = rng.integers(-3000, 3000, (3 * SR, 2)).astype(np.int16)
    for n in range(0, len(sound), CHUNK):  # 3 s in 20 ms chunks, capture times (after the first) jittered by 3 ms
        ring.write(sound[n:n + CHUNK], 100.0 + n / SR + (rng.uniform(-0.003, 0.003) if n else 0.0))
    assert ring._buf.nbytes == SR * 2 * 2 and ring.gaps == 0  # 1 s of 48 kHz stereo s16, however much went in
    assert np.array_equal(ring.read(ring.index(102.5), 480), sound[int(2.5 * SR):int(2.5 * SR) + 480])
    assert not ring.read(ring.index(101.0), 480).any(), "audio older than the ring holds must read as silence"
    assert not ring.read(ring.index(103.5), 480).any(), "audio not captured yet must read as silence"
    ring.write(sound[:CHUNK], 103.2)  # 200 ms after the last write: a gap of silence, then the new audio
    assert ring.gaps == 1 and not ring.read(ring.index(103.05), 480).any()
    assert np.array_equal(ring.read(ring.index(103.2), CHUNK), sound[:CHUNK])


def test_delayed_track_frames_and_delay():
    from streaming.audio import OPUS_DELAY_S, AudioRing, DelayedAudioTrack

    ring = AudioRing(seconds=5.0)
    t0 = time.monotonic() - 1.0  # audio captured from 1 s ago to 1 s ahead
    index = np.arange(2 * SR)
    ring.write(np.stack([index % 30000, index // 30000], axis=1).astype(np.int16), t0)  # each sample says its index
    latency = {"s": None}
    track = DelayedAudioTrack(ring, lambda: latency["s"])

    async def frames(n):
        return [await track.recv() for _ in range(n)]

    first = asyncio.run(frames(2))
    assert all(not f.to_ndarray().any() for f in first), "before the first avatar frame the track is silent"
    latency["s"] = 0.5
    out = asyncio.run(frames(10))
    for i, f in enumerate(first + out):
        assert (f.format.name, f.layout.name, f.sample_rate, f.samples) == ("s16", "stereo", SR, CHUNK)
        assert f.pts == i * CHUNK and f.time_base == fractions.Fraction(1, SR)
    sent_at = time.monotonic()
    block = out[-1].to_ndarray().reshape(-1, 2).astype(int)
    last = block[:, 0] + 30000 * block[:, 1]
    played = (last[0] / SR + t0) - sent_at  # capture time of the frame's first sample - when it was sent
    assert abs(played + 0.5 - OPUS_DELAY_S) < 0.03, f"played audio captured {-played:.3f} s ago, not 0.5 s"
    assert np.all(np.diff(last) == 1), "the audio is not sent unaltered between re-seats"
