"""ALPA: exact on polynomial trajectories, s(t) and w by their formulas, K = 1 equals full compute on the tiny DiT."""
from __future__ import annotations

import math

import pytest
import torch

from engine.alpa import (ALPAOptions, CachedDiT, ChangeRate, DifferenceTable, cache_bytes, layer_sqrt_r)
from engine.config import ALPAConfig, get_preset
from engine.models.dit import WanModel
from engine.sampler import Sampler, flow_schedule

F64 = torch.float64


def _poly(coefs, s):
    return sum(c * float(s) ** i for i, c in enumerate(coefs))


def _full_steps(n_steps, K, warmup):
    return [s for s in range(n_steps) if s < warmup or (s - (warmup - 1)) % K == 0]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("K", [2, 3, 5])
@pytest.mark.parametrize("warmup", [1, 2])
def test_newton_prediction_exact_on_polynomials(order, K, warmup):
    """Features that are polynomials of degree <= n in the step index are predicted exactly once n + 1 full
    passes are cached (uneven warm-up spacing included), for every layer."""
    g = torch.Generator().manual_seed(order * 10 + K)
    L, shape = 3, (2, 5)
    for degree in range(order + 1):
        coefs = [torch.randn(L, *shape, generator=g, dtype=F64) for _ in range(degree + 1)]
        table = DifferenceTable(L, order, "newton", F64)
        full = _full_steps(30, K, warmup)
        checked = 0
        for s in range(30):
            f = _poly(coefs, s)
            if s in full:
                table.begin(s)
                for l in range(L):
                    table.update(l, f[l])
                continue
            if len(table.nodes) < order + 1:
                continue  # still warming up
            coef = table.coefficients(s)
            for l in range(L):
                out = torch.zeros(shape, dtype=F64)
                table.add_prediction_(out, l, coef)
                torch.testing.assert_close(out, f[l], rtol=1e-9, atol=1e-9)
                checked += 1
        assert checked > 0


def test_taylor_expansion_is_the_papers_formula():
    """expansion='taylor' on equally spaced full passes equals f(s0) + sum_i D_i f * k^i / (i! K^i) with the
    paper's finite differences D_i, is exact on lines, and not on a quadratic (unlike Newton)."""
    K, n = 3, 3
    g = torch.Generator().manual_seed(0)
    coefs = [torch.randn(4, generator=g, dtype=F64) for _ in range(4)]
    table = DifferenceTable(1, n, "taylor", F64)
    nodes = [0, 3, 6, 9]
    for s in nodes:
        table.begin(s)
        table.update(0, _poly(coefs, s))
    hist = [_poly(coefs, s) for s in nodes]
    D = [hist[-1]]
    diffs = hist
    for i in range(1, n + 1):
        diffs = [b - a for a, b in zip(diffs[:-1], diffs[1:])]
        D.append(diffs[-1])  # D_i f at the newest node
    for k in (1, 2):
        paper = D[0] + sum(D[i] * k ** i / (math.factorial(i) * K ** i) for i in range(1, n + 1))
        out = torch.zeros(4, dtype=F64)
        table.add_prediction_(out, 0, table.coefficients(9 + k))
        torch.testing.assert_close(out, paper, rtol=1e-12, atol=1e-12)
    lin = DifferenceTable(1, n, "taylor", F64)
    quad = DifferenceTable(1, n, "taylor", F64)
    for s in nodes:
        for t, c in ((lin, coefs[:2]), (quad, coefs[:3])):
            t.begin(s)
            t.update(0, _poly(c, s))
    for t, c, exact in ((lin, coefs[:2], True), (quad, coefs[:3], False)):
        out = torch.zeros(4, dtype=F64)
        t.add_prediction_(out, 0, t.coefficients(11))
        err = float((out - _poly(c, 11)).abs().max())
        assert (err < 1e-12) == exact


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_change_rate_factor_formula(alpha):
    """s(t) = (rate(t) / mean rate so far)^alpha with rate = ||x_t - x_prev|| / ||x_prev||."""
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    scales = [1.0, 1.1, 1.3, 1.35, 2.0, 2.1]
    cr = ChangeRate(alpha, "latent")
    assert cr.update(base * scales[0]) == 1.0  # no rate before a second latent
    rates = []
    for a_prev, a in zip(scales[:-1], scales[1:]):
        rates.append(abs(a - a_prev) / abs(a_prev))
        s = cr.update(base * a)
        expect = (rates[-1] / (sum(rates) / len(rates))) ** alpha
        assert abs(float(s) - expect) < 1e-5
    sig = flow_schedule(10, 5.0).sigma_list
    cr = ChangeRate(alpha, "sigma")
    assert cr.update(sigma_prev=None, sigma=sig[0]) == 1.0
    rates = []
    for i in range(1, 10):
        rates.append(sig[i - 1] - sig[i])
        s = cr.update(sigma_prev=sig[i - 1], sigma=sig[i])
        assert abs(float(s) - (rates[-1] / (sum(rates) / len(rates))) ** alpha) < 1e-9


