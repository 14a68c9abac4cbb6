"""Glass-to-glass latency as a browser sees it: headless Chromium, a fake camera playing a real driving video, the
camera page measuring every avatar frame it displays; then the aiortc client (bench/stream_latency.py) in the same
run on the same machine, for comparison.

    python bench/browser_latency.py [--seconds 30] [--driving lp_d3.mp4] [--renderer preview] [--name browser_latency]

1. The driving video becomes a y4m file (512x512, 25 fps) that Chromium plays as its camera
   (--use-fake-device-for-media-stream --use-file-for-fake-video-capture), looped.
2. `flashlive serve` (the preview renderer by default) runs as a subprocess on a free port.
3. Chromium opens the camera page (/?autostart). The page stamps a frame number into every camera frame as it
   leaves the camera track and notes when (performance.now()); the server writes that number into the avatar frame
   rendered from that camera frame (streaming/probe.py); the page reads it back in requestVideoFrameCallback and
   takes latency = the frame's expectedDisplayTime - when its camera frame left. Everything between the camera track
   and the screen is inside: encode, network, the server's jitter buffer, decode, render, pacing, encode, network,
   the browser's jitter buffer, decode and playout. (Not inside: the camera's own exposure/readout before the
   frame reaches the page, a few ms for a real camera, nothing for the fake one.)
4. After --seconds, the page's samples (every avatar frame shown, start-up included) are read over the DevTools
   protocol: p50/p95/max, and fps = distinct avatar frames displayed per second.
5. bench/stream_latency.py (the aiortc client) runs next on the same renderer and video: --method pts (every frame
   by its number, like this page) and its black-box jump method, each on its own server.
Writes bench/results/<name>.json (renderer, p50_ms, p95_ms, fps, browser, aiortc_client: {pts: {...}, jump: {...}})
+ <name>.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402
from bench.stream_latency import start_server  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from chromium import ChromiumError, chromium, open_page, stop  # noqa: E402  (the browser tests' DevTools client)

DATA = (ROOT / ".." / "shared" / "data").resolve()
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                  "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
                  "--autoplay-policy=no-user-gesture-required"]


def write_y4m(video: Path, path: Path, size: int, fps: int, seconds: float) -> int:
    """The first `seconds` of `video` as a y4m (I420) Chromium can play as a camera; returns the frame count."""
    cap = cv2.VideoCapture(str(video))
    count = 0
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{size} H{size} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        while count < seconds * fps:
            ok, bgr = cap.read()
            if not ok:
                break
            h, w = bgr.shape[:2]
            side = min(h, w)
            square = bgr[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
            frame = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
            out.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
            count += 1
    cap.release()
    if not count:
        raise SystemExit(f"could not read {video}: pass an existing driving video with --driving.")
    return count


async def browse(binary: str, url: str, y4m: Path, seconds: float, profile: Path) -> dict:
    try:
        async with chromium(profile, [*CHROMIUM_FLAGS, f"--use-file-for-fake-video-capture={y4m}"], binary) as cdp:
            return await measure(cdp, url, seconds)
    except ChromiumError as err:
        raise SystemExit(f"{err}: check that --chromium runs headless.") from None


async def measure(cdp, url: str, seconds: float) -> dict:
    """Open the camera page (autostart), wait for the first avatar frame, read the page's own latency figures."""
    version = (await cdp.send("Browser.getVersion"))["product"]
    target, page = await open_page(cdp, url + "?autostart")
    start = time.monotonic()
    while time.monotonic() - start < 30:  # the page connects and the first avatar frame arrives
        state = await cdp.evaluate(page, "typeof flashlive === 'object' ? flashlive.latency().frames : -1")
        if state and state > 0:
            break
        await asyncio.sleep(0.25)
    first_frame_s = time.monotonic() - start
    await asyncio.sleep(seconds)
    result = await cdp.evaluate(page, """(async () => {
      const m = flashlive.latency(), s = await flashlive.readStats();
      return {samples: m.samples, measuring: m.measuring, can_probe: flashlive.canProbe(),
              message: document.getElementById('message').textContent,
              shown: document.getElementById('latency').textContent,
              label: document.getElementById('latency-label').textContent,
              session: s.mine, browser: s.browser};
    })()""")
    await cdp.send("Target.closeTarget", targetId=target)
    result["browser_delays"] = result.pop("browser")  # the page's getStats view: rtt, jitter buffer, decode
    result.update(browser=version, first_frame_s=round(first_frame_s, 2), seconds=seconds)
    return result


