"""The motion bench's split of a cell (bench/motion_transfer.py): what the renderer drew, read without a face mesh,
and the two correlations driver -> drawn (renderer) and drawn -> output (the face mesh's reading of the avatar)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.mesh_reliability import pearson
from bench.motion_transfer import METRICS, applied_signals, score, signals
from conftest import data_file
from engine.face_mesh import detect_landmarks
from engine.preview import load_reference
from test_preview_motion import _rotation


def test_the_drawing_is_read_exactly():
    """Target landmarks of a real face and a known turn: applied_signals gives the turn's angles as set and
    the same mouth, eyes and gaze the face-mesh path (signals) computes from those points; no target, no reading."""
    pts = detect_landmarks(load_reference(str(data_file("reference", "fp_case3.png"))), depth=True)
    target = pts[:, 0] + 1j * pts[:, 1]
    drawn = applied_signals([target, None, target], [np.eye(3), np.eye(3), _rotation(0.0, -18.0, 0.0)])
    read = signals([pts, pts])
    for m in ("mouth", "eyes", "gaze"):
        assert drawn[m][2] == pytest.approx(read[m][1], abs=1e-12) and read[m][1] > 0
    assert (drawn["roll"][2], drawn["yaw"][2], drawn["pitch"][2]) == pytest.approx((0.0, -18.0, 0.0), abs=1e-9)
    assert all(np.isnan(drawn[m][1]) for m in METRICS)


def test_the_split_puts_a_cell_lost_in_the_reading_on_the_reading():
    """A renderer that draws exactly what the driver does and an output reading that adds the avatar's own mouth as
    pitch: the split says renderer 1.0 and reading = the cell's r; the crosstalk names the mouth. A renderer that
    draws half the driver's roll plus an unrelated wobble, read exactly: the loss is on the renderer's side."""
    rng = np.random.default_rng(0)
    n = 120
    drv = {m: rng.normal(0, 1, n) for m in METRICS}
    drv["eyes"] = 1.0 + 0.1 * np.abs(drv["eyes"])  # open eyes throughout: gaze counts every frame
    drawn = {m: v.copy() for m, v in drv.items()}
    drawn["roll"] = 0.5 * drv["roll"] + rng.normal(0, 1, n)
    out = {m: v.copy() for m, v in drawn.items()}
    out["pitch"] = drawn["pitch"] + 1.5 * drawn["mouth"]
    result = {"corr": {}, "driver_std": {}, "output_std": {}, "flat": {}}
    score(result, drv, out, drawn=drawn)
    assert result["split"]["pitch"]["renderer"] == 1.0
    assert result["split"]["pitch"]["reading"] == result["corr"]["pitch"] == pytest.approx(
        pearson(drv["pitch"], out["pitch"]), abs=1e-3) and result["corr"]["pitch"] < 0.7
    assert result["mouth_crosstalk"]["pitch"] > 0.7 and abs(result["mouth_crosstalk"]["roll"]) < 0.3
    assert result["split"]["roll"]["reading"] == 1.0 and result["split"]["roll"]["renderer"] < 0.6
    assert result["split"]["mouth"] == {"renderer": 1.0, "reading": 1.0}
