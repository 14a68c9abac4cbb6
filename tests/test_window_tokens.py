"""Expression tokens per window follow FlashPortrait's rule (issue 14, fidelity), live and offline.

The rule, from the upstream long-video pipeline and training: a window over latent frames [s, e) is encoded from
its own video frames 4s .. 4(e-1) and grouped like a training clip, so its first latent frame carries the 24 tokens
of frame 4s followed by 73 zero pads and its latent j >= 1 the 97 tokens [96j - 73, 96j + 24) of the window's own
token sequence. The reference below is written from that rule alone: it runs the PortraitEncoder on each window's
own frames and slices the window's tokens with zero padding where a range leaves the sequence. The renderer's
tokens are taken where it hands them to the DiT (the engine's guided flow), for every window of a live stream
(several window layouts, a budget change that restarts the rolling window at another latent) and of an offline
render; the old layout (97 global tokens for a window's first latent frame) is shown to fail the same comparison.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

try:
    from tests.conftest import image_rgb, video_frames
except ImportError:  # pytest's rootdir-relative import of conftest
    from conftest import image_rgb, video_frames

from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig
from engine.controller import Budget, ControllerConfig
from engine.models.portrait_encoder import group_latent_tokens, window_latent_tokens
from engine.renderer import FlashPortraitRenderer
from engine.wsws import plan_windows

SIZE = 64
PER, TOKENS = 24, 97  # tokens per video frame, per latent frame (the tiny preset keeps the published counts)
CPU = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def driving() -> list[np.ndarray]:
    return video_frames("lp_d0.mp4", 41)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return image_rgb("lp_s0.jpg")


def upstream_window_tokens(encoder, feats: np.ndarray, s: int, e: int) -> torch.Tensor:
    """(e - s, 97, C): FlashPortrait's tokens for the window of latent frames [s, e), from the rule: encode the
    window's own frames 4s .. 4(e-1), then latent j takes the inclusive token range centred on its frames,
    [96j - 73, 96j + 23] (latent 0: [-73, 23]), with zeros where the range leaves the sequence, padded at the end."""
    frames = torch.from_numpy(feats[4 * s:4 * (e - 1) + 1]).float()[None]
    with torch.no_grad():
        tok = encoder(frames)[0]                                         # (24 m, C), m = 4(e - s - 1) + 1
    rows = []
    for j in range(e - s):
        lo, hi = (96 * j - 73, 96 * j + 23) if j else (-73, 23)
        valid = tok[max(lo, 0):min(hi, tok.shape[0] - 1) + 1]
        rows.append(torch.cat([valid, valid.new_zeros(TOKENS - valid.shape[0], valid.shape[1])]))
    return torch.stack(rows)


def old_global_layout(encoder, feats: np.ndarray, s: int, e: int) -> torch.Tensor:
    """What the renderer fed before: the slice [s, e) of one global grouping of the whole clip."""
    n = 4 * (e - 1) + 1
    with torch.no_grad():
        tok = encoder(torch.from_numpy(feats[:n]).float()[None])
    return group_latent_tokens(tok)[0, s:e]


def make(reference, window: WindowConfig, offline=False, **kw) -> FlashPortraitRenderer:
    return FlashPortraitRenderer(reference, None, SIZE, SIZE, preset="tiny", runtime=CPU,
                                 sampler=SamplerConfig(fast=True), window=window,
                                 alpa=ALPAConfig(mode="alpa", interval=2, order=1), random_weights=True, pace=False,
                                 offline=offline, controller=ControllerConfig(enabled=False), **kw)


def spy(r: FlashPortraitRenderer, monkeypatch, plan=None):
    """Record every PD-FGC row the renderer extracts and, per window, the tokens it hands to the guided flow
    (window start in global latent frames -> (W, 97, C)); the real functions run unchanged. Offline, `plan` (the
    step-major windows) maps the window index the renderer passes as the cache key to the window's start."""
    feats, windows = [], {}
    push, flow = r.extractor.push, r.engine.guided_flow

    def recording_push(frame):
        result = push(frame)
        feats.append(np.asarray(result.features, dtype=np.float32))
        return result

    def recording_flow(cached, x, i, emo, key, **kw):  # kw: the live window's frame and guidance economy state
        start = plan[key].start if plan is not None else r._base + r.roller.window_start
        windows.setdefault(start, []).append(emo[0].clone())
        return flow(cached, x, i, emo, key, **kw)

    monkeypatch.setattr(r.extractor, "push", recording_push)
    monkeypatch.setattr(r.engine, "guided_flow", recording_flow)
    return feats, windows


