"""MarkerJitterBuffer hands a video frame out at its marker packet (aiortc's buffer: one frame later), and the
server's camera receiver really uses it."""
from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import random
import time
import types

import av
import numpy as np
from aiortc import RTCPeerConnection, VideoStreamTrack
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from engine.config import StreamConfig
from live_util import post_offer, running_server
from streaming.jitter import RECEIVER_BUFFER, MarkerJitterBuffer, use_marker_jitter_buffers

FRAME_TICKS = 3600  # 90 kHz RTP clock at 25 fps: one frame interval, 40 ms


def packet(seq: int, ts: int, marker: bool = False, data: bytes = b"") -> RtpPacket:
    """An RTP packet as aiortc's receiver hands it to the jitter buffer (`_data`: the depayloaded bytes)."""
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq % 65536, timestamp=ts % (1 << 32),
                  payload=data)
    p._data = data
    return p


def stream(sizes: list[int], seq: int = 1000, ts: int = 90_000) -> list[list[RtpPacket]]:
    """Frames of the given packet counts, consecutive sequence numbers, marker bit on each frame's last packet."""
    frames = []
    for f, size in enumerate(sizes):
        frames.append([packet(seq + i, ts + f * FRAME_TICKS, i == size - 1, f"{f}.{i};".encode())
                       for i in range(size)])
        seq += size
    return frames


def joined(frame: list[RtpPacket]) -> bytes:
    return b"".join(p._data for p in frame)


def feed(buffer: JitterBuffer, arrivals: list[RtpPacket]) -> list[tuple[int, bytes]]:
    """(index of the arrival that handed it out, data) of every frame `buffer` handed out, in hand-out order."""
    out = []
    for i, p in enumerate(arrivals):
        _, frame = buffer.add(p)
        if frame is not None:
            out.append((i, frame.data))
    return out


def held(buffer: JitterBuffer) -> int:
    return sum(p is not None for p in buffer._packets)


def test_frame_comes_out_at_its_marker_packet():
    (frame,) = stream([3])
    buffer = MarkerJitterBuffer(capacity=512, is_video=True)
    assert buffer.add(frame[0]) == (False, None)
    assert buffer.add(frame[1]) == (False, None)
    pli, out = buffer.add(frame[2])
    assert not pli and out is not None
    assert out.data == b"0.0;0.1;0.2;" and out.timestamp == frame[0].timestamp
    assert held(buffer) == 0


def test_out_of_order_frame_comes_out_once_its_gap_is_filled():
    first, second = stream([2, 3])
    buffer = MarkerJitterBuffer(capacity=512, is_video=True)
    assert [d for _, d in feed(buffer, first)] == [joined(first)]
    # marker packet first, then the middle one is still missing, then it arrives
    assert feed(buffer, [second[2], second[0]]) == []
    assert feed(buffer, [second[1]]) == [(0, joined(second))]
    assert held(buffer) == 0


def test_frame_without_marker_bit_comes_out_when_the_next_frame_starts():
    frames = stream([3, 2, 2])
    frames[0][-1].marker = 0  # a sender that never set it, or lost it: aiortc's rule must still apply
    arrivals = [p for f in frames for p in f]
    out = feed(MarkerJitterBuffer(capacity=512, is_video=True), arrivals)
    assert out == [(3, joined(frames[0])), (4, joined(frames[1])), (6, joined(frames[2]))]


def test_lost_last_packet_holds_no_partial_frame_and_recovers_on_retransmission():
    frames = stream([3, 2, 2, 2])
    lost = frames[0][2]
    arrivals = frames[0][:2] + frames[1] + [lost] + frames[2] + frames[3]
    marker, stock = MarkerJitterBuffer(capacity=512, is_video=True), JitterBuffer(capacity=512, is_video=True)
    out, stock_out = feed(marker, arrivals), feed(stock, arrivals)
    # nothing until the retransmission (index 4); then frame 0, and frame 1 (complete meanwhile) at the next packet
    assert out == [(4, joined(frames[0])), (5, joined(frames[1])), (6, joined(frames[2])), (8, joined(frames[3]))]
    assert [d for _, d in stock_out] == [joined(f) for f in frames[:3]]
    assert all(i <= j for (i, _), (j, _) in zip(out, stock_out)), "later than aiortc's buffer"
    assert held(marker) == 0


