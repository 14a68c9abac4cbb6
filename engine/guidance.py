"""Guidance economy: FlashPortrait's expression guidance at fewer than two DiT passes per step (the live path).

FlashPortrait guides expression with  g = n + c (e - n)  (c = emo_cfg, 4 by default): e is the flow with the
expression branch (NFEB ip_scale 1), n the flow without it (ip_scale 0), so every step costs two passes (one batch
of 2). The guidance difference d = e - n changes slowly: between the steps of a window, and between rolling windows
at the same noise level (a window renders the previous window's frames again, shifted by its stride). So the live
path computes the pair at one expression full pass in `refresh` and, at the others, runs the expression branch
alone (batch 1) and estimates
    g ~ e + (c - 1) d*        (reuse "delta", the default; reuse "flow" keeps n* instead: g ~ n* + c (e - n*))
with d* the stored difference
  * of the same noise level (sigma) from an earlier window, shifted by how far the window moved (in latent frames;
    frames beyond the stored window hold its last frame): a window's emitted frames are its oldest, which the
    previous window rendered at the same noise level one stride further in,
  * else the most recent one (this window's earlier step: the same frames, another noise level).
Refresh is spread evenly: every full pass earns 1/refresh of a pair, and a pass with a whole pair earned spends it
when its noise level is the stalest of the window's levels (refreshed longest ago; else the credit waits for that
level's pass, at most one pair's worth). So windows cost the same and the refreshes rotate over the steps (refresh
2, two full passes per window: one pair and one single pass per window, the pair alternating between the two
steps). A full pass with no usable difference (the first window, a skip-ahead, a new window size) runs the pair.
Predicted (ALPA) steps use the estimate. refresh 1 runs the pair at every full pass: with every step full this is
exactly the pair every step. (With refresh > passes per window, windows alternate between a pair and none.)

    econ = GuidanceEconomy(emo_cfg=4.0, refresh=2)
    pair = econ.wants_pair(step, sigma, frame, full=True)    # frame: global index of the window's first latent
    g = econ.combine(emo_flow, sigma, frame, no_emo if pair else None)      # (1, 16, W, h, w) fp32

`shadow=True` (benches, tests) makes the caller also compute the true pair at estimated passes and report the
relative L2 error of the estimate (`observe_error`): the economy's cost in accuracy, measured on the same inputs.
"""
from __future__ import annotations

import torch

REUSE = ("delta", "flow")


def auto_refresh(preset_name: str, emo_cfg: float, world_size: int = 1) -> int:
    """The default refresh interval: 4 for the 14b preset on one GPU, 1 (the pair at every pass) otherwise.

    Why 4 for 14b: on one H200 an FP8 pair pass costs ~2x a single one (~210 vs ~110 ms at 3 latent frames), and two
    expression passes per window must fit a stride-2 window's 320 ms at 25 fps: refresh 2 costs ~320 ms per window
    (no headroom), refresh 4 ~270 ms (one pair every other window). bench/dit_step.py --live14 measures both costs
    and the error of each against the pair at every pass."""
    if emo_cfg <= 1.0 or world_size > 1:
        return 1
    return 4 if preset_name == "14b" else 1


def shift_into(out: torch.Tensor, src: torch.Tensor, src_frame: int, frame: int) -> bool:
    """out (B, C, W, H, W') = src's latent frames re-indexed from global start `src_frame` to `frame`; frames past
    src's end hold its last one. False (out untouched) when the windows do not overlap or differ in shape."""
    s = frame - src_frame
    W = src.shape[2]
    if src.shape != out.shape or not 0 <= s < W:
        return False
    out[:, :, :W - s].copy_(src[:, :, s:])
    if s:
        out[:, :, W - s:].copy_(src[:, :, W - 1:W].expand(-1, -1, s, -1, -1))
    return True


