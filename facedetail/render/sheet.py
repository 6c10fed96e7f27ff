"""Contact sheets: labelled image grids for people to look at a dataset."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

LABEL_HEIGHT = 22


def label_grid(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int,
               label_height: int = LABEL_HEIGHT) -> np.ndarray:
    """RGB uint8 grid of equally sized RGB ``tiles``, each under a white strip with its label."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    h, w = tiles[0].shape[:2]
    scale = min(0.5, 0.5 * w / 128)
    framed = []
    for tile, label in zip(tiles, labels, strict=True):
        out = np.full((h + label_height, w, 3), 255, np.uint8)
        out[label_height:] = tile
        cv2.putText(out, label, (4, label_height - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        framed.append(out)
    columns = max(1, min(columns, len(framed)))
    rows = -(-len(framed) // columns)
    framed += [np.full_like(framed[0], 255)] * (rows * columns - len(framed))
    return np.vstack([np.hstack(framed[r * columns:(r + 1) * columns]) for r in range(rows)])
