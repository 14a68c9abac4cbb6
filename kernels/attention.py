"""Attention entry point of the DiT and its backend choice. Inputs and output are (B, L, H, hd).

Backends (RuntimeConfig.attention):
    auto       FlashAttention 3 when `flash_attn_interface` imports (Hopper), else PyTorch SDPA's own choice
               (cuDNN first on Hopper in recent PyTorch, then flash, efficient, math)
    sdpa       PyTorch SDPA's own choice, never FA3
    flash      SDPA restricted to the FlashAttention-2 kernel
    cudnn      SDPA restricted to cuDNN attention
    efficient  SDPA restricted to the memory-efficient (xformers-style) kernel
    math       SDPA's reference composite (any device, any dtype; the parity oracle)
    fa3        FlashAttention 3 (`flash_attn_interface.flash_attn_func`), takes (B, L, H, hd) without transposes

The choice is process-wide (`set_backend`), like the SDPA flags it wraps: the engine picks it once from the runtime
config, before compiling. Restricted SDPA backends go through `torch.nn.attention.sdpa_kernel`, which torch.compile
traces, so the compiled step bakes the chosen kernel in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import flash_attn_interface  # FlashAttention 3 (Hopper build of Dao-AILab/flash-attention)
except ImportError:
    flash_attn_interface = None

BACKENDS = ("auto", "sdpa", "flash", "cudnn", "efficient", "math", "fa3")
_SDPA = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}

_backend = "auto"


def fa3_available() -> bool:
    return flash_attn_interface is not None


def set_backend(name: str) -> None:
    """Choose the attention backend for the process (one of BACKENDS)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}.")
    if name == "fa3" and flash_attn_interface is None:
        raise ValueError("Attention backend 'fa3' needs FlashAttention 3: build flash-attention's hopper/ package "
                         "(it installs `flash_attn_interface`) or choose --attention auto.")
    _backend = name


def get_backend() -> str:
    return _backend


def configure(runtime) -> str:
    """Apply RuntimeConfig.attention; returns the backend name that will run."""
    set_backend(runtime.attention)
    return _backend


class backend:
    """Context manager that sets the backend for a block of code (benchmarks, parity checks)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.old = _backend
        set_backend(self.name)
        return self

    def __exit__(self, *exc):
        set_backend(self.old)


def _fa3(q, k, v):
    out = flash_attn_interface.flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # older FA3 builds also return the log-sum-exp


def _sdpa(q, k, v):
    # SDPA wants (B, H, L, hd); the transposed views keep hd contiguous, which the fused kernels accept as is,
    # and their output transposed back is contiguous (B, L, H, hd).
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(hd), no mask: (B, Lq, H, hd) x (B, Lk, H, hd) -> (B, Lq, H, hd)."""
    name = _backend
    if name == "auto":
        name = "fa3" if (flash_attn_interface is not None and q.is_cuda and q.dtype != torch.float32) else "sdpa"
    if name == "fa3":
        return _fa3(q, k, v)
    if name == "sdpa":
        return _sdpa(q, k, v)
    with sdpa_kernel(_SDPA[name]):
        return _sdpa(q, k, v)


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of each latent frame's query tokens on that frame's own keys (NFEB's per-frame grouping).

    q (B, L, H, hd) in frame-major token order; k, v (B, F, T, H, hd), T tokens per frame. The first floor(L/F)*F
    queries are grouped F ways; the rest (padding) get zeros. Returns (B, L, H*hd).
    """
    B, L, H, hd = q.shape
    F, T = k.shape[1], k.shape[2]
    per = L // F
    L_eff = per * F
    out = attention(q[:, :L_eff].reshape(B * F, per, H, hd), k.reshape(B * F, T, H, hd),
                    v.reshape(B * F, T, H, hd)).reshape(B, L_eff, H * hd)
    if L_eff < L:
        out = torch.cat([out, out.new_zeros(B, L - L_eff, H * hd)], dim=1)
    return out
