"""FanEncoder checkpoint layout, and frame-accurate extraction on a real driving video with faceless frames.

The published face_det.onnx / face_landmark.onnx weights are absent here, so the video test uses the documented
fallback, MediapipeLandmarks (mediapipe face mesh mapped to the five alignment points), in static mode so every
frame is landmarked on its own and rows can be compared exactly between runs. The FanEncoder is the tiny-width
config with random weights written to disk in the pd_fpg.pth key layout and loaded back strictly.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engine.models.pdfgc.align import template_matrix, warp_face
from engine.models.pdfgc.extractor import ExpressionExtractor
from engine.models.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig
from engine.models.pdfgc.landmarks import MediapipeLandmarks
from engine.weights import WeightsError
from tests.conftest import data_file


def write_random_checkpoint(path, cfg: FanEncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A FanEncoder state dict with random weights AND random BatchNorm statistics, saved with torch.save."""
    torch.manual_seed(seed)
    sd = FanEncoder(cfg).state_dict()
    for k, v in sd.items():
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
            v.normal_(0, 0.2)
        elif k.endswith("num_batches_tracked"):
            v.fill_(1000)
    torch.save(sd, path)
    return sd


def test_published_key_layout_and_shapes():
    with torch.device("meta"):
        sd = FanEncoder().state_dict()
    expect = {
        "model.conv1.weight": (64, 3, 7, 7), "model.conv1.bias": (64,), "model.bn1.num_batches_tracked": (),
        "model.conv2.conv1.weight": (64, 64, 3, 3), "model.conv2.downsample.0.running_var": (64,),
        "model.conv2.downsample.2.weight": (128, 64, 1, 1), "model.conv4.conv3.weight": (64, 64, 3, 3),
        "model.m0.b1_4.conv1.weight": (128, 256, 3, 3), "model.m0.b2_plus_1.conv3.weight": (64, 64, 3, 3),
        "model.m0.b3_1.bn3.running_mean": (64,), "model.top_m_0.conv2.weight": (64, 128, 3, 3),
        "model.conv_last0.weight": (256, 256, 1, 1), "model.bn_end0.weight": (256,),
        "model.l0.weight": (68, 256, 1, 1), "model.bn5.running_var": (68,), "model.conv6.weight": (1, 68, 3, 3),
        "model.fc.weight": (512, 784), "to_mouth.0.weight": (512, 512), "to_mouth.2.running_mean": (512,),
        "to_emo.3.weight": (512, 512), "headpose_embed.1.weight": (6, 512), "eye_embed.1.weight": (6, 512),
        "emo_embed.1.weight": (30, 512), "mouth_embed.1.weight": (500, 512),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("model.m0.") and ".b" not in k for k in sd)        # dropout has no keys
    assert {k.split(".")[2] for k in sd if k.startswith("model.m0.")} == \
        {f"b{i}_{l}" for i in (1, 2, 3) for l in (1, 2, 3, 4)} | {"b2_plus_1"}


