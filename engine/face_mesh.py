"""mediapipe's 478-point face mesh as geometry: landmark indices, detection, the face's normalised frame, the warp
mesh's triangles, and a jitter filter for landmarks. Used by the `preview` renderer (engine/preview.py).

Points are complex numbers x + iy (pixels, y down); a similarity is z -> a*z + b. A face's normalised frame puts the
origin between the outer eye corners, x along the eye line, one unit = the inter-ocular distance.
"""
from __future__ import annotations

import functools

import mediapipe as mp
import numpy as np

mp_face_mesh = mp.solutions.face_mesh

# Landmark indices of mediapipe's canonical face mesh (478 points with refine_landmarks).
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
# Points that move with the skull but barely with expression: eye corners, nose bridge and tip, forehead, temples.
STABLE = np.array([33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 10, 151, 9, 234, 454])
# The lower nose (tip, columella, alae): the points inside mediapipe's FACEMESH_NOSE ridge and alar lines
# (4-45-220-115-48-64-98-97-2 and its mirror). Cartilage on bone, which an expression barely moves.
NOSE = np.array([1, 2, 4, 19, 20, 44, 45, 48, 59, 60, 64, 75, 79, 94, 97, 98, 99, 115, 125, 141, 166, 218, 219, 220,
                 235, 237, 238, 239, 240, 241, 242, 250, 274, 275, 278, 289, 290, 294, 305, 309, 326, 327, 328, 344,
                 354, 370, 392, 438, 439, 440, 455, 457, 458, 459, 460, 461, 462])
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
# The ring above each upper lid (the lash band's upper edge), point for point with the upper chains' interiors.
RIGHT_LID_RING = [247, 30, 29, 27, 28, 56, 190]  # for RIGHT_EYE_UPPER[1:-1]
LEFT_LID_RING = [414, 286, 258, 257, 259, 260, 467]  # for LEFT_EYE_UPPER[1:-1]
RIGHT_BROW_LOWER = [46, 53, 52, 65, 55]  # the brow's lower edge above RIGHT_LID_RING, outer to inner
LEFT_BROW_LOWER = [285, 295, 282, 283, 276]  # ...above LEFT_LID_RING, inner to outer
# ...and below each lower lid, for the lower chains' interiors.
RIGHT_LOWER_RING = [25, 110, 24, 23, 22, 26, 112]  # for RIGHT_EYE_LOWER[1:-1]
LEFT_LOWER_RING = [341, 256, 252, 253, 254, 339, 255]  # for LEFT_EYE_LOWER[1:-1]
N_MESH = 468  # the warp mesh leaves out the 10 iris points: they are not part of the tesselation


def detect_landmarks(rgb: np.ndarray, depth: bool = False) -> np.ndarray | None:
    """Landmarks of the most prominent face in a still image: (478, 2) float64 pixel (x, y), or None.

    depth=True gives (478, 3): x, y and mediapipe's relative depth z in pixels (larger = farther from the camera).
    """
    with mp_face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                             min_detection_confidence=0.5) as mesh:
        return landmarks_from(mesh.process(rgb), rgb.shape[1], rgb.shape[0], depth)


def landmarks_from(result, width: int, height: int, depth: bool = False) -> np.ndarray | None:
    if not result.multi_face_landmarks:
        return None
    if depth:
        return np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], np.float64) * width \
            / (1, width / height, 1)
    pts = np.array([(p.x, p.y) for p in result.multi_face_landmarks[0].landmark], np.float64)
    return pts * (width, height)


# --- face-frame geometry (points as complex numbers: a similarity is z -> a*z + b) -----------------------------------
def complex_points(pts: np.ndarray) -> np.ndarray:
    return pts[:, 0] + 1j * pts[:, 1]


def face_frame(z: np.ndarray) -> tuple[complex, complex]:
    """(origin, axis) of a face's normalised frame: origin between the outer eye corners, axis = eye vector.

    normalised = (z - origin) / axis: x runs along the eye line, one unit is the inter-ocular distance.
    """
    return (z[RIGHT_EYE_OUTER] + z[LEFT_EYE_OUTER]) / 2, z[LEFT_EYE_OUTER] - z[RIGHT_EYE_OUTER]


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> tuple[complex, complex]:
    """Least-squares similarity dst ~ a*src + b for complex point sets (no reflection)."""
    ms, md = src.mean(), dst.mean()
    s, d = src - ms, dst - md
    a = np.vdot(s, d) / max(np.vdot(s, s).real, 1e-12)
    return a, md - a * ms


def eye_opening(q: np.ndarray) -> float:
    """Mean lid gap of both eyes of normalised complex landmarks q (in inter-ocular distances)."""
    return float(np.abs(q[EYE_PAIRS[:, 1]] - q[EYE_PAIRS[:, 0]]).mean())


def mouth_opening(q: np.ndarray) -> float:
    """Mean lip gap of normalised complex landmarks q (in inter-ocular distances)."""
    return float(np.abs(q[LIP_PAIRS[:, 1]] - q[LIP_PAIRS[:, 0]]).mean())


SLITS = [(np.array(u[1:-1]), np.array(l[1:-1])) for u, l in
          ((INNER_LIP_UPPER, INNER_LIP_LOWER), (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER))]


def no_crossing(q: np.ndarray) -> np.ndarray:
    """Meet the lips (eyelids) in the middle where the target would push the lower one above the upper one.

    That happens when the driver's neutral frame had its mouth open and it then closes further than the
    reference's closed mouth; crossing would fold the mesh. q: (478,) complex, normalised (y = down the face).
    """
    for upper, lower in SLITS:
        crossed = q[lower].imag < q[upper].imag
        if crossed.any():
            q = q.copy()
            mid = (q[upper[crossed]].imag + q[lower[crossed]].imag) / 2
            q[upper[crossed]] = q[upper[crossed]].real + 1j * mid
            q[lower[crossed]] = q[lower[crossed]].real + 1j * mid
    return q


# --- mesh construction ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def tesselation_triangles() -> np.ndarray:
    """(K, 3) vertex triples of mediapipe's face tesselation (it ships as an edge set; faces are its 3-cliques)."""
    nbrs: dict[int, set[int]] = {}
    for a, b in mp_face_mesh.FACEMESH_TESSELATION:
        nbrs.setdefault(a, set()).add(b)
        nbrs.setdefault(b, set()).add(a)
    tris = {tuple(sorted((a, b, c))) for a, b in mp_face_mesh.FACEMESH_TESSELATION for c in nbrs[a] & nbrs[b]}
    return np.array(sorted(tris), np.int32)


def strip_triangles(upper: list[int], lower: list[int]) -> np.ndarray:
    """Triangles spanning a slit (mouth, eye) between two corner-to-corner chains: they stretch as it opens."""
    tris = []
    for i in range(len(upper) - 1):
        a, b, c, d = upper[i], upper[i + 1], lower[i], lower[i + 1]
        if a != c:
            tris.append((a, b, c))
        if b != d:
            tris.append((b, d, c))
    return np.array(tris, np.int32)


def outline_loop() -> np.ndarray:
    """The face outline (mediapipe's FACE_OVAL edge set) as one ordered loop of landmark indices."""
    nxt = {}
    for a, b in mp_face_mesh.FACEMESH_FACE_OVAL:
        nxt.setdefault(a, []).append(b)
        nxt.setdefault(b, []).append(a)
    loop, prev = [10], None
    while True:
        here = loop[-1]
        step = next(n for n in nxt[here] if n != prev)
        if step == loop[0]:
            return np.array(loop)
        prev = here
        loop.append(step)

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
