"""The face-set and emotion-network reporting in facedetail.features, on small hand-made inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facedetail.errors import FacedetailError, SourceFileError
from facedetail.features import evaluate as report
from facedetail.features.align import CropConfig, Reference
from facedetail.features.datasets import EmotionSamples, load_emotion_dataset
from facedetail.features.emotion import FER_CLASSES, build_network
from facedetail.features.evaluate import astronaut_emotion, emotion_metrics, write_emotion_plots
from facedetail.features.faceset import (
    CROP_EXT,
    FRAMING_FILE,
    FaceAligner,
    FaceFraming,
    face_set_metrics,
    load_framing,
    render_shard_tasks,
)
from facedetail.features.landmarks import DetectorConfig, LandmarkDetector
from facedetail.features.photos import astronaut_image
from facedetail.features.train import Evaluation, predict
from facedetail.io.images import encode_png
from facedetail.io.shards import ShardTask, write_tar_shard


def _framing(points: np.ndarray | None = None) -> FaceFraming:
    pts = points if points is not None else np.random.default_rng(0).normal(0, 1, (68, 2))
    return FaceFraming(DetectorConfig(upsample=1), CropConfig(size=48), Reference.from_points(pts))


# --- photos and framing -------------------------------------------------------------------------


def test_astronaut_image_is_the_skimage_photo() -> None:
    image = astronaut_image()
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [154, 147, 151] and image[256, 256].tolist() == [19, 14, 7]


def test_load_framing_round_trip_and_missing(tmp_path: Path) -> None:
    framing = _framing()
    (tmp_path / FRAMING_FILE).write_text(json.dumps(framing.to_json()))
    got = load_framing(tmp_path)
    assert got.detector == framing.detector and got.crop == framing.crop
    np.testing.assert_array_equal(got.reference.points, framing.reference.points)
    with pytest.raises(SourceFileError, match=r"face framing not found.*dvc repro render_faces"):
        load_framing(tmp_path / "empty")


# --- render_faces -------------------------------------------------------------------------------


def test_render_shard_tasks_group_and_sort() -> None:
    source = [{"id": "expr-3", "shard": "shards/shard-00001.tar"}, {"id": "expr-1", "shard": "shards/shard-00000.tar"},
              {"id": "expr-2", "shard": "shards/shard-00001.tar"}, {"id": "expr-0", "shard": "shards/shard-00000.tar"}]
    assert render_shard_tasks(source) == [ShardTask("shard-00000", ("expr-0", "expr-1")),
                                          ShardTask("shard-00001", ("expr-2", "expr-3"))]
    assert render_shard_tasks([]) == []


def test_face_set_metrics_on_hand_made_rows() -> None:
    good = [{"split": "train", "label": "happy", "landmark_error_px": 1.0},
            {"split": "holdout", "label": "happy", "landmark_error_px": 3.0},
            {"split": "train", "label": "sad", "landmark_error_px": 2.0},
            {"split": "holdout", "label": "neutral", "landmark_error_px": None},
            {"split": "train", "label": "sad"}]
    bad = [{"reason": "no face detected"}, {"reason": "face too small: 30 px < min_face_px 40"},
           {"reason": "face too small: 20 px < min_face_px 40"}, {"reason": None}]
    assert face_set_metrics(good, bad, "k") == {
        "renders": 9, "faces": 5, "detected_fraction": 0.5556,
        "quarantine_reasons": {"face too small": 2, "no face detected": 1, "unknown": 1},
        "holdout_faces": 2, "faces_per_label": {"happy": 2, "neutral": 1, "sad": 2},
        "landmark_error_px_median": 2.0, "landmark_error_px_p90": 2.8, "params_hash": "k",
    }
    none = face_set_metrics(good[3:], [], "k")
    assert none["landmark_error_px_median"] is None and none["landmark_error_px_p90"] is None
    assert none["detected_fraction"] == 1.0 and none["quarantine_reasons"] == {}


# --- emotion_net metrics and plots --------------------------------------------------------------


def _evaluation(pairs: list[tuple[int, int]]) -> Evaluation:
    confusion = np.zeros((7, 7), np.int64)
    for actual, predicted in pairs:
        confusion[actual, predicted] += 1
    return Evaluation(confusion)


def test_emotion_metrics_on_hand_made_evaluations() -> None:
    samples = EmotionSamples(np.zeros((5, 4, 4), np.uint8), np.array([3, 3, 4, 3, 6]), list("abcde"),
                             np.array(["train", "holdout", "holdout", "holdout", "train"], dtype=object),
                             [{"id": "x", "path": None, "reason": "r"}])
    test_y = np.array([3, 4, 3])
    after = _evaluation([(3, 3), (4, 3), (3, 3)])
    before = _evaluation([(3, 0), (4, 4), (3, 0)])
    history = [{"epoch": 0, "loss": 1.25, "train_accuracy": 0.5}, {"epoch": 1, "loss": 0.5, "train_accuracy": 1.0}]
    got = emotion_metrics(samples, before, after, history, {"predicted": "happy"}, test_y)
    assert got["holdout_crops"] == 3 and got["train_crops"] == 2 and got["quarantined"] == 1
    assert got["holdout_accuracy"] == 0.6667 and got["holdout_accuracy_before_training"] == 0.3333
    assert got["holdout_accuracy_per_class"]["happy"] == 1.0 and got["holdout_accuracy_per_class"]["sad"] == 0.0
    assert got["holdout_accuracy_per_class"]["angry"] is None
    assert got["holdout_accuracy_per_class_before_training"]["sad"] == 1.0
    assert got["chance_accuracy_majority_class"] == 0.6667
    assert got["final_train_loss"] == 0.5 and got["astronaut"] == {"predicted": "happy"}
    bare = emotion_metrics(samples, None, after, [], {}, test_y)
    assert bare["holdout_accuracy_before_training"] is None and bare["final_train_loss"] is None
    assert bare["holdout_accuracy_per_class_before_training"] is None
    empty = emotion_metrics(samples, None, _evaluation([(3, 3)]), [], {}, np.zeros(0, np.int64))
    assert empty["chance_accuracy_majority_class"] is None and empty["holdout_crops"] == 0


def test_write_emotion_plots_bytes(tmp_path: Path) -> None:
    history = [{"epoch": 0, "loss": 1.25, "train_accuracy": 0.5}]
    write_emotion_plots(tmp_path / "plots", np.array([3, 0]), np.array([3, 6]), history)
    assert (tmp_path / "plots/confusion.csv").read_bytes() == b"actual,predicted\nhappy,happy\nangry,neutral\n"
    assert (tmp_path / "plots/history.csv").read_bytes() == b"epoch,loss,train_accuracy\n0,1.25,0.5\n"


@pytest.fixture(scope="module")
def astronaut_framing() -> FaceFraming:
    """A framing whose reference is the astronaut's own landmarks (any frontal face would do)."""
    found = LandmarkDetector(DetectorConfig()).detect(astronaut_image())
    assert found.face is not None, found.reason
    return FaceFraming(DetectorConfig(), CropConfig(), Reference.from_points(found.face.landmarks))


