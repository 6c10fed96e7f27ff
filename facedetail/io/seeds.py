"""Per-item seeds derived from (global seed, stage, item id), and the seeded draws every stage shares.

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


def truncated_normal(rng: np.random.Generator, size: int | tuple[int, ...], bound: float,
                     sigma: float = 1.0) -> np.ndarray:
    """N(0, sigma²) truncated to [-bound, bound] (absolute units), by rejection."""
    if bound <= 0 or sigma == 0:
        return np.zeros(size)
    out = rng.standard_normal(size) * sigma
    bad = np.abs(out) > bound
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum())) * sigma
        bad = np.abs(out) > bound
    return out
