"""Black-box WebRTC benchmark of a running FlashLive server: output fps, time to first frame, glass-to-glass latency.

    python bench/stream_latency.py                                  # starts `flashlive serve` (preview) itself
    python bench/stream_latency.py --renderer flashportrait --server-args "--preset 1.3b --weights /w"
    python bench/stream_latency.py --url http://127.0.0.1:8080/     # an already running server

The client is an aiortc peer that sends a synthetic camera: it holds one driving frame (A) until the avatar has
settled, then jumps to a very different one (B) and times from the moment the first B frame leaves its camera track
until the first received avatar frame that has moved at least half-way from the settled A-avatar towards the settled
B-avatar; then the other way round, `--trials` times. Everything (encode, network, decode, capture, render, pacing,
encode, network, decode) is inside the measurement, as a person in front of a camera would see it.
The client's video receiver completes frames on the RTP marker bit, as a browser does (streaming/jitter.py);
`--client-jitter-buffer aiortc` keeps aiortc's stock buffer, which hands each frame out one frame interval later.
Writes bench/results/stream_latency_<renderer>.json (renderer, device, fps, p50_ms, p95_ms, ttff_s, ...) + PNG;
for flashportrait (--method pts) stream_latency_fp_<preset>_<gpu>.json (`_24g` with --low-vram) with preset, emo_cfg,
fps (new avatar frames/s), p50_ms, p95_ms, ttff_s, repeats, frames_out, budget_changes (the controller's changes in
the --changes-window seconds after --warmup), final_budget, full_passes_per_window (expression branch, final
budget), peak_gpu_gib (torch.cuda.max_memory_allocated of this process, which runs the server), fp8, emo_refresh.

A generated avatar (FlashPortrait, above all with --random-weights) does not settle on a held frame, so the jump
cannot be timed. `--method pts` (the default for flashportrait) times every frame instead: the server runs in this
process (built from the same `flashlive serve` flags), the client stamps a frame number into each driving frame it
sends (tests/avatar_probe.py), the server-side hooks note which capture pts every video tick sends and which
stamp that capture had, and the client notes when each avatar frame's packets arrive. Glass-to-glass for driving
frame k = (client has decoded the first avatar frame showing k) - (k left the client's camera track); fps = new
avatar frames per second after the first --warmup seconds; ttff = connect -> first avatar frame (not the idle
portrait). p50_ms / p95_ms cover every avatar frame from the first one on (the start-up included);
p50_after_warmup_ms / p95_after_warmup_ms the frames after the first --warmup seconds.

    python bench/stream_latency.py --renderer flashportrait --driving DATA/lp_d0.mp4 \
        --server-args "--preset 1.3b --random-weights" --seconds 20
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import shlex
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, env_info, gpu_tag, write_result  # noqa: E402


def pick_frames(path: str, size: int = 480) -> tuple[np.ndarray, np.ndarray]:
    """Frame 0 of the driving video (A) and the frame that differs most from it in the centre (B), RGB."""
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    frames = [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames]
    centre = slice(size // 5, size - size // 5)
    a = frames[0].astype(np.int16)
    scores = [np.abs(f.astype(np.int16)[centre, centre] - a[centre, centre]).mean() for f in frames]
    return frames[0], frames[int(np.argmax(scores))]


def grey(frame: av.VideoFrame) -> np.ndarray:
    """Received frame -> (48, 48) float32 grey thumbnail of the central face box: cheap, and insensitive to codec
    noise and to the static background."""
    img = frame.to_ndarray(format="gray")
    h, w = img.shape
    face = img[h // 6: h - h // 6, w // 5: w - w // 5]
    return cv2.resize(face, (48, 48), interpolation=cv2.INTER_AREA).astype(np.float32)


def distance(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x - y).mean())


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "flashlive", "serve", "--port", "0", "--loopback-ice", "--renderer", args.renderer,
           "--size", args.size, "--fps", str(args.fps), *shlex.split(args.server_args)]
    if args.reference:
        cmd += ["--reference", args.reference]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + args.start_timeout
    for line in proc.stdout:
        if "is serving http" in line:
            return proc, line.split("is serving ", 1)[1].split()[0]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start within {args.start_timeout} s (exit code {proc.poll()})")


async def post_offer(pc, url: str) -> dict:
    """Send the RTCPeerConnection's offer to the server's /offer and return its answer JSON (the remote description
    is not set)."""
    import aiohttp

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise SystemExit(f"/offer answered {resp.status}: {answer.get('error')}")
    return answer


def client_jitter_buffer(pc, args) -> None:
    """--client-jitter-buffer marker: the client's video receiver completes frames on the RTP marker bit, as a
    browser does (streaming/jitter.py); aiortc: aiortc's stock buffer, which holds each frame one frame longer."""
    if args.client_jitter_buffer == "marker":
        from streaming.jitter import use_marker_jitter_buffers

        use_marker_jitter_buffers(pc)


