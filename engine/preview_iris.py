"""The preview renderer's gaze: the portrait's iris moved inside its eye opening by the driver's (engine/preview.py).

    move_iris(map_x, map_y, target, IRISES[0], stretch, opening, ref_z, lid_margin, (width, height))

The warp's backward map (full resolution, edited in place) is bent around each iris so that the reference's iris is
sampled from its own place and drawn where the driver's gaze puts it, the white stretching or squeezing on either side.
"""
from __future__ import annotations

import cv2
import numpy as np

from engine.face_mesh import (LEFT_EYE_LOWER, LEFT_EYE_OUTER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_OUTER,
                              RIGHT_EYE_UPPER)

# Iris shift rendered along the eye per unit of the driver's (both between the eye corners): the face mesh, whose
# corner points slide along with an iris, reads a rendered iris move at 0.4-0.7 of its size and a real eye's at about
# 0.7 (the drivers' gaze reading over their iris's move within the skull: 0.69-0.77). At 1.0 the avatar's eyes turned
# visibly less than the driver's, and a driver's small gaze drowned in the face mesh's noise on the avatar.
GAZE_GAIN = 1.5
# ...easing off towards GAZE_REACH eye widths (tanh): at 1.5x a glance pushed the iris to its hard clip at the eye
# corner, where the lids cut it and the face mesh read the avatar's eye as narrowing (eyes lp_d12 -> fp_case2 0.83
# on a turned head's glances; 0.86 at 0.25, 0.83 at 0.35), and a wider glance no longer moved it at all.
GAZE_REACH = 0.25
GAZE_VERT = 0.5  # ...and up and down: half the driver's, as before
GAZE_SHUT, GAZE_OPEN = 0.35, 0.7  # the iris shift fades in between these eye openings (relative to the open eye)
IRISES = ((468, 33, 133, 469), (473, 362, 263, 474))  # (iris centre, eye corner a, eye corner b, a rim point)
# How far the iris lies in front of the eye corners (their mean), in eye widths, for the parallax of an eye turning
# with the head: anatomically the iris plane sits about 6 mm in front of the canthi's mean on a 30 mm eye. The face
# mesh's own iris depth says 0.10 (0.095-0.11 on five faces); gaze lp_s20 -> lp_s1 read 0.13 / 0.32 / 0.46 / 0.57
# with no parallax / 0.1 / 0.2 / 0.3, lp_s20 -> fp_case4 0.72 / 0.74 / 0.77 / 0.80, lp_d3 -> fp_case2 0.86 / 0.86 /
# 0.85 / 0.84: the anatomical figure is kept, not the best-reading one.
IRIS_DEPTH = 0.2


def eyeball_ratio(p3: np.ndarray, r: np.ndarray, iris: tuple) -> complex:
    """Where the iris of a face's landmarks p3 (N, 3: x, y, depth away from the camera) sits between its eye corners
    in the image (0 at corner a, 1 at corner b, complex: across the eye too) once the head turns by r (3x3) with the
    eye fixed in it: the iris IRIS_DEPTH eye widths in front of the corners, so a turn slides it along the eye."""
    c, ia, ib, _ = iris
    a, b = p3[ia], p3[ib]
    eye = np.array([p3[c, 0], p3[c, 1], (a[2] + b[2]) / 2 - IRIS_DEPTH * np.hypot(*(b[:2] - a[:2]))])
    pa, pb, pc = a @ r.T, b @ r.T, eye @ r.T
    return complex(*(pc[:2] - pa[:2])) / complex(*(pb[:2] - pa[:2]))


