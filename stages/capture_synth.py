"""Stage ``capture_synth``: a synthetic capture set with known displacement, in the capture input layout.

The default profile's stand-in for a capture rig's scan pairs: ``subjects`` x ``expressions``
(neutral and two others, like the paper's capture). The proxy is ``model(α, β)``; the scan is
the proxy subdivided, displaced along its normal by procedural expression-dependent details
of known depth (forehead lines with surprise, crow's feet and nasolabial folds with happiness,
frown lines with anger, pore-scale texture), with sensor noise, holes and a small rigid
misalignment. The analytic ground-truth displacement is saved beside each scan
(see ``facedetail.capture.synthetic`` and ``facedetail.capture.synthset``).

Outputs in ``data/capture_synth/``: ``<subject>/<expression>/`` folders (``capture.json``,
``proxy.json``, ``scan.ply``, ``displacement_gt.npy``, ``details.json``), ``manifest.parquet``
(one row per file) and ``lineage.json``; facts in ``metrics/capture_synth.json``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from facedetail.capture.parallel import map_items
from facedetail.capture.synthset import SyntheticSetConfig, SyntheticSetWriter, synth_tasks
from facedetail.errors import SourceFileError
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.hashing import params_hash, sha256_file
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import file_row
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

NAME = "capture_synth"
OUT_DIR = Path("data/capture_synth")
METRICS = Path("metrics/capture_synth.json")


class CaptureSynthParams(StageParams, SyntheticSetConfig):
    """Parameters of the ``capture_synth`` stage (``capture_synth:`` in params.yaml)."""

    model: str = "data/face_model/model.npz"
    """The morphable model written by the ``face_model`` stage."""
    subjects: int = Field(3, ge=1, le=9999)
    """Number of synthetic subjects (the paper captured 122)."""
    bad_examples: bool = False
    """Also write one broken item per kind of bad input (``bad-<kind>/neutral``), to see them quarantined."""
    workers: int = Field(0, ge=0)
    """Processes; 0 = one per available CPU core."""


def run(params: CaptureSynthParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Write the synthetic capture set into ``data/capture_synth``."""
    root = Path(root)
    model_path = root / params.model
    if not model_path.is_file():
        raise SourceFileError(model_path, "input not found", "Run `dvc repro face_model` first")
    lineage = lineage_run(NAME, params, [model_path], root, seed=params.seed, parent=parent)
    try:
        config = SyntheticSetConfig(**params.model_dump(include=set(SyntheticSetConfig.model_fields)))
        key = params_hash({**params.model_dump(mode="json", exclude={"workers", "model"}),
                           "model_sha256": sha256_file(model_path)})
        tasks = synth_tasks(params.subjects, params.expressions, params.bad_examples)
        out_dir = root / OUT_DIR
        with atomic_directory(out_dir) as tmp:
            factory = partial(SyntheticSetWriter, model_path, config, NAME, tmp)
            results = map_items(factory, tasks, worker_count(params.workers), desc=NAME, unit="scan")
            rows = [file_row(tmp, rel, item_id=rel, seed=r["seed"], params_hash=key, item=r["id"],
                             kind=Path(rel).stem) for r in results for rel in r["files"]]
            write_manifest(tmp / MANIFEST_NAME, rows)
            outputs = hash_outputs(tmp, out_dir, root, manifest_hashes(rows))
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        metrics = _metrics(results, rows, params, key)
        write_json(root / METRICS, metrics)
        lineage.complete_hashed(outputs)
    except BaseException as err:
        lineage.fail(err)
        raise
    summary = {"items": metrics["items"], "bad_examples": metrics["bad_examples"],
               "scan_faces_mean": metrics["scan_faces_mean"], "megabytes": metrics["megabytes"]}
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


def _metrics(results: list[dict[str, Any]], rows: list[dict[str, Any]], params: CaptureSynthParams,
             key: str) -> dict[str, Any]:
    """Deterministic facts about the set."""
    good = [r for r in results if "bad_example" not in r["facts"]]
    by_expression: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in good:
        by_expression[r["id"].split("/", 1)[1]].append(r["facts"])
    return {
        "items": len(good),
        "subjects": params.subjects,
        "expressions": list(params.expressions),
        "bad_examples": len(results) - len(good),
        "resolution": params.resolution,
        "scan_faces_mean": int(np.mean([r["facts"]["scan_faces"] for r in good])),
        "megabytes": round(sum(r["bytes"] for r in rows) / 1e6, 2),
        "per_expression": {
            name: {"gt_mean_abs_mm": round(float(np.mean([f["gt_mean_abs_mm"] for f in facts])), 5),
                   "strengths": {k: round(v, 4) for k, v in facts[0]["strengths"].items()}}
            for name, facts in sorted(by_expression.items())
        },
        "params_hash": key,
    }


STAGE = Stage(NAME, CaptureSynthParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
