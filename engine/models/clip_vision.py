"""CLIP ViT-H/14 vision tower as Wan2.1 I2V uses it: the reference image -> 257 tokens x 1280 for the DiT's img_emb.

Weights are the `visual.*` keys of the full open-clip XLM-RoBERTa-large ViT-H/14 checkpoint
(`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, optionally under a `model.` prefix as FlashPortrait
saves it). The text tower, the last transformer block, `post_norm` and `head` are not used: Wan takes the output of
the penultimate block, without the final norm. Parameter names mirror the `visual.` keys.

    clip = load_clip_vision(weights_dir, device="cuda", dtype=torch.bfloat16)
    tokens = clip.encode(image)   # (B, 3, H, W) in [-1, 1] -> (B, 257, 1280)
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ClipVisionConfig
from engine.weights import find_file, load_into, load_state_dict

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

# open-clip / OpenAI CLIP pixel statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def required_files() -> list[tuple[str, str]]:
    """Weight files this module loads, as (file name, what it is) for `flashlive doctor`."""
    return [(CLIP_FILE, "CLIP ViT-H/14 image encoder (reference image tokens)")]


class SelfAttention(nn.Module):
    """Multi-head attention; `to_qkv` rows are laid out (3, heads, head_dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (b, heads, s, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, s, d))


class AttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(norm1 x), then x + mlp(norm2 x) with GELU(erf)."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.attn = SelfAttention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(d, int(d * cfg.mlp_ratio)), nn.GELU(), nn.Linear(int(d * cfg.mlp_ratio), d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipVision(nn.Module):
    """ViT vision tower up to its penultimate block: pixels (B, 3, S, S) normalised -> (B, 1 + (S/p)^2, width).

    Only `layers - 1` blocks are built (`transformer.0` .. `transformer.{layers-2}`); the last one never runs.
    """

    def __init__(self, cfg: ClipVisionConfig = ClipVisionConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.eps)
        self.transformer = nn.Sequential(*[AttentionBlock(cfg) for _ in range(cfg.layers - 1)])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.pos_embedding.dtype)).flatten(2).transpose(1, 2)  # (B, N, d)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.transformer(self.pre_norm(x))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S): bicubic resize without crop, then CLIP mean/std."""
        size = self.cfg.image_size
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x * 0.5 + 0.5 - mean) / std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Reference image(s) (B, 3, H, W) in [-1, 1] -> CLIP tokens (B, 257, 1280) for the DiT."""
        return self(self.preprocess(images))


def vision_state_dict(sd: dict[str, torch.Tensor], cfg: ClipVisionConfig) -> dict[str, torch.Tensor]:
    """The vision-tower keys of a full open-clip checkpoint, `visual.` stripped, minus the parts Wan never runs."""
    unused = (f"transformer.{cfg.layers - 1}.", "post_norm.", "head")
    out = {}
    for key, value in sd.items():
        if key.startswith("model."):
            key = key[len("model."):]
        if key.startswith("visual."):
            key = key[len("visual."):]
            if not key.startswith(unused):
                out[key] = value
    return out


def load_clip_vision(weights_dir: str | os.PathLike | None, cfg: ClipVisionConfig = ClipVisionConfig(),
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ClipVision:
    """Find the open-clip checkpoint under `weights_dir` and load its vision tower (WeightsError names the file)."""
    path = find_file(weights_dir, CLIP_FILE, "CLIP image encoder")
    sd = vision_state_dict(load_state_dict(path), cfg)
    with torch.device("meta"):
        model = ClipVision(cfg)
    load_into(model, sd, path, dtype=dtype, device=device)
    return model.eval()
