"""A synthetic capture set with known displacement: procedural facial details on a morphable-model proxy.

Everything is defined in the face model's UV space, in "UV millimetres": ``X = u·S``, ``Y = v·S``
with ``S`` the model's mean length of one UV unit (:func:`facedetail.model.uvmap.mm_per_uv`),
so widths and spacings are close to millimetres on the face (the layout's local distortion
makes them vary by about ±40 %). Positions come from the model's iBUG landmarks, whose UVs
are the same for every identity and expression.

The details (:class:`SyntheticDetails`), a displacement in mm along the proxy normal:

* forehead lines, deepened by surprise (and fear); frown lines between the brows, by anger
  (disgust, sadness); crow's feet at the outer eye corners and nasolabial folds, by happiness;
  each a groove of Gaussian cross-section along a curve, tapered at its ends, with a depth of
  ``neutral_fraction`` of its full depth when its expression is absent;
* pore-scale texture: a sum of random plane waves with wavelengths in a band, a given RMS.

The default depths are those of real skin (:class:`DetailConfig`); what was drawn is measured back on the
ground-truth texels (:meth:`DetailParts.amplitude`: per family the deepest point, the pores' RMS, mean |d|).

The scan (:func:`synthesize_scan`): the proxy ``model(α, β)`` subdivided until no edge is
longer than ``edge_mm`` (:func:`facedetail.render.detailed.subdivide_proxy`: trimesh's crack-free
midpoint splits that also interpolate the UVs and normals, the subdivision the item's photos render),
each vertex moved along the proxy's interpolated normal by details + a smooth
low-frequency "proxy fitting error" (:class:`Mismatch`, which the extraction's high-pass is
meant to remove), plus isotropic sensor noise; holes are cut and the whole scan is moved by a
small random rigid motion, which the extraction's ICP must undo.

The analytic ground truth is the detail field evaluated at the texel centres of the proxy's UV
raster (:func:`ground_truth_map`, on the texel grid: :func:`detail_parts`): the same UV space and texels
as the extraction, which then applies the same high-pass (same mask, same σ) to both before comparing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import trimesh
from numpy.typing import NDArray
from pydantic import Field

from facedetail.config import Config
from facedetail.errors import FacedetailError
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVRaster
from facedetail.render.detailed import SubdividedProxy, subdivide_proxy

NEUTRAL = "neutral"
# Which expressions deepen which wrinkle family (weights on the model's blendshape names).
DRIVERS: dict[str, dict[str, float]] = {
    "forehead": {"surprise": 1.0, "fear": 0.6},
    "frown": {"anger": 1.0, "disgust": 0.5, "sadness": 0.3},
    "crows_feet": {"happiness": 1.0},
    "nasolabial": {"happiness": 1.0, "disgust": 0.5},
}
# iBUG-68 landmarks the layout is built from (0-based).
_BROWS = list(range(17, 27))
_NOSE_TOP, _NOSE_WINGS, _EYE_OUTER, _MOUTH_CORNERS = 27, (31, 35), (36, 45), (48, 54)
_INNER_BROWS = (21, 22)


class DetailConfig(Config):
    """The procedural details of the synthetic scans (depths at full expression).

    The defaults follow measurements of real skin (sources in the README): expression lines of the forehead,
    glabella and eye corners are a few tenths of a millimetre deep (silicone-replica profilometry grades a
    shallow nasolabial wrinkle below 0.2 mm and places deep wrinkles around and beyond 0.5 mm; skin texture
    lines are 0.02-0.2 mm), nasolabial folds reach about 1 mm at a full smile, and pore-scale relief is a few
    hundredths of a millimetre.
    """

    forehead_lines: int = Field(4, ge=0)
    """Horizontal forehead lines per subject."""
    wrinkle_depth_mm: float = Field(0.35, ge=0)
    """Typical depth of forehead lines, frown lines and crow's feet at their full expression."""
    wrinkle_width_mm: float = Field(0.8, gt=0)
    """σ of a wrinkle's Gaussian cross-section."""
    fold_depth_mm: float = Field(0.8, ge=0)
    """Typical depth of the nasolabial folds at full happiness."""
    fold_width_mm: float = Field(1.5, gt=0)
    """σ of a nasolabial fold's cross-section."""
    depth_spread: float = Field(0.25, ge=0, lt=1)
    """Each groove of a subject gets its own full depth, the typical one times U(1 ± this): people differ."""
    neutral_fraction: float = Field(0.3, ge=0, le=1)
    """Depth of each wrinkle family, relative to full, when its driving expression is absent."""
    pore_rms_mm: float = Field(0.015, ge=0)
    """RMS of the pore-scale texture (its troughs reach about 2-3x this)."""
    pore_wavelength_mm: tuple[float, float] = (1.5, 3.0)
    """Band of the pore texture's wavelengths (log-uniform). Real pores are 0.1-0.3 mm across: this band is what
    a UV chart of ~0.4 mm texels (1024²) can hold."""
    pore_waves: int = Field(96, ge=1)
    """Plane waves summed for the pore texture."""
    jitter_mm: float = Field(1.0, ge=0)
    """Random per-subject shift of every wrinkle's position."""


