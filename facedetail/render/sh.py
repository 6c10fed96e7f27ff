"""Order-2 spherical-harmonics (SH) shading of a Lambertian surface.

The image model is the paper's: ``I = albedo ⊙ S(n)`` with ``S(n) = Σ_k c_k Y_k(n)`` over the
9 real SH basis functions ``Y_k`` and per-channel coefficients ``c`` (9, 3). A directional
light of intensity ``s`` towards unit direction ``l`` gives the clamped-cosine shading
``s · max(0, n·l)`` (intensity 1 lights a white albedo fully); its SH projection is
``c_k = s · Â_l(k) · Y_k(l)`` with ``Â = (π, 2π/3, π/4)`` per band (Ramamoorthi & Hanrahan
2001). Ambient light ``a`` adds ``a / Y_0`` to ``c_0``. The order-2 truncation overshoots by
6 % where ``n = l`` and rings slightly below 0 on the unlit side, which :func:`shade` clips.
"""

from __future__ import annotations

import numpy as np

_Y0 = 0.5 * np.sqrt(1.0 / np.pi)
_Y1 = np.sqrt(3.0 / (4.0 * np.pi))
_Y2 = 0.5 * np.sqrt(15.0 / np.pi)
_Y20 = 0.25 * np.sqrt(5.0 / np.pi)
_Y22 = 0.25 * np.sqrt(15.0 / np.pi)
# Â_l per basis function: band 0, band 1 (x3), band 2 (x5).
_BAND_FACTOR = np.array([np.pi, *[2.0 * np.pi / 3.0] * 3, *[np.pi / 4.0] * 5])


def sh_basis(normals: np.ndarray) -> np.ndarray:
    """(..., 9) real SH basis at unit vectors (..., 3), order: 1, y, z, x, xy, yz, 3z²-1, xz, x²-y²."""
    n = np.asarray(normals, np.float64)
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    return np.stack([
        np.full_like(x, _Y0), _Y1 * y, _Y1 * z, _Y1 * x,
        _Y2 * x * y, _Y2 * y * z, _Y20 * (3.0 * z * z - 1.0), _Y2 * x * z, _Y22 * (x * x - y * y),
    ], axis=-1)


def directional_sh(direction: np.ndarray, intensity: float, ambient: float,
                   color: np.ndarray | None = None) -> np.ndarray:
    """(9, 3) SH coefficients of a directional light (unit ``direction`` towards the light) plus ambient."""
    direction = np.asarray(direction, np.float64)
    coeffs = intensity * _BAND_FACTOR * sh_basis(direction / np.linalg.norm(direction))
    coeffs[0] += ambient / _Y0
    rgb = np.ones(3) if color is None else np.asarray(color, np.float64)
    return np.outer(coeffs, rgb)


def shade(normals: np.ndarray, sh: np.ndarray) -> np.ndarray:
    """(..., 3) non-negative shading of unit ``normals`` (..., 3) under ``sh`` (9, 3)."""
    return np.maximum(sh_basis(normals) @ np.asarray(sh, np.float64), 0.0)
