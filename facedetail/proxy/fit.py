"""Batched proxy fitting: Gold Standard affine camera, nearest rotation, regularised shape LSQ.

Everything works on a batch of B images at once, in float64 numpy, in a *face-normalised fitting
frame*: each face's landmarks are centred on their centroid and scaled so that the face's size
(:func:`face_size_px`: sqrt(width x height) of the landmarks' bounding box) is ``face_size``
(100) pixels, x right and **y up** (the image's y is flipped, so that the camera's 2x3 matrix is a
scaled rotation, not a reflection). σ² and λ therefore weigh a face the same whether it fills a
close-up or is a small figure in a large photo. The release scaled the *photo* to 256 px instead,
which is the same thing only for photos that are tight face crops (AffectNet's): a small face in a
large photo was regularised far more (issue 17 measured |α| 0.055 against 4.37 for the same
landmarks fitted at full size),
and its error in px at 256 made the worst fits look best. 100 px is the median face size of the
default profile's photos under the 256 px rule, so for a face crop the fit is the release's.

Results come back in the caller's pixels (the photo the landmarks were given in, y up): the camera
maps model mm to those pixels; errors are given in those pixels and as NME (mean landmark error
over the outer-eye-corner distance, iBUG 37-46: the 300-W convention).

Camera (scaled orthographic): ``x = s · R[:2] · X + t``. It is estimated by Hartley and
Zisserman's Gold Standard algorithm for an affine camera (Multiple View Geometry, Alg. 7.2):
normalise the 2-D and 3-D points (centroid at 0, mean distance sqrt(2) and sqrt(3)), solve the
linear least-squares problem for the 2x4 affine matrix, undo the normalisation; then the 2x3
part is replaced by the nearest scaled rotation (SVD of [r1; r2; r1 x r2]) and t re-estimated.

Shape: with the camera fixed, the landmarks are linear in α, so α minimises
``|x - s R2 (m + S α) - t|² / σ² + λ |α|²`` in closed form (Aldrian and Smith 2013, as in eos and
the original release: λ = 30, σ² = 3 px²). With ``expression: free`` β is solved the same way
(λ = 65) after α; blendshape weights are clipped at 0 (a negative weight is an "anti-smile").

Contour: iBUG landmarks 1-8 and 10-17 follow the face's silhouette, so each iteration assigns each
of them to the nearest projected vertex of the model's contour candidates on its side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from facedetail.config import Config
from facedetail.model.morphable import MorphableModel

# iBUG indices (0-based) of the contour landmarks on each side; 8 (the chin) has a fixed vertex.
RIGHT_CONTOUR = np.arange(0, 8)
LEFT_CONTOUR = np.arange(9, 17)


class FitConfig(Config):
    """How a proxy is fitted to 68 landmarks."""

    face_size: float = Field(100.0, ge=16)
    """Landmarks are fitted scaled so that the face (:func:`face_size_px`) is this many px (the release
    scaled the photo's long side to 256 px instead; 100 px is the default profile's median face then)."""
    shape_lambda: float = Field(30.0, ge=0)
    """Regularisation of the identity coefficients α (in standard deviations)."""
    landmark_sigma2: float = Field(3.0, gt=0)
    """Landmark noise variance σ² in px² of the face frame (the release: 3, in px of the photo scaled to 256)."""
    expression: Literal["prior", "free"] = "prior"
    """prior: β fixed to the dictionary's β_prior (the paper); free: β solved with expression_lambda."""
    expression_lambda: float = Field(65.0, ge=0)
    """Regularisation of β when it is fitted freely (the release: 65)."""
    iterations_prior: int = Field(10, ge=1)
    """Camera/contour/shape iterations when β is fixed to a prior (the release: 10)."""
    iterations_free: int = Field(5, ge=1)
    """Iterations when β is fitted freely (the release: 5)."""
    shape_components: int = Field(0, ge=0)
    """Identity components fitted (0 = all)."""
    use_contour: bool = True
    """Fit the contour landmarks (1-8, 10-17) with per-iteration correspondence."""
    max_nme: float = Field(0.2, gt=0)
    """A fit whose NME (mean landmark error / outer-eye-corner distance) ends above this is reported as
    diverged (0.2: the release's 12 px at 256 for the default profile's median 60 px eye distance)."""
    max_reprojection_px: float | None = Field(None, gt=0)
    """Optionally also: a fit whose mean landmark error in photo px ends above this has diverged
    (None = off: a px bound depends on the face's size, the NME does not)."""
    max_yaw_deg: float = Field(75.0, gt=0, le=180)
    """A fit with |yaw| above this is reported as an extreme pose."""
    min_face_px: float = Field(4.0, gt=0)
    """Landmarks whose face (:func:`face_size_px`) is smaller than this many photo px are degenerate
    (collapsed onto a point): reported, not fitted (the detector's own min_face_px is far larger)."""


