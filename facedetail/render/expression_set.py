"""The synthetic expression set: shards of rendered faces with their full parameter records.

Each item is one WebDataset sample with key ``expr-NNNNNNN``:

* ``png``: the RGB image;
* ``mask.png``: 8-bit mask, 255 where the face mesh covers the pixel;
* ``json``: every parameter (:meth:`RenderSample.record`), the label, the 68 landmarks with
  their visibility and depth, and the camera (``K``, ``R``, ``t``, ``P``; see
  :mod:`facedetail.render.camera`).

An item depends only on the model, the sampling config, the image size and its own seed
(:func:`facedetail.io.seeds.derive_seed` of the global seed, the stage name and its id), so
items can be rendered in any order, by any worker, and a longer set starts with a shorter one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facedetail.io.hashing import canonical_json, sha256_bytes
from facedetail.io.images import decode_png, encode_png
from facedetail.io.seeds import derive_seed
from facedetail.io.shards import ShardTask, read_tar_samples, write_tar_shard
from facedetail.model.morphable import MorphableModel
from facedetail.render.faces import FaceRenderer, RenderedFace
from facedetail.render.sampling import (
    RenderSample,
    SamplingConfig,
    expression_distribution,
    label_names,
    sample_render,
)
from facedetail.render.sheet import label_grid

ID_PREFIX = "expr"
ID_DIGITS = 7


def item_id(index: int) -> str:
    """Id of the ``index``-th item (fixed width, so ids sort like indices up to 10 million)."""
    return f"{ID_PREFIX}-{index:0{ID_DIGITS}d}"


def item_record(sample: RenderSample, face: RenderedFace) -> dict[str, Any]:
    """The JSON record of one item: its parameters, landmarks and camera."""
    return {
        **sample.record(),
        "landmarks": _finite_or_none(face.landmarks),
        "landmark_depth": _finite_or_none(face.landmark_depth),
        "landmark_visible": face.visible.tolist(),
        "camera": {
            "projection": face.camera.projection, "width": face.camera.width, "height": face.camera.height,
            "K": _round(face.camera.intrinsic_matrix()).tolist(), "R": _round(face.rotation).tolist(),
            "t": _round(face.translation).tolist(), "P": _round(face.projection).tolist(),
        },
        "mask_fraction": round(float(face.mask.mean()), 6),
    }


@dataclass(frozen=True)
class ExpressionSetSpec:
    """Everything that determines the items' content (picklable, for worker processes)."""

    model_path: Path
    stage: str
    seed: int
    image_size: int
    sampling: SamplingConfig
    png_compression: int
    params_hash: str


