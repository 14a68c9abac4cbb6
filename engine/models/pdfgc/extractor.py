"""Frame-accurate PD-FGC expression extraction: one 554-d row per input frame, always.

    ex = ExpressionExtractor.from_weights(weights_dir)          # channel_order="rgb" (the live path's frames)
    r = ex.push(frame)            # frame (H, W, 3) uint8 -> ExpressionResult(features (554,) float32, face_found)
    rs = ex.push_batch(frames)    # several waiting frames: landmarks per frame, ONE FanEncoder batch on the GPU
    feats, found = ex.extract(frames)   # a clip: feats (T, 554) float32, found (T,) bool

Rows are [headpose 6 | eye 6 | emotion 30 | mouth 512]. A frame without a face gets the previous good row with
face_found=False; frames before the first face get `neutral` (the encoder's answer for an all-black crop, the
"negative" input upstream's code keeps) with face_found=False. Nothing is ever dropped, so row t always belongs to
frame t (upstream drops faceless frames from the landmark list but not from the frame list, which shifts every
later row by one).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from engine.models.pdfgc.align import CROP, template_matrix, warp_face
from engine.models.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig
from engine.models.pdfgc.landmarks import MediapipeLandmarks, OnnxLandmarks
from engine.weights import WeightsError, find_file

log = logging.getLogger(__name__)

FACE_DET_FILE = "face_det.onnx"
FACE_LANDMARK_FILE = "face_landmark.onnx"


@dataclass
class ExpressionResult:
    """One frame's expression: features (554,) float32 [headpose | eye | emo | mouth]; face_found False means the
    row was carried over from the last face (or is the neutral row before any face)."""

    features: np.ndarray
    face_found: bool


class ExpressionExtractor:
    """Frames -> PD-FGC features, one row per frame, with the FanEncoder batched over waiting frames.

    Args:
        encoder: a FanEncoder (eval) on the device and dtype to run it with.
        landmarks: `OnnxLandmarks` (published) or `MediapipeLandmarks` (fallback); anything with
            `five_points(frame) -> (5, 2) | None`, `channel_order` and `reset()`.
        channel_order: "rgb" (default: av/aiortc and the renderer interface deliver RGB) or "bgr" (cv2 frames).
        max_batch: most aligned crops sent to the encoder in one forward.
        cuda_graph: on CUDA, replay one CUDA graph for a single crop (the live path pushes one frame at a time):
            the FAN's hundreds of small kernels launch as one, which takes the encoder off the per-frame critical
            path (a driving frame's tokens gate the next window). Batches of several crops run eagerly.
    """

    def __init__(self, encoder: FanEncoder, landmarks, *, channel_order: str = "rgb", max_batch: int = 8,
                 cuda_graph: bool = True):
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', not {channel_order!r}.")
        self.encoder = encoder.eval()
        self.landmarks = landmarks
        self.channel_order = channel_order
        self.max_batch = max_batch
        p = next(encoder.parameters())
        self.device, self.dtype = p.device, p.dtype
        cuda = self.device.type == "cuda"
        # Crops are warped straight into (pinned) host memory and cross to the device in one copy per batch.
        self._host = torch.empty((max_batch, CROP, CROP, 3), dtype=torch.uint8, pin_memory=cuda)
        self._crops = self._host.numpy()
        self._input = torch.empty((max_batch, 3, CROP, CROP), dtype=self.dtype, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: torch.Tensor | None = None  # (1, 554) static output of the graph
        if cuda and cuda_graph:
            self._capture_one()
        self.neutral = self._encode_constant(-1.0)
        self._last: np.ndarray | None = None
        self.frames = 0
        self.faces = 0
        self.seconds = {"landmarks": 0.0, "align": 0.0, "encoder": 0.0}

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, weights_dir: str | os.PathLike | None, *, backend: str = "auto", channel_order: str = "rgb",
                     device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                     random_encoder: bool = False, encoder_config: FanEncoderConfig = FanEncoderConfig(),
                     max_batch: int = 8, static: bool = False) -> "ExpressionExtractor":
        """Build from the published files under `weights_dir`.

        backend: "onnx" needs face_det.onnx and face_landmark.onnx; "mediapipe" uses the face-mesh fallback;
        "auto" takes the ONNX files when both exist, else the fallback (logged). `random_encoder` skips
        pd_fpg.pth and uses a randomly initialised FanEncoder (timing and tests only: its features are noise).
        `static` makes the mediapipe fallback treat every frame on its own.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if random_encoder:
            encoder = FanEncoder(encoder_config).to(device=device, dtype=dtype).eval()
        else:
            encoder = FanEncoder.from_checkpoint(weights_dir, encoder_config, device, dtype)
        landmarks = make_landmarks(weights_dir, backend, static=static, prefer_cuda=device.type == "cuda")
        return cls(encoder, landmarks, channel_order=channel_order, max_batch=max_batch)

    # --- streaming ----------------------------------------------------------------------------------------------
    def push(self, frame: np.ndarray) -> ExpressionResult:
        """Features for one frame (H, W, 3) uint8 in `channel_order`."""
        return self.push_batch([frame])[0]

    def push_batch(self, frames: Iterable[np.ndarray]) -> list[ExpressionResult]:
        """Features for several waiting frames, in order; the encoder runs once per `max_batch` crops."""
        results: list[ExpressionResult] = []
        frames = list(frames)
        for start in range(0, len(frames), self.max_batch):
            results.extend(self._chunk(frames[start:start + self.max_batch]))
        return results

    def extract(self, frames: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A whole clip: features (T, 554) float32 and face_found (T,) bool, row t for frame t."""
        rows, found, chunk = [], [], []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == self.max_batch:
                for r in self._chunk(chunk):
                    rows.append(r.features)
                    found.append(r.face_found)
                chunk = []
        for r in self._chunk(chunk):
            rows.append(r.features)
            found.append(r.face_found)
        dim = self.neutral.shape[0]
        return (np.stack(rows) if rows else np.zeros((0, dim), np.float32)), np.asarray(found, dtype=bool)

    def reset(self) -> None:
        """Forget the tracked face and the carried row (a new session or a cut in the video)."""
        self.landmarks.reset()
        self._last = None

    def stats(self) -> dict:
        n = max(self.frames, 1)
        return {"frames": self.frames, "faces": self.faces, "backend": getattr(self.landmarks, "name", "custom"),
                **{f"{k}_ms": round(1000 * v / n, 3) for k, v in self.seconds.items()}}

    # --- work ---------------------------------------------------------------------------------------------------
    def _chunk(self, frames: list[np.ndarray]) -> list[ExpressionResult]:
        if not frames:
            return []
        slots: list[int | None] = []
        count = 0
        for frame in frames:
            _check_frame(frame)
            t0 = time.perf_counter()
            pts = self.landmarks.five_points(self._for_backend(frame))
            t1 = time.perf_counter()
            if pts is None:
                slots.append(None)
            else:
                warp_face(frame, template_matrix(pts), out=self._crops[count])
                slots.append(count)
                count += 1
            self.seconds["landmarks"] += t1 - t0
            self.seconds["align"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        features = self._encode(count) if count else None
        self.seconds["encoder"] += time.perf_counter() - t0
        results = []
        for slot in slots:
            if slot is None:
                carried = self.neutral if self._last is None else self._last
                results.append(ExpressionResult(carried.copy(), False))
            else:
                self._last = features[slot]
                results.append(ExpressionResult(self._last.copy(), True))
        self.frames += len(frames)
        self.faces += count
        return results

    @torch.inference_mode()
    def _capture_one(self) -> None:
        """Capture the encoder on `_input[:1]` into a CUDA graph (warmed on a side stream first, as capture needs).
        thread_local: other sessions' threads keep using the GPU while this one captures."""
        x = self._input[:1].normal_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.encoder(x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.encoder(x)
        self._graph, self._graph_out = graph, out

    @torch.inference_mode()
    def _encode(self, count: int) -> np.ndarray:
        """Encode the first `count` staged crops -> (count, 554) float32 on the host."""
        pixels = self._host[:count].to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (n, 3, 224, 224)
        if self.channel_order == "bgr":
            pixels = pixels.flip(1)                       # the encoder reads RGB
        x = self._input[:count]
        x.copy_(pixels)
        x.mul_(2 / 255).sub_(1)                           # [0, 255] -> [-1, 1]
        if count == 1 and self._graph is not None:
            self._graph.replay()                          # reads _input[:1], writes _graph_out
            return self._graph_out.float().cpu().numpy()
        return self.encoder(x).float().cpu().numpy()

    @torch.inference_mode()
    def _encode_constant(self, value: float) -> np.ndarray:
        x = self._input[:1]
        x.fill_(value)
        return self.encoder(x).float().cpu().numpy()[0]

    def _for_backend(self, frame: np.ndarray) -> np.ndarray:
        if self.landmarks.channel_order == self.channel_order:
            return np.ascontiguousarray(frame)
        return np.ascontiguousarray(frame[..., ::-1])


def _check_frame(frame: np.ndarray) -> None:
    if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8):
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise ValueError(f"Expression frames must be (H, W, 3) uint8 arrays, got shape {shape} dtype {dtype}: "
                         f"convert the frame (e.g. frame.to_ndarray(format='rgb24')) before pushing it.")


def make_landmarks(weights_dir: str | os.PathLike | None, backend: str = "auto", *, static: bool = False,
                   prefer_cuda: bool = True):
    """The landmark backend: the published ONNX pair, or the mediapipe fallback (see `from_weights`)."""
    if backend not in ("auto", "onnx", "mediapipe"):
        raise ValueError(f"backend must be 'auto', 'onnx' or 'mediapipe', not {backend!r}.")
    if backend in ("auto", "onnx"):
        try:
            det = find_file(weights_dir, FACE_DET_FILE, "face detector")
            lmk = find_file(weights_dir, FACE_LANDMARK_FILE, "222-point face landmark model")
            return OnnxLandmarks.from_files(det, lmk, prefer_cuda)
        except WeightsError as err:
            if backend == "onnx":
                raise
            log.info("expression: %s Using the mediapipe face-mesh fallback for alignment.", err)
    return MediapipeLandmarks(static=static)
