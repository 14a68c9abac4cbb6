"""The no-weights `preview` renderer: mediapipe face-mesh motion transfer + piecewise-affine warp of the reference.

    ref = load_reference(path_or_None)                      # (H, W, 3) uint8 RGB; None -> bundled portrait
    r = PreviewRenderer(ref, width=512, height=512).start()
    r.push(frame_rgb, pts); r.pull() -> ((512, 512, 3) uint8 RGB, pts) | None

Per driving frame:
  1. face mesh (478 landmarks, video mode so it tracks) on the driving frame;
  2. a similarity fitted on stable points (eye corners, nose bridge, forehead) separates the head's rigid motion
     from the expression; the expression is the residual of every landmark relative to the driver's neutral frame
     (the first frame with a face), in the driver's normalised face frame (origin between the eyes, x along the eye
     line, unit = inter-ocular distance);
  3. the same deltas and the same rigid motion, expressed in the reference's normalised face frame, move the
     reference landmarks to their target positions; border points stay fixed so the background stays put;
  4. the reference is warped piecewise-affine from its own mesh onto the target mesh with one cv2.remap: the
     backward map is built per frame from per-triangle affine transforms, rasterised (triangle ids) at half
     resolution and upsampled; the opened part of the mouth is painted as a dark interior with upper teeth.
A one-euro filter on the target landmarks removes the face mesh's frame-to-frame jitter without lagging real motion.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import mediapipe as mp
import numpy as np

from engine.base import ThreadedRenderer

DEFAULT_REFERENCE = Path(__file__).resolve().parent / "assets" / "portrait.jpg"

_face_mesh = mp.solutions.face_mesh

# Landmark indices of mediapipe's canonical face mesh (478 points with refine_landmarks).
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
# Points that move with the skull but barely with expression: eye corners, nose bridge and tip, forehead, temples.
STABLE = np.array([33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 10, 151, 9, 234, 454])
# Inner lip contour, upper chain and lower chain, each from the right mouth corner (78) to the left one (308).
INNER_LIP_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
INNER_LIP_LOWER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
# Lip pairs across the mouth gap, for the mouth-opening measure.
LIP_PAIRS = np.array([[82, 87], [13, 14], [312, 317]])
# Lid pairs across each eye, for the eye-opening measure.
EYE_PAIRS = np.array([[159, 145], [386, 374]])
# Eye contours (upper chain, lower chain), corner to corner.
RIGHT_EYE_UPPER = [33, 246, 161, 160, 159, 158, 157, 173, 133]
RIGHT_EYE_LOWER = [33, 7, 163, 144, 145, 153, 154, 155, 133]
LEFT_EYE_UPPER = [362, 398, 384, 385, 386, 387, 388, 466, 263]
LEFT_EYE_LOWER = [362, 382, 381, 380, 374, 373, 390, 249, 263]
N_MESH = 468  # the warp mesh leaves out the 10 iris points: they are not part of the tesselation

MOUTH_COLOUR = np.array([52, 18, 22], np.float32)  # RGB of the dark inner mouth
TEETH_COLOUR = np.array([200, 190, 176], np.float32)  # RGB of the upper-teeth band
TEETH_DEPTH = 0.3  # the teeth band covers this fraction of the lip gap, from the upper lip down...
TEETH_MAX = 0.05  # ...but no more than this many inter-ocular distances
NEUTRAL_SLACK = 0.03  # a face whose mouth is this much more closed (inter-ocular units) becomes the new neutral
MOUTH_FULL_OPEN = 0.04  # lip gap increase (in inter-ocular distances) at which the dark fill is fully opaque


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


def detect_landmarks(rgb: np.ndarray) -> np.ndarray | None:
    """Landmarks of the most prominent face in a still image: (478, 2) float64 pixel (x, y), or None."""
    with _face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                             min_detection_confidence=0.5) as mesh:
        return _landmarks(mesh.process(rgb), rgb.shape[1], rgb.shape[0])


def _landmarks(result, width: int, height: int) -> np.ndarray | None:
    if not result.multi_face_landmarks:
        return None
    pts = np.array([(p.x, p.y) for p in result.multi_face_landmarks[0].landmark], np.float64)
    return pts * (width, height)


# --- face-frame geometry (points as complex numbers: a similarity is z -> a*z + b) -----------------------------------
def _complex(pts: np.ndarray) -> np.ndarray:
    return pts[:, 0] + 1j * pts[:, 1]


def _face_frame(z: np.ndarray) -> tuple[complex, complex]:
    """(origin, axis) of a face's normalised frame: origin between the outer eye corners, axis = eye vector.

    normalised = (z - origin) / axis: x runs along the eye line, one unit is the inter-ocular distance.
    """
    return (z[RIGHT_EYE_OUTER] + z[LEFT_EYE_OUTER]) / 2, z[LEFT_EYE_OUTER] - z[RIGHT_EYE_OUTER]


def _fit_similarity(src: np.ndarray, dst: np.ndarray) -> tuple[complex, complex]:
    """Least-squares similarity dst ~ a*src + b for complex point sets (no reflection)."""
    ms, md = src.mean(), dst.mean()
    s, d = src - ms, dst - md
    a = np.vdot(s, d) / max(np.vdot(s, s).real, 1e-12)
    return a, md - a * ms


def _eye_opening(q: np.ndarray) -> float:
    """Mean lid gap of both eyes of normalised complex landmarks q (in inter-ocular distances)."""
    return float(np.abs(q[EYE_PAIRS[:, 1]] - q[EYE_PAIRS[:, 0]]).mean())


def _mouth_opening(q: np.ndarray) -> float:
    """Mean lip gap of normalised complex landmarks q (in inter-ocular distances)."""
    return float(np.abs(q[LIP_PAIRS[:, 1]] - q[LIP_PAIRS[:, 0]]).mean())


_SLITS = [(np.array(u[1:-1]), np.array(l[1:-1])) for u, l in
          ((INNER_LIP_UPPER, INNER_LIP_LOWER), (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER))]


def _no_crossing(q: np.ndarray) -> np.ndarray:
    """Meet the lips (eyelids) in the middle where the target would push the lower one above the upper one.

    That happens when the driver's neutral frame had its mouth open and it then closes further than the
    reference's closed mouth; crossing would fold the mesh. q: (478,) complex, normalised (y = down the face).
    """
    for upper, lower in _SLITS:
        crossed = q[lower].imag < q[upper].imag
        if crossed.any():
            q = q.copy()
            mid = (q[upper[crossed]].imag + q[lower[crossed]].imag) / 2
            q[upper[crossed]] = q[upper[crossed]].real + 1j * mid
            q[lower[crossed]] = q[lower[crossed]].real + 1j * mid
    return q


# --- mesh construction ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _tesselation_triangles() -> np.ndarray:
    """(K, 3) vertex triples of mediapipe's face tesselation (it ships as an edge set; faces are its 3-cliques)."""
    nbrs: dict[int, set[int]] = {}
    for a, b in _face_mesh.FACEMESH_TESSELATION:
        nbrs.setdefault(a, set()).add(b)
        nbrs.setdefault(b, set()).add(a)
    tris = {tuple(sorted((a, b, c))) for a, b in _face_mesh.FACEMESH_TESSELATION for c in nbrs[a] & nbrs[b]}
    return np.array(sorted(tris), np.int32)


