"""The budget controller chooses by quality and does not oscillate, on 14B-like costs (issue 14).

A fake clock replays a live stream window by window: driving frames arrive at 25 fps, a rolling window starts once its
frames are in (stride + lookahead latent frames), and costs what a 14B engine spends on it, with a cost structure
that is NOT the controller's model (a full guided DiT call, a few ms per ALPA-predicted step, a fixed overhead, the
decode per latent frame, +-5% deterministic jitter); under a latency target the lag is capped as the renderer caps
it. Nothing depends on this machine's speed. The costs are the issue's H200 measurements: a guided 14B call (batch 2)
296 ms in bf16 (today's live path) and 211 ms in FP8, one unguided call (--emo-cfg 1) ~140 ms.

Properties: budgets that compute the same thing at the same cost are one rung of the ladder, which is sorted by the
documented quality order (or a measured quality table); today's costs (nothing fits the 350 ms target in real
time) leave it on the fastest budget, saying why more full passes do not fit; guidance off it changes nothing (the
previous controller, replayed the same way, made 31 changes after the first 2 s, as the H200 run measured); where 2 full expression passes per window
fit, it ends on them, keeps up, meets the latency target and makes <= 3 changes after the first 2 s, also from a
pessimistic or optimistic warm-up seed; a load change is cut at once and recovered from; a budget that fell behind
is not chosen again within `retry_after_s` seconds of stream; window costs that cycle (the guidance economy's pair
pass every 4th pass) cause no oscillation; the renderer's stats name the budget, its full passes and the budget
changes with their times.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

try:
    from tests.conftest import image_rgb, video_frames
except ImportError:  # pytest's rootdir-relative import of conftest
    from conftest import image_rgb, video_frames

from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig
from engine.controller import Budget, BudgetController, ControllerConfig, load_quality_table

FPS = 25.0


@dataclass
class Gpu:
    """What one rolling window costs on a 14B engine (ms), independent of the controller's cost model."""

    pass_ms: float                  # one full guided DiT call at the window shape
    predicted_ms: float = 4.0       # one ALPA-predicted step (Taylor extrapolation of the DiT output)
    decode_ms: float = 12.0         # one latent frame (4 video frames) decoded to host frames
    overhead_ms: float = 6.0        # per window: launches, blending, the scheduler
    jitter: float = 0.05
    load: Callable[[float], float] | None = None  # cost multiplier at time t (another session, thermal, ...)

    def window(self, b: Budget, rng: random.Random, t: float) -> tuple[float, float]:
        full = b.full_passes()
        dit = self.pass_ms * full + self.predicted_ms * (b.steps - full) + self.overhead_ms
        dec = self.decode_ms * b.stride
        f = (1 + self.jitter * (2 * rng.random() - 1)) * (self.load(t) if self.load else 1.0)
        return f * (dit + dec) / 1e3, f * dec / 1e3


def controller(W: int, target: float, seed_pass_ms: float, clock: list, **cfg) -> BudgetController:
    """The renderer's controller for the live defaults (lookahead 1, 4-step distilled schedule, ALPA up to K=5),
    seeded as the renderer seeds it from the engine's warm-up: one guided call, one latent frame's decode."""
    return BudgetController(Budget(1, 4, 1), W, FPS, ControllerConfig(latency_target_ms=target, lookahead=1,
                                                                     max_interval=5, **cfg),
                            costs=(seed_pass_ms, 12.0), clock=lambda: clock[0])


def simulate(ctl: BudgetController, gpu: Gpu, clock: list, seconds: float = 22.0, seed: int = 0) -> list[dict]:
    """Windows of a live stream on a fake clock (see the module docstring); one row per window."""
    rng = random.Random(seed)
    t, released, emitted, rows = 0.0, 0, 0, []
    target = ctl.cfg.latency_target_ms
    while t < seconds:
        b = ctl.budget
        S, L = b.stride, ctl.lookahead(b)
        have = math.floor(t * FPS / 4) + 1  # latent frames whose tokens exist (latent i completes at frame 4i)
        if released and have - released > S + L + max(1, int(target * 1e-3 * FPS / 4)):
            released = have - S - L  # the renderer's lag cap: skip to the newest tokens
        start = max(t, 4 * (released + S + L - 1) / FPS)  # its last needed latent frame has arrived
        window_s, decode_s = gpu.window(b, rng, start)
        t = clock[0] = start + window_s
        first = 0 if released == 0 else 4 * released - 3  # the chunk's first frame (waited longest)
        frames = 4 * S - 3 if released == 0 else 4 * S
        latency_ms = 1e3 * (t - first / FPS + 1 / FPS)
        released += S
        backlog = max(0, math.floor(t * FPS) + 1 - emitted)
        emitted = 4 * released - 3
        new = ctl.observe(window_s, frames, backlog, decode_s=decode_s)
        rows.append({"t": t, "budget": b, "rtf": ctl.last_rtf, "latency_ms": latency_ms, "changed_to": new})
    return rows