class GuidanceEconomy:
    """When to compute the no-expression branch of one stream, and the guided flow in between (module docstring).

    emo_cfg c > 1; refresh >= 1 (expression full passes per pair); reuse "delta" | "flow"; shadow: also measure.
    State: one stored difference per noise level, (1, 16, W, h, w) fp32 buffers reused across windows.
    """

    def __init__(self, emo_cfg: float, refresh: int, reuse: str = "delta", shadow: bool = False):
        if refresh < 1:
            raise ValueError(f"The no-expression refresh interval must be >= 1 (got {refresh}): pass --emo-refresh 1 "
                             f"or more.")
        if reuse not in REUSE:
            raise ValueError(f"reuse must be one of {', '.join(REUSE)}, got {reuse!r}.")
        self.emo_cfg, self.refresh, self.reuse, self.shadow = float(emo_cfg), int(refresh), reuse, shadow
        self._store: dict[float, list] = {}  # sigma -> [buffer (d or n), first latent frame]; newest last
        self._refreshed: dict[float, int] = {}  # noise level -> full pass index of its last pair (stalest first)
        self._window_keys: list[float] = []     # noise levels of this window's full passes so far
        self._prev_keys: list[float] = []       # ... and of the previous window's
        self._passes = 0                        # full passes so far
        self._credit = 1.0 - 1.0 / self.refresh  # the first full pass earns a whole pair
        self._scratch: torch.Tensor | None = None
        self._last: tuple[int, int] | None = None  # (step, frame) of the previous call: tells a new window
        self.pairs = 0        # full passes that ran the pair (batch 2)
        self.singles = 0      # full passes of the expression branch alone (batch 1)
        self.estimated = 0    # guided flows that used a stored difference (singles and predicted steps)
        self.errors: list[float] = []  # shadow: relative L2 of estimated vs true guided flow

    @staticmethod
    def _key(sigma: float) -> float:
        return round(float(sigma), 6)

    def _usable(self, key: float, frame: int):
        """The stored entry to estimate from: this noise level's if it overlaps, else the newest that overlaps."""
        entry = self._store.get(key)
        if entry is not None and 0 <= frame - entry[1] < entry[0].shape[2]:
            return entry
        for entry in reversed(self._store.values()):
            if 0 <= frame - entry[1] < entry[0].shape[2]:
                return entry
        return None

    def wants_pair(self, step: int, sigma: float, frame: int, full: bool) -> bool:
        """Call once per step before the pass: True when this step's full pass must compute the pair."""
        if self._last is None or frame != self._last[1] or step <= self._last[0]:
            if self._window_keys:  # a new window
                self._prev_keys, self._window_keys = self._window_keys, []
        self._last = (step, frame)
        if not full:
            return False
        key = self._key(sigma)
        self._window_keys.append(key)
        self._passes += 1
        self._credit += 1.0 / self.refresh
        if self.refresh > 1 and self._usable(key, frame) is not None:
            if self._credit < 1.0 - 1e-9:
                return False
            levels = set(self._prev_keys) | set(self._window_keys)
            stalest = min(self._refreshed.get(k, -1) for k in levels)
            if self._refreshed.get(key, -1) > stalest and self._credit < 2.0 - 1e-9:
                return False  # another level of the window is staler: keep the credit for its pass
        self._credit = max(0.0, self._credit - 1.0)
        self._refreshed[key] = self._passes
        return True

    def combine(self, emo: torch.Tensor, sigma: float, frame: int, no_emo: torch.Tensor | None = None,
                full: bool = True) -> torch.Tensor:
        """Guided flow from the expression flow `emo` (1, 16, W, h, w) and, when the pair ran, `no_emo`."""
        c, key = self.emo_cfg, self._key(sigma)
        if no_emo is not None:
            self.pairs += 1
            entry = self._store.pop(key, None)  # re-inserted last: the newest
            if entry is None or entry[0].shape != emo.shape:
                entry = [torch.empty(emo.shape, dtype=torch.float32, device=emo.device), frame]
            if self.reuse == "delta":
                torch.sub(emo, no_emo, out=entry[0])
            else:
                entry[0].copy_(no_emo)
            entry[1] = frame
            self._store[key] = entry
            return no_emo + c * (emo - no_emo)
        entry = self._usable(key, frame)
        if entry is None:
            raise RuntimeError("The guidance economy has no stored no-expression flow for this window: its first "
                               "full pass must compute the pair (wants_pair).")
        if self._scratch is None or self._scratch.shape != emo.shape:
            self._scratch = torch.empty(emo.shape, dtype=torch.float32, device=emo.device)
        shift_into(self._scratch, entry[0], entry[1], frame)
        self.singles += full
        self.estimated += 1
        if self.reuse == "delta":
            return emo + (c - 1.0) * self._scratch
        return self._scratch + c * (emo - self._scratch)

    def observe_error(self, estimate: torch.Tensor, emo: torch.Tensor, no_emo: torch.Tensor) -> float:
        """Shadow measurement: relative L2 of an estimated guided flow against the true pair's (host sync)."""
        true = no_emo + self.emo_cfg * (emo - no_emo)
        err = (torch.linalg.vector_norm(estimate.float() - true) / torch.linalg.vector_norm(true).clamp_min(1e-30))
        self.errors.append(float(err))
        return self.errors[-1]

    def stats(self) -> dict:
        passes = self.pairs + self.singles
        out = {"emo_refresh": self.refresh, "reuse": self.reuse, "pair_passes": self.pairs,
               "single_passes": self.singles, "estimated": self.estimated,
               "dit_batch_per_full_pass": round((2 * self.pairs + self.singles) / passes, 3) if passes else None}
        if self.errors:
            out["guided_rel_l2_mean"] = sum(self.errors) / len(self.errors)
            out["guided_rel_l2_max"] = max(self.errors)
        return out


