"""PD-FGC expression features for FlashPortrait: face detect -> 222 landmarks -> align -> FanEncoder -> 554 per frame.

    detector.py     face_det.onnx: letterbox 272x160, decode, NMS, largest face
    landmarks.py    face_landmark.onnx (three passes, One-Euro tracking) and the mediapipe fallback -> 5 points
    align.py        Umeyama similarity to the 5-point template, bicubic warp to 224x224
    fan_encoder.py  FanEncoder with pd_fpg.pth key names -> [headpose 6 | eye 6 | emo 30 | mouth 512]
    extractor.py    ExpressionExtractor: push / push_batch / extract, one row per frame, never shifted
"""
from engine.pdfgc.align import ALIGN_INDEX, template, template_matrix, umeyama, warp_face
from engine.pdfgc.detector import FaceDetector
from engine.pdfgc.extractor import ExpressionExtractor, ExpressionResult, make_landmarks
from engine.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig
from engine.pdfgc.landmarks import LandmarkModel, MediapipeLandmarks, OneEuroSmoother, OnnxLandmarks

__all__ = ["ALIGN_INDEX", "ExpressionExtractor", "ExpressionResult", "FaceDetector", "FanEncoder",
           "FanEncoderConfig", "LandmarkModel", "MediapipeLandmarks", "OneEuroSmoother", "OnnxLandmarks",
           "make_landmarks", "template", "template_matrix", "umeyama", "warp_face"]
