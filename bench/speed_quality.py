"""The speed-quality table on the trained mini: what every speed trick costs in quality, measured on real output.

    python bench/speed_quality.py --weights weights/mini          # -> bench/results/speed_quality_mini.json/.png

Held-out segments (the last 20% of --videos, capped at --frames frames each) are rendered by engine/mini.render_clip
with every configuration below, all from the same noise. Reference: full compute, --steps flow-matching steps
(shift 5), emotion guidance --emo-cfg (one batch of 2 per DiT call), offline step-major WSWS, window 3, overlap 2.
Configurations (each a row):
    full                    the reference
    4-step                  the distilled schedule's timesteps (1000, 750, 500, 250) on the mini (no LoRA exists
                            for it: this is the schedule alone)
    alpa K / taylorseer K   K = 2, 3, 5 (order 3, every layer's residual cached; ALPA adds s(t) and w)
    fewer-steps K           ceil(steps / K) steps: the same number of full passes as ALPA / TaylorSeer at K
    teacache thr            thresholds 0.05 .. 0.4 (full passes vary; the table gives them)
    rolling W/S             the live path's causal rolling windows: W 3 S 2 (overlap 1), W 3 S 1 (overlap 2),
                            W 4 S 3 (overlap 1); lookahead L = 0, 1 (vs all tokens) at W 3 S 1
Columns: DiT calls per latent frame (one call = the guidance pair as one batch), CPU seconds per video frame (this
shared 2-core machine: indicative only), PSNR and SSIM against the ground truth, the landmark expression error
against the ground truth (bench/quality.py's), and the deviation from the reference output (PSNR between the two
videos, and the relative L2 error of the final latents). FP8 (GPU only) and the guidance economy are not measured
here (other work): rows for them are absent, not guessed.
--ladder adds every budget of the live controller's ladder, scored by its latent error against the top budget;
--ladder-out writes that table where the engine reads it (weights/mini/quality_ladder.json orders the controller's
ladder, engine/controller.load_quality_table).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402
from bench.quality import MeshReader, expression, iod_of, psnr, ssim  # noqa: E402


def configs(steps: int) -> list[tuple[str, str, dict]]:
    """(name, family, RenderSettings changes) of every row."""
    from engine.config import ALPAConfig

    rows = [("full", "full", {}), ("4-step", "4-step", {"fast": True, "steps": 4})]
    for k in (2, 3, 5):
        rows.append((f"alpa K={k}", "alpa", {"alpa": ALPAConfig(mode="alpa", interval=k, order=3)}))
        rows.append((f"taylorseer K={k}", "taylorseer", {"alpa": ALPAConfig(mode="taylorseer", interval=k,
                                                                           order=3)}))
        rows.append((f"fewer-steps K={k}", "fewer-steps", {"steps": math.ceil(steps / k)}))
    for thr in (0.05, 0.1, 0.2, 0.4):
        rows.append((f"teacache {thr}", "teacache", {"alpa": ALPAConfig(mode="teacache", teacache_threshold=thr)}))
    rows.append(("rolling W3 S2", "rolling", {"rolling": True, "window": 3, "overlap": 1}))
    rows.append(("rolling W3 S1", "rolling", {"rolling": True, "window": 3, "overlap": 2}))
    rows.append(("rolling W4 S3", "rolling", {"rolling": True, "window": 4, "overlap": 1}))
    for la in (0, 1):
        rows.append((f"rolling W3 S1 L={la}", "lookahead", {"rolling": True, "window": 3, "overlap": 2,
                                                            "lookahead": la}))
    return rows


def measure_ladder(models, clips, reader, base, args) -> list[dict]:
    """Every budget of the live controller's ladder (engine/controller.py) at the live window (3 latent frames,
    4-step schedule, output-feature ALPA cache): ALPA K 1..3, steps 2..4, stride 1..2, lookahead 1 or 0, rendered
    rolling. error = relative L2 error of the final latents against the top budget's (K 1, 4 steps, stride 1,
    lookahead 1), what the speed tricks cost; PSNR and expression error against the ground truth alongside.
    --ladder-out writes the controller's table (`ladder_table`)."""
    import json

    from engine.config import ALPAConfig
    from engine.mini import render_clip

    out, top = [], {}
    for k in (1, 2, 3):
        for steps in (4, 3, 2):
            for stride in (1, 2):
                for la in (1, 0):
                    s = replace(base, rolling=True, window=3, overlap=3 - stride, fast=True, steps=steps,
                                lookahead=min(la, 3 - stride),
                                alpa=ALPAConfig(mode="alpa" if k > 1 else "off", interval=k, cache="output"))
                    ps, ex, dev = [], [], []
                    for name, truth, lm, truth_pts in clips:
                        o = render_clip(models, truth[0], lm, s, anchor=lm[0])
                        top.setdefault(name, o)  # the first budget, (K 1, 4 steps, stride 1, L 1), is the top one
                        dev.append(float((o.latents - top[name].latents).norm() / top[name].latents.norm()))
                        for t, (f, g) in enumerate(zip(o.frames, truth)):
                            ps.append(psnr(f, g))
                            gp = truth_pts[t]
                            op = reader(f) if gp is not None else None
                            if gp is not None and op is not None:
                                ex.append(float(np.abs(expression(op, iod_of(gp)) - expression(gp, iod_of(gp))).mean()))
                    row = {"interval": k, "steps": steps, "stride": stride, "lookahead": la,
                           "error": round(float(np.mean(dev)), 4), "psnr": round(float(np.mean(ps)), 3),
                           "expression_error_vs_truth": round(float(np.mean(ex)), 4) if ex else None}
                    out.append(row)
                    print(f"ladder K={k} steps={steps} stride={stride} L={la}: latent error vs top {row['error']:.3f} "
                          f"psnr {row['psnr']:.2f} expr {row['expression_error_vs_truth']}", flush=True)
    if args.ladder_out:
        Path(args.ladder_out).write_text(json.dumps(ladder_table(out), indent=1) + "\n")
    return out


