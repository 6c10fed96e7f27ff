"""What the emotion network is measured by: held-out accuracy, the astronaut photo, and the plot tables.

Everything here is deterministic given its inputs (no timings), so equal training gives equal
metrics and byte-identical plot CSVs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facedetail.features.datasets import EmotionSamples
from facedetail.features.emotion import FER_CLASSES
from facedetail.features.faceset import TRAIN, FaceAligner, FaceFraming
from facedetail.features.photos import astronaut_image
from facedetail.features.train import Evaluation, predict
from facedetail.io.tables import write_csv

CONFUSION_CSV = "confusion.csv"
HISTORY_CSV = "history.csv"


def astronaut_emotion(net: torch.nn.Module, framing: FaceFraming) -> dict[str, Any]:
    """The network's class and class probabilities for :func:`astronaut_image`, framed like the renders.

    ``{"predicted": None, "reason": ...}`` when no usable face is found in the photo.
    """
    face = FaceAligner(framing).align(astronaut_image())
    if isinstance(face, str):
        return {"predicted": None, "reason": face}
    probs, _ = predict(net, face.crop[None])
    return {"predicted": FER_CLASSES[int(probs[0].argmax())],
            "probabilities": {c: round(float(p), 4) for c, p in zip(FER_CLASSES, probs[0], strict=True)}}


def emotion_metrics(samples: EmotionSamples, before: Evaluation | None, after: Evaluation,
                    history: Sequence[dict[str, float]], astronaut: dict[str, Any],
                    test_y: np.ndarray) -> dict[str, Any]:
    """The ``emotion_net`` metrics: held-out accuracy (overall, per class, before and after training).

    ``before`` is None when there were no held-out crops to measure the initial network on; the
    chance level is that of always answering the held-out set's most frequent class.
    """
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


def write_emotion_plots(plots_dir: Path, actual: np.ndarray, predicted: np.ndarray,
                        history: Sequence[dict[str, float]]) -> None:
    """``confusion.csv`` (one row per held-out crop: actual, predicted class name) for `dvc plots`'
    confusion template, and ``history.csv`` (epoch, loss, train_accuracy), in ``plots_dir``."""
    rows = [{"actual": FER_CLASSES[a], "predicted": FER_CLASSES[p]} for a, p in zip(actual, predicted, strict=True)]
    write_csv(Path(plots_dir) / CONFUSION_CSV, ["actual", "predicted"], rows)
    write_csv(Path(plots_dir) / HISTORY_CSV, ["epoch", "loss", "train_accuracy"], history)
