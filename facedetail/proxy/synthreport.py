"""Reporting on a synthetic wild set (:mod:`facedetail.proxy.synthetic`): its bad-example files, its
contact sheet and its metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from facedetail.io.seeds import derive_seed
from facedetail.proxy.synthetic import BAD_DIR, WildImage, WildSynthesizer, bad_examples
from facedetail.render.sheet import label_grid

BAD_SOURCE_ITEM = "bad-source"
"""Item id whose derived seed draws the clean face the bad examples are made from."""
NO_FACE_ITEM = "bad-no-face"
"""Item id whose derived seed draws the faceless background of the no-face example."""

BAD_TABLE_SCHEMA = pa.schema([pa.field("file", pa.string()), pa.field("kind", pa.string()),
                              pa.field("expected", pa.string())])
"""Columns of the bad-example table: one row per record of :func:`write_bad_examples`."""

TRUE_VISIBLE, TRUE_HIDDEN = (0, 200, 0), (230, 0, 0)
"""Colours of the true landmarks on the contact sheet: visible (green), hidden by the face (red)."""


def write_bad_examples(synth: WildSynthesizer, seed: int, stage: str, images_dir: Path) -> list[dict[str, str]]:
    """Write one bad or odd file of each kind (:func:`~facedetail.proxy.synthetic.bad_examples`) into a
    new ``images_dir/_bad/`` folder; one record per file, in writing order: ``file`` (relative to
    ``images_dir``), ``kind`` and ``expected``.

    The clean face and the faceless background are drawn from seeds derived from (``seed``, ``stage``,
    :data:`BAD_SOURCE_ITEM` / :data:`NO_FACE_ITEM`), so the files depend on nothing else.
    """
    clean, mask = synth.clean_face(derive_seed(seed, stage, BAD_SOURCE_ITEM))
    blank = synth.no_face(derive_seed(seed, stage, NO_FACE_ITEM))
    (images_dir / BAD_DIR).mkdir()
    listed = []
    for example in bad_examples(clean, mask, blank):
        rel = f"{BAD_DIR}/{example.name}"
        (images_dir / rel).write_bytes(example.data)
        listed.append({"file": rel, "kind": example.kind, "expected": example.expected})
    return listed


def wild_contact_sheet(shown: Sequence[tuple[np.ndarray, WildImage]], tile: int = 160) -> np.ndarray:
    """RGB uint8 grid (6 columns) of ``shown`` (decoded RGB pixels, the image) at one tile size, true
    landmarks drawn (green visible, red hidden), labelled with expression, yaw and side."""
    tiles, labels = [], []
    for rgb, image in shown:
        scale = tile / image.side
        small = cv2.resize(rgb, (tile, tile), interpolation=cv2.INTER_AREA)
        for (u, v), seen in zip(image.landmarks, image.visible, strict=True):
            if np.isfinite(u) and np.isfinite(v):
                # Edge-aligned resize of a pixel centre, rounded to the nearest tile pixel.
                centre = (round((u + 0.5) * scale - 0.5), round((v + 0.5) * scale - 0.5))
                cv2.circle(small, centre, 1, TRUE_VISIBLE if seen else TRUE_HIDDEN, -1, cv2.LINE_AA)
        tiles.append(small)
        labels.append(f"{image.sample.label[:8]} {image.sample.yaw:+.0f}deg {image.side}px")
    return label_grid(tiles, labels, 6)


def wild_set_metrics(truth: Sequence[dict[str, Any]], bad: Sequence[dict[str, str]], *,
                     photos: int = 1) -> dict[str, Any]:
    """Deterministic facts about a synthetic wild set (no timings: equal outputs give equal metrics).

    ``truth``: its :meth:`WildImage.truth` rows (at least one); ``bad``: its bad-example records;
    ``photos``: the real photos added to it.
    """
    yaw = np.array([r["yaw_deg"] for r in truth])
    sides = np.array([r["width"] for r in truth])
    visible = np.array([r["landmark_visible"] for r in truth], bool)
    return {
        "images": len(truth),
        "photos": photos,
        "bad_examples": len(bad),
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
