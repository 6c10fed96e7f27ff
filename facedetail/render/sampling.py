"""Random render parameters: identity, expression, albedo, head pose, camera, lighting, background.

Every draw comes from the generator handed in (one per item, see
:func:`facedetail.io.seeds.item_rng`) in a fixed order, so an item's parameters depend only
on its seed and the config. Continuous values are rounded to 6 decimals right after they are
drawn; the rounded values are the ones rendered and recorded, so a record reproduces its
image exactly.

Truncated normals are drawn by rejection (redraw what falls outside the bounds) rather than
with ``scipy.stats.truncnorm``: rejection is exact, costs ~0.3 % redraws at ±3σ, and its
output depends only on NumPy's normal generator, whose stream is stable across versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from facedetail.config import Config
from facedetail.io.seeds import truncated_normal
from facedetail.model.morphable import MorphableModel
from facedetail.render.sh import directional_sh

NEUTRAL = "neutral"
UNLABELLED = "unlabelled"
_DECIMALS = 6


class IdentitySampling(Config):
    """How the identity (shape) coefficients α are chosen."""

    mode: Literal["mean", "random"] = "mean"
    """``mean``: α = 0, the paper's choice (expression is what the set is for); ``random``:
    α drawn from a standard normal truncated to ±``bound`` (in standard deviations)."""
    bound: float = Field(3.0, gt=0)
    """Truncation of the random identity, in standard deviations."""


class ExpressionSampling(Config):
    """How the expression coefficients β are drawn.

    ``truncnorm`` is the paper's: every β_k from N(0, 1) truncated to [-bound, bound], in
    units of each component's standard deviation; it fits PCA expression models.
    ``dominant`` is for blendshape models such as the Surrey model's six emotions, where β_k
    is the weight of a captured expression (1 = as captured): one emotion is picked
    uniformly (or none, with probability ``neutral_fraction``), gets a weight from
    U(``dominant_weight``), and every other weight is a small half-normal. Weights are never
    negative: a negative weight moves the face *against* a captured expression (an
    "anti-smile"), which no facial muscle produces and which has no emotion label, so it
    would put non-faces into the dictionary.
    """

    distribution: Literal["auto", "truncnorm", "dominant"] = "auto"
    """``auto``: ``dominant`` for blendshape models, ``truncnorm`` for PCA models."""
    bound: float = Field(3.0, gt=0)
    """``truncnorm``: truncation in standard deviations (the paper: 3)."""
    neutral_fraction: float = Field(1.0 / 7.0, ge=0, le=1)
    """``dominant``: share of faces with no dominant emotion (1/7: neutral is one of 7 classes)."""
    dominant_weight: tuple[float, float] = (0.35, 1.0)
    """``dominant``: range of the picked emotion's weight."""
    secondary_sigma: float = Field(0.1, ge=0)
    """``dominant``: standard deviation of the half-normal weights of the other emotions."""
    secondary_max: float = Field(0.25, ge=0)
    """``dominant``: truncation of those secondary weights."""
    neutral_below: float = Field(0.3, ge=0)
    """Label rule: a face is ``neutral`` when its largest blendshape weight is below this."""

    @model_validator(mode="after")
    def _labels_follow_the_draw(self) -> ExpressionSampling:
        lo, hi = self.dominant_weight
        if not 0 <= lo <= hi:
            raise ValueError("dominant_weight must be an increasing pair of non-negative weights")
        if not self.secondary_max < self.neutral_below <= lo:
            raise ValueError("need secondary_max < neutral_below <= dominant_weight[0], so that the "
                             "label of a face is the emotion that was drawn for it")
        return self


class PoseSampling(Config):
    """Head pose: uniform angles in ±range (degrees, right-handed about the model's axes)."""

    yaw_deg: float = Field(15.0, ge=0, le=90)
    """Rotation about the vertical axis; positive turns the face towards the image's right."""
    pitch_deg: float = Field(10.0, ge=0, le=90)
    """Rotation about the horizontal axis; positive tilts the face down."""
    roll_deg: float = Field(8.0, ge=0, le=90)
    """Rotation about the viewing axis."""
    translate_px: float = Field(8.0, ge=0)
    """Shift of the face centre from the image centre, uniform in ±this many pixels per axis."""


