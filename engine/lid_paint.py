"""The closing upper lid of an eye whose lid the portrait hides under hair, painted over the warped portrait by the
`preview` renderer (engine/preview.py). Where a fringe covers the lid (fp_case3's left eye), the band above the lid
that the warp moves down over a closing eye is hair: a blink drew a curtain of hair over the eye, which the face mesh
read as a still-open eye (the lid's mesh point stays in the fringe). Hair does not follow a lid: it stays put, and
the lid, the portrait's own skin, comes down from under it.

The lid has the colour of the skin under the same eye (its median) and that skin's fine texture (mirrored about the
lower lid, at the portrait's scale), a little shaded by the fringe at the top, edged with a lash line, its top edge
feathered into the hair. A flat colour read as a pasted-on patch; the under-eye skin's own shading (dark circles,
the lower lashes' shadow) read to the face mesh as an eye still open (eyes lp_d19 -> fp_case3 0.83; 0.87 now, 0.88
with the flat patch)."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# The skin between the lid's crease and the brow is taken as hidden under hair when it is darker than this fraction
# of the skin under the same eye (medians of grey level: fp_case3's fringed eye 0.36, other eyes 0.54-1.5) and no
# warmer: skin in shadow keeps its red (fp_case1's far eye deep in its socket, 0.18: red share 0.86 against its
# skin's 0.55), dark hair does not (fp_case3's fringe 0.30 against 0.39). A shadowed lid is the warp's to move: painted
# with the lit skin under the eye, it closed as a light patch in a dark socket.
HAIR_DARK = 0.45
LASH_SHADE = 0.35  # the lash line along a painted lid's edge: the lid colour times this
SHADOW = 0.9  # the lid's brightness where it leaves the hair (the fringe's shadow), rising to 1 halfway down
SKIN_FROM = 0.5  # the lid's texture starts this far from the lower lid towards the ring below it (past the lashes)
DETAIL_PX = 2.0  # ...of which only the detail finer than this (Gaussian sigma, pixels) is kept
FEATHER_PX = 1.5  # the lid's top edge blends into the hair over this many pixels


@dataclass
class HiddenLid:
    """An eye's lid hidden under hair: the skin that paints it, in the reference (pixels, complex)."""
    colour: np.ndarray  # (3,) float32 RGB: the median skin under the eye
    corners: tuple[complex, complex]  # the eye's corners
    lower: tuple[np.ndarray, np.ndarray]  # the lower lid as _along() gives it relative to the corners: (u, w)
    under: tuple[np.ndarray, np.ndarray]  # ...and the ring below it


def _median_grey_rgb(reference: np.ndarray, poly: np.ndarray) -> tuple[float, np.ndarray]:
    mask = np.zeros(reference.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(np.stack([poly.real, poly.imag], 1)).astype(np.int32)], 1)
    pix = reference[mask > 0].astype(np.float32)
    if len(pix) == 0:
        return 0.0, np.zeros(3, np.float32)
    return float(np.median(pix @ np.array([0.299, 0.587, 0.114], np.float32))), np.median(pix, 0)


def hidden_lid(reference: np.ndarray, ref_z: np.ndarray, ring: np.ndarray, brow: np.ndarray, lower: np.ndarray,
               under: np.ndarray, corners: tuple[int, int]) -> HiddenLid | None:
    """The skin that paints the eye's lid if the skin above its lid (lid ring to brow) is hair, else None.
    reference: (H, W, 3) uint8 RGB; ref_z: its landmarks (complex pixels); ring, brow, lower, under: index chains of
    the lid ring, the brow's lower edge, the lower lid and the ring below it (each corner to corner, same direction);
    corners: the eye's corner landmarks in that direction."""
    above, above_rgb = _median_grey_rgb(reference, np.concatenate([ref_z[ring], ref_z[brow][::-1]]))
    skin, colour = _median_grey_rgb(reference, np.concatenate([ref_z[lower], ref_z[under][::-1]]))
    red = lambda rgb: float(rgb[0] / max(float(rgb.sum()), 1.0))  # noqa: E731  the red share of a colour
    if above >= HAIR_DARK * skin or red(above_rgb) > red(colour):  # light, or skin in shadow (warmer, not cooler)
        return None
    a, b = complex(ref_z[corners[0]]), complex(ref_z[corners[1]])
    return HiddenLid(colour, (a, b), _along(ref_z[lower], a, b), _along(ref_z[under], a, b))


