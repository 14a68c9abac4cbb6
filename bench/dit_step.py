"""Speed of one DiT step (one forward) at fixed window shapes: eager vs compiled vs compiled + CUDA graphs (+ FP8).

    python bench/dit_step.py --presets 1.3b        # 512x512, 3/6/21 latent frames, all modes (one preset per run
    python bench/dit_step.py --presets 14b         #   keeps each run under ~10 min)
    python bench/dit_step.py --quick               # the same grid with fewer iterations and fewer 14b configs
    python bench/dit_step.py --presets 1.3b --frames 6 --modes eager,graphs
    python bench/dit_step.py --presets tiny --size 128 --frames 3   # CPU smoke test
    python bench/dit_step.py --live14              # the live 14b step as the engine runs it: bf16 / FP8 pair, FP8
                                                   #   expression branch alone, guidance economy (~4 min on an H200)

Self-checking on CUDA before timing anything:
  1. fused Triton kernels vs the torch reference (bf16, several shapes) and their speed against it,
  2. every SDPA backend (and FA3 if installed) vs the math backend on the step's three attention shapes (self,
     image cross, NFEB per frame); `--attention best` (default) runs the steps on the fastest one that matched,
  3. per config: the graph replay equals the compiled step (bf16 tolerance; normally bit for bit) and the eager
     step (whole-step relative error < 4%), one call allocates nothing (torch.cuda.memory_stats counters) and makes
     no host sync (sync debug mode "error"); FP8 vs bf16 relative error of the whole step,
  4. a CUDA-kernel profile of the compiled step (GEMM / attention / fused elementwise / other ms per step).
Then times each mode with CUDA events (median of --iters calls after --warmup) and reports TFLOP/s against the
8192^3 bf16 matmul peak measured in the same run. Weights are random, built directly on the device in bf16.
Writes bench/results/<out>.json after every configuration (a run cut short keeps what it measured) and <out>.png.
Exit status 1 when any check failed.

The compiled step uses the FFN GELU epilogue GEMM where check 1 finds it correct and faster than GEMM + GELU,
Inductor with kernels.graphs.INDUCTOR_OPTIONS (--no-tune: Inductor's defaults) and a regional compile (--scope step:
the whole step as one graph); the "step path" line and the JSON config say which ran.

Modes: eager (fused Triton kernels, no compile), compiled (regional torch.compile, no graph), graphs (compiled +
whole-step CUDA graph), fp8 (graphs with e4m3 block linears), eager_graphs (no compile, whole-step graph).
FLOPs count every matmul of the step: self/cross/NFEB projections, FFN, the three attentions, patch embedding and
head (context K/V are per session, so excluded, as in the step that runs).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, env_info, write_result  # noqa: E402
from engine.config import DiTConfig, RuntimeConfig, get_preset  # noqa: E402
from engine.weights import random_dit  # noqa: E402
from kernels import attention as attn  # noqa: E402
from kernels import fused  # noqa: E402
from kernels.fp8 import quantize_linears, relative_error  # noqa: E402
from kernels.graphs import INDUCTOR_OPTIONS, CompiledStep, StepShape  # noqa: E402

MODES = ("eager", "compiled", "graphs", "fp8", "eager_graphs")
BF16_TOL = 1.6e-2  # two bf16 steps, relative
# Whole-step relative error allowed between two bf16 implementations (eager vs compiled): on CPU, the 30-layer
# 1.3b step with these random weights is 1.5% from its fp32 result, so two bf16 orderings stay well within 4%.
STEP_REL_TOL = 0.04


# --- arithmetic ----------------------------------------------------------------------------------------------------
def step_flops(cfg: DiTConfig, shape: StepShape) -> dict[str, float]:
    """Matmul FLOPs of one step, by component (2 per multiply-add)."""
    B, D, Fh = shape.batch, cfg.dim, cfg.ffn_dim
    L = shape.tokens(cfg.patch_size)
    Lc = cfg.text_len + cfg.clip_tokens
    T = cfg.emo_tokens_per_frame
    n, patch = cfg.num_layers, math.prod(cfg.patch_size)
    parts = {
        "qkvo_linears": n * 6 * 2 * L * D * D,  # self q, k, v, o + cross q, o
        "ffn": n * 2 * 2 * L * D * Fh,
        "self_attention": n * 4 * L * L * D,
        "cross_attention": n * 4 * L * Lc * D,
        "nfeb": n * (4 * L * T * D + 2 * 2 * shape.frames * T * cfg.emo_dim * D),
        "embed_head": 2 * L * cfg.in_dim * patch * D + 2 * L * D * cfg.out_dim * patch,
    }
    return {k: float(B * v) for k, v in parts.items()}


# --- timing --------------------------------------------------------------------------------------------------------
def bench_ms(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of fn() (CUDA events around each call on CUDA, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak(device: torch.device, cuda: bool) -> dict:
    """TFLOP/s of one large square matmul (8192^3 bf16 on CUDA; 1024^3 fp32 on CPU)."""
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: torch.matmul(a, b), 5 if cuda else 1, 30 if cuda else 3, cuda)
    return {"n": n, "dtype": str(dtype), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


# --- model ---------------------------------------------------------------------------------------------------------
def random_inputs(cfg: DiTConfig, shape: StepShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    B, F, H, W = shape.batch, shape.frames, shape.height, shape.width

    def rnd(*s, dt=torch.float32):
        return torch.randn(*s, generator=g, device=device).to(dt)

    return dict(x=rnd(B, cfg.out_dim, F, H, W), y=rnd(B, cfg.in_dim - cfg.out_dim, F, H, W),
                t=torch.full((B,), 750.0, device=device),
                context=rnd(B, cfg.text_len, cfg.text_dim), clip_fea=rnd(B, cfg.clip_tokens, cfg.clip_dim),
                emo=rnd(B, F, cfg.emo_tokens_per_frame, cfg.emo_dim, dt=dtype))


# --- checks ----------------------------------------------------------------------------------------------------
def bf16_close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """Within two bf16 steps of b, relative to each entry and to b's largest entry (RoPE cancellation and
    residual sums make some entries small while their rounding error is set by the large ones)."""
    diff = (a.float() - b.float()).abs()
    ref = b.float().abs()
    ok = bool((diff <= BF16_TOL * ref + BF16_TOL * ref.max()).all())
    return ok, diff.max().item()


@torch.no_grad()
def check_fused_kernels(device: torch.device, dtype: torch.dtype, cuda: bool) -> list[dict]:
    """Fused kernels (Triton norms, FFN GELU epilogue) vs the torch reference, and their eager speed at the 1.3b
    6-frame shape."""
    if not cuda:
        return [{"kernel": "all", "skipped": "needs CUDA (the CPU interpreter path of the Triton kernels is in tests)"}]
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    triton_shapes = [(1, 6144, 12, 128), (2, 1024, 40, 128), (1, 777, 12, 128), (3, 100, 4, 16)]
    if not fused.triton_available():
        rows.append({"kernel": "triton", "skipped": "triton is not installed: norms run on the torch path"})
        triton_shapes = []
    for B, L, H, hd in triton_shapes:
        D = H * hd
        x = (torch.randn(B, L, D, generator=g, device=device) * 3).to(dtype)
        w = (torch.rand(D, generator=g, device=device) + 0.5).to(dtype)
        ang = torch.rand(L, hd // 2, generator=g, device=device) * 6
        cos, sin = ang.cos(), ang.sin()
        e = torch.randn(B, 6, D, generator=g, device=device)
        cases = {
            "rms_norm_rope": (lambda: fused.rms_norm_rope_triton(x, w, cos, sin, H, 1e-6),
                              lambda: fused.rms_norm_rope_ref(x, w, cos, sin, H, 1e-6)),
            "rms_norm": (lambda: fused.rms_norm_rope_triton(x, w, None, None, 1, 1e-6),
                         lambda: fused.rms_norm_ref(x, w, 1e-6)),
            "layer_norm_modulate": (lambda: fused.layer_norm_modulate_triton(x, e[:, 0:1], e[:, 1:2], 1e-6),
                                    lambda: fused.layer_norm_modulate_ref(x, e[:, 0:1], e[:, 1:2], 1e-6)),
        }
        for name, (tri, ref) in cases.items():
            ok, max_diff = bf16_close(tri(), ref())
            row = {"kernel": name, "shape": [B, L, H, hd], "ok": ok, "max_abs_diff": max_diff}
            if (B, L) == (1, 6144):
                row["triton_ms"] = bench_ms(tri, 3, 20, cuda)
                row["torch_ms"] = bench_ms(ref, 3, 20, cuda)
            rows.append(row)
    # FFN: Linear + bias + GELU(tanh) as one GEMM with a GELU epilogue vs the plain Sequential (1.3b shape)
    D, Fh = 1536, 8960
    plain = nn.Sequential(nn.Linear(D, Fh), nn.GELU(approximate="tanh"), nn.Linear(Fh, D)).to(device, dtype)
    fused_ffn = fused.GeluFFN(*plain)
    x = torch.randn(1, 6144, D, generator=g, device=device).to(dtype)
    ok, max_diff = bf16_close(fused_ffn(x), plain(x))
    rows.append({"kernel": "ffn_gelu_epilogue", "shape": [1, 6144, D, Fh], "ok": ok, "max_abs_diff": max_diff,
                 "fused_ms": bench_ms(lambda: fused_ffn(x), 3, 20, cuda),
                 "torch_ms": bench_ms(lambda: plain(x), 3, 20, cuda)})
    return rows


@torch.no_grad()
def check_attention(cfg: DiTConfig, shape: StepShape, device: torch.device, dtype: torch.dtype, cuda: bool,
                    warmup: int, iters: int) -> list[dict]:
    """Every attention backend on the step's three attention shapes (self, image cross, NFEB per frame): parity with
    the math backend on all three, TFLOP/s on the self-attention one, ms of the other two (ms_cross_img, ms_nfeb)."""
    L = shape.tokens(cfg.patch_size)
    B, H, hd = shape.batch, cfg.num_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(2)

    def rnd(b, n):
        return torch.randn(b, n, H, hd, generator=g, device=device).to(dtype)

    per_frame = L // shape.frames
    cases = {"self": (rnd(B, L), rnd(B, L), rnd(B, L)),
             "cross_img": (rnd(B, L), rnd(B, cfg.clip_tokens), rnd(B, cfg.clip_tokens)),
             "nfeb": (rnd(B * shape.frames, per_frame), rnd(B * shape.frames, cfg.emo_tokens_per_frame),
                      rnd(B * shape.frames, cfg.emo_tokens_per_frame))}
    refs = {}
    with attn.backend("math"):
        for k, (q, kk, v) in cases.items():
            refs[k] = attn.attention(q.float(), kk.float(), v.float())
    flops = 4 * B * L * L * cfg.dim
    rows = []
    names = ["sdpa", "flash", "cudnn", "efficient"] + (["fa3"] if attn.fa3_available() else [])
    for name in names if cuda else ["sdpa"]:
        row = {"backend": name, "tokens": L}
        try:
            with attn.backend(name):
                diffs = {k: bf16_close(attn.attention(*cases[k]), refs[k]) for k in cases}
                q, k, v = cases["self"]
                row["ms"] = bench_ms(lambda: attn.attention(q, k, v), warmup, iters, cuda)
                # the short-KV calls (3 per block with the text one) are memory-bound: ms against reading q once
                # and writing the output once says how far each backend is from the bandwidth floor
                for k_ in ("cross_img", "nfeb"):
                    row[f"ms_{k_}"] = bench_ms(lambda c=cases[k_]: attn.attention(*c), warmup, iters, cuda)
            row.update(ok=all(ok for ok, _ in diffs.values()), max_abs_diff={k: d for k, (_, d) in diffs.items()},
                       tflops=flops / row["ms"] / 1e9)
        except Exception as e:  # a backend that does not support this GPU / shape ("No available kernel")
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        rows.append(row)
    return rows


def best_backend(rows: list[dict]) -> str:
    """Fastest backend that matched the math backend on every shape."""
    good = [r for r in rows if r.get("ok")]
    return min(good, key=lambda r: r["ms"])["backend"] if good else "sdpa"


@torch.no_grad()
def profile_kernels(fn, steps: int = 3) -> dict:
    """CUDA kernel time per step by category (GEMM, attention, Inductor/Triton fused, other) and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    categories: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        name = evt.key.lower()
        if any(s in name for s in ("flash", "fmha", "cudnn", "attention", "sdpa", "fwd_kernel")):
            cat = "attention"
        elif any(s in name for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "scaled_mm")):
            cat = "gemm"
        elif "triton" in name or name.startswith(("_rms_norm", "_layer_norm")):
            cat = "fused_elementwise"
        elif "memcpy" in name or "memset" in name:
            cat = "memcpy"
        else:
            cat = "other"
        categories[cat] = categories.get(cat, 0.0) + us / 1e3 / steps
        kernels.append((us / 1e3 / steps, evt.key[:120], cat))
    kernels.sort(reverse=True)
    return {"ms_per_step_by_category": categories,
            "top_kernels": [{"ms": ms, "name": n, "category": c} for ms, n, c in kernels[:12]]}