class ScanConfig(Config):
    """How a synthetic scan departs from its proxy besides the details."""

    edge_mm: float = Field(0.7, gt=0)
    """Longest edge of the scan after subdividing the proxy (its sampling of the details)."""
    noise_mm: float = Field(0.01, ge=0)
    """σ of the isotropic Gaussian sensor noise per scan vertex."""
    holes: int = Field(3, ge=0)
    """Holes cut into each scan (missing data)."""
    hole_radius_mm: tuple[float, float] = (2.0, 5.0)
    """Range of hole radii."""
    mismatch_mm: float = Field(0.0, ge=0)
    """Largest amplitude of an optional smooth "proxy fitting error" added to the scan. 0 by default:
    ICP absorbs part of such an error as a rigid motion, whose normal component is not smooth in
    UV where the face bends sharply (nose, lips), so the high-pass cannot remove it and the
    comparison with the ground truth would measure the construction rather than the extraction."""
    mismatch_bumps: int = Field(6, ge=0)
    """Gaussian bumps making up that error."""
    mismatch_width_mm: tuple[float, float] = (25.0, 45.0)
    """Range of their σ: much wider than the details, so the high-pass can tell them apart."""
    misalign_deg: float = Field(2.0, ge=0)
    """Largest rotation of the scan away from the proxy's frame (ICP must undo it)."""
    misalign_mm: float = Field(3.0, ge=0)
    """Largest translation of the scan away from the proxy's frame."""


# ------------------------------------------------------------------------------- detail field
@dataclass(frozen=True)
class Groove:
    """A wrinkle or fold: a Gaussian-profile groove along a polyline, tapered to 0 at both ends."""

    family: str
    points: NDArray[np.float64]
    """(K, 2) polyline in UV millimetres."""
    depth_mm: float
    width_mm: float

    def evaluate(self, xy: NDArray[np.float64]) -> NDArray[np.float64]:
        """(M,) displacement (mm, negative = into the skin) at UV-mm points (M, 2)."""
        out = np.zeros(len(xy))
        reach = 5.0 * self.width_mm
        lo, hi = self.points.min(0) - reach, self.points.max(0) + reach
        near = np.flatnonzero(((xy >= lo) & (xy <= hi)).all(axis=1))
        if near.size == 0 or self.depth_mm == 0:
            return out
        p = xy[near]
        a, b = self.points[:-1], self.points[1:]
        seg = b - a
        seg_len = np.linalg.norm(seg, axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg_len)])
        best = np.full(len(p), np.inf)
        along = np.zeros(len(p))
        for k in range(len(seg)):
            t = np.clip(((p - a[k]) @ seg[k]) / max(seg_len[k] ** 2, 1e-12), 0.0, 1.0)
            d2 = ((p - (a[k] + t[:, None] * seg[k])) ** 2).sum(axis=1)
            closer = d2 < best
            best[closer] = d2[closer]
            along[closer] = cum[k] + t[closer] * seg_len[k]
        taper = np.sin(np.pi * along / cum[-1])
        out[near] = -self.depth_mm * np.exp(-best / (2.0 * self.width_mm ** 2)) * taper
        return out


