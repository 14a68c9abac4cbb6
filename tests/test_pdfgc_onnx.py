"""Detector and landmark pre/post-processing against tiny ONNX models built here with the published interface.

face_det.onnx: input (1, 3, 272, 160); outputs by position: scores for strides 8/16/32, then 4x8-bin distance
distributions for the same strides. The tiny detector returns planted constants, so decode + NMS + inverse
letterbox must give back exactly the planted box.

face_landmark.onnx: input (1, 3, 128, 128) BGR / 255; outputs by position: landmarks (1, 444) as [x | y] / 128,
euler (1, 3), prob (1, 1). The tiny landmark model really looks at its crop: it finds three coloured dots (the
intensity-squared centroid of each BGR channel) and places the 222 points as fixed barycentric combinations of
them. An affine combination moves with the crop, so the three crop-and-predict passes, the rotations by roll and
the mapping back to the image must return the planted image points exactly (to sub-pixel rounding).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.models.pdfgc.align import ALIGN_INDEX
from engine.models.pdfgc.detector import ANCHORS, IN_H, IN_W, MEAN_BGR, STD_BGR, STRIDES, FaceDetector, largest
from engine.models.pdfgc.landmarks import LandmarkModel, OnnxLandmarks

OPSET = [helper.make_opsetid("", 17)]


def _const(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name))


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- tiny detector ------------------------------------------------------------------------------------------
def _onehot_bins(bins: tuple[int, int, int, int]) -> np.ndarray:
    logits = np.zeros((4, 8), np.float32)
    logits[np.arange(4), bins] = 40.0  # softmax puts all but ~1e-16 of the mass on the planted bin
    return logits.reshape(32)


def build_detector(path, planted: dict[tuple[int, int], tuple[float, tuple[int, int, int, int]]]):
    """planted: {(level, anchor index): (score, (l, t, r, b) bins)}; everything else scores 0."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, IN_H, IN_W])
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0), _const("zero", np.zeros(())),
             helper.make_node("Mul", ["mean", "zero"], ["dep"])]  # outputs depend (trivially) on the input
    outputs = []
    scores = [np.zeros((1, len(a), 1), np.float32) for a in ANCHORS]
    dists = [np.zeros((1, len(a), 32), np.float32) for a in ANCHORS]
    for (level, idx), (score, bins) in planted.items():
        scores[level][0, idx, 0] = score
        dists[level][0, idx] = _onehot_bins(bins)
    for k, arr in enumerate(scores + dists):
        nodes += [_const(f"c{k}", arr), helper.make_node("Add", [f"c{k}", "dep"], [f"out{k}"])]
        outputs.append(helper.make_tensor_value_info(f"out{k}", TensorProto.FLOAT, list(arr.shape)))
    return _save(helper.make_graph(nodes, "tiny_face_det", [x], outputs), path)


def _anchor(level: int, row: int, col: int) -> int:
    return row * math.ceil(IN_W / STRIDES[level]) + col


def _image_box(box_in, w, h):
    """Input-space box -> image pixels for a (w, h) frame, by the letterbox arithmetic written out by hand."""
    r = min(IN_W / w, IN_H / h)
    x1, y1, x2, y2 = box_in
    out = np.array([(x1 - IN_W / 2) / r + w / 2, (y1 - IN_H / 2) / r + h / 2,
                    (x2 - IN_W / 2) / r + w / 2, (y2 - IN_H / 2) / r + h / 2])
    out[0::2] = out[0::2].clip(0, w)
    out[1::2] = out[1::2].clip(0, h)
    return out


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    planted = {
        (1, _anchor(1, 8, 5)): (0.9, (3, 3, 3, 3)),   # the face: centre (80, 128), 48 px each side
        (1, _anchor(1, 8, 6)): (0.8, (3, 3, 3, 3)),   # same face one anchor right: IoU 0.71, suppressed by NMS
        (0, _anchor(0, 3, 3)): (0.35, (1, 1, 1, 1)),  # under the 0.4 score threshold
        (2, _anchor(2, 6, 4)): (0.6, (1, 1, 1, 1)),   # a second, smaller face (IoU 0.04): kept
    }
    return build_detector(tmp_path_factory.mktemp("det") / "face_det.onnx", planted)


