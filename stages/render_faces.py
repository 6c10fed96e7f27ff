"""Stage ``render_faces``: dlib landmarks and aligned 64x64 crops of every render.

The emotion network trains on these crops and the dictionary is built from them, so both see
the renders through the same detector, landmarks and alignment as a photo at query time.

Outputs in ``data/render_faces/``: ``shards/shard-NNNNN.tar`` (per face ``crop.png`` and
``json``), ``manifest.parquet`` (one row per usable face: label, β, split, box, landmarks,
detection score, error to the rendered landmarks), ``quarantine.parquet`` (id, reason) for
every render without a usable face, ``framing.json`` (detector, crop and alignment reference, for
queries to use the same) and ``lineage.json``; facts go to
``metrics/render_faces.json``.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from facedetail.errors import SourceFileError
from facedetail.features.align import CropConfig, Reference
from facedetail.features.faceset import HOLDOUT, OK, FaceFraming, FaceSetSpec, FaceShardWorker
from facedetail.features.landmarks import DetectorConfig
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.hashing import params_hash, sha256_file
from facedetail.io.lineage import ParentRef
from facedetail.io.shards import ShardTask, build_shards
from facedetail.io.tables import write_quarantine
from facedetail.model.morphable import MorphableModel
from stages._common import (
    Stage,
    StageParams,
    StageResult,
    hash_outputs,
    lineage_run,
    link_shards,
    main,
    worker_count,
    write_json,
)

NAME = "render_faces"
OUT_DIR = Path("data/render_faces")
WORK_DIR = Path("data/.partial") / NAME
METRICS = Path("metrics/render_faces.json")
SHARDS = "shards"
QUARANTINE = "quarantine.parquet"
FRAMING = "framing.json"


class RenderFacesParams(StageParams):
    """Parameters of the ``render_faces`` stage (``render_faces:`` in params.yaml)."""

    renders: str = "data/render_expressions"
    """Output folder of ``render_expressions`` (its manifest and shards)."""
    model: str = "data/face_model/model.npz"
    """Morphable model whose frontal mean landmarks are the alignment reference."""
    detector: DetectorConfig = DetectorConfig()
    """Face detection; the dictionary records it so that photos are queried the same way."""
    crop: CropConfig = CropConfig()
    """Framing of the emotion network's aligned crop."""
    split_seed: int = 7
    """Seed of the held-out split (a hash of seed and render id)."""
    holdout_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Renders held out from emotion training and from the dictionary, to measure both."""
    workers: int = Field(0, ge=0)
    """Processes; 0 = one per available CPU core."""


def run(params: RenderFacesParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Detect, landmark and crop every render of ``params.renders``."""
    root = Path(root)
    renders = root / params.renders
    model_path = root / params.model
    manifest_path = renders / MANIFEST_NAME
    for path, stage in ((manifest_path, "render_expressions"), (model_path, "face_model")):
        if not path.is_file():
            raise SourceFileError(path, "input not found", f"Run `dvc repro {stage}` first")
    lineage = lineage_run(NAME, params, [renders, model_path], root, seed=params.split_seed, parent=parent)
    try:
        source = pq.read_table(manifest_path, columns=["id", "shard"]).to_pylist()
        key = params_hash({**params.model_dump(mode="json", exclude={"workers", "renders", "model"}),
                           "model_sha256": sha256_file(model_path)})
        spec = FaceSetSpec(renders / "shards", model_path, params.detector, params.crop, params.split_seed,
                           params.holdout_fraction, key, NAME)
        tasks = _tasks(source)
        work_dir = root / WORK_DIR
        # The shard key also covers the render shards' content, so new renders are never skipped.
        shard_key = params_hash({"params": key, "renders": sha256_file(manifest_path)})
        report = build_shards(tasks, work_dir, shard_key, partial(FaceShardWorker, spec),
                              workers=worker_count(params.workers), desc=NAME, unit="face")
        out_dir = root / OUT_DIR
        rows = [r for rec in report.records for r in rec.rows]
        good = [r for r in rows if r["status"] == OK]
        bad = [r for r in rows if r["status"] != OK]
        if not good:
            raise SourceFileError(renders, "no face was found in any render",
                                  "Look at quarantine reasons: `python -m stages.render_faces` prints them")
        with atomic_directory(out_dir) as tmp:
            known = link_shards(report.records, work_dir, tmp, SHARDS)
            shard_of = {r["id"]: f"{SHARDS}/{record.filename}" for record in report.records for r in record.rows}
            write_manifest(tmp / MANIFEST_NAME, [{**r, "shard": shard_of[r["id"]]} for r in good])
            write_quarantine(tmp / QUARANTINE, bad)
            write_json(tmp / FRAMING, FaceFraming(params.detector, params.crop,
                                                  Reference.from_model(MorphableModel.load(model_path))).to_json())
            outputs = hash_outputs(tmp, out_dir, root, known)
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        write_json(root / METRICS, _metrics(good, bad, key))
        lineage.complete_hashed(outputs)
        shutil.rmtree(work_dir, ignore_errors=True)
    except BaseException as err:
        lineage.fail(err)
        raise
    reasons = Counter(_reason_kind(r["reason"]) for r in bad)
    summary = {"renders": len(rows), "faces": len(good), "quarantined": len(bad),
               "quarantine_reasons": dict(sorted(reasons.items())), "seconds": round(report.seconds, 1)}
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


def _tasks(source: list[dict[str, Any]]) -> list[ShardTask]:
    """One task per render shard, named like it, holding its ids in order."""
    by_shard: dict[str, list[str]] = {}
    for row in source:
        by_shard.setdefault(Path(row["shard"]).stem, []).append(row["id"])
    return [ShardTask(name, tuple(sorted(ids))) for name, ids in sorted(by_shard.items())]


def _reason_kind(reason: str | None) -> str:
    return (reason or "unknown").split(":")[0]


def _metrics(good: list[dict[str, Any]], bad: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Deterministic facts: detection rate, landmark error against the rendered ground truth."""
    errors = np.array([r["landmark_error_px"] for r in good if r.get("landmark_error_px") is not None])
    total = len(good) + len(bad)
    return {
        "renders": total,
        "faces": len(good),
        "detected_fraction": round(len(good) / total, 4),
        "quarantine_reasons": dict(sorted(Counter(_reason_kind(r["reason"]) for r in bad).items())),
        "holdout_faces": sum(r["split"] == HOLDOUT for r in good),
        "faces_per_label": dict(sorted(Counter(r["label"] for r in good).items())),
        "landmark_error_px_median": round(float(np.median(errors)), 3) if errors.size else None,
        "landmark_error_px_p90": round(float(np.percentile(errors, 90)), 3) if errors.size else None,
        "params_hash": key,
    }


STAGE = Stage(NAME, RenderFacesParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