class CameraSampling(Config):
    """Camera: projection and distance (the distance sets how large the face is in the image)."""

    projection: Literal["perspective", "orthographic"] = "perspective"
    """``orthographic`` uses the scale a perspective camera has at the sampled distance."""
    fov_deg: float = Field(12.0, gt=0, lt=120)
    """Vertical field of view."""
    distance_mm: tuple[float, float] = (1100.0, 1500.0)
    """Uniform range of the distance from the camera to the face centre."""

    @model_validator(mode="after")
    def _ordered(self) -> CameraSampling:
        if not 0 < self.distance_mm[0] <= self.distance_mm[1]:
            raise ValueError("distance_mm must be an increasing pair of positive distances")
        return self


class LightSampling(Config):
    """Lighting: one directional light plus ambient, stored as order-2 spherical harmonics."""

    cone_deg: float = Field(50.0, ge=0, le=90)
    """The light comes from within this angle of the camera's direction (uniform on the cap)."""
    intensity: tuple[float, float] = (0.45, 0.9)
    """Uniform range of the directional light's intensity (1 = white albedo fully lit)."""
    ambient: tuple[float, float] = (0.3, 0.6)
    """Uniform range of the ambient term."""
    color_jitter: float = Field(0.08, ge=0, lt=1)
    """Each RGB channel of the light is scaled by 1 + U(±this)."""


class BackgroundSampling(Config):
    """Background behind the face."""

    kinds: tuple[Literal["solid", "gradient", "noise"], ...] = ("solid", "gradient", "noise")
    """Kinds to draw from, uniformly: a flat colour, a linear gradient, or smooth colour noise."""
    noise_cells: int = Field(6, ge=2, le=64)
    """``noise``: the random colour grid is this many cells across before smooth upsampling."""

    @model_validator(mode="after")
    def _some(self) -> BackgroundSampling:
        if not self.kinds:
            raise ValueError("kinds must name at least one background kind")
        return self


class SamplingConfig(Config):
    """Everything that is drawn per image."""

    identity: IdentitySampling = IdentitySampling()
    expression: ExpressionSampling = ExpressionSampling()
    albedo_bound: float = Field(2.0, ge=0)
    """Albedo coefficients are N(0, 1) truncated to ±this (0 = the mean albedo)."""
    pose: PoseSampling = PoseSampling()
    camera: CameraSampling = CameraSampling()
    light: LightSampling = LightSampling()
    background: BackgroundSampling = BackgroundSampling()