async def measure(args, url: str, a_img: np.ndarray, b_img: np.ndarray) -> dict:
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

    class SwitchCamera(VideoStreamTrack):
        """A camera showing image `current` (0 = A, 1 = B) at `fps`; `switch(k)` returns a future set to the time
        the first frame of image k leaves the track (the "glass" moment)."""

        def __init__(self, images, fps):
            super().__init__()
            self.frames = list(images)
            self.current = 0
            self.fps = fps
            self.switch_sent: asyncio.Future | None = None
            self._start = None
            self._n = 0

        def switch(self, k: int) -> asyncio.Future:
            self.current = k
            self.switch_sent = asyncio.get_running_loop().create_future()
            return self.switch_sent

        async def recv(self):
            if self._start is None:
                self._start = time.monotonic()
            else:
                self._n += 1
                await asyncio.sleep(max(0.0, self._start + self._n / self.fps - time.monotonic()))
            frame = av.VideoFrame.from_ndarray(self.frames[self.current], format="rgb24")
            frame.pts = int(self._n * 90000 / self.fps)
            frame.time_base = fractions.Fraction(1, 90000)
            if self.switch_sent is not None and not self.switch_sent.done():
                self.switch_sent.set_result(time.monotonic())
            return frame

    camera = SwitchCamera([a_img, b_img], args.fps)
    pc = RTCPeerConnection()
    pc.addTrack(camera)
    client_jitter_buffer(pc, args)
    remote: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: remote.done() or remote.set_result(t))

    t0 = time.monotonic()
    answer = await post_offer(pc, url)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    track = await asyncio.wait_for(remote, 30)

    trace: list[tuple[float, float]] = []  # (time since t0, distance to the settled A-avatar), for the plot
    received = 0
    settled: list = [None, None]  # the settled avatar for A and for B (thumbnails)
    switches: list[float] = []  # when each trial's new driving frame left the camera, since t0

    async def next_thumb():
        nonlocal received
        frame = await asyncio.wait_for(track.recv(), 30)
        received += 1
        now, thumb = time.monotonic(), grey(frame)
        if settled[0] is not None:
            trace.append((now - t0, distance(thumb, settled[0])))
        return now, thumb

    first_at, _ = await next_thumb()
    ttff = first_at - t0

    async def settle(seconds: float) -> np.ndarray:
        end = time.monotonic() + seconds
        thumbs = []
        while time.monotonic() < end:
            _, thumb = await next_thumb()
            thumbs.append(thumb)
        return np.mean(thumbs[-5:], axis=0)

    # Settle on A, then on B: the two avatars every trial moves between.
    settled[0] = await settle(args.warmup)
    camera.switch(1)
    settled[1] = await settle(args.warmup)
    span = distance(settled[0], settled[1])
    trials = args.trials
    if span < args.min_span:
        # The avatar does not follow the driving frame (random weights, no face): a change cannot be timed.
        print(f"the avatars for A and B differ by only {span:.2f} grey levels (< --min-span {args.min_span}): "
              "glass-to-glass latency is not measurable, reporting fps and ttff only")
        trials = 0
        await settle(args.hold * 5)  # still measure the output fps over a few seconds

    latencies = []
    fps_start, fps_frames = time.monotonic(), received
    current = 1
    for trial in range(trials):
        target = 1 - current
        sent = camera.switch(target)
        sent_at = await asyncio.wait_for(sent, 5)
        switches.append(sent_at - t0)
        latency = None
        deadline = sent_at + args.timeout
        while time.monotonic() < deadline:
            now, thumb = await next_thumb()
            if distance(thumb, settled[current]) > 0.5 * distance(settled[current], settled[target]):
                latency = now - sent_at
                break
        if latency is None:
            print(f"trial {trial}: the avatar did not change within {args.timeout} s")
        else:
            latencies.append(latency * 1e3)
            print(f"trial {trial:2d}: {'A->B' if target else 'B->A'} {latency * 1e3:7.1f} ms", flush=True)
        settled[target] = await settle(args.hold)
        current = target
    if trials == 0:
        fps_start, fps_frames = time.monotonic(), received
        await settle(args.hold * 5)
    fps = (received - fps_frames) / (time.monotonic() - fps_start)

    async with aiohttp.ClientSession() as http:
        async with http.get(url + "stats") as resp:
            stats = await resp.json()
    mine = next((s for s in stats["sessions"] if s["id"] == answer["session"]), {})
    await pc.close()
    camera.stop()
    return {"latencies_ms": latencies, "fps": fps, "ttff_s": ttff, "trace": trace, "switches": switches,
            "span": span, "stats": stats, "session": mine}


