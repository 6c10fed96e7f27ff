"""Stage ``detail_pairs``: the detail network's supervised training pairs (photo in UV + ground-truth displacement).

Its own stage rather than part of ``capture_gt``: the displacement extraction is the slow, scan-bound
step (ray casting per texel), and the pairs depend on more than it does (the photos, the unwrap, the
lighting estimate), so a change to how photos are unwrapped re-runs only this stage, and a user can
add photos of their captures without re-extracting any scan.

For every photo listed in a capture item's ``capture.json`` (``photos``), the photo is unwrapped onto the
item's proxy in the shared UV chart (``uv_chart.resolution``, the same as ``capture_gt``'s maps), through its
known camera (``P``, or a ``camera_file``) or, without one, a camera fitted to its dlib landmarks; the pair
holds the texture and its visibility, ``capture_gt``'s displacement and mask, the proxy and the photo's SH
lighting estimate (the layout is in :mod:`facedetail.detail.pairs`). Photos that cannot be paired are
quarantined with the reason; items ``capture_gt`` quarantined count here as photos without ground truth.

Outputs in ``data/detail_pairs/``: ``shards/pairs-*.tar`` (WebDataset), ``manifest.parquet`` (one row per
pair), ``quarantine.parquet`` and ``lineage.json``; facts in ``metrics/detail_pairs.json``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from facedetail.capture.maps import CaptureMaps, list_items, load_item
from facedetail.capture.scan import CaptureError, CaptureItem, PhotoInfo, discover_items
from facedetail.config import content_key, input_path, run_only
from facedetail.detail.pairbuild import PairBuilder, PairConfig, pair_tasks
from facedetail.detail.pairs import PairError
from facedetail.errors import SourceFileError
from facedetail.io.hashing import params_hash, sha256_bytes
from facedetail.io.shards import ShardTask, build_shards, shard_tasks, write_tar_shard
from facedetail.io.tables import QUARANTINE_NAME, reason_kind, write_quarantine
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVChartConfig
from facedetail.proxy.inputs import LoadConfig, LoadFailure, load_photo
from stages._common import Input, Stage, StageParams, main, model_input, worker_count

NAME = "detail_pairs"
OK, QUARANTINED = "ok", "quarantined"
# Capture photos are decoded at full size: the camera P is in their pixels.
_PHOTO_LOAD = LoadConfig(max_side=8192)


class DetailPairsParams(StageParams):
    """Parameters of the ``detail_pairs`` stage (``detail_pairs:`` in params.yaml)."""

    captures: str = input_path("data/capture_synth")
    """The capture folder (``<subject>/<expression>/`` with photos listed in ``capture.json``)."""
    capture_gt: str = input_path("data/capture_gt")
    """The ground-truth displacement maps of those captures."""
    model: str = input_path("data/face_model/model.npz")
    """The morphable model whose UV chart the pairs are in."""
    uv_chart: UVChartConfig = UVChartConfig()
    """The shared UV chart (top-level ``uv_chart:`` section); must be ``capture_gt``'s."""
    pair: PairConfig = PairConfig()
    """Unwrap, lighting estimate, checks and PNG encoding of each pair."""
    shard_size: int = Field(8, ge=1)
    """Pairs per shard (a 1024² pair is ~3 MB)."""
    workers: int = run_only(0, ge=0)
    """Processes; 0 = one per available CPU core."""


def inputs(params: DetailPairsParams) -> list[Input]:
    """The model, the captures (photos, proxies) and their ground truth."""
    return [model_input(params.model),
            Input(params.captures, what="capture folder", kind="folder",
                  remedy="Run `dvc repro capture_synth`, or set detail_pairs.captures to your captures"),
            Input(params.capture_gt, "capture_gt", what="capture ground truth", kind="folder")]


@dataclass(frozen=True)
class PairSpec:
    """Everything a worker process needs but the pairs, which come with each shard's task (picklable)."""

    capture_gt: Path
    model_path: Path
    resolution: int
    config: PairConfig
    params_hash: str


