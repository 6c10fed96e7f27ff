"""Unwrapping a photo onto its fitted proxy, in the morphable model's UV space.

Every texel of the UV map lies in one triangle of the model's UV layout; which one, and where in
it (barycentric weights), depends only on the model and the resolution, so :class:`UVTexels`
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
from facedetail.model.uvmap import rasterize_uv
from facedetail.proxy.fit import Cameras

TEXTURE_EXT = "texture.png"
"""Name of a photo's UV texture (RGBA PNG, alpha = visible) in a shard sample."""


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
class UVTexels:
    """The covered texels of a resolution x resolution UV map, with sparse blend weights.

    Built on :func:`facedetail.model.uvmap.rasterize_uv` (exact: a texel belongs to the triangle
    that contains its centre), kept as a list of covered texels plus an (M, V) sparse matrix:
    blending per-vertex positions and normals for every photo is then one sparse product.
    """

    resolution: int
    rows: np.ndarray
    """(M,) texel row of each covered texel (v down)."""
    cols: np.ndarray
    """(M,) texel column (u right)."""
    matrix: sp.csr_matrix
    """(M, V) barycentric weights: texel values = matrix @ per-vertex values (3 per row)."""

    @classmethod
    def build(cls, uv: np.ndarray, triangles: np.ndarray, resolution: int) -> UVTexels:
        """Rasterise the UV layout: uv (V, 2) in [0, 1] (u right, v down), triangles (T, 3)."""
        raster = rasterize_uv(uv, triangles, resolution)
        rows, cols = np.nonzero(raster.covered)
        vertex_ids = np.asarray(triangles, np.int64)[raster.triangle[rows, cols]]
        bary = raster.bary[rows, cols]
        matrix = sp.csr_matrix((bary.ravel(), vertex_ids.ravel(), np.arange(0, 3 * len(rows) + 1, 3)),
                               shape=(len(rows), len(uv)))
        return cls(resolution, rows.astype(np.int32), cols.astype(np.int32), matrix)

    def blend(self, per_vertex: np.ndarray) -> np.ndarray:
        """(M, C) texel values blended from (V, C) per-vertex values (float64)."""
        return self.matrix @ np.asarray(per_vertex, dtype=np.float64)

    def image(self, texel_values: np.ndarray, fill: float = 0) -> np.ndarray:
        """Scatter (M, C) texel values into a (R, R, C) map (uncovered texels = ``fill``)."""
        out = np.full((self.resolution, self.resolution, texel_values.shape[1]), fill, texel_values.dtype)
        out[self.rows, self.cols] = texel_values
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
           raster: UVTexels, config: TextureConfig) -> Unwrapped:
    """Unwrap ``photo`` (H, W, 3) uint8 onto a proxy seen by a fitted scaled orthographic camera.

    vertices/normals (V, 3) are the proxy's; ``camera`` is a batch of one fitting-frame camera
    (y up), and ``to_photo`` converts fitting-frame px to ``photo`` px (x' = x·to_photo,
    y' = -y·to_photo).
    """
    pos, nrm = texel_geometry(raster, vertices, normals)
    fit_xy = camera.project(pos[None])[0]
    photo_xy = np.column_stack([fit_xy[:, 0] * to_photo, -fit_xy[:, 1] * to_photo])
    # Cells in the fitting frame, so that the z-buffer is that of the fit (and bytes stay as before).
    cells = fit_xy / (camera.scale[0] * config.zbuffer_cell_mm)
    facing = nrm @ camera.rotation[0, 2] >= np.cos(np.radians(config.max_view_angle_deg))
    return unwrap_texels(photo, photo_xy, camera.depth(pos[None])[0], facing, cells, raster, config)


