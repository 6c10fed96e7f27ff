"""The synthetic "wild" set: renders made to look like photos, with their ground truth, plus bad files.

Each image is one *detailed* face of the morphable model with a random identity α (N(0, 1) truncated
to ±3), expression β (the same draw as the expression set), albedo, head pose (yaw up to ±40°),
camera distance and light, drawn by :func:`facedetail.render.sampling.sample_render`, and its own
random facial details: the capture set's procedural generator
(:func:`facedetail.capture.synthetic.subject_layout`, the wrinkle depths from β by
:func:`~facedetail.capture.synthetic.family_strengths`, :func:`~facedetail.capture.synthetic.expression_details`).
It is rendered by :class:`facedetail.render.detailed.DetailedFaceRenderer`: the proxy subdivided to
``detail_edge_mm`` (on the mean face), displaced by the details along its normal, shaded with the normals
of the displaced surface, mouth cavity closed as :class:`~facedetail.render.faces.FaceRenderer` closes it.
Then, in this order:

1. **clutter**: a few random shapes (rectangles, ellipses, polygons, thick lines, patches of
   colour noise) are drawn on the sampled background, and the face is composited over it, so
   they sit *behind* the face (the render's one-pixel softened silhouette is blended again
   against the new background);
2. **size**: the square render (``render_size``) is resized with area averaging to the image's
   own side, uniform in ``image_size · (1 ± size_jitter)``, so photos of different sizes reach
   the fitter (which rescales to 256 px);
3. **blur** (Gaussian, σ in pixels of the final image), **noise** (Gaussian, σ in 8-bit
   levels) and **JPEG compression** (the image file itself, at a random quality).

Randomness: an image's seed (:func:`facedetail.io.seeds.derive_seed` of the global seed, the
stage and the id) is split by :class:`numpy.random.SeedSequence` into three independent streams,
one for the face (``sample_render``), one for the look (size, clutter, blur, noise, JPEG
quality) and one for the details' layout, so changing how images are degraded or detailed never
changes which faces are drawn.

The details' ground truth is exact: the drawn field itself (:meth:`SyntheticDetails.to_json`, in the
truth table), and beside it, for training and evaluation, the field at the texel centres of the shared UV
chart as a 16-bit PNG (:func:`displacement_truth_png`).

Ground truth is stored in the final image's pixels (x right, y down, pixel centres at integer
coordinates) with the 3x4 matrix ``P`` of :mod:`facedetail.render.camera`: the render's ``P``
left-multiplied by the resize ``A = [[s, 0, (s-1)/2], [0, s, (s-1)/2], [0, 0, 1]]`` with
``s = side / render_size`` (area resizing maps image edges to image edges).

:func:`bad_examples` makes one deliberately bad or odd file of each kind the loader
(:func:`facedetail.proxy.inputs.load_photo`) and the face detector must handle, each with the
outcome expected under the default :class:`~facedetail.proxy.inputs.LoadConfig`.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from facedetail.capture.maps import displacement_to_u16
from facedetail.capture.synthetic import (
    DetailConfig,
    SampledDetails,
    SyntheticDetails,
    detail_parts,
    expression_details,
    family_strengths,
    subject_layout,
)
from facedetail.config import Config
from facedetail.features.landmarks import NO_FACE
from facedetail.io.images import encode_png as render_png
from facedetail.io.seeds import derive_seed
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVRaster, mm_per_uv, rasterize_uv
from facedetail.proxy import inputs
from facedetail.render.camera import Camera
from facedetail.render.detailed import DetailedFaceRenderer
from facedetail.render.faces import RenderedFace, background, composite
from facedetail.render.sampling import (
    CameraSampling,
    IdentitySampling,
    LightSampling,
    PoseSampling,
    RenderSample,
    SamplingConfig,
    sample_render,
)

ID_PREFIX = "wild"
ID_DIGITS = 5
BAD_DIR = "_bad"
"""Sub-folder of the images folder holding the bad examples."""
ClutterKind = Literal["rectangle", "ellipse", "polygon", "line", "patch"]

WILD_SAMPLING = SamplingConfig(
    identity=IdentitySampling(mode="random", bound=3.0),
    pose=PoseSampling(yaw_deg=40.0, pitch_deg=15.0, roll_deg=12.0, translate_px=16.0),
    camera=CameraSampling(projection="perspective", fov_deg=15.0, distance_mm=(1000.0, 1600.0)),
    light=LightSampling(cone_deg=55.0, intensity=(0.4, 0.95), ambient=(0.25, 0.6), color_jitter=0.12),
)
"""Default draw of the wild set: random identity, yaw ±40°, pitch ±15°, roll ±12°, a 15° lens at
1.0–1.6 m (the face spans about half to three quarters of the image height), light from up to 55°
off the camera axis; expression, albedo and background as the expression set draws them. dlib's HOG
detector (the project's, threshold -0.5) finds about 85 % of these faces: the renders have no eyes or
hair, and harsher light (70°, ambient from 0.2) brings it down to 78 %."""


def item_id(index: int) -> str:
    """Id (and file stem) of the ``index``-th synthetic image: ``wild-00000``, ..."""
    return f"{ID_PREFIX}-{index:0{ID_DIGITS}d}"


class ClutterConfig(Config):
    """Random shapes drawn on the background, behind the face."""

    count: tuple[int, int] = (2, 6)
    """Number of shapes per image, uniform in this inclusive range."""
    size: tuple[float, float] = (0.1, 0.5)
    """Size of a shape as a fraction of the image side, uniform in this range."""
    kinds: tuple[ClutterKind, ...] = ("rectangle", "ellipse", "polygon", "line", "patch")
    """Kinds to draw from, uniformly: filled rotated rectangle, ellipse, 3–6-gon, thick line, or an
    axis-aligned patch of smooth colour noise."""

    @model_validator(mode="after")
    def _ranges(self) -> ClutterConfig:
        if not 0 <= self.count[0] <= self.count[1]:
            raise ValueError("count must be an increasing pair of non-negative numbers")
        if not 0 < self.size[0] <= self.size[1]:
            raise ValueError("size must be an increasing pair of positive fractions")
        if not self.kinds:
            raise ValueError("kinds must name at least one kind of shape")
        return self


class DegradationConfig(Config):
    """What the image goes through after rendering, in this order: blur, noise, JPEG compression."""

    blur_sigma: tuple[float, float] = (0.0, 1.2)
    """Gaussian blur σ in pixels of the final image, uniform in this range (0: no blur)."""
    noise_sigma: tuple[float, float] = (0.0, 5.0)
    """Additive Gaussian noise σ in 8-bit levels, per pixel and channel, uniform in this range."""
    jpeg_quality: tuple[int, int] = (45, 95)
    """JPEG quality of the image file, uniform in this inclusive range (PIL, 4:2:0 chroma)."""

    @model_validator(mode="after")
    def _ranges(self) -> DegradationConfig:
        for name in ("blur_sigma", "noise_sigma"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be an increasing pair of non-negative numbers")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError("jpeg_quality must be an increasing pair within 1..100")
        return self


class WildSynthConfig(Config):
    """Everything that determines how one synthetic wild image looks."""

    image_size: int = Field(256, ge=64, le=2048)
    """Typical side of the (square) images in pixels."""
    size_jitter: float = Field(0.25, ge=0, lt=1)
    """Each image's side is uniform in ``image_size · (1 ± size_jitter)``; renders are made at the
    largest side and resized down, so every image is area-averaged like a camera's."""
    sampling: SamplingConfig = WILD_SAMPLING
    """Identity, expression, albedo, pose, camera, light and background draw (``translate_px`` is in
    pixels of the render, at ``render_size``)."""
    clutter: ClutterConfig = ClutterConfig()
    degradation: DegradationConfig = DegradationConfig()
    details: DetailConfig = DetailConfig()
    """The facial details of each photo (the capture set's generator: a new layout per photo, depths from β)."""
    detail_edge_mm: float = Field(1.2, gt=0)
    """Longest edge of the rendered detailed surface (on the mean face). At ~1 mm per render pixel, 1.2 mm is the
    coarsest that still draws a 0.8 mm-σ wrinkle as a continuous line (1.5 mm breaks it up, 2.0 mm loses the
    pores): ~0.2 s per photo here, a plain render of the proxy 0.015 s."""
    truth_scale_mm: float = Field(2.0, gt=0)
    """Scale of the 16-bit truth PNG: ``d = (png / 65535 · 2 - 1) · scale`` (steps of 0.06 µm at 2 mm)."""

    @model_validator(mode="after")
    def _smallest_side(self) -> WildSynthConfig:
        if self.size_range[0] < 64:
            raise ValueError("image_size · (1 - size_jitter) must be at least 64 pixels")
        return self

    @property
    def size_range(self) -> tuple[int, int]:
        """Smallest and largest image side."""
        return (round(self.image_size * (1 - self.size_jitter)), round(self.image_size * (1 + self.size_jitter)))

    @property
    def render_size(self) -> int:
        """Side of the renders: the largest image side."""
        return self.size_range[1]


@dataclass(frozen=True)
class WildImage:
    """One synthetic wild image and its ground truth."""

    id: str
    seed: int
    jpeg: bytes
    """The image file."""
    side: int
    """Width and height in pixels."""
    render_size: int
    sample: RenderSample
    landmarks: np.ndarray
    """(68, 2) iBUG landmarks in image pixels (NaN where the model defines none)."""
    visible: np.ndarray
    """(68,) bool: in the image and not hidden by the face (depth test at render size)."""
    camera: Camera
    """The camera at the image's size (``focal_px`` scaled with it)."""
    rotation: np.ndarray
    translation: np.ndarray
    projection: np.ndarray
    """(3, 4) ``P`` from model millimetres to image pixels."""
    clutter: tuple[str, ...]
    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int
    details: SyntheticDetails
    """The face's details (mm along the proxy normal, a function of UV)."""
    strengths: dict[str, float]
    """Depth of each wrinkle family relative to full, from β."""

    def details_json(self) -> str:
        """The drawn details as deterministic JSON text (:meth:`SyntheticDetails.from_json` reads it back)."""
        return json.dumps({"details": self.details.to_json(), "strengths": self.strengths}, sort_keys=True)

    def truth(self) -> dict[str, Any]:
        """One row of ``truth.parquet`` (``file`` is the name relative to the images folder; the columns of the
        truth PNG, which the stage writes, are left to it)."""
        s = self.sample
        return {
            "id": self.id, "file": f"{self.id}.jpg", "width": self.side, "height": self.side, "seed": self.seed,
            "label": s.label, "alpha": s.alpha.tolist(), "beta": s.beta.tolist(), "albedo": s.albedo.tolist(),
            "yaw_deg": s.yaw, "pitch_deg": s.pitch, "roll_deg": s.roll, "distance_mm": s.distance_mm,
            "camera_model": self.camera.projection, "focal_px": self.camera.focal_px,
            "K": self.camera.intrinsic_matrix().ravel().tolist(), "R": self.rotation.ravel().tolist(),
            "t": self.translation.tolist(), "P": self.projection.ravel().tolist(),
            "landmarks": [None if not np.isfinite(v) else float(v) for v in self.landmarks.ravel()],
            "landmark_visible": self.visible.tolist(),
            "render_size": self.render_size, "clutter": list(self.clutter), "blur_sigma": self.blur_sigma,
            "noise_sigma": self.noise_sigma, "jpeg_quality": self.jpeg_quality,
            "background": s.background_kind, "light_direction": s.light_direction.tolist(),
            "light_intensity": s.light_intensity, "ambient": s.ambient, "sh": s.sh.ravel().tolist(),
            "details": self.details_json(),
        }


_F64 = pa.float64()
TRUTH_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("file", pa.string(), nullable=False),
    pa.field("width", pa.int64()), pa.field("height", pa.int64()), pa.field("seed", pa.int64()),
    pa.field("label", pa.string()),
    pa.field("alpha", pa.list_(_F64)), pa.field("beta", pa.list_(_F64)), pa.field("albedo", pa.list_(_F64)),
    pa.field("yaw_deg", _F64), pa.field("pitch_deg", _F64), pa.field("roll_deg", _F64),
    pa.field("distance_mm", _F64),
    pa.field("camera_model", pa.string()), pa.field("focal_px", _F64),
    pa.field("K", pa.list_(_F64, 9)), pa.field("R", pa.list_(_F64, 9)), pa.field("t", pa.list_(_F64, 3)),
    pa.field("P", pa.list_(_F64, 12)),
    pa.field("landmarks", pa.list_(_F64, 136)), pa.field("landmark_visible", pa.list_(pa.bool_(), 68)),
    pa.field("render_size", pa.int64()), pa.field("clutter", pa.list_(pa.string())),
    pa.field("blur_sigma", _F64), pa.field("noise_sigma", _F64), pa.field("jpeg_quality", pa.int64()),
    pa.field("background", pa.string()), pa.field("light_direction", pa.list_(_F64, 3)),
    pa.field("light_intensity", _F64), pa.field("ambient", _F64), pa.field("sh", pa.list_(_F64, 27)),
    pa.field("details", pa.string()),
    pa.field("displacement_png", pa.string()), pa.field("displacement_scale_mm", _F64),
    pa.field("uv_resolution", pa.int64()), pa.field("displacement_clipped", pa.int64()),
])
"""Columns of ``truth.parquet``, one row per synthetic image (see :meth:`WildImage.truth`). Matrices are
row-major; ``landmarks`` is x0, y0, x1, y1, ... (null where the model defines no landmark). ``details`` is the
JSON of the drawn details (``{"details": SyntheticDetails.to_json(), "strengths": {...}}``: exact at any
resolution); ``displacement_png`` the path (relative to the stage's output folder) of the field at the UV
chart's texel centres (``uv_resolution``²), encoded by :func:`displacement_truth_png` with
``displacement_scale_mm``; ``displacement_clipped`` counts texels beyond ±scale."""


