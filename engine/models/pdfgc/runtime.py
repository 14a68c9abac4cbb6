"""onnxruntime sessions for the face models: CUDA when the installed onnxruntime offers it, else CPU."""
from __future__ import annotations

import os

import onnxruntime as ort

from engine.weights import WeightsError


def providers(prefer_cuda: bool = True) -> list[str]:
    available = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if prefer_cuda and p in available]
    return chosen + ["CPUExecutionProvider"]


def open_session(path: str | os.PathLike, what: str, prefer_cuda: bool = True,
                 threads: int = 0) -> ort.InferenceSession:
    """Open an ONNX model; a file onnxruntime cannot read is one sentence naming it.

    Inputs and outputs are used by position (the published models' tensor names are not part of the contract).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers(prefer_cuda))
    except Exception as err:  # protobuf parse errors, unsupported opsets
        raise WeightsError(f"{path} ({what}) could not be opened by onnxruntime ({type(err).__name__}); it is "
                           f"truncated or not the published model: download it again.") from None
