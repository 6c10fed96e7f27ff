"""Deterministic JSON files: sorted keys, two-space indent, a final newline, written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from facedetail.io.atomic import atomic_write_text


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Deterministic, human-readable JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object written by :func:`write_json`."""
    return json.loads(path.read_text(encoding="utf-8"))
