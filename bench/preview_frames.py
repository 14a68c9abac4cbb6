"""A look at the preview renderer on three-quarter portraits: selected frames as one PNG, for the eye to judge.

    python bench/preview_frames.py [--name preview_three_quarter] [--driving lp_d3.mp4] [--refs fp_case1.png,...]

The driving video runs through PreviewRenderer.process() frame by frame (as the server runs it); the frames shown
are the driver's closed mouth, widest mouth, a blink, gaze to either side and the widest head turn (measured on the
driver by the motion bench's face mesh). Rows: the driver, then one row per reference, tiles at --tile px.
Writes bench/results/<name>.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS  # noqa: E402
from bench.motion_transfer import DATA, landmarks3d, signals  # noqa: E402
from engine.preview import PreviewRenderer, load_reference  # noqa: E402
from train.data import read_video  # noqa: E402

LABELS = ["mouth shut", "mouth open", "blink", "gaze left", "gaze right", "head turn"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="preview_three_quarter")
    ap.add_argument("--driving", default="lp_d3.mp4")
    ap.add_argument("--refs", default="fp_case1.png,lp_s1.jpg,lp_s3.jpg")
    ap.add_argument("--tile", type=int, default=224)
    args = ap.parse_args()

    frames, fps = read_video(DATA / "driving" / args.driving)
    sig = signals(landmarks3d(frames))
    pick = [int(np.nanargmin(sig["mouth"])), int(np.nanargmax(sig["mouth"])), int(np.nanargmin(sig["eyes"])),
            int(np.nanargmin(sig["gaze"])), int(np.nanargmax(sig["gaze"])), int(np.nanargmax(np.abs(sig["yaw"])))]
    tile = lambda im: cv2.resize(im, (args.tile, args.tile), interpolation=cv2.INTER_AREA)  # noqa: E731
    rows = [[tile(frames[i]) for i in pick]]
    for ref in args.refs.split(","):
        renderer = PreviewRenderer(load_reference(str(DATA / "reference" / ref)))
        outs = {}
        for i, f in enumerate(frames):
            out = renderer.process(f, i / fps)[0][0]
            if i in pick:
                outs[i] = out
        renderer.close()
        rows.append([tile(outs[i]) for i in pick])
    sheet = np.vstack([np.hstack(r) for r in rows])
    for k, (label, i) in enumerate(zip(LABELS, pick)):
        cv2.putText(sheet, f"{label} #{i}", (k * args.tile + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
    path = RESULTS / f"{args.name}.png"
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print("wrote", path, "frames", dict(zip(LABELS, pick)))


if __name__ == "__main__":
    main()
