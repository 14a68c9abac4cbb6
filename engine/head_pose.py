"""Rigid 3-D head motion from face-mesh landmarks, and the same motion applied to another face.

The face mesh gives every landmark a depth z (pixels, larger = farther from the camera). A head turning (yaw) or
nodding (pitch) moves its landmarks in 2-D in a way no 2-D similarity can follow: the face narrows on one side,
the nose slides over the cheek. Fitted as a similarity, that remainder lands in the expression and comes out of a
warp as a stretched face, which reads as a different pitch and roll. So the head's motion is a 3-D rotation,
scale and shift (Kabsch/Umeyama on the skull points), the expression is what the neutral face moved by it does
not explain, and the portrait is turned by the same relative rotation about its own skull centre, with its own
depths.

Points are (N, 3) arrays in image axes: x right, y down, z away from the camera.
"""
from __future__ import annotations

import numpy as np


def fit_rigid(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity dst ~ s * (src - src.mean) @ R.T + dst.mean (no reflection).

    src, dst: (N, 3). Returns (s, R (3, 3) rotation, shift (3,) = dst.mean - src.mean)."""
    cs, cd = src.mean(0), dst.mean(0)
    a, b = src - cs, dst - cd
    u, sv, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    fix = np.array([1.0, 1.0, d])
    r = (u * fix @ vt).T
    s = float((sv * fix).sum() / max((a * a).sum(), 1e-12))
    return s, r, cd - cs


def turn(pts: np.ndarray, r: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    """Rotate (N, 3) points by r about pivot (3,)."""
    return (pts - pivot) @ r.T + pivot


def angles(r: np.ndarray) -> tuple[float, float, float]:
    """(roll, yaw, pitch) in degrees of a rotation in image axes (the motion bench's convention)."""
    yaw = np.degrees(np.arcsin(np.clip(r[0, 2], -1, 1)))
    pitch = np.degrees(np.arctan2(-r[1, 2], r[2, 2]))
    roll = np.degrees(np.arctan2(-r[0, 1], r[0, 0]))
    return float(roll), float(yaw), float(pitch)
