"""Norm, RoPE and modulation ops of the DiT block.

The torch functions here are the reference (and the CPU path). Triton versions, where present, must match them.
Shapes: x (B, L, D); q/k heads (B, L, H, hd); RoPE tables cos/sin (L, hd/2) in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
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


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, eps: float) -> torch.Tensor:
    """RMSNorm over the full dim (across heads), split into heads, then RoPE: (B, L, D) -> (B, L, H, hd)."""
    return apply_rope(rms_norm(x, weight, eps).unflatten(-1, (num_heads, -1)), cos, sin)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift in fp32; shift/scale broadcast as (B, 1|L, D)."""
    xf = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (xf * (1 + scale.float()) + shift.float()).type_as(x)
