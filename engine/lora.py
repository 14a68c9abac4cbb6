"""Merge a LightX2V-format LoRA (FlashPortrait's `fast_lora_rank64.safetensors`) into DiT weights, in place.

Key forms (after an optional `diffusion_model.` prefix; LightX2V also strips `model.` and `unet.`, and so do we),
where X is an original Wan DiT path such as `blocks.3.self_attn.q`:

    X.lora_down.weight (r, in) + X.lora_up.weight (out, r)   ->  X.weight += s * up @ down
    X.lora_A.weight    (r, in) + X.lora_B.weight (out, r)    ->  same (A = down, B = up; `.weight` optional)
    X.alpha  (scalar)                                           ->  per-pair alpha, see `alpha_mode`
    X.diff   (shape of X.weight, or of X itself)             ->  X.weight += strength * diff   (or X += ...)
    X.diff_b (shape of X.bias)                               ->  X.bias   += strength * diff
    X.diff_m (shape of X.modulation), e.g. blocks.7.diff_m   ->  X.modulation += strength * diff

`alpha_mode` picks the pair scale s:
    "ignore" (default, FlashPortrait's applier): s = strength; `.alpha` keys are read and ignored.
    "rank"   (LightX2V's LoRALoader): s = strength * alpha / rank, alpha from `X.alpha`, else the `alpha` argument,
             else 1 (no scaling); diffs are multiplied by the `alpha` argument when it is given.

The merge runs on each weight's own device, accumulates in fp32 and writes back in the weight's dtype, so a bf16
model on the GPU is merged without a host round trip and without bf16 rounding of the update itself. Calling it
again with `strength=-strength` removes the update (up to one rounding of the weight's dtype).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, MutableMapping

import torch
from torch import nn

from engine.weights import WeightsError, load_state_dict

PREFIXES = ("diffusion_model.", "model.", "unet.")
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
          (".lora_down", ".lora_up"), (".lora_A", ".lora_B"))
_DIFFS = ((".diff_b", ".bias"), (".diff_m", ".modulation"), (".diff", ".weight"))


@dataclass(frozen=True)
class LoRAUpdate:
    """One parsed entry: a low-rank pair (down (r, in), up (out, r)) or a dense diff, for parameter `target`."""

    target: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    alpha: float | None = None
    source: str = ""


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def parse_lora(lora: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> list[LoRAUpdate]:
    """Pair up the LoRA keys and resolve each to a parameter name of `params` (state-dict names).

    Raises WeightsError naming the first few keys that match no parameter or have no partner.
    """
    keys = {_strip(k): k for k in lora}
    alphas = {k[: -len(".alpha")]: float(lora[v].float().reshape(-1)[0]) for k, v in keys.items() if k.endswith(".alpha")}
    used: set[str] = {k for k in keys if k.endswith(".alpha")}
    updates: list[LoRAUpdate] = []
    unknown: list[str] = []
    for key in sorted(keys):
        if key in used:
            continue
        for down_sfx, up_sfx in _PAIRS:
            if key.endswith(down_sfx):
                base = key[: -len(down_sfx)]
                up_key = base + up_sfx
                if up_key not in keys:
                    raise WeightsError(f"LoRA key {keys[key]} has no matching {up_sfx} partner: the LoRA file is "
                                       f"incomplete, download it again.")
                used.update((key, up_key))
                target = base + ".weight"
                if target not in params:
                    unknown.append(keys[key])
                    break
                updates.append(LoRAUpdate(target, down=lora[keys[key]], up=lora[keys[up_key]],
                                          alpha=alphas.get(base), source=keys[key]))
                break
        else:
            for diff_sfx, param_sfx in _DIFFS:
                if key.endswith(diff_sfx):
                    base = key[: -len(diff_sfx)]
                    target = base + param_sfx
                    if target not in params and diff_sfx == ".diff" and base in params:
                        target = base  # `X.diff` may name the parameter itself (e.g. a modulation table)
                    used.add(key)
                    if target not in params:
                        unknown.append(keys[key])
                    else:
                        updates.append(LoRAUpdate(target, diff=lora[keys[key]], source=keys[key]))
                    break
    leftovers = sorted(k for k in keys if k not in used)
    if unknown or leftovers:
        bad = (unknown + [keys[k] for k in leftovers])[:3]
        raise WeightsError(f"{len(unknown) + len(leftovers)} LoRA keys match no DiT parameter (e.g. {', '.join(bad)}): "
                           f"this LoRA was made for a different model; use the Wan2.1 I2V step-distillation LoRA.")
    return updates


def _named_tensors(target: nn.Module | MutableMapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(target, nn.Module):
        named = dict(target.named_parameters())
        named.update(target.named_buffers())
        return named
    return dict(target)


@torch.no_grad()
def merge_lora(target: nn.Module | MutableMapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
               strength: float = 1.0, alpha_mode: str = "ignore", alpha: float | None = None) -> list[str]:
    """Add the LoRA to `target` (a WanModel or a state dict with original Wan key names) in place.

    lora: the LoRA state dict (any of the key forms in the module docstring). Returns the merged parameter names.
    Shapes are checked before anything is written, so a mismatching LoRA leaves the weights untouched.
    """
    if alpha_mode not in ("ignore", "rank"):
        raise ValueError(f"alpha_mode must be 'ignore' (FlashPortrait) or 'rank' (LightX2V), got {alpha_mode!r}.")
    params = _named_tensors(target)
    updates = parse_lora(lora, params)
    for u in updates:
        shape = params[u.target].shape
        got = (u.up.shape[0], u.down.shape[1]) if u.diff is None else tuple(u.diff.shape)
        ok = (u.diff is None and u.up.shape[1] == u.down.shape[0] and got == tuple(shape)) or \
             (u.diff is not None and u.diff.numel() == params[u.target].numel())
        if not ok:
            raise WeightsError(f"LoRA entry {u.source} has shape {got} but {u.target} is {tuple(shape)}: this LoRA "
                               f"was made for a different model size; use the one matching your DiT.")
    for u in updates:
        p = params[u.target]
        if u.diff is not None:
            scale = strength * (alpha if alpha_mode == "rank" and alpha is not None else 1.0)
            delta = u.diff.to(p.device, torch.float32).reshape(p.shape) * scale
        else:
            scale = strength
            if alpha_mode == "rank":
                a = u.alpha if u.alpha is not None else alpha
                if a is not None:
                    scale *= a / u.down.shape[0]
            up = u.up.to(p.device, torch.float32)
            down = u.down.to(p.device, torch.float32)
            delta = (up @ down).mul_(scale)
        p.copy_((p.float() + delta).to(p.dtype))
    return [u.target for u in updates]


def load_and_merge_lora(model: nn.Module, path: str | os.PathLike, strength: float = 1.0,
                        alpha_mode: str = "ignore") -> list[str]:
    """Read a LoRA file (.safetensors / .pt) and merge it into `model`; returns the merged parameter names."""
    return merge_lora(model, load_state_dict(path), strength=strength, alpha_mode=alpha_mode)