def _along(line: np.ndarray, a: complex, b: complex) -> tuple[np.ndarray, np.ndarray]:
    """(u, w) of points relative to the axis a -> b: u along it (0 at a, 1 at b), w across it in pixels (y down),
    sorted by u."""
    q = (line - a) / (b - a)
    order = np.argsort(q.real)
    return q.real[order], q.imag[order] * abs(b - a)


def paint_lid(out: np.ndarray, reference: np.ndarray, open_line: np.ndarray, lid_line: np.ndarray,
              lid: HiddenLid) -> None:
    """Paint the lid over the part of the eye it has closed, in place: between `open_line` (where the portrait's
    upper lid would be with the eye as open as in the reference, complex pixels, corner to corner) and `lid_line`
    (the upper lid now, same points), with a dark lash line along the lid's edge. out: (H, W, 3) uint8 RGB;
    reference: the portrait `lid` was taken from."""
    lid_line = open_line + np.maximum((lid_line - open_line).imag, 0.0) * 1j  # above the open lid: the hair's
    if (lid_line - open_line).imag.max() < 0.5:  # no lower than the portrait's own lid: nothing covered
        return
    h, w = out.shape[:2]
    pts = np.concatenate([open_line, lid_line])
    x0, y0 = max(int(pts.real.min()) - 2, 0), max(int(pts.imag.min()) - 2, 0)
    x1, y1 = min(int(pts.real.max()) + 3, w), min(int(pts.imag.max()) + 3, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    a, b = open_line[0], open_line[-1]
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    q = ((xx - a.real) + 1j * (yy - a.imag)) / (b - a)
    u, v = q.real, q.imag * abs(b - a)
    top = np.interp(u, *_along(open_line, a, b))
    bottom = np.interp(u, *_along(lid_line, a, b))
    depth = bottom - top  # the lid's height at each column, pixels
    t = np.clip((v - top) / np.maximum(depth, 1e-3), 0.0, 1.0)  # 0 at the hair, 1 at the lash edge
    inside = np.clip((v - top) / FEATHER_PX + 0.5, 0, 1) * np.clip(bottom - v + 0.5, 0, 1) * np.clip(depth, 0, 1)
    if inside.max() <= 0:
        return
    # Texture: the skin under the eye at the portrait's own scale, mirrored about the lower lid: the lid's edge
    # takes the skin just under the lower lashes, its top the skin further down (stretched, a thin band of it read
    # as streaks of hair).
    ra, rb = lid.corners
    u_ref = np.clip(u, 0.0, 1.0)
    lower_w = np.interp(u_ref, *lid.lower)
    start = lower_w + SKIN_FROM * (np.interp(u_ref, *lid.under) - lower_w)  # clear of the lower lashes
    src_w = start + (bottom - v) * (abs(rb - ra) / abs(b - a))
    src = ra + (rb - ra) * (u_ref + 1j * src_w / abs(rb - ra))
    skin = cv2.remap(reference, src.real.astype(np.float32), src.imag.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    # Only the skin's fine texture: its shading under the eye (dark circles, the lower lashes' shadow) read to the
    # face mesh as an eye still open under the lid.
    skin = lid.colour + skin - cv2.GaussianBlur(skin, (0, 0), DETAIL_PX)
    shade = SHADOW + (1 - SHADOW) * np.clip(2 * t, 0, 1)
    alpha = inside[..., None]
    roi = out[y0:y1, x0:x1]
    roi[:] = np.clip(roi * (1 - alpha) + skin * shade[..., None] * alpha, 0, 255).astype(np.uint8)
    lash = np.round(np.stack([lid_line.real, lid_line.imag], 1) * 16).astype(np.int32)
    cv2.polylines(out, [lash], False, (lid.colour * LASH_SHADE).tolist(), 1, cv2.LINE_AA, 4)
