"""A contact sheet of a morphable model: the mean face and each expression component at its maximum."""

from __future__ import annotations

import cv2
import numpy as np

from facedetail.model.morphable import MorphableModel
from facedetail.render.offscreen import MeshRenderer

_LABEL_HEIGHT = 22


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
    """RGB uint8 image: a grid of labelled renders (mean albedo, frontal orthographic camera)."""
    items = preview_expressions(model, max_expressions, pca_sigma)
    betas = np.stack([b for _, b in items])
    verts = model.vertices(None, betas)
    colors = model.albedo()
    tiles = []
    with MeshRenderer(tile_size, tile_size) as renderer:
        for (label, _), v in zip(items, verts, strict=True):
            rgb, _ = renderer.render(v, model.triangles, colors)
            tile = np.full((tile_size + _LABEL_HEIGHT, tile_size, 3), 255, np.uint8)
            tile[_LABEL_HEIGHT:] = rgb
            cv2.putText(tile, label, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
            tiles.append(tile)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (rows * columns - len(tiles))
    return np.vstack([np.hstack(tiles[r * columns:(r + 1) * columns]) for r in range(rows)])
