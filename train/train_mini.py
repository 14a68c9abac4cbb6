"""Train the mini FlashPortrait (preset `mini`) on the driving videos: the autoencoder first, then the DiT path.

    python -m train.data                                    # cache 128x128 crops + face-mesh landmarks (once)
    python -m train.train_mini --stage vae --minutes 6      # autoencoder, then its latent statistics
    python -m train.train_mini --stage dit --minutes 22     # DiT + NFEB + PortraitEncoder + expression encoder
    python -m train.train_mini --stage decoder --minutes 4  # optional: the decoder alone, mouth and eyes weighted
    python -m train.train_mini --export weights/mini        # the published file layout, loadable by --weights
    OUT=out bash train/gpu_train.sh                         # on one GPU (packed cache, both stages, export)

Resumable: every stage keeps `<run>/<stage>.ckpt` (model, optimizer, step, RNG states), written every
`--save-every` steps and at the end; starting again continues from it. `--minutes` bounds the wall time of this
invocation, `--steps` the total step count.

The DiT stage trains as FlashPortrait trains (its train_portrait.py, read for the recipe):
  flow matching as Wan: x_t = (1 - s) x0 + s noise, target noise - x0, s = shift(u) with u uniform and shift 5
  (uniform draws on the shifted grid, as `--uniform_sampling` does), timestep 1000 s;
  y = [mask 4 | latent of (reference, zeros...)]: the mask flags latent 0 as the given image, as Wan I2V builds it;
  the reference is a frame of the same video (self-reenactment): the clip's own first frame for 10% of the samples
  (`--ref-first`; as Wan / FlashPortrait's I2V clips: latent 0 is the given image, which teaches the copy path from
  y), else a frame of the video at least 16 frames from the clip (`--ref-gap`: what later windows and a real
  reference image look like). Why not half, as before: in a 9-13 frame clip that starts at the reference, copying
  the reference explains 75% of the later latents' variance (33% for a far one), and at high noise the model cannot
  tell the two cases apart, so it learned to hedge: a checkpoint trained so moved its x0 prediction 20-24% of the
  way toward the reference even when that was 240 frames away (37% when it was the first frame), a ghost of the
  reference's face and mouth over the driven one (two 7-minute continuations with these draws: 15-17% and 31-33%);
  expression tokens per clip: latent 0 gets its own first frame's 24 tokens + 73 zeros, latent i >= 1 the 97 tokens
  [96i-73, 96i+23] (engine.portrait_encoder.group_latent_tokens); every frame's landmarks are read relative to the
  clip's reference frame's, with the head's rotation taken out (engine/models/mini_expression.landmark_features;
  the renderer anchors on the reference image's landmarks the same way);
  the expression branch is dropped for 10% of the samples. FlashPortrait zeroes the tokens; here the dropped samples
  run with ip_scale 0, which is exactly the renderer's no-emotion guidance branch (zero tokens through the NFEB
  normalisation would add mean(base) instead of nothing);
  loss: MSE weighted by (1 + face mask + --lip-weight x lip mask + --eye-weight x eye masks) in latent space
  (FlashPortrait also draws face-only and lip-only weightings; one fixed weighting keeps the small run's loss
  comparable across steps), plus its motion sub-loss (frame differences of prediction vs target, ratio 0.25).
Against overfitting (`--augment`, train/augment.py): every video also mirrored and zoomed, pixels and landmarks
together; `--val-every` logs the same loss on fixed held-out clips (the last 20% of every video, never trained on),
so the curves show when the model stops generalising rather than only that its training loss falls.
`--teacher` adds train/teacher.py's videos (the preview renderer moving other faces with the drivers' training-split
motion; every frame trains, none is held out) and `--teacher-share` sets how many clips come from them: with them the
held-out loss fell 0.385 -> 0.333 and the held-out expression ratio 0.857 -> 0.822, then with two more seeds
0.822 -> 0.784 (README, the mini section). `--stage decoder` (decoder_loss) then took it 0.784 -> 0.738, and two more
rounds (mouth/eye weights 6/8, then 8/10) to 0.714.
The text context is one learned (text_len, text_dim) tensor (the prompt is fixed); the CLIP tower is a small ViT
trained jointly. Latents of every frame position are precomputed once with the trained autoencoder, so a DiT step
touches no pixels.

Device: `--device cuda` puts the models, the latent bank, every batch and the loss on the GPU (`--bf16` adds bf16
autocast to the forward passes; the weights and the optimizer stay fp32); the code path is the CPU one. Random draws
stay on CPU generators (then move), so a run's data order does not depend on the device. `--lr-decay` anneals the
learning rate linearly to 10% over this invocation's --minutes (short GPU runs end annealed).

Threads: on a shared 2-core machine (load average 7-12 from other work) one DiT step took 1.3-1.7 s with one torch
thread and 20-47 s with two (OpenMP workers waiting on each other at every op), so the default is one.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.clip_vision import ClipVision
from engine.config import ModelPreset, get_preset
from engine.models.dit import WanModel
from engine.models.mini_expression import FEATURE_DIM, LandmarkExpressionEncoder, landmark_features
from engine.models.mini_vae import MiniVAE
from engine.models.portrait_encoder import PortraitEncoder, group_latent_tokens
from engine.sampler import shift_sigmas
from kernels.attention import set_backend as set_attention_backend
from kernels.fused import set_fused_kernels
from train.augment import augmented_videos
from train.data import DEFAULT_CACHE, ClipDataset, Video, load_cache

SHIFT = 5.0
EMO_DROP = 0.1
MOTION_SUB_LOSS = 0.25
BEST_DIT = "dit_best.pt"  # the dit stage's weights at its lowest held-out loss so far (keep_best)

# face-mesh index sets for the loss masks: the face oval and the outer lip contour
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
# the two eyes' lid contours (each its own box): the held-out eye-opening error was the mini's worst part
EYES = ((33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173),
        (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398))


class MiniPortrait(nn.Module):
    """Everything the DiT stage trains: DiT + NFEB, PortraitEncoder, landmark expression encoder, CLIP tower, and the
    learned text context."""

    def __init__(self, preset: ModelPreset):
        super().__init__()
        self.preset = preset
        self.dit = WanModel(preset.dit)
        self.portrait = PortraitEncoder(preset.portrait)
        self.expression = LandmarkExpressionEncoder(preset.landmark_expression, preset.portrait)
        self.clip = ClipVision(preset.clip)
        self.context = nn.Parameter(torch.randn(1, preset.dit.text_len, preset.dit.text_dim) * 0.5)
        with torch.no_grad():  # the published model starts its NFEB at zero; the mini does too
            for block in self.dit.blocks:
                block.cross_attn.emo_k_proj.weight.normal_(0, 0.02)
                block.cross_attn.emo_v_proj.weight.normal_(0, 0.02)

    def tokens(self, landmarks: torch.Tensor, anchor: torch.Tensor, jitter: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1+4k, 478, 3) landmarks, relative to their references' (B, 478, 3) -> (B, 1+k, 97, emo_dim)
        expression tokens in the per-clip layout; `jitter` (B, 1+4k, FEATURE_DIM) is added to the features
        (training's --feature-noise)."""
        feats = landmark_features(landmarks, anchor[:, None])                  # (B, T, FEATURE_DIM)
        vec = self.expression(feats if jitter is None else feats + jitter)    # (B, T, feature_dim)
        return group_latent_tokens(self.portrait(vec))

    def forward(self, x, t, y, ref, ref_landmarks, landmarks, ip_scale, jitter=None):
        clip_fea = self.clip(self.clip.preprocess(ref))
        context = self.context.expand(x.shape[0], -1, -1)
        return self.dit(x, t, context, clip_fea, y, self.tokens(landmarks, ref_landmarks, jitter), ip_scale=ip_scale)


