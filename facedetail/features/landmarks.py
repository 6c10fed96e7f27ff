"""Face detection and the 68 iBUG landmarks: dlib's HOG detector and 68-point shape predictor.

The same :class:`LandmarkDetector` (same config) runs on the synthetic renders and on photos,
so both sides of the dictionary lookup see faces through one detector. The predictor file
comes from the installed ``face-recognition-models`` package and is read where pip put it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import dlib
import numpy as np
from pydantic import Field

from facedetail.assets import package_data_file
from facedetail.config import Config
from facedetail.errors import FacedetailError

N_POINTS = 68
PREDICTOR_PACKAGE = "face_recognition_models"
PREDICTOR_FILE = "models/shape_predictor_68_face_landmarks.dat"
_PREDICTOR_REMEDY = "Install it with `pip install face-recognition-models` (make setup does)"

NO_FACE = "no face detected"
FACE_TOO_SMALL = "face too small"
SEVERAL_FACES = "several faces"


class DetectorConfig(Config):
    """How faces are found; stored with every dataset built from it so queries match."""

    detect_max_side: int = Field(640, ge=64)
    """Detection runs on a copy downscaled so that its longer side is at most this (HOG cost grows
    with the pixel count); landmarks are then predicted on the full-resolution image."""
    upsample: int = Field(0, ge=0, le=2)
    """dlib's upsampling passes before detection (each finds faces half as large, at 4x the cost)."""
    adjust_threshold: float = -0.5
    """Added to the HOG detector's threshold. The renders have no eyeballs or hair, which lowers
    the detector's score: at 0 it misses 20 % of them, at -0.5 about 3 %."""
    multiple_faces: Literal["highest_score", "largest", "reject"] = "highest_score"
    """Which face to keep when several are found (``reject``: report the image instead). With the lowered
    threshold, ``largest`` can pick a false detection: on ``skimage.data.astronaut()`` a 104 px patch of
    the suit (score -0.05) beats the 87 px face (score 1.53)."""
    min_face_px: float = Field(40.0, ge=0)
    """Faces whose box side (in original pixels) is smaller than this are reported, not used."""


@dataclass(frozen=True)
class FaceLandmarks:
    """One detected face."""

    box: tuple[float, float, float, float]
    """(left, top, right, bottom) in pixels of the input image."""
    score: float
    """HOG detection score (higher is more confident)."""
    landmarks: np.ndarray
    """(68, 2) float64 iBUG landmarks (x, y) in pixels."""
    faces_found: int
    """How many faces the detector found in the image (the policy picked this one)."""


@dataclass(frozen=True)
class Detection:
    """The outcome for one image: a face, or the reason there is none."""

    face: FaceLandmarks | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.face is not None


def predictor_path() -> Path:
    """The 68-point predictor shipped in ``face-recognition-models``."""
    return package_data_file(PREDICTOR_PACKAGE, PREDICTOR_FILE, _PREDICTOR_REMEDY)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """A contiguous (H, W, 3) uint8 RGB copy of a grey, RGB or RGBA uint8 image."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise FacedetailError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.ndim != 3 or img.shape[2] != 3:
        raise FacedetailError(f"expected a grey, RGB or RGBA image, got shape {img.shape}")
    return np.ascontiguousarray(img)


class LandmarkDetector:
    """dlib HOG detection on a downscaled copy, then 68 landmarks at full resolution."""

    def __init__(self, config: DetectorConfig | None = None, predictor: Path | None = None) -> None:
        self.config = config or DetectorConfig()
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor or predictor_path()))

    def detect(self, image: np.ndarray) -> Detection:
        """Find the face chosen by the config's policy and its landmarks."""
        rgb = as_rgb_uint8(image)
        boxes, scores = self._boxes(rgb)
        if not boxes:
            return Detection(None, NO_FACE)
        cfg = self.config
        if len(boxes) > 1 and cfg.multiple_faces == "reject":
            return Detection(None, f"{SEVERAL_FACES}: {len(boxes)} found")
        if cfg.multiple_faces == "highest_score":
            pick = int(np.argmax(scores))
        else:
            pick = int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]))
        box = boxes[pick]
        side = min(box[2] - box[0], box[3] - box[1])
        if side < cfg.min_face_px:
            return Detection(None, f"{FACE_TOO_SMALL}: {side:.0f} px < min_face_px {cfg.min_face_px:g}")
        return Detection(FaceLandmarks(box, float(scores[pick]), self._landmarks(rgb, box), len(boxes)))

    def detect_all(self, image: np.ndarray) -> list[FaceLandmarks]:
        """Every detected face at least ``min_face_px`` wide, with landmarks, largest first (for ``--all-faces``)."""
        rgb = as_rgb_uint8(image)
        boxes, scores = self._boxes(rgb)
        faces = [FaceLandmarks(box, score, self._landmarks(rgb, box), len(boxes)) for box, score in zip(boxes, scores,
                                                                                                   strict=True)
                 if min(box[2] - box[0], box[3] - box[1]) >= self.config.min_face_px]
        return sorted(faces, key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))

    def landmarks_in_box(self, image: np.ndarray, box: tuple[float, float, float, float]) -> FaceLandmarks:
        """Landmarks for a face box given by the caller (no detection)."""
        return FaceLandmarks(tuple(float(v) for v in box), float("nan"), self._landmarks(as_rgb_uint8(image), box), 1)

    def _boxes(self, rgb: np.ndarray) -> tuple[list[tuple[float, float, float, float]], list[float]]:
        h, w = rgb.shape[:2]
        scale = min(1.0, self.config.detect_max_side / max(h, w))
        small = rgb if scale == 1.0 else cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                    interpolation=cv2.INTER_AREA)
        rects, scores, _ = self._detector.run(small, self.config.upsample, self.config.adjust_threshold)
        boxes = [(r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale) for r in rects]
        return boxes, [float(s) for s in scores]

    def _landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        rect = dlib.rectangle(round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1)
        shape = self._predictor(rgb, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], np.float64)
