"""Motion transfer of the preview renderer, as the face mesh reads it back (bench/motion_transfer.py in small):
head rotation, head travel, the open mouth. Real portraits and driving frames from ../shared/data, CPU."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import data_file, video_frames
from engine.face_mesh import NOSE, STABLE, detect_landmarks, landmarks_from, mp_face_mesh
from engine.head_pose import angles, fit_rigid, turn
from engine.preview import TRAVEL, PreviewRenderer, load_reference
from test_preview import _jaw_dropped, mouth_opening

pytestmark = pytest.mark.timeout(120)


def _rotation(roll: float, yaw: float, pitch: float) -> np.ndarray:
    """Rotation in image axes (x right, y down, z away) from degrees, as angles() reads it back."""
    r, y, p = np.radians([roll, yaw, pitch])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return rz @ ry @ rx


def test_fit_rigid_recovers_a_known_motion():
    """A real face's 3-D landmarks turned, scaled and shifted by known amounts: fit_rigid gives them back exactly,
    and turn() about the centroid reproduces the motion."""
    pts = detect_landmarks(load_reference(str(data_file("reference", "fp_case3.png"))), depth=True)
    r = _rotation(4.0, -18.0, 7.0)
    centre = pts[STABLE].mean(0)
    moved = 1.2 * (pts - centre) @ r.T + centre + np.array([15.0, -8.0, 3.0])
    s, r_fit, shift = fit_rigid(pts[STABLE], moved[STABLE])
    assert s == pytest.approx(1.2, abs=1e-9) and np.allclose(r_fit, r, atol=1e-9)
    assert np.allclose(shift, [15.0, -8.0, 3.0], atol=1e-9)
    for roll, yaw, pitch in ((4.0, 0, 0), (0, -18.0, 0), (0, 0, 7.0)):  # one axis at a time: read back as set
        assert np.allclose(angles(_rotation(roll, yaw, pitch)), (roll, yaw, pitch), atol=1e-9)
    assert np.allclose(turn(pts, r, centre), (moved - shift - centre) / 1.2 + centre, atol=1e-6)


def test_depth_jitter_stays_out_of_the_expression():
    """The driver turns 15 degrees (yaw) and the face mesh's depths of the non-skull points jitter by 3 px: the
    avatar's landmarks are exactly those of the steady turn. Undoing the turn on the current points carried that
    jitter into the expression (up to 4 px at this yaw)."""
    driver = detect_landmarks(video_frames("lp_d0.mp4", 1)[0], depth=True)
    centre = driver[STABLE].mean(0)
    turned = (driver - centre) @ _rotation(0.0, 15.0, 0.0).T + centre
    jitter = turned.copy()
    others = np.setdiff1d(np.arange(len(driver)), STABLE)
    jitter[others, 2] += np.random.default_rng(0).normal(0.0, 3.0, len(others))
    targets = []
    for points in (turned, jitter):
        renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
        renderer.close()
        renderer.transfer(driver, 0.0)  # the neutral face
        targets.append(renderer.transfer(points, 0.04))
    assert np.abs(targets[1] - targets[0]).max() < 1e-6
    moved = np.abs(targets[0] - renderer._ref_z)[:468].max()
    assert moved > 5.0, "the turn did not move the avatar"


def _poses(frames: list[np.ndarray]) -> np.ndarray:
    """(n, 3) roll, yaw, pitch (degrees) of each frame's head relative to the first, from a video-mode face mesh."""
    pts = []
    with mp_face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True) as mesh:
        for f in frames:
            pts.append(landmarks_from(mesh.process(f), f.shape[1], f.shape[0], depth=True))
    assert all(p is not None for p in pts), "the face mesh lost the face"
    return np.array([angles(fit_rigid(pts[0][STABLE], p[STABLE])[1]) for p in pts])


