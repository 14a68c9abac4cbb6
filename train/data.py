"""Training data for the mini preset: driving videos -> cached 128x128 face crops + mediapipe landmarks, and clips.

    cache = build_cache(videos, cache_dir)          # once: (T, S, S, 3) uint8 RGB crops + (T, 478, 3) landmarks
    data = ClipDataset(cache, split="train")        # the first 80% of every video (the last 20% is held out)
    batch = data.sample(batch_size, frames=9, generator=g)

Crop: one fixed square per video, centred on the face mesh's box in the first frame with a face, 2.2x the box's
longer side (clipped to the frame), resized to `size` (INTER_AREA). Landmarks: mediapipe face mesh (478 refined
points) in video mode on the crop at 2x `size`, normalised to [0, 1] crop coordinates (z in the same x scale); a
frame without a face carries the previous frame's landmarks (found = False). The mirrored crops are tracked too
(`landmarks_flip`: what the mesh reads on the flipped frames, for train/augment.py's mirrored view).

Packed form (`python -m train.data --pack FILE`): the same cache as one .npz that travels (a GPU machine, under
30 MB): frames JPEG-encoded (quality 95), landmarks float16. `load_cache` reads either a cache folder or that file.

Self-reenactment: a clip's reference is a frame of the same video and split, chosen at random (not the clip's first
frame), so the model has to move the reference face to the driving expression.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

HELD_OUT = 0.2  # the last 20% of every video
DEFAULT_CACHE = Path("~/.cache/flashlive/mini_data").expanduser()


def read_video(path: str | Path) -> tuple[list[np.ndarray], float]:
    """All frames of a video as (H, W, 3) uint8 RGB, and its fps."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"Cannot read video {path}: check the path and that it is an mp4/H.264 file.")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise ValueError(f"Video {path} has no frames: use another driving video.")
    return frames, float(fps)


def _mesh(static: bool):
    import mediapipe as mp

    return mp.solutions.face_mesh.FaceMesh(static_image_mode=static, max_num_faces=1, refine_landmarks=True,
                                           min_detection_confidence=0.5, min_tracking_confidence=0.5)


def _points(result) -> np.ndarray | None:
    if not result.multi_face_landmarks:
        return None
    return np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], np.float32)


def face_square(frames: list[np.ndarray], scale: float = 2.2) -> tuple[int, int, int]:
    """(x0, y0, side) of a square around the face of the first frame that has one (whole-frame square if none)."""
    h, w = frames[0].shape[:2]
    with _mesh(static=True) as mesh:
        for frame in frames[:30]:
            pts = _points(mesh.process(frame))
            if pts is not None:
                break
    if pts is None:
        side = min(h, w)
        return (w - side) // 2, (h - side) // 2, side
    xs, ys = pts[:, 0] * w, pts[:, 1] * h
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    side = int(min(min(h, w), scale * max(xs.max() - xs.min(), ys.max() - ys.min())))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, side


def crop_frames(frames: list[np.ndarray], square: tuple[int, int, int], size: int) -> np.ndarray:
    x0, y0, side = square
    return np.stack([cv2.resize(f[y0:y0 + side, x0:x0 + side], (size, size), interpolation=cv2.INTER_AREA)
                     for f in frames])


