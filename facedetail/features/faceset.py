"""Landmarks and aligned crops of every render, in the same shard layout as the renders.

One output shard per render shard (same name): for each render whose face the detector finds,
``<id>.crop.png`` (the aligned grey crop) and ``<id>.json`` (box, score, landmarks). Renders
without a usable face are returned as quarantined rows with the detector's reason; they never
reach the emotion network or the dictionary, and the stage reports them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facedetail.errors import SourceFileError
from facedetail.features.align import CropConfig, Reference, aligned_crop
from facedetail.features.landmarks import DetectorConfig, LandmarkDetector
from facedetail.io.hashing import canonical_json, sha256_bytes
from facedetail.io.images import decode_png, encode_png
from facedetail.io.jsonfiles import read_json
from facedetail.io.seeds import in_holdout
from facedetail.io.shards import ShardTask, iter_tar_shard, write_tar_shard
from facedetail.io.tables import reason_kind
from facedetail.model.morphable import MorphableModel

CROP_EXT = "crop.png"
OK = "ok"
QUARANTINED = "quarantined"
TRAIN, HOLDOUT = "train", "holdout"
FRAMING_FILE = "framing.json"
"""The face framing written next to the render crops (:func:`load_framing` reads it)."""


@dataclass(frozen=True)
class FaceSetSpec:
    """Everything a worker process needs (picklable)."""

    renders_dir: Path
    """Folder holding the render shards (``shard-NNNNN.tar``)."""
    model_path: Path
    """Morphable model whose frontal mean landmarks are the alignment reference."""
    detector: DetectorConfig
    crop: CropConfig
    split_seed: int
    holdout_fraction: float
    params_hash: str
    stage: str


def split_of(spec: FaceSetSpec, item: str) -> str:
    """``holdout`` or ``train``, drawn from the item id alone (stable as the set grows)."""
    return HOLDOUT if in_holdout(spec.split_seed, spec.stage, item, spec.holdout_fraction) else TRAIN


class FaceShardWorker:
    """Detects faces in one render shard and writes the matching crop shard."""

    def __init__(self, spec: FaceSetSpec) -> None:
        self.spec = spec
        self.detector = LandmarkDetector(spec.detector)
        self.reference = Reference.from_model(MorphableModel.load(spec.model_path))

    def face_item(self, item: str, sample: dict[str, bytes]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(WebDataset sample or None, row) for one render sample."""
        spec = self.spec
        meta = _json(sample.get("json"))
        row: dict[str, Any] = {"id": item, "path": None, "seed": None, "params_hash": spec.params_hash,
                               "split": split_of(spec, item), "label": meta.get("label"), "beta": meta.get("beta")}
        try:
            image = decode_png(sample["png"])
        except (KeyError, ValueError) as err:
            return None, {**row, "status": QUARANTINED, "reason": f"undecodable render: {err}"}
        found = self.detector.detect(image)
        if found.face is None:
            return None, {**row, "status": QUARANTINED, "reason": found.reason}
        face = found.face
        crop = encode_png(aligned_crop(image, face.landmarks, self.reference, spec.crop), 6)
        record = {"id": item, "box": [round(v, 3) for v in face.box], "score": round(face.score, 6),
                  "faces_found": face.faces_found, "landmarks": face.landmarks.tolist()}
        wds = {"__key__": item, CROP_EXT: crop, "json": canonical_json(record).encode()}
        row.update(status=OK, reason=None, key=f"{item}.{CROP_EXT}", sha256=sha256_bytes(crop), bytes=len(crop),
                   box=record["box"], score=record["score"], faces_found=face.faces_found,
                   landmarks=face.landmarks.ravel().tolist(),
                   landmark_error_px=_error_to_truth(face.landmarks, meta))
        return wds, row

    def __call__(self, task: ShardTask, tar_path: Path, progress: Callable[[int], None]) -> list[dict[str, Any]]:
        wanted = set(task.item_ids)
        rows: list[dict[str, Any]] = []

        def samples():
            for sample in iter_tar_shard(self.spec.renders_dir / f"{task.name}.tar"):
                item = sample["__key__"]
                if item not in wanted:
                    continue
                wds, row = self.face_item(item, sample)
                rows.append(row)
                progress(1)
                if wds is not None:
                    yield wds

        write_tar_shard(tar_path, samples())
        missing = wanted - {r["id"] for r in rows}
        rows += [{"id": i, "status": QUARANTINED, "reason": "render missing from its shard", "split": split_of(
            self.spec, i), "params_hash": self.spec.params_hash} for i in sorted(missing)]
        return rows


