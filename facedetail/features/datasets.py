"""Labelled emotion datasets as aligned 64x64 grey crops: our renders, FER2013, AffectNet-style lists.

Every loader returns :class:`EmotionSamples` (crops, FER2013 class indices, ids, split) plus
quarantine rows (id, path, reason) for what could not be used. Labels are mapped to FER2013's
seven classes (:data:`facedetail.features.emotion.FER_CLASSES`); the Surrey model's six
expressions and neutral are exactly those classes, AffectNet's ``contempt`` is not one of them
and is reported, not guessed.

FER2013 ships 48x48 crops that are already faces (too small for the 68-point predictor), so
they are only resized; AffectNet-style photos go through the same detector, landmarks and
alignment as the renders and the query photos.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow.parquet as pq

from facedetail.errors import FacedetailError, SourceFileError
from facedetail.features.align import CropConfig, Reference, aligned_crop
from facedetail.features.emotion import FER_CLASSES
from facedetail.features.faceset import CROP_EXT, HOLDOUT, TRAIN, FaceFraming
from facedetail.features.landmarks import LandmarkDetector
from facedetail.io.images import decode_png
from facedetail.io.manifest import MANIFEST_NAME
from facedetail.io.seeds import in_holdout
from facedetail.io.shards import read_tar_samples

_SYNONYMS = {
    "anger": "angry", "angry": "angry", "disgust": "disgust", "disgusted": "disgust", "fear": "fear",
    "fearful": "fear", "afraid": "fear", "happiness": "happy", "happy": "happy", "joy": "happy",
    "sadness": "sad", "sad": "sad", "surprise": "surprise", "surprised": "surprise", "neutral": "neutral",
}
AFFECTNET_IDS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
"""AffectNet's expression ids 0–7 (8–10 are none/uncertain/non-face)."""
LabelScheme = Literal["names", "fer2013", "affectnet"]
DatasetKind = Literal["renders", "fer2013", "images"]
"""Which labelled set :func:`load_emotion_dataset` reads."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class EmotionSamples:
    """Crops with their class and split; what a loader could not use is in ``quarantine``."""

    crops: np.ndarray
    """(N, 64, 64) uint8 grey, aligned."""
    labels: np.ndarray
    """(N,) int64 index into FER_CLASSES."""
    ids: list[str]
    split: np.ndarray
    """(N,) ``train`` or ``holdout``."""
    quarantine: list[dict[str, Any]] = field(default_factory=list)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(crops, labels) of one split."""
        keep = self.split == name
        return self.crops[keep], self.labels[keep]


def class_index(label: Any, scheme: LabelScheme = "names") -> int | None:
    """FER2013 class index of a label, or None when it is not one of the seven classes."""
    if scheme == "fer2013":
        value = int(label)
        return value if 0 <= value < len(FER_CLASSES) else None
    if scheme == "affectnet":
        value = int(label)
        name = AFFECTNET_IDS[value] if 0 <= value < len(AFFECTNET_IDS) else None
    else:
        name = str(label).strip().lower()
    mapped = _SYNONYMS.get(name or "")
    return FER_CLASSES.index(mapped) if mapped else None


def _samples(crops: list[np.ndarray], labels: list[int], ids: list[str], split: list[str],
             quarantine: list[dict[str, Any]], size: int) -> EmotionSamples:
    stack = np.stack(crops) if crops else np.zeros((0, size, size), np.uint8)
    return EmotionSamples(stack, np.asarray(labels, np.int64), ids, np.asarray(split, dtype=object), quarantine)


