"""The adaptive budget controller (issue 7, item 3): unit properties, and the tiny FlashPortrait renderer with an
artificially slowed DiT step (EngineOptions.step_delay_s) fed at a real-time pace on CPU."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

try:
    from tests.conftest import data_file
except ImportError:
    from conftest import data_file

from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig
from engine.controller import Budget, BudgetController, ControllerConfig
from engine.flashportrait import EngineOptions, FlashPortraitEngine
from engine.renderer import FlashPortraitRenderer

FPS = 25.0


def run(ctl: BudgetController, ms_per_unit: float, windows: int, backlog=lambda i: 10) -> list[Budget]:
    """Feed `windows` windows whose wall time follows the cost model at `ms_per_unit`."""
    seen = []
    for i in range(windows):
        b = ctl.budget
        frames = 4 * b.stride
        ctl.observe(ms_per_unit * b.units() / 1e3, frames, backlog(i))
        seen.append(ctl.budget)
    return seen


def test_budget_cost_model():
    assert Budget(1, 4, 2).full_passes() == 4
    assert Budget(2, 4, 2).full_passes() == 2  # steps 0 and 2 full, 1 and 3 predicted
    assert Budget(3, 4, 2).full_passes() == 2  # steps 0 and 3
    assert Budget(2, 4, 2).units() < Budget(1, 4, 2).units()


def test_slow_engine_cuts_to_a_real_time_budget():
    ctl = BudgetController(Budget(1, 4, 2), window=6, fps=FPS, cfg=ControllerConfig(max_interval=3))
    # 100 ms per unit: the full budget (4.5 units per 8 frames = 320 ms of video) runs at rtf 0.71
    run(ctl, 100.0, 1)  # the first window is not judged (one-off costs)
    assert ctl.changes == 0 and "warming up" in ctl.reason
    run(ctl, 100.0, 1)
    assert ctl.history[1]["rtf"] < 1 and ctl.changes == 1
    assert "real-time factor" in ctl.reason and "cut to" in ctl.reason
    b = ctl.budget
    assert b.units() / b.stride < Budget(1, 4, 2).units() / 2
    assert ctl.predicted_rtf(b) >= ctl.cfg.target_rtf
    run(ctl, 100.0, 6)
    assert ctl.history[-1]["rtf"] >= 1.0 and ctl.budget == b  # measured as predicted: it holds
    assert ctl.budget.steps >= ctl.cfg.min_steps


def test_fast_engine_raises_back_and_latency_target_bounds_stride():
    ctl = BudgetController(Budget(1, 4, 1), window=6, fps=FPS, cfg=ControllerConfig(max_interval=3))
    run(ctl, 150.0, 2)  # very slow: cut hard after the warm-up window
    cut = ctl.budget
    assert cut != Budget(1, 4, 1)
    run(ctl, 5.0, 300)  # the GPU got fast (another session left): climbs back, one step at a time
    assert ctl.budget == Budget(1, 4, 1) and ctl.changes > 2
    assert any("raised" in str(h) for h in [ctl.reason]) or ctl.reason.startswith("holding")
    # a latency target excludes large strides: (4 (S + overlap) - 1) / fps of input wait alone
    tight = BudgetController(Budget(1, 4, 1), window=6, fps=FPS,
                             cfg=ControllerConfig(latency_target_ms=700, lookahead=0, max_interval=3))
    run(tight, 150.0, 8)
    assert tight.budget.stride <= 4 and tight.predicted_latency_ms(tight.budget) <= 700


def test_cheapest_budget_says_it_cannot_keep_up():
    ctl = BudgetController(Budget(1, 2, 1), window=2, fps=FPS,
                           cfg=ControllerConfig(max_interval=1, min_steps=2))
    run(ctl, 1000.0, 5)
    assert ctl.budget == Budget(1, 2, 1) and not ctl.keeping_up
    assert "repeats frames" in ctl.reason


def test_disabled_controller_keeps_the_budget():
    ctl = BudgetController(Budget(1, 4, 2), window=6, fps=FPS, cfg=ControllerConfig(enabled=False))
    run(ctl, 500.0, 4)
    assert ctl.budget == Budget(1, 4, 2) and ctl.changes == 0 and "off" in ctl.reason


@pytest.fixture(scope="module")
def frames():
    cap = cv2.VideoCapture(str(data_file("driving", "lp_d0.mp4")))
    out = []
    while len(out) < 78:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    return out


def drive(frames, controller: ControllerConfig, count: int, fps: float = 10.0,
          alpa: ALPAConfig = ALPAConfig(mode="alpa", interval=3, order=1)):
    """Push `count` lp_d0 frames at `fps` in real time into a tiny renderer whose every full DiT pass sleeps
    0.35 s; returns (renderer stats, controller, backlog after each push). The full budget (4 full passes per
    window of 8 frames = 0.8 s of video) then runs at a real-time factor of about 0.55. The engine's warm-up timings
    are injected (a 5 ms step, as the warm-up times it without the delay), so the session starts on the full budget
    whatever this machine's speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ref = np.ascontiguousarray(cv2.imread(str(data_file("reference", "lp_s0.jpg")))[:, :, ::-1])
    cfgs = dict(preset="tiny", runtime=RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False),
                sampler=SamplerConfig(fast=True), window=WindowConfig(4, 2), random_weights=True)
    engine = FlashPortraitEngine(ref, None, 64, 64, alpa=alpa, options=EngineOptions(step_delay_s=0.35), **cfgs)
    engine.warm_up()
    engine.timings = {"pass_s": 0.005, "decode_latent_s": 0.002}
    r = FlashPortraitRenderer(ref, None, 64, 64, alpa=alpa, fps=fps, pace=False, engine=engine,
                              controller=controller, **cfgs)
    assert r.controller.budget == r.controller.ladder[0] or not controller.enabled  # the full budget
    r.start()
    try:
        backlog = []
        t0 = time.monotonic()
        for j, frame in enumerate(frames[:count]):
            due = t0 + j / fps
            time.sleep(max(0.0, due - time.monotonic()))
            r.push(frame, due)
            while r.pull() is not None:
                pass
            backlog.append(r.backlog_frames())
        return r.stats(), r.controller, backlog, r._in.maxlen
    finally:
        r.close()
        torch.set_num_threads(before)


