"""The adaptive budget controller: keep the rolling FlashPortrait engine ahead of playback.

    ctl = BudgetController(Budget(interval=1, steps=4, stride=2), window=6, fps=25.0,
                           cfg=ControllerConfig(latency_target_ms=800), ms_per_unit=40.0)  # seed: warm-up timing
    new = ctl.observe(window_s=0.21, frames=8, backlog_frames=14)   # once per rolling window
    if new is not None: ...apply new.interval / new.steps / new.stride at the next window boundary...
    ctl.stats()   # -> dict for /stats: what it chose and why

What it watches, once per window:
  * the real-time factor rtf = playback time of the frames the window produced (frames / fps) divided by the
    wall time the window took (DiT + decode). rtf >= 1 means generation stays ahead of playback;
  * the backlog: driving frames received whose avatar frame has not been handed out yet (the playout buffer as the
    renderer sees it). Rolling windows need (stride + lookahead) latent frames of input before they can run, so a
    backlog of about 4 (stride + lookahead) + 4 stride frames is inherent; beyond that it is lag that grows.

What it turns (the budget), within the user's limits:
  * ALPA interval K (1 = a full DiT pass at every step; K > 1 predicts K - 1 of every K steps),
  * sampler steps (down to `min_steps`),
  * window stride S (latent frames emitted per window; a larger S amortises one window's passes over more frames
    but adds 4 frames of input wait per latent frame, so it is bounded by `latency_target_ms`),
  * lookahead L (only with a `latency_target_ms`): the configured L, or 0 when the configured one cannot meet the
    target. L = 0 saves 4 frames (160 ms at 25 fps) of input wait per window; the price is that the last latent
    frame a window emits is rendered with its neighbour's expression tokens held (its expression lags by one latent
    frame, 4 video frames) instead of its own.
Cost model: a window costs about full_passes + 0.1 predicted_passes + 0.25 S "units" (the last term is the decode
of 4S frames); the controller measures ms per unit on the budget it runs and predicts every other budget's rtf
from it. Before the first window it predicts from `ms_per_unit`, which the renderer times during the engine's
warm-up (one DiT call, one decode), and starts on the best budget predicted to keep up: the first seconds of a
session then run in real time instead of building a backlog that a later cut must drain. When the measured rtf
falls below `cut_below`, or the backlog keeps growing, it jumps straight to the best-quality budget predicted to
reach `target_rtf` (quality order: lower K first, then more steps, then smaller S). When rtf stays above
`raise_above` for `patience` windows and the backlog is small, it steps one budget up.
After each change it waits `patience` windows before judging again. No queue grows because of the controller:
the renderer's input queue is bounded (oldest frame dropped), its lag is capped (it skips ahead past its
`lag_cap()`, counted) and, when even the cheapest budget cannot keep up, the sinks repeat the last frame
(counted by the tracks) and the stats say so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Budget:
    """What one rolling window spends: ALPA interval K, sampler steps, stride S (latent frames emitted)."""

    interval: int
    steps: int
    stride: int
    lookahead: int | None = None  # None: the configured lookahead (ControllerConfig.lookahead); 0: no lookahead

    def full_passes(self) -> int:
        """Steps that run the DiT (ALPA's schedule with one warm-up step: steps 0, K, 2K, ...)."""
        return sum(1 for i in range(self.steps) if self.interval == 1 or i % self.interval == 0)

    def units(self) -> float:
        """Relative cost of one window (see the module docstring)."""
        full = self.full_passes()
        return full + 0.1 * (self.steps - full) + 0.25 * self.stride


@dataclass
class ControllerConfig:
    """User limits and the controller's thresholds. `latency_target_ms` None: no latency bound on the stride."""

    latency_target_ms: float | None = None
    min_steps: int = 2
    max_interval: int = 3  # largest ALPA K it may choose (1 keeps ALPA off)
    max_stride: int | None = None  # default: window - 1 (at least one frame of overlap for the blend)
    lookahead: int | None = None  # latent frames of real conditioning beyond the emitted ones (default overlap)
    cut_below: float = 1.1  # measured rtf below this -> cut the budget
    target_rtf: float = 1.3  # a cut aims for this predicted rtf
    raise_above: float = 1.8  # measured rtf above this for `patience` windows -> raise the budget one step
    patience: int = 3  # windows between decisions
    warmup_windows: int = 1  # the first windows pay one-off costs (allocations, kernel selection): not judged
    enabled: bool = True
    # Measured quality of budgets, higher is better, keyed by `quality_key(budget)` (bench/speed_quality.py's ladder
    # on the trained mini: PSNR against held-out ground truth). Given, the ladder is ordered by it instead of by
    # cost; budgets it lacks come after every measured one, in cost order.
    quality: dict | None = None


def quality_key(b: Budget) -> tuple[int, int, int, bool]:
    """(interval, steps, stride, without lookahead): how a measured quality table names a budget."""
    return b.interval, b.steps, b.stride, b.lookahead == 0


def load_quality(path) -> dict:
    """A measured quality table from a JSON list of {"interval", "steps", "stride", "no_lookahead", "score"}."""
    import json
    from pathlib import Path

    rows = json.loads(Path(path).read_text())
    return {(int(r["interval"]), int(r["steps"]), int(r["stride"]), bool(r["no_lookahead"])): float(r["score"])
            for r in rows}


class BudgetController:
    """Chooses a Budget per rolling window from measured real-time factor and backlog (see the module docstring)."""

    def __init__(self, initial: Budget, window: int, fps: float, cfg: ControllerConfig | None = None,
                 ms_per_unit: float | None = None):
        self.cfg = cfg = cfg or ControllerConfig()
        self.window, self.fps = window, float(fps)
        self.initial = self.budget = initial
        max_stride = min(cfg.max_stride or window - 1, window - 1)
        k_max = max(1, cfg.max_interval)
        min_steps = max(1, min(cfg.min_steps, initial.steps))
        strides = range(initial.stride, max(initial.stride, max_stride) + 1)
        # Lookahead 0 is a choice only under a latency target (it trades one latent frame of expression lag on a
        # window's last emitted frame for 4 frames less input wait).
        looks = {initial.lookahead} | ({0} if cfg.latency_target_ms is not None else set())
        budgets = {Budget(k, s, st, la) for k in range(initial.interval, max(initial.interval, k_max) + 1)
                   for s in range(min_steps, initial.steps + 1) for st in strides for la in looks}
        # Quality order: most expensive per emitted frame first; ties prefer low K, many steps, small stride, and
        # the configured lookahead over none. With a measured quality table (cfg.quality), its order instead.
        cost_order = lambda b: (-b.units() / b.stride, b.interval, -b.steps, b.stride, b.lookahead == 0)  # noqa
        if cfg.quality:
            # measured order: best measured quality first; a tie (or an unmeasured budget) falls back to cost
            score = lambda b: cfg.quality.get(quality_key(b), -math.inf)  # noqa: E731
            self.ladder = sorted(budgets, key=lambda b: (-score(b), *cost_order(b)))
        else:
            self.ladder = sorted(budgets, key=cost_order)
        self._rank = {b: i for i, b in enumerate(self.ladder)}
        self.rtf: float | None = None  # moving average on the current budget
        self.last_rtf: float | None = None
        # Cost of one unit: seeded from the engine's warm-up timings (one DiT call, one decode) when given, then a
        # moving average of the measured windows.
        self.ms_per_unit: float | None = ms_per_unit
        self._units_measured = False  # True once a judged window replaced the seed
        self.windows = 0
        self.changes = 0
        self._cooldown = 0
        self._fast = 0  # consecutive windows above raise_above
        self._backlog: list[int] = []
        self.reason = "starting: full budget until the first windows are measured"
        start = self.start_budget()
        if start != initial:
            self.initial = self.budget = start
            self.reason = self._start_reason(initial, start)
        self.keeping_up = True
        self.history: list[dict] = []  # the last 64 windows: rtf, backlog, budget, decision

    # --- the decision ---------------------------------------------------------------------------------------------
    def lookahead(self, budget: Budget) -> int:
        overlap = self.window - budget.stride
        if budget.lookahead is not None:
            return max(0, min(budget.lookahead, overlap))
        return overlap if self.cfg.lookahead is None else max(0, min(self.cfg.lookahead, overlap))

    def start_budget(self) -> Budget:
        """The first budget, before any window ran.

        Seeded with the warm-up's cost (`ms_per_unit`): the best-quality budget within the latency target that is
        predicted to reach `target_rtf`, so the first windows already keep up (a session that starts on a budget it
        cannot sustain builds a backlog in its first seconds, and the playout delay learns that backlog). Not seeded:
        the initial budget, without its lookahead when only that meets the latency target even with windows costing
        their playback time (rtf 1), so the first frame comes 4 frames sooner."""
        b = self.initial
        if not self.cfg.enabled:
            return b
        if self.ms_per_unit is not None:
            allowed = self._allowed()
            fast = [c for c in allowed if self.predicted_rtf(c) >= self.cfg.target_rtf]
            return fast[0] if fast else allowed[-1]
        if self.cfg.latency_target_ms is None or self.lookahead(b) == 0:
            return b
        if self.predicted_latency_ms(b, assume_rtf=1.0) <= self.cfg.latency_target_ms:
            return b
        return replace(b, lookahead=0)

    def _start_reason(self, initial: Budget, start: Budget) -> str:
        if self.ms_per_unit is not None:  # seeded
            return (f"starting at {self._describe(start)}: predicted real-time factor {self.predicted_rtf(start):.2f}"
                    f" and latency {self.predicted_latency_ms(start):.0f} ms from the warm-up timings "
                    f"({self.ms_per_unit:.1f} ms per unit)")
        return (f"starting without lookahead: predicted latency "
                f"{self.predicted_latency_ms(replace(initial, lookahead=None), assume_rtf=1.0):.0f} ms with it is "
                f"over the {self.cfg.latency_target_ms:.0f} ms target")

    def predicted_rtf(self, budget: Budget) -> float:
        if self.ms_per_unit is None:
            return math.inf
        return (4 * budget.stride / self.fps) / (self.ms_per_unit * budget.units() / 1e3)

    def predicted_latency_ms(self, budget: Budget, assume_rtf: float | None = None) -> float:
        """Input wait of the first frame of an emitted chunk + the window's compute + one frame of playout.
        Unmeasured compute counts 0, or the playback time of the window / `assume_rtf` when given."""
        wait = (4 * (budget.stride + self.lookahead(budget)) - 1) / self.fps
        if self.ms_per_unit is not None:
            compute = self.ms_per_unit * budget.units() / 1e3
        else:
            compute = 0.0 if assume_rtf is None else 4 * budget.stride / self.fps / assume_rtf
        return 1e3 * (wait + compute + 1 / self.fps)

    def _allowed(self, headroom: float = 1.0) -> list[Budget]:
        """Budgets predicted within `headroom` x the latency target (all without a target)."""
        target = self.cfg.latency_target_ms
        if target is None:
            return self.ladder
        fits = [b for b in self.ladder if self.predicted_latency_ms(b) <= headroom * target]
        return fits or [min(self.ladder, key=self.predicted_latency_ms)]

    def observe(self, window_s: float, frames: int, backlog_frames: int = 0) -> Budget | None:
        """Record one window (wall seconds, video frames it produced, backlog after it); returns the new Budget
        when the controller changes it (apply it from the next window on), else None."""
        budget = self.budget
        new = self._decide(window_s, frames, backlog_frames)
        self.history = (self.history + [{"window": self.windows, "rtf": round(self.last_rtf, 3),
                                         "backlog_frames": backlog_frames, "budget": asdict(budget),
                                         "changed_to": None if new is None else asdict(new)}])[-64:]
        return new

    def _decide(self, window_s: float, frames: int, backlog_frames: int) -> Budget | None:
        self.windows += 1
        rtf = (frames / self.fps) / max(window_s, 1e-9)
        self.last_rtf = rtf
        warming = self.windows <= self.cfg.warmup_windows
        if not warming:  # a warm-up window pays one-off costs: it would skew the averages
            self.rtf = rtf if self.rtf is None else 0.7 * self.rtf + 0.3 * rtf
            per_unit = 1e3 * window_s / self.budget.units()
            # the first measured window replaces the warm-up's seed (a prior, timed without the session's load)
            self.ms_per_unit = 0.7 * self.ms_per_unit + 0.3 * per_unit if self._units_measured else per_unit
            self._units_measured = True
            self._backlog = (self._backlog + [backlog_frames])[-(self.cfg.patience + 1):]
            self.keeping_up = self.rtf >= 1.0
        if not self.cfg.enabled:
            self.reason = "controller off: fixed budget"
            return None
        if warming:
            self.reason = f"window {self.windows}: warming up, not judged"
            return None
        if self._cooldown > 0:
            self._cooldown -= 1
            return None
        self._fast = self._fast + 1 if self.rtf > self.cfg.raise_above else 0
        inherent = 4 * (self.budget.stride + self.lookahead(self.budget)) + 4 * self.budget.stride
        growing = len(self._backlog) > self.cfg.patience and backlog_frames > inherent and \
            all(b2 > b1 for b1, b2 in zip(self._backlog, self._backlog[1:]))
        allowed = self._allowed()
        if self.rtf < self.cfg.cut_below or growing or self.budget not in allowed:
            why = (f"real-time factor {self.rtf:.2f} < {self.cfg.cut_below}" if self.rtf < self.cfg.cut_below else
                   f"backlog growing to {backlog_frames} frames" if growing else
                   f"predicted latency {self.predicted_latency_ms(self.budget):.0f} ms over the "
                   f"{self.cfg.latency_target_ms:.0f} ms target")
            cheaper = [b for b in allowed if b.units() / b.stride <= self.budget.units() / self.budget.stride
                       and b != self.budget]
            good = [b for b in cheaper if self.predicted_rtf(b) >= self.cfg.target_rtf]
            choice = good[0] if good else (cheaper[-1] if cheaper else None)
            if choice is None:
                self.reason = f"{why}, already at the cheapest allowed budget: output repeats frames"
                return None
            return self._change(choice, f"{why}: cut to {self._describe(choice)} (predicted real-time factor "
                                        f"{self.predicted_rtf(choice):.2f})")
        if self._fast >= self.cfg.patience and backlog_frames <= inherent:
            # a raise keeps 10% of the latency target spare, or measurement noise would cut it again at once
            richer = [b for b in self._allowed(0.9) if self._better(b) and self.predicted_rtf(b) >= self.cfg.target_rtf]
            if richer:
                choice = richer[-1]  # the smallest step up
                return self._change(choice, f"real-time factor {self.rtf:.2f} > {self.cfg.raise_above}: raised "
                                            f"to {self._describe(choice)}")
        self.reason = f"holding {self._describe(self.budget)}: real-time factor {self.rtf:.2f}"
        return None

    def _better(self, b: Budget) -> bool:
        """b is a step up from the current budget: above it on a measured-quality ladder, else costlier per frame."""
        if self.cfg.quality:
            return self._rank[b] < self._rank.get(self.budget, len(self.ladder))
        return b.units() / b.stride > self.budget.units() / self.budget.stride

    def _change(self, budget: Budget, reason: str) -> Budget:
        self.budget = budget
        self.reason = reason
        self.changes += 1
        self._cooldown = self.cfg.patience
        self._fast = 0
        self.rtf = None  # measure the new budget afresh
        self._backlog = []
        return budget

    @staticmethod
    def _describe(b: Budget) -> str:
        return f"ALPA K={b.interval}, {b.steps} steps, stride {b.stride}" + \
            (", no lookahead" if b.lookahead == 0 else "")

    def stats(self) -> dict:
        return {"budget": asdict(self.budget), "realtime_factor": None if self.rtf is None else round(self.rtf, 3),
                "last_realtime_factor": None if self.last_rtf is None else round(self.last_rtf, 3),
                "keeping_up": self.keeping_up, "reason": self.reason, "changes": self.changes,
                "windows": self.windows, "latency_target_ms": self.cfg.latency_target_ms,
                "predicted_latency_ms": round(self.predicted_latency_ms(self.budget), 1),
                "ms_per_unit": None if self.ms_per_unit is None else round(self.ms_per_unit, 2),
                "lookahead": self.lookahead(self.budget),
                "enabled": self.cfg.enabled}
