"""How far the face mesh's own reading can be trusted: test-retest reliability and the correlation ceiling it sets.

The motion bench reads every frame twice: once as it is, once through a fresh face mesh on a perturbed copy
(`perturbed`). Across a sequence, the Pearson r between the two readings of one signal is its reliability: for a
reading = signal + independent error, r(reading 1, reading 2) = var_signal / (var_signal + var_error). Two such
readings of perfectly related signals (driver and avatar) correlate at most sqrt(rel_driver * rel_output)
(Spearman's attenuation bound): `ceiling`. A correlation near its ceiling is at the measurement's limit.

The perturbation: each frame is scaled about its centre by 1 +- 1.5 % and shifted by +-1.5 px (uniform, drawn per
frame), bilinear, edges replicated. No rotation: every bench signal is a ratio of image distances or a rotation
relative to the sequence's first frame, so a per-frame scale and shift leave the true values unchanged (a rotation
would add to roll). What changes is only where the face falls on the pixel grid and in the mesh's crop, which is
arbitrary with respect to the expression: what the mesh then reads differently is its own error. A JPEG re-encode
at quality 90 would move the face by nothing (the driving frames are already compressed video, the avatar's are
smooth renderings) and so would understate that error (measured on lp_d18's frames: gaze retest r 0.94 after
JPEG, 0.35 after this perturbation).

What the bound leaves out:
- An error the mesh makes the same way on both copies (a pose read partly as expression, say) counts as signal:
  the reliability is an upper bound, and so is the ceiling.
- It assumes the driver's and the avatar's errors independent. The preview renderer reads the driver with the same
  mesh model (for a driving frame up to 640 px, on the very frame the bench reads), so part of the driver's error
  moves the avatar too: r can then pass the ceiling (lp_s20's mouth on fp_case4 and lp_s1 in the committed run).
  Where the avatar copies the driver's reading, error and all, the bound is sqrt(rel_output), higher still.
- The reliability falls a little as the perturbation grows. On the cells under target in the committed run, half
  and twice this perturbation moved a ceiling by up to 0.07 (gaze lp_s20 -> lp_s1's: 0.60-0.84), another seed by
  up to 0.03. A ceiling is an estimate for this perturbation, good to a few hundredths, not an exact limit.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import cv2
import numpy as np

SHIFT_PX = 1.5
SCALE = 0.015


def perturbed(frames: Iterable[np.ndarray], seed: int) -> Iterator[np.ndarray]:
    """Each (H, W, 3) frame scaled by 1 +- SCALE about its centre and shifted by +- SHIFT_PX, drawn per frame."""
    rng = np.random.default_rng(seed)
    for f in frames:
        h, w = f.shape[:2]
        s = 1 + rng.uniform(-SCALE, SCALE)
        dx, dy = rng.uniform(-SHIFT_PX, SHIFT_PX, 2)
        m = np.array([[s, 0, (1 - s) * (w - 1) / 2 + dx], [0, s, (1 - s) * (h - 1) / 2 + dy]])
        yield cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def pearson(x: np.ndarray, y: np.ndarray, keep: np.ndarray | None = None) -> float | None:
    """Pearson r of two curves over the frames in `keep` where both read a face (NaN: none); None with fewer than 5
    such frames or a constant curve."""
    ok = ~(np.isnan(x) | np.isnan(y))
    if keep is not None:
        ok &= keep
    if ok.sum() < 5 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return None
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


reliability = pearson  # a signal's test-retest reliability: the Pearson r of its two readings


def ceiling(rel_driver: float | None, rel_output: float | None) -> float | None:
    """The highest Pearson r two readings with these reliabilities can show: sqrt(rel_driver * rel_output).
    A reliability at or below 0 (the retest agrees with nothing) gives a ceiling of 0."""
    if rel_driver is None or rel_output is None:
        return None
    return float(np.sqrt(max(rel_driver, 0.0) * max(rel_output, 0.0)))