def test_detector_decode_nms_return_planted_boxes(detector_path):
    det = FaceDetector(detector_path, prefer_cuda=False)
    w, h = 640, 480
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes, scores = det.detect(frame)
    assert len(boxes) == 2, boxes
    np.testing.assert_allclose(scores, [0.9, 0.6], atol=1e-6)
    np.testing.assert_allclose(boxes[0], _image_box((32, 80, 128, 176), w, h), atol=1e-3)   # (128, 16, 512, 400)
    np.testing.assert_allclose(boxes[1], _image_box((96, 160, 160, 224), w, h), atol=1e-3)  # clipped at the bottom
    assert largest(boxes) == 0


def test_detector_letterbox_and_normalisation(detector_path):
    det = FaceDetector(detector_path, prefer_cuda=False)
    w, h = 640, 480                         # scale 0.25: the image fills input rows 76..195, the rest is border
    bgr = np.array([10, 200, 50], np.uint8)
    det.preprocess(np.broadcast_to(bgr, (h, w, 3)).copy())
    x = det._input[0]
    np.testing.assert_allclose(x[:, 136, 80], (bgr - MEAN_BGR) / STD_BGR, rtol=1e-5)
    np.testing.assert_allclose(x[:, 10, 80], -MEAN_BGR / STD_BGR, rtol=1e-5)
    np.testing.assert_allclose(x[:, 250, 3], -MEAN_BGR / STD_BGR, rtol=1e-5)
    filled = np.isclose(x[0, :, 80], (10 - MEAN_BGR[0]) / STD_BGR[0], atol=1e-4)
    assert filled[77:195].all() and not filled[:75].any() and not filled[197:].any()


# --- tiny landmark model -----------------------------------------------------------------------------------
def _barycentric(n: int = 222, seed: int = 0) -> np.ndarray:
    """(3, n) weights (columns sum to 1); points 74 and 96 are dots 0 and 1 (the eye line), point 0 is dot 2."""
    w = np.random.default_rng(seed).dirichlet([1.0, 1.0, 1.0], size=n).T
    w[:, 74], w[:, 96], w[:, 0] = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    return w.astype(np.float32)


def build_landmark_model(path, weights: np.ndarray, prob: float = 0.9):
    x = helper.make_tensor_value_info("crop", TensorProto.FLOAT, [1, 3, 128, 128])
    grid = np.arange(128, dtype=np.float32)
    nodes = [
        helper.make_node("Mul", ["crop", "crop"], ["energy"]),                       # (1, 3, 128, 128)
        _const("axes", np.array([2, 3])), helper.make_node("Cast", ["axes"], ["axes64"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["energy", "axes64"], ["total"], keepdims=0),  # (1, 3)
        _const("gx", grid.reshape(1, 1, 1, 128)), _const("gy", grid.reshape(1, 1, 128, 1)),
        helper.make_node("Mul", ["energy", "gx"], ["ex"]), helper.make_node("Mul", ["energy", "gy"], ["ey"]),
        helper.make_node("ReduceSum", ["ex", "axes64"], ["sx"], keepdims=0),
        helper.make_node("ReduceSum", ["ey", "axes64"], ["sy"], keepdims=0),
        helper.make_node("Div", ["sx", "total"], ["dot_x"]), helper.make_node("Div", ["sy", "total"], ["dot_y"]),
        _const("w", weights),                                                        # (3, 222)
        helper.make_node("MatMul", ["dot_x", "w"], ["px"]), helper.make_node("MatMul", ["dot_y", "w"], ["py"]),
        helper.make_node("Concat", ["px", "py"], ["pxy"], axis=1), _const("side", np.array(128.0)),
        helper.make_node("Div", ["pxy", "side"], ["landmarks"]),                     # (1, 444)
        _const("euler", np.zeros((1, 3))), _const("prob", np.full((1, 1), prob)),
    ]
    outs = [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, [1, 444]),
            helper.make_tensor_value_info("euler", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1])]
    return _save(helper.make_graph(nodes, "tiny_face_landmark", [x], outs), path)


