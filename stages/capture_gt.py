"""Stage ``capture_gt``: ground-truth displacement maps in the face model's UV space from scan pairs.

For each ``<subject>/<expression>`` folder of ``captures`` (the input layout is described in
``facedetail.capture.scan``): load the proxy and the scan, check them, align the scan to the
proxy (ICP), rasterize the proxy in UV space at ``resolution``, cast rays along ± the proxy
normal to the scan for the signed distance, and keep the details by subtracting a
Gaussian-smoothed copy (``extract.highpass_sigma_mm``). Unusable items go to the quarantine
table with the reason; the rest are processed. Where an item brings a known ground truth (the
synthetic set does), the accuracy is measured.

Outputs in ``data/capture_gt/``: ``maps/<subject>/<expression>/`` (``displacement.npy`` float32 mm,
``displacement.png`` 16-bit with ``png_scale_mm`` in the manifest, ``mask.png``, ``normal.png``),
``manifest.parquet`` (one row per file, with the item's facts), ``quarantine.parquet``,
``preview.png`` and ``lineage.json``; facts and accuracy in ``metrics/capture_gt.json``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from threadpoolctl import threadpool_limits

from facedetail.capture.extract import embree_available
from facedetail.capture.maps import MAP_FILES, load_item, write_item_maps
from facedetail.capture.parallel import map_items
from facedetail.capture.patches import face_regions, patch_origins
from facedetail.capture.preview import PreviewItem, preview_sheet
from facedetail.capture.process import CaptureConfig, process_capture, proxy_maps
from facedetail.capture.scan import CaptureError, CaptureItem, discover_items, load_proxy, proxy_path, read_info
from facedetail.config import Config
from facedetail.errors import FacedetailError, InterruptedRunError, SourceFileError
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.hashing import params_hash, sha256_file
from facedetail.io.images import encode_png
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import file_row
from facedetail.io.seeds import derive_seed, item_rng
from facedetail.io.tables import write_quarantine
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import rasterize_uv
from stages._common import (
    Stage,
    StageParams,
    StageResult,
    hash_outputs,
    lineage_run,
    main,
    manifest_hashes,
    worker_count,
    write_json,
)

NAME = "capture_gt"
OUT_DIR = Path("data/capture_gt")
METRICS = Path("metrics/capture_gt.json")
MAPS = "maps"
QUARANTINE = "quarantine.parquet"
PREVIEW = "preview.png"
# Facts that vary from run to run (timings): in the summary, never in the manifest or metrics.
_TIMING = ("seconds", "extract_seconds")


class PatchCountConfig(Config):
    """Training patches counted per region in the metrics (cut by ``facedetail.capture.patches``)."""

    size: int = Field(256, ge=8)
    """Patch side in texels (the paper: 256)."""
    stride: int = Field(64, ge=1)
    """Step between patches (the paper: 64)."""
    min_valid: float = Field(0.5, ge=0, le=1)
    """Least valid fraction of a patch's texels for it to count."""
    overlap: int = Field(128, ge=0)
    """Texels each face region extends past the nose-tip line."""


class CaptureGtParams(StageParams, CaptureConfig):
    """Parameters of the ``capture_gt`` stage (``capture_gt:`` in params.yaml)."""

    captures: str = "data/capture_synth"
    """Folder of ``<subject>/<expression>/`` capture items (default: the synthetic set)."""
    model: str = "data/face_model/model.npz"
    """The morphable model whose UV space the maps are in (and which evaluates coefficient proxies)."""
    seed: int = 2019
    """Seed of ICP's point sampling (per item, derived from it and the item id)."""
    patches: PatchCountConfig = PatchCountConfig()
    """Patch counts reported in the metrics."""
    preview_items: int = Field(6, ge=0)
    """Items shown on the preview sheet (the first by id)."""
    preview_tile: int = Field(256, ge=64, le=1024)
    """Side of each preview tile."""
    preview_scale_mm: float = Field(0.5, gt=0)
    """Displacement shown as black (-) and white (+) on the preview."""
    workers: int = Field(0, ge=0)
    """Processes; 0 = one per available CPU core."""


