"""A video jitter buffer that hands a frame out at its last packet (RTP marker bit), not one frame later.

    pc = RTCPeerConnection()
    await pc.setRemoteDescription(offer)      # the receivers exist from here (or from pc.addTrack on a client)
    use_marker_jitter_buffers(pc)             # -> how many video receivers now use a MarkerJitterBuffer

Why. aiortc's video JitterBuffer calls a frame complete only when the first packet of the *next* frame (a new
RTP timestamp) arrives, so every received frame waits one frame interval before it is decoded: 40 ms at 25 fps
on the way from the user's camera into the renderer. Senders set the marker bit on the last packet of a frame
(RFC 7741 for VP8, RFC 6184 for H.264; aiortc's RTCRtpSender does too) and browsers (libwebrtc's PacketBuffer)
complete frames on it; `MarkerJitterBuffer` does the same, and keeps aiortc's rule as the fallback for a frame
whose marker bit never comes.

What it relies on. aiortc has no public way to choose a receiver's jitter buffer: `use_marker_jitter_buffers`
replaces the name-mangled `RTCRtpReceiver._RTCRtpReceiver__jitter_buffer` (as aiortc 1.16 names it), and
`MarkerJitterBuffer` reads JitterBuffer's private state (`_origin`, `_packets`, `_capacity`, `_prefetch`) and calls
its `remove()`. On an aiortc without that attribute it logs one warning and leaves the receivers alone: the stream
works as before, one frame later.
"""
from __future__ import annotations

import logging

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

log = logging.getLogger("flashlive.jitter")

RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # RTCRtpReceiver.__jitter_buffer, as Python mangles it


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's JitterBuffer that also completes a frame on its marker packet.

    add(packet) -> (pli_flag, JitterFrame | None), as aiortc's: `packet._data` is the depayloaded payload (the
    receiver sets it), the frame's data is its packets' `_data` joined in sequence order, and misordered, too old
    or overflowing packets (and the PLI they call for) are handled by aiortc's own `add`. On top of that, the
    frame at the buffer's origin is handed out as soon as the packets from the origin up to and including one with
    the marker bit are all present and share one RTP timestamp. Frames come out in order, each once; one per
    `add` call, as aiortc's contract allows, so a frame completed at the same time as an earlier one (a late
    retransmission filled a gap) comes out at the next packet.
    """

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli_flag, frame = super().add(packet)  # aiortc's rule: the origin frame ends where a new timestamp begins
        if frame is None and self._prefetch == 0:  # prefetching (audio) holds frames on purpose: leave it to aiortc
            frame = self._marked_frame()
        return pli_flag, frame

    def _marked_frame(self) -> JitterFrame | None:
        """Remove and return the origin frame if it is complete up to its marker packet; else None, nothing moved."""
        if self._origin is None:
            return None
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                return None  # a gap, or the frame ended without a marker: aiortc's rule decides
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)  # the origin moves past the frame: its slots are free again
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packet.timestamp)
        return None


def use_marker_jitter_buffers(pc) -> int:
    """Give every video receiver of aiortc RTCPeerConnection `pc` a MarkerJitterBuffer; returns how many it replaced.

    Call it once the receivers exist (after pc.addTrack or setRemoteDescription); packets already buffered move
    over, so a call while media flows loses nothing. Receivers that already have one are left as they are (not
    counted); receivers without the private attribute (another aiortc) are left alone, with one logged warning.
    """
    replaced, missing = 0, 0
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "video":
            continue
        stock = getattr(transceiver.receiver, RECEIVER_BUFFER, None)
        if isinstance(stock, MarkerJitterBuffer):
            continue
        if not isinstance(stock, JitterBuffer):
            missing += 1
            continue
        marker = MarkerJitterBuffer(capacity=stock.capacity, is_video=True)
        marker._origin, marker._packets = stock._origin, stock._packets
        setattr(transceiver.receiver, RECEIVER_BUFFER, marker)
        replaced += 1
    if missing:
        log.warning("this aiortc's RTCRtpReceiver has no %s, so %d video receiver(s) keep aiortc's jitter buffer and "
                    "its extra frame of delay: install aiortc 1.16 or update streaming/jitter.py for this version",
                    RECEIVER_BUFFER, missing)
    return replaced