def test_stock_buffer_hands_each_frame_out_one_frame_interval_later():
    """25 fps, each frame's packets arrive together: the marker buffer holds a frame 0 ms, aiortc's 40 ms."""
    frames = stream([3] * 10)
    arrivals = [p for f in frames for p in f]
    arrival_ms = [40.0 * (p.timestamp - frames[0][0].timestamp) / FRAME_TICKS for p in arrivals]

    def holds(buffer):
        return [arrival_ms[i] - arrival_ms[3 * k] for k, (i, _) in enumerate(feed(buffer, arrivals))]

    assert holds(MarkerJitterBuffer(capacity=512, is_video=True)) == [0.0] * 10
    assert holds(JitterBuffer(capacity=512, is_video=True)) == [40.0] * 9  # the last waits for an 11th frame


def test_many_frames_each_once_in_order_at_its_marker_and_nothing_held():
    sizes = [1 + (k * 7) % 4 for k in range(300)]
    frames = stream(sizes, seq=65_300, ts=(1 << 32) - 50 * FRAME_TICKS)  # both counters wrap around
    buffer = MarkerJitterBuffer(capacity=512, is_video=True)
    out, i = [], -1
    for frame in frames:
        for p in frame:
            i += 1
            _, got = buffer.add(p)
            if got is not None:
                out.append((i, got.data, got.timestamp))
        assert held(buffer) == 0, "packets left behind after their frame was handed out"
    ends = np.cumsum(sizes) - 1
    assert out == [(int(e), joined(f), f[0].timestamp) for e, f in zip(ends, frames)]


def test_reordered_packets_every_frame_once_in_order_never_later_than_aiortc():
    frames = stream([1 + (k * 5) % 4 for k in range(200)])
    arrivals = [p for f in frames for p in f]
    rng = random.Random(0)
    for start in range(1, len(arrivals) - 4, 4):  # the first packet stays first: it sets the buffer's origin
        window = arrivals[start:start + 4]
        rng.shuffle(window)
        arrivals[start:start + 4] = window
    marker, stock = MarkerJitterBuffer(capacity=512, is_video=True), JitterBuffer(capacity=512, is_video=True)
    out, stock_out = feed(marker, arrivals), feed(stock, arrivals)
    assert [d for _, d in out] == [joined(f) for f in frames[:len(out)]]
    assert [d for _, d in stock_out] == [joined(f) for f in frames[:len(stock_out)]]
    assert len(out) >= len(frames) - 2  # at most the last frame or two wait for a packet that never comes
    assert all(i <= j for (i, _), (j, _) in zip(out, stock_out)), "a frame came out later than aiortc's buffer"
    assert sum(i < j for (i, _), (j, _) in zip(out, stock_out)) > len(stock_out) // 2
    assert held(marker) == sum(len(f) for f in frames[len(out):]), "the buffer holds packets it handed out"


def test_aiortc_overflow_and_restart_handling_still_applies():
    """A jump past the capacity and a stream restart: the same PLI flags as aiortc's buffer, then frames flow."""
    frames = stream([2, 2]) + stream([2, 2], seq=1004 + 2000) + stream([2, 2], seq=60_000)
    arrivals = [p for f in frames for p in f]
    marker, stock = MarkerJitterBuffer(capacity=512, is_video=True), JitterBuffer(capacity=512, is_video=True)
    flags = [marker.add(p)[0] for p in arrivals]
    assert flags == [stock.add(p)[0] for p in arrivals]
    assert flags.count(True) == 2  # one for the jump, one for the restart
    marker = MarkerJitterBuffer(capacity=512, is_video=True)
    assert [d for _, d in feed(marker, arrivals)] == [joined(f) for f in frames]


def test_use_marker_jitter_buffers_replaces_video_receivers_only():
    async def scenario():
        pc = RTCPeerConnection()
        video, audio = pc.addTransceiver("video"), pc.addTransceiver("audio")
        counts = use_marker_jitter_buffers(pc), use_marker_jitter_buffers(pc)
        buffers = getattr(video.receiver, RECEIVER_BUFFER), getattr(audio.receiver, RECEIVER_BUFFER)
        await pc.close()
        return counts, buffers

    counts, (video, audio) = asyncio.run(scenario())
    assert counts == (1, 0)  # a second call finds nothing left to replace
    assert isinstance(video, MarkerJitterBuffer) and video.capacity == 512
    assert type(audio) is JitterBuffer


def fake_pc(receiver) -> types.SimpleNamespace:
    transceiver = types.SimpleNamespace(kind="video", receiver=receiver)
    return types.SimpleNamespace(getTransceivers=lambda: [transceiver])


