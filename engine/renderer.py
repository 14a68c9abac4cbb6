"""The FlashPortrait renderer (one session per peer): driving frames -> expression tokens -> rolling WSWS windows of DiT + ALPA -> decode.

The shared engine (models, conditioning, compiled step) is `engine/flashportrait.py` (FlashPortraitEngine).

`FlashPortraitRenderer` is one session (one peer). Per driving frame j (on the renderer's thread):
  PD-FGC features (554) -> PortraitEncoder tokens (24) ; latent frame i is complete once frame 4i has arrived
  (frame 0 for i = 0) and gets the 97 tokens of `portrait_encoder.latent_token_range(i)` (the global layout).
Windows read them in FlashPortrait's per-window layout (its long-video pipeline and its training encode each
window's own frames): a window over latents [g0, g0 + W) covers video frames 4 g0 .. 4(g0 + W - 1); its first
latent frame carries the 24 tokens of frame 4 g0 (the last frame of latent g0) + 73 zero pads, never 97 real tokens,
and its latents g0 + j, j >= 1, their global 97 tokens (equal to the window-relative slices, the encoder being per
frame). Live: every rolling window (`_window_emo`); offline: every step-major window (`_render_offline`).
Whenever enough latent frames of tokens exist, a rolling WSWS window (engine/wsws.RollingWSWS, W latent frames,
stride S; on the session's window thread and, on CUDA, the engine's own stream, so the next frames' expression
overlaps it) runs every sampler step: the two guidance branches (emotion, and ip_scale 0) as ONE batch of 2, ALPA via
engine/alpa.CachedDiT (full passes run the compiled step), then the window's S final latent frames are decoded by
a streaming decoder (TAEHV by default, the Wan VAE optionally) and handed out.

Frame accounting. Video frame j belongs to latent frame ceil(j / 4): latent 0 is frame 0 alone, latent i >= 1 is
frames 4i-3 .. 4i. Both decoders turn the first latent of a stream into 1 frame and every later latent into 4, so
the frames a window emits are exactly the driving frames of its S latent frames; each output frame carries the pts
of its driving frame, every driving frame that reached process() gets exactly one output frame (unless the lag
cap below skips it, counted), in order, and no
window seam drops or repeats one (the rolling window releases each latent frame once, see engine/wsws.py). Frames
after the last complete window wait for the next window (a live stream never ends; `flush()` renders the tail).

Lookahead. A window [a, a + W) emits [a, a + S) and needs the tokens of [a, a + S + L) (L = `lookahead`, in latent
frames; frames beyond hold the newest tokens). L = W - S (`lookahead=None`) waits for all W frames: the first
emitted frame waits 4W - 1 driving frames. The live default L = 1 waits 4(S + 1) - 1: the next window takes the
first overlap frame entirely from this one (blend weight 0) and it has its own tokens here, so with an overlap of at
most 2 every emitted frame is rendered with its own expression tokens; only the attention context of a window
sees held tokens. L = 0 lags the expression by one latent frame. Offline WSWS always sees every token.

Pacing. A window hands out 4S frames at once; the renderer keeps them in its output queue and `pull()` releases
frame j at (push time of driving frame j) + playout delay, the delay being a robust high percentile of the recent
windows' first-frame waits that forgets a backlog once it is gone (engine/playout.py), so the sinks receive a steady
stream at the input rate; they add no buffer of their own on top.
Start. The controller starts on the best-quality budget the engine's warm-up timings (one DiT call, one decode)
predict to keep up within the latency target, so the first windows do not build a backlog.
Under a `latency_target_ms` the controller may drop the lookahead to 0 (see Lookahead) when the configured one cannot
meet the target. The controller (engine/controller.py) chooses ALPA interval, steps and stride by quality (most full
passes of the expression branch first) among the budgets predicted to keep up within `latency_target_ms`, learning
the DiT and decode costs from every window, with hysteresis (down at once, up slowly, never straight back to a
budget that fell behind); its decision is in `stats()["controller"]`, and `stats()` names what a bench needs:
`full_passes_per_window`, `budget` (interval, steps, stride, lookahead in latent frames), `budget_changes` and
`budget_change_times_s` (seconds from the first driving frame). Budget changes apply at a window boundary; a new
stride or step count starts a new rolling window at the first unreleased latent frame (one unblended seam), a new
ALPA interval needs nothing.

Bounded. The input queue drops its oldest frame when full (ThreadedRenderer; under a latency target it holds what
the target lasts, so an extractor that cannot keep up drops frames rather than adding latency); tokens waiting for
windows are capped at `lag_cap()` latent frames (4W, and under a latency target what the window needs + the frames
whose playback fits in the target): beyond that the stream skips to the newest tokens (a new rolling window, the
skipped driving frames counted in `skipped_behind`), so lag never grows without bound; the output queue is bounded
too. A window that fails (e.g. out of GPU memory) ends this session's rendering, with the error in stats.

Offline (`offline=True`, `flashlive render`): process() only extracts expression features; `flush()` runs
offline step-major WSWS (engine/wsws.wsws_sample) over the whole clip and returns every frame in order.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from typing import Callable

import numpy as np
import torch

from engine.alpa import cache_bytes
from engine.base import ThreadedRenderer
from engine.config import ALPAConfig, ModelPreset, RuntimeConfig, SamplerConfig, WindowConfig, replace
from engine.controller import Budget, BudgetController, ControllerConfig
from engine.flashportrait import (TIME_STRIDE, EngineOptions, FlashPortraitEngine, frames_uint8,
                                  make_schedule_for)
from engine.models.portrait_encoder import (group_latent_tokens, latent_token_range, window_first_frame_tokens,
                                            window_latent_tokens)
from engine.playout import PlayoutDelay
from engine.sampler import Sampler
from engine.wsws import RollingWSWS, plan_windows, wsws_sample

log = logging.getLogger("flashlive.renderer")

LAYER_CACHE_LIMIT = 8 * 2**30  # offline: above this, ALPA caches the DiT output instead of every layer
# Live default: windows of 3 latent frames emitting 1 (4 video frames), 2 frames of overlap blended. DESIGN.md's
# H100 numbers for 1.3b at 512x512: 20 ms per pass over 3 latent frames (the guidance pair batched: at most 2x), so
# 4 distilled steps cost <= 160 ms per 160 ms of video at full budget and about half with ALPA K = 2, which the
# controller picks when needed; with lookahead 1 a frame waits at most 7 driving frames (280 ms) for its tokens,
# so glass-to-glass stays near 0.5 s. (W 4 / S 2 costs ~30% less per frame but waits 11 frames.)
LIVE_WINDOW = WindowConfig(context_size=3, context_overlap=2)
TRACE_WINDOWS = 40  # the first windows of a session, timed one by one in stats()["start_trace"] (the start-up)


class FlashPortraitRenderer(ThreadedRenderer):
    """One FlashPortrait session: push driving frames, pull avatar frames (see the module docstring).

    Arguments mirror flashlive's renderer factory: reference (H, W, 3) uint8 RGB, weights_dir, width, height,
    input_queue, preset, runtime, sampler, window, alpa (config dataclasses). Extra: random_weights,
    latency_target_ms, fps (nominal input rate, for the real-time factor), offline (flashlive render), engine (a
    FlashPortraitEngine to share; default: the process-wide shared one), options (EngineOptions), controller
    (ControllerConfig; `enabled=False` keeps the budget fixed), lookahead, pace (False: pull() hands frames out as
    soon as they are decoded, for tests and benchmarks that measure the engine alone), clock (the time.monotonic
    of push stamps, playout waits and pacing; tests inject a virtual one).
    """

    name = "flashportrait"

    def __init__(self, reference: np.ndarray, weights_dir=None, width: int = 512, height: int = 512,
                 input_queue: int | None = None, *, preset: ModelPreset | str = "tiny",
                 runtime: RuntimeConfig | None = None, sampler: SamplerConfig | None = None,
                 window: WindowConfig | None = None, alpa: ALPAConfig | None = None, random_weights: bool = False,
                 latency_target_ms: float | None = None, fps: float = 25.0, offline: bool = False,
                 engine: FlashPortraitEngine | None = None, options: EngineOptions | None = None,
                 controller: ControllerConfig | None = None, lookahead: int | None = 1, pace: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        window = window or WindowConfig()
        if not offline and window == WindowConfig():
            # WindowConfig's defaults are the paper's offline windows (51 latent frames, overlap 30): seconds of
            # look-ahead. Unless told otherwise, the live engine rolls real-time windows.
            window = LIVE_WINDOW
        if not offline and (sampler is None or sampler == SamplerConfig()):
            # 30 flow-matching steps x 2 guidance passes cannot be real time on any GPU: live defaults to the
            # 4-step distilled schedule (FlashPortrait's fast path; its LoRA is merged when present).
            sampler = replace(sampler or SamplerConfig(), fast=True)
        W = window.context_size
        # Started, the renderer's thread only extracts expression (windows run on their own thread), so its input
        # queue absorbs jitter. Under a latency target it holds no more frames than the target lasts: when the
        # extractor cannot keep up, the oldest frame is dropped (counted in dropped_in) instead of every later frame
        # waiting longer.
        target = controller.latency_target_ms if controller is not None else latency_target_ms
        queue = 8 * W + 16 if target is None or offline else max(4, math.ceil(target * 1e-3 * fps))
        super().__init__(input_queue=max(input_queue or 0, queue), output_queue=max(64, 16 * W))
        alpa = alpa or ALPAConfig()
        if not offline:
            # The live path caches the DiT output only: layer caches would run full passes outside the CUDA graph.
            alpa = replace(alpa, cache="output")
        self.engine = engine or FlashPortraitEngine.shared(reference, weights_dir, width, height, preset=preset,
                                                           runtime=runtime, sampler=sampler, window=window,
                                                           alpa=alpa, random_weights=random_weights,
                                                           options=options)
        self.engine.warm_up()
        eng = self.engine
        self.offline, self.fps, self.pace, self.clock = offline, float(fps), pace, clock
        self.W = eng.window_cfg.context_size
        self.alpa = alpa
        self.extractor = eng.make_extractor()
        self.decoder = eng.make_decoder()
        self.reference = eng.reference
        steps0 = eng.live_steps
        k_max = 1 if alpa.mode == "off" else max(1, alpa.interval)
        stride0 = eng.window_cfg.stride
        ctl = controller or ControllerConfig(latency_target_ms=latency_target_ms, max_interval=k_max,
                                             lookahead=lookahead, quality=eng.quality)
        if controller is None and offline:
            ctl.enabled = False
        if ctl.lookahead is None and lookahead is not None:
            ctl = replace(ctl, lookahead=lookahead)  # the controller predicts latency with the same lookahead
        self.lookahead = lookahead
        initial = Budget(interval=1 if ctl.enabled or alpa.mode == "off" else k_max, steps=steps0, stride=stride0)
        costs = None
        if ctl.enabled and not offline:  # the warm-up's timings: one guided DiT call, one latent frame's decode
            t = eng.measured_costs()
            costs = (1e3 * t["pass_s"], 1e3 * t["decode_latent_s"])
        self.controller = BudgetController(initial, self.W, self.fps, ctl, costs=costs, clock=clock)
        self._budget = self.controller.budget  # predicted from the warm-up timings to keep up from the start
        self._gen = torch.Generator(eng.device).manual_seed(eng.options.seed + 2)
        # stream state
        self._feats: list[np.ndarray] = []          # PD-FGC rows of frames not yet turned into tokens
        self._frame_index = 0                        # driving frames processed
        self._last_frame_tokens: torch.Tensor | None = None  # (24, C): the previous latent's last frame
        self._tokens: dict[int, torch.Tensor] = {}  # global latent index -> (97, C)
        self._have = 0                               # latent frames with tokens
        self._pending: collections.deque = collections.deque()  # (pts, push time) of frames not yet emitted
        self._all_pts: list[float] = []              # offline: every frame's pts
        self._all_feats: list[np.ndarray] = []       # offline: every frame's features
        self._released = 0                           # latent frames released (global)
        self.guide = eng.make_guidance()             # guidance economy state of this stream (None: pair every pass)
        self._new_roller(0)
        self.faces_missed = 0
        self.face_found: bool | None = None
        self.rtf: float | None = None                # real-time factor, moving average over windows
        self.windows = 0
        self.playout = PlayoutDelay(self.fps)         # learns pull()'s delay from the windows' first-frame waits
        self.frames_pulled = 0
        self.t = {"expression_ms": 0.0, "window_ms": 0.0, "dit_ms": 0.0, "decode_ms": 0.0}
        self.last_window_passes = self.last_window_predicted = 0
        self.full_passes = self.predicted_passes = 0  # guided DiT calls (one batch of 2 branches) run / predicted
        self.closed = False
        self.max_lag_latents = 4 * self.W  # beyond this backlog of tokens the stream skips ahead (bounded lag)
        self.skipped_behind = 0
        self._t_first: float | None = None           # push time of the first driving frame
        self._window_failed = False
        self.start_trace: list[dict] = []            # the first TRACE_WINDOWS windows (see _trace_window)
        self._latent_at: dict[int, float] = {}       # clock() when latent i's tokens existed (first windows only)
        self.start_expression_ms: list[float] = []   # expression time of the first 4 TRACE_WINDOWS driving frames
        self._window_thread: threading.Thread | None = None
        self._window_cv = threading.Condition()
        self._stop_windows = False
        eng.sessions += 1

    # --- budget / rolling window ---------------------------------------------------------------------------------
    def _new_roller(self, base: int) -> None:
        """A rolling window (and its sampler and ALPA cache) for the current budget, starting at latent `base`."""
        b, eng = self._budget, self.engine
        schedule = make_schedule_for(eng.sampler_cfg, b.steps)
        self.sampler = Sampler(schedule, generator=self._gen)
        h, w = eng.latent_hw
        self.roller = RollingWSWS(self.sampler, self.W, self.W - b.stride, (1, 16, h, w), device=eng.device,
                                  generator=self._gen)
        self._base = base
        mode = "off" if b.interval == 1 else self.alpa.mode
        self.cached = eng.cached_dit(schedule, replace(self.alpa, mode=mode, interval=b.interval))
        self._emo_window = -1
        self._emo = None

    def _apply_budget(self, new: Budget) -> None:
        old, self._budget = self._budget, new
        self.playout.reset()  # a window's first frame will wait differently (input wait, compute): learn it afresh
        if (new.steps, new.stride) != (old.steps, old.stride):
            self._new_roller(self._released)  # the held overlap is re-rendered by the new window: exactly once
        else:
            schedule = self.sampler.schedule
            mode = "off" if new.interval == 1 else self.alpa.mode
            self.cached = self.engine.cached_dit(schedule, replace(self.alpa, mode=mode, interval=new.interval))

    def _lookahead(self) -> int:
        return self.controller.lookahead(self._budget)  # the configured lookahead, or 0 when the budget says so

    def _window_ready(self) -> bool:
        start = self._base + self.roller.window_start
        return self._have >= start + self._budget.stride + self._lookahead()

    def _window_emo(self, win) -> torch.Tensor:
        """(1, W, 97, C) tokens of the window [g0, g0 + W) (global latent frames) in FlashPortrait's per-window
        layout: latent g0 carries the 24 tokens of the window's first video frame 4 g0 + 73 zero pads, latents
        g0 + j (j >= 1) their 97 tokens (equal to a re-encoding of the window's own frames, see
        engine/models/portrait_encoder.py); frames without tokens yet hold the newest. Built once per window into
        one buffer (the previous window's passes have finished when the next one starts)."""
        if win.index != self._emo_window:
            g0 = self._base + win.start
            newest = self._have - 1
            first = self._tokens[min(g0, newest)]
            if self._emo is None or self._emo.shape[1:] != (self.W, *first.shape):
                self._emo = first.new_empty((1, self.W, *first.shape))
            emo, per = self._emo[0], self.engine.preset.portrait.tokens_per_frame
            emo[0, :per].copy_(window_first_frame_tokens(first, min(g0, newest), per))
            emo[0, per:].zero_()
            for j in range(1, self.W):
                emo[j].copy_(self._tokens[min(g0 + j, newest)])
            self._emo_window = win.index
        return self._emo

    def _denoise(self, x, i, win, cond):
        return self.engine.guided_flow(self.cached, x, i, self._window_emo(win), key="window",
                                       frame=self._base + win.start, guide=self.guide)

    def lag_cap(self) -> int:
        """Latent frames of tokens that may wait for windows before the stream skips ahead: `max_lag_latents`, and
        under a latency target no more than the window needs (stride + lookahead) + the latent frames whose playback
        fits in the target (at least one): a backlog beyond that is latency over the target on every later frame."""
        cap = self.max_lag_latents
        target = self.controller.cfg.latency_target_ms
        if target is not None:
            spare = max(1, int(target * 1e-3 * self.fps / TIME_STRIDE))
            cap = min(cap, self._budget.stride + self._lookahead() + spare)
        return cap

    def _catch_up(self) -> None:
        """Bound the lag: when more than `lag_cap()` latent frames of tokens wait, skip to the newest ones (a new
        rolling window there; the skipped driving frames are counted in `skipped_behind`, never rendered)."""
        start = self._base + self.roller.window_start
        if self._released == 0 or self._have - start <= self.lag_cap():
            return
        new_base = self._have - self._budget.stride - self._lookahead()
        # driving frames of latents [released, new_base): latent i >= 1 is frames 4i-3..4i
        skip = TIME_STRIDE * (new_base - self._released)
        for _ in range(skip):
            self._pending.popleft()
        self.skipped_behind += skip
        self._released = new_base
        self._new_roller(new_base)

    def _run_window(self) -> list:
        eng = self.engine
        self._catch_up()
        while not self.roller.ready():
            self.roller.push(None)  # conditioning lives in self._tokens, by global latent index
        c0 = self.clock()
        tracing = len(self.start_trace) < TRACE_WINDOWS
        if tracing:
            needed = self._base + self.roller.window_start + self._budget.stride + self._lookahead() - 1
            pairs0 = self.guide.pairs if self.guide is not None else 0
        t0 = time.perf_counter()
        full0, pred0 = self.cached.full_passes, self.cached.predicted_passes
        # On CUDA the window runs on the engine's own stream: the expression thread's small kernels (FanEncoder,
        # PortraitEncoder on the default stream) and their host syncs do not queue behind a window's DiT passes.
        on_stream = torch.cuda.stream(eng.stream) if eng.stream is not None else contextlib.nullcontext()
        with on_stream, torch.no_grad():
            with eng.lock:
                latents = self.roller.run(self._denoise)                               # (1, 16, S, h, w)
                if eng.stream is not None:
                    eng.stream.synchronize()
            t1 = time.perf_counter()
            frames = frames_uint8(self.decoder.decode(latents.to(eng.dtype)))      # (4S, H, W, 3) on the host
            t2 = time.perf_counter()
            self.last_window_passes = self.cached.full_passes - full0
            self.last_window_predicted = self.cached.predicted_passes - pred0
            self.full_passes += self.last_window_passes  # totals over budget changes (each has its own CachedDiT)
            self.predicted_passes += self.last_window_predicted
            self._released += latents.shape[2]
            self.windows += 1
            # forget tokens no later window reads (the stream is idle: their memory may be reused)
            first_needed = self._base + self.roller.window_start
            for g in [g for g in list(self._tokens) if g < first_needed - 1]:
                del self._tokens[g]
            out = []
            for frame in frames:
                pts, stamp = self._pending.popleft()
                out.append(((frame, pts), stamp))
            self._ema("dit_ms", 1e3 * (t1 - t0))
            self._ema("decode_ms", 1e3 * (t2 - t1))
            self._ema("window_ms", 1e3 * (t2 - t0))
            if out:
                self.playout.observe(self.clock() - out[0][1])  # the chunk's first frame waited longest
            if tracing:
                self._trace_window(c0, needed, t1 - t0, t2 - t1, out, pairs0)
            rtf = (len(out) / self.fps) / max(t2 - t0, 1e-9)
            self.rtf = rtf if self.rtf is None else 0.8 * self.rtf + 0.2 * rtf
            # the frames just made are not queued yet: they count in the backlog (not pulled)
            new = self.controller.observe(t2 - t0, len(out), self.backlog_frames() + len(out), decode_s=t2 - t1)
            if new is not None:
                self._apply_budget(new)
        return out

    def _trace_window(self, c0: float, needed: int, dit_s: float, decode_s: float, out: list, pairs0: int) -> None:
        """One row of `start_trace`, in ms from the session's first driving frame: when the window's last needed
        tokens existed, its start and end, DiT / decode time, passes, pairs, first frame's wait, delay after, backlog."""
        first, now = (self._t_first if self._t_first is not None else c0), self.clock()
        ms = lambda t: None if t is None else round(1e3 * (t - first), 1)  # noqa: E731
        self.start_trace.append({
            "window": self.windows - 1, "ready_ms": ms(self._latent_at.get(needed)), "start_ms": ms(c0),
            "end_ms": ms(now), "dit_ms": round(1e3 * dit_s, 1), "decode_ms": round(1e3 * decode_s, 1),
            "full": self.last_window_passes, "predicted": self.last_window_predicted,
            "pairs": (self.guide.pairs - pairs0) if self.guide is not None else None, "frames": len(out),
            "wait_ms": round(1e3 * (now - out[0][1]), 1) if out else None,
            "delay_ms": round(1e3 * self.playout.delay, 1), "backlog": self.backlog_frames()})
        self._latent_at = {i: t for i, t in self._latent_at.items() if i > needed}

    def _ema(self, key: str, value: float) -> None:
        self.t[key] = value if self.t[key] == 0 else 0.8 * self.t[key] + 0.2 * value

    # --- per frame -------------------------------------------------------------------------------------------------
    def push(self, frame: np.ndarray, pts: float) -> None:
        super().push(frame, (pts, self.clock()))

    def process(self, frame: np.ndarray, pts) -> list:
        """One driving frame -> the avatar frames that became final, as (frame (H, W, 3) uint8, pts) pairs.

        Started (`start()`), windows run on the renderer's window thread and their frames reach `pull()` directly,
        so this returns [] and the next driving frame's expression overlaps the window's GPU work. Called directly
        (not started), the windows run here and their frames are returned."""
        pts, stamp = pts if isinstance(pts, tuple) else (pts, self.clock())
        if self._t_first is None:
            self._t_first = stamp  # budget change times count from the session's first driving frame
        if self._window_failed:
            return []  # nothing would render it: keep no state
        t0 = time.perf_counter()
        result = self.extractor.push(frame)
        self.faces_missed += not result.face_found
        self.face_found = result.face_found
        self._ema("expression_ms", 1e3 * (time.perf_counter() - t0))
        if len(self.start_expression_ms) < 4 * TRACE_WINDOWS:
            self.start_expression_ms.append(round(1e3 * (time.perf_counter() - t0), 1))
        if self.offline:
            self._all_feats.append(result.features)
            self._all_pts.append(pts)
            return []
        self._feats.append(result.features)
        self._pending.append((pts, stamp))
        j = self._frame_index
        self._frame_index += 1
        if j % TIME_STRIDE == 0:  # frame 4i completes latent i
            self._add_latent(j // TIME_STRIDE)
        if self._window_thread is not None:
            with self._window_cv:
                self._window_cv.notify()
            return []
        out = []
        while self._window_ready():
            out.extend(frame_pts for frame_pts, _ in self._run_window())
        return out

    def _window_loop(self) -> None:
        """The window thread: run a window whenever enough latent frames of tokens exist."""
        while True:
            with self._window_cv:
                while not self._stop_windows and not self._window_ready():
                    self._window_cv.wait(0.5)
                if self._stop_windows:
                    return
            try:
                outputs = self._run_window()
            except Exception as err:  # e.g. CUDA out of memory: this session stops rendering, the server goes on
                self.error = f"{type(err).__name__}: {err}"
                self._window_failed = True
                log.exception("flashportrait window failed; the session shows its last frame from now on")
                return
            for (frame, pts), stamp in outputs:
                if len(self._out) == self._out.maxlen:
                    self.dropped_out += 1
                self._out.append((frame, pts, stamp))
                self.frames_out += 1

    def start(self) -> "FlashPortraitRenderer":
        if not self.offline and self._window_thread is None:
            self._window_thread = threading.Thread(target=self._window_loop, name="renderer-flashportrait-windows",
                                                   daemon=True)
            self._window_thread.start()
        super().start()
        return self

    @torch.no_grad()
    def _add_latent(self, i: int) -> None:
        """Tokens of latent i from the features of its frames (frame 0 for i = 0, frames 4i-3..4i otherwise)."""
        eng = self.engine
        feats = torch.from_numpy(np.stack(self._feats)).to(eng.device, eng.dtype)[None]     # (1, n, 554)
        self._feats = []
        tok = eng.portrait(feats)[0]  # (24 n, C); no engine lock: it may overlap another session's window
        per = eng.preset.portrait.tokens_per_frame
        if i == 0:
            lat = torch.cat([tok[:per], tok.new_zeros(eng.preset.dit.emo_tokens_per_frame - per, tok.shape[1])])
        else:
            lat = torch.cat([self._last_frame_tokens[-1:], tok])                               # (97, C)
            start, end = latent_token_range(i, per, TIME_STRIDE)
            assert lat.shape[0] == end - start
        self._last_frame_tokens = tok[-per:]
        if eng.stream is not None:  # the window thread reads these on the engine's stream: finish them first
            torch.cuda.current_stream(eng.device).synchronize()
        self._tokens[i] = lat
        self._have = i + 1
        if len(self.start_trace) < TRACE_WINDOWS:
            self._latent_at[i] = self.clock()

    def rehearse(self, windows: int | None = None) -> int:
        """Run `windows` live windows (default 2 x the guidance refresh, at least 4: a pair, single passes and
        predictions) on the reference portrait as the driving video, here and now, unpaced; returns the windows run.
        For the warm start (engine/build.warm_start says why), on a session that is closed afterwards."""
        if self._window_thread is not None or self.offline:
            raise RuntimeError("rehearse() runs windows on the caller's thread: call it on a live session that was "
                               "not started, before closing it.")
        refresh = self.engine.emo_refresh if self.guide is not None else 1
        windows = max(4, 2 * refresh) if windows is None else windows
        frame = self.reference
        for j in range(TIME_STRIDE * (windows + self.W + 2) + 1):  # bounded: a window needs stride + lookahead
            if self.windows >= windows:
                break
            self.process(frame, j / self.fps)
        return self.windows

    # --- output ----------------------------------------------------------------------------------------------------
    def _emit(self, outputs) -> None:
        # process() returns frames only when called directly (not started); nothing for the base thread to queue
        now = self.clock()
        for frame, pts in outputs:
            self._out.append((frame, pts, now))
            self.frames_out += 1

    def pull(self):
        """The next avatar frame once it is due (push time of its driving frame + playout delay), else None."""
        try:
            frame, pts, stamp = self._out[0]
        except IndexError:
            return None
        if self.pace and self.clock() < stamp + self.playout.delay:
            return None
        self._out.popleft()
        self.frames_pulled += 1
        return frame, pts

    def backlog_frames(self) -> int:
        """Driving frames received whose avatar frame has not been pulled yet (input queue + waiting + decoded)."""
        return len(self._in) + len(self._pending) + len(self._out)

    def flush(self) -> list:
        """Offline: render the whole clip with step-major WSWS. Live: nothing (a stream's tail waits)."""
        if not self.offline or not self._all_feats:
            return []
        return self._render_offline()

    @torch.no_grad()
    def _render_offline(self) -> list:
        eng = self.engine
        n = len(self._all_feats)
        T = math.ceil((n - 1) / TIME_STRIDE) + 1                  # latent frames covering n driving frames
        padded = self._all_feats + [self._all_feats[-1]] * (TIME_STRIDE * (T - 1) + 1 - n)
        feats = torch.from_numpy(np.stack(padded)).to(eng.device, eng.dtype)[None]
        emo = group_latent_tokens(eng.portrait(feats))[0]                                # (T, 97, C)
        # each window's tokens in FlashPortrait's per-window layout (its first latent: its first frame's 24 tokens +
        # 73 zero pads), written into one buffer: the windows run one after the other on the engine's stream
        win_emo = emo.new_empty((1, min(self.W, T), *emo.shape[1:]))
        per = eng.preset.portrait.tokens_per_frame
        steps = eng.live_steps
        schedule = make_schedule_for(eng.sampler_cfg, steps)
        sampler = Sampler(schedule, generator=self._gen)
        h, w = eng.latent_hw
        alpa = self.alpa
        if alpa.mode in ("alpa", "taylorseer") and alpa.cache == "layers":
            # step-major WSWS keeps one trajectory per window alive: layer caches can outgrow the device
            tokens = min(self.W, T) * (h // 2) * (w // 2)
            need = cache_bytes(eng.preset.dit, tokens, alpa.order, "layers", batch=eng.batch, branches=1) * \
                len(plan_windows(T, self.W, eng.window_cfg.context_overlap))
            if need > LAYER_CACHE_LIMIT:
                alpa = replace(alpa, cache="output")
                eng.notes.append(f"offline ALPA layer caches would take {need / 2**30:.1f} GiB: cached the DiT "
                                 f"output only")
        cached = eng.cached_dit(schedule, alpa)
        noise = torch.randn((1, 16, T, h, w), generator=self._gen, device=eng.device)

        def denoise(x, i, win, cond):
            window_latent_tokens(cond, win.start, per, out=win_emo[0])
            return eng.guided_flow(cached, x, i, win_emo, key=win.index)

        t0 = time.perf_counter()
        with eng.lock:
            latents = wsws_sample(noise, sampler, denoise, self.W, eng.window_cfg.context_overlap, cond=emo)
        t1 = time.perf_counter()
        video = self.decoder.decode(latents.to(eng.dtype))
        frames = frames_uint8(video)[:n]
        self._ema("dit_ms", 1e3 * (t1 - t0))
        self._ema("decode_ms", 1e3 * (time.perf_counter() - t1))
        self.last_window_passes = self.full_passes = cached.full_passes
        self.last_window_predicted = self.predicted_passes = cached.predicted_passes
        out = list(zip(frames, self._all_pts))
        self._all_feats, self._all_pts = [], []
        return out

    # --- lifecycle / stats -------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._window_cv:
            self._stop_windows = True
            self._window_cv.notify_all()
        if self._window_thread is not None:
            self._window_thread.join(timeout=30)
            self._window_thread = None
        super().close()
        if self.closed:
            return
        self.closed = True
        self.engine.sessions -= 1
        close = getattr(self.extractor.landmarks, "close", None)
        if close is not None:
            close()
        # free the session state: rolling latents, stores, ALPA caches, decoder memory, tokens, queued frames
        self.roller = self.cached = self.sampler = self.decoder = self._emo = None
        self._tokens.clear()
        self._feats, self._all_feats = [], []
        self._pending.clear()
        self._out.clear()
        self._in.clear()

    def session_state_bytes(self) -> int:
        """Bytes of tensors this session holds on the engine's device (0 after close())."""
        tensors = list(self._tokens.values())
        if self.roller is not None:
            tensors += [self.roller.x, self.roller._store, self.roller._prev]
        if self.cached is not None:
            return sum(t.numel() * t.element_size() for t in tensors) + self.cached.cache_nbytes()
        return sum(t.numel() * t.element_size() for t in tensors)

    def stats(self) -> dict:
        out = super().stats()
        b = self._budget
        out.update({
            "window_ms": round(self.t["window_ms"], 2), "dit_ms": round(self.t["dit_ms"], 2),
            "decode_ms": round(self.t["decode_ms"], 2), "expression_ms": round(self.t["expression_ms"], 2),
            "steps": b.steps, "stride": b.stride, "window": self.W, "alpa_interval": b.interval,
            "passes": self.last_window_passes, "predicted": self.last_window_predicted,
            "alpa_full_passes": self.full_passes, "alpa_predicted_passes": self.predicted_passes,
            "windows": self.windows,
            "realtime_factor": None if self.rtf is None else round(self.rtf, 3),
            "backlog_frames": self.backlog_frames(), "skipped_behind": self.skipped_behind,
            "playout_delay_ms": round(1e3 * self.playout.delay, 1), "playout_settled": self.playout.settled,
            "face_found": self.face_found, "faces_missed": self.faces_missed,
            # for benches (bench/stream_latency.py): the controller's budget and how often it changed
            "full_passes_per_window": b.full_passes(), "budget_changes": self.controller.changes,
            "budget_change_times_s": [round(c["t"] - (self._t_first or c["t"]), 3)
                                      for c in self.controller.change_log],
            "budget": {"interval": b.interval, "steps": b.steps, "stride": b.stride,
                       "lookahead": self._lookahead()},
            "controller": self.controller.stats(), **self.engine.stats(),
            "guidance": None if self.guide is None else self.guide.stats(),
            "start_trace": list(self.start_trace), "start_expression_ms": list(self.start_expression_ms)})
        return out
