"""The no-weights preview renderer on real portraits and a real driving video (CPU, mediapipe face mesh)."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from engine.face_mesh import (INNER_LIP_LOWER, INNER_LIP_UPPER, OneEuroFilter, detect_landmarks, face_frame,
                              landmarks_from, mp_face_mesh)
from engine.preview import DEFAULT_REFERENCE, PreviewRenderer, load_reference
from conftest import data_file

LIP_PAIRS = [(13, 14), (82, 87), (312, 317)]
pytestmark = pytest.mark.timeout(120)


def read_video(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    assert frames, f"could not decode {path}"
    return frames


def mouth_opening(pts: np.ndarray) -> float:
    """Inner-lip gap over inter-ocular distance: independent of face size and position."""
    gap = np.mean([np.linalg.norm(pts[a] - pts[b]) for a, b in LIP_PAIRS])
    return float(gap / np.linalg.norm(pts[33] - pts[263]))


def measured_openings(frames: list[np.ndarray]) -> np.ndarray:
    """Mouth opening of each frame from a fresh video-mode face mesh (NaN where no face is found)."""
    out = []
    with mp_face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True) as mesh:
        for f in frames:
            pts = landmarks_from(mesh.process(f), f.shape[1], f.shape[0])
            out.append(np.nan if pts is None else mouth_opening(pts))
    return np.array(out)


@pytest.fixture(scope="module")
def driving():
    return read_video(data_file("driving", "lp_d0.mp4"))


@pytest.fixture(scope="module")
def rendered(driving):
    """lp_d0 driving fp_case3 (a clean frontal face) through process(), one output per frame."""
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))))
    outs = []
    for i, frame in enumerate(driving):
        result = renderer.process(frame, i / 25)
        assert len(result) == 1 and result[0][1] == i / 25
        outs.append(result[0][0])
    stats = renderer.stats()
    renderer.close()
    return outs, stats


@pytest.mark.parametrize("name", [None, "fp_case3.png", "lp_s12.jpg", "lp_s7.jpg"])
def test_reference_face_found(name):
    path = None if name is None else str(data_file("reference", name))
    rgb = load_reference(path)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    pts = detect_landmarks(rgb)
    assert pts is not None and pts.shape == (478, 2)
    h, w = rgb.shape[:2]
    assert (pts[:, 0] > 0).all() and (pts[:, 0] < w).all() and (pts[:, 1] > 0).all() and (pts[:, 1] < h).all()


def test_bundled_portrait_is_lp_s6():
    assert DEFAULT_REFERENCE.stat().st_size <= 150_000
    bundled = load_reference(None)
    original = cv2.cvtColor(cv2.imread(str(data_file("reference", "lp_s6.jpg"))), cv2.COLOR_BGR2RGB)
    assert bundled.shape == original.shape
    assert np.abs(bundled.astype(int) - original).mean() < 3


def _one_sentence(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
    assert "pass " in msg, f"error does not name the fix: {msg}"
    return msg


def test_load_reference_errors(tmp_path):
    with pytest.raises(ValueError) as err:
        load_reference(str(tmp_path / "missing.jpg"))
    assert "does not exist" in _one_sentence(err)

    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ValueError) as err:
        load_reference(str(text))
    assert "not a readable image" in _one_sentence(err)

    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((256, 256, 3), 128, np.uint8))
    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    for path in (grey, noise):
        with pytest.raises(ValueError) as err:
            load_reference(str(path))
        assert "no face" in _one_sentence(err)


def test_no_face_reference_array_rejected():
    with pytest.raises(ValueError, match="no face"):
        PreviewRenderer(np.full((300, 300, 3), 90, np.uint8))


def test_neutral_frame_gives_undeformed_reference(driving):
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "lp_s12.jpg"))))
    ref = renderer.reference.astype(np.float32)
    first = renderer.process(driving[0], 0.0)[0][0]  # becomes the neutral frame: exactly no motion
    again = renderer.process(driving[0], 0.04)[0][0]  # the same face again: only the face mesh's tracking jitter
    smile = renderer.process(driving[40], 0.08)[0][0]
    renderer.close()
    assert np.abs(first.astype(np.float32) - ref).mean() < 0.1
    diff_again = np.abs(again.astype(np.float32) - ref).mean()
    diff_smile = np.abs(smile.astype(np.float32) - ref).mean()
    assert diff_again < 4 and diff_again < 0.5 * diff_smile, (diff_again, diff_smile)
    ref_pts, out_pts = detect_landmarks(renderer.reference), detect_landmarks(again)
    iod = np.linalg.norm(ref_pts[33] - ref_pts[263])
    assert np.median(np.linalg.norm(out_pts - ref_pts, axis=1)) < 0.03 * iod


def test_mouth_follows_driver(driving, rendered):
    outs, stats = rendered
    assert stats["face_found"] is True and stats["faces_missed"] == 0
    drv = measured_openings(driving)
    got = measured_openings(outs)
    assert not np.isnan(drv).any() and np.isnan(got).sum() <= 2, "the face mesh lost the face in the output"
    ok = ~np.isnan(got)
    corr = np.corrcoef(drv[ok], got[ok])[0, 1]
    assert corr > 0.7, f"output mouth opening does not track the driver (corr {corr:.2f})"
    # Opening the mouth in the driver opens it in the output, by a comparable (normalised) amount.
    open_idx, shut_idx = np.argmax(drv), 0
    assert got[open_idx] - got[shut_idx] > 0.5 * (drv[open_idx] - drv[shut_idx])


def test_bundled_portrait_mouth_darkens_when_driver_opens(driving):
    """The default portrait has a moustache that fools the face mesh's lip model, so measure the mouth directly:
    the darkness of the reference's mouth region must track the driver's mouth opening."""
    renderer = PreviewRenderer(load_reference(None))
    pts = detect_landmarks(renderer.reference)
    lips = pts[[61, 291, 0, 17]]
    (x0, y0), (x1, y1) = lips.min(0).astype(int) - 4, lips.max(0).astype(int) + 8
    darkness = []
    for i, frame in enumerate(driving):
        out = renderer.process(frame, i / 25)[0][0]
        darkness.append(255 - out[y0:y1, x0:x1].mean())
    renderer.close()
    drv = measured_openings(driving)
    corr = np.corrcoef(drv, darkness)[0, 1]
    assert corr > 0.7, f"mouth region darkness does not track the driver (corr {corr:.2f})"


def test_output_moves_with_driver_and_is_not_the_input(driving, rendered):
    outs, _ = rendered
    for out, frame in zip(outs, driving):
        assert out.shape == (512, 512, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(np.int16) - frame).mean() > 20  # not an echo of the driving frame
    drv_motion = np.array([np.abs(driving[i + 1].astype(np.int16) - driving[i]).mean() for i in range(len(outs) - 1)])
    out_motion = np.array([np.abs(outs[i + 1].astype(np.int16) - outs[i]).mean() for i in range(len(outs) - 1)])
    moving = drv_motion > np.percentile(drv_motion, 75)
    assert (out_motion[moving] > 0.2).all(), "the output froze while the driver moved"
    assert np.corrcoef(drv_motion, out_motion)[0, 1] > 0.5
    assert np.abs(outs[0].astype(np.int16) - outs[40]).mean() > 2  # neutral vs a wide smile


def test_one_output_of_configured_size_per_input_and_no_face_frames(driving):
    renderer = PreviewRenderer(load_reference(None), width=320, height=240)
    out_a = renderer.process(driving[0], 0.0)
    out_b = renderer.process(driving[40], 0.04)
    blank = renderer.process(np.full((480, 640, 3), 128, np.uint8), 0.08)  # no face: repeat the last good frame
    stats = renderer.stats()
    renderer.close()
    for result in (out_a, out_b, blank):
        assert len(result) == 1
        frame, _ = result[0]
        assert frame.shape == (240, 320, 3) and frame.dtype == np.uint8
    assert blank[0][1] == 0.08
    assert np.array_equal(blank[0][0], out_b[0][0])
    assert stats["face_found"] is False and stats["faces_missed"] == 1 and stats["renderer"] == "preview"


def test_no_face_before_any_face_gives_reference():
    renderer = PreviewRenderer(load_reference(None))
    (frame, _), = renderer.process(np.zeros((256, 256, 3), np.uint8), 0.0)
    renderer.close()
    assert np.array_equal(frame, renderer.reference)


def test_threaded_push_pull(driving):
    renderer = PreviewRenderer(load_reference(None), input_queue=len(driving)).start()
    try:
        for i, frame in enumerate(driving[:12]):
            renderer.push(frame, i / 25)
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 12 and time.monotonic() < deadline:
            item = renderer.pull()
            if item is None:
                time.sleep(0.005)
            else:
                got.append(item)
    finally:
        renderer.close()
    assert [pts for _, pts in got] == [i / 25 for i in range(12)]
    assert renderer.stats()["frames_out"] == 12 and renderer.error is None
    renderer.close()  # a second close (session teardown racing a peer failure) is harmless


def _face_pose(pts: np.ndarray) -> tuple[complex, complex]:
    """(eye midpoint, eye vector) as complex numbers: position, scale and roll of a face."""
    z = pts[:, 0] + 1j * pts[:, 1]
    return (z[33] + z[263]) / 2, z[263] - z[33]


def test_head_motion_transfers_normalised(driving):
    """Rolling, scaling and shifting the driver's head does the same to the portrait's head, with the shift in
    units of each face's own size (so a small driver face moves a big portrait face proportionally)."""
    frame = driving[0]
    drv0 = detect_landmarks(frame)
    c_d, v_d = _face_pose(drv0)
    m = cv2.getRotationMatrix2D((c_d.real, c_d.imag), 8.0, 1.1)
    m[:, 2] += (24.0, -12.0)
    moved = cv2.warpAffine(frame, m, (frame.shape[1], frame.shape[0]), borderMode=cv2.BORDER_REPLICATE)
    c_m, v_m = _face_pose(detect_landmarks(moved))

    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    renderer.process(frame, 0.0)
    out = renderer.process(moved, 0.04)[0][0]
    renderer.close()
    c_r, v_r = _face_pose(detect_landmarks(renderer.reference))
    c_o, v_o = _face_pose(detect_landmarks(out))

    drv_turn, out_turn = np.angle(v_m / v_d, deg=True), np.angle(v_o / v_r, deg=True)
    assert abs(drv_turn) > 6 and abs(out_turn - drv_turn) < 1.5, (drv_turn, out_turn)
    assert abs(abs(v_o / v_r) - abs(v_m / v_d)) < 0.04
    # The shift of the eye midpoint, in each face's own inter-ocular units and eye-aligned axes, must agree.
    drv_shift, out_shift = (c_m - c_d) / v_d, (c_o - c_r) / v_r
    assert abs(drv_shift) > 0.1 and abs(out_shift - drv_shift) < 0.05, (drv_shift, out_shift)


