"""Real-time FlashPortrait: the live renderer driven at the input frame rate, end to end on one device.

    python bench/realtime.py --video data/lp_d3.mp4                   # CUDA, 1.3b, random weights, 512x512
    python bench/realtime.py --video V --configs w4s2 w4s2-alpa2 adaptive --seconds 20
    python bench/realtime.py --preset tiny --size 64x64 --device cpu --seconds 4 --configs w4s2   # CPU smoke

Per configuration (window W / stride S, steps, ALPA K, controller on or off) a fresh FlashPortraitRenderer with
random weights is built and warmed up (load, compile, CUDA-graph capture; timed apart), then the driving video
(looped) is pushed at --fps in real time for --seconds while the main thread pulls avatar frames as soon as they
are ready (pull pacing off: the numbers are the engine's, not a playout buffer's) and encodes each one (H.264 via
PyAV when importable, else reported absent). Measured:
  fps               output frames per second over the steady part (from the first output frame on);
  realtime_factor   video seconds produced per second of window work (DiT + decode), averaged over windows;
  p50_ms / p95_ms   frame latency: push time of driving frame j -> time its avatar frame could be pulled;
  stages            expression ms per driving frame, DiT and decode ms per window and per output frame,
                    encode ms per output frame;
  gpu               peak allocated memory (torch) and, through pynvml, mean/max utilisation, memory used, power.
Random weights make the images noise; the timing is that of the real shapes. Writes bench/results/<out>.json and
<out>.png (latency distribution and fps per configuration).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402
from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig, get_preset  # noqa: E402
from engine.controller import ControllerConfig  # noqa: E402
from engine.flashportrait import EngineOptions, FlashPortraitEngine  # noqa: E402
from engine.renderer import FlashPortraitRenderer  # noqa: E402

# name -> (window W, stride S, steps, ALPA K, controller on). From DESIGN.md's arithmetic for 1.3b on one H100
# (512x512, 1024 tokens per latent frame; one pass over 3 / 6 latent frames 20 / 42 ms, the guidance pair batched
# at most 2x): W3/S1 (the live default) costs 4 x ~40 ms = ~160 ms per 4 frames (160 ms of video) at full budget,
# ~half with ALPA K=2, and waits 7 input frames; W4/S2 ~225 ms per 8 frames (320 ms), waits 11; W6/S3 ~340 ms per
# 12 frames (480 ms), waits 15. "adaptive" starts at the live default's full budget and lets the controller choose.
CONFIGS = {
    "w3s1": (3, 1, 4, 1, False),
    "w3s1-alpa2": (3, 1, 4, 2, False),
    "w4s2": (4, 2, 4, 1, False),
    "w4s2-alpa2": (4, 2, 4, 2, False),
    "w6s3": (6, 3, 4, 1, False),
    "adaptive": (3, 1, 4, 1, True),
}


def read_video(path: str, size: tuple[int, int], limit: int = 500) -> tuple[list[np.ndarray], float]:
    """Up to `limit` RGB frames resized to `size`, and the video's fps (cv2, else PyAV)."""
    frames, fps = [], 25.0
    try:
        import cv2

        cap = cv2.VideoCapture(path)
        fps = cap.get(cv2.CAP_PROP_FPS) or fps
        while len(frames) < limit:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(cv2.resize(bgr, size)[:, :, ::-1]))
        cap.release()
    except ImportError:
        import av

        with av.open(path) as src:
            stream = src.streams.video[0]
            fps = float(stream.average_rate or fps)
            for frame in src.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
                if len(frames) >= limit:
                    break
    if not frames:
        raise SystemExit(f"could not read any frame from {path}: pass --video with a readable video file.")
    return frames, fps


class CentredFace:
    """Landmarks stand-in when neither the PD-FGC ONNX models nor mediapipe exist on the bench machine: the five
    alignment points of a centred face, so alignment and the FanEncoder still run per frame (labelled in JSON)."""

    channel_order = "rgb"
    name = "centred-face (no landmark model installed)"

    def __init__(self):
        from engine.models.pdfgc.align import template

        self._pts = None
        self._template = template

    def five_points(self, frame: np.ndarray) -> np.ndarray:
        if self._pts is None:
            h, w = frame.shape[:2]
            side = 0.6 * min(h, w)
            self._pts = self._template(1) * side + np.array([(w - side) / 2, (h - side) / 2])
        return self._pts

    def reset(self) -> None:
        pass


