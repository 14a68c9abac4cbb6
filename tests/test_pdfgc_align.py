"""Five-point alignment: Umeyama is exact on noiseless data; real portraits land on the 224 template.

The published 222-point landmark weights are absent here, so the portrait checks drive the alignment with
mediapipe face-mesh points mapped to the same five landmarks (MediapipeLandmarks, the documented fallback), and
check the warped crop by running mediapipe again, independently, on the crop itself.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from engine.models.pdfgc.align import template, template_matrix, transform_points, umeyama, warp_face
from engine.models.pdfgc.landmarks import MediapipeLandmarks
from tests.conftest import data_file


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1]], dtype=np.float64)


@pytest.mark.parametrize("n", [5, 40])
def test_umeyama_recovers_known_similarity_exactly(n):
    rng = np.random.default_rng(n)
    src = rng.uniform(-200, 600, size=(n, 2))
    truth = _similarity(1.734, -0.61, 37.25, -112.5)
    dst = src @ truth[:2, :2].T + truth[:2, 2]
    est = umeyama(src, dst)
    np.testing.assert_allclose(est, truth, rtol=0, atol=1e-10)
    # Without scale it still returns a proper rotation (det +1) even when the data are scaled.
    rot = umeyama(src, dst, with_scale=False)[:2, :2]
    assert abs(np.linalg.det(rot) - 1) < 1e-12


def test_umeyama_never_returns_a_reflection():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(6, 2))
    mirrored = src * np.array([-1.0, 1.0])
    m = umeyama(src, mirrored)[:2, :2]
    assert np.linalg.det(m) > 0


def test_template_matrix_maps_template_to_itself():
    m = template_matrix(template())
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-12)


@pytest.fixture(scope="module")
def mesh():
    backend = MediapipeLandmarks(static=True)
    yield backend
    backend.close()


@pytest.mark.parametrize("name", ["lp_s6.jpg", "lp_s3.jpg", "lp_s11.jpg", "fp_case3.png"])
def test_aligned_crop_puts_eyes_and_mouth_on_template(mesh, name):
    rgb = np.ascontiguousarray(cv2.imread(str(data_file("reference", name)))[..., ::-1])
    pts = mesh.five_points(rgb)
    assert pts is not None, f"mediapipe found no face in {name}"
    m = template_matrix(pts)
    crop = warp_face(rgb, m)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    # Mediapipe needs some margin around a tight face crop; pad with black and shift back.
    pad = 112
    seen = mesh.five_points(cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0))
    assert seen is not None, f"mediapipe found no face in the aligned crop of {name}"
    seen = seen - pad
    # The warp is geometrically right: points re-found in the crop are where the matrix sends the originals.
    np.testing.assert_array_less(np.linalg.norm(seen - transform_points(pts, m), axis=1), 2.5)
    # And they sit on the template: pupils within 3 px, mouth corners within 5.5 px of 224 (a similarity cannot
    # match five points of a real face exactly; the nose, the least constrained point, is not checked).
    err = np.linalg.norm(seen - template(), axis=1)
    assert err[[0, 1]].max() < 3.0, f"{name}: eye error {err[[0, 1]]} px"
    assert err[[3, 4]].max() < 5.5, f"{name}: mouth error {err[[3, 4]]} px"