def test_cross_layer_weight_formula():
    """w(l, i) = 1 / sqrt(r), r = E|f^(i)(l)| / E|f^(i)(avg over layers)|, on features f_l(s) = a_l s + b_l s^2."""
    L, shape = 4, (6,)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(L, *shape, generator=g, dtype=F64)
    b = torch.randn(L, *shape, generator=g, dtype=F64)
    table = DifferenceTable(L, 2, "newton", F64)
    for s in (0, 2, 4):
        table.begin(s)
        for l in range(L):
            table.update(l, a[l] * s + b[l] * s * s)
    norms = table.derivative_norms()  # (L, 2): E|f'| at the newest node and E|f''|
    # estimates from divided differences at nodes (4, 2, 0): f[x0, x1] * 1! = a + b (4 + 2); f[x0, x1, x2] * 2! = 2 b
    torch.testing.assert_close(norms[:, 0], (a + 6 * b).abs().mean(dim=1))
    torch.testing.assert_close(norms[:, 1], (2 * b).abs().mean(dim=1))
    sqrt_r = layer_sqrt_r(norms)
    r = norms / norms.mean(dim=0)
    torch.testing.assert_close(1 / sqrt_r, 1 / r.sqrt())  # w = 1/sqrt(r)
    ref = table.mean_derivative_norm()
    torch.testing.assert_close(ref, torch.stack([(a + 6 * b).mean(0).abs().mean(), (2 * b).mean(0).abs().mean()]))
    torch.testing.assert_close(layer_sqrt_r(norms, ref), (norms / ref).sqrt())


def test_cache_bytes_formula():
    dit = get_preset("1.3b").dit
    tokens = 6 * 32 * 32
    assert cache_bytes(dit, tokens, 3, "layers", 2, branches=1) == 30 * 4 * tokens * 1536 * 2
    assert cache_bytes(dit, tokens, 3, "output", 2, branches=1) == 4 * tokens * 64 * 2
    assert cache_bytes(dit, tokens, 3, "layers", 4, branches=2) == 2 * 2 * 30 * 4 * tokens * 1536 * 2


# --- integration with the tiny DiT --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_preset("tiny").dit
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    B, F, H, W = 1, 2, 4, 4
    ctx = model.embed_context(torch.randn(B, 8, cfg.text_dim, generator=g),
                              torch.randn(B, cfg.clip_tokens, cfg.clip_dim, generator=g))
    inp = dict(x=torch.randn(B, 16, F, H, W, generator=g), y=torch.randn(B, 20, F, H, W, generator=g),
               emo=torch.randn(B, F, cfg.emo_tokens_per_frame, cfg.emo_dim, generator=g))
    return model, ctx, inp


def _sample(model, ctx, inp, schedule, cached=None, emo_cfg=4.0):
    """Guided Euler sampling; `cached` None means plain WanModel.forward (the reference)."""
    sampler = Sampler(schedule)
    x = inp["x"].clone()
    for i in range(len(sampler)):
        preds = {}
        for name, ip in (("emo", 1.0), ("no_emo", 0.0)):
            if cached is None:
                with torch.no_grad():
                    tokens, grid = model.patchify(x, inp["y"])
                    cos, sin = model.rope(grid)
                    e, e0 = model.embed_time(sampler.timestep(i, x.shape[0]))
                    out = model.forward_tokens(tokens, e, e0, cos, sin, *ctx, inp["emo"], ip)
                    preds[name] = model.unpatchify(out.float(), grid)
            else:
                preds[name] = cached(x, i, *ctx, inp["y"], inp["emo"], ip_scale=ip, key=name)
        v = preds["no_emo"] + emo_cfg * (preds["emo"] - preds["no_emo"])
        x = sampler.step(i, x, v)
    return x


