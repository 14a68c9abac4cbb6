"""Flow-matching sampler: the shifted Euler schedule, the 4-step distilled schedule, and emotion guidance.

Flow matching here means x_sigma = (1 - sigma) * x0 + sigma * noise and the DiT predicts the flow v = noise - x0,
so one Euler step is x <- x + (sigma_next - sigma) * v.

Two schedules, both as a `Schedule` (timesteps fed to the DiT, sigmas used by the step):

* `flow_schedule(steps, shift)` reproduces diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift)` followed by
  `set_timesteps(steps)`, which is what FlashPortrait's "Flow" sampler runs (30 steps, shift 5). That includes
  diffusers' quirk that the linspace ends at the *already shifted* sigma_min = shift(1/1000) and is then shifted a
  second time, so with shift 5 the last sigma is about 0.0244, not 0.0010. Timesteps are sigma * 1000 (float).
* `distilled_schedule((1000, 750, 500, 250), shift)` is the step-distillation schedule of FlashPortrait's
  `fast_infer.py` (its StepDistillScheduler, taken from LightX2V). The list names positions on the unshifted
  1000-step grid: sigma_i = shift(t_i / 1000) where shift(s) = k s / (1 + (k - 1) s); with shift 5 that is sigmas
  [1.0, 0.9375, 0.8333, 0.625] and DiT timesteps [1000, 937.5, 833.3, 625], then 0.
  Its step (`Schedule.step_kind`):
    "distill" (default, FlashPortrait): x0 = x - sigma v, then x0 + sigma_next v in fp32, cast to v's dtype:
              Euler, with FlashPortrait's order of rounding;
    "renoise" (LightX2V's Wan2.1 scheduler): x0 = x - sigma v, then (1 - sigma_next) x0 + sigma_next * fresh
              Gaussian noise (consistency-model sampling); the last step returns x0.
  `flow_schedule` steps with "euler" (diffusers' arithmetic: fp32 sample + dt * v).

Guidance (FlashPortrait's emotion CFG): noise = no_emo + emo_cfg * (emo - no_emo), the no-emotion pass being the
same DiT call with `ip_scale = 0`. `emo_cfg <= 1` runs the emotion pass alone (one DiT pass per step).
Text CFG (off by default, scale 1.0) adds a third pass with the negative prompt and ip_scale 0:
noise = no_text + text_cfg * (no_emo - no_text) + emo_cfg * (emo - no_emo).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from engine.config import SamplerConfig

NUM_TRAIN_TIMESTEPS = 1000
DISTILLED_TIMESTEPS = (1000, 750, 500, 250)
STEP_KINDS = ("euler", "distill", "renoise")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of Wan / SD3 flow matching: s -> shift * s / (1 + (shift - 1) * s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class Schedule:
    """A sampling schedule.

    timesteps: (N,) fp32, what the DiT receives (in [0, 1000]);
    sigmas: (N + 1,) fp32, noise level before each step and a terminal 0;
    step_kind: "euler" (diffusers), "distill" (FlashPortrait's distilled Euler) or "renoise" (LightX2V).
    `sigma_list` (Python floats) lets the hot loop step without a device sync.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    step_kind: str = "euler"

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def sigma_list(self) -> list[float]:
        return [float(s) for s in self.sigmas]


def flow_schedule(steps: int = 30, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """Shifted flow-matching Euler schedule, equal to diffusers FlowMatchEulerDiscreteScheduler(shift).set_timesteps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps}): pass --steps 1 or more.")
    # diffusers' scheduler keeps a 1000-point training grid whose last point is shifted once at construction.
    train = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0)
    train_sigmas = shift_sigmas(train / num_train_timesteps, shift)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    # float64 linspace (numpy's rounding, not torch's symmetric one) between the shifted ends, divided and shifted
    # (again) in float64, then fp32: the arithmetic order of set_timesteps, so the result is bit-equal.
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = torch.from_numpy(shift_sigmas(t / num_train_timesteps, shift)).to(torch.float32)
    timesteps = sigmas * num_train_timesteps
    return Schedule(timesteps=timesteps, sigmas=torch.cat([sigmas, sigmas.new_zeros(1)]), step_kind="euler")


def distilled_schedule(step_list: Sequence[int] = DISTILLED_TIMESTEPS, shift: float = 5.0,
                       num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, step_kind: str = "distill") -> Schedule:
    """Step-distillation schedule: sigma_i = shift(t_i / 1000) read off the fp32 1000-point grid."""
    if step_kind not in STEP_KINDS:
        raise ValueError(f"step_kind must be one of {', '.join(STEP_KINDS)}, got {step_kind!r}.")
    if not step_list or any(not 0 < t <= num_train_timesteps for t in step_list):
        raise ValueError(f"distilled timesteps must lie in (0, {num_train_timesteps}] (got {list(step_list)}).")
    grid = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    grid = shift_sigmas(grid, shift)
    idx = torch.tensor([num_train_timesteps - int(t) for t in step_list])
    sigmas = grid[idx]
    return Schedule(timesteps=sigmas * num_train_timesteps, sigmas=torch.cat([sigmas, sigmas.new_zeros(1)]),
                    step_kind=step_kind)


def make_schedule(cfg: SamplerConfig) -> Schedule:
    """The schedule a SamplerConfig asks for (`fast` selects the 4-step distilled one)."""
    if cfg.fast:
        return distilled_schedule(DISTILLED_TIMESTEPS, cfg.shift)
    return flow_schedule(cfg.steps, cfg.shift)


def euler_step(sample: torch.Tensor, flow: torch.Tensor, dt: float | torch.Tensor) -> torch.Tensor:
    """x + dt * v, returned in the flow's dtype: (...) -> (...). With dt a 0-dim fp32 tensor (as `Sampler` passes
    it) this is diffusers' `step` bit for bit: the sample is upcast to fp32 while dt * v stays in v's dtype."""
    return (sample.to(torch.float32) + dt * flow).to(flow.dtype)


def distill_step(sample: torch.Tensor, flow: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """FlashPortrait's distilled step: (x - sigma v) + sigma_next v in fp32, returned in v's dtype."""
    v = flow.to(torch.float32)
    return (sample.to(torch.float32) - sigma * v + v * sigma_next).to(flow.dtype)


def renoise_step(sample: torch.Tensor, flow: torch.Tensor, sigma: float, sigma_next: float,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Distilled step: x0 = x - sigma v, then (1 - sigma_next) x0 + sigma_next * noise (x0 alone at sigma_next 0)."""
    x0 = sample.to(torch.float32) - sigma * flow.to(torch.float32)
    if sigma_next > 0:
        if noise is None:
            noise = torch.randn(x0.shape, dtype=torch.float32, device=x0.device, generator=generator)
        x0 = (1 - sigma_next) * x0 + sigma_next * noise
    return x0.to(sample.dtype)


class Sampler:
    """Steps a latent along a Schedule.

        sampler = Sampler(schedule)
        for i in range(len(sampler)):
            v = dit(x, sampler.timestep(i, batch))        # (B, 16, F, H, W) flow prediction
            x = sampler.step(i, x, v)                      # (B, 16, F, H, W)
    """

    def __init__(self, schedule: Schedule, generator: torch.Generator | None = None):
        self.schedule = schedule
        self.generator = generator
        self._sigmas = schedule.sigma_list
        self._timesteps: dict[str, torch.Tensor] = {}
        # 0-dim fp32 CPU tensors (usable with tensors on any device, no sync): dt * v then rounds like diffusers.
        self._dt = list((schedule.sigmas[1:] - schedule.sigmas[:-1]).unbind())

    def __len__(self) -> int:
        return len(self.schedule)

    def sigma(self, i: int) -> float:
        return self._sigmas[i]

    def timestep(self, i: int, batch: int = 1, device=None) -> torch.Tensor:
        """(batch,) fp32 timestep of step i for the DiT (a view of a per-device copy: no copy, no sync per step)."""
        key = str(device)
        if key not in self._timesteps:
            self._timesteps[key] = self.schedule.timesteps.to(device)
        return self._timesteps[key][i].expand(batch)

    def step(self, i: int, sample: torch.Tensor, flow: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latent after step i. `noise` (optional, fp32, sample's shape) fixes the draw of a "renoise" step."""
        kind = self.schedule.step_kind
        if kind == "distill":
            return distill_step(sample, flow, self._sigmas[i], self._sigmas[i + 1])
        if kind == "renoise":
            return renoise_step(sample, flow, self._sigmas[i], self._sigmas[i + 1], noise, self.generator)
        return euler_step(sample, flow, self._dt[i])


# --- guidance --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Branch:
    """One DiT pass of a guided step: its name (also the ALPA cache key), ip_scale and whether it uses the
    negative prompt."""

    name: str
    ip_scale: float
    negative_prompt: bool = False


def guidance_branches(emo_cfg: float, text_cfg: float = 1.0, ip_scale: float = 1.0) -> list[Branch]:
    """The passes one step needs: [emo] alone when emo_cfg <= 1 (and no text CFG), else [emo, no_emo(, no_text)]."""
    branches = [Branch("emo", ip_scale)]
    if emo_cfg > 1.0:
        branches.append(Branch("no_emo", 0.0))
        if text_cfg != 1.0:
            branches.append(Branch("no_text", 0.0, negative_prompt=True))
    elif text_cfg != 1.0:
        branches.append(Branch("no_text", ip_scale, negative_prompt=True))
    return branches


def combine_guidance(preds: dict[str, torch.Tensor], emo_cfg: float, text_cfg: float = 1.0) -> torch.Tensor:
    """Guided flow from the branch predictions of `guidance_branches` (FlashPortrait's formulas)."""
    emo = preds["emo"]
    if emo_cfg > 1.0:
        no_emo = preds["no_emo"]
        if text_cfg != 1.0:
            no_text = preds["no_text"]
            return no_text + text_cfg * (no_emo - no_text) + emo_cfg * (emo - no_emo)
        return no_emo + emo_cfg * (emo - no_emo)
    if text_cfg != 1.0:
        no_text = preds["no_text"]
        return no_text + text_cfg * (emo - no_text)
    return emo


def guided_flow(model_fn: Callable[[Branch], torch.Tensor], emo_cfg: float, text_cfg: float = 1.0,
                ip_scale: float = 1.0) -> torch.Tensor:
    """Run `model_fn(branch) -> flow (B, 16, F, H, W)` for every guidance branch and combine them."""
    preds = {b.name: model_fn(b) for b in guidance_branches(emo_cfg, text_cfg, ip_scale)}
    return combine_guidance(preds, emo_cfg, text_cfg)
