"""Find, read and check checkpoints. Never downloads: a missing file is one sentence naming it and the folder.

Every loader in the engine goes through `load_state_dict` (safetensors, or torch.load with mmap and
weights_only so no pickle code ever runs) and `load_into` (key/shape check with a short summary, then
`load_state_dict(assign=True)` so a module built on the meta device never holds two copies).

Memory: both readers return tensors backed by a private, read-only-in-practice file mapping, so reading a
checkpoint costs no RAM until a tensor is touched. `load_into` converts one tensor at a time to the target
dtype/device and tells the kernel to drop the source pages it just read, so the peak host memory of a load is
about one copy of the model (measured by bench/load_memory.py). When the file already has the target dtype and
the target is the CPU, the parameters are the mapped file pages themselves (zero copy).

The DiT loaders (`load_dit`, `load_portrait_encoder`) and `scan_weights` (what `flashlive doctor --weights DIR`
prints) know the published file names; DiT checkpoints in the diffusers layout are converted to the original Wan keys
by `engine/models/dit_keys.py`.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from engine.file_check import is_onnx_model
from engine.models.dit_keys import normalise_dit_keys

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
    hit = _search(root, names)
    if hit is None:
        raise WeightsError(f"Missing {names[0]} ({what}): looked in {root} and its sub-folders; download it "
                           f"(see README, 'Weights') into that folder.")
    return hit


def _search(root: Path, names: list[str]) -> Path | None:
    for name in names:
        direct = root / name
        if direct.exists():
            return direct
    for name in names:
        hits = sorted(root.rglob(Path(name).name))
        if hits:
            return hits[0]
    return None


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _unreadable(path: Path, why: str) -> WeightsError:
    return WeightsError(f"{path} could not be read ({why}); it is truncated or not a checkpoint: download it again.")


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes, offsets), checked against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _unreadable(path, f"{size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise _unreadable(path, f"header length {n} exceeds the file")
        try:
            header = json.loads(fh.read(n))
        except ValueError as err:
            raise _unreadable(path, f"bad header: {err}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise _unreadable(path, f"{size} bytes on disk, header says {8 + n + end}")
    header["__data_start__"] = 8 + n
    return header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # Own reader rather than safetensors.load_file: that one copies every tensor into fresh memory, this one
    # maps the file privately (as torch.load(mmap=True) does) so untouched tensors cost nothing.
    header = safetensors_header(path)
    start = header.pop("__data_start__")
    header.pop("__metadata__", None)
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(os.fspath(path), False, size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    sd = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise _unreadable(path, f"unsupported dtype {info['dtype']} for {name}")
        a, b = info["data_offsets"]
        chunk = raw[start + a:start + b]
        esize = torch.empty(0, dtype=dtype).element_size()
        if (start + a) % esize:
            chunk = chunk.clone()  # misaligned writer: one copy of this tensor only
        sd[name] = chunk.view(dtype).reshape(info["shape"])
    return sd


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    # ZeRO / trainer dumps nest the tensors one level down.
    for key in ("state_dict", "module", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors: point --weights at the original checkpoint files.")
    return dict(obj)


def load_state_dict(path: str | os.PathLike, strip_prefix: str | Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Read a .safetensors / .pt / .pth / .bin file to CPU tensors backed by a private file mapping."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Missing checkpoint {path}: download it into {path.parent}.")
    try:
        if path.suffix == ".safetensors":
            sd = _read_safetensors(path)
        else:
            try:
                obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as err:
                if "mmap can only be used" not in str(err):
                    raise
                # legacy (pre-zip) torch.save format cannot be mapped: read it whole, still weights_only
                obj = torch.load(path, map_location="cpu", weights_only=True)
            sd = _unwrap(obj, path)
    except WeightsError:
        raise
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise WeightsError(f"{path} holds Python objects besides tensors, which FlashLive never unpickles "
                               f"(weights_only): point --weights at the published checkpoint, not a re-saved "
                               f"training state.") from None
        raise _unreadable(path, f"UnpicklingError: {str(err).splitlines()[0][:120]}") from None
    except Exception as err:  # truncated zip, bad header
        raise _unreadable(path, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}") \
            from None
    if isinstance(strip_prefix, str):
        strip_prefix = [strip_prefix]
    for prefix in strip_prefix:
        if prefix and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def load_sharded(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every shard named by a `*.safetensors.index.json` (its `weight_map`); tensors stay file-mapped."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{index_path} is not a shard index ({type(err).__name__}): download the "
                           f"*.index.json again.") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise WeightsError(f"Missing shard {shard_path} named by {index_path.name}: download it into "
                               f"{index_path.parent}.")
        part = load_state_dict(shard_path)
        listed = {k for k, v in weight_map.items() if v == shard}
        if not listed <= set(part):
            absent = sorted(listed - set(part))
            raise WeightsError(f"{shard_path} lacks {_summary(absent)} listed in {index_path.name}: download the "
                               f"shard again.")
        sd.update(part)
    return sd


# --------------------------------------------------------------------------------------------------------------
# Checking and loading into modules
# --------------------------------------------------------------------------------------------------------------
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
    if expected and sd and not any(k in expected for k in sd):
        problems.append(f"none of its {len(sd)} keys belong to this model (e.g. {next(iter(sd))}), so it is a "
                        f"different model's checkpoint")
    else:
        if wrong:
            problems.append(f"shape mismatch in {_summary(wrong, 2)}")
        if strict and missing:
            problems.append(f"missing keys {_summary(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys {_summary(unexpected)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}: {'; '.join(problems)}; check that the "
                           f"file is the right checkpoint for this model and preset.")


_libc = None


def _drop_pages(t: torch.Tensor) -> None:
    """Tell the kernel it may drop the file-mapped pages under `t` (re-read from disk if touched again).

    Used after a tensor was converted into a new allocation so a load never keeps the source file resident.
    Only whole pages strictly inside the tensor are released; on anything but Linux this is a no-op.
    """
    global _libc
    if not hasattr(os, "sysconf") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a, b = -(-start // page) * page, (end // page) * page
    if b > a:
        _libc.madvise(a, b - a, mmap.MADV_DONTNEED)


_CKPT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file mappings of checkpoint files (from /proc/self/maps; [] elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].rstrip().endswith(_CKPT_SUFFIXES):
            a, b = parts[0].split("-")
            ranges.append((int(a, 16), int(b, 16)))
    return ranges


def _in_ranges(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    # Only pages of a checkpoint file mapping may be released: on anonymous memory MADV_DONTNEED would zero data.
    if t.device.type != "cpu" or not ranges:
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return any(a <= start and end <= b for a, b in ranges)


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str | os.PathLike, *,
              strict: bool = True, optional: Iterable[str] = (), dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> nn.Module:
    """Check, then load `sd` into `module` with assign=True (works for modules built on the meta device).

    Tensors are moved one at a time to `device` (default: CPU) and floating ones cast to `dtype`; a source
    page read for a conversion is released right after it. Keys listed in `optional` that are absent keep the
    module's values; on the meta device they are zero-filled (FlashPortrait's zero init of emo_k/v_proj).
    """
    check_keys(module, sd, source, strict=strict, optional=optional)
    device = torch.device(device) if device is not None else torch.device("cpu")
    own = module.state_dict()
    mapped = _checkpoint_mappings()
    full = {}
    for k, ref in own.items():
        if k in sd:
            src = sd[k]
            t = src.to(device=device, dtype=dtype if (dtype is not None and src.is_floating_point()) else None)
            if t.data_ptr() != src.data_ptr() and _in_ranges(src, mapped):
                _drop_pages(src)
            full[k] = t
        elif ref.is_meta:
            full[k] = torch.zeros(ref.shape, dtype=dtype or ref.dtype, device=device)
        elif not strict or any(k.endswith(o) for o in optional):
            full[k] = ref
    module.load_state_dict(full, strict=False, assign=True)
    return module


# --------------------------------------------------------------------------------------------------------------
# Published files
# --------------------------------------------------------------------------------------------------------------
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WAN_SINGLE = "diffusion_pytorch_model.safetensors"
FLASHPORTRAIT_DIT = "transformer.pt"
PORTRAIT_ENCODER = "portrait_encoder.pt"
NFEB_OPTIONAL = ("cross_attn.emo_k_proj.weight", "cross_attn.emo_v_proj.weight")


def _optional_search(weights_dir, names) -> Path | None:
    root = Path(weights_dir).expanduser()
    return _search(root, list(names)) if root.is_dir() else None


def _dit_key_names(p: Path) -> set[str]:
    """Tensor names of a safetensors file or shard index, from headers only; empty if unreadable."""
    try:
        if p.name.endswith(".index.json"):
            return set(json.loads(p.read_text())["weight_map"])
        return {k for k in safetensors_header(p) if not k.startswith("__")}
    except (OSError, ValueError, KeyError, TypeError, WeightsError):
        return set()


def find_wan_base(weights_dir: str | os.PathLike) -> Path | None:
    """The Wan DiT base checkpoint under `weights_dir`: a shard index or a single safetensors file holding DiT keys.

    Several files share the diffusers name `diffusion_pytorch_model.safetensors` (the VAE's too), so candidates
    are told apart by their tensor names; index files win over single files.
    """
    root = Path(weights_dir).expanduser()
    if not root.is_dir():
        return None
    for name in (WAN_INDEX, WAN_SINGLE):
        for p in sorted(root.rglob(name)):
            keys = _dit_key_names(p)
            if "patch_embedding.weight" in keys and any(k.startswith("blocks.") for k in keys):
                return p
            if not keys:  # unreadable: hand it to the loader so the user gets its error
                return p
    return None


def dit_sources(weights_dir: str | os.PathLike) -> list[Path]:
    """The DiT files to read, base first: Wan shards (index or single file), then FlashPortrait transformer.pt."""
    find_file(weights_dir, [FLASHPORTRAIT_DIT, WAN_INDEX, WAN_SINGLE], "FlashPortrait / Wan2.1 DiT")
    base = find_wan_base(weights_dir)
    fp = _optional_search(weights_dir, [FLASHPORTRAIT_DIT])
    if base is None and fp is None:
        raise WeightsError(f"No Wan2.1 DiT checkpoint under {weights_dir}: the diffusion_pytorch_model files found "
                           f"there hold no DiT weights; download FlashPortrait {FLASHPORTRAIT_DIT} or the Wan2.1 "
                           f"I2V shards.")
    return [p for p in (base, fp) if p is not None]


def read_dit_state_dict(paths: Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Merge DiT checkpoints in order (later files override, as FlashPortrait loads transformer.pt over Wan)."""
    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        p = Path(p)
        part = load_sharded(p) if p.name.endswith(".index.json") else load_state_dict(p)
        try:
            sd.update(normalise_dit_keys(part))
        except WeightsError as err:
            raise WeightsError(f"{p} is not a Wan2.1 DiT checkpoint ({err.args[0].split(':')[0]}): point --weights "
                               f"at the Wan2.1 / FlashPortrait files.") from None
    return sd


def _preset_hint(sd: Mapping[str, torch.Tensor]) -> str:
    w = sd.get("patch_embedding.weight")
    if w is None:
        return ""
    from engine.config import PRESETS

    names = [n for n, p in PRESETS.items() if p.dit.dim == w.shape[0]]
    return f" (its width {w.shape[0]} matches preset {names[0]}: pass --preset {names[0]})" if names else ""


def build_dit(cfg, *, meta: bool = True):
    """An uninitialised WanModel (parameters on the meta device, no memory) ready for `load_into`."""
    from engine.models.dit import WanModel

    if not meta:
        return WanModel(cfg)
    with torch.device("meta"):
        return WanModel(cfg)


@torch.no_grad()
def random_dit(cfg, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """WanModel with seeded random weights made directly on `device` in `dtype` (no fp32 copy, so the 14b fits one
    GPU), scaled for unit-variance activations so 40 blocks stay finite; the same seed gives the same weights on
    every rank. For timing and benches where no checkpoint exists."""
    model = build_dit(cfg).to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("modulation"):
            p.normal_(0, cfg.dim ** -0.5, generator=gen)
        elif p.dim() >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:  # norm weights
            p.fill_(1.0)
    return model.eval().requires_grad_(False)


def load_dit(weights_dir: str | os.PathLike, cfg, *, dtype: torch.dtype = torch.bfloat16,
             device: torch.device | str = "cpu", paths: Iterable[str | os.PathLike] | None = None):
    """WanModel with the published weights: Wan2.1 shards and/or FlashPortrait `transformer.pt` from `weights_dir`.

    Missing `emo_k_proj` / `emo_v_proj` (a plain Wan checkpoint) are zero-filled, as FlashPortrait initialises
    them. Returns the model in eval mode on `device` in `dtype`.
    """
    paths = list(paths) if paths is not None else dit_sources(weights_dir)
    sd = read_dit_state_dict(paths)
    model = build_dit(cfg)
    source = " + ".join(str(p) for p in paths)
    try:
        load_into(model, sd, source, optional=NFEB_OPTIONAL, dtype=dtype, device=device)
    except WeightsError as err:
        hint = _preset_hint(sd) if sd.get("patch_embedding.weight") is not None and \
            sd["patch_embedding.weight"].shape[0] != cfg.dim else ""
        raise WeightsError(err.args[0][:-1] + hint + ".") from None
    return model.eval().requires_grad_(False)


def load_portrait_encoder(weights_dir: str | os.PathLike, cfg, *, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu", path: str | os.PathLike | None = None):
    """PortraitEncoder from FlashPortrait's `portrait_encoder.pt`."""
    from engine.models.portrait_encoder import PortraitEncoder

    path = Path(path) if path is not None else find_file(weights_dir, PORTRAIT_ENCODER, "FlashPortrait portrait "
                                                                                       "encoder")
    sd = load_state_dict(path, strip_prefix=("module.",))
    with torch.device("meta"):
        model = PortraitEncoder(cfg)
    load_into(model, sd, path, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Doctor
# --------------------------------------------------------------------------------------------------------------
# (file names, what, required). The DiT is checked separately: either Wan shards or transformer.pt will do.
_OTHER_FILES = [
    (["pd_fpg.pth"], "PD-FGC expression encoder", True),
    (["face_det.onnx"], "face detector", True),
    (["face_landmark.onnx"], "face landmark model", True),
    (["Wan2.1_VAE.pth"], "Wan2.1 VAE", True),
    (["models_t5_umt5-xxl-enc-bf16.pth"], "umT5-XXL text encoder", True),
    (["google/umt5-xxl/tokenizer.json"], "umT5 tokenizer (ships with Wan2.1 under google/umt5-xxl/)", True),
    (["models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"], "CLIP ViT-H/14 image encoder", True),
    (["fast_lora_rank64.safetensors"], "4-step distillation LoRA (--fast)", False),
    (["fast_vae.pth", "taew2_1.pth"], "TAEHV tiny decoder (the real-time decode; without it the Wan VAE decodes)",
     False),
]


def _size(p: Path) -> str:
    n = p.stat().st_size
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _probe(p: Path) -> str:
    """Read the header / pickle index of a checkpoint (no tensor data); raises WeightsError if unreadable."""
    if p.suffix == ".onnx":
        if p.stat().st_size == 0:
            raise WeightsError(f"{p} is empty: download it again.")
        if not is_onnx_model(p):
            raise WeightsError(f"{p} is not an ONNX model (no ModelProto with a graph; a pickle or an HTML page "
                               "saved under that name?): download it again.")
        return f"ONNX model, {_size(p)}"
    if p.suffix == ".json" and not p.name.endswith(".index.json"):
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise WeightsError(f"{p} is not readable JSON ({type(err).__name__}): download it again.") from None
        return f"found, {_size(p)}"
    if p.name.endswith(".index.json"):
        sd = load_sharded(p)
    else:
        sd = load_state_dict(p)
    return f"{len(sd)} tensors, {_size(p)}"


def scan_weights(weights_dir: str | os.PathLike, preset) -> list[tuple[str, bool, str]]:
    """What `flashlive doctor --weights DIR` prints: one (file, ok, message) row per published file.

    The DiT and portrait-encoder files are checked key by key and shape by shape against `preset` (a
    ModelPreset or its name) without reading tensor data; other files are opened far enough to prove they
    are complete. Never raises for a checkpoint problem: it is reported in the row.
    """
    from engine.config import get_preset
    from engine.models.portrait_encoder import PortraitEncoder

    if isinstance(preset, str):
        preset = get_preset(preset)
    root = Path(weights_dir).expanduser()
    if not root.is_dir():
        return [(str(root), False, "weights folder does not exist: pass --weights DIR pointing at the downloads")]
    rows: list[tuple[str, bool, str]] = []

    base = find_wan_base(root)
    fp = _optional_search(root, [FLASHPORTRAIT_DIT])
    if base is None and fp is None:
        rows.append((FLASHPORTRAIT_DIT, False, f"missing: download FlashPortrait {FLASHPORTRAIT_DIT} (or the Wan2.1 "
                                               f"DiT shards) into {root}"))
    else:
        model = build_dit(preset.dit)
        for p in (x for x in (base, fp) if x is not None):
            try:
                sd = read_dit_state_dict([p])
                # a plain Wan checkpoint lacks the NFEB keys; FlashPortrait's transformer.pt is the full model
                check_keys(model, sd, p, strict=True, optional=NFEB_OPTIONAL)
                nfeb = all(f"blocks.0.{k}" in sd for k in NFEB_OPTIONAL)
                note = "with NFEB" if nfeb else "no NFEB keys (zero-filled: plain Wan2.1, no expression control)"
                rows.append((str(p), True, f"DiT for preset {preset.name}, {len(sd)} tensors, {note}"))
            except WeightsError as err:
                msg = err.args[0]
                if "shape mismatch" in msg:
                    msg = msg[:-1] + _preset_hint(read_dit_state_dict([p])) + "."
                rows.append((str(p), False, msg))
        if fp is None:
            rows.append((FLASHPORTRAIT_DIT, False, f"missing: without FlashPortrait {FLASHPORTRAIT_DIT} the "
                                                   f"expression blocks are zero; download it into {root}"))

    pe = _optional_search(root, [PORTRAIT_ENCODER])
    if pe is None:
        rows.append((PORTRAIT_ENCODER, False, f"missing: download FlashPortrait {PORTRAIT_ENCODER} into {root}"))
    else:
        try:
            with torch.device("meta"):
                enc = PortraitEncoder(preset.portrait)
            sd = load_state_dict(pe, strip_prefix=("module.",))
            check_keys(enc, sd, pe)
            rows.append((str(pe), True, f"portrait encoder, {len(sd)} tensors, {_size(pe)}"))
        except WeightsError as err:
            rows.append((str(pe), False, err.args[0]))

    for names, what, required in _OTHER_FILES:
        p = _optional_search(root, names)
        if p is None:
            rows.append((names[0], not required, f"{'missing' if required else 'optional, not found'}: {what}"
                                                  f"{'; download it into ' + str(root) if required else ''}"))
            continue
        try:
            rows.append((str(p), True, f"{what}, {_probe(p)}"))
        except WeightsError as err:
            rows.append((str(p), False, err.args[0]))
    return rows
