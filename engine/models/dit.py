"""Wan2.1 I2V DiT with FlashPortrait's expression branch (NFEB). Parameter names are the original Wan keys.

Forward, in the pieces the renderer, the compiled step and ALPA recompose:

    ctx_img, ctx_txt = model.embed_context(context, clip_fea)     # once per session (fixed prompt + reference)
    tokens, grid     = model.patchify(x, y)                        # (B, L, D), grid = (f, h, w) in tokens
    cos, sin         = model.rope(grid)                            # (L, hd/2) fp32, cached per grid
    e, e0            = model.embed_time(t)                         # (B, D), (B, 6, D) fp32
    for block in model.blocks:
        tokens = block(tokens, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale)
    out = model.unpatchify(model.head(tokens, e), grid)            # (B, out_dim, F, H, W)

Optional, bit-identical fast path: `kv = model.context_kv(ctx_img, ctx_txt)` once per session (context K/V of every
block), then `block(..., ip_scale, kv=kv[i])` / `model.forward_tokens(..., kv=kv)` skip the per-pass context
projections. `ip_scale` may be a (B,) tensor, so the expression-guidance pair (0 and 1) runs as one batch of 2.

Inputs: x (B, 16, F, H, W) noisy latent, t (B,) timesteps in [0, 1000], context (B, <=text_len, text_dim) umT5
output, clip_fea (B, clip_tokens, clip_dim), y (B, 20, F, H, W) = [mask 4 | reference latent 16],
emo (B, F, 97, emo_dim) expression tokens per latent frame (or None).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DiTConfig
from engine.models.nfeb import NORM_EPS, expression_attention, normalise_to
from kernels.attention import attention
from kernels.fused import layer_norm_modulate, rms_norm, rms_norm_rope


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)], w_i = 10000^(-i/(dim/2)), computed in fp64 and returned as fp32: (B,) -> (B, dim)."""
    half = dim // 2
    pos = t.to(torch.float64)
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(pos, omega)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float()


