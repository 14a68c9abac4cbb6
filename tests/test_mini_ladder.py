"""The live controller's budget ladder, ordered by the quality measured on the trained mini
(weights/mini/quality_ladder.json, written by bench/speed_quality.py --ladder-out) instead of the documented order."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.controller import Budget, BudgetController, ControllerConfig, load_quality_table

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "mini"
TABLE = WEIGHTS / "quality_ladder.json"


def test_mini_measured_table_orders_the_live_ladder():
    table = load_quality_table(TABLE)
    # every (ALPA interval, steps) of the live ladder measured, rating every stride; the top budget is the reference
    assert {(k, s) for k, s, _ in table} == {(k, s) for k in (1, 2, 3) for s in (2, 3, 4)}
    assert table[(1, 4, None)] == 0.0
    cfg = ControllerConfig(latency_target_ms=350.0, max_interval=3, min_steps=2, quality=table)
    ctl = BudgetController(Budget(interval=1, steps=4, stride=1), window=3, fps=25.0, cfg=cfg)
    errors = [table[(b.interval, b.steps, None)] for b in ctl.ladder]
    assert errors == sorted(errors), "the ladder is not in measured order"
    assert (ctl.ladder[0].interval, ctl.ladder[0].steps) == (1, 4)
    # measured on the mini: at two full passes ALPA K=2 over 3 steps beats 2 plain steps, so it ranks above them
    assert table[(2, 3, None)] < table[(1, 2, None)]
    rank = {(b.interval, b.steps, b.stride, b.lookahead): i for i, b in enumerate(ctl.ladder)}
    assert rank[(2, 3, 1, None)] < rank[(1, 2, 1, None)]


def test_mini_engine_hands_its_measured_table_to_the_controller():
    from engine.config import RuntimeConfig
    from engine.renderer import FlashPortraitRenderer

    r = FlashPortraitRenderer(np.full((128, 128, 3), 128, np.uint8), str(WEIGHTS), 128, 128, preset="mini",
                              runtime=RuntimeConfig(device="cpu"), latency_target_ms=350.0)
    try:
        assert r.controller.cfg.quality == load_quality_table(TABLE)
        assert any("measured quality" in n for n in r.stats()["notes"])
    finally:
        r.close()
