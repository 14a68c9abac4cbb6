"""FlashPortrait's PortraitEncoder: one PD-FGC vector per video frame -> 24 expression tokens, and their grouping
into the 97 tokens each latent frame's NFEB attends to.

    feats (B, T, 554) = [headpose 6 | eye 6 | emo 30 | mouth 512] per frame
    tokens = PortraitEncoder(feats)              (B, 24*T, out_dim)  per frame [proj 4 | mouth 16 | emo 4]
    emo    = group_latent_tokens(tokens)         (B, n, 97, out_dim) with T = 4(n-1)+1
    win    = window_latent_tokens(emo[:, s:e], s)  the same window as FlashPortrait conditions it (see below)

The 97-token layout is per clip, and upstream a clip is a window: FlashPortrait's long-video pipeline encodes each
context window [s, e) of latent frames from its own video frames 4s .. 4(e-1) (4(e-s-1)+1 frames, the same count as
a training clip) and groups them as above. Since the encoder is a per-frame map, a window's latent j >= 1 then gets
exactly the global slice of latent s + j, and its latent 0 gets the 24 tokens of its own first frame 4s followed
by 73 zeros: for s >= 1 the LAST 24 tokens of global latent s (whose frames are 4s-3..4s), never its 97 tokens.
`window_latent_tokens` turns globally grouped tokens into that per-window layout.

Parameter names equal the keys of `portrait_encoder.pt` (`proj_model.`, `mouth_proj_model.`, `emo_proj_model.`).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config import PortraitEncoderConfig


class PartProjection(nn.Module):
    """`proj_model`: four bias-free Linears, one per PD-FGC part, and one shared LayerNorm -> 4 tokens.

    (N, 554) -> (N, 4, out_dim) in the order [headpose, eye, emo, mouth].
    """

    def __init__(self, cfg: PortraitEncoderConfig):
        super().__init__()
        self.sizes = (cfg.headpose_dim, cfg.eye_dim, cfg.emo_dim, cfg.mouth_dim)
        self.headpose_proj = nn.Linear(cfg.headpose_dim, cfg.out_dim, bias=False)
        self.eye_proj = nn.Linear(cfg.eye_dim, cfg.out_dim, bias=False)
        self.emo_proj = nn.Linear(cfg.emo_dim, cfg.out_dim, bias=False)
        self.mouth_proj = nn.Linear(cfg.mouth_dim, cfg.out_dim, bias=False)
        self.norm = nn.LayerNorm(cfg.out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        headpose, eye, emo, mouth = feats.split(self.sizes, dim=-1)
        parts = (self.headpose_proj(headpose), self.eye_proj(eye), self.emo_proj(emo), self.mouth_proj(mouth))
        return self.norm(torch.stack(parts, dim=-2))


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs | latents] (IP-Adapter style). x (N, S, C), latents (N, Q, C) -> (N, Q, C)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        # The scale is split over q and k (dim_head^-1/4 each) and the softmax runs in fp32, as published.
        s = self.dim_head ** -0.25
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).type_as(q)
        return self.to_out((w @ v).transpose(1, 2).flatten(2))


class Resampler(nn.Module):
    """Perceiver resampler: (N, S, in_dim) -> (N, num_queries, out_dim) through learned latent queries."""

    def __init__(self, cfg: PortraitEncoderConfig, in_dim: int, num_queries: int):
        super().__init__()
        D = cfg.resampler_dim
        self.latents = nn.Parameter(torch.randn(1, num_queries, D) / D**0.5)
        self.proj_in = nn.Linear(in_dim, D)
        self.proj_out = nn.Linear(D, cfg.out_dim)
        self.norm_out = nn.LayerNorm(cfg.out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(D, cfg.heads, cfg.dim_head),
                nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D * cfg.ff_mult, bias=False), nn.GELU(),
                              nn.Linear(D * cfg.ff_mult, D, bias=False)),
            ])
            for _ in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        lat = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            lat = attn(x, lat) + lat
            lat = ff(lat) + lat
        return self.norm_out(self.proj_out(lat))


class PortraitEncoder(nn.Module):
    """PD-FGC features (B, T, 554) -> expression tokens (B, 24*T, out_dim), frame-major, [proj 4 | mouth 16 | emo 4].

    Frames are independent: the encoder is a per-frame map, so a streaming caller may encode frames as they
    arrive and concatenate.
    """

    def __init__(self, cfg: PortraitEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.proj_model = PartProjection(cfg)
        self.mouth_proj_model = Resampler(cfg, cfg.mouth_dim, cfg.mouth_queries)
        self.emo_proj_model = Resampler(cfg, cfg.emo_dim, cfg.emo_queries)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if feats.shape[-1] != cfg.feature_dim:
            raise ValueError(f"PortraitEncoder expects {cfg.feature_dim}-d PD-FGC vectors, got {feats.shape[-1]}: "
                             f"feed the FanEncoder output [headpose 6 | eye 6 | emo 30 | mouth 512].")
        B, T, _ = feats.shape
        flat = feats.reshape(B * T, cfg.feature_dim).to(self.proj_model.norm.weight.dtype)
        emo_start = cfg.headpose_dim + cfg.eye_dim
        parts = self.proj_model(flat)                                               # (BT, 4, out)
        mouth = self.mouth_proj_model(flat[:, None, emo_start + cfg.emo_dim:])      # (BT, 16, out)
        emo = self.emo_proj_model(flat[:, None, emo_start:emo_start + cfg.emo_dim])  # (BT, 4, out)
        return torch.cat([parts, mouth, emo], dim=1).reshape(B, T * cfg.tokens_per_frame, cfg.out_dim)


def latent_token_range(i: int, tokens_per_frame: int = 24, temporal_stride: int = 4) -> tuple[int, int]:
    """Half-open token range [start, end) of latent frame i; latent 0 starts before 0 (its missing part is zero).

    Latent i >= 1 covers video frames 4i-3..4i plus the last token of frame 4i-4: [96i-73, 96i+24) for the
    published 24 tokens per frame and 4x temporal compression.
    """
    per_latent = temporal_stride * tokens_per_frame
    end = per_latent * i + tokens_per_frame
    return end - per_latent - 1, end


def group_latent_tokens(tokens: torch.Tensor, tokens_per_frame: int = 24, temporal_stride: int = 4) -> torch.Tensor:
    """(B, 24*T, C) tokens of T = 4(n-1)+1 video frames -> (B, n, 97, C) tokens per latent frame.

    Latent 0 gets frame 0's 24 tokens followed by 73 zeros (padding at the end, as published); latent i >= 1 gets
    the contiguous slice `latent_token_range(i)`.
    """
    B, N, C = tokens.shape
    T, rem = divmod(N, tokens_per_frame)
    if rem or (T - 1) % temporal_stride:
        raise ValueError(f"group_latent_tokens needs 24 tokens for each of 4(n-1)+1 frames, got {N} tokens: cut the "
                         f"driving clip to 4k+1 frames.")
    n = (T - 1) // temporal_stride + 1
    per = temporal_stride * tokens_per_frame + 1
    out = tokens.new_zeros(B, n, per, C)
    out[:, 0, :tokens_per_frame] = tokens[:, :tokens_per_frame]
    if n > 1:
        # latent i >= 1 starts at token per_latent*(i-1) + tokens_per_frame - 1: a strided window view, one copy
        start = tokens_per_frame - 1
        body = tokens[:, start:].unfold(1, per, per - 1)  # (B, n-1, C, per)
        out[:, 1:] = body[:, :n - 1].transpose(-1, -2)
    return out


def window_first_frame_tokens(latent: torch.Tensor, start: int, tokens_per_frame: int = 24) -> torch.Tensor:
    """The tokens (..., 24, C) of video frame 4s, the first frame of a window starting at latent s = `start`, from
    the globally grouped tokens (..., 97, C) of latent s: its last 24 for s >= 1 (latent s is frames 4s-3..4s),
    its first 24 for s = 0 (frame 0, then the zero pads). A view, no copy."""
    if start < 0:
        raise ValueError(f"a window starts at a latent frame >= 0 (got {start}).")
    return latent[..., :tokens_per_frame, :] if start == 0 else latent[..., -tokens_per_frame:, :]


def window_latent_tokens(grouped: torch.Tensor, start: int, tokens_per_frame: int = 24,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-window tokens (..., n, 97, C) of a window of n latent frames starting at global latent `start`, from
    the globally grouped tokens of those frames `grouped` (..., n, 97, C) (as `group_latent_tokens` gives them):
    latent 0 becomes its first frame's 24 tokens + 73 zero pads, latents 1.. are unchanged (see the module
    docstring). Written into `out` (same shape; must not overlap `grouped`) when given, else into a new tensor."""
    if out is None:
        out = torch.empty_like(grouped)
    if out.shape != grouped.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the window's tokens {tuple(grouped.shape)}.")
    out[..., 1:, :, :].copy_(grouped[..., 1:, :, :])
    out[..., 0, :tokens_per_frame, :].copy_(window_first_frame_tokens(grouped[..., 0, :, :], start, tokens_per_frame))
    out[..., 0, tokens_per_frame:, :].zero_()
    return out