def alloc_count(device) -> int:
    return torch.cuda.memory_stats(device)["allocation.all.allocated"]


@torch.no_grad()
def check_graph_step(step: CompiledStep, inputs: dict, ref_eager: torch.Tensor, ref_compiled: torch.Tensor) -> dict:
    """Graph replay vs compiled (exact) and eager (bf16 tolerance); allocations and host syncs of one call."""
    out = step(inputs["x"], inputs["t"], inputs["emo"], 1.0).clone()
    res = {"finite": bool(torch.isfinite(out).all()),
           "graph_matches_compiled": bf16_close(out, ref_compiled)[0],
           "graph_vs_compiled_max_abs": (out - ref_compiled).abs().max().item(),
           "graph_vs_eager_rel": relative_error(out, ref_eager)}
    res["graph_matches_eager"] = res["graph_vs_eager_rel"] < STEP_REL_TOL
    torch.cuda.synchronize()
    before = alloc_count(step.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(inputs["x"], inputs["t"], inputs["emo"], 1.0)
        res["host_sync_free"] = True
    except RuntimeError:
        res["host_sync_free"] = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    res["allocations_per_call"] = alloc_count(step.device) - before
    return res


# --- one preset ------------------------------------------------------------------------------------------------
def free_memory(cuda: bool):
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


class Report:
    """Everything the run found, written to bench/results after every configuration (a run cut short by a time
    limit keeps what it measured)."""

    def __init__(self, name: str, payload: dict):
        self.name, self.payload = name, payload
        self.results, self.checks, self.profiles = [], [], []
        payload.update(results=self.results, step_checks=self.checks, profiles=self.profiles)

    def save(self) -> Path:
        path = write_result(self.name, self.payload)
        plot(self.results, self.payload["peak_tflops"], RESULTS / f"{self.name}.png")
        return path


def run_preset(preset: str, frames_list: list[int], modes: list[str], args, device, dtype, peak: float, cuda: bool,
               report: Report):
    cfg = get_preset(preset).dit
    results, checks, profiles = report.results, report.checks, report.profiles
    try:
        model = random_dit(cfg, device, dtype)
    except torch.OutOfMemoryError:
        print(f"{preset}: out of memory building the model, skipped")
        results.append({"preset": preset, "skipped": "out of memory building the model"})
        return
    eager_out = {}

    def record(frames, shape, mode, ms, extra=None):
        flops = sum(step_flops(cfg, shape).values())
        row = {"preset": preset, "frames": frames, "batch": shape.batch, "tokens": shape.tokens(cfg.patch_size),
               "mode": mode,
               "ms_per_step": ms, "tflops": flops / ms / 1e9, "fraction_of_peak": flops / ms / 1e9 / peak,
               **(extra or {})}
        results.append(row)
        print(f"{preset:>5} {frames:>3}f {mode:>13}: {ms:9.2f} ms  {row['tflops']:7.1f} TFLOP/s  "
              f"{100 * row['fraction_of_peak']:5.1f}% of peak", flush=True)

    def run_config(frames, fp8: bool):
        shape = StepShape.from_video(args.size, args.size, frames, batch=args.batch)
        inputs = random_inputs(cfg, shape, device, dtype)
        session = (inputs["context"], inputs["clip_fea"], inputs["y"])
        call = (inputs["x"], inputs["t"], inputs["emo"], 1.0)
        check = {"preset": preset, "frames": frames, "fp8": fp8}
        if not fp8 and ("eager" in modes or "graphs" in modes or "eager_graphs" in modes):
            rt = RuntimeConfig(device=str(device), compile=False, cuda_graphs=False, attention=args.attention,
                               fused_kernels=args.fused)
            eager = CompiledStep(model, shape, rt)
            eager.set_session(*session)
            eager_out[frames] = eager(*call).clone()
            if "eager" in modes:
                record(frames, shape, "eager", bench_ms(lambda: eager(*call), args.warmup, args.iters, cuda))
            del eager
        if not fp8 and "eager_graphs" in modes and cuda:
            rt = RuntimeConfig(device=str(device), compile=False, cuda_graphs=True, attention=args.attention,
                               fused_kernels=args.fused)
            step = CompiledStep(model, shape, rt)
            step.set_session(*session)
            step.capture()
            record(frames, shape, "eager_graphs", bench_ms(lambda: step(*call), args.warmup, args.iters, cuda))
            del step
        wanted = ({"fp8"} if fp8 else {"compiled", "graphs"}) & set(modes)
        if wanted and cuda:
            rt = RuntimeConfig(device=str(device), compile=True, cuda_graphs=True, attention=args.attention,
                               fused_kernels=args.fused)
            step = CompiledStep(model, shape, rt, compile_mode=args.compile_mode, scope=args.scope,
                                inductor_options=args.inductor_options)
            step.set_session(*session)
            step.write_inputs(*call)
            t0 = time.perf_counter()
            step._step()  # compiles (under no_grad, like every call)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            compiled_out = step.out.clone()
            if "compiled" in wanted:
                record(frames, shape, "compiled", bench_ms(step._step, args.warmup, args.iters, cuda),
                       {"compile_s": compile_s})
            if args.profile and not fp8:
                # the kernels of the compiled step are the kernels the graph replays
                try:
                    prof = profile_kernels(step._step)
                except Exception as e:  # a profiler problem must not cost the timings
                    prof = {"error": f"{type(e).__name__}: {e}"[:300], "ms_per_step_by_category": {}}
                profiles.append({"preset": preset, "frames": frames, **prof})
                print("      kernel ms by category: " +
                      ", ".join(f"{k} {v:.2f}" for k, v in prof["ms_per_step_by_category"].items()), flush=True)
            step.capture()
            check.update(check_graph_step(step, inputs, eager_out.get(frames, compiled_out), compiled_out))
            if fp8:  # compared with the bf16 eager step: this is the FP8 accuracy, not a pass/fail parity
                check["fp8_vs_bf16_rel"] = check.pop("graph_vs_eager_rel")
                check.pop("graph_matches_eager")
            mode = "fp8" if fp8 else "graphs"
            if mode in wanted:
                record(frames, shape, mode, bench_ms(lambda: step(*call), args.warmup, args.iters, cuda),
                       {"compile_s": compile_s})
            del step
        checks.append(check)
        print(f"      checks: {check}", flush=True)

    def guarded(frames, fp8):
        try:
            run_config(frames, fp8)
        except torch.OutOfMemoryError:
            print(f"{preset} {frames}f{' fp8' if fp8 else ''}: out of memory, skipped")
            results.append({"preset": preset, "frames": frames, "fp8": fp8, "skipped": "out of memory"})
        except Exception as e:  # one broken configuration must not cost the rest of a scarce GPU run
            traceback.print_exc()
            results.append({"preset": preset, "frames": frames, "fp8": fp8, "error": f"{type(e).__name__}: {e}"[:500]})
        free_memory(cuda)
        report.save()

    for frames in frames_list:
        guarded(frames, fp8=False)
    if "fp8" in modes and cuda and (args.fp8_presets is None or preset in args.fp8_presets.split(",")):
        quantize_linears(model)
        free_memory(cuda)
        for frames in (args.fp8_frames or frames_list):
            guarded(frames, fp8=True)
    model = None  # noqa: F841 (the closures above hold it; free the weights before the next preset)
    free_memory(cuda)


# --- the live step (--live14) ----------------------------------------------------------------------------------
def fp8_matmul_peak(device: torch.device, n: int = 8192) -> dict:
    """TFLOP/s of one n^3 e4m3 scaled matmul (bf16 out), per-tensor and rowwise scales (what Fp8Linear runs)."""
    from kernels.fp8 import E4M3

    a = torch.randn(n, n, device=device).to(E4M3)
    b = torch.randn(n, n, device=device).to(E4M3).t()  # column-major, as _scaled_mm wants its second operand
    out = {"n": n}
    for name, sa, sb in (("tensorwise", torch.ones((), device=device), torch.ones((), device=device)),
                         ("rowwise", torch.ones(n, 1, device=device), torch.ones(1, n, device=device))):
        try:
            ms = bench_ms(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), 5, 30,
                          True)
            out[name] = {"ms": ms, "tflops": 2 * n**3 / ms / 1e9}
        except (RuntimeError, NotImplementedError) as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    out["tflops"] = max((v["tflops"] for v in out.values() if isinstance(v, dict) and "tflops" in v), default=None)
    return out


