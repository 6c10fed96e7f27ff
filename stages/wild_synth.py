"""Stage ``wild_synth``: the default profile's in-the-wild photos, synthetic and with ground truth.

``wild_proxy`` reads a folder of photos exactly as it reads a user's AffectNet folder; this
stage makes the default one (see :mod:`facedetail.proxy.synthetic` for what is drawn).

Outputs in ``data/wild_synth/``:

* ``images/wild-NNNNN.jpg``: the synthetic photos (loose files: the default profile is small);
* ``images/astronaut.png``: the real photo ``skimage.data.astronaut()`` (no ground truth);
* ``images/_bad/``: with ``bad_examples: true``, one bad or odd file of each kind, listed with
  the expected outcome in ``bad_examples.parquet`` (file, kind, expected);
* ``truth.parquet``: per synthetic image its α, β, pose, camera (``K``, ``R``, ``t``, ``P``) and
  the 68 landmarks with visibility, in the image's pixels; ``file`` is relative to ``images/``; the
  face's details (``details``: the drawn field as JSON, exact at any resolution) and ``displacement_png``;
* ``truth/wild-NNNNN.png``: the true UV displacement of each synthetic image at the shared ``uv_chart``
  resolution, 16-bit, ``d = (png / 65535 · 2 - 1) · displacement_scale_mm``, 0 outside the chart
  (:func:`facedetail.proxy.synthetic.displacement_truth_png`);
* ``contact_sheet.png`` (images with their true landmarks), ``manifest.parquet`` (every file under
  ``images/`` and ``truth/``), ``lineage.json``; facts go to ``metrics/wild_synth.json`` (among them
  ``detail_amplitude``, measured on the truth maps).
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from facedetail.capture.parallel import map_items
from facedetail.capture.synthetic import amplitude_summary
from facedetail.config import content_key, input_path, run_only, set_level
from facedetail.features.photos import astronaut_image
from facedetail.io.images import encode_png
from facedetail.io.manifest import file_row
from facedetail.io.tables import write_table
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVChartConfig
from facedetail.proxy.synthetic import (
    TRUTH_SCHEMA,
    WildImage,
    WildSetWriter,
    WildSynthConfig,
    WildSynthesizer,
)
from facedetail.proxy.synthreport import BAD_TABLE_SCHEMA, wild_contact_sheet, wild_set_metrics, write_bad_examples
from stages._common import Input, Stage, StageParams, main, model_input, worker_count

NAME = "wild_synth"
IMAGES = "images"
TRUTH = "truth.parquet"
BAD_TABLE = "bad_examples.parquet"
CONTACT_SHEET = "contact_sheet.png"
ASTRONAUT = "astronaut.png"


class WildSynthParams(StageParams):
    """Parameters of the ``wild_synth`` stage (``wild_synth:`` in params.yaml)."""

    model: str = input_path("data/face_model/model.npz")
    """The morphable model written by the ``face_model`` stage."""
    seed: int = 2019
    """Global seed; each image's seed is derived from it, the stage name and the image id."""
    count: int = set_level(120, ge=1, le=99_999)
    """Number of synthetic images (ids ``wild-00000``...); growing it keeps the first images."""
    synth: WildSynthConfig = WildSynthConfig()
    """How one image looks: size and its jitter, identity/expression/pose/light draw, clutter, degradation."""
    bad_examples: bool = set_level(True)
    """Also write ``images/_bad/``: one bad or odd file of each kind, so the quarantine is exercised."""
    contact_sheet: int = set_level(24, ge=1, le=256)
    """Images shown on the contact sheet (the first ones)."""
    uv_chart: UVChartConfig = UVChartConfig()
    """The shared UV chart (top-level ``uv_chart:`` in params.yaml): resolution of the truth displacement PNGs."""
    workers: int = run_only(0, ge=0)
    """Processes making images; 0 = one per available CPU core (every image depends on its own seed only)."""


def inputs(params: WildSynthParams) -> list[Input]:
    """The morphable model."""
    return [model_input(params.model)]


def build(params: WildSynthParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Write the synthetic photos, the astronaut, the bad examples, their ground truth and a contact sheet."""
    start = time.perf_counter()
    model_path = root / params.model
    item_hash = content_key(params, {"model": out.input_hash(model_path)})
    images = out.dir / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    factory = partial(WildSetWriter, model_path, params.synth, params.seed, NAME, params.uv_chart.resolution,
                      out.dir, params.contact_sheet)
    results = map_items(factory, list(range(params.count)), worker_count(params.workers), desc=NAME, unit="img")
    rows: list[dict[str, Any]] = []
    sheet: list[tuple[np.ndarray, WildImage]] = []
    for r in results:
        rows.append(file_row(out.dir, r["image_file"], item_id=r["item"], seed=r["seed"],
                             params_hash=item_hash, kind="synthetic", label=r["label"]))
        rows.append(file_row(out.dir, r["truth"]["displacement_png"], item_id=f"{r['item']}/displacement",
                             seed=r["seed"], params_hash=item_hash, kind="truth_displacement", label=r["label"]))
        if r["image"] is not None:
            jpeg = r["image"].jpeg
            sheet.append((cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], r["image"]))
    truth = [r["truth"] for r in results]
    (images / ASTRONAUT).write_bytes(encode_png(np.ascontiguousarray(astronaut_image()), 6))
    rows.append(file_row(out.dir, f"{IMAGES}/{ASTRONAUT}", item_id="astronaut", params_hash=item_hash,
                         kind="photo", label=None))
    bad: list[dict[str, str]] = []
    if params.bad_examples:
        with WildSynthesizer(MorphableModel.load(model_path), params.synth) as synth:
            bad = write_bad_examples(synth, params.seed, NAME, images)
    rows += [file_row(out.dir, f"{IMAGES}/{b['file']}", item_id=b["file"], params_hash=item_hash, kind="bad_example",
                      label=None) for b in bad]
    write_table(out.dir / TRUTH, pa.Table.from_pylist(sorted(truth, key=lambda r: r["id"]), schema=TRUTH_SCHEMA))
    write_table(out.dir / BAD_TABLE, pa.table({k: [b[k] for b in bad] for k in ("file", "kind", "expected")},
                                              schema=BAD_TABLE_SCHEMA))
    out.write_manifest(rows)
    out.write_png(CONTACT_SHEET, wild_contact_sheet(sheet))
    out.metrics = {**wild_set_metrics(truth, bad),
                   "detail_amplitude": amplitude_summary([r["amplitude"] for r in results]),
                   "uv_resolution": params.uv_chart.resolution,
                   "truth_clipped_texels": int(sum(r["displacement_clipped"] for r in truth)),
                   "params_hash": item_hash}
    return {"images": params.count, "bad_examples": len(bad), "seconds": round(time.perf_counter() - start, 1)}


STAGE = Stage(NAME, WildSynthParams, build, inputs, seed=lambda p: p.seed,
              headline=("images", "bad_examples", "yaw_abs_max"), look_at=(CONTACT_SHEET,),
              limits="Synthetic photos plus one real one: not the statistics of faces in the wild.",
              sources=lambda p, out: ("skimage-astronaut",))
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