def rope_angles(cfg: DiTConfig, f: int, h: int, w: int, frame_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (f*h*w, hd/2) of Wan's 3D RoPE: columns split (frame, row, column) as cfg.rope_split()."""
    cols = cfg.rope_split()

    def axis(n_cols: int, positions: torch.Tensor) -> torch.Tensor:
        n = 2 * n_cols
        inv = 1.0 / torch.pow(cfg.rope_theta, torch.arange(0, n, 2, dtype=torch.float64) / n)
        return torch.outer(positions.to(torch.float64), inv)  # (P, n_cols)

    af = axis(cols[0], torch.arange(frame_offset, frame_offset + f))
    ah = axis(cols[1], torch.arange(h))
    aw = axis(cols[2], torch.arange(w))
    ang = torch.cat([af[:, None, None, :].expand(f, h, w, -1),
                     ah[None, :, None, :].expand(f, h, w, -1),
                     aw[None, None, :, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)
    return torch.cos(ang).float(), torch.sin(ang).float()


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine parameters too) and cast back: Wan's norm1/2/3, head.norm, img_emb norms.

    Wan runs these under fp32 autocast and diffusers as FP32LayerNorm; a bf16 model must not normalise in bf16.
    """

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q = WanRMSNorm(D, cfg.eps)
        self.norm_k = WanRMSNorm(D, cfg.eps)

    def qkv(self, x, cos, sin):
        """(B, L, D) -> q, k, v (B, L, H, hd) with qk RMSNorm (over the full dim) and RoPE applied."""
        q = rms_norm_rope(self.q(x), self.norm_q.weight, cos, sin, self.num_heads, self.eps)
        k = rms_norm_rope(self.k(x), self.norm_k.weight, cos, sin, self.num_heads, self.eps)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        return q, k, v

    def forward(self, x, cos, sin):
        q, k, v = self.qkv(x, cos, sin)
        return self.o(attention(q, k, v).flatten(2))


class WanI2VCrossAttention(nn.Module):
    """Cross-attention over [CLIP image tokens | text tokens], plus FlashPortrait's NFEB expression branch."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q = WanRMSNorm(D, cfg.eps)
        self.norm_k = WanRMSNorm(D, cfg.eps)
        self.k_img = nn.Linear(D, D)
        self.v_img = nn.Linear(D, D)
        self.norm_k_img = WanRMSNorm(D, cfg.eps)
        self.emo_k_proj = nn.Linear(cfg.emo_dim, D, bias=False)
        self.emo_v_proj = nn.Linear(cfg.emo_dim, D, bias=False)
        self.norm_eps = NORM_EPS  # NFEB's normalisation epsilon (read by the sequence-parallel wrapper too)

    def context_kv(self, ctx_img, ctx_txt):
        """K/V of the image and text context, (B, N, H, hd) each; constant over a session."""
        H = self.num_heads
        k_txt = self.norm_k(self.k(ctx_txt)).unflatten(-1, (H, -1))
        v_txt = self.v(ctx_txt).unflatten(-1, (H, -1))
        k_img = self.norm_k_img(self.k_img(ctx_img)).unflatten(-1, (H, -1))
        v_img = self.v_img(ctx_img).unflatten(-1, (H, -1))
        return k_img, v_img, k_txt, v_txt

    def forward(self, x, ctx_img, ctx_txt, emo=None, ip_scale: float = 1.0, kv=None):
        """x (B, L, D) -> (B, L, D). `kv`: this module's `context_kv(ctx_img, ctx_txt)` computed once per session
        (then ctx_img / ctx_txt are not read); bit-identical to recomputing it.

        `ip_scale` is a float, or a (B,) tensor so the expression-guidance pair (ip_scale 0 and 1) can run as one
        batch of 2: the NFEB statistics are per sample, so each sample gets what its own pass would.
        """
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k_img, v_img, k_txt, v_txt = self.context_kv(ctx_img, ctx_txt) if kv is None else kv
        base = (attention(q, k_txt, v_txt) + attention(q, k_img, v_img)).flatten(2)
        per_sample = isinstance(ip_scale, torch.Tensor)
        if emo is not None and (per_sample or ip_scale != 0):
            emo_out = expression_attention(q, emo, self.emo_k_proj, self.emo_v_proj)
            scale = ip_scale.to(base.dtype).view(-1, 1, 1) if per_sample else ip_scale
            base = base + scale * normalise_to(emo_out, base, self.norm_eps)
        return self.o(base)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.eps
        self.norm1 = WanLayerNorm(D, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(cfg)
        self.norm3 = WanLayerNorm(D, cfg.eps, elementwise_affine=True)
        self.cross_attn = WanI2VCrossAttention(cfg)
        self.norm2 = WanLayerNorm(D, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D**0.5)

    def forward(self, x, e0, cos, sin, ctx_img, ctx_txt, emo=None, ip_scale: float = 1.0, kv=None):
        """x (B, L, D); e0 (B, 6, D) fp32 -> (B, L, D). Residual adds are done in fp32.

        `kv` is optional: this block's precomputed cross-attention context K/V (see WanModel.context_kv).
        """
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)
        y = self.self_attn(layer_norm_modulate(x, shift_sa, scale_sa, self.eps), cos, sin)
        x = (x.float() + y.float() * gate_sa).type_as(x)
        x = x + self.cross_attn(self.norm3(x), ctx_img, ctx_txt, emo, ip_scale, kv)
        y = self.ffn(layer_norm_modulate(x, shift_ff, scale_ff, self.eps))
        return (x.float() + y.float() * gate_ff).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.eps
        self.norm = WanLayerNorm(D, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(D, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, D) / D**0.5)

    def forward(self, x, e):
        """x (B, L, D), e (B, D) fp32 (the time embedding, not e0) -> (B, L, out_dim * prod(patch))."""
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return self.head(layer_norm_modulate(x, shift, scale, self.eps))


class MLPProj(nn.Module):
    """CLIP image tokens -> DiT width: LN -> Linear -> GELU(erf) -> Linear -> LN (keys img_emb.proj.{0,1,3,4})."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(WanLayerNorm(in_dim, eps=1e-5), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), WanLayerNorm(out_dim, eps=1e-5))

    def forward(self, x):
        return self.proj(x)


class WanModel(nn.Module):
    """Wan2.1 I2V DiT + NFEB. State-dict keys equal the original Wan / FlashPortrait `transformer.pt` keys."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.img_emb = MLPProj(cfg.clip_dim, D)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- pieces -----------------------------------------------------------------------------------------------
    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """umT5 output (B, n<=text_len, text_dim) zero-padded to text_len, and CLIP tokens -> (ctx_img, ctx_txt)."""
        n = context.shape[1]
        if n > self.cfg.text_len:
            raise ValueError(f"text context has {n} tokens, the DiT takes at most {self.cfg.text_len}: trim the umT5 "
                             f"output to its true length.")
        if n < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - n))
        dtype = self.patch_embedding.weight.dtype
        ctx_txt = self.text_embedding(context.to(dtype))
        ctx_img = self.img_emb(clip_fea.to(dtype))
        return ctx_img, ctx_txt

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) -> e (B, D) and e0 (B, 6, D), both fp32."""
        w = self.time_embedding[0].weight
        e = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t).to(w.dtype)).float()
        e0 = self.time_projection(e.to(w.dtype)).float().unflatten(1, (6, self.cfg.dim))
        return e, e0

    def patchify(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """cat(x, y) over channels -> Conv3d -> tokens (B, f*h*w, D) in frame-major order, contiguous."""
        w = self.patch_embedding.weight
        z = self.patch_embedding(torch.cat([x, y], dim=1).to(w.dtype))
        grid = tuple(z.shape[2:])
        # contiguous: elementwise ops keep their input's memory layout, so a transposed view here would keep the
        # whole residual stream D-major through every block and make each LayerNorm reduce over strided memory
        return z.flatten(2).transpose(1, 2).contiguous(), grid

    def rope(self, grid: tuple[int, int, int], device=None, frame_offset: int = 0):
        """cos/sin (L, hd/2) fp32 for a token grid, cached (local positions start at frame_offset)."""
        device = device or self.patch_embedding.weight.device
        key = (*grid, frame_offset, str(device))
        if key not in self._rope_cache:
            cos, sin = rope_angles(self.cfg, *grid, frame_offset=frame_offset)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, c*pt*ph*pw), each token laid out (pt, ph, pw, c) -> (B, c, f*pt, h*ph, w*pw)."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        B = out.shape[0]
        u = out.view(B, f, h, w, pt, ph, pw, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", u).reshape(B, c, f * pt, h * ph, w * pw)

    # --- whole pass -------------------------------------------------------------------------------------------
    def context_kv(self, ctx_img: torch.Tensor, ctx_txt: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Every block's cross-attention K/V of the (fixed) context: [(k_img, v_img, k_txt, v_txt)] per block,
        each (B, N, H, hd). Compute once per session and pass as `kv` to skip 4 projections + 2 RMSNorms of 769
        context tokens per block per pass; results are bit-identical."""
        return [block.cross_attn.context_kv(ctx_img, ctx_txt) for block in self.blocks]

    def forward_tokens(self, tokens, e, e0, cos, sin, ctx_img, ctx_txt, emo=None, ip_scale: float = 1.0, kv=None):
        """All blocks and the head on patchified tokens: (B, L, D) -> (B, L, out_dim * prod(patch)).

        `kv`: optional `context_kv(ctx_img, ctx_txt)` (then ctx_img / ctx_txt may be None).
        """
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale, None if kv is None else kv[i])
        return self.head(tokens, e)

    def forward(self, x, t, context, clip_fea, y, emo=None, ip_scale: float = 1.0):
        """Flow prediction (B, out_dim, F, H, W) for noisy latent x at timesteps t."""
        ctx_img, ctx_txt = self.embed_context(context, clip_fea)
        tokens, grid = self.patchify(x, y)
        cos, sin = self.rope(grid, tokens.device)
        e, e0 = self.embed_time(t)
        if emo is not None:
            emo = emo.to(tokens.dtype)
        out = self.forward_tokens(tokens, e, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale)
        return self.unpatchify(out.float(), grid)
