"""The renderer's playout delay: how long after a driving frame was pushed its avatar frame is released.

    delay = PlayoutDelay(fps=25.0)
    delay.observe(wait_s, queued_s)  # once per window: its first frame's wait, and how much of it was queueing
    delay.due(stamp, now)            # engine/renderer.py's pull(): release the frame pushed at `stamp` now?
    delay.reset()                    # the waits change (a new budget): learn afresh
    delay.delay                      # seconds: frame j is released at its push time + this

A rolling window hands out its 4S frames at once and its first frame waited longest, so releasing every frame at
its push time + (a typical first-frame wait) gives a steady stream at the input rate and the same latency for every
frame. `playout_delay` is that typical wait: the 90th percentile of the recent waits + a quarter frame.

Up slowly, down fast. A hiccup (one slow window, which may also delay the next one, whose input queued behind it)
is one or two samples among the last 25 and moves the delay not at all; a lasting change (a new budget, a loaded
GPU) moves it within a few windows. Down: when the last `settle` windows all waited at least one frame less than
the delay, the older waits are lowered to the recent maximum at once rather than aged out over 25 windows (4 s at
stride 1): they belonged to a backlog that is gone.

The start of a session, or of a budget (`reset`). Its first windows are slow in ways that do not recur: the first
window pays one-off costs, and the windows behind it queue (`queued_s`: their input was ready, the renderer still
busy) until that backlog has drained at the real-time factor's pace. Learnt as they were, with fewer than 10
samples (percentile = maximum), those waits set the delay to the backlog's peak and held it until settles: the
14B stream on one H200 played ~500 ms glass-to-glass for its first 2 s against ~420 ms after, which made the
whole stream's p95 498 ms (tests/playout_sim.py replays it). So:
  * the session's first window (frame 0 alone, with the one-off costs) is not learnt; its frame goes out when ready;
  * until the renderer has caught up (a window that started when its input was ready: `queued_s` under a quarter
    frame), each wait is learnt without its queue, as what the window would wait in the steady state; the delay
    is raised above that only as far as the backlog's own frames need: to the highest of its last 4 whole waits
    (4 windows: the 14B guidance economy's cycle of one costly window), less two frames for its first 6 late
    windows. A frame less than two frames late still plays in order (the sink holds two frames: one repeated
    tick, then the frames behind it one a tick); so a short backlog plays at the steady delay, a few of its
    frames at their own latency. A backlog whose frames keep coming late is paced at its recent waits instead (a
    late first frame in every window is a stutter in every window), and that delay comes down as it drains
    rather than holding its peak;
  * once caught up, the history is those queue-free waits, and from then on whole waits are learnt, queue
    included: a renderer that queues in its steady state (two costly windows in a row) gets a delay that covers
    it. A backlog that is still there after `history` windows (4 s; the controller keeps the real-time factor
    over 1.1, so one drains sooner unless the budget cannot keep up) and no longer comes down is the steady state:
    its whole waits are learnt, the older ones lowered to the recent maximum.

Repeats. A sink that ticks at the input rate shows content Δ later only by repeating Δ x fps ticks, however a raise
of Δ is spread over the frames, and shows it Δ sooner only by dropping Δ x fps frames. Every excursion of the
latency above its final value costs both; the ticks before the first frame count as repeats too
(streaming/tracks.py), so a stream's repeats are its final latency in ticks + the frames its sink dropped. Fewer
repeats come from not raising the delay for a backlog (then lowering it), not from a gentler raise.
"""
from __future__ import annotations

import collections
import math

