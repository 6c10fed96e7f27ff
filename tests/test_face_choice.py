"""Which face the detector chooses, and the retry that finds small faces: on composites built here
from the astronaut photo (a small face in a large canvas; a main face plus a smaller background face)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from facedetail.features.landmarks import (
    FACE_TOO_SMALL,
    NO_FACE,
    SEVERAL_FACES,
    DetectorConfig,
    LandmarkDetector,
    choose_face,
)

FACE_BOX = (179, 83, 267, 171)
"""The astronaut's face box in skimage's 512² photo (dlib, threshold -0.5): 88 px."""


def face_patch(box_side: float) -> np.ndarray:
    """The astronaut's face with a margin, scaled so that its detection box is about ``box_side`` px."""
    left, top, right, bottom = FACE_BOX
    crop = data.astronaut()[top - 60:bottom + 60, left - 60:right + 60]
    k = box_side / (right - left)
    return cv2.resize(crop, None, fx=k, fy=k, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)


def paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int) -> tuple[float, float]:
    """Paste ``patch`` with its top-left corner at (x, y); returns the patch's centre."""
    canvas[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
    return x + patch.shape[1] / 2, y + patch.shape[0] / 2


@pytest.fixture(scope="module")
def small_face() -> tuple[np.ndarray, tuple[float, float]]:
    """A 70 px face in a 1024² photo: at detect_max_side 640 it is 44 px, under dlib's 80 px window."""
    canvas = np.full((1024, 1024, 3), 150, np.uint8)
    return canvas, paste(canvas, face_patch(70), 300, 600)


@pytest.fixture(scope="module")
def two_faces() -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """A main face (box ~200 px) on the left of a 1024 x 768 photo and a background face (~110 px) in its centre."""
    canvas = np.full((768, 1024, 3), 140, np.uint8)
    main = paste(canvas, face_patch(200), 20, 200)
    background = paste(canvas, face_patch(110), 512 - 79, 384 - 79)
    return canvas, main, background


_DETECTOR: list[LandmarkDetector] = []


def detector(**config: object) -> LandmarkDetector:
    """One detector (loading dlib's predictor takes seconds) under the given config."""
    if not _DETECTOR:
        _DETECTOR.append(LandmarkDetector())
    _DETECTOR[0].config = DetectorConfig(**config)  # type: ignore[arg-type]
    return _DETECTOR[0]


def _centre(box: tuple[float, float, float, float]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def test_a_small_face_is_found_by_the_retry_within_its_pixel_budget(small_face) -> None:
    canvas, centre = small_face
    assert detector().find(canvas) == NO_FACE  # no retry: the release's miss
    # The retry at 2x (1280², 1.6 MP) is over a 1 MP budget: still not found, and not tried.
    assert detector(retry_max_pixels=1_000_000).find(canvas) == NO_FACE
    (face,) = detector(retry_max_pixels=4_000_000).find(canvas)
    assert np.linalg.norm(_centre(face.box) - centre) < 25 and 50 < face.box[2] - face.box[0] < 100
    # A retry's detections must reach retry_min_score (0 by default; this face scores about 1.1).
    assert face.score > 0.5
    assert detector(retry_max_pixels=4_000_000, retry_min_score=face.score + 0.5).find(canvas) == NO_FACE
    # Landmarks at full resolution, on the face: the eyes above the mouth, inside the box.
    lm = face.landmarks
    assert lm[36:48, 1].mean() < lm[48:68, 1].mean()
    assert (lm[:, 0] > face.box[0] - 10).all() and (lm[:, 0] < face.box[2] + 10).all()


def test_a_photo_without_a_face_stays_without_one_after_the_retry() -> None:
    blank = np.full((300, 400, 3), 90, np.uint8)
    assert detector(retry_max_pixels=4_000_000).find(blank) == NO_FACE


def test_policies_on_a_main_face_and_a_background_face(two_faces) -> None:
    canvas, main, background = two_faces
    found = detector(multiple_faces="all").find(canvas)
    assert not isinstance(found, str) and len(found) == 2
    # all: every face, largest first, each with its landmarks.
    assert np.linalg.norm(_centre(found[0].box) - main) < 30 and np.linalg.norm(_centre(found[1].box) - background) < 30
    assert all(f.faces_found == 2 and f.landmarks.shape == (68, 2) and f.too_small is None for f in found)

    def pick(policy: str, **extra: object) -> np.ndarray:
        faces = detector(multiple_faces=policy, **extra).find(canvas)  # type: ignore[arg-type]
        assert not isinstance(faces, str) and len(faces) == 1, faces
        return _centre(faces[0].box)

    assert np.linalg.norm(pick("largest", min_score=0.5) - main) < 30
    assert np.linalg.norm(pick("central", min_score=0.5) - background) < 30
    best = max(found, key=lambda f: f.score)
    assert np.linalg.norm(pick("highest_score") - _centre(best.box)) < 1e-9
    assert detector(multiple_faces="reject").find(canvas) == f"{SEVERAL_FACES}: 2 found"
    # central prefers a face that is large enough: with min_face_px between the two, the main face.
    assert np.linalg.norm(pick("central", min_face_px=150) - main) < 30
    # Both too small: reported, never a silent pick; with `all` each face says so in its row.
    assert detector(multiple_faces="largest", min_face_px=400).find(canvas).startswith(
        FACE_TOO_SMALL)
    every = detector(multiple_faces="all", min_face_px=150).find(canvas)
    assert [f.too_small is None for f in every] == [True, False] and every[1].too_small.startswith(FACE_TOO_SMALL)


def test_largest_with_a_score_floor_skips_the_astronauts_suit() -> None:
    photo = data.astronaut()
    for quality in (None, 75, 81):  # the suit scores -0.05 in the PNG, up to 0.10 as a JPEG
        img = photo if quality is None else cv2.imdecode(
            cv2.imencode(".jpg", photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)[..., ::-1]
        face = detector(multiple_faces="largest", min_score=0.5).detect(img).face
        assert face is not None and 150 < _centre(face.box)[0] < 300 and _centre(face.box)[1] < 200, quality
    # Without the floor `largest` takes the suit patch (score -0.05, 105 px against 88 px).
    suit = detector(multiple_faces="largest").detect(photo).face
    assert suit is not None and _centre(suit.box)[1] > 300


def test_choose_face_rules() -> None:
    boxes = [(0.0, 0.0, 100.0, 100.0), (450.0, 450.0, 550.0, 550.0), (0.0, 600.0, 300.0, 900.0)]
    scores = [2.0, 0.5, -0.2]
    cfg = DetectorConfig(min_face_px=40)
    assert choose_face(boxes, scores, 1000, 1000, cfg.model_copy(update={"multiple_faces": "largest"})) == 2
    floor = cfg.model_copy(update={"multiple_faces": "largest", "min_score": 0.0})
    assert choose_face(boxes, scores, 1000, 1000, floor) == 0  # equal areas: the earlier box
    assert choose_face(boxes, scores, 1000, 1000, floor.model_copy(update={"multiple_faces": "central"})) == 1
    assert choose_face(boxes, scores, 1000, 1000, cfg) == 0  # highest_score
    # Nobody reaches the floor: the floor is ignored rather than no face chosen.
    assert choose_face(boxes, scores, 1000, 1000, floor.model_copy(update={"min_score": 5.0})) == 2