def displacement_truth_png(details: SyntheticDetails, raster: UVRaster,
                           scale_mm: float) -> tuple[np.ndarray, int, dict[str, Any]]:
    """(R, R) uint16 truth map of ``details`` at ``raster``'s texel centres, the texels clipped at ±scale, and the
    amplitude measured on those texels (:meth:`facedetail.capture.synthetic.DetailParts.amplitude`).

    Inside the chart ``png = round((clip(d / s, -1, 1) + 1) / 2 · 65535)`` (the capture maps' encoding,
    :func:`facedetail.capture.maps.displacement_to_u16`), kept >= 1; outside it 0, so that 0 marks "no
    surface" (it would otherwise mean d = -s, which no drawn detail reaches: the sentinel costs one step).
    """
    parts = detail_parts(details, raster)
    png, clipped = displacement_to_u16(np.where(parts.covered, parts.total, 0.0), scale_mm)
    return np.where(parts.covered, np.maximum(png, 1), 0).astype(np.uint16), clipped, parts.amplitude()


def resize_matrix(scale: float) -> np.ndarray:
    """(3, 3) pixel map of an edge-aligned resize by ``scale``: ``u' = (u + 0.5) · scale - 0.5``."""
    offset = (scale - 1.0) / 2.0
    return np.array([[scale, 0.0, offset], [0.0, scale, offset], [0.0, 0.0, 1.0]])


