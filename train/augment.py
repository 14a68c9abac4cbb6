"""Augmented views of the training videos for the mini's DiT stage: mirrored and zoomed copies of every video.

    views = augmented_videos(videos, VIEWS)     # len(VIEWS) x len(videos) Video objects, the identity view first

Why: the training set is 12 driving videos (about 2,700 training frames). Trained on them as they are, the mini
reached +3.9 dB over the static reference on its training frames and -0.25 dB on the held-out last 20% of the same
videos: it learns which frame of which video a landmark set belongs to rather than how to move the reference face.
A view changes the pixels and the landmarks together, the same way for the reference, the clip and the driving
signal, so the task (move this reference to these landmarks) is unchanged while no pixel position or landmark set
can be memorised. (Brightness or colour changes would not help that: the landmarks would not change with them.)

Views:
  * mirror: the frames flipped left-right, and the landmarks of the flipped frames as mediapipe itself reads them
    (the cache tracks the flipped crops too, `landmarks_flip`), not the original points mirrored: the mesh's point
    numbering is not mirror-symmetric (point i of a flipped face is not point i of the face), and this way the
    driving signal is exactly what the face mesh gives at inference.
  * zoom: a square crop of 1/scale of the frame, at `offset` (a fraction of the free margin, per axis), resized back
    to the full size (bilinear); the landmarks follow by the same affine map (x, y in crop units; z scales with x).
A view is fixed per video copy (not redrawn per batch), so the latent bank (train_mini.LatentBank) encodes each
copy once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.data import Video


@dataclass(frozen=True)
class View:
    flip: bool = False
    scale: float = 1.0                        # >= 1: zoom in by this factor
    offset: tuple[float, float] = (0.5, 0.5)  # (x, y) of the zoomed crop in the free margin: 0 left/top, 1 right/bottom


VIEWS = (View(), View(flip=True), View(scale=1.15), View(flip=True, scale=1.15),
         View(scale=1.15, offset=(0.2, 0.8)), View(flip=True, scale=1.15, offset=(0.8, 0.2)))


def crop_box(size: int, view: View) -> tuple[int, int, int]:
    """(x0, y0, side) in pixels of the zoomed square of a `size` frame."""
    side = int(round(size / view.scale))
    free = size - side
    return int(round(view.offset[0] * free)), int(round(view.offset[1] * free)), side


def view_frames(frames: torch.Tensor, view: View) -> torch.Tensor:
    """(T, 3, S, S) frames -> the same frames seen through `view`."""
    if view.flip:
        frames = frames.flip(-1)
    if view.scale == 1.0:
        return frames
    size = frames.shape[-1]
    x0, y0, side = crop_box(size, view)
    crop = frames[..., y0:y0 + side, x0:x0 + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def view_landmarks(landmarks: torch.Tensor, landmarks_flip: torch.Tensor | None, size: int,
                   view: View) -> torch.Tensor:
    """(T, 478, 3) landmarks in [0, 1] crop units of a `size` frame -> the landmarks of the frames `view` gives."""
    if view.flip:
        if landmarks_flip is None:
            raise ValueError("The mirrored view needs the landmarks of the flipped frames: rebuild the training "
                             "cache with `python -m train.data` (it tracks the flipped crops too).")
        landmarks = landmarks_flip
    if view.scale == 1.0:
        return landmarks
    x0, y0, side = crop_box(size, view)
    k = size / side
    shift = landmarks.new_tensor([x0 / size, y0 / size, 0.0])
    return (landmarks - shift) * k


def augmented_videos(videos: list[Video], views=VIEWS) -> list[Video]:
    """Every video seen through every view, view-major (views[0] first: keep the identity view there)."""
    out = []
    for view in views:
        for v in videos:
            if view == View():
                out.append(v)
                continue
            size = v.frames.shape[-1]
            out.append(Video(f"{v.name}@{'m' if view.flip else ''}{view.scale:g}", view_frames(v.frames, view),
                             view_landmarks(v.landmarks, v.landmarks_flip, size, view), v.found, v.fps,
                             train_only=v.train_only))
    return out