def ladder_table(rows: list[dict]) -> list[dict]:
    """The controller's table (engine/controller.load_quality_table) from the ladder rows: the stride 1, lookahead 1
    errors of every (interval, steps), written without a stride so they rate every stride. Across strides the
    rolling windows draw their noise differently, so a latent error against the stride-1 reference would mostly
    measure the other draw: the stride keeps the controller's documented place (last)."""
    return [{"interval": r["interval"], "steps": r["steps"], "error": r["error"]} for r in rows
            if r["stride"] == 1 and r["lookahead"] == 1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="weights/mini")
    ap.add_argument("--videos", nargs="*", default=["lp_d12", "lp_d19", "lp_d3"])
    ap.add_argument("--frames", type=int, default=41)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--emo-cfg", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: two are far slower on a busy 2-core machine)")
    ap.add_argument("--name", default="speed_quality_mini")
    ap.add_argument("--ladder", action="store_true", help="also measure every budget of the live controller's ladder")
    ap.add_argument("--ladder-out", default=None, help="write the measured ladder table here (e.g. weights/mini/"
                                                       "quality_ladder.json, which the engine reads)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from engine.mini import RenderSettings, load_mini, render_clip
    from train.data import DEFAULT_CACHE, load_cache, split_range

    models = load_mini(args.weights)
    videos = [v for v in load_cache(DEFAULT_CACHE) if v.name in args.videos]
    reader = MeshReader()
    base = RenderSettings(steps=args.steps, emo_cfg=args.emo_cfg, window=3, overlap=2)
    clips = []
    for v in videos:
        a, b = split_range(len(v.frames), "test")
        b = min(b, a + args.frames)
        truth = ((v.frames[a:b].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        clips.append((v.name, truth, v.landmarks[a:b].numpy(), [reader(g) for g in truth]))

    rows, reference = [], {}
    for name, family, change in configs(args.steps):
        s = replace(base, **change)
        agg = {"psnr": [], "ssim": [], "expr": [], "psnr_vs_full": [], "latent_err_vs_full": []}
        calls = latents = frames = 0
        secs = 0.0
        for vname, truth, lm, truth_pts in clips:
            t0 = time.perf_counter()
            out = render_clip(models, truth[0], lm, s, anchor=lm[0])
            secs += time.perf_counter() - t0
            calls += out.full_passes
            latents += out.latents.shape[2]
            frames += len(truth)
            if name == "full":
                reference[vname] = out
            ref = reference[vname]
            agg["latent_err_vs_full"].append(float((out.latents - ref.latents).norm() / ref.latents.norm()))
            for t, (o, g) in enumerate(zip(out.frames, truth)):
                agg["psnr"].append(psnr(o, g))
                agg["ssim"].append(ssim(o, g))
                agg["psnr_vs_full"].append(psnr(o, ref.frames[t]))
                gp = truth_pts[t]
                op = reader(o) if gp is not None else None
                if gp is not None:
                    iod = iod_of(gp)
                    agg["expr"].append(float(np.abs(expression(op, iod) - expression(gp, iod)).mean())
                                       if op is not None else np.nan)
        expr = np.array(agg["expr"])
        row = {"name": name, "family": family, "dit_calls_per_latent": calls / latents,
               "seconds_per_frame": secs / frames, "psnr": float(np.mean(agg["psnr"])),
               "ssim": float(np.mean(agg["ssim"])), "expression_error": float(np.nanmean(expr)),
               "face_missed": int(np.isnan(expr).sum()),
               "psnr_vs_full": float(np.mean(np.minimum(agg["psnr_vs_full"], 60.0))),
               "latent_err_vs_full": float(np.mean(agg["latent_err_vs_full"]))}
        rows.append(row)
        print(f"{name:22s} calls/latent {row['dit_calls_per_latent']:6.2f}  s/frame {row['seconds_per_frame']:.3f}  "
              f"psnr {row['psnr']:.2f}  expr {row['expression_error']:.4f}  vs full: psnr {row['psnr_vs_full']:.2f} "
              f"latent err {row['latent_err_vs_full']:.3f}", flush=True)

    ladder = measure_ladder(models, clips, reader, base, args) if args.ladder else []
    by = {r["name"]: r for r in rows}
    verdict = []
    for k in (2, 3, 5):
        a, t, f = by[f"alpa K={k}"], by[f"taylorseer K={k}"], by[f"fewer-steps K={k}"]
        best = min((a, t, f), key=lambda r: r["latent_err_vs_full"])
        verdict.append({"K": k, "full_passes_per_latent": {r["name"]: round(r["dit_calls_per_latent"], 2)
                                                           for r in (a, t, f)},
                        "closest_to_full": best["name"],
                        "latent_err_vs_full": {r["name"]: round(r["latent_err_vs_full"], 4) for r in (a, t, f)},
                        "psnr_vs_gt": {r["name"]: round(r["psnr"], 2) for r in (a, t, f)},
                        "expression_error": {r["name"]: round(r["expression_error"], 4) for r in (a, t, f)}})
    payload = {"rows": rows, "equal_passes": verdict, "ladder": ladder,
               "not_measured": ["FP8 (GPU only)", "guidance economy (other work)"],
               "config": {"weights": args.weights, "videos": args.videos, "frames_per_video": args.frames,
                          "steps": args.steps, "emo_cfg": args.emo_cfg, "reference": "offline WSWS W3 O2, full compute",
                          "threads": args.threads}}
    path = write_result(args.name, payload)
    for v in verdict:
        print(f"K={v['K']}: closest to full compute: {v['closest_to_full']}  {v['latent_err_vs_full']}")
    print(f"-> {path}")
    plot(rows, RESULTS / f"{args.name}.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "4-step": "tab:red", "alpa": "tab:blue", "taylorseer": "tab:green",
              "fewer-steps": "tab:orange", "teacache": "tab:purple", "rolling": "tab:brown", "lookahead": "tab:pink"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    for ax, key, label in ((axes[0], "latent_err_vs_full", "relative latent error vs full compute"),
                           (axes[1], "psnr", "PSNR vs ground truth (dB)"),
                           (axes[2], "expression_error", "expression error vs ground truth")):
        for fam, c in colors.items():
            pts = [r for r in rows if r["family"] == fam]
            if not pts:
                continue
            ax.plot([r["dit_calls_per_latent"] for r in pts], [r[key] for r in pts], "o-" if fam in
                    ("alpa", "taylorseer", "fewer-steps", "teacache") else "s", color=c, label=fam)
            for r in pts:
                if fam in ("rolling", "lookahead", "4-step"):
                    ax.annotate(r["name"].replace("rolling ", ""), (r["dit_calls_per_latent"], r[key]), fontsize=7)
        ax.set_xlabel("DiT calls per latent frame")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("mini FlashPortrait: speed vs quality (CPU, held-out frames)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