def _strip_triangles(upper: list[int], lower: list[int]) -> np.ndarray:
    """Triangles spanning a slit (mouth, eye) between two corner-to-corner chains: they stretch as it opens."""
    tris = []
    for i in range(len(upper) - 1):
        a, b, c, d = upper[i], upper[i + 1], lower[i], lower[i + 1]
        if a != c:
            tris.append((a, b, c))
        if b != d:
            tris.append((b, d, c))
    return np.array(tris, np.int32)


def _delaunay(pts: np.ndarray) -> np.ndarray:
    """(K, 3) Delaunay triangles (vertex indices) of 2-D points, via cv2.Subdiv2D."""
    lo, hi = np.floor(pts.min(0)) - 2, np.ceil(pts.max(0)) + 2
    subdiv = cv2.Subdiv2D((int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])))
    index = {}
    for i, (x, y) in enumerate(pts.astype(np.float32)):
        subdiv.insert((float(x), float(y)))
        index.setdefault((float(x), float(y)), i)
    tris = []
    for t in subdiv.getTriangleList().astype(np.float32).reshape(-1, 3, 2):
        ids = [index.get((float(x), float(y))) for x, y in t]
        if None not in ids:  # triangles touching Subdiv2D's virtual outer vertices are not ours
            tris.append(ids)
    return np.array(tris, np.int32)


