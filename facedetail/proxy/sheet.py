"""The contact sheet of a batch of proxy fits: each face cropped and drawn with its fit, for people to judge."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facedetail.model.morphable import MorphableModel
from facedetail.proxy.inputs import InputItem, LoadConfig, LoadFailure, load_photo
from facedetail.proxy.pipeline import FACE_SEPARATOR, fit_to_photo, project_row, to_decoded
from facedetail.render.faces import boundary_loops
from facedetail.render.sheet import label_grid

PROXY_RED = (230, 40, 40)
"""The proxy's wireframe, outline and landmark vertices."""
DETECTED_GREEN = (0, 220, 0)
"""The detected landmarks."""
PAD_GREY = 128
"""Where the crop reaches beyond the photo."""


def face_crop_box(points: np.ndarray, margin: float) -> tuple[float, float, float]:
    """(left, top, side) of the square around ``points`` (N, 2) grown by ``margin`` x its side on every side."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre = (lo + hi) / 2
    side = float(max(hi - lo)) * (1 + 2 * margin)
    side = max(side, 8.0)
    return float(centre[0] - side / 2), float(centre[1] - side / 2), side


def fit_sheet(rows: list[dict[str, Any]], items: Mapping[str, InputItem], load: LoadConfig, model: MorphableModel,
              tile: int = 192, margin: float = 0.25) -> np.ndarray:
    """RGB uint8 grid (4 columns) of the fitted ``rows``, in the given order, one tile per face.

    Each tile is the photo cropped to the face (a square around the detected landmarks and the proxy's
    outline, ``margin`` x its side on each side; grey where it leaves the photo), scaled to ``tile`` px,
    with the fit drawn: the proxy's front-facing wireframe (faint red), its outline and fixed landmark
    vertices (red), and the detected landmarks (green). Labelled with the rank, the file stem and the
    fit's NME. ``items`` maps a photo's id (a face row ``<id>#k`` uses ``<id>``) to its listed input
    (read with ``load``).
    """
    tiles, labels = [], []
    edges = np.unique(np.sort(model.triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)
    outline = max(boundary_loops(model.triangles), key=len)
    fixed = model.landmark_vertices[model.landmark_defined]
    for rank, r in enumerate(rows, start=1):
        item = items[r["id"].split(FACE_SEPARATOR)[0]]
        photo = load_photo(item.path, load)
        if isinstance(photo, LoadFailure):  # a fitted row was decodable: the file changed since
            raise ValueError(f"{item.path}: cannot draw a fit on it: {photo.reason}")
        verts = model.vertices(r["alpha"], r["beta"]).astype(np.float64)
        rot = np.asarray(r["camera_rotation"]).reshape(3, 3)
        # Everything in decoded-photo px first; then the crop's affine map to the tile.
        proxy_px = to_decoded(fit_to_photo(project_row(verts, r), r), r["decode_scale"])
        detected = to_decoded(np.asarray(r["landmarks"], np.float64).reshape(68, 2), r["decode_scale"])
        left, top, side = face_crop_box(np.vstack([detected, proxy_px[outline]]), margin)
        k = tile / side
        # Pixel centres: photo px p lands on tile px (p + 0.5 - origin) * k - 0.5.
        warp = np.array([[k, 0, (0.5 - left) * k - 0.5], [0, k, (0.5 - top) * k - 0.5]])
        canvas = cv2.warpAffine(photo.rgb, warp, (tile, tile), flags=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_GREY,) * 3)

        def to_tile(px: np.ndarray, warp: np.ndarray = warp) -> np.ndarray:
            """Decoded-photo px to tile px, in 1/16 px for cv2's shift."""
            return np.round((px @ warp[:, :2].T + warp[:, 2]) * 16).astype(np.int32)

        px = to_tile(proxy_px)
        facing = (model.vertex_normals(verts) @ rot[2]) > 0
        wire = canvas.copy()
        shown = edges[facing[edges].all(axis=1)]
        cv2.polylines(wire, list(px[shown].reshape(-1, 2, 1, 2)), False, PROXY_RED, 1, cv2.LINE_AA, shift=4)
        canvas = cv2.addWeighted(wire, 0.35, canvas, 0.65, 0)
        cv2.polylines(canvas, [px[outline].reshape(-1, 1, 2)], True, PROXY_RED, 1, cv2.LINE_AA, shift=4)
        for x, y in px[fixed]:
            cv2.circle(canvas, (int(x), int(y)), 2 * 16, PROXY_RED, -1, cv2.LINE_AA, shift=4)
        for x, y in to_tile(detected):
            cv2.circle(canvas, (int(x), int(y)), 16, DETECTED_GREEN, -1, cv2.LINE_AA, shift=4)
        tiles.append(canvas)
        labels.append(f"{rank}. {Path(r['path']).stem[:12]} NME {r['nme']:.3f}")
    return label_grid(tiles, labels, columns=4)
