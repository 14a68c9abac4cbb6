"""Optional FP8 (e4m3) weights for the DiT's linear layers, through torch's scaled matmul.

    quantize_linears(model)            # swaps every nn.Linear under model.blocks for an Fp8Linear, in place
    y = fp8_linear(x)                  # x (..., in) bf16 -> (..., out) bf16

Weights are quantized once (per output row by default, or one scale per tensor); activations are quantized on the
fly per token (rowwise) or per tensor, with scales computed on the device, so a call never syncs with the host and
captures into a CUDA graph. `torch._scaled_mm` needs sm89+ on CUDA (H100: 2x the bf16 matmul rate); elsewhere
(CPU, older GPUs) the same numbers go through a dequantized matmul, so accuracy can be checked anywhere.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def _scales(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """fp32 scale so that x / scale spans e4m3: (rows, 1) per row, or a 0-dim tensor for the whole tensor."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    return amax.float().clamp(min=1e-12) / E4M3_MAX


def quantize(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 (M, K), fp32 scale (M, 1) or ()), with x ~ q.float() * scale."""
    scale = _scales(x, rowwise)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def _scaled_mm_supported(device: torch.device, rowwise: bool, out_dtype: torch.dtype) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and _cpu_scaled_mm(rowwise, out_dtype)


@functools.cache
def _cpu_scaled_mm(rowwise: bool, out_dtype: torch.dtype) -> bool:
    """Whether this torch build's CPU scaled matmul takes these scales and output dtype (older builds have none;
    torch 2.11 has per-tensor scales only, later builds per-row too); the dequantized matmul serves the rest."""
    a = torch.ones(16, 16).to(E4M3)
    scale_a, scale_b = (torch.ones(16, 1), torch.ones(1, 16)) if rowwise else (torch.ones(()), torch.ones(()))
    try:
        bias = None if rowwise else torch.zeros(16, dtype=out_dtype)  # the per-tensor call fuses the bias
        torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Fp8Linear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features) with e4m3 weights: (..., in) -> (..., out) in x's dtype.

    Buffers: weight (out, in) e4m3, weight_scale (out, 1) fp32 per row or () per tensor, bias (out,) or None.
    """

    def __init__(self, linear: nn.Linear, rowwise: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rowwise = rowwise
        # decided once, here: a device query inside forward would break torch.compile's graph
        self.use_scaled_mm = _scaled_mm_supported(linear.weight.device, rowwise, linear.weight.dtype)
        w_q, w_scale = quantize(linear.weight.detach(), rowwise)
        self.register_buffer("weight", w_q)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {'rowwise' if self.rowwise else 'per-tensor'}"

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        x_q, x_scale = quantize(x2, self.rowwise)
        if self.use_scaled_mm and x.device.type == self.weight.device.type:
            # b must be column-major: the (out, in) row-major weight transposed is exactly that.
            w_scale = self.weight_scale.t() if self.rowwise else self.weight_scale  # (1, out) or ()
            fused_bias = self.bias if not self.rowwise else None  # rowwise kernels reject a fused bias on some builds
            y = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale, scale_b=w_scale, bias=fused_bias,
                                 out_dtype=x.dtype)
            if self.rowwise and self.bias is not None:
                y = y + self.bias
        else:
            y = ((x_q.float() * x_scale) @ self.dequantized_weight().t()).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _quantizable(linear: nn.Linear) -> bool:
    # scaled matmul tiles need both dims to be multiples of 16
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def quantize_linears(model: nn.Module, rowwise: bool = True, prefix: str = "blocks.") -> list[str]:
    """Swap every nn.Linear whose qualified name starts with `prefix` for an Fp8Linear, in place.

    The default prefix keeps the embeddings and the head (a small share of FLOPs, but the most precision-sensitive)
    in the model's dtype. Returns the names of the swapped modules.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.startswith(prefix) and _quantizable(child):
                setattr(module, child_name, Fp8Linear(child, rowwise))
                swapped.append(full)
    return swapped


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (one number per comparison; a sync, so never in the hot loop)."""
    out, ref = out.float(), ref.float()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30)).item()


@torch.no_grad()
def check_linear(linear: nn.Linear, x: torch.Tensor, rowwise: bool = True) -> float:
    """Relative error of the FP8 version of `linear` against the linear itself on input x."""
    return relative_error(Fp8Linear(linear, rowwise)(x), linear(x))