# ------------------------------------------------------------------------------------------------------------------
# autoencoder stage
# ------------------------------------------------------------------------------------------------------------------
def vae_loss(vae: MiniVAE, video: torch.Tensor) -> torch.Tensor:
    raw = vae.encode_raw(video)
    out = vae.decode_raw(raw + 0.02 * torch.randn_like(raw))  # a little latent noise: a decoder robust to the DiT
    return F.l1_loss(out, video) + F.mse_loss(out, video) + 1e-4 * raw.pow(2).mean()


@torch.no_grad()
def latent_statistics(vae: MiniVAE, data: ClipDataset, gen: np.random.Generator, clips: int = 64) -> None:
    dev = vae.latent_mean.device
    raws = [vae.encode_raw(data.sample(8, 9, gen)["video"].to(dev)) for _ in range(clips // 8)]
    raw = torch.cat(raws).transpose(0, 1).flatten(1)                   # (z, N)
    vae.latent_mean.copy_(raw.mean(1))
    vae.latent_std.copy_(raw.std(1).clamp_min(1e-3))


# ------------------------------------------------------------------------------------------------------------------
# DiT stage
# ------------------------------------------------------------------------------------------------------------------
class LatentBank:
    """Normalised latents of every frame position of every video, so a clip's latents are a gather:
    first[v][j] = latent of frame j alone, group[v][j] = latent of frames j..j+3, zero_group = latent of 4 zero
    frames (Wan's y after the reference)."""

    @torch.no_grad()
    def __init__(self, vae: MiniVAE, videos: list[Video], chunk: int = 64):
        s = vae.cfg.temporal_stride
        dev = vae.latent_mean.device
        self.first, self.group = [], []
        for v in videos:
            feats = torch.cat([vae.encoder(v.frames[i:i + chunk].to(dev)) for i in range(0, len(v.frames), chunk)])
            first = vae.encode_first(feats)
            windows = torch.stack([feats[j:j + s] for j in range(len(feats) - s + 1)])   # (T-3, 4, C, h, w)
            group = vae.group_in(windows.flatten(1, 2))
            self.first.append(vae.normalise(first[:, :, None])[:, :, 0])
            self.group.append(vae.normalise(group[:, :, None])[:, :, 0])
        # one tensor each (the per-video lists become views of it), so a batch is one gather
        self.first_off = np.cumsum([0] + [len(f) for f in self.first[:-1]])
        self.group_off = np.cumsum([0] + [len(g) for g in self.group[:-1]])
        self.first_all, self.group_all = torch.cat(self.first), torch.cat(self.group)
        self.first = list(self.first_all.split([len(f) for f in self.first]))
        self.group = list(self.group_all.split([len(g) for g in self.group]))
        zeros = vae.encoder(torch.zeros(s, 3, *videos[0].frames.shape[-2:], device=dev))
        self.zero_group = vae.normalise(vae.group_in(zeros.flatten(0, 1)[None])[:, :, None])[0, :, 0]

    def clip(self, v: int, start: int, k: int) -> torch.Tensor:
        """(16, 1+k, h, w) latents of frames start .. start+4k."""
        parts = [self.first[v][start]] + [self.group[v][start + 1 + 4 * i] for i in range(k)]
        return torch.stack(parts, dim=1)

    def firsts(self, vs: np.ndarray, js: np.ndarray) -> torch.Tensor:
        """(B, 16, h, w): first[vs[b]][js[b]]."""
        return self.first_all[torch.as_tensor(self.first_off[vs] + js, device=self.first_all.device)]

    def reference_y(self, first: torch.Tensor, k: int) -> torch.Tensor:
        """(B, 20, 1+k, h, w) Wan I2V conditioning of a clip: [mask flagging latent 0 | the reference latent
        `first` (B, 16, h, w), then the latent of zero frames]."""
        y = torch.cat([first[:, :, None], self.zero_group[None, :, None].expand(len(first), -1, k, -1, -1)], 2)
        mask = y.new_zeros(len(first), 4, *y.shape[2:])
        mask[:, :, 0] = 1.0
        return torch.cat([mask, y], dim=1)

    def clips(self, vs: np.ndarray, starts: np.ndarray, k: int) -> torch.Tensor:
        """(B, 16, 1+k, h, w): clip(vs[b], starts[b], k) for every b, in two gathers."""
        gi = self.group_off[vs][:, None] + starts[:, None] + 1 + 4 * np.arange(k)[None]
        group = self.group_all[torch.as_tensor(gi.reshape(-1), device=self.group_all.device)]
        group = group.view(len(vs), k, *group.shape[1:]).transpose(1, 2)
        return torch.cat([self.firsts(vs, starts)[:, :, None], group], dim=2)


def region_mask(landmarks: torch.Tensor, idx, grid: int, pad: float) -> torch.Tensor:
    """(B, n, 478, 3) landmarks in [0, 1] -> (B, n, grid, grid) 0/1 box of the points `idx` (padded by `pad`)."""
    pts = landmarks[..., list(idx), :2] if idx is not None else landmarks[..., :2]
    lo, hi = pts.amin(-2) - pad, pts.amax(-2) + pad                     # (B, n, 2)
    c = (torch.arange(grid, device=landmarks.device) + 0.5) / grid
    inx = (c >= lo[..., 0:1]) & (c <= hi[..., 0:1])                      # (B, n, grid) over x
    iny = (c >= lo[..., 1:2]) & (c <= hi[..., 1:2])
    return (iny[..., :, None] & inx[..., None, :]).float()


def region_weight(landmarks: torch.Tensor, grid: int, lip_weight: float, eye_weight: float) -> torch.Tensor:
    """(B, n, 478, 3) landmarks in [0, 1] -> (B, n, grid, grid) loss weight: 1, plus 1 in the face's box, plus
    `lip_weight` in the mouth's and `eye_weight` in each eye's (the parts the expression error reads)."""
    weight = 1 + region_mask(landmarks, None, grid, 0.02) + lip_weight * region_mask(landmarks, LIPS, grid, 0.03)
    return weight + eye_weight * sum(region_mask(landmarks, eye, grid, 0.03) for eye in EYES)


def other_reference(gen: np.random.Generator, a: int, e: int, s: int, frames: int, gap: int | None) -> int:
    """A reference frame of the split [a, e) for the clip [s, s + frames): uniform over the frames at least `gap`
    frames away from the clip (uniform over the whole split when `gap` is None or no frame is that far)."""
    if gap is None:
        return int(gen.integers(a, e))
    left, right = max(0, s - gap - a), max(0, e - (s + frames + gap))
    if left + right == 0:
        return int(gen.integers(a, e))
    j = int(gen.integers(0, left + right))
    return a + j if j < left else s + frames + gap + (j - left)


def dit_batch(bank: LatentBank, data: ClipDataset, batch: int, k: int, gen: np.random.Generator,
              ref_first: float = 0.0, lip_weight: float = 1.0, eye_weight: float = 1.0, ref_gap: int | None = None):
    """Latents x0 (B, 16, 1+k, h, w), y (B, 20, 1+k, h, w), reference pixels (B, 3, H, W), the references'
    landmarks (B, 478, 3), the clips' landmarks (B, 1+4k, 478, 3), loss weight (B, 1, 1+k, h, w). With probability
    `ref_first` a sample's reference is its clip's first frame (Wan / FlashPortrait I2V clips: latent 0 is then the
    given image), else another frame of the same video and split, at least `ref_gap` frames from the clip
    (`other_reference`; None: anywhere, the clip included). Everything is on the latent bank's device."""
    frames = 1 + 4 * k
    vs, ss, rs = (np.zeros(batch, np.int64) for _ in range(3))
    for b in range(batch):
        v = int(gen.choice(len(data.videos), p=data.weights))
        a, e = data.ranges[v]
        s = int(gen.integers(a, e - frames + 1))
        vs[b], ss[b] = v, s
        rs[b] = s if gen.random() < ref_first else other_reference(gen, a, e, s, frames, ref_gap)
    x0 = bank.clips(vs, ss, k)
    dev = x0.device
    y = bank.reference_y(bank.firsts(vs, rs), k)
    refs = torch.stack([data.videos[v].frames[r] for v, r in zip(vs, rs)]).to(dev, non_blocking=True)
    ref_lms = torch.stack([data.videos[v].landmarks[r] for v, r in zip(vs, rs)]).to(dev, non_blocking=True)
    lms = torch.stack([data.videos[v].landmarks[s:s + frames] for v, s in zip(vs, ss)]).to(dev, non_blocking=True)
    weight = region_weight(lms[:, ::4], x0.shape[-1], lip_weight, eye_weight)   # frame 0, 4, 8, ...: one per latent
    return x0, y, refs, ref_lms, lms, weight[:, None]


def flow_loss(model: MiniPortrait, x0, y, refs, ref_lms, lms, weight, gen: torch.Generator, drop: float = EMO_DROP,
              u: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              keep: torch.Tensor | None = None, autocast: bool = False, feature_noise: float = 0.0) -> torch.Tensor:
    """FlashPortrait's training loss on one batch (see the module docstring); u / noise / keep fix the draws (drawn
    on the CPU generator `gen`, then moved to x0's device); `autocast` runs the model in bf16 autocast;
    `feature_noise`: std of Gaussian noise added to every landmark feature (0: none)."""
    B, dev = x0.shape[0], x0.device
    u = torch.rand(B, generator=gen) if u is None else u
    sigma = shift_sigmas(u.clamp(1e-3, 1.0), SHIFT).to(dev)
    noise = (torch.randn(x0.shape, generator=gen) if noise is None else noise).to(dev)
    s = sigma.view(B, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    target = noise - x0
    keep = ((torch.rand(B, generator=gen) >= drop).float() if keep is None else keep).to(dev)
    jitter = None
    if feature_noise > 0:
        jitter = (feature_noise * torch.randn((*lms.shape[:2], FEATURE_DIM), generator=gen)).to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        pred = model(xt, sigma * 1000, y, refs, ref_lms, lms, ip_scale=keep, jitter=jitter)
    pred = pred.float()
    loss = ((pred - target) ** 2 * weight).mean()
    if pred.shape[2] > 2:
        sub = F.mse_loss(pred[:, :, 1:] - pred[:, :, :-1], target[:, :, 1:] - target[:, :, :-1])
        loss = loss * (1 - MOTION_SUB_LOSS) + sub * MOTION_SUB_LOSS
    return loss


# ------------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------------
def save_state(path: Path, module: nn.Module, opt, step: int, np_gen, torch_gen, log, val=None,
               ema: nn.Module | None = None) -> None:
    """`val`: the held-out losses so far, (step, loss) pairs (DiT stage with --val-every); `ema`: the
    exponential moving average of the weights (DiT stage with --ema), which `export` writes when present."""
    save_atomic(path, {"model": module.state_dict(), "opt": opt.state_dict(), "step": step,
                       "np_gen": np_gen.bit_generator.state, "torch_gen": torch_gen.get_state(), "log": log,
                       "val": val or [], **({"ema": ema.state_dict()} if ema is not None else {})})


def save_atomic(path: Path, obj) -> None:
    """torch.save to a temporary file, then rename: an interrupted run never leaves a half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.rename(path)


def load_state(path: Path, module: nn.Module, opt, np_gen, torch_gen, ema: nn.Module | None = None):
    """Restore a stage's checkpoint into module, optimizer, generators (and `ema`, from the checkpoint's average
    or, in one written without it, its weights); (step, log, held-out log)."""
    if not path.exists():
        return 0, [], []
    st = torch.load(path, map_location="cpu", weights_only=False)
    module.load_state_dict(st["model"])
    if ema is not None:
        ema.load_state_dict(st.get("ema", st["model"]))
    opt.load_state_dict(st["opt"])
    np_gen.bit_generator.state = st["np_gen"]
    torch_gen.set_state(st["torch_gen"])
    return st["step"], st.get("log", []), st.get("val", [])


def keep_best(path: Path, module: nn.Module, val) -> bool:
    """Save `module`'s weights to `path` when the newest held-out loss of `val` ((step, loss) pairs) is the lowest so
    far (`export --best` writes them: stopping at the held-out minimum); True when it saved."""
    step, loss = val[-1]
    if any(earlier <= loss for _, earlier in val[:-1]):
        return False
    save_atomic(path, {"model": module.state_dict(), "step": step, "held_out_loss": loss})
    return True


def lr_at(step: int, base: float, warmup: int = 100, progress: float | None = None) -> float:
    """Linear warmup over `warmup` steps; with `progress` (fraction of this invocation's time budget spent), then a
    linear decay to 10% of `base`."""
    lr = base * min(1.0, (step + 1) / warmup)
    return lr if progress is None else lr * (1 - 0.9 * min(1.0, progress))


def progress(args, t0: float) -> float | None:
    return (time.time() - t0) / (60 * args.minutes) if args.lr_decay else None


def videos_to(data: ClipDataset, device: str) -> None:
    """Move the training videos to `device` (all of them fit on a GPU: ~0.7 GB), so batches gather there."""
    for v in data.videos:
        v.frames, v.landmarks = v.frames.to(device), v.landmarks.to(device)


def random_crop(video: torch.Tensor, crop: int, gen: np.random.Generator) -> torch.Tensor:
    """A random crop (..., crop, crop) on the latent grid (multiples of 8) of (..., H, W) frames; the whole frame when
    crop covers it. The autoencoder is convolutional: crops train it faster."""
    if crop >= video.shape[-1]:
        return video
    i, j = (int(v) for v in gen.integers(0, video.shape[-1] - crop + 1, size=2) // 8 * 8)
    return video[..., i:i + crop, j:j + crop]


def optimizer_step(name: str, loss: torch.Tensor, opt, params, step: int, log: list, t0: float, args, save,
                   clip: float | None = None) -> int:
    """Backward, (clip,) step; log the loss, print every args.log_every steps, save(step) every args.save_every.
    Returns the new step count."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    step += 1
    log.append((step, loss.item(), time.time() - t0))
    if step % args.log_every == 0:
        print(f"{name} step {step} loss {np.mean([l for _, l, _ in log[-25:]]):.4f} {time.time() - t0:.0f}s",
              flush=True)
    if step % args.save_every == 0:
        save(step)
    return step


def train_vae(args, preset: ModelPreset, data: ClipDataset, run: Path) -> None:
    videos_to(data, args.device)
    vae = MiniVAE(preset.autoencoder).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae, weight_decay=0.0)
    gen, tgen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    ckpt = run / "vae.ckpt"
    if args.init_vae and not ckpt.exists():   # start from a trained autoencoder (then --minutes 0 keeps it as is)
        trained = torch.load(args.init_vae, map_location="cpu", weights_only=True)
        if "first_in.weight" in trained:
            raise SystemExit(f"{args.init_vae} has the old two-space layout (first_in): train the autoencoder "
                             f"instead of --init-vae.")
        vae.load_state_dict(trained)
    step, log, _ = load_state(ckpt, vae, opt, gen, tgen)
    t0 = time.time()
    while step < args.steps and time.time() - t0 < 60 * args.minutes:
        batch = random_crop(data.sample(args.vae_batch, 5, gen)["video"].to(args.device, non_blocking=True),
                            args.vae_crop, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr_vae, 50, progress(args, t0))
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = vae_loss(vae, batch.float())
        step = optimizer_step("vae", loss, opt, None, step, log, t0, args,
                              lambda n: save_state(ckpt, vae, opt, n, gen, tgen, log))
    vae.eval()
    latent_statistics(vae, data, np.random.default_rng(0))
    save_state(ckpt, vae, opt, step, gen, tgen, log)
    print(f"vae done at step {step}; latent std {vae.latent_std.mean():.3f}", flush=True)


def train_decoder(args, preset: ModelPreset, data: ClipDataset, run: Path) -> None:
    """Stage "decoder": more training of the autoencoder's decoder alone, the encoder (and so the latent space the
    DiT was trained on, with its statistics) frozen. Reads vae.ckpt, writes decoder.ckpt (export prefers it)."""
    vae = load_trained_vae(run, preset).to(args.device)
    params = [p for n, p in vae.named_parameters() if not n.startswith(("encoder.", "first_in.", "group_in."))]
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=args.lr_vae / 2, weight_decay=0.0)
    gen, tgen = np.random.default_rng(args.seed + 2), torch.Generator().manual_seed(args.seed + 2)
    ckpt = run / "decoder.ckpt"
    step, log, _ = load_state(ckpt, vae, opt, gen, tgen)
    t0 = time.time()
    while step < args.steps and time.time() - t0 < 60 * args.minutes:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr_vae / 2, 50, progress(args, t0))
        loss = decoder_loss(vae, data.sample(args.vae_batch, 5, gen), args, gen)
        step = optimizer_step("decoder", loss, opt, None, step, log, t0, args,
                              lambda n: save_state(ckpt, vae, opt, n, gen, tgen, log))
    save_state(ckpt, vae, opt, step, gen, tgen, log)
    print(f"decoder done at step {step}", flush=True)


