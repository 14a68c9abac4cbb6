"""The 24 GB mode (--low-vram) on the tiny preset, CPU: the DiT is built block by block straight into FP8 (the same
FP8 weights as building it whole and quantizing), a loaded model is moved block by block the same way, CLIP and the
Wan VAE are released once the conditioning exists, and the output stays within FP8 tolerance of the normal engine
with the same seed. (Peak GPU memory itself is measured by bench/stream_latency.py on a GPU: peak_gpu_gib.)
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

try:
    from tests.conftest import image_rgb
except ImportError:  # pytest's rootdir-relative import of conftest
    from conftest import image_rgb

from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig, get_preset
from engine.flashportrait import FlashPortraitEngine, make_schedule_for
from engine.models.dit import WanModel
from engine.low_vram import dit_bytes, place_dit, random_dit_blockwise
from kernels.fp8 import E4M3, Fp8Linear, quantize_linears, relative_error

LOW = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False, low_vram=True, emo_refresh=2)
CPU = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False, emo_refresh=2)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(seed: int, fp8: bool = False, dtype=torch.float32):
    torch.manual_seed(seed)
    return random_dit_blockwise(get_preset("tiny").dit, "cpu", dtype, fp8=fp8)


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.dtype == E4M3 else x,
                                                  y.view(torch.uint8) if y.dtype == E4M3 else y), k


def test_blockwise_build_draws_the_weights_of_the_whole_model():
    cfg = get_preset("tiny").dit
    torch.manual_seed(3)
    whole = WanModel(cfg).eval()
    after_whole = torch.rand(4)  # the RNG continues where the whole build left it: later networks are unchanged
    lean = build(3)
    assert torch.equal(torch.rand(4), after_whole)
    same_state(lean, whole)
    assert not any(p.is_meta for p in lean.parameters())
    assert build(3, dtype=torch.bfloat16).blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert not torch.equal(build(4).blocks[0].self_attn.q.weight, whole.blocks[0].self_attn.q.weight)


def test_blockwise_fp8_build_equals_whole_build_then_quantize():
    lean = build(3, fp8=True)
    whole = build(3)
    plain_bytes = dit_bytes(whole.blocks)
    quantize_linears(whole)
    same_state(lean, whole)
    assert not any(isinstance(m, nn.Linear) for n, m in lean.named_modules() if n.startswith("blocks."))
    assert dit_bytes(lean.blocks) < 0.4 * plain_bytes  # fp32 here: FP8 block linears take a quarter of the bytes


def test_place_dit_quantizes_block_by_block_like_the_whole_model():
    ref = build(1)
    quantize_linears(ref)
    same_state(place_dit(build(1), "cpu", fp8=True), ref)


def test_low_vram_engine_releases_encoders_and_matches_the_normal_engine():
    reference = image_rgb("lp_s0.jpg")
    kw = dict(preset="tiny", sampler=SamplerConfig(fast=True), window=WindowConfig(3, 2),
              random_weights=True)
    low = FlashPortraitEngine(reference, None, 64, 64, runtime=LOW, **kw)
    assert low.runtime.fp8 is True  # the 24 GB mode is the FP8 DiT
    low._load()
    clip, vae = weakref.ref(low.clip), weakref.ref(low.vae)
    low.warm_up()
    gc.collect()
    assert low.clip is None and low.vae is None and clip() is None and vae() is None
    assert low.released == ["clip", "wan_vae"] and low.stats()["released_after_conditioning"] == ["clip", "wan_vae"]
    assert low.stats()["low_vram"] is True and low.stats()["fp8"] is True
    blocks = [m for n, m in low.dit.named_modules() if n.startswith("blocks.")]
    assert not any(isinstance(m, nn.Linear) for m in blocks) and sum(isinstance(m, Fp8Linear) for m in blocks) == 28
    assert low.make_decoder() is not None  # the tiny decoder stays

    normal = FlashPortraitEngine(reference, None, 64, 64, runtime=CPU, **kw)
    normal.warm_up()
    assert normal.clip is not None and normal.released == []
    torch.testing.assert_close(low.y, normal.y)  # conditioning from the same encoders, before they were released
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 3, *low.latent_hw, generator=g)
    emo = torch.randn(1, 3, 97, low.preset.dit.emo_dim, generator=g)
    sched = make_schedule_for(low.sampler_cfg, 4)
    flows = [e.guided_flow(e.cached_dit(sched, ALPAConfig(mode="off")), x, 0, emo, key="k") for e in (low, normal)]
    err = relative_error(flows[0], flows[1])
    assert 1e-4 < err < 0.15, err  # FP8's rounding, nothing else


def test_low_vram_keeps_the_wan_decoder_when_it_decodes():
    from engine.flashportrait import EngineOptions

    eng = FlashPortraitEngine(np.full((64, 64, 3), 90, np.uint8), None, 64, 64, runtime=LOW, preset="tiny",
                              sampler=SamplerConfig(fast=True), window=WindowConfig(3, 2), random_weights=True,
                              options=EngineOptions(decoder="wan"))
    eng.warm_up()
    assert eng.released == ["clip", "wan_vae_encoder"] and eng.vae.encoder is None
    z = torch.randn(1, 16, 1, *eng.latent_hw)
    assert eng.make_decoder().decode(z).shape == (1, 3, 1, 64, 64)
