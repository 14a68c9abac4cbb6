"""Soak test of a `flashlive serve` process: does it hold its memory, file descriptors, threads, fps and latency
over minutes of streaming, and over many connect/disconnect cycles?

    python bench/soak.py --minutes 10                         # 2 aiortc camera clients for 10 minutes
    python bench/soak.py --cycles 100 --clients 4             # 100 connect/disconnect cycles, 4 clients at once
    python bench/soak.py --minutes 10 --server-args "--renderer flashportrait --preset 1.3b --random-weights"
    python bench/soak.py --cycles 100 --server-checkout /tmp/old --server-args=--loopback-ice --name churn_before

The server is a separate process (`python -m flashlive serve --port 0` on 127.0.0.1, plain: no --loopback-ice);
the clients are aiortc peers in this process that send a driving video (looped, at its fps) and read the avatar.
Every --interval seconds it samples the server's RSS, open file descriptors and threads (/proc), the fps the
clients received and the server's capture-to-send latency per session (/stats). Writes
bench/results/soak_<name>.json (time series + summary) and a PNG.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402


def proc_sample(pid: int) -> dict:
    """RSS (MB), open fds and threads of process `pid`, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {ln.split(":")[0]: ln.split(":", 1)[1].strip() for ln in status if ":" in ln}
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "flashlive", "serve", "--port", "0", "--size", args.size,
           *shlex.split(args.server_args)]
    print("starting:", " ".join(cmd), flush=True)
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    log = open(RESULTS / "logs" / f"soak_{args.name}.server.log", "w")  # its stderr: sessions opened and closed
    root = Path(args.server_checkout).resolve() if args.server_checkout else ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    for line in proc.stdout:
        if "is serving" in line:
            url = line.split("is serving", 1)[1].split()[0]
            return proc, url
    raise SystemExit(f"the server exited before serving (see {log.name})")


def load_clip(path: str, size: int = 320) -> list[np.ndarray]:
    with av.open(path) as c:
        return [cv2.resize(f.to_ndarray(format="rgb24"), (size, size), interpolation=cv2.INTER_AREA)
                for f in c.decode(video=0)]


