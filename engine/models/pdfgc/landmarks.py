"""Face landmarks for alignment: the published 222-point ONNX path, its One-Euro smoother, and a mediapipe fallback.

Both backends answer one question per frame:

    backend.five_points(frame) -> (5, 2) fp64 image pixels [left pupil, right pupil, nose tip, left mouth corner,
                                  right mouth corner] ("left" = image left), or None when there is no face

`frame` is (H, W, 3) uint8 in the backend's `channel_order` ("bgr" for the ONNX models, "rgb" for mediapipe);
`ExpressionExtractor` converts for you.

`OnnxLandmarks` (the published path): `face_det.onnx` finds the largest face when no face is tracked;
`face_landmark.onnx` reads a 128x128 crop (box scaled by 1 - 0.15 of the crop, BGR / 255) three times, each pass
re-cropping around the previous points and rotating by their roll (eye corners 74 -> 96); the points are smoothed
over time by a per-part One-Euro filter and tracked into the next frame. A face is dropped when the model's
probability is under 1e-4 or its points span less than 96 px.

`MediapipeLandmarks` (fallback when the ONNX files are absent): mediapipe's face mesh (refined, with irises),
mapped to the same five points: iris centres 468 / 473, nose tip 1, mouth corners 61 / 291. It is a different
landmark model, so features from it are close to, not equal to, the published pipeline's.
"""
from __future__ import annotations

import math
import os

import cv2
import numpy as np

from engine.models.pdfgc.align import ALIGN_INDEX, invert_affine, transform_points
from engine.models.pdfgc.detector import FaceDetector, largest

CROP = 128
EXPAND = 0.15
PASSES = 3
MIN_PROB = 1e-4
MIN_FACE = 96.0
EYE_CORNERS = (74, 96)


# --- crops ------------------------------------------------------------------------------------------------------
def _rotation(center: np.ndarray, angle_deg: float, scale: float) -> np.ndarray:
    """(2, 3) rotation by `angle_deg` (counter-clockwise on screen, cv2 convention) and scale about `center`."""
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    cx, cy = float(center[0]), float(center[1])
    return np.array([[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy]], dtype=np.float64)