def encode_jpeg(rgb: np.ndarray, quality: int, exif: bytes | None = None) -> bytes:
    """JPEG bytes with fixed encoder settings (baseline, not optimized, 4:2:0), so equal pixels give equal bytes."""
    buf = io.BytesIO()
    extra = {"exif": exif} if exif else {}
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=int(quality), subsampling=2,
                                                     optimize=False, progressive=False, **extra)
    return buf.getvalue()


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image (PIL writes no time chunk unless asked to)."""
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


class WildSynthesizer:
    """Makes synthetic wild images of one model; holds one GL context (close it, or use ``with``)."""

    def __init__(self, model: MorphableModel, config: WildSynthConfig) -> None:
        self.model = model
        self.config = config
        self.size = config.render_size
        self.mm_per_uv = mm_per_uv(model.mean, model.uv, model.triangles)
        self.renderer = DetailedFaceRenderer(model, self.size, config.sampling, config.detail_edge_mm)

    def draw_details(self, sample: RenderSample, rng: np.random.Generator) -> tuple[SyntheticDetails, dict[str, float]]:
        """A face's details: a new layout from ``rng``, each wrinkle family as deep as ``sample``'s β makes it."""
        cfg = self.config.details
        layout = subject_layout(self.model, self.mm_per_uv, cfg, rng)
        strengths = family_strengths(self.model, sample.beta, cfg.neutral_fraction)
        return expression_details(layout, strengths, cfg, self.mm_per_uv), strengths

    def scene(self, sample: RenderSample, rng: np.random.Generator,
              details: SyntheticDetails | None = None) -> tuple[np.ndarray, RenderedFace, list[str]]:
        """(RGB at render size, the render, clutter kinds): the face, with ``details``, over a cluttered background."""
        face = self.renderer.render(sample, None if details is None else SampledDetails(details))
        bg, kinds = self.cluttered_background(sample, rng)
        return composite(face.image, face.mask, bg), face, kinds

    def cluttered_background(self, sample: RenderSample, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """The sample's background at render size with random shapes drawn on it."""
        bg = background(sample, self.size, self.size, self.config.sampling.background).copy()
        return bg, draw_clutter(bg, rng, self.config.clutter)

    def make(self, item: str, seed: int) -> WildImage:
        """The image ``item`` drawn from ``seed`` (see the module docstring for the three streams)."""
        face_seq, look_seq, detail_seq = np.random.SeedSequence(seed).spawn(3)
        sample = sample_render(np.random.default_rng(face_seq), self.config.sampling, self.model)
        details, strengths = self.draw_details(sample, np.random.default_rng(detail_seq))
        look = np.random.default_rng(look_seq)
        lo, hi = self.config.size_range
        side = int(look.integers(lo, hi + 1))
        image, face, kinds = self.scene(sample, look, details)
        if side != self.size:
            image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        jpeg, blur, noise, quality = degrade(image, look, self.config.degradation)
        a = resize_matrix(side / self.size)
        cam = face.camera
        scaled_camera = Camera(side, side, cam.projection, cam.focal_px * side / self.size, cam.near, cam.far)
        landmarks = face.landmarks * (side / self.size) + a[:2, 2]
        return WildImage(item, seed, jpeg, side, self.size, sample, landmarks, face.visible.copy(), scaled_camera,
                         face.rotation, face.translation, a @ face.projection, tuple(kinds), blur, noise, quality,
                         details, strengths)

    def clean_face(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB, face mask) at render size of a near-frontal face over clutter, without degradations.

        The source of the bad examples: frontal enough (yaw ±10°) that every *usable* one has a
        detectable face, so that any failure on them is the conversion's fault.
        """
        face_seq, look_seq, detail_seq = np.random.SeedSequence(seed).spawn(3)
        frontal = self.config.sampling.model_copy(update={"pose": PoseSampling(
            yaw_deg=10.0, pitch_deg=5.0, roll_deg=5.0, translate_px=0.0)})
        sample = sample_render(np.random.default_rng(face_seq), frontal, self.model)
        details, _ = self.draw_details(sample, np.random.default_rng(detail_seq))
        image, face, _ = self.scene(sample, np.random.default_rng(look_seq), details)
        return image, face.mask

    def no_face(self, seed: int) -> np.ndarray:
        """RGB at render size of a cluttered background with no face in it."""
        face_seq, look_seq = np.random.SeedSequence(seed).spawn(2)
        sample = sample_render(np.random.default_rng(face_seq), self.config.sampling, self.model)
        return self.cluttered_background(sample, np.random.default_rng(look_seq))[0]

    def close(self) -> None:
        self.renderer.close()

    def __enter__(self) -> WildSynthesizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


IMAGES_DIR = "images"
TRUTH_DIR = "truth"


class WildSetWriter:
    """Makes and writes the synthetic images of a wild set, one per call, in any process (one per worker).

    Image ``index`` is ``images/<id>.jpg`` with its truth map ``truth/<id>.png``
    (:func:`displacement_truth_png` at the UV chart's ``resolution``) under ``out_dir``, from the seed of
    ``(seed, stage, id)``. Returns the truth row and measured amplitude, and the :class:`WildImage` itself
    only for the first ``keep_images`` (a contact sheet's), so that a parent collecting results holds no pixels.
    """

    def __init__(self, model_path: Path | str, config: WildSynthConfig, seed: int, stage: str, resolution: int,
                 out_dir: Path | str, keep_images: int = 0) -> None:
        self.model = MorphableModel.load(model_path)
        self.config = config
        self.seed = seed
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.keep_images = keep_images
        self.raster = rasterize_uv(self.model.uv, self.model.triangles, resolution)
        self.synth = WildSynthesizer(self.model, config)
        (self.out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (self.out_dir / TRUTH_DIR).mkdir(parents=True, exist_ok=True)

    def __call__(self, index: int) -> dict[str, Any]:
        """Write image ``index``; returns ``item``, ``seed``, ``label``, ``image_file``, ``truth``, ``amplitude``,
        ``image`` (None past ``keep_images``)."""
        item = item_id(index)
        image = self.synth.make(item, derive_seed(self.seed, self.stage, item))
        image_file = f"{IMAGES_DIR}/{item}.jpg"
        (self.out_dir / image_file).write_bytes(image.jpeg)
        scale = self.config.truth_scale_mm
        png, clipped, amplitude = displacement_truth_png(image.details, self.raster, scale)
        png_file = f"{TRUTH_DIR}/{item}.png"
        # zlib level 1: the pore texture fills the low bits, so level 6 saves < 1 % of the bytes at twice the time.
        (self.out_dir / png_file).write_bytes(render_png(png, 1))
        truth = {**image.truth(), "displacement_png": png_file, "displacement_scale_mm": scale,
                 "uv_resolution": self.raster.resolution, "displacement_clipped": clipped}
        return {"item": item, "seed": image.seed, "label": image.sample.label, "image_file": image_file,
                "truth": truth, "amplitude": amplitude, "image": image if index < self.keep_images else None}


def draw_clutter(image: np.ndarray, rng: np.random.Generator, config: ClutterConfig) -> list[str]:
    """Draw random shapes on ``image`` (H, W, 3 uint8, in place); returns their kinds in drawing order."""
    h, w = image.shape[:2]
    side = min(h, w)
    kinds = []
    for _ in range(int(rng.integers(config.count[0], config.count[1] + 1))):
        kind = config.kinds[int(rng.integers(len(config.kinds)))]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        size = rng.uniform(*config.size) * side
        aspect = rng.uniform(0.3, 1.0)
        angle = rng.uniform(0.0, 180.0)
        if kind == "rectangle":
            corners = cv2.boxPoints(((cx, cy), (size, size * aspect), angle))
            cv2.fillPoly(image, [np.round(corners).astype(np.int32)], color, cv2.LINE_AA)
        elif kind == "ellipse":
            axes = (max(1, round(size / 2)), max(1, round(size * aspect / 2)))
            cv2.ellipse(image, (round(cx), round(cy)), axes, angle, 0, 360, color, -1, cv2.LINE_AA)
        elif kind == "polygon":
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = rng.uniform(0.4, 1.0, n) * size / 2
            points = np.column_stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)])
            cv2.fillPoly(image, [np.round(points).astype(np.int32)], color, cv2.LINE_AA)
        elif kind == "line":
            dx, dy = np.cos(np.radians(angle)) * size / 2, np.sin(np.radians(angle)) * size / 2
            thickness = max(1, round(size * aspect * 0.15))
            cv2.line(image, (round(cx - dx), round(cy - dy)), (round(cx + dx), round(cy + dy)), color, thickness,
                     cv2.LINE_AA)
        else:  # patch of smooth colour noise, like foliage or a poster
            cells = rng.uniform(0, 255, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3)).astype(np.float32)
            x0, y0 = max(0, round(cx - size / 2)), max(0, round(cy - size * aspect / 2))
            x1, y1 = min(w, round(cx + size / 2)), min(h, round(cy + size * aspect / 2))
            if x1 > x0 and y1 > y0:
                patch = cv2.resize(cells, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
                image[y0:y1, x0:x1] = np.clip(np.round(patch), 0, 255).astype(np.uint8)
        kinds.append(kind)
    return kinds


def degrade(image: np.ndarray, rng: np.random.Generator, config: DegradationConfig) -> tuple[bytes, float, float, int]:
    """(JPEG bytes, blur σ, noise σ, quality): blur, then noise, then JPEG compression of ``image``."""
    blur = round(float(rng.uniform(*config.blur_sigma)), 3)
    noise = round(float(rng.uniform(*config.noise_sigma)), 3)
    quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    out = image
    if blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur, borderType=cv2.BORDER_REFLECT_101)
    if noise > 0:
        noisy = out.astype(np.float32) + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise)
        out = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return encode_jpeg(out, quality), blur, noise, quality


# --- bad examples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadExample:
    """One deliberately bad or odd file."""

    name: str
    """File name inside the ``_bad`` folder."""
    kind: str
    """What is odd about it."""
    expected: str
    """``quarantine: <reason kind>`` or ``usable: <start of a load note>`` under the default LoadConfig
    (``quarantine: no face detected`` comes from the face detector, not the loader)."""
    data: bytes


LARGE_SIDE = 6000
"""Side of the large JPEG (decoded at 1/4 and downscaled by the loader)."""
HUGE_SIDE = 15000
"""Side of the huge grey PNG: 225 M pixels, above the loader's default max_pixels (200 M)."""
TINY_SIDE = 24


def bad_examples(clean: np.ndarray, mask: np.ndarray, no_face: np.ndarray) -> list[BadExample]:
    """One file of each bad or odd kind, made from a clean render ``clean`` (RGB, with its face ``mask``)
    and a faceless cluttered background ``no_face``."""
    pil = Image.fromarray(clean)
    good_jpeg = encode_jpeg(clean, 90)
    rgba = np.dstack([clean, np.where(mask, 255, 0).astype(np.uint8)])  # transparent around the face
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned left; "rotate 90° clockwise to display"
    q, u = "quarantine", "usable"
    return [
        BadExample("empty.jpg", "zero-byte file", f"{q}: {inputs.EMPTY}", b""),
        BadExample("truncated.jpg", "JPEG cut at 60 % of its bytes", f"{q}: {inputs.TRUNCATED}",
                   good_jpeg[:len(good_jpeg) * 6 // 10]),
        BadExample("not_an_image.png", "text file with an image extension", f"{q}: {inputs.NOT_AN_IMAGE}",
                   b"This is a text file named like a PNG image.\n"),
        BadExample("cmyk.jpg", "CMYK JPEG", f"{u}: {inputs.CMYK_CONVERTED}", _save(pil.convert("CMYK"), "JPEG")),
        BadExample("sixteen_bit.png", "16-bit RGB PNG", f"{u}: {inputs.SIXTEEN_BIT}", _png16(clean)),
        BadExample("palette.png", "palette (P mode) PNG, 64 colours", f"{u}: {inputs.PALETTE_EXPANDED}",
                   encode_png(pil.quantize(64))),
        BadExample("grayscale.png", "grayscale PNG", f"{u}: {inputs.GREY_EXPANDED}", encode_png(pil.convert("L"))),
        BadExample("rgba.png", "RGBA PNG, transparent around the face", f"{u}: {inputs.ALPHA_COMPOSITED}",
                   encode_png(Image.fromarray(rgba, "RGBA"))),
        BadExample("exif_rotated.jpg", "JPEG stored sideways with EXIF orientation 6",
                   f"{u}: EXIF orientation 6 applied",
                   encode_jpeg(np.ascontiguousarray(np.rot90(clean)), 90, exif.tobytes())),
        BadExample(f"large_{LARGE_SIDE}.jpg", f"{LARGE_SIDE}x{LARGE_SIDE} JPEG (a render scaled up)",
                   f"{u}: {inputs.DOWNSCALED} {LARGE_SIDE}x{LARGE_SIDE}",
                   encode_jpeg(cv2.resize(clean, (LARGE_SIDE, LARGE_SIDE), interpolation=cv2.INTER_CUBIC), 85)),
        BadExample(f"huge_{HUGE_SIDE}.png", f"{HUGE_SIDE}x{HUGE_SIDE} grey PNG ({HUGE_SIDE ** 2:,} pixels)",
                   f"{q}: {inputs.TOO_LARGE}", grey_png(HUGE_SIDE, HUGE_SIDE, 128)),
        BadExample("tiny.png", f"{TINY_SIDE}x{TINY_SIDE} image", f"{q}: {inputs.TOO_SMALL}",
                   encode_png(pil.resize((TINY_SIDE, TINY_SIDE), Image.Resampling.BOX))),
        BadExample("no_face.jpg", "cluttered background without a face", f"{q}: {NO_FACE}", encode_jpeg(no_face, 90)),
    ]


def _save(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=90, optimize=False, progressive=False)
    return buf.getvalue()


def _png16(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of 8-bit pixels (v·257: the full 16-bit range). PIL cannot write 16-bit colour; OpenCV can."""
    return render_png(rgb.astype(np.uint16) * 257, 6)


def grey_png(width: int, height: int, value: int) -> bytes:
    """A uniform 8-bit grey PNG of any size, compressed row by row: never more than one row in memory."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * width  # filter byte 0 (none), then the pixels
    idat = b"".join([packer.compress(row) for _ in range(height)] + [packer.flush()])
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