class CaptureWorker:
    """Processes items in one process: holds the model and its UV raster, writes maps into ``out_dir``."""

    def __init__(self, model_path: Path, config: CaptureConfig, seed: int, out_dir: Path, key: str,
                 patches: PatchCountConfig) -> None:
        self.model = MorphableModel.load(model_path)
        self.raster = rasterize_uv(self.model.uv, self.model.triangles, config.resolution)
        self.config = config
        self.seed = seed
        self.out_dir = out_dir
        self.key = key
        self.patches = patches

    def __call__(self, item: CaptureItem) -> dict[str, Any]:
        """``{"id", "rows"}`` for a processed item or ``{"id", "path", "reason"}`` for a rejected one."""
        seed = derive_seed(self.seed, NAME, item.id)
        try:
            result = process_capture(item, self.model, self.raster, self.config, item_rng(self.seed, NAME, item.id))
        except CaptureError as err:
            return {"id": item.id, "path": item.id, "reason": str(err)}
        except (InterruptedRunError, MemoryError):
            raise  # not this item's fault: the run itself must stop
        except Exception as err:  # anything else one item's files provoke: report it, go on
            return {"id": item.id, "path": item.id, "reason": f"unexpected error: {type(err).__name__}: {err}"}
        folder = self.out_dir / MAPS / item.id
        maps = result.maps
        clipped = write_item_maps(folder, maps.displacement, maps.mask, maps.normals, self.config.png_scale_mm)
        facts = {k: v for k, v in result.facts.items() if k not in _TIMING}
        facts["scan_units"] = facts.pop("units", None)  # the declared input unit; the maps are in mm
        facts.update(png_scale_mm=self.config.png_scale_mm, png_clipped_texels=clipped, units="mm")
        rows = [file_row(self.out_dir, f"{MAPS}/{item.id}/{name}", item_id=f"{item.id}/{kind}", seed=seed,
                         params_hash=self.key, kind=kind, **facts) for kind, name in MAP_FILES.items()]
        return {"id": item.id, "rows": rows, "timing": {k: result.facts[k] for k in _TIMING},
                "patches": _patch_counts(self.model, maps.mask, self.patches)}


def _patch_counts(model: MorphableModel, mask: np.ndarray, config: PatchCountConfig) -> dict[str, int]:
    regions = face_regions(model, mask.shape[0], config.overlap)
    return {name: len(patch_origins(mask, box, config.size, config.stride, config.min_valid))
            for name, box in regions.items()}


