"""Pose normalisation of the 68 landmarks, aligned face crops and the appearance feature.

The paper's appearance feature is 16 facial action-unit intensities from OpenFace, which
cannot be installed offline. Ours is built from the same 68 dlib landmarks on renders and on
photos: the landmarks are aligned to the morphable model's mean landmarks (seen frontally) by
the least-squares similarity transform (Umeyama's Procrustes: translation, rotation, uniform
scale) and the feature is what remains, ``aligned - reference`` (136 numbers, in units of the
reference's RMS radius). In-plane rotation, position and size are removed exactly; yaw and
pitch are not (a 2-D similarity cannot undo them), so strong head turns leak into the feature.

The emotion network's 64x64 crop uses the same transform, so its framing does not depend on
the detector's box either.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import Field

from facedetail.config import Config
from facedetail.model.anchors import landmark_anchors
from facedetail.model.morphable import MorphableModel

APPEARANCE_DIM = 136


class CropConfig(Config):
    """Framing of the aligned grey face crop fed to the emotion network."""

    size: int = Field(64, ge=16, le=512)
    """Side of the square crop in pixels (64: the input of EmotionNet and of fer's mini-Xception)."""
    margin: float = Field(0.12, ge=0.0, le=1.0)
    """Border added on each side of the landmarks' extent, as a fraction of that extent."""
    raise_fraction: float = Field(0.08, ge=-0.5, le=0.5)
    """The crop's centre moves up by this fraction of the landmarks' height, towards the forehead
    (landmarks stop at the brows; FER2013 crops show some forehead)."""


@dataclass(frozen=True)
class Reference:
    """The frontal mean landmarks that every face is aligned to."""

    points: np.ndarray
    """(68, 2) float64, image orientation (y down), centred, RMS radius 1; NaN where the model has no
    landmark."""

    @property
    def defined(self) -> np.ndarray:
        return ~np.isnan(self.points[:, 0])

    @classmethod
    def from_model(cls, model: MorphableModel) -> Reference:
        """Mean-shape landmarks of ``model`` projected orthographically from the front."""
        pts3 = landmark_anchors(model).points(model.mean.astype(np.float64))
        return cls.from_points(np.stack([pts3[:, 0], -pts3[:, 1]], axis=1))

    @classmethod
    def from_points(cls, points: np.ndarray) -> Reference:
        """Normalise (68, 2) points (NaN rows allowed) to zero mean and unit RMS radius."""
        pts = np.asarray(points, np.float64).copy()
        ok = ~np.isnan(pts[:, 0])
        if ok.sum() < 3:
            raise ValueError("a reference needs at least 3 defined landmarks")
        pts -= pts[ok].mean(0)
        pts /= np.sqrt((pts[ok] ** 2).sum(1).mean())
        return cls(pts)


def similarity_transforms(landmarks: np.ndarray, reference: Reference) -> np.ndarray:
    """(N, 2, 3) similarity transforms taking each face's landmarks onto the reference (Umeyama).

    ``landmarks`` is (N, 68, 2) or (68, 2); only the reference's defined points take part.
    """
    pts = np.asarray(landmarks, np.float64)
    single = pts.ndim == 2
    pts = pts[None] if single else pts
    ok = reference.defined
    src, dst = pts[:, ok], reference.points[ok]
    mu_s = src.mean(1, keepdims=True)
    mu_d = dst.mean(0)
    src_c, dst_c = src - mu_s, dst - mu_d
    cov = np.einsum("ni,knj->kij", dst_c, src_c) / ok.sum()
    U, D, Vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    S = np.stack([np.ones_like(sign), np.where(sign == 0, 1.0, sign)], axis=1)
    R = np.einsum("kij,kj,kjl->kil", U, S, Vt)
    var_s = (src_c ** 2).sum((1, 2)) / ok.sum()
    scale = (D * S).sum(1) / var_s
    A = scale[:, None, None] * R
    t = mu_d - np.einsum("kij,kj->ki", A, mu_s[:, 0])
    M = np.concatenate([A, t[:, :, None]], axis=2)
    return M[0] if single else M


def apply_transform(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply (…, 2, 3) affine transforms to (…, P, 2) points."""
    return np.einsum("...ij,...pj->...pi", M[..., :2], points) + M[..., None, :, 2]


def appearance_features(landmarks: np.ndarray, reference: Reference) -> np.ndarray:
    """(N, 136) float32: Procrustes-aligned landmarks minus the reference (zero where undefined)."""
    pts = np.asarray(landmarks, np.float64)
    pts = pts[None] if pts.ndim == 2 else pts
    aligned = apply_transform(similarity_transforms(pts, reference), pts)
    resid = np.where(reference.defined[None, :, None], aligned - np.nan_to_num(reference.points), 0.0)
    return resid.reshape(len(pts), -1).astype(np.float32)


def crop_transform(landmarks: np.ndarray, reference: Reference, config: CropConfig) -> np.ndarray:
    """(2, 3) affine from image pixels to crop pixels for one face's (68, 2) landmarks."""
    ref = reference.points[reference.defined]
    lo, hi = ref.min(0), ref.max(0)
    side = float((hi - lo).max()) * (1.0 + 2.0 * config.margin)
    centre = (lo + hi) / 2.0 - np.array([0.0, config.raise_fraction * (hi[1] - lo[1])])
    k = config.size / side
    to_crop = np.array([[k, 0.0, k * (side / 2 - centre[0])], [0.0, k, k * (side / 2 - centre[1])], [0, 0, 1]])
    return (to_crop @ _homogeneous(similarity_transforms(landmarks, reference)))[:2]


def aligned_crop(image: np.ndarray, landmarks: np.ndarray, reference: Reference, config: CropConfig) -> np.ndarray:
    """(size, size) uint8 grey crop of the face, rotated upright and scaled by the landmarks.

    When the crop is smaller than the face in the image, the face's region is first shrunk with
    area averaging, so the crop is not aliased (``warpAffine`` alone samples sparsely).
    """
    img = np.asarray(image)
    grey = img if img.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), cv2.COLOR_RGB2GRAY)
    M = crop_transform(landmarks, reference, config)
    n = config.size
    scale = float(np.sqrt(abs(np.linalg.det(M[:, :2]))))
    if scale < 1.0:
        corners = apply_transform(np.linalg.inv(_homogeneous(M))[:2], np.array([[0, 0], [n, 0], [0, n], [n, n]], float))
        h, w = grey.shape
        x0, y0 = (np.clip(np.floor(corners.min(0)) - 2, 0, [w - 1, h - 1])).astype(int)
        x1, y1 = (np.clip(np.ceil(corners.max(0)) + 2, [x0 + 1, y0 + 1], [w, h])).astype(int)
        roi = grey[y0:y1, x0:x1]
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
        grey = cv2.resize(roi, size, interpolation=cv2.INTER_AREA)
        sx, sy = size[0] / (x1 - x0), size[1] / (y1 - y0)
        M = (_homogeneous(M) @ np.array([[1 / sx, 0, x0], [0, 1 / sy, y0], [0, 0, 1]]))[:2]
    return cv2.warpAffine(grey, M, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _homogeneous(M: np.ndarray) -> np.ndarray:
    return np.vstack([M, [0.0, 0.0, 1.0]])