def decoder_loss(vae: MiniVAE, sample: dict, args, gen: np.random.Generator) -> torch.Tensor:
    """The decoder stage's loss on a `ClipDataset.sample`: L1 + MSE of the round trip (the encoder frozen, a little
    latent noise), weighted per pixel by `region_weight` with --decoder-lip-weight / --decoder-eye-weight: at 128 px
    the round trip alone loses a third of the held-out mouth and eye motion as the face mesh reads it
    (bench/results/quality_mini.json, `autoencoder`), and those boxes are a few percent of the pixels."""
    video = sample["video"].to(args.device, non_blocking=True)                     # (B, 3, T, S, S)
    weight = region_weight(sample["landmarks"].to(video.device), video.shape[-1], args.decoder_lip_weight,
                           args.decoder_eye_weight)[:, None]                       # (B, 1, T, S, S)
    both = random_crop(torch.cat([video, weight], dim=1), args.vae_crop, gen)    # one crop for pixels and weights
    video, weight = both[:, :3], both[:, 3:]
    with torch.no_grad():
        raw = vae.encode_raw(video)
    with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        out = vae.decode_raw(raw + 0.02 * torch.randn_like(raw)).float()
    diff = out - video
    return (weight * (diff.abs() + diff.square())).mean() / weight.mean()


