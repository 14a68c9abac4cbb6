"""TAEHV (taew2_1 layout): key layout, frame accounting per chunk, streaming == whole == per-timestep reference,
loading."""
from __future__ import annotations

import pytest
import torch

from engine.config import TinyVAEConfig, get_preset
from engine.models.tiny_vae import (MemBlock, StreamingTinyDecoder, TGrow, TinyVAE, load_tiny_vae, required_files)
from engine.weights import WeightsError

CFG = get_preset("tiny").tiny_vae


def random_taehv(cfg: TinyVAEConfig, seed: int = 0) -> TinyVAE:
    torch.manual_seed(seed)
    model = TinyVAE(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # fan-in-scaled weights and small positive biases keep a random ReLU net alive
            if p.dim() == 1:
                p.uniform_(0.0, 0.1)
            else:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
        model.decoder[22].bias.fill_(0.5)  # centre the output in [0, 1] so little is clamped
    return model


def reference_decode(model: TinyVAE, z: torch.Tensor) -> torch.Tensor:
    """TAEHV's sequential semantics, one timestep at a time, written independently of run_with_memory.

    z (16, T, h, w) for one sample -> (4T - 3, 3, H, W) in [0, 1]. A TGrow turns one frame into s frames, each
    of which runs through the rest of the network before the next (depth first = time order).
    """
    layers = list(model.decoder)
    memory: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def run(start: int, x: torch.Tensor) -> None:
        for i in range(start, len(layers)):
            layer = layers[i]
            if isinstance(layer, MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                y = layer.conv(x)
                n = x.shape[1]
                for j in range(layer.stride):
                    run(i + 1, y[:, j * n:(j + 1) * n])
                return
            else:
                x = layer(x)
        out.append(x)

    with torch.no_grad():
        for t in range(z.shape[1]):
            run(0, z[:, t][None])
    return torch.cat(out)[3:].clamp(0, 1)


@pytest.fixture(scope="module")
def model():
    return random_taehv(CFG)


def test_decoder_frames_and_reference(model):
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    out = model.decode(z)
    assert out.shape == (1, 3, 4 * 3 - 3, 16, 24)
    ref = reference_decode(model, z[0]) * 2 - 1  # (9, 3, 16, 24)
    assert ref.std() > 0.05  # a live network, not all clamped
    assert torch.allclose(out[0].transpose(0, 1), ref, atol=1e-5)


@pytest.mark.parametrize("sizes", [(1, 2, 3), (3, 2, 1), (2, 1, 1, 2), (1, 1, 1, 1, 1, 1)])
def test_streaming_equals_whole(model, sizes):
    z = torch.randn(2, 16, sum(sizes), 2, 2, generator=torch.Generator().manual_seed(2))
    whole = model.decode(z)
    stream = StreamingTinyDecoder(model)
    pieces = []
    start = 0
    for i, n in enumerate(sizes):
        frames = stream.decode(z[:, :, start:start + n])
        assert frames.shape == (2, 3, 4 * n - 3 if i == 0 else 4 * n, 16, 16)
        pieces.append(frames)
        start += n
    assert torch.allclose(torch.cat(pieces, dim=2), whole, atol=1e-5)
    stream.reset()
    assert torch.allclose(stream.decode(z[:, :, :2]), whole[:, :, :5], atol=1e-6)


def test_encoder_shapes(model):
    video = torch.rand(1, 3, 9, 32, 24) * 2 - 1
    z = model.encode(video)  # 9 frames are padded to 12 -> 3 latents
    assert z.shape == (1, 16, 3, 4, 3)
    assert torch.isfinite(z).all()


def test_key_layout_matches_taew2_1():
    with torch.device("meta"):
        sd = TinyVAE(TinyVAEConfig()).state_dict()
    expect = {
        "decoder.1.weight": (256, 16, 3, 3), "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.5.conv.4.weight": (256, 256, 3, 3), "decoder.7.conv.weight": (256, 256, 1, 1),
        "decoder.8.weight": (128, 256, 3, 3), "decoder.13.conv.weight": (256, 128, 1, 1),
        "decoder.14.weight": (64, 128, 3, 3), "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.20.weight": (64, 64, 3, 3), "decoder.22.weight": (3, 64, 3, 3),
        "encoder.0.weight": (64, 3, 3, 3), "encoder.2.conv.weight": (64, 128, 1, 1),
        "encoder.3.weight": (64, 64, 3, 3), "encoder.12.conv.weight": (64, 64, 1, 1),
        "encoder.17.weight": (16, 64, 3, 3),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    for k in ("decoder.8.bias", "decoder.14.bias", "decoder.20.bias", "encoder.3.bias", "decoder.7.conv.bias"):
        assert k not in sd
    assert "decoder.22.bias" in sd and "decoder.1.bias" in sd


def test_load_taew2_1_checkpoint_keeps_last_tgrow_rows(tmp_path, model):
    sd = {k: v.clone() for k, v in random_taehv(CFG, seed=3).state_dict().items()}
    c0 = CFG.channels[0]
    sd["decoder.7.conv.weight"] = torch.randn(2 * c0, c0, 1, 1)  # stored with more temporal upscaling
    torch.save(sd, tmp_path / "taew2_1.pth")
    loaded = load_tiny_vae(tmp_path, CFG)
    assert torch.equal(loaded.decoder[7].conv.weight, sd["decoder.7.conv.weight"][-c0:])
    assert torch.equal(loaded.decoder[22].weight, sd["decoder.22.weight"])
    assert loaded.encoder is not None


def test_load_decoder_only_checkpoint(tmp_path, model):
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    torch.save(sd, tmp_path / "fast_vae.pth")
    loaded = load_tiny_vae(tmp_path, CFG)
    assert loaded.encoder is None
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(loaded.decode(z), model.decode(z))
    with pytest.raises(WeightsError, match="no encoder"):
        loaded.encode(torch.zeros(1, 3, 4, 16, 16))


def test_missing_file_is_one_sentence(tmp_path):
    with pytest.raises(WeightsError, match="fast_vae.pth") as err:
        load_tiny_vae(tmp_path, CFG)
    assert str(tmp_path) in str(err.value)
    assert required_files()[0][0] == "fast_vae.pth"
