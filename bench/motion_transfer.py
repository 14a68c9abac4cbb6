"""Motion transfer of the `preview` renderer: does the avatar do what the driver does?

    python bench/motion_transfer.py [--frames 150] [--name motion_transfer] [--drivers lp_d0,lp_d3]

For every driving video in ../shared/data/driving, three references (one frontal, two three-quarter; see PAIRS),
the driving frames (at most --frames (150), evenly spaced over the whole video) go through PreviewRenderer.process();
a fresh mediapipe face mesh (video mode, 478 points) reads every driving frame and every output frame, and six
signals are compared per pair by Pearson correlation, driver vs output:

  mouth   inner-lip gap / inter-ocular distance         eyes    lid gap / inter-ocular distance
  roll, yaw, pitch   head rotation (degrees) from a 3-D Kabsch fit of the skull points to the sequence's first frame
  gaze    horizontal iris position between the eye corners (0 = outer corner, 1 = inner), both eyes averaged

Target: every correlation >= 0.85, gaze >= 0.7. A driver who barely moves a signal (its std below NOISE) gives a
correlation of noise: such cells are reported with the driver's std and flagged `flat`, not hidden. Gaze is
scored over the frames where the driver's eyes are open (a closed eye has no gaze).

How high a correlation the face mesh itself allows: every driving and output frame is read a second time by a fresh
mesh on a slightly scaled and shifted copy (bench/mesh_reliability.py says why that perturbation). Per signal and
side, reliability = Pearson r between the two readings (gaze over the same open-eye frames); per cell,
ceiling = sqrt(rel_driver * rel_output), the highest r two readings that noisy can show (Spearman's attenuation
bound). The summary lists every moving cell under target with its ceiling.

Which side loses a cell: the renderer's own drawing is read too, without a face mesh: the signals of the target
landmarks it warps the portrait to (mouth, eyes, gaze) and of the rotation it turns the portrait's head by (roll,
yaw, pitch). split.renderer = r(driver, drawn), split.reading = r(drawn, output): a cell whose renderer r is high
and reading r low is lost in the face mesh's reading of the avatar, not in what the avatar does. mouth_crosstalk:
r(output angle, output mouth) per head angle. `--hold-head` renders with the portrait's head held still
(PreviewRenderer(follow_head=False)); whatever roll, yaw and pitch the mesh then reads on the avatar is the
expression read as head motion.
`--rescore FILE` recomputes a result file's correlations, reliabilities and ceilings from the curves it stores
(the same rules; a file written before the retest, without its curves, gets no ceiling).
Writes bench/results/<name>.json (per pair: correlations, driver/output std, reliability, ceiling, split, curves of
both readings and of the drawing) + <name>.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402
from bench.mesh_reliability import SCALE, SHIFT_PX, ceiling, pearson, perturbed, reliability  # noqa: E402
from engine.face_mesh import mp_face_mesh  # noqa: E402
from engine.head_pose import angles, fit_rigid  # noqa: E402
from engine.preview import PreviewRenderer, load_reference  # noqa: E402

DATA = (ROOT / ".." / "shared" / "data").resolve()
FRONTAL = ["fp_case3.png", "fp_case4.png", "fp_case2.png", "lp_s7.jpg"]
THREE_QUARTER = ["fp_case1.png", "lp_s1.jpg", "lp_s3.jpg", "lp_s12.jpg", "lp_s5.jpg"]
METRICS = ["mouth", "eyes", "roll", "yaw", "pitch", "gaze"]
POSE = ["roll", "yaw", "pitch"]
# Seeds of the retest's perturbations: one draw for the driving frames, another for the output frames.
RETEST_SEED = {"driver": 0, "output": 1}
TARGET = {"mouth": 0.85, "eyes": 0.85, "roll": 0.85, "yaw": 0.85, "pitch": 0.85, "gaze": 0.7}
# Below these driver std values a signal is flat (mesh noise: ~0.005 IOD for gaps, ~0.5 deg, ~0.01 gaze).
NOISE = {"mouth": 0.01, "eyes": 0.008, "roll": 1.0, "yaw": 1.5, "pitch": 1.0, "gaze": 0.015}
# Points that move with the skull: eye corners, nose bridge, forehead, temples, cheekbones.
SKULL = np.array([33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 10, 151, 9, 234, 454, 127, 356, 116, 345])


def pairs() -> list[tuple[str, str]]:
    """(driving video, reference) pairs: each driver gets one frontal and two three-quarter references."""
    drivers = sorted(p.name for p in (DATA / "driving").glob("*.mp4"))
    out = []
    for i, d in enumerate(drivers):
        refs = [FRONTAL[i % len(FRONTAL)], THREE_QUARTER[i % len(THREE_QUARTER)],
                THREE_QUARTER[(i + 2) % len(THREE_QUARTER)]]
        out += [(d, r) for r in refs]
    return out


def read_frames(path: Path, limit: int) -> tuple[list[np.ndarray], list[float]]:
    """At most `limit` RGB frames spread evenly over the video, and their times in seconds."""
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    keep = set(np.linspace(0, total - 1, min(limit, total)).round().astype(int).tolist())
    frames, times, i = [], [], 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if i in keep:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            times.append(i / fps)
        i += 1
    cap.release()
    if not frames:
        raise SystemExit(f"could not read {path}: check ../shared/data/driving.")
    return frames, times


def landmarks3d(frames: list[np.ndarray]) -> list[np.ndarray | None]:
    """(478, 3) pixel-scaled landmarks (x, y, z) per frame from a fresh video-mode face mesh; None if no face."""
    out = []
    with mp_face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True) as mesh:
        for f in frames:
            res = mesh.process(f)
            if not res.multi_face_landmarks:
                out.append(None)
                continue
            h, w = f.shape[:2]
            out.append(np.array([(p.x * w, p.y * h, p.z * w) for p in res.multi_face_landmarks[0].landmark]))
    return out


def planar(xy: np.ndarray) -> dict[str, float]:
    """Mouth, eyes and gaze of one frame's (478, 2) image points."""
    iod = np.linalg.norm(xy[263] - xy[33])
    gaze = []
    for iris, a, b in ((468, 33, 133), (473, 362, 263)):  # along the image x of each eye: a -> b
        e = xy[b] - xy[a]
        gaze.append(np.dot(xy[iris] - xy[a], e) / np.dot(e, e))
    return {"mouth": np.mean([np.linalg.norm(xy[a] - xy[b]) for a, b in ((13, 14), (82, 87), (312, 317))]) / iod,
            "eyes": np.mean([np.linalg.norm(xy[a] - xy[b]) for a, b in ((159, 145), (386, 374))]) / iod,
            "gaze": np.mean(gaze)}


