"""Live latency of the FlashPortrait path (issue 7, item 4): the playout delay, the lookahead under a latency target,
the first window's wait, and the sinks' buffer on top of a pacing renderer.

Nothing here depends on the machine's speed: the engine's warm-up timings (`engine.timings`, what
`measured_costs()` returns) and the wall time the controller sees per window are injected (`inject_costs`,
`windows_cost`), so the controller decides the same on a fast and on a slow CI machine.

Properties: the playout delay is a robust statistic of recent first-frame waits (one slow window moves it not at
all, a lasting change moves it) that comes down within 8 windows once a backlog is gone; under a latency target the
controller drops the lookahead when the configured one cannot meet it, and then the first window runs as soon as
latent 0 has its tokens; seeded with the engine's warm-up timings the controller starts on a budget that keeps up
(the unseeded one starts on the full budget and must cut); under a latency target the lag is capped at what the
target lasts; AvatarTrack keeps at most one frame of slack in front of a renderer that paces its own output.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

try:
    from tests.conftest import image_rgb, video_frames
except ImportError:  # pytest's rootdir-relative import of conftest
    from conftest import image_rgb, video_frames

from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig
from engine.controller import Budget, BudgetController, ControllerConfig
from engine.playout import PlayoutDelay, playout_delay
from engine.flashportrait import FlashPortraitEngine
from engine.renderer import LIVE_WINDOW, FlashPortraitRenderer

FPS = 25.0
SIZE = 64
CPU = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Injected warm-up timings: one guided DiT call 20 ms, one latent frame's decode 5 ms. The live full budget (4 calls
# + the decode of stride 1 = 85 ms per 160 ms of video, real-time factor 1.9) keeps up; with lookahead 1 its
# predicted latency is 280 ms of input wait + 85 + 40 = 405 ms, over a 350 ms target; without, 245 ms.
SLOW = {"pass_s": 0.020, "decode_latent_s": 0.005}
# A fast engine (1.5 ms per call and per decode: 280 + 7.5 + 40 = 328 ms with lookahead 1, within 95% of 350 ms).
FAST = {"pass_s": 0.0015, "decode_latent_s": 0.0015}


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    return video_frames("lp_d0.mp4", 60)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return image_rgb("lp_s0.jpg")


@pytest.fixture(scope="module")
def engine(reference) -> FlashPortraitEngine:
    """This module's own engine (not the process-wide shared one, whose timings other tests measure)."""
    eng = FlashPortraitEngine(reference, None, SIZE, SIZE, preset="tiny", runtime=CPU, window=LIVE_WINDOW,
                              sampler=SamplerConfig(fast=True), alpa=ALPAConfig(mode="off", cache="output"),
                              random_weights=True)
    eng.warm_up()
    return eng


def inject_costs(engine: FlashPortraitEngine, timings: dict) -> FlashPortraitEngine:
    """What the engine's warm-up measured (measured_costs() returns it): the controller's seed, whatever the CPU."""
    engine.timings = dict(timings)
    return engine


def window_cost_s(budget: Budget, timings: dict) -> tuple[float, float]:
    """(window seconds, of which decode) of one window on `budget` by the controller's cost model at `timings`."""
    full = budget.full_passes()
    decode = budget.stride * timings["decode_latent_s"]
    return (full + 0.1 * (budget.steps - full)) * timings["pass_s"] + decode, decode


def windows_cost(renderer: FlashPortraitRenderer, timings: dict) -> FlashPortraitRenderer:
    """The controller sees every window cost what `timings` predict for its budget (the renderer's own clock
    readings are replaced), so it never cuts or raises the budget because this machine is slow or busy."""
    observe = renderer.controller.observe

    def injected(_wall_s, frames, backlog_frames=0, decode_s=None):
        window_s, decode = window_cost_s(renderer._budget, timings)
        return observe(window_s, frames, backlog_frames, decode_s=decode)

    renderer.controller.observe = injected
    return renderer


def make(reference, engine, timings=SLOW, **kw) -> FlashPortraitRenderer:
    """A live renderer on `engine` seeded with `timings`, whose windows cost what the timings say."""
    inject_costs(engine, timings)
    r = FlashPortraitRenderer(reference, None, SIZE, SIZE, preset="tiny", runtime=CPU,
                              sampler=SamplerConfig(fast=True), alpa=ALPAConfig(mode="off"), random_weights=True,
                              fps=FPS, engine=engine, **kw)
    return windows_cost(r, timings)


