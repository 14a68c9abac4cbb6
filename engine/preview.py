"""The no-weights `preview` renderer: mediapipe face-mesh motion transfer + piecewise-affine warp of the reference.

    ref = load_reference(path_or_None)                      # (H, W, 3) uint8 RGB; None -> bundled portrait
    r = PreviewRenderer(ref, width=512, height=512).start()
    r.push(frame_rgb, pts); r.pull() -> ((512, 512, 3) uint8 RGB, pts) | None

Per driving frame:
  1. face mesh (478 landmarks, video mode so it tracks) on the driving frame;
  2. a 3-D rotation, scale and shift fitted on stable points with the face mesh's depths (eye corners, nose bridge,
     forehead; engine/head_pose.py) separates the head's rigid motion from the expression; the expression is the
     residual of every landmark, with that motion undone, relative to the driver's neutral frame (the first frame
     with a face, replaced by a more neutral one seen with the head turned the same way), in the driver's
     normalised face frame (origin between the eyes, x along the eye line, unit = inter-ocular distance); the lids
     open in proportion (a blink for a blink), the lips by the driver's gap over its most closed mouth;
  3. the same deltas, in the reference's normalised face frame, move the reference landmarks; the portrait is then
     turned by the driver's rotation about its own skull centre with its own depths, scaled and shifted (the shift
     and scale eased so the face stays in its frame), all measured from the first neutral face (a re-taken neutral
     changes what the expression is measured against, not the head pose's zero); the irises sit between the eye
     corners as far along as the driver's do in the image, less the slide that the head's turn alone gives an eye
     fixed in the driver's head, plus the slide it gives the portrait's (engine/preview_iris.py); a reference
     smiling with parted lips gets its lower lip moved up by the difference to the driver's neutral gap, so its lips
     close when the driver's do;
  4. the reference is warped with one cv2.remap. The backward map is built per frame at half resolution and
     upsampled: inside the face, piecewise-affine from the reference mesh onto the target mesh (triangles drawn far
     to near by the reference's depth, so the folds of a three-quarter face keep its visible side on top); the eye
     slits move rigidly with their corners, so closing lids cover the eye instead of squashing it into a grey
     line; outside the face, a smooth displacement field interpolated from the face outline that fades to zero
     away from it (the background never tears); the two maps are blended over a feathered band inside the
     outline. The irises move inside the eye openings by the driver's gaze (iris landmarks 468-477 relative to the
     eye corners; engine/preview_iris.py). The opened part of the mouth is painted (engine/mouth_paint.py): a dark
     cavity, tongue, teeth.
A one-euro filter on the target landmarks removes the face mesh's frame-to-frame jitter without lagging real motion.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from engine.base import ThreadedRenderer
from engine.head_pose import fit_rigid, turn
from engine.lid_paint import hidden_lid, paint_lid
from engine.mouth_paint import fill_mouth
from engine.preview_iris import IRISES, eyeball_ratio, move_iris
from engine.face_mesh import (EYE_PAIRS, INNER_LIP_LOWER, INNER_LIP_UPPER, LEFT_BROW_LOWER, LEFT_EYE_LOWER,
                              LEFT_EYE_OUTER, LEFT_EYE_UPPER, LEFT_LID_RING, LEFT_LOWER_RING, N_MESH, NOSE,
                              RIGHT_BROW_LOWER, RIGHT_EYE_LOWER, RIGHT_EYE_OUTER, RIGHT_EYE_UPPER, RIGHT_LID_RING,
                              RIGHT_LOWER_RING, STABLE, OneEuroFilter, complex_points, detect_landmarks, eye_opening,
                              face_frame, landmarks_from, mouth_opening, mp_face_mesh, no_crossing, outline_loop,
                              strip_triangles, tesselation_triangles)

DEFAULT_REFERENCE = Path(__file__).resolve().parent / "assets" / "portrait.jpg"

NEUTRAL_SLACK = 0.03  # a face whose mouth is this much more closed (inter-ocular units) becomes the new neutral
NEUTRAL_POSE = 0.05  # ...if its head pose (nose relative to the eyes, inter-ocular units) is this close to the old
# The face mesh's inner-lip gap (inter-ocular units) of a closed mouth, until the driver shows one. Closed mouths
# read 0.000-0.0025 on the nine driving videos that show one; at 0.02, a driver first seen mid-word whose lips then
# parted by less than that kept the portrait's mouth shut (lp_s20's first third). Not lower: on a driver who never
# closes (lp_s29) a wider-opened portrait mouth read worse (fp_case2: 0.83-0.84 at 0.01, 0.80-0.82 at 0-0.005).
SHUT_GAP = 0.01
LIP_CLOSE_MIN = 0.008  # a reference whose lips part more than the driver's neutral by this much gets them closed
TRAVEL = 0.35  # the head's shift (inter-ocular distances) eases off towards this: the face stays in the frame
ZOOM = 0.25  # ...and its log-scale change towards this (x1.28 at most: a driver walking up to the camera)
BACKGROUND_REACH = 1.0  # the displacement outside the face fades over this many inter-ocular distances
FEATHER = 0.04  # width of the face/background blend band inside the outline, in inter-ocular distances
SHUT_PX = 3.0  # a slit (eye, mouth) narrower than this many output pixels gets an exact map (see _exact_map)


def load_reference(path: str | None) -> np.ndarray:
    """Read a reference portrait as (H, W, 3) uint8 RGB; None gives the bundled portrait.

    Raises ValueError with one sentence naming the fix when the file is missing, is not an image, or has no face.
    """
    path = str(DEFAULT_REFERENCE) if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"reference image {path} does not exist: pass the path of a portrait JPEG or PNG.")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"reference {path} is not a readable image: pass a portrait as a JPEG or PNG file.")
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    if detect_landmarks(rgb) is None:
        raise ValueError(f"no face found in reference {path}: pass a portrait with one clearly visible, "
                         "roughly frontal face.")
    return rgb


def fit_reference(rgb: np.ndarray, width: int, height: int, face_center: np.ndarray | None) -> np.ndarray:
    """Resize the reference to cover (height, width), cropping the overflow around the face centre."""
    h, w = rgb.shape[:2]
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    resized = cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    cx, cy = (face_center * scale) if face_center is not None else (rw / 2, rh / 2)
    x0 = int(np.clip(round(cx - width / 2), 0, rw - width))
    y0 = int(np.clip(round(cy - height / 2), 0, rh - height))
    return np.ascontiguousarray(resized[y0:y0 + height, x0:x0 + width])


def ease_travel(a: float, g: complex) -> tuple[float, complex]:
    """Ease the head's shift g (normalised units) and scale a off towards TRAVEL and 1 +- ZOOM: a driver who moves
    around the camera's frame (or whose camera pans) by an inter-ocular distance would push the portrait's face out
    of its frame, and the background field cannot move that far without smearing. Returns (scale, shift)."""
    shift = abs(g)
    if shift > 1e-9:
        g *= TRAVEL * np.tanh(shift / TRAVEL) / shift
    scale = np.log(a)
    return float(np.exp(ZOOM * np.tanh(scale / ZOOM))), g


class PreviewRenderer(ThreadedRenderer):
    """Drives a reference portrait with the face motion of driving frames, on CPU, with no model weights.

    In:  process(frame_rgb (H, W, 3) uint8, pts)   any driving frame size.
    Out: [(frame (height, width, 3) uint8 RGB, pts)]   exactly one output per input.
    stats() adds `face_found` (for the last driving frame) and `faces_missed` (driving frames without a face).
    """

    name = "preview"

    def __init__(self, reference_rgb: np.ndarray, width: int = 512, height: int = 512, input_queue: int = 4,
                 map_scale: float = 0.5, expression_gain: float = 1.0, smoothing: bool = True,
                 follow_head: bool = True):
        super().__init__(input_queue=input_queue)
        self.width, self.height = int(width), int(height)
        self.expression_gain = float(expression_gain)
        # follow_head=False: the portrait's head keeps its own pose (it still moves and scales with the driver's
        # face); only the expression moves it. The motion bench renders so to see what the face mesh reads as head
        # motion on a head that does not turn.
        self.follow_head = bool(follow_head)
        self.head_rotation = np.eye(3)  # the rotation the last frame turned the portrait's head by (image axes)
        first = detect_landmarks(reference_rgb)
        if first is None:
            raise ValueError("no face found in the reference image: pass a portrait with one clearly visible, "
                             "roughly frontal face.")
        self.reference = fit_reference(reference_rgb, self.width, self.height, first[:N_MESH].mean(0))
        ref_pts = detect_landmarks(self.reference, depth=True)
        if ref_pts is None:
            raise ValueError("the face is cut off once the reference is cropped to the output size: pass a portrait "
                             "with the face nearer the centre.")
        ref_depth, ref_pts = ref_pts[:, 2], ref_pts[:, :2]
        self._ref_depth = ref_depth
        self._ref3 = np.concatenate([ref_pts, ref_depth[:, None]], 1)  # (478, 3) x, y, depth
        self._ref_pivot = np.concatenate([ref_pts[STABLE].mean(0), [ref_depth[STABLE].mean()]])  # head turns here
        self._ref_z = complex_points(ref_pts)
        self._ref_origin, self._ref_axis = face_frame(self._ref_z)
        self._ref_q = (self._ref_z - self._ref_origin) / self._ref_axis  # reference landmarks, normalised

        # Warp mesh: the 468 face vertices. The mouth and eye slits (holes in the tesselation) are strips drawn first,
        # then the tesselation far to near by the reference's depth: where a three-quarter face folds (the far
        # cheek's outline projects onto the visible cheek), the near surface is drawn last and wins.
        tess = tesselation_triangles()
        tess = tess[np.argsort(-ref_depth[tess].mean(1), kind="stable")]
        strips = [strip_triangles(INNER_LIP_UPPER, INNER_LIP_LOWER), strip_triangles(RIGHT_EYE_UPPER, RIGHT_EYE_LOWER),
                  strip_triangles(LEFT_EYE_UPPER, LEFT_EYE_LOWER)]
        self._tris = np.concatenate([*strips, tess])
        n_lip, n_eye = len(strips[0]), len(strips[1])
        # Each eye strip moves rigidly with its corners (rows of _tris, corners, lid pair).
        self._eyes = [(slice(n_lip, n_lip + n_eye), 33, 133, EYE_PAIRS[0]),
                      (slice(n_lip + n_eye, n_lip + 2 * n_eye), 362, 263, EYE_PAIRS[1])]
        self._lip_upper, self._lip_lower = np.array(INNER_LIP_UPPER), np.array(INNER_LIP_LOWER)
        self._eye_chains = [(np.array(u[1:-1]), np.array(lo[1:-1])) for u, lo in
                            ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER))]
        self._lid_rings = [np.array(RIGHT_LID_RING), np.array(LEFT_LID_RING)]
        self._under_rings = [np.array(RIGHT_LOWER_RING), np.array(LEFT_LOWER_RING)]  # below the lower lids
        self._slits = [(np.array(u + lo[::-1][1:-1]), np.array(u[1:-1]), np.array(lo[1:-1])) for u, lo in
                       ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER),
                        (INNER_LIP_UPPER, INNER_LIP_LOWER))]  # (outline, upper chain, lower chain) of eyes, mouth
        # The face mesh puts the lid points a little inside the visible eye, so a strip of iris and white belongs to
        # the upper lid's triangles and would ride down with a closing lid (an eye that never looks shut). The
        # modelled upper lid sits higher, in the reference mesh and in every target alike: up to 35 % of the
        # opening, at most half of the lash band above. The lower lid points sit on the eye white too: the modelled
        # lower lid sits up to 30 % of the opening lower, at most 40 % of the band below (at 12 % a shut eye kept a
        # line of white under its lashes, which the face mesh read as a half-open eye; motion_transfer.json's eye
        # cells 0.81-0.83 -> 0.84-0.85).
        self._lid_margin = np.zeros(len(self._ref_q), complex)  # normalised offsets of the modelled lids
        for (upper, lower), ring, under in zip(self._eye_chains, self._lid_rings, self._under_rings):
            gap = (self._ref_q[lower] - self._ref_q[upper]).imag
            room = (self._ref_q[upper] - self._ref_q[ring]).imag
            below = (self._ref_q[under] - self._ref_q[lower]).imag
            self._lid_margin[upper] = -1j * np.clip(np.minimum(0.35 * gap, 0.5 * room), 0.0, None)
            self._lid_margin[lower] = 1j * np.clip(np.minimum(0.3 * gap, 0.4 * below), 0.0, None)
        self._src_z = self._ref_z + self._ref_axis * self._lid_margin  # the warp mesh's source points
        # An eye whose lid hides under hair: its lash band is hair, which stays put while the lid, painted with the
        # skin under the eye, closes from under it (engine/lid_paint.py).
        self._lid_paint = [hidden_lid(self.reference, self._ref_z, ring, np.array(brow), lower, under, (ia, ib))
                           for ring, brow, (_, lower), under, (_, ia, ib, _) in zip(
                               self._lid_rings, (RIGHT_BROW_LOWER, LEFT_BROW_LOWER), self._eye_chains,
                               self._under_rings, self._eyes)]
        self._lash_follow = [0.9 if c is None else 0.0 for c in self._lid_paint]
        self._upper_full = [np.array(RIGHT_EYE_UPPER), np.array(LEFT_EYE_UPPER)]
        self._src = np.stack([self._src_z.real, self._src_z.imag], 1)[:N_MESH]  # (V, 2) source vertices
        self._oval = outline_loop()
        # Lip closing: each point below the lips follows the nearest inner lower-lip point, fading with distance.
        lower = self._lip_lower[1:-1]
        q = self._ref_q
        dist = np.abs(q[:, None] - q[lower][None, :])  # (478, 9)
        self._close_idx = np.argmin(dist, 1)
        below = q.imag >= q[lower][self._close_idx].imag - 0.005
        self._close_w = np.where(below, np.exp(-(dist.min(1) / 0.2) ** 2), 0.0)
        self._close_w[self._lip_upper] = 0.0
        self._closure = np.zeros(len(q))  # upward shift (normalised units) of each point; set per neutral face
        self._eye_ratio = np.ones(2)  # the driver's eye opening relative to its open eyes, per eye

        # Backward map grid at map_scale resolution, in output pixel units; a coarser one for the background field.
        self.map_scale = float(map_scale)
        mw, mh = max(8, round(self.width * map_scale)), max(8, round(self.height * map_scale))
        self._map_size = (mw, mh)
        self._grid_x = ((np.arange(mw, dtype=np.float32) + 0.5) * (self.width / mw) - 0.5)[None, :]
        self._grid_y = ((np.arange(mh, dtype=np.float32) + 0.5) * (self.height / mh) - 0.5)[:, None]
        self._ids = np.zeros((mh, mw), np.int32)
        self._map_x = np.empty((mh, mw), np.float32)
        self._map_y = np.empty((mh, mw), np.float32)
        self._full_x = np.empty((self.height, self.width), np.float32)
        self._full_y = np.empty((self.height, self.width), np.float32)
        self._coef = np.empty((mh, mw, 6), np.float32)
        self._identity = np.array([[1, 0, 0, 0, 1, 0]], np.float32)  # the coefficients of "not the face"
        lw, lh = max(8, mw // 4), max(8, mh // 4)
        self._field_size = (lw, lh)
        gx = (np.arange(lw) + 0.5) * (self.width / lw) - 0.5
        gy = (np.arange(lh) + 0.5) * (self.height / lh) - 0.5
        self._field_grid = (gx[None, :] + 1j * gy[:, None]).ravel()  # (lh*lw,) complex output positions
        # The field is zero at the frame's edges: nothing is pulled in from beyond them (no smeared border).
        edge = np.minimum(np.minimum(gx[None, :], self.width - 1 - gx[None, :]),
                          np.minimum(gy[:, None], self.height - 1 - gy[:, None]))
        self._edge_fade = np.clip(edge / (0.08 * max(self.width, self.height)), 0, 1).ravel()

        self._mesh = mp_face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True,
                                         min_detection_confidence=0.5, min_tracking_confidence=0.5)
        self._neutral: tuple | None = None  # (neutral landmarks z, face-frame origin, axis)
        # (landmarks (478, 3), inter-ocular distance) of the first neutral face since the start or reset_neutral: the
        # head pose's zero. The neutral may be re-taken later with the head turned a little (see _update_neutral).
        self._pose_origin: tuple | None = None
        self._mouth_shut: np.ndarray | None = None  # inner-lip gaps of the driver's most closed mouth so far
        self._eyes_open: np.ndarray | None = None  # lid gaps (per eye) of the driver's open eyes
        self._filter = OneEuroFilter() if smoothing else None
        self._last_pts: float | None = None
        self._last = self.reference.copy()
        self.face_found = False
        self.faces_missed = 0

    # --- the ThreadedRenderer hook --------------------------------------------------------------------------------
    def process(self, frame_rgb: np.ndarray, pts: float) -> list:
        target = self.drive(frame_rgb, pts)
        if target is None:
            return [(self._last.copy(), pts)]
        out = self.warp(target)  # a fresh array each frame, never written again: safe to hand out and keep
        self._last = out
        return [(out, pts)]

    def stats(self) -> dict:
        stats = super().stats()
        stats.update(face_found=self.face_found, faces_missed=self.faces_missed)
        return stats

    def close(self) -> None:
        """Stop the worker thread and free the face-mesh graph; safe to call more than once."""
        super().close()
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def reset_neutral(self) -> None:
        """Take the next driving frame with a face as the new neutral (zero-expression) pose and head pose: the
        user re-centres the avatar, so unlike the renderer's own re-takes of the neutral face, this one moves the
        head pose's origin too."""
        self._neutral = None
        self._pose_origin = None
        self._closure = np.zeros(len(self._ref_q))
        if self._filter is not None:
            self._filter.reset()

    # --- steps ----------------------------------------------------------------------------------------------------
    def drive(self, frame_rgb: np.ndarray, pts: float | None = None) -> np.ndarray | None:
        """Target positions (478,) complex of the reference landmarks for this driving frame; None if no face.

        pts (seconds) paces the jitter filter; without it frames are taken as 1/25 s apart.
        """
        h, w = frame_rgb.shape[:2]
        small = frame_rgb
        if max(h, w) > 640:  # the mesh model sees 192x192 anyway; converting a full-HD frame costs more than it
            f = 640 / max(h, w)
            small = cv2.resize(frame_rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        landmarks = landmarks_from(self._mesh.process(small), w, h, depth=True)  # (478, 3)
        self.face_found = landmarks is not None
        if landmarks is None:
            self.faces_missed += 1
            return None
        return self.transfer(landmarks, pts)

    def transfer(self, landmarks: np.ndarray, pts: float | None = None) -> np.ndarray:
        """Target positions (478,) complex of the reference landmarks for the driver's landmarks (478, 3): pixel x,
        y and the face mesh's depth z. The first call (or the first after reset_neutral) sets the neutral face."""
        z = complex_points(landmarks)
        self._update_neutral(z, landmarks)
        z0, origin, axis = self._neutral

        # Rigid head motion neutral -> now in 3-D.
        p0 = self._neutral_p3
        s, r, shift = fit_rigid(p0[STABLE], landmarks[STABLE])
        # The avatar's head follows the motion from the first neutral face instead: a neutral re-taken with the head
        # turned (lp_d3's at frame 43: 3 degrees of pitch, 2 of roll) would make that turn the new zero, and the
        # avatar's head would snap back by it and stay off for the rest of the clip. The expression stays measured
        # against the current neutral (s, r above), whose face is the more neutral one.
        p_origin, iod_origin = self._pose_origin
        s_head, r_head, shift_head = (s, r, shift) if p_origin is p0 else fit_rigid(p_origin[STABLE],
                                                                                      landmarks[STABLE])
        if not self.follow_head:
            r_head = np.eye(3)
        self.head_rotation = r_head
        q_neutral = (z0 - origin) / axis
        # The expression: each landmark's offset from where the neutral face, moved by that motion, would put it
        # (the neutral's depths, not this frame's: a point's depth is the face mesh's least steady output, and
        # undoing a turn of the current points would carry its jitter into the expression), turned back into the
        # neutral face's frame.
        moved0 = s * (p0 - p0[STABLE].mean(0)) @ r.T + landmarks[STABLE].mean(0)
        roll = np.exp(-1j * np.arctan2(r[1, 0], r[0, 0]))
        q_now = q_neutral + (z - complex_points(moved0)) * roll / (s * axis)  # normalised, head motion removed
        delta = self.expression_gain * (q_now - q_neutral)
        delta[STABLE] = 0.0  # bone (nose bridge, forehead, temples, eye corners): what is left there after the fit
        # is the mesh's error, mostly cross-talk from the jaw, which the warp would show as a turn of the head
        # The lower nose likewise: what the mesh moves there is mostly its own error following the head's turn (a
        # linear fit on roll, yaw and pitch explains 40-67 % of it on the drivers who turn their heads), and the
        # portrait's nose bent by it read as a nod (pitch lp_d6 -> lp_s7 0.84 -> 0.88, lp_d12 -> fp_case2 0.84 -> 0.87).
        delta[NOSE] = 0.0
        q_pre = self._open_eyes(self._ref_q + delta - 1j * self._closure, q_now)
        # The same motion on the portrait: turned about its skull centre with its own depths, then scaled and shifted
        # (in inter-ocular distances, eased so the face stays in the frame).
        zz = self._ref_origin + self._ref_axis * q_pre
        turned = turn(np.stack([zz.real, zz.imag, self._ref_depth], 1), r_head, self._ref_pivot)
        scale, g = ease_travel(s_head, complex(shift_head[0], shift_head[1]) / iod_origin)
        pivot = complex(self._ref_pivot[0], self._ref_pivot[1])
        moved = pivot + scale * (complex_points(turned) - pivot) + g * abs(self._ref_axis)
        # Gaze: the driver's iris shift between its eye corners in the image, less what the head's turn alone moves
        # it by (an eyeball turning with the head: the iris sits in front of the corners), on the portrait's eye as
        # the same turn shows it (engine/preview_iris.py).
        for iris in IRISES:
            c, ia, ib, _ = iris
            shift = (z[c] - z[ia]) / (z[ib] - z[ia]) - eyeball_ratio(p0, r, iris)
            moved[c] = moved[ia] + (moved[ib] - moved[ia]) * (eyeball_ratio(self._ref3, r_head, iris) + shift)
        q_target = (moved - self._ref_origin) / self._ref_axis
        dt = 1 / 25 if pts is None or self._last_pts is None or pts <= self._last_pts else pts - self._last_pts
        self._last_pts = pts
        if self._filter is not None:
            q_target = self._filter(q_target, dt)
        q_target = no_crossing(q_target)
        return self._ref_origin + self._ref_axis * q_target

    def _open_eyes(self, q: np.ndarray, q_now: np.ndarray) -> np.ndarray:
        """Set each eye's lid gap to the reference's gap times the driver's opening relative to its open eyes.

        Adding the driver's lid motion as it is would close a narrower reference eye past shut before the driver's
        blink is over (and stop there) and open it too little: the ratio gives a blink for a blink. q: the target
        landmarks before the head motion, normalised (y down the face); a changed copy is returned.
        """
        q = q.copy()
        for e, ((upper, lower), open_gap, ring) in enumerate(zip(self._eye_chains, self._eyes_open,
                                                                   self._lid_rings)):
            ratio = float(np.clip((q_now[lower] - q_now[upper]).imag.sum() / max(open_gap, 1e-3), 0.0, 2.0))
            self._eye_ratio[e] = ratio
            top, bottom = q[upper] + self._lid_margin[upper], q[lower] + self._lid_margin[lower]  # modelled lids
            modelled = self._ref_q + self._lid_margin
            gap = (modelled[lower] - modelled[upper]).imag * ratio
            mid = (top + bottom) / 2
            moved = mid - 0.5j * gap
            # The lash band above the lid moves with it (the skin above it stretches instead): a closed eye shows a
            # thin lash line, not the band stretched into a dark smear.
            q[ring] += self._lash_follow[e] * (moved - top)
            q[upper], q[lower] = moved, mid + 0.5j * gap
        return q

    def _gaps(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inner-lip gaps (9,), lid gaps per eye (2,)) of normalised landmarks q, along the face's y axis."""
        upper, lower = self._lip_upper[1:-1], self._lip_lower[1:-1]
        lips = (q[lower] - q[upper]).imag
        eyes = np.array([(q[lo] - q[up]).imag.sum() for up, lo in self._eye_chains])
        return lips, eyes

    def _update_neutral(self, z: np.ndarray, p3: np.ndarray) -> None:
        """Keep the driver's neutral face: the first face seen, replaced by a more neutral one (mouth more closed,
        or eyes open where the neutral frame caught a blink) as long as the head is still turned about the same
        way. The first face is often mid-word or mid-blink; measured against it, a closed mouth would squeeze the
        portrait's lips shut past closed. A more neutral face with the head turned elsewhere would carry that turn
        into the neutral (and drop it from the avatar): then only its lip and lid gaps become the references the
        mouth and the eyes are measured against."""
        origin, axis = face_frame(z)
        q = (z - origin) / axis
        lips, eyes = self._gaps(q)
        if self._neutral is None:
            self._set_neutral(z, p3, lips, eyes)
            return
        z0, origin0, axis0 = self._neutral
        opened = self._eyes_open.mean() < 0.5 * eyes.mean() and eye_opening(q) > NEUTRAL_SLACK
        if (lips.mean() < self._neutral_lips.mean() - NEUTRAL_SLACK or opened) and \
                abs((z[4] - origin) / axis - (z0[4] - origin0) / axis0) < NEUTRAL_POSE:
            self._set_neutral(z, p3, lips, eyes)
            return
        shut = lips.mean() < self._mouth_shut.mean() - 0.25 * NEUTRAL_SLACK
        if shut:
            self._mouth_shut = lips
        if opened:
            self._eyes_open = eyes
        if shut or opened:
            self._closure = self._lip_closure()

    def _set_neutral(self, z: np.ndarray, p3: np.ndarray, lips: np.ndarray, eyes: np.ndarray) -> None:
        self._neutral = (z, *face_frame(z))
        self._neutral_p3 = p3  # (478, 3) the same landmarks with their depths
        first = self._pose_origin is None
        if first:  # the first neutral face stays the head pose's zero (see transfer)
            self._pose_origin = (p3, abs(self._neutral[2]))
        self._neutral_lips = lips
        # A first face caught mid-word: its lips count as parted from the start, not only once the driver shows a
        # closed mouth (the avatar would keep its mouth shut while the driver keeps talking).
        self._mouth_shut = np.minimum(lips, SHUT_GAP)
        # A re-take is for a more closed mouth; the eyes may be squinting or looking down then (lp_d3 at frame 43:
        # lids at a third of its first face's): taken as the open eyes, every later opening read up to twice the
        # reference's and the portrait stared wide-eyed through the driver's squint (lp_d3's eye cells 0.82-0.90).
        # So a re-take only ever widens the open-eye reference; the first neutral (or reset_neutral) sets it.
        self._eyes_open = eyes if first else np.maximum(self._eyes_open, eyes)
        self._closure = self._lip_closure()
        if self._filter is not None:
            self._filter.reset()

    def _lip_closure(self) -> np.ndarray:
        """(478,) upward shift of the points below the lips that makes the portrait's mouth as closed as the
        driver's is at its most closed (`_mouth_shut`), while the expression is measured against the neutral face.

        Two cases meet here: a reference smiling with parted lips would otherwise keep them parted while the
        driver's are shut (the expression moves the reference by the driver's change from its neutral face, never
        to an absolute gap), and a neutral face caught mid-word would otherwise close the lips past shut.
        """
        upper, lower = self._lip_upper[1:-1], self._lip_lower[1:-1]
        ref_gap = (self._ref_q[lower] - self._ref_q[upper]).imag
        shut = np.maximum(self._mouth_shut, 0.0)
        close = np.clip(ref_gap - shut, 0.0, None)
        if close.max() < LIP_CLOSE_MIN:
            close = np.zeros_like(close)
        close = close + self._mouth_shut - self._neutral_lips  # <= 0: the neutral face's lips were parted wider
        if np.abs(close).max() < 1e-6:
            return np.zeros(len(self._ref_q))
        return close[self._close_idx] * self._close_w

    def warp(self, target: np.ndarray) -> np.ndarray:
        """Warp the reference so its landmarks land on `target` (478,) complex; (height, width, 3) uint8 RGB."""
        tgt = np.stack([target[:N_MESH].real, target[:N_MESH].imag], 1)
        src = self._src
        tris = self._tris
        t0, t1, t2 = tgt[tris[:, 0]], tgt[tris[:, 1]], tgt[tris[:, 2]]
        s0, s1, s2 = src[tris[:, 0]], src[tris[:, 1]], src[tris[:, 2]]
        # The eye slits move rigidly with their corners (the lids cover the eye as they close), stretching only
        # across the eye when it opens wider than the reference's.
        stretch, lids_open = [], []
        for rows, ia, ib, (iu, il) in self._eyes:
            at, bt, as_, bs = target[ia], target[ib], self._ref_z[ia], self._ref_z[ib]
            et, es = bt - at, bs - as_
            k = max(1.0, (abs(target[il] - target[iu]) / abs(et)) /
                    max(abs(self._src_z[il] - self._src_z[iu]) / abs(es), 1e-3))
            stretch.append(k)
            lids_open.append((at, et / es))  # the eye's rigid motion: a portrait point p goes to at + (p - as) et/es
            for dst, pt in ((t0, at), (t1, bt), (t2, at + 1j * et), (s0, as_), (s1, bs), (s2, as_ + 1j * es / k)):
                dst[rows] = (pt.real, pt.imag)

        # Per-triangle affine target -> source: p -> S0 + F E^-1 (p - T0).
        e1, e2, f1, f2 = t1 - t0, t2 - t0, s1 - s0, s2 - s0
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        src_det = f1[:, 0] * f2[:, 1] - f1[:, 1] * f2[:, 0]
        # A triangle squeezed to a sliver would magnify its source enormously, and the pixels rasterised along its
        # edges (just outside it) would sample far away: such a triangle takes one colour, that of its first vertex
        # (for a closing mouth strip, the upper lip's inner edge: the lips meet on their own colour).
        ok = np.abs(det) > np.maximum(np.abs(src_det) / 16, 1e-6)
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        # E^-1 = [[e2y, -e2x], [-e1y, e1x]] / det ; A = [f1 f2] E^-1 (columns f1, f2)
        a00 = (f1[:, 0] * e2[:, 1] - f2[:, 0] * e1[:, 1]) * inv
        a01 = (-f1[:, 0] * e2[:, 0] + f2[:, 0] * e1[:, 0]) * inv
        a10 = (f1[:, 1] * e2[:, 1] - f2[:, 1] * e1[:, 1]) * inv
        a11 = (-f1[:, 1] * e2[:, 0] + f2[:, 1] * e1[:, 0]) * inv
        b0 = np.where(ok, s0[:, 0] - a00 * t0[:, 0] - a01 * t0[:, 1], s0[:, 0])
        b1 = np.where(ok, s0[:, 1] - a10 * t0[:, 0] - a11 * t0[:, 1], s0[:, 1])
        coef = np.concatenate([np.stack([a00, a01, b0, a10, a11, b1], 1).astype(np.float32), self._identity])

        # Rasterise triangle ids of the target mesh at map resolution (later triangles win); the rest is background.
        mw, mh = self._map_size
        n = len(tris)
        poly = np.round((tgt[tris] + 0.5) * (mw / self.width * 16, mh / self.height * 16) - 8).astype(np.int32)
        ids = self._ids
        ids.fill(n)
        for k, p in enumerate(poly):
            cv2.fillConvexPoly(ids, p, k, cv2.LINE_8, 4)

        c = np.take(coef, ids, axis=0, out=self._coef)  # (mh, mw, 6)
        np.multiply(c[..., 0], self._grid_x, out=self._map_x)
        self._map_x += c[..., 1] * self._grid_y
        self._map_x += c[..., 2]
        np.multiply(c[..., 3], self._grid_x, out=self._map_y)
        self._map_y += c[..., 4] * self._grid_y
        self._map_y += c[..., 5]
        self._blend_background(target, ids != n)
        if (mw, mh) != (self.width, self.height):
            cv2.resize(self._map_x, (self.width, self.height), dst=self._full_x, interpolation=cv2.INTER_LINEAR)
            cv2.resize(self._map_y, (self.width, self.height), dst=self._full_y, interpolation=cv2.INTER_LINEAR)
            map_x, map_y = self._full_x, self._full_y
            for ring, upper, lower in self._slits:  # a closed slit folds the map: exact there, not interpolated
                if np.abs(target[lower] - target[upper]).max() < SHUT_PX:
                    self._exact_map(map_x, map_y, target[ring], tgt, coef)
        else:
            map_x, map_y = self._map_x, self._map_y
        for iris, k, ratio in zip(IRISES, stretch, self._eye_ratio):
            move_iris(map_x, map_y, target, iris, k, ratio, self._ref_z, self._lid_margin, (self.width, self.height))
        out = cv2.remap(self.reference, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        for (_, ia, _, _), (at, rot), chain, lid in zip(self._eyes, lids_open, self._upper_full, self._lid_paint):
            if lid is not None:
                paint_lid(out, self.reference, at + (self._ref_z[chain] - self._ref_z[ia]) * rot, target[chain], lid)
        fill_mouth(out, target[self._lip_upper], target[self._lip_lower], abs(self._ref_axis),
                   mouth_opening((target - self._ref_origin) / self._ref_axis) - mouth_opening(self._ref_q))
        return out

    def _exact_map(self, map_x: np.ndarray, map_y: np.ndarray, outline: np.ndarray, tgt: np.ndarray,
                   coef: np.ndarray) -> None:
        """Recompute the full-resolution map exactly (per pixel, not upsampled) around a slit: a closed eye or mouth
        is a fold of the map (above the line it samples the upper lid, below it the lower one), and interpolating
        across the fold samples what lies between in the reference, the eye's white: a grey line on a shut eye.
        outline: the slit's target points (complex); tgt: (V, 2) target mesh; coef: (K+1, 6) per-triangle maps."""
        pad = 0.6 * (outline.real.max() - outline.real.min()) + 3
        x0, y0 = max(int(outline.real.min() - pad), 0), max(int(outline.imag.min() - pad), 0)
        x1, y1 = min(int(outline.real.max() + pad) + 1, self.width), min(int(outline.imag.max() + pad) + 1, self.height)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        corners = tgt[self._tris]  # (K, 3, 2)
        near = np.nonzero((corners[..., 0].max(1) >= x0) & (corners[..., 0].min(1) <= x1) &
                          (corners[..., 1].max(1) >= y0) & (corners[..., 1].min(1) <= y1))[0]
        ids = np.full((y1 - y0, x1 - x0), -1, np.int32)
        poly = np.round((corners[near] - (x0, y0)) * 16).astype(np.int32)
        for k, p in zip(near, poly):  # in drawing order: later triangles win, as in warp()
            cv2.fillConvexPoly(ids, p, int(k), cv2.LINE_8, 4)
        inside = ids >= 0
        c = coef[ids[inside]]  # (P, 6)
        yy, xx = np.nonzero(inside)
        xx, yy = (xx + x0).astype(np.float32), (yy + y0).astype(np.float32)
        map_x[y0:y1, x0:x1][inside] = c[:, 0] * xx + c[:, 1] * yy + c[:, 2]
        map_y[y0:y1, x0:x1][inside] = c[:, 3] * xx + c[:, 4] * yy + c[:, 5]

    def _blend_background(self, target: np.ndarray, face: np.ndarray) -> None:
        """Outside the face, replace the identity map by a smooth displacement field: the face outline's own
        displacement, interpolated (inverse-distance weights) and fading to zero over BACKGROUND_REACH
        inter-ocular distances, so hair and neck follow the head and the frame's edge stays put. Inside the
        outline the face map is blended into that field over a feathered band: no seam, no tear."""
        mw, mh = self._map_size
        lw, lh = self._field_size
        oval_t = target[self._oval]
        move = oval_t - self._ref_z[self._oval]  # (36,) forward displacement of the outline
        iod = abs(target[LEFT_EYE_OUTER] - target[RIGHT_EYE_OUTER])
        d2 = np.abs(self._field_grid[:, None] - oval_t[None, :]) ** 2 + 1.0
        w = d2 ** -1.5
        field = (w @ move) / w.sum(1)  # (lh*lw,) complex
        small = cv2.resize(face.astype(np.uint8), (lw, lh), interpolation=cv2.INTER_NEAREST)
        outside = cv2.distanceTransform(1 - small, cv2.DIST_L2, 3).ravel() * (self.width / lw)
        field *= np.exp(-(outside / (BACKGROUND_REACH * iod)) ** 2) * self._edge_fade
        fx = cv2.resize(field.real.reshape(lh, lw).astype(np.float32), (mw, mh), interpolation=cv2.INTER_LINEAR)
        fy = cv2.resize(field.imag.reshape(lh, lw).astype(np.float32), (mw, mh), interpolation=cv2.INTER_LINEAR)
        fx -= self._grid_x  # the background map: p - displacement
        fy -= self._grid_y
        fx *= -1
        fy *= -1
        sigma = max(FEATHER * iod * mw / self.width / 2, 0.5)
        alpha = cv2.GaussianBlur(face.astype(np.float32), (0, 0), sigma)
        np.clip(alpha * 2 - 1, 0, 1, out=alpha)
        self._map_x -= fx
        self._map_x *= alpha
        self._map_x += fx
        self._map_y -= fy
        self._map_y *= alpha
        self._map_y += fy