def test_a_turned_head_stays_level():
    """lp_d12 turns its head about 19 degrees (yaw) with little nod or tilt: the avatar turns as far and neither
    nods nor tilts. Fitted as a 2-D similarity, the turn's foreshortening went into the expression and the warped
    face read about 4.6 degrees of pitch and 3.4 of roll off the driver's."""
    frames = video_frames("lp_d12.mp4", 56)
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case2.png"))))
    outs = [renderer.process(f, i / 25)[0][0] for i, f in enumerate(frames)]
    renderer.close()
    drv, out = _poses(frames), _poses(outs)
    turned = np.abs(drv[:, 1]) > 12
    assert turned.sum() >= 10, "the driving clip no longer turns its head"
    assert np.abs(out[turned, 1] - drv[turned, 1]).mean() < 3.0  # the yaw itself transfers
    assert np.abs(out[turned, 2] - drv[turned, 2]).mean() < 2.0, "the turn came out as pitch"
    assert np.abs(out[turned, 0] - drv[turned, 0]).mean() < 2.0, "the turn came out as roll"


def test_head_travel_keeps_the_face_in_frame():
    """The driver's face moves 1.5 inter-ocular distances across its frame (a camera pan): the portrait's face moves
    the same way but by less than TRAVEL plus a margin, so it stays in its frame."""
    frame = cv2.copyMakeBorder(video_frames("lp_d0.mp4", 1)[0], 0, 0, 0, 512, cv2.BORDER_REPLICATE)  # room to move
    pts = detect_landmarks(frame)
    shift = 1.5 * np.linalg.norm(pts[263] - pts[33])
    moved = cv2.warpAffine(frame, np.float32([[1, 0, shift], [0, 1, 0]]), frame.shape[1::-1],
                           borderMode=cv2.BORDER_REPLICATE)
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    try:
        still = renderer.drive(frame, 0.0)
        renderer.drive(moved, 0.04)  # the tracking face mesh loses a face that jumps; it finds it again next frame
        target = renderer.drive(moved, 0.08)
    finally:
        renderer.close()
    iod = abs(renderer._ref_axis)
    travel = (target[:468].mean() - still[:468].mean()) / iod
    assert travel.real > 0.2, "the face did not follow the driver"
    assert abs(travel) < TRAVEL + 0.05, f"the face travelled {abs(travel):.2f} inter-ocular distances"


@pytest.mark.parametrize("reference", ["lp_s12.jpg", "fp_case1.png"])
def test_an_open_mouth_reads_open(reference):
    """The portrait's jaw dropped by 0.2 inter-ocular distances: the face mesh reads the mouth open by most of that.
    A mouth interior lit like the lips (the moustached lp_s12, the three-quarter fp_case1) was read as lips, the
    mouth as open by 0.08-0.12."""
    renderer = PreviewRenderer(load_reference(str(data_file("reference", reference))), smoothing=False)
    renderer.close()
    base = mouth_opening(detect_landmarks(renderer.reference))
    drop = 0.2
    q = renderer._ref_q + 1j * drop * renderer._close_w  # the points below the lips follow the lower lip down
    out = renderer.warp(renderer._ref_origin + renderer._ref_axis * q)
    got = mouth_opening(detect_landmarks(out)) - base
    assert got > 0.65 * drop, got


def test_the_nose_carries_no_expression():
    """The face mesh bends the lower nose as the head turns (its error, not an expression): the portrait's nose moves
    only with the head. Bent by it, the portrait's nose read as a nod (motion bench pitch lp_d6 -> lp_s7 0.84 -> 0.88).
    The lips still move the portrait."""
    driver = detect_landmarks(video_frames("lp_d0.mp4", 1)[0], depth=True)
    iod = np.linalg.norm(driver[263, :2] - driver[33, :2])
    bent = driver.copy()
    nose = np.setdiff1d(NOSE, STABLE)  # the nose tip is a skull point too: moving it would move the fitted head
    bent[nose, :2] += np.array([0.03, 0.05]) * iod  # the nose 0.05 inter-ocular distances down, a little aside
    bent[14, 1] += 0.05 * iod  # ...and the lower lip's middle
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    renderer.close()
    still = renderer.transfer(driver, 0.0)
    moved = renderer.transfer(bent, 0.04)
    assert np.abs(moved[NOSE] - still[NOSE]).max() < 1e-6
    assert abs(moved[14] - still[14]) > 0.02 * abs(renderer._ref_axis), "the lower lip no longer follows the driver"


