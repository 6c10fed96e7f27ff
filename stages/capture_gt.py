"""Stage ``capture_gt``: ground-truth displacement maps in the face model's UV space from scan pairs.

For each ``<subject>/<expression>`` folder of ``captures`` (the input layout is described in
``facedetail.capture.scan``): load the proxy and the scan, check them, align the scan to the
proxy (ICP), rasterize the proxy in UV space at ``process.resolution``, cast rays along ± the proxy
normal to the scan for the signed distance, and keep the details by subtracting a
Gaussian-smoothed copy (``process.extract.highpass_sigma_mm``). Unusable items go to the quarantine
table with the reason; the rest are processed. Where an item brings a known ground truth (the
synthetic set does), the accuracy is measured. Finished items are kept in
``data/.partial/capture_gt/`` with a completion record each, so a killed run resumes.

Outputs in ``data/capture_gt/``: ``maps/<subject>/<expression>/`` (``displacement.npy`` float32 mm,
``displacement.png`` 16-bit with ``process.png_scale_mm`` in the manifest, ``mask.png``, ``normal.png``),
``manifest.parquet`` (one row per file, with the item's facts), ``quarantine.parquet``,
``preview.png`` and ``lineage.json``; facts and accuracy in ``metrics/capture_gt.json``.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import model_validator

from facedetail.capture.evaluate import capture_metrics, reason_counts
from facedetail.capture.extract import embree_available
from facedetail.capture.preview import capture_preview
from facedetail.capture.process import CaptureConfig
from facedetail.capture.scan import discover_items
from facedetail.capture.worker import CaptureWorker, PatchCountConfig, link_items, process_items
from facedetail.config import content_key, input_path, run_only, set_level
from facedetail.errors import FacedetailError, SourceFileError
from facedetail.io.manifest import file_row
from facedetail.io.tables import QUARANTINE_NAME, write_quarantine
from facedetail.io.transaction import StageOutput
from facedetail.model.uvmap import UVChartConfig
from stages._common import Input, Stage, StageParams, inject_chart, main, model_input, worker_count

NAME = "capture_gt"
PREVIEW = "preview.png"


class CaptureGtParams(StageParams):
    """Parameters of the ``capture_gt`` stage (``capture_gt:`` in params.yaml)."""

    captures: str = input_path("data/capture_synth")
    """Folder of ``<subject>/<expression>/`` capture items (default: the synthetic set)."""
    model: str = input_path("data/face_model/model.npz")
    """The morphable model whose UV space the maps are in (and which evaluates coefficient proxies)."""
    seed: int = 2019
    """Seed of ICP's point sampling (per item, derived from it and the item id)."""
    process: CaptureConfig = CaptureConfig()
    """Map resolution, alignment, ray casting and high-pass, rejection threshold, 16-bit PNG scale."""
    patches: PatchCountConfig = PatchCountConfig()
    """Patch counts reported in the metrics."""
    preview_items: int = set_level(6, ge=0)
    """Items shown on the preview sheet (the first by id)."""
    preview_tile: int = set_level(256, ge=64, le=1024)
    """Side of each preview tile."""
    preview_scale_mm: float = set_level(0.5, gt=0)
    """Displacement shown as black (-) and white (+) on the preview."""
    workers: int = run_only(0, ge=0)
    """Processes; 0 = one per available CPU core."""
    uv_chart: UVChartConfig = UVChartConfig()
    """The shared UV chart (top-level ``uv_chart:`` section): the resolution of the maps."""

    @model_validator(mode="before")
    @classmethod
    def _shared_chart(cls, data: Any) -> Any:
        return inject_chart(data, "process", "resolution")


def inputs(params: CaptureGtParams) -> list[Input]:
    """The model and the capture folder."""
    remedy = "Run `dvc repro capture_synth`, or set capture_gt.captures to your scans"
    return [model_input(params.model), Input(params.captures, what="capture folder", remedy=remedy, kind="folder")]


def build(params: CaptureGtParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Process every capture item (finished items of a killed run are reused) and link the maps in."""
    captures, model_path, work_dir = root / params.captures, root / params.model, root / STAGE.work_dir
    if params.process.extract.ray_backend == "embree" and not embree_available():
        raise FacedetailError("capture_gt: extract.ray_backend 'embree' needs the embreex package "
                              "(pip install embreex; `make setup` installs it)")
    items = discover_items(captures)
    if not items:
        raise SourceFileError(captures, "no <subject>/<expression> folders",
                              "See the capture input layout in README.md")
    started = time.perf_counter()
    key = content_key(params, {"model": out.input_hash(model_path)})
    worker = partial(CaptureWorker, model_path, params.process, params.seed, NAME, key, params.patches)
    report = process_items(items, work_dir, key, worker, worker_count(params.workers), desc=NAME, unit="scan",
                           input_digests={it.id: out.input_hash(captures / it.id) for it in items})
    done = [r for r in report.results if "rows" in r]
    bad = [r for r in report.results if "rows" not in r]
    if not done:
        raise SourceFileError(captures, f"no item could be used ({reason_counts(bad)}; first: {bad[0]['id']}: "
                              f"{bad[0]['reason']})", "Fix the inputs (the layout is in README.md)")
    out.known.update(link_items(done, work_dir, out.dir))
    rows = [row for r in done for row in r["rows"]]
    if params.preview_items:
        sheet = capture_preview(out.dir, model_path, captures, [r["id"] for r in done][:params.preview_items],
                                params.process.resolution, params.preview_scale_mm, params.preview_tile)
        out.write_png(PREVIEW, sheet)
        rows.append(file_row(out.dir, PREVIEW, item_id="preview", params_hash=key, kind="preview"))
    out.write_manifest(rows)
    write_quarantine(out.dir / QUARANTINE_NAME, [{"id": r["id"], "path": f"{params.captures}/{r['path']}",
                                             "reason": r["reason"]} for r in bad])
    out.metrics = capture_metrics(done, bad, resolution=params.process.resolution, key=key, patches=params.patches,
                                  highpass_sigma_mm=params.process.extract.highpass_sigma_mm)
    texels = sum(r["rows"][0]["cast_texels"] for r in done)
    extract_seconds = sum(r["timing"]["extract_seconds"] for r in done)
    return {"items": len(report.results), "processed": len(done), "quarantined": len(bad),
            "items_built": report.built, "items_reused": report.reused,
            "quarantine_reasons": out.metrics["quarantine_reasons"],
            "mae_mm": out.metrics["accuracy"].get("mae_mm_mean"),
            "seconds": round(time.perf_counter() - started, 1),
            "extraction_texels_per_s": round(texels / extract_seconds) if extract_seconds else None}


STAGE = Stage(NAME, CaptureGtParams, build, inputs, seed=lambda p: p.seed, resumable=True,
              headline=("processed", "accuracy.mae_mm_mean", "accuracy.relative_mae"), look_at=(PREVIEW,),
              items="processed", limits="The detail is the high-pass of the scan-to-proxy distance: no broad shape.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
