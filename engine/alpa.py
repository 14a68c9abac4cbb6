"""ALPA (Adaptive Latent Prediction Acceleration): skip most DiT passes by extrapolating cached features.

The paper's predictor. A full DiT pass runs every K steps; the K - 1 steps between are predicted from finite
differences of the features f(., l) of the last n + 1 full passes (step index s increasing during sampling,
anchor s0 = the last full pass, k = s - s0):

    D1 f = f(s0) - f(s0 - K),  D2 f = D1 f(s0) - D1 f(s0 - K), ...        (Di f ~ K^i f^(i))
    f(s0 + k, l) = f(s0, l) + sum_{i=1..n} Di f(s0, l) * k^i / (i! K^i * w(l, i) * s(s0))

(the paper writes it with t decreasing, hence its (-k)^i). Two factors make it adaptive:
    s(t) = (rate(t) / mean rate)^alpha, the latent change-rate factor: fast motion -> shorter extrapolation;
    w(l, i) = 1 / sqrt(r(l, i)),  r(l, i) = E|f^(i)(l)| / E|f^(i)(avg over layers)|, the cross-layer weight.
With s = w = 1 it is TaylorSeer (mode "taylorseer").

Implementation. The cache of one trajectory keeps, per feature, the Newton divided-difference table of its last
n + 1 full passes, dd[i] = f[x0, ..., xi] (x0 the newest step), so nodes may be spaced unevenly (warm-up) and
the update is in place. A prediction is f(s) = sum_i dd[i] * P_i(s) * (1 / (w s) for i >= 1) with
    expansion "newton" (default): P_i(s) = prod_{j<i} (s - x_j), Newton's interpolation through the cached
        nodes: exact for any feature trajectory that is a polynomial of degree <= n in the step index;
    expansion "taylor": P_i(s) = (s - x0)^i, the paper's / TaylorSeer's literal Taylor form (on equally spaced
        nodes i! dd[i] = Di f / K^i, so this is exactly the formula above); exact only up to degree 1.
Warm-up: the prediction order is min(n, full passes so far - 1), so the first n + 1 full passes (every K steps
from step 0, or `warmup` consecutive full steps first) are the warm-up before a full order-n prediction.

Choices the paper leaves open (options of `ALPAOptions`, defaults first):
    feature   "residual": f(l) = block output - block input; a predicted step recomputes the cheap patch
              embedding of the current latent and adds the predicted residuals of every block, then runs the head
              with the current timestep. "output": f(l) = the block output; the last block's prediction feeds the
              head (all layers are still cached: the cross-layer weight needs them).
    cache     "layers" (ALPAConfig.cache): features of every block, memory layers x (n+1) x tokens x dim.
              "output": only the final DiT output (the flow, tokens x 16 x 4 values), no head, no patch
              embedding, w = 1 (one "layer"): about dim * layers / 64 times lighter (720x for 1.3B).
    rate      "latent": rate(t) = ||x_t - x_prev|| / ||x_prev||, the measured relative change of the latent since
              the previous step; "sigma": the schedule's noise-level step sigma_prev - sigma_t (known in
              advance). The mean is the running mean over the steps so far; s = 1 at step 0.
    s_at      "anchor": s(s0) at the last full pass, as in the formula; "current": s at the predicted step.
    w_reference "mean_norm": E|f^(i)(avg over layers)| read as the mean over layers of E|f^(i)(l)|;
              "norm_mean": the mean absolute value of the layer-averaged derivative. E|.| = mean |.|.
    branches  every cache key (guidance branch "emo" / "no_emo", and the caller's window) has its own cache:
              the branches' features follow different trajectories, and mixing them breaks the differences.
Baselines: mode "taylorseer" (s = w = 1), "teacache" (full pass when the accumulated relative L1 change of
block 0's modulated input reaches the threshold, else the last full pass's residual of the block stack is added
to the current patch embedding; optional polynomial rescaling coefficients, none by default since the published
ones were fitted on real weights), "off" (always full).

Memory: `cache_bytes(...)` = layers x (n + 1) x tokens x dim x bytes per branch (x batch), or
(n + 1) x tokens x out_dim * prod(patch) x bytes for cache="output"; `CachedDiT.cache_nbytes()` is the live total.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from engine.config import ALPAConfig, DiTConfig
from engine.sampler import Branch, Schedule, guided_flow
from kernels.fused import layer_norm_modulate

MODES = ("off", "alpa", "taylorseer", "teacache")
S_MIN = 1e-3


def cache_bytes(dit: DiTConfig, tokens: int, order: int, cache: str = "layers", bytes_per_element: int = 4,
                branches: int = 2, batch: int = 1) -> int:
    """Bytes of ALPA feature caches: layers x (n+1) x tokens x dim x bytes (or the output-only variant), per
    branch and batch element, summed."""
    if cache == "layers":
        per = dit.num_layers * (order + 1) * tokens * dit.dim
    elif cache == "output":
        per = (order + 1) * tokens * dit.out_dim * math.prod(dit.patch_size)
    else:
        raise ValueError(f"cache must be 'layers' or 'output', got {cache!r}.")
    return per * bytes_per_element * branches * batch


class DifferenceTable:
    """Newton divided differences of the last n + 1 full passes of L same-shaped features.

        table.begin(step)                      # a full pass at `step`
        for l, f in enumerate(features): table.update(l, f)
        table.add_prediction_(out, l, table.coefficients(step), scale)   # out += prediction of feature l
    Storage: (L, n + 1, *feature_shape) in `dtype`, allocated at the first full pass.
    """

    def __init__(self, num_features: int, order: int, expansion: str = "newton", dtype: torch.dtype = torch.float32):
        if expansion not in ("newton", "taylor"):
            raise ValueError(f"expansion must be 'newton' or 'taylor', got {expansion!r}.")
        self.L, self.n, self.expansion, self.dtype = num_features, order, expansion, dtype
        self.nodes: list[int] = []  # step indices of the cached full passes, newest first
        self.dd: torch.Tensor | None = None
        self._old_nodes: list[int] = []
        self._a = self._b = None

    @property
    def available_order(self) -> int:
        return min(self.n, len(self.nodes) - 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the table itself (what `cache_bytes` counts); two feature-sized scratch buffers come on top."""
        return 0 if self.dd is None else self.dd.numel() * self.dd.element_size()

    def clear(self) -> None:
        """Forget every cached pass but keep the storage (a new trajectory of the same shape)."""
        self.nodes, self._old_nodes = [], []

    def begin(self, step: int) -> None:
        self._old_nodes = self.nodes
        self.nodes = [step] + self.nodes[: self.n]

    def update(self, l: int, f: torch.Tensor) -> None:
        """Insert feature l of the full pass announced by begin(); f any shape, same for every call."""
        if self.dd is None or self.dd.shape[2:] != f.shape or self.dd.device != f.device:
            self.dd = torch.zeros((self.L, self.n + 1, *f.shape), dtype=self.dtype, device=f.device)
            self._a = torch.empty(f.shape, dtype=self.dtype, device=f.device)
            self._b = torch.empty_like(self._a)
        dd, a, b = self.dd[l], self._a, self._b
        x0, old = self.nodes[0], self._old_nodes
        a.copy_(f)
        m = min(self.n, len(old))
        for i in range(1, m + 1):
            torch.sub(a, dd[i - 1], out=b).div_(x0 - old[i - 1])  # f[x0..xi] = (f[x0..x(i-1)] - f[x1..xi]) / (x0 - xi)
            dd[i - 1].copy_(a)
            a, b = b, a
        dd[m].copy_(a)

    def coefficients(self, step: int) -> list[float]:
        """P_0..P_m at `step` (P_0 = 1): Newton products or Taylor powers around the newest node."""
        m, x = self.available_order, self.nodes
        if self.expansion == "newton":
            return [math.prod(step - x[j] for j in range(i)) for i in range(m + 1)]
        return [float(step - x[0]) ** i for i in range(m + 1)]

    def add_prediction_(self, out: torch.Tensor, l: int, P: Sequence[float],
                        scale: torch.Tensor | None = None) -> torch.Tensor:
        """out += dd_l[0] + sum_{i=1..m} P[i] * scale[i-1] * dd_l[i]; P from coefficients() (host floats),
        scale (m,) on out's device or None (= 1). No host-to-device copy, so a predicted step never syncs."""
        dd = self.dd[l]
        out.add_(dd[0])
        for i in range(1, self.available_order + 1):
            if scale is None:
                out.add_(dd[i], alpha=P[i])
            else:
                out.addcmul_(dd[i], scale[i - 1], value=P[i])
        return out

    def derivative_norms(self) -> torch.Tensor:
        """(L, m) mean |f^(i)(l)| estimates, i = 1..m (f^(i) ~ i! dd[i])."""
        m = self.available_order
        norms = self.dd[:, 1:m + 1].abs().mean(dim=tuple(range(2, self.dd.dim())))
        for i in range(1, m + 1):  # host scalars, so the full pass stays free of host-to-device copies
            norms[:, i - 1].mul_(math.factorial(i))
        return norms

    def mean_derivative_norm(self) -> torch.Tensor:
        """(m,) mean |f^(i) averaged over layers| (the 'norm_mean' reference)."""
        m = self.available_order
        norms = self.dd[:, 1:m + 1].mean(dim=0).abs().flatten(1).mean(dim=1)  # (m,)
        for i in range(1, m + 1):
            norms[i - 1].mul_(math.factorial(i))
        return norms


