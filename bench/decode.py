"""Streaming decode speed: ms per output frame for the Wan2.1 VAE vs the TAEHV tiny decoder.

    python bench/decode.py                               # CUDA, bf16, 512x512, 1/2/3 latent frames per call
    python bench/decode.py --chunks 3 --calls 20
    python bench/decode.py --tiny --size 64 --device cpu --dtype fp32 --calls 2   # CPU smoke test

Both decoders run as they do live: a stream object is fed `chunk` latent frames per call and keeps its causal
history between calls. The first call of a stream (1 + 4(chunk-1) frames) and --warmup further calls are not timed;
then each of --calls calls is timed (CUDA events on GPU) and the median call time is divided by the 4*chunk frames
it returns. Weights are random at the real sizes (or the tiny preset with --tiny), built directly on the device.
Before timing, a short fp32 check on the device confirms that streaming in mixed chunks equals one whole decode.
Writes bench/results/<out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402
from engine.config import TinyVAEConfig, VAEConfig, get_preset, parse_dtype  # noqa: E402
from engine.models.tiny_vae import StreamingTinyDecoder, TinyVAE  # noqa: E402
from engine.models.vae import StreamingDecoder, WanVAE  # noqa: E402

FPS = 25.0  # playback rate the decoder has to stay ahead of


def build(name: str, tiny: bool, device: str, dtype: torch.dtype):
    """(model, stream factory, latent channels) with random weights, built on the device."""
    preset = get_preset("tiny") if tiny else None
    with torch.device(device):
        if name == "wan":
            model = WanVAE(preset.vae if tiny else VAEConfig())
            factory = StreamingDecoder
        else:
            model = TinyVAE(preset.tiny_vae if tiny else TinyVAEConfig(), encoder=False)
            factory = StreamingTinyDecoder
    return model.to(dtype).eval(), factory


def stream_check(name: str, tiny: bool, device: str) -> float:
    """Max |streaming in chunks (1, 2, 1) - whole decode| in fp32 at 128x128 on the device."""
    model, factory = build(name, tiny, device, torch.float32)
    z = torch.randn(1, 16, 4, 16, 16, device=device)
    whole = factory(model).decode(z)
    stream = factory(model)
    parts = [stream.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 4))]
    return (torch.cat(parts, dim=2) - whole).abs().max().item()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(stream, z: torch.Tensor, calls: int, warmup: int, device: str) -> list[float]:
    """Milliseconds of each timed streaming call (the stream is already past its first call)."""
    for _ in range(warmup):
        stream.decode(z)
    sync(device)
    times = []
    for _ in range(calls):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            stream.decode(z)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            stream.decode(z)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(args) -> dict:
    device, dtype = args.device, parse_dtype(args.dtype)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    h = w = args.size // 8
    rows = []
    checks = {}
    for name in args.decoders.split(","):
        checks[name] = stream_check(name, args.tiny, device)
        model, factory = build(name, args.tiny, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        for chunk in (int(c) for c in args.chunks.split(",")):
            z = torch.randn(1, 16, chunk, h, w, device=device, dtype=dtype)
            stream = factory(model)
            first = stream.decode(z)  # start-up call: 1 + 4(chunk-1) frames, not timed
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times = time_calls(stream, z, args.calls, args.warmup, device)
            frames = 4 * chunk
            ms_call = statistics.median(times)
            row = {"decoder": name, "chunk_latents": chunk, "frames_per_call": frames,
                   "first_call_frames": first.shape[2], "ms_per_call": ms_call, "ms_per_frame": ms_call / frames,
                   "fps": 1e3 * frames / ms_call, "realtime_x": (1e3 / FPS) / (ms_call / frames),
                   "ms_per_call_all": times, "params_m": params / 1e6}
            if device.startswith("cuda"):
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            print(f"{name:6s} chunk {chunk}: {ms_call:9.2f} ms/call  {row['ms_per_frame']:8.3f} ms/frame  "
                  f"{row['fps']:8.1f} fps  x{row['realtime_x']:.2f} real time at {FPS:g} fps", flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"config": {"size": args.size, "dtype": args.dtype, "device": device, "tiny": args.tiny,
                       "chunks": args.chunks, "calls": args.calls, "warmup": args.warmup},
            "stream_vs_whole_max_abs_fp32": checks, "results": rows}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'decoder':8s} {'chunk':>5s} {'frames':>6s} {'ms/call':>10s} {'ms/frame':>9s} {'fps':>8s} {'x RT':>6s}")
    for r in rows:
        print(f"{r['decoder']:8s} {r['chunk_latents']:5d} {r['frames_per_call']:6d} {r['ms_per_call']:10.2f} "
              f"{r['ms_per_frame']:9.3f} {r['fps']:8.1f} {r['realtime_x']:6.2f}")


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    chunks = sorted({r["chunk_latents"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(decoders)
    for i, name in enumerate(decoders):
        ms = [next(r["ms_per_frame"] for r in rows if r["decoder"] == name and r["chunk_latents"] == c)
              for c in chunks]
        ax.bar([c + (i - (len(decoders) - 1) / 2) * width for c in chunks], ms, width, label=name)
    ax.axhline(1e3 / FPS, color="k", lw=0.8, ls="--", label=f"{FPS:g} fps budget")
    ax.set_xticks(chunks)
    ax.set_xlabel("latent frames per streaming call")
    ax.set_ylabel("ms per output frame")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoders", default="wan,taehv")
    p.add_argument("--chunks", default="1,2,3", help="latent frames per streaming call, comma-separated")
    p.add_argument("--size", type=int, default=512, help="video width = height in pixels (multiple of 8)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny preset widths (CPU smoke test)")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="result name under bench/results/ (default: decode or decode_smoke)")
    args = p.parse_args()
    out = args.out or ("decode_smoke" if args.tiny or not args.device.startswith("cuda") else "decode")
    with torch.inference_mode():
        payload = run(args)
    print_table(payload["results"])
    path = write_result(out, payload)
    widths = "tiny widths" if args.tiny else "real widths"
    title = (f"streaming decode {args.size}x{args.size} {args.dtype} {widths}, random weights, "
             f"{payload['config']['device']}")
    try:
        plot(payload["results"], title, RESULTS / f"{out}.png")
        print(f"wrote {path} and {out}.png")
    except ImportError:  # GPU hosts may lack matplotlib; the JSON holds every number
        print(f"wrote {path} (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
