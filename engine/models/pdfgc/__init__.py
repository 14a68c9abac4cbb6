"""PD-FGC expression features for FlashPortrait: face detect -> 222 landmarks -> align -> FanEncoder -> 554 per frame.

    detector.py     face_det.onnx: letterbox 272x160, decode, NMS, largest face
    landmarks.py    face_landmark.onnx (three passes, One-Euro tracking) and the mediapipe fallback -> 5 points
    align.py        Umeyama similarity to the 5-point template, bicubic warp to 224x224
    fan_encoder.py  FanEncoder with pd_fpg.pth key names -> [headpose 6 | eye 6 | emo 30 | mouth 512]
    extractor.py    ExpressionExtractor: push / push_batch / extract, one row per frame, never shifted

Names are imported on first use, so `engine.models.pdfgc.fan_encoder` (torch only) works where cv2 / onnxruntime /
mediapipe are not installed (e.g. a GPU box that only times the encoder).
"""
from __future__ import annotations

import importlib

_HOME = {
    "ALIGN_INDEX": "align", "template": "align", "template_matrix": "align", "umeyama": "align",
    "warp_face": "align", "FaceDetector": "detector", "ExpressionExtractor": "extractor",
    "ExpressionResult": "extractor", "make_landmarks": "extractor", "FanEncoder": "fan_encoder",
    "FanEncoderConfig": "fan_encoder", "LandmarkModel": "landmarks", "MediapipeLandmarks": "landmarks",
    "OneEuroSmoother": "landmarks", "OnnxLandmarks": "landmarks",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"engine.models.pdfgc.{_HOME[name]}"), name)
    raise AttributeError(f"module 'engine.models.pdfgc' has no attribute {name!r}")