def test_slowed_step_reduces_budget_and_backlog_stops_growing(frames):
    stats, ctl, backlog, queue = drive(frames, ControllerConfig(max_interval=3, min_steps=2, patience=2), 70)
    hist = ctl.history
    assert stats["error"] is None and stats["dropped_in"] == 0
    assert hist[0]["rtf"] < 1.0 and hist[1]["rtf"] < 1.0  # the slowed full budget runs below real time...
    assert hist[0]["changed_to"] is None and hist[1]["changed_to"] is not None  # ...cut after the warm-up window
    first, now = Budget(**hist[0]["budget"]), ctl.budget
    assert now.units() / now.stride < first.units() / first.stride
    assert stats["controller"]["budget"] == hist[-1]["changed_to"] or stats["controller"]["budget"] == \
        hist[-1]["budget"]
    assert "cut to" in str(hist) or ctl.changes >= 1
    late = [h["rtf"] for h in hist[2:]]
    assert late and min(late) >= 1.0, hist  # after the cut the engine stays ahead of playback
    # the backlog levels off: over the last 3 s it is no larger than one window of frames above where it was
    third = len(backlog) // 3
    assert max(backlog[-30:]) <= max(backlog[third:2 * third]) + 4 * now.stride, backlog
    assert max(backlog) < queue  # never near the bounded input queue


def test_without_the_controller_the_backlog_grows(frames):
    """The same slowed engine on a fixed budget: generation falls behind and the backlog climbs all along (what
    the controller prevents above)."""
    stats, ctl, backlog, _ = drive(frames, ControllerConfig(enabled=False), 50, alpa=ALPAConfig(mode="off"))
    assert ctl.changes == 0 and all(h["rtf"] < 1.0 for h in ctl.history)
    assert backlog[-1] > backlog[len(backlog) // 2] + 8 > backlog[len(backlog) // 4] + 8, backlog