def run(params: CaptureGtParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Build ``data/capture_gt`` from the capture items of ``params.captures``."""
    root = Path(root)
    captures = root / params.captures
    model_path = root / params.model
    if not model_path.is_file():
        raise SourceFileError(model_path, "input not found", "Run `dvc repro face_model` first")
    if not captures.is_dir():
        raise SourceFileError(captures, "capture folder not found",
                              "Run `dvc repro capture_synth`, or set capture_gt.captures to your scans")
    if params.extract.ray_backend == "embree" and not embree_available():
        raise FacedetailError("capture_gt: extract.ray_backend 'embree' needs the embreex package "
                              "(pip install embreex; `make setup` installs it)")
    items = discover_items(captures)
    if not items:
        raise SourceFileError(captures, "no <subject>/<expression> folders",
                              "See the capture input layout in README.md")
    started = time.perf_counter()
    lineage = lineage_run(NAME, params, [captures, model_path], root, seed=params.seed, parent=parent)
    try:
        config = CaptureConfig(**params.model_dump(include=set(CaptureConfig.model_fields)))
        key = params_hash({**params.model_dump(mode="json", exclude={"workers", "captures", "model",
                                                                     "preview_items", "preview_tile",
                                                                     "preview_scale_mm"}),
                           "model_sha256": sha256_file(model_path)})
        out_dir = root / OUT_DIR
        with atomic_directory(out_dir) as tmp:
            factory = partial(CaptureWorker, model_path, config, params.seed, tmp, key, params.patches)
            results = map_items(factory, items, worker_count(params.workers), desc=NAME, unit="scan")
            done = [r for r in results if "rows" in r]
            bad = [r for r in results if "rows" not in r]
            if not done:
                kinds = Counter(r["reason"].split(":")[0] for r in bad)
                raise SourceFileError(captures, f"no item could be used ({dict(sorted(kinds.items()))}; "
                                      f"first: {bad[0]['id']}: {bad[0]['reason']})",
                                      "Fix the inputs (the layout is in README.md)")
            rows = [row for r in done for row in r["rows"]]
            if params.preview_items:
                _write_preview(tmp, params, model_path, captures, [r["id"] for r in done][:params.preview_items])
                rows.append(file_row(tmp, PREVIEW, item_id="preview", params_hash=key, kind="preview"))
            write_manifest(tmp / MANIFEST_NAME, rows)
            write_quarantine(tmp / QUARANTINE, [{"id": r["id"], "path": f"{params.captures}/{r['path']}",
                                                 "reason": r["reason"]} for r in bad])
            outputs = hash_outputs(tmp, out_dir, root, manifest_hashes(rows))
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        metrics = _metrics(done, bad, params, key)
        write_json(root / METRICS, metrics)
        lineage.complete_hashed(outputs)
    except BaseException as err:
        lineage.fail(err)
        raise
    texels = sum(r["rows"][0]["cast_texels"] for r in done)
    extract_seconds = sum(r["timing"]["extract_seconds"] for r in done)
    summary = {"items": len(results), "processed": len(done), "quarantined": len(bad),
               "quarantine_reasons": metrics["quarantine_reasons"],
               "mae_mm": metrics["accuracy"].get("mae_mm_mean"), "seconds": round(time.perf_counter() - started, 1),
               "extraction_texels_per_s": round(texels / extract_seconds) if extract_seconds else None}
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


def _write_preview(tmp: Path, params: CaptureGtParams, model_path: Path, captures: Path, ids: list[str]) -> None:
    """The preview sheet of the first processed items, read back from the files just written.

    One BLAS thread, as in the workers: the proxy's vertices must round the same on every machine
    for preview.png (a DVC output) to be byte-identical.
    """
    with threadpool_limits(1):
        _preview(tmp, params, model_path, captures, ids)


def _preview(tmp: Path, params: CaptureGtParams, model_path: Path, captures: Path, ids: list[str]) -> None:
    model = MorphableModel.load(model_path)
    raster = rasterize_uv(model.uv, model.triangles, params.resolution)
    shown = []
    for item_id in ids:
        item = CaptureItem(item_id, captures / item_id)
        info = read_info(item)
        proxy = load_proxy(proxy_path(item, info), model, info.proxy_units or info.units)
        pm = proxy_maps(raster, model, proxy)
        maps = load_item(tmp, item_id)
        shown.append(PreviewItem(item_id, maps.displacement, maps.mask, maps.normals, pm.positions, pm.normals))
    (tmp / PREVIEW).write_bytes(encode_png(preview_sheet(shown, params.preview_scale_mm, params.preview_tile), 6))


def _metrics(done: list[dict[str, Any]], bad: list[dict[str, Any]], params: CaptureGtParams,
             key: str) -> dict[str, Any]:
    """Deterministic facts: counts, reasons, alignment, masking and the accuracy against known ground truth."""
    facts = [r["rows"][0] for r in done]

    def stat(values: list[float], digits: int = 5) -> dict[str, float] | None:
        if not values:
            return None
        v = np.asarray(values, np.float64)
        return {"mean": round(float(v.mean()), digits), "min": round(float(v.min()), digits),
                "max": round(float(v.max()), digits)}

    measured = [f for f in facts if f.get("gt_mae_mm") is not None]
    accuracy: dict[str, Any] = {"items": len(measured)}
    if measured:
        mae = np.array([f["gt_mae_mm"] for f in measured])
        signal = np.array([f["gt_mean_abs_mm"] for f in measured])
        accuracy.update({
            "mae_mm_mean": round(float(mae.mean()), 5), "mae_mm_max": round(float(mae.max()), 5),
            "p95_error_mm_mean": round(float(np.mean([f["gt_p95_error_mm"] for f in measured])), 5),
            "gt_mean_abs_mm_mean": round(float(signal.mean()), 5),
            # None, not inf/NaN (invalid JSON), when the ground truth has no details at all.
            "relative_mae": round(float(mae.mean() / signal.mean()), 4) if signal.mean() > 0 else None,
            "masked_fraction_mean": round(float(np.mean([f["masked_fraction"] for f in measured])), 5),
            "per_expression": {
                e: round(float(np.mean([f["gt_mae_mm"] for f in measured if f["expression"] == e])), 5)
                for e in sorted({f["expression"] for f in measured})},
        })
    notes = sorted({f["gt_note"] for f in facts if f.get("gt_note")})
    if notes:
        accuracy["notes"] = notes
    patches = {name: int(sum(r["patches"][name] for r in done)) for name in done[0]["patches"]}
    return {
        "items": len(done) + len(bad),
        "processed": len(done),
        "quarantined": len(bad),
        "quarantine_reasons": dict(sorted(Counter(r["reason"].split(":")[0] for r in bad).items())),
        "resolution": params.resolution,
        "ray_backend": sorted({f["ray_backend"] for f in facts}),
        "highpass_sigma_mm": params.extract.highpass_sigma_mm,
        "masked_fraction": stat([f["masked_fraction"] for f in facts]),
        "icp_residual_mm": stat([f["icp_residual_mm"] for f in facts]),
        "icp_rotation_deg": stat([f["icp_rotation_deg"] for f in facts], 4),
        "png_clipped_texels": int(sum(f["png_clipped_texels"] for f in facts)),
        "accuracy": accuracy,
        "patches": {"size": params.patches.size, "stride": params.patches.stride,
                    "min_valid": params.patches.min_valid, "total": patches},
        "params_hash": key,
    }


STAGE = Stage(NAME, CaptureGtParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