async def measure_pts(args, frames: list) -> dict:
    """The per-frame method (see the module docstring): an in-process server, a stamped camera, timestamps."""
    from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

    sys.path.insert(0, str(ROOT / "tests"))
    from avatar_probe import note_packet_arrivals, note_ticks, stamp, stamped_push

    import flashlive
    from streaming.server import AvatarServer, serve

    try:
        from engine.build import idle_image, load_reference, renderer_factory
        new_layout = True
    except ImportError:  # a checkout from before engine/build.py (bench/gpu_run.sh's baseline stages)
        from flashlive import idle_image, load_reference, renderer_factory
        new_layout = False

    cli = flashlive.build_parser().parse_args(
        ["serve", "--renderer", args.renderer, "--size", args.size, "--fps", str(args.fps), "--port", "0",
         *(["--reference", args.reference] if args.reference else []), *shlex.split(args.server_args)])
    if cli.input_queue is None and cli.renderer == "preview":
        cli.input_queue = 1  # as flashlive serve does
    cfg = flashlive.stream_config(cli)
    reference = load_reference(cli.reference, cli.renderer)
    make, device = renderer_factory(cli, reference, cfg.width, cfg.height, cfg.input_queue, fps=cfg.fps)
    idle = idle_image(cli.renderer if new_layout else cli, make, reference, cfg.width, cfg.height)
    try:
        from engine.build import warm_start  # as flashlive serve: load, compile, capture (and rehearse) first
    except ImportError:  # an older checkout (bench/gpu_run.sh's baseline stages): its serve built one session
        def warm_start(make) -> float:
            t0 = time.perf_counter()
            make().close()
            return time.perf_counter() - t0
    warm_up_s = warm_start(make)
    print(f"warm after {warm_up_s:.1f} s", flush=True)
    stamps: dict = {}

    def make_stamped():
        renderer = make()
        stamped_push(renderer, stamps)
        return renderer

    if args.server_jitter_buffer == "aiortc":  # A/B: the server keeps aiortc's stock video jitter buffer
        import streaming.server

        streaming.server.use_marker_jitter_buffers = lambda pc: 0
    server = AvatarServer(cfg, make_stamped, idle, renderer_name=cli.renderer, device=device,
                          info={"preset": cli.preset if cli.renderer != "preview" else None,
                                "random_weights": bool(cli.random_weights), "warm_up_s": round(warm_up_s, 2)})
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(server, ready=ready.set_result, stop=stop))
    url = await asyncio.wait_for(ready, 60)
    side = args.camera_size  # the camera's frames; the stamp needs 160 px of width
    images = [cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in frames]

    class StampedCamera(VideoStreamTrack):
        """Driving frame n (stamped n mod 1024, the video looped) leaves at t0 + n / fps; sent[n] notes when."""

        def __init__(self):
            super().__init__()
            self.sent: list[float] = []
            self.t0: float | None = None

        async def recv(self):
            n = len(self.sent)
            if self.t0 is None:
                self.t0 = time.monotonic()
            await asyncio.sleep(max(0.0, self.t0 + n / args.fps - time.monotonic()))
            frame = av.VideoFrame.from_ndarray(stamp(images[n % len(images)], n % 1024), format="rgb24")
            frame.pts, frame.time_base = round(n * 90000 / args.fps), fractions.Fraction(1, 90000)
            self.sent.append(time.monotonic())
            return frame

    camera = StampedCamera()
    ticks: list = []
    pc = RTCPeerConnection()
    pc.addTrack(camera)
    client_jitter_buffer(pc, args)
    arrivals = note_packet_arrivals(pc)
    remote: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: remote.done() or remote.set_result(t))
    connect = time.monotonic()
    answer = await post_offer(pc, url)
    note_ticks(server.sessions[answer["session"]].track, ticks)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    track = await asyncio.wait_for(remote, 30)

    tick_times: list[float] = []
    shown: list[tuple[float, int]] = []  # (client decoded time, driving frame n) at each frame's first appearance
    budgets: list[tuple[float, int | None, dict | None]] = []  # (time, controller changes, budget) at every frame
    session = server.sessions[answer["session"]]
    last_n, received, end = None, 0, time.monotonic() + args.seconds
    while time.monotonic() < end:
        frame = await asyncio.wait_for(track.recv(), 30)
        decoded, received = time.monotonic(), received + 1
        budgets.append((decoded, *controller_state(session.renderer)))
        arrived = arrivals["video"].get(frame.pts)
        tick_times.extend(t for t, _ in ticks[len(tick_times):])
        i = -1 if arrived is None else int(np.searchsorted(tick_times, arrived)) - 1
        if i < 0 or ticks[i][1] not in stamps:
            continue
        mark = stamps[ticks[i][1]]
        # the stamp is n mod 1024: the frame sent most recently with that stamp
        n = max((m for m in range(mark, len(camera.sent), 1024)), default=None)
        if n is not None and n != last_n:
            shown.append((decoded, n))
            last_n = n
    stats = server.stats()
    mine = next((s for s in stats["sessions"] if s["id"] == answer["session"]), {})
    await pc.close()
    camera.stop()
    stop.set()
    await asyncio.wait_for(task, 60)
    if not shown:
        raise SystemExit("no avatar frame came back within --seconds: see the server's renderer_stats")
    latencies = [(t - camera.sent[n]) * 1e3 for t, n in shown]  # every frame, from the first one on
    # uplink: camera track -> the server's capture (encode, network, the server's jitter buffer, decode)
    uplink = [(pts - camera.sent[n]) * 1e3 for pts, mark in stamps.items()
              for n in [max(range(mark, len(camera.sent), 1024), default=None)] if n is not None]
    steady = [i for i, (t, _) in enumerate(shown) if t >= shown[0][0] + args.warmup]  # after --warmup seconds
    span = shown[steady[-1]][0] - shown[steady[0]][0] if len(steady) > 1 else 0.0
    return {"latencies_ms": latencies, "steady_latencies_ms": [latencies[i] for i in steady],
            "fps": (len(steady) - 1) / span if span > 0 else 0.0,
            "ttff_s": shown[0][0] - connect, "first_frame_s": None, "trace": [(t - connect, lat) for (t, _), lat in
                                                                           zip(shown, latencies)],
            "stats": stats, "session": mine, "received": received, "frames_shown": len(shown),
            "warm_up_s": warm_up_s, "uplink_ms": uplink, "budgets": budgets,
            "first_frame_at": shown[0][0], "peak_gpu_gib": peak_gpu_gib()}


