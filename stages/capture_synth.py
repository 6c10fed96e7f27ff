"""Stage ``capture_synth``: a synthetic capture set with known displacement, in the capture input layout.

The default profile's stand-in for a capture rig's scan pairs: ``subjects`` x ``synth.expressions``
(neutral and two others, like the paper's capture). The proxy is ``model(α, β)``; the scan is
the proxy subdivided, displaced along its normal by procedural expression-dependent details
of known depth (forehead lines with surprise, crow's feet and nasolabial folds with happiness,
frown lines with anger, pore-scale texture), with sensor noise, holes and a small rigid
misalignment. The analytic ground-truth displacement is saved beside each scan, at the shared
``uv_chart`` resolution (the top-level ``uv_chart:`` section, the same chart as ``capture_gt``'s maps),
and ``synth.photos`` photos of the clean detailed surface with their camera ``P`` and SH light
(see ``facedetail.capture.synthetic`` and ``facedetail.capture.synthset``).

Outputs in ``data/capture_synth/``: ``<subject>/<expression>/`` folders (``capture.json``,
``proxy.json``, ``scan.ply``, ``displacement_gt.npy``, ``details.json``, ``photo-<k>.png``),
``manifest.parquet`` (one row per file) and ``lineage.json``; facts in ``metrics/capture_synth.json``
(among them ``detail_amplitude``: the depths actually drawn, per wrinkle family).
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import model_validator

from facedetail.capture.parallel import map_items
from facedetail.capture.synthset import SyntheticSetConfig, SyntheticSetWriter, synth_tasks, synthetic_set_metrics
from facedetail.config import content_key, input_path, run_only, set_level
from facedetail.io.manifest import file_row
from facedetail.io.transaction import StageOutput
from facedetail.model.uvmap import UVChartConfig
from stages._common import Input, Stage, StageParams, main, model_input, worker_count

NAME = "capture_synth"


class CaptureSynthParams(StageParams):
    """Parameters of the ``capture_synth`` stage (``capture_synth:`` in params.yaml)."""

    model: str = input_path("data/face_model/model.npz")
    """The morphable model written by the ``face_model`` stage."""
    subjects: int = set_level(3, ge=1, le=9999)
    """Number of synthetic subjects (the paper captured 122)."""
    bad_examples: bool = set_level(False)
    """Also write one broken item per kind of bad input (``bad-<kind>/neutral``), to see them quarantined."""
    synth: SyntheticSetConfig = SyntheticSetConfig()
    """What each subject's scans and photos look like: seed, expressions, details, scan sampling, formats, photos
    (the map resolution is ``uv_chart``'s: ``synth.resolution`` is not read here)."""
    uv_chart: UVChartConfig = UVChartConfig()
    """The shared UV chart (top-level ``uv_chart:`` in params.yaml): the ground-truth maps are at its resolution."""
    workers: int = run_only(0, ge=0)
    """Processes; 0 = one per available CPU core."""

    @model_validator(mode="after")
    def _one_resolution(self) -> CaptureSynthParams:
        if "resolution" in self.synth.model_fields_set:
            raise ValueError("capture_synth.synth.resolution is replaced by the top-level uv_chart.resolution "
                             "(one chart for every stage): remove it")
        return self


def inputs(params: CaptureSynthParams) -> list[Input]:
    """The morphable model."""
    return [model_input(params.model)]


def build(params: CaptureSynthParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Write every subject x expression (and the bad examples) into the output folder."""
    start = time.perf_counter()
    model_path = root / params.model
    key = content_key(params, {"model": out.input_hash(model_path)})
    tasks = synth_tasks(params.subjects, params.synth.expressions, params.bad_examples)
    resolution = params.uv_chart.resolution
    factory = partial(SyntheticSetWriter, model_path, params.synth, NAME, out.dir, resolution)
    results = map_items(factory, tasks, worker_count(params.workers), desc=NAME, unit="scan")
    rows = [file_row(out.dir, rel, item_id=rel, seed=r["seed"], params_hash=key, item=r["id"], kind=_kind(rel))
            for r in results for rel in r["files"]]
    out.write_manifest(rows)
    out.metrics = synthetic_set_metrics(results, rows, subjects=params.subjects, expressions=params.synth.expressions,
                                        resolution=resolution, key=key)
    summary = {k: out.metrics[k] for k in ("items", "bad_examples", "scan_faces_mean", "megabytes")}
    return {**summary, "photos": out.metrics.get("photos", 0), "seconds": round(time.perf_counter() - start, 1)}


def _kind(rel: str) -> str:
    """The manifest's ``kind`` of a file: its stem, with every ``photo-<k>`` one kind ``photo``."""
    stem = Path(rel).stem
    return "photo" if stem.startswith("photo-") else stem


STAGE = Stage(NAME, CaptureSynthParams, build, inputs, seed=lambda p: p.synth.seed,
              headline=("items", "scan_faces_mean", "megabytes"), items="items",
              limits="Synthetic scans with procedural wrinkles and pores: real skin and real scanner noise differ.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
