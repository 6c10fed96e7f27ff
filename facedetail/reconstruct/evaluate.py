"""How good a reconstruction is, against known truth: errors of the displacement map and of the detailed surface.

Map measures (per face region and overall, inside a mask): displacement MAE and RMSE in mm, and the angle
between the detailed normals ``n(P + d·N)`` computed on the *same* proxy for the prediction and the truth (so
that it measures the details, not the proxy's shape).

Surface measures, after the FaceScape benchmark (zhuhao-nju/facescape ``benchmark/code/evaluator.py``):
two-sided mean point-to-surface distance (Chamfer, mm), mean normal error (degrees) and completeness rate.
Where we differ, and why:

* alignment: rigid (rotation + translation, no scale) by Procrustes on corresponding proxy vertices where the
  two meshes share the model's topology, then ICP (trimesh) on a fixed subsample; FaceScape scales both by
  the pupil distance and solves only a depth shift, since its predictions come from other methods' cameras.
  One alignment per sample (found for the undetailed proxy) is applied to every row, so the rows differ by
  their details only;
* distance: from each point to the tangent plane of its nearest point on the other surface (both surfaces
  are dense: ~0.5 mm between vertices), instead of FaceScape's exact closest point on the triangles. It is
  ~100x faster per point and reads 1–2.4 % lower: on two wild photos 1.623 vs 1.662 mm and 2.512 vs
  2.535 mm, mean |difference| 0.03–0.05 mm, up to 5.5 mm at borders (``bench/surface_distance.py``). Every
  row is measured the same way, so the rows compare; the absolute values are not FaceScape's;
  points farther than ``max_distance_mm`` from the other surface (a scan's holes, the border) are left out;
* normals: compared at those nearest-point pairs (FaceScape: on a cylindrical map of ray hits);
* completeness: the fraction of truth points with a predicted point within ``complete_mm`` (FaceScape: the
  fraction of the truth's cylindrical-map pixels that the prediction also covers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import trimesh
from numpy.typing import NDArray
from pydantic import Field
from scipy.spatial import cKDTree

from facedetail.capture.patches import RegionBox
from facedetail.config import Config

F64 = NDArray[np.float64]


class SurfaceConfig(Config):
    """How surfaces are compared."""

    max_distance_mm: float = Field(10.0, gt=0)
    """Point pairs farther apart than this are not counted (holes, borders)."""
    complete_mm: float = Field(2.0, gt=0)
    """A truth point is covered when a predicted point lies within this distance."""
    icp_points: int = Field(4000, ge=100)
    """Points of the prediction ICP uses (a fixed, seeded subsample)."""
    icp_iterations: int = Field(20, ge=1)
    """ICP iterations at most."""
    max_points: int = Field(60_000, ge=1000)
    """A truth surface with more points (a scan, ~280K vertices) is compared through this many of them (a fixed,
    seeded subsample)."""


def masked_errors(prediction: NDArray[np.floating], truth: NDArray[np.floating], mask: NDArray[np.bool_],
                  boxes: Mapping[str, RegionBox]) -> dict[str, float | None]:
    """``mae_mm``, ``rmse_mm`` overall and ``<region>_mae_mm`` / ``<region>_rmse_mm`` per box (None: no texel)."""
    out: dict[str, float | None] = {}
    areas = {"": np.ones_like(mask)} | {f"{name}_": _box_mask(mask.shape, box) for name, box in sorted(boxes.items())}
    diff = np.asarray(prediction, np.float64) - np.asarray(truth, np.float64)
    for prefix, area in areas.items():
        m = mask & area
        e = diff[m]
        out[f"{prefix}mae_mm"] = float(np.abs(e).mean()) if e.size else None
        out[f"{prefix}rmse_mm"] = float(np.sqrt((e * e).mean())) if e.size else None
    return out


def angle_deg(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float64]:
    """Angles in degrees between unit vectors (..., 3)."""
    cos = np.clip((np.asarray(a, np.float64) * np.asarray(b, np.float64)).sum(-1), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def normal_errors(prediction: NDArray[np.floating], truth: NDArray[np.floating], mask: NDArray[np.bool_],
                  boxes: Mapping[str, RegionBox]) -> dict[str, float | None]:
    """Mean angle (degrees) between two (R, R, 3) normal maps, overall (``normal_deg``) and per region."""
    angles = angle_deg(prediction, truth)
    out: dict[str, float | None] = {}
    areas = {"": np.ones_like(mask)} | {f"{name}_": _box_mask(mask.shape, box) for name, box in sorted(boxes.items())}
    for prefix, area in areas.items():
        a = angles[mask & area]
        out[f"{prefix}normal_deg"] = float(a.mean()) if a.size else None
    return out


def _box_mask(shape: tuple[int, ...], box: RegionBox) -> NDArray[np.bool_]:
    m = np.zeros(shape, bool)
    m[box.row0:box.row1, box.col0:box.col1] = True
    return m


def kabsch(source: F64, target: F64) -> F64:
    """4x4 rigid transform (rotation, translation; no scale, no reflection) best mapping ``source`` onto ``target``."""
    matrix, _, _ = trimesh.registration.procrustes(source, target, reflection=False, translation=True, scale=False)
    return np.asarray(matrix, np.float64)


def rigid_alignment(source: F64, target: F64, config: SurfaceConfig, initial: F64 | None = None,
                    seed: int = 0) -> F64:
    """4x4 rigid transform of ``source`` points onto the ``target`` points by ICP (from ``initial``)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(source), size=min(config.icp_points, len(source)), replace=False)
    matrix, _, _ = trimesh.registration.icp(np.asarray(source, np.float64)[np.sort(pick)], target,
                                            initial=np.eye(4) if initial is None else initial,
                                            max_iterations=config.icp_iterations, reflection=False, scale=False)
    return np.asarray(matrix, np.float64)


