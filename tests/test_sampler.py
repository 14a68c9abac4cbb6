"""Sampler parity with diffusers' FlowMatchEulerDiscreteScheduler, the distilled schedule, and guidance."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from engine.config import SamplerConfig
from engine.sampler import (Sampler, combine_guidance, distilled_schedule, euler_step, flow_schedule,
                            guidance_branches, guided_flow, make_schedule)


@pytest.mark.parametrize("steps", [1, 4, 10, 30, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_schedule_equals_diffusers(steps, shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    ours = flow_schedule(steps, shift)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert len(ours) == steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_equals_diffusers_step(dtype):
    steps, shift = 30, 5.0
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    sampler = Sampler(flow_schedule(steps, shift))
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(1, 16, 3, 8, 8, generator=g).to(dtype)
    x = x_ref.clone()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=g).to(dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x = sampler.step(i, x, v)
        assert x.dtype == x_ref.dtype
        assert torch.equal(x, x_ref), f"step {i}"


def test_distilled_schedule_matches_lightx2v_definition():
    """[1000, 750, 500, 250] at shift 5 are points of the unshifted 1000-step grid, shifted: sigma = 5s/(1+4s)."""
    sch = distilled_schedule((1000, 750, 500, 250), shift=5.0)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    expect = 5 * s / (1 + 4 * s)
    torch.testing.assert_close(sch.sigmas[:-1].double(), expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sch.timesteps.double(), expect * 1000, rtol=1e-6, atol=1e-4)
    assert sch.sigmas[-1] == 0 and sch.step_kind == "distill"
    assert make_schedule(SamplerConfig(fast=True)).timesteps.tolist() == sch.timesteps.tolist()
    assert len(make_schedule(SamplerConfig())) == 30


def test_distilled_steps():
    """FlashPortrait's step is Euler ((x - sigma v) + sigma_next v); LightX2V's re-noises x0 with fresh noise.
    With the exact flow of a straight path both land on x0."""
    x0 = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn_like(x0)
    v = noise - x0
    fp = Sampler(distilled_schedule())
    x = noise.clone()  # sigma 1
    for i in range(len(fp)):
        x_next = fp.step(i, x, v)
        s, sn = fp.sigma(i), fp.schedule.sigmas[i + 1].item()
        torch.testing.assert_close(x_next, x + (sn - s) * v, rtol=1e-6, atol=1e-6)
        x = x_next
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)

    sch = distilled_schedule(step_kind="renoise")
    lx = Sampler(sch)
    fresh = torch.randn_like(x0)
    x1 = lx.step(0, noise, v, noise=fresh)
    s1 = sch.sigma_list[1]
    torch.testing.assert_close(x1, (1 - s1) * x0 + s1 * fresh)
    last = lx.step(len(sch) - 1, x1, v)  # sigma_next = 0: the x0 estimate x - sigma v, no noise
    torch.testing.assert_close(last, x1 - sch.sigma_list[-2] * v)
    with pytest.raises(ValueError, match="step_kind"):
        distilled_schedule(step_kind="dpm")


def test_guidance_passes_and_formula():
    assert [b.name for b in guidance_branches(1.0)] == ["emo"]
    br = guidance_branches(4.0)
    assert [(b.name, b.ip_scale) for b in br] == [("emo", 1.0), ("no_emo", 0.0)]
    assert [b.name for b in guidance_branches(4.0, text_cfg=2.0)] == ["emo", "no_emo", "no_text"]
    emo, no = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(combine_guidance({"emo": emo, "no_emo": no}, 4.0), no + 4.0 * (emo - no))
    calls = []

    def model_fn(b):
        calls.append(b.ip_scale)
        return emo if b.ip_scale else no

    assert torch.equal(guided_flow(model_fn, 1.0), emo) and calls == [1.0]  # emo_cfg 1: a single pass
    calls.clear()
    torch.testing.assert_close(guided_flow(model_fn, 4.0), no + 4.0 * (emo - no))
    assert calls == [1.0, 0.0]


def test_euler_step_dtype_and_values():
    x = torch.ones(4, dtype=torch.bfloat16)
    v = torch.full((4,), 2.0, dtype=torch.bfloat16)
    assert euler_step(x, v, -0.25).tolist() == [0.5] * 4
