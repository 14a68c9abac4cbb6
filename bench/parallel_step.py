"""The renderer's multi-GPU DiT step (engine/distributed.ParallelStep) against its one-GPU step (CompiledStep).

    python bench/parallel_step.py --gpus 2 --preset 1.3b --frames 3            # live window, 512x512
    python bench/parallel_step.py --gpus 4 --preset 14b --frames 6
    python bench/parallel_step.py --gpus 2 --device cpu --preset tiny --size 128 --iters 2 --out parallel_step_cpu_smoke

Exactly what `flashlive serve/render --gpus N` runs: this process is rank 0 and starts N - 1 followers
(engine.distributed.start_followers + follower), the followers receive the DiT's config and weights from rank 0, and
one call is the guidance pair (batch 2, ip_scale [1, 0]) with the session's context K/V and y set once. Rank 0
first times the one-GPU CompiledStep (compiled + CUDA graph on CUDA, as the renderer builds it; --no-compile: eager)
on the same seeded random weights, then ParallelStep, and checks that both give the same flow (bf16 tolerance).
Prints a table and writes bench/results/<out>.json: ms per DiT call (the pair) for 1 and N GPUs, speedup, CFG
groups x sequence ranks, relative error, and the live renderer's projected fps for a window that emits --stride
latent frames per --steps steps (fps = 4 * stride / (steps * call time)).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from engine.config import RuntimeConfig, get_preset, replace  # noqa: E402
from engine.weights import random_dit  # noqa: E402
from engine import distributed  # noqa: E402
from kernels.graphs import CompiledStep, StepShape  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, args, warmup: int, iters: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Mean ms per call after warm-up (compile, capture), and the output of the last call (a copy)."""
    for _ in range(warmup):
        step(*args)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = step(*args)
    _sync(device)
    return 1e3 * (time.perf_counter() - t0) / iters, out.float().clone()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="ranks (GPUs of this host; processes with --device cpu)")
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--size", type=int, default=512, help="video width = height in pixels")
    p.add_argument("--frames", type=int, default=3, help="latent frames per window")
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo smoke test)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager steps, no CUDA graph")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=4, help="sampler steps per window (projected fps)")
    p.add_argument("--stride", type=int, default=1, help="latent frames a window emits (projected fps)")
    p.add_argument("--tol", type=float, default=3e-2, help="max relative error of N GPUs against 1 (bf16)")
    p.add_argument("--out", default=None, help="result name (default parallel_step_<preset>_<gpus>gpu)")
    args = p.parse_args(argv)
    if args.gpus < 2:
        raise SystemExit("--gpus must be at least 2 (the one-GPU step is always measured as the baseline).")

    info, children = distributed.start_followers(distributed.follower, args.gpus, device=args.device)
    try:
        return run(args, info)
    finally:
        distributed.shutdown()
        children.join()
        torch.distributed.destroy_process_group()


def run(args, info) -> int:
    preset = get_preset(args.preset)
    cfg = preset.dit
    device = info.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runtime = replace(RuntimeConfig(), device=str(device), compile=args.compile, cuda_graphs=args.compile)
    model = random_dit(cfg, device, dtype, seed=0)
    shape = StepShape.from_video(args.size, args.size, args.frames, batch=2)
    B, F, H, W = shape.batch, shape.frames, shape.height, shape.width
    g = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        context = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype, generator=g)
        clip_fea = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, device=device, dtype=dtype, generator=g)
        ctx_img, ctx_txt = model.embed_context(context, clip_fea)
        kv = model.context_kv(ctx_img.expand(B, -1, -1).contiguous(), ctx_txt.expand(B, -1, -1).contiguous())
        y = torch.randn(1, 20, F, H, W, device=device, generator=g).expand(B, -1, -1, -1, -1).contiguous()
        x = torch.randn(1, 16, F, H, W, device=device, generator=g).expand(B, -1, -1, -1, -1)
        emo = torch.randn(1, F, cfg.emo_tokens_per_frame, cfg.emo_dim, device=device, dtype=dtype,
                          generator=g).expand(B, -1, -1, -1)
    call = (x, torch.full((B,), 750.0, device=device), emo, torch.tensor([1.0, 0.0], device=device))

    one = CompiledStep(model, shape, runtime)  # prepares the model as ParallelStep does (same keys): reused below
    one.set_session(None, None, y, kv=kv)
    t_one = time.perf_counter()
    ms_one, out_one = _time(one, call, args.warmup, args.iters, device)
    build_one = time.perf_counter() - t_one
    del one
    if device.type == "cuda":
        torch.cuda.empty_cache()

    t_par = time.perf_counter()
    step = distributed.make_step(model, shape, runtime)
    step.set_session(None, None, y, kv=kv)
    ms_par, out_par = _time(step, call, args.warmup, args.iters, device)
    build_par = time.perf_counter() - t_par
    rel = ((out_par - out_one).norm() / out_one.norm()).item()
    seq = args.gpus // step.cfg_size
    fps = lambda ms: 4 * args.stride / (args.steps * ms / 1e3)  # noqa: E731
    row = dict(preset=args.preset, size=args.size, frames=args.frames, tokens=shape.tokens(cfg.patch_size),
               gpus=args.gpus, cfg_groups=step.cfg_size, seq_ranks=seq, compile=args.compile,
               ms_per_call_1gpu=ms_one, ms_per_call=ms_par, speedup=ms_one / ms_par,
               efficiency=ms_one / ms_par / args.gpus, rel_error_vs_1gpu=rel, parity_ok=rel <= args.tol,
               projected_fps_1gpu=fps(ms_one), projected_fps=fps(ms_par), warm_s_1gpu=build_one,
               warm_s=build_par, steps=args.steps, stride=args.stride)
    print(f"{'preset':>6} {'frames':>6} {'tokens':>6} {'N':>2} {'cfg x seq':>9} {'1 GPU ms':>9} {'N GPU ms':>9} "
          f"{'speedup':>7} {'rel err':>8} {'fps 1':>6} {'fps N':>6}")
    print(f"{args.preset:>6} {args.frames:>6} {row['tokens']:>6} {args.gpus:>2} {step.cfg_size:>4} x {seq:<2} "
          f"{ms_one:>9.1f} {ms_par:>9.1f} {row['speedup']:>7.2f} {rel:>8.1e} {row['projected_fps_1gpu']:>6.1f} "
          f"{row['projected_fps']:>6.1f}")
    out = args.out or f"parallel_step_{args.preset}_{args.gpus}gpu"
    path = write_result(out, {"config": {**vars(args), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
                                         "backend": torch.distributed.get_backend()}, "result": row})
    print(f"wrote {path}")
    return 0 if row["parity_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
