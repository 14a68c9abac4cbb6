"""Multi-GPU DiT step: sequence parallelism (kernels/parallel.py) over N = 1, 2, 4, 8 ranks of one torchrun launch.

    torchrun --standalone --nproc_per_node 8 bench/dit_parallel.py                 # 14b, 512x512, 6 and 21 frames
    torchrun --standalone --nproc_per_node 8 bench/dit_parallel.py --preset 1.3b   # quick check
    python bench/dit_parallel.py --launch 4 --preset 14b                           # starts torchrun itself
    torchrun --standalone --nproc_per_node 2 bench/dit_parallel.py --device cpu --preset tiny --size 128 \\
        --frames 3 --iters 2 --out dit_parallel_cpu_smoke                          # CPU smoke test (gloo)

One launch of W processes measures every N in {1, 2, 4, ...} up to W (and W itself): the first N ranks form the
sub-world, the others wait. Every rank builds the same random bf16 model on its own GPU (fp32 on CPU). A denoising
step is `--passes` DiT passes (2: FlashPortrait's emotion CFG, the no-emotion pass being ip_scale 0), laid out as
    seq    one pass after the other, each over all N sequence ranks          (cfg 1 x seq N)
    cfg    the passes side by side on CFG groups of N / passes ranks        (cfg 2 x seq N/2)
    batch  the pair as one batch of 2 (ip_scale [1, 0]) over all N ranks    (cfg 1 x seq N, B = 2)
The per-window context K/V are computed once (set_session), as in the live path. Before timing, each configuration's
first-pass output is compared with the one-rank `seq` output.

Reported per (frames, N, layout): ms per step, all passes (max over ranks of the mean of --iters steps after
--warmup), speedup and scaling efficiency against N = 1 `seq`, and the live renderer's projected fps: a window of W
latent frames that emits S new latents (4S video frames) costs steps x step time, so fps = 4S / (steps x step time).
Eager by default (no CUDA graph; --compile compiles the blocks): the comparison across N is like for like.
Writes bench/results/<out>.json and <out>.png (speedup against N).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info, write_result  # noqa: E402
from engine.config import DiTConfig, get_preset  # noqa: E402
from engine.weights import random_dit  # noqa: E402
from kernels import attention as attn  # noqa: E402
from engine.distributed import init_distributed  # noqa: E402
from kernels.parallel import SequenceParallelDiT, make_groups  # noqa: E402


def torchrun_command(gpus: int, argv: list[str]) -> list[str]:
    """The command that runs this script on `gpus` local processes (what `bench/dit_step.py --gpus N` runs)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", __file__,
            *argv]


def launch(gpus: int, argv: list[str]) -> int:
    """Run this script under torchrun with `gpus` processes; returns its exit code."""
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    return subprocess.run(torchrun_command(gpus, argv), env=env).returncode