def _scene(dots: np.ndarray, w: int = 640, h: int = 480, sigma: float = 5.0) -> np.ndarray:
    """Black BGR frame with a Gaussian dot of channel c at dots[c]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frame = np.zeros((h, w, 3), np.uint8)
    for c, (x, y) in enumerate(dots):
        frame[..., c] = np.round(255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)))
    return frame


def _dots(angle_deg: float) -> np.ndarray:
    base = np.array([[250.0, 150.0], [390.0, 150.0], [320.0, 330.0]])   # eye, eye, chin; inside the planted box
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre = base.mean(0)
    return (base - centre) @ rot.T + centre


@pytest.fixture(scope="module")
def landmark_setup(tmp_path_factory):
    weights = _barycentric()
    root = tmp_path_factory.mktemp("lmk")
    return weights, build_landmark_model(root / "face_landmark.onnx", weights), \
        build_landmark_model(root / "unsure.onnx", weights, prob=1e-5)


@pytest.mark.parametrize("angle", [0.0, 25.0, -40.0])
def test_landmark_passes_return_planted_points(landmark_setup, detector_path, angle):
    weights, path, _ = landmark_setup
    dots = _dots(angle)
    planted = weights.T.astype(np.float64) @ dots                      # (222, 2) image px
    frame = _scene(dots)
    backend = OnnxLandmarks(FaceDetector(detector_path, prefer_cuda=False), LandmarkModel(path, prefer_cuda=False))
    first = backend.landmarks(frame)                                    # detect -> box crop -> 2 refinements
    assert first is not None
    np.testing.assert_allclose(first, planted, atol=0.35)
    second = backend.five_points(frame)                                 # tracked from the previous points
    np.testing.assert_allclose(second, planted[list(ALIGN_INDEX)], atol=0.35)
    # The points above would come out right at any crop angle; check that the crop is really turned by the roll:
    model = LandmarkModel(path, prefer_cuda=False)
    model.refine(frame, points=planted, passes=1)
    crop_dots = np.array([[np.average(np.arange(128), weights=(model._crop[..., c].astype(float) ** 2).sum(ax))
                           for ax in (0, 1)] for c in range(2)])
    assert abs(crop_dots[0, 1] - crop_dots[1, 1]) < 0.5                 # the eye line is level in the crop


def test_landmark_low_probability_drops_the_face(landmark_setup, detector_path):
    weights, _, unsure = landmark_setup
    backend = OnnxLandmarks(FaceDetector(detector_path, prefer_cuda=False),
                            LandmarkModel(unsure, prefer_cuda=False))
    assert backend.five_points(_scene(_dots(0.0))) is None


def test_published_onnx_path_is_the_default_when_files_exist(landmark_setup, detector_path, tmp_path):
    import shutil

    import torch

    from engine.models.pdfgc.extractor import ExpressionExtractor, make_landmarks
    from engine.models.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig
    from engine.models.pdfgc.landmarks import MediapipeLandmarks
    from engine.weights import WeightsError

    _, lmk_path, _ = landmark_setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="Missing face_det.onnx"):
        make_landmarks(tmp_path / "empty", "onnx", prefer_cuda=False)
    fallback = make_landmarks(tmp_path / "empty", "auto", prefer_cuda=False)
    assert isinstance(fallback, MediapipeLandmarks)
    fallback.close()

    root = tmp_path / "weights"
    root.mkdir()
    shutil.copy(detector_path, root / "face_det.onnx")
    shutil.copy(lmk_path, root / "face_landmark.onnx")
    cfg = FanEncoderConfig.tiny()
    torch.save(FanEncoder(cfg).state_dict(), root / "pd_fpg.pth")
    ex = ExpressionExtractor.from_weights(root, channel_order="bgr", device="cpu", encoder_config=cfg)
    assert isinstance(ex.landmarks, OnnxLandmarks)
    frame = _scene(_dots(10.0))
    first, blank = ex.push_batch([frame, np.zeros_like(frame)])
    assert first.face_found and first.features.shape == (554,) and first.features.dtype == np.float32
    assert not blank.face_found and np.array_equal(blank.features, first.features)


def test_one_euro_smooths_jitter_and_follows_real_motion():
    from engine.models.pdfgc.landmarks import OneEuroSmoother

    rng = np.random.default_rng(0)
    base = rng.uniform(100, 300, size=(222, 2))
    face = 200.0
    s = OneEuroSmoother()
    np.testing.assert_array_equal(s.smooth(base, face), base)            # first frame passes through
    np.testing.assert_allclose(s.smooth(base.copy(), face), base)         # a still face stays put
    jitter = base + rng.normal(0, 0.1, size=base.shape)                  # 0.05% of the face: sensor noise
    out = s.smooth(jitter, face)
    assert np.abs(out - base).mean() < 0.2 * np.abs(jitter - base).mean()
    moved = base + np.array([20.0, -10.0])                               # 10% of the face: a real head move
    s2 = OneEuroSmoother()
    s2.smooth(base, face)
    out = s2.smooth(moved, face)
    assert np.all(np.abs(out - base) >= 0.75 * np.abs(moved - base))