PLAYOUT_HISTORY = 25  # windows of first-frame waits the playout delay looks at (4 s at stride 1, 25 fps)
PLAYOUT_QUANTILE = 0.9
PLAYOUT_MARGIN_FRAMES = 0.25
PLAYOUT_SETTLE = 8  # windows all a frame under the delay before the older waits are forgotten
ON_TIME_FRAMES = 0.25  # a window whose input queued less than this started on time: the renderer has caught up
BACKLOG_RECENT = 4  # a draining backlog paces its frames by the highest of its last 4 waits ...
BACKLOG_LATE_FRAMES = 2.0  # ... less this: frames of a backlog may be this late (the sink holds 2 frames) ...
BACKLOG_LATE_WINDOWS = 6  # ... in at most 6 windows (a startup's few late ones, not every window of a long backlog)


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
    """`playout_delay` over the last `history` first-frame waits of one session (seconds): the first window is not
    learnt; after a reset, waits are learnt without their queue until the renderer has caught up, the delay raised
    only as far as the backlog's frames need; the older waits are lowered to the recent maximum once `settle` windows
    in a row waited a frame less than the delay (see the module docstring)."""

    def __init__(self, fps: float, history: int = PLAYOUT_HISTORY, settle: int = PLAYOUT_SETTLE):
        self.fps = float(fps)
        self.settle = settle
        self.waits: collections.deque = collections.deque(maxlen=history)  # whole waits (the backlog's included)
        self.own: collections.deque = collections.deque(maxlen=history)  # while behind: the waits less their queue
        self.delay = 0.0
        self.settled = 0  # times the older waits were forgotten
        self.observed = 0  # windows of this session
        self.behind = True  # since the last reset the renderer has not started a window on time
        self.windows = 0  # windows since the last reset
        self.late_windows = 0  # of those, windows whose first frame was late by more than half a frame
        self.backlog_windows = 0  # windows that queued while behind (queue not learnt), over every reset

    def observe(self, wait: float, queued: float = 0.0) -> float:
        """One window: `wait` (s) from its first frame's push until its frames were ready, `queued` (s) of which its
        input was ready and waited for the renderer (earlier windows still running). Returns the new delay."""
        self.observed += 1
        if self.observed == 1:
            return self.delay  # the session's first window (frame 0 alone, one-off costs) is not learnt
        self.windows += 1
        if not self.behind:
            self._learn(wait)
            self.delay = playout_delay(self.waits, self.fps)
            return self.delay
        on_time = queued < ON_TIME_FRAMES / self.fps
        self.waits.append(wait)
        self.own.append(wait - queued)
        self.backlog_windows += not on_time
        if on_time:  # caught up: the backlog was not the steady state, its queue is forgotten
            self.behind = False
            self.waits = collections.deque(self.own, maxlen=self.waits.maxlen)
        elif self.windows >= self.waits.maxlen and not self._draining():  # a lasting backlog is the steady state
            self.behind = False
            self._lower_to_recent()
        if self.behind:  # the queue-free waits, raised so that the backlog's frames are less than 2 frames late
            late = BACKLOG_LATE_FRAMES if self.late_windows < BACKLOG_LATE_WINDOWS else 0.0
            paced = max(list(self.waits)[-BACKLOG_RECENT:]) + (PLAYOUT_MARGIN_FRAMES - late) / self.fps
            self.delay = max(playout_delay(self.own, self.fps), paced)
            self.late_windows += wait > self.delay + 0.5 / self.fps
        else:
            self.own.clear()
            self.delay = playout_delay(self.waits, self.fps)
        return self.delay

    def _draining(self) -> bool:
        """Whether the last BACKLOG_RECENT whole waits are lower than the ones before (a backlog coming down)."""
        recent = list(self.waits)[-2 * BACKLOG_RECENT:]
        return len(recent) == 2 * BACKLOG_RECENT and max(recent[BACKLOG_RECENT:]) < max(recent[:BACKLOG_RECENT])

    def _learn(self, wait: float) -> None:
        self.waits.append(wait)
        recent = list(self.waits)[-self.settle:]
        if len(self.waits) > self.settle and max(recent) <= self.delay - 1 / self.fps:
            self._lower_to_recent()
            self.settled += 1

    def _lower_to_recent(self) -> None:
        # lowered to the recent maximum rather than dropped: a full history keeps the percentile robust
        top = max(list(self.waits)[-self.settle:])
        self.waits = collections.deque((min(w, top) for w in self.waits), maxlen=self.waits.maxlen)

    def due(self, stamp: float, now: float) -> bool:
        """Whether the frame whose driving frame was pushed at `stamp` is due at `now` (same clock, seconds)."""
        return now >= stamp + self.delay

    def reset(self) -> None:
        """Forget every wait: the next windows are learnt as a start, without the queue of a backlog the old budget
        left."""
        self.waits.clear()
        self.own.clear()
        self.behind = True
        self.windows = 0
        self.late_windows = 0
