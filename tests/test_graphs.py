"""CompiledStep: same numbers as WanModel.forward, session reuse, compile traceability, CUDA graph properties."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine.config import RuntimeConfig, get_preset
from engine.models.dit import WanModel
from kernels.graphs import CompiledStep, StepShape

CPU = RuntimeConfig(device="cpu", compile=False, cuda_graphs=False)


def make(seed=0, batch=2, frames=3, hw=8, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = get_preset("tiny").dit
    model = WanModel(cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device)

    shape = StepShape(batch, frames, hw, hw)
    session = dict(context=rnd(batch, 10, cfg.text_dim), clip_fea=rnd(batch, cfg.clip_tokens, cfg.clip_dim),
                   y=rnd(batch, 20, frames, hw, hw))
    call = dict(x=rnd(batch, 16, frames, hw, hw), t=torch.linspace(900.0, 250.0, batch, device=device),
                emo=rnd(batch, frames, cfg.emo_tokens_per_frame, cfg.emo_dim).to(dtype))
    return model, shape, session, call


@torch.no_grad()
def reference(model, session, call, emo=True, ip_scale=0.7):
    return model(call["x"], call["t"], session["context"], session["clip_fea"], session["y"],
                 call["emo"] if emo else None, ip_scale)


def test_step_shape_from_video():
    s = StepShape.from_video(512, 512, 6)
    assert (s.frames, s.height, s.width) == (6, 64, 64)
    assert s.grid((1, 2, 2)) == (6, 32, 32) and s.tokens((1, 2, 2)) == 6144


def test_eager_step_equals_model_forward_with_and_without_expression():
    model, shape, session, call = make()
    step = CompiledStep(model, shape, CPU)
    step.set_session(**session)
    out = step(call["x"], call["t"], call["emo"], 0.7)
    assert out.shape == (2, 16, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(model, session, call), atol=1e-5, rtol=1e-5)
    # the no-expression CFG pass runs the same buffers with ip_scale 0
    out0 = step(call["x"], call["t"], None)
    torch.testing.assert_close(out0, reference(model, session, call, emo=False), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out0, reference(model, session, call))  # the expression branch did matter


def test_guidance_pair_as_one_batch_equals_separate_passes():
    model, shape, session, call = make()
    step = CompiledStep(model, shape, CPU)
    step.set_session(**session)
    # sample 0: the emotion branch (ip_scale 1); sample 1: the no-emotion branch (ip_scale 0)
    out = step(call["x"], call["t"], call["emo"], torch.tensor([1.0, 0.0])).clone()
    with_emo = reference(model, session, call, ip_scale=1.0)
    without = reference(model, session, call, emo=False)
    torch.testing.assert_close(out[0], with_emo[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], without[1], atol=1e-5, rtol=1e-5)
    # the renderer's (B, 1, 1) layout is accepted as well
    again = step(call["x"], call["t"], call["emo"], torch.tensor([1.0, 0.0]).view(2, 1, 1))
    torch.testing.assert_close(again, out, atol=0, rtol=0)


def test_step_reuses_buffers_across_calls_and_sessions():
    model, shape, session, call = make()
    step = CompiledStep(model, shape, CPU)
    step.set_session(**session)
    first = step(call["x"], call["t"], call["emo"], 0.7)
    ptr = first.data_ptr()
    # a Python float timestep is the same as a tensor of that value
    t0 = float(call["t"][0])
    same_t = dict(call, t=torch.full((2,), t0))
    expected = reference(model, session, same_t)
    assert step(call["x"], t0, call["emo"], 0.7).data_ptr() == ptr
    torch.testing.assert_close(step.out, expected, atol=1e-5, rtol=1e-5)
    # a new session (new reference/prompt) rewrites the context K/V in place
    _, _, session2, _ = make(seed=5)
    step.set_session(**session2)
    out2 = step(call["x"], call["t"], call["emo"], 0.7)
    assert out2.data_ptr() == ptr
    torch.testing.assert_close(out2, reference(model, session2, call), atol=1e-5, rtol=1e-5)
    # or from K/V the caller already computed for its eager path
    with torch.no_grad():
        kv = model.context_kv(*model.embed_context(session["context"], session["clip_fea"]))
    step.set_session(None, None, session["y"], kv=kv)
    torch.testing.assert_close(step(call["x"], call["t"], call["emo"], 0.7), reference(model, session, call),
                               atol=1e-5, rtol=1e-5)


def test_step_requires_a_session():
    model, shape, _, call = make()
    with pytest.raises(RuntimeError, match="set_session"):
        CompiledStep(model, shape, CPU)(call["x"], call["t"], call["emo"])


def test_recorded_layers_feed_the_head():
    model, shape, session, call = make(batch=1)
    step = CompiledStep(model, shape, CPU, record_layers=True)
    step.set_session(**session)
    out = step(call["x"], call["t"], call["emo"], 0.7)
    assert step.layers.shape == (len(model.blocks), 1, shape.tokens((1, 2, 2)), model.cfg.dim)
    with torch.no_grad():
        e, _ = model.embed_time(call["t"])
        again = model.unpatchify(model.head(step.layers[-1], e).float(), step.grid)
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("scope", ["block", "step"])
def test_compiled_step_traces_whole_and_compiles_one_block_graph(scope):
    from torch._dynamo.utils import counters

    model, shape, session, call = make(batch=1, frames=2, hw=4)
    torch._dynamo.reset()
    counters.clear()
    step = CompiledStep(model, shape, CPU, compile_backend="aot_eager", scope=scope)
    step.set_session(**session)
    out = step(call["x"], call["t"], call["emo"], 0.7)
    torch.testing.assert_close(out, reference(model, session, call), atol=1e-5, rtol=1e-5)
    # fullgraph=True: a graph break would have raised; the regional compile serves both blocks with one graph
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_fp8_step_stays_close_to_full_precision():
    import dataclasses

    from kernels.fp8 import Fp8Linear, relative_error

    model, shape, session, call = make(batch=1, frames=2, hw=4)
    ref = reference(model, session, call)
    step = CompiledStep(model, shape, dataclasses.replace(CPU, fp8=True))  # swaps the block linears in place
    assert isinstance(model.blocks[0].ffn[0], Fp8Linear)
    step.set_session(**session)
    err = relative_error(step(call["x"], call["t"], call["emo"], 0.7), ref)
    assert 1e-4 < err < 0.08  # e4m3 noise, not garbage (and not silently full precision)


def test_step_flops_match_hand_count():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.dit_step import step_flops

    cfg = get_preset("1.3b").dit
    flops = step_flops(cfg, StepShape.from_video(512, 512, 6))
    L, D = 6144, 1536
    per_block = 12 * L * D * D + 4 * L * D * 8960 + 4 * L * L * D + 4 * L * 769 * D
    per_block += 4 * L * 97 * D + 4 * 6 * 97 * 2048 * D
    assert flops["self_attention"] == 30 * 4 * L * L * D
    assert abs(sum(flops.values()) - 30 * per_block) / (30 * per_block) < 0.01  # embed/head are < 1%
    assert 23e12 < sum(flops.values()) < 24e12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_matches_eager_and_allocates_nothing():
    model, shape, session, call = make(device="cuda", dtype=torch.bfloat16)
    eager = CompiledStep(model, shape, RuntimeConfig(compile=False, cuda_graphs=False))
    eager.set_session(**session)
    ref = eager(call["x"], call["t"], call["emo"], 0.7).clone()
    step = CompiledStep(model, shape, RuntimeConfig(compile=True, cuda_graphs=True))
    step.set_session(**session)
    out = step(call["x"], call["t"], call["emo"], 0.7).clone()
    from kernels.fp8 import relative_error

    assert relative_error(out, ref) < 0.02  # Inductor's fusion vs eager Triton kernels: bf16 rounding only
    assert step.graph is not None
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    step(call["x"], call["t"], call["emo"], 0.7)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def test_bench_dit_step_runs_and_writes_results(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import json

    import bench.common
    from bench import dit_step

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(dit_step, "RESULTS", tmp_path)
    argv = ["--presets", "tiny", "--size", "64", "--frames", "3", "--quick", "--warmup", "1", "--iters", "2"]
    assert dit_step.main(argv + ["--out", "smoke"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    row = data["results"][0]
    assert (row["preset"], row["frames"], row["tokens"], row["mode"]) == ("tiny", 3, 48, "eager")
    assert row["ms_per_step"] > 0 and row["tflops"] > 0 and 0 < row["fraction_of_peak"]
    assert data["peak_tflops"] > 0 and "git_commit" in data["env"]
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_residual_stream_is_token_major_contiguous():
    # A transposed patchify view would keep every block's residual stream D-major (elementwise ops keep their
    # input's layout), so each LayerNorm would reduce over strided memory: 3x slower kernels on the GPU.
    model, shape, session, call = make(batch=1, frames=2, hw=4)
    with torch.no_grad():
        tokens, grid = model.patchify(call["x"], session["y"])
        assert tokens.is_contiguous()
        cos, sin = model.rope(grid)
        _, e0 = model.embed_time(call["t"])
        kv = model.context_kv(*model.embed_context(session["context"], session["clip_fea"]))
        x = tokens
        for i, block in enumerate(model.blocks):
            x = block(x, e0, cos, sin, None, None, call["emo"], 0.7, kv=kv[i])
            assert x.is_contiguous()


def test_inductor_compile_options():
    from kernels.graphs import INDUCTOR_OPTIONS

    model, shape, _, _ = make(batch=1, frames=2, hw=4)
    tuned = CompiledStep(model, shape, CPU, compile_backend="inductor")  # compiles lazily: nothing runs here
    assert tuned.compile_options["options"] == INDUCTOR_OPTIONS and "mode" not in tuned.compile_options
    assert INDUCTOR_OPTIONS["coordinate_descent_tuning"] is True
    assert "options" not in CompiledStep(model, shape, CPU, compile_backend="inductor",
                                         inductor_options={}).compile_options
    moded = CompiledStep(model, shape, CPU, compile_backend="inductor", compile_mode="max-autotune-no-cudagraphs")
    assert moded.compile_options["mode"] == "max-autotune-no-cudagraphs" and "options" not in moded.compile_options
    assert "options" not in CompiledStep(model, shape, CPU, compile_backend="aot_eager").compile_options
    assert CompiledStep(model, shape, CPU).compile_options == {}  # CPU default: eager
    # every option must be a real Inductor config key (a typo would only fail at the GPU compile)
    import torch._inductor.config as inductor_config

    for key in INDUCTOR_OPTIONS:
        assert hasattr(inductor_config, key)
