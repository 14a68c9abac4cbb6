"""Norm, RoPE, modulation and FFN ops of the DiT block: torch reference + fused kernels.

The `*_ref` torch functions are the reference and the CPU path. The public functions (`rms_norm`, `rms_norm_rope`,
`layer_norm_modulate`) run one fused Triton kernel per call on CUDA tensors when Triton imports, and the reference
otherwise. Inside `torch.compile` they take the reference path on purpose: Inductor generates the same one-pass
kernel from it and can also fuse it with the neighbouring bias add / residual, which an opaque custom kernel blocks.

`GeluFFN` / `fuse_ffn_gelu(model)`: the FFN's first Linear, its bias and the tanh GELU as one cuBLASLt GEMM with a
GELU epilogue on CUDA (in eager and compiled code alike: Inductor calls that op as is).

Shapes: x (B, L, D); q/k heads (B, L, H, hd); RoPE tables cos/sin (L, hd/2) in fp32; shift/scale broadcast as
(B, 1|L, D). The Triton kernels round where the reference rounds (to x's dtype after the normalisation, after the
weight, at the end), so bf16 outputs agree to a bf16 step or two (a step more where RoPE mixes two rounded values).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference is the only path
    triton = None
    tl = None

_enabled = True


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused kernels (Triton norms, FFN GELU epilogue) on or off for the whole process
    (RuntimeConfig.fused_kernels)."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Temporarily set the Triton dispatch (exports and parity checks run the reference)."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = old


def fused_kernels_enabled() -> bool:
    return _enabled


_ffn_epilogue = True


def set_ffn_epilogue(enabled: bool) -> None:
    """Turn GeluFFN's GEMM + GELU epilogue on or off on its own (the bench turns it off where cuBLASLt's epilogue
    kernel measures slower than the plain GEMM + GELU). Read when a step is traced: set it before compiling."""
    global _ffn_epilogue
    _ffn_epilogue = bool(enabled)


def ffn_epilogue_enabled() -> bool:
    return _ffn_epilogue


def triton_available() -> bool:
    return triton is not None


def _use_triton(x: torch.Tensor) -> bool:
    return (_enabled and triton is not None and x.is_cuda and not torch.compiler.is_compiling()
            and not (x.requires_grad and torch.is_grad_enabled()))


# --- torch reference ------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 (Wan's WanRMSNorm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2j], x[..., 2j+1]) of x (B, L, H, hd) by angles with cos/sin (L, hd/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, hd/2, 2)
    x0, x1 = xf.unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


def rms_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      num_heads: int, eps: float) -> torch.Tensor:
    """RMSNorm over the full dim (across heads), split into heads, then RoPE: (B, L, D) -> (B, L, H, hd)."""
    return apply_rope(rms_norm_ref(x, weight, eps).unflatten(-1, (num_heads, -1)), cos, sin)


def layer_norm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift in fp32; shift/scale broadcast as (B, 1|L, D)."""
    # int(): a Python constant even under the TorchScript tracer (ONNX export needs a static normalized_shape)
    xf = F.layer_norm(x.float(), (int(x.shape[-1]),), eps=eps)
    return (xf * (1 + scale.float()) + shift.float()).type_as(x)


