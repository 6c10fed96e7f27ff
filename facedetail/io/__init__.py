"""Data conventions shared by every stage: atomic writes, hashing, seeds, manifests, lineage."""

from facedetail.io.atomic import (
    atomic_directory,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temps,
)
from facedetail.io.hashing import canonical_json, params_hash, sha256_bytes, sha256_file
from facedetail.io.manifest import MANIFEST_NAME, read_manifest, write_manifest
from facedetail.io.seeds import derive_seed, item_rng

__all__ = [
    "MANIFEST_NAME",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_json",
    "derive_seed",
    "item_rng",
    "params_hash",
    "read_manifest",
    "remove_stale_temps",
    "sha256_bytes",
    "sha256_file",
    "write_manifest",
]
