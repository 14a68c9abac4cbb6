"""Fused kernels, attention backends and FP8 linears against independent references (CPU).

The Triton kernels run here through Triton's CPU interpreter (TRITON_INTERPRET=1) when the `triton` package is
installed; the GPU bench (bench/dit_step.py) checks the compiled kernels on CUDA.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import RuntimeConfig
from kernels import attention as attn
from kernels import fp8, fused

needs_triton = pytest.mark.skipif(not fused.triton_available(), reason="triton is not installed (pip install triton)")


def rope_tables(L: int, hd: int, seed: int = 0):
    ang = torch.rand(L, hd // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    return ang.cos(), ang.sin(), ang


def rms_norm_rope_complex(x, w, ang, H, eps):
    """Independent oracle: Wan's formulation, RoPE as a complex product with exp(i * angle)."""
    B, L, D = x.shape
    n = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * w.double()
    z = torch.view_as_complex(n.reshape(B, L, H, D // H // 2, 2).contiguous())
    z = z * torch.polar(torch.ones_like(ang.double()), ang.double())[None, :, None, :]
    return torch.view_as_real(z).reshape(B, L, H, D // H)


# --- torch reference ------------------------------------------------------------------------------------------
def test_rms_norm_rope_reference_matches_complex_rotation():
    B, L, H, hd = 2, 10, 3, 16
    x = torch.randn(B, L, H * hd) * 4
    w = torch.rand(H * hd) + 0.5
    cos, sin, ang = rope_tables(L, hd)
    out = fused.rms_norm_rope_ref(x, w, cos, sin, H, 1e-6)
    assert out.shape == (B, L, H, hd)
    torch.testing.assert_close(out.double(), rms_norm_rope_complex(x, w, ang, H, 1e-6), atol=1e-5, rtol=1e-5)


def test_layer_norm_modulate_reference():
    x = torch.randn(2, 7, 32) * 3 + 1
    shift, scale = torch.randn(2, 1, 32), torch.randn(2, 1, 32)
    out = fused.layer_norm_modulate_ref(x, shift, scale, 1e-6)
    expected = F.layer_norm(x, (32,), eps=1e-6) * (1 + scale) + shift
    torch.testing.assert_close(out, expected)
    # no modulation: zero mean, unit variance per token
    plain = fused.layer_norm_modulate_ref(x, torch.zeros(2, 1, 32), torch.zeros(2, 1, 32), 1e-6)
    torch.testing.assert_close(plain.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.var(-1, unbiased=False), torch.ones(2, 7), atol=1e-3, rtol=0)


def test_public_functions_take_the_reference_path_on_cpu():
    x = torch.randn(1, 6, 32)
    w = torch.rand(32)
    cos, sin, _ = rope_tables(6, 8)
    assert torch.equal(fused.rms_norm_rope(x, w, cos, sin, 4, 1e-6), fused.rms_norm_rope_ref(x, w, cos, sin, 4, 1e-6))
    assert torch.equal(fused.rms_norm(x, w, 1e-6), fused.rms_norm_ref(x, w, 1e-6))
    s = torch.randn(1, 1, 32)
    assert torch.equal(fused.layer_norm_modulate(x, s, s, 1e-6), fused.layer_norm_modulate_ref(x, s, s, 1e-6))


# --- Triton kernels in the interpreter --------------------------------------------------------------------------
def assert_bf16_close(out, ref, ulps: int = 4):
    """Within `ulps` bf16 steps (2^-7 relative each) of the reference, measured against the tensor's largest value
    for entries that RoPE cancellation makes small. The interpreter truncates fp32 -> bf16 casts (the GPU rounds to
    nearest), so each of the kernel's three roundings may land one step lower: 4 steps is the interpreter's bound."""
    diff = (out.float() - ref.float()).abs()
    step = 2 ** -7 * ulps
    bound = step * ref.float().abs() + step * ref.float().abs().max()
    assert bool((diff <= bound).all()), f"max diff {diff.max().item()}"


def assert_matches(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert_bf16_close(out, ref)


def _triton_checks() -> int:
    """Every Triton kernel vs its reference on CPU tensors; needs TRITON_INTERPRET=1 set before triton imports."""
    n = 0
    for dtype in (torch.float32, torch.bfloat16):
        for B, L, H, hd in [(1, 8, 4, 16), (2, 5, 3, 16), (1, 3, 2, 128)]:
            g = torch.Generator().manual_seed(B * 100 + L)
            x = (torch.randn(B, L, H * hd, generator=g) * 3).to(dtype)
            w = (torch.rand(H * hd, generator=g) + 0.5).to(dtype)
            cos, sin, _ = rope_tables(L, hd, seed=L)
            out = fused.rms_norm_rope_triton(x, w, cos, sin, H, 1e-6)
            assert out.shape == (B, L, H, hd)
            assert_matches(out, fused.rms_norm_rope_ref(x, w, cos, sin, H, 1e-6))
            assert_matches(fused.rms_norm_rope_triton(x, w, None, None, 1, 1e-6), fused.rms_norm_ref(x, w, 1e-6))
            n += 2
        B, L, D = 2, 6, 48  # D not a power of two: the masked tail must not enter the statistics
        g = torch.Generator().manual_seed(3)
        x = (torch.randn(B, L, D, generator=g) * 2 + 0.5).to(dtype)
        e = torch.randn(B, 6, D, generator=g)  # chunks of (modulation + e0), sliced as the block slices them
        for shift, scale in [(e[:, 0:1], e[:, 1:2]), (torch.randn(B, L, D, generator=g), e[:, 1:2])]:
            assert_matches(fused.layer_norm_modulate_triton(x, shift, scale, 1e-6),
                           fused.layer_norm_modulate_ref(x, shift, scale, 1e-6))
            n += 1
    return n


@needs_triton
def test_triton_kernels_match_reference_in_interpreter():
    # Triton reads TRITON_INTERPRET when it is imported (its own tl.sum etc. are jitted then), and other test
    # modules import it first: run the checks in a fresh interpreter with the variable set.
    root = Path(__file__).resolve().parents[1]
    code = (f"import runpy, sys; sys.path.insert(0, {str(root)!r}); "
            f"print('checked', runpy.run_path({__file__!r}, run_name='triton_checks')['_triton_checks']())")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "checked 16" in r.stdout


# --- attention backends -------------------------------------------------------------------------------------------
def softmax_attention(q, k, v):
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double())


@pytest.mark.parametrize("name", ["auto", "sdpa", "math", "flash"])
def test_attention_backends_match_softmax(name):
    q, k, v = torch.randn(2, 9, 3, 16), torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)
    with attn.backend(name):
        out = attn.attention(q, k, v)
    assert attn.get_backend() == "auto"  # the context manager restores the previous choice
    torch.testing.assert_close(out.double(), softmax_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_backend_choice_errors():
    with pytest.raises(ValueError, match="choose one of"):
        attn.set_backend("xformers")
    assert attn.configure(RuntimeConfig(attention="math")) == "math"
    attn.set_backend("auto")
    if not attn.fa3_available():
        with pytest.raises(ValueError, match="flash_attn_interface"):
            attn.set_backend("fa3")


# --- FP8 -----------------------------------------------------------------------------------------------------------
def test_fp8_quantize_roundtrip_error_is_e4m3_sized():
    w = torch.randn(64, 128) * torch.logspace(-6, 1, 64)[:, None]
    for rowwise in (True, False):
        q, s = fp8.quantize(w, rowwise)
        assert q.dtype == torch.float8_e4m3fn and s.shape == ((64, 1) if rowwise else ())
        back = q.float() * s
        if rowwise:  # 3 mantissa bits: every normal value within 2^-4 relative, per row
            rel = ((back - w).abs().amax(1) / w.abs().amax(1)).max().item()
            assert rel <= 2 ** -4
    # per-tensor scaling crushes the small rows that per-row scaling keeps
    small = slice(0, 8)
    err_row = fp8.relative_error(fp8.quantize(w, True)[0][small].float() * fp8.quantize(w, True)[1][small], w[small])
    q_t, s_t = fp8.quantize(w, False)
    err_tensor = fp8.relative_error(q_t[small].float() * s_t, w[small])
    assert err_row < 0.05 < err_tensor


@pytest.mark.parametrize("rowwise", [True, False])
def test_fp8_linear_close_to_bf16(rowwise):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64).to(torch.bfloat16)
    x = torch.randn(3, 20, 128, dtype=torch.bfloat16)
    m = fp8.Fp8Linear(lin, rowwise)
    y = m(x)
    assert y.shape == (3, 20, 64) and y.dtype == torch.bfloat16
    assert fp8.check_linear(lin, x, rowwise) < 0.06
    # scaled-matmul path and the dequantized path compute the same product
    x_q, x_s = fp8.quantize(x.reshape(-1, 128), rowwise)
    deq = ((x_q.float() * x_s) @ m.dequantized_weight().t() + lin.bias.float()).reshape(3, 20, 64)
    torch.testing.assert_close(y.float(), deq, atol=0.05, rtol=2 ** -7)


def test_fp8_linear_falls_back_where_cpu_scaled_mm_lacks_row_scales(monkeypatch):
    """torch 2.11's CPU _scaled_mm takes per-tensor scales only: a per-row Fp8Linear must use the dequantized
    matmul there (same numbers), a per-tensor one keeps the scaled matmul."""
    real = torch._scaled_mm
    calls = []

    def per_tensor_only(a, b, scale_a, scale_b, **kw):
        if a.device.type == "cpu" and (scale_a.numel() > 1 or scale_b.numel() > 1):
            raise RuntimeError("_scaled_mm only supports per-tensor scaling for CPU backend")
        calls.append(a.shape)
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    fp8._cpu_scaled_mm.cache_clear()
    try:
        torch.manual_seed(0)
        lin = nn.Linear(128, 64).to(torch.bfloat16)
        x = torch.randn(3, 20, 128, dtype=torch.bfloat16)
        row = fp8.Fp8Linear(lin, rowwise=True)
        assert not row.use_scaled_mm
        x_q, x_s = fp8.quantize(x.reshape(-1, 128), True)
        deq = ((x_q.float() * x_s) @ row.dequantized_weight().t() + lin.bias.float()).reshape(3, 20, 64)
        torch.testing.assert_close(row(x).float(), deq, atol=0.05, rtol=2 ** -7)
        tensor = fp8.Fp8Linear(lin, rowwise=False)
        if tensor.use_scaled_mm:  # builds with a CPU scaled matmul at all
            n = len(calls)
            tensor(x)
            assert len(calls) == n + 1
        assert fp8.check_linear(lin, x, False) < 0.08
    finally:
        fp8._cpu_scaled_mm.cache_clear()


def test_quantize_linears_swaps_block_linears_only():
    from engine.config import get_preset
    from engine.models.dit import WanModel

    torch.manual_seed(0)
    cfg = get_preset("tiny").dit
    model = WanModel(cfg).eval()
    n_block_linears = sum(isinstance(m, nn.Linear) for m in model.blocks.modules())
    swapped = fp8.quantize_linears(model)
    assert len(swapped) == n_block_linears and all(s.startswith("blocks.") for s in swapped)
    assert not any(isinstance(m, nn.Linear) for m in model.blocks.modules())
    assert isinstance(model.head.head, nn.Linear) and isinstance(model.text_embedding[0], nn.Linear)
    assert fp8.quantize_linears(model) == []  # idempotent


def test_fuse_ffn_gelu_keeps_weights_keys_and_cpu_numbers():
    from engine.config import get_preset
    from engine.models.dit import WanModel

    torch.manual_seed(0)
    model = WanModel(get_preset("tiny").dit).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 5, model.cfg.dim)
    with torch.no_grad():
        before = model.blocks[0].ffn(x)
    assert fused.fuse_ffn_gelu(model) == len(model.blocks)
    assert all(isinstance(b.ffn, fused.GeluFFN) for b in model.blocks)
    assert list(model.state_dict()) == keys and fused.fuse_ffn_gelu(model) == 0
    with torch.no_grad():
        assert torch.equal(model.blocks[0].ffn(x), before)  # CPU: the plain Sequential path


def test_ffn_gelu_epilogue_survives_inductor():
    """GeluFFN's one-GEMM FFN relies on Inductor calling `_addmm_activation` as an extern kernel: were it in the
    decomposition table, the compiled step would split it back into GEMM + a separate GELU kernel."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import fallbacks

    op = torch.ops.aten._addmm_activation.default
    assert op not in select_decomp_table()
    assert op in fallbacks or torch.ops.aten._addmm_activation in fallbacks


def test_ffn_epilogue_switch_keeps_the_sequential_numbers():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 32))
    ffn = fused.GeluFFN(*plain)
    x = torch.randn(2, 7, 32)
    was = fused.ffn_epilogue_enabled()
    try:
        for on in (True, False):
            fused.set_ffn_epilogue(on)
            assert fused.ffn_epilogue_enabled() is on
            torch.testing.assert_close(ffn(x), plain(x))  # CPU: the Sequential either way
    finally:
        fused.set_ffn_epilogue(was)
