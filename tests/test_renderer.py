"""FlashPortrait renderer on the tiny preset with random weights, on CPU, driven by lp_d0.mp4 (issue 5, item 5).

Properties: the rolling renderer streams several windows; every driving frame that reached it gets exactly one
avatar frame, in order, with its own pts, and no window seam (nor a budget change) drops or repeats a frame; the
guidance pair batched as B=2 equals the two branches run separately; offline WSWS renders every frame of a clip;
close() frees the session state.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

try:
    from tests.conftest import data_file, image_rgb, video_frames
except ImportError:  # pytest's rootdir-relative import of conftest
    from conftest import data_file, image_rgb, video_frames

from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig
from engine.controller import Budget, ControllerConfig
from engine.renderer import FlashPortraitRenderer

SIZE = 64
W, OVERLAP = 4, 2  # stride 2: a window emits 2 latent frames = 8 video frames
CPU = RuntimeConfig(device="cpu", dtype="fp32", compile=False, cuda_graphs=False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def driving() -> list[np.ndarray]:
    return video_frames("lp_d0.mp4", 48)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return image_rgb("lp_s0.jpg")


def make(reference, alpa=ALPAConfig(mode="alpa", interval=2, order=1), controller=None, offline=False, **kw):
    return FlashPortraitRenderer(reference, None, SIZE, SIZE, preset="tiny", runtime=CPU,
                                 sampler=SamplerConfig(fast=True), window=WindowConfig(W, OVERLAP), alpa=alpa,
                                 random_weights=True, pace=False, offline=offline,
                                 controller=controller or ControllerConfig(enabled=False), **kw)


def check_stream(out, pushed_pts, released_latents):
    """Frames in order with their own pts, one per driving frame of the released latents, no repeats."""
    pts = [p for _, p in out]
    assert len(out) == 4 * released_latents - 3  # latent 0 is 1 frame, every later latent 4
    assert pts == pushed_pts[:len(out)]
    frames = np.stack([f for f, _ in out]).astype(np.int16)
    assert frames.shape[1:] == (SIZE, SIZE, 3)
    step = np.abs(np.diff(frames, axis=0)).reshape(len(out) - 1, -1).max(axis=1)
    assert (step > 0).all(), f"repeated frame after output index {np.flatnonzero(step == 0)}"


def test_streams_windows_in_order_without_seam_loss(reference, driving):
    r = make(reference).start()
    try:
        pushed, out = [], []
        for j, frame in enumerate(driving[:37]):
            pts = 100.0 + j / 25
            r.push(frame, pts)
            pushed.append(pts)
            while (item := r.pull()) is not None:
                out.append(item)
            time.sleep(0.02)
        deadline = time.monotonic() + 30
        # 37 frames: latents 0..9 -> 4 windows of stride 2 (the last needs latents up to 8 with lookahead 1)
        while (r.windows < 4 or r._frame_index < 37) and time.monotonic() < deadline:
            time.sleep(0.05)
        while (item := r.pull()) is not None:
            out.append(item)
        stats = r.stats()
        assert stats["error"] is None
        assert r.windows == 4 and stats["dropped_in"] == 0
        check_stream(out, pushed, released_latents=4 * 2)
        assert stats["alpa_full_passes"] == 4 * 2 and stats["alpa_predicted_passes"] == 4 * 2  # K=2 of 4 steps
        assert stats["random_weights"] is True and stats["renderer"] == "flashportrait"
        assert stats["backlog_frames"] == 37 - len(out)
    finally:
        r.close()
    assert r.session_state_bytes() == 0


def test_budget_change_keeps_every_frame_once(reference, driving):
    """A new stride and step count start a new rolling window at the first unreleased latent frame."""
    r = make(reference)
    out, pushed = [], []
    for j, frame in enumerate(driving):
        if r.windows == 2 and r._budget.stride == 2:
            r._apply_budget(Budget(interval=1, steps=2, stride=3))
        out += r.process(frame, j * 0.04)
        pushed.append(j * 0.04)
    assert r.windows >= 4 and r._budget == Budget(1, 2, 3)
    check_stream(out, pushed, released_latents=r._released)
    assert r._released == 2 * 2 + 3 * (r.windows - 2)
    r.close()


def test_lag_is_bounded_by_skipping_ahead(reference, driving):
    """When windows fall far behind, the stream skips to the newest tokens: the skipped driving frames are counted,
    every other frame still comes out once, in order."""
    r = make(reference)
    r.max_lag_latents = 4
    out, pushed = [], []
    for j, frame in enumerate(driving[:45]):
        if j == 9:
            r._window_ready = lambda: False  # the window worker is busy for a while: tokens pile up
        elif j == 41:
            del r._window_ready
        out += r.process(frame, j)
        pushed.append(j)
    # first window: latents 0, 1 (frames 0..4). At frame 41, 11 latents have tokens, 9 of them waiting (> 4):
    # skip to latent 11 - 2 - 1 = 8, i.e. frames 5..28 (4 per latent 2..7), then render on from frame 29.
    assert r.skipped_behind == 24
    assert [p for _, p in out] == pushed[:5] + pushed[29:29 + len(out) - 5]
    assert r.stats()["skipped_behind"] == 24 and len(out) > 5
    r.close()


def test_guidance_pair_batch_equals_two_passes(reference):
    r = make(reference, alpa=ALPAConfig(mode="off"))
    eng = r.engine
    g = torch.Generator().manual_seed(3)
    h, w = eng.latent_hw
    x = torch.randn(1, 16, W, h, w, generator=g)
    emo = torch.randn(1, W, 97, eng.preset.dit.emo_dim, generator=g)
    cached = eng.cached_dit(r.sampler.schedule, ALPAConfig(mode="off"))
    guided = eng.guided_flow(cached, x, 1, emo, key="k")
    t = r.sampler.schedule.timesteps[1:2]
    with torch.no_grad():
        e = eng.dit(x, t, eng.context, eng.clip_fea, eng.y, emo, ip_scale=1.0)
        n = eng.dit(x, t, eng.context, eng.clip_fea, eng.y, emo, ip_scale=0.0)
    expect = n + eng.sampler_cfg.emo_cfg * (e - n)
    torch.testing.assert_close(guided, expect, rtol=1e-4, atol=1e-4)
    r.close()


def test_alpa_on_the_fixed_step_equals_cached_dit(reference):
    """Full passes through the engine's fixed-shape step feed ALPA's output cache exactly as CachedDiT's own
    passes do: the guided flows of a 4-step trajectory at K = 2 (2 full, 2 predicted) agree."""
    from engine.flashportrait import _StepCachedDiT

    r = make(reference)
    eng = r.engine
    g = torch.Generator().manual_seed(5)
    h, w = eng.latent_hw
    x = torch.randn(1, 16, W, h, w, generator=g)
    emo = torch.randn(1, W, 97, eng.preset.dit.emo_dim, generator=g)
    schedule = r.sampler.schedule
    cfg = ALPAConfig(mode="alpa", interval=2, order=1, cache="output")
    fixed = eng.cached_dit(schedule, cfg)
    eager = _StepCachedDiT(eng.dit, schedule, cfg, step=None)
    xa, xb = x.clone(), x.clone()
    for i in range(len(schedule)):
        fa = eng.guided_flow(fixed, xa, i, emo, key="k")
        fb = eng.guided_flow(eager, xb, i, emo, key="k")
        torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-4)
        xa, xb = r.sampler.step(i, xa, fa), r.sampler.step(i, xb, fb)
    assert fixed.full_passes == eager.full_passes == 2 and fixed.predicted_passes == 2
    r.close()


def test_offline_render_covers_every_frame(reference, driving):
    r = make(reference, offline=True)
    pts = [j / 25 for j in range(19)]  # 19 frames: 6 latents (padded to 21 frames), windows [0, 4) and [2, 6)
    for frame, p in zip(driving, pts):
        assert r.process(frame, p) == []
    out = r.flush()
    assert [p for _, p in out] == pts
    assert r.last_window_passes == 2 * 2  # two windows x 4 steps at ALPA K=2: 2 full (B=2) passes each
    assert len({f.tobytes() for f, _ in out}) == len(out)
    r.close()


def test_loads_every_model_from_a_weights_folder(tmp_path, reference, driving):
    """Not random: tiny checkpoints in the published file names and key layouts load, and the renderer streams."""
    from safetensors.torch import save_file

    from engine.models.clip_vision import ClipVision
    from engine.config import get_preset
    from engine.models.dit import WanModel
    from engine.models.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig
    from engine.models.portrait_encoder import PortraitEncoder
    from engine.flashportrait import DEFAULT_PROMPT, EngineOptions
    from engine.models.text import PromptEncoder
    from engine.models.tiny_vae import TinyVAE
    from engine.models.vae import WanVAE

    p = get_preset("tiny")
    torch.manual_seed(7)
    dit = WanModel(p.dit)
    torch.save(dit.state_dict(), tmp_path / "transformer.pt")
    torch.save(PortraitEncoder(p.portrait).state_dict(), tmp_path / "portrait_encoder.pt")
    torch.save(FanEncoder(FanEncoderConfig.tiny()).state_dict(), tmp_path / "pd_fpg.pth")
    torch.save({f"visual.{k}": v for k, v in ClipVision(p.clip).state_dict().items()},
               tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    torch.save(WanVAE(p.vae).state_dict(), tmp_path / "Wan2.1_VAE.pth")
    torch.save(TinyVAE(p.tiny_vae, encoder=False).state_dict(), tmp_path / "fast_vae.pth")
    # the prompt comes from the on-disk umT5 cache (a cache hit needs neither the encoder nor the tokenizer)
    prompts = PromptEncoder(tmp_path, tmp_path / "cache", p.t5, dtype=torch.float32)
    context = torch.randn(9, p.dit.text_dim)
    prompts.cache_path(DEFAULT_PROMPT).parent.mkdir(parents=True)
    save_file({"context": context}, str(prompts.cache_path(DEFAULT_PROMPT)))

    r = FlashPortraitRenderer(reference, tmp_path, SIZE, SIZE, preset="tiny", runtime=CPU,
                              sampler=SamplerConfig(fast=True), window=WindowConfig(W, OVERLAP),
                              options=EngineOptions(prompt_cache=str(tmp_path / "cache")), pace=False,
                              controller=ControllerConfig(enabled=False))
    eng = r.engine
    assert eng.random_weights is False and eng.stats()["decoder"] == "tiny"
    torch.testing.assert_close(eng.dit.blocks[1].cross_attn.emo_k_proj.weight, dit.blocks[1].cross_attn.emo_k_proj.weight)
    torch.testing.assert_close(eng.context[0], context)
    out = []
    for j, frame in enumerate(driving[:13]):
        out += r.process(frame, j)
    assert [pts for _, pts in out] == list(range(4 * 2 - 3))  # the first window: latents 0, 1 -> frames 0..4
    r.close()


def test_close_frees_session_state(reference, driving):
    engine = make(reference).engine
    before = engine.sessions
    r = make(reference).start()
    assert engine.sessions == before + 1 and r.engine is engine  # one shared engine per process
    for j, frame in enumerate(driving[:13]):
        r.push(frame, j / 25)
    deadline = time.monotonic() + 20
    while r.windows < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.session_state_bytes() > 0
    r.close()
    assert r.session_state_bytes() == 0 and engine.sessions == before
    assert r._window_thread is None and r._thread is None


def test_rehearsal_runs_live_windows_and_leaves_the_next_session_as_if_none_had_run(reference, driving):
    """The warm start's rehearsal (engine/build.warm_start, on CUDA) runs real live windows on the reference: DiT
    passes full and predicted, decode, expression; a session opened after it renders exactly what a session opened
    before it did (the rehearsal leaves nothing behind in the shared engine)."""
    def frames_of(session):
        out = []
        for j, frame in enumerate(driving[:21]):
            out += session.process(frame, j / 25)
        session.close()
        return np.stack([f for f, _ in out])

    before = frames_of(make(reference))
    rehearsal = make(reference)
    assert rehearsal.rehearse(3) == 3
    assert len(rehearsal.start_trace) == 3 and rehearsal.full_passes >= 3 and rehearsal.predicted_passes >= 3
    assert rehearsal.frames_out == 0 and rehearsal.backlog_frames() > 0  # its frames were made, then dropped
    for row in rehearsal.stats()["start_trace"]:  # each window timed: its tokens existed before it started
        assert row["ready_ms"] <= row["start_ms"] <= row["end_ms"] and row["frames"] >= 1
        assert row["full"] + row["predicted"] == 4 and row["wait_ms"] >= row["dit_ms"] > 0
    rehearsal.close()
    started = make(reference).start()
    try:
        with pytest.raises(RuntimeError, match="not started"):
            started.rehearse()
    finally:
        started.close()
    after = frames_of(make(reference))
    assert before.shape == after.shape and before.shape[0] >= 8
    assert np.array_equal(before, after)


def test_warm_start_rehearses_on_cuda_only():
    from types import SimpleNamespace

    from engine.build import warm_start

    calls = []

    class Session:
        def __init__(self, device):
            self.engine = SimpleNamespace(device=torch.device(device))

        def rehearse(self):
            calls.append("rehearse")

        def close(self):
            calls.append("close")

    assert warm_start(lambda: Session("cpu")) >= 0 and calls == ["close"]
    calls.clear()
    warm_start(lambda: Session("cuda"))
    assert calls == ["rehearse", "close"]


class RecordingRenderer(FlashPortraitRenderer):
    """Records the pts of every driving frame it renders and of every avatar frame the track pulls."""

    instances: list = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.processed_pts, self.pulled_pts = [], []
        RecordingRenderer.instances.append(self)

    def process(self, frame, pts):
        self.processed_pts.append(pts[0])
        return super().process(frame, pts)

    def pull(self):
        item = super().pull()
        if item is not None:
            self.pulled_pts.append(item[1])
        return item


def test_webrtc_loopback_streams_flashportrait(reference):
    """Issue 7 item 1: an aiortc client streams lp_d0.mp4 and receives FlashPortrait avatar frames; each rendered
    frame is sent once and in order at the output pace; disconnecting frees the session state."""
    import asyncio

    from aiortc import RTCPeerConnection
    from aiortc.contrib.media import MediaPlayer
    from live_util import get_stats, post_offer, running_server, wait_for

    from engine.config import StreamConfig

    RecordingRenderer.instances.clear()

    def make():
        return RecordingRenderer(reference, None, SIZE, SIZE, preset="tiny", runtime=CPU,
                                 sampler=SamplerConfig(fast=True), window=WindowConfig(W, OVERLAP),
                                 alpa=ALPAConfig(mode="alpa", interval=2, order=1), random_weights=True, fps=25)

    async def count_is(url, n):
        return (await get_stats(url))["session_count"] == n

    async def scenario():
        async with running_server(StreamConfig(port=0, width=SIZE, height=SIZE, fps=25), make, reference,
                                  renderer_name="flashportrait") as (server, url):
            player = MediaPlayer(str(data_file("driving", "lp_d0.mp4")), loop=True)
            pc = RTCPeerConnection()
            pc.addTrack(player.video)
            tracks = []
            pc.on("track", tracks.append)
            await post_offer(url, pc)
            assert await wait_for(lambda: asyncio.sleep(0, tracks), 10), "no avatar track in the answer"
            received, deadline = [], time.monotonic() + 40
            while len(received) < 150 and time.monotonic() < deadline:
                frame = await asyncio.wait_for(tracks[0].recv(), 10)
                received.append((time.monotonic(), frame.to_ndarray(format="rgb24")))
            stats = await get_stats(url)
            await pc.close()
            player.video.stop()
            closed = await wait_for(lambda: count_is(url, 0), 15)
            return received, stats, closed

    received, stats, closed = asyncio.run(scenario())
    (r,) = RecordingRenderer.instances
    (session,) = stats["sessions"]
    rs = session["renderer_stats"]
    assert session["renderer"] == "flashportrait" and rs["random_weights"] is True and rs["error"] is None
    assert all(f.shape == (SIZE, SIZE, 3) for _, f in received)
    # every avatar frame the track took is a rendered driving frame, once, in order
    assert len(r.pulled_pts) >= 40, rs
    assert r.pulled_pts == r.processed_pts[:len(r.pulled_pts)]
    assert session["fresh"] + session["skipped"] <= len(r.pulled_pts)
    # pacing: the client receives frames at the output rate (stalls repeat the last frame, counted)
    times = np.array([t for t, _ in received])
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 18 < rate < 32, rate
    assert session["waiting"] + session["repeats"] + session["fresh"] == session["frames_out"]
    assert closed, "the session was not freed after the client closed its peer connection"
    assert r.closed and r.session_state_bytes() == 0 and r._window_thread is None


def test_flashlive_render_flashportrait_offline(tmp_path):
    """`flashlive render --renderer flashportrait --random-weights --preset tiny`: offline WSWS over the whole clip,
    one avatar frame per driving frame, the driving audio copied."""
    import subprocess
    import sys
    from pathlib import Path

    import av

    driving = data_file("driving", "lp_d18.mp4")
    out = tmp_path / "avatar.mp4"
    run = subprocess.run([sys.executable, "-m", "flashlive", "render", "--renderer", "flashportrait",
                          "--random-weights", "--preset", "tiny", "--device", "cpu", "--size", "64x64",
                          "--context-size", "6", "--context-overlap", "2", "--fast", "--driving", str(driving),
                          "-o", str(out), "-q"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    with av.open(str(driving)) as src, av.open(str(out)) as dst:
        n_src = sum(1 for _ in src.decode(video=0))
        assert sum(1 for _ in dst.decode(video=0)) == n_src == 216
        assert dst.streams.audio and dst.streams.video[0].codec_context.width == 64