def test_playout_delay_ignores_one_slow_window_and_follows_a_lasting_change():
    margin = 0.25 / FPS
    steady = [0.30 + 0.001 * (i % 5) for i in range(24)]
    # a hiccup of +600 ms (which delays the next windows' input too) among 25 windows: the delay stays at the
    # typical wait (the old max-and-decay rule held it at 0.9 s and still at 0.9 * 0.95^10 = 0.54 s 10 windows later)
    assert playout_delay(steady[2:] + [0.9, 0.6], FPS) == pytest.approx(max(steady) + margin)
    # a lasting change (the last 3 of 25 windows wait 0.5 s): the delay follows it
    assert playout_delay(steady[2:] + [0.5] * 3, FPS) == pytest.approx(0.5 + margin)
    # few windows measured: their maximum (the first frames must not be released before they could be ready)
    assert playout_delay([0.2, 0.4, 0.3], FPS) == pytest.approx(0.4 + margin)
    assert playout_delay([], FPS) == 0.0


def test_playout_delay_forgets_a_drained_backlog_but_not_a_hiccup():
    frame = 1 / FPS
    delay = PlayoutDelay(FPS)
    # a session whose first windows ran behind: waits of 0.74 s, then the backlog is gone and windows wait 0.28 s
    for _ in range(12):
        delay.observe(0.74)
    assert delay.delay == pytest.approx(0.74 + 0.25 * frame)
    after = [delay.observe(0.28 + 0.002 * (i % 3)) for i in range(12)]
    # the 8th low window drops it (the plain 90th percentile of 25 would hold 0.74 s until the 23rd)
    assert after[6] > 0.7 and after[7] == pytest.approx(0.284 + 0.25 * frame) and delay.settled == 1
    assert max(after[7:]) < 0.29 + 0.25 * frame
    assert playout_delay(([0.74] * 12 + [0.28] * 12)[-25:], FPS) > 0.7  # what the old rule would say
    # steady waits with a hiccup: neither the spread nor the hiccup triggers it, the hiccup moves nothing
    steady = PlayoutDelay(FPS)
    waits = [0.30 + 0.003 * (i % 7) for i in range(30)]
    waits[20] = 0.9
    delays = [steady.observe(w) for w in waits]
    assert steady.settled == 0 and delays[-1] == pytest.approx(max(waits[5:20] + waits[21:]) + 0.25 * frame)
    assert max(delays[20:]) < 0.33
    # a lasting rise is followed within a few windows
    for _ in range(4):
        steady.observe(0.5)
    assert steady.delay == pytest.approx(0.5 + 0.25 * frame)
    assert 0.5 - steady.delay < frame  # never below the waits it has seen lately


def test_renderer_playout_delay_returns_to_the_typical_wait_after_one_slow_window(reference, clip, engine):
    """On a virtual clock: frame j arrives at j / FPS, every window costs its injected 85 ms, one costs 0.5 s more
    (a GC pause, another session's window, a tab switch). Its wait is measured, the playout delay ignores it."""
    now = [0.0]
    r = make(reference, engine, lookahead=1, pace=False, clock=lambda: now[0])  # windows run inside process()
    window_s, _ = window_cost_s(Budget(1, engine.live_steps, 1), SLOW)
    decode, calls, delays = r.decoder.decode, [0], []
    slow = 20  # after 19 windows of history

    def decode_costing_the_window(latents):
        calls[0] += 1
        now[0] += window_s + (0.5 if calls[0] == slow else 0.0)
        return decode(latents)

    r.decoder.decode = decode_costing_the_window
    try:
        for j in range(4 * (slow + 6) + 5):  # 6 windows after the slow one
            now[0] = max(now[0], j / FPS)  # frame j arrives (later if a window was still running)
            before = r.windows
            r.process(clip[j % len(clip)], (j / FPS, now[0]))
            if r.windows > before:
                delays.append(r.playout.delay)
    finally:
        r.close()
    waits = list(r.playout.waits)
    assert len(delays) >= slow + 6 and calls[0] >= slow + 6
    typical = statistics.median(waits)
    # the slow window and the one whose input waited through it wait longer (the frames behind them less)
    assert max(waits) == pytest.approx(typical + 0.5, abs=1e-6), "the slow window was not measured"
    after = delays[slow - 1:]  # from the slow window on
    assert max(after) < typical + 0.15, f"delays {after} after one slow window, typical wait {typical:.3f} s"