def load_trained_vae(run: Path, preset: ModelPreset, decoder: bool = False) -> MiniVAE:
    """The trained autoencoder; `decoder` True takes the decoder-stage weights when that stage ran."""
    path = run / "decoder.ckpt" if decoder and (run / "decoder.ckpt").exists() else run / "vae.ckpt"
    st = torch.load(path, map_location="cpu", weights_only=False)
    vae = MiniVAE(replace(preset.autoencoder, first_as_group="first_in.weight" not in st["model"]))
    vae.load_state_dict(st["model"])
    return vae.eval().requires_grad_(False)


class HeldOut:
    """Fixed clips of the held-out split (identity view) and fixed draws (noise level, noise, expression kept):
    the flow loss on them is comparable from step to step and between runs. `videos` are the first videos of `bank`
    (augmented_videos puts the identity view first), so the clips gather from the training bank."""

    def __init__(self, bank: LatentBank, videos: list[Video], clips: int, k: int = 3, seed: int = 1234):
        gen = np.random.default_rng(seed)
        # the draws of every earlier run (references anywhere, half the clips' own first frames): comparable curves
        self.batch = dit_batch(bank, ClipDataset(videos, "test"), clips, k - 1, gen, ref_first=0.5)
        tgen = torch.Generator().manual_seed(seed)
        self.u = torch.rand(clips, generator=tgen)
        self.noise = torch.randn(self.batch[0].shape, generator=tgen)
        self.keep = torch.ones(clips)

    @torch.no_grad()
    def loss(self, model: "MiniPortrait", autocast: bool) -> float:
        was = model.training
        model.eval()
        out = flow_loss(model, *self.batch, None, u=self.u, noise=self.noise, keep=self.keep, autocast=autocast)
        model.train(was)
        return float(out)


