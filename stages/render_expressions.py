"""Stage ``render_expressions``: the paper's synthetic expression set (90K renders at full scale).

Outputs in ``data/render_expressions/``: ``shards/shard-NNNNN.tar`` (WebDataset: per image
``png``, ``mask.png`` and ``json``, see ``facedetail.render.expression_set``),
``manifest.parquet`` (one row per image), ``contact_sheet.png`` and ``lineage.json``;
dataset statistics go to ``metrics/render_expressions.json``.

Shards are first built in ``data/.partial/render_expressions/`` with a completion record
each; a killed run resumes from there, and the finished set is swapped in as a whole.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field

from facedetail.config import content_key, input_path, run_only, set_level
from facedetail.io.shards import build_shards, shard_tasks
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from facedetail.render.expression_set import (
    ExpressionSetSpec,
    ExpressionShardWorker,
    expression_set_metrics,
    item_id,
    read_contact_sheet,
)
from facedetail.render.sampling import SamplingConfig
from stages._common import Input, Stage, StageParams, main, model_input, worker_count

NAME = "render_expressions"
CONTACT_SHEET = "contact_sheet.png"


class RenderExpressionsParams(StageParams):
    """Parameters of the ``render_expressions`` stage (``render_expressions:`` in params.yaml)."""

    model: str = input_path("data/face_model/model.npz")
    """The morphable model written by the ``face_model`` stage."""
    seed: int = 2019
    """Global seed; each image's seed is derived from it, the stage name and the image id."""
    count: int = set_level(2000, ge=1, le=9_999_999)
    """Number of images (the paper: 90,000)."""
    shard_size: int = set_level(1000, ge=1)
    """Images per tar shard."""
    image_size: int = Field(256, ge=32, le=2048)
    """Side of the square images in pixels."""
    workers: int = run_only(0, ge=0)
    """Render processes (one GL context each); 0 = one per available CPU core."""
    png_compression: int = Field(3, ge=0, le=9)
    """zlib level of the PNGs (3: within 5 % of level 9's size at a fraction of its time)."""
    contact_sheet: int = set_level(64, ge=1, le=1024)
    """Images shown on the contact sheet, spread evenly over the set."""
    sampling: SamplingConfig = SamplingConfig()
    """What is drawn per image: identity, expression, albedo, pose, camera, light, background."""


def inputs(params: RenderExpressionsParams) -> list[Input]:
    """The morphable model."""
    return [model_input(params.model)]


def build(params: RenderExpressionsParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Render the set into resumable shards, then link them into the output with the manifest and sheet."""
    model_path = root / params.model
    item_hash = content_key(params, {"model": out.input_hash(model_path)})
    spec = ExpressionSetSpec(model_path, NAME, params.seed, params.image_size, params.sampling,
                             params.png_compression, item_hash)
    tasks = shard_tasks([item_id(i) for i in range(params.count)], params.shard_size)
    report = build_shards(tasks, root / STAGE.work_dir, item_hash, partial(ExpressionShardWorker, spec),
                          workers=worker_count(params.workers), desc=NAME, unit="img")
    rows = out.add_shards(report.records, root / STAGE.work_dir)
    out.write_manifest(rows)
    out.write_png(CONTACT_SHEET, read_contact_sheet(out.dir, rows, params.contact_sheet))
    out.metrics = expression_set_metrics(rows, MorphableModel.load(model_path), params.sampling, item_hash)
    return {"images": params.count, **report.summary()}


STAGE = Stage(NAME, RenderExpressionsParams, build, inputs, seed=lambda p: p.seed, resumable=True,
              headline=("images", "label_counts.neutral", "landmarks_visible_fraction"), look_at=(CONTACT_SHEET,),
              limits="Renders of the morphable model only (no hair, eyes, real skin); labels: the drawn expression.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