def test_controller_drops_the_lookahead_only_under_a_latency_target():
    initial = Budget(1, 4, 1)
    # lookahead 1 at 25 fps: 7 frames of input wait (280 ms) + a window costing its playback (160 ms) + 1 frame
    tight = BudgetController(initial, window=3, fps=FPS, cfg=ControllerConfig(latency_target_ms=350, lookahead=1))
    assert tight.budget == Budget(1, 4, 1, lookahead=0) and tight.lookahead(tight.budget) == 0
    assert "without lookahead" in tight.reason
    assert tight.predicted_latency_ms(Budget(1, 4, 1), 1.0) - tight.predicted_latency_ms(tight.budget, 1.0) == \
        pytest.approx(4 / FPS * 1e3)
    free = BudgetController(initial, window=3, fps=FPS, cfg=ControllerConfig(lookahead=1))
    assert free.budget == initial and free.lookahead(free.budget) == 1
    assert all(b.lookahead is None for b in free.ladder)
    # a loose target keeps the lookahead until measured windows break it, then cuts to lookahead 0
    loose = BudgetController(initial, window=3, fps=FPS,
                             cfg=ControllerConfig(latency_target_ms=500, lookahead=1, min_steps=4, max_interval=1,
                                                  max_stride=1, cut_below=0.5))  # only the latency can cut
    assert loose.lookahead(loose.budget) == 1
    changed = [loose.observe(0.12, 4) for _ in range(4)]  # 120 ms windows: 280 + 120 + 40 = 440 ms, fits
    assert changed == [None] * 4
    for _ in range(2):  # 250 ms windows: the moving average crosses 500 ms with lookahead 1 (~350 ms without)
        new = loose.observe(0.25, 4)
    assert new == Budget(1, 4, 1, lookahead=0) and "over the 500 ms target" in loose.reason


def test_without_lookahead_the_first_window_needs_only_the_first_frame(reference, clip, engine):
    # windows of 85 ms: lookahead 1 predicts 405 ms, over the 350 ms target (see SLOW)
    with_target = make(reference, engine, lookahead=1, pace=False, latency_target_ms=350)
    without = make(reference, engine, lookahead=1, pace=False)
    # an engine fast enough for lookahead 1 within the target keeps it
    fast = make(reference, engine, timings=FAST, lookahead=1, pace=False, latency_target_ms=350)
    try:
        assert with_target._lookahead() == 0 and without._lookahead() == 1
        assert fast._lookahead() == 1 and fast.controller.predicted_latency_ms(fast._budget) <= 350
        assert with_target.controller.predicted_latency_ms(Budget(1, engine.live_steps, 1)) > 350
        first = with_target.process(clip[0], (0.0, time.monotonic()))
        assert [pts for _, pts in first] == [0.0]  # latent 0 is frame 0 alone: out right after it
        late = [without.process(frame, (j / FPS, time.monotonic())) for j, frame in enumerate(clip[:5])]
        assert [len(out) for out in late] == [0, 0, 0, 0, 1]  # lookahead 1 waits for latent 1 (frame 4)
        assert with_target.stats()["controller"]["lookahead"] == 0
    finally:
        with_target.close()
        without.close()
        fast.close()


def test_avatar_track_adds_no_second_playout_buffer_to_a_pacing_renderer():
    from streaming.tracks import AvatarTrack

    class Paced:
        pace = True

        def pull(self):
            return None

    class Unpaced(Paced):
        pace = False

    assert AvatarTrack(Paced(), FPS, 32, 32, playout_frames=3)._buffer.maxlen == 2
    assert AvatarTrack(Unpaced(), FPS, 32, 32, playout_frames=3)._buffer.maxlen == 3


