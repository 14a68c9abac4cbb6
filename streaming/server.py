"""The live service: one aiohttp app (on uvloop) that turns WebRTC peers into avatar sessions.

    server = AvatarServer(StreamConfig(), make_renderer, reference_rgb, renderer_name="preview")
    app = server.app()                  # routes: / (camera page), /viewer (receive-only), /offer, /stats
    await serve(server, ready=print)    # binds config.host:config.port (127.0.0.1 unless told otherwise)

A peer whose offer sends video is a *camera* session: its own renderer (from `make_renderer()`), fed by a
WebRTCCapture, answered with its AvatarTrack. A receive-only offer is a *viewer* session (an OBS Browser Source):
it mirrors the programme, which is the `--driving` pipeline when there is one, else the newest camera session,
else the reference portrait. The virtual camera and the recording follow the programme too.

A camera offer that also sends a microphone gets its voice back delayed by the avatar's latency, and a viewer
offer with an audio section gets the `--driving` file's audio the same way (streaming/audio.py). /stats carries
the GPU telemetry (streaming/telemetry.py: utilisation, memory, power, or "no GPU").

A session is freed when its peer closes or fails, when its camera track ends, when its camera sends nothing for
`idle_timeout_s`, when its peer never completes the connection within `handshake_timeout_s` (a half-open offer)
or sends no packet for `peer_timeout_s` (a killed tab); freeing it runs the cyclic GC and trims the heap
(streaming/reclaim.py). The server keeps serving the others. Every route checks Host and Origin
(streaming/guard.py); the peer connections use no ICE server unless configured, and a loopback-bound server offers
loopback candidates (streaming/ice.py). User errors (a body that is not an offer, malformed or deeply nested
JSON, a body too large, malformed SDP, too many sessions) answer HTTP 4xx/503 with one sentence in
`{"error": ...}`.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription

from engine.config import StreamConfig
from streaming.audio import (AudioInput, AudioRing, DelayedAudioTrack, FileAudio, MirrorLatency, OnAirLatency,
                             PacketArrivals, TickAudio, VideoHold, has_audio)
from streaming.capture import AVCapture, WebRTCCapture, is_device
from streaming.guard import AccessPolicy, guard, is_loopback
from streaming.ice import PeerActivity, offer_loopback_candidates, release_ice_hooks, rtc_configuration
from streaming.jitter import use_marker_jitter_buffers
from streaming.reclaim import release_memory
from streaming.sinks import RecordSink, ThreadedSink, VirtualCameraSink, pump
from streaming.telemetry import GpuTelemetry
from streaming.tracks import AvatarTrack, MirrorTrack, PacedTrack, fit_image

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("flashlive.server")


def restrict_ice_to_loopback() -> None:
    """Offer only 127.0.0.1 ICE candidates (aioice leaves loopback out by default): same-machine peers and tests.

    aiortc has no per-connection setting for host addresses, so this swaps aioice's address lookup for the process
    (`AIOICE_HOST_ADDRESSES` keeps aioice's own). A loopback-bound server needs none of this: it adds 127.0.0.1 to
    each of its connections' candidates (streaming/ice.py).
    """
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"] if use_ipv4 else []


def _aioice_host_addresses():
    import aioice.ice

    return aioice.ice.get_host_addresses


AIOICE_HOST_ADDRESSES = _aioice_host_addresses()  # aioice's lookup, before any restrict_ice_to_loopback()


@dataclass
class Session:
    """One peer connection and what it drives."""

    id: str
    kind: str  # "camera" (sends video, gets its avatar back) or "viewer" (receives the programme)
    pc: RTCPeerConnection
    track: PacedTrack
    renderer: object | None = None
    capture: WebRTCCapture | None = None
    audio_in: AudioInput | None = None  # the peer's microphone, into the session's audio ring
    audio_out: DelayedAudioTrack | None = None  # audio sent back, delayed by the avatar's latency
    created: float = field(default_factory=time.monotonic)
    connected_at: float | None = None
    activity: PeerActivity | None = None  # when the peer was last heard from

    def stats(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "state": self.pc.connectionState,
               "age_s": round(time.monotonic() - self.created, 1)}
        out.update(self.track.stats())
        if self.capture is not None:
            out.update(self.capture.stats())
        if self.audio_in is not None:
            out.update(self.audio_in.stats())
        if self.audio_out is not None:
            out.update(self.audio_out.stats())
        if self.renderer is not None:
            rs = self.renderer.stats()
            out["renderer"] = rs.get("renderer")
            out["face_found"] = rs.get("face_found")
            out["input_queue"] = rs.get("input_queue")
            out["controller"] = rs.get("controller")  # flashportrait: the budget it chose and why
            out["renderer_stats"] = rs
        return out


class AvatarServer:
    """Sessions, the programme and its sinks, and the aiohttp app that exposes them.

    make_renderer: () -> a started-or-startable engine.base.ThreadedRenderer producing (height, width, 3) frames.
    reference: (H, W, 3) uint8 RGB portrait, shown before the first rendered frame and when nothing is on air.
    """

    def __init__(self, config: StreamConfig, make_renderer: Callable[[], object], reference: np.ndarray,
                 renderer_name: str, device: str = "cpu", max_sessions: int = 8, idle_timeout_s: float = 10.0,
                 vcam_backend: str | None = None, vcam_device: str | None = None, info: dict | None = None,
                 telemetry: GpuTelemetry | None = None):
        self.config = config
        self.make_renderer = make_renderer
        self.renderer_name = renderer_name
        self.device = device
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.idle_image = fit_image(reference, config.width, config.height)
        self.sessions: dict[str, Session] = {}
        self.sessions_opened = 0
        self.sessions_closed = 0
        self.started = time.monotonic()
        self.sinks: list[ThreadedSink] = []
        self._vcam = (vcam_backend, vcam_device)
        self._program: AvatarTrack | None = None  # the --driving pipeline's output
        self._program_renderer = None
        self._program_capture: AVCapture | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing: set[str] = set()
        self.info = dict(info or {})  # shown at the top of /stats, e.g. random_weights, warm_up_s
        self.telemetry = telemetry or GpuTelemetry()
        self.rtc_config = rtc_configuration(config.ice_servers)  # a bad --ice-server fails here, in one sentence
        self.loopback = is_loopback(config.host)  # offer 127.0.0.1 candidates: a same-machine client connects
        self.access = AccessPolicy.for_bind(config.host, config.port, config.allow_hosts, config.allow_origins)
        self._reclaim: asyncio.TimerHandle | None = None
        self._program_audio: AudioRing | None = None  # the --driving file's audio, on the programme's clock
        self._program_file_audio: FileAudio | None = None

    # --- programme: what /viewer, the virtual camera and the recording show ------------------------------------
    def program_image(self) -> np.ndarray:
        if self._program is not None:
            return self._program.last_image
        cameras = [s for s in self.sessions.values() if s.kind == "camera" and s.connected_at is not None]
        if cameras:
            return max(cameras, key=lambda s: s.connected_at).track.last_image
        return self.idle_image

    def _new_renderer(self):
        renderer = self.make_renderer()
        return renderer.start() if hasattr(renderer, "start") else renderer

    def _avatar_track(self, renderer) -> AvatarTrack:
        c = self.config
        return AvatarTrack(renderer, c.fps, c.width, c.height, c.playout_frames, idle=self.idle_image)

    async def startup(self, app: web.Application | None = None) -> None:
        """Start the --driving pipeline and the sinks (opened here so their errors stop the server at once)."""
        c = self.config
        self.telemetry.start()
        if c.vcam:
            backend, device = self._vcam
            self.sinks.append(VirtualCameraSink(c.width, c.height, c.fps, device=device, backend=backend))
        record = None
        if c.record:
            try:  # a --driving file's audio goes into the recording too
                with_audio = bool(c.driving) and not is_device(c.driving) and has_audio(c.driving)
                record = RecordSink(c.record, c.width, c.height, c.fps, audio=with_audio)
                self.sinks.append(record)
            except ValueError:
                for sink in self.sinks:
                    sink.close()
                raise
        if c.driving:
            self._program_renderer = self._new_renderer()
            push = self._program_renderer.push
            if not is_device(c.driving):  # a file's own audio goes to the viewers, in step with its video
                self._program_audio = AudioRing()
                self._program_file_audio = FileAudio(c.driving, self._program_audio)
                push = self._program_file_audio.wrap(push)
            audio = self._program_file_audio
            self._program_capture = AVCapture(c.driving, push, on_loop=None if audio is None else audio.restart)
            self._program = self._avatar_track(self._program_renderer)
            if record is not None and record.audio and self._program_file_audio.has_audio:
                record.audio_source = TickAudio(self._program_audio, self._program, c.fps)
            self._program_capture.start()
        if self._program is not None:  # the driving pipeline renders even with nobody watching: /viewer mirrors it
            self._tasks.append(asyncio.ensure_future(pump(self._program, self.sinks)))
        elif self.sinks:
            mirror = MirrorTrack(self.program_image, c.fps, c.width, c.height)
            self._tasks.append(asyncio.ensure_future(pump(mirror, self.sinks)))
        self._tasks.append(asyncio.ensure_future(self._janitor()))

    async def shutdown(self, app: web.Application | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.gather(*(self.close_session(sid) for sid in list(self.sessions)))
        if self._program_capture is not None:
            await asyncio.to_thread(self._program_capture.stop)
        if self._program_renderer is not None:
            await asyncio.to_thread(self._program_renderer.close)
        for sink in self.sinks:
            await asyncio.to_thread(sink.close)
        await asyncio.to_thread(self.telemetry.close)

    # --- sessions ------------------------------------------------------------------------------------------------
    async def close_session(self, sid: str, why: str | None = None) -> None:
        session = self.sessions.get(sid)
        if session is None or sid in self._closing:
            return
        self._closing.add(sid)
        try:
            if session.capture is not None:
                session.capture.stop()
            if session.audio_in is not None:
                session.audio_in.stop()
            if session.audio_out is not None:
                session.audio_out.stop()
            session.track.stop()
            await session.pc.close()
            release_ice_hooks(session.pc)
            if session.renderer is not None:  # joins the render thread: off the event loop
                await asyncio.to_thread(session.renderer.close)
        finally:
            self.sessions.pop(sid, None)
            self._closing.discard(sid)
            self.sessions_closed += 1
            log.info("session %s (%s) closed%s; %d open", sid, session.kind, f" ({why})" if why else "",
                     len(self.sessions))
            self._schedule_reclaim()

    def _schedule_reclaim(self, delay_s: float = 0.5) -> None:
        """One GC + heap trim shortly after the last of a burst of closes (each collect blocks the loop briefly)."""
        if self._reclaim is not None:
            self._reclaim.cancel()
        self._reclaim = asyncio.get_running_loop().call_later(delay_s, self._run_reclaim)

    def _run_reclaim(self) -> None:
        self._reclaim = None
        release_memory()

    async def _janitor(self, period_s: float = 0.5) -> None:
        """Free sessions whose peer went away without saying so (ICE consent takes ~30 s to notice): never
        connected within the handshake timeout, no packet for the peer timeout, or a camera that sends no frame."""
        c = self.config
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for sid, s in list(self.sessions.items()):
                why = None
                if s.connected_at is None:
                    if now - s.created > c.handshake_timeout_s:
                        why = f"never connected within {c.handshake_timeout_s:g} s"
                elif s.activity is not None and now - max(s.activity.last or 0.0, s.connected_at) > c.peer_timeout_s:
                    why = f"peer silent for {c.peer_timeout_s:g} s"
                elif s.capture is not None and \
                        now - (s.capture.last_frame_time or s.connected_at) > self.idle_timeout_s:
                    why = f"camera sent no frame for {self.idle_timeout_s:g} s"
                if why is not None:
                    await self.close_session(sid, why)

    def _error(self, status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def offer(self, request: web.Request) -> web.Response:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._error(413, f"The offer body has {request.content_length} bytes, over the {limit} byte "
                                    "limit: POST one SDP offer of a few kilobytes as JSON.")
        try:
            params = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
            params = None  # RecursionError: JSON nested deeper than the parser's recursion limit
        if not isinstance(params, dict) or params.get("type") != "offer" or not isinstance(params.get("sdp"), str):
            return self._error(400, 'POST /offer needs a JSON body {"sdp": <offer SDP>, "type": "offer"} '
                                    "as RTCPeerConnection.createOffer() produces it.")
        sdp = params["sdp"]
        if not sdp.lstrip().startswith("v=0") or "\nm=video " not in sdp.replace("\r\n", "\n"):
            return self._error(400, "The offer's SDP is malformed or has no video section: send the offer exactly "
                                    "as RTCPeerConnection.createOffer() produced it, with a video transceiver.")
        if len(self.sessions) >= self.max_sessions:
            return self._error(503, f"The server already has {self.max_sessions} sessions: close one or start "
                                    "flashlive serve with a larger --max-sessions.")

        pc = RTCPeerConnection(self.rtc_config)
        incoming, microphones = [], []
        pc.on("track", lambda track: (incoming if track.kind == "video" else microphones).append(track))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as err:  # aiortc raises ValueError/KeyError/IndexError/OperationError on bad SDP
            await pc.close()
            return self._error(400, f"The offer's SDP could not be used ({type(err).__name__}: {err}): send the "
                                    "offer exactly as RTCPeerConnection.createOffer() produced it.")
        use_marker_jitter_buffers(pc)  # decode each camera frame at its last packet, not one frame later
        if self.loopback:
            offer_loopback_candidates(pc)

        sid = uuid.uuid4().hex[:12]
        if incoming:
            try:
                renderer = await asyncio.to_thread(self._new_renderer)  # model set-up may take a while
            except (ValueError, RuntimeError, MemoryError) as err:  # e.g. CUDA out of memory with many sessions
                await pc.close()
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                return self._error(503, f"The renderer could not start a session ({reason}): close other "
                                        "sessions or lower --max-sessions.")
            session = Session(sid, "camera", pc, self._avatar_track(renderer), renderer=renderer)
            camera = incoming[0]
            if microphones:  # the voice goes back delayed by the avatar's latency (streaming/audio.py)
                receivers = {id(t.receiver.track): t.receiver for t in pc.getTransceivers()}
                hold = VideoHold(PacketArrivals(receivers[id(camera)]) if id(camera) in receivers else None)
                camera = hold.wrap(camera)
                ring = AudioRing()
                mic = microphones[0]
                session.audio_in = AudioInput(mic, ring, PacketArrivals(receivers[id(mic)])
                                              if id(mic) in receivers else None, hold)
                session.audio_out = DelayedAudioTrack(ring, OnAirLatency(session.track))
            session.capture = WebRTCCapture(camera, renderer.push,
                                            on_end=lambda: asyncio.ensure_future(self.close_session(sid)))
        else:
            c = self.config
            session = Session(sid, "viewer", pc, MirrorTrack(self.program_image, c.fps, c.width, c.height))
            if self._program_audio is not None and "\nm=audio " in sdp.replace("\r\n", "\n"):
                latency = MirrorLatency(OnAirLatency(self._program), self._program, session.track)
                session.audio_out = DelayedAudioTrack(self._program_audio, latency)
        pc.addTrack(session.track)
        if session.audio_out is not None:
            pc.addTrack(session.audio_out)
        session.activity = PeerActivity(pc)
        self.sessions[sid] = session
        self.sessions_opened += 1

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected" and session.connected_at is None:
                session.connected_at = time.monotonic()
            elif state in ("failed", "closed"):
                await self.close_session(sid)

        if session.capture is not None:
            session.capture.start()
        if session.audio_in is not None:
            session.audio_in.start()
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as err:  # e.g. no codec in common with the browser
            await self.close_session(sid)
            return self._error(400, f"Cannot answer this offer ({err}): offer H.264 or VP8 video.")
        log.info("session %s (%s) opened; %d open", sid, session.kind, len(self.sessions))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": sid, "kind": session.kind})

    # --- pages and stats -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"renderer": self.renderer_name, "device": self.device, **self.info, "fps": self.config.fps,
                "width": self.config.width, "height": self.config.height,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "session_count": len(self.sessions), "sessions_opened": self.sessions_opened,
                "sessions_closed": self.sessions_closed,
                "sessions": [s.stats() for s in self.sessions.values()],
                "program": None if self._program is None else {
                    **self._program.stats(), **self._program_renderer.stats(), **self._program_capture.stats(),
                    **({} if self._program_file_audio is None else self._program_file_audio.stats())},
                "sinks": [s.stats() for s in self.sinks], "gpu": self.telemetry.stats()}

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), headers={"Cache-Control": "no-store"})

    def app(self) -> web.Application:
        # the body limit is enforced in offer() with a JSON answer; aiohttp's own (a little above) is the backstop
        app = web.Application(middlewares=[guard(lambda: self.access)],
                              client_max_size=self.config.max_body_bytes + 1024)
        def page(name: str):
            async def handler(request: web.Request) -> web.FileResponse:
                return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
            return handler

        app.router.add_get("/", page("index.html"))
        app.router.add_get("/viewer", page("viewer.html"))
        app.router.add_get("/client.js", page("client.js"))
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/stats", self._stats)
        app.on_startup.append(self.startup)
        app.on_shutdown.append(self.shutdown)
        return app


async def serve(server: AvatarServer, ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None, ssl_context=None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM); `ready(url)` is called once the port is bound.

    ssl_context (ssl.SSLContext) serves https, which browsers on other machines need before they share a camera.
    """
    host, port = server.config.host, server.config.port
    runner = web.AppRunner(server.app(), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
    except OSError as err:
        await runner.cleanup()
        if err.errno == errno.EADDRINUSE:
            raise ValueError(f"Port {port} on {host} is in use: pass --port with a free port or stop the "
                             "program that holds it.") from None
        raise ValueError(f"Cannot listen on {host}:{port} ({err.strerror}): pass another --host/--port.") from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread, or Windows: Ctrl-C raises KeyboardInterrupt instead
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    scheme = "https" if ssl_context is not None else "http"
    bound = runner.addresses[0][1]  # the bound port, also when --port 0 let the OS choose
    c = server.config
    server.access = AccessPolicy.for_bind(host, bound, c.allow_hosts, c.allow_origins, scheme)
    url = f"{scheme}://{'[' + shown + ']' if ':' in shown else shown}:{bound}/"
    if ready is not None:
        ready(url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(server: AvatarServer, ready: Callable[[str], None] | None = None, ssl_context=None) -> None:
    """Blocking entry point of `flashlive serve`: uvloop when available."""
    try:
        import uvloop
    except ImportError:  # Windows
        asyncio.run(serve(server, ready, ssl_context=ssl_context))
    else:
        uvloop.run(serve(server, ready, ssl_context=ssl_context))