def train_dit(args, preset: ModelPreset, data: ClipDataset, run: Path) -> None:
    vae = load_trained_vae(run, preset).to(args.device)
    t_bank = time.time()
    videos = data.videos
    if args.augment:
        data = ClipDataset(augmented_videos(videos), "train", args.teacher_share)
    videos_to(data, args.device)
    bank = LatentBank(vae, data.videos)
    print(f"latent bank of {len(data.videos)} videos built in {time.time() - t_bank:.0f}s", flush=True)
    held_out = HeldOut(bank, data.videos[:len(videos)], args.val_clips) if args.val_every else None
    torch.manual_seed(args.seed)
    model = MiniPortrait(preset).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen, tgen = np.random.default_rng(args.seed + 1), torch.Generator().manual_seed(args.seed + 1)
    ckpt = run / "dit.ckpt"
    if args.init_dit and not ckpt.exists():   # continue from an exported checkpoint (a fresh optimizer)
        init_from_export(model, Path(args.init_dit))
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    step, log, val = load_state(ckpt, model, opt, gen, tgen, ema)
    evaluated = ema if ema is not None else model   # what the held-out loss, --best and the export see
    if ema is not None:  # the parameter lists once, not per step
        ema_params, model_params = list(ema.parameters()), list(model.parameters())

    def held_out_loss() -> None:  # once per step at most; the best weights so far kept for `export --best`
        if held_out is not None and (not val or val[-1][0] != step):
            val.append((step, held_out.loss(evaluated, args.bf16)))
            best = keep_best(run / BEST_DIT, evaluated, val)
            print(f"dit step {step} held-out loss {val[-1][1]:.4f}{' (best so far)' * best}", flush=True)

    t0 = time.time()
    spent = {"batch": 0.0, "step": 0.0, "n": 0}   # host seconds in batch assembly / in the whole step (synced)
    while step < args.steps and time.time() - t0 < 60 * args.minutes:
        if held_out is not None and step % args.val_every == 0:
            held_out_loss()
        t_step = time.perf_counter()
        k = int(gen.choice(args.latents)) - 1
        x0, y, refs, ref_lms, lms, weight = dit_batch(bank, data, args.batch, k, gen, args.ref_first,
                                                      args.lip_weight, args.eye_weight, args.ref_gap)
        spent["batch"] += time.perf_counter() - t_step
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, progress=progress(args, t0))
        loss = flow_loss(model, x0, y, refs, ref_lms, lms, weight, tgen, autocast=args.bf16,
                         feature_noise=args.feature_noise)
        step = optimizer_step("dit", loss, opt, model.parameters(), step, log, t0, args,
                              lambda n: save_state(ckpt, model, opt, n, gen, tgen, log, val, ema), clip=1.0)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1.0 - args.ema)
        spent["step"] += time.perf_counter() - t_step   # optimizer_step's loss.item() waited for the device
        spent["n"] += 1
        if step % args.log_every == 0:
            n = spent["n"]
            print(f"  {1e3 * spent['step'] / n:.1f} ms/step ({1e3 * spent['batch'] / n:.1f} ms assembling the "
                  f"batch), {args.batch * n / spent['step']:.0f} clips/s", flush=True)
            spent.update(batch=0.0, step=0.0, n=0)
    held_out_loss()
    save_state(ckpt, model, opt, step, gen, tgen, log, val, ema)
    print(f"dit done at step {step}", flush=True)


