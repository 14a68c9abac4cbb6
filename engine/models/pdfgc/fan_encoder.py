"""PD-FGC FanEncoder: an aligned 224x224 face crop -> 554 expression numbers, with `pd_fpg.pth` key names.

    x (N, 3, 224, 224) RGB in [-1, 1]  ->  FanEncoder  ->  (N, 554) = [headpose 6 | eye 6 | emotion 30 | mouth 512]

The trunk (`model.*`) is a one-stack FAN: a stride-2 7x7 stem and three ConvBlocks bring the crop to 56x56, one
depth-4 hourglass, then 68 landmark heatmaps that a stride-2 conv squeezes to one 28x28 map; `fc` turns those 784
numbers into the 512-d feature f. Four heads (Linear-ReLU-BN1d-Linear) read f. Module names mirror the checkpoint,
so `pd_fpg.pth` loads strictly (upstream loads it with strict=False; the unused `mouth_embed.1` is kept so that
every key has a home). Widths come from `FanEncoderConfig`: the default is the published model, `tiny()` is for
tests and keeps the key layout and the 554 output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.weights import find_file, load_into, load_state_dict

PD_FPG_FILE = "pd_fpg.pth"


@dataclass(frozen=True)
class FanEncoderConfig:
    """Widths of the FAN trunk; the published `pd_fpg.pth` uses the defaults."""

    stem: int = 64            # model.conv1 out channels
    block: int = 128          # model.conv2 / conv3 out channels
    features: int = 256       # model.conv4 out, hourglass width
    depth: int = 4            # hourglass levels (keys b1_4 .. b1_1)
    heatmaps: int = 68        # model.l0 out channels
    feature_dim: int = 512    # model.fc out, head width, mouth output
    headpose_dim: int = 6
    eye_dim: int = 6
    emo_dim: int = 30
    crop: int = 224           # input side; fc sees (crop / 8) ** 2 numbers

    @property
    def output_dim(self) -> int:
        return self.headpose_dim + self.eye_dim + self.emo_dim + self.feature_dim

    @classmethod
    def tiny(cls) -> "FanEncoderConfig":
        """Narrow trunk for CPU tests: same keys, same 554 output, about 1/50 of the compute."""
        return cls(stem=8, block=16, features=32)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation block whose three 3x3 convs (out/2, out/4, out/4 channels) are concatenated + residual."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout // 2)
        self.bn2 = nn.BatchNorm2d(cout // 2)
        self.conv2 = _conv3x3(cout // 2, cout // 4)
        self.bn3 = nn.BatchNorm2d(cout // 4)
        self.conv3 = _conv3x3(cout // 4, cout // 4)
        # Keys downsample.0 (BN) and downsample.2 (1x1 conv); index 1 is the parameter-free ReLU.
        self.downsample = (nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False))
                           if cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(F.relu(self.bn1(x)))
        o2 = self.conv2(F.relu(self.bn2(o1)))
        o3 = self.conv3(F.relu(self.bn3(o2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat((o1, o2, o3), dim=1) + residual


class HourGlass(nn.Module):
    """Depth-`depth` hourglass; level L owns b1_L (skip), b2_L (down), b3_L (up); level 1 adds b2_plus_1."""

    def __init__(self, depth: int, features: int):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            if level == 1:
                self.add_module("b2_plus_1", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        skip = self._modules[f"b1_{level}"](x)
        low = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        low = self._level(level - 1, low) if level > 1 else self._modules["b2_plus_1"](low)
        low = self._modules[f"b3_{level}"](low)
        # align_corners=False is what the upstream F.upsample(mode="bilinear") call resolves to.
        return skip + F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FAN(nn.Module):
    """The `model.*` trunk: (N, 3, 224, 224) -> feature f (N, feature_dim)."""

    def __init__(self, cfg: FanEncoderConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.stem, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(cfg.stem)
        self.conv2 = ConvBlock(cfg.stem, cfg.block)
        self.conv3 = ConvBlock(cfg.block, cfg.block)
        self.conv4 = ConvBlock(cfg.block, cfg.features)
        self.m0 = HourGlass(cfg.depth, cfg.features)
        self.top_m_0 = ConvBlock(cfg.features, cfg.features)
        self.conv_last0 = nn.Conv2d(cfg.features, cfg.features, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(cfg.features)
        self.l0 = nn.Conv2d(cfg.features, cfg.heatmaps, kernel_size=1)
        self.bn5 = nn.BatchNorm2d(cfg.heatmaps)
        self.conv6 = nn.Conv2d(cfg.heatmaps, 1, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear((cfg.crop // 8) ** 2, cfg.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))                 # (N, stem, 112, 112)
        x = F.max_pool2d(self.conv2(x), 2)                   # (N, block, 56, 56)
        x = self.conv4(self.conv3(x))                        # (N, features, 56, 56)
        x = self.top_m_0(self.m0(x))
        x = self.l0(F.relu(self.bn_end0(self.conv_last0(x))))  # (N, 68, 56, 56) heatmaps
        x = self.conv6(F.relu(self.bn5(x)))                  # (N, 1, 28, 28)
        return self.fc(F.relu(x.flatten(1)))                 # (N, feature_dim)


def _head(dim: int) -> nn.Sequential:
    # Keys .0 and .3 are the Linears, .2 the BatchNorm1d; .1 is the ReLU.
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.BatchNorm1d(dim), nn.Linear(dim, dim))


def _embed(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Linear(dim, out))


class FanEncoder(nn.Module):
    """Aligned face crops (N, 3, 224, 224), RGB in [-1, 1] -> (N, 554) = [headpose | eye | emo | mouth].

    Always run in eval mode (BatchNorm uses the checkpoint's running statistics).
    """

    def __init__(self, cfg: FanEncoderConfig = FanEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.feature_dim
        self.model = FAN(cfg)
        self.to_mouth = _head(d)
        self.mouth_embed = _embed(d, d - cfg.headpose_dim - cfg.eye_dim)  # in the checkpoint, never used
        self.to_headpose = _head(d)
        self.headpose_embed = _embed(d, cfg.headpose_dim)
        self.to_eye = _head(d)
        self.eye_embed = _embed(d, cfg.eye_dim)
        self.to_emo = _head(d)
        self.emo_embed = _embed(d, cfg.emo_dim)
        self.ignored_keys: list[str] = []  # checkpoint keys with no module here (set by from_file)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model(x)
        return torch.cat([self.headpose_embed(self.to_headpose(f)), self.eye_embed(self.to_eye(f)),
                          self.emo_embed(self.to_emo(f)), self.to_mouth(f)], dim=1)

    @classmethod
    def from_checkpoint(cls, weights_dir: str | os.PathLike | None, cfg: FanEncoderConfig = FanEncoderConfig(),
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "FanEncoder":
        """Find `pd_fpg.pth` under `weights_dir`, check every key and shape, load it, return the eval model."""
        path = find_file(weights_dir, PD_FPG_FILE, "PD-FGC expression encoder")
        return cls.from_file(path, cfg, device, dtype)

    @classmethod
    def from_file(cls, path: str | os.PathLike, cfg: FanEncoderConfig = FanEncoderConfig(),
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "FanEncoder":
        with torch.device("meta"):
            module = cls(cfg)
        sd = load_state_dict(path)
        # Upstream loads with strict=False; a key we have no module for is set aside (and counted) rather than
        # refused, but every key the model needs must be present with its exact shape.
        own = module.state_dict().keys()
        module.ignored_keys = sorted(k for k in sd if k not in own)
        load_into(module, {k: v for k, v in sd.items() if k in own}, path, strict=True)
        return module.to(device=device, dtype=dtype).eval()
