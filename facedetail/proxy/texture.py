"""Unwrapping a photo onto its fitted proxy, in the morphable model's UV space.

Every texel of the UV map lies in one triangle of the model's UV layout; which one, and where in
it (barycentric weights), depends only on the model and the resolution, so :class:`UVTexels`
computes it once. Per photo, a texel's 3-D position and normal are the barycentric blend of
the proxy's vertices; the texel takes the photo's colour where its position projects, if it is
visible: facing the camera by more than ``max_view_angle_deg`` (back faces and grazing angles
give smeared colour) and not hidden behind another part of the face (a depth test against a
z-buffer splatted from the texels, in cells of a fixed size on the face).

The per-texel work runs in compiled loops (numba). The orthographic unwrap of the fits
(:func:`unwrap`) works per triangle, where the texel values are affine, along runs of a row
(:class:`TexelRuns`), and splats its z-buffer from a fixed grid of texels; where exact bounds of a
triangle's values settle its facing or depth test, the test runs once for the triangle instead of
once per texel, with the same outcome. Its cost per texel is a few multiply-adds; the general one
(:func:`unwrap_projective`, known 3x4 cameras) blends every texel from the sparse weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import cv2
import numpy as np
import scipy.sparse as sp
from pydantic import Field

from facedetail.compiled import cached_njit
from facedetail.config import Config
from facedetail.io.images import encode_png, encode_png_fast
from facedetail.model.uvmap import rasterize_uv
from facedetail.proxy.fit import Cameras

TEXTURE_EXT = "texture.png"
"""Name of a photo's UV texture (RGBA PNG, alpha = visible) in a shard sample."""


def _jit(**options: object) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """The texel loops' :func:`facedetail.compiled.cached_njit`, with numpy's error model (no exceptions
    on a division by zero: the loops' divisions are guarded)."""
    return cached_njit(error_model="numpy", **options)


class TextureConfig(Config):
    """How photos are unwrapped into UV textures."""

    resolution: int = Field(512, ge=16, le=8192)
    """Side of the square UV texture in texels (the paper's network input: 512 here, 4096 in the release)."""
    max_view_angle_deg: float = Field(75.0, gt=0, le=90)
    """Texels whose normal is further than this from the viewing direction are masked (grazing)."""
    png_encoder: Literal["isal", "opencv"] = "isal"
    """How a texture PNG is written (:func:`encode_texture`). ``isal``: every row filtered "Up", deflated by
    ISA-L at its level 1 (of 0-3: the fastest and the smallest on UV textures); ``opencv``: libpng with
    its per-row filter search and zlib at ``png_compression``. Measured per 1024² texture
    (``bench/proxy.py --encodings``): isal 4 ms / 430 KB, opencv level 1 45 ms / 480 KB, level 3
    64 ms / 435 KB; WebP lossless 28 ms / 350 KB at its fastest method; raw RGBA 4.2 MB."""
    png_compression: int = Field(3, ge=0, le=9)
    """zlib level of ``opencv`` PNGs (``isal`` does not read it)."""
    depth_tolerance_mm: float = Field(5.0, gt=0)
    """A texel is occluded when the z-buffer holds a point this much closer to the camera."""
    zbuffer_cell_mm: float = Field(2.0, gt=0)
    """Z-buffer cell size on the face (so the test does not depend on the face's size in the photo)."""


ZBUFFER_GRID = 256
"""About this many texels per side splat the unwrap's z-buffer (~1 mm apart on the face: several per 2 mm cell)."""

BOX_CELLS = 64
"""A triangle whose photo box covers at most this many z-buffer cells gets its depth test decided once (all of
its texels pass it, or all fail it) where the cells' depths allow; larger ones test texel by texel."""