@dataclass(frozen=True)
class Cameras:
    """B scaled orthographic cameras: x = scale · rotation[:2] · X + translation, in image px with y up
    (the fitter returns them in the pixels of the landmarks it was given, y negated)."""

    scale: np.ndarray
    """(B,) pixels per millimetre."""
    rotation: np.ndarray
    """(B, 3, 3) rotations, model to camera (third row: the viewing direction's axis, towards the viewer)."""
    translation: np.ndarray
    """(B, 2) image-plane translation (px, y up)."""

    def project(self, points: np.ndarray) -> np.ndarray:
        """(B, N, 3) model points to (B, N, 2) image positions (y up)."""
        return self.scale[:, None, None] * np.einsum("bij,bnj->bni", self.rotation[:, :2], points) + \
            self.translation[:, None, :]

    def select(self, i: int) -> Cameras:
        """Camera ``i`` as a batch of one."""
        return Cameras(self.scale[i:i + 1], self.rotation[i:i + 1], self.translation[i:i + 1])

    def depth(self, points: np.ndarray) -> np.ndarray:
        """(B, N) distance towards the viewer (larger = closer), in millimetres."""
        return np.einsum("bj,bnj->bn", self.rotation[:, 2], points)

    def angles_deg(self) -> np.ndarray:
        """(B, 3) yaw, pitch, roll in degrees (R = Rz(roll) Rx(pitch) Ry(yaw)-style decomposition)."""
        r = self.rotation
        yaw = np.degrees(np.arcsin(np.clip(r[:, 0, 2], -1.0, 1.0)))
        pitch = np.degrees(np.arctan2(-r[:, 1, 2], r[:, 2, 2]))
        roll = np.degrees(np.arctan2(-r[:, 0, 1], r[:, 0, 0]))
        return np.stack([yaw, pitch, roll], axis=1)


