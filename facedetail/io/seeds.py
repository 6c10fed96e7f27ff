"""Per-item seeds derived from (global seed, stage, item id).

Hashing the triple, rather than spawning from one RNG stream, makes an item's randomness
independent of processing order, worker count and of which other items exist: growing a
dataset from N to M items leaves the first N unchanged.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SEP = "\x1f"


def derive_seed(global_seed: int, stage: str, item_id: str) -> int:
    """A 63-bit seed for one item of one stage; stable across machines and Python versions."""
    payload = _SEP.join((str(int(global_seed)), stage, str(item_id))).encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & ((1 << 63) - 1)


def item_rng(global_seed: int, stage: str, item_id: str) -> np.random.Generator:
    """A NumPy generator seeded by :func:`derive_seed`; never touches global RNG state."""
    return np.random.default_rng(derive_seed(global_seed, stage, item_id))


def in_holdout(global_seed: int, stage: str, item_id: str, fraction: float) -> bool:
    """Whether an item belongs to the held-out split: a hash draw, stable as the set grows."""
    return derive_seed(global_seed, stage, item_id) < fraction * (1 << 63)