def init_from_export(model: MiniPortrait, folder: Path) -> None:
    """Start the DiT stage's model from an exported checkpoint (the published layout `export` writes), read by the
    renderer's own loaders (engine.mini). An expression encoder of another feature layout (a checkpoint from before
    the relative, pose-free landmark features: 1437 inputs) is left at its fresh init; everything else loads."""
    from engine.mini import MINI_CLIP_FILE, MINI_CONTEXT_FILE
    from engine.models.mini_expression import load_landmark_expression
    from engine.weights import WeightsError, find_file, load_dit, load_portrait_encoder, load_state_dict

    p = model.preset
    model.dit.load_state_dict(load_dit(folder, p.dit, dtype=torch.float32).state_dict())
    model.portrait.load_state_dict(load_portrait_encoder(folder, p.portrait).state_dict())
    model.clip.load_state_dict(load_state_dict(find_file(folder, MINI_CLIP_FILE, "mini CLIP tower")))
    with torch.no_grad():
        model.context.copy_(load_state_dict(find_file(folder, MINI_CONTEXT_FILE, "mini text context"))["context"])
    try:
        model.expression.load_state_dict(load_landmark_expression(folder, p.landmark_expression,
                                                                  p.portrait).state_dict())
    except WeightsError as err:
        print(f"expression encoder starts fresh: {err}", flush=True)