def changes_after(ctl: BudgetController, t0: float = 2.0) -> list[dict]:
    return [c for c in ctl.change_log if c["t"] >= t0]


def p95(values) -> float:
    return float(np.percentile(values, 95))


def test_ladder_is_sorted_by_quality_with_one_rung_per_computation():
    ctl = BudgetController(Budget(1, 4, 1), 4, FPS, ControllerConfig(latency_target_ms=900, lookahead=1,
                                                                     max_interval=5))
    what = [(b.full_steps(), b.steps, b.stride, ctl.lookahead(b)) for b in ctl.ladder]
    assert len(set(what)) == len(what)  # no equal-cost twins
    # with 2 steps every K >= 2 runs step 0 in full and predicts step 1: only K = 2 is on the ladder
    assert {b.interval for b in ctl.ladder if b.steps == 2} == {1, 2}
    assert ctl.ladder[0] == Budget(1, 4, 1)
    keys = [b.quality_key() for b in ctl.ladder]
    assert keys == sorted(keys)
    passes = [b.full_passes() for b in ctl.ladder]
    assert passes == sorted(passes, reverse=True)  # more full expression passes first, whatever the stride
    # ALPA interval before fewer steps: 2 full passes in 4 steps (K = 2, then K = 3) before 2 plain steps
    two = [b for b in ctl.ladder if b.full_passes() == 2 and b.stride == 1 and b.lookahead is None]
    assert [(b.interval, b.steps) for b in two] == [(2, 4), (3, 4), (2, 3), (1, 2)]
    # under the target, stride is spent for passes: 4 passes at stride 2 before 2 at stride 1
    assert ctl.ladder.index(Budget(1, 4, 2)) < ctl.ladder.index(Budget(2, 4, 1))
    # without a target nothing bounds the input wait: the stride grows only when nothing smaller keeps up
    free = BudgetController(Budget(1, 4, 1), 4, FPS, ControllerConfig(lookahead=1, max_interval=5))
    strides = [b.stride for b in free.ladder]
    assert strides == sorted(strides) and free.ladder.index(Budget(2, 4, 1)) < free.ladder.index(Budget(1, 4, 2))
    slow = BudgetController(Budget(1, 4, 1), 4, FPS, ControllerConfig(lookahead=1, max_interval=5), costs=(30, 5))
    assert slow.budget == Budget(1, 3, 1)  # 4 passes at stride 1 do not keep up: 3 passes, not a larger stride


def test_today_14b_cannot_fit_and_says_why():
    """bf16 guided call 296 ms, 350 ms target, window 3 (the issue's first row): nothing keeps up; it stays on the
    fastest budget and says why, naming what 2 full expression passes would need."""
    clock = [0.0]
    ctl = controller(3, 350, 296, clock)
    rows = simulate(ctl, Gpu(296), clock)
    assert len(changes_after(ctl)) <= 3 and ctl.changes <= 3
    assert ctl.budget == max(ctl._allowed(), key=ctl.predicted_rtf)  # the fastest within the target
    assert not ctl.keeping_up and max(r["rtf"] for r in rows[-10:]) < 1.0
    assert "already at the cheapest allowed budget" in ctl.reason
    assert "2 full expression passes per window do not fit" in ctl.reason
    assert "needs 1.3" in ctl.reason and "target 350 ms" in ctl.reason


def test_guidance_off_14b_does_not_oscillate():
    """--emo-cfg 1: one call ~140 ms, real-time factor ~1.0 on the cheapest budget. The previous controller cut
    between equal-cost budgets (K = 2..5 with 2 steps; 31 changes after 2 s on this replay, 31 in 20 s on the H200);
    this one holds."""
    clock = [0.0]
    ctl = controller(3, 350, 140, clock)
    rows = simulate(ctl, Gpu(140), clock)
    assert len(changes_after(ctl)) <= 3
    late = [r["rtf"] for r in rows if r["t"] > 2]
    assert min(late) > 0.9 and len({r["budget"] for r in rows if r["t"] > 2}) <= 2
    assert "full expression passes per window do not fit" in ctl.reason