def _json(data: bytes | None) -> dict[str, Any]:
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return {}


def _error_to_truth(landmarks: np.ndarray, meta: dict[str, Any]) -> float | None:
    """Median distance (px) from the detected to the rendered landmarks that are visible and defined."""
    truth, visible = meta.get("landmarks"), meta.get("landmark_visible")
    if truth is None or visible is None:
        return None
    gt = np.array(truth, dtype=np.float64)  # None (undefined landmark) becomes NaN
    ok = np.asarray(visible, bool) & ~np.isnan(gt[:, 0])
    return round(float(np.median(np.linalg.norm(landmarks[ok] - gt[ok], axis=1))), 4) if ok.any() else None


@dataclass(frozen=True)
class FaceFraming:
    """Detector, crop and alignment reference: how a face becomes landmarks and a crop.

    Written next to the render crops (``framing.json``) and into the dictionary, so that a photo
    queried later goes through exactly the path the dictionary's renders went through.
    """

    detector: DetectorConfig
    crop: CropConfig
    reference: Reference

    def to_json(self) -> dict[str, Any]:
        return {"detector": self.detector.model_dump(mode="json"), "crop": self.crop.model_dump(mode="json"),
                "reference": np.where(np.isnan(self.reference.points), None, self.reference.points).tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaceFraming:
        return cls(DetectorConfig(**data["detector"]), CropConfig(**data["crop"]),
                   Reference(np.array(data["reference"], dtype=np.float64)))


def load_framing(faces_dir: Path) -> FaceFraming:
    """The detector/crop/alignment the render crops in ``faces_dir`` were made with (its ``framing.json``)."""
    path = Path(faces_dir) / FRAMING_FILE
    if not path.is_file():
        raise SourceFileError(path, "face framing not found", "Run `dvc repro render_faces` first")
    return FaceFraming.from_json(read_json(path))


@dataclass(frozen=True)
class AlignedFace:
    """A face found in a photo: its landmarks and aligned crop."""

    crop: np.ndarray
    landmarks: np.ndarray
    box: tuple[float, float, float, float]
    score: float


class FaceAligner:
    """Photos to aligned faces, or the reason there is none."""

    def __init__(self, framing: FaceFraming) -> None:
        self.framing = framing
        self.detector = LandmarkDetector(framing.detector)

    def align(self, image: np.ndarray) -> AlignedFace | str:
        """The aligned face of one RGB/grey uint8 image, or a one-line reason."""
        found = self.detector.detect(image)
        if found.face is None:
            return found.reason or "no face"
        face = found.face
        crop = aligned_crop(image, face.landmarks, self.framing.reference, self.framing.crop)
        return AlignedFace(crop, face.landmarks, face.box, face.score)


def render_shard_tasks(source: Sequence[Mapping[str, Any]]) -> list[ShardTask]:
    """One task per render shard, named like it, holding its ids in order.

    ``source`` rows are the render manifest's ``id`` and ``shard`` (``shards/shard-NNNNN.tar``); tasks
    and ids are sorted so the face shards line up with the render shards whatever the row order.
    """
    by_shard: dict[str, list[str]] = {}
    for row in source:
        by_shard.setdefault(Path(row["shard"]).stem, []).append(row["id"])
    return [ShardTask(name, tuple(sorted(ids))) for name, ids in sorted(by_shard.items())]


def face_set_metrics(good: Sequence[Mapping[str, Any]], bad: Sequence[Mapping[str, Any]],
                     params_hash: str) -> dict[str, Any]:
    """Deterministic facts of a face set: detection rate, landmark error against the rendered ground truth.

    ``good`` are the rows of faces found (status ``ok``), ``bad`` the quarantined ones (with a reason).
    """
    errors = np.array([r["landmark_error_px"] for r in good if r.get("landmark_error_px") is not None])
    total = len(good) + len(bad)
    return {
        "renders": total,
        "faces": len(good),
        "detected_fraction": round(len(good) / total, 4),
        "quarantine_reasons": dict(sorted(Counter(reason_kind(r["reason"]) for r in bad).items())),
        "holdout_faces": sum(r["split"] == HOLDOUT for r in good),
        "faces_per_label": dict(sorted(Counter(r["label"] for r in good).items())),
        "landmark_error_px_median": round(float(np.median(errors)), 3) if errors.size else None,
        "landmark_error_px_p90": round(float(np.percentile(errors, 90)), 3) if errors.size else None,
        "params_hash": params_hash,
    }
