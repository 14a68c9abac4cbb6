"""CLIP vision tower: a tiny random open-clip checkpoint in the Wan layout loads and equals transformers'
CLIPVisionModel hidden_states[-2]; preprocessing follows Wan."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.clip_vision import CLIP_FILE, CLIP_MEAN, CLIP_STD, ClipVision, load_clip_vision, required_files
from engine.config import ClipVisionConfig, get_preset
from engine.weights import WeightsError

CFG = get_preset("tiny").clip


def full_open_clip_state_dict(cfg: ClipVisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every `visual.*` key of the open-clip XLM-R ViT checkpoint (all blocks, post_norm, head) plus text keys."""
    g = torch.Generator().manual_seed(seed)
    d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(shape, generator=g) * scale

    sd = {
        "visual.patch_embedding.weight": rnd(d, 3, cfg.patch_size, cfg.patch_size, scale=0.1),
        "visual.cls_embedding": rnd(1, 1, d, scale=0.5),
        "visual.pos_embedding": rnd(1, cfg.num_tokens, d, scale=0.5),
        "visual.pre_norm.weight": 1 + rnd(d, scale=0.1), "visual.pre_norm.bias": rnd(d, scale=0.1),
        "visual.post_norm.weight": 1 + rnd(d, scale=0.1), "visual.post_norm.bias": rnd(d, scale=0.1),
        "visual.head": rnd(d, 16),
        "textual.token_embedding.weight": rnd(10, 8), "log_scale": torch.tensor(4.6),
    }
    for i in range(cfg.layers):
        p = f"visual.transformer.{i}."
        sd.update({
            p + "norm1.weight": 1 + rnd(d, scale=0.1), p + "norm1.bias": rnd(d, scale=0.1),
            p + "attn.to_qkv.weight": rnd(3 * d, d), p + "attn.to_qkv.bias": rnd(3 * d, scale=0.1),
            p + "attn.proj.weight": rnd(d, d), p + "attn.proj.bias": rnd(d, scale=0.1),
            p + "norm2.weight": 1 + rnd(d, scale=0.1), p + "norm2.bias": rnd(d, scale=0.1),
            p + "mlp.0.weight": rnd(hidden, d), p + "mlp.0.bias": rnd(hidden, scale=0.1),
            p + "mlp.2.weight": rnd(d, hidden), p + "mlp.2.bias": rnd(d, scale=0.1),
        })
    return sd


def to_transformers(sd: dict[str, torch.Tensor], cfg: ClipVisionConfig, v: str) -> dict[str, torch.Tensor]:
    """Wan/open-clip vision keys -> transformers CLIPVisionModel keys under prefix `v` (to_qkv split into q, k, v)."""
    d = cfg.width
    out = {
        v + "embeddings.patch_embedding.weight": sd["visual.patch_embedding.weight"],
        v + "embeddings.class_embedding": sd["visual.cls_embedding"].reshape(d),
        v + "embeddings.position_embedding.weight": sd["visual.pos_embedding"].reshape(-1, d),
        v + "pre_layrnorm.weight": sd["visual.pre_norm.weight"], v + "pre_layrnorm.bias": sd["visual.pre_norm.bias"],
        v + "post_layernorm.weight": sd["visual.post_norm.weight"],
        v + "post_layernorm.bias": sd["visual.post_norm.bias"],
    }
    for i in range(cfg.layers):
        s, t = f"visual.transformer.{i}.", f"{v}encoder.layers.{i}."
        for name, (w, b) in zip(("q_proj", "k_proj", "v_proj"),
                                zip(sd[s + "attn.to_qkv.weight"].chunk(3), sd[s + "attn.to_qkv.bias"].chunk(3))):
            out[f"{t}self_attn.{name}.weight"], out[f"{t}self_attn.{name}.bias"] = w, b
        pairs = {"attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
                 "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
        for src, dst in pairs.items():
            out[f"{t}{dst}.weight"], out[f"{t}{dst}.bias"] = sd[f"{s}{src}.weight"], sd[f"{s}{src}.bias"]
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    sd = full_open_clip_state_dict(CFG)
    path = tmp_path_factory.mktemp("clip")
    torch.save({f"model.{k}": v for k, v in sd.items()}, path / CLIP_FILE)  # FlashPortrait's `model.` prefix
    return path, sd


def test_matches_transformers_penultimate_hidden_state(checkpoint):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path, sd = checkpoint
    ours = load_clip_vision(path, CFG)
    hf_cfg = CLIPVisionConfig(hidden_size=CFG.width, intermediate_size=int(CFG.width * CFG.mlp_ratio),
                              num_hidden_layers=CFG.layers, num_attention_heads=CFG.heads, image_size=CFG.image_size,
                              patch_size=CFG.patch_size, hidden_act="gelu", layer_norm_eps=CFG.eps,
                              attn_implementation="eager")
    ref = CLIPVisionModel(hf_cfg).eval()
    # transformers 4 nests the tower under `vision_model.`, transformers 5 does not.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in ref.state_dict()) else ""
    missing, unexpected = ref.load_state_dict(to_transformers(sd, CFG, prefix), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        out = ours(pixels)
    assert out.shape == (2, CFG.num_tokens, CFG.width)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)
    # The last block really is skipped: the final hidden state differs.
    assert not torch.allclose(out, ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-1], atol=1e-3)


def test_preprocess_is_wans(checkpoint):
    path, _ = checkpoint
    model = load_clip_vision(path, CFG)
    image = torch.rand(1, 3, 40, 56) * 2 - 1
    x = model.preprocess(image)
    resized = F.interpolate(image, size=(CFG.image_size,) * 2, mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (resized * 0.5 + 0.5 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    assert model.encode(image).shape == (1, CFG.num_tokens, CFG.width)


def test_real_config_tokens_and_unused_keys_dropped():
    cfg = ClipVisionConfig()
    assert cfg.num_tokens == 257
    with torch.device("meta"):
        sd = ClipVision(cfg).state_dict()
    assert tuple(sd["patch_embedding.weight"].shape) == (1280, 3, 14, 14)
    assert tuple(sd["transformer.30.attn.to_qkv.weight"].shape) == (3840, 1280)
    assert tuple(sd["transformer.30.mlp.0.weight"].shape) == (5120, 1280)
    assert "transformer.31.norm1.weight" not in sd and "post_norm.weight" not in sd


def test_checkpoint_without_vision_keys_is_one_sentence(tmp_path):
    torch.save({"textual.token_embedding.weight": torch.zeros(4, 4)}, tmp_path / CLIP_FILE)
    with pytest.raises(WeightsError, match="does not fit ClipVision"):
        load_clip_vision(tmp_path, CFG)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(WeightsError, match=CLIP_FILE):
        load_clip_vision(tmp_path, CFG)
    assert required_files()[0][0] == CLIP_FILE
