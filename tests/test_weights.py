"""Checkpoint loading: tiny checkpoints written in the published layouts (Wan safetensors shards + index,
FlashPortrait transformer.pt pickle, diffusers layout, portrait_encoder.pt) round-trip; broken ones give one
clear WeightsError sentence; scan_weights reports what a folder holds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.config import get_preset
from engine.models.dit import WanModel
from engine.models.portrait_encoder import PortraitEncoder
from engine.models.dit_keys import wan_to_diffusers
from engine.weights import WAN_INDEX, WeightsError, load_dit, load_into, load_portrait_encoder, scan_weights

PRESET = get_preset("tiny")
CFG = PRESET.dit


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_shards(folder: Path, sd: dict, n: int = 3, index_name: str = WAN_INDEX) -> Path:
    """Split `sd` over n safetensors files with a Wan-style index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    index = folder / index_name
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def assert_same_weights(model, sd):
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_wan_shards_round_trip(tmp_path, reference):
    sd = state(reference)
    write_shards(tmp_path / "Wan2.1-I2V", sd)
    model = load_dit(tmp_path, CFG, dtype=torch.float32)
    assert_same_weights(model, sd)
    assert not any(p.is_meta for p in model.parameters())


def test_dit_found_next_to_a_vae_with_the_same_file_name(tmp_path, reference):
    # diffusers repos name the VAE diffusion_pytorch_model.safetensors too (and "transformer" sorts after "t...")
    (tmp_path / "a_vae").mkdir()
    save_file({"encoder.conv1.weight": torch.zeros(2, 3)}, str(tmp_path / "a_vae" / "diffusion_pytorch_model.safetensors"))
    sd = state(reference)
    (tmp_path / "transformer").mkdir()
    save_file(wan_to_diffusers(sd), str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert_same_weights(load_dit(tmp_path, CFG, dtype=torch.float32), sd)


def test_plain_wan_gets_zero_nfeb(tmp_path, reference):
    sd = {k: v for k, v in state(reference).items() if ".emo_" not in k}
    write_shards(tmp_path, sd)
    model = load_dit(tmp_path, CFG, dtype=torch.float32)
    assert torch.count_nonzero(model.blocks[1].cross_attn.emo_v_proj.weight) == 0
    assert torch.equal(model.blocks[1].cross_attn.q.weight, sd["blocks.1.cross_attn.q.weight"])


def test_flashportrait_pickle_nested_and_prefixed(tmp_path, reference):
    sd = state(reference)
    torch.save({"state_dict": {f"transformer3d.{k}": v for k, v in sd.items()}}, tmp_path / "transformer.pt")
    model = load_dit(tmp_path, CFG, dtype=torch.float32)
    assert_same_weights(model, sd)


def test_flashportrait_overrides_wan_base(tmp_path, reference):
    sd = state(reference)
    base = {k: torch.zeros_like(v) for k, v in sd.items() if ".emo_" not in k}
    write_shards(tmp_path / "wan", base)
    # transformer.pt holds only the fine-tuned attention blocks here: the rest must come from the base shards
    fp = {k: v for k, v in sd.items() if "attn" in k}
    (tmp_path / "flashportrait").mkdir()
    torch.save(fp, tmp_path / "flashportrait" / "transformer.pt")
    model = load_dit(tmp_path, CFG, dtype=torch.float32)
    own = model.state_dict()
    for k in sd:
        assert torch.equal(own[k], fp[k] if k in fp else base[k]), k


def test_diffusers_layout_is_converted(tmp_path, reference):
    sd = state(reference)
    write_shards(tmp_path, wan_to_diffusers(sd))
    assert_same_weights(load_dit(tmp_path, CFG, dtype=torch.float32), sd)


def test_bf16_load_is_zero_copy_and_conversion_keeps_sources(tmp_path, reference):
    sd = {k: v.to(torch.bfloat16) for k, v in state(reference).items()}
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = load_dit(tmp_path, CFG, dtype=torch.bfloat16)
    assert_same_weights(model, sd)
    # parameters are the file's mapped pages, not copies
    w = model.blocks[0].ffn[0].weight
    assert w.untyped_storage().nbytes() >= (tmp_path / "diffusion_pytorch_model.safetensors").stat().st_size
    # converting an in-memory (anonymous) state dict must never release its pages
    src = state(reference)
    keep = {k: v.clone() for k, v in src.items()}
    with torch.device("meta"):
        m2 = WanModel(CFG)
    load_into(m2, src, "memory", dtype=torch.bfloat16)
    for k in keep:
        assert torch.equal(src[k], keep[k])
    # converting from a file mapping releases source pages but the values stay right when read again
    f32 = tmp_path / "f32" / "transformer.pt"
    f32.parent.mkdir()
    torch.save(state(reference), f32)
    m3 = load_dit(None, CFG, dtype=torch.bfloat16, paths=[f32])
    again = torch.load(f32, mmap=True, weights_only=True)
    for k, v in m3.state_dict().items():
        assert torch.equal(v, again[k].to(torch.bfloat16)), k


def test_portrait_encoder_round_trip(tmp_path):
    torch.manual_seed(2)
    enc = PortraitEncoder(PRESET.portrait)
    sd = state(enc)
    torch.save(sd, tmp_path / "portrait_encoder.pt")
    loaded = load_portrait_encoder(tmp_path, PRESET.portrait)
    assert_same_weights(loaded, sd)
    x = torch.randn(1, 5, 554)
    assert torch.equal(loaded(x), enc.eval()(x))


# ---- errors: one sentence naming the file, never a torch traceback --------------------------------------------
def one_sentence(err: WeightsError, path_part: str):
    msg = str(err.value)
    assert path_part in msg and msg.endswith(".") and "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_dit(tmp_path, CFG)
    assert "Missing transformer.pt" in one_sentence(err, str(tmp_path))


def test_missing_shard(tmp_path, reference):
    index = write_shards(tmp_path, state(reference))
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsError) as err:
        load_dit(tmp_path, CFG)
    assert "Missing shard" in one_sentence(err, victim.name) and index.name in str(err.value)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_file(tmp_path, reference, fmt):
    if fmt == "safetensors":
        write_shards(tmp_path, state(reference), n=1)
        path = next(tmp_path.glob("*.safetensors"))
    else:
        path = tmp_path / "transformer.pt"
        torch.save(state(reference), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError) as err:
        load_dit(tmp_path, CFG)
    assert "truncated" in one_sentence(err, path.name)


