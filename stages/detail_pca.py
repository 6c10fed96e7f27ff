"""Stage ``detail_pca``: the mean-free PCA bases of displacement patches that the detail generator predicts weights of.

From the ``capture_gt`` maps of the training subjects (held-out subjects, drawn by
``facedetail.detail.split`` with ``holdout_fraction`` and ``split_seed``, are never read into the
PCA), cut ``patch_size``² patches at ``stride`` from each face region (upper, lower: split at the
nose tip, each ``overlap`` texels past it) whose valid fraction is at least ``min_valid``, set
invalid texels to 0, and take the top ``components`` right singular vectors of the uncentred patch
matrix, streamed (see ``facedetail.detail.pca``). The maps must be at ``uv_chart.resolution``, the
chart every map of the detail path shares.

Outputs in ``data/detail_pca/``: ``bases.safetensors`` (one (components, patch_size²) float32
tensor per region, metadata: units mm, patch size, stride, resolution, components, patch
counts), ``upper.npy`` and ``lower.npy`` (the same arrays), ``explained_variance.csv`` (region,
component, ratio, cumulative: shares of the total energy ``Σ‖x‖²``, for ``dvc plots``),
``components.png`` (the first components of each region, grey = 0), ``manifest.parquet`` and
``lineage.json``; per region patch and subject counts and the energy the first 8/16/32/64
components capture in ``metrics/detail_pca.json`` (timings only in the run summary: the metrics
are equal whenever the outputs are).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from facedetail.capture.maps import list_items
from facedetail.capture.patches import face_regions
from facedetail.config import content_key, input_path
from facedetail.detail.pca import (
    BASES_FILE,
    DisplacementPatches,
    Method,
    PatchPCA,
    basis_sheet,
    map_shape,
    save_bases,
    uncentred_pca,
)
from facedetail.detail.split import is_held_out, subject_of
from facedetail.errors import FacedetailError, SourceFileError
from facedetail.io.manifest import file_row
from facedetail.io.seeds import derive_seed
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVChartConfig
from stages._common import Input, Stage, StageParams, main, model_input

NAME = "detail_pca"
CURVE = "explained_variance.csv"
SHEET = "components.png"
REPORTED = (8, 16, 32, 64)
"""Component counts whose captured energy the metrics report (those up to ``components``)."""


class ChartMismatchError(FacedetailError):
    """The ``capture_gt`` maps are not at the UV chart's resolution."""


class NoPatchesError(FacedetailError):
    """Too few training patches remain in a region for the PCA."""


class DetailPcaParams(StageParams):
    """Parameters of the ``detail_pca`` stage (``detail_pca:`` in params.yaml)."""

    capture_gt: str = input_path("data/capture_gt")
    """Output of ``capture_gt``: the displacement maps (mm) and their masks."""
    model: str = input_path("data/face_model/model.npz")
    """The morphable model whose UV layout places the face regions."""
    uv_chart: UVChartConfig = UVChartConfig()
    """The UV chart of the detail path (the top-level ``uv_chart:`` section): the maps must be at its resolution."""
    patch_size: int = Field(64, ge=4)
    """Patch side in texels (the release: 256 at 4096²; 64 at the default 1024² is the same share of the chart)."""
    stride: int = Field(16, ge=1)
    """Step between patches in texels (the release: 64 for 256², a quarter of a patch)."""
    min_valid: float = Field(0.5, gt=0, le=1)
    """Least fraction of valid texels for a patch to be kept (the rest of it is set to 0)."""
    overlap: int = Field(32, ge=0)
    """Texels each face region extends past the nose-tip line: half a patch, the same share of the
    chart as capture_gt's 128 at 4096² with 256² patches."""
    components: int = Field(64, ge=1)
    """Basis vectors per region (the release's generator predicts 64 weights)."""
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of subjects held out of detail training (and so of this PCA); as in ``detail_pairs``/``train_detail``."""
    split_seed: int = 7
    """Seed of the subject split (the same in every detail stage)."""
    method: Method = "auto"
    """``randomized`` (streaming, ``power_iterations + 2`` passes), ``gram`` (exact, D² memory) or ``auto``
    (``gram`` up to 32² patches)."""
    oversample: int = Field(10, ge=0)
    """Extra sketch columns of the randomized solver beyond ``components``."""
    power_iterations: int = Field(4, ge=0)
    """Power iterations of the randomized solver (one pass over the patches each)."""
    seed: int = 2019
    """Seed of the randomized solver's test matrix (per region, derived from it and the region)."""


def inputs(params: DetailPcaParams) -> list[Input]:
    """The model and the capture_gt maps (with their manifest)."""
    return [model_input(params.model),
            Input(f"{params.capture_gt}/manifest.parquet", "capture_gt", lineage=False, what="capture_gt manifest",
                  kind="file"),
            Input(params.capture_gt, "capture_gt", what="capture_gt output", kind="folder")]


def _check_resolution(gt_dir: Path, items: list[str], resolution: int) -> None:
    """Every map at the chart's resolution, or one line naming the first that is not."""
    shapes = {item: map_shape(gt_dir, item) for item in items}
    wrong = [item for item, shape in shapes.items() if shape != (resolution, resolution)]
    if wrong:
        shape = "x".join(map(str, shapes[wrong[0]]))
        raise ChartMismatchError(
            f"the capture_gt maps are {shape} texels ({len(wrong)} of {len(items)} items, e.g. {wrong[0]}) "
            f"but uv_chart.resolution is {resolution}: run capture_gt at the chart's resolution "
            f"(capture_gt.process.resolution) or set uv_chart.resolution to the maps'")