class PairShardWorker:
    """Builds one shard of pairs (one per process)."""

    def __init__(self, spec: PairSpec) -> None:
        self.spec = spec
        self.builder = PairBuilder(MorphableModel.load(spec.model_path), spec.resolution, spec.config)

    def __call__(self, task: ShardTask, tar_path: Path, progress: Any) -> list[dict[str, Any]]:
        samples, rows = [], []
        maps: dict[str, CaptureMaps] = {}
        pairs: dict[str, tuple[str, str, dict[str, Any]]] = task.inputs_by_id()  # (item id, folder, photo entry)
        for pair_id in task.item_ids:
            item_id, folder, entry = pairs[pair_id]
            item = CaptureItem(item_id, Path(folder))
            photo = PhotoInfo.model_validate(entry)
            row = {"id": pair_id, "item": item_id, "photo": photo.file, "params_hash": self.spec.params_hash}
            try:
                loaded = load_photo(item.folder / photo.file, _PHOTO_LOAD)
                if isinstance(loaded, LoadFailure):
                    raise PairError(f"unreadable photo: {loaded.reason}")
                if loaded.scale != 1.0:
                    raise PairError(f"photo too large: {loaded.original_size} is over the {_PHOTO_LOAD.max_side} px "
                                    "decode limit, and its camera is in full-size pixels")
                if item_id not in maps:
                    maps[item_id] = load_item(self.spec.capture_gt, item_id)
                sample, facts = self.builder.build(item, pair_id, photo, loaded.rgb, maps[item_id])
            except (PairError, CaptureError) as err:
                rows.append({**row, "status": QUARANTINED, "reason": str(err)})
            except Exception as err:  # one pair's failure must not lose the shard: report it
                rows.append({**row, "status": QUARANTINED, "reason": f"unexpected error: {type(err).__name__}: {err}"})
            else:
                samples.append(sample)
                digest = sha256_bytes(b"".join(sample[k] for k in sorted(sample) if k != "__key__"))
                rows.append({**row, "status": OK, "reason": None, "key": sample["__key__"], "sha256": digest,
                             "bytes": sum(len(v) for k, v in sample.items() if k != "__key__"), **facts})
            progress(1)
        write_tar_shard(tar_path, samples)
        return rows


def _upstream_reasons(capture_gt: Path) -> dict[str, str]:
    path = capture_gt / QUARANTINE_NAME
    if not path.is_file():
        return {}
    return {r["id"]: r["reason"] for r in pq.read_table(path, columns=["id", "reason"]).to_pylist()}


def list_pairs(captures: Path, capture_gt: Path) -> tuple[dict[str, tuple[str, str, dict[str, Any]]],
                                                          list[dict[str, Any]], int]:
    """(pairs to build, quarantine rows of photos that cannot be, items without photos)."""
    with_truth = set(list_items(capture_gt))
    upstream = _upstream_reasons(capture_gt)
    pairs: dict[str, tuple[str, str, dict[str, Any]]] = {}
    bad: list[dict[str, Any]] = []
    no_photos = 0
    for item in discover_items(captures):
        try:
            photos = pair_tasks(item)
        except CaptureError as err:
            bad.append({"id": item.id, "item": item.id, "reason": f"unreadable capture item: {err}"})
            continue
        no_photos += not photos
        for pair_id, photo in photos:
            if item.id not in with_truth:
                why = upstream.get(item.id, "not in capture_gt's output")
                bad.append({"id": pair_id, "item": item.id, "photo": photo.file,
                            "reason": f"no ground truth: capture_gt quarantined the item ({why})"})
            else:
                pairs[pair_id] = (item.id, str(item.folder), photo.model_dump(mode="json"))
    return pairs, bad, no_photos


