"""WSWS: (a) window plan and blend weights against FlashPortrait's formulas; (b) rolling window vs (a)."""
from __future__ import annotations

import pytest
import torch

from engine.sampler import Sampler, flow_schedule
from engine.wsws import RollingWSWS, blend_weights, plan_windows, seam_jump, window_starts, wsws_sample

B, C, H, W = 1, 2, 3, 3


def _reference_windows(length, size, overlap):
    """The upstream context scheduler (stride 1, step 0) written out: starts j in range(0, T - O, S), frames taken
    modulo T, then the last window replaced by [T - size, T); T <= size gives one window of T frames."""
    if length <= size:
        return [list(range(length))]
    wins = [[e % length for e in range(j, j + size)] for j in range(0, length - overlap, size - overlap)]
    wins[-1] = list(range(length - size, length))
    return wins


@pytest.mark.parametrize("length,size,overlap", [(201, 51, 30), (60, 51, 30), (52, 51, 30), (51, 51, 30),
                                                 (20, 6, 3), (18, 6, 3), (10, 4, 2), (9, 4, 0), (7, 4, 0),
                                                 (30, 8, 5), (5, 6, 2)])
def test_window_plan_matches_formula(length, size, overlap):
    ref = _reference_windows(length, size, overlap)
    wins = plan_windows(length, size, overlap)
    assert [list(range(w.start, w.end)) for w in wins] == ref
    assert window_starts(length, size, overlap) == [r[0] for r in ref]
    assert wins[-1].end == length and wins[0].start == 0
    covered = set().union(*[set(r) for r in ref])
    assert covered == set(range(length))
    for k, w in enumerate(wins):
        expect = len(set(ref[k]) & set(ref[k - 1])) if k else 0  # upstream: |cur & prev|
        assert w.overlap == expect
        if k and k < len(wins) - 1:
            assert w.start - wins[k - 1].start == size - overlap  # stride between regular windows
    if length > size and (length - size) % (size - overlap):  # the pinned last window overlaps more
        assert wins[-1].overlap > overlap


@pytest.mark.parametrize("n", [2, 3, 5, 30, 42])
def test_blend_weights_formula(n):
    w = blend_weights(n).flatten().double()
    torch.testing.assert_close(w, torch.tensor([j / (n - 1) for j in range(n)], dtype=torch.float64))
    assert blend_weights(1).item() == 0.5


def _toy(schedule, position_term=0.5, smooth=True):
    """Deterministic toy denoiser: x0_hat = 0.8 * (3-frame smoothing across the window) + a term of the frame's
    local position (like local RoPE), flow = (x - x0_hat) / sigma."""
    sig = schedule.sigma_list

    def denoise(x, i, win, cond):
        y = x.clone()
        if smooth:
            y[:, :, 1:-1] = (x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]) / 3
        j = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return (x - (0.8 * y + position_term * torch.cos(0.7 * j))) / sig[i]

    return denoise


def _rolling(noise, schedule, denoise, size, overlap, blend=True):
    roll = RollingWSWS(Sampler(schedule), size, overlap, (B, C, H, W), blend=blend,
                       noise_fn=lambda s, n: noise[:, :, s:s + n])
    outs, emitted_at = [], []
    for f in range(noise.shape[2]):
        roll.push(torch.full((2,), float(f)))  # per-frame conditioning arrives one latent frame at a time
        while roll.ready():
            outs.append(roll.run(denoise))
            emitted_at.append(f)
    outs.append(roll.flush())
    return torch.cat(outs, dim=2), emitted_at


def _noise(T, seed=0):
    return torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(seed))


def test_single_window_rolling_equals_offline():
    sch = flow_schedule(6, 5.0)
    noise = _noise(6)
    a = wsws_sample(noise, Sampler(sch), _toy(sch), 6, 3)
    b, _ = _rolling(noise, sch, _toy(sch), 6, 3)
    assert torch.equal(a, b)


def test_one_step_schedule_rolling_equals_offline_with_coupling():
    sch = flow_schedule(1, 5.0)
    noise = _noise(18)
    a = wsws_sample(noise, Sampler(sch), _toy(sch), 6, 3)
    b, _ = _rolling(noise, sch, _toy(sch), 6, 3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("size,overlap", [(6, 3), (6, 4), (5, 2)])
def test_no_cross_window_coupling_rolling_equals_offline(size, overlap):
    """A per-frame denoiser that ignores the window position: shared frames agree, every blend is the identity."""
    sch = flow_schedule(8, 5.0)
    T = size + 4 * (size - overlap)
    noise = _noise(T)
    den = _toy(sch, position_term=0.0, smooth=False)
    a = wsws_sample(noise, Sampler(sch), den, size, overlap)
    b, _ = _rolling(noise, sch, den, size, overlap)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_rolling_is_causal_and_emits_in_order():
    sch = flow_schedule(4, 5.0)
    size, overlap, T = 6, 2, 6 + 4 * 4
    out, emitted_at = _rolling(_noise(T), sch, _toy(sch), size, overlap)
    assert out.shape[2] == T  # every latent frame exactly once
    assert emitted_at == [size - 1 + k * (size - overlap) for k in range(len(emitted_at))]  # as soon as possible
    # frame f's output does not depend on later noise beyond its window: perturb noise after the 2nd window
    noise = _noise(T)
    noise2 = noise.clone()
    noise2[:, :, 2 * (size - overlap) + size:] += 1.0
    o1, _ = _rolling(noise, sch, _toy(sch), size, overlap)
    o2, _ = _rolling(noise2, sch, _toy(sch), size, overlap)
    n_final = 2 * (size - overlap)
    assert torch.equal(o1[:, :, :n_final], o2[:, :, :n_final])


def test_rolling_vs_offline_difference_and_seams(capsys):
    """Measured: (b) vs (a) on the coupled toy denoiser, and the seam jump of (a), (b) and a hard cut."""
    sch = flow_schedule(10, 5.0)
    size, overlap = 6, 3
    T = size + 5 * (size - overlap)
    noise = _noise(T, seed=3)
    den = _toy(sch)
    a = wsws_sample(noise, Sampler(sch), den, size, overlap)
    b, _ = _rolling(noise, sch, den, size, overlap)
    hard = wsws_sample(noise, Sampler(sch), den, size, overlap, blend=False)
    rel = float((a - b).norm() / a.norm())
    rel_hard = float((a - hard).norm() / a.norm())  # scale of the windows' disagreement
    wins = plan_windows(T, size, overlap)
    ja, jb, jh = seam_jump(a, wins), seam_jump(b, wins), seam_jump(hard, wins)
    with capsys.disabled():
        print(f"\n[wsws] rolling vs offline rel. L2 diff {rel:.4f} (hard cut vs offline {rel_hard:.4f}); "
              f"seam jump offline {ja:.3f} rolling {jb:.3f} hard cut {jh:.3f}")
    assert 1e-4 < rel < 0.3  # they do differ (back-coupling) but stay close
    assert ja < jh and jb < jh  # blending removes the hard-cut seam
    assert jb < 1.5
