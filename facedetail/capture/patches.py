"""Training patches: square windows cut from UV maps at a stride, per face region.

The paper's detail network works on 256x256 patches of the 4096² UV maps taken at a stride of
64 texels, with one network per face region (upper face and lower face; 1,547 + 1,390 patches
in the original release). :func:`face_regions` gives the two regions of a model's UV layout:
the rows of its UV chart above and below the nose tip (iBUG landmark 30), each extended past
that line by ``overlap`` texels so that features on the line (the nose, the nasolabial folds'
tops) are whole in at least one region. :func:`cut_patches` cuts every patch of a region whose
valid fraction (by the mask) is at least ``min_valid``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from facedetail.model.morphable import MorphableModel

UPPER, LOWER = "upper", "lower"
SPLIT_LANDMARK = 30  # iBUG nose tip


@dataclass(frozen=True)
class RegionBox:
    """A rectangle of texels ``[row0, row1) x [col0, col1)``."""

    name: str
    row0: int
    row1: int
    col0: int
    col1: int


@dataclass(frozen=True)
class PatchSet:
    """The patches of one region of one set of maps."""

    region: str
    size: int
    stride: int
    origins: NDArray[np.int64]
    """(N, 2) top-left (row, col) of each patch in the full map."""
    maps: dict[str, NDArray[np.generic]]
    """Per input map name, (N, size, size, ...) patches (copies)."""
    mask: NDArray[np.bool_]
    """(N, size, size) validity of each patch's texels."""

    def __len__(self) -> int:
        return int(self.origins.shape[0])


def face_regions(model: MorphableModel, resolution: int, overlap: int = 128) -> dict[str, RegionBox]:
    """The upper- and lower-face boxes of ``model``'s UV layout at ``resolution`` (texels)."""
    R = int(resolution)
    landmark = int(model.landmark_vertices[SPLIT_LANDMARK])
    if landmark < 0:
        raise ValueError(f"{model.name}: landmark {SPLIT_LANDMARK} (nose tip) has no vertex")
    uv = model.uv.astype(np.float64) * R
    col0, row0 = np.floor(uv.min(axis=0)).astype(int)
    col1, row1 = np.ceil(uv.max(axis=0)).astype(int)
    col0, row0 = max(col0, 0), max(row0, 0)
    col1, row1 = min(col1, R), min(row1, R)
    split = round(float(uv[landmark, 1]))
    return {
        UPPER: RegionBox(UPPER, row0, min(row1, split + overlap), col0, col1),
        LOWER: RegionBox(LOWER, max(row0, split - overlap), row1, col0, col1),
    }


def patch_origins(mask: ArrayLike, box: RegionBox, size: int = 256, stride: int = 64,
                  min_valid: float = 0.5) -> NDArray[np.int64]:
    """(N, 2) top-left corners on the stride grid of ``box`` whose whole patch lies in the box and whose
    mask covers at least ``min_valid`` of it, row-major."""
    m = np.asarray(mask, bool)
    if size < 1 or stride < 1:
        raise ValueError("size and stride must be positive")
    rows = np.arange(box.row0, box.row1 - size + 1, stride)
    cols = np.arange(box.col0, box.col1 - size + 1, stride)
    if rows.size == 0 or cols.size == 0:
        return np.zeros((0, 2), np.int64)
    # Valid texels of every window from one summed-area table (O(1) per window).
    table = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    table[1:, 1:] = m.cumsum(0).cumsum(1)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    valid = table[r + size, c + size] - table[r, c + size] - table[r + size, c] + table[r, c]
    keep = valid >= min_valid * size * size
    return np.column_stack([r[keep], c[keep]]).astype(np.int64)


def cut_patches(maps: Mapping[str, ArrayLike], mask: ArrayLike, box: RegionBox, size: int = 256,
                stride: int = 64, min_valid: float = 0.5) -> PatchSet:
    """Cut the patches of one region from same-sized maps (e.g. displacement, normals, texture) and the mask."""
    m = np.asarray(mask, bool)
    arrays = {name: np.asarray(a) for name, a in maps.items()}
    for name, a in arrays.items():
        if a.shape[:2] != m.shape:
            raise ValueError(f"map {name!r} is {a.shape[:2]}, the mask {m.shape}")
    origins = patch_origins(m, box, size, stride, min_valid)
    offs = np.arange(size)
    rr = origins[:, 0, None, None] + offs[None, :, None]
    cc = origins[:, 1, None, None] + offs[None, None, :]
    return PatchSet(box.name, size, stride, origins, {name: a[rr, cc] for name, a in arrays.items()}, m[rr, cc])