class ExpressionShardWorker:
    """Renders shards of the expression set; one instance (one GL context) per process."""

    def __init__(self, spec: ExpressionSetSpec) -> None:
        self.spec = spec
        self.model = MorphableModel.load(spec.model_path)
        self.renderer = FaceRenderer(self.model, spec.image_size, spec.sampling)

    def render_item(self, item: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(WebDataset sample, manifest row) of one item; the row's ``shard`` is left to the caller."""
        spec = self.spec
        seed = derive_seed(spec.seed, spec.stage, item)
        sample = sample_render(np.random.default_rng(seed), spec.sampling, self.model)
        face = self.renderer.render(sample)
        png = encode_png(face.image, spec.png_compression)
        record = item_record(sample, face)
        wds = {
            "__key__": item,
            "png": png,
            "mask.png": encode_png(face.mask.astype(np.uint8) * 255, spec.png_compression),
            "json": canonical_json({"id": item, "seed": seed, "params_hash": spec.params_hash, **record}).encode(),
        }
        row = {
            "id": item, "path": None, "key": f"{item}.png", "sha256": sha256_bytes(png), "bytes": len(png),
            "seed": seed, "params_hash": spec.params_hash, "label": sample.label, "beta": sample.beta.tolist(),
            "alpha": sample.alpha.tolist(), "albedo": sample.albedo.tolist(), "yaw": sample.yaw,
            "pitch": sample.pitch, "roll": sample.roll, "distance_mm": sample.distance_mm,
            "light_direction": sample.light_direction.tolist(), "light_intensity": sample.light_intensity,
            "ambient": sample.ambient, "sh": sample.sh.ravel().tolist(), "background": sample.background_kind,
            "landmarks": record["landmarks"], "landmark_visible": record["landmark_visible"],
            "projection": np.ravel(record["camera"]["P"]).tolist(), "mask_fraction": record["mask_fraction"],
        }
        return wds, row

    def __call__(self, task: ShardTask, tar_path: Path, progress: Callable[[int], None]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []

        def samples():
            for item in task.item_ids:
                wds, row = self.render_item(item)
                rows.append(row)
                progress(1)
                yield wds

        write_tar_shard(tar_path, samples())
        return rows


def _round(x: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(x, np.float64), 4)


def _finite_or_none(x: np.ndarray) -> list[Any]:
    """Rounded nested lists with None for NaN (JSON has no NaN): undefined landmarks."""
    rounded = _round(x)
    return np.where(np.isfinite(rounded), rounded, None).tolist()


def contact_sheet_ids(count: int, n: int) -> list[str]:
    """Ids of ``n`` items spread evenly over a set of ``count`` (all of them if fewer)."""
    if count <= n:
        return [item_id(i) for i in range(count)]
    return [item_id(round(k * (count - 1) / (n - 1))) for k in range(n)] if n > 1 else [item_id(0)]


def contact_sheet(samples: Sequence[dict[str, bytes]], tile: int = 128, columns: int = 8) -> np.ndarray:
    """RGB sheet of WebDataset samples: each image with its landmarks (green visible, red hidden) and label."""
    tiles, labels = [], []
    for sample in samples:
        record = json.loads(sample["json"])
        image = decode_png(sample["png"])
        scale = tile / image.shape[1]
        small = cv2.resize(image, (tile, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        for (u, v), seen in zip(record["landmarks"], record["landmark_visible"], strict=True):
            if u is not None and v is not None:
                centre = (round((u + 0.5) * scale - 0.5), round((v + 0.5) * scale - 0.5))
                cv2.circle(small, centre, 1, (0, 200, 0) if seen else (230, 0, 0), -1, cv2.LINE_AA)
        tiles.append(small)
        strongest = max(record["beta"], default=0.0)
        labels.append(f"{record['label']} {strongest:.2f}")
    return label_grid(tiles, labels, columns)


def read_contact_sheet(out_dir: Path, rows: Sequence[Mapping[str, Any]], n: int) -> np.ndarray:
    """The :func:`contact_sheet` of ``n`` items spread over a set, read from its shards in ``out_dir``.

    ``rows`` are the set's manifest rows (``id`` and ``shard``, relative to ``out_dir``), in item order;
    only the shards holding a wanted item are opened.
    """
    wanted = set(contact_sheet_ids(len(rows), n))
    shards = sorted({r["shard"] for r in rows if r["id"] in wanted})
    samples = [s for shard in shards for s in read_tar_samples(Path(out_dir) / shard, wanted)]
    return contact_sheet(samples)


def expression_set_metrics(rows: Sequence[Mapping[str, Any]], model: MorphableModel, sampling: SamplingConfig,
                           item_hash: str) -> dict[str, Any]:
    """Deterministic facts about the set (no timings: equal outputs give equal metrics).

    ``rows`` are the manifest rows (label, beta, landmark_visible, mask_fraction, bytes, shard).
    """
    labels = Counter(r["label"] for r in rows)
    beta = np.array([r["beta"] for r in rows], np.float64).reshape(len(rows), -1)
    visible = np.array([r["landmark_visible"] for r in rows], bool)
    names = model.expression_names
    return {
        "images": len(rows),
        "shards": len({r["shard"] for r in rows}),
        "params_hash": item_hash,
        "expression_distribution": expression_distribution(sampling.expression, model),
        "label_counts": {name: labels.get(name, 0) for name in label_names(model)},
        "beta_mean": {n: round(float(v), 4) for n, v in zip(names, beta.mean(0), strict=True)},
        "beta_std": {n: round(float(v), 4) for n, v in zip(names, beta.std(0), strict=True)},
        "beta_min": round(float(beta.min()), 4) if beta.size else None,
        "beta_max": round(float(beta.max()), 4) if beta.size else None,
        "landmarks_visible_fraction": round(float(visible.mean()), 4),
        "mask_fraction_mean": round(float(np.mean([r["mask_fraction"] for r in rows])), 4),
        "png_bytes_mean": round(float(np.mean([r["bytes"] for r in rows])), 1),
    }