def landmarks_factory():
    """None (PD-FGC's own choice: ONNX models or mediapipe) when a mediapipe face mesh can be built, else
    CentredFace (said once on stdout and in the JSON's `landmarks`)."""
    try:
        from engine.models.pdfgc.landmarks import MediapipeLandmarks

        MediapipeLandmarks().close()
        return None
    except Exception as err:  # not installed, or its native libraries do not load on this machine
        print(f"mediapipe face mesh unusable ({type(err).__name__}: {err}); alignment uses a centred face box")
        return CentredFace


class Encoder:
    """H.264 (libx264, ultrafast, zerolatency) encode of output frames via PyAV, or absent."""

    def __init__(self, width: int, height: int, fps: float):
        self.ms: list[float] = []
        try:
            import av

            self.ctx = av.CodecContext.create("libx264", "w")
            self.ctx.width, self.ctx.height, self.ctx.pix_fmt = width, height, "yuv420p"
            self.ctx.framerate = round(fps)
            self.ctx.options = {"preset": "ultrafast", "tune": "zerolatency"}
            self._frame = av.VideoFrame
            self.name = "libx264 ultrafast (PyAV)"
        except Exception as err:  # av missing, or no libx264 in this build
            self.ctx = None
            self.name = f"absent ({type(err).__name__}: {err})"

    def encode(self, image: np.ndarray) -> None:
        if self.ctx is None:
            return
        t0 = time.perf_counter()
        self.ctx.encode(self._frame.from_ndarray(image, format="rgb24"))
        self.ms.append(1e3 * (time.perf_counter() - t0))


class GpuMonitor:
    """pynvml sampling (utilisation %, memory used, power) every 100 ms on a thread; absent without a GPU."""

    def __init__(self, device_index: int = 0):
        self.samples: list[tuple[float, float, float]] = []
        self.note = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as err:
            self._nv = None
            self.note = f"pynvml unavailable ({type(err).__name__}: {err})"

    def __enter__(self):
        if self._nv is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        nv, h = self._nv, self._h
        while not self._stop.wait(0.1):
            util = nv.nvmlDeviceGetUtilizationRates(h).gpu
            mem = nv.nvmlDeviceGetMemoryInfo(h).used / 2**30
            try:
                power = nv.nvmlDeviceGetPowerUsage(h) / 1e3
            except nv.NVMLError:
                power = float("nan")
            self.samples.append((util, mem, power))

    def __exit__(self, *exc):
        self._stop.set()
        if self._nv is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict:
        if not self.samples:
            return {"nvml": self.note or "no samples"}
        u, m, p = (np.array(x, dtype=float) for x in zip(*self.samples))
        return {"util_mean_pct": round(float(u.mean()), 1), "util_max_pct": round(float(u.max()), 1),
                "mem_used_gib": round(float(m.max()), 2), "power_mean_w": round(float(np.nanmean(p)), 1)}


def percentile(values: list[float], q: float) -> float | None:
    return None if not values else float(np.percentile(np.asarray(values), q))