def _normalising(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, D+1, D+1) similarity moving the weighted centroid to 0 and the mean distance to sqrt(D)."""
    b, _, d = points.shape
    wsum = weights.sum(axis=1, keepdims=True)
    centroid = (weights[..., None] * points).sum(axis=1) / wsum
    dist = np.linalg.norm(points - centroid[:, None], axis=2)
    mean_dist = (weights * dist).sum(axis=1) / wsum[:, 0]
    scale = np.sqrt(d) / np.maximum(mean_dist, 1e-12)
    t = np.zeros((b, d + 1, d + 1))
    t[:, np.arange(d), np.arange(d)] = scale[:, None]
    t[:, :d, d] = -scale[:, None] * centroid
    t[:, d, d] = 1.0
    return t


def gold_standard_affine(model_points: np.ndarray, image_points: np.ndarray,
                         weights: np.ndarray | None = None) -> np.ndarray:
    """(B, 2, 4) affine cameras mapping (B, N, 3) points to (B, N, 2), Hartley-Zisserman Alg. 7.2.

    ``weights`` (B, N) (0 drops a point) makes it a weighted least-squares fit; every image needs
    at least 4 non-coplanar points with positive weight.
    """
    b, n, _ = model_points.shape
    w = np.ones((b, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    t3 = _normalising(model_points, w)
    t2 = _normalising(image_points, w)
    xh = np.concatenate([model_points, np.ones((b, n, 1))], axis=2)
    uh = np.concatenate([image_points, np.ones((b, n, 1))], axis=2)
    xn = np.einsum("bij,bnj->bni", t3, xh)  # (B, N, 4), last column 1
    un = np.einsum("bij,bnj->bni", t2, uh)[..., :2]
    # Each image row of the affine camera is an independent LSQ over the same design matrix.
    lhs = np.einsum("bni,bn,bnj->bij", xn, w, xn)
    rhs = np.einsum("bni,bn,bnk->bik", xn, w, un)
    p_norm = np.linalg.solve(lhs, rhs).transpose(0, 2, 1)  # (B, 2, 4)
    full = np.zeros((b, 3, 4))
    full[:, :2] = p_norm
    full[:, 2, 3] = 1.0
    return (np.linalg.inv(t2) @ full @ t3)[:, :2]


def nearest_scaled_rotation(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale (B,) and rotation (B, 3, 3) nearest to each 2x3 part of (B, 2, 4) affine cameras."""
    m = affine[:, :, :3]
    norms = np.linalg.norm(m, axis=2)
    r1 = m[:, 0] / norms[:, :1]
    r2 = m[:, 1] / norms[:, 1:]
    approx = np.stack([r1, r2, np.cross(r1, r2)], axis=1)
    # A degenerate input (NaN, zero rows) must come out as NaN for the caller to report, not stop
    # the batch: LAPACK's SVD refuses non-finite matrices.
    bad = ~np.isfinite(approx).all(axis=(1, 2))
    approx[bad] = np.eye(3)
    u, _, vt = np.linalg.svd(approx)
    # Force a proper rotation (det +1): flip the last singular direction where needed.
    det = np.linalg.det(u @ vt)
    u[:, :, 2] *= det[:, None]
    rotation = u @ vt
    rotation[bad] = np.nan
    return np.where(bad, np.nan, norms.mean(axis=1)), rotation


