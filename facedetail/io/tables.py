"""Small tables shared by stages: deterministic Parquet, the quarantine table of rejected inputs, CSV for plots."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from facedetail.io.atomic import atomic_write_bytes, atomic_write_text

QUARANTINE_NAME = "quarantine.parquet"
"""File name of a stage's quarantine table in its output folder."""

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


def reason_kind(reason: str | None) -> str:
    """The counted kind of a quarantine reason: its text before the first colon, stripped ("unknown" if none).

    ``"no face: score 0.1"`` and ``"no face: too small"`` are both ``"no face"``, so metrics count
    kinds of failure rather than one entry per distinct message.
    """
    return (reason or "unknown").split(":")[0].strip()


def write_csv(path: Path | str, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """CSV with a header row of ``fields`` then ``rows`` in the given order, atomically.

    ``"\n"`` line endings (not the csv module's ``"\r\n"``) so equal rows give equal bytes on every
    platform and diff cleanly; a row key not in ``fields`` is an error, a missing one is written empty.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
