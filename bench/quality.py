"""Quality of the trained mini FlashPortrait on held-out frames, against the static reference and the preview renderer.

    python bench/quality.py --weights weights/mini                  # all held-out segments -> quality_mini.json/.png

Self-reenactment on the last 20% of every driving video (never seen in training, train/data.py): the reference is
the segment's first frame, the driving signal its frames' face-mesh landmarks, the ground truth the frames
themselves (128x128 crops from the training cache; `python -m train.data` builds it). Methods:
    mini     engine/mini.render_clip: offline step-major WSWS (window 3 latent frames, overlap 2), --steps flow
             steps, emotion guidance --emo-cfg (two passes per step, one batch)
    static   the reference frame repeated (what a frozen avatar scores)
    autoencoder  the ground-truth frames through the mini's own autoencoder (encode, decode): not a method but the
             ceiling of any output the mini decodes, so the gap between mini and static can be read against it
    preview  engine/preview.PreviewRenderer driven by the ground-truth frames (mesh warp of the reference)
Metrics per frame, averaged over all held-out frames but each segment's first (the reference itself):
    psnr, ssim (Gaussian 11x11, sigma 1.5, on luma)
    expression error: mediapipe face mesh (static mode, 2x upscale) of output and ground truth; mouth opening
        (13-14), eye opening (159-145, 386-374), head pose (yaw, pitch: nose tip 1 relative to the iris midpoint;
        roll: the iris line's angle), the distances divided by the ground truth's inter-ocular distance; the error
        is the mean absolute difference over those five numbers (roll in radians). An output frame where the mesh
        finds no face is counted (face_missed) and scored with the static reference's error for that frame.
    seam jump: engine/wsws.seam_jump on the latents of a render of the longest segment with windows of
        --seam-window latent frames and overlap 1 (the main render's stride-1 windows put a seam at every latent
        boundary), and the same ratio on its decoded frames (mean |frame step| at frame pairs crossing a window
        seam / elsewhere; the ground truth's ratio on the same pairs next to it); and the temporal roughness of
        every output: mean |frame step| over the ground truth's
    drift: over the longest held-out segment, PSNR and expression error per frame (curves in the JSON and PNG),
        and their change from the first to the last quarter
Top level: expression_error_ratio = mini / static and psnr_gain_db = mini - static (targets <= 0.6, >= 1 dB), and
the same two for the preview renderer.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402

MOUTH = (13, 14)
EYES = ((159, 145), (386, 374))
IRIS = (468, 473)
NOSE = 1
EXPR_KEYS = ("mouth", "eyes", "yaw", "pitch", "roll")


# --------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray, cap: float = 60.0) -> float:
    """PSNR in dB, capped at `cap` (identical frames would otherwise weigh infinitely in a mean)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(min(cap, 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))))


def _luma(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    import cv2

    x, y = _luma(a), _luma(b)
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m[5:-5, 5:-5].mean())


class MeshReader:
    """(S, S, 3) uint8 frame -> (478, 2) pixel landmarks or None; static mode, so frames are independent."""

    def __init__(self):
        import mediapipe as mp

        self.mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                                                    min_detection_confidence=0.3)

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        import cv2

        big = cv2.resize(frame, (2 * frame.shape[1], 2 * frame.shape[0]), interpolation=cv2.INTER_CUBIC)
        res = self.mesh.process(np.ascontiguousarray(big))
        if not res.multi_face_landmarks:
            return None
        return np.array([(p.x, p.y) for p in res.multi_face_landmarks[0].landmark]) * frame.shape[1]


def expression(pts: np.ndarray, iod: float) -> np.ndarray:
    """Five numbers: mouth opening, eye opening, yaw, pitch (distances / iod) and roll (radians)."""
    left, right = pts[IRIS[0]], pts[IRIS[1]]
    mid = (left + right) / 2
    mouth = np.linalg.norm(pts[MOUTH[0]] - pts[MOUTH[1]]) / iod
    eyes = np.mean([np.linalg.norm(pts[a] - pts[b]) for a, b in EYES]) / iod
    yaw, pitch = (pts[NOSE] - mid) / iod
    d = right - left
    roll = np.arctan2(d[1], d[0])
    return np.array([mouth, eyes, yaw, pitch, roll])