def random_inputs(cfg: DiTConfig, frames: int, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One window at size x size pixels: latent (1, 16, frames, size/8, size/8), same on every rank."""
    g = torch.Generator(device=device).manual_seed(1)
    h = w = size // 8

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device)

    return dict(x=rnd(1, cfg.out_dim, frames, h, w), y=rnd(1, cfg.in_dim - cfg.out_dim, frames, h, w),
                t=torch.full((1,), 750.0, device=device), context=rnd(1, cfg.text_len, cfg.text_dim),
                clip_fea=rnd(1, cfg.clip_tokens, cfg.clip_dim),
                emo=rnd(1, frames, cfg.emo_tokens_per_frame, cfg.emo_dim).to(dtype))


def all_to_all_bytes(cfg: DiTConfig, tokens: int, seq_ranks: int, dtype: torch.dtype) -> float:
    """Bytes one rank sends per DiT pass in the Ulysses all-to-alls (q, k, v out; attention back), every block."""
    if seq_ranks == 1:
        return 0.0
    local = -(-tokens // seq_ranks)
    heads = -(-cfg.num_heads // seq_ranks) * seq_ranks
    per_block = 4 * local * heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return float(cfg.num_layers * per_block * (seq_ranks - 1) / seq_ranks)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sizes_up_to(world: int, wanted: list[int] | None) -> list[int]:
    # N = 1 is always measured: it is the baseline of the speedup and of the parity check
    sizes = sorted({1, *wanted}) if wanted else sorted({n for n in (1, 2, 4, 8, 16, 32) if n <= world} | {world})
    bad = [n for n in sizes if n > world]
    if bad:
        raise SystemExit(f"--gpus-list asks for {bad} ranks but only {world} were launched: raise --nproc_per_node.")
    return sizes


def layouts(n: int, passes: int) -> list[tuple[str, int]]:
    """(layout, CFG groups) to try on n ranks for `passes` guidance passes per step:
    seq    the passes one after the other, each on all n ranks
    cfg    one CFG group of n / passes ranks per pass, side by side
    batch  the guidance pair as one batch of 2 (per-sample ip_scale [1, 0]) on all n ranks"""
    out = [("seq", 1)]
    if passes > 1 and n > 1 and n % passes == 0:
        out.append(("cfg", passes))
    if passes == 2:
        out.append(("batch", 1))
    return out


def batch_pair(inputs: dict) -> dict:
    """The two guidance passes as one batch: every input doubled, ip_scale 1 for sample 0 and 0 for sample 1."""
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return doubled | {"ip_scale": torch.tensor([1.0, 0.0], device=inputs["x"].device)}


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Speedup against N per (frames, layout), with the ideal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = sorted({r["gpus"] for r in rows})
    ax.plot(ns, ns, "k--", lw=1, label="ideal")
    for key in sorted({(r["frames"], r["layout"]) for r in rows}):
        pts = sorted((r["gpus"], r["speedup"]) for r in rows if (r["frames"], r["layout"]) == key)
        ax.plot(*zip(*pts), "o-", label=f"{key[0]} latent frames, {key[1]}")
    ax.set_xlabel("ranks (GPUs)")
    ax.set_ylabel("speedup per denoising step vs 1 GPU")
    ax.set_xticks(ns)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="14b")
    p.add_argument("--size", type=int, default=512, help="video width = height in pixels")
    p.add_argument("--frames", default="6,21", help="latent frames per window, comma-separated")
    p.add_argument("--new-latents", default=None,
                   help="new latent frames S per window, one per --frames entry (default: frames // 2)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per window (4: the distilled fast path)")
    p.add_argument("--passes", type=int, default=2, help="DiT passes per step (2: emotion CFG, 1: guidance-free)")
    p.add_argument("--fps", type=float, default=25.0, help="target output fps (the real-time line)")
    p.add_argument("--gpus-list", default=None,
                   help="rank counts to measure besides 1, e.g. 2,8 (default: powers of 2)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (gloo)")
    p.add_argument("--dtype", default=None, help="bf16 on CUDA, fp32 on CPU by default")
    p.add_argument("--attention", default="auto", choices=attn.BACKENDS)
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (one function for all)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager for CPU smoke)")
    p.add_argument("--parity-tol", type=float, default=3e-2,
                   help="relative error allowed vs N=1 (bf16: matmuls over Lp instead of L rows tile and round "
                        "differently; the maths is the same, fp32 CPU runs agree to ~1e-7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--launch", type=int, default=None, metavar="N", help="start torchrun with N processes and exit")
    p.add_argument("--out", default="dit_parallel", help="result name under bench/results/")
    args = p.parse_args(argv)

    if args.launch:
        rest = list(argv if argv is not None else sys.argv[1:])
        drop = {i for i, a in enumerate(rest) if a.startswith("--launch=")}
        drop |= {j for i, a in enumerate(rest) if a == "--launch" for j in (i, i + 1)}
        return launch(args.launch, [a for i, a in enumerate(rest) if i not in drop])

    info = init_distributed(args.device)
    device, rank, world = info.device, info.rank, info.world_size
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    attn.set_backend(args.attention)
    if args.compile:  # one compiled entry per (frames, N) shape: keep them all rather than fall back to eager
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    frames_list = [int(f) for f in args.frames.split(",")]
    new_latents = ([int(s) for s in args.new_latents.split(",")] if args.new_latents
                   else [max(1, f // 2) for f in frames_list])
    if len(new_latents) != len(frames_list):
        raise SystemExit("--new-latents needs one value per --frames entry.")
    sizes = sizes_up_to(world, [int(n) for n in args.gpus_list.split(",")] if args.gpus_list else None)
    cfg = get_preset(args.preset).dit
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} ranks on {env_info()['device']}, torch {torch.__version__}, {args.preset} {dtype}, "
        f"attention {args.attention}, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)

    t0 = time.perf_counter()
    model = random_dit(cfg, device, dtype)
    say(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    branches = [{"ip_scale": 1.0}, {"ip_scale": 0.0}][:args.passes] + \
        [{"ip_scale": 1.0}] * max(0, args.passes - 2)

    # Every rank creates every group, in the same order (torch.distributed builds groups collectively).
    plans = []
    for n in sizes:
        sub = dist.new_group(list(range(n)))
        for layout, g in layouts(n, args.passes):
            plans.append((n, layout, g, sub, make_groups(cfg_size=g, ranks=range(n))))

    rows = []
    single: dict[int, torch.Tensor] = {}  # frames -> one-rank output of the first pass, for the parity check
    with torch.inference_mode():
        for frames, s_new in zip(frames_list, new_latents):
            inputs = random_inputs(cfg, frames, args.size, device, dtype)
            tokens = frames * (args.size // 16) ** 2
            for n, layout, g, sub, groups in plans:
                if rank < n:
                    dit = SequenceParallelDiT(model, groups)
                    if args.compile:
                        dit.compile_blocks(backend=args.compile_backend)
                    call = batch_pair(inputs) if layout == "batch" else inputs
                    dit.set_session(call["context"], call["clip_fea"])  # context K/V once, as the live path does
                    call = call | {"context": None, "clip_fea": None}

                    def step():
                        if layout == "batch":
                            return dit(**call)  # (2, C, F, H, W): sample 0 is the first pass
                        return dit.forward_branches(branches, **call)[:, 0]  # (passes, C, F, H, W)

                    out = step()[0]
                    if n == 1 and layout == "seq":
                        single[frames] = out
                    ref = single.get(frames)
                    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item() if ref is not None \
                        else float("nan")
                    for _ in range(args.warmup):
                        step()
                    sync(device)
                    dist.barrier(group=sub)
                    t = time.perf_counter()
                    for _ in range(args.iters):
                        step()
                    sync(device)
                    ms = torch.tensor([(time.perf_counter() - t) * 1e3 / args.iters], dtype=torch.float64,
                                      device=device)
                    dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=sub)
                    if rank == 0:
                        P = n // g
                        rows.append(dict(frames=frames, tokens=tokens, new_latents=s_new, gpus=n, layout=layout,
                                         cfg_groups=g, seq_ranks=P, ms_per_step=ms.item(),
                                         ms_per_pass=ms.item() / args.passes, rel_error_vs_1=rel,
                                         finite=bool(torch.isfinite(out).all()),
                                         all_to_all_mb_per_pass=all_to_all_bytes(cfg, tokens, P, dtype) / 2**20))
                        say(f"{frames:>3}f N={n} {layout:<5} (cfg {g} x seq {P}): {ms.item():9.1f} ms/step  "
                            f"rel err vs N=1 {rel:.2e}", flush=True)
                    del dit
                dist.barrier()
            del inputs

    if rank == 0:
        base = {r["frames"]: r["ms_per_step"] for r in rows if r["gpus"] == 1 and r["layout"] == "seq"}
        for r in rows:
            r["speedup"] = base[r["frames"]] / r["ms_per_step"]
            r["efficiency"] = r["speedup"] / r["gpus"]
            window_s = args.steps * r["ms_per_step"] / 1e3
            r["projected_fps"] = 4 * r["new_latents"] / window_s
            r["realtime"] = r["projected_fps"] >= args.fps
            r["parity_ok"] = r["finite"] and r["rel_error_vs_1"] <= args.parity_tol
        print(f"\n{args.preset} {args.size}x{args.size}, {args.steps} steps x {args.passes} passes per window, "
              f"target {args.fps:g} fps")
        print("frames tokens  S  N  layout cfg x seq   ms/step  ms/pass  speedup   eff   fps  real-time  parity")
        for r in rows:
            print(f"{r['frames']:>6} {r['tokens']:>6} {r['new_latents']:>2} {r['gpus']:>2}  {r['layout']:<6} "
                  f"{r['cfg_groups']:>3} x {r['seq_ranks']:<3} {r['ms_per_step']:9.1f} {r['ms_per_pass']:8.1f} "
                  f"{r['speedup']:8.2f} {r['efficiency']:5.2f} {r['projected_fps']:5.1f} {'yes' if r['realtime'] else 'no':>9}  "
                  f"{'ok' if r['parity_ok'] else 'FAIL'} ({r['rel_error_vs_1']:.1e})")
        config = {k: v for k, v in vars(args).items() if k != "launch"}
        mode = "compiled blocks" if args.compile else "eager"
        payload = {"config": config | {"world_size": world, "dtype": str(dtype), "backend": dist.get_backend(),
                                       "mode": mode, "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")},
                   "model": {"preset": args.preset, "params": cfg.num_params()}, "results": rows}
        path = write_result(args.out, payload)
        plot(rows, f"{args.preset} {args.size}x{args.size} {mode}, {env_info()['device']}", path.with_suffix(".png"))
        bad = [r for r in rows if not r["parity_ok"]]
        print(f"wrote {path}; parity {'FAILED for ' + str(len(bad)) + ' rows' if bad else 'ok'}")
    failed = torch.tensor([0 if rank != 0 else int(any(not r["parity_ok"] for r in rows))], device=device)
    dist.broadcast(failed, src=0)
    dist.destroy_process_group()
    return int(failed.item())


if __name__ == "__main__":
    sys.exit(main())