def _region_metrics(pca: PatchPCA, counts: dict[str, int], box: list[int], held_out: int) -> dict[str, Any]:
    """One region's facts: what went in (items and subjects with at least one patch) and the energy captured."""
    cumulative = pca.cumulative_ratio
    used = {item for item, n in counts.items() if n}
    return {
        "patches": pca.count, "items": len(used), "subjects_used": len({subject_of(i) for i in used}),
        "subjects_held_out": held_out, "box": box,
        "method": pca.method, "passes": pca.passes,
        # Root-mean-square displacement of the kept patches (invalid texels counted as 0).
        "rms_mm": round(float((pca.energy / (pca.count * pca.basis.shape[1])) ** 0.5), 6),
        # Zero-padded keys, so that the sorted metrics file lists them in order.
        "explained_energy": {f"first_{c:02d}": round(float(cumulative[c - 1]), 6)
                             for c in REPORTED if c <= len(cumulative)},
        "explained_energy_all": round(float(cumulative[-1]), 6),
    }


def build(params: DetailPcaParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Cut the training subjects' patches per region, run the streaming PCA, write the bases and their curves."""
    gt_dir, model_path = root / params.capture_gt, root / params.model
    items = list_items(gt_dir)
    if not items:
        raise SourceFileError(gt_dir, "has no displacement maps", "Run `dvc repro capture_gt` first")
    R = params.uv_chart.resolution
    _check_resolution(gt_dir, items, R)
    subjects = sorted({subject_of(i) for i in items})
    held = [s for s in subjects if is_held_out(s, params.holdout_fraction, params.split_seed)]
    held_set = set(held)
    train_items = tuple(i for i in items if subject_of(i) not in held_set)
    regions = face_regions(MorphableModel.load(model_path), R, params.overlap)
    key = content_key(params, {"capture_gt": out.input_hash(gt_dir), "model": out.input_hash(model_path)})

    results: dict[str, PatchPCA] = {}
    region_metrics: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name, box in regions.items():
        started = time.perf_counter()
        source = DisplacementPatches(gt_dir, train_items, box, params.patch_size, params.stride, params.min_valid)
        counts = source.counts()
        total = sum(counts.values())
        if total < params.components:
            raise NoPatchesError(
                f"{total} training patches in the {name} region ({len(train_items)} items of "
                f"{len(subjects) - len(held)} training subjects, {len(held)} held out), fewer than the "
                f"{params.components} components: add captures, or lower patch_size, stride, min_valid or components")
        pca = uncentred_pca(source, params.components, method=params.method, oversample=params.oversample,
                            power_iterations=params.power_iterations, seed=derive_seed(params.seed, NAME, name))
        results[name] = pca
        corners = [int(v) for v in (box.row0, box.row1, box.col0, box.col1)]
        region_metrics[name] = _region_metrics(pca, counts, corners, len(held))
        seconds[name] = round(time.perf_counter() - started, 3)

    # No params hash or input hash here (the manifest and lineage.json have them): the file depends
    # only on what the PCA saw, so changing a held-out subject's maps leaves it byte for byte as it was.
    metadata = {
        "units": "mm", "mean_free": "true", "patch_size": str(params.patch_size), "stride": str(params.stride),
        "resolution": str(R), "components": str(params.components), "min_valid": repr(params.min_valid),
        "overlap": str(params.overlap),
        "layout": "rows are components; a patch flattened row-major is basis.T @ weights (no mean term)",
        "regions": json.dumps({n: region_metrics[n]["box"] for n in results}, separators=(",", ":")),
        **{f"patches_{n}": str(p.count) for n, p in results.items()},
    }
    names = save_bases(out.dir, {n: p.basis for n, p in results.items()}, metadata)
    lines = ["region,component,ratio,cumulative"]
    for name, pca in results.items():
        lines += [f"{name},{c + 1},{r:.9g},{cum:.9g}"
                  for c, (r, cum) in enumerate(zip(pca.explained_ratio, pca.cumulative_ratio, strict=True))]
    (out.dir / CURVE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.write_png(SHEET, basis_sheet({n: p.basis for n, p in results.items()}, params.patch_size))
    kinds = {BASES_FILE: "bases", CURVE: "explained_variance", SHEET: "preview"}
    out.write_manifest([file_row(out.dir, f, params_hash=key, kind=kinds.get(f, "basis"),
                                 region=f.removesuffix(".npy") if f.endswith(".npy") else None)
                        for f in [*names, CURVE, SHEET]])
    out.metrics = {
        "units": "mm", "resolution": R, "patch_size": params.patch_size, "stride": params.stride,
        "components": params.components, "params_hash": key,
        "subjects": {"total": len(subjects), "train": len(subjects) - len(held), "held_out": len(held)},
        "held_out_subjects": held,
        "items": {"train": len(train_items), "held_out": len(items) - len(train_items)},
        **region_metrics,
    }
    return {"subjects_train": len(subjects) - len(held), "subjects_held_out": len(held),
            **{f"{n}_patches": p.count for n, p in results.items()},
            **{f"{n}_energy": region_metrics[n]["explained_energy_all"] for n in results},
            **{f"{n}_seconds": s for n, s in seconds.items()}, "seconds": round(sum(seconds.values()), 3)}


STAGE = Stage(NAME, DetailPcaParams, build, inputs, seed=lambda p: p.seed,
              headline=("upper.patches", "upper.explained_energy_all", "lower.explained_energy_all"),
              look_at=(SHEET, CURVE), limits="From the training subjects only; with few, late components are noise.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