@dataclass(frozen=True)
class WaveField:
    """A sum of plane waves ``Σ a cos(2π f·x + φ)``: band-limited texture, exact at any point."""

    frequencies: NDArray[np.float64]
    """(K, 2) cycles per UV millimetre."""
    phases: NDArray[np.float64]
    amplitude_mm: float
    """Amplitude of each wave (the RMS of the sum is ``amplitude · sqrt(K / 2)``)."""

    def evaluate(self, xy: NDArray[np.float64]) -> NDArray[np.float64]:
        """(M,) the texture (mm) at UV-mm points (M, 2)."""
        out = np.zeros(len(xy))
        for start in range(0, len(xy), 65_536):
            arg = 2.0 * np.pi * (xy[start:start + 65_536] @ self.frequencies.T) + self.phases
            out[start:start + 65_536] = self.amplitude_mm * np.cos(arg).sum(axis=1)
        return out

    def evaluate_grid(self, xs: NDArray[np.float64], ys: NDArray[np.float64]) -> NDArray[np.float64]:
        """(len(ys), len(xs)) the texture at every ``(xs[c], ys[r])``: the same sum as :meth:`evaluate`.

        A plane wave separates on a grid, ``cos(a + b) = Re(e^{ia} e^{ib})``, so the K waves over R x C
        points are one complex (R, K) @ (K, C) product instead of R·C·K cosines (~40x faster at 1024²);
        it differs from :meth:`evaluate` by rounding only (~1e-15 mm).
        """
        cols = np.exp(2j * np.pi * np.outer(np.asarray(xs, np.float64), self.frequencies[:, 0]))
        out = np.empty((len(ys), len(xs)))
        for start in range(0, len(ys), 512):  # bounds the complex temporary at 512 x C
            y = np.asarray(ys[start:start + 512], np.float64)
            rows = np.exp(1j * (2.0 * np.pi * np.outer(y, self.frequencies[:, 1]) + self.phases))
            out[start:start + len(y)] = self.amplitude_mm * (rows @ cols.T).real
        return out


@dataclass(frozen=True)
class Mismatch:
    """A smooth field of Gaussian bumps: the proxy's low-frequency fitting error."""

    centres: NDArray[np.float64]
    """(B, 2) UV millimetres."""
    sigmas_mm: NDArray[np.float64]
    amplitudes_mm: NDArray[np.float64]

    def evaluate(self, xy: NDArray[np.float64]) -> NDArray[np.float64]:
        out = np.zeros(len(xy))
        for c, s, a in zip(self.centres, self.sigmas_mm, self.amplitudes_mm, strict=True):
            out += a * np.exp(-((xy - c) ** 2).sum(axis=1) / (2.0 * s * s))
        return out


