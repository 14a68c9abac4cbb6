"""train/teacher.py: the preview renderer's videos the mini's DiT stage also trains on. The rendered face follows its
driver; the videos train on every frame and hold none out, are drawn at their share, and the DiT stage takes them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import data_file


def mouth(lm: np.ndarray) -> np.ndarray:
    """(T, 478, 3) -> (T,) inner-lip gap over the inter-iris distance."""
    return np.linalg.norm(lm[:, 13, :2] - lm[:, 14, :2], axis=1) / np.linalg.norm(lm[:, 468, :2] - lm[:, 473, :2],
                                                                                   axis=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """train/data.py's cache of lp_d6 (a driver who talks)."""
    from train.data import build_cache

    return build_cache([data_file("driving", "lp_d6.mp4")], tmp_path_factory.mktemp("cache"), size=128)


def test_mini_teacher_video_moves_the_portrait_with_the_driver(cache):
    from engine.preview import load_reference
    from train.data import load_cache, track_landmarks, uint8_frames
    from train.teacher import source_crop, teacher_video

    (v,) = load_cache(cache)
    driving = uint8_frames(v)[:60]
    source = source_crop(load_reference(str(data_file("reference", "lp_s0.jpg"))))
    video = teacher_video(source, driving)
    assert video.shape == (60, 128, 128, 3) and video.dtype == np.uint8
    lm, found = track_landmarks(video)
    assert found.all()
    drive = mouth(v.landmarks[:60].numpy())
    assert drive.std() > 0.02                                               # the driver's mouth moves...
    assert np.corrcoef(drive, mouth(lm))[0, 1] > 0.8                        # ...and the portrait's follows it
    assert np.abs(video.astype(int) - video[:1]).mean(axis=(1, 2, 3)).max() > 2   # pixels move, not only points


def test_mini_teacher_cache_trains_on_every_frame_at_its_share(cache, tmp_path):
    from train.data import ClipDataset, load_cache, main as data_main
    from train.teacher import build_teacher_cache
    from train.train_mini import main

    refs = [data_file("reference", "lp_s0.jpg"), data_file("reference", "fp_case1.png")]
    folder = build_teacher_cache(refs, cache, tmp_path / "teacher", drivers=1, frames=13)
    packed = tmp_path / "teacher.npz"
    data_main(["--cache", str(folder), "--pack", str(packed), "--quality", "90"])
    teach = load_cache(packed)
    assert sorted(t.name for t in teach) == ["teach_fp_case1_by_lp_d6", "teach_lp_s0_by_lp_d6"]
    assert all(t.train_only and len(t.frames) == 13 and t.landmarks_flip is not None for t in teach)

    (real,) = load_cache(cache)
    data = ClipDataset([real] + teach, "train", train_only_share=0.25)
    assert data.ranges[1:] == [(0, 13), (0, 13)]                           # every teacher frame trains
    assert data.weights[1:].sum() == pytest.approx(0.25) and data.weights[1] == pytest.approx(0.125)
    held = ClipDataset([real] + teach, "test")
    assert held.ranges[1:] == [(13, 13), (13, 13)] and held.weights[1:].sum() == 0   # none is held out
    assert held.ranges[0][1] - held.ranges[0][0] == len(real.frames) - round(0.8 * len(real.frames))

    run = tmp_path / "run"
    common = ["--run", str(run), "--cache", str(cache), "--threads", "1"]
    main(["--stage", "vae", "--steps", "1", "--vae-batch", "1", "--vae-crop", "32"] + common)
    main(["--stage", "dit", "--steps", "1", "--batch", "2", "--latents", "2", "--augment", "--val-every", "1",
          "--val-clips", "2", "--teacher", str(packed), "--teacher-share", "0.5"] + common)
    state = torch.load(run / "dit.ckpt", weights_only=False)
    assert state["step"] == 1 and np.isfinite(state["log"][0][1])
