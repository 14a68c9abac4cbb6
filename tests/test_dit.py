"""Wan2.1 I2V DiT: key/shape layout, parity with diffusers' WanTransformer3DModel through our key converter (both
directions), and the ip_scale = 0 pass being the base DiT exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import get_preset
from engine.models.dit import WanModel
from engine.models.dit_keys import diffusers_to_wan, wan_to_diffusers
from engine.weights import NFEB_OPTIONAL, build_dit, load_into

# diffusers hard-codes 512 text tokens when it splits [image | text] context, so the parity model uses 512.
CFG = dataclasses.replace(get_preset("tiny").dit, text_len=512)


def diffusers_wan(cfg):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim, rope_max_seq_len=cfg.rope_max_len,
    ).eval()


def randomise(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def inputs(cfg, B=2, F=3, H=6, W=8, seed=1, t=(999.0, 250.5)):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, cfg.out_dim, F, H, W, generator=g), t=torch.tensor(t),
                context=torch.randn(B, cfg.text_len, cfg.text_dim, generator=g),
                clip_fea=torch.randn(B, cfg.clip_tokens, cfg.clip_dim, generator=g),
                y=torch.randn(B, cfg.in_dim - cfg.out_dim, F, H, W, generator=g))


def run_diffusers(ref, inp):
    hidden = torch.cat([inp["x"], inp["y"]], dim=1)  # diffusers takes the 36 channels already concatenated
    return ref(hidden, inp["t"], inp["context"], inp["clip_fea"], return_dict=False)[0]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# Remaining difference at t ~ 1000 is diffusers' fp32 sinusoid vs Wan's fp64 one (ours): ~5e-6; at t = 0 it is ~3e-7.
TOL = 1e-5


@torch.no_grad()
def test_diffusers_weights_through_converter_match():
    ref = randomise(diffusers_wan(CFG))
    sd = diffusers_to_wan(ref.state_dict())
    ours = load_into(build_dit(CFG), sd, "diffusers", optional=NFEB_OPTIONAL, dtype=torch.float32).eval()
    inp = inputs(CFG)
    a, b = ours(**inp), run_diffusers(ref, inp)
    assert a.shape == b.shape == inp["x"].shape
    assert rel_err(a, b) <= TOL


@torch.no_grad()
def test_our_weights_through_converter_match_diffusers():
    ours = randomise(WanModel(CFG), seed=3).eval()
    sd = wan_to_diffusers(ours.state_dict())
    # diffusers has no NFEB: the emo projections are the only keys it must not receive
    emo = {k for k in sd if ".emo_" in k}
    assert len(emo) == 2 * CFG.num_layers
    ref = diffusers_wan(CFG)
    ref.load_state_dict({k: v for k, v in sd.items() if k not in emo}, strict=True)
    inp = inputs(CFG, seed=4, t=(0.0, 731.0))
    assert rel_err(ours(**inp), run_diffusers(ref, inp)) <= TOL
    # and the mapping is a bijection on our keys
    back = diffusers_to_wan(sd)
    assert back.keys() == ours.state_dict().keys()


@torch.no_grad()
def test_ip_scale_zero_is_the_base_dit_exactly():
    ours = randomise(WanModel(CFG), seed=5).eval()
    inp = inputs(CFG, seed=6)
    F = inp["x"].shape[2]
    emo = torch.randn(2, F, CFG.emo_tokens_per_frame, CFG.emo_dim)
    base = ours(**inp)
    assert torch.equal(ours(**inp, emo=emo, ip_scale=0.0), base)
    # base = the reference Wan DiT without any NFEB
    ref = diffusers_wan(CFG)
    ref.load_state_dict({k: v for k, v in wan_to_diffusers(ours.state_dict()).items() if ".emo_" not in k})
    assert rel_err(base, run_diffusers(ref, inp)) <= TOL
    # the expression branch does change the output when on
    assert rel_err(ours(**inp, emo=emo, ip_scale=1.0), base) > 1e-3


@torch.no_grad()
def test_block_ip_scale_zero_equals_block_without_nfeb():
    ours = randomise(WanModel(CFG), seed=7).eval()
    inp = inputs(CFG, seed=8)
    ctx_img, ctx_txt = ours.embed_context(inp["context"], inp["clip_fea"])
    tokens, grid = ours.patchify(inp["x"], inp["y"])
    cos, sin = ours.rope(grid)
    e, e0 = ours.embed_time(inp["t"])
    emo = torch.randn(2, grid[0], CFG.emo_tokens_per_frame, CFG.emo_dim)
    block = ours.blocks[0]
    plain = block(tokens, e0, cos, sin, ctx_img, ctx_txt, None)
    assert torch.equal(block(tokens, e0, cos, sin, ctx_img, ctx_txt, emo, 0.0), plain)
    assert not torch.allclose(block(tokens, e0, cos, sin, ctx_img, ctx_txt, emo, 1.0), plain)


def test_checkpoint_key_shapes_14b():
    cfg = get_preset("14b").dit
    with torch.device("meta"):
        sd = WanModel(cfg).state_dict()
    D, F = 5120, 13824
    expect = {
        "patch_embedding.weight": (D, 36, 1, 2, 2), "text_embedding.0.weight": (D, 4096),
        "text_embedding.2.weight": (D, D), "time_embedding.0.weight": (D, 256), "time_projection.1.weight": (6 * D, D),
        "img_emb.proj.0.weight": (1280,), "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.3.weight": (D, 1280),
        "img_emb.proj.4.weight": (D,), "head.modulation": (1, 2, D), "head.head.weight": (64, D),
        "blocks.39.modulation": (1, 6, D), "blocks.0.self_attn.q.weight": (D, D), "blocks.0.self_attn.norm_q.weight": (D,),
        "blocks.0.cross_attn.k_img.weight": (D, D), "blocks.0.cross_attn.norm_k_img.weight": (D,),
        "blocks.0.cross_attn.emo_k_proj.weight": (D, 2048), "blocks.0.cross_attn.emo_v_proj.weight": (D, 2048),
        "blocks.0.norm3.weight": (D,), "blocks.0.ffn.0.weight": (F, D), "blocks.0.ffn.2.weight": (D, F),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "blocks.0.cross_attn.emo_k_proj.bias" not in sd
    assert not any("norm1" in k or ".norm2." in k or "head.norm" in k for k in sd)  # affine-free LayerNorms
    assert not any("freqs" in k for k in sd)
    assert len([k for k in sd if k.startswith("blocks.0.")]) == 34  # modulation 1, self_attn 10, cross_attn 17, norm3 2, ffn 4
    n = sum(v.numel() for v in sd.values())
    assert n == cfg.num_params()


def test_unpatchify_inverts_token_layout():
    cfg = get_preset("tiny").dit
    model = WanModel(cfg)
    B, f, h, w = 1, 2, 3, 4
    # token (f, h, w) carries values laid out (pt, ph, pw, c) with c fastest: out[c, f, 2h+q, 2w+r]
    tok = torch.arange(B * f * h * w * 64, dtype=torch.float32).view(B, f * h * w, 64)
    out = model.unpatchify(tok, (f, h, w))
    assert out.shape == (B, 16, f, 2 * h, 2 * w)
    fi, hi, wi, q, r, c = 1, 2, 3, 1, 0, 5
    token = fi * h * w + hi * w + wi
    assert out[0, c, fi, 2 * hi + q, 2 * wi + r] == tok[0, token, (q * 2 + r) * 16 + c]


@pytest.mark.parametrize("t", [0.0, 500.0, 1000.0])
def test_time_embedding_is_cos_then_sin_fp64(t):
    from engine.models.dit import sinusoidal_embedding

    emb = sinusoidal_embedding(256, torch.tensor([t]))
    i = torch.arange(128, dtype=torch.float64)
    ang = t * 10000.0 ** (-i / 128)
    assert torch.allclose(emb[0], torch.cat([ang.cos(), ang.sin()]).float(), atol=1e-7)


@torch.no_grad()
def test_precomputed_context_kv_is_bit_identical():
    ours = randomise(WanModel(CFG), seed=9).eval()
    inp = inputs(CFG, seed=10)
    ctx_img, ctx_txt = ours.embed_context(inp["context"], inp["clip_fea"])
    tokens, grid = ours.patchify(inp["x"], inp["y"])
    cos, sin = ours.rope(grid)
    e, e0 = ours.embed_time(inp["t"])
    emo = torch.randn(2, grid[0], CFG.emo_tokens_per_frame, CFG.emo_dim)
    kv = ours.context_kv(ctx_img, ctx_txt)
    for s in (0.0, 1.0):
        plain = ours.forward_tokens(tokens, e, e0, cos, sin, ctx_img, ctx_txt, emo, s)
        cached = ours.forward_tokens(tokens, e, e0, cos, sin, None, None, emo, s, kv=kv)
        assert torch.equal(plain, cached)


@torch.no_grad()
def test_bf16_model_runs_close_to_fp32():
    ours = randomise(WanModel(CFG), std=0.1, seed=11).eval()
    inp = inputs(CFG, seed=12)
    emo = torch.randn(2, inp["x"].shape[2], CFG.emo_tokens_per_frame, CFG.emo_dim)
    ref = ours(**inp, emo=emo)
    out = ours.to(torch.bfloat16)(**inp, emo=emo)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 3e-2


def test_overlong_text_is_refused():
    model = WanModel(get_preset("tiny").dit)
    with pytest.raises(ValueError, match="at most 16"):
        model.embed_context(torch.zeros(1, 17, 32), torch.zeros(1, 5, 32))


@torch.no_grad()
def test_guidance_pair_batched_with_per_sample_ip_scale():
    ours = randomise(WanModel(CFG), seed=13).eval()
    one = inputs(CFG, B=1, seed=14, t=(400.0,))
    emo = torch.randn(1, one["x"].shape[2], CFG.emo_tokens_per_frame, CFG.emo_dim)
    no_emo, with_emo = ours(**one, emo=emo, ip_scale=0.0), ours(**one, emo=emo, ip_scale=1.0)
    pair = {k: torch.cat([v, v]) for k, v in one.items()}
    both = ours(**pair, emo=torch.cat([emo, emo]), ip_scale=torch.tensor([0.0, 1.0]))
    assert torch.allclose(both[0], no_emo[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(both[1], with_emo[0], rtol=1e-5, atol=1e-5)
