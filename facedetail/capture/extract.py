"""Displacement extraction: signed distance from the proxy to the scan along the proxy normal, per texel.

For every texel of the proxy's UV raster, the proxy's 3D position ``p`` and its interpolated
unit normal ``n`` are known. Two rays are cast on the scan with trimesh: from just behind
``p`` along ``+n`` and from just in front of it along ``-n``; the nearer of the two hits gives
the signed distance ``d`` (positive outwards), so ``p + d n`` lies on the scan. A texel with no
hit within ``max_distance_mm`` is masked. The distance is then split into the proxy's
low-frequency mismatch and the details: ``detail = d - G_σ * d``, with ``G_σ * d`` the
Gaussian-smoothed distance over valid texels only (normalized convolution, so masked texels and
the chart's border do not pull it towards 0). This mirrors the paper's ground truth, the
difference between a detailed and a smooth normal integration of the same scan.

Ray backend: trimesh's Embree wrapper (``embreex``, the default: about 850,000 texels/s, two
rays each, on an 835K-face scan at 1024², see ``bench/capture.py``), or trimesh's NumPy/rtree
intersector (``ray_backend: triangle``: about 30 texels/s on the same scan, because it gathers
candidate triangles from the bounding box of each whole ray; usable for tiny maps only). There is no
automatic fallback: without ``embreex`` the default stops with the install hint, rather than
running for days. The hit triangle comes from the backend; the hit distance is recomputed here
in float64 from that triangle's plane, so both backends give the same numbers wherever they
agree on the triangle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import trimesh
from numpy.typing import ArrayLike, NDArray
from pydantic import Field
from scipy import fft as sp_fft
from scipy.ndimage import fourier_gaussian

from facedetail.config import Config
from facedetail.errors import FacedetailError
from facedetail.model.uvmap import UVRaster, mm_per_uv

RayBackend = Literal["embree", "triangle"]
# Rays start this far behind the proxy point so that a scan exactly on the proxy (d = 0) is hit.
_RAY_START_MM = 1e-3
# Rays per backend call: bounds the temporary arrays at 4096² (about 13M texels, 2 rays each).
_RAY_CHUNK = 2_000_000


class ExtractConfig(Config):
    """How displacement is measured from the proxy to the scan."""

    max_distance_mm: float = Field(5.0, gt=0)
    """Texels whose ray meets the scan no nearer than this (either side) are masked."""
    highpass_sigma_mm: float = Field(4.0, ge=0)
    """σ of the Gaussian whose smoothed copy is subtracted (mm on the face; 0 = keep the raw distance)."""
    max_fold_deg: float = Field(45.0, gt=0, le=180)
    """Mask texels where the proxy's interpolated normal is further than this from its triangle's normal:
    there the proxy is folded or crumpled (it happens at the Surrey model's outer border for some
    identities) and "along the normal" has no meaning."""
    ray_backend: RayBackend = "embree"
    """``embree`` (trimesh with ``embreex``) or ``triangle`` (trimesh's NumPy intersector, needs ``rtree``;
    four orders of magnitude slower, for tiny maps only)."""


def embree_available() -> bool:
    """Whether trimesh can use Embree (the ``embreex`` package imports)."""
    from trimesh import ray

    return bool(ray.has_embree)


class RayCaster:
    """First-hit ray queries on one mesh through trimesh, with the backend chosen once."""

    def __init__(self, mesh: trimesh.Trimesh, backend: RayBackend = "embree") -> None:
        self.mesh = mesh
        if backend == "embree":
            if not embree_available():
                raise FacedetailError("ray_backend 'embree' needs the embreex package (pip install embreex); "
                                      "ray_backend 'triangle' runs without it, four orders of magnitude slower")
            from trimesh.ray.ray_pyembree import RayMeshIntersector
        else:
            try:
                import rtree  # noqa: F401 - trimesh's NumPy intersector needs it for its triangle tree
            except ImportError:
                raise FacedetailError("ray_backend 'triangle' needs the rtree package: pip install rtree") from None
            from trimesh.ray.ray_triangle import RayMeshIntersector
        self.backend: str = backend
        self._intersector = RayMeshIntersector(mesh)
        self._v0 = np.asarray(mesh.vertices, np.float64)[np.asarray(mesh.faces)[:, 0]]
        self._normals = np.asarray(mesh.face_normals, np.float64)

    def first_hit(self, origins: NDArray[np.float64], directions: NDArray[np.float64]) -> NDArray[np.float64]:
        """(N,) distance along each unit direction to the first hit, ``inf`` where the ray misses."""
        out = np.full(len(origins), np.inf)
        for start in range(0, len(origins), _RAY_CHUNK):
            o = origins[start:start + _RAY_CHUNK]
            d = directions[start:start + _RAY_CHUNK]
            tri = np.asarray(self._intersector.intersects_first(o, d), np.int64)
            hit = np.flatnonzero(tri >= 0)
            if hit.size == 0:
                continue
            nf = self._normals[tri[hit]]
            denom = np.einsum("ij,ij->i", d[hit], nf)
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.einsum("ij,ij->i", self._v0[tri[hit]] - o[hit], nf) / denom
            ok = np.abs(denom) > 1e-12
            out[start + hit[ok]] = t[ok]
        return out


def signed_distance(caster: RayCaster, points: NDArray[np.float64], normals: NDArray[np.float64],
                    max_distance: float) -> NDArray[np.float64]:
    """(N,) signed distance from each point along its unit normal to the mesh; NaN beyond ``max_distance``."""
    p = np.asarray(points, np.float64)
    n = np.asarray(normals, np.float64)
    ahead = caster.first_hit(p - _RAY_START_MM * n, n) - _RAY_START_MM
    behind = caster.first_hit(p + _RAY_START_MM * n, -n) - _RAY_START_MM
    ahead[(ahead < -_RAY_START_MM) | (ahead > max_distance)] = np.inf
    behind[(behind < -_RAY_START_MM) | (behind > max_distance)] = np.inf
    d = np.where(behind < ahead, -behind, ahead)
    d[~np.isfinite(d)] = np.nan
    return d


def gaussian_blur(images: NDArray[np.float64], sigma: float) -> NDArray[np.float64]:
    """Gaussian blur of (..., H, W) images with zeros outside, through the FFT.

    Why not ``scipy.ndimage.gaussian_filter``: at 4096² the high-pass σ is ~75 texels and the
    direct filter costs ~600 taps per texel and pass (12 s per map, measured); multiplying by
    the Gaussian's transform costs the same for any σ (under 3 s). The images are zero-padded by
    5σ so that the FFT's wrap-around adds nothing measurable (the kernel is below 4e-6 there).
    """
    pad = int(np.ceil(5.0 * sigma))
    H, W = images.shape[-2:]
    shape = (sp_fft.next_fast_len(H + 2 * pad, real=True), sp_fft.next_fast_len(W + 2 * pad, real=True))
    spectrum = sp_fft.rfft2(images, s=shape)
    spectrum = fourier_gaussian(spectrum, sigma=(0,) * (images.ndim - 2) + (sigma, sigma), n=shape[1])
    return sp_fft.irfft2(spectrum, s=shape)[..., :H, :W]


def highpass(values: NDArray[np.floating], mask: NDArray[np.bool_], sigma_texels: float) -> NDArray[np.float64]:
    """``values - G_σ * values`` over ``mask`` (normalized convolution); 0 outside the mask."""
    m = np.asarray(mask, bool)
    v = np.where(m, np.asarray(values, np.float64), 0.0)
    if sigma_texels <= 0:
        return v
    weight, smooth = gaussian_blur(np.stack([m.astype(np.float64), v]), sigma_texels)
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(weight > 1e-9, smooth / weight, 0.0)
    return np.where(m, v - low, 0.0)


def _derivative(values: NDArray[np.float64], valid: NDArray[np.bool_], axis: int) -> NDArray[np.float64]:
    """Finite difference along a texel axis: central where both neighbours are valid, else one-sided, else 0."""
    lo = [slice(None), slice(None)]
    hi = [slice(None), slice(None)]
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    lo_t, hi_t = tuple(lo), tuple(hi)
    ok = valid[lo_t] & valid[hi_t]
    step = values[hi_t] - values[lo_t]
    step[~ok] = 0.0
    out = np.zeros_like(values)
    out[lo_t] += step  # forward difference of each texel
    out[hi_t] += step  # plus its backward difference
    count = np.zeros(valid.shape, np.float64)
    count[lo_t] += ok
    count[hi_t] += ok
    out /= np.maximum(count, 1.0).reshape(count.shape + (1,) * (values.ndim - 2))
    return out


def detail_normals(positions: NDArray[np.float64], normals: NDArray[np.float64], displacement: NDArray[np.floating],
                   mask: NDArray[np.bool_], covered: NDArray[np.bool_]) -> NDArray[np.float64]:
    """(R, R, 3) unit normals of the detailed surface ``P + D·N`` in model space; 0 outside ``covered``.

    ``n ∝ N - ∇D``, with ``∇D`` the surface gradient of the displacement (from its texel differences
    and the UV Jacobian ``[P_u, P_v]``): the first-order normal of ``P + D·N`` for details much smaller
    than the face's curvature radius. The proxy's smooth (interpolated) normal is the base rather
    than the normal of ``P`` itself, whose flat triangles (3.8 mm edges on the Surrey model) would
    otherwise show as facets in every normal map. Outside ``mask`` the proxy normal is kept.
    """
    cov = np.asarray(covered, bool)
    valid = np.asarray(mask, bool)
    d = np.where(valid, np.asarray(displacement, np.float64), 0.0)
    pu, pv = _derivative(positions, cov, 1), _derivative(positions, cov, 0)
    du, dv = _derivative(d, valid, 1), _derivative(d, valid, 0)
    guu = np.einsum("ijk,ijk->ij", pu, pu)
    guv = np.einsum("ijk,ijk->ij", pu, pv)
    gvv = np.einsum("ijk,ijk->ij", pv, pv)
    det = guu * gvv - guv * guv
    ok = valid & (det > 1e-12 * np.maximum(guu * gvv, 1e-300))
    safe = np.where(ok, det, 1.0)
    a = np.where(ok, (gvv * du - guv * dv) / safe, 0.0)
    b = np.where(ok, (guu * dv - guv * du) / safe, 0.0)
    n = normals - a[..., None] * pu - b[..., None] * pv
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-300)
    return np.where(cov[..., None], n, 0.0)


@dataclass(frozen=True)
class ProxyMaps:
    """A proxy in UV space: per texel its 3D position, unit normal and triangle normal, and the mean texel size."""

    positions: NDArray[np.float64]
    """(R, R, 3) mm, 0 outside the chart."""
    normals: NDArray[np.float64]
    """(R, R, 3) interpolated vertex normals, renormalized; 0 outside the chart."""
    fold_cos: NDArray[np.float32]
    """(R, R) cosine between the interpolated normal and the covering triangle's normal (1 outside)."""
    covered: NDArray[np.bool_]
    texel_mm: float
    """Mean texel size in mm (:func:`facedetail.model.uvmap.mm_per_uv` / R)."""

    @classmethod
    def from_mesh(cls, raster: UVRaster, vertices: ArrayLike, triangles: ArrayLike, uv: ArrayLike,
                  vertex_normals: ArrayLike) -> ProxyMaps:
        """Interpolate a mesh (vertices, its unit vertex normals) over the raster made from ``uv``/``triangles``."""
        verts = np.asarray(vertices, np.float64)
        tri = np.asarray(triangles)
        # One pass over the texels for both attributes: the gathers dominate at 4096².
        both = raster.interpolate(tri, np.hstack([verts, np.asarray(vertex_normals, np.float64)]))
        positions, normals = both[..., :3], both[..., 3:]
        length = np.linalg.norm(normals, axis=-1, keepdims=True)
        normals = np.where(length > 0, normals / np.where(length > 0, length, 1.0), 0.0)
        corners = verts[tri]
        fn = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-300)
        cov = raster.covered
        fold_cos = np.ones(cov.shape, np.float32)
        fold_cos[cov] = np.einsum("ij,ij->i", normals[cov], fn[raster.triangle[cov]])
        texel = mm_per_uv(verts, uv, tri) / raster.resolution
        return cls(positions, normals, fold_cos, cov, texel)

    def folded(self, max_fold_deg: float) -> NDArray[np.bool_]:
        """(R, R) True where the interpolated normal is more than ``max_fold_deg`` from the triangle's."""
        return self.covered & (self.fold_cos < np.cos(np.radians(max_fold_deg)))


