"""umT5-XXL text encoder (`models_t5_umt5-xxl-enc-bf16.pth`) and the on-disk prompt cache in front of it.

The prompt is fixed for a session, so the 5.7B-parameter encoder runs once per distinct prompt: `PromptEncoder`
looks the context up on disk by a hash of (prompt, checkpoint name, config, dtype); on a miss it loads the encoder,
encodes, writes the context, and frees the encoder before returning, so it is never resident while streaming.

    prompts = PromptEncoder(weights_dir, cache_dir, device="cuda")
    context = prompts.encode("a person talking")    # (L, 4096), L = true token count incl. </s>, L <= 512

Parameter names of `T5Encoder` are the original Wan keys (`token_embedding`, `blocks.i.attn.q`,
`blocks.i.ffn.gate.0`, `blocks.i.pos_embedding.embedding`, `norm`). The tokenizer is google/umt5-xxl's
`tokenizer.json`, read from the weights folder (Wan ships it under `google/umt5-xxl/`); nothing is downloaded.
Text is cleaned as Wan does (ftfy when installed, HTML unescape twice, whitespace collapsed).
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import html
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import T5Config
from engine.weights import WeightsError, find_file, load_into, load_state_dict

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_FILE = "google/umt5-xxl/tokenizer.json"
MAX_DISTANCE = 128  # relative-position buckets grow logarithmically up to this distance


def required_files() -> list[tuple[str, str]]:
    """Weight files this module loads, as (file name, what it is) for `flashlive doctor`."""
    return [(T5_FILE, "umT5-XXL text encoder (run once per prompt, then cached)"),
            (TOKENIZER_FILE, "umT5 tokenizer (shipped with Wan2.1 under google/umt5-xxl/)")]


# --- model -----------------------------------------------------------------------------------------------------
class T5LayerNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, no centring, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.type_as(self.weight)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bidirectional T5 buckets of rel = key - query: half the buckets for rel > 0; exact below num_buckets/4,
    logarithmic above, saturating at max_distance."""
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    log_bucket = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return bucket + torch.where(dist < exact, dist, log_bucket.clamp(max=half - 1))


class T5RelativeEmbedding(nn.Module):
    """Per-layer learned bias per (bucket, head): (lq, lk) -> (1, heads, lq, lk)."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        return self.embedding(relative_position_bucket(rel, self.num_buckets)).permute(2, 0, 1)[None]


class T5Attention(nn.Module):
    """Self-attention without logit scaling (T5 folds it into the weights); softmax in fp32."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim), bias (B or 1, heads, L, L) additive -> (B, L, dim)."""
        b, n = x.shape[0], self.num_heads
        q, k, v = (proj(x).view(b, -1, n, proj.out_features // n) for proj in (self.q, self.k, self.v))
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = F.softmax(logits.float(), dim=-1).type_as(logits)
        return self.o(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, n * v.shape[-1]))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)  # umT5: one table per layer

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(x.shape[1], x.shape[1]).to(x.dtype)
        if mask_bias is not None:
            bias = bias + mask_bias
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """umT5 encoder: ids (B, L) [+ mask (B, L), 1 = token] -> (B, L, dim) after the final norm."""

    def __init__(self, cfg: T5Config = T5Config()):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        mask_bias = None
        if mask is not None:  # padded keys get the most negative value, as Wan does
            mask_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
            mask_bias = mask_bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask_bias)
        return self.norm(x)


def load_t5_encoder(weights_dir: str | os.PathLike | None, cfg: T5Config = T5Config(),
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> T5Encoder:
    """Find `models_t5_umt5-xxl-enc-bf16.pth` and load it strictly (memory-mapped; WeightsError names the file)."""
    path = find_file(weights_dir, T5_FILE, "umT5-XXL text encoder")
    with torch.device("meta"):
        model = T5Encoder(cfg)
    load_into(model, load_state_dict(path), path, dtype=dtype, device=device)
    return model.eval()


# --- tokenizer -------------------------------------------------------------------------------------------------
def clean_prompt(text: str) -> str:
    """Wan's cleaning: ftfy (when installed), HTML unescape twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mis-decoded unicode; plain prompts are unchanged without it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def find_tokenizer(weights_dir: str | os.PathLike | None) -> Path:
    """`google/umt5-xxl/tokenizer.json` under `weights_dir`, or a tokenizer.json in any folder named like umt5."""
    path = find_file(weights_dir, TOKENIZER_FILE, "umT5 tokenizer")
    if "umt5" in path.parent.name.lower():
        return path
    for hit in sorted(Path(weights_dir).expanduser().rglob("tokenizer.json")):  # Wan also ships xlm-roberta's
        if "umt5" in hit.parent.name.lower():
            return hit
    raise WeightsError(f"Missing {TOKENIZER_FILE} (umT5 tokenizer): looked in {weights_dir} and its sub-folders; copy "
                       f"the google/umt5-xxl folder shipped with Wan2.1 into that folder.")


class UMT5Tokenizer:
    """Text -> ids (L,) with </s> last, L <= text_len (longer prompts are truncated before the </s>)."""

    def __init__(self, path: str | os.PathLike, text_len: int):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:
            raise WeightsError(f"{path} is not a tokenizers JSON file ({type(err).__name__}): copy the "
                               f"google/umt5-xxl folder shipped with Wan2.1 again.") from None
        self.eos = self.tokenizer.token_to_id("</s>")
        if self.eos is None:
            raise WeightsError(f"{path} has no </s> token, so it is not the umT5 tokenizer: use the "
                               f"google/umt5-xxl/tokenizer.json shipped with Wan2.1.")
        self.text_len = text_len

    def __call__(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(clean_prompt(text), add_special_tokens=False).ids
        return torch.tensor(ids[:self.text_len - 1] + [self.eos], dtype=torch.long)


# --- prompt cache ----------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PromptEncoder:
    """Prompt -> umT5 context (L, dim), cached on disk; the encoder lives only for the duration of a cache miss.

    `hits` / `misses` count lookups. A cache hit needs neither the checkpoint nor the tokenizer. On a miss the
    encoder runs on `device` in `dtype` (bf16 on CUDA: about 11 GiB for a few seconds, freed before returning).
    """

    def __init__(self, weights_dir: str | os.PathLike | None, cache_dir: str | os.PathLike,
                 cfg: T5Config = T5Config(), device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
        self.weights_dir = weights_dir
        self.cache_dir = Path(cache_dir).expanduser()
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.hits = self.misses = 0

    def cache_path(self, prompt: str) -> Path:
        key = json.dumps({"prompt": prompt, "checkpoint": T5_FILE, "config": dataclasses.asdict(self.cfg),
                          "dtype": _dtype_name(self.dtype)}, sort_keys=True)
        return self.cache_dir / f"umt5-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        path = self.cache_path(prompt)
        if path.is_file():
            self.hits += 1
            return load_file(str(path))["context"].to(self.device, self.dtype)
        self.misses += 1
        ids = UMT5Tokenizer(find_tokenizer(self.weights_dir), self.cfg.text_len)(prompt)
        model = load_t5_encoder(self.weights_dir, self.cfg, self.device, self.dtype)
        try:
            context = model(ids[None].to(self.device))[0]
        finally:
            del model  # the encoder must not stay resident once the context exists
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"context": context.contiguous().cpu()}, str(tmp), metadata={"prompt": prompt[:1000]})
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
        return context
