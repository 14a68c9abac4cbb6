"""Guidance economy (engine/guidance.py): the no-expression branch at one expression full pass in N.

Properties: refresh 1 with every step full is exactly the pair at every step (bit for bit, through the economy's own
code path: the batch-1 expression step + the pair on request); the batch-1 expression step equals the pair's
expression half; the staggered schedule costs every window the same (one pair per N full passes) and re-runs the
pair when no stored difference overlaps the window; a stored difference is re-indexed by global latent frame
(exact for a difference that depends on the frame only); the error against the pair at every pass is measured
and reported (engine and live renderer stats).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

try:
    from tests.conftest import image_rgb, video_frames
except ImportError:  # pytest's rootdir-relative import of conftest
    from conftest import image_rgb, video_frames

from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig
from engine.flashportrait import FlashPortraitEngine, make_schedule_for
from engine.guidance import GuidanceEconomy, auto_refresh, shift_into

CPU = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False, emo_refresh=2)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine():
    eng = FlashPortraitEngine(image_rgb("lp_s0.jpg"), None, 64, 64, preset="tiny", runtime=CPU,
                              sampler=SamplerConfig(fast=True), window=WindowConfig(3, 2),
                              random_weights=True)
    eng.warm_up()
    return eng


def test_refresh_one_every_step_full_is_exactly_the_pair(engine):
    res = engine.guidance_error(refresh=1, windows=4, interval=1)
    assert res["latent_rel_l2_max"] == 0.0 and res["estimated_flows"] == 0
    assert res["pair_passes"] == res["full_passes"] == 4 * res["steps"] and res["single_passes"] == 0
    # one step, directly: the economy path (pair on request through the batch-1 call) == the batch-2 pair path
    schedule = make_schedule_for(engine.sampler_cfg, 4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 3, *engine.latent_hw, generator=g)
    emo = torch.randn(1, 3, 97, engine.preset.dit.emo_dim, generator=g)
    alpa = ALPAConfig(mode="off")
    plain = engine.guided_flow(engine.cached_dit(schedule, alpa), x, 1, emo, key="w")
    econ = engine.guided_flow(engine.cached_dit(schedule, alpa), x, 1, emo, key="w", frame=0,
                              guide=engine.make_guidance(refresh=1))
    assert torch.equal(plain, econ)
    # TeaCache and layer caches keep the pair at every pass (the economy runs on the compiled, output-cache path)
    for cfg in (ALPAConfig(mode="teacache"), ALPAConfig(mode="alpa", interval=2, cache="layers")):
        guide = engine.make_guidance(refresh=4)
        flow = engine.guided_flow(engine.cached_dit(schedule, cfg), x, 0, emo, key="w", frame=0, guide=guide)
        assert guide.pairs == guide.singles == 0 and torch.isfinite(flow).all()


def test_single_step_equals_the_pairs_expression_half(engine):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 3, *engine.latent_hw, generator=g)
    emo = torch.randn(1, 3, 97, engine.preset.dit.emo_dim, generator=g)
    single = engine.step1(x, 750.0, emo, 1.0).clone()
    pair = engine.step(x.expand(2, -1, -1, -1, -1), 750.0, emo.expand(2, -1, -1, -1), engine.ip_scale_step)
    torch.testing.assert_close(single, pair[:1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pair[:1], pair[1:])  # the two branches differ: the estimate has work to do
    # the single step reads the pair's context K/V (its first half): no second copy
    assert all(a.data_ptr() == b.data_ptr() for kv1, kv2 in zip(engine.step1.kv, engine.step.kv)
               for a, b in zip(kv1, kv2))
    from kernels.graphs import CompiledStep

    with pytest.raises(ValueError, match="kv_buffers"):
        CompiledStep(engine.dit, engine.step1.shape, CPU, kv_buffers=engine.step.kv)  # batch 2 for a batch-1 step


def schedule_of(refresh: int, windows: int, full_steps=(0, 2), stride: int = 1, sigmas=(1.0, 0.9, 0.7, 0.4)):
    """Which steps ran the pair, window by window, for a stream whose windows run full passes at `full_steps`."""
    econ = GuidanceEconomy(4.0, refresh)
    emo = torch.zeros(1, 16, 3, 2, 2)
    out = []
    for k in range(windows):
        pairs = []
        for i, sigma in enumerate(sigmas):
            full = i in full_steps
            pair = econ.wants_pair(i, sigma, k * stride, full)
            econ.combine(emo, sigma, k * stride, emo if pair else None, full=full)
            if pair:
                pairs.append(i)
        out.append(pairs)
    return out, econ


def test_refresh_schedule_is_staggered_and_even():
    pairs, econ = schedule_of(2, 6)
    assert pairs == [[0], [2], [0], [2], [0], [2]]  # one pair per window, alternating between the two full steps
    assert econ.stats()["dit_batch_per_full_pass"] == 1.5 and econ.estimated == 6 + 12  # singles + predicted
    pairs, _ = schedule_of(4, 8)
    assert pairs == [[0], [], [2], [], [0], [], [2], []]  # one pair every other window, rotating
    assert all(p == [0, 2] for p in schedule_of(1, 3)[0])
    # a window that moved past every stored difference (a skip ahead) runs the pair again
    econ = GuidanceEconomy(4.0, 4)
    emo = torch.zeros(1, 16, 3, 2, 2)
    assert econ.wants_pair(0, 1.0, 0, True)
    econ.combine(emo, 1.0, 0, emo)
    assert not econ.wants_pair(2, 0.7, 0, True)
    assert econ.wants_pair(0, 1.0, 3, True), "no stored difference overlaps frames 3..5: the pair must run"


def test_stored_difference_follows_the_frames():
    W, c = 3, 4.0
    frame_d = lambda f0: torch.arange(f0, f0 + W, dtype=torch.float32).view(1, 1, W, 1, 1).expand(1, 2, W, 2, 2)
    econ = GuidanceEconomy(c, refresh=3)
    emo0 = torch.randn(1, 2, W, 2, 2)
    no_emo0 = emo0 - frame_d(5)  # d = e - n depends on the global latent frame only
    assert econ.wants_pair(0, 1.0, 5, True)
    g = econ.combine(emo0, 1.0, 5, no_emo0)
    torch.testing.assert_close(g, no_emo0 + c * (emo0 - no_emo0))
    # the next window starts one frame later: the estimate re-indexes d, the frame past the stored window holds
    # its last one
    emo1 = torch.randn(1, 2, W, 2, 2)
    assert not econ.wants_pair(0, 1.0, 6, True)
    est = econ.combine(emo1, 1.0, 6)
    d = frame_d(6).clone()
    d[:, :, -1] = 7.0
    torch.testing.assert_close(est, emo1 + (c - 1) * d)
    # and directly
    out = torch.empty(1, 2, W, 2, 2)
    assert shift_into(out, frame_d(5), 5, 7) and out[0, 0, :, 0, 0].tolist() == [7.0, 7.0, 7.0]
    assert not shift_into(out, frame_d(5), 5, 8) and not shift_into(out, frame_d(5), 5, 4)


def test_error_against_the_pair_every_pass_is_reported(engine):
    res = engine.guidance_error(refresh=2, windows=5, interval=2)
    assert res["pair_passes"] < res["full_passes"] == 5 * 2  # ALPA K=2 of 4 steps: 2 full passes per window
    assert res["estimated_flows"] > 0
    for key in ("guided_rel_l2_mean", "guided_rel_l2_max", "latent_rel_l2_mean", "latent_rel_l2_max"):
        assert math.isfinite(res[key]) and res[key] > 0, (key, res)
    assert res["guided_rel_l2_mean"] <= res["guided_rel_l2_max"]


def test_live_renderer_runs_the_economy_and_reports_it(engine):
    from engine.controller import ControllerConfig
    from engine.renderer import FlashPortraitRenderer

    r = FlashPortraitRenderer(engine.reference, None, 64, 64, preset="tiny", runtime=CPU, engine=engine,
                              alpa=ALPAConfig(mode="alpa", interval=2, order=1), random_weights=True, pace=False,
                              controller=ControllerConfig(enabled=False))
    try:
        for j, frame in enumerate(video_frames("lp_d0.mp4", 21)):
            r.process(frame, j / 25)
        stats = r.stats()
        assert r.windows >= 3 and stats["error"] is None
        guide = stats["guidance"]
        assert stats["guidance_economy"] is True and stats["emo_refresh"] == 2
        assert guide["pair_passes"] + guide["single_passes"] == stats["alpa_full_passes"]
        assert guide["single_passes"] >= 1 and guide["pair_passes"] >= r.windows // 2
    finally:
        r.close()


def test_auto_refresh():
    assert auto_refresh("14b", 4.0) == 4 and auto_refresh("1.3b", 4.0) == 1
    assert auto_refresh("14b", 1.0) == 1 and auto_refresh("14b", 4.0, world_size=2) == 1
    with pytest.raises(ValueError, match="--emo-refresh"):
        GuidanceEconomy(4.0, 0)


def test_unused_engine_refresh_needs_the_single_step():
    eng = FlashPortraitEngine(np.zeros((64, 64, 3), np.uint8), None, 64, 64, preset="tiny",
                              runtime=RuntimeConfig(device="cpu", compile=False, cuda_graphs=False, emo_refresh=1),
                              sampler=SamplerConfig(fast=True), window=WindowConfig(3, 2),
                              random_weights=True)
    eng.warm_up()
    assert eng.step1 is None and eng.make_guidance() is None and eng.stats()["guidance_economy"] is False
    with pytest.raises(ValueError, match="emo_refresh > 1"):
        eng.guidance_error()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_pair_and_single_graphs_share_one_pool():
    """The pair (batch 2) and the expression branch alone (batch 1) captured into one graph memory pool replay in any
    order with their own results, allocating nothing per call."""
    from engine.config import get_preset
    from engine.models.dit import WanModel
    from kernels.graphs import CompiledStep, StepShape

    torch.manual_seed(0)
    cfg = get_preset("tiny").dit
    model = WanModel(cfg).to("cuda", torch.bfloat16).eval()
    rt = RuntimeConfig(device="cuda", compile=False, cuda_graphs=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    ctx = torch.randn(2, 10, cfg.text_dim, device="cuda", generator=g)
    clip = torch.randn(2, cfg.clip_tokens, cfg.clip_dim, device="cuda", generator=g)
    y = torch.randn(2, 20, 3, 8, 8, device="cuda", generator=g)
    pair = CompiledStep(model, StepShape(2, 3, 8, 8), rt)
    pair.set_session(ctx, clip, y)
    pair.capture()
    single = CompiledStep(model, StepShape(1, 3, 8, 8), rt, pool=pair.pool,
                          kv_buffers=[tuple(t[:1] for t in kv) for kv in pair.kv])
    single.set_session(None, None, y[:1], kv=single.kv)
    single.capture()
    ip = torch.tensor([1.0, 0.0], device="cuda")
    outs = []
    for k in range(3):
        x = torch.randn(1, 16, 3, 8, 8, device="cuda", generator=g)
        emo = torch.randn(1, 3, cfg.emo_tokens_per_frame, cfg.emo_dim, device="cuda", generator=g).bfloat16()
        p = pair(x.expand(2, -1, -1, -1, -1), 750.0, emo.expand(2, -1, -1, -1), ip).clone()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        s = single(x, 750.0, emo, 1.0).clone()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] - before <= 1  # the clone
        torch.testing.assert_close(s, p[:1], atol=2e-2, rtol=2e-2)
        outs.append(s)
    assert not torch.allclose(outs[0], outs[1])
