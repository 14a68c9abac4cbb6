"""umT5 encoder: a tiny random checkpoint in the Wan layout loads and equals transformers' UMT5EncoderModel; the
tokenizer is read from the weights folder; the prompt context is cached on disk and the encoder is not kept."""
from __future__ import annotations

import gc

import pytest
import torch

from engine.config import T5Config, get_preset
from engine.models.text import (T5_FILE, TOKENIZER_FILE, PromptEncoder, T5Encoder, UMT5Tokenizer, clean_prompt,
                         find_tokenizer, load_t5_encoder, required_files)
from engine.weights import WeightsError

CFG = get_preset("tiny").t5
WORDS = "a person is talking and smiling to the camera in warm light with calm face".split()


def random_wan_t5(cfg: T5Config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in T5Encoder(cfg).state_dict().items():
        if "norm" in k:
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif "pos_embedding" in k or "token_embedding" in k:
            sd[k] = torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5
    return sd


def to_transformers(sd: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """Wan umT5 keys -> transformers UMT5EncoderModel keys."""
    out = {"shared.weight": sd["token_embedding.weight"], "encoder.embed_tokens.weight": sd["token_embedding.weight"],
           "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for i in range(cfg.num_layers):
        s, t = f"blocks.{i}.", f"encoder.block.{i}.layer."
        for p in "qkvo":
            out[f"{t}0.SelfAttention.{p}.weight"] = sd[f"{s}attn.{p}.weight"]
        out[f"{t}0.SelfAttention.relative_attention_bias.weight"] = sd[f"{s}pos_embedding.embedding.weight"]
        out[f"{t}0.layer_norm.weight"] = sd[f"{s}norm1.weight"]
        out[f"{t}1.layer_norm.weight"] = sd[f"{s}norm2.weight"]
        out[f"{t}1.DenseReluDense.wi_0.weight"] = sd[f"{s}ffn.gate.0.weight"]  # the GELU-gated branch
        out[f"{t}1.DenseReluDense.wi_1.weight"] = sd[f"{s}ffn.fc1.weight"]
        out[f"{t}1.DenseReluDense.wo.weight"] = sd[f"{s}ffn.fc2.weight"]
    return out


def write_tokenizer(folder) -> None:
    """A tiny word-level tokenizer in the tokenizers JSON format, with T5's special tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = folder / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


@pytest.fixture
def weights(tmp_path):
    sd = random_wan_t5(CFG)
    torch.save(sd, tmp_path / T5_FILE)
    write_tokenizer(tmp_path)
    return tmp_path, sd


def test_matches_transformers_umt5(weights):
    from transformers import UMT5Config, UMT5EncoderModel

    path, sd = weights
    ours = load_t5_encoder(path, CFG, dtype=torch.float32)
    ref = UMT5EncoderModel(UMT5Config(
        vocab_size=CFG.vocab_size, d_model=CFG.dim, d_kv=CFG.dim_attn // CFG.num_heads, d_ff=CFG.dim_ffn,
        num_layers=CFG.num_layers, num_heads=CFG.num_heads, relative_attention_num_buckets=CFG.num_buckets,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=1e-6)).eval()
    ref.load_state_dict(to_transformers(sd, CFG), strict=True)
    # 150 tokens reach every bucket regime: exact (<8), logarithmic, saturated (>128); sample 1 is padded.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 150), generator=g)
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 37:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    assert out.shape == (2, 150, CFG.dim)
    assert torch.allclose(out[0], expected[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(out[1, :37], expected[1, :37], atol=1e-5, rtol=1e-4)
    # Masked padding equals no padding at all (what PromptEncoder does: it encodes the true length only).
    with torch.no_grad():
        assert torch.allclose(ours(ids[1:, :37])[0], out[1, :37], atol=1e-5)


def test_tokenizer_appends_eos_and_truncates(weights):
    path, _ = weights
    tok = UMT5Tokenizer(find_tokenizer(path), text_len=CFG.text_len)
    ids = tok("a  person &amp;amp; talking\n")
    assert ids.tolist() == [3, 4, 2, 6, 1]  # a, person, <unk> for '&', talking, </s>
    long_ids = tok(" ".join(WORDS * 3))
    assert len(long_ids) == CFG.text_len and long_ids[-1] == 1
    assert clean_prompt("x &amp;lt; y \t z") == "x < y z"


def test_prompt_cache_hit_on_second_call(weights, tmp_path_factory):
    path, sd = weights
    cache = tmp_path_factory.mktemp("prompt_cache")
    enc = PromptEncoder(path, cache, CFG, dtype=torch.float32)
    first = enc.encode("a person is talking")
    assert (enc.hits, enc.misses) == (0, 1)
    assert first.shape == (5, CFG.dim)  # 4 words + </s>
    gc.collect()
    assert not any(type(o) is T5Encoder for o in gc.get_objects())  # the encoder was freed
    model = T5Encoder(CFG)
    model.load_state_dict(sd)
    with torch.no_grad():
        direct = model(torch.tensor([[3, 4, 5, 6, 1]]))[0]
    assert torch.allclose(first, direct, atol=1e-6)
    # The second call must not touch the encoder: remove the checkpoint and the tokenizer first.
    (path / T5_FILE).unlink()
    (path / TOKENIZER_FILE).unlink()
    again = PromptEncoder(path, cache, CFG, dtype=torch.float32)
    second = again.encode("a person is talking")
    assert (again.hits, again.misses) == (1, 0)
    assert torch.equal(second, first)
    with pytest.raises(WeightsError, match="tokenizer.json"):  # a new prompt is a miss and needs the files
        again.encode("a person is smiling")
    assert again.misses == 1
    assert not list(cache.glob("*.tmp*"))


def test_tokenizer_in_other_folder_is_not_taken(tmp_path):
    write_tokenizer(tmp_path)
    other = tmp_path / "xlm-roberta-large"
    other.mkdir()
    (tmp_path / TOKENIZER_FILE).rename(other / "tokenizer.json")
    with pytest.raises(WeightsError, match="google/umt5-xxl"):
        find_tokenizer(tmp_path)
    nested = tmp_path / "Wan2.1-I2V-14B-720P" / "umt5-xxl"
    nested.mkdir(parents=True)
    (other / "tokenizer.json").rename(nested / "tokenizer.json")
    assert find_tokenizer(tmp_path) == nested / "tokenizer.json"


def test_missing_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(WeightsError, match=T5_FILE):
        load_t5_encoder(tmp_path, CFG)
    assert [name for name, _ in required_files()] == [T5_FILE, TOKENIZER_FILE]


def test_real_config_key_shapes():
    with torch.device("meta"):
        sd = T5Encoder(T5Config()).state_dict()
    assert tuple(sd["token_embedding.weight"].shape) == (256384, 4096)
    assert tuple(sd["blocks.23.ffn.gate.0.weight"].shape) == (10240, 4096)
    assert tuple(sd["blocks.23.ffn.fc2.weight"].shape) == (4096, 10240)
    assert tuple(sd["blocks.0.pos_embedding.embedding.weight"].shape) == (32, 64)
    assert tuple(sd["norm.weight"].shape) == (4096,)
    assert len(sd) == 1 + 24 * 10 + 1  # per block: 2 norms, q k v o, gate fc1 fc2, position table
