"""The mini preset's expression encoder: mediapipe face-mesh landmarks -> the PD-FGC-shaped vector its PortraitEncoder
reads. It stands in for PD-FGC's FanEncoder, whose weights (`pd_fpg.pth`) do not exist here.

    feats = landmark_features(landmarks, anchor)   # (..., 478, 3) in [0, 1] crop coordinates -> (..., 1443)
    enc = LandmarkExpressionEncoder(cfg)
    vec = enc(feats)                                # (..., headpose + eye + emo + mouth) = [6 | 6 | 30 | mouth_dim]

Why landmarks: a FanEncoder at random init would have to learn face geometry from pixels through the diffusion loss
alone, which a CPU budget of minutes cannot do; mediapipe's mesh already measures the geometry, so a small MLP
trained jointly with the DiT (through the PortraitEncoder and NFEB) only has to map it to expression tokens. The
output keeps PD-FGC's part layout, so the PortraitEncoder's per-part projections and resamplers (and its checkpoint
key layout) are the published ones at a smaller width. The parts are named after PD-FGC's; nothing forces the MLP
to put head pose in the first six numbers.

Features: the frame's motion relative to an anchor face, the reference portrait's own landmarks (a frame of the
same video in self-reenactment training; the reference image when rendering), with the head's rotation taken out
of the shape, as PD-FGC separates head pose from expression:
  * both faces normalised: points relative to the midpoint of the two iris centres (468, 473), divided by the
    (3-D) inter-ocular distance;
  * a rotation R fitted on the skull points (Kabsch on face_mesh.STABLE, as engine/head_pose.py) turns the frame's
    face into the anchor's pose; expression = turned frame - anchor, per point (x, y, z): zero for the anchor itself,
    the same numbers for the same mouth opening whichever way the head is turned;
  * pose = R - I (its first two columns), and where = the shift of the iris midpoint and the log-change of the
    inter-ocular distance in the crop (head position and scale in the frame, which the output must follow).
Why relative and pose-free: with absolute landmarks (checkpoints before 2026-12-02) the token path did not carry to
held-out frames at all: on the last 20% of every video the flow loss with the clip's own landmarks equalled that with
the expression branch switched off (0.523 vs 0.528; 0.18 vs 0.36 on training clips), the MLP having learnt the
training frames' absolute shapes, in which a new head pose or mouth is a new point.
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
# skull points for the rotation: engine/face_mesh.STABLE (eye corners, nose bridge, forehead, temples), copied
# because face_mesh imports mediapipe, which the GPU trainer does not have (a test keeps the two equal)
SKULL = (33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 10, 151, 9, 234, 454)
EXPRESSION_SCALE = 4.0  # expression residuals are ~0.01-0.3 inter-ocular distances: O(0.1-1) after this
POSE_SCALE = 2.0
FEATURE_DIM = NUM_LANDMARKS * 3 + 6 + 3


def _normalise(lm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., 478, 3) -> (shape (..., 478, 3) about the iris midpoint in inter-ocular units, midpoint (..., 3),
    inter-ocular distance (..., 1)). The distance is 3-D (the mesh's z is in x's units), so a turned head keeps
    its size."""
    left, right = lm[..., IRIS[0], :], lm[..., IRIS[1], :]
    centre = (left + right) / 2
    iod = (left - right).norm(dim=-1, keepdim=True).clamp_min(1e-4)
    return (lm - centre[..., None, :]) / iod[..., None], centre, iod


def _rotation(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Batched Kabsch: R (..., 3, 3) with dst ~ R src (both (..., N, 3) and centred). The 3x3 SVDs run in float64
    on the CPU (tiny; batched 3x3 SVD on a GPU is slower than the copy)."""
    h = (src.transpose(-1, -2) @ dst).double().cpu()
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(u @ vt))
    d = torch.where(d == 0, torch.ones_like(d), d)
    fix = torch.ones_like(u[..., 0, :])
    fix[..., 2] = d
    return ((u * fix[..., None, :]) @ vt).transpose(-1, -2).to(src.device, src.dtype)


def landmark_features(landmarks: torch.Tensor | np.ndarray, anchor: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(..., 478, 3) face-mesh points in [0, 1] crop coordinates, relative to `anchor` (..., 478, 3), broadcast
    against them (a clip's frames (B, T, 478, 3) take their reference's points as (B, 1, 478, 3)) -> (..., 1443)
    float32: [expression residual 478 x 3 | rotation 6 | where 3] (see the module docstring)."""
    lm = torch.as_tensor(np.asarray(landmarks) if not isinstance(landmarks, torch.Tensor) else landmarks).float()
    an = torch.as_tensor(np.asarray(anchor) if not isinstance(anchor, torch.Tensor) else anchor).float()
    for x in (lm, an):
        if x.shape[-2:] != (NUM_LANDMARKS, 3):
            raise ValueError(f"landmark_features needs mediapipe's 478 refined face-mesh points (x, y, z), got "
                             f"{tuple(x.shape)}: run the face mesh with refine_landmarks=True.")
    an = an.to(lm.device)
    lm, an = torch.broadcast_tensors(lm, an)
    with torch.autocast(lm.device.type, enabled=False):
        shape, centre, iod = _normalise(lm)
        a_shape, a_centre, a_iod = _normalise(an)
        skull = list(SKULL)
        src_mean = shape[..., skull, :].mean(-2, keepdim=True)
        dst_mean = a_shape[..., skull, :].mean(-2, keepdim=True)
        r = _rotation(shape[..., skull, :] - src_mean, a_shape[..., skull, :] - dst_mean)   # (..., 3, 3)
        turned = (shape - src_mean) @ r.transpose(-1, -2) + dst_mean
        expression = (turned - a_shape) * EXPRESSION_SCALE
        eye = torch.eye(3, device=lm.device)
        pose = (r - eye)[..., :, :2].flatten(-2) * POSE_SCALE
        where = torch.cat([(centre[..., :2] - a_centre[..., :2]) * 4, torch.log(iod / a_iod) * 4], dim=-1)
        return torch.cat([expression.flatten(-2), pose, where], dim=-1)


class LandmarkExpressionEncoder(nn.Module):
    """(..., 1443) landmark features (`landmark_features`) -> (..., portrait.feature_dim) in PD-FGC's part order."""

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