class Client:
    """One aiortc camera peer: sends the clip looped at `fps`, counts the avatar frames it gets back."""

    def __init__(self, frames, fps: float):
        from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack

        from streaming.ice import offer_loopback_candidates

        class Camera(VideoStreamTrack):
            async def recv(inner):
                if inner.t0 is None:
                    inner.t0 = time.monotonic()
                n = inner.n
                inner.n += 1
                await asyncio.sleep(max(0.0, inner.t0 + n / fps - time.monotonic()))
                frame = av.VideoFrame.from_ndarray(frames[n % len(frames)], format="rgb24")
                frame.pts, frame.time_base = round(n * 90_000 / fps), fractions.Fraction(1, 90_000)
                return frame

        self.camera = Camera()
        self.camera.t0, self.camera.n = None, 0
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(self.camera)
        offer_loopback_candidates(self.pc)
        self.received = 0
        self.session: str | None = None
        self._reader: asyncio.Task | None = None
        self._track = asyncio.get_running_loop().create_future()
        self.pc.on("track", lambda t: self._track.done() or self._track.set_result(t))

    async def connect(self, url: str) -> None:
        from aiortc import RTCSessionDescription

        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer"}) as r:
                answer = await r.json()
                if r.status != 200:
                    raise RuntimeError(answer)
        self.session = answer["session"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        track = await asyncio.wait_for(self._track, 20)
        self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                await track.recv()
                self.received += 1
        except MediaStreamError:
            pass

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pc.close()


async def stats(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "stats") as r:
            return await r.json()


async def soak(args, url: str, pid: int, frames) -> dict:
    clients = [Client(frames, args.fps) for _ in range(args.clients)]
    for c in clients:
        await c.connect(url)
    t0 = time.monotonic()
    samples, last = [], (t0, [0] * len(clients))
    end = t0 + 60 * args.minutes
    while time.monotonic() < end:
        await asyncio.sleep(args.interval)
        now = time.monotonic()
        received = [c.received for c in clients]
        fps = [(r - r0) / (now - last[0]) for r, r0 in zip(received, last[1])]
        last = (now, received)
        s = await stats(url)
        lat = [x["latency_ms"] for x in s["sessions"] if x["kind"] == "camera"]
        samples.append({"t_s": round(now - t0, 1), **proc_sample(pid), "fps_received": [round(f, 2) for f in fps],
                        "latency_ms": lat, "sessions": s["session_count"],
                        "repeats": sum(x.get("repeats", 0) for x in s["sessions"])})
        print(f"{samples[-1]['t_s']:7.0f} s  RSS {samples[-1]['rss_mb']:7.1f} MB  fds {samples[-1]['fds']:4d}  "
              f"threads {samples[-1]['threads']:3d}  fps {' '.join(f'{f:5.1f}' for f in fps)}  "
              f"latency {' '.join(f'{x:5.0f}' for x in lat)} ms", flush=True)
    for c in clients:
        await c.close()
    await asyncio.sleep(3)
    after = proc_sample(pid)
    return {"samples": samples, "after_close": after, "sessions_after_close": (await stats(url))["session_count"]}


async def churn(args, url: str, pid: int, frames) -> dict:
    samples = [{"cycle": 0, **proc_sample(pid)}]
    for cycle in range(1, args.cycles + 1):
        clients = [Client(frames, args.fps) for _ in range(args.clients)]
        await asyncio.gather(*(c.connect(url) for c in clients))
        deadline = time.monotonic() + 15
        while min(c.received for c in clients) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.gather(*(c.close() for c in clients))
        while (await stats(url))["session_count"] and time.monotonic() < deadline + 15:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        samples.append({"cycle": cycle, **proc_sample(pid), "frames": [c.received for c in clients]})
        print(f"cycle {cycle:4d}  RSS {samples[-1]['rss_mb']:7.1f} MB  fds {samples[-1]['fds']:4d}  "
              f"threads {samples[-1]['threads']:3d}", flush=True)
    return {"samples": samples}


def summarize_soak(result: dict) -> dict:
    s = result["samples"]
    rss = np.array([x["rss_mb"] for x in s])
    first_min = [x for x in s if x["t_s"] <= 60] or s[:1]
    plateau = max(x["rss_mb"] for x in first_min)
    fps = np.array([f for x in s[1:] for f in x["fps_received"]])
    lat = np.array([v for x in s for v in x["latency_ms"]])
    return {"rss_start_mb": float(rss[0]), "rss_plateau_first_minute_mb": plateau, "rss_end_mb": float(rss[-1]),
            "rss_max_mb": float(rss.max()), "rss_end_over_plateau": round(float(rss[-1] / plateau), 3),
            "rss_slope_mb_per_min_second_half": round(float(np.polyfit(
                [x["t_s"] / 60 for x in s[len(s) // 2:]], rss[len(s) // 2:], 1)[0]), 2) if len(s) > 3 else None,
            "fds_start": s[0]["fds"], "fds_end": s[-1]["fds"], "fds_max": max(x["fds"] for x in s),
            "threads_start": s[0]["threads"], "threads_end": s[-1]["threads"],
            "threads_max": max(x["threads"] for x in s),
            "fps_received_mean": round(float(fps.mean()), 2) if fps.size else None,
            "fps_received_min": round(float(fps.min()), 2) if fps.size else None,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 1) if lat.size else None,
            "after_close": result["after_close"], "sessions_after_close": result["sessions_after_close"]}


def summarize_churn(result: dict, warmup: int) -> dict:
    s = result["samples"]
    plateau = max(x["rss_mb"] for x in s[1:warmup + 1])
    later = [x["rss_mb"] for x in s[warmup + 1:]]
    return {"rss_before_mb": s[0]["rss_mb"], "rss_plateau_mb": plateau, "rss_end_mb": s[-1]["rss_mb"],
            "rss_max_after_warmup_mb": max(later) if later else None,
            "rss_end_over_plateau": round(s[-1]["rss_mb"] / plateau, 3),
            "fds_before": s[0]["fds"], "fds_end": s[-1]["fds"], "threads_before": s[0]["threads"],
            "threads_end": s[-1]["threads"]}


def plot(path: Path, result: dict, churn_mode: bool, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    x = [v["cycle"] for v in s] if churn_mode else [v["t_s"] / 60 for v in s]
    xlabel = "cycle" if churn_mode else "minutes"
    panels = [("RSS (MB)", [v["rss_mb"] for v in s]), ("open fds", [v["fds"] for v in s]),
              ("threads", [v["threads"] for v in s])]
    if not churn_mode:
        panels += [("fps received (per client)", [v["fps_received"] for v in s]),
                   ("capture-to-send latency (ms)", [v["latency_ms"] or [np.nan] for v in s])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True)
    for ax, (label, ys) in zip(axes, panels):
        ax.plot(x, ys, ".-" if churn_mode else "-")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (with 2 clients by default)")
    p.add_argument("--cycles", type=int, default=0, help="instead: this many connect/disconnect cycles")
    p.add_argument("--clients", type=int, default=None, help="clients at once (default 2; 4 with --cycles)")
    p.add_argument("--warmup-cycles", type=int, default=10, help="--cycles: the plateau is the max RSS over these")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--driving", default=str(ROOT.parent / "shared" / "data" / "driving" / "lp_d0.mp4"))
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--size", default="256x256")
    p.add_argument("--server-args", default="", help="extra flashlive serve flags, e.g. '--renderer flashportrait'")
    p.add_argument("--name", default=None, help="result name (default preview_cpu or churn_preview_cpu)")
    p.add_argument("--server-checkout", default=None,
                   help="run the server from another checkout (an A/B against older code; e.g. from git archive)")
    args = p.parse_args()
    args.clients = args.clients or (4 if args.cycles else 2)
    renderer = "flashportrait" if "flashportrait" in args.server_args else "preview"
    args.name = args.name or (f"churn_{renderer}_cpu" if args.cycles else f"{renderer}_cpu")
    RESULTS.mkdir(parents=True, exist_ok=True)
    frames = load_clip(args.driving)
    proc, url = start_server(args)
    try:
        time.sleep(1.0)
        idle = proc_sample(proc.pid)
        if args.cycles:
            result = asyncio.run(churn(args, url, proc.pid, frames))
            summary = summarize_churn(result, args.warmup_cycles)
        else:
            result = asyncio.run(soak(args, url, proc.pid, frames))
            summary = summarize_soak(result)
    finally:
        proc.terminate()
        proc.wait(30)
    summary["server_idle_before_clients"] = idle
    config = {k: v for k, v in vars(args).items()}
    out = write_result(f"soak_{args.name}", {"summary": summary, "config": config, **result})
    title = (f"{args.cycles} cycles x {args.clients} clients" if args.cycles else
             f"{args.minutes:g} min, {args.clients} clients") + f", {renderer}, {args.size}"
    plot(RESULTS / f"soak_{args.name}.png", result, bool(args.cycles), title)
    print({k: v for k, v in summary.items()})
    print("wrote", out)


if __name__ == "__main__":
    main()
