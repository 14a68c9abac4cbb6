"""The closing upper lid of an eye whose lid the portrait hides under hair, painted over the warped portrait by the
`preview` renderer (engine/preview.py). Where a fringe covers the lid (fp_case3's left eye), the band above the lid
that the warp moves down over a closing eye is hair: a blink drew a curtain of hair over the eye, which the face mesh
read as a still-open eye (the lid's mesh point stays in the fringe). Hair does not follow a lid: it stays put, and
the lid, the portrait's own skin, comes down from under it."""
from __future__ import annotations

import cv2
import numpy as np

# The skin between the lid's crease and the brow is taken as hidden under hair when it is darker than this fraction
# of the skin under the same eye (medians of grey level): fp_case3's fringed eye 0.36, other eyes 0.54-1.5, except a
# dark face's eye deep in shadow (fp_case1: 0.18), whose lid is then painted with its own shaded skin.
HAIR_DARK = 0.45
LASH_SHADE = 0.35  # the lash line along a painted lid's edge: the lid colour times this


def _median_grey_rgb(reference: np.ndarray, poly: np.ndarray) -> tuple[float, np.ndarray]:
    mask = np.zeros(reference.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(np.stack([poly.real, poly.imag], 1)).astype(np.int32)], 1)
    pix = reference[mask > 0].astype(np.float32)
    if len(pix) == 0:
        return 0.0, np.zeros(3, np.float32)
    return float(np.median(pix @ np.array([0.299, 0.587, 0.114], np.float32))), np.median(pix, 0)


def hidden_lid_colour(reference: np.ndarray, ref_z: np.ndarray, ring: np.ndarray, brow: np.ndarray,
                      lower: np.ndarray, under: np.ndarray) -> np.ndarray | None:
    """RGB (3,) float32 of the skin under the eye if the skin above its lid (lid ring to brow) is hair, else None.
    reference: (H, W, 3) uint8 RGB; ref_z: its landmarks (complex pixels); ring, brow, lower, under: index chains of
    the lid ring, the brow's lower edge, the lower lid and the ring below it (each corner to corner, same direction)."""
    above, _ = _median_grey_rgb(reference, np.concatenate([ref_z[ring], ref_z[brow][::-1]]))
    skin, colour = _median_grey_rgb(reference, np.concatenate([ref_z[lower], ref_z[under][::-1]]))
    return colour if above < HAIR_DARK * skin else None


def paint_lid(out: np.ndarray, open_line: np.ndarray, lid_line: np.ndarray, colour: np.ndarray) -> None:
    """Paint the lid over the part of the eye it has closed, in place: between `open_line` (where the portrait's
    upper lid would be with the eye as open as in the reference, complex pixels, corner to corner) and `lid_line`
    (the upper lid now, same points), with a dark lash line along the lid's edge. out: (H, W, 3) uint8 RGB."""
    lid_line = open_line + np.maximum((lid_line - open_line).imag, 0.0) * 1j  # above the open lid: the hair's
    if (lid_line - open_line).imag.max() < 0.5:  # no lower than the portrait's own lid: nothing covered
        return
    poly = np.concatenate([open_line, lid_line[::-1]])
    pts = np.round(np.stack([poly.real, poly.imag], 1) * 16).astype(np.int32)
    cv2.fillPoly(out, [pts], colour.tolist(), cv2.LINE_AA, 4)
    lash = np.round(np.stack([lid_line.real, lid_line.imag], 1) * 16).astype(np.int32)
    cv2.polylines(out, [lash], False, (colour * LASH_SHADE).tolist(), 1, cv2.LINE_AA, 4)
