"""Wan2.1 causal 3D VAE (`Wan2.1_VAE.pth`): encode the reference once, decode latents chunk by chunk as they stream.

Parameter names are the original Wan keys (`encoder.downsamples.3.residual.2.weight`, `conv1`, `decoder.upsamples.
3.time_conv.weight`, ...), so the published file loads without renaming.

Every temporal convolution is causal: it looks at the current frame and the two before it. A `CausalCache` holds,
per temporal convolution, the last two input frames it saw, so a video can be pushed through in pieces and the
result equals one pass over the whole video. Two resamplers break the plain rule, exactly as Wan does:
- decoder `upsample3d` passes the very first latent frame through without its time convolution (one frame out, not
  two) and gives the second latent frame zero history; this is why T latents decode to 4(T-1)+1 frames;
- encoder `downsample3d` passes the very first frame through and afterwards sees one frame of history (stride 2).

    vae = load_vae(weights_dir, device="cuda", dtype=torch.bfloat16)
    z_ref = vae.encode(video)                # (B, 3, 1+4k, H, W) in [-1, 1] -> (B, 16, 1+k, H/8, W/8), normalised
    y_lat = vae.encode_reference(image, n)   # (B, 3, H, W) -> (B, 16, n, H/8, W/8): [image, zeros...] as Wan's y
    stream = StreamingDecoder(vae)
    frames = stream.decode(z[:, :, 0:3])     # (B, 3, 1+4*2, H, W): 1 frame for latent 0, then 4 per latent
    frames = stream.decode(z[:, :, 3:4])     # (B, 3, 4, H, W)

Latents are normalised as the DiT uses them: encode returns (mu - mean) / std, decode undoes it.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import VAEConfig
from engine.weights import find_file, load_into, load_state_dict

VAE_FILE = "Wan2.1_VAE.pth"

# Per-channel statistics of the Wan2.1 latent space (published with the checkpoint, not stored in it).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

CACHE_T = 2  # frames of history a temporal kernel of size 3 needs


def required_files() -> list[tuple[str, str]]:
    """Weight files this module loads, as (file name, what it is) for `flashlive doctor`."""
    return [(VAE_FILE, "Wan2.1 VAE (reference encode, full-quality decode)")]


class CausalCache:
    """Temporal history of one encode or decode stream: one slot per temporal convolution, visited in call order.

    `rewind()` before each chunk; every cached layer then takes the next slot. A slot holds the last input frames
    of its layer, (B, C, n, H, W), or None before the layer has seen any frame.
    """

    def __init__(self):
        self.slots: list[torch.Tensor | None] = []
        self.index = 0

    def rewind(self) -> None:
        self.index = 0

    def read(self) -> torch.Tensor | None:
        if self.index == len(self.slots):
            self.slots.append(None)
        return self.slots[self.index]

    def write(self, value: torch.Tensor) -> None:
        self.slots[self.index] = value
        self.index += 1

    def extend(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Prepend this slot's history (zeros at the start) to x along time and keep the last `frames` frames."""
        past = self.read()
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], frames, x.shape[3], x.shape[4])
        full = torch.cat([past, x], dim=2)
        self.write(full[:, :, -frames:].clone())  # clone: do not keep the whole concatenation alive
        return full


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time only in front (2p frames of history), spatially p on each side.

    x (B, C_in, T, H, W) -> (B, C_out, T, H, W); the history comes from `cache` (zeros at the start of a stream).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, (kt, kh, kw), stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.time_pad:
            x = cache.extend(x, self.time_pad) if cache is not None else F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        return super().forward(x)


class RMS_norm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and `gamma` (C,1,1,1), or (C,1,1) for images."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm over hundreds of bf16 channels is reduced in fp32, without an fp32 copy of the whole tensor.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
        return x * (self.scale / norm).to(x.dtype) * self.gamma


class ResidualBlock(nn.Module):
    """RMS_norm -> SiLU -> CausalConv3d(3) -> RMS_norm -> SiLU -> Dropout -> CausalConv3d(3), plus a 1x1x1 shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately: (B, C, T, H, W) -> same."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        identity = x
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)  # (b*t, 1, hw, c) each
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, with a temporal x2 step for the `*3d` modes.

    upsample3d: time_conv (2C, C, 3,1,1) turns each frame into two (first C channels = earlier frame), except the
    stream's first frame, which passes through alone. downsample3d: time_conv (C, C, 3,1,1) with stride 2 over
    [last frame of the previous chunk, this chunk]; the stream's first frame passes through.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"Unknown resample mode {mode!r}.")

    def _upsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        past = cache.read()
        first = None
        if past is None:
            first, x = x[:, :, :1], x[:, :, 1:]
            past = x.new_zeros(x.shape[0], x.shape[1], CACHE_T, x.shape[3], x.shape[4])
        full = torch.cat([past, x], dim=2)
        cache.write(full[:, :, -CACHE_T:].clone())
        if x.shape[2] == 0:
            return first
        b, c, t, h, w = x.shape
        y = nn.Conv3d.forward(self.time_conv, full)  # (b, 2c, t, h, w): history already in front
        y = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return y if first is None else torch.cat([first, y], dim=2)

    def _downsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        past = cache.read()
        cache.write(x[:, :, -1:].clone())
        if past is None:
            return x
        return self.time_conv(torch.cat([past, x], dim=2))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b, c, t, h, w = x.shape
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = x.view(b, t, *x.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x


def _run(layers: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample)) else layer(x)
    return x


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


class Encoder3d(nn.Module):
    """(B, 3, T, H, W) -> (B, 2*z_dim, T', H/8, W/8); one call per chunk of the Wan schedule ([0], [1:5], [5:9]...)."""

    def __init__(self, cfg: VAEConfig, dropout: float = 0.0):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1], dropout)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _run(self.head, x, cache)


