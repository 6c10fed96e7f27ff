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

import sys
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import Field

from facedetail.config import content_key, input_path, run_only
from facedetail.errors import SourceFileError
from facedetail.features.align import CropConfig, Reference
from facedetail.features.faceset import (
    FRAMING_FILE,
    OK,
    FaceFraming,
    FaceSetSpec,
    FaceShardWorker,
    face_set_metrics,
    render_shard_tasks,
)
from facedetail.features.landmarks import DetectorConfig
from facedetail.io.jsonfiles import write_json
from facedetail.io.manifest import MANIFEST_NAME
from facedetail.io.shards import build_shards
from facedetail.io.tables import QUARANTINE_NAME, write_quarantine
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from stages._common import Input, Stage, StageParams, main, model_input, worker_count

NAME = "render_faces"


class RenderFacesParams(StageParams):
    """Parameters of the ``render_faces`` stage (``render_faces:`` in params.yaml)."""

    renders: str = input_path("data/render_expressions")
    """Output folder of ``render_expressions`` (its manifest and shards)."""
    model: str = input_path("data/face_model/model.npz")
    """Morphable model whose frontal mean landmarks are the alignment reference."""
    detector: DetectorConfig = DetectorConfig()
    """Face detection; the dictionary records it so that photos are queried the same way."""
    crop: CropConfig = CropConfig()
    """Framing of the emotion network's aligned crop."""
    split_seed: int = 7
    """Seed of the held-out split (a hash of seed and render id)."""
    holdout_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Renders held out from emotion training and from the dictionary, to measure both."""
    workers: int = run_only(0, ge=0)
    """Processes; 0 = one per available CPU core."""


def inputs(params: RenderFacesParams) -> list[Input]:
    """The render set (its manifest must be there) and the model."""
    return [Input(f"{params.renders}/{MANIFEST_NAME}", "render_expressions", lineage=False, kind="file"),
            Input(params.renders, "render_expressions", kind="folder"), model_input(params.model)]


def build(params: RenderFacesParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Detect, landmark and crop every render; quarantine renders without a usable face."""
    renders, model_path = root / params.renders, root / params.model
    source = pq.read_table(renders / MANIFEST_NAME, columns=["id", "shard"]).to_pylist()
    key = content_key(params, {"model": out.input_hash(model_path)})
    spec = FaceSetSpec(renders / "shards", model_path, params.detector, params.crop, params.split_seed,
                       params.holdout_fraction, key, NAME)
    # The shard key also covers the renders (their manifest holds every image's sha256), so new
    # renders are never skipped; the renders' contact sheet does not count.
    shard_key = content_key(params, {"model": out.input_hash(model_path),
                                     "renders": out.input_hash(renders / MANIFEST_NAME)})
    report = build_shards(render_shard_tasks(source), root / STAGE.work_dir, shard_key, partial(FaceShardWorker, spec),
                          workers=worker_count(params.workers), desc=NAME, unit="face")
    rows = out.add_shards(report.records, root / STAGE.work_dir)
    good = [r for r in rows if r["status"] == OK]
    bad = [r for r in rows if r["status"] != OK]
    if not good:
        raise SourceFileError(renders, "no face was found in any render",
                              "Look at quarantine reasons: `python -m stages.render_faces` prints them")
    out.write_manifest(good)
    write_quarantine(out.dir / QUARANTINE_NAME, bad)
    write_json(out.dir / FRAMING_FILE, FaceFraming(params.detector, params.crop,
                                                   Reference.from_model(MorphableModel.load(model_path))).to_json())
    out.metrics = face_set_metrics(good, bad, key)
    return {"renders": len(rows), "faces": len(good), "quarantined": len(bad),
            "quarantine_reasons": out.metrics["quarantine_reasons"], **report.summary()}


STAGE = Stage(NAME, RenderFacesParams, build, inputs, seed=lambda p: p.split_seed, resumable=True,
              headline=("faces", "detected_fraction", "landmark_error_px_median"),
              limits="dlib's landmarks of faces without eyes or hair.", sources=lambda p, out: ("dlib-68-predictor",))
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
