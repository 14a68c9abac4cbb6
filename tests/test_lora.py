"""LoRA merge on the tiny Wan DiT: merged weights give the same output as base + explicit low-rank update."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.config import get_preset
from engine.models.dit import WanModel
from engine.lora import load_and_merge_lora, merge_lora
from engine.weights import WeightsError

RANK = 4


def _model(seed=0):
    torch.manual_seed(seed)
    return WanModel(get_preset("tiny").dit).eval()


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, F, H, W = 1, 2, 4, 4
    return dict(x=torch.randn(B, 16, F, H, W, generator=g), t=torch.tensor([700.0]),
                context=torch.randn(B, 10, cfg.text_dim, generator=g),
                clip_fea=torch.randn(B, cfg.clip_tokens, cfg.clip_dim, generator=g),
                y=torch.randn(B, 20, F, H, W, generator=g),
                emo=torch.randn(B, F, cfg.emo_tokens_per_frame, cfg.emo_dim, generator=g))


def _lora(model, alpha=None):
    """A LightX2V-style LoRA over several targets, both pair spellings, prefix on some keys, and diffs."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    pairs = {"blocks.0.self_attn.q": ("diffusion_model.", "lora_down", "lora_up"),
             "blocks.1.cross_attn.k_img": ("diffusion_model.", "lora_A", "lora_B"),
             "blocks.1.ffn.0": ("", "lora_down", "lora_up"),
             "head.head": ("diffusion_model.", "lora_A", "lora_B"),
             "time_projection.1": ("", "lora_down", "lora_up")}
    params = dict(model.named_parameters())
    for name, (prefix, down, up) in pairs.items():
        out_f, in_f = params[name + ".weight"].shape
        sd[f"{prefix}{name}.{down}.weight"] = 0.1 * torch.randn(RANK, in_f, generator=g)
        sd[f"{prefix}{name}.{up}.weight"] = 0.1 * torch.randn(out_f, RANK, generator=g)
        if alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    sd["diffusion_model.blocks.0.cross_attn.k.diff_b"] = 0.1 * torch.randn(params["blocks.0.cross_attn.k.bias"].shape, generator=g)
    sd["diffusion_model.blocks.1.cross_attn.norm_k.diff"] = 0.1 * torch.randn(params["blocks.1.cross_attn.norm_k.weight"].shape, generator=g)
    sd["diffusion_model.blocks.0.diff_m"] = 0.1 * torch.randn(params["blocks.0.modulation"].shape, generator=g)
    return sd, pairs


def _explicit(model, sd, pairs, scale):
    """Base model + the low-rank update run explicitly: y = W x + b + scale * up(down(x)); diffs added."""
    mods = dict(model.named_modules())
    hooks = []
    for name, (prefix, down, up) in pairs.items():
        d, u = sd[f"{prefix}{name}.{down}.weight"], sd[f"{prefix}{name}.{up}.weight"]
        hooks.append(mods[name].register_forward_hook(
            lambda m, inp, out, d=d, u=u: out + scale * (inp[0] @ d.T @ u.T)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["blocks.0.cross_attn.k.bias"] += sd["diffusion_model.blocks.0.cross_attn.k.diff_b"]
        params["blocks.1.cross_attn.norm_k.weight"] += sd["diffusion_model.blocks.1.cross_attn.norm_k.diff"]
        params["blocks.0.modulation"] += sd["diffusion_model.blocks.0.diff_m"]
    return hooks


@pytest.mark.parametrize("alpha_mode,alpha", [("ignore", None), ("ignore", 8.0), ("rank", 8.0)])
def test_merge_equals_explicit_low_rank(alpha_mode, alpha):
    cfg = get_preset("tiny").dit
    merged, explicit = _model(), _model()
    sd, pairs = _lora(merged, alpha)
    names = merge_lora(merged, sd, strength=1.0, alpha_mode=alpha_mode)
    assert len(names) == len(pairs) + 3
    scale = alpha / RANK if alpha_mode == "rank" else 1.0  # FlashPortrait ignores alpha; LightX2V uses alpha/rank
    hooks = _explicit(explicit, sd, pairs, scale)
    inp = _inputs(cfg)
    with torch.no_grad():
        out_m, out_e, out_base = merged(**inp), explicit(**inp), _model()(**inp)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out_m, out_e, rtol=1e-4, atol=1e-5)
    assert (out_m - out_base).abs().max() > 1e-2  # the LoRA actually changed the output


def test_merge_bf16_accumulates_in_fp32_and_strength_round_trip(tmp_path):
    model = _model()
    sd, pairs = _lora(model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    w0 = model.blocks[0].self_attn.q.weight.detach().clone()
    delta = sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] @ sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    path = tmp_path / "fast_lora_rank64.safetensors"
    save_file(sd, str(path))
    load_and_merge_lora(model, path, strength=0.5)
    w1 = model.blocks[0].self_attn.q.weight
    assert w1.dtype == torch.bfloat16
    assert torch.equal(w1, (w0.float() + 0.5 * delta).to(torch.bfloat16))
    merge_lora(model, sd, strength=-0.5)  # un-merge
    back = model.blocks[0].self_attn.q.weight.float()
    assert (back - ref["blocks.0.self_attn.q.weight"]).abs().max() < 2e-2


def test_state_dict_target_and_errors():
    model = _model()
    sd, _ = _lora(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(state, sd)
    merge_lora(model, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(WeightsError, match="match no DiT parameter"):
        merge_lora(model, {"blocks.9.self_attn.q.lora_down.weight": torch.zeros(2, 64),
                           "blocks.9.self_attn.q.lora_up.weight": torch.zeros(64, 2)})
    with pytest.raises(WeightsError, match="no matching"):
        merge_lora(model, {"blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64)})
    before = model.blocks[0].self_attn.q.weight.clone()
    with pytest.raises(WeightsError, match="different model size"):
        merge_lora(model, {"blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 32),
                           "blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 2),
                           "blocks.0.self_attn.k.lora_down.weight": torch.ones(2, 64),
                           "blocks.0.self_attn.k.lora_up.weight": torch.ones(64, 2)})
    assert torch.equal(model.blocks[0].self_attn.q.weight, before)
