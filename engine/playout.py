"""The renderer's playout delay: how long after a driving frame was pushed its avatar frame is released.

    delay = PlayoutDelay(fps=25.0)
    delay.observe(wait_s)        # once per window: how long the window's first frame waited -> new delay (s)
    delay.reset()                # the waits change (a new budget): learn afresh
    delay.delay                  # seconds; engine/renderer.py's pull() releases frame j at push time + this

A rolling window hands out its 4S frames at once and its first frame waited longest, so releasing every frame at
its push time + (a typical first-frame wait) gives a steady stream at the input rate and the same latency for every
frame. `playout_delay` is that typical wait: the 90th percentile of the recent waits + a quarter frame.

Up slowly, down fast. A hiccup (one slow window, which may also delay the next one, whose input queued behind it)
is one or two samples among the last 25 and moves the delay not at all; a lasting change (a new budget, a loaded
GPU) moves it within a few windows. Down: when the last `settle` windows all waited at least one frame less than
the delay, the older waits are lowered to the recent maximum at once rather than aged out over 25 windows (4 s at
stride 1). They belonged to a backlog that is gone: the first windows of a session, a stall the renderer skipped
past. Without this, a session whose first second ran slow keeps that second's latency for the next four.
"""
from __future__ import annotations

import collections
import math

PLAYOUT_HISTORY = 25  # windows of first-frame waits the playout delay looks at (4 s at stride 1, 25 fps)
PLAYOUT_QUANTILE = 0.9
PLAYOUT_MARGIN_FRAMES = 0.25
PLAYOUT_SETTLE = 8  # windows all a frame under the delay before the older waits are forgotten


def playout_delay(waits, fps: float) -> float:
    """Playout delay (seconds) from recent first-frame waits: their 90th percentile (nearest rank) + a quarter frame.

    Releasing frame j at its push time + this delay gives a steady stream unless a window is slower than 9 in 10 of
    the recent ones; such a frame goes out as soon as it is ready (its own latency, one repeated tick at the sink).
    A higher delay would add latency to every frame to spare the rare late one a repeat; a lower one makes the
    output stutter (a late first frame breaks the one-frame-per-period cadence). With < 10 samples: their maximum."""
    ordered = sorted(waits)
    if not ordered:
        return 0.0
    rank = max(0, math.ceil(PLAYOUT_QUANTILE * len(ordered)) - 1) if len(ordered) >= 10 else len(ordered) - 1
    return ordered[rank] + PLAYOUT_MARGIN_FRAMES / fps


class PlayoutDelay:
    """`playout_delay` over the last `history` first-frame waits, lowering the older ones to the recent maximum once
    `settle` windows in a row waited at least a frame less than the delay (see the module docstring). Seconds."""

    def __init__(self, fps: float, history: int = PLAYOUT_HISTORY, settle: int = PLAYOUT_SETTLE):
        self.fps = float(fps)
        self.settle = settle
        self.waits: collections.deque = collections.deque(maxlen=history)
        self.delay = 0.0
        self.settled = 0  # times the older waits were forgotten

    def observe(self, wait: float) -> float:
        self.waits.append(wait)
        recent = list(self.waits)[-self.settle:]
        if len(self.waits) > self.settle and max(recent) <= self.delay - 1 / self.fps:
            # lowered to the recent maximum rather than dropped: a full history keeps the percentile robust
            top = max(recent)
            self.waits = collections.deque((min(w, top) for w in self.waits), maxlen=self.waits.maxlen)
            self.settled += 1
        self.delay = playout_delay(self.waits, self.fps)
        return self.delay

    def reset(self) -> None:
        """Forget every wait (the next window's wait sets the delay)."""
        self.waits.clear()