def _outside(cover: np.ndarray, face: np.ndarray, pts: np.ndarray, width: int, height: int) -> np.ndarray:
    """The triangles of `cover` that reach outside the face layer (the rest are hidden under it: not drawn)."""
    covered = np.zeros((height, width), np.uint8)
    for tri in face:
        cv2.fillConvexPoly(covered, np.round(pts[tri] * 16).astype(np.int32), 1, cv2.LINE_8, shift=4)
    covered = cv2.erode(covered, np.ones((5, 5), np.uint8))  # keep a margin: the face outline moves per frame
    keep = []
    for k, tri in enumerate(cover):
        corners = pts[tri]
        x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
        x1, y1 = np.ceil(corners.max(0)).astype(int) + 1
        own = np.zeros((max(y1 - y0, 1), max(x1 - x0, 1)), np.uint8)
        cv2.fillConvexPoly(own, np.round((corners - (x0, y0)) * 16).astype(np.int32), 1, cv2.LINE_8, shift=4)
        under = covered[y0:y1, x0:x1]
        if under.shape != own.shape or (own > under).any() or not own.any():
            keep.append(k)
    return cover[keep]


def _border_points(width: int, height: int, per_side: int = 6) -> np.ndarray:
    """Fixed points along the frame edge (corners included) that pin the background."""
    t = np.linspace(0.0, 1.0, per_side + 1)[:-1]
    w, h = width - 1.0, height - 1.0
    top = np.stack([t * w, np.zeros_like(t)], 1)
    right = np.stack([np.full_like(t, w), t * h], 1)
    bottom = np.stack([w - t * w, np.full_like(t, h)], 1)
    left = np.stack([np.zeros_like(t), h - t * h], 1)
    return np.concatenate([top, right, bottom, left])


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