def test_one_euro_filter_smooths_jitter_but_follows_motion():
    rng = np.random.default_rng(0)
    still = 0.01 * (rng.standard_normal((50, 478)) + 1j * rng.standard_normal((50, 478)))
    f = OneEuroFilter()
    smoothed = np.array([f(x, 1 / 25) for x in still])
    assert np.abs(np.diff(smoothed[10:], axis=0)).mean() < 0.7 * np.abs(np.diff(still[10:], axis=0)).mean()
    jump = f(still[-1] + 0.3, 1 / 25)  # a fast move of 0.3 inter-ocular distances
    assert np.abs(jump - smoothed[-1]).mean() > 0.8 * 0.3


def test_open_mouth_first_frame_is_replaced_as_neutral(driving):
    """A driver who starts mid-smile: once they close their mouth, that face becomes the neutral, so the portrait
    returns to its own closed mouth instead of squeezing its lips past closed. Its lip gaps are compared in its
    own face frame: the head keeps the driver's turn since the first face (1.2 degrees of yaw and pitch here), the
    head pose's zero, which a re-taken neutral leaves where it was."""
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))))
    try:
        renderer.drive(driving[40], 0.0)  # wide open smile, taken as neutral at first
        target = renderer.drive(driving[0], 0.04)  # mouth closed
    finally:
        renderer.close()
    origin, axis = face_frame(target)
    gaps = renderer._gaps((target - origin) / axis)[0]
    assert np.abs(gaps - renderer._gaps(renderer._ref_q)[0]).max() < 0.003, gaps