@dataclass(frozen=True)
class SyntheticDetails:
    """The known detail displacement of one synthetic scan, as a function of UV."""

    mm_per_uv: float
    """Length of one UV unit in UV millimetres (the model's mean scale)."""
    grooves: tuple[Groove, ...]
    pores: WaveField

    def evaluate(self, uv: NDArray[np.float64]) -> NDArray[np.float64]:
        """(M,) displacement in mm along the proxy normal at UV points (M, 2)."""
        xy = np.asarray(uv, np.float64) * self.mm_per_uv
        out = self.pores.evaluate(xy)
        for groove in self.grooves:
            out += groove.evaluate(xy)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (what was drawn, for people and for :meth:`from_json`)."""
        return {
            "mm_per_uv": self.mm_per_uv,
            "grooves": [{"family": g.family, "depth_mm": g.depth_mm, "width_mm": g.width_mm,
                         "points": g.points.tolist()} for g in self.grooves],
            "pores": {"frequencies": self.pores.frequencies.tolist(), "phases": self.pores.phases.tolist(),
                      "amplitude_mm": self.pores.amplitude_mm},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyntheticDetails:
        grooves = tuple(Groove(g["family"], np.asarray(g["points"], np.float64), float(g["depth_mm"]),
                               float(g["width_mm"])) for g in data["grooves"])
        p = data["pores"]
        pores = WaveField(np.asarray(p["frequencies"], np.float64), np.asarray(p["phases"], np.float64),
                          float(p["amplitude_mm"]))
        return cls(float(data["mm_per_uv"]), grooves, pores)


@dataclass(frozen=True, eq=False)
class SampledDetails:
    """``details`` for renders: the grooves exact, the pore texture sampled from an R x R UV grid (bicubic).

    The pores are the costly part of :meth:`SyntheticDetails.evaluate` (K cosines per point): on the grid they
    are one complex product (:meth:`WaveField.evaluate_grid`), then OpenCV's bicubic interpolation reads them at
    the points, ~5x faster for the ~10⁵ vertices of a render. At 1024² it is within 0.002 mm of the exact
    texture (RMS 0.0004 mm: OpenCV quantizes positions to 1/32 texel), a hundredth of a grey level in a photo.
    The truth of a photo stays :attr:`details`, exact at any resolution.
    """

    details: SyntheticDetails
    resolution: int = 1024

    def evaluate(self, uv: NDArray[np.float64]) -> NDArray[np.float64]:
        """(M,) displacement in mm at UV points (M, 2) (pores interpolated, grooves exact)."""
        d, R = self.details, self.resolution
        nodes = np.arange(R) / (R - 1) * d.mm_per_uv  # node c at u = c / (R - 1): the grid spans [0, 1]
        grid = d.pores.evaluate_grid(nodes, nodes).astype(np.float32)
        uv = np.asarray(uv, np.float64)
        pad = (-len(uv)) % 1024  # remap's maps are images: at most 32767 rows
        mx = np.pad(uv[:, 0] * (R - 1), (0, pad)).astype(np.float32).reshape(-1, 1024)
        my = np.pad(uv[:, 1] * (R - 1), (0, pad)).astype(np.float32).reshape(-1, 1024)
        out = cv2.remap(grid, mx, my, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT).ravel()[:len(uv)]
        out = out.astype(np.float64)
        xy = uv * d.mm_per_uv
        for groove in d.grooves:
            out += groove.evaluate(xy)
        return out


def expression_beta(model: MorphableModel, expression: str, weight: float = 1.0) -> NDArray[np.float32]:
    """β of a named expression: the model's blendshape of that name at ``weight``; zeros for ``neutral``."""
    beta = np.zeros(model.n_expression, np.float32)
    if expression == NEUTRAL:
        return beta
    if expression not in model.expression_names:
        raise FacedetailError(f"expression {expression!r} is not one of the model's: "
                              f"{', '.join((NEUTRAL, *model.expression_names))}")
    beta[model.expression_names.index(expression)] = weight
    return beta


def family_strengths(model: MorphableModel, beta: NDArray[np.floating], neutral_fraction: float) -> dict[str, float]:
    """Depth of each wrinkle family relative to full: ``neutral_fraction`` up to 1 as its expressions grow."""
    weights = dict(zip(model.expression_names, np.asarray(beta, np.float64), strict=True))
    out = {}
    for family, drivers in DRIVERS.items():
        drive = min(1.0, max(0.0, sum(w * weights.get(name, 0.0) for name, w in drivers.items())))
        out[family] = neutral_fraction + (1.0 - neutral_fraction) * drive
    return out


def landmark_uv_mm(model: MorphableModel, mm_per_uv: float) -> NDArray[np.float64]:
    """(68, 2) landmark positions in UV millimetres (NaN where the model defines no fixed vertex)."""
    out = np.full((68, 2), np.nan)
    ok = model.landmark_defined
    out[ok] = model.uv[model.landmark_vertices[ok]].astype(np.float64) * mm_per_uv
    needed = [*_BROWS, _NOSE_TOP, *_NOSE_WINGS, *_EYE_OUTER, *_MOUTH_CORNERS]
    if np.isnan(out[needed]).any():
        raise FacedetailError(f"{model.name}: the synthetic details need landmarks {needed} on fixed vertices")
    return out


@dataclass(frozen=True)
class DetailLayout:
    """Where a subject's wrinkles are (UV millimetres): identity, the same in every expression."""

    polylines: tuple[tuple[str, NDArray[np.float64]], ...]
    pores: WaveField
    depth_factors: tuple[float, ...] = ()
    """Per polyline, its full depth relative to the family's typical one (empty: all 1)."""