def test_a_re_taken_neutral_keeps_the_head_pose():
    """The driver's first face is mid-word (mouth open), then it turns its head (2 degrees of roll, 3 of pitch) and
    closes its mouth: that more neutral face becomes the new neutral while the head is turned (lp_d3 at frame 43).
    The avatar's head stays turned as it was the frame before; measured from the re-taken neutral it snapped back
    by the whole turn (1-13 px of the skull points at 512x512) and stayed off. reset_neutral (the user's
    re-centre) does take the turned head as the new zero."""
    driver = detect_landmarks(video_frames("lp_d0.mp4", 1)[0], depth=True)
    talking = _jaw_dropped(driver, 0.1)  # the lower lip and below: 0.1 inter-ocular distances down
    centre = driver[STABLE].mean(0)
    r = _rotation(2.0, 0.0, 3.0)

    def turned(pts):
        return (pts - centre) @ r.T + centre

    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    renderer.close()
    straight = renderer.transfer(talking, 0.0)  # the first neutral face
    before = renderer.transfer(turned(talking), 0.04)  # turned, still talking: no new neutral
    closed = turned(driver)
    after = renderer.transfer(closed, 0.08)  # turned, mouth closed: the new neutral
    assert renderer._neutral_p3 is closed, "the neutral face was not re-taken"
    skull = np.setdiff1d(STABLE, [33, 133, 362, 263])  # the eye corners move with the lids' re-take
    turn_px = np.abs(before[skull] - straight[skull]).max()
    assert turn_px > 2.0, "the turn did not move the avatar"
    assert np.abs(after[skull] - before[skull]).max() < 0.1 * turn_px, "the head snapped back at the re-take"
    renderer.reset_neutral()  # the user re-centres: the turned head is the zero now
    centred = renderer.transfer(closed, 0.12)
    assert np.abs(centred[skull] - straight[skull]).max() < 0.1 * turn_px


def test_a_re_take_on_a_squint_keeps_the_open_eyes():
    """The driver's first face is mid-word with open eyes; it then closes its mouth while squinting (lids at a third
    of their opening; lp_d3 at frame 43, looking down): that face becomes the neutral, but its squint must not become
    the reference of open eyes. The portrait squints as far as the driver does, and opens its eyes to 0.6 when the
    driver's are at 0.6 of open; taken as the open eyes, the squint gave the portrait fully open eyes through it and
    1.8 times its own opening at 0.6 (lp_d3's eye cells 0.82-0.90 -> 0.91-0.97)."""
    from engine.face_mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER
    driver = detect_landmarks(video_frames("lp_d0.mp4", 1)[0], depth=True)  # mouth closed, eyes open

    def lidded(opening):
        pts = driver.copy()
        for upper, lower in ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER)):
            u, lo = np.array(upper[1:-1]), np.array(lower[1:-1])
            pts[u, :2] += (1 - opening) * (driver[lo, :2] - driver[u, :2])
        return pts

    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    renderer.close()

    def lids(target):
        return renderer._gaps((target - renderer._ref_origin) / renderer._ref_axis)[1]

    first = lids(renderer.transfer(_jaw_dropped(driver, 0.1), 0.0))  # talking, eyes open: the first neutral
    squint = lidded(1 / 3)
    renderer.transfer(squint, 0.04)  # mouth closed, squinting: the neutral is re-taken
    assert renderer._neutral_p3 is squint, "the neutral face was not re-taken"
    squinting = lids(renderer.transfer(lidded(1 / 3), 0.08))
    assert np.all((squinting > 0.2 * first) & (squinting < 0.5 * first)), (squinting, first)
    half = lids(renderer.transfer(lidded(0.6), 0.12))
    assert np.all((half > 0.45 * first) & (half < 0.75 * first)), (half, first)


