"""Stage ``render_expressions``: the paper's synthetic expression set (90K renders at full scale).

Outputs in ``data/render_expressions/``: ``shards/shard-NNNNN.tar`` (WebDataset: per image
``png``, ``mask.png`` and ``json``, see ``facedetail.render.expression_set``),
``manifest.parquet`` (one row per image), ``contact_sheet.png`` and ``lineage.json``;
dataset statistics go to ``metrics/render_expressions.json``.

Shards are first built in ``data/.partial/render_expressions/`` with a completion record
each; a killed run resumes from there, and the finished set is swapped in as a whole.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from facedetail.errors import SourceFileError
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.hashing import params_hash, sha256_file
from facedetail.io.lineage import ParentRef
from facedetail.io.shards import build_shards, read_tar_samples, shard_tasks
from facedetail.model.morphable import MorphableModel
from facedetail.render.expression_set import (
    ExpressionSetSpec,
    ExpressionShardWorker,
    contact_sheet,
    contact_sheet_ids,
    encode_png,
    item_id,
)
from facedetail.render.sampling import SamplingConfig, expression_distribution, label_names
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

NAME = "render_expressions"
OUT_DIR = Path("data/render_expressions")
WORK_DIR = Path("data/.partial") / NAME
METRICS = Path("metrics/render_expressions.json")
SHARDS = "shards"
CONTACT_SHEET = "contact_sheet.png"
# Params that change what an image looks like; count, shard_size and workers do not.
ITEM_FIELDS = {"seed", "image_size", "png_compression", "sampling"}


class RenderExpressionsParams(StageParams):
    """Parameters of the ``render_expressions`` stage (``render_expressions:`` in params.yaml)."""

    model: str = "data/face_model/model.npz"
    """The morphable model written by the ``face_model`` stage."""
    seed: int = 2019
    """Global seed; each image's seed is derived from it, the stage name and the image id."""
    count: int = Field(2000, ge=1, le=9_999_999)
    """Number of images (the paper: 90,000)."""
    shard_size: int = Field(1000, ge=1)
    """Images per tar shard."""
    image_size: int = Field(256, ge=32, le=2048)
    """Side of the square images in pixels."""
    workers: int = Field(0, ge=0)
    """Render processes (one GL context each); 0 = one per available CPU core."""
    png_compression: int = Field(3, ge=0, le=9)
    """zlib level of the PNGs (3: within 5 % of level 9's size at a fraction of its time)."""
    contact_sheet: int = Field(64, ge=1, le=1024)
    """Images shown on the contact sheet, spread evenly over the set."""
    sampling: SamplingConfig = SamplingConfig()
    """What is drawn per image: identity, expression, albedo, pose, camera, light, background."""


def run(params: RenderExpressionsParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Render ``data/render_expressions`` under ``root`` from ``data/face_model``."""
    root = Path(root)
    model_path = root / params.model
    if not model_path.is_file():
        raise SourceFileError(model_path, "morphable model not found", "Run `dvc repro face_model` first")
    lineage = lineage_run(NAME, params, [model_path], root, seed=params.seed, parent=parent)
    try:
        item_hash = params_hash({**params.model_dump(mode="json", include=ITEM_FIELDS),
                                 "model_sha256": sha256_file(model_path)})
        spec = ExpressionSetSpec(model_path, NAME, params.seed, params.image_size, params.sampling,
                                 params.png_compression, item_hash)
        tasks = shard_tasks([item_id(i) for i in range(params.count)], params.shard_size)
        work_dir = root / WORK_DIR
        report = build_shards(tasks, work_dir, item_hash, partial(ExpressionShardWorker, spec),
                              workers=worker_count(params.workers), desc=NAME, unit="img")
        out_dir = root / OUT_DIR
        with atomic_directory(out_dir) as tmp:
            known = link_shards(report.records, work_dir, tmp, SHARDS)
            rows = [{**row, "shard": f"{SHARDS}/{record.filename}"} for record in report.records for row in record.rows]
            write_manifest(tmp / MANIFEST_NAME, rows)
            (tmp / CONTACT_SHEET).write_bytes(encode_png(_sheet(tmp, rows, params.contact_sheet), 6))
            outputs = hash_outputs(tmp, out_dir, root, known)
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        model = MorphableModel.load(model_path)
        metrics = _metrics(rows, model, params, item_hash)
        write_json(root / METRICS, metrics)
        lineage.complete_hashed(outputs)
        shutil.rmtree(work_dir, ignore_errors=True)
    except BaseException as err:
        lineage.fail(err)
        raise
    summary = {
        "images": params.count, "shards": len(report.records), "shards_built": report.built,
        "shards_reused": report.reused, "seconds": round(report.seconds, 1),
        "images_per_s": round(report.items_built / report.seconds, 1) if report.items_built else None,
    }
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


def _sheet(out_dir: Path, rows: list[dict[str, Any]], n: int) -> np.ndarray:
    wanted = set(contact_sheet_ids(len(rows), n))
    shards = sorted({r["shard"] for r in rows if r["id"] in wanted})
    samples = [s for shard in shards for s in read_tar_samples(out_dir / shard, wanted)]
    return contact_sheet(samples)


def _metrics(rows: list[dict[str, Any]], model: MorphableModel, params: RenderExpressionsParams,
             item_hash: str) -> dict[str, Any]:
    """Deterministic facts about the set (no timings: equal outputs give equal metrics)."""
    labels = Counter(r["label"] for r in rows)
    beta = np.array([r["beta"] for r in rows], np.float64).reshape(len(rows), -1)
    visible = np.array([r["landmark_visible"] for r in rows], bool)
    names = model.expression_names
    return {
        "images": len(rows),
        "shards": len({r["shard"] for r in rows}),
        "params_hash": item_hash,
        "expression_distribution": expression_distribution(params.sampling.expression, model),
        "label_counts": {name: labels.get(name, 0) for name in label_names(model)},
        "beta_mean": {n: round(float(v), 4) for n, v in zip(names, beta.mean(0), strict=True)},
        "beta_std": {n: round(float(v), 4) for n, v in zip(names, beta.std(0), strict=True)},
        "beta_min": round(float(beta.min()), 4) if beta.size else None,
        "beta_max": round(float(beta.max()), 4) if beta.size else None,
        "landmarks_visible_fraction": round(float(visible.mean()), 4),
        "mask_fraction_mean": round(float(np.mean([r["mask_fraction"] for r in rows])), 4),
        "png_bytes_mean": round(float(np.mean([r["bytes"] for r in rows])), 1),
    }


STAGE = Stage(NAME, RenderExpressionsParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
