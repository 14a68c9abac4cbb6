"""The inside of an open mouth, painted over the warped portrait by the `preview` renderer (engine/preview.py):
a shaded cavity, a tongue, upper and lower teeth, in the mouth's own coordinates (corner to corner, upper lip to
lower lip), so they follow the lips however the mouth opens."""
from __future__ import annotations

import cv2
import numpy as np

# The mouth interior is a dark cavity: lit as brightly as the lips (a red oval), the face mesh reads it as lips and
# puts the inner-lip points inside it (an open mouth measured shut), as a viewer would.
MOUTH_COLOUR = np.array([15, 4, 6], np.float32)  # RGB of the inner mouth at the back of the throat
MOUTH_FRONT = np.array([40, 12, 15], np.float32)  # ...and of its shaded front, near the lips
TONGUE_COLOUR = np.array([90, 35, 40], np.float32)
TEETH_COLOUR = np.array([206, 196, 180], np.float32)
TEETH_DEPTH = 0.3  # the upper-teeth band covers this fraction of the lip gap, from the upper lip down...
TEETH_MAX = 0.05  # ...but no more than this many inter-ocular distances
LOWER_TEETH_DEPTH = 0.16  # the lower teeth peek above the lower lip, once the mouth is wide open...
# ...by as much as the jaw has dropped: the lower lip covers them while a talking mouth parts (lip gap under a fifth
# of the mouth's width) and uncovers them as the gap grows to 0.7 of the width. At full height in every open mouth
# they read as a grin through clenched teeth, and the face mesh put the lower inner lip on their edge.
LOWER_TEETH_DROP = (0.2, 0.7)
# Both rows are painted this opaque (over the cavity and tongue): a gaping mouth shows its lower teeth as clearly as
# its upper ones (lp_d18's driving video); at 0.55 they were a pink-grey smear the face mesh read as lip.
TEETH_OPACITY = 0.9
MOUTH_FULL_OPEN = 0.04  # lip gap increase (in inter-ocular distances) at which teeth and tongue are fully shown
MOUTH_DARK_OPEN = 0.015  # ...and at which the dark interior is opaque: parted lips show a dark line at once


def fill_mouth(out: np.ndarray, upper: np.ndarray, lower: np.ndarray, iod: float, opened: float) -> None:
    """Paint the opened part of the mouth into `out` (H, W, 3) uint8 RGB, in place, opaque in proportion to how much
    wider the lips open than in the reference (`opened`, inter-ocular distances; `iod` in pixels): a mouth interior
    darker towards the throat, a tongue at the bottom, upper teeth under the upper lip (shaded, with gaps between
    them) and, once wide open, lower teeth above the lower lip, as tall as the jaw has dropped. upper, lower: the
    inner-lip chains (complex pixels, corner to corner)."""
    wider = opened / MOUTH_FULL_OPEN
    strength = float(np.clip(opened / MOUTH_DARK_OPEN, 0.0, 1.0))
    if strength <= 0.02:
        return
    # Teeth only once the gap is wide enough to hold them: in a slit they read as specks.
    teeth_strength = TEETH_OPACITY * float(np.clip(wider - 0.5, 0, 1))
    mid = len(upper) // 2
    drop = abs(lower[mid] - upper[mid]) / max(abs(upper[-1] - upper[0]), 1e-6)  # jaw drop: lip gap / mouth width
    lower_height = float(np.clip((drop - LOWER_TEETH_DROP[0]) / (LOWER_TEETH_DROP[1] - LOWER_TEETH_DROP[0]), 0, 1))
    lower_strength = TEETH_OPACITY * float(np.clip(wider - 1.5, 0, 1)) if lower_height > 0 else 0.0
    tongue_strength = 0.8 * float(np.clip(wider - 1.0, 0, 1))
    inner = np.concatenate([upper, lower[::-1][1:-1]])
    x0 = max(int(np.floor(inner.real.min())) - 2, 0)
    y0 = max(int(np.floor(inner.imag.min())) - 2, 0)
    x1 = min(int(np.ceil(inner.real.max())) + 3, out.shape[1])
    y1 = min(int(np.ceil(inner.imag.max())) + 3, out.shape[0])
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    crop = out[y0:y1, x0:x1].astype(np.float32)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    pts = np.stack([inner.real - x0, inner.imag - y0], 1)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    alpha = cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32) * (strength / 255.0)

    # Mouth coordinates: u from corner (0) to corner (1), t from the upper lip (0) to the lower lip (1).
    corner, axis = upper[0], upper[-1] - upper[0]
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    w = ((xx + 1j * yy) - corner) / axis
    u, v = w.real, w.imag
    wu, wl = (upper - corner) / axis, (lower - corner) / axis
    ou, ol = np.argsort(wu.real), np.argsort(wl.real)
    v_up = np.interp(u, wu.real[ou], wu.imag[ou])
    v_lo = np.interp(u, wl.real[ol], wl.imag[ol])
    gap = np.maximum(v_lo - v_up, 1e-4)
    t = np.clip((v - v_up) / gap, 0.0, 1.0)
    centre = np.clip(1.0 - (2 * u - 1) ** 2, 0.0, 1.0)  # 1 in the middle, 0 at the corners (in shadow)
    depth = centre * (1.0 - np.abs(2 * t - 1))
    colour = MOUTH_FRONT + (MOUTH_COLOUR - MOUTH_FRONT) * (0.35 + 0.65 * depth)[..., None]
    # The tongue: a rounded hump rising from the lower lip, lit from the front.
    hump = 1.0 - 0.45 * np.clip(1.0 - ((2 * u - 1) / 0.7) ** 2, 0, 1)  # its top edge, in t
    tongue = tongue_strength * np.clip((t - hump) / 0.12, 0, 1) * np.clip(1.0 - ((2 * u - 1) / 0.8) ** 2, 0, 1)
    colour += (tongue[..., None] * (0.55 + 0.45 * t[..., None])) * (TONGUE_COLOUR - colour)
    gap_iod = gap * abs(axis) / iod
    teeth_depth = np.minimum(TEETH_DEPTH, TEETH_MAX / np.maximum(gap_iod, 1e-4))
    side = np.sqrt(centre)
    gaps = 1.0 - 0.3 * np.exp(-(((u * 9.0) % 1.0 - 0.5) / 0.06) ** 2)  # darker lines between the teeth
    lower_depth = LOWER_TEETH_DEPTH * teeth_depth / TEETH_DEPTH * max(lower_height, 1e-3)
    for band, amount in ((t / teeth_depth, teeth_strength), ((1 - t) / lower_depth, lower_strength)):
        if amount <= 0:
            continue
        inside = np.clip((1.0 - band) / 0.25, 0.0, 1.0)  # soft edge towards the mouth's inside
        shade = (1.0 - 0.35 * np.clip(band, 0, 1)) * gaps * (0.5 + 0.5 * side)
        colour += (amount * inside * side * side)[..., None] * (TEETH_COLOUR * shade[..., None] - colour)
    crop += alpha[..., None] * (colour - crop)
    out[y0:y1, x0:x1] = crop.astype(np.uint8)