def move_iris(map_x: np.ndarray, map_y: np.ndarray, target: np.ndarray, iris: tuple, stretch: float, opening: float,
              ref_z: np.ndarray, lid_margin: np.ndarray, size: tuple[int, int]) -> None:
    """Move the reference's iris inside the eye opening by the gaze in `target` (its iris landmarks relative to
    the eye corners, against the reference's): the backward map around the iris samples the reference iris at
    its own place, the map's shift fading out towards the lids; map_x/map_y are full-resolution, edited in
    place. The shift fades out as the driver's eye closes (`opening`: its gap relative to the open eye): the face
    mesh's iris points wander while the lids hide the iris. ref_z: the reference's landmarks (complex pixels),
    lid_margin: the modelled lids' normalised offsets (PreviewRenderer), size: the output's (width, height)."""
    c, ia, ib, rim = iris
    at, bt, as_, bs = target[ia], target[ib], ref_z[ia], ref_z[ib]
    r_ref = (ref_z[c] - as_) / (bs - as_)
    r_now = (target[c] - at) / (bt - at)
    dr = complex(GAZE_GAIN * (r_now - r_ref).real, GAZE_VERT * (r_now - r_ref).imag)
    dr = complex(GAZE_REACH * np.tanh(dr.real / GAZE_REACH), dr.imag)  # eases off before the corner clip
    dr *= float(np.clip((opening - GAZE_SHUT) / (GAZE_OPEN - GAZE_SHUT), 0.0, 1.0))
    if abs(dr) < 0.004:
        return
    et = bt - at
    home = at + et * complex(r_ref.real, r_ref.imag * stretch)  # where the eye's rigid move puts the iris
    centre = home + dr * et
    radius = abs(ref_z[rim] - ref_z[c]) * abs(et) / abs(bs - as_)
    reach = 1.5 * radius + abs(dr * et)
    upper, lower = (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER) if ia == RIGHT_EYE_OUTER else (LEFT_EYE_UPPER, LEFT_EYE_LOWER)
    ring = np.array(upper + lower[::-1][1:-1])
    # the eye opening as the face mesh sees it, inside the modelled lids: the lashes do not move with the iris
    outline = target[ring] - lid_margin[ring] * (target[LEFT_EYE_OUTER] - target[RIGHT_EYE_OUTER])
    x0 = max(int(np.floor(outline.real.min())) - 2, 0)
    y0 = max(int(np.floor(outline.imag.min())) - 2, 0)
    x1 = min(int(np.ceil(outline.real.max())) + 3, size[0])
    y1 = min(int(np.ceil(outline.imag.max())) + 3, size[1])
    if x1 - x0 < 3 or y1 - y0 < 3:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    pts = np.stack([outline.real - x0, outline.imag - y0], 1)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    inside = cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32) / 255
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.hypot(xx - centre.real, yy - centre.imag)
    fall = np.clip((reach - d) / max(reach - 1.05 * radius, 1.0), 0.0, 1.0)
    weight = inside * fall * fall * (3 - 2 * fall)  # smoothstep: flat over the iris, zero at `reach`
    # Along the eye the iris moves rigidly and the white on either side stretches or squeezes to fill the eye
    # from corner to corner (an eyeball turning): bending the map around the iris instead would smear the iris
    # into the white it leaves, and the eye would read as looking half as far.
    ru = 1.05 * radius / abs(et)  # iris half-width in eye-width units
    uh = float(np.clip(r_ref.real, ru + 0.02, 1 - ru - 0.02))
    uc = float(np.clip(uh + dr.real, ru + 0.02, 1 - ru - 0.02))
    u = (((xx - at.real) + 1j * (yy - at.imag)) / et).real
    src = np.where(u < uc - ru, u * (uh - ru) / (uc - ru),
                   np.where(u > uc + ru, 1 - (1 - u) * (1 - uh - ru) / (1 - uc - ru), u + uh - uc))
    along = (np.clip(src, 0, 1) - np.clip(u, 0, 1)) * inside  # (eye-width units) source minus target
    across = 1j * dr.imag * (bs - as_)
    map_x[y0:y1, x0:x1] += along * (bs - as_).real - across.real * weight
    map_y[y0:y1, x0:x1] += along * (bs - as_).imag - across.imag * weight