@pytest.mark.parametrize("name, gpu, W, target, seed_ms", [
    ("FP8 guided call, window 5, 1.2 s", Gpu(211), 5, 1200, 211),
    ("FP8, seeded by a bf16 warm-up (pessimistic): it raises", Gpu(211), 5, 1200, 296),
    ("faster FP8 step, window 4, 0.9 s", Gpu(150), 4, 900, 150),
    ("faster FP8 step, pessimistic seed", Gpu(150), 4, 900, 211),
    ("faster FP8 step, optimistic seed: it cuts at once", Gpu(150), 4, 900, 100),
])
def test_ends_on_two_full_passes_when_they_fit(name, gpu, W, target, seed_ms):
    clock = [0.0]
    ctl = controller(W, target, seed_ms, clock)
    rows = simulate(ctl, gpu, clock)
    late = [r for r in rows if r["t"] > 2]
    assert len(changes_after(ctl)) <= 3, ctl.change_log
    assert ctl.budget.full_passes() >= 2 and ctl.stats()["full_passes_per_window"] >= 2, ctl.reason
    assert min(r["rtf"] for r in late[-20:]) >= 1.0  # keeps up
    assert p95([r["latency_ms"] for r in late]) <= target  # meets the latency target
    assert ctl.predicted_latency_ms(ctl.budget) <= target
    # the best quality that keeps up: every better rung is predicted too slow or too late
    for b in ctl.ladder[:ctl.ladder.index(ctl.budget)]:
        assert ctl.predicted_rtf(b) < ctl.cfg.target_rtf or ctl.predicted_latency_ms(b) > 0.9 * target or \
            ctl._barred(b), b


def test_load_change_is_cut_at_once_and_recovered():
    """The GPU runs 1.5x slower from 8 s to 14 s: the controller cuts within two windows, keeps up while slow,
    comes back to 2 full passes afterwards; 3 changes in all."""
    clock = [0.0]
    ctl = controller(4, 900, 150, clock)
    rows = simulate(ctl, Gpu(150, load=lambda t: 1.5 if 8 <= t < 14 else 1.0), clock)
    before = [c for c in ctl.change_log if c["t"] < 8]
    cut = next(c for c in ctl.change_log if c["t"] >= 8)
    assert not before and "cut to" in cut["reason"]
    slow = [r for r in rows if r["t"] >= 8]
    assert cut["t"] <= slow[2]["t"]  # at once: by the second window that ran slow
    during = [r["rtf"] for r in rows if cut["t"] < r["t"] < 14][2:]
    assert during and min(during) >= 1.0
    assert ctl.budget.full_passes() >= 2 and len(changes_after(ctl)) <= 4
    assert all(c["t"] >= 14 for c in ctl.change_log[1:])  # no change while the load is steady


def test_a_budget_that_fell_behind_is_not_chosen_again_soon():
    """ALPA-predicted steps that cost half a pass (the model assumes a tenth): the 4-step ALPA budgets the model
    favours fall behind; each is left and not chosen again within retry_after_s seconds of stream; <= 3 changes
    after 2 s."""
    clock = [0.0]
    ctl = controller(4, 900, 150, clock, retry_after_s=8.0)
    rows = simulate(ctl, Gpu(150, predicted_ms=75), clock, seconds=40)
    assert len(changes_after(ctl)) <= 3 and len([c for c in ctl.change_log if c["t"] < 22]) <= 4
    left: dict = {}
    prev = ctl.initial
    for c in ctl.change_log:
        b = Budget(**c["budget"])
        if b in left:
            assert c["stream_s"] - left[b] >= 8.0, ctl.change_log
        if "cut to" in c["reason"]:
            left[prev] = c["stream_s"]
        prev = b
    assert left and min(r["rtf"] for r in rows[-20:]) >= 1.0


