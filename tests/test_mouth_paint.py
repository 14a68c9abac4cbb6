"""The painted mouth interior (engine/mouth_paint.py) on a synthetic mouth: what shows inside the lips."""
from __future__ import annotations

import numpy as np

from engine.mouth_paint import TEETH_COLOUR, fill_mouth

WIDTH = 100.0  # mouth width, corner to corner (pixels); the inter-ocular distance is twice that


def _painted(gap: float) -> tuple[np.ndarray, complex, complex]:
    """A black face with a mouth opened `gap` pixels in the middle, painted; (image, upper lip's middle, lower's)."""
    u = np.linspace(0.0, 1.0, 11)
    bulge = np.sin(np.pi * u)  # the lips part most in the middle, meet at the corners
    upper = 50 + WIDTH * u + 1j * (100 - 0.5 * gap * bulge)
    lower = 50 + WIDTH * u + 1j * (100 + 0.5 * gap * bulge)
    out = np.zeros((200, 200, 3), np.uint8)  # black: only teeth are bright
    fill_mouth(out, upper, lower, iod=2 * WIDTH, opened=gap / (2 * WIDTH))
    return out, upper[5], lower[5]


def _teeth(out: np.ndarray, rows: slice, x: int) -> bool:
    """Whether teeth show in these rows, a few columns either side of x (the tongue and cavity are dark)."""
    return bool((out[rows, x - 8:x + 9].mean(-1) > 0.3 * TEETH_COLOUR.mean()).any())


def test_lower_teeth_show_with_the_jaw_drop():
    """A talking mouth (gap a fifth of its width, opened far enough for the full teeth and tongue) shows its upper
    teeth but no lower ones: the lower lip covers them. A gaping mouth (gap 0.8 of the width) shows both rows."""
    out, top, bottom = _painted(20.0)
    x = int(top.real)
    assert _teeth(out, slice(int(top.imag) + 1, int(top.imag) + 4), x)  # upper teeth under the upper lip
    assert not _teeth(out, slice(int(bottom.imag) - 5, int(bottom.imag)), x)
    out, top, bottom = _painted(80.0)
    assert _teeth(out, slice(int(bottom.imag) - 5, int(bottom.imag)), x)


def test_a_gaping_mouths_lower_teeth_are_as_clear_as_its_upper_ones():
    """In a mouth opened 0.8 of its width, the lower row is as bright as the upper one (not half-blended into the
    tongue behind it)."""
    out, top, bottom = _painted(80.0)
    x = int(top.real)
    upper = out[int(top.imag) + 1:int(top.imag) + 6, x - 8:x + 9].mean(-1).max()
    lower = out[int(bottom.imag) - 5:int(bottom.imag), x - 8:x + 9].mean(-1).max()
    assert lower > 0.9 * upper