def test_wrong_shape_tensor(tmp_path, reference):
    sd = state(reference)
    sd["blocks.1.ffn.0.weight"] = sd["blocks.1.ffn.0.weight"][:-1]
    torch.save(sd, tmp_path / "transformer.pt")
    with pytest.raises(WeightsError) as err:
        load_dit(tmp_path, CFG)
    msg = one_sentence(err, "transformer.pt")
    assert "shape mismatch" in msg and "blocks.1.ffn.0.weight" in msg


def test_wrong_model_checkpoint(tmp_path):
    torch.save(state(PortraitEncoder(PRESET.portrait)), tmp_path / "transformer.pt")
    with pytest.raises(WeightsError) as err:
        load_dit(tmp_path, CFG)
    assert "different model" in one_sentence(err, "transformer.pt")


def test_wrong_preset_is_named(tmp_path, reference):
    torch.save(state(reference), tmp_path / "transformer.pt")
    with pytest.raises(WeightsError) as err:
        load_dit(tmp_path, get_preset("1.3b").dit)
    assert "--preset tiny" in one_sentence(err, "transformer.pt")


class _NotATensor:
    pass


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"x": _NotATensor()}, tmp_path / "transformer.pt")
    with pytest.raises(WeightsError) as err:
        load_dit(tmp_path, CFG)
    assert "never unpickles" in one_sentence(err, "transformer.pt")


def test_scan_weights(tmp_path, reference):
    sd = state(reference)
    write_shards(tmp_path / "Wan2.1-I2V-14B-720P", {k: v for k, v in sd.items() if ".emo_" not in k})
    (tmp_path / "FlashPortrait").mkdir()
    torch.save(sd, tmp_path / "FlashPortrait" / "transformer.pt")
    bad = tmp_path / "FlashPortrait" / "portrait_encoder.pt"
    torch.save(state(PortraitEncoder(PRESET.portrait)), bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    (tmp_path / "face_det.onnx").write_bytes(b"\x08\x07\x3a\x00")  # ModelProto: ir_version 7, an (empty) graph
    rows = {Path(f).name: (ok, msg) for f, ok, msg in scan_weights(tmp_path, "tiny")}
    assert rows[WAN_INDEX][0] and "no NFEB" in rows[WAN_INDEX][1]
    assert rows["transformer.pt"][0] and "with NFEB" in rows["transformer.pt"][1]
    assert not rows["portrait_encoder.pt"][0] and "truncated" in rows["portrait_encoder.pt"][1]
    assert rows["face_det.onnx"][0]
    assert not rows["Wan2.1_VAE.pth"][0] and "missing" in rows["Wan2.1_VAE.pth"][1]
    assert rows["fast_lora_rank64.safetensors"][0]  # optional
    # the same folder scanned for the wrong preset says which preset fits
    rows = {Path(f).name: (ok, msg) for f, ok, msg in scan_weights(tmp_path, "1.3b")}
    assert not rows["transformer.pt"][0] and "--preset tiny" in rows["transformer.pt"][1]


def test_legacy_torch_save_format_still_loads(tmp_path, reference):
    sd = state(reference)
    torch.save(sd, tmp_path / "transformer.pt", _use_new_zipfile_serialization=False)
    assert_same_weights(load_dit(tmp_path, CFG, dtype=torch.float32), sd)