def test_buffered_packets_move_to_the_new_buffer():
    (frame,) = stream([3])
    stock = JitterBuffer(capacity=512, is_video=True)
    feed(stock, frame[:2])
    receiver = types.SimpleNamespace(**{RECEIVER_BUFFER: stock})
    assert use_marker_jitter_buffers(fake_pc(receiver)) == 1
    _, out = getattr(receiver, RECEIVER_BUFFER).add(frame[2])
    assert out is not None and out.data == joined(frame)


def test_another_aiortc_without_the_attribute_warns_once_and_changes_nothing(caplog):
    receiver = types.SimpleNamespace()
    with caplog.at_level(logging.WARNING, logger="flashlive.jitter"):
        assert use_marker_jitter_buffers(fake_pc(receiver)) == 0
    assert len(caplog.records) == 1 and RECEIVER_BUFFER in caplog.text
    assert vars(receiver) == {}


# --- live: a real aiortc camera over loopback --------------------------------------------------------------------

SIZE, FPS = 160, 25


class EchoRenderer:
    """Sends each camera frame straight back: the test is about the receive path, not about rendering."""

    def __init__(self):
        self._out: collections.deque = collections.deque(maxlen=8)

    def push(self, frame, pts):
        self._out.append((frame, pts))

    def pull(self):
        return self._out.popleft() if self._out else None

    def stats(self) -> dict:
        return {"renderer": "echo"}

    def close(self) -> None:
        pass


class NoisyCamera(VideoStreamTrack):
    """Noise on top (several RTP packets per frame), a flat grey 200 below (to recognise the echo)."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.rng = np.random.default_rng(0)

    async def recv(self):
        if self.n:
            await asyncio.sleep(1 / FPS)
        image = np.full((SIZE, SIZE, 3), 200, np.uint8)
        image[:SIZE // 2] = self.rng.integers(0, 256, (SIZE // 2, SIZE, 3), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = self.n * 90_000 // FPS, fractions.Fraction(1, 90_000)
        self.n += 1
        return frame


def test_server_camera_receiver_completes_frames_at_the_marker():
    handed: list[tuple[float, int, bool]] = []  # (hold s, packets, handed out at its own marker packet)

    def note(buffer: MarkerJitterBuffer) -> None:
        first: dict = {}  # timestamp -> (first packet arrival, packets)
        add = buffer.add

        def noted(p):
            t, n = first.get(p.timestamp, (time.monotonic(), 0))
            first[p.timestamp] = (t, n + 1)
            pli, frame = add(p)
            t0, n = first.pop(frame.timestamp, (None, 0)) if frame is not None else (None, 0)
            if t0 is not None:  # (frames under way when the test hooked in are not counted)
                handed.append((time.monotonic() - t0, n, bool(p.marker) and p.timestamp == frame.timestamp))
            return pli, frame

        buffer.add = noted

    async def scenario():
        async with running_server(StreamConfig(port=0, width=SIZE, height=SIZE, fps=FPS), EchoRenderer,
                                  np.zeros((SIZE, SIZE, 3), np.uint8), renderer_name="echo") as (server, url):
            pc = RTCPeerConnection()
            pc.addTrack(NoisyCamera())
            tracks = []
            pc.on("track", tracks.append)
            answer = await post_offer(url, pc)
            (video,) = [t for t in server.sessions[answer["session"]].pc.getTransceivers() if t.kind == "video"]
            buffer = getattr(video.receiver, RECEIVER_BUFFER)
            assert isinstance(buffer, MarkerJitterBuffer), type(buffer)
            note(buffer)
            greys, deadline = [], time.monotonic() + 15
            while len(greys) < 50 and time.monotonic() < deadline:
                frame = await asyncio.wait_for(tracks[0].recv(), 5)
                greys.append(float(frame.to_ndarray(format="rgb24")[SIZE * 3 // 4:].mean()))
            await pc.close()
            return greys

    greys = asyncio.run(scenario())
    echoed = [g for g in greys if abs(g - 200) < 20]
    assert len(echoed) >= 20, f"only {len(echoed)} of {len(greys)} avatar frames echo the camera: {greys[-5:]}"
    assert len(handed) >= 20, f"the server's camera buffer handed out only {len(handed)} frames"
    at_marker = sum(m for _, _, m in handed)
    assert at_marker >= 0.9 * len(handed), f"only {at_marker} of {len(handed)} frames came out at their marker"
    assert max(n for _, n, _ in handed) > 1, "every camera frame was one packet: joining was not exercised"
    hold_ms = 1e3 * float(np.median([h for h, _, _ in handed]))
    assert hold_ms < 0.5 * 1e3 / FPS, f"camera frames waited {hold_ms:.1f} ms in the jitter buffer (median)"