def test_a_lid_under_a_fringe_closes_with_skin_not_hair():
    """fp_case3's left eye lies under its fringe: the band above its lid is hair, and a closing lid dragged that hair
    down over the eye (a curtain the face mesh read as a still-open eye: eyes lp_d19 -> fp_case3 0.78, its left eye
    0.69). The hair stays put and the lid closes as skin, as light as the skin under the eye; the open eyes are
    unchanged, and an eye with a visible lid is left to the warp."""
    from engine.face_mesh import LEFT_EYE_LOWER, LEFT_EYE_UPPER, LEFT_LID_RING, LEFT_LOWER_RING
    driver = detect_landmarks(video_frames("lp_d0.mp4", 1)[0], depth=True)
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False)
    renderer.close()
    opened = renderer.warp(renderer.transfer(driver, 0.0))
    shut = driver.copy()
    u, lo = np.array(LEFT_EYE_UPPER[1:-1]), np.array(LEFT_EYE_LOWER[1:-1])
    shut[u, :2] += 0.8 * (driver[lo, :2] - driver[u, :2])  # the left eye at a fifth of its opening
    closed = renderer.warp(renderer.transfer(shut, 0.04))
    grey = lambda img: cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(float)  # noqa: E731
    z = renderer._ref_z
    top, bottom = z[u].imag.mean(), z[lo].imag.mean()
    x0, x1 = int(z[u].real.min()), int(z[u].real.max())
    covered = grey(closed)[int(top) + 1:int(top + 0.5 * (bottom - top)), x0:x1]  # the upper half of the open eye
    under = np.concatenate([z[lo], z[np.array(LEFT_LOWER_RING)][::-1]])
    mask = np.zeros(opened.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(np.stack([under.real, under.imag], 1)).astype(np.int32)], 1)
    skin = np.median(grey(renderer.reference)[mask > 0])  # the skin under the eye
    assert np.median(covered) > 0.7 * skin, (np.median(covered), skin)
    # ...and it is skin, not a flat patch: its fine texture (what a 3x3 Laplacian sees) is the skin's own
    texture = lambda img: np.abs(cv2.Laplacian(img, cv2.CV_64F))  # noqa: E731  (a flat paint: 0.14 of it)
    lid_detail = np.median(texture(grey(closed))[int(top) + 2:int(top + 0.4 * (bottom - top)), x0 + 3:x1 - 3])
    skin_detail = np.median(texture(grey(renderer.reference))[mask > 0])
    assert lid_detail > 0.25 * skin_detail, (lid_detail, skin_detail)
    ring = z[np.array(LEFT_LID_RING)]
    fringe = (slice(int(ring.imag.min()) - 12, int(ring.imag.min()) - 2), slice(x0, x1))  # hair above the lid
    assert np.abs(grey(closed)[fringe] - grey(opened)[fringe]).mean() < 4.0, "the fringe moved with the lid"
    assert renderer._lid_paint[0] is None, "the right eye's lid is visible: the warp moves it"
    plain = PreviewRenderer(load_reference(str(data_file("reference", "fp_case2.png"))), smoothing=False)
    plain.close()
    assert plain._lid_paint == [None, None]
    # fp_case1's far eye lies deep in shadow (as dark against its skin as a fringe), but the shadow is skin, warmer
    # than the skin under the eye, not cooler: its lid is the warp's, no light patch painted into a dark socket
    shaded = PreviewRenderer(load_reference(str(data_file("reference", "fp_case1.png"))), smoothing=False)
    shaded.close()
    assert shaded._lid_paint == [None, None]


def test_an_eye_turning_with_the_head_slides_its_iris_by_the_parallax():
    """eyeball_ratio on a frontal eye 2 wide with its iris centred: unturned, the iris stays where it is seen; turned
    by a yaw t, the iris (IRIS_DEPTH eye widths in front of the corners) sits at 0.5 - IRIS_DEPTH tan t between them,
    exactly; pitch moves it across the eye, not along it."""
    from engine.preview_iris import IRIS_DEPTH, IRISES, eyeball_ratio
    iris = IRISES[0]
    p3 = np.zeros((478, 3))
    p3[iris[1]], p3[iris[2]], p3[iris[0]] = (-1.0, 0.0, 5.0), (1.0, 0.0, 5.0), (0.0, 0.3, 9.0)  # iris depth ignored
    assert eyeball_ratio(p3, np.eye(3), iris) == pytest.approx(0.5 + 0.15j, abs=1e-12)
    for yaw in (-20.0, 10.0):
        got = eyeball_ratio(p3, _rotation(0.0, yaw, 0.0), iris)
        assert got.real == pytest.approx(0.5 - IRIS_DEPTH * np.tan(np.radians(yaw)), abs=1e-12)
    assert eyeball_ratio(p3, _rotation(0.0, 0.0, 12.0), iris).real == pytest.approx(0.5, abs=1e-12)


