"""Content hashes of files, bytes and parameter sets."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path | str) -> str:
    """Hex SHA256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def _plain(obj: Any) -> Any:
    """NumPy scalars/arrays as their Python values (so ``np.int64(5)`` hashes like ``5``)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"cannot hash a value of type {type(obj).__name__}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)


def listing_hash(files: Mapping[str, str]) -> str:
    """Hex SHA256 of a folder's listing ``{relative path: sha256}``: its content, names included."""
    return sha256_bytes(canonical_json(dict(files)).encode("utf-8"))


def params_hash(params: Mapping[str, Any]) -> str:
    """Short stable hash (16 hex chars of SHA256) of a parameter mapping."""
    return sha256_bytes(canonical_json(params).encode("utf-8"))[:16]
