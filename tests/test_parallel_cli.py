"""Several GPUs through the entry points (engine/distributed.ParallelStep, `flashlive render --gpus N`), on CPU/gloo.

ParallelStep on rank 0 must give the renderer what CompiledStep gives it (the guidance pair as CFG groups, as one
batch over sequence ranks, or both), with the followers holding only what rank 0 sends them; and `flashlive render
--gpus 2` must write the frames `--gpus 1` writes, with the follower running the DiT and every process ending.
"""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from engine.config import RuntimeConfig, get_preset
from engine.models.dit import WanModel
import flashlive
from kernels.graphs import CompiledStep, StepShape
from engine.distributed import ParallelStep, follower, make_step, shutdown, spawn

ROOT = Path(__file__).resolve().parents[1]
CFG = get_preset("tiny").dit
SHAPE = StepShape(batch=2, frames=3, height=6, width=10)  # 45 tokens: uneven over 2 sequence ranks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _step_worker(info, expect_cfg: int, results) -> None:
    if info.rank != 0:
        results.put(("calls", info.rank, follower(info)))  # builds its DiT from what rank 0 sends: no seed here
        return
    torch.manual_seed(0)
    model = WanModel(CFG).eval().requires_grad_(False)
    for block in model.blocks:  # make the NFEB matter in the output, as trained weights do
        torch.nn.init.normal_(block.cross_attn.emo_k_proj.weight, std=0.3)
        torch.nn.init.normal_(block.cross_attn.emo_v_proj.weight, std=0.3)
    runtime = RuntimeConfig(device="cpu")
    reference = CompiledStep(copy.deepcopy(model), SHAPE, runtime)
    step = make_step(model, SHAPE, runtime)
    assert isinstance(step, ParallelStep) and step.cfg_size == expect_cfg
    assert tuple(step.x.shape) == tuple(reference.x.shape) and not step.use_graph
    g = torch.Generator().manual_seed(1)
    B, F, H, W = SHAPE.batch, SHAPE.frames, SHAPE.height, SHAPE.width
    # Per-sample session inputs differ, so a CFG group that kept the other branch's K/V or y would fail.
    context = torch.randn(B, CFG.text_len - 3, CFG.text_dim, generator=g)
    clip_fea = torch.randn(B, CFG.clip_tokens, CFG.clip_dim, generator=g)
    y = torch.randn(B, 20, F, H, W, generator=g)
    kv = model.context_kv(*model.embed_context(context, clip_fea))
    reference.set_session(None, None, y, kv=kv)
    step.set_session(None, None, y, kv=kv)
    errors = []
    for call in range(3):
        x = torch.randn(B, 16, F, H, W, generator=g)
        t = torch.rand(B, generator=g) * 1000
        emo = torch.randn(B, F, CFG.emo_tokens_per_frame, CFG.emo_dim, generator=g)
        args = (x, t, emo, torch.tensor([1.0, 0.0])) if call < 2 else (x, 500.0, None, 1.0)  # no-emotion call
        want = reference(*args).clone()
        got = step(*args)
        errors.append(_rel(got, want))
    shutdown()
    results.put(("errors", 0, errors))


@pytest.mark.parametrize("world, cfg_groups", [(2, 2), (3, 1), (4, 2)])
def test_parallel_step_equals_compiled_step(world, cfg_groups):
    """2: one branch per rank; 3: the pair as one batch over 3 sequence ranks; 4: 2 CFG groups x 2 sequence ranks."""
    assert isinstance(make_step(WanModel(CFG), SHAPE, RuntimeConfig(device="cpu")), CompiledStep)  # no group here
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()  # not fork: other tests leave threads
    spawn(_step_worker, world, cfg_groups, results, device="cpu")
    got = [results.get() for _ in range(world)]
    errors = next(v for kind, _, v in got if kind == "errors")
    assert max(errors) <= 1e-5, errors
    calls = sorted(v for kind, _, v in got if kind == "calls")
    assert calls == [4] * (world - 1), calls  # the session and 3 steps, then released


@pytest.fixture
def clip20(tmp_path, data):
    """The first 20 frames of lp_d0.mp4 as a short mp4."""
    path = tmp_path / "clip20.mp4"
    with av.open(str(data("driving", "lp_d0.mp4"))) as src, av.open(str(path), "w") as dst:
        video = src.streams.video[0]
        out = dst.add_stream("libx264", rate=video.average_rate)
        out.width, out.height, out.pix_fmt = video.codec_context.width, video.codec_context.height, "yuv420p"
        for i, frame in enumerate(src.decode(video)):
            if i == 20:
                break
            for packet in out.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)
    return path


def _render(clip: Path, out: Path, gpus: int, torchrun: bool = False) -> subprocess.CompletedProcess:
    # Windows of 3 latent frames (6 in the clip) so every DiT pass has the step's shape, ALPA off so each is a full
    # pass through the step: 3 windows x 2 steps.
    flags = ["render", "--renderer", "flashportrait", "--preset", "tiny", "--random-weights", "--device", "cpu",
             "--driving", str(clip), "--size", "128x128", "--steps", "2", "--context-size", "3", "--context-overlap",
             "1", "--alpa", "off", "-q", "-o", str(out)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
               "flashlive", *flags]
    else:
        cmd = [sys.executable, "-m", "flashlive", *flags, "--gpus", str(gpus)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def test_render_gpus_2_equals_gpus_1(clip20, tmp_path):
    """--gpus 2 (rank 0 spawns its follower) and torchrun with 2 processes both write --gpus 1's frames."""
    one = _render(clip20, tmp_path / "one.mp4", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    a = _frames(tmp_path / "one.mp4")
    assert a.shape == (20, 128, 128, 3)
    assert a.std() > 1.0  # not a blank video that any two runs would share
    for name, torchrun in (("spawned", False), ("torchrun", True)):
        two = _render(clip20, tmp_path / f"{name}.mp4", 2, torchrun)
        assert two.returncode == 0, two.stderr[-2000:]
        released = re.findall(r"flashlive rank (\d+): released after (\d+) DiT calls", two.stderr)
        assert released == [("1", "7")], two.stderr[-2000:]  # the session + 6 passes ran on rank 1 too; it ended
        b = _frames(tmp_path / f"{name}.mp4")
        assert b.shape == a.shape and np.abs(a - b).max() <= 3, name


@pytest.mark.parametrize("flags, fix", [(["--gpus", "2"], "--renderer flashportrait"), (["--gpus", "0"], "--gpus 1"),
                                        (["--renderer", "flashportrait", "--gpus", "too many"], "--gpus")])
def test_gpus_user_errors(flags, fix, capsys, monkeypatch):
    """One sentence naming the fix, before any process starts: preview, a zero count, more GPUs than visible."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if flags[-1] == "too many":  # one more than this machine has (at least 3, so --gpus 1 never stands in)
        flags = [*flags[:-1], str(max(3, torch.cuda.device_count() + 1))]
    assert flashlive.main(["render", "--driving", "none.mp4", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashlive render: ") and fix in err and len(err.splitlines()) == 1
