"""Throughput of the `preview` renderer (CPU only: mediapipe face mesh + cv2 warp) at 512x512.

    python bench/preview.py [--driving lp_d3.mp4] [--reference PATH] [--frames 300] [--size 512] [--name preview]

Runs process() back to back on decoded driving frames (decode time excluded) and prints a table of fps and
per-stage milliseconds (face mesh + motion transfer, warp); writes bench/results/<name>.json
(default preview.json: the bundled portrait driven by lp_d3; preview_fp_case3.json: a fringed lid painted as it closes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from engine.preview import PreviewRenderer, load_reference  # noqa: E402

DATA = (ROOT / ".." / "shared" / "data").resolve()


def read_frames(path: Path, limit: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < limit:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise SystemExit(f"could not read driving video {path}: pass an existing mp4 with --driving.")
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driving", default=str(DATA / "driving" / "lp_d3.mp4"))
    ap.add_argument("--reference", default=None, help="portrait image (default: the bundled one)")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--strip", type=int, default=6, help="driving/output frame pairs saved to <name>_frames.jpg")
    ap.add_argument("--name", default="preview", help="result name: bench/results/<name>.json")
    args = ap.parse_args()

    frames = read_frames(Path(args.driving), args.frames)
    renderer = PreviewRenderer(load_reference(args.reference), width=args.size, height=args.size)
    for f in frames[:args.warmup]:
        renderer.process(f, 0.0)
    renderer.reset_neutral()

    drive_ms, warp_ms, total_ms = [], [], []
    strip_at = set(np.linspace(0, len(frames) - 1, args.strip).astype(int).tolist()) if args.strip else set()
    strip = []
    load_before = os.getloadavg()[0]
    cpu_start, t_start = time.process_time(), time.perf_counter()
    for i, f in enumerate(frames):
        t0 = time.perf_counter()
        target = renderer.drive(f)
        t1 = time.perf_counter()
        out = renderer.warp(target) if target is not None else renderer.reference
        t2 = time.perf_counter()
        if i in strip_at:
            strip.append((f, out))
        drive_ms.append((t1 - t0) * 1e3)
        warp_ms.append((t2 - t1) * 1e3)
        total_ms.append((t2 - t0) * 1e3)
    wall = time.perf_counter() - t_start
    cpu_ms = (time.process_time() - cpu_start) / len(frames) * 1e3  # all threads' CPU: immune to other load
    # The same frames through the public threaded path (push/pull), as the server runs it.
    renderer.start()
    got, t0 = 0, time.perf_counter()
    for i, f in enumerate(frames):
        while len(renderer._in) >= renderer._in.maxlen:  # feed as fast as it drains, dropping nothing
            got += renderer.pull() is not None
            time.sleep(0.0005)
        renderer.push(f, i / 25)
    while got < len(frames) and time.perf_counter() - t0 < 120:
        if renderer.pull() is None:
            time.sleep(0.0005)
        else:
            got += 1
    threaded_fps = got / (time.perf_counter() - t0)
    stats = renderer.stats()
    renderer.close()

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 2)

    payload = {
        "renderer": "preview", "size": args.size, "frames": len(frames),
        "driving": Path(args.driving).name, "reference": args.reference or "bundled portrait",
        "cpu_threads": os.cpu_count(),
        "fps": round(len(frames) / wall, 1), "threaded_fps": round(threaded_fps, 1),
        "total_ms": {"p50": pct(total_ms, 50), "p95": pct(total_ms, 95), "mean": round(float(np.mean(total_ms)), 2)},
        "drive_ms": {"p50": pct(drive_ms, 50), "p95": pct(drive_ms, 95)},
        "warp_ms": {"p50": pct(warp_ms, 50), "p95": pct(warp_ms, 95)},
        "cpu_ms_per_frame": round(cpu_ms, 2), "load_avg_1m": round(max(load_before, os.getloadavg()[0]), 2),
        "dropped_in": stats["dropped_in"], "dropped_out": stats["dropped_out"],
        "faces_missed": stats["faces_missed"], "target_fps": 25,
    }
    print(f"{'stage':<22}{'p50 ms':>10}{'p95 ms':>10}")
    for key in ("drive_ms", "warp_ms", "total_ms"):
        print(f"{key:<22}{payload[key]['p50']:>10}{payload[key]['p95']:>10}")
    print(f"fps (process loop) {payload['fps']}   fps (push/pull thread) {payload['threaded_fps']}   "
          f"target >= 25   {args.size}x{args.size}, {len(frames)} frames of {payload['driving']}")
    print(f"CPU time {payload['cpu_ms_per_frame']} ms/frame (all threads); 1-min load average "
          f"{payload['load_avg_1m']} on {os.cpu_count()} cores (other processes slow the wall-clock numbers)")
    print("wrote", write_result(args.name, payload))
    if strip:  # driving frames on top, the avatar below: a look at what the numbers above are numbers of
        tile = lambda im: cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA)  # noqa: E731
        sheet = np.vstack([np.hstack([tile(d) for d, _ in strip]), np.hstack([tile(o) for _, o in strip])])
        path = ROOT / "bench" / "results" / f"{args.name}_frames.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        print("wrote", path)


if __name__ == "__main__":
    main()