class OneEuroFilter:
    """One-euro low-pass filter per landmark (Casiez et al. 2012): smooths the face mesh's jitter when a point is
    still, follows at once when it moves fast, so it adds no lag to real motion.

    Works on (N,) complex points in normalised face units (1 = inter-ocular distance); speed is per point.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 40.0, d_cutoff: float = 4.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None

    @staticmethod
    def _alpha(cutoff, dt: float):
        return 1.0 / (1.0 + 1.0 / (2 * np.pi * cutoff * dt))

    def __call__(self, x: np.ndarray, dt: float) -> np.ndarray:
        if self._x is None:
            self._x, self._dx = x.copy(), np.zeros_like(x)
            return x
        dx = (x - self._x) / dt
        self._dx += self._alpha(self.d_cutoff, dt) * (dx - self._dx)
        a = self._alpha(self.min_cutoff + self.beta * np.abs(self._dx), dt)
        self._x = self._x + a * (x - self._x)
        return self._x


class PreviewRenderer(ThreadedRenderer):
    """Drives a reference portrait with the face motion of driving frames, on CPU, with no model weights.

    In:  process(frame_rgb (H, W, 3) uint8, pts)   any driving frame size.
    Out: [(frame (height, width, 3) uint8 RGB, pts)]   exactly one output per input.
    stats() adds `face_found` (for the last driving frame) and `faces_missed` (driving frames without a face).
    """

    name = "preview"

    def __init__(self, reference_rgb: np.ndarray, width: int = 512, height: int = 512, input_queue: int = 4,
                 map_scale: float = 0.5, expression_gain: float = 1.0, smoothing: bool = True):
        super().__init__(input_queue=input_queue)
        self.width, self.height = int(width), int(height)
        self.expression_gain = float(expression_gain)
        first = detect_landmarks(reference_rgb)
        if first is None:
            raise ValueError("no face found in the reference image: pass a portrait with one clearly visible, "
                             "roughly frontal face.")
        self.reference = fit_reference(reference_rgb, self.width, self.height, first[:N_MESH].mean(0))
        ref_pts = detect_landmarks(self.reference)
        if ref_pts is None:
            raise ValueError("the face is cut off once the reference is cropped to the output size: pass a portrait "
                             "with the face nearer the centre.")
        self._ref_z = _complex(ref_pts)
        self._ref_origin, self._ref_axis = _face_frame(self._ref_z)
        self._ref_q = (self._ref_z - self._ref_origin) / self._ref_axis  # reference landmarks, normalised

        # Warp mesh: 468 face vertices + fixed border points. Two layers, drawn in order so the face wins: a Delaunay
        # cover of the whole frame (background, hair, neck; only its triangles not hidden under the face are kept),
        # then the mouth and eye slits (holes in the tesselation) as strips that stretch when they open, and the
        # face tesselation.
        border = _border_points(self.width, self.height)
        self._src = np.concatenate([ref_pts[:N_MESH], border]).astype(np.float64)  # (V, 2) source vertices
        self._n_border = len(border)
        face = np.concatenate([  # slits first: where a closed slit is a hairline, the lips and lids drawn over it win
            _strip_triangles(INNER_LIP_UPPER, INNER_LIP_LOWER), _strip_triangles(RIGHT_EYE_UPPER, RIGHT_EYE_LOWER),
            _strip_triangles(LEFT_EYE_UPPER, LEFT_EYE_LOWER), _tesselation_triangles()])
        self._tris = np.concatenate([_outside(_delaunay(self._src), face, self._src, self.width, self.height), face])
        self._lip_upper, self._lip_lower = np.array(INNER_LIP_UPPER), np.array(INNER_LIP_LOWER)

        # Backward map grid at map_scale resolution, in output pixel units.
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

        self._mesh = _face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True,
                                         min_detection_confidence=0.5, min_tracking_confidence=0.5)
        self._neutral: tuple | None = None  # (neutral landmarks z, face-frame origin, axis)
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
        """Take the next driving frame with a face as the new neutral (zero-expression) pose."""
        self._neutral = None
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
        landmarks = _landmarks(self._mesh.process(small), w, h)
        self.face_found = landmarks is not None
        if landmarks is None:
            self.faces_missed += 1
            return None
        z = _complex(landmarks)
        if self._neutral is None or self._better_neutral(z):
            self._neutral = (z, *_face_frame(z))
            if self._filter is not None:
                self._filter.reset()
        z0, origin, axis = self._neutral

        # Rigid head motion neutral -> now, and the expression that is left once it is undone.
        a, b = _fit_similarity(z0[STABLE], z[STABLE])
        q_now = ((z - b) / a - origin) / axis  # current landmarks with the head motion removed, normalised
        q_neutral = (z0 - origin) / axis
        delta = self.expression_gain * (q_now - q_neutral)
        # The same rigid motion in normalised coordinates: q -> a*q + g.
        g = (a * origin + b - origin) / axis
        q_target = a * (self._ref_q + delta) + g
        dt = 1 / 25 if pts is None or self._last_pts is None or pts <= self._last_pts else pts - self._last_pts
        self._last_pts = pts
        if self._filter is not None:
            q_target = self._filter(q_target, dt)
        q_target = _no_crossing(q_target)
        return self._ref_origin + self._ref_axis * q_target

    def _better_neutral(self, z: np.ndarray) -> bool:
        """Whether this face is more neutral than the neutral frame: its mouth more closed, or its eyes open where
        the neutral frame caught a blink. The first face seen is often mid-word or mid-blink; measured against it,
        a closed mouth would squeeze the portrait's lips shut past closed."""
        z0, origin0, axis0 = self._neutral
        origin, axis = _face_frame(z)
        q0, q = (z0 - origin0) / axis0, (z - origin) / axis  # each in its own face frame
        mouth0, mouth = _mouth_opening(q0), _mouth_opening(q)
        eyes0, eyes = _eye_opening(q0), _eye_opening(q)
        return mouth < mouth0 - NEUTRAL_SLACK or (eyes0 < 0.5 * eyes and eyes > NEUTRAL_SLACK)

    def warp(self, target: np.ndarray) -> np.ndarray:
        """Warp the reference so its landmarks land on `target` (478,) complex; (height, width, 3) uint8 RGB."""
        tgt = np.concatenate([np.stack([target[:N_MESH].real, target[:N_MESH].imag], 1), self._src[-self._n_border:]])
        src = self._src
        tris = self._tris

        # Per-triangle affine target -> source: p -> S0 + F E^-1 (p - T0).
        t0, t1, t2 = tgt[tris[:, 0]], tgt[tris[:, 1]], tgt[tris[:, 2]]
        s0, s1, s2 = src[tris[:, 0]], src[tris[:, 1]], src[tris[:, 2]]
        e1, e2, f1, f2 = t1 - t0, t2 - t0, s1 - s0, s2 - s0
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        src_det = f1[:, 0] * f2[:, 1] - f1[:, 1] * f2[:, 0]
        # A triangle squeezed to a sliver would magnify its source enormously, and the pixels rasterised along its
        # edges (just outside it) would sample far away: such a triangle takes its source centroid's colour.
        ok = np.abs(det) > np.maximum(np.abs(src_det) / 16, 1e-6)
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        # E^-1 = [[e2y, -e2x], [-e1y, e1x]] / det ; A = [f1 f2] E^-1 (columns f1, f2)
        a00 = (f1[:, 0] * e2[:, 1] - f2[:, 0] * e1[:, 1]) * inv
        a01 = (-f1[:, 0] * e2[:, 0] + f2[:, 0] * e1[:, 0]) * inv
        a10 = (f1[:, 1] * e2[:, 1] - f2[:, 1] * e1[:, 1]) * inv
        a11 = (-f1[:, 1] * e2[:, 0] + f2[:, 1] * e1[:, 0]) * inv
        b0 = s0[:, 0] - a00 * t0[:, 0] - a01 * t0[:, 1]
        b1 = s0[:, 1] - a10 * t0[:, 0] - a11 * t0[:, 1]
        b0 = np.where(ok, b0, (s0[:, 0] + s1[:, 0] + s2[:, 0]) / 3)
        b1 = np.where(ok, b1, (s0[:, 1] + s1[:, 1] + s2[:, 1]) / 3)
        coef = np.stack([a00, a01, b0, a10, a11, b1], 1).astype(np.float32)  # (K, 6)

        # Rasterise triangle ids of the target mesh at map resolution (later triangles win: face over background).
        mw, mh = self._map_size
        corners = tgt[tris]  # (K, 3, 2)
        poly = np.round((corners + 0.5) * (mw / self.width * 16, mh / self.height * 16) - 8).astype(np.int32)
        ids = self._ids
        for k, p in enumerate(poly):
            cv2.fillConvexPoly(ids, p, k, cv2.LINE_8, 4)

        c = np.take(coef, ids, axis=0, out=self._coef)  # (mh, mw, 6)
        np.multiply(c[..., 0], self._grid_x, out=self._map_x)
        self._map_x += c[..., 1] * self._grid_y
        self._map_x += c[..., 2]
        np.multiply(c[..., 3], self._grid_x, out=self._map_y)
        self._map_y += c[..., 4] * self._grid_y
        self._map_y += c[..., 5]
        if (mw, mh) != (self.width, self.height):
            cv2.resize(self._map_x, (self.width, self.height), dst=self._full_x, interpolation=cv2.INTER_LINEAR)
            cv2.resize(self._map_y, (self.width, self.height), dst=self._full_y, interpolation=cv2.INTER_LINEAR)
            map_x, map_y = self._full_x, self._full_y
        else:
            map_x, map_y = self._map_x, self._map_y
        out = cv2.remap(self.reference, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self._fill_mouth(out, target)
        return out

    def _fill_mouth(self, out: np.ndarray, target: np.ndarray) -> None:
        """Paint the opened part of the mouth: a dark interior with a band of upper teeth under the upper lip,
        opaque in proportion to how much wider the lips open than in the reference."""
        ref_open = _mouth_opening(self._ref_q)
        open_now = _mouth_opening((target - self._ref_origin) / self._ref_axis)
        strength = float(np.clip((open_now - ref_open) / MOUTH_FULL_OPEN, 0.0, 1.0))
        # Teeth only once the gap is wide enough to hold them: in a slit they read as specks.
        teeth_strength = 0.85 * float(np.clip((open_now - ref_open - 0.5 * MOUTH_FULL_OPEN) / MOUTH_FULL_OPEN, 0, 1))
        if strength <= 0.02:
            return
        upper, lower = target[self._lip_upper], target[self._lip_lower]
        inner = np.concatenate([upper, lower[::-1][1:-1]])
        gap = lower - upper
        depth = np.minimum(TEETH_DEPTH, TEETH_MAX * abs(self._ref_axis) / np.maximum(np.abs(gap), 1e-6))
        teeth = np.concatenate([upper, (upper + depth * gap)[::-1][1:-1]])
        xy = np.stack([inner.real, inner.imag], 1)
        x0, y0 = np.maximum(np.floor(xy.min(0)).astype(int) - 2, 0)
        x1, y1 = np.ceil(xy.max(0)).astype(int) + 3
        x1, y1 = min(x1, self.width), min(y1, self.height)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        crop = out[y0:y1, x0:x1].astype(np.float32)
        # Teeth fade out toward the mouth corners, which sit in shadow.
        corners = np.array([upper[0], upper[-1]])
        centre_x, half_w = corners.real.mean() - x0, max(abs(corners.real[1] - corners.real[0]) / 2, 1.0)
        fade = np.clip(1.0 - ((np.arange(x1 - x0) - centre_x) / half_w) ** 2, 0.0, 1.0) ** 0.5
        for poly, colour, weight in ((inner, MOUTH_COLOUR, 1.0), (teeth, TEETH_COLOUR, teeth_strength * fade[None, :, None])):
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            pts = np.stack([poly.real - x0, poly.imag - y0], 1)
            cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
            alpha = cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32)[..., None] * (strength / 255.0)
            crop += (alpha * weight) * (colour - crop)
        out[y0:y1, x0:x1] = crop.astype(np.uint8)
