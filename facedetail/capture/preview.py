"""Preview sheet of displacement ground truth: the map as an image, the normal map, and the detailed mesh.

The detailed mesh is built from the outputs themselves, ``P_proxy + D · N_proxy`` on the texel
grid, and rendered with pyrender (the renderer the other previews use), so the sheet shows the
displacement applied to a mesh, which the original release never did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from facedetail.capture.maps import load_item
from facedetail.capture.process import proxy_maps
from facedetail.capture.scan import CaptureItem, load_proxy, proxy_path, read_info
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import rasterize_uv
from facedetail.render.camera import MODEL_TO_CAMERA, Camera
from facedetail.render.offscreen import MeshRenderer
from facedetail.render.sh import directional_sh, shade
from facedetail.render.sheet import label_grid

# Light from the upper left and in front (model axes, turned into camera axes), grazing enough to show wrinkles.
_RAKING_LIGHT = directional_sh(MODEL_TO_CAMERA @ np.array([-0.45, 0.55, 0.7]), intensity=0.85, ambient=0.25)
_SKIN = np.array([0.85, 0.72, 0.63])
_DISTANCE_MM = 1000.0
_MARGIN = 1.08


@dataclass(frozen=True)
class PreviewItem:
    """What one row of the sheet shows."""

    label: str
    displacement: NDArray[np.float32]
    mask: NDArray[np.bool_]
    normals: NDArray[np.float32]
    positions: NDArray[np.float64]
    """(R, R, 3) proxy positions (model frame)."""
    proxy_normals: NDArray[np.float64]


def displacement_image(displacement: NDArray[np.floating], mask: NDArray[np.bool_], scale_mm: float,
                       size: int) -> NDArray[np.uint8]:
    """RGB: grey = 0.5 + d / (2 · scale), white outside the mask, resized to ``size`` (area average)."""
    grey = np.clip(0.5 + np.asarray(displacement, np.float64) / (2.0 * scale_mm), 0.0, 1.0)
    img = np.where(mask, grey, 1.0)
    img = cv2.resize((img * 255.0).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return np.repeat(np.clip(np.round(img), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def normal_image(normals: NDArray[np.floating], size: int) -> NDArray[np.uint8]:
    """RGB of ``(n + 1) / 2``, white outside the chart."""
    n = np.asarray(normals, np.float32)
    rgb = np.where((np.abs(n).sum(axis=-1) > 0)[..., None], (n + 1.0) / 2.0, 1.0)
    rgb = cv2.resize(rgb * 255.0, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def grid_mesh(points: NDArray[np.float64], valid: NDArray[np.bool_]) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Vertices and triangles of the texel grid: two triangles per 2x2 block of valid texels.

    Wound counter-clockwise seen from outside for a layout like the face model's (v down).
    """
    H, W = valid.shape
    index = np.full((H, W), -1, np.int64)
    index[valid] = np.arange(int(valid.sum()))
    a, b = index[:-1, :-1], index[:-1, 1:]
    c, d = index[1:, :-1], index[1:, 1:]
    quad = (a >= 0) & (b >= 0) & (c >= 0) & (d >= 0)
    faces = np.concatenate([np.stack([a[quad], c[quad], b[quad]], 1), np.stack([b[quad], c[quad], d[quad]], 1)])
    return points[valid], faces


def render_detailed(item: PreviewItem, size: int, renderer: MeshRenderer, max_grid: int = 512) -> NDArray[np.uint8]:
    """RGB render of ``P + D · N`` shaded with its normal map (frontal, orthographic, raking light), white ground."""
    R = item.displacement.shape[0]
    step = max(1, -(-R // max_grid))
    cov = (np.abs(item.proxy_normals).sum(axis=-1) > 0)[::step, ::step]
    fine = (item.positions + item.displacement[..., None].astype(np.float64) * item.proxy_normals)[::step, ::step]
    verts, faces = grid_mesh(fine, cov)
    if len(faces) == 0:
        return np.full((size, size, 3), 255, np.uint8)
    # Shaded with the output normal map, so that the sheet shows what a renderer of the maps would.
    normals = item.normals[::step, ::step][cov].astype(np.float64)
    lo, hi = verts.min(0), verts.max(0)
    centre = (lo + hi) / 2.0
    scale = size / (float(max(hi[0] - lo[0], hi[1] - lo[1])) * _MARGIN)
    camera = Camera(size, size, "orthographic", scale, _DISTANCE_MM - 500.0, _DISTANCE_MM + 500.0)
    cam_v = (verts - centre) @ MODEL_TO_CAMERA.T + np.array([0.0, 0.0, _DISTANCE_MM])
    colors = _SKIN * shade(normals @ MODEL_TO_CAMERA.T, _RAKING_LIGHT)
    rgb, depth = renderer.render(cam_v, faces, colors, camera)
    return np.where(depth[..., None] > 0, rgb, np.uint8(255))


def preview_sheet(items: Sequence[PreviewItem], scale_mm: float, tile: int = 256) -> NDArray[np.uint8]:
    """RGB sheet, one row per item: displacement, normal map, rendered detailed mesh."""
    tiles: list[NDArray[np.uint8]] = []
    labels: list[str] = []
    with MeshRenderer(tile, tile) as renderer:
        for item in items:
            tiles += [displacement_image(item.displacement, item.mask, scale_mm, tile),
                      normal_image(item.normals, tile), render_detailed(item, tile, renderer)]
            labels += [f"{item.label} D +-{scale_mm:g}mm", "normals", "P + D N"]
    return label_grid(tiles, labels, columns=3)


def capture_preview(out_dir: Path, model_path: Path, captures: Path, ids: Sequence[str], resolution: int,
                    scale_mm: float, tile: int) -> NDArray[np.uint8]:
    """RGB preview sheet of items ``ids``, their maps read back from the output folder ``out_dir``.

    ``out_dir`` holds ``maps/<id>/`` (as :func:`facedetail.capture.maps.load_item` reads it);
    the proxies come from the capture items in ``captures``. One BLAS thread, as in the workers:
    the proxy's vertices must round the same on every machine for the sheet (a DVC output) to be
    byte-identical.
    """
    with threadpool_limits(1):
        model = MorphableModel.load(model_path)
        raster = rasterize_uv(model.uv, model.triangles, resolution)
        shown = []
        for item_id in ids:
            item = CaptureItem(item_id, Path(captures) / item_id)
            info = read_info(item)
            proxy = load_proxy(proxy_path(item, info), model, info.proxy_units or info.units)
            pm = proxy_maps(raster, model, proxy)
            maps = load_item(out_dir, item_id)
            shown.append(PreviewItem(item_id, maps.displacement, maps.mask, maps.normals, pm.positions, pm.normals))
        return preview_sheet(shown, scale_mm, tile)