@torch.no_grad()
def measure_economy(engine, refresh: int | None = None, windows: int = 6, interval: int = 1, reuse: str = "delta",
                    seed: int = 0, token_corr: float = 0.9) -> dict:
    """The guidance economy against the pair at every pass, on a FlashPortraitEngine's live window (bench, tests).

    One stream of `windows` rolling windows (W = context_size, stride = W - overlap; seeded noise; random
    expression tokens correlated `token_corr` from one latent frame to the next, as a face's expression moves
    little in 4 video frames; 0 = independent every frame, the worst case) is rendered with the live schedule
    three times: the pair at every pass (reference), the economy (`refresh`; timing and final latents), the
    economy with shadow pairs (the true pair computed on the same inputs at every single pass). ALPA interval `interval` (1: every step full). Returns
    guided_rel_l2_mean / max (estimated vs true guided flow), latent_rel_l2_mean / max (each window's emitted
    latent frames vs the reference's), ms_per_step of both (windows after the first) and pass counts.
    Needs an engine built with a refresh > 1 (the batch-1 step)."""
    import time

    from engine.config import ALPAConfig
    from engine.flashportrait import make_schedule_for
    from engine.sampler import Sampler
    from engine.wsws import RollingWSWS

    engine.warm_up()
    if engine.step1 is None:
        raise ValueError("guidance_error needs the guidance economy: build the engine with emo_refresh > 1 and "
                         "emo_cfg > 1.")
    steps = engine.live_steps
    schedule = make_schedule_for(engine.sampler_cfg, steps)
    W, O = engine.window_cfg.context_size, engine.window_cfg.context_overlap
    h, w = engine.latent_hw
    dit = engine.preset.dit
    g = torch.Generator(engine.device).manual_seed(seed)
    T = W + windows * (W - O)
    tokens = torch.randn(1, T, dit.emo_tokens_per_frame, dit.emo_dim, generator=g, device=engine.device)
    for f in range(1, T):  # AR(1) over latent frames, unit variance
        tokens[:, f] = token_corr * tokens[:, f - 1] + (1 - token_corr ** 2) ** 0.5 * tokens[:, f]
    tokens = tokens.to(engine.dtype)
    alpa = ALPAConfig(mode="off" if interval == 1 else "alpa", interval=interval, cache="output")

    def run(guide):
        sampler = Sampler(schedule, generator=torch.Generator(engine.device).manual_seed(seed + 1))
        roller = RollingWSWS(sampler, W, O, (1, 16, h, w), device=engine.device,
                             generator=torch.Generator(engine.device).manual_seed(seed + 2))
        cached = engine.cached_dit(schedule, alpa)

        def denoise(x, i, win, cond):
            return engine.guided_flow(cached, x, i, tokens[:, win.start:win.start + W], key="window",
                                      frame=win.start, guide=guide)

        outs, times = [], []
        for _ in range(windows):
            while not roller.ready():
                roller.push(None)
            engine._sync()
            t0 = time.perf_counter()
            outs.append(roller.run(denoise).float().clone())
            engine._sync()
            times.append(time.perf_counter() - t0)
        later = times[1:] or times
        return outs, 1e3 * sum(later) / (len(later) * steps), cached.full_passes

    with engine.lock:
        ref, ref_ms, ref_full = run(None)
        econ = engine.make_guidance(refresh=refresh, reuse=reuse)
        out, econ_ms, econ_full = run(econ)
        shadow = engine.make_guidance(refresh=refresh, reuse=reuse, shadow=True)
        run(shadow)
    lat = [float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))
           for a, b in zip(out, ref)]
    errors = shadow.errors or [0.0]
    return {"emo_refresh": econ.refresh, "reuse": reuse, "alpa_interval": interval, "windows": windows,
            "token_corr": token_corr,
            "steps": steps, "guided_rel_l2_mean": sum(errors) / len(errors), "guided_rel_l2_max": max(errors),
            "estimated_flows": len(shadow.errors), "latent_rel_l2_mean": sum(lat) / len(lat),
            "latent_rel_l2_max": max(lat), "pair_ms_per_step": ref_ms, "economy_ms_per_step": econ_ms,
            "full_passes": econ_full, "reference_full_passes": ref_full, **econ.stats()}