def controller_state(renderer) -> tuple[int | None, dict | None]:
    """(budget changes so far, budget) of a flashportrait session's controller, read from the in-process renderer
    (None, None for a renderer without one)."""
    ctl = getattr(renderer, "controller", None)
    if ctl is None:
        return None, None
    import dataclasses

    budget = getattr(ctl, "budget", None)
    return getattr(ctl, "changes", None), dataclasses.asdict(budget) if dataclasses.is_dataclass(budget) else None


def budget_changes(budgets: list, start: float, seconds: float) -> int | None:
    """Budget changes between `start` and `start + seconds` from the sampled controller state: the controller's own
    change counter where it has one (a change and its reversal between two samples both count), else the sampled
    budget's changes."""
    inside = [(c, b) for t, c, b in budgets if start <= t <= start + seconds]
    before = [(c, b) for t, c, b in budgets if t < start]
    samples = before[-1:] + inside
    if len(samples) < 2:
        return None
    if all(c is not None for c, _ in samples):
        return samples[-1][0] - samples[0][0]
    return sum(1 for (_, b1), (_, b2) in zip(samples, samples[1:]) if b1 != b2)


def full_passes(budget: dict | None) -> int | None:
    """Full DiT passes of the expression branch per window for a controller budget (steps 0, K, 2K, ...)."""
    if not budget:
        return None
    k, steps = budget.get("interval", 1), budget.get("steps", 0)
    return sum(1 for i in range(steps) if k == 1 or i % k == 0)