def transform(points: F64, matrix: F64) -> F64:
    """Points (N, 3) through a 4x4 transform."""
    return np.asarray(points, np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True)
class Surface:
    """Points and unit normals of a dense surface, with a KD-tree for nearest points."""

    points: F64
    normals: F64

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tree", cKDTree(self.points))

    def subsample(self, count: int, seed: int = 0) -> Surface:
        """At most ``count`` of the points (seeded, in their order)."""
        if len(self.points) <= count:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.points), size=count, replace=False))
        return Surface(self.points[keep], self.normals[keep])

    def nearest(self, query: F64) -> tuple[F64, NDArray[np.int64]]:
        """Distance and index of the nearest point of this surface to each query point."""
        dist, idx = self._tree.query(query, k=1)  # type: ignore[attr-defined]
        return np.asarray(dist, np.float64), np.asarray(idx, np.int64)


def one_way(source: Surface, target: Surface, max_mm: float) -> tuple[F64, F64, NDArray[np.bool_], F64]:
    """From each source point to the target: (point-to-plane distance, normal angle in degrees, counted, nearest
    point distance)."""
    near, idx = target.nearest(source.points)
    offset = source.points - target.points[idx]
    to_plane = np.abs((offset * target.normals[idx]).sum(1))
    angles = angle_deg(source.normals, target.normals[idx])
    return to_plane, angles, near <= max_mm, near


def surface_errors(prediction: Surface, truth: Surface, config: SurfaceConfig) -> dict[str, float | None]:
    """``chamfer_mm`` (mean of the two one-way means), ``mesh_normal_deg`` and ``completeness`` (0..1)."""
    d_pt, a_pt, ok_pt, _ = one_way(prediction, truth, config.max_distance_mm)
    d_tp, a_tp, ok_tp, near_tp = one_way(truth, prediction, config.max_distance_mm)
    if not ok_pt.any() or not ok_tp.any():
        return {"chamfer_mm": None, "mesh_normal_deg": None, "completeness": 0.0}
    return {"chamfer_mm": float(0.5 * (d_pt[ok_pt].mean() + d_tp[ok_tp].mean())),
            "mesh_normal_deg": float(0.5 * (a_pt[ok_pt].mean() + a_tp[ok_tp].mean())),
            "completeness": float((near_tp <= config.complete_mm).mean())}


def yaw_bin(yaw_deg: float, width: float = 15.0) -> str:
    """The bin label of |yaw|, e.g. ``"15-30"``; the last bin is ``"75-90"`` and holds anything beyond."""
    k = min(int(abs(yaw_deg) // width), int(90 // width) - 1)
    return f"{k * width:g}-{(k + 1) * width:g}"


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the values that exist (None when none does)."""
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


# ------------------------------------------------------------------------------------------ one sample, every row
ROWS = ("ours", "zero", "mean_patch", "mean_map", "pca_only", "supervised_only")
"""The rows of the evaluation: the network; the proxy alone (zero displacement); the mean training patch at every
patch place; the mean training map per texel; the network's PCA part without refinement; the network trained
with η = 0."""


@dataclass(frozen=True)
class Baselines:
    """What the baseline rows are made of (from the training pairs)."""

    mean_patch: Mapping[str, NDArray[np.float64]]
    """Per region, the (P, P) mean ground-truth patch."""
    mean_map: NDArray[np.float64]
    """(R, R) mean ground-truth map."""


def mean_baselines(displacements: list[NDArray[np.floating]], masks: list[NDArray[np.bool_]],
                   origins: list[Mapping[str, NDArray[np.integer]]], patch: int) -> Baselines:
    """Mean patch per region (over each map's patch ``origins``) and the mean map, masked texels left out."""
    R = displacements[0].shape[0]
    map_sum, map_n = np.zeros((R, R)), np.zeros((R, R))
    sums: dict[str, NDArray[np.float64]] = {}
    counts: dict[str, NDArray[np.float64]] = {}
    for d, m, where in zip(displacements, masks, origins, strict=True):
        dm = np.where(m, d, 0.0)
        map_sum += dm
        map_n += m
        for region, rc in where.items():
            s = sums.setdefault(region, np.zeros((patch, patch)))
            n = counts.setdefault(region, np.zeros((patch, patch)))
            for r, c in np.asarray(rc).tolist():
                s += dm[r:r + patch, c:c + patch]
                n += m[r:r + patch, c:c + patch]
    return Baselines({r: sums[r] / np.maximum(counts[r], 1) for r in sorted(sums)}, map_sum / np.maximum(map_n, 1))
