"""NanoDet-style one-class face detector (`face_det.onnx`): letterbox, run, decode, NMS, back to image pixels.

    FaceDetector(path).detect(frame_bgr (H, W, 3) uint8) -> boxes (K, 4) [x1, y1, x2, y2] image px, scores (K,)

The model sees a (1, 3, 272, 160) letterboxed, per-channel normalised BGR image and returns, by position,
three score maps (strides 8, 16, 32) then three distance distributions (4 sides x 8 bins each). Any output shape
whose element count matches the level's anchors is accepted: only the order of outputs is part of the contract.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

IN_H, IN_W = 272, 160
STRIDES = (8, 16, 32)
BINS = 8                      # distances are the expectation over 0..7 bins, in units of the stride
MEAN_BGR = np.array([103.53, 116.28, 123.675], dtype=np.float32)
STD_BGR = np.array([57.375, 57.12, 58.395], dtype=np.float32)
SCORE_THRESHOLD = 0.4
NMS_IOU = 0.3
TOP_K = 1000


def letterbox_matrix(w: int, h: int) -> np.ndarray:
    """(3, 3) fp64 M = T @ S @ C: centre the image, scale it uniformly to fit 160x272, centre it there."""
    c = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]], dtype=np.float64)
    r = min(IN_W / w, IN_H / h)
    s = np.diag([r, r, 1.0])
    t = np.array([[1, 0, IN_W / 2], [0, 1, IN_H / 2], [0, 0, 1]], dtype=np.float64)
    return t @ s @ c


def anchors(stride: int) -> np.ndarray:
    """(n, 2) anchor centres (x, y) of one level, row-major over the 272x160 input: 680, 170, 45 anchors."""
    rows, cols = np.arange(IN_H / stride), np.arange(IN_W / stride)  # ceil: 8.5 rows -> 9 at stride 32
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1) * stride


ANCHORS = tuple(anchors(s) for s in STRIDES)


def decode(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Model outputs (by position) -> candidate boxes (N, 4) in input pixels and scores (N,), before NMS."""
    boxes, scores = [], []
    for level, (stride, centres) in enumerate(zip(STRIDES, ANCHORS)):
        n = len(centres)
        score = np.asarray(outputs[level], dtype=np.float32).reshape(n)
        dist = np.asarray(outputs[level + 3], dtype=np.float32).reshape(n, 4, BINS)
        if n > TOP_K:
            keep = np.argpartition(-score, TOP_K)[:TOP_K]
            score, dist, centres = score[keep], dist[keep], centres[keep]
        keep = score > SCORE_THRESHOLD
        score, dist, centres = score[keep], dist[keep], centres[keep]
        prob = np.exp(dist - dist.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        ltrb = (prob @ np.arange(BINS, dtype=np.float32)) * stride        # (n, 4) left, top, right, bottom
        boxes.append(np.concatenate([centres - ltrb[:, :2], centres + ltrb[:, 2:]], axis=1))
        scores.append(score)
    return np.concatenate(boxes).astype(np.float64), np.concatenate(scores)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Hard NMS; indices of the kept boxes, best first."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    kept = []
    while order.size:
        i, rest = order[0], order[1:]
        kept.append(i)
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clip(0).prod(1)
        overlap = inter / (area[i] + area[rest] - inter + 1e-12)
        order = rest[overlap <= iou]
    return np.asarray(kept, dtype=np.int64)


class FaceDetector:
    """`face_det.onnx` through onnxruntime. `detect(frame_bgr)` -> (boxes (K, 4) image px, scores (K,))."""

    def __init__(self, path: str | os.PathLike, prefer_cuda: bool = True):
        from engine.models.pdfgc.runtime import open_session

        self.session = open_session(path, "face detector", prefer_cuda)
        self.input_name = self.session.get_inputs()[0].name
        self._input = np.empty((1, 3, IN_H, IN_W), dtype=np.float32)
        self._canvas = np.empty((IN_H, IN_W, 3), dtype=np.uint8)
        self._scale = (1.0 / STD_BGR).reshape(3, 1, 1)
        self._shift = (MEAN_BGR / STD_BGR).reshape(3, 1, 1)

    def preprocess(self, frame_bgr: np.ndarray) -> np.ndarray:
        """Letterbox + normalise into the reused (1, 3, 272, 160) input; returns the letterbox matrix (3, 3)."""
        h, w = frame_bgr.shape[:2]
        m = letterbox_matrix(w, h)
        cv2.warpPerspective(frame_bgr, m, (IN_W, IN_H), dst=self._canvas, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0)
        chw = self._canvas.transpose(2, 0, 1)
        np.multiply(chw, self._scale, out=self._input[0])
        self._input[0] -= self._shift
        return m

    def detect(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.preprocess(frame_bgr)
        outputs = self.session.run(None, {self.input_name: self._input})
        return postprocess(outputs, m, frame_bgr.shape[1], frame_bgr.shape[0])


def postprocess(outputs: list[np.ndarray], letterbox: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode, NMS, map boxes back through the inverse letterbox and clip to the (w, h) image."""
    boxes, scores = decode(outputs)
    if len(boxes) == 0:
        return np.zeros((0, 4)), np.zeros((0,), dtype=np.float32)
    keep = nms(boxes, scores)
    boxes, scores = boxes[keep], scores[keep]
    inv = np.linalg.inv(letterbox)
    # The letterbox is a scale + shift, so the two corners map to the two corners.
    corners = np.concatenate([boxes.reshape(-1, 2), np.ones((2 * len(boxes), 1))], axis=1) @ inv.T
    boxes = (corners[:, :2] / corners[:, 2:]).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes, scores


def largest(boxes: np.ndarray) -> int:
    """Index of the largest-area box."""
    return int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