def box_crop_matrix(box: np.ndarray, size: int = CROP, expand: float = EXPAND) -> np.ndarray:
    """(2, 3) image -> crop: the box centre goes to the crop centre, its longer side to (1 - expand) * size."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    m = _rotation(centre, 0.0, size / max(x2 - x1, y2 - y1, 1e-6) * (1 - expand))
    m[:, 2] += size / 2 - centre
    return m


def points_crop_matrix(points: np.ndarray, angle_deg: float, size: int = CROP, expand: float = EXPAND) -> np.ndarray:
    """(2, 3) image -> crop around `points` (N, 2), rotated by `angle_deg` so the face is upright.

    The scale comes from the extent of the rotated points, and the centre of their rotated box lands on the crop
    centre.
    """
    centre = (points.min(0) + points.max(0)) / 2
    upright = transform_points(points, _rotation(centre, angle_deg, 1.0))
    extent = float((upright.max(0) - upright.min(0)).max())
    m = _rotation(centre, angle_deg, size / max(extent, 1e-6) * (1 - expand))
    moved = transform_points(points, m)
    m[:, 2] += size / 2 - (moved.min(0) + moved.max(0)) / 2
    return m


def roll_degrees(points: np.ndarray) -> float:
    """In-plane angle of the eye line (corner 74 -> corner 96), degrees, image coordinates (y down)."""
    a, b = points[EYE_CORNERS[0]], points[EYE_CORNERS[1]]
    return math.degrees(math.atan2(b[1] - a[1], b[0] - a[0] + 1e-8))


# --- the 222-point model ----------------------------------------------------------------------------------------
class LandmarkModel:
    """`face_landmark.onnx`: crop (128, 128, 3) uint8 BGR -> points (222, 2) crop px, (pitch, yaw) rad, prob."""

    def __init__(self, path: str | os.PathLike, prefer_cuda: bool = True):
        from engine.models.pdfgc.runtime import open_session

        self.session = open_session(path, "222-point face landmark model", prefer_cuda)
        self.input_name = self.session.get_inputs()[0].name
        self._input = np.empty((1, 3, CROP, CROP), dtype=np.float32)
        self._crop = np.empty((CROP, CROP, 3), dtype=np.uint8)

    def run(self, crop_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        np.multiply(crop_bgr.transpose(2, 0, 1), np.float32(1 / 255), out=self._input[0])
        landmarks, euler, prob = self.session.run(None, {self.input_name: self._input})[:3]
        points = np.asarray(landmarks, dtype=np.float64).reshape(2, -1).T * CROP   # (222, 2)
        return points, np.asarray(euler, dtype=np.float64).reshape(-1)[:2], float(np.ravel(prob)[0])

    def refine(self, frame_bgr: np.ndarray, box: np.ndarray | None = None, points: np.ndarray | None = None,
               passes: int = PASSES) -> tuple[np.ndarray, np.ndarray, float]:
        """Three crop-and-predict passes from a box (first frame) or the previous points (tracking).

        Returns points (222, 2) image px, (pitch, yaw) radians, probability of the last pass.
        """
        if points is None:
            m = box_crop_matrix(box)
        else:
            m = points_crop_matrix(points, roll_degrees(points))
        for p in range(passes):
            if p:
                # Roll is re-measured in image coordinates from this pass's points (upstream reuses the roll
                # measured inside the already-rotated crop, which undoes the rotation on the third pass).
                m = points_crop_matrix(points, roll_degrees(points))
            cv2.warpAffine(frame_bgr, m, (CROP, CROP), dst=self._crop, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            crop_points, euler, prob = self.run(self._crop)
            points = transform_points(crop_points, invert_affine(m))
        return points, euler, prob


# --- One-Euro smoothing -----------------------------------------------------------------------------------------
# Per face part: (point range, points whose motion decides the strength, still threshold, still strength,
# moving strength). Motion is the mean per-point displacement divided by the face size; below the threshold the
# strength ramps from 0 to the still value, up to 0.02 it ramps to the moving value, above it stays there. The
# strength is used as both the filter's time step and its speed coefficient (beta), as the published tracker does.
_PARTS = (
    (range(0, 33), range(9, 24), 0.005, 0.05, 0.3),   # contour, judged by the chin
    (range(33, 48), None, 0.003, 0.03, 0.7),          # nose
    (range(48, 74), None, 0.003, 0.02, 0.5),          # brows
    (range(74, 96), None, 0.003, 0.03, 0.7),          # left eye
    (range(96, 118), None, 0.003, 0.03, 0.7),         # right eye
    (range(118, 182), None, 0.003, 0.05, 0.7),        # mouth
    (range(182, 202), None, 0.003, 0.03, 0.7),        # left pupil
    (range(202, 222), None, 0.003, 0.03, 0.7),        # right pupil
)
_FAST = 0.02
_MIN_CUTOFF = 1.0
_D_CUTOFF = 1.0


def _alpha(step: float, cutoff: float) -> float:
    r = 2 * math.pi * cutoff * step
    return r / (r + 1)


class OneEuroSmoother:
    """Per-part One-Euro filter over 222 points; `smooth(points (222, 2), face_size) -> (222, 2)`."""

    def __init__(self):
        self.prev: np.ndarray | None = None
        self.dx: list = [0.0] * len(_PARTS)  # filtered speed per part (becomes (n, 2) after the first step)

    def smooth(self, points: np.ndarray, face_size: float) -> np.ndarray:
        if self.prev is None:
            self.prev = points.copy()
            return points
        moved = np.linalg.norm(points - self.prev, axis=1) / max(face_size, 1e-6)
        out = points.copy()
        for k, (idx, judge, still, p_still, p_fast) in enumerate(_PARTS):
            sl = slice(idx.start, idx.stop)
            motion = float(moved[judge.start:judge.stop].mean() if judge is not None else moved[sl].mean())
            if motion < still:
                p = p_still * motion / still
            elif motion < _FAST:
                p = p_still + (p_fast - p_still) * (motion - still) / (_FAST - still)
            else:
                p = p_fast
            p = max(p, 1e-6)  # a perfectly still part would otherwise divide by zero
            speed = (points[sl] - self.prev[sl]) / p
            self.dx[k] = _alpha(p, _D_CUTOFF) * speed + (1 - _alpha(p, _D_CUTOFF)) * self.dx[k]
            a = _alpha(p, _MIN_CUTOFF + p * np.abs(self.dx[k]))
            out[sl] = a * points[sl] + (1 - a) * self.prev[sl]
        self.prev = out
        return out


# --- backends -----------------------------------------------------------------------------------------------------
class OnnxLandmarks:
    """The published path: detector + 222-point model + One-Euro tracking -> five alignment points (BGR frames)."""

    channel_order = "bgr"
    name = "onnx"

    def __init__(self, detector: FaceDetector, model: LandmarkModel, min_prob: float = MIN_PROB,
                 min_face: float = MIN_FACE):
        self.detector, self.model = detector, model
        self.min_prob, self.min_face = min_prob, min_face
        self.points: np.ndarray | None = None     # smoothed (222, 2) of the tracked face, None when not tracking
        self._smoother = OneEuroSmoother()
        self._face_size = 0.0

    @classmethod
    def from_files(cls, det_path: str | os.PathLike, landmark_path: str | os.PathLike,
                   prefer_cuda: bool = True) -> "OnnxLandmarks":
        return cls(FaceDetector(det_path, prefer_cuda), LandmarkModel(landmark_path, prefer_cuda))

    def reset(self) -> None:
        self.points = None

    def _accept(self, points: np.ndarray, prob: float) -> bool:
        span = points.max(0) - points.min(0)
        return prob >= self.min_prob and bool((span >= self.min_face).all())

    def landmarks(self, frame_bgr: np.ndarray) -> np.ndarray | None:
        """(222, 2) smoothed image points of the tracked (else largest detected) face, or None."""
        if self.points is not None:
            points, euler, prob = self.model.refine(frame_bgr, points=self.points)
            if not self._accept(points, prob):
                self.points = None
        if self.points is None:
            boxes, _ = self.detector.detect(frame_bgr)
            if len(boxes) == 0:
                return None
            box = boxes[largest(boxes)]
            points, euler, prob = self.model.refine(frame_bgr, box=box)
            if not self._accept(points, prob):
                return None
            self._smoother = OneEuroSmoother()
            self._face_size = float(math.hypot(box[2] - box[0], box[3] - box[1]))
        self.points = self._smoother.smooth(points, self._face_size)
        # Next frame's motion scale: jaw width, widened when the head is turned (pitch + 0.6 yaw, degrees).
        turn = abs(math.degrees(euler[0])) + 0.6 * abs(math.degrees(euler[1]))
        self._face_size = float(np.linalg.norm(self.points[0] - self.points[32])) * (1 + turn / 18)
        return self.points

    def five_points(self, frame_bgr: np.ndarray) -> np.ndarray | None:
        points = self.landmarks(frame_bgr)
        return None if points is None else points[list(ALIGN_INDEX)]


# Face-mesh indices standing in for the five 222-point alignment landmarks.
MEDIAPIPE_FIVE = (468, 473, 1, 61, 291)


class MediapipeLandmarks:
    """Fallback when `face_det.onnx` / `face_landmark.onnx` are absent: mediapipe face mesh -> five points (RGB).

    `static=True` treats every frame on its own (deterministic per image, used by tests and single images);
    `static=False` lets mediapipe track between frames (faster, for live video). The largest of up to
    `max_faces` faces is used; by default 2 for images and 1 for live video: while it tracks fewer faces than
    `max_faces`, mediapipe runs its face detector on every frame to look for another one (~30% of the landmark time
    on a 2-core CPU), and a frame's landmarks gate the next rolling window.
    """

    channel_order = "rgb"
    name = "mediapipe"

    def __init__(self, static: bool = False, max_faces: int | None = None, min_confidence: float = 0.5):
        import mediapipe as mp

        max_faces = max_faces or (2 if static else 1)
        self.static, self.max_faces, self.min_confidence = static, max_faces, min_confidence
        self._mesh_cls = mp.solutions.face_mesh.FaceMesh
        self._mesh = self._open()

    def _open(self):
        return self._mesh_cls(static_image_mode=self.static, max_num_faces=self.max_faces, refine_landmarks=True,
                              min_detection_confidence=self.min_confidence,
                              min_tracking_confidence=self.min_confidence)

    def reset(self) -> None:
        if not self.static:
            self._mesh.close()
            self._mesh = self._open()

    def mesh(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        """(478, 2) image pixels of the largest face, or None."""
        h, w = frame_rgb.shape[:2]
        result = self._mesh.process(frame_rgb)
        if not result.multi_face_landmarks:
            return None
        faces = [np.array([(p.x * w, p.y * h) for p in f.landmark], dtype=np.float64)
                 for f in result.multi_face_landmarks]
        return max(faces, key=lambda pts: float(np.prod(pts.max(0) - pts.min(0))))

    def five_points(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        pts = self.mesh(frame_rgb)
        return None if pts is None else pts[list(MEDIAPIPE_FIVE)]

    def close(self) -> None:
        self._mesh.close()
