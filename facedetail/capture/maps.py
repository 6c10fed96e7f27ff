"""On-disk form of the displacement ground truth, and reading it back (for training).

Per item, in ``maps/<subject>/<expression>/``:

* ``displacement.npy``: float32, millimetres along the proxy normal (positive outwards), 0 where masked;
* ``displacement.png``: the same as 16-bit grey, ``png = round((clip(d / s, -1, 1) + 1) / 2 · 65535)``
  with the scale ``s`` (mm) in the manifest's ``png_scale_mm`` column: ``d = (png / 65535 · 2 - 1) · s``.
  This is the original release's ``(d + 1) / 2 · 65535`` encoding, with its unit written down;
* ``mask.png``: 8-bit, 255 where the displacement is valid;
* ``normal.png``: 16-bit RGB, unit normals of the detailed surface in the face model's frame
  (x right, y up, z towards the viewer), ``(n + 1) / 2 · 65535``; 0 outside the UV chart.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from numpy.typing import NDArray

from facedetail.io.atomic import atomic_write_bytes
from facedetail.io.images import encode_png

DISPLACEMENT = "displacement.npy"
DISPLACEMENT_PNG = "displacement.png"
MASK_PNG = "mask.png"
NORMAL_PNG = "normal.png"
MAP_FILES = {"displacement": DISPLACEMENT, "displacement_png": DISPLACEMENT_PNG, "mask": MASK_PNG,
             "normal_png": NORMAL_PNG}
_U16 = 65535.0


def decode_png(path: Path | str) -> NDArray[np.generic]:
    """A PNG as stored (8 or 16 bit; RGB order for colour images)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not a readable PNG")
    return img[..., ::-1].copy() if img.ndim == 3 else img


def displacement_to_u16(displacement: NDArray[np.floating], scale_mm: float) -> tuple[NDArray[np.uint16], int]:
    """The 16-bit encoding of a displacement map, and how many texels were clipped at ±scale."""
    d = np.asarray(displacement, np.float64) / scale_mm
    clipped = int((np.abs(d) > 1.0).sum())
    return np.round((np.clip(d, -1.0, 1.0) + 1.0) / 2.0 * _U16).astype(np.uint16), clipped


def u16_to_displacement(png: NDArray[np.integer], scale_mm: float) -> NDArray[np.float32]:
    """Millimetres from the 16-bit encoding (exact inverse up to half a step, ``scale / 65535``)."""
    return ((np.asarray(png, np.float64) / _U16 * 2.0 - 1.0) * scale_mm).astype(np.float32)


def normals_to_u16(normals: NDArray[np.floating]) -> NDArray[np.uint16]:
    """(R, R, 3) unit normals as 16-bit RGB; texels with a zero vector stay 0."""
    n = np.asarray(normals, np.float64)
    out = np.round((np.clip(n, -1.0, 1.0) + 1.0) / 2.0 * _U16)
    out[np.linalg.norm(n, axis=-1) == 0] = 0
    return out.astype(np.uint16)


def write_item_maps(folder: Path, displacement: NDArray[np.float32], mask: NDArray[np.bool_],
                    normals: NDArray[np.float32], scale_mm: float) -> int:
    """Write the four files of one item; returns the number of texels clipped in the PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(displacement, np.float32), allow_pickle=False)
    atomic_write_bytes(folder / DISPLACEMENT, buf.getvalue())
    png, clipped = displacement_to_u16(displacement, scale_mm)
    atomic_write_bytes(folder / DISPLACEMENT_PNG, encode_png(png, 6))
    atomic_write_bytes(folder / MASK_PNG, encode_png(np.where(mask, 255, 0).astype(np.uint8), 6))
    atomic_write_bytes(folder / NORMAL_PNG, encode_png(normals_to_u16(normals), 6))
    return clipped


@dataclass(frozen=True)
class CaptureMaps:
    """The ground truth of one captured subject and expression, as read back."""

    id: str
    displacement: NDArray[np.float32]
    """(R, R) mm along the proxy normal, 0 where masked."""
    mask: NDArray[np.bool_]
    normals: NDArray[np.float32]
    """(R, R, 3) unit normals of the detailed surface (model frame), 0 outside the chart."""


def list_items(out_dir: Path | str) -> list[str]:
    """Ids (``subject/expression``) of the items in a ``capture_gt`` output folder, sorted."""
    table = pq.read_table(Path(out_dir) / "manifest.parquet", columns=["item", "kind"]).to_pylist()
    return sorted({r["item"] for r in table if r["kind"] == "displacement"})


def load_item(out_dir: Path | str, item: str) -> CaptureMaps:
    """Read one item's maps from a ``capture_gt`` output folder (float displacement, mask, normals)."""
    folder = Path(out_dir) / "maps" / item
    disp = np.load(folder / DISPLACEMENT, allow_pickle=False)
    mask = decode_png(folder / MASK_PNG) > 127
    normals = decode_png(folder / NORMAL_PNG).astype(np.float32) / np.float32(_U16) * 2.0 - 1.0
    # Outside the chart 0 was stored, which decodes to (-1, -1, -1): no unit vector is that long.
    normals[np.abs(normals).sum(axis=-1) > 2.9] = 0.0
    return CaptureMaps(item, disp, mask, normals)
