"""Rigid alignment of a scan to its proxy: trimmed point-to-plane ICP.

Points sampled on the proxy (its UV-raster texel positions, so they cover the face evenly)
are matched to their nearest scan vertices (scipy's cKDTree), and each iteration solves the
small rigid motion that minimizes the squared distances along the scan's vertex normals
(point-to-plane, linearized rotation: a 6x6 least-squares system). Hand-written because
trimesh's ``registration.icp`` is point-to-point without outlier rejection: on a face, whose
surface is smooth, point-to-point slides slowly (measured: not converged after 60 iterations
from a 2°, 3 mm offset), and a real scan covers more than the proxy (neck, hair) and has holes,
so pairs farther apart than ``trim_factor`` times the median distance are dropped on every
iteration.

The residual is the median proxy-to-scan distance after alignment, measured along the matched
scan vertex's normal (so the scan's vertex spacing does not count as misalignment). It is
not zero even for a perfect alignment: the scan carries the details (and the proxy's fitting
error) that the displacement is meant to capture, so the threshold that rejects a failed
alignment is a parameter in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import trimesh
from numpy.typing import NDArray
from pydantic import Field
from scipy.spatial import cKDTree

from facedetail.capture.scan import CaptureError
from facedetail.config import Config


class AlignConfig(Config):
    """Rigid alignment of each scan to its proxy."""

    method: Literal["icp", "none"] = "icp"
    """``icp`` (trimmed ICP) or ``none`` (the scan is trusted to be in the proxy's frame)."""
    samples: int = Field(20_000, ge=100)
    """Proxy surface points matched to the scan per iteration."""
    max_iterations: int = Field(50, ge=1)
    """ICP iterations at most."""
    tolerance_mm: float = Field(1e-4, gt=0)
    """Stop when the motion of an iteration moves no point by more than this."""
    trim_factor: float = Field(3.0, gt=1)
    """Pairs farther apart than this times the median pair distance are outliers."""
    max_residual_mm: float = Field(1.5, gt=0)
    """Reject the scan when the median proxy-to-scan distance after alignment exceeds this."""
    min_overlap: float = Field(0.5, gt=0, le=1)
    """Reject the scan when fewer of the proxy points than this fraction have a scan point within
    ``max_residual_mm`` x ``trim_factor`` after alignment."""


@dataclass(frozen=True)
class Alignment:
    """A rigid motion taking the scan into the proxy's frame, and how well it fits."""

    transform: NDArray[np.float64]
    """(4, 4) homogeneous transform applied to the scan's vertices."""
    residual_before_mm: float
    """Median proxy-to-scan distance (along the scan normal) before alignment."""
    residual_mm: float
    """Median proxy-to-scan distance (along the scan normal) after alignment."""
    overlap: float
    """Fraction of proxy points with a scan point within the inlier distance after alignment."""
    iterations: int
    method: str

    @property
    def rotation_deg(self) -> float:
        """Angle of the rotation part, in degrees."""
        cos = (np.trace(self.transform[:3, :3]) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

    @property
    def translation_mm(self) -> float:
        """Length of the translation part."""
        return float(np.linalg.norm(self.transform[:3, 3]))


def rigid_normal_basis(points: NDArray[np.float64], normals: NDArray[np.float64]) -> NDArray[np.float64]:
    """(N, 6) normal component of the 6 infinitesimal rigid motions (3 rotations about the centroid, 3 shifts)."""
    centre = points.mean(axis=0)
    return np.hstack([np.cross(points - centre, normals), normals])


def solve_normal_equations(A: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    # einsum without BLAS, then a 6x6 least-squares solve (the same bits whatever the BLAS thread
    # count); least squares rather than solve: on a symmetric surface (a sphere, a cylinder) some
    # motions are unconstrained and the minimum-norm step leaves them alone.
    return np.linalg.lstsq(np.einsum("ni,nj->ij", A, A), np.einsum("ni,n->i", A, b), rcond=1e-10)[0]


def _point_to_plane_step(src: NDArray[np.float64], dst: NDArray[np.float64],
                         normals: NDArray[np.float64]) -> NDArray[np.float64]:
    """(4, 4) rigid motion minimizing ``Σ ((R s + t - d) · n)²`` to first order in the rotation."""
    centre = src.mean(axis=0)  # solve about the centroid: better conditioned than about the origin
    A = rigid_normal_basis(src, normals)  # (N, 6): rotation vector, translation
    b = -np.einsum("ij,ij->i", src - dst, normals)
    x = solve_normal_equations(A, b)
    omega, t = x[:3], x[3:]
    angle = float(np.linalg.norm(omega))
    step = np.eye(4)
    if angle > 0:
        step = trimesh.transformations.rotation_matrix(angle, omega / angle, point=centre)
    step[:3, 3] += t
    return step


def align_scan(proxy_points: NDArray[np.float64], scan_vertices: NDArray[np.float64],
               scan_normals: NDArray[np.float64], config: AlignConfig, rng: np.random.Generator) -> Alignment:
    """Align scan vertices (N, 3) with unit normals (N, 3) to points on the proxy (M, 3).

    Raises ``CaptureError`` when the alignment leaves the scan too far from the proxy.
    """
    points = np.asarray(proxy_points, np.float64)
    if len(points) > config.samples:
        points = points[np.sort(rng.choice(len(points), config.samples, replace=False))]
    tree = cKDTree(np.asarray(scan_vertices, np.float64))
    target = tree.data
    target_normals = np.asarray(scan_normals, np.float64)
    inlier_mm = config.max_residual_mm * config.trim_factor

    def fit(pts: NDArray[np.float64]) -> tuple[float, float]:
        """Median distance along the scan normal (the distance to the surface, not to its nearest vertex),
        and the fraction of points with a scan vertex within the inlier distance."""
        dist, idx = tree.query(pts)
        along = np.abs(np.einsum("ij,ij->i", pts - target[idx], target_normals[idx]))
        return float(np.median(along)), float(np.mean(dist <= inlier_mm))

    before, overlap = fit(points)
    if config.method == "none":
        return Alignment(np.eye(4), before, before, overlap, 0, "none")
    # Move the proxy points onto the scan (the tree stays fixed); the scan's transform is the inverse.
    motion = np.eye(4)
    moved = points
    iterations = 0
    for iterations in range(1, config.max_iterations + 1):  # noqa: B007 - the count is reported
        dist, idx = tree.query(moved)
        keep = dist <= config.trim_factor * max(float(np.median(dist)), 1e-6)
        if keep.sum() < 10:
            break
        step = _point_to_plane_step(moved[keep], target[idx[keep]], target_normals[idx[keep]])
        moved = trimesh.transform_points(moved, step)
        motion = step @ motion
        shift = np.linalg.norm(moved - trimesh.transform_points(moved, np.linalg.inv(step)), axis=1).max()
        if shift < config.tolerance_mm:
            break
    residual, overlap = fit(moved)
    result = Alignment(np.linalg.inv(motion), before, residual, overlap, iterations, "icp")
    if residual > config.max_residual_mm or overlap < config.min_overlap:
        raise CaptureError(
            "alignment failed", f"after ICP ({iterations} iterations) the median proxy-to-scan distance is "
            f"{residual:.3g} mm (limit {config.max_residual_mm:g}) and {overlap:.0%} of the proxy has scan "
            f"within {inlier_mm:g} mm (need {config.min_overlap:.0%}); before alignment: {before:.3g} mm")
    return result
