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
    assert len(table) >= 12 and table[(1, 4, 1)] == 0.0  # the top budget is the reference of the errors
    cfg = ControllerConfig(latency_target_ms=350.0, max_interval=3, min_steps=2, quality=table)
    ctl = BudgetController(Budget(interval=1, steps=4, stride=1), window=3, fps=25.0, cfg=cfg)
    errors = [table[(b.interval, b.steps, b.stride)] for b in ctl.ladder]
    assert errors == sorted(errors), "the ladder is not in measured order"
    assert ctl.ladder[0] == Budget(1, 4, 1, ctl.ladder[0].lookahead)


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
