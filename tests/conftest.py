"""Shared fixtures: real test data from ../shared/data (a missing folder fails loudly, never skips)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()


def data_file(*parts: str) -> Path:
    """Path of a file in ../shared/data; fails (not skips) with where it looked."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data {path} not found: the tests read ../shared/data relative to the project root ({ROOT})")
    return path


@pytest.fixture
def data():
    return data_file


def video_frames(name: str, count: int) -> list:
    """The first `count` frames of ../shared/data/driving/`name` as contiguous (H, W, 3) uint8 RGB arrays."""
    import cv2
    import numpy as np

    cap = cv2.VideoCapture(str(data_file("driving", name)))
    frames = []
    while len(frames) < count:
        ok, bgr = cap.read()
        assert ok, f"{name} has fewer than {count} frames"
        frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    cap.release()
    return frames


def image_rgb(name: str):
    """../shared/data/reference/`name` as a contiguous (H, W, 3) uint8 RGB array."""
    import cv2
    import numpy as np

    return np.ascontiguousarray(cv2.imread(str(data_file("reference", name)))[:, :, ::-1])


@pytest.fixture(scope="module")
def one_torch_thread():
    """mediapipe and torch share 2 busy cores: oversubscribed intra-op threads make each call many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def no_public_stun():
    """aiortc's default configuration sends every client's ICE gathering to a public STUN server: the tests' own
    clients use none (they reach only 127.0.0.1). The server never relies on this default (streaming/ice.py)."""
    from aiortc.rtcicetransport import RTCIceGatherer

    original = RTCIceGatherer.__dict__["getDefaultIceServers"]
    RTCIceGatherer.getDefaultIceServers = classmethod(lambda cls: [])
    yield
    RTCIceGatherer.getDefaultIceServers = original
