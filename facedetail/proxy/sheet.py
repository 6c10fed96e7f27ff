"""The contact sheet of a batch of proxy fits: each fit drawn over its photo, for people to look at."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facedetail.model.morphable import MorphableModel
from facedetail.proxy.inputs import InputItem, LoadConfig, LoadFailure, load_photo
from facedetail.proxy.pipeline import fit_to_photo, project_row, to_decoded
from facedetail.render.faces import boundary_loops
from facedetail.render.sheet import label_grid

PROXY_RED = (230, 40, 40)
"""The proxy's wireframe, outline and landmark vertices."""
DETECTED_GREEN = (0, 220, 0)
"""The detected landmarks."""


def fit_sheet(rows: list[dict[str, Any]], items: Mapping[str, InputItem], load: LoadConfig, model: MorphableModel,
              tile: int = 192) -> np.ndarray:
    """RGB uint8 grid (4 columns) of the fitted ``rows``' photos, each scaled into a ``tile`` x ``tile``
    square (white padding right and below) with the fit drawn over it: the proxy's front-facing
    wireframe (faint red), its outline and fixed landmark vertices (red), and the detected landmarks
    (green); labelled with the file stem and the reprojection error.

    ``items`` maps a row's id to its listed input (its ``path`` is read with ``load``).
    """
    tiles, labels = [], []
    edges = np.unique(np.sort(model.triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)
    outline = max(boundary_loops(model.triangles), key=len)
    fixed = model.landmark_vertices[model.landmark_defined]
    for r in rows:
        photo = load_photo(items[r["id"]].path, load)
        if isinstance(photo, LoadFailure):  # a fitted row was decodable: the file changed since
            raise ValueError(f"{items[r['id']].path}: cannot draw a fit on it: {photo.reason}")
        rgb = photo.rgb
        k = tile / max(rgb.shape[:2])
        img = cv2.resize(rgb, (round(rgb.shape[1] * k), round(rgb.shape[0] * k)), interpolation=cv2.INTER_AREA)
        canvas = np.full((tile, tile, 3), 255, np.uint8)
        canvas[: img.shape[0], : img.shape[1]] = img
        verts = model.vertices(r["alpha"], r["beta"]).astype(np.float64)
        rot = np.asarray(r["camera_rotation"]).reshape(3, 3)

        def to_tile(photo_px: np.ndarray, k: float = k, r: dict[str, Any] = r) -> np.ndarray:
            """Original-photo px to tile px, in 1/16 px for cv2's shift."""
            return np.round((to_decoded(photo_px, r["decode_scale"]) + 0.5) * k * 16 - 8).astype(np.int32)

        px = to_tile(fit_to_photo(project_row(verts, r), r))
        facing = (model.vertex_normals(verts) @ rot[2]) > 0
        wire = canvas.copy()
        shown = edges[facing[edges].all(axis=1)]
        cv2.polylines(wire, list(px[shown].reshape(-1, 2, 1, 2)), False, PROXY_RED, 1, cv2.LINE_AA, shift=4)
        canvas = cv2.addWeighted(wire, 0.35, canvas, 0.65, 0)
        cv2.polylines(canvas, [px[outline].reshape(-1, 1, 2)], True, PROXY_RED, 1, cv2.LINE_AA, shift=4)
        for x, y in px[fixed]:
            cv2.circle(canvas, (int(x), int(y)), 2 * 16, PROXY_RED, -1, cv2.LINE_AA, shift=4)
        for x, y in to_tile(np.asarray(r["landmarks"]).reshape(68, 2)):
            cv2.circle(canvas, (int(x), int(y)), 16, DETECTED_GREEN, -1, cv2.LINE_AA, shift=4)
        tiles.append(canvas)
        labels.append(f"{Path(r['path']).stem[:14]} {r['reprojection_px']:.1f}px")
    return label_grid(tiles, labels, columns=4)