def check_windows(r, feats, windows, rows=None):
    """Every recorded window equals the upstream rule (all its latent frames, or the first `rows`), and every call
    of a window saw the same tokens."""
    enc = r.engine.portrait
    assert windows
    for s, calls in windows.items():
        got = calls[0]
        for other in calls[1:]:
            assert torch.equal(other, got)
        n = got.shape[0] if rows is None else rows
        want = upstream_window_tokens(enc, np.stack(feats), s, s + got.shape[0])[:n]
        torch.testing.assert_close(got[:n], want, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(got[0, PER:]) == 0, f"window at latent {s}: its first latent frame has no pads"


def test_helper_builds_the_window_layout_from_global_tokens():
    """window_latent_tokens on globally grouped tokens equals re-encoding the window's own frames (per-frame
    encoder stand-in: any map from a frame to its 24 tokens), for every window start; the global slice does not."""
    torch.manual_seed(0)
    frames, C = 4 * 9 + 1, 5
    per_frame = torch.randn(frames, PER, C)
    glob = group_latent_tokens(per_frame.reshape(1, frames * PER, C))[0]   # (10, 97, C)
    for s in range(0, 8):
        for e in range(s + 1, 11):
            own = per_frame[4 * s:4 * (e - 1) + 1].reshape(1, -1, C)
            want = group_latent_tokens(own)[0]
            assert torch.equal(window_latent_tokens(glob[s:e], s), want), (s, e)
            if s:
                assert not torch.equal(glob[s:e][0], want[0])
                assert torch.equal(glob[s:e][1:], want[1:])  # only the first latent frame differs


@pytest.mark.parametrize("window, lookahead", [(WindowConfig(4, 2), None), (WindowConfig(3, 2), None),
                                               (WindowConfig(3, 1), None)])
def test_live_windows_follow_the_upstream_rule(reference, driving, monkeypatch, window, lookahead):
    r = make(reference, window, lookahead=lookahead)
    feats, windows = spy(r, monkeypatch)
    try:
        for j, frame in enumerate(driving):
            r.process(frame, j / 25)
        assert len(windows) >= 4 and sorted(windows)[1] >= 1
        check_windows(r, feats, windows)  # lookahead None: every latent frame of a window has its own tokens
    finally:
        r.close()


def test_live_default_lookahead_and_a_budget_change(reference, driving, monkeypatch):
    """The live default (W 3, lookahead 1): a window's first latent frame always has its tokens, and follows the
    rule; a stride change mid-stream restarts the rolling window at another latent (an odd start): the same."""
    r = make(reference, WindowConfig(3, 2), lookahead=1)
    feats, windows = spy(r, monkeypatch)
    try:
        for j, frame in enumerate(driving):
            if j == 13:  # latents 0..2 released: the stride-2 rolling window restarts at latent 3
                assert r._released == 3
                r._apply_budget(Budget(1, r._budget.steps, 2))
            r.process(frame, j / 25)
        starts = sorted(windows)
        assert starts[:3] == [0, 1, 2] and starts[3:] == list(range(3, 3 + 2 * len(starts[3:]), 2))
        assert len(starts) >= 6
        check_windows(r, feats, windows, rows=2)  # latents 0 and 1 of each window have their own tokens
    finally:
        r.close()


def test_offline_windows_follow_the_upstream_rule(reference, driving, monkeypatch):
    r = make(reference, WindowConfig(4, 2), offline=True)
    plan = plan_windows(10, 4, 2)  # 37 frames -> 10 latents: windows at 0, 2, 4, 6 (the last pinned)
    feats, windows = spy(r, monkeypatch, plan)
    try:
        for j, frame in enumerate(driving[:37]):
            r.process(frame, j / 25)
        out = r.flush()
        assert len(out) == 37 and sorted(windows) == [w.start for w in plan] == [0, 2, 4, 6]
        assert all(len(calls) == r.engine.live_steps for calls in windows.values())
        check_windows(r, feats, windows)
    finally:
        r.close()


def test_the_old_global_layout_fails_the_rule(reference, driving):
    """The comparison above can fail: a window's first latent frame sliced from one global layout (97 real tokens)
    is not what FlashPortrait feeds, for every window after the first."""
    r = make(reference, WindowConfig(3, 2), lookahead=1)
    try:
        feats = np.stack([np.asarray(r.extractor.push(f).features, np.float32) for f in driving[:25]])
        enc = r.engine.portrait
        for s in range(1, 5):
            old, want = old_global_layout(enc, feats, s, s + 3), upstream_window_tokens(enc, feats, s, s + 3)
            assert torch.count_nonzero(old[0, PER:]) > 0  # 97 real tokens
            assert not torch.allclose(old[0], want[0], atol=1e-3)
            torch.testing.assert_close(old[1:], want[1:], rtol=1e-5, atol=1e-6)
        # the first window of a stream (latent 0) is the same in both layouts
        torch.testing.assert_close(old_global_layout(enc, feats, 0, 3), upstream_window_tokens(enc, feats, 0, 3),
                                   rtol=1e-5, atol=1e-6)
    finally:
        r.close()