def run_config(name: str, spec, args, frames, reference) -> dict:
    W, S, steps, K, adaptive = spec
    runtime = RuntimeConfig(device=args.device, dtype=args.dtype, compile=not args.no_compile,
                            cuda_graphs=not args.no_compile)
    sampler = SamplerConfig(fast=not args.flow, steps=steps, emo_cfg=args.emo_cfg)
    alpa = ALPAConfig(mode="off" if K == 1 and not adaptive else args.alpa, interval=max(K, 2 if adaptive else K),
                      order=1, cache="output")
    controller = ControllerConfig(enabled=adaptive, latency_target_ms=args.latency_target_ms,
                                  max_interval=max(K, 3) if adaptive else K, lookahead=args.lookahead)
    options = EngineOptions(decoder=args.decoder, landmarks=landmarks_factory())
    width, height = args.size
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = FlashPortraitEngine(reference, None, width, height, preset=get_preset(args.preset), runtime=runtime,
                                 sampler=sampler, window=WindowConfig(W, W - S), alpa=alpa, random_weights=True,
                                 options=options)
    warm = engine.warm_up()
    r = FlashPortraitRenderer(reference, None, width, height, engine=engine, window=WindowConfig(W, W - S),
                              alpa=alpa, fps=args.fps, pace=False, controller=controller, lookahead=args.lookahead)
    setup_s = time.perf_counter() - t0
    encoder = Encoder(width, height, args.fps)
    pushed: dict[int, float] = {}
    latency, out_times = [], []
    r.start()
    n = int(args.seconds * args.fps)
    with GpuMonitor() as gpu:
        start = time.perf_counter()
        for j in range(n):
            due = start + j / args.fps
            while True:  # pull until this frame is due (the input clock)
                item = r.pull()
                now = time.perf_counter()
                if item is not None:
                    latency.append(1e3 * (now - pushed[item[1]]))
                    out_times.append(now)
                    encoder.encode(item[0])
                    continue
                if now >= due:
                    break
                time.sleep(min(0.002, due - now))
            pushed[j] = time.perf_counter()
            r.push(frames[j % len(frames)], j)
        drain_until = time.perf_counter() + 2.0
        while time.perf_counter() < drain_until:  # the last windows
            item = r.pull()
            if item is None:
                time.sleep(0.002)
                continue
            now = time.perf_counter()
            latency.append(1e3 * (now - pushed[item[1]]))
            out_times.append(now)
            encoder.encode(item[0])
    stats = r.stats()
    r.close()
    frames_per_window = 4 * stats["stride"]
    fps = (len(out_times) - 1) / (out_times[-1] - out_times[0]) if len(out_times) > 1 else 0.0
    # steady state: latencies after the first second of output
    steady = [lat for lat, t in zip(latency, out_times) if t - out_times[0] > 1.0] or latency
    result = {
        "config": {"window": W, "stride": S, "steps": steps, "alpa_interval": K, "adaptive": adaptive,
                   "alpa_mode": alpa.mode, "decoder": stats["decoder"], "emo_cfg": args.emo_cfg,
                   "batch": stats["batch"], "lookahead": args.lookahead, "compile": runtime.compile,
                   "cuda_graphs": runtime.cuda_graphs, "dtype": stats["dtype"], "size": f"{width}x{height}"},
        "fps": round(fps, 2), "realtime_factor": stats["realtime_factor"],
        "p50_ms": None if not steady else round(percentile(steady, 50), 1),
        "p95_ms": None if not steady else round(percentile(steady, 95), 1),
        "frames_in": n, "frames_out": len(out_times), "dropped_in": stats["dropped_in"], "windows": stats["windows"],
        "ttff_s": None if not out_times else round(out_times[0] - start, 3),
        "warm_up_s": round(warm, 2), "setup_s": round(setup_s, 2),
        "stages": {"expression_ms_per_frame": stats["expression_ms"], "dit_ms_per_window": stats["dit_ms"],
                   "decode_ms_per_window": stats["decode_ms"],
                   "dit_ms_per_frame": round(stats["dit_ms"] / frames_per_window, 2),
                   "decode_ms_per_frame": round(stats["decode_ms"] / frames_per_window, 2),
                   "encode_ms_per_frame": round(statistics.median(encoder.ms), 2) if encoder.ms else None,
                   "encode": encoder.name, "full_passes_last_window": stats["passes"]},
        "controller": stats["controller"],
        "gpu": {**gpu.summary(), **({"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
                                    if cuda else {})},
        "landmarks": r.extractor.landmarks.name if hasattr(r.extractor.landmarks, "name") else "custom",
        "latency_ms": [round(x, 1) for x in steady],
    }
    del r, engine
    torch._dynamo.reset()  # the next configuration compiles its own shapes (and frees this one's compiled code)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results)
    a.bar(names, [results[k]["fps"] for k in names], color="tab:blue")
    a.axhline(25, color="tab:red", ls="--", label="25 fps")
    a.set_ylabel("sustained output fps")
    a.legend()
    a.tick_params(axis="x", rotation=20)
    for k in names:
        lat = sorted(results[k]["latency_ms"])
        if lat:
            b.plot(lat, np.linspace(0, 1, len(lat)), label=f"{k} (p95 {results[k]['p95_ms']:.0f} ms)")
    b.axvline(500, color="tab:red", ls="--")
    b.set_xlabel("frame latency, push -> pull (ms)")
    b.set_ylabel("fraction of frames")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--video", default=str(ROOT.parent / "shared" / "data" / "driving" / "lp_d3.mp4"),
                   help="driving video (looped); default ../shared/data/driving/lp_d3.mp4")
    p.add_argument("--reference", default=str(ROOT / "engine" / "assets" / "portrait.jpg"))
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--size", type=_size, default=(512, 512))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--fps", type=float, default=25.0, help="input (driving) frame rate, pushed in real time")
    p.add_argument("--seconds", type=float, default=15.0, help="driving seconds per configuration")
    p.add_argument("--configs", nargs="+", default=["w3s1-alpa2", "w4s2", "adaptive"], choices=list(CONFIGS),
                   help="configurations to run (each compiles its own step: ~1 min apiece on an H100)")
    p.add_argument("--window", type=int, default=None, help="override W of every configuration")
    p.add_argument("--stride", type=int, default=None, help="override S of every configuration")
    p.add_argument("--steps", type=int, default=None, help="override the step count (4 = distilled schedule)")
    p.add_argument("--flow", action="store_true", help="flow-matching Euler schedule even at 4 steps")
    p.add_argument("--alpa", default="alpa", choices=("alpa", "taylorseer", "teacache"),
                   help="ALPA mode where a configuration has K > 1")
    p.add_argument("--emo-cfg", type=float, default=4.0, help="expression guidance (> 1: 2 branches, batched)")
    p.add_argument("--lookahead", type=int, default=1,
                   help="latent frames of token look-ahead beyond the emitted ones (renderer default 1; -1: W - S)")
    p.add_argument("--latency-target-ms", type=float, default=None, help="for the adaptive configuration")
    p.add_argument("--decoder", default="tiny", choices=("tiny", "wan"))
    p.add_argument("--no-compile", action="store_true", help="eager step (no torch.compile / CUDA graphs)")
    p.add_argument("--out", default=None, help="result name (default realtime_<preset>_<device>)")
    args = p.parse_args(argv)
    if args.lookahead is not None and args.lookahead < 0:
        args.lookahead = None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --preset tiny for a smoke test).")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

    import cv2

    frames, video_fps = read_video(args.video, args.size)
    ref_bgr = cv2.imread(args.reference)
    if ref_bgr is None:
        raise SystemExit(f"cannot read reference {args.reference}")
    reference = np.ascontiguousarray(ref_bgr[:, :, ::-1])

    results = {}
    print(f"{'config':<12} {'W':>2} {'S':>2} {'st':>2} {'K':>2} {'fps':>6} {'rtf':>6} {'p50':>7} {'p95':>7} "
          f"{'expr':>6} {'dit/f':>6} {'dec/f':>6} {'enc/f':>6} {'warm s':>7}")
    for name in args.configs:
        W, S, steps, K, adaptive = CONFIGS[name]
        W = args.window or W
        S = args.stride or S
        steps = args.steps or steps
        res = run_config(name, (W, S, steps, K, adaptive), args, frames, reference)
        results[name] = res
        st = res["stages"]
        print(f"{name:<12} {W:>2} {S:>2} {steps:>2} {K:>2} {res['fps']:>6.1f} {res['realtime_factor'] or 0:>6.2f} "
              f"{res['p50_ms'] or 0:>7.0f} {res['p95_ms'] or 0:>7.0f} {st['expression_ms_per_frame']:>6.1f} "
              f"{st['dit_ms_per_frame']:>6.1f} {st['decode_ms_per_frame']:>6.1f} "
              f"{st['encode_ms_per_frame'] or float('nan'):>6.1f} {res['warm_up_s']:>7.1f}", flush=True)
        if adaptive:
            print(f"{'':<12} controller: {res['controller']['reason']}")
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    out = args.out or f"realtime_{args.preset}_{dev}"
    payload = {"bench": "realtime", "preset": args.preset, "random_weights": True, "video": Path(args.video).name,
               "video_fps": video_fps, "input_fps": args.fps, "seconds": args.seconds, "configs": results,
               "note": "random weights: timing of the real shapes, the images are noise"}
    path = write_result(out, payload)
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU"
    plot(results, RESULTS / f"{out}.png", f"FlashPortrait live, {args.preset} random weights, "
                                          f"{args.size[0]}x{args.size[1]}, {name}, input {args.fps:g} fps")
    print(f"wrote {path} and {RESULTS / (out + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
