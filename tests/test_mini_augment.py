"""train/augment.py: a view moves the pixels and the landmarks together (a marked point lands where its landmark
says), the mirrored view takes the flipped frames' own landmarks, and the identity view is the video itself."""
import numpy as np
import pytest
import torch

from train.augment import VIEWS, View, augmented_videos, view_frames, view_landmarks
from train.data import Video

S = 64


def marked_video(points: list[tuple[float, float]]) -> Video:
    """One frame per point: black, with a bright 1-px dot at that point (crop units); landmark 0 is the point."""
    frames = -torch.ones(len(points), 3, S, S)
    lms = torch.full((len(points), 478, 3), 0.5)
    for t, (x, y) in enumerate(points):
        frames[t, :, int(y * S), int(x * S)] = 1.0
        lms[t, 0, :2] = torch.tensor([(int(x * S) + 0.5) / S, (int(y * S) + 0.5) / S])
    flip = lms.clone()
    flip[:, 0, 0] = 1 - lms[:, 0, 0]   # what the mesh would read on the flipped frame, for the marked point
    return Video("marked", frames, lms, np.ones(len(points), bool), 25.0, flip)


def brightest(frame: torch.Tensor) -> np.ndarray:
    """(3, S, S) -> (x, y) in pixels of the brightest pixel's centre."""
    idx = int(frame.mean(0).flatten().argmax())
    return np.array([idx % S + 0.5, idx // S + 0.5])


@pytest.mark.parametrize("view", [v for v in VIEWS if v != View()])
def test_a_marked_point_lands_where_its_landmark_says(view):
    video = marked_video([(0.3, 0.4), (0.55, 0.62), (0.5, 0.5)])
    frames = view_frames(video.frames, view)
    lms = view_landmarks(video.landmarks, video.landmarks_flip, S, view)
    for t in range(len(frames)):
        dot = brightest(frames[t])
        # bilinear resizing spreads the dot over ~scale pixels: its brightest pixel is within one of the landmark
        assert np.abs(dot - lms[t, 0, :2].numpy() * S).max() <= 1.0 + 1e-6, (view, t, dot, lms[t, 0, :2] * S)


def test_mirrored_view_needs_the_flipped_frames_landmarks():
    video = marked_video([(0.3, 0.4)])
    with pytest.raises(ValueError, match="rebuild the training cache"):
        view_landmarks(video.landmarks, None, S, View(flip=True))


def test_augmented_videos_start_with_the_videos_themselves():
    videos = [marked_video([(0.3, 0.4), (0.6, 0.5)]), marked_video([(0.5, 0.5)])]
    out = augmented_videos(videos)
    assert len(out) == len(VIEWS) * len(videos)
    assert out[0] is videos[0] and out[1] is videos[1]
    zoom = out[2 * len(videos)]                      # View(scale=1.15) of the first video
    assert zoom.frames.shape == videos[0].frames.shape
    assert not torch.equal(zoom.frames, videos[0].frames)
    # zooming in about the centre moves an off-centre point away from the centre
    assert abs(zoom.landmarks[0, 0, 0] - 0.5) > abs(videos[0].landmarks[0, 0, 0] - 0.5)