def test_controller_seeded_from_the_warm_up_starts_on_a_budget_that_keeps_up():
    target = ControllerConfig(latency_target_ms=350, lookahead=0, max_interval=3)
    # 40 ms per unit (a 1.3b guided call on an H100): the full budget (4 calls + decode = 4.25 units, 170 ms per
    # 160 ms of video) cannot keep up; the seeded controller starts where it can
    ctl = BudgetController(Budget(1, 4, 1), window=3, fps=FPS, cfg=target, ms_per_unit=40.0)
    b = ctl.budget
    assert b != Budget(1, 4, 1) and ctl.predicted_rtf(Budget(1, 4, 1)) < 1
    assert ctl.predicted_rtf(b) >= ctl.cfg.target_rtf and ctl.predicted_latency_ms(b) <= 350
    assert b == Budget(2, 4, 1), "the best-quality budget that keeps up: ALPA K=2 before fewer steps"
    assert "warm-up" in ctl.reason
    # windows cost what the warm-up predicted: every judged window keeps up and the budget holds
    for _ in range(10):
        assert ctl.observe(40.0 * b.units() / 1e3, 4 * b.stride, backlog_frames=4) is None
    assert ctl.budget == b and ctl.changes == 0 and min(h["rtf"] for h in ctl.history) >= 1.3
    # unseeded, the same controller starts on the full budget and must cut after measuring it
    blind = BudgetController(Budget(1, 4, 1), window=3, fps=FPS, cfg=target)
    assert blind.budget == Budget(1, 4, 1)
    # a fast engine (5 ms per unit) starts on the full budget
    assert BudgetController(Budget(1, 4, 1), window=3, fps=FPS, cfg=target, ms_per_unit=5.0).budget == \
        Budget(1, 4, 1)
    # the first measured window replaces the seed (a warm-up timed without the session's load)
    ctl.observe(0.5, 4)
    assert ctl.ms_per_unit > 40.0


def test_renderer_starts_on_the_budget_its_engine_measured(reference):
    engine = FlashPortraitEngine(reference, None, SIZE, SIZE, preset="tiny", runtime=CPU, window=LIVE_WINDOW,
                                 sampler=SamplerConfig(fast=True), alpa=ALPAConfig(mode="alpa", interval=3, order=1),
                                 random_weights=True)
    engine.warm_up()
    assert not engine.timings  # timed by the first live session, not by the warm-up (offline render never needs it)
    t = engine.measured_costs()
    assert t["pass_s"] > 0 and t["decode_latent_s"] > 0
    stats = engine.stats()
    assert engine.measured_costs() is t and stats["warm_up_pass_ms"] > 0 and stats["warm_up_decode_latent_ms"] > 0
    kw = dict(preset="tiny", runtime=CPU, sampler=SamplerConfig(fast=True), alpa=ALPAConfig(mode="alpa", interval=3,
              order=1), random_weights=True, fps=FPS, latency_target_ms=350, lookahead=0, engine=engine, pace=False)
    engine.timings = dict(FAST)  # as if the warm-up had measured a fast engine
    fast = FlashPortraitRenderer(reference, None, SIZE, SIZE, **kw)
    engine.timings = {"pass_s": 0.08, "decode_latent_s": 0.01}  # as if the GPU were this slow at warm-up
    slow = FlashPortraitRenderer(reference, None, SIZE, SIZE, **kw)
    try:
        full = Budget(1, engine.live_steps, 1, lookahead=None)
        assert fast._budget.interval == 1 and fast._budget.steps == engine.live_steps
        b = slow._budget
        assert b.units() < full.units() and "warm-up" in slow.controller.reason
        assert slow.controller.predicted_rtf(b) >= slow.controller.cfg.target_rtf
        assert slow.stats()["controller"]["ms_per_unit"] == pytest.approx(engine.window_ms_per_unit(full), rel=0.01)
    finally:
        fast.close()
        slow.close()


def test_latency_target_caps_the_lag(reference, clip, engine):
    """Under a latency target the stream skips ahead once the tokens waiting for windows hold more playback than the
    target (350 ms at 25 fps: 2 latent frames beyond what the window needs), not only past 4W latent frames."""
    r = make(reference, engine, lookahead=0, pace=False, latency_target_ms=350)
    loose = make(reference, engine, lookahead=0, pace=False)
    try:
        assert r.lag_cap() == 1 + 2 and loose.lag_cap() == loose.max_lag_latents == 4 * 3
        out, pushed = [], []
        for j, frame in enumerate(clip[:40]):
            if j == 5:
                r._window_ready = lambda: False  # the window worker is busy: tokens pile up
            elif j == 29:
                del r._window_ready
            out += r.process(frame, (j / FPS, time.monotonic()))
            pushed.append(j / FPS)
        # windows ran for latents 0 and 1 (frames 0..4); at frame 29 latents 2..7 wait (6 > 3): the stream skips to
        # latent 8 - 1 = 7, i.e. frames 5..24 (latents 2..6), and renders on from frame 25
        assert r.skipped_behind == 20
        assert [p for _, p in out] == pushed[:5] + pushed[25:25 + len(out) - 5] and len(out) > 5
    finally:
        r.close()
        loose.close()
