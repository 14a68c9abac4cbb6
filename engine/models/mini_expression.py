"""The mini preset's expression encoder: mediapipe face-mesh landmarks -> the PD-FGC-shaped vector its PortraitEncoder
reads. It stands in for PD-FGC's FanEncoder, whose weights (`pd_fpg.pth`) do not exist here.

    feats = landmark_features(landmarks)        # (..., 478, 3) in [0, 1] crop coordinates -> (..., 1437)
    enc = LandmarkExpressionEncoder(cfg)
    vec = enc(feats)                             # (..., headpose + eye + emo + mouth) = [6 | 6 | 30 | mouth_dim]

Why landmarks: a FanEncoder at random init would have to learn face geometry from pixels through the diffusion loss
alone, which a CPU budget of minutes cannot do; mediapipe's mesh already measures the geometry, so a small MLP
trained jointly with the DiT (through the PortraitEncoder and NFEB) only has to map it to expression tokens. The
output keeps PD-FGC's part layout, so the PortraitEncoder's per-part projections and resamplers (and its checkpoint
key layout) are the published ones at a smaller width. The parts are named after PD-FGC's; nothing forces the MLP
to put head pose in the first six numbers.

Landmark normalisation: points relative to the midpoint of the two iris centres (468, 473), divided by the
inter-ocular distance (so the face's size and position in the crop do not swamp its shape), plus that midpoint and
distance themselves (head position and scale in the frame, which the output must follow).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from engine.config import LandmarkExpressionConfig, PortraitEncoderConfig
from engine.weights import find_file, load_into, load_state_dict

MINI_EXPRESSION_FILE = "mini_expression.pt"
NUM_LANDMARKS = 478
IRIS = (468, 473)
FEATURE_DIM = NUM_LANDMARKS * 3 + 3


def landmark_features(landmarks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(..., 478, 3) face-mesh points in [0, 1] crop coordinates -> (..., 1437) float32 normalised features."""
    lm = torch.as_tensor(np.asarray(landmarks) if not isinstance(landmarks, torch.Tensor) else landmarks).float()
    if lm.shape[-2:] != (NUM_LANDMARKS, 3):
        raise ValueError(f"landmark_features needs mediapipe's 478 refined face-mesh points (x, y, z), got "
                         f"{tuple(lm.shape)}: run the face mesh with refine_landmarks=True.")
    left, right = lm[..., IRIS[0], :], lm[..., IRIS[1], :]
    centre = (left + right) / 2
    iod = (left[..., :2] - right[..., :2]).norm(dim=-1, keepdim=True).clamp_min(1e-4)       # (..., 1)
    shape = (lm - centre[..., None, :]) / iod[..., None]
    where = torch.cat([(centre[..., :2] - 0.5) * 4, (iod - 0.25) * 8], dim=-1)              # O(1) numbers
    return torch.cat([shape.flatten(-2), where], dim=-1)


class LandmarkExpressionEncoder(nn.Module):
    """(..., 1437) landmark features -> (..., portrait.feature_dim) in PD-FGC's part order."""

    def __init__(self, cfg: LandmarkExpressionConfig, portrait: PortraitEncoderConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.net = nn.Sequential(nn.Linear(FEATURE_DIM, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
                                 nn.Linear(h, portrait.feature_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.to(self.net[0].weight.dtype))


def load_landmark_expression(weights_dir: str | os.PathLike | None, cfg: LandmarkExpressionConfig,
                             portrait: PortraitEncoderConfig, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> LandmarkExpressionEncoder:
    """Find `mini_expression.pt` under `weights_dir` and load it strictly."""
    path = find_file(weights_dir, MINI_EXPRESSION_FILE, "mini expression encoder (train/train_mini.py writes it)")
    with torch.device("meta"):
        model = LandmarkExpressionEncoder(cfg, portrait)
    load_into(model, load_state_dict(path), path, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)
