"""Stage ``wild_synth``: the default profile's in-the-wild photos, synthetic and with ground truth.

``wild_proxy`` reads a folder of photos exactly as it reads a user's AffectNet folder; this
stage makes the default one (see :mod:`facedetail.proxy.synthetic` for what is drawn).

Outputs in ``data/wild_synth/``:

* ``images/wild-NNNNN.jpg``: the synthetic photos (loose files: the default profile is small);
* ``images/astronaut.png``: the real photo ``skimage.data.astronaut()`` (no ground truth);
* ``images/_bad/``: with ``bad_examples: true``, one bad or odd file of each kind, listed with
  the expected outcome in ``bad_examples.parquet`` (file, kind, expected);
* ``truth.parquet``: per synthetic image its α, β, pose, camera (``K``, ``R``, ``t``, ``P``) and
  the 68 landmarks with visibility, in the image's pixels; ``file`` is relative to ``images/``;
* ``contact_sheet.png`` (images with their true landmarks), ``manifest.parquet`` (every file under
  ``images/``), ``lineage.json``; facts go to ``metrics/wild_synth.json``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field
from tqdm import tqdm

from facedetail.errors import SourceFileError
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.hashing import params_hash, sha256_file
from facedetail.io.images import encode_png
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import file_row
from facedetail.io.seeds import derive_seed
from facedetail.io.tables import write_table
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.synthetic import (
    BAD_DIR,
    TRUTH_SCHEMA,
    WILD_SAMPLING,
    ClutterConfig,
    DegradationConfig,
    WildImage,
    WildSynthConfig,
    WildSynthesizer,
    bad_examples,
    item_id,
)
from facedetail.render.sampling import SamplingConfig
from facedetail.render.sheet import label_grid
from stages._common import Stage, StageParams, StageResult, hash_outputs, lineage_run, main, manifest_hashes, write_json

NAME = "wild_synth"
OUT_DIR = Path("data/wild_synth")
METRICS = Path("metrics/wild_synth.json")
IMAGES = "images"
TRUTH = "truth.parquet"
BAD_TABLE = "bad_examples.parquet"
CONTACT_SHEET = "contact_sheet.png"
ASTRONAUT = "astronaut.png"
# Params that change what an image looks like (count and contact_sheet do not).
ITEM_FIELDS = {"seed", "image_size", "size_jitter", "sampling", "clutter", "degradation"}
_BAD_SOURCE, _NO_FACE = "bad-source", "bad-no-face"


class WildSynthParams(StageParams):
    """Parameters of the ``wild_synth`` stage (``wild_synth:`` in params.yaml)."""

    model: str = "data/face_model/model.npz"
    """The morphable model written by the ``face_model`` stage."""
    seed: int = 2019
    """Global seed; each image's seed is derived from it, the stage name and the image id."""
    count: int = Field(120, ge=1, le=99_999)
    """Number of synthetic images (ids ``wild-00000``...); growing it keeps the first images."""
    image_size: int = Field(256, ge=64, le=2048)
    """Typical side of the square images in pixels."""
    size_jitter: float = Field(0.25, ge=0, lt=1)
    """Each image's side is uniform in ``image_size · (1 ± size_jitter)`` (renders are made at the largest
    side and area-resized down), so that the fitter's rescaling to 256 px is exercised."""
    sampling: SamplingConfig = WILD_SAMPLING
    """Identity, expression, albedo, pose, camera, light and background draw."""
    clutter: ClutterConfig = ClutterConfig()
    """Random shapes behind the face."""
    degradation: DegradationConfig = DegradationConfig()
    """Blur, noise and JPEG quality ranges."""
    bad_examples: bool = True
    """Also write ``images/_bad/``: one bad or odd file of each kind, so the quarantine is exercised."""
    contact_sheet: int = Field(24, ge=1, le=256)
    """Images shown on the contact sheet (the first ones)."""

    def synth_config(self) -> WildSynthConfig:
        """The library config these params describe."""
        return WildSynthConfig(**{k: getattr(self, k) for k in ITEM_FIELDS - {"seed"}})


