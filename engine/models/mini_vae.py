"""The mini preset's video autoencoder: the Wan VAE's frame accounting at a size that trains on a CPU in minutes.

    vae = MiniVAE(MiniVAEConfig())
    z = vae.encode(video)        # (B, 3, 1+4k, H, W) in [-1, 1] -> (B, 16, 1+k, H/8, W/8), normalised
    video = vae.decode(z)        # (B, 16, T, h, w) -> (B, 3, 1+4(T-1), 8h, 8w) in [-1, 1]

Frame accounting as Wan2.1: latent 0 is frame 0 alone, latent i >= 1 is frames 4i-3 .. 4i; 16 latent channels,
8x spatial. The network is a per-frame 2D conv encoder (three stride-2 stages) whose features are merged over time
TAEHV-style: the first frame through `first_in` (1x1 conv), each later group of four frames' features concatenated
and merged by `group_in` (1x1 conv). The decoder mirrors it: `first_out` / `group_out` grow one latent into 1 or 4
frames' features, then a shared per-frame 2D decoder. A latent depends on its own frames only (causal, no memory),
so streaming decode is exact: `StreamingMiniDecoder` turns a stream's first latent into 1 frame and every later one
into 4, like the Wan VAE's and TAEHV's streaming decoders.

One latent space (`first_as_group`, the default): frame 0 is encoded as a group of four copies of itself, through
`group_in`, and a first latent decodes through `group_out` (the last of its four frames' features), so a stream's first
latent and the later ones live in the same space, as the Wan VAE's causal convs keep them. A context window that does
not start at the video's first latent treats its latent 0 as a "first" latent (the y mask, the per-window tokens);
that latent now decodes like any other. The first checkpoints used separate `first_in` / `first_out` maps (two
spaces: such a window's latent 0 decoded washed out); `first_as_group=False` builds that layout and
`load_mini_vae` picks it when the file has those keys.

Latents are normalised per channel with `latent_mean` / `latent_std` (buffers in the checkpoint, measured on the
training set after the autoencoder is trained), as Wan normalises with its fixed statistics.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MiniVAEConfig
from engine.weights import find_file, load_into, load_state_dict

MINI_VAE_FILE = "mini_vae.pt"


class ResBlock(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv1 = nn.Conv2d(n, n, 3, padding=1)
        self.conv2 = nn.Conv2d(n, n, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class FrameEncoder(nn.Module):
    """(N, 3, H, W) -> (N, C, H/8, W/8): three stride-2 convs and a residual block at the coarsest scale (the widths
    grow as the resolution falls, so every scale costs about the same)."""

    def __init__(self, cfg: MiniVAEConfig):
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.down1 = nn.Conv2d(3, c1, 4, stride=2, padding=1)
        self.down2 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)
        self.down3 = nn.Conv2d(c2, c3, 4, stride=2, padding=1)
        self.res3 = ResBlock(c3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.down2(F.silu(self.down1(x))))
        return self.res3(self.down3(x))


class FrameDecoder(nn.Module):
    """(N, C, h, w) -> (N, 3, 8h, 8w): a residual block, then three pixel-shuffle upsamplings, tanh output."""

    def __init__(self, cfg: MiniVAEConfig):
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.res3 = ResBlock(c3)
        self.up3 = nn.Conv2d(c3, 4 * c2, 3, padding=1)
        self.up2 = nn.Conv2d(c2, 4 * c1, 3, padding=1)
        self.up1 = nn.Conv2d(c1, 4 * 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_shuffle(self.up3(F.silu(self.res3(x))), 2)
        x = F.pixel_shuffle(self.up2(F.silu(x)), 2)
        x = F.pixel_shuffle(self.up1(F.silu(x)), 2)
        return torch.tanh(x)


class MiniVAE(nn.Module):
    """See the module docstring. Keys: encoder.*, group_in, group_out, decoder.*, latent_mean, latent_std (and
    first_in, first_out when not `first_as_group`)."""

    def __init__(self, cfg: MiniVAEConfig = MiniVAEConfig()):
        super().__init__()
        self.cfg = cfg
        c, z, s = cfg.channels[-1], cfg.z_dim, cfg.temporal_stride
        self.encoder = FrameEncoder(cfg)
        if not cfg.first_as_group:
            self.first_in = nn.Conv2d(c, z, 1)
            self.first_out = nn.Conv2d(z, c, 1)
        self.group_in = nn.Conv2d(s * c, z, 1)
        self.group_out = nn.Conv2d(z, s * c, 1)
        self.decoder = FrameDecoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(z))
        self.register_buffer("latent_std", torch.ones(z))

    def encode_first(self, f: torch.Tensor) -> torch.Tensor:
        """Frame features (N, C, h, w) -> unnormalised latents (N, z, h, w) of those frames as a stream's first."""
        if self.cfg.first_as_group:
            return self.group_in(f.repeat(1, self.cfg.temporal_stride, 1, 1))   # four copies, side by side
        return self.first_in(f)

    def decode_first(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised first latents (N, z, h, w) -> one frame's features (N, C, h, w)."""
        if self.cfg.first_as_group:
            s, c = self.cfg.temporal_stride, self.cfg.channels[-1]
            return self.group_out(z).view(z.shape[0], s, c, *z.shape[2:])[:, -1]
        return self.first_out(z)

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent_mean.view(1, -1, 1, 1, 1).float(), self.latent_std.view(1, -1, 1, 1, 1).float()

    # --- raw (unnormalised) latents: what training differentiates through --------------------------------------
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1+4k, H, W) -> unnormalised latents (B, z, 1+k, H/8, W/8)."""
        b, _, t, h, w = video.shape
        s = self.cfg.temporal_stride
        if video.dim() != 5 or (t - 1) % s or h % 8 or w % 8:
            raise ValueError(f"MiniVAE encodes videos of 1+4k frames shaped (B, 3, T, H, W) with H, W multiples of 8;"
                             f" got {tuple(video.shape)}.")
        f = self.encoder(video.transpose(1, 2).reshape(b * t, 3, h, w).to(self.group_in.weight.dtype))
        f = f.view(b, t, *f.shape[1:])                                        # (B, T, C, h, w)
        first = self.encode_first(f[:, 0])[:, :, None]                        # (B, z, 1, h, w)
        k = (t - 1) // s
        if k == 0:
            return first
        groups = f[:, 1:].reshape(b * k, s * f.shape[2], *f.shape[3:])       # 4 frames' features side by side
        rest = self.group_in(groups).view(b, k, -1, *f.shape[3:]).transpose(1, 2)
        return torch.cat([first, rest], dim=2)

    def decode_raw(self, z: torch.Tensor, first: bool = True) -> torch.Tensor:
        """Unnormalised latents (B, z, n, h, w) -> (B, 3, f, 8h, 8w); f = 1 + 4(n-1) if `first` else 4n."""
        b, _, n, h, w = z.shape
        s, c = self.cfg.temporal_stride, self.cfg.channels[-1]
        z = z.to(self.group_out.weight.dtype)
        feats = []
        if first:
            feats.append(self.decode_first(z[:, :, 0])[:, None])              # (B, 1, C, h, w)
            z = z[:, :, 1:]
        if z.shape[2]:
            m = z.shape[2]
            g = self.group_out(z.transpose(1, 2).reshape(b * m, -1, h, w))    # (B m, 4C, h, w)
            feats.append(g.view(b, m * s, c, h, w))
        f = torch.cat(feats, dim=1)
        frames = f.shape[1]
        out = self.decoder(f.reshape(b * frames, c, h, w))
        return out.view(b, frames, 3, 8 * h, 8 * w).transpose(1, 2)

    # --- normalised latents: what the DiT sees -----------------------------------------------------------------
    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return ((raw.float() - mean) / std).to(raw.dtype)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return (z.float() * std + mean).to(z.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1+4k, H, W) in [-1, 1] -> normalised latents (B, 16, 1+k, H/8, W/8)."""
        return self.normalise(self.encode_raw(video))

    @torch.no_grad()
    def encode_reference(self, image: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """Wan's I2V conditioning latent: image (B, 3, H, W) -> the encoding of [image, 4(latent_frames-1) zero
        frames], (B, 16, latent_frames, H/8, W/8)."""
        b, c, h, w = image.shape
        video = image.new_zeros(b, c, 1 + self.cfg.temporal_stride * (latent_frames - 1), h, w)
        video[:, :, 0] = image
        return self.encode(video)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, T, h, w) -> video (B, 3, 1+4(T-1), 8h, 8w) in [-1, 1]."""
        return self.decode_raw(self.denormalise(z), first=True).clamp(-1, 1)


class StreamingMiniDecoder:
    """decode(z): z (B, 16, n, h, w) -> (B, 3, f, 8h, 8w) in [-1, 1], f = 1 + 4(n-1) on a stream's first call and
    4n afterwards (the interface of the Wan VAE's StreamingDecoder). `reset()` starts a new stream."""

    def __init__(self, vae: MiniVAE):
        self.vae = vae
        self.first = True

    def reset(self) -> None:
        self.first = True

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode_raw(self.vae.denormalise(z), first=self.first).clamp(-1, 1)
        self.first = False
        return out


def load_mini_vae(weights_dir: str | os.PathLike | None, cfg: MiniVAEConfig = MiniVAEConfig(),
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MiniVAE:
    """Find `mini_vae.pt` under `weights_dir` and load it strictly (WeightsError names the file if missing)."""
    path = find_file(weights_dir, MINI_VAE_FILE, "mini autoencoder (train/train_mini.py writes it)")
    sd = load_state_dict(path)
    cfg = replace(cfg, first_as_group="first_in.weight" not in sd)   # the first checkpoints' two-space layout
    with torch.device("meta"):
        model = MiniVAE(cfg)
    load_into(model, sd, path, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)
