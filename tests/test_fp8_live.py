"""FP8 (e4m3) in the live step: kernels/fp8 numerics against an independent reference, the FP8 step against the
fp32 step on the tiny preset, and the --fp8 auto|on|off choice as the engine and /stats see it.

The reference here does not reuse kernels/fp8: per-row scales are amax / 448 computed in the test, and rounding to
e4m3 is "nearest value of the e4m3 grid", the grid decoded from the 256 bit patterns.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from engine.build import engine_configs, resolve_fp8
from engine.config import RuntimeConfig, SamplerConfig, WindowConfig, get_preset
from engine.models.dit import WanModel
from kernels.fp8 import E4M3, Fp8Linear, quantize, relative_error
from kernels.graphs import CompiledStep, StepShape

CPU = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False)


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3fn value, ascending (decoded from the bit patterns: sign, 4 exponent bits (bias 7), 3
    mantissa bits; subnormals below 2^-6; no infinities; S.1111.111 is NaN)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp, man = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7.0)) * sign
    finite = (bits & 0x7F) != 0x7F
    return torch.tensor(np.unique(value[finite]), dtype=torch.float64)


def nearest_e4m3(v: torch.Tensor) -> torch.Tensor:
    grid = e4m3_grid()
    v = v.double().clamp(-448, 448)
    idx = torch.searchsorted(grid, v.contiguous()).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    return torch.where((v - lo).abs() <= (hi - v).abs(), lo, hi)


def test_grid_is_e4m3():
    grid = e4m3_grid()
    assert grid.max() == 448 and grid.min() == -448 and len(grid) == 253  # +-0 are one value
    assert torch.equal(grid.float(), grid.float().to(E4M3).float())  # representable values survive the cast


def test_rowwise_quantize_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-3, 3, 64).view(-1, 1)  # rows of very different ranges
    q, scale = quantize(x, rowwise=True)
    ref_scale = x.abs().amax(dim=1, keepdim=True) / 448.0
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert q.dtype == E4M3 and q.shape == x.shape
    assert torch.equal(q.double(), nearest_e4m3(x.double() / ref_scale.double()))
    # each row's largest entry lands on 448 exactly
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))


def test_round_trip_error_bounds():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 256, generator=g)
    q, scale = quantize(x, rowwise=True)
    back = q.float() * scale
    v = x / scale  # in e4m3 units
    normal = v.abs() >= 2.0 ** -6
    # 3 mantissa bits: half an ulp is 2^-4 of the value in the normal range, 2^-10 absolute among subnormals
    assert ((back - x).abs() <= 2.0 ** -4 * x.abs() * (1 + 1e-6))[normal].all()
    assert ((back - x).abs() <= 2.0 ** -10 * scale * (1 + 1e-6))[~normal].all()
    rel = relative_error(back, x)
    assert 0.005 < rel < 0.04, rel  # random data: about 2-3% RMS relative error
    # per-tensor scaling: one scale, same bound
    q_t, s_t = quantize(x, rowwise=False)
    assert s_t.dim() == 0 and float(s_t) == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    assert torch.equal(q_t.double(), nearest_e4m3(x.double() / s_t.double()))


def test_representable_values_are_exact():
    grid = e4m3_grid().float()
    row = grid[torch.randperm(len(grid), generator=torch.Generator().manual_seed(2))][:64]
    row[0] = 448.0  # the row's amax is 448: scale 1 (times the row factor below)
    x = torch.stack([row * 2.0 ** k for k in (-8, 0, 5)])
    q, scale = quantize(x, rowwise=True)
    assert torch.equal(q.float() * scale, x)


def test_fp8_linear_equals_the_dequantized_matmul():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(2, 10, 64, generator=g)
    fp8 = Fp8Linear(lin)
    sw = lin.weight.abs().amax(dim=1, keepdim=True) / 448
    w_ref = nearest_e4m3(lin.weight.double() / sw.double()) * sw.double()
    x2 = x.reshape(-1, 64)
    sx = x2.abs().amax(dim=1, keepdim=True) / 448
    x_ref = nearest_e4m3(x2.double() / sx.double()) * sx.double()
    y_ref = (x_ref @ w_ref.t() + lin.bias.double()).reshape(2, 10, 48)
    y = fp8(x)
    assert y.shape == (2, 10, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    assert 0 < relative_error(y, lin(x)) < 0.05


def tiny_step_pair(fp8: bool, scaling: str = "rowwise"):
    torch.manual_seed(0)
    cfg = get_preset("tiny").dit
    model = WanModel(cfg).eval()
    shape = StepShape(2, 3, 8, 8)
    step = CompiledStep(model, shape, RuntimeConfig(device="cpu", compile=False, cuda_graphs=False, fp8=fp8,
                                                    fp8_scaling=scaling))
    g = torch.Generator().manual_seed(1)
    step.set_session(torch.randn(2, 10, cfg.text_dim, generator=g), torch.randn(2, cfg.clip_tokens, cfg.clip_dim,
                     generator=g), torch.randn(2, 20, 3, 8, 8, generator=g))
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    emo = torch.randn(2, 3, cfg.emo_tokens_per_frame, cfg.emo_dim, generator=g)
    return step, step(x, 750.0, emo, torch.tensor([1.0, 0.0])).clone()


def test_fp8_step_against_the_fp32_step():
    ref_step, ref = tiny_step_pair(fp8=False)
    step, out = tiny_step_pair(fp8=True)
    linears = [m for n, m in step.model.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear)]
    fp8s = [m for m in step.model.modules() if isinstance(m, Fp8Linear)]
    # every block linear: self q k v o, cross q k v o k_img v_img, emo_k/v_proj, the FFN's two: 14 per block
    assert not linears and len(fp8s) == 2 * 14
    assert isinstance(step.model.head.head, nn.Linear)  # the head stays in the model dtype
    err = relative_error(out, ref)
    assert 1e-4 < err < 0.1, err  # FP8 changes the numbers, within FP8's few per cent
    # each branch of the pair separately too
    assert relative_error(out[1], ref[1]) < 0.1 and relative_error(out[0], ref[0]) < 0.1
    # one scale per tensor (--fp8-scaling tensorwise): coarser, still FP8-close
    tstep, tout = tiny_step_pair(fp8=True, scaling="tensorwise")
    assert all(not m.rowwise for m in tstep.model.modules() if isinstance(m, Fp8Linear))
    assert 1e-4 < relative_error(tout, ref) < 0.15 and not torch.equal(tout, out)


def args(**kw):
    base = dict(device=None, dtype=None, compile=None, preset="14b", steps=None, fast=None, emo_cfg=None,
                context_size=None, context_overlap=None, alpa=None, fp8="auto", low_vram=False, emo_refresh=None,
                fp8_scaling=None)
    return argparse.Namespace(**{**base, **kw})


def test_fp8_choice():
    assert resolve_fp8("on", "tiny", "cpu") is True and resolve_fp8("off", "14b", "cuda") is False
    assert resolve_fp8("auto", "14b", "cpu") is False and resolve_fp8("auto", "1.3b", "cuda") is False
    if torch.cuda.is_available():
        sm89 = torch.cuda.get_device_capability(0) >= (8, 9)
        assert resolve_fp8("auto", "14b", "cuda") is sm89
    else:
        assert resolve_fp8("auto", "14b", "cuda") is False  # no GPU visible: no FP8 matmul to use
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_fp8("yes", "14b", "cuda")
    assert engine_configs(args(fp8="on", device="cpu"))["runtime"].fp8 is True
    assert engine_configs(args(fp8="off", low_vram=True, device="cpu"))["runtime"].fp8 is True  # 24 GB mode
    assert engine_configs(args(emo_refresh=3))["runtime"].emo_refresh == 3
    import flashlive

    cli = flashlive.build_parser().parse_args(["serve", "--renderer", "flashportrait", "--fp8", "on", "--low-vram",
                                               "--emo-refresh", "4"])
    assert (cli.fp8, cli.low_vram, cli.emo_refresh) == ("on", True, 4)
    assert engine_configs(args(fp8_scaling="tensorwise"))["runtime"].fp8_scaling == "tensorwise"
    assert flashlive.build_parser().parse_args(["serve"]).fp8 == "auto"


def test_engine_reports_fp8_and_stays_close_to_fp32():
    from engine.flashportrait import FlashPortraitEngine, make_schedule_for
    from engine.config import ALPAConfig

    ref = np.full((64, 64, 3), 120, np.uint8)
    kw = dict(preset="tiny", sampler=SamplerConfig(fast=True), window=WindowConfig(3, 2),
              random_weights=True)
    plain = FlashPortraitEngine(ref, None, 64, 64, runtime=CPU, **kw)
    fp8 = FlashPortraitEngine(ref, None, 64, 64, runtime=RuntimeConfig(device="cpu", compile=False,
                                                                       cuda_graphs=False, fp8=True), **kw)
    plain.warm_up()
    fp8.warm_up()
    assert fp8.stats()["fp8"] is True and plain.stats()["fp8"] is False and fp8.stats()["fp8_scaling"] == "rowwise"
    with pytest.raises(ValueError, match="--fp8-scaling"):
        FlashPortraitEngine(ref, None, 64, 64, runtime=RuntimeConfig(device="cpu", fp8=True, fp8_scaling="row"), **kw)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 3, *plain.latent_hw, generator=g)
    emo = torch.randn(1, 3, 97, plain.preset.dit.emo_dim, generator=g)
    sched = make_schedule_for(plain.sampler_cfg, 4)
    flows = [e.guided_flow(e.cached_dit(sched, ALPAConfig(mode="off")), x, 0, emo, key="k") for e in (plain, fp8)]
    assert 1e-4 < relative_error(flows[1], flows[0]) < 0.15