def test_astronaut_emotion(astronaut_framing: FaceFraming, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = build_network("mini_xception", False, num_classes=len(FER_CLASSES))
    got = astronaut_emotion(net, astronaut_framing)
    face = FaceAligner(astronaut_framing).align(astronaut_image())
    probs = predict(net, face.crop[None])[0][0]
    assert got["predicted"] == FER_CLASSES[int(probs.argmax())]
    assert list(got["probabilities"]) == list(FER_CLASSES)
    assert got["probabilities"] == {c: round(float(p), 4) for c, p in zip(FER_CLASSES, probs, strict=True)}
    monkeypatch.setattr(report, "astronaut_image", lambda: np.zeros((100, 100, 3), np.uint8))
    assert astronaut_emotion(net, astronaut_framing) == {"predicted": None, "reason": "no face detected"}


# --- emotion_net datasets -----------------------------------------------------------------------


def _render_faces(faces_dir: Path) -> None:
    """A two-shard ``render_faces`` output: four crops, one of them with a label that is no emotion."""
    rows = [("f0", "happy", "train"), ("f1", "sad", "holdout"), ("f2", "unlabelled", "train"), ("f3", "fear", "train")]
    for shard, part in (("shards/a.tar", rows[:2]), ("shards/b.tar", rows[2:])):
        (faces_dir / "shards").mkdir(parents=True, exist_ok=True)
        write_tar_shard(faces_dir / shard, [{"__key__": i, CROP_EXT: encode_png(np.full((48, 48), n * 10, np.uint8), 1)}
                                            for n, (i, _, _) in enumerate(part)])
    pq.write_table(pa.table({"id": [r[0] for r in rows], "shard": ["shards/a.tar"] * 2 + ["shards/b.tar"] * 2,
                             "label": [r[1] for r in rows], "split": [r[2] for r in rows]}),
                   faces_dir / "manifest.parquet")


def test_load_emotion_dataset_renders(tmp_path: Path) -> None:
    _render_faces(tmp_path / "faces")
    samples, inputs = load_emotion_dataset("renders", _framing(), tmp_path / "faces", split_seed=0,
                                           holdout_fraction=0.5)
    assert inputs == [tmp_path / "faces"]
    assert samples.ids == ["f0", "f1", "f3"] and list(samples.split) == ["train", "holdout", "train"]
    assert [FER_CLASSES[i] for i in samples.labels] == ["happy", "sad", "fear"]
    assert samples.crops.shape == (3, 48, 48) and samples.crops[2, 0, 0] == 10
    assert samples.quarantine == [{"id": "f2", "path": None, "reason": "label 'unlabelled' is not an emotion class"}]


def test_load_emotion_dataset_fer2013(tmp_path: Path) -> None:
    path = tmp_path / "fer.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["emotion", "pixels", "Usage"])
        writer.writerow([3, " ".join(["200"] * 2304), "Training"])
        writer.writerow([0, " ".join(["10"] * 2304), "PublicTest"])
        writer.writerow([8, " ".join(["10"] * 2304), "Training"])
    framing = _framing()  # crop size 48: FER2013's own size, kept
    samples, inputs = load_emotion_dataset("fer2013", framing, tmp_path / "faces", fer2013_csv=path, split_seed=0,
                                           holdout_fraction=0.5)
    assert inputs == [path]
    assert samples.crops.shape == (2, 48, 48) and samples.crops[0].min() == 200
    assert list(samples.labels) == [3, 0] and list(samples.split) == ["train", "holdout"]
    assert [q["reason"] for q in samples.quarantine] == ["bad row: label '8'"]
    with pytest.raises(FacedetailError, match="needs fer2013_csv"):
        load_emotion_dataset("fer2013", framing, tmp_path, split_seed=0, holdout_fraction=0.5)


def test_load_emotion_dataset_images(tmp_path: Path, astronaut_framing: FaceFraming) -> None:
    root = tmp_path / "images"
    (root / "happy").mkdir(parents=True)
    (root / "contempt").mkdir()
    photo = cv2.cvtColor(astronaut_image(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(root / "happy" / "astronaut.png"), photo)
    cv2.imwrite(str(root / "contempt" / "astronaut.png"), photo)
    (root / "happy" / "broken.png").write_text("not a picture")
    samples, inputs = load_emotion_dataset("images", astronaut_framing, tmp_path / "faces", images_root=root,
                                           split_seed=0, holdout_fraction=0.0)
    assert inputs == [root]
    assert samples.ids == ["happy/astronaut.png"] and list(samples.split) == ["train"]
    assert samples.crops.shape == (1, 64, 64) and list(samples.labels) == [FER_CLASSES.index("happy")]
    assert [q["id"] for q in samples.quarantine] == ["contempt/astronaut.png", "happy/broken.png"]
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nhappy/astronaut.png,surprised\n")
    samples, inputs = load_emotion_dataset("images", astronaut_framing, tmp_path / "faces", images_root=root,
                                           images_csv=listing, split_seed=0, holdout_fraction=0.99)
    assert inputs == [root, listing] and list(samples.labels) == [FER_CLASSES.index("surprise")]
    assert list(samples.split) == ["holdout"]
    with pytest.raises(FacedetailError, match="needs images_root"):
        load_emotion_dataset("images", astronaut_framing, tmp_path, split_seed=0, holdout_fraction=0.5)
