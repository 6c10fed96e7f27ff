"""Small Parquet tables shared by stages: the quarantine table of rejected inputs."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from facedetail.io.atomic import atomic_write_bytes

QUARANTINE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
])


def write_table(path: Path | str, table: pa.Table) -> Path:
    """Write a table as deterministic Parquet (zstd, no statistics, no timestamps), atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False, store_schema=True)
    return atomic_write_bytes(path, buf.getvalue())


def write_quarantine(path: Path | str, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``quarantine.parquet``: one row per rejected input (id, source path if any, reason), sorted by id.

    Written even when empty, so "nothing was rejected" is a fact on disk rather than a missing file.
    """
    ordered = sorted(rows, key=lambda r: r["id"])
    table = pa.table({
        "id": [r["id"] for r in ordered],
        "path": [r.get("path") for r in ordered],
        "reason": [r.get("reason") or "unknown" for r in ordered],
    }, schema=QUARANTINE_SCHEMA)
    return write_table(path, table)
