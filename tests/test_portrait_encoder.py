"""PortraitEncoder: published key names/shapes, resampler parity with diffusers' IP-Adapter Plus resampler, token
layout, and the 97-token grouping per latent frame against the FLASHPORTRAIT.md formula."""
from __future__ import annotations

import torch

from engine.config import PortraitEncoderConfig, get_preset
from engine.models.portrait_encoder import PortraitEncoder, Resampler, group_latent_tokens, latent_token_range

TINY = get_preset("tiny").portrait


def test_published_keys_and_shapes():
    with torch.device("meta"):
        sd = PortraitEncoder(PortraitEncoderConfig()).state_dict()
    expect = {
        "proj_model.headpose_proj.weight": (2048, 6), "proj_model.eye_proj.weight": (2048, 6),
        "proj_model.emo_proj.weight": (2048, 30), "proj_model.mouth_proj.weight": (2048, 512),
        "proj_model.norm.weight": (2048,), "proj_model.norm.bias": (2048,),
    }
    for name, q, e in (("mouth_proj_model", 16, 512), ("emo_proj_model", 4, 30)):
        expect.update({
            f"{name}.latents": (1, q, 1280), f"{name}.proj_in.weight": (1280, e), f"{name}.proj_in.bias": (1280,),
            f"{name}.proj_out.weight": (2048, 1280), f"{name}.proj_out.bias": (2048,),
            f"{name}.norm_out.weight": (2048,), f"{name}.norm_out.bias": (2048,),
        })
        for j in range(4):
            p = f"{name}.layers.{j}."
            expect.update({
                p + "0.norm1.weight": (1280,), p + "0.norm1.bias": (1280,), p + "0.norm2.weight": (1280,),
                p + "0.norm2.bias": (1280,), p + "0.to_q.weight": (1280, 1280), p + "0.to_kv.weight": (2560, 1280),
                p + "0.to_out.weight": (1280, 1280), p + "1.0.weight": (1280,), p + "1.0.bias": (1280,),
                p + "1.1.weight": (5120, 1280), p + "1.3.weight": (1280, 5120),
            })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expect


def _to_diffusers(res: Resampler) -> dict:
    out = {}
    for k, v in res.state_dict().items():
        parts = k.split(".")
        if parts[0] != "layers":
            out[k] = v
            continue
        j, sub, rest = parts[1], parts[2], ".".join(parts[3:])
        p = f"layers.{j}."
        if sub == "0":
            if rest == "to_kv.weight":
                k_w, v_w = v.chunk(2, dim=0)  # k first, as published
                out[p + "attn.to_k.weight"], out[p + "attn.to_v.weight"] = k_w, v_w
            else:
                name = {"norm1": "ln0", "norm2": "ln1", "to_q": "attn.to_q", "to_out": "attn.to_out.0"}[rest.split(".")[0]]
                out[p + name + "." + rest.split(".")[1]] = v
        else:
            idx = rest.split(".")[0]
            name = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}[idx]
            out[p + name + "." + rest.split(".")[1]] = v
    return out


@torch.no_grad()
def test_resampler_matches_diffusers_ip_adapter_plus():
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(0)
    ours = Resampler(TINY, TINY.mouth_dim, TINY.mouth_queries).eval()
    for p in ours.parameters():
        p.normal_(0, 0.2)
    ref = IPAdapterPlusImageProjection(embed_dims=TINY.mouth_dim, output_dims=TINY.out_dim,
                                       hidden_dims=TINY.resampler_dim, depth=TINY.depth, dim_head=TINY.dim_head,
                                       heads=TINY.heads, num_queries=TINY.mouth_queries, ffn_ratio=TINY.ff_mult).eval()
    ref.load_state_dict(_to_diffusers(ours), strict=True)
    x = torch.randn(5, 1, TINY.mouth_dim)
    a, b = ours(x), ref(x)
    assert a.shape == (5, TINY.mouth_queries, TINY.out_dim)
    assert torch.allclose(a, b, atol=1e-5)


@torch.no_grad()
def test_token_layout_per_frame():
    torch.manual_seed(1)
    enc = PortraitEncoder(TINY).eval()
    feats = torch.randn(2, 5, 554)
    tok = enc(feats)
    assert tok.shape == (2, 5 * 24, TINY.out_dim)
    f = feats[1, 3]
    per = tok[1, 3 * 24:4 * 24]
    pm = enc.proj_model
    ln = pm.norm
    assert torch.allclose(per[0], ln(pm.headpose_proj(f[:6])), atol=1e-5)
    assert torch.allclose(per[1], ln(pm.eye_proj(f[6:12])), atol=1e-5)
    assert torch.allclose(per[2], ln(pm.emo_proj(f[12:42])), atol=1e-5)
    assert torch.allclose(per[3], ln(pm.mouth_proj(f[42:])), atol=1e-5)
    assert torch.allclose(per[4:20], enc.mouth_proj_model(f[None, None, 42:])[0], atol=1e-5)
    assert torch.allclose(per[20:24], enc.emo_proj_model(f[None, None, 12:42])[0], atol=1e-5)
    # frames are independent
    assert torch.allclose(enc(feats[:, 3:4]), tok[:, 72:96], atol=1e-6)


def test_grouping_matches_formula():
    n = 4
    T = 4 * (n - 1) + 1
    # token j carries the value j, so every slot says which token it holds
    tokens = torch.arange(24 * T, dtype=torch.float32)[None, :, None].expand(2, -1, 3).contiguous()
    g = group_latent_tokens(tokens)
    assert g.shape == (2, n, 97, 3)
    # latent 0: its 24 real tokens [0, 24) then 73 zeros at the end
    assert torch.equal(g[0, 0, :24, 0], torch.arange(24.0))
    assert torch.equal(g[0, 0, 24:], torch.zeros(73, 3))
    # latent i >= 1: tokens 96i-73 .. 96i+23 inclusive (FLASHPORTRAIT.md), checked for i = 1 and the last
    for i in (1, n - 1):
        assert torch.equal(g[1, i, :, 2], torch.arange(96 * i - 73, 96 * i + 24, dtype=torch.float32))
        assert latent_token_range(i) == (96 * i - 73, 96 * i + 24)
    assert latent_token_range(0) == (-73, 24)
    assert g[0, n - 1, -1, 0] == 24 * T - 1  # the last latent ends on the last token


def test_grouping_rejects_wrong_frame_count():
    import pytest

    with pytest.raises(ValueError, match="4k\\+1"):
        group_latent_tokens(torch.zeros(1, 24 * 6, 3))