def test_cycling_costs_do_not_make_it_oscillate():
    """The guidance economy (issue 14): the expression/no-expression pair (211 ms) every 4th full pass, the
    expression branch alone (110 ms) otherwise, so window costs cycle. A budget that keeps up only on average
    (real-time factor ~1.07) is not raised to on a run of cheap windows, nor retried every few windows."""
    class Economy(Gpu):
        count = 0

        def window(self, b, rng, t):
            full = b.full_passes()
            dit = 0.0
            for _ in range(full):
                dit += self.pass_ms if self.count % 4 == 0 else 110.0
                self.count += 1
            dit += self.predicted_ms * (b.steps - full) + self.overhead_ms
            f = 1 + self.jitter * (2 * rng.random() - 1)
            return f * (dit + self.decode_ms * b.stride) / 1e3, f * self.decode_ms * b.stride / 1e3

    for W, target in [(3, 700), (3, 450), (4, 900)]:
        clock = [0.0]
        ctl = controller(W, target, (211 + 3 * 110) / 4, clock)  # the engine's economy-averaged warm-up pass
        rows = simulate(ctl, Economy(211), clock)
        assert len(changes_after(ctl)) <= 3, (W, target, ctl.change_log)
        late = [r for r in rows if r["t"] > 2]
        assert p95([r["latency_ms"] for r in late]) <= target


def test_a_measured_quality_table_sets_the_order(tmp_path):
    """issue 15's speed-quality table: if it measures 2 plain steps better than 4 steps with ALPA K = 2 at equal
    full passes, the controller starts there (the documented order would start on K = 2, 4 steps)."""
    rows = [{"interval": 1, "steps": 4, "error": 0.10}, {"interval": 1, "steps": 3, "error": 0.12},
            {"interval": 1, "steps": 2, "expression_error": 0.15}, {"alpa_interval": 2, "steps": 4, "error": 0.2},
            {"interval": 3, "steps": 4, "quality": -0.3}]
    path = tmp_path / "speed_quality_mini.json"
    path.write_text(json.dumps({"rows": rows}))
    table = load_quality_table(path)
    assert table[(1, 2, None)] == 0.15 and table[(3, 4, None)] == 0.3
    cfg = dict(latency_target_ms=350, lookahead=0, max_interval=3)
    plain = BudgetController(Budget(1, 4, 1), 3, FPS, ControllerConfig(**cfg), ms_per_unit=40.0)
    measured = BudgetController(Budget(1, 4, 1), 3, FPS, ControllerConfig(**cfg, quality=table), ms_per_unit=40.0)
    assert plain.budget == Budget(2, 4, 1) and measured.budget == Budget(1, 2, 1)
    assert [b.steps for b in measured.ladder[:3]] == [4, 4, 3]  # rated rungs first, by error
    rated = [b for b in measured.ladder if (b.interval, b.steps, None) in table]
    assert measured.ladder[:len(rated)] == rated  # unrated rungs (e.g. K = 2, 3 steps) after every rated one
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"interval": 1, "steps": 4}]))
    with pytest.raises(ValueError, match="needs interval, steps and error"):
        load_quality_table(bad)


def test_renderer_stats_name_the_budget_and_its_changes():
    """The keys bench/stream_latency.py reads. A controller that judges every window behind (cut_below huge) and
    takes every budget as fast enough (target_rtf ~0) starts on the best budget and cuts from it whatever the
    machine's speed (the warm-up's measured cost seeds the start: with the default target a slow machine started on
    the cheapest budget and had nothing to cut), so the changes are certain; their times count from the first
    driving frame."""
    from engine.renderer import FlashPortraitRenderer

    cpu = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False)
    r = FlashPortraitRenderer(image_rgb("lp_s0.jpg"), None, 64, 64, preset="tiny", runtime=cpu,
                              sampler=SamplerConfig(fast=True), window=WindowConfig(4, 2),
                              alpa=ALPAConfig(mode="alpa", interval=2, order=1), random_weights=True, pace=False,
                              controller=ControllerConfig(cut_below=1e9, target_rtf=1e-9, max_interval=2,
                                                                   min_steps=2))
    try:
        for j, frame in enumerate(video_frames("lp_d0.mp4", 40)):
            r.process(frame, j / FPS)
        s = r.stats()
    finally:
        r.close()
    b = r._budget
    assert s["budget_changes"] == r.controller.changes >= 1
    times = s["budget_change_times_s"]
    assert len(times) == s["budget_changes"] and times == sorted(times) and times[0] >= 0
    assert s["budget"] == {"interval": b.interval, "steps": b.steps, "stride": b.stride,
                           "lookahead": r.controller.lookahead(b)}
    assert s["full_passes_per_window"] == b.full_passes() == s["controller"]["full_passes_per_window"]
    assert s["controller"]["budget"]["stride"] == b.stride and s["controller"]["pass_ms"] > 0
