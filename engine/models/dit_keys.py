"""The Wan2.1 DiT's two key layouts: original (Wan / FlashPortrait, what `engine/models/dit.py` mirrors) and
diffusers' `WanTransformer3DModel`, converted both ways; trainer prefixes stripped.

    sd = normalise_dit_keys(torch.load(...))     # any published layout -> original Wan keys
    wan_to_diffusers(sd) / diffusers_to_wan(sd)  # tensors shared, keys renamed (a bijection)
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (original, diffusers) name pieces. Top-level entries match a key prefix; block entries match the part after
# `blocks.{i}.`. Order matters only where one piece is a prefix of another (`norm_k_img` before `norm_k`).
_TOP_MAP = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("patch_embedding.", "patch_embedding."),
]
_ATTN_MAP = [("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("o.", "to_out.0."),
             ("norm_q.", "norm_q."), ("norm_k.", "norm_k.")]
_BLOCK_MAP = (
    [(f"self_attn.{a}", f"attn1.{b}") for a, b in _ATTN_MAP]
    + [("cross_attn.k_img.", "attn2.add_k_proj."), ("cross_attn.v_img.", "attn2.add_v_proj."),
       ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
       # FlashPortrait's NFEB has no diffusers counterpart; kept under attn2 so the mapping is a bijection.
       ("cross_attn.emo_k_proj.", "attn2.emo_k_proj."), ("cross_attn.emo_v_proj.", "attn2.emo_v_proj.")]
    + [(f"cross_attn.{a}", f"attn2.{b}") for a, b in _ATTN_MAP]
    + [("modulation", "scale_shift_table"),
       # the affine cross-attention norm is norm3 in Wan and norm2 in diffusers (the plain ones swap too)
       ("norm3.", "norm2."), ("norm2.", "norm3."),
       ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2.")]
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.*)$")
# Keys only a diffusers checkpoint has; a hit means the converter must run.
_DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", "scale_shift_table")


def _rename(key: str, to_diffusers: bool) -> str:
    from engine.weights import WeightsError  # engine/weights.py reads checkpoints through this module

    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        for a, b in _BLOCK_MAP:
            src, dst = (a, b) if to_diffusers else (b, a)
            if rest.startswith(src):
                return f"blocks.{idx}.{dst}{rest[len(src):]}"
        raise WeightsError(f"Unknown Wan DiT block key {key!r}: this is not a Wan2.1 DiT checkpoint.")
    for a, b in _TOP_MAP:
        src, dst = (a, b) if to_diffusers else (b, a)
        if key.startswith(src):
            return dst + key[len(src):]
    raise WeightsError(f"Unknown Wan DiT key {key!r}: this is not a Wan2.1 DiT checkpoint.")


def wan_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan / FlashPortrait DiT keys -> diffusers `WanTransformer3DModel` keys (tensors shared)."""
    return {_rename(k, True): v for k, v in sd.items()}


def diffusers_to_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers `WanTransformer3DModel` keys -> original Wan keys (tensors shared); inverse of wan_to_diffusers."""
    return {_rename(k, False): v for k, v in sd.items()}


def is_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(_DIFFUSERS_MARKERS) or ".attn1." in k or ".attn2." in k for k in sd)


_DIT_PREFIXES = ("transformer3d.", "model.diffusion_model.", "diffusion_model.")


def normalise_dit_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip trainer prefixes (`transformer3d.`, `model.diffusion_model.`) and convert a diffusers layout."""
    sd = dict(sd)
    for prefix in _DIT_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return diffusers_to_wan(sd) if is_diffusers_layout(sd) else sd
