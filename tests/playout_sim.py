"""The live path's timing without a model: driving frames -> rolling windows of given costs -> the renderer's output
queue, released by a PlayoutDelay -> an AvatarTrack ticking at the input rate. Deterministic and independent of
the machine's speed: every time is computed, none is measured, so a test can replay a GPU bench's startup on CPU.

    run = simulate(PlayoutDelay(25.0), costs_14b())
    run.latencies_s       # (frames shown,) push of the driving frame -> the tick that showed its avatar frame
    run.idle_ticks        # ticks before the first avatar frame (the track counts them as repeats too)
    run.repeats           # ticks after it without a new frame: stutter
    run.skipped           # frames the track dropped (a burst larger than its 2-frame buffer, a standing queue)
    run.waits, run.queued, run.delays   # per window: first-frame wait, of which queued, playout delay after it
    run.ticks             # per sink tick: the frame it showed, None for a repeat

Modelled as engine/renderer.py runs a live session at stride 1: driving frame j is pushed at j / fps; latent i
(frame 0 alone for i = 0, frames 4i-3..4i) has its tokens `expression_s` after its last frame; window k emits latent
k, needs the tokens of latent k + lookahead, starts when they exist and the previous window has finished (the
difference is its queue), and runs for `costs[k]`; its first frame's wait and queue go to `playout.observe`, its
frames to the output queue, which `pull()` releases with `playout.due`. The sink is the real AvatarTrack.

    python tests/playout_sim.py     # the 14B startup, window by window and per frame
"""
from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming.tracks import AvatarTrack  # noqa: E402

TIME_STRIDE = 4  # driving frames per latent frame (engine/flashportrait.py)


def costs_14b(windows: int = 143, startup=(0.283, 0.124, 0.160, 0.201),
              cycle=(0.120, 0.120, 0.120, 0.210)) -> list[float]:
    """Window costs (s) shaped like the 14B preset on one H200 at stride 1 without lookahead (bench/results/
    stream_latency_fp_14b_h200.json): the guidance economy runs the expensive pair every 4th window (emo_refresh 4),
    143 ms per window on average (real-time factor 1.12), ~340 ms first-frame waits at the costly window, ~250 at the
    others; the first windows are slower (one-off costs, pairs without a stored difference). With 10 ms of expression
    the waits start 293, 377, 377, 418 ms and the delay settles at 350 ms (the bench's playout_delay_ms, 349.7)."""
    return [startup[k] if k < len(startup) else cycle[(k - len(startup)) % len(cycle)] for k in range(windows)]


@dataclasses.dataclass
class Run:
    fps: float
    latencies_s: np.ndarray
    frames: list
    idle_ticks: int
    repeats: int
    skipped: int
    waits: list
    queued: list
    delays: list
    ticks: list

    def p95_ms(self, after_s: float = 0.0) -> float:
        """95th percentile latency (ms) of the frames pushed after `after_s` seconds."""
        keep = np.array(self.frames) >= after_s * self.fps
        return float(np.percentile(1e3 * self.latencies_s[keep], 95))

    def repeats_after(self, after_s: float) -> int:
        """Repeated ticks after the sink showed the frame pushed at `after_s` seconds."""
        shown = [i for i, j in enumerate(self.ticks) if j is not None and j >= after_s * self.fps]
        return sum(j is None for j in self.ticks[shown[0]:]) if shown else 0


class _Queue:
    """The renderer's output side: frames wait in order until `playout.due` (engine/renderer.py's pull())."""

    pace = True

    def __init__(self, playout):
        self.playout, self.frames, self.now = playout, collections.deque(), 0.0
        self.image = np.zeros((2, 2, 3), np.uint8)

    def pull(self):
        if not self.frames or not self.playout.due(self.frames[0][1], self.now):
            return None
        j, _ = self.frames.popleft()
        return self.image, j


def simulate(playout, costs, fps: float = 25.0, expression_s: float = 0.010, lookahead: int = 0,
             track_start_s: float = 0.017) -> Run:
    """Replay windows of `costs` (s each) through `playout` and an AvatarTrack whose ticks start `track_start_s`
    after the first driving frame (a phase between the camera's clock and the sink's)."""
    push = [j / fps for j in range(TIME_STRIDE * (len(costs) + lookahead) + 1)]
    windows, end = [], 0.0  # (end, wait, queued, frames)
    for k, cost in enumerate(costs):
        ready = push[TIME_STRIDE * (k + lookahead)] + expression_s
        start = max(ready, end)
        end = start + cost
        frames = [0] if k == 0 else list(range(TIME_STRIDE * k - 3, TIME_STRIDE * k + 1))
        windows.append((end, end - push[frames[0]], start - ready, frames))
    queue = _Queue(playout)
    track = AvatarTrack(queue, fps, 2, 2, playout_frames=3)
    last = windows[-1][3][-1]
    shown, latencies, delays, ticks, idle, w = [], [], [], [], 0, 0
    while not shown or shown[-1] < last:
        now = track_start_s + len(ticks) / fps
        while w < len(windows) and windows[w][0] <= now:
            _, wait, queued, frames = windows[w]
            playout.observe(wait, queued)
            delays.append(playout.delay)
            queue.frames.extend((j, push[j]) for j in frames)
            w += 1
        queue.now = now
        fresh = track.fresh
        track._image()
        if track.fresh > fresh:
            shown.append(track.on_air[0])
            latencies.append(now - push[shown[-1]])
        elif not shown:
            idle += 1
        ticks.append(shown[-1] if track.fresh > fresh else None)
    return Run(fps, np.array(latencies), shown, idle, track.repeats - idle, track.skipped,
               [x[1] for x in windows], [x[2] for x in windows], delays, ticks)


def main() -> None:
    from engine.playout import PlayoutDelay

    run = simulate(PlayoutDelay(25.0), costs_14b())
    ms = lambda xs: " ".join(f"{1e3 * x:.0f}" for x in xs)  # noqa: E731
    print("first-frame wait ms:", ms(run.waits[:16]))
    print("of which queued ms: ", ms(run.queued[:16]))
    print("playout delay ms:   ", ms(run.delays[:16]))
    print("latency ms (frames 0..79):", ms(run.latencies_s[:80]))
    print(f"p95 {run.p95_ms():.0f} ms, after 2 s {run.p95_ms(2.0):.0f} ms; idle ticks {run.idle_ticks}, "
          f"repeats {run.repeats}, skipped {run.skipped} of {len(run.frames)} frames shown")


if __name__ == "__main__":
    main()