@dataclass(frozen=True)
class DisplacementMaps:
    """The extraction's result for one scan, all (R, R) in the proxy's UV space."""

    distance: NDArray[np.float32]
    """Raw signed proxy-to-scan distance (mm, positive outwards); NaN where masked."""
    displacement: NDArray[np.float32]
    """High-passed distance: the details (mm); 0 where masked."""
    mask: NDArray[np.bool_]
    """True where the displacement is valid (covered by the proxy's UV chart and hit within range)."""
    normals: NDArray[np.float32]
    """(R, R, 3) unit normals of the detailed surface ``P + D·N`` in model space; 0 outside the chart."""
    covered: NDArray[np.bool_]
    """True where the proxy's UV chart covers the texel."""
    folded: NDArray[np.bool_]
    """True where the proxy is folded (masked, see ``max_fold_deg``)."""
    sigma_texels: float
    """The high-pass σ in texels (``highpass_sigma_mm`` over the proxy's mean texel size)."""
    backend: str
    """Ray backend used."""

    @property
    def masked_fraction(self) -> float:
        """Fraction of the chart's texels without a valid displacement."""
        return float(1.0 - self.mask.sum() / max(int(self.covered.sum()), 1))


def extract_displacement(proxy: ProxyMaps, scan: trimesh.Trimesh, config: ExtractConfig,
                         caster: RayCaster | None = None) -> DisplacementMaps:
    """Displacement maps of ``scan`` (mm, already in the proxy's frame) over the proxy's texels."""
    cov = proxy.covered
    folded = proxy.folded(config.max_fold_deg)
    cast = cov & ~folded
    caster = caster or RayCaster(scan, config.ray_backend)
    distance = np.full(cov.shape, np.nan)
    distance[cast] = signed_distance(caster, proxy.positions[cast], proxy.normals[cast], config.max_distance_mm)
    mask = cast & np.isfinite(distance)
    sigma = config.highpass_sigma_mm / proxy.texel_mm if proxy.texel_mm > 0 else 0.0
    detail = highpass(distance, mask, sigma)
    normal_map = detail_normals(proxy.positions, proxy.normals, detail, mask, cov)
    return DisplacementMaps(distance.astype(np.float32), detail.astype(np.float32), mask,
                            normal_map.astype(np.float32), cov, folded, float(sigma), caster.backend)