def peak_gpu_gib() -> float | None:
    """torch.cuda.max_memory_allocated of this process (the server runs in it), GiB; None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return round(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30, 2)


def default_name(args, preset: str | None, device: str | None) -> str:
    """stream_latency_fp_<preset>_<gpu>[_24g] for flashportrait, stream_latency_<renderer> otherwise."""
    if args.renderer != "flashportrait":
        return f"stream_latency_{args.renderer}"
    low = "--low-vram" in shlex.split(args.server_args)
    return f"stream_latency_fp_{preset or 'model'}_{gpu_tag(device)}" + ("_24g" if low else "")


def run_pts(args) -> None:
    """--method pts: measure, write bench/results/<name>.json + PNG, print the table."""
    with av.open(args.driving) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    result = asyncio.run(measure_pts(args, frames))
    lat = np.array(result["latencies_ms"])
    steady = np.array(result["steady_latencies_ms"])
    stats, session = result["stats"], result["session"]
    rstats = session.get("renderer_stats") or {}
    controller = session.get("controller") or rstats.get("controller") or {}
    final_budget = controller.get("budget") or next((b for _, _, b in reversed(result["budgets"]) if b), None)
    changes = budget_changes(result["budgets"], result["first_frame_at"] + args.warmup, args.changes_window)
    frames_out = session.get("frames_out")
    payload = {
        "renderer": stats["renderer"], "device": stats["device"], "preset": stats.get("preset"),
        "emo_cfg": rstats.get("emo_cfg", emo_cfg_of(args.server_args)),
        # new avatar frames per second after --warmup: driving frames shown for the first time (repeats excluded)
        "fps": round(result["fps"], 2),
        # every avatar frame from the first one on (the start-up included)
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if lat.size else None,
        "max_ms": round(float(lat.max()), 1) if lat.size else None,
        # the frames after the first --warmup seconds
        "p50_after_warmup_ms": round(float(np.percentile(steady, 50)), 1) if steady.size else None,
        "p95_after_warmup_ms": round(float(np.percentile(steady, 95)), 1) if steady.size else None,
        "warmup_s": args.warmup,
        "ttff_s": round(result["ttff_s"], 3), "method": "pts",
        "method_note": "glass-to-glass per driving frame: camera track -> avatar frame decoded at the client, "
                       "frames identified by a stamped frame number (in-process server); client jitter buffer: "
                       f"{args.client_jitter_buffer}",
        "client_jitter_buffer": args.client_jitter_buffer, "server_jitter_buffer": args.server_jitter_buffer,
        "uplink_p50_ms": round(float(np.median(result["uplink_ms"])), 1) if result["uplink_ms"] else None,
        "frames_measured": int(lat.size), "frames_received": result["received"],
        "dropped_in": rstats.get("dropped_in"), "skipped_behind": rstats.get("skipped_behind"),
        "warm_up_s": round(result["warm_up_s"], 2),
        "random_weights": stats.get("random_weights"), "target_fps": args.fps, "size": args.size,
        "server_latency_ms": session.get("latency_ms"), "repeats": session.get("repeats"),
        "repeats_fraction": round(session["repeats"] / frames_out, 4) if frames_out and session.get("repeats")
        is not None else None,
        # ticks before the first avatar frame (the idle portrait: the start-up, which ttff_s measures); servers before
        # 2026-12-02 counted them in repeats
        "waiting": session.get("waiting"),
        "skipped": session.get("skipped"), "frames_out": frames_out,
        # budget changes in the --changes-window seconds after the first --warmup seconds of the stream (from the
        # controller state sampled at every received frame); the renderer's own count where it reports one
        "budget_changes": changes, "budget_changes_window_s": args.changes_window,
        "renderer_budget_changes": rstats.get("budget_changes"),
        "final_budget": final_budget,
        "full_passes_per_window": rstats["full_passes_per_window"] if rstats.get("full_passes_per_window")
        is not None else full_passes(final_budget),
        "last_window_full_passes": rstats.get("passes"),
        "peak_gpu_gib": result["peak_gpu_gib"],
        "fp8": rstats.get("fp8"), "low_vram": rstats.get("low_vram"), "emo_refresh": rstats.get("emo_refresh"),
        "guidance": rstats.get("guidance"),
        # the renderer's playout delay and the controller's target/lookahead (serve defaults to a 350 ms target)
        "playout_delay_ms": rstats.get("playout_delay_ms"),
        "latency_target_ms": (session.get("controller") or {}).get("latency_target_ms"),
        "lookahead": (session.get("controller") or {}).get("lookahead"),
        "controller": session.get("controller"), "gpu": stats.get("gpu"),
        "renderer_stats": rstats,
        "latencies_ms": [round(x, 1) for x in lat.tolist()],
        "config": {k: v for k, v in vars(args).items() if k != "url"},
    }
    name = args.name or default_name(args, payload["preset"], env_info()["device"])
    path = write_result(name, payload)
    plot_pts(RESULTS / f"{name}.png", result, f"{payload['renderer']} {payload['preset'] or ''} on "
             f"{payload['device']}: p50 {payload['p50_ms']} ms, p95 {payload['p95_ms']} ms, {payload['fps']} fps, "
             f"first frame {payload['ttff_s']} s")
    print(f"\n{'renderer':<14}{'device':<28}{'fps':>7}{'p50 ms':>9}{'p95 ms':>9}{'ttff s':>8}"
          f"{'p95 after warm-up':>19}")
    print(f"{payload['renderer']:<14}{str(payload['device'])[:27]:<28}{payload['fps']:>7}{payload['p50_ms']!s:>9}"
          f"{payload['p95_ms']!s:>9}{payload['ttff_s']:>8}{payload['p95_after_warmup_ms']!s:>19}")
    print(f"preset {payload['preset']}, emo_cfg {payload['emo_cfg']}, repeats {payload['repeats']} of "
          f"{payload['frames_out']} sent (+ {payload['waiting']} waiting for the first frame), budget changes "
          f"{payload['budget_changes']}, final budget "
          f"{payload['final_budget']}, full passes per window {payload['full_passes_per_window']}, peak GPU "
          f"{payload['peak_gpu_gib']} GiB, fp8 {payload['fp8']}, emo_refresh {payload['emo_refresh']}")
    print(f"wrote {path} and {path.with_suffix('.png')}")


def emo_cfg_of(server_args: str) -> float:
    """--emo-cfg from the server flags, else the default (4.0): for a server whose stats do not report it."""
    flags = shlex.split(server_args)
    for i, flag in enumerate(flags):
        if flag == "--emo-cfg" and i + 1 < len(flags):
            return float(flags[i + 1])
        if flag.startswith("--emo-cfg="):
            return float(flag.split("=", 1)[1])
    return 4.0


def plot_pts(path: Path, result: dict, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    t, lat = zip(*result["trace"]) if result["trace"] else ((), ())
    ax1.plot(t, lat, ".", ms=2)
    for q, style in ((50, "--"), (95, ":")):
        if lat:
            ax1.axhline(np.percentile(lat, q), ls=style, c="grey", label=f"p{q} {np.percentile(lat, q):.0f} ms")
    ax1.set_xlabel("time since connect (s)")
    ax1.set_ylabel("glass-to-glass latency (ms)")
    if lat:
        ax1.legend()
    ax2.hist(lat, bins=40)
    ax2.set_xlabel("glass-to-glass latency (ms)")
    ax2.set_ylabel("driving frames")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(path: Path, result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    lat = result["latencies_ms"]
    ax1.plot(range(len(lat)), lat, "o-", ms=4)
    for q, style in ((50, "--"), (95, ":")):
        if lat:
            ax1.axhline(np.percentile(lat, q), ls=style, c="grey", label=f"p{q} {np.percentile(lat, q):.0f} ms")
    ax1.set_xlabel("trial")
    ax1.set_ylabel("glass-to-glass latency (ms)")
    if lat:
        ax1.legend()
    else:
        ax1.text(0.5, 0.5, "not measurable:\nthe avatar does not follow the driving frames", ha="center",
                 transform=ax1.transAxes)
    t, d = zip(*result["trace"]) if result["trace"] else ((), ())
    ax2.plot(t, d, ".-", ms=2, lw=0.5)
    for x in result["switches"]:
        ax2.axvline(x, c="red", lw=0.5, alpha=0.6)
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("received avatar: distance from settled A")
    ax2.set_title("red: driving frame switched", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server; default: start flashlive serve on a free port")
    p.add_argument("--renderer", default="preview")
    p.add_argument("--reference", default=None)
    p.add_argument("--driving", default=str(ROOT.parent / "shared" / "data" / "driving" / "lp_d0.mp4"),
                   help="video the A and B frames are taken from")
    p.add_argument("--size", default="512x512")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--hold", type=float, default=1.0, help="seconds each frame is held after the avatar changed")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=5.0, help="give up on a trial after this many seconds")
    p.add_argument("--min-span", type=float, default=1.0,
                   help="grey levels the A and B avatars must differ by for latency to be measurable")
    p.add_argument("--server-args", default="", help="extra flags for flashlive serve (flashportrait settings)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the server (compile)")
    p.add_argument("--name", default=None, help="result name (default stream_latency_<renderer>; flashportrait: "
                        "stream_latency_fp_<preset>_<gpu>[_24g])")
    p.add_argument("--method", choices=("auto", "jump", "pts"), default="auto",
                   help="jump: black-box A/B switches; pts: per-frame timestamps with an in-process server "
                        "(auto: pts for flashportrait without --url, else jump)")
    p.add_argument("--seconds", type=float, default=20.0, help="pts: how long to stream")
    p.add_argument("--changes-window", type=float, default=20.0,
                   help="pts: count the controller's budget changes over this many seconds after --warmup")
    p.add_argument("--camera-size", type=int, default=512, help="pts: side of the square driving frames sent")
    p.add_argument("--client-jitter-buffer", choices=("marker", "aiortc"), default="marker",
                   help="the client's video jitter buffer: marker completes a frame on its last packet, as a browser "
                        "does; aiortc keeps aiortc's stock buffer (one frame interval later)")
    p.add_argument("--server-jitter-buffer", choices=("marker", "aiortc"), default="marker",
                   help="pts: the in-process server's video jitter buffer (aiortc: its stock one, for an A/B)")
    args = p.parse_args()
    if args.method == "pts" or (args.method == "auto" and args.renderer == "flashportrait" and args.url is None):
        from streaming.server import restrict_ice_to_loopback

        restrict_ice_to_loopback()
        run_pts(args)
        return

    from streaming.server import restrict_ice_to_loopback

    restrict_ice_to_loopback()
    a_img, b_img = pick_frames(args.driving)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    url = url if url.endswith("/") else url + "/"
    try:
        result = asyncio.run(measure(args, url, a_img, b_img))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    lat = np.array(result["latencies_ms"])
    stats, session = result["stats"], result["session"]
    age = session.get("age_s") or 0
    payload = {
        "renderer": stats["renderer"], "device": stats["device"],
        "fps": round(result["fps"], 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if lat.size else None,
        "ttff_s": round(result["ttff_s"], 3),
        "trials": args.trials, "trials_ok": int(lat.size),
        "latency_note": None if lat.size else "the avatar did not follow the driving frames (random weights?): "
                                              "p50/p95 not measurable; see server_latency_ms", "latencies_ms": [round(x, 1) for x in lat.tolist()],
        "target_fps": args.fps, "size": args.size, "client_jitter_buffer": args.client_jitter_buffer,
        "server_latency_ms": session.get("latency_ms"),  # capture -> send inside the server (moving average)
        "render_fps": round(session.get("fresh", 0) / age, 2) if age else None,  # new avatar frames per second
        "repeats": session.get("repeats"), "frames_out": session.get("frames_out"),
        "renderer_stats": session.get("renderer_stats"), "avatar_span": round(result["span"], 2),
        "config": {k: v for k, v in vars(args).items() if k != "url"}, "url": args.url,
    }
    name = args.name or f"stream_latency_{args.renderer}"
    path = write_result(name, payload)
    plot(RESULTS / f"{name}.png", result, f"{payload['renderer']} on {payload['device']} ({env_info()['device']}): "
         f"p50 {payload['p50_ms']} ms, p95 {payload['p95_ms']} ms, {payload['fps']} fps")
    print(f"\n{'renderer':<14}{'device':<28}{'fps':>7}{'p50 ms':>9}{'p95 ms':>9}{'ttff s':>8}")
    print(f"{payload['renderer']:<14}{str(payload['device'])[:27]:<28}{payload['fps']:>7}{payload['p50_ms']!s:>9}"
          f"{payload['p95_ms']!s:>9}{payload['ttff_s']:>8}")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
