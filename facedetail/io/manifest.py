"""``manifest.parquet``: one row per item of a stage output.

Fixed columns: ``id``, ``path`` (relative to the output folder, for loose files), ``shard``
(tar path relative to the output folder) and ``key`` (the shard member that ``sha256`` and
``bytes`` describe, e.g. ``expr-0000042.png``) for items inside a shard, ``sha256``,
``bytes``, ``seed`` (null when the item
involves no randomness) and ``params_hash``. Stages may add columns of their own. Rows are
sorted by id and written without timestamps, so equal content gives equal bytes.
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from facedetail.io.hashing import sha256_bytes, sha256_file
from facedetail.io.tables import write_table

MANIFEST_NAME = "manifest.parquet"

BASE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("key", pa.string()),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("seed", pa.int64()),
        pa.field("params_hash", pa.string(), nullable=False),
    ]
)


def file_row(
    root: Path, relpath: str, *, item_id: str | None = None, seed: int | None = None,
    params_hash: str, **extra: Any,
) -> dict[str, Any]:
    """A manifest row for a loose file ``root/relpath`` (hash and size read from disk)."""
    full = root / relpath
    return {
        "id": item_id or relpath,
        "path": relpath,
        "shard": None,
        "key": None,
        "sha256": sha256_file(full),
        "bytes": full.stat().st_size,
        "seed": seed,
        "params_hash": params_hash,
        **extra,
    }


def write_manifest(path: Path | str, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows (sorted by id) as a deterministic Parquet file, atomically."""
    if not rows:
        raise ValueError("a manifest needs at least one row")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("manifest ids must be unique")
    ordered = sorted(rows, key=lambda r: r["id"])
    extra_cols = sorted({k for r in ordered for k in r} - set(BASE_SCHEMA.names))
    columns = {name: [r.get(name) for r in ordered] for name in BASE_SCHEMA.names + extra_cols}
    base = pa.table({n: columns[n] for n in BASE_SCHEMA.names}, schema=BASE_SCHEMA)
    for name in extra_cols:
        base = base.append_column(name, pa.array(columns[name]))
    return write_table(path, base)


def read_manifest(path: Path | str) -> pa.Table:
    """Read a manifest written by :func:`write_manifest`."""
    return pq.read_table(path)


def verify_manifest(root: Path | str, manifest: pa.Table | None = None) -> list[str]:
    """Re-hash every item listed in ``root/manifest.parquet``; returns ids that do not match.

    Loose files are hashed on disk; items in tar shards by the shard member named ``key``
    (each shard is read once, front to back).
    """
    root = Path(root)
    table = manifest if manifest is not None else read_manifest(root / MANIFEST_NAME)
    bad = []
    by_shard: dict[str, dict[str, tuple[str, str]]] = {}
    for row in table.select(["id", "path", "shard", "key", "sha256"]).to_pylist():
        if row["path"] is not None:
            full = root / row["path"]
            if not full.is_file() or sha256_file(full) != row["sha256"]:
                bad.append(row["id"])
        elif row["shard"] is not None:
            by_shard.setdefault(row["shard"], {})[row["key"]] = (row["id"], row["sha256"])
    for shard, members in by_shard.items():
        found = set()
        if (root / shard).is_file():
            with tarfile.open(root / shard, "r|") as tar:
                for member in tar:
                    expected = members.get(member.name)
                    if expected and member.isfile() and sha256_bytes(tar.extractfile(member).read()) == expected[1]:
                        found.add(member.name)
        bad += [members[name][0] for name in members if name not in found]
    return sorted(bad)
