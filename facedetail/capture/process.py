"""One capture item end to end: read, check, align, extract, and compare with a known ground truth."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
from numpy.typing import NDArray
from pydantic import Field

from facedetail.capture.align import AlignConfig, Alignment, align_scan
from facedetail.capture.extract import (
    DisplacementMaps,
    ExtractConfig,
    ProxyMaps,
    RayCaster,
    extract_displacement,
    highpass,
)
from facedetail.capture.scan import (
    CaptureError,
    CaptureItem,
    check_scale,
    load_proxy,
    load_scan,
    proxy_path,
    read_info,
    scan_path,
)
from facedetail.config import Config
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVRaster


class CaptureConfig(Config):
    """Displacement ground truth from scan pairs."""

    resolution: int = Field(1024, ge=16, le=8192)
    """Side R of the UV displacement maps (the original release: 4096)."""
    align: AlignConfig = AlignConfig()
    """Rigid alignment of each scan to its proxy."""
    extract: ExtractConfig = ExtractConfig()
    """Ray casting and high-pass."""
    max_masked_fraction: float = Field(0.6, gt=0, le=1)
    """Reject an item when more of the proxy's UV chart than this has no scan within reach."""
    png_scale_mm: float = Field(2.0, gt=0)
    """Displacement (mm) at the 16-bit PNG's extremes: the step is ``2 · scale / 65535``."""


def proxy_maps(raster: UVRaster, model: MorphableModel, vertices: NDArray[np.float64]) -> ProxyMaps:
    """A proxy in the model's topology over the model's UV raster (normals as the model computes them)."""
    verts = np.asarray(vertices, np.float64)
    return ProxyMaps.from_mesh(raster, verts, model.triangles, model.uv, model.vertex_normals(verts))


@dataclass(frozen=True)
class CaptureResult:
    """A processed item: its maps and the facts about it (manifest columns)."""

    item: CaptureItem
    maps: DisplacementMaps
    alignment: Alignment
    facts: dict[str, Any]


def compare_to_ground_truth(result: DisplacementMaps, ground_truth: NDArray[np.floating]) -> dict[str, float]:
    """Error of an extraction against a known detail displacement (mm) in the same UV space.

    The ground truth goes through the same high-pass (same mask, same σ) as the extraction, so
    what is compared is the same quantity; texels where either is undefined are left out.
    """
    gt = np.asarray(ground_truth, np.float64)
    usable = result.mask & np.isfinite(gt)
    gt_hp = highpass(np.where(usable, gt, 0.0), usable, result.sigma_texels)
    err = np.abs(result.displacement.astype(np.float64) - gt_hp)[usable]
    signal = gt_hp[usable]
    if err.size == 0:
        return {"compared_texels": 0}
    return {
        "compared_texels": int(err.size),
        "mae_mm": float(err.mean()),
        "p95_error_mm": float(np.percentile(err, 95)),
        "max_error_mm": float(err.max()),
        "gt_rms_mm": float(np.sqrt(np.mean(signal ** 2))),
        "gt_mean_abs_mm": float(np.abs(signal).mean()),
    }


def process_capture(item: CaptureItem, model: MorphableModel, raster: UVRaster, config: CaptureConfig,
                    rng: np.random.Generator) -> CaptureResult:
    """Displacement maps of one item; raises :class:`CaptureError` with the reason when it is unusable."""
    started = time.perf_counter()
    info = read_info(item)
    proxy_file = proxy_path(item, info)
    scan_file = scan_path(item, info)
    proxy = load_proxy(proxy_file, model, info.proxy_units or info.units)
    scan = load_scan(scan_file, info.units)
    ratio = check_scale(scan, proxy, info.units)
    pm = proxy_maps(raster, model, proxy)
    alignment = align_scan(pm.positions[pm.covered], np.asarray(scan.vertices), np.asarray(scan.vertex_normals),
                           config.align, rng)
    aligned = trimesh.Trimesh(trimesh.transform_points(scan.vertices, alignment.transform), scan.faces,
                              process=False, validate=False)
    caster = RayCaster(aligned, config.extract.ray_backend)
    extract_started = time.perf_counter()
    maps = extract_displacement(pm, aligned, config.extract, caster)
    extract_seconds = time.perf_counter() - extract_started
    if maps.masked_fraction > config.max_masked_fraction:
        raise CaptureError(
            "no overlap", f"{maps.masked_fraction:.0%} of the proxy's UV chart has no scan within "
            f"{config.extract.max_distance_mm:g} mm of it (limit {config.max_masked_fraction:.0%})")
    subject, _, expression = item.id.partition("/")
    facts: dict[str, Any] = {
        "item": item.id, "subject": subject, "expression": expression,
        "scan_file": scan_file.name, "proxy_file": proxy_file.name, "units": info.units,
        "proxy_kind": "coefficients" if proxy_file.suffix == ".json" else "mesh",
        "scan_vertices": len(scan.vertices), "scan_faces": len(scan.faces), "scale_ratio": ratio,
        "photos": [p if isinstance(p, str) else p.file for p in info.photos],
        "icp_method": alignment.method, "icp_iterations": alignment.iterations,
        "icp_residual_before_mm": alignment.residual_before_mm, "icp_residual_mm": alignment.residual_mm,
        "icp_overlap": alignment.overlap, "icp_rotation_deg": alignment.rotation_deg,
        "icp_translation_mm": alignment.translation_mm,
        "resolution": raster.resolution, "texel_mm": pm.texel_mm, "highpass_sigma_texels": maps.sigma_texels,
        "masked_fraction": maps.masked_fraction, "valid_texels": int(maps.mask.sum()),
        "folded_texels": int(maps.folded.sum()), "cast_texels": int((maps.covered & ~maps.folded).sum()),
        "ray_backend": maps.backend, "extract_seconds": extract_seconds,
    }
    facts.update(_ground_truth_facts(item.folder, info.ground_truth, maps, raster.resolution))
    facts["seconds"] = time.perf_counter() - started
    return CaptureResult(item, maps, alignment, facts)


def _ground_truth_facts(folder: Path, name: str | None, maps: DisplacementMaps, resolution: int) -> dict[str, Any]:
    """Accuracy against the item's ground truth, or why it was not measured (never a rejection)."""
    if name is None:
        return {"gt_note": None}
    path = folder / name
    try:
        gt = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        return {"gt_note": f"ground truth {name} unreadable: {err}"}
    if gt.shape != (resolution, resolution):
        return {"gt_note": f"ground truth {name} is {gt.shape}, the maps are {resolution}x{resolution}: "
                           "not compared (generate it at the same resolution)"}
    return {"gt_note": None, **{f"gt_{k}" if not k.startswith("gt_") else k: v
                                for k, v in compare_to_ground_truth(maps, gt).items()}}
