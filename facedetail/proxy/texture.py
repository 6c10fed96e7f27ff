"""Unwrapping a photo onto its fitted proxy, in the morphable model's UV space.

Every texel of the UV map lies in one triangle of the model's UV layout; which one, and where in
it (barycentric weights), depends only on the model and the resolution, so :class:`UVRaster`
computes it once. Per photo, a texel's 3-D position and normal are the barycentric blend of
the proxy's vertices; the texel takes the photo's colour where its position projects, if it is
visible: facing the camera by more than ``max_view_angle_deg`` (back faces and grazing angles
give smeared colour) and not hidden behind another part of the face (a depth test against a
z-buffer splatted from all texels, in cells of a fixed size on the face).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.sparse as sp
from pydantic import Field

from facedetail.config import Config
from facedetail.proxy.fit import Cameras

# cv2.fillPoly's fixed-point precision: vertices are rounded to 1/2**_SHIFT texel.
_SHIFT = 8


class TextureConfig(Config):
    """How photos are unwrapped into UV textures."""

    resolution: int = Field(512, ge=16, le=8192)
    """Side of the square UV texture in texels (the paper's network input: 512 here, 4096 in the release)."""
    max_view_angle_deg: float = Field(75.0, gt=0, le=90)
    """Texels whose normal is further than this from the viewing direction are masked (grazing)."""
    png_compression: int = Field(3, ge=0, le=9)
    """zlib level of the stored texture PNGs (measured at 512²: 1 = 10 ms/115 KB, 3 = 14 ms/101 KB,
    6 = 30 ms/81 KB per texture)."""
    depth_tolerance_mm: float = Field(5.0, gt=0)
    """A texel is occluded when the z-buffer holds a point this much closer to the camera."""
    zbuffer_cell_mm: float = Field(2.0, gt=0)
    """Z-buffer cell size on the face (so the test does not depend on the face's size in the photo)."""


@dataclass(frozen=True)
class UVRaster:
    """Which triangle (and barycentric weights) covers each texel of a resolution x resolution UV map."""

    resolution: int
    rows: np.ndarray
    """(M,) texel row of each covered texel (v down)."""
    cols: np.ndarray
    """(M,) texel column (u right)."""
    triangle: np.ndarray
    """(M,) the covering triangle."""
    bary: np.ndarray
    """(M, 3) barycentric weights of the triangle's vertices at the texel centre (sum to 1, >= 0)."""
    vertex_ids: np.ndarray
    """(M, 3) the triangle's vertex indices (for blending per-vertex values)."""
    matrix: sp.csr_matrix
    """(M, V) sparse blend weights: texel values = matrix @ per-vertex values (3 per row)."""

    @classmethod
    def build(cls, uv: np.ndarray, triangles: np.ndarray, resolution: int) -> UVRaster:
        """Rasterise the UV layout: uv (V, 2) in [0, 1] (u right, v down), triangles (T, 3)."""
        ids = np.zeros((resolution, resolution), np.int32)
        corners = np.rint(uv[triangles] * resolution * (1 << _SHIFT) - 0.5 * (1 << _SHIFT)).astype(np.int32)
        # One fillPoly per triangle, triangle id + 1 as the "colour" (0 = uncovered); later
        # triangles win on shared edges, which only decides which of two equal blends is used.
        for t, poly in enumerate(corners):
            cv2.fillPoly(ids, [poly.reshape(-1, 1, 2)], t + 1, lineType=cv2.LINE_8, shift=_SHIFT)
        rows, cols = np.nonzero(ids)
        tri = ids[rows, cols] - 1
        p = np.stack([(cols + 0.5) / resolution, (rows + 0.5) / resolution], axis=1)
        uv64 = uv.astype(np.float64)
        bary = _barycentric(uv64[triangles[tri]], p)
        # fillPoly also claims texels a fraction of a texel outside a triangle's edges. Where such a
        # texel lies inside a neighbouring triangle (one sharing a vertex), use that one instead.
        outside = np.flatnonzero(bary.min(axis=1) < -1e-9)
        if outside.size:
            incident = _incident_triangles(triangles, len(uv))
            cand = incident[triangles[tri[outside]]].reshape(len(outside), -1)  # (n, 3 * max degree)
            cb = _barycentric(uv64[triangles[np.maximum(cand, 0)]], p[outside, None, :])
            score = np.where(cand >= 0, cb.min(axis=2), -np.inf)
            best = np.argmax(score, axis=1)
            better = score[np.arange(len(outside)), best] > bary[outside].min(axis=1)
            fix = outside[better]
            tri[fix] = cand[better, best[better]]
            bary[fix] = cb[better, best[better]]
        # What remains outside (the layout's outer border) is clamped onto its triangle, unless the
        # texel centre is more than a texel away from it: then it is not part of the layout.
        bary = np.clip(bary, 0.0, 1.0)
        bary /= bary.sum(axis=1, keepdims=True)
        nearest = np.einsum("mk,mkc->mc", bary, uv64[triangles[tri]])
        keep = np.abs(nearest - p).max(axis=1) * resolution <= 1.0
        rows, cols, tri, bary = rows[keep], cols[keep], tri[keep], bary[keep]
        vertex_ids = triangles[tri].astype(np.int64)
        # A sparse product blends a per-vertex array ~10x faster than a gather + einsum.
        matrix = sp.csr_matrix((bary.ravel(), vertex_ids.ravel(), np.arange(0, 3 * len(tri) + 1, 3)),
                               shape=(len(tri), len(uv)))
        return cls(resolution, rows.astype(np.int32), cols.astype(np.int32), tri.astype(np.int32),
                   bary.astype(np.float32), vertex_ids, matrix)

    def blend(self, per_vertex: np.ndarray) -> np.ndarray:
        """(M, C) texel values blended from (V, C) per-vertex values (float64)."""
        return self.matrix @ np.asarray(per_vertex, dtype=np.float64)

    def image(self, texel_values: np.ndarray, fill: float = 0) -> np.ndarray:
        """Scatter (M, C) texel values into a (R, R, C) map (uncovered texels = ``fill``)."""
        out = np.full((self.resolution, self.resolution, texel_values.shape[1]), fill, texel_values.dtype)
        out[self.rows, self.cols] = texel_values
        return out


def _barycentric(corners: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Barycentric weights (..., 3) of points p (..., 2) in triangles corners (..., 3, 2)."""
    a, b, c = corners[..., 0, :], corners[..., 1, :], corners[..., 2, :]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    den = np.where(np.abs(den) < 1e-20, 1e-20, den)
    w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
    w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
    return np.stack([1.0 - w1 - w2, w1, w2], axis=-1)


def _incident_triangles(triangles: np.ndarray, n_vertices: int) -> np.ndarray:
    """(V, max degree) triangles around each vertex, padded with -1."""
    vert = triangles.ravel()
    tri = np.repeat(np.arange(len(triangles)), 3)
    order = np.argsort(vert, kind="stable")
    vert, tri = vert[order], tri[order]
    counts = np.bincount(vert, minlength=n_vertices)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full((n_vertices, max(int(counts.max()), 1)), -1, np.int64)
    out[vert, np.arange(len(vert)) - starts[vert]] = tri
    return out


@dataclass(frozen=True)
class Unwrapped:
    """One photo in UV space."""

    texture: np.ndarray
    """(R, R, 3) uint8 colours, 0 where not visible."""
    mask: np.ndarray
    """(R, R) bool: texel visible in the photo."""

    def rgba(self) -> np.ndarray:
        """(R, R, 4) uint8 with the mask as alpha, for PNG storage."""
        return np.dstack([self.texture, self.mask.astype(np.uint8) * 255])


def hsv_value(texture: np.ndarray) -> np.ndarray:
    """The V channel of HSV (max of R, G, B), the detail network's input, as float32 in [0, 1]."""
    return texture[..., :3].max(axis=-1).astype(np.float32) / 255.0


def _sample(photo: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """(M, 3) bilinear samples; cv2.remap maps must be under 32767 per side, so M is folded into rows."""
    m = len(px)
    width = 1024
    rows = -(-m // width)
    map_x = np.zeros(rows * width, np.float32)
    map_y = np.zeros(rows * width, np.float32)
    map_x[:m], map_y[:m] = px, py
    out = cv2.remap(photo, map_x.reshape(rows, width), map_y.reshape(rows, width), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * width, -1)[:m]


def unwrap(photo: np.ndarray, vertices: np.ndarray, normals: np.ndarray, camera: Cameras, to_photo: float,
           raster: UVRaster, config: TextureConfig) -> Unwrapped:
    """Unwrap ``photo`` (H, W, 3) uint8 onto a proxy.

    vertices/normals (V, 3) are the proxy's; ``camera`` is a batch of one fitting-frame camera
    (y up), and ``to_photo`` converts fitting-frame px to ``photo`` px (x' = x·to_photo,
    y' = -y·to_photo).
    """
    blended = raster.blend(np.hstack([vertices, normals]))
    pos, nrm = blended[:, :3], blended[:, 3:]
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
    fit_xy = camera.project(pos[None])[0]
    depth = camera.depth(pos[None])[0]
    facing = nrm @ camera.rotation[0, 2] >= np.cos(np.radians(config.max_view_angle_deg))
    # Z-buffer of square cells zbuffer_cell_mm wide on the face, from the facing texels only: in
    # pixel cells a small face would get cells whose depth range exceeds the tolerance.
    cell = np.floor(fit_xy / (camera.scale[0] * config.zbuffer_cell_mm)).astype(np.int64)
    lo = cell.min(axis=0)
    span = cell.max(axis=0) - lo + 1
    flat = (cell[:, 1] - lo[1]) * span[0] + (cell[:, 0] - lo[0])
    zbuf = np.full(int(span[0] * span[1]), -np.inf)
    np.maximum.at(zbuf, flat[facing], depth[facing])
    unoccluded = depth >= zbuf[flat] - config.depth_tolerance_mm
    px = (fit_xy[:, 0] * to_photo).astype(np.float32)
    py = (-fit_xy[:, 1] * to_photo).astype(np.float32)
    h, w = photo.shape[:2]
    inside = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    colours = _sample(photo, px, py)
    visible = facing & unoccluded & inside
    texture = raster.image(np.where(visible[:, None], colours, 0).astype(np.uint8))
    mask = raster.image(visible[:, None].astype(np.uint8))[..., 0].astype(bool)
    return Unwrapped(texture, mask)