def _gaze(pts: np.ndarray) -> float:
    """Horizontal iris position between the eye corners (image x: 0 at 33/362, 1 at 133/263), both eyes."""
    z = pts[:, 0] + 1j * pts[:, 1]
    return float(np.mean([((z[c] - z[a]) / (z[b] - z[a])).real for c, a, b in ((468, 33, 133), (473, 362, 263))]))


def _shift_irises(frame: np.ndarray, pts: np.ndarray, dx: float) -> np.ndarray:
    """The frame with both irises moved dx pixels sideways inside their eye openings (lids and skin untouched):
    a driver looking to one side, everything else equal."""
    out = frame.copy()
    h, w = frame.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c, outline in ((468, [33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7]),
                       (473, [362, 398, 384, 385, 386, 387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382])):
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(pts[outline]).astype(np.int32)], 255)
        radius = np.linalg.norm(pts[c + 1] - pts[c])
        d = np.hypot(xx - pts[c, 0] - dx, yy - pts[c, 1])
        weight = np.clip((2.2 * radius - d) / radius, 0, 1) * (cv2.GaussianBlur(mask, (5, 5), 0) / 255.0)
        moved = cv2.remap(frame, xx - dx * weight.astype(np.float32), yy, cv2.INTER_LINEAR)
        out = np.where(mask[..., None] > 0, moved, out)
    return out


