"""The controller's budget ladder ordered by measured quality (the trained mini's table), not by cost alone."""
from __future__ import annotations

from pathlib import Path

from engine.controller import Budget, BudgetController, ControllerConfig, load_quality, quality_key

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "weights" / "mini" / "quality_ladder.json"


def _controller(quality, **kw):
    cfg = ControllerConfig(latency_target_ms=None, max_interval=3, min_steps=2, quality=quality, **kw)
    return BudgetController(Budget(interval=1, steps=4, stride=1), window=3, fps=25.0, cfg=cfg)


def test_mini_measured_quality_reorders_the_ladder_and_steers_cuts_and_raises():
    cost = _controller(None)
    a, b = Budget(1, 3, 1), Budget(2, 4, 1)  # (1, 3, 1) costs more per frame than (2, 4, 1)
    assert cost.ladder.index(a) < cost.ladder.index(b)
    # measured: ALPA K=2 at 4 steps beats 3 full steps (as a trained model may show); the rest by cost
    table = {quality_key(x): 30.0 - 0.1 * i for i, x in enumerate(cost.ladder)}
    table[quality_key(b)], table[quality_key(a)] = table[quality_key(a)], table[quality_key(b)]
    ctl = _controller(table, patience=1, warmup_windows=0)
    assert ctl.ladder.index(b) < ctl.ladder.index(a)
    assert [table[quality_key(x)] for x in ctl.ladder] == sorted(table.values(), reverse=True)
    # a cut lands on the best measured budget among the cheaper ones predicted to keep up
    ctl.ms_per_unit = 1e3 * (4 / 25) / 2.5 / 1.3   # a full-budget window (2.5+ units) runs slower than real time
    new = ctl.observe(window_s=0.5, frames=4)
    cheaper = [x for x in ctl.ladder if x.units() / x.stride <= Budget(1, 4, 1).units() and x != Budget(1, 4, 1)
               and ctl.predicted_rtf(x) >= ctl.cfg.target_rtf]
    assert new == cheaper[0]
    # a raise only moves up the measured ladder
    for _ in range(10):
        step = ctl.observe(window_s=0.01, frames=4 * ctl.budget.stride)
        if step is not None:
            assert ctl._rank[step] < ctl._rank[new]
            break
    else:
        raise AssertionError("the controller never raised the budget on a fast engine")


def test_mini_committed_quality_table_orders_the_live_ladder():
    table = load_quality(TABLE)
    assert len(table) >= 12
    ctl = _controller(table)
    scores = [table.get(quality_key(b)) for b in ctl.ladder if quality_key(b) in table]
    assert scores == sorted(scores, reverse=True)
    assert table[quality_key(ctl.ladder[0])] == max(table.values())