# ------------------------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------------------------
def export(run: Path, out: Path, preset: ModelPreset, best: bool = False) -> None:
    """Write the published layout: transformer.pt (Wan keys + emo_k/v_proj), portrait_encoder.pt (proj_model.,
    mouth_proj_model., emo_proj_model.), and the mini's own mini_vae.pt, mini_expression.pt, mini_clip.pt,
    mini_context.pt. `best`: the DiT stage's weights at its lowest held-out loss (<run>/dit_best.pt, written with
    --val-every) instead of its last."""
    source = run / (BEST_DIT if best else "dit.ckpt")
    if not source.exists():
        raise SystemExit(f"No {source.name} in {run}: " + ("train the dit stage with --val-every first."
                                                           if best else "train the dit stage first."))
    out.mkdir(parents=True, exist_ok=True)
    model = MiniPortrait(preset)
    state = torch.load(source, map_location="cpu", weights_only=False)
    model.load_state_dict(state.get("ema", state["model"]))   # the weights' moving average when trained with --ema
    if best:
        print(f"exporting the dit stage at step {state['step']}, held-out loss {state['held_out_loss']:.4f}")
    vae = load_trained_vae(run, preset, decoder=True)

    def dump(module_or_sd, name):
        sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
        torch.save({k: v.detach().clone().contiguous() for k, v in sd.items()}, out / name)

    # the DiT in half precision (the file is by far the largest; the loaders cast to the runtime dtype)
    dump({k: v.half() if v.is_floating_point() else v for k, v in model.dit.state_dict().items()}, "transformer.pt")
    dump(model.portrait, "portrait_encoder.pt")
    dump(model.expression, "mini_expression.pt")
    dump(model.clip, "mini_clip.pt")
    dump({"context": model.context.detach()}, "mini_context.pt")
    dump(vae, "mini_vae.pt")
    print(f"exported to {out}: " + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB"
                                                for p in sorted(out.iterdir())))