def build(params: DetailPairsParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Pair every photo with ground truth, in resumable shards; quarantine the rest."""
    start = time.perf_counter()
    captures, capture_gt, model_path = root / params.captures, root / params.capture_gt, root / params.model
    pairs, listed_bad, no_photos = list_pairs(captures, capture_gt)
    if not pairs and not listed_bad:
        raise SourceFileError(captures, "no capture item lists a photo (capture.json `photos`)",
                              "Render photos (capture_synth.synth.photos > 0) or list your photos in capture.json")
    key = content_key(params, {"model": out.input_hash(model_path), "captures": out.input_hash(captures),
                               "capture_gt": out.input_hash(capture_gt)})
    spec = PairSpec(capture_gt, model_path, params.uv_chart.resolution, params.pair, key)
    ids = sorted(pairs)
    work_dir = root / STAGE.work_dir
    report = build_shards(shard_tasks(ids, params.shard_size, prefix="pairs", inputs=pairs), work_dir,
                          params_hash({"params": key, "pairs": ids}), partial(PairShardWorker, spec),
                          workers=worker_count(params.workers), desc=NAME, unit="pair")
    rows = out.add_shards(report.records, work_dir)
    good = [r for r in rows if r["status"] == OK]
    bad = [{k: r.get(k) for k in ("id", "item", "photo", "reason")} for r in rows if r["status"] != OK] + listed_bad
    if not good:
        counts = Counter(reason_kind(r["reason"]) for r in bad)
        raise SourceFileError(captures, "no usable pair: " + ", ".join(f"{k} ({n})" for k, n in sorted(counts.items())),
                              "See data/.partial/detail_pairs or fix the captures")
    out.write_manifest([{"id": r["id"], "path": None, "shard": r["shard"], "key": r["key"], "sha256": r["sha256"],
                         "bytes": r["bytes"], "seed": None, "params_hash": key, "item": r["item"],
                         "subject": r["subject"], "expression": r["expression"], "photo": r["photo"],
                         "camera": r["camera"], "visible_fraction": r["visible_fraction"]} for r in good])
    write_quarantine(out.dir / QUARANTINE_NAME, bad)
    out.metrics = pair_metrics(good, bad, resolution=params.uv_chart.resolution, no_photos=no_photos, key=key)
    return {"pairs": len(good), "quarantined": len(bad), "quarantine_reasons": out.metrics["quarantine_reasons"],
            "seconds": round(time.perf_counter() - start, 1), **report.summary()}


def pair_metrics(good: list[dict[str, Any]], bad: list[dict[str, Any]], *, resolution: int, no_photos: int,
                 key: str) -> dict[str, Any]:
    """Deterministic facts about the pairs (counts, visibility, lighting-estimate error where it is known)."""
    lighting = [r["lighting_error"] for r in good if r.get("lighting_error") is not None]
    visible = [r["visible_fraction"] for r in good]
    return {
        "pairs": len(good),
        "subjects": len({r["subject"] for r in good}),
        "quarantined": len(bad),
        "quarantine_reasons": dict(sorted(Counter(reason_kind(r["reason"]) for r in bad).items())),
        "items_without_photos": no_photos,
        "resolution": resolution,
        "cameras": dict(sorted(Counter(r["camera"] for r in good).items())),
        "visible_fraction": {"mean": round(float(np.mean(visible)), 4), "min": round(float(np.min(visible)), 4)},
        "clipped_texels": int(sum(r["clipped_texels"] for r in good)),
        "lighting_shading_error": None if not lighting else {"mean": round(float(np.mean(lighting)), 5),
                                                              "max": round(float(np.max(lighting)), 5)},
        "megabytes": round(sum(r["bytes"] for r in good) / 1e6, 2),
        "params_hash": key,
    }


STAGE = Stage(NAME, DetailPairsParams, build, inputs, resumable=True,
              headline=("pairs", "quarantined", "lighting_shading_error.mean"), items="pairs",
              limits="Lighting is an SH estimate; unseen texels are masked.",
              sources=lambda p, out: ("dlib-68-predictor",) if set(out.metrics["cameras"]) - {"known"} else ())
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