def aiortc_client(args) -> dict:
    """bench/stream_latency.py on the same renderer and driving video, both of its methods: pts (every frame by its
    stamped number, as this page measures; in-process server) and jump (black-box A/B switches)."""
    out = {}
    for method in ("pts", "jump"):
        name = f"{args.name}_aiortc_{method}"
        cmd = [sys.executable, str(ROOT / "bench" / "stream_latency.py"), "--renderer", args.renderer, "--method",
               method, "--name", name, "--size", args.size, "--driving", args.driving, "--seconds",
               str(args.seconds)]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        data = json.loads((RESULTS / f"{name}.json").read_text())
        out[method] = {k: data.get(k) for k in ("p50_ms", "p95_ms", "fps", "ttff_s", "client_jitter_buffer")} | {
            "result": f"bench/results/{name}.json"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the page streams after its first frame")
    ap.add_argument("--driving", default=str(DATA / "driving" / "lp_d3.mp4"))
    ap.add_argument("--renderer", default="preview")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--server-args", default="", help="extra flags for flashlive serve")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--reference", default=None)
    ap.add_argument("--name", default="browser_latency")
    ap.add_argument("--no-aiortc", action="store_true", help="skip the aiortc client run")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flashlive-browser-"))
    try:
        frames = write_y4m(Path(args.driving), work / "camera.y4m", 512, 25, 12.0)
        print(f"fake camera: {frames} frames of {Path(args.driving).name} at 25 fps, looped", flush=True)
        proc, url = start_server(argparse.Namespace(renderer=args.renderer, size=args.size, fps=args.fps,
                                                    server_args=args.server_args, reference=args.reference,
                                                    start_timeout=args.start_timeout))
        try:
            page = asyncio.run(browse(args.chromium, url, work / "camera.y4m", args.seconds, work / "profile"))
        finally:
            stop(proc, 30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lat = np.array(page["samples"] or [], float)
    if not lat.size:
        raise SystemExit(f"the page measured no frame (can probe: {page['can_probe']}; message: "
                         f"{page['message']!r}; latency row: {page['shown']!r})")
    session = page.get("session") or {}
    payload = {
        "renderer": args.renderer, "device": "cpu", "browser": page["browser"],
        "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "max_ms": round(float(lat.max()), 1), "min_ms": round(float(lat.min()), 1),
        "fps": round(len(lat) / page["seconds"], 2) if page["seconds"] else None,
        "frames_measured": int(lat.size), "seconds": page["seconds"], "first_frame_s": page["first_frame_s"],
        "method": "camera page in headless Chromium: frame number stamped into each camera frame as it leaves the "
                  "camera track (MediaStreamTrackProcessor), carried by the server into the avatar frame it "
                  "renders, read back in requestVideoFrameCallback; latency = expectedDisplayTime - sent",
        "page_shows": f"{page['label']}: {page['shown']}",
        "server_latency_ms": session.get("latency_ms"), "server_fps_out": session.get("fps_out"),
        "repeats": session.get("repeats"), "frames_out": session.get("frames_out"),
        "browser_delays": page.get("browser_delays"),
        "driving": Path(args.driving).name, "size": args.size, "target_fps": args.fps,
        "load_avg_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
        "latencies_ms": [round(x, 1) for x in lat.tolist()],
    }
    if not args.no_aiortc:
        payload["aiortc_client"] = aiortc_client(args)
    path = write_result(args.name, payload)
    plot(RESULTS / f"{args.name}.png", lat, payload)
    print(f"\n{'client':<34}{'fps':>7}{'p50 ms':>9}{'p95 ms':>9}")
    label = "Chromium camera page (measured)"
    print(f"{label:<34}{payload['fps']!s:>7}{payload['p50_ms']!s:>9}{payload['p95_ms']!s:>9}")
    for method, a in payload.get("aiortc_client", {}).items():
        label = f"aiortc client ({method})"
        print(f"{label:<34}{a['fps']!s:>7}{a['p50_ms']!s:>9}{a['p95_ms']!s:>9}")
    print(f"{page['browser']}; the page showed: {payload['page_shows']}")
    print("wrote", path, "and", path.with_suffix(".png"))


def plot(path: Path, lat: np.ndarray, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(lat, ".", ms=2)
    for q, style in ((50, "--"), (95, ":")):
        ax1.axhline(np.percentile(lat, q), ls=style, c="grey", label=f"p{q} {np.percentile(lat, q):.0f} ms")
    pts = payload.get("aiortc_client", {}).get("pts", {})
    if pts.get("p50_ms") is not None:
        ax1.axhline(pts["p50_ms"], c="red", lw=0.8, label=f"aiortc client (per frame) p50 {pts['p50_ms']:.0f} ms")
    ax1.set_xlabel("avatar frame shown")
    ax1.set_ylabel("glass-to-glass latency (ms)")
    ax1.legend(fontsize=8)
    ax2.hist(lat, bins=40)
    ax2.set_xlabel("glass-to-glass latency (ms)")
    ax2.set_ylabel("avatar frames")
    fig.suptitle(f"{payload['renderer']} on {payload['cpu_count']} CPU cores, measured in {payload['browser']}: "
                 f"p50 {payload['p50_ms']} ms, p95 {payload['p95_ms']} ms, {payload['fps']} fps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
