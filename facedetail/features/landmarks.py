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
    multiple_faces: Literal["highest_score", "largest", "central", "all", "reject"] = "highest_score"
    """Which face to keep when several are found: ``largest`` (box area), ``highest_score``, ``central``
    (box centre nearest the image centre), ``all`` (every face; :meth:`LandmarkDetector.find` returns them
    largest first) or ``reject`` (report the image instead). ``largest`` and ``central`` only consider
    faces scoring at least ``min_score`` when any does: with the lowered threshold a 104 px patch of
    the astronaut's suit (score -0.05) is larger than her 87 px face (score 1.53). They choose a face
    smaller than ``min_face_px`` (then reported as too small) only when no face is large enough."""
    min_score: float | None = None
    """Score floor of ``largest`` and ``central`` (see multiple_faces; None = none, ``wild_proxy`` uses 0);
    a lone face is kept at any score the detector's threshold let through."""
    min_face_px: float = Field(40.0, ge=0)
    """Faces whose box side (in original pixels) is smaller than this are reported, not used."""
    retry_max_pixels: int = Field(0, ge=0)
    """When no face is found, detect again on copies twice as large each time (up to and beyond the
    full resolution), as long as the copy has at most this many pixels (0 = no retry). A pixel budget,
    not a clock, so that the outcome is the same on every machine; HOG costs about the same time per
    pixel (see the README for the measured ms per megapixel). The retries also stop once a copy could
    only add faces under ``min_face_px`` (at 80 / ``min_face_px`` times the photo's size)."""
    retry_min_score: float = 0.0
    """A retry's detections count only at this score or above: an enlarged copy brings out false and
    partial detections (on the default profile's renders, which dlib misses for their missing eyes and
    not their size, the retry found 11 "faces" at scores -0.50 to -0.23, with landmark NME 0.06 to
    0.49 against the truth; the 70 px astronaut face it is meant for scores 1.1)."""


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
    too_small: str | None = None
    """With ``multiple_faces: all``: why this face is too small to use (None: usable)."""


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


_HOG_WINDOW_PX = 80
"""dlib's frontal face detector's window: the smallest face (px) it finds in the image it is given."""

WILD_PHOTO_DETECTOR = DetectorConfig(multiple_faces="largest", min_score=0.5, retry_max_pixels=4_000_000)
"""How a face is found in a photo of the wild (``wild_proxy``'s defaults, and ``facedetail prior``'s): the
largest face scoring at least 0.5 (the astronaut's suit patch scores -0.05 in the PNG and 0.07-0.10 as a
JPEG of quality 75-81, her face 1.5-1.6), and a retry up to 4 MP (a 1024² photo is tried again at 1280²,
a 320² one at 640²; never past a face of
min_face_px) when none is found."""


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
        """Find the face chosen by the config's policy and its landmarks (``all``: the largest)."""
        found = self.find(image)
        if isinstance(found, str):
            return Detection(None, found)
        return Detection(found[0])

    def find(self, image: np.ndarray) -> list[FaceLandmarks] | str:
        """The face(s) the config's policy chooses, with landmarks, or the reason there is none.

        One face, except with ``multiple_faces: all``: every face, largest first, each with its own
        ``too_small`` verdict (a face under ``min_face_px`` is listed, never dropped silently).
        """
        rgb = as_rgb_uint8(image)
        boxes, scores = self._boxes(rgb)
        if not boxes:
            return NO_FACE
        cfg = self.config
        if len(boxes) > 1 and cfg.multiple_faces == "reject":
            return f"{SEVERAL_FACES}: {len(boxes)} found"
        sides = [min(b[2] - b[0], b[3] - b[1]) for b in boxes]
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        if cfg.multiple_faces == "all":
            order = sorted(range(len(boxes)), key=lambda i: (-areas[i], i))
            return [FaceLandmarks(boxes[i], scores[i], self._landmarks(rgb, boxes[i]), len(boxes),
                                  too_small=self._too_small(sides[i])) for i in order]
        pick = choose_face(boxes, scores, rgb.shape[1], rgb.shape[0], cfg)
        reason = self._too_small(sides[pick])
        if reason:
            return reason
        return [FaceLandmarks(boxes[pick], scores[pick], self._landmarks(rgb, boxes[pick]), len(boxes))]

    def _too_small(self, side: float) -> str | None:
        if side < self.config.min_face_px:
            return f"{FACE_TOO_SMALL}: {side:.0f} px < min_face_px {self.config.min_face_px:g}"
        return None

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
        cfg = self.config
        h, w = rgb.shape[:2]
        scale = min(1.0, cfg.detect_max_side / max(h, w))
        boxes, scores = self._boxes_at(rgb, scale, cfg.upsample)
        # Nothing found: a face may be under dlib's 80 px window at this size. Try copies twice as
        # large each time (the configured upsampling included) within the pixel budget, and only while
        # the copy can show a face of at least min_face_px for the first time: at scale e the window
        # finds faces from 80/e px, so once e >= 80/min_face_px a larger copy adds only faces that would
        # be refused as too small (measured: 180 ms per faceless render for nothing, against 30 ms).
        effective = scale * 2 ** cfg.upsample
        while (not boxes and effective < _HOG_WINDOW_PX / max(cfg.min_face_px, 1.0)
               and w * h * (2 * effective) ** 2 <= cfg.retry_max_pixels):
            effective *= 2
            found = [(b, s) for b, s in zip(*self._boxes_at(rgb, effective, 0), strict=True)
                     if s >= cfg.retry_min_score]
            boxes, scores = [b for b, _ in found], [s for _, s in found]
        return boxes, scores

    def _boxes_at(self, rgb: np.ndarray, scale: float,
                  upsample: int) -> tuple[list[tuple[float, float, float, float]], list[float]]:
        """Boxes (input pixels) and scores of a detection on ``rgb`` resized by ``scale``."""
        h, w = rgb.shape[:2]
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        small = rgb if scale == 1.0 else cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                    interpolation=interpolation)
        rects, scores, _ = self._detector.run(small, upsample, self.config.adjust_threshold)
        boxes = [(r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale) for r in rects]
        return boxes, [float(s) for s in scores]

    def _landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        rect = dlib.rectangle(round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1)
        shape = self._predictor(rgb, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], np.float64)


def choose_face(boxes: list[tuple[float, float, float, float]], scores: list[float], width: int, height: int,
                config: DetectorConfig) -> int:
    """Index of the face ``config.multiple_faces`` chooses among ``boxes`` (not ``all`` / ``reject``).

    ``highest_score``: the best score, whatever its size (as it always was: the renders' framing relies on
    it). ``largest`` and ``central``: faces of at least ``min_face_px`` first when any is, and among those
    only faces scoring at least ``min_score`` when any does. Ties go to the earlier box.
    """
    idx = list(range(len(boxes)))
    if config.multiple_faces == "highest_score":
        return max(idx, key=lambda i: (scores[i], -i))
    big = [i for i in idx if min(boxes[i][2] - boxes[i][0], boxes[i][3] - boxes[i][1]) >= config.min_face_px]
    idx = big or idx
    if config.min_score is not None:
        idx = [i for i in idx if scores[i] >= config.min_score] or idx
    areas = {i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]) for i in idx}
    if config.multiple_faces == "central":
        def off_centre(i: int) -> float:
            b = boxes[i]
            return float(np.hypot((b[0] + b[2]) / 2 - width / 2, (b[1] + b[3]) / 2 - height / 2))
        return min(idx, key=lambda i: (off_centre(i), -areas[i], i))
    return max(idx, key=lambda i: (areas[i], -i))