def test_random_checkpoint_loads_strictly_and_gives_554(tmp_path):
    cfg = FanEncoderConfig.tiny()
    sd = write_random_checkpoint(tmp_path / "pd_fpg.pth", cfg)
    enc = FanEncoder.from_checkpoint(tmp_path, cfg)
    assert enc.ignored_keys == []
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    x = torch.rand(3, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        y = enc(x)
        ref = FanEncoder(cfg)
        ref.load_state_dict(sd)
        ref.eval()
        torch.testing.assert_close(y, ref(x))
        # Published order: [headpose_embed | eye_embed | emo_embed | to_mouth], per sample (BN in eval mode).
        f = ref.model(x)
        torch.testing.assert_close(y[:, :6], ref.headpose_embed(ref.to_headpose(f)))
        torch.testing.assert_close(y[:, 42:], ref.to_mouth(f))
        torch.testing.assert_close(enc(x[1:2])[0], y[1], atol=1e-5, rtol=1e-5)
    assert y.shape == (3, 554)


def test_checkpoint_errors_name_the_fix(tmp_path):
    cfg = FanEncoderConfig.tiny()
    sd = write_random_checkpoint(tmp_path / "pd_fpg.pth", cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="Missing pd_fpg.pth"):
        FanEncoder.from_checkpoint(tmp_path / "empty", cfg)
    del sd["to_eye.3.weight"]
    torch.save(sd, tmp_path / "pd_fpg.pth")
    with pytest.raises(WeightsError, match="missing keys 1 .*to_eye.3.weight"):
        FanEncoder.from_checkpoint(tmp_path, cfg)
    sd["to_eye.3.weight"] = torch.zeros(512, 512)
    sd["extra.step"] = torch.zeros(1)                  # upstream loads non-strict: stray keys are set aside
    torch.save(sd, tmp_path / "pd_fpg.pth")
    assert FanEncoder.from_checkpoint(tmp_path, cfg).ignored_keys == ["extra.step"]


def _read_video(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(frame)


def write_calibrated_checkpoint(path, cfg: FanEncoderConfig, crops: torch.Tensor, seed: int = 0) -> None:
    """Random weights whose BatchNorm statistics are measured on real aligned crops (N, 3, 224, 224).

    A random network with unit BN statistics maps every face to almost the same row; calibrated statistics make
    rows of neighbouring video frames clearly different, so a one-frame shift cannot hide in rounding.
    """
    torch.manual_seed(seed)
    enc = FanEncoder(cfg)
    for m in enc.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None                          # cumulative average over the calibration batch
    enc.train()
    with torch.no_grad():
        enc(crops)
    torch.save(enc.state_dict(), path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two busy cores shared with other test runs: one intra-op thread avoids OpenMP spin-waits that make the
    # tiny encoder ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    cfg = FanEncoderConfig.tiny()
    root = tmp_path_factory.mktemp("pdfgc")
    mesh = MediapipeLandmarks(static=True)
    crops = []
    for frame in _read_video(data_file("driving", "lp_d0.mp4"))[::10]:
        rgb = np.ascontiguousarray(frame[..., ::-1])
        crops.append(warp_face(rgb, template_matrix(mesh.five_points(rgb))))
    write_calibrated_checkpoint(root / "pd_fpg.pth", cfg,
                                torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1, seed=3)
    encoder = FanEncoder.from_checkpoint(root, cfg)
    yield ExpressionExtractor(encoder, mesh, channel_order="bgr", max_batch=8)
    mesh.close()


def test_every_frame_gets_its_own_row_with_blanked_frames(extractor):
    frames = _read_video(data_file("driving", "lp_d0.mp4"))
    assert len(frames) == 78
    clean, clean_found = extractor.extract(frames)
    assert clean.shape == (78, 554) and clean.dtype == np.float32 and clean_found.all()
    blank = [i % 7 == 0 for i in range(len(frames))]                 # 0, 7, ..., 77: first and last included
    extractor.reset()
    feats, found = extractor.extract([np.zeros_like(f) if b else f for f, b in zip(frames, blank)])
    assert feats.shape == (78, 554) and found.shape == (78,)
    np.testing.assert_array_equal(found, ~np.array(blank))
    np.testing.assert_array_equal(feats[0], extractor.neutral)        # before any face: the neutral row
    step = np.linalg.norm(np.diff(clean, axis=0), axis=1)
    assert step.min() > 0.01 * np.linalg.norm(clean, axis=1).mean(), "rows of neighbouring frames must differ"
    for i in range(1, len(frames)):
        if blank[i]:
            np.testing.assert_array_equal(feats[i], feats[i - 1])     # carried, not shifted in
        else:
            # Row i is frame i's own row: equal to the clean run's row i, far from its neighbours.
            err = np.linalg.norm(feats[i] - clean[i])
            assert err < 1e-3 * step.min(), (i, err)


def test_push_one_by_one_matches_batched_extract(extractor):
    frames = _read_video(data_file("driving", "lp_d0.mp4"))[:12]
    frames[4] = np.zeros_like(frames[4])
    extractor.reset()
    batched, found = extractor.extract(frames)
    extractor.reset()
    single = [extractor.push(f) for f in frames]
    np.testing.assert_array_equal([r.face_found for r in single], found)
    np.testing.assert_allclose(np.stack([r.features for r in single]), batched, rtol=0, atol=1e-5)
    extractor.reset()
    rgb = ExpressionExtractor(extractor.encoder, extractor.landmarks, channel_order="rgb", max_batch=5)
    via_rgb = rgb.push_batch([np.ascontiguousarray(f[..., ::-1]) for f in frames])
    np.testing.assert_allclose(np.stack([r.features for r in via_rgb]), batched, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        extractor.push(frames[0].astype(np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_push_equals_the_eager_encoder():
    """On CUDA, push() replays a CUDA graph of the full-size encoder for one crop: same rows as the eager encoder,
    frame after frame (the static input is rewritten each time, not read stale)."""
    encoder = FanEncoder(FanEncoderConfig()).to("cuda").eval()
    mesh = MediapipeLandmarks(static=True)
    try:
        graphed = ExpressionExtractor(encoder, mesh, channel_order="bgr")
        eager = ExpressionExtractor(encoder, mesh, channel_order="bgr", cuda_graph=False)
        assert graphed._graph is not None and eager._graph is None
        frames = _read_video(data_file("driving", "lp_d0.mp4"))[:6]
        a = np.stack([graphed.push(f).features for f in frames])
        b = np.stack([eager.push(f).features for f in frames])
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)
        assert np.linalg.norm(np.diff(a, axis=0)) > 0  # each frame its own row
    finally:
        mesh.close()
