"""The 24 GB mode (`--low-vram`): the 14B DiT in FP8 on the GPU without ever holding it there in bf16.

    torch.manual_seed(0); dit = random_dit_blockwise(cfg, "cuda", torch.bfloat16, fp8=True)   # random weights
    dit = place_dit(cpu_dit, "cuda", fp8=True)     # loaded on the CPU, moved block by block

The model is built on the meta device (no memory); each block is then materialised on the device in bf16, filled
(seeded random weights, or the loaded CPU block's), and its linears are quantized to e4m3 at once
(kernels/fp8.quantize_linears), so the device holds the FP8 model plus one bf16 block at most: ~14 GB for the
14b preset instead of 28 GB. Embeddings, head and norms stay in bf16 (a small share, the most precision-sensitive).
Random weights are drawn exactly as `WanModel(cfg)` draws them from the global RNG (module by module, in
construction order), so a low-VRAM engine and a normal one with the same seed hold the same weights up to the FP8
rounding, and the networks built after the DiT get the same weights as before.

`release_encoders(engine)` drops CLIP, the Wan VAE encoder (the whole Wan VAE when the tiny decoder decodes) once a
session's conditioning exists: only the DiT, the expression encoders and the decoder stay on the device.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def default_init_(module: nn.Module, dim: int) -> None:
    """The weights `WanModel(cfg)` would get from the global RNG, drawn in the same order: each Linear / Conv /
    LayerNorm resets itself (pre-order, as constructed), then a module's own `modulation` (randn / sqrt(dim), made
    at the end of its __init__), RMSNorm weights 1. Built module by module, the model holds the numbers of the one
    built whole with the same seed."""
    from engine.models.dit import WanRMSNorm

    if isinstance(module, (nn.Linear, nn.Conv3d, nn.LayerNorm)):
        module.reset_parameters()
    for child in module.children():
        default_init_(child, dim)
    for name, p in module.named_parameters(recurse=False):
        if name == "modulation":
            p.copy_(torch.randn(p.shape, device=p.device) / dim ** 0.5)
        elif isinstance(module, WanRMSNorm):
            p.fill_(1.0)


def _materialise(module: nn.Module, device) -> nn.Module:
    return module.to_empty(device=device)  # a meta module: allocates only (fp32, as WanModel builds it)


@torch.no_grad()
def random_dit_blockwise(cfg, device, dtype: torch.dtype = torch.bfloat16, fp8: bool = False, rowwise: bool = True):
    """WanModel with the weights `WanModel(cfg)` gets on `device` from the global RNG (seed it first), made module
    by module in fp32 and cast to `dtype` at once; with fp8 each block's linears become Fp8Linear before the next
    block exists. The device holds at most one module in fp32 besides the model so far."""
    from engine.models.dit import WanModel
    from kernels.fp8 import quantize_linears

    with torch.device("meta"):
        model = WanModel(cfg)
    device = torch.device(device)
    for name, child in list(model.named_children()):
        modules = list(child) if name == "blocks" else [child]
        for module in modules:
            _materialise(module, device)
            default_init_(module, cfg.dim)
            module.to(dtype)
            if fp8 and name == "blocks":
                quantize_linears(module, rowwise=rowwise, prefix="")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def place_dit(model: nn.Module, device, fp8: bool = True, rowwise: bool = True) -> nn.Module:
    """Move a (CPU) WanModel to `device` block by block, quantizing each block's linears on arrival (fp8): the
    device never holds more than one block in the model's dtype."""
    from kernels.fp8 import quantize_linears

    for name, child in list(model.named_children()):
        if name == "blocks":
            for block in child:
                block.to(device)
                if fp8:
                    quantize_linears(block, rowwise=rowwise, prefix="")
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
