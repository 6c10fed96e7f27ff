"""Rasterization of a mesh in its UV space: per texel, the triangle and barycentric coordinates.

The map is ``R x R`` texels; texel ``(row r, col c)`` is centred at ``u = (c + 0.5) / R``,
``v = (r + 0.5) / R`` (the model's convention: u right, v down, like image rows). A texel
belongs to a triangle when its centre lies inside the triangle's UV image (closed: all three
barycentric coordinates >= 0); a centre on an edge shared by two triangles goes to the lower
triangle index, so the map is deterministic. Any per-vertex attribute (3D position, normal)
is then interpolated with the texel's barycentric coordinates, which is exact for the
piecewise-linear surface.

Why a compiled loop rather than rendering the mesh in UV space with pyrender/OSMesa: the raster
must be exact (float64 barycentrics at texel centres, not 8-bit colours and a GPU's fill rules),
and it depends only on the UV layout and triangles (computed once per process, reused for every
proxy). The per-texel loop runs in numba, its machine code cached on disk beside the module (a
process that finds the cache compiles nothing), in the same float64 operations and order as the
NumPy expressions it replaced (no fastmath, so no fused multiply-adds), so the raster is the same
bytes. The NumPy version, which evaluated each triangle's padded bounding box as arrays and sorted
the claims, took 0.34-0.66 s at 1024² in a fresh process; the loop, loaded from the cache, 0.04 s
(in a process that already runs numba code: else numba's own set-up adds about 0.3 s to the first call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field

from facedetail.config import Config

# A centre this close to an edge (in barycentric units) counts as on it: absorbs the float64
# rounding of the edge functions so that no texel between two triangles is lost.
_EDGE_EPS = 1e-12


class UVChartConfig(Config):
    """The one UV chart of the detail path: texel (row, col) of every map at this resolution is the same
    surface point, whether it is a ground-truth displacement, a photo's UV texture or a network output."""

    resolution: int = Field(1024, ge=16, le=8192)
    """Side of every square UV map of the detail path, in texels (the release: 4096)."""


@dataclass(frozen=True, eq=False)
class UVRaster:
    """Which triangle covers each texel of an ``R x R`` UV map, and where inside it."""

    resolution: int
    """Side R of the map in texels."""
    triangle: NDArray[np.int32]
    """(R, R) covering triangle index, -1 where no triangle covers the texel centre."""
    bary: NDArray[np.float64]
    """(R, R, 3) barycentric coordinates of the texel centre in its triangle (0 outside)."""
    overlap_texels: int
    """Texels whose centre lies strictly inside more than one triangle (a UV layout that folds over)."""

    @cached_property
    def covered(self) -> NDArray[np.bool_]:
        """(R, R) True where a triangle covers the texel."""
        return self.triangle >= 0

    @cached_property
    def texel_uv(self) -> NDArray[np.float64]:
        """(R, R, 2) UV coordinates of every texel centre."""
        centres = (np.arange(self.resolution) + 0.5) / self.resolution
        u, v = np.meshgrid(centres, centres)
        return np.stack([u, v], axis=-1)

    def interpolate(self, triangles: ArrayLike, values: ArrayLike) -> NDArray[np.float64]:
        """(R, R, C) per-vertex ``values`` (V, C) interpolated at every texel; 0 where not covered.

        ``triangles`` must be the (T, 3) array the raster was made from.
        """
        tri = np.asarray(triangles)
        vals = np.asarray(values, np.float64)
        squeeze = vals.ndim == 1
        vals = vals[:, None] if squeeze else vals
        out = np.zeros((self.resolution, self.resolution, vals.shape[1]))
        idx = self.triangle[self.covered]
        corners = tri[idx]  # (N, 3) vertex ids
        b = self.bary[self.covered]
        # Explicit sum of three products (not a matmul): the same bits whatever BLAS threads do.
        out[self.covered] = (b[:, 0:1] * vals[corners[:, 0]] + b[:, 1:2] * vals[corners[:, 1]]
                             + b[:, 2:3] * vals[corners[:, 2]])
        return out[..., 0] if squeeze else out