def layer_sqrt_r(norms: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """sqrt(r) = 1 / w for per-layer derivative norms (L, m): r = norms / reference, the reference defaulting to
    the mean over layers ('mean_norm'). Returned as sqrt(r) so a zero derivative gives weight 0, not 1/0."""
    ref = norms.mean(dim=0) if reference is None else reference
    return (norms / ref.clamp_min(torch.finfo(norms.dtype).tiny)).sqrt()


class ChangeRate:
    """Latent change-rate factor s = (rate / running mean rate)^alpha, updated once per step.

    update(x, sigma_prev, sigma) -> s (0-dim tensor, or 1.0 before a rate exists); x (any shape) the latent
    entering the step, sigma_prev / sigma the noise levels of the previous and the current step (None at step 0).
    measure "latent": rate = ||x - x_prev|| / ||x_prev|| (x the latent entering the step); "sigma": rate =
    sigma_prev - sigma. Everything stays on the device: no host sync.
    """

    def __init__(self, alpha: float, measure: str = "latent"):
        if measure not in ("latent", "sigma"):
            raise ValueError(f"rate must be 'latent' or 'sigma', got {measure!r}.")
        self.alpha, self.measure = alpha, measure
        self._prev: torch.Tensor | None = None
        self._sum = None
        self._count = 0
        self.s: torch.Tensor | float = 1.0
        self.rate: torch.Tensor | float | None = None

    def update(self, x: torch.Tensor | None = None, sigma_prev: float | None = None, sigma: float | None = None):
        if self.measure == "latent":
            if self._prev is None:
                self._prev = x.detach().float().clone()
                return self.s
            rate = torch.linalg.vector_norm(x.float() - self._prev) / torch.linalg.vector_norm(self._prev)
            self._prev.copy_(x)
        else:
            if sigma_prev is None:
                return self.s
            rate = torch.tensor(sigma_prev - sigma, dtype=torch.float64)
        self._sum = rate if self._sum is None else self._sum + rate
        self._count += 1
        self.rate = rate
        # a latent that stopped changing would give s = 0 and an infinite step: floor s at S_MIN
        self.s = ((rate / (self._sum / self._count)) ** self.alpha).clamp_min(S_MIN)
        return self.s


@dataclass
class ALPAOptions:
    """The choices ALPA's paper leaves open (see the module docstring), beyond ALPAConfig's fields."""

    feature: str = "residual"  # residual | output
    rate: str = "latent"  # latent | sigma
    s_at: str = "anchor"  # anchor | current
    w_reference: str = "mean_norm"  # mean_norm | norm_mean
    expansion: str = "newton"  # newton | taylor
    warmup: int = 1  # consecutive full steps at the start (>= 1); later full steps every K after the last of them
    final_full: bool = False  # force a full pass at the last step
    cache_dtype: torch.dtype = torch.float32
    teacache_coefficients: Sequence[float] | None = None  # polynomial rescaling of TeaCache's rel-L1, highest first


@dataclass
class _Trajectory:
    """Cache state of one key (guidance branch x window)."""

    last_step: int = -1
    table: DifferenceTable | None = None
    rate: ChangeRate | None = None
    s_anchor: torch.Tensor | float = 1.0
    sqrt_r: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    # TeaCache
    prev_mod: torch.Tensor | None = None
    acc: float = 0.0
    residual: torch.Tensor | None = None
    full_passes: int = 0
    predicted: int = 0
    history: list = field(default_factory=list)  # 'F' / 'P' per step


class CachedDiT:
    """A WanModel that runs full passes only on some steps and predicts the others (ALPA and baselines).

        cached = CachedDiT(model, schedule, ALPAConfig(mode="alpa", interval=5, order=3))
        ctx_img, ctx_txt = model.embed_context(context, clip_fea)               # once
        flow = cached(x, i, ctx_img, ctx_txt, y, emo, ip_scale=1.0, key="emo")  # step i of the schedule
    x (B, 16, F, H, W) latent entering step i, y (B, 20, F, H, W), emo (B, F, 97, emo_dim) or None;
    returns the flow (B, 16, F, H, W) in fp32, like WanModel.forward. `key` names the cache (a guidance branch,
    optionally with a window id). A key whose step does not increase starts a new trajectory (its cache is
    cleared), so a rolling window can reuse the key for its next window; offline step-major WSWS keeps one
    trajectory per (window, branch) alive, so its cache memory is windows x branches x `cache_bytes`.
    `kv` (optional) is `model.context_kv(ctx_img, ctx_txt)`, computed once per session. `guided(...)` runs and
    combines the guidance branches of a step. Full passes run exactly WanModel.forward's arithmetic, so
    interval 1 (or mode "off") reproduces full compute bit for bit.
    """

    def __init__(self, model, schedule: Schedule, cfg: ALPAConfig | None = None, options: ALPAOptions | None = None):
        self.model = model
        self.cfg = cfg or ALPAConfig()
        self.opt = options or ALPAOptions()
        if self.cfg.mode not in MODES:
            raise ValueError(f"ALPA mode must be one of {', '.join(MODES)}, got {self.cfg.mode!r}.")
        if self.cfg.interval < 1 or self.cfg.order < 0 or self.opt.warmup < 1:
            raise ValueError("ALPA needs interval >= 1, order >= 0 and warmup >= 1.")
        if self.cfg.cache not in ("layers", "output"):
            raise ValueError(f"ALPA cache must be 'layers' or 'output', got {self.cfg.cache!r}.")
        for name, allowed in (("feature", ("residual", "output")), ("rate", ("latent", "sigma")),
                              ("s_at", ("anchor", "current")), ("w_reference", ("mean_norm", "norm_mean")),
                              ("expansion", ("newton", "taylor"))):
            if getattr(self.opt, name) not in allowed:
                raise ValueError(f"ALPA option {name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self.opt, name)!r}.")
        self.schedule = schedule
        self._sigmas = schedule.sigma_list
        self._t: torch.Tensor | None = None
        self._kv = None
        self._state: dict = {}
        self._done_full = self._done_predicted = 0  # passes of trajectories already replaced

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    def reset(self, key=None) -> None:
        """Forget the caches of one key, or of all keys."""
        if key is None:
            self._state.clear()
            self._done_full = self._done_predicted = 0
        else:
            self._retire(self._state.pop(key, None))

    def _retire(self, st) -> None:
        if st is not None:  # keep its pass counts for the statistics
            self._done_full += st.full_passes
            self._done_predicted += st.predicted

    def is_full_step(self, step: int) -> bool:
        """Schedule of full passes for alpa / taylorseer (teacache decides from its accumulator)."""
        if self.cfg.mode == "off" or self.cfg.interval == 1:
            return True
        w = self.opt.warmup
        if step < w or (step - (w - 1)) % self.cfg.interval == 0:
            return True
        return self.opt.final_full and step == len(self.schedule) - 1

    @property
    def full_passes(self) -> int:
        """Full DiT passes since construction or the last reset() of all keys (every key, every window)."""
        return self._done_full + sum(s.full_passes for s in self._state.values())

    @property
    def predicted_passes(self) -> int:
        return self._done_predicted + sum(s.predicted for s in self._state.values())

    def cache_nbytes(self) -> int:
        total = 0
        for s in self._state.values():
            if s.table is not None:
                total += s.table.nbytes
            if s.residual is not None:
                total += s.residual.numel() * s.residual.element_size()
        return total

    def stats(self) -> dict:
        return {"mode": self.cfg.mode, "full_passes": self.full_passes, "predicted_passes": self.predicted_passes,
                "cache_bytes": self.cache_nbytes()}

    def _trajectory(self, key, step: int) -> _Trajectory:
        st = self._state.get(key)
        if st is None or step <= st.last_step:
            self._retire(st)
            new = self._state[key] = _Trajectory()
            if st is not None:  # a new window of a stream: reuse the big buffers, drop their contents
                new.table, new.residual = st.table, st.residual
                if new.table is not None:
                    new.table.clear()
            st = new
        st.last_step = step
        return st

    def _timestep(self, step: int, batch: int, device) -> torch.Tensor:
        if self._t is None or self._t.device != torch.device(device):
            self._t = self.schedule.timesteps.to(device)
        return self._t[step].expand(batch)

    # --- the call --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x, step: int, ctx_img, ctx_txt, y, emo=None, ip_scale: float = 1.0, key="emo", kv=None):
        """Flow (B, 16, F, H, W) fp32 for step `step`; `kv` optional per-block context K/V (WanModel.context_kv)."""
        st = self._trajectory(key, step)
        mode = self.cfg.mode
        self._kv = kv
        if mode == "teacache":
            return self._teacache(st, x, step, ctx_img, ctx_txt, y, emo, ip_scale)
        if mode == "alpa":
            if st.rate is None:
                st.rate = ChangeRate(self.cfg.alpha, self.opt.rate)
            st.rate.update(x, self._sigmas[step - 1] if step else None, self._sigmas[step])
        if self.is_full_step(step) or st.table is None:
            st.history.append("F")
            st.full_passes += 1
            return self._full(st, x, step, ctx_img, ctx_txt, y, emo, ip_scale, record=mode in ("alpa", "taylorseer"))
        st.history.append("P")
        st.predicted += 1
        return self._predict(st, x, step, y)

    def guided(self, x, step: int, ctx_img, ctx_txt, y, emo=None, emo_cfg: float = 4.0, ip_scale: float = 1.0,
               window=None, kv=None, text_cfg: float = 1.0, neg_ctx=None, neg_kv=None):
        """Guided flow of one step (B, 16, F, H, W): one call per guidance branch (emo, and no_emo with ip_scale 0
        when emo_cfg > 1; no_text with `neg_ctx` = (ctx_img, ctx_txt) of the negative prompt when text_cfg != 1),
        combined as in `engine.sampler.combine_guidance`. Each branch caches under key (window, branch name), or
        the branch name when `window` is None (a rolling window: the key restarts with each window's step 0)."""

        def branch_flow(b: Branch) -> torch.Tensor:
            key = b.name if window is None else (window, b.name)
            if b.negative_prompt:
                return self(x, step, *neg_ctx, y, emo, ip_scale=b.ip_scale, key=key, kv=neg_kv)
            return self(x, step, ctx_img, ctx_txt, y, emo, ip_scale=b.ip_scale, key=key, kv=kv)

        return guided_flow(branch_flow, emo_cfg, text_cfg, ip_scale)

    def _block(self, l, block, h, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale):
        if self._kv is None:
            return block(h, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale)
        return block(h, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale, kv=self._kv[l])

    def _full(self, st: _Trajectory, x, step, ctx_img, ctx_txt, y, emo, ip_scale, record: bool):
        m = self.model
        tokens, grid = m.patchify(x, y)
        cos, sin = m.rope(grid, tokens.device)
        e, e0 = m.embed_time(self._timestep(step, x.shape[0], x.device))
        if emo is not None:
            emo = emo.to(tokens.dtype)
        layers = record and self.cfg.cache == "layers"
        table = None
        if record:
            if st.table is None:
                n_feat = len(m.blocks) if layers else 1
                st.table = DifferenceTable(n_feat, self.cfg.order, self.opt.expansion, self.opt.cache_dtype)
            table = st.table
            table.begin(step)
        h = tokens
        for l, block in enumerate(m.blocks):
            h_new = self._block(l, block, h, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale)
            if layers:
                table.update(l, h_new.float() - h.float() if self.opt.feature == "residual" else h_new)
            h = h_new
        flow = m.unpatchify(m.head(h, e).float(), grid)
        if record and not layers:
            table.update(0, flow)
        if record and self.cfg.mode == "alpa":
            st.s_anchor = st.rate.s
            st.scale = None
            if table.available_order > 0 and table.L > 1:
                ref = table.mean_derivative_norm() if self.opt.w_reference == "norm_mean" else None
                st.sqrt_r = layer_sqrt_r(table.derivative_norms(), ref)
            else:
                st.sqrt_r = None
        return flow

    def _scale(self, st: _Trajectory) -> torch.Tensor | None:
        """(L, m) factors 1 / (w(l, i) s) = sqrt(r(l, i)) / s of the order >= 1 terms (mode alpa), else None."""
        table = st.table
        m = table.available_order
        if self.cfg.mode != "alpa" or m == 0:
            return None
        if self.opt.s_at == "anchor" and st.scale is not None:
            return st.scale  # fixed between full passes
        s = st.rate.s if self.opt.s_at == "current" else st.s_anchor
        dev = table.dd.device
        base = st.sqrt_r if st.sqrt_r is not None else torch.ones((table.L, m), dtype=table.dtype, device=dev)
        if isinstance(s, torch.Tensor):
            s = s.to(device=dev, dtype=table.dtype) if s.device == dev else s.to(table.dtype)  # 0-dim CPU is fine
        st.scale = base / s
        return st.scale

    def _predict(self, st: _Trajectory, x, step, y):
        m, table = self.model, st.table
        P = table.coefficients(step)
        scale = self._scale(st)
        if self.cfg.cache == "output":
            out = torch.zeros(table.dd.shape[2:], dtype=table.dtype, device=table.dd.device)
            return table.add_prediction_(out, 0, P, None if scale is None else scale[0]).float()
        tokens, grid = m.patchify(x, y)
        e, _ = m.embed_time(self._timestep(step, x.shape[0], x.device))
        if self.opt.feature == "residual":
            h = tokens.to(table.dtype)
            for l in range(table.L):
                table.add_prediction_(h, l, P, None if scale is None else scale[l])
        else:
            h = torch.zeros(table.dd.shape[2:], dtype=table.dtype, device=table.dd.device)
            table.add_prediction_(h, table.L - 1, P, None if scale is None else scale[-1])
        return m.unpatchify(m.head(h.to(tokens.dtype), e).float(), grid)

    def _teacache(self, st: _Trajectory, x, step, ctx_img, ctx_txt, y, emo, ip_scale):
        m = self.model
        tokens, grid = m.patchify(x, y)
        e, e0 = m.embed_time(self._timestep(step, x.shape[0], x.device))
        b0 = m.blocks[0]
        shift, scale = (b0.modulation.float() + e0).chunk(6, dim=1)[:2]
        mod = layer_norm_modulate(tokens, shift, scale, b0.eps).float()
        full = st.prev_mod is None or st.residual is None or \
            (self.opt.final_full and step == len(self.schedule) - 1)
        if not full:
            rel = ((mod - st.prev_mod).abs().mean() / st.prev_mod.abs().mean()).item()  # TeaCache decides on host
            if self.opt.teacache_coefficients is not None:
                rel = float(sum(c * rel ** p for p, c in enumerate(reversed(self.opt.teacache_coefficients))))
            st.acc += rel
            full = st.acc >= self.cfg.teacache_threshold
        if st.prev_mod is None:
            st.prev_mod = mod.clone()
        else:
            st.prev_mod.copy_(mod)
        if full:
            st.acc = 0.0
            st.full_passes += 1
            st.history.append("F")
            cos, sin = m.rope(grid, tokens.device)
            if emo is not None:
                emo = emo.to(tokens.dtype)
            h = tokens
            for l, block in enumerate(m.blocks):
                h = self._block(l, block, h, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale)
            if st.residual is None or st.residual.shape != h.shape:
                st.residual = torch.empty(h.shape, dtype=self.opt.cache_dtype, device=h.device)
            torch.sub(h.float(), tokens.float(), out=st.residual)
        else:
            st.predicted += 1
            st.history.append("P")
            h = (tokens.to(st.residual.dtype) + st.residual).to(tokens.dtype)
        return m.unpatchify(m.head(h, e).float(), grid)
