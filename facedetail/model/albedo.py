"""A documented synthetic skin-albedo model for shape-only morphable models (the Surrey model).

The public Surrey model has no colour model. The detail network's re-rendering loss and the
synthetic renders need per-vertex reflectance, so we build one from facial regions located by
the model's own iBUG landmarks:

* mean: a base skin reflectance, blended towards lip and brow colours in soft regions
  (Gaussian fall-off with distance to the landmark chains on the mean shape) and slightly
  redder cheeks;
* components (unit-norm deltas with their norm as the standard deviation):
  ``melanin`` (darker/lighter skin overall), ``hemoglobin`` (redness, strongest on cheeks and
  lips), ``lip_tone`` and ``brow_darkness``.

Colours are linear-RGB reflectances chosen within the range reported for human skin in
diffuse-albedo measurements (e.g. Weyrich et al., SIGGRAPH 2006: skin about 0.3 to 0.7 in red,
lower in green and blue). This is a plausible, deterministic prior, not a measured model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facedetail.model.morphable import unit_rows

ALBEDO_VERSION = "facedetail-synthetic-skin-v1"

BASE_SKIN = np.array([0.62, 0.43, 0.34])
LIP = np.array([0.55, 0.25, 0.24])
BROW = np.array([0.16, 0.11, 0.08])
CHEEK_TINT = np.array([0.04, -0.02, -0.02])
COMPONENT_NAMES = ("melanin", "hemoglobin", "lip_tone", "brow_darkness")


@dataclass(frozen=True)
class SyntheticAlbedo:
    """Mean, unit basis, std devs and names of the synthetic albedo model."""

    mean: np.ndarray
    basis: np.ndarray
    std: np.ndarray
    names: tuple[str, ...]
    provenance: dict


def _region(points: np.ndarray, anchors: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Soft membership in [0, 1]: Gaussian of the distance to the nearest anchor."""
    d2 = ((points[:, None, :] - anchors[None, :, :]) ** 2).sum(-1).min(1)
    return np.exp(-d2 / (2.0 * sigma_mm**2))


def synthetic_skin_albedo(mean_shape: np.ndarray, landmark_vertices: np.ndarray,
                          n_components: int = 4) -> SyntheticAlbedo:
    """Build the synthetic albedo for a mesh whose iBUG landmarks are ``landmark_vertices`` (68,)."""
    if not 0 <= n_components <= len(COMPONENT_NAMES):
        raise ValueError(f"n_components must be in 0..{len(COMPONENT_NAMES)}")

    def anchors(ibug_ids: range | list[int]) -> np.ndarray:
        idx = [landmark_vertices[i - 1] for i in ibug_ids if landmark_vertices[i - 1] >= 0]
        if not idx:
            raise ValueError("the landmark map defines none of the albedo region anchors")
        return mean_shape[np.asarray(idx)].astype(np.float64)

    def polyline(ibug_ids: list[int], closed: bool = False, per_segment: int = 8) -> np.ndarray:
        """Points along the landmark chain, so a region follows the feature, not its landmarks."""
        p = anchors(ibug_ids)
        if closed:
            p = np.vstack([p, p[:1]])
        t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None, None]
        return (p[:-1] * (1 - t) + p[1:] * t).transpose(1, 0, 2).reshape(-1, 3)

    pts = mean_shape.astype(np.float64)
    outer_lip = polyline(list(range(49, 61)), closed=True)
    lips = np.maximum(_region(pts, outer_lip, 2.5), _region(pts, anchors(range(61, 69)), 3.0))
    brows = np.maximum(_region(pts, polyline(list(range(18, 23))), 3.0),
                       _region(pts, polyline(list(range(23, 28))), 3.0))
    cheek_centres = np.stack([
        (anchors([37])[0] + anchors([49])[0]) / 2.0,
        (anchors([46])[0] + anchors([55])[0]) / 2.0,
    ])
    cheeks = _region(pts, cheek_centres, 15.0)

    mean = np.tile(BASE_SKIN, (len(pts), 1)) + cheeks[:, None] * CHEEK_TINT
    for colour, weight in ((LIP, lips * 0.85), (BROW, brows * 0.7)):
        mean = mean * (1.0 - weight[:, None]) + colour * weight[:, None]

    deltas = np.stack([
        -0.30 * mean * (1.0 - 0.5 * brows[:, None]),                               # melanin
        np.outer(0.3 + cheeks + lips, [0.05, -0.03, -0.03]),                       # hemoglobin
        np.outer(lips, [0.07, -0.03, -0.02]),                                      # lip_tone
        np.outer(brows, [-0.06, -0.045, -0.035]),                                  # brow_darkness
    ])[:n_components]
    basis, std = unit_rows(deltas) if n_components else (np.zeros((0, len(pts), 3), np.float32),
                                                          np.zeros(0, np.float32))
    provenance = {
        "kind": "synthetic",
        "version": ALBEDO_VERSION,
        "description": "base skin reflectance with lip/brow regions and cheek tint located by the "
                       "model's iBUG landmarks; components melanin, hemoglobin, lip_tone, brow_darkness",
        "base_skin_linear_rgb": BASE_SKIN.tolist(),
        "components": list(COMPONENT_NAMES[:n_components]),
    }
    return SyntheticAlbedo(np.clip(mean, 0, 1).astype(np.float32), basis, std,
                           COMPONENT_NAMES[:n_components], provenance)
