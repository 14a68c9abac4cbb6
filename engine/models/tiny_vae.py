"""TAEHV tiny video autoencoder in the taew2_1 key layout (`fast_vae.pth` / `taew2_1.pth`): the real-time decode path.

Keys are `encoder.{i}.*` / `decoder.{i}.*`, i the index in each nn.Sequential, exactly as the published file. The
network works on frames (N*T, C, H, W); time enters only through three kinds of block:
- MemBlock(n): relu(conv(cat[x_t, x_{t-1}]) + x_t), where x_{t-1} is the same block's input one step earlier
  (zeros at the start of a stream);
- TGrow(n, s): a 1x1 conv to s*n channels, read as s consecutive frames (first n channels = earlier frame);
- TPool(n, s): s consecutive frames stacked on channels, then a 1x1 conv back to n.

Frame accounting of the decoder (TGrow strides 1, 2, 2): every latent frame becomes 4 frames, and the first 3 frames
of a stream are start-up frames that are dropped. So a stream of T latents gives 4T - 3 = 1 + 4(T-1) frames, the
same count as the Wan VAE, and a streaming call with n latents returns 4n - 3 frames if it is the first call of the
stream, 4n otherwise. Decoding in any split equals decoding the whole sequence at once: each MemBlock keeps its
last input frame between calls.

Latents go in as the DiT produces them (Wan-normalised, no extra scale); frames come out in [-1, 1], NCTHW, like
`engine.models.vae.StreamingDecoder`, so the two decoders are interchangeable.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TinyVAEConfig
from engine.weights import WeightsError, find_file, load_into, load_state_dict

TINY_VAE_FILES = ("fast_vae.pth", "taew2_1.pth", "taew2_1.safetensors")

DECODER_TIME_STRIDES = (1, 2, 2)  # TGrow strides of the three decoder stages
ENCODER_TIME_STRIDES = (2, 2, 1)  # TPool strides of the three encoder stages
TIME_UPSCALE = 4
START_FRAMES = TIME_UPSCALE - 1  # frames of a stream's first latent that are start-up output and dropped


def required_files() -> list[tuple[str, str]]:
    """Weight files this module loads, as (file name, what it is) for `flashlive doctor`."""
    return [(TINY_VAE_FILES[0], "tiny VAE decoder, TAEHV taew2_1 format (real-time decode; taew2_1.pth also works)")]


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """x, past (N, n, H, W) -> relu(conv.4(relu(conv.2(relu(conv.0(cat[x, past]))))) + x)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(conv(2 * n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TPool(nn.Module):
    """(N*T, n, H, W) -> (N*T/s, n, H, W): s consecutive frames merged by a 1x1 conv (n, n*s)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


class TGrow(nn.Module):
    """(N*T, n, H, W) -> (N*T*s, n, H, W): a 1x1 conv (n*s, n) whose channel blocks are s frames, earliest first."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(-1, *x.shape[1:])


def build_decoder(cfg: TinyVAEConfig) -> nn.Sequential:
    c0, c1, c2 = cfg.channels
    s0, s1, s2 = DECODER_TIME_STRIDES
    return nn.Sequential(
        Clamp(), conv(cfg.latent_channels, c0), nn.ReLU(),
        MemBlock(c0), MemBlock(c0), MemBlock(c0), nn.Upsample(scale_factor=2), TGrow(c0, s0),
        conv(c0, c1, bias=False), MemBlock(c1), MemBlock(c1), MemBlock(c1), nn.Upsample(scale_factor=2), TGrow(c1, s1),
        conv(c1, c2, bias=False), MemBlock(c2), MemBlock(c2), MemBlock(c2), nn.Upsample(scale_factor=2), TGrow(c2, s2),
        conv(c2, c2, bias=False), nn.ReLU(), conv(c2, 3))


def build_encoder(cfg: TinyVAEConfig) -> nn.Sequential:
    n = cfg.encoder_channels
    s0, s1, s2 = ENCODER_TIME_STRIDES
    return nn.Sequential(
        conv(3, n), nn.ReLU(),
        TPool(n, s0), conv(n, n, stride=2, bias=False), MemBlock(n), MemBlock(n), MemBlock(n),
        TPool(n, s1), conv(n, n, stride=2, bias=False), MemBlock(n), MemBlock(n), MemBlock(n),
        TPool(n, s2), conv(n, n, stride=2, bias=False), MemBlock(n), MemBlock(n), MemBlock(n),
        conv(n, cfg.latent_channels))


def run_with_memory(layers: nn.Sequential, x: torch.Tensor, batch: int, memory: list) -> torch.Tensor:
    """Run `layers` over x (batch*T, C, H, W), frames of each sample in time order.

    `memory` holds, per MemBlock in order, its last input frame (batch, 1, C, H, W) from the previous call (empty
    list at the start of a stream: zeros); it is updated in place so the next call continues the stream.
    """
    m = 0
    for layer in layers:
        if isinstance(layer, MemBlock):
            xt = x.view(batch, -1, *x.shape[1:])  # (batch, T, C, H, W)
            if m == len(memory):
                memory.append(torch.zeros_like(xt[:, :1]))
            past = torch.cat([memory[m], xt[:, :-1]], dim=1).view_as(x)
            memory[m] = xt[:, -1:].clone()
            m += 1
            x = layer(x, past)
        else:
            x = layer(x)
    return x


class TinyVAE(nn.Module):
    """TAEHV with `encoder` (None for a decoder-only checkpoint) and `decoder` Sequentials in the taew2_1 layout.

    encode: video (B, 3, T, H, W) in [-1, 1], T padded to a multiple of 4 by repeating the last frame ->
    latents (B, 16, ceil(T/4), H/8, W/8). decode: latents (B, 16, T, h, w) -> (B, 3, 4T - 3, 8h, 8w) in [-1, 1].
    """

    def __init__(self, cfg: TinyVAEConfig = TinyVAEConfig(), encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg) if encoder else None
        self.decoder = build_decoder(cfg)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise WeightsError("This tiny VAE checkpoint has no encoder weights: use the Wan VAE to encode.")
        b, _, t, h, w = video.shape
        pad = -t % TIME_UPSCALE
        if pad:
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        x = (video.to(self.decoder[1].weight.dtype) * 0.5 + 0.5).transpose(1, 2).reshape(-1, 3, h, w)
        z = run_with_memory(self.encoder, x, b, [])
        return z.view(b, -1, *z.shape[1:]).transpose(1, 2)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return StreamingTinyDecoder(self).decode(z)


class StreamingTinyDecoder:
    """Decode latent frames as they arrive with TAEHV, each MemBlock keeping its last input between calls.

    decode(z): z (B, 16, n, h, w), n >= 1 -> (B, 3, f, 8h, 8w) in [-1, 1], f = 4n - 3 on the first call of a
    stream and 4n afterwards (see the module docstring). `reset()` starts a new stream.
    """

    def __init__(self, model: TinyVAE):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.memory: list[torch.Tensor] = []
        self.to_drop = START_FRAMES

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = z.shape
        x = z.to(self.model.decoder[1].weight.dtype).transpose(1, 2).reshape(b * t, c, h, w)
        y = run_with_memory(self.model.decoder, x, b, self.memory)
        y = y.view(b, -1, *y.shape[1:])[:, self.to_drop:]  # (B, frames, 3, H, W)
        self.to_drop = 0
        return y.clamp(0, 1).mul_(2).sub_(1).transpose(1, 2)


def _keep_last_tgrow_rows(model: TinyVAE, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TGrow stored with more output rows than this model emits keeps its LAST rows (the latest frames), as
    upstream TAEHV does when a checkpoint trained with more temporal upscaling is loaded."""
    sd = dict(sd)
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd:
            rows = layer.conv.weight.shape[0]
            if sd[key].shape[0] > rows:
                sd[key] = sd[key][-rows:]
    return sd


def load_tiny_vae(weights_dir: str | os.PathLike | None, cfg: TinyVAEConfig = TinyVAEConfig(),
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TinyVAE:
    """Find `fast_vae.pth` (or `taew2_1.pth`) under `weights_dir` and load it (WeightsError names the file)."""
    path = find_file(weights_dir, TINY_VAE_FILES, "tiny VAE decoder (TAEHV taew2_1 format)")
    sd = load_state_dict(path)
    with torch.device("meta"):
        model = TinyVAE(cfg, encoder=any(k.startswith("encoder.") for k in sd))
    load_into(model, _keep_last_tgrow_rows(model, sd), path, dtype=dtype, device=device)
    return model.eval()
