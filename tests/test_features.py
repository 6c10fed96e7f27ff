"""Landmarks, alignment, the appearance feature, label mapping, dataset loaders and training."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from facedetail.errors import FacedetailError
from facedetail.features.align import (
    APPEARANCE_DIM,
    CropConfig,
    Reference,
    aligned_crop,
    appearance_features,
    similarity_transforms,
)
from facedetail.features.datasets import (
    class_index,
    labelled_image_list,
    load_fer2013,
    load_labelled_images,
)
from facedetail.features.emotion import FER_CLASSES, MiniXception
from facedetail.features.landmarks import NO_FACE, SEVERAL_FACES, DetectorConfig, LandmarkDetector
from facedetail.features.train import TrainConfig, deterministic, evaluate, predict, train_classifier


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector()


@pytest.fixture(scope="module")
def reference(sfm_model) -> Reference:
    return Reference.from_model(sfm_model)


@pytest.fixture(scope="module")
def astronaut_face(detector: LandmarkDetector):
    found = detector.detect(data.astronaut())
    assert found.ok, found.reason
    return found.face


def test_astronaut_face_and_landmarks(astronaut_face) -> None:
    left, top, right, bottom = astronaut_face.box
    # her face, not the larger false detection on the suit that `largest` would pick
    assert 150 < (left + right) / 2 < 300 and 50 < (top + bottom) / 2 < 200
    lm = astronaut_face.landmarks
    assert lm.shape == (68, 2)
    inside = (lm[:, 0] > left - 20) & (lm[:, 0] < right + 20) & (lm[:, 1] > top - 20) & (lm[:, 1] < bottom + 20)
    assert inside.all()
    assert lm[36:42, 1].mean() < lm[48:60, 1].mean(), "eyes above the mouth"


def test_face_policies_and_no_face() -> None:
    img = data.astronaut()
    assert LandmarkDetector(DetectorConfig(multiple_faces="reject")).detect(img).reason.startswith(SEVERAL_FACES)
    largest = LandmarkDetector(DetectorConfig(multiple_faces="largest")).detect(img)
    assert largest.face.box[1] > 300, "documented failure mode of `largest`: the suit patch"
    blank = LandmarkDetector().detect(np.full((240, 320), 90, np.uint8))
    assert not blank.ok and blank.reason == NO_FACE
    small = LandmarkDetector(DetectorConfig(min_face_px=500)).detect(img)
    assert not small.ok and small.reason.startswith("face too small")
    with pytest.raises(FacedetailError):
        LandmarkDetector().detect(np.zeros((10, 10), np.float32))


def test_detection_on_downscaled_copy_matches_full_size(detector: LandmarkDetector) -> None:
    """A 4x upscaled photo is detected on a copy shrunk back to 640 px and lands on the same face."""
    big = cv2.resize(data.astronaut(), (2048, 2048), interpolation=cv2.INTER_CUBIC)
    small = detector.detect(data.astronaut()).face
    found = detector.detect(big).face
    assert np.median(np.linalg.norm(found.landmarks / 4 - small.landmarks, axis=1)) < 2.0


def test_reference_is_normalised(reference: Reference) -> None:
    pts = reference.points[reference.defined]
    assert reference.defined.all(), "the Surrey model defines all 68 anchors"
    np.testing.assert_allclose(pts.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt((pts ** 2).sum(1).mean()), 1.0)
    assert pts[36:42, 1].mean() < pts[48:60, 1].mean(), "image orientation: y grows downwards"


def test_similarity_recovers_a_known_transform(reference: Reference) -> None:
    theta, scale, shift = 0.4, 73.0, np.array([120.0, -35.0])
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    image_pts = reference.points @ R.T * scale + shift
    M = similarity_transforms(image_pts, reference)
    np.testing.assert_allclose(M[:, :2], R.T / scale, atol=1e-12)
    features = appearance_features(image_pts, reference)
    assert features.shape == (1, APPEARANCE_DIM)
    np.testing.assert_allclose(features, 0, atol=1e-6)


def test_appearance_feature_ignores_pose_in_the_image_plane(astronaut_face, reference: Reference) -> None:
    lm = astronaut_face.landmarks
    theta = -0.3
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = (lm - 200) @ R.T * 2.5 + 40
    batch = appearance_features(np.stack([lm, moved]), reference)
    np.testing.assert_allclose(batch[0], batch[1], atol=1e-5)
    mirrored_mouth = lm.copy()
    mirrored_mouth[48:68, 1] += 6.0  # an opened jaw changes it
    assert np.abs(appearance_features(mirrored_mouth, reference) - batch[0]).max() > 0.01


def test_aligned_crop_is_upright_whatever_the_roll(astronaut_face, reference: Reference) -> None:
    img = data.astronaut()
    crop = aligned_crop(img, astronaut_face.landmarks, reference, CropConfig())
    assert crop.shape == (64, 64) and crop.dtype == np.uint8
    centre = (256.0, 256.0)
    rot = cv2.getRotationMatrix2D(centre, 25.0, 1.0)
    turned = cv2.warpAffine(img, rot, (512, 512), flags=cv2.INTER_LINEAR)
    lm_turned = astronaut_face.landmarks @ rot[:, :2].T + rot[:, 2]
    crop_turned = aligned_crop(turned, lm_turned, reference, CropConfig())
    diff = np.abs(crop.astype(int) - crop_turned.astype(int))
    assert np.median(diff) < 8, "the crop undoes the in-plane rotation"


def test_class_index_maps_every_scheme() -> None:
    assert class_index("happiness") == FER_CLASSES.index("happy")
    assert class_index("Anger") == FER_CLASSES.index("angry")
    assert class_index(3, "fer2013") == 3
    assert class_index(6, "affectnet") == FER_CLASSES.index("angry")
    assert class_index(7, "affectnet") is None, "contempt is not a FER2013 class"
    assert class_index("boredom") is None
    assert class_index(9, "fer2013") is None


def test_fer2013_loader_quarantines_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "fer2013.csv"
    rng = np.random.default_rng(0)
    rows = [{"emotion": 3, "pixels": " ".join(map(str, rng.integers(0, 256, 2304))), "Usage": "Training"},
            {"emotion": 0, "pixels": " ".join(map(str, rng.integers(0, 256, 2304))), "Usage": "PublicTest"},
            {"emotion": 4, "pixels": "1 2 3", "Usage": "Training"},
            {"emotion": 12, "pixels": " ".join(["7"] * 2304), "Usage": "Training"}]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["emotion", "pixels", "Usage"])
        writer.writeheader()
        writer.writerows(rows)
    samples = load_fer2013(path)
    assert samples.crops.shape == (2, 64, 64)
    assert samples.labels.tolist() == [3, 0] and samples.split.tolist() == ["train", "holdout"]
    reasons = [q["reason"] for q in samples.quarantine]
    assert len(reasons) == 2 and "3 pixels" in reasons[0] and "12" in reasons[1]


def test_labelled_images_go_through_the_detector(tmp_path: Path, detector: LandmarkDetector,
                                                 reference: Reference) -> None:
    """AffectNet-style list: every unusable image lands in quarantine with its reason."""
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.jpg")
    Image.fromarray(np.full((300, 300), 80, np.uint8)).save(tmp_path / "wall.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    listing = tmp_path / "list.csv"
    listing.write_text("subDirectory_filePath,expression\nastronaut.jpg,1\nwall.png,0\nbroken.jpg,2\n"
                       "astronaut.jpg,7\nmissing.jpg,3\n")
    pairs = labelled_image_list(tmp_path, listing)
    samples = load_labelled_images(tmp_path, pairs, "affectnet", detector, reference, CropConfig(), 7, 0.0)
    assert samples.ids == ["astronaut.jpg"] and samples.labels.tolist() == [FER_CLASSES.index("happy")]
    reasons = {q["id"]: q["reason"] for q in samples.quarantine}
    assert reasons["wall.png"] == NO_FACE
    assert "not a decodable image" in reasons["broken.jpg"]
    assert "no such file" in reasons["missing.jpg"]
    assert any("not an emotion class" in r for r in reasons.values())


def test_folder_layout_listing(tmp_path: Path) -> None:
    for label in ("happy", "sad"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / label / "a.png")
    assert labelled_image_list(tmp_path) == [("happy/a.png", "happy"), ("sad/a.png", "sad")]


def _toy_crops(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes a network can tell apart: bright top half vs bright bottom half."""
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 60, (n, 64, 64)).astype(np.uint8)
    labels = np.arange(n) % 2
    crops[labels == 0, :32] += 150
    crops[labels == 1, 32:] += 150
    return crops, labels.astype(np.int64) * 3  # classes angry (0) and happy (3)


