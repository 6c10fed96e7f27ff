"""All 68 iBUG landmarks as fixed points on the mesh surface, for rendering ground truth.

The landmark maps of eos define most landmarks as one vertex each, but leave out the 16
jaw-contour points (1–8, 10–17), whose image position slides along the face outline with
pose, and the two inner mouth corners (61, 65). A renderer still needs a position for every
landmark, so they are defined here as fixed weighted sums of vertices:

* ``vertex``: the mapped vertex.
* ``contour``: the model's contour chain (eos ``*_contours.json``), starting at the height of
  the outer eye corner (landmark 37/46) and ending at the chin (landmark 9), is split into 8
  equal arc-length steps on the mean face; landmarks 1–8 (right) and 17–10 (left) sit at the
  step points, as barycentric points of the chain's edges. This matches the iBUG jawline of
  a frontal face; when the head turns, the far side's points stay on the surface (and are
  reported hidden by the depth test) instead of sliding to the new silhouette.
* ``derived``: inner mouth corner 61 = ½·v49 + ¼·v62 + ¼·v68 (65 likewise from 55, 64, 66):
  the point where the inner lip lines meet, just inside the outer corner.

Landmarks that cannot be built (no map entry, no contour) are ``undefined`` and give NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facedetail.model.morphable import N_LANDMARKS, MorphableModel

_WIDTH = 3
# iBUG ids (1-based): derived landmark -> ((id, weight), ...)
_DERIVED = {61: ((49, 0.5), (62, 0.25), (68, 0.25)), 65: ((55, 0.5), (64, 0.25), (66, 0.25))}
_RIGHT_CONTOUR = tuple(range(1, 9))
_LEFT_CONTOUR = tuple(range(17, 9, -1))
_CHIN, _RIGHT_EYE_OUTER, _LEFT_EYE_OUTER = 9, 37, 46


@dataclass(frozen=True)
class LandmarkAnchors:
    """Each landmark as ``Σ_j weights[i, j] · vertex[vertices[i, j]]``."""

    vertices: np.ndarray
    """(68, 3) int32 vertex ids (0 where unused)."""
    weights: np.ndarray
    """(68, 3) float64 weights; each defined row sums to 1, undefined rows are 0."""
    kinds: tuple[str, ...]
    """Per landmark: ``vertex``, ``contour``, ``derived`` or ``undefined``."""

    @property
    def defined(self) -> np.ndarray:
        """(68,) bool."""
        return np.array([k != "undefined" for k in self.kinds])

    def points(self, vertices: np.ndarray) -> np.ndarray:
        """(..., 68, 3) landmark positions of (..., V, 3) vertices; NaN where undefined."""
        v = np.asarray(vertices, np.float64)
        pts = np.einsum("...ijk,ij->...ik", v[..., self.vertices, :], self.weights)
        pts[..., ~self.defined, :] = np.nan
        return pts


def landmark_anchors(model: MorphableModel) -> LandmarkAnchors:
    """The anchors of every landmark of ``model`` (see the module docstring for the rules)."""
    ids = np.zeros((N_LANDMARKS, _WIDTH), np.int32)
    weights = np.zeros((N_LANDMARKS, _WIDTH))
    kinds = ["undefined"] * N_LANDMARKS
    mapped = model.landmark_vertices
    for i in np.flatnonzero(mapped >= 0):
        ids[i, 0], weights[i, 0], kinds[i] = mapped[i], 1.0, "vertex"

    for chain, landmarks, eye in ((model.contour_right, _RIGHT_CONTOUR, _RIGHT_EYE_OUTER),
                                  (model.contour_left, _LEFT_CONTOUR, _LEFT_EYE_OUTER)):
        if chain.size < 2 or mapped[_CHIN - 1] < 0:
            continue
        chain = _trim_to_eye_height(model, chain, eye)
        chain = np.append(chain, mapped[_CHIN - 1])
        for lm, (a, b, f) in zip(landmarks, _arc_length_steps(model.mean[chain], len(landmarks)), strict=True):
            if mapped[lm - 1] < 0:
                ids[lm - 1, :2] = chain[a], chain[b]
                weights[lm - 1, :2] = 1.0 - f, f
                kinds[lm - 1] = "contour"

    for lm, parts in _DERIVED.items():
        if mapped[lm - 1] < 0 and all(mapped[p - 1] >= 0 for p, _ in parts):
            ids[lm - 1] = [mapped[p - 1] for p, _ in parts]
            weights[lm - 1] = [w for _, w in parts]
            kinds[lm - 1] = "derived"
    return LandmarkAnchors(ids, weights, tuple(kinds))


def _trim_to_eye_height(model: MorphableModel, chain: np.ndarray, eye_landmark: int) -> np.ndarray:
    """Drop the chain's top vertices above the outer eye corner (the jawline starts at eye height)."""
    eye_vertex = model.landmark_vertices[eye_landmark - 1]
    if eye_vertex < 0:
        return chain
    heights = model.mean[chain, 1]
    start = int(np.argmin(np.abs(heights - model.mean[eye_vertex, 1])))
    return chain[start:]


def _arc_length_steps(points: np.ndarray, n: int) -> list[tuple[int, int, float]]:
    """(edge start, edge end, fraction) of the points at arc lengths 0, 1/n, ..., (n-1)/n of a polyline."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    out = []
    for k in range(n):
        s = cum[-1] * k / n
        j = min(int(np.searchsorted(cum, s, side="right")) - 1, len(seg) - 1)
        f = 0.0 if seg[j] == 0 else (s - cum[j]) / seg[j]
        out.append((j, j + 1, float(f)))
    return out