def unwrap_projective(photo: np.ndarray, vertices: np.ndarray, normals: np.ndarray, projection: np.ndarray,
                      raster: UVTexels, config: TextureConfig) -> Unwrapped:
    """Unwrap ``photo`` onto a proxy seen by a known 3x4 camera ``projection`` (model mm to pixels).

    ``projection`` is perspective (``P = K [R | t]``) or affine (last row ``(0, 0, 0, 1)``), as the
    renders store it (:mod:`facedetail.render.camera`). A texel faces the camera when its normal is
    within ``max_view_angle_deg`` of the direction to the camera centre (perspective) or of the
    viewing direction (affine).
    """
    P = np.asarray(projection, np.float64)
    pos, nrm = texel_geometry(raster, vertices, normals)
    homogeneous = np.hstack([pos, np.ones((len(pos), 1))]) @ P.T
    w = homogeneous[:, 2]
    if np.any(w <= 0):
        raise ValueError("part of the proxy lies behind the camera")
    photo_xy = homogeneous[:, :2] / w[:, None]
    M = P[:, :3]
    if np.allclose(P[2, :3], 0.0):  # affine: one viewing direction
        # OpenCV axes (x right, y down, z away from the viewer): rows 1 x row 2 is +z, so the viewer is at -z.
        towards = -np.cross(M[0], M[1])
        towards = towards / np.linalg.norm(towards)
        depth = pos @ towards  # larger = closer
        facing = nrm @ towards >= np.cos(np.radians(config.max_view_angle_deg))
    else:
        centre = -np.linalg.solve(M, P[:, 3])
        to_camera = centre - pos
        distance = np.linalg.norm(to_camera, axis=1)
        facing = (nrm * to_camera).sum(axis=1) >= np.cos(np.radians(config.max_view_angle_deg)) * distance
        depth = -distance  # larger = closer
    # Pixels per mm from the projection's Jacobian (det(J Jᵀ)^¼), at the median texel: square z-buffer
    # cells of one size in mm over the whole face.
    every = max(1, len(w) // 4096)  # a median over a few thousand texels is as good as over all
    jac = (M[None, :2] - photo_xy[::every, :, None] * M[None, 2:3]) / w[::every, None, None]
    px_per_mm = float(np.median(np.linalg.det(jac @ jac.transpose(0, 2, 1)) ** 0.25))
    cells = photo_xy / (px_per_mm * config.zbuffer_cell_mm)
    return unwrap_texels(photo, photo_xy, depth, facing, cells, raster, config)


def texel_geometry(raster: UVTexels, vertices: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3) positions and (M, 3) unit normals of the covered texels, blended from the proxy's vertices."""
    blended = raster.blend(np.hstack([vertices, normals]))
    pos, nrm = blended[:, :3], blended[:, 3:]
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
    return pos, nrm


def unwrap_texels(photo: np.ndarray, photo_xy: np.ndarray, depth: np.ndarray, facing: np.ndarray,
                  cells: np.ndarray, raster: UVTexels, config: TextureConfig) -> Unwrapped:
    """The shared part of both unwraps: occlusion test, sampling and scattering into the UV map.

    Per covered texel: its photo position (px), its depth (larger = closer, mm), whether it faces the
    camera, and its position in z-buffer cells. The z-buffer holds the closest facing texel per square
    cell of ``zbuffer_cell_mm`` on the face (in pixel cells a small face would get cells whose depth
    range exceeds the tolerance).
    """
    cell = np.floor(cells).astype(np.int64)
    lo = cell.min(axis=0)
    span = cell.max(axis=0) - lo + 1
    flat = (cell[:, 1] - lo[1]) * span[0] + (cell[:, 0] - lo[0])
    zbuf = np.full(int(span[0] * span[1]), -np.inf)
    np.maximum.at(zbuf, flat[facing], depth[facing])
    unoccluded = depth >= zbuf[flat] - config.depth_tolerance_mm
    px = photo_xy[:, 0].astype(np.float32)
    py = photo_xy[:, 1].astype(np.float32)
    h, w = photo.shape[:2]
    inside = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    colours = _sample(photo, px, py)
    visible = facing & unoccluded & inside
    texture = raster.image(np.where(visible[:, None], colours, 0).astype(np.uint8))
    mask = raster.image(visible[:, None].astype(np.uint8))[..., 0].astype(bool)
    return Unwrapped(texture, mask)
