"""Five-point face alignment for PD-FGC: Umeyama similarity to a fixed template, bicubic warp to 224x224.

    pts5 (5, 2) image pixels [left pupil, right pupil, nose tip, left mouth corner, right mouth corner]
      -> M = template_matrix(pts5)   (2, 3) fp64, image -> crop pixels
      -> warp_face(frame, M)         (224, 224, 3) uint8, same channel order as `frame`

"Left" is the image left (the subject's right eye). With the 222-point model the five points are
pts222[ALIGN_INDEX]; the mediapipe fallback supplies the same five from its face mesh.
"""
from __future__ import annotations

import cv2
import numpy as np

CROP = 224
ALIGN_INDEX = (182, 202, 36, 149, 133)  # 222-point indices of the five alignment points
# Template in units of the crop side (published constants); rows match ALIGN_INDEX.
TEMPLATE_UNIT = np.array([[0.3843, 0.27], [0.62, 0.2668], [0.503, 0.4185], [0.406, 0.5273], [0.5977, 0.525]],
                         dtype=np.float64)


def template(size: int = CROP) -> np.ndarray:
    """(5, 2) fp64 destination points in a `size` x `size` crop."""
    return TEMPLATE_UNIT * size


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src (N, D) onto dst (N, D).

    Returns the (D+1, D+1) fp64 homogeneous matrix T with dst ~ T[:D, :D] @ src + T[:D, D]. Reflections are
    excluded (Umeyama 1991, eq. 39-43). Degenerate input (all points equal) gives the identity linear part.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, d = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / n                                  # (D, D) cross-covariance
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:         # best orthogonal fit is a reflection: flip the weakest axis
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var_s = (s0 ** 2).sum() / n
    scale = float(sig @ sign / var_s) if with_scale and var_s > 0 else 1.0
    out = np.eye(d + 1)
    out[:d, :d] = scale * rot
    out[:d, d] = mu_d - scale * rot @ mu_s
    return out


def template_matrix(pts5: np.ndarray, size: int = CROP) -> np.ndarray:
    """(2, 3) fp64 affine taking image pixels to crop pixels, fitted on the five alignment points."""
    return umeyama(pts5, template(size))[:2]


def warp_face(frame: np.ndarray, matrix: np.ndarray, size: int = CROP, out: np.ndarray | None = None) -> np.ndarray:
    """Bicubic warp of `frame` (H, W, 3) uint8 by `matrix` (2, 3) into a (size, size, 3) crop (zero border)."""
    return cv2.warpAffine(frame, matrix, (size, size), dst=out, flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to (N, 2) points; fp64 out."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine, fp64."""
    lin = np.linalg.inv(matrix[:, :2])
    return np.concatenate([lin, -lin @ matrix[:, 2:3]], axis=1)
