"""Measuring a generated avatar stream from timestamps (the avatar's pixels say nothing about which driving frame
they render): a clapperboard stamped into the driving frames, read back where the server's renderer gets them;
the server track's ticks with the capture pts on air; RTP packet arrivals at the client before aiortc's jitter
buffer. Test instrumentation only: it wraps objects the test itself owns or just created."""
from __future__ import annotations

import time

import numpy as np

BITS, BLOCK = 10, 16  # 10 blocks of 16x16 px along the bottom-left edge of a driving frame: frame numbers < 1024


def stamp(image: np.ndarray, k: int) -> np.ndarray:
    """A copy of (H, W, 3) uint8 `image` with k (mod 1024) written as black/white blocks in its bottom-left."""
    out = image.copy()
    for b in range(BITS):
        out[-BLOCK:, b * BLOCK:(b + 1) * BLOCK] = 255 if (k >> b) & 1 else 0
    return out


def read_stamp(image: np.ndarray) -> int:
    """The number `stamp` wrote, read from a decoded (lossy) copy of the frame at the same size."""
    strip = image[-BLOCK + 3:-3].astype(np.float32).mean(axis=(0, 2))  # inner rows: no codec ringing at edges
    return sum(1 << b for b in range(BITS) if strip[b * BLOCK + 3:(b + 1) * BLOCK - 3].mean() > 128)


def stamped_push(renderer, stamps: dict) -> None:
    """Make `renderer.push(frame, pts)` note {capture pts: stamp} before pushing (the server binds renderer.push
    after make_renderer() returns, so this instance attribute is what it calls)."""
    push = renderer.push

    def noted(frame, pts):
        stamps[pts] = read_stamp(frame)
        push(frame, pts)

    renderer.push = noted


def tiny_live_renderer(reference: np.ndarray, size: int, fps: float, latency_target_ms: float | None = None):
    """A FlashPortrait renderer as `serve --preset tiny --random-weights --device cpu` builds it, with the controller
    off (one budget: a steady latency the tests can measure against). `latency_target_ms` (serve's default is
    350) bounds the input queue and the lag, so a CPU that cannot extract expression at `fps` drops frames
    instead of letting the latency climb."""
    from engine.config import RuntimeConfig
    from engine.controller import ControllerConfig
    from engine.renderer import FlashPortraitRenderer

    return FlashPortraitRenderer(reference, None, size, size, preset="tiny", random_weights=True,
                                 runtime=RuntimeConfig(device="cpu"), fps=fps,
                                 controller=ControllerConfig(enabled=False, latency_target_ms=latency_target_ms))


def note_ticks(track, ticks: list) -> None:
    """Append (send time, capture pts on air or None) for every frame a streaming.tracks.AvatarTrack sends."""
    image = track._image

    def noted():
        out = image()
        ticks.append((time.monotonic(), None if track.on_air is None else track.on_air[0]))
        return out

    track._image = noted


def note_packet_arrivals(pc) -> dict:
    """{kind: {pts: first packet arrival}} for the receivers of aiortc peer connection `pc`, noted before the
    jitter buffers (which hold video and audio for different times). aiortc hands frames out with
    pts = RTP timestamp - the stream's first RTP timestamp; the keys are the same."""
    arrivals: dict = {"audio": {}, "video": {}}
    for transceiver in pc.getTransceivers():
        receiver, seen = transceiver.receiver, arrivals[transceiver.kind]
        handler = receiver._handle_rtp_packet

        async def handle(packet, *args, _handler=handler, _seen=seen, **kw):
            first = _seen.setdefault("first", packet.timestamp)
            _seen.setdefault((packet.timestamp - first) % (1 << 32), time.monotonic())
            return await _handler(packet, *args, **kw)

        receiver._handle_rtp_packet = handle
    return arrivals


def dejitter(send_clock: np.ndarray, arrived: np.ndarray, window: int = 25) -> np.ndarray:
    """Arrival times without the receiving event loop's jitter: the sender's clock + the median transit of the
    `window` frames around each one (both of the server's tracks leave on real-time clocks)."""
    transit = arrived - send_clock
    half = window // 2
    return send_clock + np.array([np.nanmedian(transit[max(0, i - half):i + half + 1]) for i in range(len(transit))])


def shown_frames(video_rx: list, arrivals: dict, ticks: list, stamps: dict, fps_out: float) -> list:
    """[(de-jittered arrival, driving frame k or None)] for the received avatar frames (video_rx: their pts).

    A frame is matched to the newest tick before its arrival. One that arrived more than a frame period after that
    tick (the process stalled: a collection, a busy machine) cannot be matched to its tick and is left out; the
    callers' bars on how many frames they judged say when too many were."""
    tick_times = np.array([t for t, _ in ticks])
    rx = []
    for pts in video_rx:
        arrived = arrivals["video"].get(pts)
        i = -1 if arrived is None else int(np.searchsorted(tick_times, arrived)) - 1
        if i >= 0 and arrived - tick_times[i] < 1 / fps_out:
            rx.append((arrived, i))
    if not rx:
        return []
    shown = dejitter(np.array([tick_times[i] for _, i in rx]), np.array([a for a, _ in rx]))
    return [(float(t), stamps.get(ticks[i][1])) for t, (_, i) in zip(shown, rx)]