@dataclass(frozen=True)
class RenderSample:
    """The parameters of one image."""

    alpha: np.ndarray
    """(K,) identity coefficients, in standard deviations."""
    beta: np.ndarray
    """(Ke,) expression coefficients (PCA: standard deviations; blendshapes: weights)."""
    albedo: np.ndarray
    """(Ka,) albedo coefficients, in standard deviations."""
    yaw: float
    pitch: float
    roll: float
    """Head rotation in degrees."""
    translate_px: np.ndarray
    """(2,) shift of the face centre in pixels (x right, y down)."""
    distance_mm: float
    """Camera to face-centre distance."""
    light_direction: np.ndarray
    """(3,) unit vector towards the light, in camera coordinates (x right, y down, z forward)."""
    light_intensity: float
    ambient: float
    light_color: np.ndarray
    """(3,) RGB scale of the light."""
    sh: np.ndarray
    """(9, 3) spherical-harmonics shading coefficients equal to the light above."""
    background_kind: str
    background_colors: np.ndarray
    """(2, 3) RGB in [0, 1]: the solid colour (first), gradient ends, or noise tint."""
    background_angle_deg: float
    """Direction of a gradient."""
    background_seed: int
    """Seed of the noise background's colour grid."""
    label: str
    """Dominant emotion, ``neutral``, or ``unlabelled`` for models without named emotions."""

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict of every parameter."""
        return {
            "alpha": self.alpha.tolist(), "beta": self.beta.tolist(), "albedo": self.albedo.tolist(),
            "yaw": self.yaw, "pitch": self.pitch, "roll": self.roll,
            "translate_px": self.translate_px.tolist(), "distance_mm": self.distance_mm,
            "light_direction": self.light_direction.tolist(), "light_intensity": self.light_intensity,
            "ambient": self.ambient, "light_color": self.light_color.tolist(), "sh": self.sh.tolist(),
            "background_kind": self.background_kind, "background_colors": self.background_colors.tolist(),
            "background_angle_deg": self.background_angle_deg, "background_seed": self.background_seed,
            "label": self.label,
        }


def expression_distribution(config: ExpressionSampling, model: MorphableModel) -> str:
    """The distribution actually used for ``model`` (resolves ``auto``)."""
    if config.distribution != "auto":
        return config.distribution
    return "dominant" if model.expression_kind == "blendshapes" else "truncnorm"


def sample_expression(rng: np.random.Generator, config: ExpressionSampling, model: MorphableModel) -> np.ndarray:
    """(Ke,) expression coefficients for ``model``."""
    n = model.n_expression
    if expression_distribution(config, model) == "truncnorm":
        return truncated_normal(rng, n, config.bound)
    beta = np.abs(truncated_normal(rng, n, config.secondary_max, config.secondary_sigma))
    neutral = rng.random() < config.neutral_fraction
    picked = int(rng.integers(n)) if n else 0
    weight = rng.uniform(*config.dominant_weight)
    if n and not neutral:
        beta[picked] = weight
    return beta


def dominant_emotion(beta: np.ndarray, model: MorphableModel, neutral_below: float) -> str:
    """Label of an expression: the largest blendshape weight's name, ``neutral`` below the threshold.

    PCA expression components have no meaning of their own, so such faces are ``unlabelled``.
    """
    if model.expression_kind != "blendshapes" or model.n_expression == 0:
        return UNLABELLED
    k = int(np.argmax(beta))
    return NEUTRAL if beta[k] < neutral_below else model.expression_names[k]


def label_names(model: MorphableModel) -> tuple[str, ...]:
    """Every label a face of ``model`` can get, in a fixed order."""
    if model.expression_kind != "blendshapes" or model.n_expression == 0:
        return (UNLABELLED,)
    return (NEUTRAL, *model.expression_names)


def sample_render(rng: np.random.Generator, config: SamplingConfig, model: MorphableModel) -> RenderSample:
    """Draw every parameter of one image, in a fixed order."""
    r = _rounded
    if config.identity.mode == "random":
        alpha = truncated_normal(rng, model.n_shape, config.identity.bound)
    else:
        alpha = np.zeros(model.n_shape)
    beta = r(sample_expression(rng, config.expression, model))
    albedo = r(truncated_normal(rng, model.n_albedo, config.albedo_bound))
    pose = config.pose
    yaw, pitch, roll = (float(r(rng.uniform(-a, a))) for a in (pose.yaw_deg, pose.pitch_deg, pose.roll_deg))
    translate = r(rng.uniform(-pose.translate_px, pose.translate_px, 2))
    distance = float(r(rng.uniform(*config.camera.distance_mm)))

    light = config.light
    cos_theta = rng.uniform(np.cos(np.radians(light.cone_deg)), 1.0)
    phi = rng.uniform(0.0, 2 * np.pi)
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    direction = r(np.array([sin_theta * np.cos(phi), sin_theta * np.sin(phi), -cos_theta]))
    intensity = float(r(rng.uniform(*light.intensity)))
    ambient = float(r(rng.uniform(*light.ambient)))
    color = r(1.0 + rng.uniform(-light.color_jitter, light.color_jitter, 3))

    bg = config.background
    kind = bg.kinds[int(rng.integers(len(bg.kinds)))]
    bg_colors = r(rng.uniform(0.0, 1.0, (2, 3)))
    bg_angle = float(r(rng.uniform(0.0, 360.0)))
    bg_seed = int(rng.integers(2**31))
    return RenderSample(
        alpha=r(alpha), beta=beta, albedo=albedo, yaw=yaw, pitch=pitch, roll=roll, translate_px=translate,
        distance_mm=distance, light_direction=direction, light_intensity=intensity, ambient=ambient,
        light_color=color, sh=directional_sh(direction, intensity, ambient, color),
        background_kind=kind, background_colors=bg_colors, background_angle_deg=bg_angle,
        background_seed=bg_seed, label=dominant_emotion(beta, model, config.expression.neutral_below),
    )


def _rounded(x: Any) -> np.ndarray:
    return np.round(np.asarray(x, np.float64), _DECIMALS)