def subject_layout(model: MorphableModel, mm_per_uv: float, config: DetailConfig,
                   rng: np.random.Generator) -> DetailLayout:
    """Draw a subject's wrinkle curves and pore texture around the model's landmarks."""
    L = landmark_uv_mm(model, mm_per_uv)

    def jit(n: int = 2) -> NDArray[np.float64]:
        return rng.uniform(-config.jitter_mm, config.jitter_mm, n)

    lines: list[tuple[str, NDArray[np.float64]]] = []
    xm = float(L[_NOSE_TOP, 0])
    brow_top = float(L[_BROWS, 1].min())
    half = 0.42 * float(L[26, 0] - L[17, 0])
    for k in range(config.forehead_lines):
        y0 = brow_top - 9.0 - 6.0 * k + jit(1)[0]
        hw = half * (1.0 - 0.1 * k) + jit(1)[0]
        x = np.linspace(xm - hw, xm + hw, 25) + jit(1)[0]
        y = y0 + 2.5 * ((x - x.mean()) / hw) ** 2
        lines.append(("forehead", np.column_stack([x, y])))
    inner_y = float(L[list(_INNER_BROWS), 1].mean())
    for side in (-1.0, 1.0):
        top = np.array([xm + side * 4.5, inner_y - 3.0]) + jit()
        bottom = np.array([xm + side * 3.0, inner_y + 9.0]) + jit()
        lines.append(("frown", np.linspace(top, bottom, 8)))
    for corner, side in zip(_EYE_OUTER, (-1.0, 1.0), strict=True):
        start = L[corner] + np.array([side * 3.0, 0.0])
        for angle in (-28.0, 0.0, 28.0):
            a = np.radians(angle + jit(1)[0] * 4.0)
            direction = np.array([side * np.cos(a), np.sin(a)])
            length = 9.0 + jit(1)[0]
            lines.append(("crows_feet", np.linspace(start + jit() * 0.5, start + length * direction, 6)))
    for wing, mouth, side in zip(_NOSE_WINGS, _MOUTH_CORNERS, (-1.0, 1.0), strict=True):
        p0 = L[wing] + np.array([side * 3.0, -1.0]) + jit()
        p2 = L[mouth] + np.array([side * 5.0, 6.0]) + jit()
        p1 = (p0 + p2) / 2.0 + np.array([side * 4.0, 0.0])
        t = np.linspace(0.0, 1.0, 24)[:, None]
        lines.append(("nasolabial", (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2))
    lo, hi = config.pore_wavelength_mm
    wavelength = np.exp(rng.uniform(np.log(lo), np.log(hi), config.pore_waves))
    angle = rng.uniform(0.0, 2.0 * np.pi, config.pore_waves)
    freqs = np.column_stack([np.cos(angle), np.sin(angle)]) / wavelength[:, None]
    phases = rng.uniform(0.0, 2.0 * np.pi, config.pore_waves)
    pores = WaveField(freqs, phases, config.pore_rms_mm * np.sqrt(2.0 / config.pore_waves))
    # Drawn last, so that the curves and pores of a seed do not depend on the spread.
    factors = rng.uniform(1.0 - config.depth_spread, 1.0 + config.depth_spread, len(lines))
    return DetailLayout(tuple(lines), pores, tuple(float(f) for f in factors))


def expression_details(layout: DetailLayout, strengths: dict[str, float], config: DetailConfig,
                       mm_per_uv: float) -> SyntheticDetails:
    """The details of one expression: the subject's layout at the expression's depths."""
    grooves = []
    factors = layout.depth_factors or (1.0,) * len(layout.polylines)
    for (family, points), factor in zip(layout.polylines, factors, strict=True):
        full, width = ((config.fold_depth_mm, config.fold_width_mm) if family == "nasolabial"
                       else (config.wrinkle_depth_mm, config.wrinkle_width_mm))
        grooves.append(Groove(family, points, float(full * factor * strengths[family]), float(width)))
    return SyntheticDetails(mm_per_uv, tuple(grooves), layout.pores)


def draw_mismatch(model: MorphableModel, mm_per_uv: float, config: ScanConfig, rng: np.random.Generator) -> Mismatch:
    """Smooth bumps over the inner face: the low-frequency error of a proxy fitted to a scan."""
    L = landmark_uv_mm(model, mm_per_uv)
    lo, hi = np.nanmin(L[17:], axis=0), np.nanmax(L[17:], axis=0)
    n = config.mismatch_bumps
    return Mismatch(rng.uniform(lo, hi, (n, 2)), rng.uniform(*config.mismatch_width_mm, n),
                    rng.uniform(-config.mismatch_mm, config.mismatch_mm, n))


def random_rigid(rng: np.random.Generator, max_deg: float, max_mm: float,
                 centre: NDArray[np.float64]) -> NDArray[np.float64]:
    """(4, 4) rotation about ``centre`` by up to ``max_deg`` around a random axis, then a shift of up to ``max_mm``."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.5, 1.0) * max_deg)
    shift = rng.standard_normal(3)
    shift *= rng.uniform(0.5, 1.0) * max_mm / np.linalg.norm(shift)
    rot = trimesh.transformations.rotation_matrix(angle, axis, point=centre)
    rot[:3, 3] += shift
    return rot


@dataclass(frozen=True)
class SyntheticScan:
    """A synthetic scan and what was done to make it."""

    mesh: trimesh.Trimesh
    """The scan in mm, in its own (misaligned) frame."""
    misalignment: NDArray[np.float64]
    """(4, 4) rigid motion from the proxy's frame to the scan's."""
    holes: list[dict[str, Any]]
    """Centre (UV) and radius (mm) of each hole."""


def synthesize_scan(model: MorphableModel, proxy_vertices: NDArray[np.float64], details: SyntheticDetails,
                    mismatch: Mismatch, config: ScanConfig, rng: np.random.Generator,
                    fine: SubdividedProxy | None = None,
                    detail_values: NDArray[np.float64] | None = None) -> SyntheticScan:
    """The detailed scan of one proxy: subdivided, displaced along the normal, noisy, holed, moved.

    ``fine`` is the proxy already subdivided to ``config.edge_mm`` (:func:`subdivide_proxy`) and
    ``detail_values`` the details at its vertices, when the caller has them (the photos of a synthetic
    item render the same subdivision): the scan is the same either way.
    """
    if fine is None:
        fine = subdivide_proxy(model, proxy_vertices, config.edge_mm)
    points, uv, n, faces = fine.points, fine.uv, fine.normals, fine.faces
    xy = uv * details.mm_per_uv
    offset = (details.evaluate(uv) if detail_values is None else detail_values) + mismatch.evaluate(xy)
    points = points + offset[:, None] * n
    if config.noise_mm > 0:
        points = points + rng.normal(0.0, config.noise_mm, points.shape)
    holes = []
    keep = np.ones(len(faces), bool)
    if config.holes:
        centroid_xy = xy[faces].mean(axis=1)
        L = landmark_uv_mm(model, details.mm_per_uv)
        lo, hi = np.nanmin(L[17:], axis=0), np.nanmax(L[17:], axis=0)
        for _ in range(config.holes):
            centre = rng.uniform(lo, hi)
            radius = float(rng.uniform(*config.hole_radius_mm))
            keep &= ((centroid_xy - centre) ** 2).sum(axis=1) > radius ** 2
            holes.append({"centre_uv": (centre / details.mm_per_uv).tolist(), "radius_mm": radius})
    mesh = trimesh.Trimesh(points, faces[keep], process=False, validate=False)
    mesh.remove_unreferenced_vertices()
    motion = random_rigid(rng, config.misalign_deg, config.misalign_mm,
                          np.asarray(proxy_vertices, np.float64).mean(axis=0))
    mesh.apply_transform(motion)
    return SyntheticScan(mesh, motion, holes)


@dataclass(frozen=True)
class DetailParts:
    """The details on a UV raster's texel grid, by part (mm; also outside the chart, where nothing is drawn)."""

    pores: NDArray[np.float64]
    """(R, R) the pore texture."""
    families: dict[str, NDArray[np.float64]]
    """(R, R) per wrinkle family, the sum of its grooves."""
    covered: NDArray[np.bool_]
    """(R, R) the chart: texels a triangle covers."""

    @property
    def total(self) -> NDArray[np.float64]:
        """(R, R) the displacement: pores plus every family."""
        out = self.pores.copy()
        for grid in self.families.values():
            out += grid
        return out

    def amplitude(self) -> dict[str, Any]:
        """What was drawn, measured over the chart: per family the deepest point of its grooves (mm), the pore
        texture's RMS (mm) and the mean |displacement| (mm)."""
        c = self.covered
        return {"max_depth_mm": {f: float(-min(g[c].min(), 0.0)) for f, g in sorted(self.families.items())},
                "pore_rms_mm": float(np.sqrt(np.mean(self.pores[c] ** 2))),
                "mean_abs_mm": float(np.mean(np.abs(self.total[c])))}


def detail_parts(details: SyntheticDetails, raster: UVRaster) -> DetailParts:
    """The details at the texel centres of ``raster``, by part.

    The pores are evaluated on the whole grid at once (:meth:`WaveField.evaluate_grid`); a groove is zero
    beyond 5σ of its polyline, so only the block of texels in that reach is evaluated (a forehead line
    covers ~1 % of the chart). Together ~10x faster at 1024² than :meth:`SyntheticDetails.evaluate` at
    every texel, and equal to it up to rounding.
    """
    R = raster.resolution
    centres = (np.arange(R) + 0.5) / R * details.mm_per_uv
    pores = details.pores.evaluate_grid(centres, centres)
    families: dict[str, NDArray[np.float64]] = {}
    for groove in details.grooves:
        reach = 5.0 * groove.width_mm
        lo, hi = groove.points.min(0) - reach, groove.points.max(0) + reach
        c0, r0 = (int(i) for i in np.searchsorted(centres, lo, "left"))
        c1, r1 = (int(i) for i in np.searchsorted(centres, hi, "right"))
        grid = families.setdefault(groove.family, np.zeros((R, R)))
        if c1 <= c0 or r1 <= r0:
            continue
        x, y = np.meshgrid(centres[c0:c1], centres[r0:r1])
        grid[r0:r1, c0:c1] += groove.evaluate(np.column_stack([x.ravel(), y.ravel()])).reshape(x.shape)
    return DetailParts(pores, families, raster.covered)


def amplitude_summary(amplitudes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several :meth:`DetailParts.amplitude` together: the deepest groove of each family, the mean pore RMS and
    the mean of the mean |d| (mm, rounded to 0.01 µm)."""
    if not amplitudes:
        return {}
    families = sorted({f for a in amplitudes for f in a["max_depth_mm"]})
    return {"max_depth_mm": {f: round(max(a["max_depth_mm"].get(f, 0.0) for a in amplitudes), 5) for f in families},
            "pore_rms_mm": round(float(np.mean([a["pore_rms_mm"] for a in amplitudes])), 5),
            "mean_abs_mm": round(float(np.mean([a["mean_abs_mm"] for a in amplitudes])), 5)}


def ground_truth_map(details: SyntheticDetails, raster: UVRaster,
                     parts: DetailParts | None = None) -> NDArray[np.float32]:
    """(R, R) analytic detail displacement (mm) at the raster's texel centres; NaN outside the chart.

    ``parts``: :func:`detail_parts` of the same details and raster, when the caller has them.
    """
    parts = detail_parts(details, raster) if parts is None else parts
    return np.where(parts.covered, parts.total, np.nan).astype(np.float32)


def details_json(details: SyntheticDetails, mismatch: Mismatch, strengths: dict[str, float],
                 scan: SyntheticScan) -> str:
    """Everything drawn for one synthetic scan, as deterministic JSON text."""
    data = {
        "details": details.to_json(),
        "strengths": strengths,
        "mismatch": {"centres_uv_mm": mismatch.centres.tolist(), "sigmas_mm": mismatch.sigmas_mm.tolist(),
                     "amplitudes_mm": mismatch.amplitudes_mm.tolist()},
        "misalignment": scan.misalignment.tolist(),
        "holes": scan.holes,
    }
    return json.dumps(data, sort_keys=True, indent=1) + "\n"
