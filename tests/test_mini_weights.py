"""The committed mini checkpoint (weights/mini): it loads through the normal --weights path, in the published file
layout, and renders lp_d0 with a lower landmark expression error than the static reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.conftest import video_frames

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "mini"


def test_mini_checkpoint_is_in_the_published_layout_and_loads_through_weights():
    from engine.mini import load_mini
    from engine.weights import load_state_dict, scan_weights

    total = sum(p.stat().st_size for p in WEIGHTS.iterdir())
    assert total <= 30 * 2**20, f"weights/mini is {total / 2**20:.1f} MiB, the budget is 30"
    dit = load_state_dict(WEIGHTS / "transformer.pt")
    assert "blocks.0.cross_attn.emo_k_proj.weight" in dit and "blocks.3.cross_attn.emo_v_proj.weight" in dit
    assert "patch_embedding.weight" in dit and "head.head.weight" in dit and "img_emb.proj.1.weight" in dit
    pe = load_state_dict(WEIGHTS / "portrait_encoder.pt")
    assert {k.split(".")[0] for k in pe} == {"proj_model", "mouth_proj_model", "emo_proj_model"}
    rows = {Path(f).name: (ok, msg) for f, ok, msg in scan_weights(WEIGHTS, "mini")}
    assert rows["transformer.pt"][0] and "with NFEB" in rows["transformer.pt"][1], rows["transformer.pt"]
    assert rows["portrait_encoder.pt"][0], rows["portrait_encoder.pt"]
    models = load_mini(WEIGHTS)
    assert models.dit.cfg.dim == 256 and not any(p.requires_grad for p in models.dit.parameters())
    # the NFEB was trained: its projections are far from the zero init FlashPortrait uses for a plain Wan model
    assert models.dit.blocks[0].cross_attn.emo_k_proj.weight.abs().mean() > 1e-3


def test_mini_render_of_lp_d0_beats_the_static_reference_on_expression(one_torch_thread):
    from bench.quality import MeshReader, expression, iod_of
    from engine.config import RuntimeConfig, SamplerConfig, WindowConfig
    from engine.flashportrait import fit_reference
    from engine.renderer import FlashPortraitRenderer

    frames = video_frames("lp_d0.mp4", 41)
    r = FlashPortraitRenderer(frames[0], str(WEIGHTS), 128, 128, preset="mini", runtime=RuntimeConfig(device="cpu"),
                              sampler=SamplerConfig(steps=10), window=WindowConfig(3, 1), offline=True)
    try:
        for i, f in enumerate(frames):
            r.process(f, i / 25)
        out = [img for img, _ in r.flush()]
    finally:
        r.close()
    assert len(out) == len(frames)
    reader = MeshReader()
    truth = [fit_reference(f, 128, 128) for f in frames]
    static = truth[0]
    errs = {"mini": [], "static": []}
    ref_pts = reader(static)
    for o, g in zip(out, truth):
        gp = reader(g)
        if gp is None:
            continue
        iod = iod_of(gp)
        op = reader(o)
        assert op is not None, "no face in the mini's output"
        errs["mini"].append(np.abs(expression(op, iod) - expression(gp, iod)).mean())
        errs["static"].append(np.abs(expression(ref_pts, iod) - expression(gp, iod)).mean())
    mini, stat = float(np.mean(errs["mini"])), float(np.mean(errs["static"]))
    print(f"expression error: mini {mini:.4f}, static {stat:.4f}")
    assert len(errs["mini"]) >= 35
    assert mini < stat, (mini, stat)


def test_flashlive_render_mini_on_cpu(tmp_path):
    import os
    import subprocess
    import sys

    import av
    import cv2

    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), video_frames("lp_d0.mp4", 1)[0][:, :, ::-1])
    out = tmp_path / "out.mp4"
    cmd = [sys.executable, "-m", "flashlive", "render", "--renderer", "flashportrait", "--preset", "mini",
           "--weights", str(WEIGHTS), "--device", "cpu", "--size", "128x128", "--steps", "4", "--context-size", "3",
           "--context-overlap", "1", "--driving", str(ROOT / ".." / "shared" / "data" / "driving" / "lp_d0.mp4"),
           "--reference", str(ref), "-q", "-o", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    with av.open(str(out)) as c:
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(got) == 78 and got[0].shape == (128, 128, 3)
    motion = np.mean([np.abs(got[i + 1].astype(float) - got[i].astype(float)).mean() for i in range(len(got) - 1)])
    assert motion > 0.3, motion                       # the avatar moves
    assert np.std([g.mean() for g in got]) < 20       # and stays one picture (no flicker between windows)


def test_mini_refuses_other_sizes():
    from engine.renderer import FlashPortraitRenderer

    with pytest.raises(ValueError, match="--size 128x128"):
        FlashPortraitRenderer(np.zeros((256, 256, 3), np.uint8), str(WEIGHTS), 256, 256, preset="mini",
                              random_weights=True, offline=True)
