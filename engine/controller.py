"""The adaptive budget controller: keep the rolling FlashPortrait engine ahead of playback, at the best quality that
keeps up within the latency target, without oscillating.

    ctl = BudgetController(Budget(interval=1, steps=4, stride=2), window=6, fps=25.0,
                           cfg=ControllerConfig(latency_target_ms=800), costs=(296.0, 8.0))  # seed: warm-up timing
    new = ctl.observe(window_s=0.21, frames=8, backlog_frames=14, decode_s=0.01)   # once per rolling window
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
Budgets that compute the same thing at the same cost are one budget: with 2 steps every K >= 2 runs step 0 in full
and predicts step 1, so only the lowest such K is on the ladder (equal-cost twins let a cut "change" the budget
without saving anything, which is how 31 changes in 20 s happened on the 14B preset).

Quality order (best first; `Budget.quality_key`), the order the ladder is sorted in:
  1. more full DiT passes per window: every full pass computes the expression branch (and its guidance) instead of
     extrapolating it, so the expression follows the driving face more closely;
  2. more sampler steps: at equal full passes a larger ALPA interval comes before fewer steps (the distilled
     4-step schedule with ALPA K = 2 before 2 plain steps);
  3. a lower ALPA interval (shorter extrapolation spans at equal passes and steps);
  4. a smaller stride: within what the latency target allows, a larger stride only adds input wait (4 frames per
     latent frame) and leaves fewer frames to blend at the seams, so it is the last lever;
  5. the configured lookahead before none (L = 0 lags a window's last frame by one latent frame).
Under a latency target, stride is spent for quality within the target (2 full passes at stride 2 before 1 at
stride 1: the target bounds what it adds). Without one nothing bounds the input wait, so the stride comes first:
it grows only when no budget at a smaller stride keeps up.
A measured table (`ControllerConfig.quality`, e.g. from `load_quality_table("bench/results/speed_quality_mini.json")`,
issue 15's trained mini) replaces criteria 1-3: budgets it rates come first, by their measured error, and those it
lacks follow in the documented order.

Cost model: a window costs pass_ms x (full passes + 0.1 predicted steps) + decode_ms x S. Both are seeded from the
engine's warm-up (one guided DiT call at the window shape, one latent frame's decode: `costs`; or one `ms_per_unit`
with the decode at a quarter of a pass), then learnt from the measured windows (DiT and decode time separately when
the renderer passes `decode_s`; else both scaled by measured / predicted). It predicts every budget's rtf and
latency (input wait + the window's compute + one frame) from them.

Decisions (hysteresis: down at once, up slowly, never back to what just failed):
  * start: the best-quality budget within 95% of the latency target predicted to reach `target_rtf` (else the one
    predicted fastest), so the first seconds run in real time instead of building a backlog a later cut must drain;
  * cut, at once: when the measured rtf (moving average) is below `cut_below`, the backlog keeps growing, or the
    predicted latency is over the target: to the best-quality budget within 95% of the target predicted to reach
    `target_rtf`, cheaper per frame than the current one (for a latency cut: any); if none reaches it, the fastest;
  * raise, slowly: after `patience` windows on a budget (cool-down), when the rtf has stayed at or above
    `raise_above` for `patience` more windows with a small backlog: to the nearest better quality class (criteria
    1-3) that has a budget predicted to reach `target_rtf` (at the costliest of the recent windows' pass and decode
    costs) within 90% of the latency target, its best such budget;
  * memory: a budget that fell behind (or over the latency target) is not chosen again for `retry_after_s`
    seconds of stream (the playback time of the windows since), doubling with every failure: a raise that fails costs two changes once, not a change every few windows. (No
    early retry when the measured pass cost drops: with the guidance economy or ALPA the pass cost a budget sees
    depends on the budget, so a drop measured on a cheaper budget says little about the one that failed.)
  * the first window after a change is not judged (a new rolling window may pay one-off costs).
When no budget within the limits keeps up, it stays on the fastest and says so; its reason also says why a budget
with more full passes was not chosen (predicted rtf and latency against the limits). No queue grows because of the
controller: the renderer's input queue is bounded (oldest frame dropped), its lag is capped (it skips ahead past its
`lag_cap()`, counted) and, when even the cheapest budget cannot keep up, the sinks repeat the last frame (counted by
the tracks) and the stats say so.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

PREDICTED_PASS = 0.1  # a predicted (ALPA) step, in full passes
DECODE_PASS = 0.25  # decoding one latent frame (4 video frames), in full passes, until measured


@dataclass(frozen=True)
class Budget:
    """What one rolling window spends: ALPA interval K, sampler steps, stride S (latent frames emitted)."""

    interval: int
    steps: int
    stride: int
    lookahead: int | None = None  # None: the configured lookahead (ControllerConfig.lookahead); 0: no lookahead

    def full_steps(self) -> tuple[int, ...]:
        """Steps that run the DiT (ALPA's schedule with one warm-up step: steps 0, K, 2K, ...)."""
        return tuple(i for i in range(self.steps) if self.interval == 1 or i % self.interval == 0)

    def full_passes(self) -> int:
        """Full DiT passes per window, each with the expression branch."""
        return len(self.full_steps())

    def predicted_passes(self) -> int:
        return self.steps - self.full_passes()

    def units(self) -> float:
        """Relative cost of one window in full passes, with the default decode share (see the module docstring)."""
        return self.full_passes() + PREDICTED_PASS * self.predicted_passes() + DECODE_PASS * self.stride

    def quality_key(self) -> tuple:
        """Sorts best quality first (see the module docstring)."""
        return (-self.full_passes(), -self.steps, self.interval, self.stride, self.lookahead == 0)


QualityTable = dict  # (interval, steps, stride or None) -> measured error, lower is better


def load_quality_table(path) -> QualityTable:
    """A measured speed-quality table as the controller's quality order. JSON: a list of rows (or {"rows": [...]})
    with `interval` (or `alpa_interval`), `steps`, optionally `stride`, and either `error` / `expression_error`
    (lower is better) or `quality` (higher is better). A row without a stride rates every stride."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read the quality table {path} ({err}): pass a JSON file of rows with interval, "
                         f"steps and error.") from None
    rows = data.get("rows", data.get("table")) if isinstance(data, dict) else data
    table: QualityTable = {}
    for row in rows or []:
        k = row.get("interval", row.get("alpa_interval"))
        err = row.get("error", row.get("expression_error"))
        if err is None and row.get("quality") is not None:
            err = -float(row["quality"])
        if k is None or row.get("steps") is None or err is None:
            raise ValueError(f"Quality table {path}: the row {row} needs interval, steps and error (or quality).")
        table[(int(k), int(row["steps"]), None if row.get("stride") is None else int(row["stride"]))] = float(err)
    return table


@dataclass
class ControllerConfig:
    """User limits and the controller's thresholds. `latency_target_ms` None: no latency bound on the stride."""

    latency_target_ms: float | None = None
    min_steps: int = 2
    max_interval: int = 3  # largest ALPA K it may choose (1 keeps ALPA off)
    max_stride: int | None = None  # default: window - 1 (at least one frame of overlap for the blend)
    lookahead: int | None = None  # latent frames of real conditioning beyond the emitted ones (default overlap)
    cut_below: float = 1.1  # measured rtf below this -> cut the budget
    target_rtf: float = 1.3  # a cut or a raise aims for this predicted rtf
    raise_above: float = 1.3  # measured rtf at or above this for `patience` windows -> try a better quality class
    patience: int = 3  # windows of cool-down after a change, and of headroom before a raise
    warmup_windows: int = 1  # the first windows pay one-off costs (allocations, kernel selection): not judged
    retry_after_s: float = 8.0  # seconds of stream before a budget that fell behind is chosen again (doubling)
    quality: QualityTable | None = None  # a measured quality table (load_quality_table); None: the documented order
    enabled: bool = True


class BudgetController:
    """Chooses a Budget per rolling window from measured real-time factor and backlog (see the module docstring).

    Seeds (optional): `costs` = (ms of one guided DiT call at the window shape, ms to decode one latent frame), or
    `ms_per_unit` (one number: the decode then costs a quarter of a pass). `clock` times the budget changes."""

    def __init__(self, initial: Budget, window: int, fps: float, cfg: ControllerConfig | None = None,
                 ms_per_unit: float | None = None, costs: tuple[float, float] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg = cfg or ControllerConfig()
        self.window, self.fps, self.clock = window, float(fps), clock
        self.initial = self.budget = self._reference = initial
        self.ladder = self._build_ladder(initial)
        self._rank = {b: i for i, b in enumerate(self.ladder)}
        classes = [self._class_key(b) for b in self.ladder]
        self._class = {b: sorted(set(classes)).index(c) for b, c in zip(self.ladder, classes)}
        self.rtf: float | None = None  # moving average on the current budget
        self.last_rtf: float | None = None
        # cost model: ms per full guided pass and per decoded latent frame (None until seeded or measured)
        self.pass_ms: float | None = None
        self.decode_ms: float | None = None
        if costs is not None:
            self.pass_ms, self.decode_ms = float(costs[0]), float(costs[1])
        elif ms_per_unit is not None:
            self.pass_ms, self.decode_ms = float(ms_per_unit), DECODE_PASS * float(ms_per_unit)
        self._measured = False  # True once a judged window replaced the seed
        self.windows = 0
        self.changes = 0
        self.change_log: list[dict] = []  # the last 64 changes: window, time (clock), budget, reason
        self._cooldown = 0
        self._settle = 0  # windows after a change that are not judged
        self._fast = 0  # consecutive windows above raise_above
        self._backlog: list[int] = []
        self._failed: dict[Budget, dict] = {}  # budget -> failures, barred until (seconds of stream)
        self.stream_s = 0.0  # playback time of the windows observed so far
        self._recent: list[tuple[float, float]] = []  # the last patience + 1 (ms per pass, per latent decoded)
        self.reason = "starting: full budget until the first windows are measured"
        start = self.start_budget()
        if start != initial:
            self.initial = self.budget = start
            self.reason = self._start_reason(initial, start)
        elif self.pass_ms is not None and cfg.enabled:
            self.reason = self._start_reason(initial, start)
        self.keeping_up = True
        self.history: list[dict] = []  # the last 64 windows: rtf, backlog, budget, decision

    # --- the ladder -----------------------------------------------------------------------------------------------
    def _build_ladder(self, initial: Budget) -> list[Budget]:
        cfg = self.cfg
        max_stride = min(cfg.max_stride or self.window - 1, self.window - 1)
        k_max = max(1, cfg.max_interval)
        min_steps = max(1, min(cfg.min_steps, initial.steps))
        strides = range(initial.stride, max(initial.stride, max_stride) + 1)
        # Lookahead 0 is a choice only under a latency target (it trades one latent frame of expression lag on a
        # window's last emitted frame for 4 frames less input wait).
        looks = [initial.lookahead] + ([0] if cfg.latency_target_ms is not None and initial.lookahead != 0 else [])
        budgets = sorted({Budget(k, s, st, la) for k in range(initial.interval, max(initial.interval, k_max) + 1)
                          for s in range(min_steps, initial.steps + 1) for st in strides for la in looks},
                         key=self._sort_key)
        # one budget per computation: equal full-pass schedules, steps, stride and effective lookahead cost the same
        # (the lowest K, first in quality order, stays)
        seen, ladder = set(), []
        for b in budgets:
            what = (b.full_steps(), b.steps, b.stride, self.lookahead(b))
            if what not in seen:
                seen.add(what)
                ladder.append(b)
        return ladder

    def _table_error(self, b: Budget) -> float:
        table = self.cfg.quality
        if not table:
            return 0.0
        err = table.get((b.interval, b.steps, b.stride), table.get((b.interval, b.steps, None)))
        return math.inf if err is None else err

    def _sort_key(self, b: Budget) -> tuple:
        unbounded = b.stride if self.cfg.latency_target_ms is None else 0  # no target: the stride comes first
        return (unbounded, self._table_error(b)) + b.quality_key()

    def _class_key(self, b: Budget) -> tuple:
        """The quality class: the order without stride and lookahead (criteria 1-3, or the table's rating)."""
        return self._sort_key(b)[:5]

    # --- the cost model -------------------------------------------------------------------------------------------
    def cost_ms(self, budget: Budget, costs: tuple[float, float] | None = None) -> float:
        """Predicted ms of one window on `budget`."""
        pass_ms, decode_ms = costs or (self.pass_ms, self.decode_ms)
        if pass_ms is None:
            return math.nan
        full = budget.full_passes()
        return pass_ms * (full + PREDICTED_PASS * (budget.steps - full)) + decode_ms * budget.stride

    @property
    def ms_per_unit(self) -> float | None:
        """The cost model as one number: ms per unit of the budget the controller was created with."""
        if self.pass_ms is None:
            return None
        return self.cost_ms(self._reference) / self._reference.units()

    def predicted_rtf(self, budget: Budget, costs: tuple[float, float] | None = None) -> float:
        """Playback time over predicted compute of one window; `costs` (ms per pass, per latent decoded) instead of
        the learnt ones when given."""
        if self.pass_ms is None:
            return math.inf
        return (4 * budget.stride / self.fps) / (self.cost_ms(budget, costs) / 1e3)

    def lookahead(self, budget: Budget) -> int:
        overlap = self.window - budget.stride
        if budget.lookahead is not None:
            return max(0, min(budget.lookahead, overlap))
        return overlap if self.cfg.lookahead is None else max(0, min(self.cfg.lookahead, overlap))

    def predicted_latency_ms(self, budget: Budget, assume_rtf: float | None = None) -> float:
        """Input wait of the first frame of an emitted chunk + the window's compute + one frame of playout.
        Unmeasured compute counts 0, or the playback time of the window / `assume_rtf` when given."""
        wait = (4 * (budget.stride + self.lookahead(budget)) - 1) / self.fps
        if self.pass_ms is not None:
            compute = self.cost_ms(budget) / 1e3
        else:
            compute = 0.0 if assume_rtf is None else 4 * budget.stride / self.fps / assume_rtf
        return 1e3 * (wait + compute + 1 / self.fps)

    def _allowed(self, headroom: float = 1.0) -> list[Budget]:
        """Budgets predicted within `headroom` x the latency target (all without a target), best quality first."""
        target = self.cfg.latency_target_ms
        if target is None:
            return self.ladder
        fits = [b for b in self.ladder if self.predicted_latency_ms(b) <= headroom * target]
        return fits or [min(self.ladder, key=self.predicted_latency_ms)]

    def _choices(self) -> list[Budget]:
        """Where a start or a cut may go: within 95% of the latency target when any budget is (a budget chosen at
        the edge would be cut again by the next window's noise), else what `_allowed()` gives."""
        spare = self._allowed(0.95)
        return spare if self.cfg.latency_target_ms is None or \
            self.predicted_latency_ms(spare[0]) <= 0.95 * self.cfg.latency_target_ms else self._allowed()

    def _barred(self, b: Budget) -> bool:
        f = self._failed.get(b)
        return f is not None and self.stream_s < f["until"]

    # --- the decision ---------------------------------------------------------------------------------------------
    def start_budget(self) -> Budget:
        """The first budget, before any window ran.

        Seeded with the warm-up's costs: the best-quality budget within the latency target that is predicted to
        reach `target_rtf` (else the fastest), so the first windows already keep up (a session that starts on a
        budget it cannot sustain builds a backlog in its first seconds, and the playout delay learns that backlog).
        Not seeded: the initial budget, without its lookahead when only that meets the latency target even with
        windows costing their playback time (rtf 1), so the first frame comes 4 frames sooner."""
        b = self.initial
        if not self.cfg.enabled:
            return b
        if self.pass_ms is not None:
            allowed = self._choices()
            fast = [c for c in allowed if self.predicted_rtf(c) >= self.cfg.target_rtf]
            return fast[0] if fast else max(allowed, key=self.predicted_rtf)
        if self.cfg.latency_target_ms is None or self.lookahead(b) == 0:
            return b
        if self.predicted_latency_ms(b, assume_rtf=1.0) <= self.cfg.latency_target_ms:
            return b
        return replace(b, lookahead=0)

    def _start_reason(self, initial: Budget, start: Budget) -> str:
        if self.pass_ms is not None:  # seeded
            return (f"starting at {self._describe(start)}: predicted real-time factor {self.predicted_rtf(start):.2f}"
                    f" and latency {self.predicted_latency_ms(start):.0f} ms from the warm-up timings "
                    f"({self.pass_ms:.1f} ms per pass, {self.decode_ms:.1f} ms per latent frame decoded)"
                    + self._limit_note(start))
        return (f"starting without lookahead: predicted latency "
                f"{self.predicted_latency_ms(replace(initial, lookahead=None), assume_rtf=1.0):.0f} ms with it is "
                f"over the {self.cfg.latency_target_ms:.0f} ms target")

    def _limit_note(self, current: Budget) -> str:
        """Why no budget with more full passes runs: the one predicted fastest, against the limits."""
        more = [b for b in self.ladder if b.full_passes() > current.full_passes()]
        if not more or self.pass_ms is None:
            return ""
        b = max(more, key=lambda c: (self.predicted_rtf(c), -self.predicted_latency_ms(c)))
        why = []
        if self.predicted_rtf(b) < self.cfg.target_rtf:
            why.append(f"real-time factor {self.predicted_rtf(b):.2f} (needs {self.cfg.target_rtf})")
        target = self.cfg.latency_target_ms
        if target is not None and self.predicted_latency_ms(b) > target:
            why.append(f"latency {self.predicted_latency_ms(b):.0f} ms (target {target:.0f} ms)")
        if self._barred(b):
            why.append("it fell behind lately")
        if not why:
            return ""
        return (f"; {b.full_passes()} full expression passes per window do not fit: the fastest such budget, "
                f"{self._describe(b)}, is predicted at " + " and ".join(why))

    def observe(self, window_s: float, frames: int, backlog_frames: int = 0,
                decode_s: float | None = None) -> Budget | None:
        """Record one window (wall seconds, video frames it produced, backlog after it, and optionally the seconds
        of it spent decoding); returns the new Budget when the controller changes it (apply it from the next window
        on), else None."""
        budget = self.budget
        new = self._decide(window_s, frames, backlog_frames, decode_s)
        self.history = (self.history + [{"window": self.windows, "rtf": round(self.last_rtf, 3),
                                         "backlog_frames": backlog_frames, "budget": asdict(budget),
                                         "changed_to": None if new is None else asdict(new)}])[-64:]
        return new

    def _learn(self, window_s: float, decode_s: float | None) -> None:
        b = self.budget
        ms = 1e3 * window_s
        full = b.full_passes()
        passes = full + PREDICTED_PASS * (b.steps - full)
        if decode_s is not None and 0.0 <= decode_s <= window_s:
            per_pass, per_decode = (ms - 1e3 * decode_s) / passes, 1e3 * decode_s / b.stride
        elif self.pass_ms is None:
            per_pass = ms / b.units()
            per_decode = DECODE_PASS * per_pass
        else:
            scale = ms / self.cost_ms(b)
            per_pass, per_decode = self.pass_ms * scale, self.decode_ms * scale
        self._recent = (self._recent + [(per_pass, per_decode)])[-(self.cfg.patience + 1):]
        if self._measured:
            self.pass_ms = 0.7 * self.pass_ms + 0.3 * per_pass
            self.decode_ms = 0.7 * self.decode_ms + 0.3 * per_decode
        else:  # the first measured window replaces the warm-up's seed (a prior, timed without the session's load)
            self.pass_ms, self.decode_ms = per_pass, per_decode
            self._measured = True

    def _decide(self, window_s: float, frames: int, backlog_frames: int, decode_s: float | None) -> Budget | None:
        cfg = self.cfg
        self.windows += 1
        self.stream_s += frames / self.fps
        rtf = (frames / self.fps) / max(window_s, 1e-9)
        self.last_rtf = rtf
        warming = self.windows <= cfg.warmup_windows
        settling = self._settle > 0
        if settling:
            self._settle -= 1
        if not warming and not settling:  # one-off costs would skew the averages
            self.rtf = rtf if self.rtf is None else 0.7 * self.rtf + 0.3 * rtf
            self._learn(window_s, decode_s)
            self._backlog = (self._backlog + [backlog_frames])[-(cfg.patience + 1):]
            self.keeping_up = self.rtf >= 1.0
        if not cfg.enabled:
            self.reason = "controller off: fixed budget"
            return None
        if warming:
            self.reason = f"window {self.windows}: warming up, not judged"
            return None
        if settling:
            return None
        if self._cooldown > 0:
            self._cooldown -= 1
        cur = self.budget
        self._fast = self._fast + 1 if self.rtf >= cfg.raise_above else 0
        inherent = 4 * (cur.stride + self.lookahead(cur)) + 4 * cur.stride
        growing = len(self._backlog) > cfg.patience and backlog_frames > inherent and \
            all(b2 > b1 for b1, b2 in zip(self._backlog, self._backlog[1:]))
        allowed = self._allowed()
        late = cur not in allowed
        if self.rtf < cfg.cut_below or growing or late:
            why = (f"real-time factor {self.rtf:.2f} < {cfg.cut_below}" if self.rtf < cfg.cut_below else
                   f"backlog growing to {backlog_frames} frames" if growing else
                   f"predicted latency {self.predicted_latency_ms(cur):.0f} ms over the "
                   f"{cfg.latency_target_ms:.0f} ms target")
            per_frame = self.cost_ms(cur) / cur.stride
            pool = [b for b in self._choices() if b != cur and (late or self.cost_ms(b) / b.stride < per_frame)]
            good = [b for b in pool if self.predicted_rtf(b) >= cfg.target_rtf]
            choice = next((b for b in good if not self._barred(b)), good[0] if good else None)
            if choice is None and pool:
                fastest = max(pool, key=self.predicted_rtf)
                if late or self.predicted_rtf(fastest) > self.predicted_rtf(cur):
                    choice = fastest
            if choice is None:
                self.reason = f"{why}, already at the cheapest allowed budget: output repeats frames" + \
                    self._limit_note(cur)
                return None
            self._fail(cur)
            return self._change(choice, f"{why}: cut to {self._describe(choice)} (predicted real-time factor "
                                        f"{self.predicted_rtf(choice):.2f})" + self._limit_note(choice))
        if self._cooldown == 0 and self._fast >= cfg.patience and backlog_frames <= inherent:
            # a raise keeps 10% of the latency target spare, or measurement noise would cut it again at once
            rank = self._rank.get(cur, len(self.ladder))
            target = cfg.latency_target_ms
            # judged on the costliest recent window, not the average: costs that cycle (the guidance economy's pair
            # pass every few passes) would otherwise raise on a run of cheap windows and fall behind on the next
            worst = max(self._recent)[0], max(d for _, d in self._recent)
            better = [b for b in self.ladder[:rank] if not self._barred(b)
                      and self.predicted_rtf(b, costs=worst) >= cfg.target_rtf
                      and (target is None or self.predicted_latency_ms(b) <= 0.9 * target)]
            if better:
                nearest = max(self._class[b] for b in better)  # the nearest better quality class ...
                choice = min((b for b in better if self._class[b] == nearest), key=self._rank.get)  # ... its best
                return self._change(choice, f"real-time factor {self.rtf:.2f} >= {cfg.raise_above}: raised "
                                            f"to {self._describe(choice)} (predicted real-time factor "
                                            f"{self.predicted_rtf(choice):.2f})")
        self.reason = f"holding {self._describe(cur)}: real-time factor {self.rtf:.2f}" + self._limit_note(cur)
        return None

    def _fail(self, b: Budget) -> None:
        """Remember that `b` fell behind: not chosen again for retry_after_s x 2^(failures - 1) s of stream."""
        f = self._failed.get(b, {"failures": 0})
        f["failures"] += 1
        f["until"] = self.stream_s + self.cfg.retry_after_s * 2 ** (f["failures"] - 1)
        self._failed[b] = f

    def _change(self, budget: Budget, reason: str) -> Budget:
        self.budget = budget
        self.reason = reason
        self.changes += 1
        self.change_log = (self.change_log + [{"window": self.windows, "t": self.clock(), "stream_s": self.stream_s,
                                               "budget": asdict(budget), "reason": reason}])[-64:]
        self._cooldown = self.cfg.patience
        self._settle = 1
        self._fast = 0
        self.rtf = None  # measure the new budget afresh
        self._backlog = []
        self._recent = []
        return budget

    def _describe(self, b: Budget) -> str:
        return f"ALPA K={b.interval}, {b.steps} steps, stride {b.stride}" + \
            (", no lookahead" if b.lookahead == 0 else "") + \
            f" ({b.full_passes()} full pass{'es' if b.full_passes() != 1 else ''} per window)"

    def stats(self) -> dict:
        b = self.budget
        return {"budget": asdict(b), "full_passes_per_window": b.full_passes(),
                "quality_rank": self._rank.get(b), "ladder_size": len(self.ladder),
                "realtime_factor": None if self.rtf is None else round(self.rtf, 3),
                "last_realtime_factor": None if self.last_rtf is None else round(self.last_rtf, 3),
                "keeping_up": self.keeping_up, "reason": self.reason, "changes": self.changes,
                "windows": self.windows, "latency_target_ms": self.cfg.latency_target_ms,
                "predicted_latency_ms": round(self.predicted_latency_ms(b), 1),
                "predicted_realtime_factor": None if self.pass_ms is None else round(self.predicted_rtf(b), 3),
                "ms_per_unit": None if self.ms_per_unit is None else round(self.ms_per_unit, 2),
                "pass_ms": None if self.pass_ms is None else round(self.pass_ms, 2),
                "decode_ms_per_latent": None if self.decode_ms is None else round(self.decode_ms, 2),
                "lookahead": self.lookahead(b),
                "enabled": self.cfg.enabled}