def test_gaze_follows_the_drivers_irises(driving):
    """A driver whose irises move sideways (the rest of the face unchanged) moves the portrait's irises the same way,
    by a comparable share of the eye's width, as the face mesh reads both."""
    frame = driving[0]
    pts = detect_landmarks(frame)
    iris_width = np.linalg.norm(pts[133] - pts[33])
    results = {}
    for dx in (-0.12 * iris_width, 0.12 * iris_width):
        shifted = _shift_irises(frame, pts, dx)
        drv = _gaze(detect_landmarks(shifted)) - _gaze(pts)
        renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
        renderer.process(frame, 0.0)
        out = renderer.process(shifted, 0.04)[0][0]
        renderer.close()
        results[dx] = (drv, _gaze(detect_landmarks(out)) - _gaze(detect_landmarks(renderer.reference)))
    for dx, (drv, got) in results.items():
        assert np.sign(drv) == np.sign(dx) and abs(drv) > 0.03, f"the face mesh did not see the iris move: {drv}"
        assert np.sign(got) == np.sign(drv) and abs(got) > 0.4 * abs(drv), (dx, drv, got)


def test_warp_moves_the_iris_only_inside_the_eye():
    """The target's iris landmarks moved along the eye: the rendered iris follows, the lids and the rest stay."""
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    renderer.close()
    ref = renderer.reference
    ref_pts = detect_landmarks(ref)
    target = renderer._src_z.copy()  # the warp mesh's own source points (lids as modelled)
    still = renderer.warp(target)
    assert np.abs(still.astype(np.float32) - ref).mean() < 0.5  # the reference's own landmarks: no change
    eye = (target[133] - target[33]) * 0.15  # 15 % of the eye width towards the inner corner, both eyes
    target[468:473] += eye
    target[473:478] += (target[263] - target[362]) * 0.15
    out = renderer.warp(target)
    got = _gaze(detect_landmarks(out)) - _gaze(ref_pts)
    assert got > 0.05, got  # the face mesh reads about half of it: the iris edge blends into the white
    changed = np.abs(out.astype(np.int16) - ref).max(axis=2) > 12
    ys, xs = np.nonzero(changed)
    lids = ref_pts[[33, 133, 362, 263, 159, 145, 386, 374]]
    assert xs.min() >= lids[:, 0].min() - 3 and xs.max() <= lids[:, 0].max() + 3, "pixels changed outside the eyes"
    assert ys.min() >= lids[:, 1].min() - 4 and ys.max() <= lids[:, 1].max() + 4, "pixels changed outside the eyes"


