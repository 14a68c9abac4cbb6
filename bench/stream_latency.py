"""Black-box WebRTC benchmark of a running FlashLive server: output fps, time to first frame, glass-to-glass latency.

    python bench/stream_latency.py                                  # starts `flashlive serve` (preview) itself
    python bench/stream_latency.py --renderer flashportrait --server-args "--preset 1.3b --weights /w"
    python bench/stream_latency.py --url http://127.0.0.1:8080/     # an already running server

The client is an aiortc peer that sends a synthetic camera: it holds one driving frame (A) until the avatar has
settled, then jumps to a very different one (B) and times from the moment the first B frame leaves its camera track
until the first received avatar frame that has moved at least half-way from the settled A-avatar towards the settled
B-avatar; then the other way round, `--trials` times. Everything (encode, network, decode, capture, render, pacing,
encode, network, decode) is inside the measurement, as a person in front of a camera would see it.
Writes bench/results/stream_latency_<renderer>.json (renderer, device, fps, p50_ms, p95_ms, ttff_s, ...) + PNG.
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

from bench.common import RESULTS, env_info, write_result  # noqa: E402


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
    remote: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: remote.done() or remote.set_result(t))

    t0 = time.monotonic()
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise SystemExit(f"/offer answered {resp.status}: {answer.get('error')}")
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
    p.add_argument("--name", default=None, help="result name (default stream_latency_<renderer>)")
    args = p.parse_args()

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
        "target_fps": args.fps, "size": args.size,
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