def estimate_cameras(model_points: np.ndarray, image_points: np.ndarray,
                     weights: np.ndarray | None = None) -> Cameras:
    """Scaled orthographic cameras: Gold Standard affine fit, nearest rotation, translation re-fitted."""
    b, n, _ = model_points.shape
    w = np.ones((b, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    scale, rotation = nearest_scaled_rotation(gold_standard_affine(model_points, image_points, w))
    projected = scale[:, None, None] * np.einsum("bij,bnj->bni", rotation[:, :2], model_points)
    translation = (w[..., None] * (image_points - projected)).sum(axis=1) / w.sum(axis=1, keepdims=True)
    return Cameras(scale, rotation, translation)


def solve_coefficients(cameras: Cameras, base: np.ndarray, basis: np.ndarray, image_points: np.ndarray,
                       weights: np.ndarray, lam: float, sigma2: float) -> np.ndarray:
    """Closed-form regularised LSQ for coefficients c of ``points = base + basis · c``.

    base (B, N, 3), basis (B, N, 3, K) (scaled: c is in standard deviations), image_points (B, N, 2),
    weights (B, N). Returns (B, K) minimising Σ w |x - P(base + basis c)|² / σ² + λ |c|².
    """
    b, n, _, k = basis.shape
    rs = cameras.scale[:, None, None] * cameras.rotation[:, :2]  # (B, 2, 3)
    a = (rs[:, None] @ basis).reshape(b, 2 * n, k)  # (B, 2N, K): x and y rows of every point
    residual = (image_points - cameras.project(base)).reshape(b, 2 * n, 1)
    wa = a * np.repeat(weights, 2, axis=1)[..., None]
    lhs = a.transpose(0, 2, 1) @ wa / sigma2 + lam * np.eye(k)[None]
    rhs = wa.transpose(0, 2, 1) @ residual / sigma2
    return np.linalg.solve(lhs, rhs)[..., 0]


@dataclass(frozen=True)
class FitResult:
    """Batched fit output; rows follow the input order."""

    alpha: np.ndarray
    """(B, Ks) identity coefficients (standard deviations)."""
    beta: np.ndarray
    """(B, Ke) expression coefficients (fixed to the prior, or fitted)."""
    cameras: Cameras
    """Cameras in the given landmarks' pixels (y up: image y is -y)."""
    landmark_vertices: np.ndarray
    """(B, 68) the vertex each landmark was matched to (-1: landmark not used)."""
    residuals: np.ndarray
    """(B, iterations) mean landmark error (px of the given landmarks) after each iteration."""
    reprojection_px: np.ndarray
    """(B,) final mean landmark error (over the fixed and contour landmarks) in px of the given landmarks."""
    nme: np.ndarray
    """(B,) reprojection_px / outer-eye-corner distance of the given landmarks (300-W's NME)."""
    status: list[str]
    """Per image: "ok", or why the fit is unusable (diverged / NaN / extreme pose)."""
    face_frame_scale: np.ndarray
    """(B,) the face frame's px per given px (face_size / face size; NaN where there was no face)."""


class ProxyFitter:
    """Fits identity (and optionally expression) plus a camera to batches of 68-point landmarks."""

    def __init__(self, model: MorphableModel, config: FitConfig | None = None) -> None:
        self.model = model
        self.config = config or FitConfig()
        k = self.config.shape_components or model.n_shape
        if k > model.n_shape:
            raise ValueError(f"shape_components={k} exceeds the model's {model.n_shape}")
        # Landmarks with a fixed vertex; the contour ones (vertex -1) are matched per iteration.
        self._fixed = model.landmark_defined.copy()
        self._use_contour = self.config.use_contour and model.contour_right.size > 0 and model.contour_left.size > 0
        # The fit only ever looks at landmark and contour-candidate vertices (about 80 of the
        # model's thousands): work on that subset, in "local" vertex numbers.
        self._subset = np.unique(np.concatenate([model.landmark_vertices[self._fixed], model.contour_right,
                                                 model.contour_left])).astype(np.int64)
        local = np.full(model.n_vertices, -1, np.int64)
        local[self._subset] = np.arange(len(self._subset))
        self._mean = model.mean[self._subset].astype(np.float64)  # (S, 3)
        self._shape = np.ascontiguousarray(  # (S, 3, K)
            (model.shape_basis[:k, self._subset] * model.shape_std[:k, None, None]).transpose(1, 2, 0), np.float64)
        self._expr = np.ascontiguousarray(
            (model.expression_basis[:, self._subset] * model.expression_std[:, None, None]).transpose(1, 2, 0),
            np.float64)
        self._landmark_local = np.where(self._fixed, local[np.maximum(model.landmark_vertices, 0)], 0)
        self._right_local = local[model.contour_right]
        self._left_local = local[model.contour_left]

    @property
    def iterations(self) -> int:
        """Iterations of the alternation for the configured expression mode."""
        return self.config.iterations_prior if self.config.expression == "prior" else self.config.iterations_free

    def fit(self, landmarks: np.ndarray, beta_prior: np.ndarray | None = None) -> FitResult:
        """Fit B faces to landmarks (B, 68, 2) in image pixels (x right, y down).

        ``beta_prior`` (B, Ke) is required for ``expression: prior`` and is the start for ``free``.
        The fit runs in the face-normalised frame; cameras and errors come back in these pixels.
        """
        cfg = self.config
        lm = np.asarray(landmarks, dtype=np.float64)
        b = lm.shape[0]
        if beta_prior is None:
            if cfg.expression == "prior":
                raise ValueError("expression: prior needs beta_prior")
            beta = np.zeros((b, self.model.n_expression))
        else:
            beta = np.asarray(beta_prior, dtype=np.float64).reshape(b, -1).copy()
        alpha = np.zeros((b, self._shape.shape[2]))
        used = self._fixed.copy()
        if self._use_contour:
            used[RIGHT_CONTOUR] = used[LEFT_CONTOUR] = True
        finite = np.isfinite(lm[:, used]).all(axis=(1, 2))
        with np.errstate(invalid="ignore"):
            size = np.where(finite, face_size_px(np.where(finite[:, None, None], lm, 0.0), used), np.nan)
            centre = np.where(finite[:, None], lm[:, used].mean(axis=1), 0.0)
        sized = finite & (size >= cfg.min_face_px)
        # Photo px -> face frame: x_fit = (x - centre) * to_face, y flipped.
        to_face = np.where(sized, cfg.face_size / np.where(sized, size, 1.0), 1.0)
        x = (lm - centre[:, None]) * to_face[:, None, None]
        x[..., 1] = -x[..., 1]  # y up
        # Rows that cannot be fitted get the mean face's own landmarks, so that the batch's linear
        # algebra stays well posed; their status says why they failed.
        x[~sized] = self._placeholder_landmarks()
        x[:, ~used] = 0.0

        vertex_ids = np.tile(self._landmark_local, (b, 1))  # local vertex numbers
        weights = np.tile(self._fixed.astype(np.float64), (b, 1))
        contour_weight = float(self._use_contour)
        residuals = np.zeros((b, self.iterations))
        cameras: Cameras | None = None
        for it in range(self.iterations):
            verts = self._vertices(alpha, beta)
            pts = np.take_along_axis(verts, vertex_ids[..., None], axis=1)
            cameras = estimate_cameras(pts, x, weights)
            if self._use_contour:
                # Re-assign the contour landmarks to the nearest projected candidate on their side.
                for side, cand in ((RIGHT_CONTOUR, self._right_local), (LEFT_CONTOUR, self._left_local)):
                    proj = cameras.project(verts[:, cand])  # (B, C, 2)
                    d = np.linalg.norm(x[:, side, None, :] - proj[:, None], axis=3)  # (B, 8, C)
                    vertex_ids[:, side] = cand[np.argmin(d, axis=2)]
                    weights[:, side] = contour_weight
            base_beta = self._expression_points(beta, vertex_ids) + self._mean[vertex_ids]
            shape_basis = self._basis_at(self._shape, vertex_ids)
            alpha = solve_coefficients(cameras, base_beta, shape_basis, x, weights, cfg.shape_lambda,
                                       cfg.landmark_sigma2)
            if cfg.expression == "free" and self.model.n_expression:
                base_alpha = self._mean[vertex_ids] + (shape_basis @ alpha[:, None, :, None])[..., 0]
                beta = solve_coefficients(cameras, base_alpha, self._basis_at(self._expr, vertex_ids), x, weights,
                                          cfg.expression_lambda, cfg.landmark_sigma2)
                if self.model.expression_kind == "blendshapes":
                    beta = np.maximum(beta, 0.0)
            residuals[:, it] = self._mean_error(cameras, alpha, beta, vertex_ids, x, weights)
        assert cameras is not None
        # The final camera goes with the final coefficients.
        verts = self._vertices(alpha, beta)
        pts = np.take_along_axis(verts, vertex_ids[..., None], axis=1)
        cameras = estimate_cameras(pts, x, weights)
        reproj = self._mean_error(cameras, alpha, beta, vertex_ids, x, weights) / to_face
        # Back to the caller's pixels (y up): x_photo = x_fit / to_face + centre.
        centre_up = centre * [1.0, -1.0]
        photo_cameras = Cameras(cameras.scale / to_face, cameras.rotation,
                                cameras.translation / to_face[:, None] + centre_up)
        with np.errstate(invalid="ignore", divide="ignore"):
            nme = reproj / outer_eye_distance(lm)
        matched = np.where(weights > 0, self._subset[vertex_ids], -1)
        status = self._status(finite, size, alpha, beta, photo_cameras, reproj, nme)
        return FitResult(alpha, beta, photo_cameras, matched, residuals / to_face[:, None], reproj, nme, status,
                         np.where(sized, to_face, np.nan))

    def _placeholder_landmarks(self) -> np.ndarray:
        """(68, 2) the mean face's landmarks seen frontally (contour: the middle candidates)."""
        ids = self._landmark_local.copy()
        if self._use_contour:
            for side, cand in ((RIGHT_CONTOUR, self._right_local), (LEFT_CONTOUR, self._left_local)):
                ids[side] = cand[np.linspace(0, len(cand) - 1, len(side)).astype(int)]
        return self._mean[ids, :2]

    def _vertices(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """(B, S, 3) positions of the subset's vertices."""
        out = self._mean[None] + (self._shape @ alpha.T).transpose(2, 0, 1)
        if self.model.n_expression:
            out += (self._expr @ beta.T).transpose(2, 0, 1)
        return out

    @staticmethod
    def _basis_at(basis: np.ndarray, vertex_ids: np.ndarray) -> np.ndarray:
        """(B, N, 3, K) basis rows of each image's (local) vertices."""
        return basis[vertex_ids]

    def _expression_points(self, beta: np.ndarray, vertex_ids: np.ndarray) -> np.ndarray:
        if not self.model.n_expression:
            return np.zeros((*vertex_ids.shape, 3))
        return (self._expr[vertex_ids] @ beta[:, None, :, None])[..., 0]

    def _mean_error(self, cameras: Cameras, alpha: np.ndarray, beta: np.ndarray, vertex_ids: np.ndarray,
                    x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        pts = self._mean[vertex_ids] + (self._shape[vertex_ids] @ alpha[:, None, :, None])[..., 0] + \
            self._expression_points(beta, vertex_ids)
        err = np.linalg.norm(cameras.project(pts) - x, axis=2)
        used = weights > 0
        return np.where(used.any(axis=1), (err * used).sum(axis=1) / np.maximum(used.sum(axis=1), 1), np.nan)

    def _status(self, finite: np.ndarray, size: np.ndarray, alpha: np.ndarray, beta: np.ndarray, cameras: Cameras,
                reproj: np.ndarray, nme: np.ndarray) -> list[str]:
        cfg = self.config
        yaw = cameras.angles_deg()[:, 0]
        numbers_ok = np.isfinite(alpha).all(axis=1) & np.isfinite(beta).all(axis=1) & np.isfinite(reproj) & \
            np.isfinite(nme) & np.isfinite(cameras.rotation).all(axis=(1, 2)) & np.isfinite(cameras.scale)
        out = []
        for i in range(len(reproj)):
            if not finite[i]:
                out.append("fit failed: landmarks contain NaN or inf")
            elif not size[i] >= cfg.min_face_px:
                out.append(f"fit failed: degenerate landmarks (face {size[i]:.2g} px < {cfg.min_face_px:g} px)")
            elif not numbers_ok[i]:
                out.append("fit failed: the solution contains NaN or inf")
            elif nme[i] > cfg.max_nme:
                out.append(f"fit diverged: NME {nme[i]:.3f} > max_nme {cfg.max_nme:g}")
            elif cfg.max_reprojection_px is not None and reproj[i] > cfg.max_reprojection_px:
                out.append(f"fit diverged: mean landmark error {reproj[i]:.1f} px > {cfg.max_reprojection_px:g} px")
            elif abs(yaw[i]) > cfg.max_yaw_deg:
                out.append(f"extreme pose: yaw {yaw[i]:.0f} deg beyond ±{cfg.max_yaw_deg:g}")
            else:
                out.append("ok")
        return out


def face_size_px(landmarks: np.ndarray, used: np.ndarray | None = None) -> np.ndarray:
    """(B,) a face's size: sqrt(width x height) of the bounding box of its (used) landmarks (B, 68, 2).

    The frame's normaliser. Unlike the eye distance it barely shrinks with yaw (the box's height does not
    change), and unlike a detection box it is the same for dlib's box, a list's given box or a scan.
    """
    pts = np.asarray(landmarks, np.float64)
    if used is not None:
        pts = pts[:, used]
    extent = pts.max(axis=1) - pts.min(axis=1)
    return np.sqrt(extent[:, 0] * extent[:, 1])


def outer_eye_distance(landmarks: np.ndarray) -> np.ndarray:
    """(B,) distance between the outer eye corners (iBUG 37 and 46): the 300-W NME's normaliser."""
    pts = np.asarray(landmarks, np.float64)
    return np.linalg.norm(pts[:, 36] - pts[:, 45], axis=-1)