@torch.no_grad()
def gemm_shapes(cfg: DiTConfig, tokens: int, device: torch.device) -> list[dict]:
    """The block's GEMMs at the live token count (batch 1 and 2): bf16 vs FP8 rowwise vs FP8 tensorwise scaled
    matmul, kernel only (no activation quantization), TFLOP/s each: where the FP8 step's time can come from."""
    from kernels.fp8 import E4M3

    D, Fh = cfg.dim, cfg.ffn_dim
    rows = []
    for name, K, N in (("qkvo", D, D), ("ffn_up", D, Fh), ("ffn_down", Fh, D), ("emo_kv", cfg.emo_dim, D)):
        for M in (tokens, 2 * tokens):
            a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            w = torch.randn(N, K, device=device, dtype=torch.bfloat16)
            a8, w8 = a.to(E4M3), w.to(E4M3)
            flops = 2 * M * K * N
            row = {"gemm": name, "M": M, "K": K, "N": N,
                   "bf16_tflops": flops / bench_ms(lambda: a @ w.t(), 3, 20, True) / 1e9}
            for mode, sa, sb in (("rowwise", torch.ones(M, 1, device=device), torch.ones(1, N, device=device)),
                                 ("tensorwise", torch.ones((), device=device), torch.ones((), device=device))):
                try:
                    ms = bench_ms(lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sb,
                                                           out_dtype=torch.bfloat16), 3, 20, True)
                    row[f"fp8_{mode}_tflops"] = flops / ms / 1e9
                except (RuntimeError, NotImplementedError) as e:
                    row[f"fp8_{mode}_error"] = f"{type(e).__name__}: {e}"[:160]
            rows.append(row)
            print("  gemm " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items()), flush=True)
    return rows