@pytest.mark.parametrize("mode,cache", [("alpa", "layers"), ("alpa", "output"), ("taylorseer", "layers"),
                                        ("off", "layers")])
def test_interval_one_reproduces_full_compute(tiny, mode, cache):
    model, ctx, inp = tiny
    sch = flow_schedule(4, 5.0)
    ref = _sample(model, ctx, inp, sch)
    cached = CachedDiT(model, sch, ALPAConfig(mode=mode, interval=1, order=3, cache=cache))
    out = _sample(model, ctx, inp, sch, cached)
    assert torch.equal(out, ref)
    assert cached.full_passes == 2 * 4 and cached.predicted_passes == 0


def test_guided_combines_branches_with_separate_keys(tiny):
    model, ctx, inp = tiny
    sch = flow_schedule(4, 5.0)
    cached = CachedDiT(model, sch, ALPAConfig(mode="taylorseer", interval=2, order=1))
    ref = CachedDiT(model, sch, ALPAConfig(mode="off"))
    x = inp["x"]
    flow = cached.guided(x, 0, *ctx, inp["y"], inp["emo"], emo_cfg=4.0, window=3)
    emo = ref(x, 0, *ctx, inp["y"], inp["emo"], ip_scale=1.0)
    no = ref(x, 0, *ctx, inp["y"], inp["emo"], ip_scale=0.0)
    assert torch.equal(flow, no + 4.0 * (emo - no))
    assert set(cached._state) == {(3, "emo"), (3, "no_emo")}
    single = cached.guided(x, 0, *ctx, inp["y"], inp["emo"], emo_cfg=1.0)
    assert torch.equal(single, emo) and "no_emo" not in cached._state


def test_teacache_zero_threshold_reproduces_full_compute(tiny):
    model, ctx, inp = tiny
    sch = flow_schedule(4, 5.0)
    cached = CachedDiT(model, sch, ALPAConfig(mode="teacache", teacache_threshold=0.0))
    assert torch.equal(_sample(model, ctx, inp, sch, cached), _sample(model, ctx, inp, sch))


def test_full_pass_schedule_and_separate_branch_caches(tiny):
    model, ctx, inp = tiny
    sch = flow_schedule(12, 5.0)
    cached = CachedDiT(model, sch, ALPAConfig(mode="alpa", interval=3, order=2, cache="layers"))
    out = _sample(model, ctx, inp, sch, cached)
    assert torch.isfinite(out).all()
    assert cached._state["emo"].history == list("FPPFPPFPPFPP") == cached._state["no_emo"].history
    assert cached.full_passes == 2 * 4 and cached.predicted_passes == 2 * 8
    assert cached._state["emo"].table is not cached._state["no_emo"].table
    tokens = 2 * 2 * 2  # F x (H/2) x (W/2)
    dit = model.cfg
    assert cached.cache_nbytes() == cache_bytes(dit, tokens, 2, "layers", 4, branches=2)
    consec = CachedDiT(model, sch, ALPAConfig(mode="alpa", interval=5, order=3),
                       ALPAOptions(warmup=4, final_full=True))
    assert [s for s in range(12) if consec.is_full_step(s)] == [0, 1, 2, 3, 8, 11]
    # a key whose step goes back starts a new trajectory (a rolling window reusing the key); counts accumulate
    _sample(model, ctx, inp, sch, cached)
    assert cached._state["emo"].history == list("FPPFPPFPPFPP")
    assert cached.full_passes == 2 * 2 * 4
    cached.reset()
    assert cached.full_passes == 0 and not cached._state


