"""ALPA quality vs speed: full DiT passes, wall time and latent error against full compute.

    python bench/alpa_quality.py                                    # 1.3b, bf16, CUDA, 30 steps, 512x512, 6 latent
    python bench/alpa_quality.py --preset tiny --device cpu --dtype fp32 --steps 10 --frames 2 --size 64  # smoke

One guided sampling run (emotion CFG 4: two DiT passes per step, separate caches per branch) per method, all from
the same noise and conditioning; the error is ||x - x_full|| / ||x_full|| of the final latent against the run
that computes every pass. Methods, for every K in --intervals:
    alpa              block residual features of every layer, Newton expansion, s(t) from the latent change, w
    alpa-output       ALPA caching only the DiT output (the light variant)
    alpa-taylor       ALPA with the paper's literal Taylor coefficients
    alpa-sigma        ALPA with s(t) from the schedule's sigma steps instead of the measured latent change
    alpa-blockout     ALPA on block outputs instead of block residuals
    taylorseer        s = w = 1 (layers), and taylorseer-output
    fewer-steps       plain sampling with ceil(steps / K) steps (same number of full passes, no prediction)
    teacache          a sweep of thresholds (TeaCache-style reuse of the block-stack residual); the plot places
                      every threshold by its full passes
Also reports the ALPA cache memory (live bytes, the peak CUDA memory of each run, and the formula
layers x (n+1) x tokens x dim x bytes per branch).

Random weights make this a proxy: the features of a trained DiT evolve far more smoothly over the steps than those
of a random one, so absolute errors here say little about visual quality; the ranking of methods at equal passes
and the cost side (passes, time, memory) are what this measures. The head is rescaled once so the random model's
flow has unit RMS (otherwise the trajectory leaves the data range within a few steps).
Writes bench/results/alpa_quality[_<preset>_<device>].json and .png.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, env_info, write_result  # noqa: E402
from engine.alpa import ALPAOptions, CachedDiT, cache_bytes  # noqa: E402
from engine.config import ALPAConfig, get_preset, parse_dtype  # noqa: E402
from engine.weights import random_dit  # noqa: E402
from engine.sampler import Sampler, flow_schedule  # noqa: E402

BRANCHES = (("emo", 1.0), ("no_emo", 0.0))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device) -> int | None:
    """Peak CUDA memory of the last run (model weights included), None on CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run(model, inputs, schedule, cached: CachedDiT | None, emo_cfg: float, device):
    """Guided Euler sampling; returns (final latent fp32, seconds). cached None = every pass in full."""
    sampler = Sampler(schedule)
    runner = cached or CachedDiT(model, schedule, ALPAConfig(mode="off"))
    runner.reset()
    x = inputs["x"].clone()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(len(sampler)):
        preds = {name: runner(x, i, *inputs["ctx"], inputs["y"], inputs["emo"], ip_scale=ip, key=name,
                              kv=inputs["kv"]) for name, ip in BRANCHES}
        v = preds["no_emo"] + emo_cfg * (preds["emo"] - preds["no_emo"])
        x = sampler.step(i, x, v)
    sync(device)
    return x.float(), time.perf_counter() - t0, runner


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=512, help="video height = width in pixels (latent = size / 8)")
    ap.add_argument("--frames", type=int, default=6, help="latent frames")
    ap.add_argument("--emo-cfg", type=float, default=4.0)
    ap.add_argument("--intervals", default="2,3,5")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1.5)
    ap.add_argument("--teacache", default="0.003,0.01,0.03,0.06,0.1,0.2,0.4,0.8,1.6",
                    help="TeaCache thresholds to sweep")
    ap.add_argument("--methods", default="alpa,alpa-output,alpa-taylor,alpa-sigma,alpa-blockout,taylorseer,"
                                         "taylorseer-output,fewer-steps,teacache")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available: run on a GPU machine or pass --device cpu (with --preset tiny).")
    dtype = parse_dtype(args.dtype)
    cfg = get_preset(args.preset).dit
    model = random_dit(cfg, device, dtype)
    lat = args.size // 8
    B, F = 1, args.frames
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device)

    with torch.no_grad():
        ctx = model.embed_context(rnd(B, cfg.text_len, cfg.text_dim).to(dtype), rnd(B, cfg.clip_tokens, cfg.clip_dim).to(dtype))
        kv = model.context_kv(*ctx) if hasattr(model, "context_kv") else None
        inputs = dict(x=rnd(B, cfg.out_dim, F, lat, lat), y=rnd(B, cfg.in_dim - cfg.out_dim, F, lat, lat).to(dtype),
                      emo=rnd(B, F, cfg.emo_tokens_per_frame, cfg.emo_dim).to(dtype), ctx=ctx, kv=kv)
        # unit-RMS flow: rescale the head once (see the module docstring)
        probe = CachedDiT(model, flow_schedule(args.steps, args.shift), ALPAConfig(mode="off"))
        rms = probe(inputs["x"], 0, *ctx, inputs["y"], inputs["emo"], kv=kv).pow(2).mean().sqrt().item()
        model.head.head.weight.div_(rms)
        model.head.head.bias.div_(rms)

    schedule = flow_schedule(args.steps, args.shift)
    tokens = F * (lat // cfg.patch_size[1]) * (lat // cfg.patch_size[2])
    run(model, inputs, flow_schedule(2, args.shift), None, args.emo_cfg, device)  # warm-up (kernels, allocator)
    ref, ref_s, ref_runner = run(model, inputs, schedule, None, args.emo_cfg, device)
    rows = [dict(method="full", K=1, full_passes=ref_runner.full_passes, seconds=ref_s, rel_error=0.0,
                 cache_bytes=0, peak_memory_bytes=peak(device))]
    print(f"{'method':<22}{'K':>3}{'passes':>8}{'time s':>9}{'rel err':>11}{'cache MB':>10}")
    print(f"{'full':<22}{1:>3}{ref_runner.full_passes:>8}{ref_s:>9.3f}{0.0:>11.2e}{0:>10.1f}")

    def record(method, K, out, secs, runner, extra=None):
        err = float((out - ref).norm() / ref.norm())
        row = dict(method=method, K=K, full_passes=runner.full_passes, predicted_passes=runner.predicted_passes,
                   seconds=secs, rel_error=err, cache_bytes=runner.cache_nbytes(), peak_memory_bytes=peak(device),
                   **(extra or {}))
        rows.append(row)
        print(f"{method:<22}{K:>3}{row['full_passes']:>8}{secs:>9.3f}{err:>11.2e}{row['cache_bytes'] / 2**20:>10.1f}")

    methods = args.methods.split(",")
    variants = {
        "alpa": (ALPAConfig(mode="alpa", order=args.order, alpha=args.alpha, cache="layers"), ALPAOptions()),
        "alpa-output": (ALPAConfig(mode="alpa", order=args.order, alpha=args.alpha, cache="output"), ALPAOptions()),
        "alpa-taylor": (ALPAConfig(mode="alpa", order=args.order, alpha=args.alpha, cache="layers"),
                        ALPAOptions(expansion="taylor")),
        "alpa-sigma": (ALPAConfig(mode="alpa", order=args.order, alpha=args.alpha, cache="layers"),
                       ALPAOptions(rate="sigma")),
        "alpa-blockout": (ALPAConfig(mode="alpa", order=args.order, alpha=args.alpha, cache="layers"),
                          ALPAOptions(feature="output")),
        "taylorseer": (ALPAConfig(mode="taylorseer", order=args.order, cache="layers"), ALPAOptions()),
        "taylorseer-output": (ALPAConfig(mode="taylorseer", order=args.order, cache="output"), ALPAOptions()),
    }
    for K in [int(k) for k in args.intervals.split(",")]:
        for name, (acfg, opt) in variants.items():
            if name not in methods:
                continue
            acfg = ALPAConfig(**{**acfg.__dict__, "interval": K})
            out, secs, runner = run(model, inputs, schedule, CachedDiT(model, schedule, acfg, opt), args.emo_cfg,
                                    device)
            record(name, K, out, secs, runner)
            del runner
        if "fewer-steps" in methods:
            n = math.ceil(args.steps / K)
            out, secs, runner = run(model, inputs, flow_schedule(n, args.shift), None, args.emo_cfg, device)
            record("fewer-steps", K, out, secs, runner, {"steps": n})
    if "teacache" in methods:
        for thr in [float(t) for t in args.teacache.split(",")]:
            acfg = ALPAConfig(mode="teacache", teacache_threshold=thr)
            out, secs, runner = run(model, inputs, schedule, CachedDiT(model, schedule, acfg), args.emo_cfg, device)
            K_eq = round(2 * args.steps / max(runner.full_passes, 1), 2)
            record("teacache", K_eq, out, secs, runner, {"threshold": thr})

    bpe = torch.finfo(torch.float32).bits // 8
    memory = {f"{c}_{b}": cache_bytes(cfg, tokens, args.order, c, n, branches=2)
              for c in ("layers", "output") for b, n in (("fp32", bpe), ("bf16", 2))}
    payload = dict(
        bench="alpa_quality",
        proxy_note=("Random weights: a proxy. A trained DiT's features change far more smoothly across steps than a "
                    "random one's, so absolute errors are not visual quality; compare methods at equal full passes. "
                    "Head rescaled for unit-RMS flow."),
        config=dict(preset=args.preset, dtype=args.dtype, steps=args.steps, shift=args.shift, size=args.size,
                    latent_frames=F, tokens=tokens, emo_cfg=args.emo_cfg, order=args.order, alpha=args.alpha,
                    branches=len(BRANCHES), cache_dtype="fp32"),
        cache_memory_formula_bytes=memory,
        rows=rows,
    )
    name = args.name or ("alpa_quality" if (args.preset, device.type) == ("1.3b", "cuda")
                         else f"alpa_quality_{args.preset}_{device.type}")
    path = write_result(name, payload)
    plot(rows, RESULTS / f"{name}.png", payload["config"], env_info()["device"])
    print(f"wrote {path}")


def plot(rows, path, config, device_name):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r["method"] for r in rows if r["method"] != "full"})
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["full_passes"])
        nz = [r for r in rs if r["rel_error"] > 0]  # thresholds so low that every pass ran equal full compute
        ax0.plot([r["full_passes"] for r in nz], [r["rel_error"] for r in nz], "o-", label=m)
        ax1.plot([r["full_passes"] for r in rs], [r["seconds"] for r in rs], "o-", label=m)
    full = next(r for r in rows if r["method"] == "full")
    ax1.axhline(full["seconds"], color="k", ls="--", lw=0.8, label="full compute")
    ax0.set_yscale("log")
    ax0.set_xlabel("full DiT passes (both guidance branches)")
    ax0.set_ylabel("final latent rel. L2 error vs full compute")
    ax1.set_xlabel("full DiT passes")
    ax1.set_ylabel("wall time of the run (s)")
    ax0.legend(fontsize=8)
    fig.suptitle(f"ALPA proxy (random weights) - {config['preset']}, {config['steps']} steps, "
                 f"{config['latent_frames']} latent frames, {device_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