def signals(pts: list[np.ndarray | None]) -> dict[str, np.ndarray]:
    """The six signals per frame (NaN where no face)."""
    first = next((p for p in pts if p is not None), None)
    out = {m: np.full(len(pts), np.nan) for m in METRICS}
    for i, p in enumerate(pts):
        if p is None:
            continue
        for m, v in planar(p[:, :2]).items():
            out[m][i] = v
        # Kabsch on the skull points, image axes: x right, y down, z away from the camera
        out["roll"][i], out["yaw"][i], out["pitch"][i] = angles(fit_rigid(first[SKULL], p[SKULL])[1])
    return out


def applied_signals(targets: list[np.ndarray | None], rotations: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What the renderer drew: the six signals of its target landmarks (478,) complex per frame (mouth, eyes, gaze)
    and of the rotation it turned the portrait's head by (roll, yaw, pitch); NaN where it drew no new frame."""
    out = {m: np.full(len(targets), np.nan) for m in METRICS}
    for i, (t, r) in enumerate(zip(targets, rotations)):
        if t is None:
            continue
        for m, v in planar(np.stack([t.real, t.imag], 1)).items():
            out[m][i] = v
        out["roll"][i], out["yaw"][i], out["pitch"][i] = angles(r)
    return out


def curves(sig: dict[str, np.ndarray]) -> dict[str, list]:
    """Signals as JSON lists, 4 decimals, None where no face."""
    return {m: [None if np.isnan(v) else round(float(v), 4) for v in sig[m]] for m in METRICS}


def run_pair(frames, times, drv_sig, drv_retest, reference: str, size: int, keep_frames: list[int],
             follow_head: bool = True) -> dict:
    renderer = PreviewRenderer(load_reference(str(DATA / "reference" / reference)), width=size, height=size,
                               follow_head=follow_head)
    outs, targets, rotations, cpu0, t0 = [], [], [], time.process_time(), time.perf_counter()
    out = renderer.reference
    for f, t in zip(frames, times):  # PreviewRenderer.process, keeping what the renderer drew
        target = renderer.drive(f, t)
        out = out if target is None else renderer.warp(target)
        outs.append(out)
        targets.append(target)
        rotations.append(renderer.head_rotation)
    cpu_ms = (time.process_time() - cpu0) / len(frames) * 1e3
    wall_ms = (time.perf_counter() - t0) / len(frames) * 1e3
    renderer.close()
    out_sig = signals(landmarks3d(outs))
    out_retest = signals(landmarks3d(perturbed(outs, RETEST_SEED["output"])))
    drawn = applied_signals(targets, rotations)
    result = {"reference": reference, "follow_head": follow_head, "render_cpu_ms": round(cpu_ms, 2),
              "render_wall_ms": round(wall_ms, 2), "output_faces_missed": int(np.isnan(out_sig["mouth"]).sum()),
              "corr": {}, "driver_std": {}, "output_std": {}, "flat": {}, "curves": curves(out_sig),
              "curves_retest": curves(out_retest), "applied_curves": curves(drawn)}
    score(result, drv_sig, out_sig, drv_retest, out_retest, drawn)
    result["frames"] = [outs[i] for i in keep_frames]  # for the contact sheet, dropped before writing JSON
    return result


def score(result: dict, drv_sig: dict, out_sig: dict, drv_retest: dict | None = None,
          out_retest: dict | None = None, drawn: dict | None = None) -> None:
    """Fill result's corr, driver_std, output_std and flat from the driver's and the output's signals; with the
    second readings (retests) also reliability {driver, output} and ceiling; with what the renderer drew (`drawn`,
    applied_signals) also split {renderer: r(driver, drawn), reading: r(drawn, output)}: which side loses a cell,
    the renderer or the face mesh's reading of the avatar it drew; and, for the head's angles, `mouth_crosstalk`:
    r(output angle, output mouth opening), the share of an angle's reading that follows the avatar's mouth.

    Gaze counts only the frames where the driver's eyes are open (over half their median opening): a closed eye
    has no gaze, and the face mesh's iris points under a closed lid are noise on both sides."""
    open_eyes = drv_sig["eyes"] > 0.5 * np.nanmedian(drv_sig["eyes"])
    result["gaze_frames"] = int(open_eyes.sum())
    for m in METRICS:
        keep = open_eyes if m == "gaze" else np.ones(len(drv_sig[m]), bool)
        d, o = drv_sig[m][keep], out_sig[m][keep]
        c = pearson(d, o)
        result["corr"][m] = None if c is None else round(c, 3)
        result["driver_std"][m] = round(float(np.nanstd(d)), 4)
        result["output_std"][m] = round(float(np.nanstd(o)), 4)
        result["flat"][m] = bool(np.nanstd(d) < NOISE[m])
    rounded = lambda v: None if v is None else round(v, 3)  # noqa: E731
    if drawn is not None:
        result["split"] = {}
        for m in METRICS:
            keep = open_eyes if m == "gaze" else np.ones(len(drv_sig[m]), bool)
            result["split"][m] = {"renderer": rounded(pearson(drv_sig[m][keep], drawn[m][keep])),
                                  "reading": rounded(pearson(drawn[m][keep], out_sig[m][keep]))}
        result["mouth_crosstalk"] = {m: rounded(pearson(out_sig[m], out_sig["mouth"])) for m in POSE}
    if drv_retest is None or out_retest is None:
        return
    rel = {side: {} for side in ("driver", "output")}
    result["reliability"], result["ceiling"] = rel, {}
    for m in METRICS:
        keep = open_eyes if m == "gaze" else None
        for side, first, second in (("driver", drv_sig, drv_retest), ("output", out_sig, out_retest)):
            rel[side][m] = rounded(reliability(first[m], second[m], keep))
        c = ceiling(rel["driver"][m], rel["output"][m])
        result["ceiling"][m] = rounded(c)


def summarise(results: list[dict]) -> dict:
    def worst(m, only_moving):
        vals = [r["corr"][m] for r in results if r["corr"][m] is not None and not (only_moving and r["flat"][m])]
        return None if not vals else round(min(vals), 3)

    def below_moving(m):
        return [r for r in results if not r["flat"][m] and (r["corr"][m] is None or r["corr"][m] < TARGET[m])]

    def with_ceiling(r, m):
        rel = r.get("reliability")
        return {"pair": f"{r['driver'][:-4]} -> {r['reference'].rsplit('.', 1)[0]}", "corr": r["corr"][m],
                "ceiling": r["ceiling"][m] if rel else None, "driver_std": r["driver_std"][m],
                "reliability_driver": rel["driver"][m] if rel else None,
                "reliability_output": rel["output"][m] if rel else None,
                "renderer_r": r["split"][m]["renderer"] if "split" in r else None,
                "reading_r": r["split"][m]["reading"] if "split" in r else None}

    return {m: {"min": worst(m, False), "min_moving": worst(m, True), "target": TARGET[m],
                "pairs_below": sum(1 for r in results if r["corr"][m] is None or r["corr"][m] < TARGET[m]),
                "pairs_below_moving": len(below_moving(m)),
                "flat_pairs": sum(1 for r in results if r["flat"][m]),
                "below_moving": [with_ceiling(r, m) for r in below_moving(m)]} for m in METRICS}


def rescore(path: Path) -> None:
    """Recompute a result file's correlations and summary from the curves it stores (same rules as a run)."""
    import json

    data = json.loads(path.read_text())
    for r in data["results"]:
        arr = lambda curve: np.array([np.nan if v is None else v for v in curve], float)  # noqa: E731
        sig = lambda key: {m: arr(r[key][m]) for m in METRICS} if key in r else None  # noqa: E731
        score(r, sig("driver_curves"), sig("curves"), sig("driver_curves_retest"), sig("curves_retest"),
              sig("applied_curves"))
    data["summary"] = summarise(data["results"])
    data["rescored"] = ("correlations, reliabilities and ceilings recomputed from the stored curves by "
                        "bench/motion_transfer.py --rescore")
    path.write_text(json.dumps(data, indent=2) + "\n")
    plot(path.with_suffix(".png"), data["results"])
    print_summary(data["summary"])
    print("rewrote", path, "and", path.with_suffix(".png"))


def print_summary(summary: dict) -> None:
    print(f"\n{'metric':<8}{'min':>8}{'min moving':>12}{'target':>8}{'below':>7}{'below moving':>14}{'flat':>6}")
    for m in METRICS:
        s = summary[m]
        print(f"{m:<8}{s['min']!s:>8}{s['min_moving']!s:>12}{s['target']:>8}{s['pairs_below']:>7}"
              f"{s['pairs_below_moving']:>14}{s['flat_pairs']:>6}")
    print(f"\nmoving cells under target, against the face mesh's ceiling sqrt(rel_driver * rel_output), and split"
          f" into r(driver, drawn) (renderer) and r(drawn, output) (reading):\n"
          f"{'metric':<8}{'pair':<22}{'r':>8}{'ceiling':>9}{'rel drv':>9}{'rel out':>9}{'drv std':>9}"
          f"{'renderer':>10}{'reading':>9}")
    for m in METRICS:
        for c in summary[m]["below_moving"]:
            print(f"{m:<8}{c['pair']:<22}{c['corr']!s:>8}{c['ceiling']!s:>9}{c['reliability_driver']!s:>9}"
                  f"{c['reliability_output']!s:>9}{c['driver_std']:>9}{c['renderer_r']!s:>10}{c['reading_r']!s:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=150, help="driving frames per video, evenly spaced")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--name", default="motion_transfer")
    ap.add_argument("--drivers", default="", help="comma-separated driving videos (default: all)")
    ap.add_argument("--rescore", default=None, help="a result JSON: recompute its correlations from its curves")
    ap.add_argument("--hold-head", action="store_true",
                    help="render with the portrait's head held still (PreviewRenderer(follow_head=False)): the "
                         "output's roll, yaw and pitch are then what the face mesh reads into the expression alone")
    args = ap.parse_args()
    if args.rescore:
        rescore(Path(args.rescore))
        return

    todo = pairs()
    if args.drivers:
        wanted = {d if d.endswith(".mp4") else d + ".mp4" for d in args.drivers.split(",")}
        todo = [p for p in todo if p[0] in wanted]
    results, sheet_rows = [], []
    start = time.perf_counter()
    for driver in dict.fromkeys(d for d, _ in todo):
        frames, times = read_frames(DATA / "driving" / driver, args.frames)
        drv_sig = signals(landmarks3d(frames))
        drv_retest = signals(landmarks3d(perturbed(frames, RETEST_SEED["driver"])))
        keep = [int(np.nanargmin(drv_sig["mouth"])), int(np.nanargmax(drv_sig["mouth"])),
                int(np.nanargmin(drv_sig["eyes"])), int(np.nanargmin(drv_sig["gaze"])),
                int(np.nanargmax(drv_sig["gaze"])), int(np.nanargmax(np.abs(drv_sig["yaw"])))]
        for _, reference in [p for p in todo if p[0] == driver]:
            r = run_pair(frames, times, drv_sig, drv_retest, reference, args.size, keep, not args.hold_head)
            r["driver"] = driver
            r["driver_curves"], r["driver_curves_retest"] = curves(drv_sig), curves(drv_retest)
            r["driver_faces_missed"] = int(np.isnan(drv_sig["mouth"]).sum())
            tiles = [cv2.resize(frames[i], (160, 160), interpolation=cv2.INTER_AREA) for i in keep] + \
                    [cv2.resize(o, (160, 160), interpolation=cv2.INTER_AREA) for o in r.pop("frames")]
            sheet_rows.append((f"{driver[:-4]} -> {reference.rsplit('.', 1)[0]}", tiles))
            results.append(r)
            cells = "  ".join(f"{m} {'-' if r['corr'][m] is None else format(r['corr'][m], '.2f')}"
                              f"{'*' if r['flat'][m] else ''}" for m in METRICS)
            print(f"{driver:<12}{reference:<14}{cells}   ({r['render_cpu_ms']} ms CPU/frame)", flush=True)

    summary = summarise(results)
    payload = {"renderer": "preview", "follow_head": not args.hold_head, "size": args.size,
               "frames_per_driver": args.frames, "pairs": len(results), "metrics": METRICS, "target": TARGET,
               "flat_below_driver_std": NOISE,
               "retest": {"perturbation": f"per-frame scale 1 +- {SCALE} about the centre, shift +- {SHIFT_PX} px",
                          "seed": RETEST_SEED}, "summary": summary,
               "seconds": round(time.perf_counter() - start, 1), "cpu_count": os.cpu_count(), "results": results}
    path = write_result(args.name, payload)
    print_summary(summary)
    print("wrote", path)
    plot(RESULTS / f"{args.name}.png", results)
    sheet = np.vstack([np.hstack(t) for _, t in sheet_rows[:12]])
    for k, (label, _) in enumerate(sheet_rows[:12]):
        cv2.putText(sheet, label, (4, 16 + k * 160), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1)
    frames_path = RESULTS / f"{args.name}_frames.jpg"
    cv2.imwrite(str(frames_path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    print("wrote", RESULTS / f"{args.name}.png", "and", frames_path)


def plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = np.array([[np.nan if r["corr"][m] is None else r["corr"][m] for m in METRICS] for r in results])
    worst = int(np.nanargmin(np.nanmin(corr - np.array([TARGET[m] for m in METRICS]), axis=1)))
    fig = plt.figure(figsize=(14, max(6, 0.26 * len(results) + 2)))
    ax = fig.add_axes([0.14, 0.06, 0.3, 0.88])
    ax.imshow(corr, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), v in np.ndenumerate(corr):
        m, flat = METRICS[j], results[i]["flat"][METRICS[j]]
        top = results[i].get("ceiling", {}).get(m)
        tail = "*" if flat else f"/{top:.2f}" if top is not None and not v >= TARGET[m] else ""
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}{tail}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(METRICS)), METRICS)
    ax.set_yticks(range(len(results)), [f"{r['driver'][:-4]} -> {r['reference'].rsplit('.', 1)[0]}"
                                        for r in results], fontsize=7)
    ax.set_title("Pearson r driver vs output (* = driver barely moves; r/c: under target, c = face mesh's ceiling)",
                 fontsize=8)
    r = results[worst]
    for k, m in enumerate(METRICS):
        a = fig.add_axes([0.52 + 0.24 * (k % 2), 0.72 - 0.31 * (k // 2), 0.2, 0.22])
        d = np.array([np.nan if v is None else v for v in r["driver_curves"][m]])
        o = np.array([np.nan if v is None else v for v in r["curves"][m]])
        a.plot(d, label="driver", lw=1)
        a.plot(o, label="output", lw=1)
        a.set_title(f"{m}: r = {r['corr'][m]}", fontsize=8)
        a.tick_params(labelsize=6)
        if k == 0:
            a.legend(fontsize=6)
    fig.text(0.52, 0.97, f"curves of the weakest pair: {r['driver']} -> {r['reference']}", fontsize=9)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