def run(params: WildSynthParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Write ``data/wild_synth`` under ``root`` from ``data/face_model``."""
    root = Path(root)
    model_path = root / params.model
    if not model_path.is_file():
        raise SourceFileError(model_path, "morphable model not found", "Run `dvc repro face_model` first")
    config = params.synth_config()
    lineage = lineage_run(NAME, params, [model_path], root, seed=params.seed, parent=parent)
    start = time.perf_counter()
    try:
        item_hash = params_hash({**params.model_dump(mode="json", include=ITEM_FIELDS),
                                 "model_sha256": sha256_file(model_path)})
        model = MorphableModel.load(model_path)
        out_dir = root / OUT_DIR
        with atomic_directory(out_dir) as tmp, WildSynthesizer(model, config) as synth:
            images = tmp / IMAGES
            images.mkdir()
            rows: list[dict[str, Any]] = []
            truth: list[dict[str, Any]] = []
            sheet: list[tuple[np.ndarray, WildImage]] = []
            for index in tqdm(range(params.count), desc=NAME, unit="img", mininterval=1.0, disable=None):
                item = item_id(index)
                image = synth.make(item, derive_seed(params.seed, NAME, item))
                (images / f"{item}.jpg").write_bytes(image.jpeg)
                rows.append(file_row(tmp, f"{IMAGES}/{item}.jpg", item_id=item, seed=image.seed,
                                     params_hash=item_hash, kind="synthetic", label=image.sample.label))
                truth.append(image.truth())
                if len(sheet) < params.contact_sheet:
                    sheet.append((cv2.imdecode(np.frombuffer(image.jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1],
                                  image))
            (images / ASTRONAUT).write_bytes(encode_png(_astronaut(), 6))
            rows.append(file_row(tmp, f"{IMAGES}/{ASTRONAUT}", item_id="astronaut", params_hash=item_hash,
                                 kind="photo", label=None))
            bad = _write_bad_examples(synth, params, images, tmp, item_hash, rows) if params.bad_examples else []
            write_table(tmp / TRUTH, pa.Table.from_pylist(sorted(truth, key=lambda r: r["id"]), schema=TRUTH_SCHEMA))
            write_table(tmp / BAD_TABLE, pa.table({k: [b[k] for b in bad] for k in ("file", "kind", "expected")},
                                                  schema=_BAD_SCHEMA))
            write_manifest(tmp / MANIFEST_NAME, rows)
            (tmp / CONTACT_SHEET).write_bytes(encode_png(_contact_sheet(sheet), 6))
            outputs = hash_outputs(tmp, out_dir, root, manifest_hashes(rows))
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        write_json(root / METRICS, _metrics(truth, bad, item_hash))
        lineage.complete_hashed(outputs)
    except BaseException as err:
        lineage.fail(err)
        raise
    summary = {"images": params.count, "bad_examples": len(bad), "seconds": round(time.perf_counter() - start, 1)}
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


_BAD_SCHEMA = pa.schema([pa.field("file", pa.string()), pa.field("kind", pa.string()),
                         pa.field("expected", pa.string())])


def _write_bad_examples(synth: WildSynthesizer, params: WildSynthParams, images: Path, tmp: Path, item_hash: str,
                        rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    clean, mask = synth.clean_face(derive_seed(params.seed, NAME, _BAD_SOURCE))
    blank = synth.no_face(derive_seed(params.seed, NAME, _NO_FACE))
    (images / BAD_DIR).mkdir()
    listed = []
    for example in bad_examples(clean, mask, blank):
        rel = f"{BAD_DIR}/{example.name}"
        (images / rel).write_bytes(example.data)
        rows.append(file_row(tmp, f"{IMAGES}/{rel}", item_id=rel, params_hash=item_hash, kind="bad_example",
                             label=None))
        listed.append({"file": rel, "kind": example.kind, "expected": example.expected})
    return listed


def _astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def _contact_sheet(shown: list[tuple[np.ndarray, WildImage]], tile: int = 160) -> np.ndarray:
    """The first images at one tile size, true landmarks drawn (green visible, red hidden), labelled."""
    tiles, labels = [], []
    for rgb, image in shown:
        scale = tile / image.side
        small = cv2.resize(rgb, (tile, tile), interpolation=cv2.INTER_AREA)
        for (u, v), seen in zip(image.landmarks, image.visible, strict=True):
            if np.isfinite(u) and np.isfinite(v):
                centre = (round((u + 0.5) * scale - 0.5), round((v + 0.5) * scale - 0.5))
                cv2.circle(small, centre, 1, (0, 200, 0) if seen else (230, 0, 0), -1, cv2.LINE_AA)
        tiles.append(small)
        labels.append(f"{image.sample.label[:8]} {image.sample.yaw:+.0f}deg {image.side}px")
    return label_grid(tiles, labels, 6)


def _metrics(truth: list[dict[str, Any]], bad: list[dict[str, str]], item_hash: str) -> dict[str, Any]:
    """Deterministic facts about the set (no timings: equal outputs give equal metrics)."""
    yaw = np.array([r["yaw_deg"] for r in truth])
    sides = np.array([r["width"] for r in truth])
    visible = np.array([r["landmark_visible"] for r in truth], bool)
    return {
        "images": len(truth),
        "photos": 1,
        "bad_examples": len(bad),
        "params_hash": item_hash,
        "label_counts": dict(sorted(Counter(r["label"] for r in truth).items())),
        "yaw_abs_max": round(float(np.abs(yaw).max()), 3),
        "yaw_abs_over_30": int((np.abs(yaw) > 30).sum()),
        "side_min": int(sides.min()),
        "side_max": int(sides.max()),
        "landmarks_visible_fraction": round(float(visible.mean()), 4),
        "jpeg_quality_mean": round(float(np.mean([r["jpeg_quality"] for r in truth])), 2),
        "blur_sigma_mean": round(float(np.mean([r["blur_sigma"] for r in truth])), 4),
        "noise_sigma_mean": round(float(np.mean([r["noise_sigma"] for r in truth])), 4),
    }


STAGE = Stage(NAME, WildSynthParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
