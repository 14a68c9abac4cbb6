"""ICE for the server's peer connections: which STUN/TURN servers (none unless asked), loopback host candidates for
a loopback-bound server, and when the peer was last heard from.

    config = rtc_configuration(["stun:stun.example.org:3478"])     # () -> no ICE server: no third-party traffic
    pc = RTCPeerConnection(config)
    await pc.setRemoteDescription(offer)
    offer_loopback_candidates(pc)        # before setLocalDescription: 127.0.0.1 joins the host candidates
    heard = PeerActivity(pc)             # heard.last: monotonic time of the last packet from the peer
    release_ice_hooks(pc)                # after pc.close()

aiortc's default configuration sends a STUN request to a public server for every connection; the server uses none
unless `--ice-server URL` names one. aioice gathers host candidates from the interfaces but leaves loopback out,
so a server on a machine with only `lo` up offered no candidate at all and a same-machine client got nothing:
a server bound to loopback (reachable only from this machine) adds 127.0.0.1 to the host candidates of each of
its connections (the other interfaces stay, for a browser that reaches the page through an SSH tunnel).

A peer that vanishes (tab killed, network gone) says nothing; ICE consent would notice after ~30 s. Every live
peer sends RTCP at least once a second (receiver reports, or sender reports with its media), so `PeerActivity`
notes the time of every packet the ICE connection receives and the server frees a session silent for longer than
`StreamConfig.peer_timeout_s`.
"""
from __future__ import annotations

import re
import time
from typing import Sequence

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

LOOPBACK_CANDIDATE = "127.0.0.1"
_URL = re.compile(r"^(stuns?|turns?):(?:(?P<user>[^:@/]+):(?P<password>[^@/]+)@)?(?P<rest>[^@/\s]+)$")


def parse_ice_server(url: str) -> RTCIceServer:
    """'stun:host[:port]' or 'turn[s]:USER:PASSWORD@host[:port][?transport=udp|tcp]' -> RTCIceServer;
    anything else is one sentence (ValueError)."""
    from aiortc.rtcicetransport import parse_stun_turn_uri

    match = _URL.match(url.strip())
    if match is None:
        raise ValueError(f"--ice-server {url!r} is not a STUN/TURN URL: pass stun:HOST[:PORT] or "
                         "turn:USER:PASSWORD@HOST[:PORT].")
    scheme = match.group(1)
    uri = f"{scheme}:{match['rest']}"
    try:
        parse_stun_turn_uri(uri)
    except ValueError as err:
        raise ValueError(f"--ice-server {url!r} is not a usable STUN/TURN URL ({err}): pass stun:HOST[:PORT] or "
                         "turn:USER:PASSWORD@HOST[:PORT].") from None
    if scheme.startswith("turn") and not match["user"]:
        raise ValueError(f"--ice-server {url!r} is a TURN server without credentials: pass "
                         "turn:USER:PASSWORD@HOST[:PORT].")
    return RTCIceServer(urls=uri, username=match["user"], credential=match["password"])


def rtc_configuration(ice_servers: Sequence[str] = ()) -> RTCConfiguration:
    """The peer connections' configuration: exactly the given ICE servers (none by default, unlike aiortc's)."""
    return RTCConfiguration(iceServers=[parse_ice_server(url) for url in ice_servers])


def _ice_connections(pc: RTCPeerConnection) -> list:
    """The aioice connections under `pc`'s transceivers (one per transport; a bundled offer shares one)."""
    seen = {}
    for transceiver in pc.getTransceivers():
        dtls = transceiver.sender.transport
        if dtls is not None:
            conn = dtls.transport.iceGatherer._connection
            seen[id(conn)] = conn
    return list(seen.values())


def offer_loopback_candidates(pc: RTCPeerConnection) -> None:
    """Add 127.0.0.1 to the host candidates `pc` gathers (call after setRemoteDescription, before
    setLocalDescription); this connection only, unlike streaming.server.restrict_ice_to_loopback."""
    for conn in _ice_connections(pc):
        gather = conn.get_component_candidates

        async def with_loopback(component, addresses, timeout=5, gather=gather):
            if LOOPBACK_CANDIDATE not in addresses:
                addresses = [LOOPBACK_CANDIDATE, *addresses]
            return await gather(component=component, addresses=addresses, timeout=timeout)

        conn.get_component_candidates = with_loopback


class PeerActivity:
    """`last`: time.monotonic() of the last packet (DTLS, RTP, RTCP) `pc` received from its peer, else None."""

    def __init__(self, pc: RTCPeerConnection):
        self.last: float | None = None
        for conn in _ice_connections(pc):
            received = conn.data_received

            def noted(data, component, received=received):
                self.last = time.monotonic()
                received(data, component)

            conn.data_received = noted


def release_ice_hooks(pc: RTCPeerConnection) -> None:
    """Drop what offer_loopback_candidates / PeerActivity put on `pc`'s connections (closures that refer back to
    the connection: without this only the cyclic GC could free a closed connection)."""
    for conn in _ice_connections(pc):
        for name in ("get_component_candidates", "data_received"):
            conn.__dict__.pop(name, None)