def test_order_zero_layer_prediction_equals_teacache_reuse(tiny):
    """With order 0, the residual-feature prediction is h0(current latent) + sum of the last full pass's block
    residuals: the same recomposition TeaCache uses (h0 + (h_L - h_0)), so the two agree to rounding."""
    model, ctx, inp = tiny
    sch = flow_schedule(4, 5.0)
    ts = CachedDiT(model, sch, ALPAConfig(mode="taylorseer", interval=10, order=0, cache="layers"))
    tc = CachedDiT(model, sch, ALPAConfig(mode="teacache", teacache_threshold=1e9))
    x0 = inp["x"]
    for c in (ts, tc):
        c(x0, 0, *ctx, inp["y"], inp["emo"])
    x1 = x0 * 0.9 + 0.1
    a = ts(x1, 1, *ctx, inp["y"], inp["emo"])
    b = tc(x1, 1, *ctx, inp["y"], inp["emo"])
    assert ts._state["emo"].history == ["F", "P"] == tc._state["emo"].history
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    out_cache = CachedDiT(model, sch, ALPAConfig(mode="taylorseer", interval=10, order=0, cache="output"))
    full = out_cache(x0, 0, *ctx, inp["y"], inp["emo"])
    assert torch.equal(out_cache(x1, 1, *ctx, inp["y"], inp["emo"]), full)  # output cache, order 0: reuse


def test_alpa_scales_extrapolation_by_s_and_w(tiny):
    """In mode alpa the order-i terms are divided by w(l, i) * s: with output caching (one layer, w = 1) the
    predicted flow equals the TaylorSeer prediction's extrapolated part divided by s(anchor)."""
    model, ctx, inp = tiny
    sch = flow_schedule(8, 5.0)
    cfg = dict(interval=2, order=1, cache="output")
    al = CachedDiT(model, sch, ALPAConfig(mode="alpa", alpha=1.5, **cfg))
    ts = CachedDiT(model, sch, ALPAConfig(mode="taylorseer", **cfg))
    xs = [inp["x"] * (1 - 0.1 * i) + 0.05 * i * i for i in range(4)]
    outs_a = [al(x, i, *ctx, inp["y"], inp["emo"]) for i, x in enumerate(xs)]
    outs_t = [ts(x, i, *ctx, inp["y"], inp["emo"]) for i, x in enumerate(xs)]
    assert al._state["emo"].history == list("FPFP")
    torch.testing.assert_close(outs_a[2], outs_t[2])  # full passes agree
    s_anchor = float(al._state["emo"].s_anchor)
    rates = [float((xs[i] - xs[i - 1]).norm() / xs[i - 1].norm()) for i in (1, 2)]
    assert abs(s_anchor - (rates[1] / (sum(rates) / 2)) ** 1.5) < 1e-5
    torch.testing.assert_close(outs_a[3] - outs_a[2], (outs_t[3] - outs_t[2]) / s_anchor, rtol=1e-4, atol=1e-5)


def test_rolling_windows_with_alpa(tiny):
    """The pieces compose: RollingWSWS drives CachedDiT.guided; every window restarts the branch caches at its step
    0 (same keys), every latent frame comes out once, and the conditioning reaches the DiT window by window."""
    from engine.wsws import RollingWSWS

    model, ctx, inp = tiny
    cfg = model.cfg
    sch = flow_schedule(4, 5.0)
    size, overlap, n_frames = 3, 1, 7  # windows [0, 3), [2, 5), [4, 7)
    cached = CachedDiT(model, sch, ALPAConfig(mode="alpa", interval=2, order=1))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(n_frames, cfg.emo_tokens_per_frame, cfg.emo_dim, generator=g)
    y = inp["y"][:, :, :1].expand(-1, -1, size, -1, -1)  # one window-sized y reused by every window
    seen = []

    def denoise(x, i, win, cond):
        seen.append((win.start, i))
        return cached.guided(x, i, *ctx, y, cond[None], emo_cfg=4.0)

    roll = RollingWSWS(Sampler(sch), size, overlap, (1, 16, 4, 4), generator=torch.Generator().manual_seed(0))
    outs, ptrs = [], set()
    for f in range(n_frames):
        roll.push(tokens[f])
        while roll.ready():
            outs.append(roll.run(denoise))
            assert cached._state["emo"].history == list("FPFP")  # the window's own trajectory
            ptrs.add(cached._state["emo"].table.dd.data_ptr())
    assert len(ptrs) == 1  # the cache storage is reused window after window
    outs.append(roll.flush())
    out = torch.cat(outs, dim=2)
    assert out.shape == (1, 16, n_frames, 4, 4) and torch.isfinite(out).all()
    assert [s for s, i in seen if i == 0] == [0, 2, 4]
    assert cached.full_passes == 3 * 2 * 2 and cached.predicted_passes == 3 * 2 * 2  # windows x branches x 2