class Decoder3d(nn.Module):
    """(B, z_dim, T, h, w) -> (B, 3, T_out, 8h, 8w); T_out = 1 + 4(T-1) on a stream's first chunk, else 4T."""

    def __init__(self, cfg: VAEConfig, dropout: float = 0.0):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * u for u in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous level's upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _run(self.head, x, cache)


class WanVAE(nn.Module):
    """Wan2.1 VAE. Keys: `encoder.*`, `conv1` (2z, 2z, 1,1,1), `conv2` (z, z, 1,1,1), `decoder.*`.

    encode: video (B, 3, 1+4k, H, W) in [-1, 1] -> normalised latent mu (B, z, 1+k, H/8, W/8).
    decode: normalised latent (B, z, T, h, w) -> video (B, 3, 1+4(T-1), 8h, 8w) in [-1, 1] (see StreamingDecoder).
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        if len(LATENT_MEAN) != cfg.z_dim:
            raise ValueError(f"VAEConfig.z_dim must be {len(LATENT_MEAN)} (the Wan2.1 latent statistics).")
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean, std as fp32 (1, z, 1, 1, 1) tensors on this model's device."""
        device = self.conv2.weight.device
        shape = (1, -1, 1, 1, 1)
        return (torch.tensor(LATENT_MEAN, device=device).view(shape),
                torch.tensor(LATENT_STD, device=device).view(shape))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1+4k, H, W) in [-1, 1], H and W multiples of 8 -> (B, z, 1+k, H/8, W/8), (mu - mean) / std."""
        t = video.shape[2]
        if video.dim() != 5 or (t - 1) % self.cfg.temporal_stride:
            raise ValueError(f"Wan VAE encodes videos of 1+4k frames shaped (B, 3, T, H, W); got {tuple(video.shape)}.")
        video = video.to(self.conv1.weight.dtype)
        cache = CausalCache()
        outs = []
        # Wan's schedule: the first frame alone, then 4 frames per latent.
        for start, stop in [(0, 1)] + [(s, s + 4) for s in range(1, t, 4)]:
            cache.rewind()
            outs.append(self.encoder(video[:, :, start:stop], cache))
        mu = self.conv1(torch.cat(outs, dim=2))[:, :self.cfg.z_dim]
        mean, std = self.latent_stats()
        return ((mu.float() - mean) / std).to(mu.dtype)

    @torch.no_grad()
    def encode_reference(self, image: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """The I2V conditioning latent, once per session: image (B, 3, H, W) in [-1, 1] -> (B, z, latent_frames,
        H/8, W/8), the encoding of the video [image, 4*(latent_frames-1) zero (mid-grey) frames] as Wan2.1 builds y."""
        b, c, h, w = image.shape
        video = image.new_zeros(b, c, 1 + self.cfg.temporal_stride * (latent_frames - 1), h, w)
        video[:, :, 0] = image
        return self.encode(video)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        """Whole-sequence decode, `chunk` latent frames at a time (1 keeps memory lowest, as Wan does)."""
        stream = StreamingDecoder(self)
        return torch.cat([stream.decode(z[:, :, i:i + chunk]) for i in range(0, z.shape[2], chunk)], dim=2)


class StreamingDecoder:
    """Decode latent frames as they arrive, carrying the causal feature cache between calls.

    decode(z): z (B, z_dim, n, h, w) normalised latents, any n >= 1 per call -> (B, 3, f, 8h, 8w) in [-1, 1] with
    f = 1 + 4(n-1) on the first call of a stream and f = 4n afterwards. Any split of a latent sequence into calls
    gives the same frames as decoding it whole. `reset()` starts a new stream.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.mean, self.std = vae.latent_stats()
        self.cache = CausalCache()

    def reset(self) -> None:
        self.cache = CausalCache()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.conv2((z.float() * self.std + self.mean).to(self.vae.conv2.weight.dtype))
        self.cache.rewind()
        return self.vae.decoder(x, self.cache).clamp_(-1.0, 1.0)


def load_vae(weights_dir: str | os.PathLike | None, cfg: VAEConfig = VAEConfig(), device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> WanVAE:
    """Find `Wan2.1_VAE.pth` under `weights_dir` and load it strictly (WeightsError names the file if missing)."""
    path = find_file(weights_dir, VAE_FILE, "Wan2.1 VAE")
    with torch.device("meta"):
        model = WanVAE(cfg)
    load_into(model, load_state_dict(path), path, dtype=dtype, device=device)
    return model.eval()