def _raster_loop(corners: NDArray[np.float64], lo: NDArray[np.int64], hi: NDArray[np.int64],
                 e1: NDArray[np.float64], e2: NDArray[np.float64], area2: NDArray[np.float64],
                 live: NDArray[np.int64], R: int, eps: float, triangle: NDArray[np.int32],
                 bary: NDArray[np.float64], claims: NDArray[np.int32]) -> None:
    """Fill ``triangle``/``bary`` (R*R) with each texel's lowest-index covering triangle; count strict claims."""
    for t in live:  # increasing triangle index: the first claim of a texel is the lowest index
        c0x = corners[t, 0, 0]
        c0y = corners[t, 0, 1]
        inv = 1.0 / area2[t]
        for r in range(lo[t, 1], hi[t, 1] + 1):
            dy = r - c0y
            for c in range(lo[t, 0], hi[t, 0] + 1):
                dx = c - c0x
                b1 = (dx * e2[t, 1] - dy * e2[t, 0]) * inv
                b2 = (dy * e1[t, 0] - dx * e1[t, 1]) * inv
                b0 = 1.0 - b1 - b2
                if b0 >= -eps and b1 >= -eps and b2 >= -eps:
                    texel = r * R + c
                    if b0 > eps and b1 > eps and b2 > eps:
                        claims[texel] += 1
                    if triangle[texel] < 0:
                        triangle[texel] = t
                        # np.clip(b, 0, 1): keeps -0.0 and NaN as they are, like NumPy's.
                        k0 = 0.0 if b0 < 0.0 else (1.0 if b0 > 1.0 else b0)
                        k1 = 0.0 if b1 < 0.0 else (1.0 if b1 > 1.0 else b1)
                        k2 = 0.0 if b2 < 0.0 else (1.0 if b2 > 1.0 else b2)
                        total = k0 + k1 + k2  # NumPy's sum over three values: left to right
                        bary[texel, 0] = k0 / total
                        bary[texel, 1] = k1 / total
                        bary[texel, 2] = k2 / total


@cache
def _compiled_raster_loop() -> Callable[..., None]:
    """:func:`_raster_loop` compiled by numba, its machine code cached beside the module.

    numba is imported here, not with the module: every stage imports this module for
    :class:`UVChartConfig` alone, and importing numba costs 0.3 s. Where no cache folder is writable
    (a read-only install without a home), numba refuses ``cache=True``; the loop then compiles in
    each process instead: same code, same results.
    """
    from facedetail.compiled import cached_njit

    return cached_njit(_raster_loop)


def rasterize_uv(uv: ArrayLike, triangles: ArrayLike, resolution: int) -> UVRaster:
    """Rasterize triangles given by per-vertex ``uv`` (V, 2) in [0, 1] into an ``R x R`` texel map."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    R = int(resolution)
    tri = np.asarray(triangles, np.int64)
    # Continuous texel coordinates: texel centres sit on integers.
    pix = np.asarray(uv, np.float64) * R - 0.5
    corners = np.ascontiguousarray(pix[tri])  # (T, 3, 2), x = column, y = row
    lo = np.maximum(np.ceil(corners.min(axis=1)).astype(np.int64), 0)
    hi = np.minimum(np.floor(corners.max(axis=1)).astype(np.int64), R - 1)
    size = hi - lo + 1  # (T, 2) bbox width, height in texels
    e1 = corners[:, 1] - corners[:, 0]
    e2 = corners[:, 2] - corners[:, 0]
    area2 = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    live = np.flatnonzero((size > 0).all(axis=1) & (np.abs(area2) > 0))
    triangle = np.full(R * R, -1, np.int32)
    bary = np.zeros((R * R, 3))
    claims = np.zeros(R * R, np.int32)
    _compiled_raster_loop()(corners, lo, hi, e1, e2, area2, live, R, _EDGE_EPS, triangle, bary, claims)
    overlap = int(np.count_nonzero(claims > 1))
    return UVRaster(R, triangle.reshape(R, R), bary.reshape(R, R, 3), overlap)


def mm_per_uv(vertices: ArrayLike, uv: ArrayLike, triangles: ArrayLike) -> float:
    """Length in mm of one UV unit, averaged over the mesh: sqrt(3D area / UV area).

    Converts lengths given in mm (a high-pass σ, a wrinkle width) to texels: one texel is
    ``mm_per_uv / R`` mm on average. The local scale varies with the layout's distortion
    (about ±40 % over the Surrey model's face).
    """
    v = np.asarray(vertices, np.float64)[np.asarray(triangles)]
    t = np.asarray(uv, np.float64)[np.asarray(triangles)]
    area3 = 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum()
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area_uv = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()
    if area_uv <= 0:
        raise ValueError("the UV layout has zero area")
    return float(np.sqrt(area3 / area_uv))