def track_landmarks(crops: np.ndarray, upscale: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(T, S, S, 3) uint8 crops -> landmarks (T, 478, 3) float32 in [0, 1] crop coordinates, found (T,) bool."""
    out, found, last = [], [], None
    with _mesh(static=False) as mesh:
        for crop in crops:
            big = cv2.resize(crop, (crop.shape[1] * upscale, crop.shape[0] * upscale), interpolation=cv2.INTER_CUBIC)
            pts = _points(mesh.process(big))
            found.append(pts is not None)
            if pts is not None:
                last = pts
            out.append(last)
    first = next((p for p in out if p is not None), None)
    if first is None:
        raise ValueError("No face found in any frame of a training video: drop that video from the training set.")
    out = [first if p is None else p for p in out]
    return np.stack(out), np.asarray(found)


def write_entry(path: Path, crops: np.ndarray, fps: float, square, **extra) -> np.ndarray:
    """One cache entry, written atomically: (T, S, S, 3) uint8 crops with their landmarks and the flipped crops'
    (`track_landmarks`), fps, the crop square, and any `extra` arrays. Returns the per-frame face-found flags."""
    lm, found = track_landmarks(crops)
    lm_flip = track_landmarks(np.ascontiguousarray(crops[:, :, ::-1]))[0]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, frames=crops, landmarks=lm, found=found, fps=fps, square=np.asarray(square), landmarks_flip=lm_flip,
             **extra)
    tmp.rename(path)
    return found


def build_cache(videos: list[str | Path], cache_dir: str | Path = DEFAULT_CACHE, size: int = 128) -> Path:
    """Crop, resize and landmark every video once; returns the cache folder (one .npz per video + index.json)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = {}
    for v in videos:
        v = Path(v)
        out = cache_dir / f"{v.stem}_{size}.npz"
        if out.exists() and "landmarks_flip" not in np.load(out).files:   # a cache from before the mirrored view
            z = dict(np.load(out))
            z["landmarks_flip"] = track_landmarks(np.ascontiguousarray(z["frames"][:, :, ::-1]))[0]
            tmp = out.with_suffix(".tmp.npz")
            np.savez(tmp, **z)
            tmp.rename(out)
        if not out.exists():
            frames, fps = read_video(v)
            square = face_square(frames)
            crops = crop_frames(frames, square, size)
            found = write_entry(out, crops, fps, square)
            print(f"cached {v.name}: {len(crops)} frames, crop {square}, faces {found.mean():.2f}", flush=True)
        index[v.stem] = out.name
    (cache_dir / f"index_{size}.json").write_text(json.dumps(index, indent=1))
    return cache_dir


@dataclass
class Video:
    name: str
    frames: torch.Tensor      # (T, 3, S, S) float in [-1, 1]
    landmarks: torch.Tensor   # (T, 478, 3)
    found: np.ndarray         # (T,)
    fps: float
    landmarks_flip: torch.Tensor | None = None   # (T, 478, 3) of the left-right flipped frames, when cached
    train_only: bool = False  # every frame trains, none is held out (train/teacher.py's rendered videos)


def _video(name: str, frames: np.ndarray, landmarks: np.ndarray, found: np.ndarray, fps,
           landmarks_flip: np.ndarray | None = None, train_only: bool = False) -> Video:
    t = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    flip = None if landmarks_flip is None else torch.from_numpy(landmarks_flip.astype(np.float32))
    return Video(name, t, torch.from_numpy(landmarks.astype(np.float32)), found.astype(bool), float(fps), flip,
                 bool(train_only))


def uint8_frames(video: Video) -> np.ndarray:
    """A cached video's frames back as (T, S, S, 3) uint8 RGB (the inverse of the [-1, 1] tensors `Video` holds)."""
    return video.frames.permute(0, 2, 3, 1).add(1).mul(127.5).round().clamp(0, 255).byte().numpy()


def load_cache(cache: str | Path = DEFAULT_CACHE, size: int = 128) -> list[Video]:
    """The cached videos from a cache folder (`build_cache`) or a packed file (`pack_cache`)."""
    cache = Path(cache)
    if cache.is_file():
        return load_packed(cache, size)
    index_path = cache / f"index_{size}.json"
    if not index_path.exists():
        raise ValueError(f"No training cache at {cache}: run `python -m train.data` first.")
    videos = []
    for name, file in json.loads(index_path.read_text()).items():
        z = np.load(cache / file)
        videos.append(_video(name, z["frames"], z["landmarks"], z["found"], z["fps"], z.get("landmarks_flip"),
                             z.get("train_only", False)))
    return videos


def pack_cache(cache_dir: str | Path, out: str | Path, size: int = 128, quality: int = 95) -> Path:
    """One file holding the whole cache folder: per video its frames as concatenated JPEGs (+ offsets), landmarks
    float16, found, fps, square. Written atomically."""
    cache_dir, out = Path(cache_dir), Path(out)
    index_path = cache_dir / f"index_{size}.json"
    if not index_path.exists():
        raise ValueError(f"No training cache at {cache_dir}: run `python -m train.data` first.")
    arrays: dict[str, np.ndarray] = {"size": np.asarray(size)}
    names = []
    for name, file in json.loads(index_path.read_text()).items():
        z = np.load(cache_dir / file)
        jpgs = [cv2.imencode(".jpg", np.ascontiguousarray(f[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
                for f in z["frames"]]
        arrays[f"{name}.jpeg"] = np.concatenate(jpgs)
        arrays[f"{name}.offsets"] = np.cumsum([0] + [len(j) for j in jpgs]).astype(np.int64)
        arrays[f"{name}.landmarks"] = z["landmarks"].astype(np.float16)
        if "landmarks_flip" in z.files:
            arrays[f"{name}.landmarks_flip"] = z["landmarks_flip"].astype(np.float16)
        for key in ("found", "fps", "square", "train_only"):
            if key in z.files:
                arrays[f"{name}.{key}"] = z[key]
        names.append(name)
    arrays["names"] = np.asarray(names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.rename(out)
    return out


def load_packed(path: str | Path, size: int = 128) -> list[Video]:
    z = np.load(path)
    if int(z["size"]) != size:
        raise ValueError(f"Packed cache {path} holds {int(z['size'])}px crops, not {size}: pack the {size}px cache.")
    videos = []
    for name in z["names"].tolist():
        buf, off = z[f"{name}.jpeg"], z[f"{name}.offsets"]
        frames = np.stack([cv2.imdecode(buf[a:b], cv2.IMREAD_COLOR)[:, :, ::-1] for a, b in zip(off[:-1], off[1:])])
        videos.append(_video(name, frames, z[f"{name}.landmarks"], z[f"{name}.found"], z[f"{name}.fps"],
                             z.get(f"{name}.landmarks_flip"), z.get(f"{name}.train_only", False)))
    return videos


def split_range(n: int, split: str, train_only: bool = False) -> tuple[int, int]:
    """[start, end) of `split` ("train": the first 80%, "test": the last 20%) of an n-frame video; a `train_only`
    video trains on all its frames and holds none out."""
    cut = n if train_only else int(round(n * (1 - HELD_OUT)))
    return (0, cut) if split == "train" else (cut, n)


class ClipDataset:
    """Random clips of 1 + 4k frames with a reference frame from the same video and split. Videos are drawn in
    proportion to their frames in the split; with `train_only_share`, the train_only videos (train/teacher.py) are
    drawn that share of the time together and the others the rest (each group by length)."""

    def __init__(self, videos: list[Video], split: str = "train", train_only_share: float | None = None):
        self.videos = videos
        self.split = split
        self.ranges = [split_range(len(v.frames), split, v.train_only) for v in videos]
        self.weights = np.array([b - a for a, b in self.ranges], np.float64)
        extra = np.array([v.train_only for v in videos])
        if train_only_share is not None and extra.any() and (~extra).any() and split == "train":
            self.weights[extra] *= train_only_share / self.weights[extra].sum()
            self.weights[~extra] *= (1 - train_only_share) / self.weights[~extra].sum()
        if self.weights.sum() <= 0:
            raise ValueError(f"No video has frames in the {split} split: add driving videos to the training cache.")
        self.weights /= self.weights.sum()

    def sample(self, batch: int, frames: int, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        """{"video": (B, 3, frames, S, S), "landmarks": (B, frames, 478, 3), "ref": (B, 3, S, S),
        "ref_landmarks": (B, 478, 3)}; videos drawn in proportion to their length."""
        vids, lms, refs, ref_lms = [], [], [], []
        for _ in range(batch):
            k = generator.choice(len(self.videos), p=self.weights)
            v, (a, b) = self.videos[k], self.ranges[k]
            s = int(generator.integers(a, b - frames + 1))
            r = int(generator.integers(a, b))
            vids.append(v.frames[s:s + frames].transpose(0, 1))
            lms.append(v.landmarks[s:s + frames])
            refs.append(v.frames[r])
            ref_lms.append(v.landmarks[r])
        return {"video": torch.stack(vids), "landmarks": torch.stack(lms), "ref": torch.stack(refs),
                "ref_landmarks": torch.stack(ref_lms)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Cache 128x128 face crops and landmarks of the driving videos.")
    ap.add_argument("--videos", default="../shared/data/driving", help="folder of .mp4 files")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--pack", metavar="FILE", help="write the existing cache as one file (JPEG frames) and stop")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of --pack")
    args = ap.parse_args(argv)
    if args.pack:
        out = pack_cache(args.cache, args.pack, args.size, args.quality)
        print(f"packed {args.cache} -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")
        return
    videos = sorted(Path(args.videos).glob("*.mp4"))
    if not videos:
        raise SystemExit(f"No .mp4 files in {args.videos}: point --videos at ../shared/data/driving.")
    build_cache(videos, args.cache, args.size)


if __name__ == "__main__":
    main()
