"""Readers for eos's landmark-mapping (``ibug_to_*.txt``, TOML) and contour (``*_contours.json``) files."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np

from facedetail.errors import SourceFileError
from facedetail.model.morphable import N_LANDMARKS

_REMEDY = "Run `make assets` to restore the eos share files"


def read_landmark_map(path: Path | str, n_vertices: int) -> np.ndarray:
    """(68,) int32 vertex index per iBUG landmark (1-based ids in the file), -1 where unmapped."""
    path = Path(path)
    if not path.is_file():
        raise SourceFileError(path, "landmark map not found", _REMEDY)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
        mappings = table["landmark_mappings"]
        out = np.full(N_LANDMARKS, -1, np.int32)
        for key, vertex in mappings.items():
            ibug = int(key)
            if not 1 <= ibug <= N_LANDMARKS:
                raise ValueError(f"iBUG id {ibug} outside 1..68")
            out[ibug - 1] = int(vertex)
    except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
        raise SourceFileError(path, f"not a valid iBUG landmark map ({err})", _REMEDY) from None
    mapped = out[out != -1]
    if mapped.size and mapped.min() < 0:
        raise SourceFileError(path, f"maps a landmark to negative vertex {int(mapped.min())}", _REMEDY)
    if out.max() >= n_vertices:
        raise SourceFileError(
            path, f"maps a landmark to vertex {int(out.max())} but the model has {n_vertices} vertices "
            "(map and model do not belong together)", "Use the map file that matches the model")
    return out


def read_contours(path: Path | str, n_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) contour vertex indices from an eos ``model_contours`` JSON file."""
    path = Path(path)
    if not path.is_file():
        raise SourceFileError(path, "contour file not found", _REMEDY)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["model_contour"]
        right = np.asarray(data["right_contour"], dtype=np.int32)
        left = np.asarray(data["left_contour"], dtype=np.int32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise SourceFileError(path, f"not a valid contour file ({err})", _REMEDY) from None
    if right.ndim != 1 or left.ndim != 1 or right.size == 0 or left.size == 0:
        raise SourceFileError(path, "contour lists must be non-empty lists of vertex ids", _REMEDY)
    if max(right.max(), left.max()) >= n_vertices or min(right.min(), left.min()) < 0:
        raise SourceFileError(
            path, f"contour vertex outside 0..{n_vertices - 1} (file and model do not belong together)",
            "Use the contour file that matches the model")
    return right, left
