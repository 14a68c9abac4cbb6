"""NFEB: per-latent-frame expression attention against a naive loop, the normalisation statistics, and the
published quirk that zero emo projections do NOT give the base model."""
from __future__ import annotations

import math

import torch

from engine.config import get_preset
from engine.models.dit import WanI2VCrossAttention
from engine.models.nfeb import NORM_EPS, expression_attention, normalise_to

CFG = get_preset("tiny").dit


def cross_attn(seed=0):
    torch.manual_seed(seed)
    m = WanI2VCrossAttention(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def naive_frame_attention(q, emo, wk, wv, F):
    """Loop over samples, frames and heads with an explicit softmax(q k^T / sqrt(d)) v."""
    B, L, H, d = q.shape
    per = L // F
    out = torch.zeros(B, L, H * d)
    for b in range(B):
        for f in range(F):
            k = (emo[b, f] @ wk.T).view(-1, H, d)
            v = (emo[b, f] @ wv.T).view(-1, H, d)
            for h in range(H):
                qq = q[b, f * per:(f + 1) * per, h]
                w = torch.softmax(qq @ k[:, h].T / math.sqrt(d), dim=-1)
                out[b, f * per:(f + 1) * per, h * d:(h + 1) * d] = w @ v[:, h]
    return out


@torch.no_grad()
def test_expression_attention_is_per_frame():
    m = cross_attn()
    B, F, H, d = 2, 3, CFG.num_heads, CFG.head_dim
    emo = torch.randn(B, F, CFG.emo_tokens_per_frame, CFG.emo_dim)
    for L in (F * 10, F * 10 + 2):  # the second has 2 trailing tokens that get no expression (zero-padded)
        q = torch.randn(B, L, H, d)
        got = expression_attention(q, emo, m.emo_k_proj, m.emo_v_proj)
        ref = naive_frame_attention(q, emo, m.emo_k_proj.weight, m.emo_v_proj.weight, F)
        assert torch.allclose(got, ref, atol=1e-5)
        if L % F:
            assert torch.equal(got[:, (L // F) * F:], torch.zeros_like(got[:, (L // F) * F:]))
    # frame 1's queries see only frame 1's tokens: changing frame 0's tokens leaves them unchanged
    q = torch.randn(B, 30, H, d)
    emo2 = emo.clone()
    emo2[:, 0] += 1.0
    a = expression_attention(q, emo, m.emo_k_proj, m.emo_v_proj)
    b = expression_attention(q, emo2, m.emo_k_proj, m.emo_v_proj)
    assert torch.equal(a[:, 10:], b[:, 10:]) and not torch.allclose(a[:, :10], b[:, :10])


@torch.no_grad()
def test_global_variant_for_3d_tokens():
    m = cross_attn(1)
    q = torch.randn(1, 12, CFG.num_heads, CFG.head_dim)
    emo = torch.randn(1, 1, 40, CFG.emo_dim)
    got = expression_attention(q, emo[:, 0], m.emo_k_proj, m.emo_v_proj)
    ref = naive_frame_attention(q, emo, m.emo_k_proj.weight, m.emo_v_proj.weight, 1)
    assert torch.allclose(got, ref, atol=1e-5)


def test_normalise_to_matches_base_mean_and_unbiased_std():
    torch.manual_seed(0)
    scale, shift = torch.tensor([1.0, 3.0, 0.2])[:, None, None], torch.tensor([0.5, -2.0, 7.0])[:, None, None]
    base = torch.randn(3, 50, 16) * scale + shift
    emo = torch.randn(3, 50, 16) * 4 + 1
    out = normalise_to(emo, base)
    assert torch.allclose(out.mean(dim=(1, 2)), base.mean(dim=(1, 2)), atol=1e-5)
    # unbiased (n-1) std, and the +1e-5 on the emo std as published
    sd_e = emo.std(dim=(1, 2))
    expect = base.std(dim=(1, 2)) * sd_e / (sd_e + NORM_EPS)
    assert torch.allclose(out.std(dim=(1, 2)), expect, rtol=1e-5)


@torch.no_grad()
def test_random_projections_branch_has_base_statistics_and_is_added_before_o():
    m = cross_attn(2)
    B, F, L = 2, 3, 24
    x = torch.randn(B, L, CFG.dim)
    ctx_img, ctx_txt = torch.randn(B, CFG.clip_tokens, CFG.dim), torch.randn(B, CFG.text_len, CFG.dim)
    emo = torch.randn(B, F, CFG.emo_tokens_per_frame, CFG.emo_dim)
    q = m.norm_q(m.q(x)).unflatten(-1, (CFG.num_heads, -1))
    k_img, v_img, k_txt, v_txt = m.context_kv(ctx_img, ctx_txt)
    from kernels.attention import attention

    base = (attention(q, k_txt, v_txt) + attention(q, k_img, v_img)).flatten(2)
    branch = normalise_to(expression_attention(q, emo, m.emo_k_proj, m.emo_v_proj), base)
    assert torch.allclose(branch.mean(dim=(1, 2)), base.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(branch.std(dim=(1, 2)), base.std(dim=(1, 2)), rtol=1e-4)
    for s in (0.5, 1.0):
        assert torch.allclose(m(x, ctx_img, ctx_txt, emo, s), m.o(base + s * branch), atol=1e-5)
    assert torch.allclose(m(x, ctx_img, ctx_txt, None), m.o(base), atol=1e-6)


@torch.no_grad()
def test_zero_projections_do_not_give_the_base_model():
    """Zero emo_k/v_proj make the branch 0 everywhere, so its normalised form is the base mean, not zero."""
    m = cross_attn(3)
    m.emo_k_proj.weight.zero_()
    m.emo_v_proj.weight.zero_()
    B, F, L = 2, 2, 16
    x = torch.randn(B, L, CFG.dim)
    ctx_img, ctx_txt = torch.randn(B, CFG.clip_tokens, CFG.dim), torch.randn(B, CFG.text_len, CFG.dim)
    emo = torch.randn(B, F, CFG.emo_tokens_per_frame, CFG.emo_dim)
    plain = m(x, ctx_img, ctx_txt, None)
    with_zero = m(x, ctx_img, ctx_txt, emo, 1.0)
    assert not torch.allclose(with_zero, plain, atol=1e-4)
    # the difference is exactly o's weight applied to a constant mean(base) per sample
    q = m.norm_q(m.q(x)).unflatten(-1, (CFG.num_heads, -1))
    k_img, v_img, k_txt, v_txt = m.context_kv(ctx_img, ctx_txt)
    from kernels.attention import attention

    mu = (attention(q, k_txt, v_txt) + attention(q, k_img, v_img)).flatten(2).mean(dim=(1, 2))  # (B,)
    delta = mu[:, None, None] * m.o.weight.sum(dim=1)[None, None, :]
    assert torch.allclose(with_zero - plain, delta.expand_as(plain), atol=1e-5)
    assert torch.equal(m(x, ctx_img, ctx_txt, emo, 0.0), plain)
