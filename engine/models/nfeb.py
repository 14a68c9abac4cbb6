"""FlashPortrait's Normalised Facial Expression Block (NFEB), the expression branch of the image cross-attention.

    base = attn(q, k_txt, v_txt) + attn(q, k_img, v_img)           (B, L, D), before the output projection
    emo  = per-frame attention of each latent frame's query tokens on that frame's 97 expression tokens
    emo' = (emo - mean(emo)) * std(base) / (std(emo) + 1e-5) + mean(base)   mean/std per sample over (L, D), unbiased
    out  = o(base + ip_scale * emo')

The projections `emo_k_proj` / `emo_v_proj` live on the cross-attention module (their checkpoint keys are
`blocks.{i}.cross_attn.emo_{k,v}_proj.weight`); this module holds the two functions that use them.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.attention import attention, frame_attention

NORM_EPS = 1e-5


def expression_attention(q: torch.Tensor, emo: torch.Tensor, emo_k_proj: nn.Linear, emo_v_proj: nn.Linear,
                         num_frames: int | None = None) -> torch.Tensor:
    """Per-latent-frame attention of queries on expression tokens.

    q: (B, L, H, hd) normalised queries of the cross-attention; emo: (B, F, T, E) tokens per latent frame
    (T = 97), or (B, T, E) for global attention over all tokens. The first floor(L/F)*F query tokens are grouped
    F ways (frame-major token order); the rest (padding) get zeros. Returns (B, L, H*hd).
    """
    B, L, H, hd = q.shape
    if emo.dim() == 3:  # global variant of the published code
        k = emo_k_proj(emo).unflatten(-1, (H, hd))
        v = emo_v_proj(emo).unflatten(-1, (H, hd))
        return attention(q, k, v).flatten(2)
    F = emo.shape[1] if num_frames is None else num_frames
    T = emo.shape[2]
    k = emo_k_proj(emo).reshape(B, F, T, H, hd)
    v = emo_v_proj(emo).reshape(B, F, T, H, hd)
    return frame_attention(q, k, v)


def normalise_to(emo: torch.Tensor, base: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Give `emo` (B, L, D) the per-sample mean and unbiased std of `base` (B, L, D), over dims (1, 2).

    Statistics and the affine map run in fp32 (a bf16 std of ~10^8 values would carry a ~0.4% error into every
    expression token's scale); the result has emo's dtype.
    """
    e, b = emo.float(), base.float()
    mu_e = e.mean(dim=(1, 2), keepdim=True)
    sd_e = e.std(dim=(1, 2), keepdim=True)
    mu_b = b.mean(dim=(1, 2), keepdim=True)
    sd_b = b.std(dim=(1, 2), keepdim=True)
    return ((e - mu_e) * (sd_b / (sd_e + eps)) + mu_b).to(emo.dtype)
