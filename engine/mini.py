"""The `mini` preset end to end: its trained networks, its conditioning, and rendering a clip (offline or rolling).

    models = load_mini("weights/mini")                        # every network of the preset, eval, on the CPU
    tracker = FaceMeshTracker()                               # driving frame -> 478 landmarks, as in training
    out = render_clip(models, reference, landmarks, RenderSettings(steps=20))   # anchor: the reference's face
    out.frames                                                # (T, 128, 128, 3) uint8, one per driving frame

The networks are the project's own (engine/dit.py WanModel + NFEB, engine/portrait_encoder.py, engine/clip_vision.py)
at the preset's small shapes, plus the mini's autoencoder (engine/models/mini_vae.py) and landmark expression
encoder (engine/models/mini_expression.py); the text context is the learned tensor in `mini_context.pt`.
Files (train/train_mini.py --export writes them): transformer.pt (Wan keys + emo_k/v_proj), portrait_encoder.pt
(proj_model. / mouth_proj_model. / emo_proj_model.), mini_vae.pt, mini_expression.pt, mini_clip.pt, mini_context.pt.

Sampling is the renderer's: the flow-matching Euler (or 4-step distilled) schedule, emotion guidance as one batch
of 2 (ip_scale 1 and 0), ALPA / TaylorSeer / TeaCache through engine/alpa.CachedDiT, offline step-major WSWS or the
causal rolling window (engine/wsws.py). Every window's first latent frame carries its own first video frame's 24
tokens + 73 zero pads (FlashPortrait's per-clip rule, which the mini was trained on).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import ALPAConfig, ModelPreset, get_preset
from engine.models.mini_expression import landmark_features, load_landmark_expression
from engine.models.mini_vae import load_mini_vae
from engine.models.portrait_encoder import group_latent_tokens, window_latent_tokens
from engine.sampler import Sampler, distilled_schedule, flow_schedule
from engine.weights import find_file, load_dit, load_into, load_portrait_encoder, load_state_dict
from engine.wsws import RollingWSWS, plan_windows, wsws_sample

MINI_CLIP_FILE = "mini_clip.pt"
MINI_CONTEXT_FILE = "mini_context.pt"
TIME_STRIDE = 4
MESH_SIZE = 128  # driving frames are seen at the training crops' size (then upscaled 2x for the face mesh)


@dataclass
class MiniModels:
    """The mini preset's networks (eval mode, no grad) and its learned text context (1, text_len, text_dim)."""

    preset: ModelPreset
    dit: torch.nn.Module
    portrait: torch.nn.Module
    expression: torch.nn.Module
    clip: torch.nn.Module
    vae: torch.nn.Module
    context: torch.Tensor

    @property
    def size(self) -> int:
        return MESH_SIZE

    @torch.no_grad()
    def frame_tokens(self, landmarks: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """(T, 478, 3) landmarks, relative to the reference's (478, 3) `anchor` -> (T, 24, emo_dim) expression
        tokens, frame by frame."""
        vec = self.expression(landmark_features(landmarks, anchor))        # (T, feature_dim)
        per = self.preset.portrait.tokens_per_frame
        return self.portrait(vec[None])[0].view(len(vec), per, -1)


def load_mini(weights_dir: str | os.PathLike, preset: ModelPreset | str = "mini", device="cpu",
              dtype: torch.dtype = torch.float32) -> MiniModels:
    """Load every file of the mini checkpoint from `weights_dir` (WeightsError names a missing or wrong file)."""
    from engine.models.clip_vision import ClipVision

    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.autoencoder is None or p.landmark_expression is None:
        raise ValueError(f"Preset {p.name} is not a mini preset: pass --preset mini.")
    dit = load_dit(weights_dir, p.dit, dtype=dtype, device=device)
    portrait = load_portrait_encoder(weights_dir, p.portrait, dtype=dtype, device=device)
    expression = load_landmark_expression(weights_dir, p.landmark_expression, p.portrait, device, dtype)
    vae = load_mini_vae(weights_dir, p.autoencoder, device, dtype)
    path = find_file(weights_dir, MINI_CLIP_FILE, "mini CLIP tower (train/train_mini.py writes it)")
    with torch.device("meta"):
        clip = ClipVision(p.clip)
    load_into(clip, load_state_dict(path), path, dtype=dtype, device=device)
    path = find_file(weights_dir, MINI_CONTEXT_FILE, "mini text context (train/train_mini.py writes it)")
    context = load_state_dict(path)["context"].to(device, dtype)
    return MiniModels(p, dit, portrait, expression.eval(), clip.eval().requires_grad_(False), vae, context)


# ----------------------------------------------------------------------------------------------------------------
# landmarks
# ----------------------------------------------------------------------------------------------------------------
def square_crop(frame: np.ndarray) -> np.ndarray:
    """Centre square of an (H, W, 3) frame."""
    h, w = frame.shape[:2]
    s = min(h, w)
    return frame[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


class FaceMeshTracker:
    """Driving frame (H, W, 3) uint8 RGB -> (478, 3) float32 landmarks in [0, 1] of its centre square, or None.

    The frame is seen as in training (train/data.py): centre square, INTER_AREA to 128, cubic 2x upscale, mediapipe
    face mesh (refined, video mode). A frame without a face gives None; `last` keeps the last good landmarks.
    """

    def __init__(self, static: bool = False):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=static, max_num_faces=1,
                                                     refine_landmarks=True, min_detection_confidence=0.5,
                                                     min_tracking_confidence=0.5)
        self.last: np.ndarray | None = None

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        import cv2

        sq = square_crop(frame)
        if sq.shape[0] != MESH_SIZE:
            sq = cv2.resize(sq, (MESH_SIZE, MESH_SIZE), interpolation=cv2.INTER_AREA)
        big = cv2.resize(sq, (2 * MESH_SIZE, 2 * MESH_SIZE), interpolation=cv2.INTER_CUBIC)
        res = self._mesh.process(np.ascontiguousarray(big))
        if not res.multi_face_landmarks:
            return None
        pts = np.array([(p.x, p.y, p.z) for p in res.multi_face_landmarks[0].landmark], np.float32)
        self.last = pts
        return pts

    def close(self) -> None:
        self._mesh.close()


class MiniExpressionExtractor:
    """The mini's stand-in for PD-FGC's ExpressionExtractor (same interface): push(frame) -> ExpressionResult whose
    `features` is the landmark expression encoder's output (feature_dim,), the vector the PortraitEncoder reads.

    The encoder reads a frame's motion relative to an anchor face (engine/models/mini_expression.py): the reference
    image's landmarks (`neutral_landmarks`), as in training. A reference in which the face mesh finds no face
    anchors on the first driving face instead (its motion from there on). A frame without a face carries the last
    good row (face_found False); before any face, the encoder's answer for the anchor itself (no motion), or zeros
    if there is none yet."""

    def __init__(self, expression: torch.nn.Module, tracker: FaceMeshTracker | None = None,
                 neutral_landmarks: np.ndarray | None = None):
        self.expression = expression
        self.landmarks = tracker or FaceMeshTracker()
        self.anchor = None if neutral_landmarks is None else np.asarray(neutral_landmarks, np.float32)
        self._own_anchor = self.anchor is None  # anchored on the first driving face (reset() forgets it)
        self.neutral = (self._encode(self.anchor) if self.anchor is not None else
                        np.zeros(expression.net[-1].out_features, np.float32))
        self._last: np.ndarray | None = None

    @torch.no_grad()
    def _encode(self, pts: np.ndarray) -> np.ndarray:
        p = next(self.expression.parameters())
        feats = landmark_features(np.asarray(pts, np.float32), self.anchor).to(p.device, p.dtype)
        return self.expression(feats).float().cpu().numpy()

    def push(self, frame: np.ndarray):
        from engine.models.pdfgc.extractor import ExpressionResult

        pts = self.landmarks(frame)
        if pts is None:
            carried = self.neutral if self._last is None else self._last
            return ExpressionResult(carried.copy(), False)
        if self.anchor is None:
            self.anchor = np.asarray(pts, np.float32)
            self.neutral = self._encode(self.anchor)
        self._last = self._encode(pts)
        return ExpressionResult(self._last.copy(), True)

    def push_batch(self, frames) -> list:
        return [self.push(f) for f in frames]

    def reset(self) -> None:
        self._last = None
        if self._own_anchor:
            self.anchor = None


# ----------------------------------------------------------------------------------------------------------------
# conditioning and rendering
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RenderSettings:
    """How one clip is rendered (the renderer's knobs at the mini's scale)."""

    steps: int = 20
    shift: float = 5.0
    fast: bool = False          # the 4-step schedule (timesteps 1000, 750, 500, 250)
    emo_cfg: float = 4.0
    window: int = 3             # latent frames per window
    overlap: int = 1
    rolling: bool = False       # causal rolling windows (the live path) instead of offline step-major WSWS
    lookahead: int | None = None  # rolling: latent frames of real tokens beyond the emitted ones (None: all);
    #                               frames past that hold the newest real tokens, as the live renderer does
    alpa: ALPAConfig = field(default_factory=lambda: ALPAConfig(mode="off"))
    seed: int = 0


@dataclass
class RenderResult:
    frames: np.ndarray          # (T, S, S, 3) uint8, one per driving frame
    latents: torch.Tensor       # (1, 16, n, h, w)
    full_passes: int
    predicted_passes: int
    windows: list


def schedule_for(s: RenderSettings):
    if s.fast:
        picks = (1000, 750, 500, 250) if s.steps >= 4 else tuple(round(1000 - i * 1000 / s.steps)
                                                                    for i in range(s.steps))
        return distilled_schedule(picks, s.shift)
    return flow_schedule(s.steps, s.shift)


def reference_tensor(reference: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size) in [-1, 1] (centre square, INTER_AREA)."""
    import cv2

    sq = square_crop(reference)
    if sq.shape[0] != size:
        sq = cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(sq)).permute(2, 0, 1)[None].float() / 127.5 - 1


@torch.no_grad()
def render_clip(models: MiniModels, reference: np.ndarray, landmarks: np.ndarray | torch.Tensor,
                settings: RenderSettings = RenderSettings(),
                anchor: np.ndarray | torch.Tensor | None = None) -> RenderResult:
    """Render one avatar frame per driving frame: reference (H, W, 3) uint8 RGB, landmarks (T, 478, 3) of the
    driving frames (FaceMeshTracker), read relative to `anchor` (478, 3), the reference's own landmarks (default:
    the face mesh on the reference image). The clip is padded to 1 + 4k frames with its last frame (dropped)."""
    from engine.alpa import CachedDiT

    s = settings
    p = models.preset
    dev = models.context.device
    if anchor is None:
        tracker = FaceMeshTracker(static=True)
        anchor = tracker(reference)
        tracker.close()
        if anchor is None:
            raise ValueError("The face mesh finds no face in the reference image: pass a portrait with one clearly "
                             "visible face (or its landmarks as `anchor`).")
    anchor = torch.as_tensor(np.asarray(anchor), dtype=torch.float32).to(dev)
    lm = torch.as_tensor(np.asarray(landmarks), dtype=torch.float32)
    n_frames = lm.shape[0]
    T = math.ceil((n_frames - 1) / TIME_STRIDE) + 1
    pad = TIME_STRIDE * (T - 1) + 1 - n_frames
    if pad:
        lm = torch.cat([lm, lm[-1:].expand(pad, -1, -1)])
    per = p.portrait.tokens_per_frame
    tokens = group_latent_tokens(models.frame_tokens(lm.to(dev), anchor).flatten(0, 1)[None])[0]  # (T, 97, C)

    img = reference_tensor(reference, models.size).to(dev)
    W = min(s.window, T)
    clip_fea = models.clip(models.clip.preprocess(img))
    ctx_img, ctx_txt = models.dit.embed_context(models.context, clip_fea)
    B = 2 if s.emo_cfg > 1 else 1
    ctx_img, ctx_txt = ctx_img.expand(B, -1, -1), ctx_txt.expand(B, -1, -1)
    kv = models.dit.context_kv(ctx_img, ctx_txt)
    ref_lat = models.vae.encode_reference(img, W)
    mask = torch.zeros_like(ref_lat[:, :4])
    mask[:, :, 0] = 1.0
    y = torch.cat([mask, ref_lat], dim=1).expand(B, -1, -1, -1, -1)
    ip = torch.tensor([1.0, 0.0][:B], device=dev)

    schedule = schedule_for(s)
    gen = torch.Generator(dev).manual_seed(s.seed)
    sampler = Sampler(schedule, generator=gen)
    cached = CachedDiT(models.dit, schedule, s.alpa)
    h, w = ref_lat.shape[-2:]

    def denoise(x, i, win, cond):
        n = x.shape[2]
        emo = tokens[win.start:win.start + n] if cond is None else cond
        if s.rolling and s.lookahead is not None:
            real = max(1, W - s.overlap + s.lookahead)
            if real < n:
                emo = torch.cat([emo[:real], emo[real - 1:real].expand(n - real, -1, -1)])
        emo = window_latent_tokens(emo, win.start, per)
        key = "window" if s.rolling else win.index
        flows = cached(x.expand(B, -1, -1, -1, -1), i, ctx_img, ctx_txt, y[:, :, :n], emo[None].expand(B, -1, -1, -1),
                       ip_scale=ip if B > 1 else 1.0, key=key, kv=kv)
        if B == 1:
            return flows
        return flows[1:] + s.emo_cfg * (flows[:1] - flows[1:])

    if s.rolling:
        roller = RollingWSWS(sampler, W, s.overlap, (1, 16, h, w), device=dev, generator=gen)
        padded = T + (-(T - W) % roller.stride if T > W else 0)          # whole windows; padding dropped
        if padded > T:  # windows past the clip's end read its last latent's tokens
            tokens = torch.cat([tokens, tokens[-1:].expand(padded - T, -1, -1)])
        parts, windows = [], []
        for _ in range(padded):
            roller.push(None)
            while roller.ready():
                windows.append(roller.next_window())
                parts.append(roller.run(denoise))
        parts.append(roller.flush())
        latents = torch.cat(parts, dim=2)[:, :, :T]
    else:
        noise = torch.randn((1, 16, T, h, w), generator=gen, device=dev)
        windows = plan_windows(T, W, s.overlap)
        latents = wsws_sample(noise, sampler, denoise, W, s.overlap)
    video = models.vae.decode(latents)                                                  # (1, 3, 1+4(T-1), S, S)
    frames = video[0].permute(1, 2, 3, 0).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return RenderResult(frames[:n_frames], latents, cached.full_passes, cached.predicted_passes, windows)