def _jaw_dropped(pts: np.ndarray, gap: float) -> np.ndarray:
    """(478, 3) landmarks with every point below the mouth line moved down the face by `gap` inter-ocular
    distances: the lips part by that much, the skull stays put."""
    z = pts[:, 0] + 1j * pts[:, 1]
    axis = z[263] - z[33]
    q = (z - z[33]) / axis
    upper, lower = np.array(INNER_LIP_UPPER), np.array(INNER_LIP_LOWER[1:-1])
    below = (q.imag > q[upper].imag.max()) | np.isin(np.arange(len(z)), lower)  # the closed lips meet: by name
    below[upper] = False
    moved = z + np.where(below, 1j * gap * axis, 0)
    return np.stack([moved.real, moved.imag, pts[:, 2]], 1)


def test_lips_part_slightly_after_a_mid_word_first_face():
    """A driver first seen mid-word (lips 0.06 apart) who then holds them 0.015 apart, then closes them: the
    portrait's lips stay parted by about the difference to a closed mouth, then close. Until the driver shows a closed
    mouth the renderer takes one to read 0.01 (the nine driving videos that close theirs read 0.000-0.0025); at 0.02,
    lips held 0.015 apart gave a shut portrait mouth (lp_s20, parted 0.01-0.03 for the first third of its clip)."""
    from engine.face_mesh import mouth_opening as gap_of
    closed = detect_landmarks(read_video(data_file("driving", "lp_d0.mp4"))[0], depth=True)
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    renderer.close()
    ref_gap = gap_of(renderer._ref_q)
    opening = []
    for t, gap in enumerate((0.06, 0.015, 0.0)):
        target = renderer.transfer(_jaw_dropped(closed, gap), t / 25)
        opening.append(gap_of((target - renderer._ref_origin) / renderer._ref_axis) - ref_gap)
    assert opening[1] > 0.0025, f"the portrait's lips stayed shut ({opening[1]:.4f}) while the driver's parted"
    assert opening[2] < 0.001, f"the portrait's lips stayed parted ({opening[2]:.4f}) while the driver's closed"


def test_a_wide_glance_eases_off_before_the_corner():
    """The target's irises 0.2 and 0.3 eye widths along the eye (a glance to one side): the wider glance still moves
    the rendered iris further, as the face mesh reads it, and the lids stay open. At 1.5x the driver's shift with a
    hard clip, 0.2 already pushed the iris to the corner's clip (both glances rendered alike), where the lids cut it
    and the avatar's eye read as narrowing (motion bench eyes lp_d12 -> fp_case2 0.83 -> 0.86)."""
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case2.png"))), smoothing=False)
    renderer.close()
    base = detect_landmarks(renderer.reference)

    def lids(p):
        return np.mean([np.linalg.norm(p[a] - p[b]) for a, b in ((159, 145), (386, 374))]) / np.linalg.norm(
            p[263] - p[33])

    for side in (1, -1):
        read = {}
        for glance in (0.2, 0.3):
            target = renderer._src_z.copy()
            target[468:473] += (target[133] - target[33]) * glance * side
            target[473:478] += (target[263] - target[362]) * glance * side
            pts = detect_landmarks(renderer.warp(target))
            read[glance] = (side * (_gaze(pts) - _gaze(base)), lids(pts) / lids(base))
        assert read[0.3][0] > read[0.2][0] + 0.005, ("the wider glance did not move the iris further", side, read)
        assert min(read[0.2][1], read[0.3][1]) > 0.85, ("the glancing eye narrowed", side, read)
