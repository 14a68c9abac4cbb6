"""Find, read and check checkpoints. Never downloads: a missing file is one sentence naming it and the folder.

Every loader in the engine goes through `load_state_dict` (safetensors, or torch.load with mmap and
weights_only so no pickle code ever runs) and `load_into` (key/shape check with a short summary, then
`load_state_dict(assign=True)` so a module built on the meta device never holds two copies).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn


class WeightsError(RuntimeError):
    """A checkpoint problem a user can fix; the message is one sentence naming the file and the fix."""


def find_file(weights_dir: str | os.PathLike | None, names: str | Iterable[str], what: str) -> Path:
    """Return the first of `names` found under `weights_dir` (searched recursively), else raise WeightsError."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if weights_dir is None:
        raise WeightsError(f"No weights folder given for {what} ({names[0]}): pass --weights DIR pointing at the "
                           f"downloaded checkpoints, or use --renderer preview / --random-weights.")
    root = Path(weights_dir).expanduser()
    if not root.is_dir():
        raise WeightsError(f"Weights folder {root} does not exist: pass --weights DIR pointing at the downloaded "
                           f"checkpoints.")
    for name in names:
        direct = root / name
        if direct.exists():
            return direct
    for name in names:
        hits = sorted(root.rglob(Path(name).name))
        if hits:
            return hits[0]
    raise WeightsError(f"Missing {names[0]} ({what}): looked in {root} and its sub-folders; download it "
                       f"(see README, 'Weights') into that folder.")


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    # ZeRO / trainer dumps nest the tensors one level down.
    for key in ("state_dict", "module", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors: point --weights at the original checkpoint files.")
    return dict(obj)


def load_state_dict(path: str | os.PathLike, strip_prefix: str | Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Read a .safetensors / .pt / .pth / .bin file to CPU tensors (memory-mapped where the format allows)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Missing checkpoint {path}: download it into {path.parent}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = _unwrap(torch.load(path, map_location="cpu", mmap=True, weights_only=True), path)
    except WeightsError:
        raise
    except Exception as err:  # truncated zip, bad header, pickle that is not plain tensors
        raise WeightsError(f"{path} could not be read ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                           f"it is truncated or not a checkpoint: download it again.") from None
    if isinstance(strip_prefix, str):
        strip_prefix = [strip_prefix]
    for prefix in strip_prefix:
        if prefix and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def _summary(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def check_keys(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str | os.PathLike, *,
               strict: bool = True, optional: Iterable[str] = ()) -> None:
    """Raise WeightsError if `sd` does not fit `module`: missing / unexpected keys (strict) or any shape mismatch.

    `optional` lists key suffixes that may be missing (they keep the module's initialisation).
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    optional = tuple(optional)
    missing = [k for k in expected if k not in sd and not (optional and k.endswith(optional))]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(s)}" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(s)]
    problems = []
    if wrong:
        problems.append(f"shape mismatch in {_summary(wrong, 2)}")
    if strict and missing:
        problems.append(f"missing keys {_summary(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_summary(unexpected)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}: {'; '.join(problems)}; check that the "
                           f"file is the right checkpoint for this model and preset.")


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str | os.PathLike, *,
              strict: bool = True, optional: Iterable[str] = (), dtype: torch.dtype | None = None) -> nn.Module:
    """Check, then load `sd` into `module` with assign=True (works for modules built on the meta device).

    Keys listed in `optional` that are absent keep the module's values; on the meta device they are zero-filled.
    """
    check_keys(module, sd, source, strict=strict, optional=optional)
    own = module.state_dict()
    full = {}
    for k, ref in own.items():
        if k in sd:
            t = sd[k]
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            full[k] = t
        elif ref.is_meta:
            full[k] = torch.zeros(ref.shape, dtype=dtype or ref.dtype)
        elif not strict or any(k.endswith(o) for o in optional):
            full[k] = ref
    module.load_state_dict(full, strict=False, assign=True)
    return module