def render_face_rows(faces_dir: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the ``render_faces`` manifest (``id`` and ``shard`` always included)."""
    manifest = faces_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise SourceFileError(manifest, "render face crops not found", "Run `dvc repro render_faces` first")
    return pq.read_table(manifest, columns=sorted({"id", "shard", *columns})).to_pylist()


def read_render_crops(faces_dir: Path, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """{id: aligned crop} of these manifest rows, read shard by shard (other samples are skipped)."""
    by_shard: dict[str, list[str]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row["id"])
    crops: dict[str, np.ndarray] = {}
    for shard, ids in by_shard.items():
        for sample in read_tar_samples(faces_dir / shard, ids):
            crops[sample["__key__"]] = decode_png(sample[CROP_EXT], grey=True)
    return crops


def load_render_faces(faces_dir: Path) -> EmotionSamples:
    """The crops of the ``render_faces`` stage, labelled by each render's dominant emotion."""
    rows = render_face_rows(faces_dir, ["label", "split"])
    crops = read_render_crops(faces_dir, rows)
    out: tuple[list, list, list, list] = ([], [], [], [])
    quarantine = []
    for row in rows:
        index = class_index(row["label"])
        if index is None or row["id"] not in crops:
            why = f"label {row['label']!r} is not an emotion class" if index is None else "crop missing from shard"
            quarantine.append({"id": row["id"], "path": None, "reason": why})
            continue
        for seq, value in zip(out, (crops[row["id"]], index, row["id"], row["split"]), strict=True):
            seq.append(value)
    size = next(iter(crops.values())).shape[0] if crops else 64
    return _samples(*out, quarantine, size)


def load_fer2013(csv_path: Path, size: int = 64) -> EmotionSamples:
    """``fer2013.csv`` (emotion, pixels, Usage): Training is ``train``, the two test sets ``holdout``."""
    if not csv_path.is_file():
        raise SourceFileError(csv_path, "FER2013 csv not found", "Download fer2013.csv and set emotion_net.fer2013_csv")
    out: tuple[list, list, list, list] = ([], [], [], [])
    quarantine = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh)):
            item = f"fer2013-{n:06d}"
            try:
                pixels = np.array(row["pixels"].split(), dtype=np.uint8)
                index = class_index(row["emotion"], "fer2013")
            except (KeyError, ValueError, AttributeError) as err:
                quarantine.append({"id": item, "path": None, "reason": f"unreadable row: {err}"})
                continue
            if pixels.size != 48 * 48 or index is None:
                why = f"{pixels.size} pixels, expected 2304" if index is not None else f"label {row['emotion']!r}"
                quarantine.append({"id": item, "path": None, "reason": f"bad row: {why}"})
                continue
            crop = cv2.resize(pixels.reshape(48, 48), (size, size), interpolation=cv2.INTER_LINEAR)
            split = TRAIN if (row.get("Usage") or "Training") == "Training" else HOLDOUT
            for seq, value in zip(out, (crop, index, item, split), strict=True):
                seq.append(value)
    return _samples(*out, quarantine, size)


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 pixels of an image file, EXIF orientation applied; ValueError when it cannot be decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not Path(path).is_file():
        raise ValueError(f"no such file: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"not a decodable image: {err}") from err


def labelled_image_list(root: Path, csv_path: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, label) pairs: from a CSV (``path``/``subDirectory_filePath`` and
    ``label``/``expression`` columns, the AffectNet layout) or from ``root/<label>/<image>`` folders."""
    if csv_path is not None:
        with csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            path_col = next((c for c in ("path", "subDirectory_filePath", "image") if c in cols), None)
            label_col = next((c for c in ("label", "expression", "emotion") if c in cols), None)
            if path_col is None or label_col is None:
                raise SourceFileError(csv_path, f"needs a path and a label column, has {cols}",
                                      "Name them `path` and `label` (AffectNet's names also work)")
            return [(r[path_col], r[label_col]) for r in reader]
    return sorted((p.relative_to(root).as_posix(), p.parent.name) for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.parent != root)


def load_labelled_images(root: Path, pairs: list[tuple[str, str]], scheme: LabelScheme, detector: LandmarkDetector,
                         reference: Reference, crop: CropConfig, split_seed: int,
                         holdout_fraction: float) -> EmotionSamples:
    """Photos with labels, through the same detector, landmarks and alignment as the renders."""
    out: tuple[list, list, list, list] = ([], [], [], [])
    quarantine = []
    for rel, label in pairs:
        try:
            index = class_index(label, scheme)
        except ValueError:
            index = None
        if index is None:
            quarantine.append({"id": rel, "path": rel, "reason": f"label {label!r} is not an emotion class"})
            continue
        try:
            image = read_image(root / rel)
        except (ValueError, FileNotFoundError) as err:
            quarantine.append({"id": rel, "path": rel, "reason": str(err)})
            continue
        found = detector.detect(image)
        if found.face is None:
            quarantine.append({"id": rel, "path": rel, "reason": found.reason})
            continue
        split = HOLDOUT if in_holdout(split_seed, "emotion_net", rel, holdout_fraction) else TRAIN
        values = (aligned_crop(image, found.face.landmarks, reference, crop), index, rel, split)
        for seq, value in zip(out, values, strict=True):
            seq.append(value)
    return _samples(*out, quarantine, crop.size)


def load_emotion_dataset(kind: DatasetKind, framing: FaceFraming, render_faces: Path, *,
                         fer2013_csv: Path | None = None, images_root: Path | None = None,
                         images_csv: Path | None = None, label_scheme: LabelScheme = "names",
                         split_seed: int, holdout_fraction: float) -> tuple[EmotionSamples, list[Path]]:
    """The chosen training set and the input paths it was read from (for lineage).

    ``renders``: the crops in ``render_faces`` (their own split); ``fer2013``: ``fer2013_csv`` resized
    to ``framing``'s crop size; ``images``: ``images_root`` listed by ``images_csv`` (or by label
    folders), put through ``framing``'s detector and alignment and split by ``split_seed`` and
    ``holdout_fraction`` (used by ``images`` only).
    """
    if kind == "renders":
        return load_render_faces(render_faces), [render_faces]
    if kind == "fer2013":
        if fer2013_csv is None:
            raise FacedetailError("dataset fer2013 needs fer2013_csv")
        return load_fer2013(fer2013_csv, framing.crop.size), [fer2013_csv]
    if kind != "images":
        raise FacedetailError(f"unknown emotion dataset {kind!r}: renders, fer2013 or images")
    if images_root is None:
        raise FacedetailError("dataset images needs images_root")
    pairs = labelled_image_list(images_root, images_csv)
    samples = load_labelled_images(images_root, pairs, label_scheme, LandmarkDetector(framing.detector),
                                   framing.reference, framing.crop, split_seed, holdout_fraction)
    return samples, [images_root] + ([images_csv] if images_csv else [])
