"""A contact sheet of a morphable model: the mean face and each expression component at its maximum."""

from __future__ import annotations

import numpy as np

from facedetail.model.morphable import MorphableModel
from facedetail.render.camera import MODEL_TO_CAMERA, Camera
from facedetail.render.offscreen import MeshRenderer
from facedetail.render.sh import directional_sh, shade
from facedetail.render.sheet import label_grid

_MARGIN = 1.1
_FRONT_LIGHT = directional_sh(np.array([0.3, -0.3, -0.9]), intensity=0.75, ambient=0.35)
_DISTANCE_MM = 1000.0


def preview_expressions(model: MorphableModel, max_expressions: int = 6,
                        pca_sigma: float = 3.0) -> list[tuple[str, np.ndarray]]:
    """(label, beta) pairs to show: neutral, then each expression at its maximum.

    Blendshapes are shown at weight 1 (the captured expression); PCA components at
    ``+pca_sigma`` standard deviations.
    """
    items = [("mean", np.zeros(model.n_expression, np.float32))]
    for k in range(min(max_expressions, model.n_expression)):
        beta = np.zeros(model.n_expression, np.float32)
        beta[k] = 1.0 if model.expression_kind == "blendshapes" else pca_sigma
        label = model.expression_names[k] + ("" if model.expression_kind == "blendshapes" else f" +{pca_sigma:g}sd")
        items.append((label, beta))
    return items


def render_preview(model: MorphableModel, tile_size: int = 256, max_expressions: int = 6,
                   pca_sigma: float = 3.0, columns: int = 4) -> np.ndarray:
    """RGB uint8 image: a grid of labelled renders (mean albedo, frontal orthographic camera, white background)."""
    items = preview_expressions(model, max_expressions, pca_sigma)
    verts = model.vertices(None, np.stack([b for _, b in items])).astype(np.float64)
    lo, hi = model.mean.min(0), model.mean.max(0)
    centre = (lo + hi) / 2.0
    scale = tile_size / (float(max(hi[0] - lo[0], hi[1] - lo[1])) * _MARGIN)
    camera = Camera(tile_size, tile_size, "orthographic", scale, _DISTANCE_MM - 500.0, _DISTANCE_MM + 500.0)
    albedo = model.albedo()
    tiles = []
    with MeshRenderer(tile_size, tile_size) as renderer:
        for v in verts:
            cam_v = (v - centre) @ MODEL_TO_CAMERA.T + np.array([0.0, 0.0, _DISTANCE_MM])
            normals = model.vertex_normals(v).astype(np.float64) @ MODEL_TO_CAMERA.T
            rgb, depth = renderer.render(cam_v, model.triangles, albedo * shade(normals, _FRONT_LIGHT), camera)
            tiles.append(np.where(depth[..., None] > 0, rgb, np.uint8(255)))
    return label_grid(tiles, [label for label, _ in items], columns)
