"""`flashlive render`: driving video + reference -> mp4 with the driving frame count, fps and audio, in sync."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def probe(path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {"fps": v.average_rate, "size": (v.codec_context.width, v.codec_context.height),
                "has_audio": bool(c.streams.audio)}
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        info["frames"] = len(frames)
        info["first"], info["middle"] = frames[0], frames[len(frames) // 2]
    if info["has_audio"]:
        with av.open(str(path)) as c:
            a = c.streams.audio[0]
            info["audio_rate"] = a.rate
            info["audio_samples"] = sum(f.samples for f in c.decode(audio=0))
    return info


def test_render_keeps_frames_fps_and_audio(data, tmp_path):
    driving, reference = data("driving", "lp_d3.mp4"), data("reference", "lp_s6.jpg")
    out = tmp_path / "avatar.mp4"
    run = subprocess.run([sys.executable, "-m", "flashlive", "render", "--driving", str(driving), "--reference",
                          str(reference), "--size", "256x256", "-o", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "354/354" in run.stderr, "no progress bar reached the end"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avatar.mp4"], "a partial file was left behind"

    src, dst = probe(driving), probe(out)
    assert dst["frames"] == src["frames"] == 354
    assert dst["fps"] == src["fps"] == 30
    assert dst["size"] == (256, 256)
    assert dst["has_audio"] and dst["audio_rate"] == src["audio_rate"]
    video_s = dst["frames"] / float(dst["fps"])
    audio_s = dst["audio_samples"] / dst["audio_rate"]
    assert abs(audio_s - video_s) <= 1 / float(dst["fps"]), (audio_s, video_s)
    assert dst["audio_samples"] == src["audio_samples"], "the audio was not copied whole"
    # The avatar moves: the middle frame is not the first one, and neither is a resized driving frame.
    assert np.abs(dst["middle"].astype(int) - dst["first"]).mean() > 1.0
