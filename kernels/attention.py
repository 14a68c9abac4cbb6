"""Attention entry point of the DiT. Inputs and output are (B, L, H, hd)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(hd), no mask: (B, Lq, H, hd) x (B, Lk, H, hd) -> (B, Lq, H, hd)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