def training_curves(run: Path, out: Path) -> None:
    """The loss curves of every stage run so far (from the checkpoints' logs) -> out.json and out.png."""
    import json

    curves = {}
    for stage in ("vae", "dit", "decoder"):
        path = run / f"{stage}.ckpt"
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)
            log = state["log"]
            if not log:   # a stage started from trained weights and not trained further (--init-vae, --minutes 0)
                continue
            steps, losses = np.array([s for s, _, _ in log]), np.array([l for _, l, _ in log])
            k = 25
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid") if len(losses) >= k else losses
            curves[stage] = {"steps": steps[len(steps) - len(smooth):].tolist()[::5],
                             "loss_mean25": [round(float(x), 4) for x in smooth[::5]], "final_step": int(steps[-1])}
            if state.get("val"):
                curves[stage]["held_out"] = {"steps": [int(s) for s, _ in state["val"]],
                                             "loss": [round(float(v), 4) for _, v in state["val"]]}
    out.with_suffix(".json").write_text(json.dumps(curves) + "\n")
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the JSON is the record
        print("matplotlib is not installed: wrote the curves' JSON only", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4))
    for ax, (stage, c) in zip(np.atleast_1d(axes), curves.items()):
        ax.plot(c["steps"], c["loss_mean25"], label="training (mean of 25 steps)")
        if "held_out" in c:
            ax.plot(c["held_out"]["steps"], c["held_out"]["loss"], "o-", label="held-out clips (fixed draws)")
            ax.legend()
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=80)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["vae", "dit", "decoder"],
                    help="train this stage (resumes from <run>/<stage>.ckpt)")
    ap.add_argument("--export", metavar="DIR", help="write the trained checkpoint in the published layout to DIR")
    ap.add_argument("--best", action="store_true",
                    help="with --export: the dit stage at its lowest held-out loss (needs --val-every), not its "
                         "last (tried once: worse on the held-out quality measures, quality_mini_best50.json)")
    ap.add_argument("--run", default="runs/mini", help="training state folder")
    ap.add_argument("--curves", metavar="PATH", help="write the loss curves (PATH.json, PATH.png)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of this invocation")
    ap.add_argument("--steps", type=int, default=10**9, help="total steps of the stage")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latents", type=int, nargs="+", default=[3, 4], help="latent frames per clip (drawn)")
    ap.add_argument("--ref-first", type=float, default=0.1,
                    help="probability that a clip's reference is its own first frame (else another frame; the "
                         "checkpoints up to weights/mini of 2026-12 used 0.5, which teaches copying the reference)")
    ap.add_argument("--ref-gap", type=int, default=16,
                    help="frames between a clip and a reference that is not its first frame (at least)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-crop", type=int, default=64)
    ap.add_argument("--lr-vae", type=float, default=1e-3)
    ap.add_argument("--init-dit", metavar="DIR",
                    help="dit stage: start from the exported checkpoint in DIR (e.g. weights/mini) instead of "
                         "random weights")
    ap.add_argument("--init-vae", metavar="PATH",
                    help="vae stage: start from this trained mini_vae.pt (e.g. weights/mini/mini_vae.pt) instead of "
                         "random weights; with --minutes 0 only its latent statistics are recomputed")
    ap.add_argument("--augment", action="store_true",
                    help="dit stage: train on every video's mirrored and zoomed views too (train/augment.py)")
    ap.add_argument("--lip-weight", type=float, default=1.0,
                    help="dit stage: weight of the mouth box in the loss (the committed checkpoint: 1; a short run "
                         "at 4 helped the training split, not the held-out frames: quality_mini_lip4.json)")
    ap.add_argument("--eye-weight", type=float, default=1.0, help="dit stage: weight of each eye box in the loss")
    ap.add_argument("--decoder-lip-weight", type=float, default=4.0,
                    help="decoder stage: loss weight of the mouth box (train_decoder's region_weight)")
    ap.add_argument("--decoder-eye-weight", type=float, default=4.0,
                    help="decoder stage: loss weight of each eye box")
    ap.add_argument("--teacher", metavar="CACHE", nargs="+",
                    help="dit stage: also train on train/teacher.py's rendered videos (cache folders or packed files)")
    ap.add_argument("--teacher-share", type=float, default=0.5,
                    help="share of the clips drawn from the --teacher videos (the rest from the real ones)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="dit stage: keep an exponential moving average of the weights with this decay (e.g. "
                         "0.998); the held-out loss, --best and the export use it (0: none)")
    ap.add_argument("--feature-noise", type=float, default=0.0,
                    help="dit stage: std of Gaussian noise on the landmark features (expression residuals are "
                         "~0.04-2 after their x4 scale, the face mesh's jitter ~0.02): a driving signal the model "
                         "cannot key single training frames on")
    ap.add_argument("--val-every", type=int, default=0,
                    help="dit stage: log the loss on fixed held-out clips every N steps (0: never)")
    ap.add_argument("--val-clips", type=int, default=64, help="held-out clips of --val-every")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=25, help="print the mean loss every N steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see the module docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in the forward passes (GPU)")
    ap.add_argument("--lr-decay", action="store_true",
                    help="decay the learning rate linearly to 10%% over this invocation's --minutes")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA build of torch and a GPU: use --device cpu.")
    set_fused_kernels(False)   # the Triton norms are inference kernels (no backward): autograd needs the torch ops
    set_attention_backend("sdpa")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)
    preset = get_preset("mini")
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    if args.stage:
        videos = load_cache(args.cache)
        if args.teacher and args.stage == "dit":   # after the real videos: the held-out clips draw from those
            videos += [replace(v, train_only=True) for path in args.teacher for v in load_cache(path)]
        data = ClipDataset(videos, "train", args.teacher_share)
        {"vae": train_vae, "dit": train_dit, "decoder": train_decoder}[args.stage](args, preset, data, run)
    if args.export:
        export(run, Path(args.export), preset, best=args.best)
    if args.curves:
        training_curves(run, Path(args.curves))


if __name__ == "__main__":
    main()
