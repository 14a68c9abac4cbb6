"""Wan VAE: parity with diffusers' AutoencoderKLWan through our key map, streaming decode == whole decode, loading."""
from __future__ import annotations

import re

import pytest
import torch

from engine.config import VAEConfig, get_preset
from engine.models.vae import (LATENT_MEAN, LATENT_STD, VAE_FILE, StreamingDecoder, WanVAE, load_vae, required_files)
from engine.weights import WeightsError

CFG = get_preset("tiny").vae


def random_wan_state_dict(cfg: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the original Wan layout, scaled so activations stay O(1) and outputs are not all clamped."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in WanVAE(cfg).state_dict().items():
        if k.endswith("gamma"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.05 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) / fan_in**0.5
    return sd


def _resblock(dst: str, rest: str) -> str:
    rest = re.sub(r"^residual\.0\.", "norm1.", rest)
    rest = re.sub(r"^residual\.2\.", "conv1.", rest)
    rest = re.sub(r"^residual\.3\.", "norm2.", rest)
    rest = re.sub(r"^residual\.6\.", "conv2.", rest)
    rest = re.sub(r"^shortcut\.", "conv_shortcut.", rest)
    return f"{dst}.{rest}"


def wan_to_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our key map: original Wan2.1 VAE keys -> diffusers AutoencoderKLWan keys."""
    # Decoder upsamples are one flat Sequential in Wan; diffusers groups them per level.
    up_names = []
    for level in range(len(cfg.dim_mult)):
        up_names += [f"up_blocks.{level}.resnets.{j}" for j in range(cfg.num_res_blocks + 1)]
        if level != len(cfg.dim_mult) - 1:
            up_names.append(f"up_blocks.{level}.upsamplers.0")
    middle = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
    out = {}
    for key, value in sd.items():
        part, _, rest = key.partition(".")
        if part == "conv1":
            new = f"quant_conv.{rest}"
        elif part == "conv2":
            new = f"post_quant_conv.{rest}"
        else:  # encoder / decoder
            sub, _, rest = rest.partition(".")
            if sub == "conv1":
                new = f"{part}.conv_in.{rest}"
            elif sub == "head":
                idx, _, rest = rest.partition(".")
                new = f"{part}.{'norm_out' if idx == '0' else 'conv_out'}.{rest}"
            elif sub == "middle":
                idx, _, rest = rest.partition(".")
                dst = f"{part}.{middle[idx]}"
                new = f"{dst}.{rest}" if idx == "1" else _resblock(dst, rest)
            else:
                idx, _, rest = rest.partition(".")
                dst = f"{part}.down_blocks.{idx}" if sub == "downsamples" else f"{part}.{up_names[int(idx)]}"
                new = _resblock(dst, rest) if rest.startswith(("residual", "shortcut")) else f"{dst}.{rest}"
        out[new] = value
    return out


@pytest.fixture(scope="module")
def models():
    from diffusers import AutoencoderKLWan

    sd = random_wan_state_dict(CFG)
    ours = WanVAE(CFG).eval()
    ours.load_state_dict(sd, strict=True)
    ref = AutoencoderKLWan(base_dim=CFG.dim, z_dim=CFG.z_dim, dim_mult=list(CFG.dim_mult),
                           num_res_blocks=CFG.num_res_blocks, temperal_downsample=list(CFG.temporal_downsample),
                           latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD)).eval()
    missing, unexpected = ref.load_state_dict(wan_to_diffusers(sd, CFG), strict=True)
    assert not missing and not unexpected
    return ours, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def stats(device="cpu"):
    return torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


def test_encode_matches_diffusers(models):
    ours, ref = models
    video = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # 3 encoder chunks
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mean
    mean, std = stats()
    z = ours.encode(video)
    assert z.shape == (1, CFG.z_dim, 3, 2, 2)
    assert rel_err(z, (mu - mean) / std) <= 1e-5


def test_decode_matches_diffusers(models):
    ours, ref = models
    # 3 latents: the first passes the temporal upsamplers alone, the second sees zero history, the third real history.
    z = torch.randn(1, CFG.z_dim, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    mean, std = stats()
    with torch.no_grad():
        expected = ref.decode(z * std + mean).sample
    out = ours.decode(z)
    assert out.shape == (1, 3, 1 + 4 * 2, 32, 32)
    # The comparison means something only if most pixels are inside the clamp range.
    assert (expected.abs() < 0.999).float().mean() > 0.5
    assert rel_err(out, expected) <= 1e-5


@pytest.fixture(scope="module")
def latents_and_whole(models):
    ours, _ = models
    z = torch.randn(1, CFG.z_dim, 6, 2, 2, generator=torch.Generator().manual_seed(3))
    return z, ours.decode(z)  # Wan's schedule: one latent frame at a time


@pytest.mark.parametrize("sizes", [(1, 2, 3), (3, 2, 1), (2, 1, 3), (6,)])
def test_streaming_decode_equals_whole(models, latents_and_whole, sizes):
    ours, _ = models
    z, whole = latents_and_whole
    stream = StreamingDecoder(ours)
    pieces, start = [], 0
    for i, n in enumerate(sizes):
        frames = stream.decode(z[:, :, start:start + n])
        assert frames.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        pieces.append(frames)
        start += n
    assert torch.allclose(torch.cat(pieces, dim=2), whole, atol=1e-5, rtol=1e-5)


def test_stream_reset_starts_over(models, latents_and_whole):
    ours, _ = models
    z, whole = latents_and_whole
    stream = StreamingDecoder(ours)
    first = stream.decode(z[:, :, :2])
    assert not torch.allclose(stream.decode(z[:, :, :2])[:, :, -4:], first[:, :, -4:])  # history matters
    stream.reset()
    assert torch.equal(stream.decode(z[:, :, :2]), first)


def test_encode_reference_is_causal(models):
    ours, _ = models
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    y = ours.encode_reference(image, 3)  # video [image, 8 zero frames]
    assert y.shape == (1, CFG.z_dim, 3, 2, 2)
    # Causality: the first latent depends on the first frame only.
    assert torch.allclose(y[:, :, :1], ours.encode(image[:, :, None]), atol=1e-6)
    video = torch.zeros(1, 3, 9, 16, 16)
    video[:, :, 0] = image
    assert torch.equal(y, ours.encode(video))


def test_encode_rejects_bad_frame_count(models):
    ours, _ = models
    with pytest.raises(ValueError, match="1\\+4k"):
        ours.encode(torch.zeros(1, 3, 4, 16, 16))


def test_load_from_wan_checkpoint(tmp_path, models):
    ours, _ = models
    sd = random_wan_state_dict(CFG, seed=7)
    torch.save(sd, tmp_path / VAE_FILE)
    vae = load_vae(tmp_path, CFG)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in sd.items())
    assert required_files()[0][0] == VAE_FILE


def test_missing_weights_names_the_file(tmp_path):
    with pytest.raises(WeightsError, match=re.escape(VAE_FILE)) as err:
        load_vae(tmp_path, CFG)
    assert str(tmp_path) in str(err.value)


def test_wrong_checkpoint_is_one_sentence(tmp_path):
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, tmp_path / VAE_FILE)
    with pytest.raises(WeightsError, match="does not fit WanVAE"):
        load_vae(tmp_path, CFG)


def test_real_config_key_shapes():
    """The default config builds exactly the published key shapes (CHECKPOINT_KEYS section 3)."""
    with torch.device("meta"):
        sd = WanVAE(VAEConfig()).state_dict()
    expect = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.10.residual.6.weight": (384, 384, 3, 3, 3),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.2.weight": (96, 96, 3, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("decoder.upsamples.15") for k in sd)