def call_checks(step, x, t, emo, ip_scale) -> dict:
    """Allocations and host syncs of one graph replay of a live step."""
    torch.cuda.synchronize()
    before = alloc_count(step.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x, t, emo, ip_scale)
        sync_free = True
    except RuntimeError:
        sync_free = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"allocations_per_call": alloc_count(step.device) - before, "host_sync_free": sync_free}


def run_live14(args) -> int:
    """The live step of --preset 14b as the engine runs it (engine/flashportrait.FlashPortraitEngine, random
    weights, 512x512, the live window of 3 latent frames): the guidance pair in bf16 (batch 2), in FP8 (batch 2),
    the expression branch alone in FP8 (batch 1), and the guidance economy's average per step; ms, TFLOP/s, fraction
    of the bf16 and FP8 matmul peaks measured here, relative error against bf16, and the economy's error against
    the pair at every pass (engine.guidance_error). Writes bench/results/dit_step_<preset>_live_<gpu>.json."""
    import numpy as np

    from bench.common import gpu_tag
    from engine.config import SamplerConfig, WindowConfig
    from engine.flashportrait import FlashPortraitEngine

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.presets.split(",")[0] if args.presets != "1.3b,14b" else "14b"
    cfg = get_preset(preset).dit
    frames = 3
    shape2 = StepShape.from_video(args.size, args.size, frames, batch=2)
    shape1 = StepShape.from_video(args.size, args.size, frames, batch=1)
    flops2, flops1 = sum(step_flops(cfg, shape2).values()), sum(step_flops(cfg, shape1).values())
    name = args.out or f"dit_step_{preset}_live_{gpu_tag(env_info()['device'])}"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device, cuda)
    peak8 = fp8_matmul_peak(device) if cuda and torch.cuda.get_device_capability() >= (8, 9) else {"tflops": None}
    print(f"{preset} live step, {args.size}x{args.size}, {frames} latent frames ({shape1.tokens(cfg.patch_size)} "
          f"tokens): bf16 peak {peak['tflops']:.0f} TFLOP/s, FP8 peak {peak8.get('tflops')} TFLOP/s", flush=True)
    gemms = gemm_shapes(cfg, shape1.tokens(cfg.patch_size), device) if peak8.get("tflops") else []
    ref_img = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    from engine.guidance import auto_refresh

    refresh = args.emo_refresh or max(2, auto_refresh(preset, 4.0))
    payload = {"preset": preset, "frames": frames, "size": args.size, "tokens": shape1.tokens(cfg.patch_size),
               "matmul_peak": peak, "fp8_matmul_peak": peak8, "flops_pair": flops2, "flops_single": flops1,
               "emo_refresh": refresh, "gemms": gemms, "rows": [], "economy": [], "checks": {}, "warm_up_s": {},
               "memory_gib": {},
               "config": vars(args)}
    rows = payload["rows"]

    def save():
        return write_result(name, payload)

    def row(mode, ms, flops, fp8, extra=None):
        tf = flops / ms / 1e9
        r = {"mode": mode, "ms": ms, "tflops": tf, "fraction_of_bf16_peak": tf / peak["tflops"],
             "fraction_of_fp8_peak": tf / peak8["tflops"] if fp8 and peak8.get("tflops") else None, **(extra or {})}
        rows.append(r)
        print(f"  {mode:<28} {ms:8.2f} ms {tf:7.0f} TFLOP/s  {100 * r['fraction_of_bf16_peak']:5.1f}% of bf16 peak"
              + (f", {100 * r['fraction_of_fp8_peak']:5.1f}% of FP8 peak" if r["fraction_of_fp8_peak"] else "")
              + (f"  {extra}" if extra else ""), flush=True)
        save()

    g = torch.Generator(device=device).manual_seed(7)
    x = torch.randn(shape2.batch, 16, frames, shape2.height, shape2.width, generator=g, device=device)
    emo = torch.randn(1, frames, cfg.emo_tokens_per_frame, cfg.emo_dim, generator=g, device=device)
    t = 750.0
    window = WindowConfig(frames, frames - 1)
    sampler = SamplerConfig(fast=True)

    def engine(fp8: bool, emo_refresh: int, scaling: str = "rowwise"):
        rt = RuntimeConfig(device=str(device), fp8=fp8, emo_refresh=emo_refresh, fp8_scaling=scaling)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        eng = FlashPortraitEngine(ref_img, None, args.size, args.size, preset=preset, runtime=rt, sampler=sampler,
                                  window=window, random_weights=True)
        eng.warm_up()
        key = f"{'fp8' if fp8 else 'bf16'}{'_tensorwise' if fp8 and scaling == 'tensorwise' else ''}" \
              f"_refresh{emo_refresh}"
        payload["warm_up_s"][key] = round(time.perf_counter() - t0, 1)
        if cuda:
            payload["memory_gib"][key] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"  engine {key}: warm (random init, conditioning, compile, capture) in "
              f"{payload['warm_up_s'][key]} s, peak {payload['memory_gib'].get(key)} GiB", flush=True)
        return eng

    status = 0
    ref_pair = None
    if "bf16" in args.live_modes:
        eng = engine(False, 1)
        e2 = emo.expand(2, -1, -1, -1).to(eng.dtype)
        ref_pair = eng.step(x, t, e2, eng.ip_scale_step).clone()
        row("bf16_pair_b2", bench_ms(lambda: eng.step(x, t, e2, eng.ip_scale_step), args.warmup, args.iters, cuda),
            flops2, False)
        if cuda:
            payload["checks"]["bf16_pair"] = call_checks(eng.step, x, t, e2, eng.ip_scale_step)
        del eng, e2
        FlashPortraitEngine.release_all()
        free_memory(cuda)
    eng = engine(True, refresh)
    e2, e1 = emo.expand(2, -1, -1, -1).to(eng.dtype), emo.to(eng.dtype)
    pair = eng.step(x, t, e2, eng.ip_scale_step).clone()
    single = eng.step1(x[:1], t, e1, 1.0).clone() if eng.step1 is not None else None
    err = {}
    if ref_pair is not None:
        err = {"rel_err_vs_bf16": relative_error(pair, ref_pair),
               "rel_err_vs_bf16_emo_branch": relative_error(pair[:1], ref_pair[:1]),
               "rel_err_vs_bf16_no_emo_branch": relative_error(pair[1:], ref_pair[1:])}
    row("fp8_pair_b2", bench_ms(lambda: eng.step(x, t, e2, eng.ip_scale_step), args.warmup, args.iters, cuda),
        flops2, True, err)
    if cuda:
        payload["checks"]["fp8_pair"] = call_checks(eng.step, x, t, e2, eng.ip_scale_step)
    if single is not None:
        extra = {"rel_err_vs_bf16": relative_error(single, ref_pair[:1])} if ref_pair is not None else {}
        extra["rel_err_vs_fp8_pair_emo_half"] = relative_error(single, pair[:1])
        single_ms = bench_ms(lambda: eng.step1(x[:1], t, e1, 1.0), args.warmup, args.iters, cuda)
        row("fp8_single_b1", single_ms, flops1, True, extra)
        if cuda:
            payload["checks"]["fp8_single"] = call_checks(eng.step1, x[:1], t, e1, 1.0)
            if args.profile:  # where a pass's time goes: GEMM / attention / fused elementwise / other
                try:
                    prof = profile_kernels(lambda: eng.step1(x[:1], t, e1, 1.0))
                except Exception as e:  # a profiler problem must not cost the timings
                    prof = {"error": f"{type(e).__name__}: {e}"[:300]}
                payload["profile_fp8_single"] = prof
                print("fp8_single_b1 kernel ms per pass:", {k: round(v, 2) for k, v in
                                                           prof.get("ms_per_step_by_category", {}).items()})
        pair_ms = rows[-2]["ms"]
        for n in sorted({1, 2, 3, 4, refresh}):  # the economy's average per expression full pass, from the rows
            ms = (pair_ms + (n - 1) * single_ms) / n
            row(f"fp8_economy_refresh{n}_computed", ms, (flops2 + (n - 1) * flops1) / n, True,
                {"passes_per_pair": n})
        for interval in (1, 2):
            try:
                res = eng.guidance_error(refresh=refresh, windows=args.live_windows, interval=interval)
            except Exception as e:  # noqa: BLE001 (keep the timings measured so far)
                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}"[:300], "alpa_interval": interval}
                status = 1
            payload["economy"].append(res)
            print(f"  economy refresh {refresh}, ALPA K={interval}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
            save()
        # the other estimate, independent tokens every latent frame (the worst case), another refresh
        other = 2 if refresh != 2 else 4
        for reuse, corr, n in (("flow", 0.9, refresh), ("delta", 0.0, refresh), ("delta", 0.9, other)):
            res = eng.guidance_error(refresh=n, windows=args.live_windows, interval=1, reuse=reuse, token_corr=corr)
            payload["economy"].append(res)
            print(f"  economy refresh {n}, reuse {reuse}, token correlation {corr}: guided rel L2 "
                  f"{res['guided_rel_l2_mean']:.4g}, latent rel L2 {res['latent_rel_l2_mean']:.4g}", flush=True)
            save()
    from engine.low_vram import dit_bytes

    payload["memory_gib"]["fp8_dit_weights"] = round(dit_bytes(eng.dit) / 2**30, 2)
    if "fp8_tensorwise" in args.live_modes:  # one scale per tensor: faster GEMMs, coarser numbers
        del eng, e1
        FlashPortraitEngine.release_all()
        free_memory(cuda)
        eng = engine(True, 1, "tensorwise")
        pair = eng.step(x, t, e2, eng.ip_scale_step).clone()
        err = {"rel_err_vs_bf16": relative_error(pair, ref_pair)} if ref_pair is not None else {}
        row("fp8_tensorwise_pair_b2", bench_ms(lambda: eng.step(x, t, e2, eng.ip_scale_step), args.warmup,
                                               args.iters, cuda), flops2, True, err)
    bad = [k for k, c in payload["checks"].items() if c["allocations_per_call"] or not c["host_sync_free"]]
    if bad:
        print(f"live step checks FAILED: {bad}")
        status = 1
    path = save()
    print(f"wrote {path}")
    return status


def breakdown(cfg: DiTConfig, shape: StepShape) -> dict[str, float]:
    """Share of the step's FLOPs by component (where the time must go if every part ran at the same rate)."""
    parts = step_flops(cfg, shape)
    total = sum(parts.values())
    return {k: v / total for k, v in parts.items()}


def plot(results: list[dict], peak: float, path: Path):
    try:
        import matplotlib
    except ImportError:  # the GPU machine may lack it: the JSON has every number
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "ms_per_step" in r]
    if not rows:
        return
    labels = sorted({(r["preset"], r["frames"]) for r in rows}, key=lambda k: (k[0], k[1]))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ys = [next((r["tflops"] for r in rows if (r["preset"], r["frames"]) == lab and r["mode"] == mode), 0)
              for lab in labels]
        ax.bar([j + i * width for j in range(len(labels))], ys, width, label=mode)
    ax.axhline(peak, color="k", ls="--", lw=1, label=f"matmul peak {peak:.0f}")
    ax.axhline(0.6 * peak, color="r", ls=":", lw=1, label="60% of peak")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], [f"{p}\n{f} latent frames" for p, f in labels])
    ax.set_ylabel("TFLOP/s")
    ax.set_title("DiT step throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    # The run sets the process-wide attention backend and fused-kernel switch; give them back afterwards
    # (the smoke test calls main() inside a pytest process).
    backend, fused_on, epilogue_on = attn.get_backend(), fused.fused_kernels_enabled(), fused.ffn_epilogue_enabled()
    try:
        return run(argv)
    finally:
        attn.set_backend(backend)
        fused.set_fused_kernels(fused_on)
        fused.set_ffn_epilogue(epilogue_on)


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="1.3b,14b")
    p.add_argument("--frames", default="3,6,21", help="latent frames per window, comma-separated")
    p.add_argument("--modes", default="eager,eager_graphs,compiled,graphs,fp8")
    p.add_argument("--size", type=int, default=512, help="video width = height in pixels")
    p.add_argument("--batch", type=int, default=1, help="2 = the expression-guidance pair as one batch (renderer)")
    p.add_argument("--attention", default="best", choices=("best",) + attn.BACKENDS,
                   help="best: the fastest backend that matched the math backend in this run")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="run the steps with the torch reference ops (no Triton kernels, no FFN GELU epilogue)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the per-kernel profile of the compiled step")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: Inductor's default)")
    p.add_argument("--no-tune", dest="tune", action="store_false",
                   help="compile with Inductor's default config instead of kernels.graphs.INDUCTOR_OPTIONS "
                        "(coordinate-descent tuning)")
    p.add_argument("--inductor-options", default=None, type=json.loads,
                   help='Inductor config for the compile as JSON, replacing INDUCTOR_OPTIONS, e.g. '
                        '\'{"coordinate_descent_tuning": true, "triton.multi_kernel": 1}\'')
    p.add_argument("--scope", default="block", choices=("block", "step"),
                   help="compile one block function (regional, default) or the whole step as one graph")
    p.add_argument("--no-ffn-epilogue", dest="ffn_epilogue", action="store_false",
                   help="FFN as GEMM + separate GELU kernel (default: the GELU epilogue GEMM where it measures "
                        "faster than that)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per mode (3; 2 with --quick)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per mode, median reported (15; 8 with --quick)")
    p.add_argument("--fp8-frames", default=None, help="latent frames for the fp8 mode (default: --frames)")
    p.add_argument("--fp8-presets", default=None,
                   help="presets that run the fp8 mode (default: all; with --quick: 14b when listed)")
    p.add_argument("--quick", action="store_true",
                   help="fits ~8 min on one H100: 8 timed calls, 6 frames first, 14b only at 6 frames, fp8 only for "
                        "14b at 6 frames")
    p.add_argument("--live14", action="store_true",
                   help="only the live step of --preset 14b (the first of --presets when given) as the engine runs "
                        "it: bf16 pair, FP8 pair, FP8 expression branch alone, the guidance economy (~4 min on an "
                        "H200); writes dit_step_<preset>_live_<gpu>.json")
    p.add_argument("--live-modes", default="bf16,fp8",
                   help="--live14: bf16 (the bf16 pair engine), fp8 (pair + expression branch + economy); "
                        "fp8_tensorwise adds the pair with per-tensor FP8 scales (one more 14b compile)")
    p.add_argument("--emo-refresh", type=int, default=None,
                   help="--live14: the economy's refresh interval (default: the engine's auto choice for the preset)")
    p.add_argument("--live-windows", type=int, default=6, help="--live14: rolling windows per economy error run")
    p.add_argument("--out", default=None,
                   help="result name under bench/results/ (default dit_step, or dit_step_quick with --quick)")
    args = p.parse_args(argv)
    if args.live14:
        args.warmup = 3 if args.warmup is None else args.warmup
        args.iters = 15 if args.iters is None else args.iters
        return run_live14(args)

    args.out = args.out or ("dit_step_quick" if args.quick else "dit_step")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    presets = args.presets.split(",")
    frames = [int(f) for f in args.frames.split(",")]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
    args.fp8_frames = [int(f) for f in args.fp8_frames.split(",")] if args.fp8_frames else None
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.iters = args.iters if args.iters is not None else (8 if args.quick else 15)
    if args.quick:
        args.fp8_frames = args.fp8_frames or ([6] if 6 in frames else frames[:1])
        frames.sort(key=lambda f: (f != 6, f))  # the headline configuration first
        if args.fp8_presets is None and "14b" in presets:
            args.fp8_presets = "14b"  # FP8 is for the large preset; one compile less
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {env_info()['device']}, torch {torch.__version__}, attention {args.attention}, "
          f"FA3 {'yes' if attn.fa3_available() else 'no'}, triton {'yes' if fused.triton_available() else 'no'}")

    peak = matmul_peak(device, cuda)
    print(f"matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak['n']}^3 {peak['dtype']}, {peak['ms']:.2f} ms)")
    try:
        kernels = check_fused_kernels(device, dtype, cuda)
    except Exception as e:  # a Triton build problem: report it and time the steps on the torch path
        traceback.print_exc()
        kernels = [{"kernel": "all", "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}]
        fused.set_fused_kernels(False)
    for r in kernels:
        print(f"  kernel {r}")
    failed = [r for r in kernels if r.get("ok") is False]
    ffn = next((r for r in kernels if r.get("kernel") == "ffn_gelu_epilogue"), None)
    if failed and all(r is ffn for r in failed):
        args.ffn_epilogue = False
        print("the FFN GELU epilogue disagreed with GEMM + GELU: steps run without it")
    elif failed:
        args.fused = False  # time the steps on the reference path rather than on a kernel that disagreed
        print("a fused kernel disagreed with its reference: steps run with fused kernels off")
    elif ffn is not None and args.ffn_epilogue and ffn["fused_ms"] > ffn["torch_ms"]:
        args.ffn_epilogue = False  # cuBLASLt picked a slower kernel for the epilogue GEMM on this machine
        print(f"the FFN GELU epilogue GEMM ({ffn['fused_ms']:.3f} ms) is slower than GEMM + GELU "
              f"({ffn['torch_ms']:.3f} ms): steps run without it")
    fused.set_ffn_epilogue(args.ffn_epilogue)
    if args.inductor_options is None:
        args.inductor_options = dict(INDUCTOR_OPTIONS) if args.tune else {}
    print(f"step path: fused kernels {'on' if args.fused else 'off'}, FFN GELU epilogue "
          f"{'on' if args.fused and args.ffn_epilogue else 'off'}, compile scope {args.scope}, Inductor options "
          f"{args.compile_mode or args.inductor_options}")
    ref_cfg = get_preset(presets[0]).dit
    att_shape = StepShape.from_video(args.size, args.size, 6 if 6 in frames else frames[0], batch=args.batch)
    attention_rows = check_attention(ref_cfg, att_shape, device, dtype, cuda, args.warmup, args.iters)
    for r in attention_rows:
        print(f"  attention {r}")
    if args.attention == "best":
        args.attention = best_backend(attention_rows) if cuda else "auto"
        print(f"attention backend for the step: {args.attention}")
    attn.set_backend(args.attention)

    shares = {f"{pr}@{f}": breakdown(get_preset(pr).dit, StepShape.from_video(args.size, args.size, f))
              for pr in presets for f in frames}
    report = Report(args.out, {"config": vars(args) | {"device_dtype": str(dtype)}, "matmul_peak": peak,
                               "peak_tflops": peak["tflops"], "kernel_checks": kernels, "attention": attention_rows,
                               "flop_shares": shares})
    report.save()
    for preset in presets:
        fl = frames
        if args.quick and preset == "14b":
            fl = [f for f in frames if f == 6] or frames[:1]
        run_preset(preset, fl, modes, args, device, dtype, peak["tflops"], cuda, report)
    path = report.save()
    results, checks = report.results, report.checks

    print("\npreset frames mode           ms/step  TFLOP/s  %peak")
    for r in results:
        if "ms_per_step" in r:
            print(f"{r['preset']:>6} {r['frames']:>6} {r['mode']:<13} {r['ms_per_step']:8.2f} {r['tflops']:8.1f} "
                  f"{100 * r['fraction_of_peak']:6.1f}")
    bad = [c for c in checks if c.get("allocations_per_call", 0) != 0 or c.get("host_sync_free") is False
           or c.get("graph_matches_compiled") is False or c.get("graph_matches_eager") is False
           or c.get("finite") is False]
    bad += [k for k in kernels if k.get("ok") is False]
    bad += [r for r in results if "error" in r]
    print(f"wrote {path}; checks {'FAILED: ' + str(bad) if bad else 'passed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