def iod_of(pts: np.ndarray) -> float:
    return float(np.linalg.norm(pts[IRIS[0]] - pts[IRIS[1]]))


def frame_step_seam(video: np.ndarray, windows, stride: int = 4) -> float:
    """Mean |frame[f+1] - frame[f]| over pairs crossing a window seam / over the other pairs. video (T, S, S, 3)."""
    d = np.abs(np.diff(video.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    seam = np.zeros_like(d, dtype=bool)
    for w in windows[1:]:
        f0 = max(stride * w.start - (stride - 1), 1)                  # first video frame of the window's latent 0
        lo, hi = max(f0 - 1, 0), min(stride * (w.start + max(w.overlap, 1)), len(d))
        seam[lo:hi] = True
    if seam.all() or not seam.any():
        return 1.0
    return float(d[seam].mean() / d[~seam].mean())


# --------------------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------------------
def round_trip(vae, truth: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) uint8 frames through the autoencoder (encode, decode) in one clip of 1 + 4k frames (the last
    frame repeated up to that length), the first T frames back as uint8."""
    t = len(truth)
    n = 1 + 4 * max(1, -(-(t - 1) // 4))
    padded = np.concatenate([truth, np.repeat(truth[-1:], n - t, 0)])
    video = torch.from_numpy(padded).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)
    with torch.no_grad():
        out = vae.decode(vae.encode(video))[0, :, :t]
    return ((out.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def render_preview(reference: np.ndarray, driving: np.ndarray) -> np.ndarray:
    from engine.preview import PreviewRenderer

    r = PreviewRenderer(reference, reference.shape[1], reference.shape[0])
    out = [r.process(f, i)[0][0] for i, f in enumerate(driving)]
    r.close()
    return np.stack(out)


def score(outputs: np.ndarray, truth: np.ndarray, truth_pts, static_err, reader: MeshReader) -> dict:
    """Per-frame psnr, ssim, expression error (and its parts), face-missed flags."""
    rows = {"psnr": [], "ssim": [], "expr": [], "parts": [], "missed": []}
    for t, (o, g) in enumerate(zip(outputs, truth)):
        if t == 0:  # the reference itself: the static baseline would score it perfectly
            continue
        rows["psnr"].append(psnr(o, g))
        rows["ssim"].append(ssim(o, g))
        gp = truth_pts[t]
        if gp is None:
            continue
        op = reader(o)
        if op is None:
            rows["missed"].append(t)
            rows["expr"].append(static_err[t][0])
            rows["parts"].append(static_err[t][1])
            continue
        iod = iod_of(gp)
        diff = np.abs(expression(op, iod) - expression(gp, iod))
        rows["expr"].append(float(diff.mean()))
        rows["parts"].append(diff)
    return rows


def summary(rows: dict) -> dict:
    parts = np.mean(rows["parts"], axis=0) if rows["parts"] else np.zeros(5)
    return {"psnr": float(np.mean(rows["psnr"])), "ssim": float(np.mean(rows["ssim"])),
            "expression_error": float(np.mean(rows["expr"])),
            "expression_parts": {k: float(v) for k, v in zip(EXPR_KEYS, parts)},
            "frames": len(rows["psnr"]), "face_missed": len(rows["missed"])}


def quarter_change(x) -> float:
    x = np.asarray(x, np.float64)
    q = max(1, len(x) // 4)
    return float(x[-q:].mean() - x[:q].mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="weights/mini")
    ap.add_argument("--cache", default=None, help="training cache (default: train/data.py's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--emo-cfg", type=float, default=1.5,
                    help="expression guidance, chosen on the training split for the committed checkpoint (--split "
                         "train: guidance 1, 1.5, 2 and 4 gave expression ratios 1.04, 0.99, 1.01, 1.19 and PSNR gains "
                         "2.54, 2.76, 2.62, 1.10 dB; quality_mini_train_cfg*_aug.json)")
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--seam-window", type=int, default=4, help="window of the seam render (overlap 1)")
    ap.add_argument("--videos", nargs="*", default=None, help="subset of video names (default: all)")
    ap.add_argument("--max-frames", type=int, default=None, help="cap per held-out segment (quick runs)")
    ap.add_argument("--split", choices=["test", "train"], default="test",
                    help="test: the held-out 20%% (the result); train: the last frames before it (for choosing "
                         "settings without looking at the held-out frames)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: two are far slower on a busy 2-core machine)")
    ap.add_argument("--name", default="quality_mini")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from engine.mini import RenderSettings, load_mini, render_clip
    from engine.wsws import seam_jump
    from train.data import DEFAULT_CACHE, load_cache, split_range

    models = load_mini(args.weights)
    videos = load_cache(args.cache or DEFAULT_CACHE)
    if args.videos:
        videos = [v for v in videos if v.name in args.videos]
    settings = RenderSettings(steps=args.steps, emo_cfg=args.emo_cfg, window=args.window, overlap=args.overlap)
    reader = MeshReader()
    all_rows = {m: {"psnr": [], "ssim": [], "expr": [], "parts": [], "missed": []} for m in ("mini", "static",
                                                                                            "preview", "autoencoder")}
    per_video, curves, seams = {}, {}, []
    longest = max(videos, key=lambda v: len(v.frames) - split_range(len(v.frames), "test")[0]).name
    samples = {}
    t_render = 0.0
    for v in videos:
        a, b = split_range(len(v.frames), "test")
        if args.split == "train":  # tuning runs: the end of the training part, never the held-out frames
            a, b = max(0, a - (args.max_frames or 41)), a
        if args.max_frames:
            b = min(b, a + args.max_frames)
        truth = ((v.frames[a:b].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        reference = truth[0]
        truth_pts = [reader(g) for g in truth]
        ref_pts = reader(reference)
        static_err = []
        for gp in truth_pts:
            if gp is None or ref_pts is None:
                static_err.append((np.nan, np.full(5, np.nan)))
                continue
            iod = iod_of(gp)
            diff = np.abs(expression(ref_pts, iod) - expression(gp, iod))
            static_err.append((float(diff.mean()), diff))
        t0 = time.perf_counter()
        # the reference is the segment's first frame: its tracked landmarks anchor the expression (as in training)
        out = render_clip(models, reference, v.landmarks[a:b].numpy(), settings, anchor=v.landmarks[a])
        t_render += time.perf_counter() - t0
        outputs = {"mini": out.frames, "static": np.repeat(reference[None], len(truth), 0),
                   "preview": render_preview(reference, truth), "autoencoder": round_trip(models.vae, truth)}
        per_video[v.name] = {"frames": int(b - a)}
        for m, frames in outputs.items():
            rows = score(frames, truth, truth_pts, static_err, reader)
            per_video[v.name][m] = summary(rows)
            for k in all_rows[m]:
                all_rows[m][k].extend(rows[k])
            if v.name == longest:
                curves[m] = {"psnr": [round(x, 3) for x in rows["psnr"]],
                             "expression_error": [round(float(x), 4) for x in rows["expr"]]}
        # temporal roughness: mean |frame step| of the output over that of the ground truth
        steps_of = lambda x: float(np.abs(np.diff(x.astype(np.float32), axis=0)).mean())  # noqa: E731
        jitter = {m: steps_of(f) / max(steps_of(truth), 1e-6) for m, f in outputs.items()
                  if m in ("mini", "preview")}
        if v.name == longest:
            # with stride 1 every latent boundary is a window boundary, so seams are measured on a second render
            # of the longest segment with windows of --seam-window latent frames and overlap 1 (stride W - 1)
            seam_out = render_clip(models, reference, v.landmarks[a:b].numpy(),
                                   replace(settings, window=args.seam_window, overlap=1), anchor=v.landmarks[a])
            seams.append({"video": v.name, "window": args.seam_window, "overlap": 1,
                          "latent": seam_jump(seam_out.latents, seam_out.windows),
                          "frames": frame_step_seam(seam_out.frames, seam_out.windows),
                          "truth_frames": frame_step_seam(truth, seam_out.windows)})
        per_video[v.name]["temporal_step_vs_truth"] = jitter
        samples[v.name] = (truth, outputs)
        print(f"{v.name}: {b - a} frames  " + "  ".join(
            f"{m} psnr {per_video[v.name][m]['psnr']:.2f} expr {per_video[v.name][m]['expression_error']:.4f}"
            for m in outputs), flush=True)

    res = {m: summary(r) for m, r in all_rows.items()}
    mini, static, preview = res["mini"], res["static"], res["preview"]
    payload = {
        "expression_error_ratio": mini["expression_error"] / static["expression_error"],
        "psnr_gain_db": mini["psnr"] - static["psnr"],
        "preview_expression_error_ratio": preview["expression_error"] / static["expression_error"],
        "preview_psnr_gain_db": preview["psnr"] - static["psnr"],
        "targets": {"expression_error_ratio": "<= 0.6", "psnr_gain_db": ">= 1"},
        "autoencoder_ceiling": {"expression_error_ratio": res["autoencoder"]["expression_error"]
                                / static["expression_error"], "psnr_gain_db": res["autoencoder"]["psnr"] - static["psnr"]},
        "methods": res,
        "seam_jump": seams[0],
        "temporal_step_vs_truth": {m: float(np.mean([pv["temporal_step_vs_truth"][m] for pv in per_video.values()]))
                                   for m in ("mini", "preview")},
        "drift": {"video": longest, "frames": len(curves["mini"]["psnr"]),
                  **{m: {"psnr_last_minus_first_quarter_db": quarter_change(c["psnr"]),
                         "expression_error_last_minus_first_quarter": quarter_change(c["expression_error"])}
                     for m, c in curves.items()},
                  "curves": curves},
        "per_video": per_video,
        "config": {"weights": args.weights, "split": args.split, "steps": args.steps, "emo_cfg": args.emo_cfg,
                   "window": args.window,
                   "overlap": args.overlap, "size": models.size, "max_frames": args.max_frames,
                   "render_seconds": round(t_render, 1), "threads": args.threads},
    }
    path = write_result(args.name, payload)
    print(f"expression_error_ratio {payload['expression_error_ratio']:.3f}  psnr_gain_db "
          f"{payload['psnr_gain_db']:.2f}  (preview {payload['preview_expression_error_ratio']:.3f} / "
          f"{payload['preview_psnr_gain_db']:.2f})  -> {path}")
    plot(payload, samples, RESULTS / f"{args.name}.png")


def plot(payload: dict, samples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 9))
    methods = ("static", "preview", "mini")
    ax = fig.add_subplot(2, 3, 1)
    ax.bar(methods, [payload["methods"][m]["psnr"] for m in methods], color=["grey", "tab:orange", "tab:blue"])
    ax.set_title("PSNR (dB), held-out")
    ax.set_ylim(min(payload["methods"][m]["psnr"] for m in methods) - 2, None)
    ax = fig.add_subplot(2, 3, 2)
    ax.bar(methods, [payload["methods"][m]["expression_error"] for m in methods],
           color=["grey", "tab:orange", "tab:blue"])
    ax.set_title("expression error (landmarks / IOD)")
    ax = fig.add_subplot(2, 3, 3)
    d = payload["drift"]
    for m in methods:
        ax.plot(d["curves"][m]["psnr"], label=m, lw=1)
    ax.set_title(f"drift: PSNR per frame, {d['video']} held-out")
    ax.legend()
    # a strip of frames: truth / static / preview / mini at 6 times of the longest segment
    truth, outs = samples[d["video"]]
    idx = np.linspace(0, len(truth) - 1, 6).astype(int)
    rows = [truth] + [outs[m] for m in methods]
    strip = np.concatenate([np.concatenate([r[i] for i in idx], axis=1) for r in rows], axis=0)
    ax = fig.add_subplot(2, 1, 2)
    ax.imshow(strip)
    ax.set_axis_off()
    ax.set_title("rows: ground truth, static, preview, mini")
    fig.suptitle(f"mini quality: expression error ratio {payload['expression_error_ratio']:.3f} (target <= 0.6), "
                 f"PSNR gain {payload['psnr_gain_db']:.2f} dB (target >= 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