def test_training_is_deterministic_and_learns() -> None:
    """Equal weights whatever thread count torch would pick for the process (the machine's cores, or
    ``OMP_NUM_THREADS``): training runs on the config's threads, and gives the process its own back."""
    crops, labels = _toy_crops(32)
    config = TrainConfig(epochs=10, batch_size=8, lr=3e-3, seed=5, threads=2)
    states = []
    before = torch.get_num_threads()
    try:
        for process_threads in (1, 3):
            torch.set_num_threads(process_threads)
            torch.manual_seed(config.seed)
            net = MiniXception()  # small and fast on CPU; EmotionNet shares the training code
            history = train_classifier(net, crops, labels, config)
            assert torch.get_num_threads() == process_threads
            states.append({k: v.clone() for k, v in net.state_dict().items()})
    finally:
        torch.set_num_threads(before)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    probs, feats = predict(net, crops)
    assert feats.shape == (32, 128) and probs.shape == (32, 7)
    assert evaluate(probs, labels).accuracy == 1.0
    assert history[-1]["loss"] < history[0]["loss"]


def test_deterministic_runs_every_blas_on_one_thread_and_gives_the_process_its_own_back() -> None:
    """``evaluate``'s scores changed with ``OPENBLAS_NUM_THREADS=1`` (OpenBLAS rounds differently on one thread
    than on several) until the block pinned every BLAS loaded, not only torch."""
    import faiss  # noqa: F401  (faiss and cv2 each bring their own OpenBLAS)
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> dict[str, int]:
        return {pool["filepath"]: pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    with threadpool_limits(2, user_api="blas"):
        before, torch_before = blas_threads(), torch.get_num_threads()
        assert len(before) >= 2 and set(before.values()) == {2}
        with deterministic(3):
            assert set(blas_threads().values()) == {1}
            assert torch.get_num_threads() == 3 and torch.are_deterministic_algorithms_enabled()
        assert blas_threads() == before and torch.get_num_threads() == torch_before
