"""Stage ``face_model``: read the chosen morphable-model source, write one normalized model file.

Outputs in ``data/face_model/``: ``model.npz`` (see ``facedetail.model.morphable``),
``preview.png`` (mean face and each expression at its maximum), ``manifest.parquet`` and
``lineage.json``; facts about the model go to ``metrics/face_model.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field

from facedetail.assets import verify_share
from facedetail.errors import SourceFileError
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.hashing import params_hash
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import file_row
from facedetail.model import load_model_source, source_files
from facedetail.model.preview import render_preview
from stages._common import Stage, StageParams, StageResult, hash_outputs, lineage_run, main, write_json

NAME = "face_model"
OUT_DIR = Path("data/face_model")
METRICS = Path("metrics/face_model.json")


class FaceModelParams(StageParams):
    """Parameters of the ``face_model`` stage (``face_model:`` in params.yaml)."""

    format: Literal["sfm", "bfm2017", "bfm2009"] = "sfm"
    """Source format: the Surrey model from eos's share folder, or the user's BFM 2017 / 2009 file."""
    model_path: str = "data/external/eos-share/sfm_shape_3448.bin"
    """The model file (``sfm_shape_3448.bin``, ``model2017-1_bfm_nomouth.h5`` or ``01_MorphableModel.mat``)."""
    share_dir: str = "data/external/eos-share"
    """eos ``share/`` folder with the iBUG landmark maps, contours and the Surrey blendshapes."""
    verify_checksums: bool = True
    """Check every eos share file the loader reads against facedetail's SHA256 list."""
    albedo_components: int = Field(4, ge=0, le=4)
    """Components of the Surrey model's synthetic albedo (BFM files bring their own colour model)."""
    preview_size: int = Field(256, ge=64, le=2048)
    """Side of each preview tile in pixels."""
    preview_max_expressions: int = Field(6, ge=0)
    """How many expression components the preview shows."""
    preview_pca_sigma: float = Field(3.0, gt=0)
    """Standard deviations at which PCA expression components are shown (blendshapes use weight 1)."""


def run(params: FaceModelParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Build ``data/face_model`` under ``root`` from the configured source."""
    root = Path(root)
    share_dir = root / params.share_dir
    inputs = source_files(params.format, root / params.model_path, share_dir)
    for path in inputs:
        if not path.is_file():
            raise SourceFileError(path, "not found", _remedy(params.format))
    lineage = lineage_run(NAME, params, inputs, root, parent=parent)
    try:
        if params.verify_checksums:
            verify_share(share_dir, [p.name for p in inputs if p.parent == share_dir])
        model = load_model_source(params.format, root / params.model_path, share_dir, params.albedo_components)
        phash = params_hash(params.model_dump(mode="json"))
        out_dir = root / OUT_DIR
        with atomic_directory(out_dir) as tmp:
            model.save(tmp / "model.npz")
            preview = render_preview(model, params.preview_size, params.preview_max_expressions,
                                     params.preview_pca_sigma)
            ok, png = cv2.imencode(".png", preview[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 6])
            if not ok:
                raise RuntimeError("PNG encoding of the preview failed")
            (tmp / "preview.png").write_bytes(png.tobytes())
            rows = [
                file_row(tmp, "model.npz", item_id="model", params_hash=phash, kind="morphable_model"),
                file_row(tmp, "preview.png", item_id="preview", params_hash=phash, kind="preview"),
            ]
            write_manifest(tmp / MANIFEST_NAME, rows)
            outputs = hash_outputs(tmp, out_dir, root)
            record = lineage.record(outputs)
            write_json(tmp / "lineage.json", record)
        summary = {**model.summary(), "format": params.format, "model_bytes": rows[0]["bytes"]}
        write_json(root / METRICS, summary)
        lineage.complete_hashed(outputs)
    except BaseException as err:
        lineage.fail(err)
        raise
    return StageResult(NAME, out_dir, outputs, summary, record)


def _remedy(fmt: str) -> str:
    if fmt == "sfm":
        return "Run `make assets` to fetch the eos share files (Surrey Face Model, non-commercial licence)"
    return "Set face_model.model_path to your licensed Basel Face Model file and run `make assets` for the maps"


STAGE = Stage(NAME, FaceModelParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