@dataclass(frozen=True)
class TexelRuns:
    """Texels of the UV layout as runs along a row, triangle by triangle (the unwrap's loop order).

    Entry e is layout triangle ``triangle[e]``; its texels are the runs ``starts[e]:starts[e + 1]``, in row-major
    order, run q being ``(rows[q], c)`` for c in ``range(first[q], stop[q], step)``. About an eighth as many runs as
    texels at 1024²: the loop evaluates a triangle's affine values once per run and writes each run's texels
    contiguously. The entries' order is chosen by :meth:`group`; each entry carries the triangle's data the loop
    reads, so that any order reads memory in sequence.
    """

    triangle: np.ndarray
    """(E,) int32 the layout triangle of each entry (each triangle with texels once)."""
    corners: np.ndarray
    """(E, 3) int32 its vertex ids."""
    to_bary: np.ndarray
    """(E, 3, 3) its map from a texel centre (column, row, 1) to barycentric weights (:attr:`UVTexels.to_bary`)."""
    box: np.ndarray
    """(E, 4) int32 the first and last row and the first and last column of its texels."""
    starts: np.ndarray
    """(E + 1,) int64 offsets into the runs."""
    rows: np.ndarray
    """(N,) int32 row of each run."""
    first: np.ndarray
    """(N,) int32 its first column."""
    stop: np.ndarray
    """(N,) int32 the column after its last one (``first + k * step`` for its k texels)."""
    step: int
    """Column step within a run (1 for every texel, the grid's stride for the z-buffer texels)."""

    @classmethod
    def group(cls, triangle: np.ndarray, rows: np.ndarray, cols: np.ndarray, triangles: np.ndarray,
              to_bary: np.ndarray, step: int = 1, by_row: bool = False) -> TexelRuns:
        """Group texels (row-major order, columns a multiple of ``step`` apart) by their ``triangle`` index into
        ``triangles``/``to_bary``; entries in the layout's order, or ``by_row``: by each triangle's first texel."""
        triangle = np.asarray(triangle, np.int64)
        order = np.argsort(triangle, kind="stable")
        if by_row and len(order):  # move each triangle's texels, kept together, to its first texel's place
            heads = np.flatnonzero(np.r_[True, triangle[order[1:]] != triangle[order[:-1]]])
            lengths = np.diff(np.append(heads, len(order)))
            moved = np.argsort(order[heads], kind="stable")
            head, length = heads[moved], lengths[moved]
            order = order[np.repeat(head - (np.cumsum(length) - length), length) + np.arange(len(order))]
        tri, r, c = triangle[order], np.asarray(rows, np.int64)[order], np.asarray(cols, np.int64)[order]
        # A run starts where the triangle or the row changes or the next column is not ``step`` further on.
        new = np.ones(len(tri), np.bool_)
        new[1:] = (tri[1:] != tri[:-1]) | (r[1:] != r[:-1]) | (c[1:] != c[:-1] + step)
        heads = np.flatnonzero(new)
        tails = np.append(heads[1:], len(tri)) - 1
        entry_texel = np.flatnonzero(np.r_[True, tri[1:] != tri[:-1]]) if len(tri) else np.zeros(0, np.int64)
        entry = tri[entry_texel]
        starts = np.searchsorted(heads, np.append(entry_texel, len(tri))).astype(np.int64)
        box = np.zeros((len(entry), 4), np.int32)
        for k, (values, reduce) in enumerate([(r, np.minimum), (r, np.maximum), (c, np.minimum), (c, np.maximum)]):
            if len(entry):
                box[:, k] = reduce.reduceat(values, entry_texel)
        return cls(entry.astype(np.int32), np.ascontiguousarray(triangles[entry], np.int32),
                   np.ascontiguousarray(to_bary[entry]), box, starts, r[heads].astype(np.int32),
                   c[heads].astype(np.int32), (c[tails] + step).astype(np.int32), int(step))

    def count(self) -> int:
        """Number of texels in the runs."""
        return int(((self.stop.astype(np.int64) - self.first + self.step - 1) // self.step).sum())


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
    triangles: np.ndarray
    """(T, 3) int32 vertex ids of the layout's triangles."""
    to_bary: np.ndarray
    """(T, 3, 3) per triangle: barycentric weights = to_bary @ (column, row, 1) of a texel centre."""
    by_triangle: TexelRuns
    """Every covered texel, as runs grouped by triangle, the triangles by their first texel (row-major): the
    unwrap's order, which writes its maps a band of rows at a time (0.2 ms of 5 less than the layout's order at
    1024²)."""
    zbuffer_texels: TexelRuns
    """The covered texels of every ``R // ZBUFFER_GRID``-th row and column (about ``ZBUFFER_GRID``² over the
    map), by triangle: the unwrap's z-buffer is splatted from these, at the same density on the face at
    every resolution from ``ZBUFFER_GRID`` up (all texels below it)."""

    @classmethod
    def build(cls, uv: np.ndarray, triangles: np.ndarray, resolution: int) -> UVTexels:
        """Rasterise the UV layout: uv (V, 2) in [0, 1] (u right, v down), triangles (T, 3)."""
        raster = rasterize_uv(uv, triangles, resolution)
        rows, cols = np.nonzero(raster.covered)
        vertex_ids = np.asarray(triangles, np.int64)[raster.triangle[rows, cols]]
        bary = raster.bary[rows, cols]
        matrix = sp.csr_matrix((bary.ravel(), vertex_ids.ravel(), np.arange(0, 3 * len(rows) + 1, 3)),
                               shape=(len(rows), len(uv)))
        tri = np.asarray(triangles, np.int64)
        texel_triangle = raster.triangle[rows, cols].astype(np.int64)
        stride = max(1, resolution // ZBUFFER_GRID)
        on_grid = (rows % stride == 0) & (cols % stride == 0)
        to_bary = _to_bary(uv, tri, resolution)
        return cls(resolution, rows.astype(np.int32), cols.astype(np.int32), matrix,
                   np.ascontiguousarray(tri, np.int32), to_bary,
                   TexelRuns.group(texel_triangle, rows, cols, tri, to_bary, by_row=True),
                   TexelRuns.group(texel_triangle[on_grid], rows[on_grid], cols[on_grid], tri, to_bary, stride,
                                   by_row=True))

    def blend(self, per_vertex: np.ndarray) -> np.ndarray:
        """(M, C) texel values blended from (V, C) per-vertex values (float64)."""
        return self.matrix @ np.asarray(per_vertex, dtype=np.float64)

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The blend matrix's (indptr, indices, data), as the compiled loops read them."""
        m = self.matrix
        return m.indptr, m.indices, m.data

    def image(self, texel_values: np.ndarray, fill: float = 0) -> np.ndarray:
        """Scatter (M, C) texel values into a (R, R, C) map (uncovered texels = ``fill``)."""
        out = np.full((self.resolution, self.resolution, texel_values.shape[1]), fill, texel_values.dtype)
        out[self.rows, self.cols] = texel_values
        return out


def _to_bary(uv: np.ndarray, triangles: np.ndarray, resolution: int) -> np.ndarray:
    """(T, 3, 3) maps from a texel centre (column, row, 1) to its barycentric weights in each triangle, in
    :func:`facedetail.model.uvmap.rasterize_uv`'s texel coordinates (centres on integers); 0 for triangles
    without area in UV (they cover no texel)."""
    corners = (np.asarray(uv, np.float64) * resolution - 0.5)[triangles]  # (T, 3, 2)
    homogeneous = np.ones((len(triangles), 3, 3))
    homogeneous[:, 0], homogeneous[:, 1] = corners[..., 0], corners[..., 1]
    out = np.zeros_like(homogeneous)
    live = np.abs(np.linalg.det(homogeneous)) > 1e-12
    out[live] = np.linalg.inv(homogeneous[live])
    return out


@dataclass(frozen=True)
class Unwrapped:
    """One photo in UV space, as the RGBA map that is stored (alpha 255 = visible, 0 = not seen)."""

    rgba_map: np.ndarray
    """(R, R, 4) uint8: colour where visible (0 elsewhere), alpha = visible."""
    visible: int | None = None
    """How many texels are visible, when the unwrap counted them (else :meth:`coverage` counts the alpha)."""

    @classmethod
    def from_maps(cls, texture: np.ndarray, mask: np.ndarray) -> Unwrapped:
        """From (R, R, 3) uint8 colours and an (R, R) bool visibility mask."""
        return cls(_rgba(np.ascontiguousarray(texture), np.ascontiguousarray(mask)))

    @cached_property
    def texture(self) -> np.ndarray:
        """(R, R, 3) uint8 colours, 0 where not visible."""
        return np.ascontiguousarray(self.rgba_map[..., :3])

    @cached_property
    def mask(self) -> np.ndarray:
        """(R, R) bool: texel visible in the photo."""
        return self.rgba_map[..., 3] > 0

    def coverage(self) -> float:
        """Fraction of the map's texels that are visible."""
        alpha = self.rgba_map[..., 3]
        visible = np.count_nonzero(alpha) if self.visible is None else self.visible
        return float(visible) / alpha.size

    def rgba(self) -> np.ndarray:
        """(R, R, 4) uint8 with the mask as alpha, for PNG storage."""
        return self.rgba_map


def encode_texture(unwrapped: Unwrapped, config: TextureConfig) -> bytes:
    """A texture's stored bytes: RGBA PNG (alpha = visible) with ``config.png_encoder``."""
    rgba = unwrapped.rgba()
    if config.png_encoder == "isal":
        return encode_png_fast(rgba)
    return encode_png(rgba, config.png_compression)


def hsv_value(texture: np.ndarray) -> np.ndarray:
    """The V channel of HSV (max of R, G, B), the detail network's input, as float32 in [0, 1]."""
    return texture[..., :3].max(axis=-1).astype(np.float32) / 255.0


def _sample(photo: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """(M, 3) bilinear samples; cv2.remap maps must be under 32767 per side, so M is folded into rows."""
    m = len(px)
    if m == 0:  # cv2.remap refuses an empty map
        return np.zeros((0, photo.shape[2] if photo.ndim == 3 else 1), photo.dtype)
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

    The camera is linear, so within a triangle a texel's photo position, depth and rotated normal are
    affine in its (column, row), from the corners' values (:func:`_camera_vertices`, once per photo for
    the 3,448 vertices). A compiled pass splats the z-buffer from the ``ZBUFFER_GRID``² grid of texels,
    a second one writes each visible texel's photo position into two maps, and one ``cv2.remap`` of the
    photo (with an opaque alpha) gives the RGBA map. It is :func:`unwrap_projective` with the equal
    affine camera but for the z-buffer's texels. CPU time per texture of real fits (``bench/unwrap.py``,
    against the per-texel loop before the runs, whose bytes it keeps; a shared machine at load ~2.8): 7.3 ms
    against 10.1 ms at 1024² (its compiled loop 4.3 against 7.0 ms), 3.0 against 3.6 ms at 512². The remap takes
    float maps, OpenCV 5's fastest here: fixed-point ones (``cv2.convertMaps``) took twice as long and round
    differently.
    """
    map_x, map_y, visible = _unwrap_maps(photo.shape[:2], vertices, normals, camera, to_photo, raster, config)
    # One bilinear remap of the photo with an opaque alpha gives the RGBA map: a visible texel lies inside the
    # photo (its neighbours beyond the last pixel get weight 0), so its alpha is exactly 255.
    opaque = cv2.cvtColor(np.ascontiguousarray(photo, np.uint8), cv2.COLOR_RGB2RGBA)
    rgba = cv2.remap(opaque, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return Unwrapped(rgba, visible)


def unwrap_maps(photo_shape: tuple[int, ...], vertices: np.ndarray, normals: np.ndarray, camera: Cameras,
                to_photo: float, raster: UVTexels, config: TextureConfig,
                box_cells: int = BOX_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """:func:`unwrap`'s two (R, R) float32 maps: each visible texel's photo x, y (px), -16 elsewhere.

    ``box_cells``: :data:`BOX_CELLS` (0: every texel is depth-tested on its own; the same maps, slower)."""
    return _unwrap_maps(photo_shape, vertices, normals, camera, to_photo, raster, config, box_cells)[:2]


def _unwrap_maps(photo_shape: tuple[int, ...], vertices: np.ndarray, normals: np.ndarray, camera: Cameras,
                 to_photo: float, raster: UVTexels, config: TextureConfig,
                 box_cells: int = BOX_CELLS) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`unwrap_maps` and the number of visible texels."""
    per_vertex = _camera_vertices(vertices, normals, camera, float(to_photo))
    per_cell = 1.0 / (float(camera.scale[0]) * config.zbuffer_cell_mm * float(to_photo))
    h, w = photo_shape[0], photo_shape[1]
    # Texels that stay at -16 sample only the zero border: colour and alpha 0.
    map_x = np.full((raster.resolution, raster.resolution), -16.0, np.float32)
    map_y = map_x.copy()
    zb, runs = raster.zbuffer_texels, raster.by_triangle
    visible = _unwrap_ortho(zb.corners, zb.to_bary, zb.starts, zb.rows, zb.first, zb.stop, zb.step, zb.box,
                            runs.corners, runs.to_bary, runs.box, runs.starts, runs.rows, runs.first, runs.stop,
                            per_vertex, per_cell, float(np.cos(np.radians(config.max_view_angle_deg))),
                            float(config.depth_tolerance_mm), float(w - 1), float(h - 1), int(box_cells), map_x,
                            map_y)
    return map_x, map_y, int(visible)


def _camera_vertices(vertices: np.ndarray, normals: np.ndarray, camera: Cameras, to_photo: float) -> np.ndarray:
    """(V, 6) float64 per vertex: photo x, y (px, y down), depth (mm, larger = closer) and the normal in the
    camera frame (z towards the viewer); finite or ValueError."""
    per_vertex = _per_vertex(vertices, normals)
    rot = np.asarray(camera.rotation[0], np.float64)
    scale, trans = float(camera.scale[0]), np.asarray(camera.translation[0], np.float64)
    fitted = scale * per_vertex[:, :3] @ rot[:2].T + trans[:2]
    return np.ascontiguousarray(np.column_stack([fitted[:, 0] * to_photo, -fitted[:, 1] * to_photo,
                                                 per_vertex[:, :3] @ rot[2], per_vertex[:, 3:] @ rot.T]))


def _per_vertex(vertices: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(V, 6) float64 positions and normals, the values :meth:`UVTexels.blend` reads; finite or ValueError."""
    per_vertex = np.ascontiguousarray(np.hstack([vertices, normals]), np.float64)
    if not np.isfinite(per_vertex).all():  # NaN cells would size the z-buffer from garbage integers
        raise ValueError("the proxy has non-finite vertices or normals")
    return per_vertex


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
    blended = _blend(*raster.csr(), _per_vertex(vertices, normals))
    return blended[:, :3], blended[:, 3:]


def unwrap_texels(photo: np.ndarray, photo_xy: np.ndarray, depth: np.ndarray, facing: np.ndarray,
                  cells: np.ndarray, raster: UVTexels, config: TextureConfig) -> Unwrapped:
    """The shared part of both unwraps: occlusion test, sampling and scattering into the UV map.

    Per covered texel: its photo position (px), its depth (larger = closer, mm), whether it faces the
    camera, and its position in z-buffer cells. The z-buffer holds the closest facing texel per square
    cell of ``zbuffer_cell_mm`` on the face (in pixel cells a small face would get cells whose depth
    range exceeds the tolerance).
    """
    xy = np.asarray(photo_xy)
    return _finish(photo, xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32),
                   np.ascontiguousarray(depth, np.float64), np.ascontiguousarray(facing, np.bool_),
                   np.floor(cells).astype(np.int64), raster, config)


def _finish(photo: np.ndarray, px: np.ndarray, py: np.ndarray, depth: np.ndarray, facing: np.ndarray,
            cells: np.ndarray, raster: UVTexels, config: TextureConfig) -> Unwrapped:
    """Z-buffer, visibility, sampling of the visible texels and the two maps."""
    h, w = photo.shape[:2]
    vis_x, vis_y, rows, cols = _visible(px, py, depth, facing, np.ascontiguousarray(cells, np.int64),
                                        float(config.depth_tolerance_mm), float(w - 1), float(h - 1), raster.rows,
                                        raster.cols)
    return _fill(photo, vis_x, vis_y, rows, cols, raster)


def _fill(photo: np.ndarray, vis_x: np.ndarray, vis_y: np.ndarray, rows: np.ndarray, cols: np.ndarray,
          raster: UVTexels) -> Unwrapped:
    """The two maps from the visible texels' photo positions and texture rows and columns."""
    # Bilinear samples of the visible texels only: cv2.remap is per pixel, so a subset samples alike.
    colours = _sample(photo, vis_x, vis_y)
    texture = np.zeros((raster.resolution, raster.resolution, 3), np.uint8)
    mask = np.zeros((raster.resolution, raster.resolution), np.bool_)
    _scatter(rows, cols, np.ascontiguousarray(colours, np.uint8), texture, mask)
    return Unwrapped.from_maps(texture, mask)


# --- compiled texel loops ------------------------------------------------------------------------
# Each mirrors NumPy expressions of the array version operation for operation (csr_matvecs' row sums,
# norm = sqrt((x² + y²) + z²), einsum's left-to-right dot products), so results are bit-identical.


@_jit(inline="always")  # inlined by numba: as a call, it tripled the loop's time
def _blend_sums(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, per_vertex: np.ndarray,
                i: int) -> tuple[float, float, float, float, float, float]:
    """Row ``i`` of the sparse blend, unnormalised: position and normal sums.

    Every row holds its triangle's three corners (:meth:`UVTexels.build`); unrolled, the sums are
    csr_matvecs' ``((0 + a0·x0) + a1·x1) + a2·x2`` and the loop runs 3x faster than a general one.
    """
    k = indptr[i]
    if indptr[i + 1] - k != 3:
        raise ValueError("a UV texel must blend exactly three vertices")
    a0, a1, a2 = data[k], data[k + 1], data[k + 2]
    v0, v1, v2 = indices[k], indices[k + 1], indices[k + 2]
    x = ((0.0 + a0 * per_vertex[v0, 0]) + a1 * per_vertex[v1, 0]) + a2 * per_vertex[v2, 0]
    y = ((0.0 + a0 * per_vertex[v0, 1]) + a1 * per_vertex[v1, 1]) + a2 * per_vertex[v2, 1]
    z = ((0.0 + a0 * per_vertex[v0, 2]) + a1 * per_vertex[v1, 2]) + a2 * per_vertex[v2, 2]
    nx = ((0.0 + a0 * per_vertex[v0, 3]) + a1 * per_vertex[v1, 3]) + a2 * per_vertex[v2, 3]
    ny = ((0.0 + a0 * per_vertex[v0, 4]) + a1 * per_vertex[v1, 4]) + a2 * per_vertex[v2, 4]
    nz = ((0.0 + a0 * per_vertex[v0, 5]) + a1 * per_vertex[v1, 5]) + a2 * per_vertex[v2, 5]
    return x, y, z, nx, ny, nz


@_jit(inline="always")
def _blend_row(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, per_vertex: np.ndarray,
               i: int) -> tuple[float, float, float, float, float, float]:
    """Row ``i`` of the sparse blend: position and unit normal, as texel_geometry computes them."""
    x, y, z, nx, ny, nz = _blend_sums(indptr, indices, data, per_vertex, i)
    norm = max(np.sqrt(nx * nx + ny * ny + nz * nz), 1e-12)
    return x, y, z, nx / norm, ny / norm, nz / norm


@_jit()
def _blend(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, per_vertex: np.ndarray) -> np.ndarray:
    """(M, 6) blended positions and unit normals (texel_geometry's values)."""
    m = len(indptr) - 1
    out = np.empty((m, 6))
    for i in range(m):
        out[i, 0], out[i, 1], out[i, 2], out[i, 3], out[i, 4], out[i, 5] = _blend_row(indptr, indices, data,
                                                                                      per_vertex, i)
    return out


@_jit(inline="always")
def _triangle_affine(triangles: np.ndarray, to_bary: np.ndarray, per_vertex: np.ndarray, t: int, g: np.ndarray,
                     cos_max: float) -> bool:
    """Fill ``g`` (6, 3) so that a texel's camera values (``per_vertex``'s columns) are g @ (column, row, 1) in
    triangle ``t`` (vertex ids ``triangles[t]``, barycentric map ``to_bary[t]``); True when every texel of it faces
    the camera (its corners' normals all do: a blend of unit normals is no longer than 1, so its z is at least
    the smallest corner's and the test holds)."""
    v0, v1, v2 = triangles[t, 0], triangles[t, 1], triangles[t, 2]
    for j in range(6):
        a, b, c = per_vertex[v0, j], per_vertex[v1, j], per_vertex[v2, j]
        for k in range(3):
            g[j, k] = a * to_bary[t, 0, k] + b * to_bary[t, 1, k] + c * to_bary[t, 2, k]
    return min(per_vertex[v0, 5], per_vertex[v1, 5], per_vertex[v2, 5]) >= cos_max


@_jit(inline="always")
def _facing(g: np.ndarray, u: float, v3: float, v4: float, v5: float, cos_max: float) -> bool:
    """Whether the texel at column ``u`` of a run faces the camera (by ``cos_max``); ``v3..v5`` are the run's
    ``g[j, 1] * row`` of the normal's rows."""
    nx = (g[3, 0] * u + v3) + g[3, 2]
    ny = (g[4, 0] * u + v4) + g[4, 2]
    nz = (g[5, 0] * u + v5) + g[5, 2]
    return nz >= cos_max * np.sqrt(nx * nx + ny * ny + nz * nz)


@_jit(inline="always")
def _cell_xy(x: float, y: float, per_cell: float, lo0: float, lo1: float, span0: int, span1: int) -> tuple[int, int]:
    """The z-buffer cell (column, row) of photo position (x, y) (``per_cell`` = 1 / the cell's side in px),
    clamped into it; non-decreasing in x and in y."""
    c0 = min(max(np.int64(np.floor(x * per_cell) - lo0), 0), span0 - 1)
    c1 = min(max(np.int64(np.floor(y * per_cell) - lo1), 0), span1 - 1)
    return c0, c1


@_jit(inline="always")
def _cell(x: float, y: float, per_cell: float, lo0: float, lo1: float, span0: int, span1: int) -> int:
    """The flat index of :func:`_cell_xy`'s cell."""
    c0, c1 = _cell_xy(x, y, per_cell, lo0, lo1, span0, span1)
    return c1 * span0 + c0


@_jit(inline="always")
def _box_range(g0: float, g1: float, g2: float, box: np.ndarray, t: int) -> tuple[float, float]:
    """The least and greatest ``(g0 * col + g1 * row) + g2`` over triangle ``t``'s texel box, as the texel loop
    rounds it: each operation rounds monotonically, so the value is monotone in col and in row and its extremes
    over the box are at the box's corners (exact bounds of every texel's value, not estimates)."""
    v0, v1 = g1 * np.float64(box[t, 0]), g1 * np.float64(box[t, 1])
    u0, u1 = g0 * np.float64(box[t, 2]), g0 * np.float64(box[t, 3])
    a, b, c, d = (u0 + v0) + g2, (u0 + v1) + g2, (u1 + v0) + g2, (u1 + v1) + g2
    return min(min(a, b), min(c, d)), max(max(a, b), max(c, d))


@_jit()
def _unwrap_ortho(zb_corners: np.ndarray, zb_to_bary: np.ndarray, zb_starts: np.ndarray, zb_rows: np.ndarray,
                  zb_first: np.ndarray, zb_stop: np.ndarray, zb_step: int, zb_box: np.ndarray, corners: np.ndarray,
                  to_bary: np.ndarray, box: np.ndarray, starts: np.ndarray, rows: np.ndarray, first: np.ndarray,
                  stop: np.ndarray, per_vertex: np.ndarray, per_cell: float, cos_max: float, tolerance: float,
                  max_x: float, max_y: float, box_cells: int, map_x: np.ndarray, map_y: np.ndarray) -> int:
    """The z-buffer splatted from the facing z-buffer texels, then every visible texel's photo position into
    ``map_x``/``map_y`` (left as they are elsewhere); returns the number of visible texels.

    Visible: facing, inside the photo, and not behind the closest facing texel of its z-buffer cell by more
    than ``tolerance``. Per triangle, a texel's camera values are affine in its (column, row): per run of a
    row, ``g[j, 1] * row`` once, then per texel ``(g[j, 0] * col + that) + g[j, 2]`` (the bytes of
    ``g @ (col, row, 1)`` evaluated left to right) for x, y and depth. The facing test is skipped where all
    of a triangle's corners face the camera, the photo bounds where all of them project inside it. A triangle
    none of whose texels can face the camera, or whose depth test the exact bounds of its texels' values
    (:func:`_box_range`) and its cells' depths settle (over at most ``box_cells`` cells), is decided once: the
    maps are the bytes of testing every texel.
    """
    # The z-buffer spans the vertices' box in cells, a cell of margin around: texels are convex blends of them.
    # (A compiled loop: NumPy's column reductions of per_vertex took 0.2 ms.)
    x_lo, y_lo, x_hi, y_hi = np.inf, np.inf, -np.inf, -np.inf
    for i in range(len(per_vertex)):
        x_lo, x_hi = min(x_lo, per_vertex[i, 0]), max(x_hi, per_vertex[i, 0])
        y_lo, y_hi = min(y_lo, per_vertex[i, 1]), max(y_hi, per_vertex[i, 1])
    lo0, lo1 = np.floor(x_lo * per_cell) - 1.0, np.floor(y_lo * per_cell) - 1.0
    span0, span1 = np.int64((np.floor(x_hi * per_cell) + 2.0) - lo0), np.int64((np.floor(y_hi * per_cell) + 2.0) - lo1)
    zbuf = np.full(span0 * span1, -np.inf)
    g = np.empty((6, 3))
    for t in range(len(zb_starts) - 1):
        all_facing = _triangle_affine(zb_corners, zb_to_bary, per_vertex, t, g, cos_max)
        if not all_facing and _box_range(g[5, 0], g[5, 1], g[5, 2], zb_box, t)[1] < 0.0:
            continue  # no texel's normal has a positive z: none faces the camera
        gx0, gx2, gy0, gy2, gz0, gz2 = g[0, 0], g[0, 2], g[1, 0], g[1, 2], g[2, 0], g[2, 2]
        for q in range(zb_starts[t], zb_starts[t + 1]):
            v = np.float64(zb_rows[q])
            vx, vy, vz = g[0, 1] * v, g[1, 1] * v, g[2, 1] * v
            v3, v4, v5 = g[3, 1] * v, g[4, 1] * v, g[5, 1] * v
            for col in range(zb_first[q], zb_stop[q], zb_step):
                u = np.float64(col)
                if all_facing or _facing(g, u, v3, v4, v5, cos_max):
                    k = _cell((gx0 * u + vx) + gx2, (gy0 * u + vy) + gy2, per_cell, lo0, lo1, span0, span1)
                    depth = (gz0 * u + vz) + gz2
                    zbuf[k] = max(zbuf[k], depth)  # branch-free: neighbours share cells, a branch mispredicts
    visible = 0
    for t in range(len(starts) - 1):
        all_facing = _triangle_affine(corners, to_bary, per_vertex, t, g, cos_max)
        if not all_facing and _box_range(g[5, 0], g[5, 1], g[5, 2], box, t)[1] < 0.0:
            continue  # no texel's normal has a positive z: none faces the camera
        inside = True
        for j in range(3):
            x, y = per_vertex[corners[t, j], 0], per_vertex[corners[t, j], 1]
            inside = inside and 0.0 <= x <= max_x and 0.0 <= y <= max_y
        # The depth test, once for the triangle where its texels' cells and depths settle it (exact bounds, so
        # the outcome is the per-texel one): every texel that reaches the test lies in the clamped box's cells.
        x_lo, x_hi = _box_range(g[0, 0], g[0, 1], g[0, 2], box, t)
        y_lo, y_hi = _box_range(g[1, 0], g[1, 1], g[1, 2], box, t)
        k0, k1 = _cell_xy(min(max(x_lo, 0.0), max_x), min(max(y_lo, 0.0), max_y), per_cell, lo0, lo1, span0, span1)
        m0, m1 = _cell_xy(min(max(x_hi, 0.0), max_x), min(max(y_hi, 0.0), max_y), per_cell, lo0, lo1, span0, span1)
        z_test = True
        if (m0 - k0 + 1) * (m1 - k1 + 1) <= box_cells:
            z_hi, z_lo = -np.inf, np.inf
            for c1 in range(k1, m1 + 1):
                for c0 in range(k0, m0 + 1):
                    z_hi, z_lo = max(z_hi, zbuf[c1 * span0 + c0]), min(z_lo, zbuf[c1 * span0 + c0])
            d_lo, d_hi = _box_range(g[2, 0], g[2, 1], g[2, 2], box, t)
            if d_hi < z_lo - tolerance:
                continue  # every texel is behind its cell's closest by more than the tolerance
            z_test = not d_lo >= z_hi - tolerance
        gx0, gx2, gy0, gy2, gz0, gz2 = g[0, 0], g[0, 2], g[1, 0], g[1, 2], g[2, 0], g[2, 2]
        for q in range(starts[t], starts[t + 1]):
            row = rows[q]
            v = np.float64(row)
            vx, vy, vz = g[0, 1] * v, g[1, 1] * v, g[2, 1] * v
            if all_facing and inside and not z_test:  # the common case: every texel of the run is visible
                for col in range(first[q], stop[q]):
                    u = np.float64(col)
                    map_x[row, col] = min(max((gx0 * u + vx) + gx2, 0.0), max_x)
                    map_y[row, col] = min(max((gy0 * u + vy) + gy2, 0.0), max_y)
                visible += stop[q] - first[q]
                continue
            v3, v4, v5 = g[3, 1] * v, g[4, 1] * v, g[5, 1] * v
            for col in range(first[q], stop[q]):
                u = np.float64(col)
                if not (all_facing or _facing(g, u, v3, v4, v5, cos_max)):
                    continue
                x, y = (gx0 * u + vx) + gx2, (gy0 * u + vy) + gy2
                if inside:  # a blend of points inside is inside, up to rounding
                    x, y = min(max(x, 0.0), max_x), min(max(y, 0.0), max_y)
                elif not (0.0 <= x <= max_x and 0.0 <= y <= max_y):
                    continue
                if z_test and (gz0 * u + vz) + gz2 < zbuf[_cell(x, y, per_cell, lo0, lo1, span0, span1)] - tolerance:
                    continue
                map_x[row, col] = x
                map_y[row, col] = y
                visible += 1
    return visible


@_jit()
def _visible(px: np.ndarray, py: np.ndarray, depth: np.ndarray, facing: np.ndarray, cells: np.ndarray,
             tolerance: float, max_x: float, max_y: float, rows: np.ndarray,
             cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The visible texels, in texel order: photo x, y (float32) and texture row, column.

    Visible: facing, inside the photo, and not behind the closest facing texel of its z-buffer cell by
    more than ``tolerance``. The z-buffer spans the facing texels' cells (a texel that does not face the
    camera is never visible, whatever its cell holds), one float per cell.
    """
    m = len(depth)
    lo0 = lo1 = np.iinfo(np.int64).max
    hi0 = hi1 = np.iinfo(np.int64).min
    for i in range(m):
        if facing[i]:
            lo0, hi0 = min(lo0, cells[i, 0]), max(hi0, cells[i, 0])
            lo1, hi1 = min(lo1, cells[i, 1]), max(hi1, cells[i, 1])
    vis_x = np.empty(m, np.float32)
    vis_y = np.empty(m, np.float32)
    vis_r = np.empty(m, rows.dtype)
    vis_c = np.empty(m, cols.dtype)
    if hi0 < lo0:  # nothing faces the camera
        return vis_x[:0], vis_y[:0], vis_r[:0], vis_c[:0]
    span0 = hi0 - lo0 + 1
    zbuf = np.full(span0 * (hi1 - lo1 + 1), -np.inf)
    for i in range(m):
        if facing[i]:
            cell = (cells[i, 1] - lo1) * span0 + (cells[i, 0] - lo0)
            if depth[i] > zbuf[cell]:
                zbuf[cell] = depth[i]
    k = 0
    for i in range(m):
        if (facing[i] and 0 <= px[i] <= max_x and 0 <= py[i] <= max_y
                and depth[i] >= zbuf[(cells[i, 1] - lo1) * span0 + (cells[i, 0] - lo0)] - tolerance):
            vis_x[k], vis_y[k], vis_r[k], vis_c[k] = px[i], py[i], rows[i], cols[i]
            k += 1
    return vis_x[:k], vis_y[:k], vis_r[:k], vis_c[:k]


@_jit()
def _scatter(rows: np.ndarray, cols: np.ndarray, colours: np.ndarray, texture: np.ndarray, mask: np.ndarray) -> None:
    """The visible texels' colours into ``texture`` and ``True`` into ``mask``, in place."""
    for k in range(len(rows)):
        r, c = rows[k], cols[k]
        texture[r, c, 0] = colours[k, 0]
        texture[r, c, 1] = colours[k, 1]
        texture[r, c, 2] = colours[k, 2]
        mask[r, c] = True


@_jit()
def _rgba(texture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(R, R, 4) texture with 255 alpha where ``mask`` (np.dstack's result, without its strided copies)."""
    h, w = mask.shape
    out = np.empty((h, w, 4), np.uint8)
    for r in range(h):
        for c in range(w):
            out[r, c, 0] = texture[r, c, 0]
            out[r, c, 1] = texture[r, c, 1]
            out[r, c, 2] = texture[r, c, 2]
            out[r, c, 3] = 255 if mask[r, c] else 0
    return out
