"""Sequence-parallel DiT (kernels/parallel.py): gloo on loopback, 2 and 4 processes, tiny preset, fp32.

Every rank builds the same random model (same seed) and computes the single-process output itself, so each rank
checks its own parallel result against it. Grids are chosen so that token counts do not divide the world size and
rank boundaries fall inside latent frames.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import get_preset
from engine.models.dit import WanModel
from engine.models.nfeb import expression_attention
from engine.distributed import Driver, follow, spawn
from kernels.parallel import SequenceParallelDiT, TokenSplit, make_groups, split_expression_attention

TOL = 1e-5
CFG = get_preset("tiny").dit


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _model(cfg, seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(cfg).eval()
    # Real checkpoints never leave the NFEB projections at their init scale; make them matter in the output.
    for block in model.blocks:
        torch.nn.init.normal_(block.cross_attn.emo_k_proj.weight, std=0.3)
        torch.nn.init.normal_(block.cross_attn.emo_v_proj.weight, std=0.3)
    return model


def _inputs(cfg, batch: int, frames: int, h: int, w: int, seed: int, global_emo: bool = False) -> dict:
    """Latent (B, 16, frames, h, w): the token grid is (frames, h/2, w/2)."""
    g = torch.Generator().manual_seed(seed)
    emo_shape = (batch, 2 * cfg.emo_tokens_per_frame, cfg.emo_dim) if global_emo else \
        (batch, frames, cfg.emo_tokens_per_frame, cfg.emo_dim)
    return dict(
        x=torch.randn(batch, 16, frames, h, w, generator=g),
        t=torch.rand(batch, generator=g) * 1000,
        context=torch.randn(batch, cfg.text_len - 3, cfg.text_dim, generator=g),
        clip_fea=torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, generator=g),
        y=torch.randn(batch, 20, frames, h, w, generator=g),
        emo=torch.randn(*emo_shape, generator=g),
    )


# (batch, latent frames, latent h, latent w, global emo, ip_scale): tokens 45, 45 (B=2, and B=2 with the guidance
# pair as a per-sample ip_scale), 5 (a rank with no real token at world 4), 36 (the global-emo variant of the NFEB).
CASES = [(1, 3, 6, 10, False, 0.7), (2, 3, 6, 10, False, 1.3), (2, 3, 6, 10, False, torch.tensor([1.0, 0.0])),
         (1, 1, 2, 10, False, 0.5), (1, 4, 6, 6, True, 0.9)]


def _check_forward(model, dit, rank: int) -> None:
    for i, (b, f, h, w, glob, ip) in enumerate(CASES):
        inp = _inputs(model.cfg, b, f, h, w, seed=10 + i, global_emo=glob)
        ref = model(**inp, ip_scale=ip)
        no_emo = model(**inp, ip_scale=0.0)
        assert _rel(no_emo, ref) > 1e-2, "the NFEB must change the output, or the test proves nothing about it"
        out = dit(**inp, ip_scale=ip)
        err = _rel(out, ref)
        assert err <= TOL, f"rank {rank}, case {i} (B={b}, grid {f}x{h // 2}x{w // 2}): relative error {err:.2e}"


def _check_branches(model, dit, rank: int) -> None:
    inp = _inputs(model.cfg, 1, 3, 6, 10, seed=3)
    branches = [{"ip_scale": 1.0}, {"ip_scale": 0.0}]
    out = dit.forward_branches(branches, **inp)
    for j, b in enumerate(branches):
        err = _rel(out[j], model(**inp, **b))
        assert err <= TOL, f"rank {rank}, branch {j}: relative error {err:.2e}"


def _world2(info) -> None:
    torch.set_num_threads(1)
    model = _model(CFG)
    dit = SequenceParallelDiT(model, make_groups(cfg_size=1))
    cfg_split = SequenceParallelDiT(model, make_groups(cfg_size=2))  # 2 CFG groups of one sequence rank
    with torch.no_grad():
        _check_forward(model, dit, info.rank)
        _check_branches(model, dit, info.rank)  # both branches on the one sequence group
        _check_branches(model, cfg_split, info.rank)


def _world4(info) -> None:
    torch.set_num_threads(1)
    model = _model(CFG)
    seq4 = SequenceParallelDiT(model, make_groups(cfg_size=1))
    cfg2x2 = SequenceParallelDiT(model, make_groups(cfg_size=2))
    # 2 heads over 4 sequence ranks: Ulysses pads to 4 heads (the zero heads must vanish from the result).
    two_heads = _model(dataclasses.replace(CFG, num_heads=2), seed=1)
    seq4_two_heads = SequenceParallelDiT(two_heads, make_groups(cfg_size=1))
    with torch.no_grad():
        _check_forward(model, seq4, info.rank)
        _check_forward(two_heads, seq4_two_heads, info.rank)
        _check_branches(model, cfg2x2, info.rank)
        # Rank 0 drives, the others follow: the live service's arrangement.
        inp = _inputs(CFG, 1, 3, 6, 10, seed=5)
        branches = [{"ip_scale": 1.0}, {"ip_scale": 0.0}]
        if info.rank == 0:
            driver = Driver(cfg2x2)
            single = driver(**inp, ip_scale=0.6)
            driver.set_session(inp["context"], inp["clip_fea"])  # per-session context K/V on every rank
            both = driver.branches(branches, **{**inp, "context": None, "clip_fea": None})
            driver.close()
            assert _rel(single, model(**inp, ip_scale=0.6)) <= TOL
            for j, b in enumerate(branches):
                assert _rel(both[j], model(**inp, **b)) <= TOL
        else:
            assert follow(cfg2x2) == 3


@pytest.mark.timeout(120)
def test_two_processes_match_single_process():
    # spawn, not fork: earlier tests in the same pytest process leave threads (mediapipe, aiortc) whose locks a
    # forked child would inherit held
    spawn(_world2, 2, device="cpu")


@pytest.mark.timeout(120)
def test_four_processes_sequence_and_cfg_split_match_single_process():
    spawn(_world4, 4, device="cpu")


def test_token_split_covers_the_window_once():
    for length, world in [(45, 2), (45, 4), (5, 4), (64, 4), (1, 2)]:
        splits = [TokenSplit(length, world, r) for r in range(world)]
        assert sum(s.valid for s in splits) == length
        x = torch.arange(length, dtype=torch.float32)[None, :, None] + 1
        shards = [s.shard(x) for s in splits]
        assert all(sh.shape == (1, splits[0].local, 1) for sh in shards)
        joined = torch.cat(shards, dim=1)[0, :, 0]
        assert torch.equal(joined[:length], x[0, :, 0]) and not joined[length:].any()


@pytest.mark.parametrize("length,frames,world", [(45, 3, 2), (45, 3, 4), (45, 2, 4), (47, 3, 3), (5, 1, 4)])
def test_split_expression_attention_follows_the_frame_of_each_token(length, frames, world):
    """Per rank, equal to the single-process per-frame attention's rows for that rank's tokens (including the
    L - floor(L/F)*F tail that gets zeros, and ranks whose tokens straddle frame boundaries)."""
    torch.manual_seed(0)
    H, hd, E = 4, 8, 16
    q = torch.randn(2, length, H, hd)
    emo = torch.randn(2, frames, 97, E)
    kp, vp = torch.nn.Linear(E, H * hd, bias=False), torch.nn.Linear(E, H * hd, bias=False)
    ref = expression_attention(q, emo, kp, vp)
    for r in range(world):
        split = TokenSplit(length, world, r)
        out = split_expression_attention(split.shard(q), emo, kp, vp, split)
        assert out.shape == (2, split.local, H * hd)
        torch.testing.assert_close(out[:, :split.valid], ref[:, split.start:split.start + split.valid],
                                   rtol=1e-5, atol=1e-6)