def test_a_driver_turning_its_head_with_its_eyes_still_in_it_gives_no_gaze():
    """A real driver's face turned by 20 degrees of yaw with its eyes fixed in its head (irises moved as eyeballs
    turning with it): the portrait's irises sit where its own eyeballs turned by the same yaw put them, not where the
    driver's image ratio alone would (fp_case1's far eye, turned away, foreshortens differently: 0.027 eye widths
    apart); an in-head glance on top of the turn still moves them by the glance."""
    from engine.preview_iris import IRISES, eyeball_ratio
    driver = detect_landmarks(video_frames("lp_d0.mp4", 1)[0], depth=True)
    renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case1.png"))), smoothing=False)
    renderer.close()
    r = _rotation(0.0, 20.0, 0.0)
    centre = driver[STABLE].mean(0)
    turned = (driver - centre) @ r.T + centre
    ref3 = np.stack([renderer._ref_z.real, renderer._ref_z.imag, renderer._ref_depth], 1)
    ratio = lambda z, c, a, b: (z[c] - z[a]) / (z[b] - z[a])  # noqa: E731
    for glance in (0.0, 0.05):
        moved = turned.copy()
        for iris in IRISES:
            c, a, b, _ = iris
            eye = complex(*(turned[b, :2] - turned[a, :2]))
            seen = turned[a, 0] + 1j * turned[a, 1] + eye * (eyeball_ratio(driver - centre, r, iris) + glance)
            moved[c, :2] = seen.real, seen.imag
        renderer.reset_neutral()
        renderer.transfer(driver, 0.0)
        target = renderer.transfer(moved, 0.04)
        for iris in IRISES:
            want = eyeball_ratio(ref3, r, iris).real + glance
            assert ratio(target, *iris[:3]).real == pytest.approx(want, abs=0.004), (iris, glance)
    plain = (renderer._ref_z[468] - renderer._ref_z[33]) / (renderer._ref_z[133] - renderer._ref_z[33])
    assert abs(eyeball_ratio(ref3, r, IRISES[0]).real - plain.real) > 0.02, "the turn did not move the iris at all"


def test_a_held_head_keeps_its_pose_and_still_takes_the_expression():
    """follow_head=False (what the motion bench's --hold-head renders): a driver turned 15 degrees of yaw and 6 of
    pitch with its jaw dropped leaves the portrait's skull points where they were (no turn, and the same scale and
    place: a turn about the skull's centre moves neither), while its lips part as they do when the head follows;
    head_rotation reports the turn applied: none held, the driver's when following."""
    from test_preview import _jaw_dropped
    driver = detect_landmarks(video_frames("lp_d0.mp4", 1)[0], depth=True)
    r = _rotation(0.0, 15.0, 6.0)
    centre = driver[STABLE].mean(0)
    moved = (_jaw_dropped(driver, 0.12) - centre) @ r.T + centre
    gaps = {}
    for follow in (False, True):
        renderer = PreviewRenderer(load_reference(str(data_file("reference", "fp_case3.png"))), smoothing=False,
                                   follow_head=follow)
        renderer.close()
        renderer.transfer(driver, 0.0)
        target = renderer.transfer(moved, 0.04)
        gaps[follow] = mouth_opening(target)
        if follow:
            assert np.allclose(renderer.head_rotation, r, atol=1e-6)
            assert np.abs(target[STABLE] - renderer._ref_z[STABLE]).max() > 5.0, "the turn did not move the skull"
        else:
            assert np.array_equal(renderer.head_rotation, np.eye(3))
            assert np.abs(target[STABLE] - renderer._ref_z[STABLE]).max() < 1e-6
    base = mouth_opening(renderer._ref_z)
    assert gaps[False] - base > 0.05 and gaps[False] == pytest.approx(gaps[True], abs=0.02)
