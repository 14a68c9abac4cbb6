"""Teacher videos for the mini's DiT stage: portraits moved by the preview renderer with other people's motion.

    python -m train.teacher                                   # -> ~/.cache/flashlive/mini_teacher (train.data layout)
    python -m train.data --cache ~/.cache/flashlive/mini_teacher --pack .minicache/mini_teacher_128.npz --quality 90
    python -m train.train_mini --stage dit --teacher .minicache/mini_teacher_128.npz --teacher-share 0.5 ...

Why: the mini's twelve driving videos are twelve faces and about 2,700 training frames. Trained on them alone, the
expression tokens serve as a key to the training frame more than as motion: on held-out clips the mouth box's loss
with the clip's own tokens equalled the loss with the expression branch off (0.92 vs 0.89,
expression_probe_mini_test.json), while on training clips the tokens halved it. No more video can be had here, but
the preview renderer (engine/preview.py, a face-mesh warp with no weights) moves any portrait with any driver's
motion, and on the held-out frames it follows expression well (expression ratio 0.32 against the mini's 0.86,
quality_mini.json). Its renders are a teacher: in them the only change from the reference is the motion the
landmarks describe, so the landmark -> token -> pixels path has to learn that motion, on faces and expression
combinations the real videos do not hold.

What is rendered (nothing of the held-out 20% of any driving video is used, as driver or as reference):
  * sources: every portrait in ../shared/data/reference (twelve faces no driving video shows), and the first frame
    of every driving video (its identity moved by other people's motion);
  * drivers: `--drivers` other driving videos per source, each a run of `--frames` consecutive frames of its
    training split (a random start);
  * each render at 256x256 (the source cropped as train/data.py crops a video: 2.2x the face box, then 2x cubic),
    driven by the driver's 128x128 training crops at 2x, then INTER_AREA to 128x128, and landmarked as every
    training video is (train.data.track_landmarks, the flipped frames too for train/augment.py's mirrored views).
The cache marks every teacher video `train_only` (train.data.ClipDataset trains on all its frames and holds none
out): the held-out loss and bench/quality.py stay on real frames only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from train.data import DEFAULT_CACHE, crop_frames, face_square, load_cache, split_range, uint8_frames, write_entry

DEFAULT_TEACHER_CACHE = DEFAULT_CACHE.with_name("mini_teacher")
RENDER = 256  # the preview renderer's working size (its warp map is half that); crops are then taken down to 128


def source_crop(image: np.ndarray, size: int = 128) -> np.ndarray:
    """(H, W, 3) uint8 RGB portrait -> (size, size, 3): the square train/data.py would cut from a video of it."""
    return crop_frames([image], face_square([image]), size)[0]


def teacher_video(source: np.ndarray, driving: np.ndarray, size: int = 128) -> np.ndarray:
    """source (S, S, 3) uint8 crop, driving (T, s, s, 3) uint8 crops -> (T, size, size, 3) uint8: the preview
    renderer's output for every driving frame (its first driving frame is its neutral face), rendered at RENDER."""
    from engine.preview import PreviewRenderer

    def up(x: np.ndarray) -> np.ndarray:
        return cv2.resize(x, (RENDER, RENDER), interpolation=cv2.INTER_CUBIC)

    r = PreviewRenderer(up(source), RENDER, RENDER)
    try:
        out = [r.process(up(f), i)[0][0] for i, f in enumerate(driving)]
    finally:
        r.close()
    return np.stack([cv2.resize(o, (size, size), interpolation=cv2.INTER_AREA) for o in out])


def build_teacher_cache(references: list[Path], cache: str | Path, out: str | Path, drivers: int = 3,
                        frames: int = 96, seed: int = 0, size: int = 128) -> Path:
    """Render, landmark and store the teacher videos (see the module docstring) as a train.data cache folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from engine.preview import load_reference

    videos = {v.name: v for v in load_cache(cache, size)}
    train = {name: split_range(len(v.frames), "train") for name, v in videos.items()}
    crops = {name: uint8_frames(v) for name, v in videos.items()}
    sources = [(p.stem, source_crop(load_reference(str(p)), size)) for p in references]
    sources += [(name, crops[name][train[name][0]]) for name in videos]
    rng = np.random.default_rng(seed)
    index = {}
    for name, src in sources:
        others = [d for d in videos if d != name and train[d][1] - train[d][0] >= frames]
        for d in rng.choice(others, size=min(drivers, len(others)), replace=False):
            a, b = train[d]
            s = int(rng.integers(a, b - frames + 1))
            key = f"teach_{name}_by_{d}" + (f"_s{seed}" if seed else "")   # caches of several seeds train together
            path = out / f"{key}_{size}.npz"
            if not path.exists():
                video = teacher_video(src, crops[d][s:s + frames], size)
                found = write_entry(path, video, videos[d].fps, (0, 0, size), train_only=True,
                                    driver=np.asarray([d, str(s)]))
                print(f"teacher {key}: frames {s}..{s + frames} of {d}, faces {found.mean():.2f}", flush=True)
            index[key] = path.name
    (out / f"index_{size}.json").write_text(json.dumps(index, indent=1))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--references", default="../shared/data/reference", help="folder of portrait images")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="the driving videos' training cache (train.data)")
    ap.add_argument("--out", default=str(DEFAULT_TEACHER_CACHE))
    ap.add_argument("--drivers", type=int, default=3, help="driving videos per source")
    ap.add_argument("--frames", type=int, default=96, help="frames per teacher video")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    refs = sorted(p for p in Path(args.references).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not refs:
        raise SystemExit(f"No portraits in {args.references}: point --references at ../shared/data/reference.")
    build_teacher_cache(refs, args.cache, args.out, args.drivers, args.frames, args.seed)


if __name__ == "__main__":
    main()
