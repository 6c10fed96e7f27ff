"""Stage ``face_model``: read the chosen morphable-model source, write one normalized model file.

Outputs in ``data/face_model/``: ``model.npz`` (see ``facedetail.model.morphable``),
``preview.png`` (mean face and each expression at its maximum), ``manifest.parquet`` and
``lineage.json``; facts about the model go to ``metrics/face_model.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from facedetail.assets import verify_share
from facedetail.config import content_key, input_path, run_only
from facedetail.io.manifest import file_row
from facedetail.io.transaction import StageOutput
from facedetail.model import load_model_source, source_files
from facedetail.render.preview import render_preview
from stages._common import Input, Stage, StageParams, main

NAME = "face_model"


class FaceModelParams(StageParams):
    """Parameters of the ``face_model`` stage (``face_model:`` in params.yaml)."""

    format: Literal["sfm", "bfm2017", "bfm2009"] = "sfm"
    """Source format: the Surrey model from eos's share folder, or the user's BFM 2017 / 2009 file."""
    model_path: str = input_path("data/external/eos-share/sfm_shape_3448.bin")
    """The model file (``sfm_shape_3448.bin``, ``model2017-1_bfm_nomouth.h5`` or ``01_MorphableModel.mat``)."""
    share_dir: str = input_path("data/external/eos-share")
    """eos ``share/`` folder with the iBUG landmark maps, contours and the Surrey blendshapes."""
    verify_checksums: bool = run_only(True)
    """Check every eos share file the loader reads against facedetail's SHA256 list."""
    albedo_components: int = Field(4, ge=0, le=4)
    """Components of the Surrey model's synthetic albedo (BFM files bring their own colour model)."""
    preview_size: int = Field(256, ge=64, le=2048)
    """Side of each preview tile in pixels."""
    preview_max_expressions: int = Field(6, ge=0)
    """How many expression components the preview shows."""
    preview_pca_sigma: float = Field(3.0, gt=0)
    """Standard deviations at which PCA expression components are shown (blendshapes use weight 1)."""


def inputs(params: FaceModelParams) -> list[Input]:
    """The source files the chosen format reads (model file, maps, contours, blendshapes)."""
    share = Path(params.share_dir)
    return [Input(p.as_posix(), remedy=_remedy(params.format), kind="file")
            for p in source_files(params.format, Path(params.model_path), share)]


def build(params: FaceModelParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Load the configured source and write ``model.npz`` and ``preview.png``."""
    share_dir = root / params.share_dir
    sources = source_files(params.format, root / params.model_path, share_dir)
    if params.verify_checksums:
        verify_share(share_dir, [p.name for p in sources if p.parent == share_dir])
    model = load_model_source(params.format, root / params.model_path, share_dir, params.albedo_components)
    key = content_key(params, {p.name: out.input_hash(p) for p in sources})
    model.save(out.dir / "model.npz")
    preview = render_preview(model, params.preview_size, params.preview_max_expressions, params.preview_pca_sigma)
    out.write_png("preview.png", preview)
    rows = [file_row(out.dir, "model.npz", item_id="model", params_hash=key, kind="morphable_model"),
            file_row(out.dir, "preview.png", item_id="preview", params_hash=key, kind="preview")]
    out.write_manifest(rows)
    out.metrics = {**model.summary(), "format": params.format, "model_bytes": rows[0]["bytes"]}
    return out.metrics


def _remedy(fmt: str) -> str:
    if fmt == "sfm":
        return "Run `make assets` to fetch the eos share files (Surrey Face Model, non-commercial licence)"
    return "Set face_model.model_path to your licensed Basel Face Model file and run `make assets` for the maps"


STAGE = Stage(NAME, FaceModelParams, build, inputs, headline=("vertices", "triangles", "expression_components"),
              look_at=("preview.png",),
              limits="The Surrey model has no colour model: its albedo is a synthetic skin prior (see provenance).")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
