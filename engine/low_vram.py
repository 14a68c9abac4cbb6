"""The 24 GB mode (`--low-vram`): the 14B DiT in FP8 on the GPU without ever holding it there in bf16.

    dit = random_dit_blockwise(cfg, "cuda", torch.bfloat16, seed=0, fp8=True)   # random weights, block by block
    dit = place_dit(cpu_dit, "cuda", fp8=True)                                    # loaded on the CPU, moved block by block

The model is built on the meta device (no memory); each block is then materialised on the device in bf16, filled
(seeded random weights, or the loaded CPU block's), and its linears are quantized to e4m3 at once
(kernels/fp8.quantize_linears), so the device holds the FP8 model plus one bf16 block at most: ~14 GB for the
14b preset instead of 28 GB. Embeddings, head and norms stay in bf16 (a small share, the most precision-sensitive).
The random weights depend only on the seed and each module's name (one generator per top-level module), so a
low-VRAM engine and a normal one with the same seed hold the same weights up to the FP8 rounding.

`release_encoders(engine)` drops CLIP, the Wan VAE encoder (the whole Wan VAE when the tiny decoder decodes) once a
session's conditioning exists: only the DiT, the expression encoders and the decoder stay on the device.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn


@torch.no_grad()
def init_random_(module: nn.Module, dim: int, generator: torch.Generator) -> None:
    """Seeded random weights scaled for unit-variance activations (engine.weights.random_dit's rule): linears and
    convolutions ~ N(0, 1/fan_in), modulation ~ N(0, 1/dim), biases 0, norm weights 1."""
    for name, p in module.named_parameters():
        if name.endswith("modulation"):
            p.normal_(0, dim ** -0.5, generator=generator)
        elif p.dim() >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=generator)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def _generator(device, seed: int, name: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _materialise(module: nn.Module, device, dtype) -> nn.Module:
    return module.to(dtype).to_empty(device=device)  # a meta module: allocates only, in dtype


@torch.no_grad()
def random_dit_blockwise(cfg, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0, fp8: bool = False):
    """WanModel with seeded random weights made module by module on `device` in `dtype`; with fp8 each block's
    linears become Fp8Linear before the next block exists."""
    from engine.models.dit import WanModel
    from kernels.fp8 import quantize_linears

    with torch.device("meta"):
        model = WanModel(cfg)
    device = torch.device(device)
    for name, child in list(model.named_children()):
        if name == "blocks":
            for i, block in enumerate(child):
                _materialise(block, device, dtype)
                init_random_(block, cfg.dim, _generator(device, seed, f"blocks.{i}"))
                if fp8:
                    quantize_linears(block, prefix="")
        else:
            _materialise(child, device, dtype)
            init_random_(child, cfg.dim, _generator(device, seed, name))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def place_dit(model: nn.Module, device, fp8: bool = True) -> nn.Module:
    """Move a (CPU) WanModel to `device` block by block, quantizing each block's linears on arrival (fp8): the
    device never holds more than one block in the model's dtype."""
    from kernels.fp8 import quantize_linears

    for name, child in list(model.named_children()):
        if name == "blocks":
            for block in child:
                block.to(device)
                if fp8:
                    quantize_linears(block, prefix="")
        else:
            child.to(device)
    return model


def dit_bytes(model: nn.Module, device=None) -> int:
    """Bytes of the DiT's parameters and buffers (on `device` when given)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if device is None or t.device == torch.device(device))


def release_encoders(engine) -> list[str]:
    """Drop what only the conditioning needed (CLIP; the Wan VAE's encoder, or the whole Wan VAE when the tiny
    decoder decodes) and hand the memory back to the device; returns what was released."""
    released = []
    if getattr(engine, "clip", None) is not None:
        engine.clip = None
        released.append("clip")
    vae = getattr(engine, "vae", None)
    if vae is not None:
        if engine.options.decoder == "tiny" and getattr(engine, "tiny_vae", None) is not None:
            engine.vae = None
            released.append("wan_vae")
        else:
            vae.encoder = None
            vae.conv1 = None
            released.append("wan_vae_encoder")
    import gc

    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return released