# --- Triton kernels (plain functions, jitted on first use so TRITON_INTERPRET set by a test takes effect) --------
def _rms_norm_rope_kernel(X, W, COS, SIN, Y, stride_x, stride_y, seq_len, dim, half_hd, eps,
                          HAS_ROPE: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row (token). Pairs (2j, 2j+1) are loaded as two strided vectors so the rotation is
    # register-local; both loads touch the same cache lines, so DRAM traffic is one read of the row.
    row = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    mask = j < dim // 2
    x_row = X + row.to(tl.int64) * stride_x
    x0 = tl.load(x_row + 2 * j, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_row + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
    r = tl.math.rsqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / dim + eps)
    w0 = tl.load(W + 2 * j, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(W + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
    # Round like the reference: normalised value to x's dtype, times weight rounded to the output dtype.
    y0 = ((x0 * r).to(X.dtype.element_ty).to(tl.float32) * w0).to(Y.dtype.element_ty).to(tl.float32)
    y1 = ((x1 * r).to(X.dtype.element_ty).to(tl.float32) * w1).to(Y.dtype.element_ty).to(tl.float32)
    if HAS_ROPE:
        pos = row % seq_len
        col = j % half_hd  # the same angle table serves every head
        c = tl.load(COS + pos * half_hd + col, mask=mask, other=1.0)
        s = tl.load(SIN + pos * half_hd + col, mask=mask, other=0.0)
        y0, y1 = y0 * c - y1 * s, y0 * s + y1 * c
    y_row = Y + row.to(tl.int64) * stride_y
    tl.store(y_row + 2 * j, y0.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + 2 * j + 1, y1.to(Y.dtype.element_ty), mask=mask)


def _layer_norm_modulate_kernel(X, SHIFT, SCALE, Y, stride_x, stride_y, seq_len, dim, eps,
                                shift_sb, shift_sl, scale_sb, scale_sl, BLOCK: tl.constexpr):
    # One program per row; shift/scale are addressed through (batch, token) strides, 0 where they broadcast.
    row = tl.program_id(0)
    b = row // seq_len
    pos = row % seq_len
    d = tl.arange(0, BLOCK)
    mask = d < dim
    x = tl.load(X + row.to(tl.int64) * stride_x + d, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / dim + eps)
    sh = tl.load(SHIFT + b.to(tl.int64) * shift_sb + pos.to(tl.int64) * shift_sl + d, mask=mask, other=0.0)
    sc = tl.load(SCALE + b.to(tl.int64) * scale_sb + pos.to(tl.int64) * scale_sl + d, mask=mask, other=0.0)
    y = xc * rstd * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
    tl.store(Y + row.to(tl.int64) * stride_y + d, y.to(Y.dtype.element_ty), mask=mask)


@functools.cache
def _jit(fn, interpret: bool):
    return triton.jit(fn)


def _interpreting() -> bool:
    try:
        from triton import knobs  # Triton >= 3.4
    except ImportError:
        import os

        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def _kernel(fn):
    return _jit(fn, _interpreting())


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a (rows, D) matrix with unit column stride, without a copy where possible."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                         num_heads: int, eps: float) -> torch.Tensor:
    """One-kernel rms_norm_rope_ref (or rms_norm_ref when cos is None): (B, L, D) -> (B, L, H, hd) / (..., D)."""
    D = x.shape[-1]
    x2 = _rows(x)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    has_rope = cos is not None
    seq_len = x.shape[-2] if has_rope else 1
    half_hd = (D // num_heads) // 2 if has_rope else 1
    if has_rope:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    else:
        cos = sin = x2  # unused placeholders
    block = triton.next_power_of_2(D // 2)
    _kernel(_rms_norm_rope_kernel)[(x2.shape[0],)](
        x2, weight, cos, sin, y, x2.stride(0), y.stride(0), seq_len, D, half_hd, eps,
        HAS_ROPE=has_rope, BLOCK=block, num_warps=_num_warps(block))
    if has_rope:
        return y.view(*x.shape[:-1], num_heads, D // num_heads)
    return y.view(x.shape)


def layer_norm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """One-kernel layer_norm_modulate_ref for x (B, L, D), shift/scale (B, 1|L, D)."""
    B, L, D = x.shape
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    shift = shift.expand(B, L, D)
    scale = scale.expand(B, L, D)
    if shift.stride(-1) != 1:
        shift = shift.contiguous()
    if scale.stride(-1) != 1:
        scale = scale.contiguous()
    block = triton.next_power_of_2(D)
    _kernel(_layer_norm_modulate_kernel)[(B * L,)](
        x2, shift, scale, y, x2.stride(0), y.stride(0), L, D, eps,
        shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        BLOCK=block, num_warps=_num_warps(block))
    return y.view(B, L, D)


# --- public entry points (names used by engine/models/dit.py) ---------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (see rms_norm_ref); fused Triton kernel on CUDA."""
    if _use_triton(x):
        return rms_norm_rope_triton(x, weight, None, None, 1, eps)
    return rms_norm_ref(x, weight, eps)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, eps: float) -> torch.Tensor:
    """RMSNorm over the full dim (across heads), split into heads, then RoPE: (B, L, D) -> (B, L, H, hd)."""
    if _use_triton(x):
        return rms_norm_rope_triton(x, weight, cos, sin, num_heads, eps)
    return rms_norm_rope_ref(x, weight, cos, sin, num_heads, eps)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift in fp32, cast back to x's dtype: (B, L, D)."""
    if _use_triton(x) and x.dim() == 3:
        return layer_norm_modulate_triton(x, shift, scale, eps)
    return layer_norm_modulate_ref(x, shift, scale, eps)


# --- FFN: Linear + bias + GELU(tanh) in one GEMM epilogue -------------------------------------------------------
class GeluFFN(nn.Sequential):
    """Wan's FFN, Linear(D, ffn) -> GELU(tanh) -> Linear(ffn, D), same children and state-dict keys (ffn.0, ffn.2).

    On CUDA (with fused kernels on) the first Linear, its bias and the GELU run as one cuBLASLt GEMM with a GELU
    epilogue (`torch._addmm_activation`, whose CUDA GELU is the tanh form Wan uses): the (tokens, ffn) hidden
    activation, the largest of the block, is written once instead of written, read and written again. Inductor
    neither decomposes nor lowers that op (it calls it as an extern kernel), so the epilogue survives torch.compile,
    which on its own would run the GEMM and a separate GELU kernel (2.3 ms of the 1.3b 6-frame step on an H100).
    Elsewhere (CPU, where that op's GELU is the erf form; FP8 linears) it runs as the plain Sequential.
    (B, L, D) -> (B, L, D).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _, down = self
        if _enabled and _ffn_epilogue and x.is_cuda and type(up) is nn.Linear and up.bias is not None:
            hidden = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
            return down(hidden.view(*x.shape[:-1], -1))
        return super().forward(x)


def fuse_ffn_gelu(model: nn.Module) -> int:
    """Swap every block's `ffn` Sequential(Linear, GELU(tanh), Linear) for a GeluFFN in place (same weights, same
    keys); returns how many were swapped (0 when already done)."""
    swapped = 0
    for block in getattr(model, "blocks", []):
        ffn = block.ffn
        if (type(ffn) is nn.Sequential and len(ffn) == 3 and isinstance(ffn[0], nn.Linear)
                and isinstance(ffn[1], nn.GELU) and ffn[1].approximate == "tanh"):
            block.ffn = GeluFFN(*ffn)
            swapped += 1
    return swapped
