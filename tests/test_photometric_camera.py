"""The photometric refinement's perspective camera, its two-stage schedule and its default settings."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from test_photometric import render_and_fit

from facedetail.detail.photometric import PhotometricConfig, refine_photometric
from facedetail.proxy.fit import FitConfig

FOV = 15.0


@pytest.fixture(scope="module")
def perspective_renders(sfm_model):
    """Two perspective renders (15° lens at 1.0–1.6 m, as the wild set) of random identities, their true
    landmarks, the landmark fit of each and the true α."""
    return render_and_fit(sfm_model, {"projection": "perspective", "fov_deg": FOV, "distance_mm": [1000.0, 1600.0]},
                          11, "photometric-camera-test")


def _frozen(**update) -> PhotometricConfig:
    """A config whose one step leaves α (and the fixed camera) where the landmark fit put them."""
    return PhotometricConfig(iterations=1, photo_weight=0.0, refine_camera=False, lr_alpha=1e-12,
                             blur_levels=(0.0,), shape_from_level=0, **update)


def _landmark_px(model, fit, landmarks, image_size: int, fov_deg: float | None) -> np.ndarray:
    """Mean landmark error of the fit under a pinhole camera of ``fov_deg`` about the image centre, by hand."""
    verts = np.asarray(model.vertices(fit.alpha, fit.beta), np.float64)
    cam = np.einsum("bij,bnj->bni", fit.cameras.rotation, verts)
    xy = fit.cameras.scale[:, None, None] * cam[..., :2] + fit.cameras.translation[:, None, :]
    if fov_deg is not None:
        focal = image_size / 2.0 / np.tan(np.radians(fov_deg) / 2.0)
        centre = np.array([(image_size - 1) / 2.0, -(image_size - 1) / 2.0])
        xy = centre + (xy - centre) / (1.0 - fit.cameras.scale[:, None, None] / focal * cam[..., 2:3])
    used = fit.landmark_vertices >= 0
    lm = np.take_along_axis(xy, np.maximum(fit.landmark_vertices, 0)[..., None], axis=1)
    err = np.linalg.norm(lm - landmarks * [1.0, -1.0], axis=2)
    return (err * used).sum(1) / used.sum(1)


@pytest.mark.parametrize("fov_deg", [None, 30.0])
def test_camera_projects_as_a_pinhole_about_the_image_centre(sfm_model, perspective_renders, fov_deg) -> None:
    images, landmarks, fit, _ = perspective_renders
    got = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), _frozen(fov_deg=fov_deg))
    np.testing.assert_allclose(got.landmark_px, _landmark_px(sfm_model, fit, landmarks, 256, fov_deg), rtol=1e-6)
    if fov_deg is None:
        assert got.focal_px is None
    else:
        np.testing.assert_allclose(got.focal_px, 128.0 / np.tan(np.radians(15.0)))


def test_alpha_is_held_before_shape_from_level(sfm_model, perspective_renders) -> None:
    images, landmarks, fit, _ = perspective_renders
    # Levels split the steps evenly: 2 steps run levels 0 and 1 (α held), 4 steps run 0, 0, 1, 2 (α free at the last).
    held = PhotometricConfig(iterations=4, blur_levels=(2.0, 1.0, 0.0), shape_from_level=2)
    got = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), held.model_copy(update={"iterations": 2}))
    np.testing.assert_array_equal(got.alpha, fit.alpha)
    # The camera did move meanwhile, and α moves once its level is reached.
    assert not np.array_equal(got.cameras.translation, fit.cameras.translation)
    freed = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), held)
    assert np.abs(freed.alpha - fit.alpha).max() > 1e-3


def test_default_settings_improve_a_perspective_render(sfm_model, perspective_renders) -> None:
    """The defaults (pinhole of a generic 30°, two stages) lower the photometric term and the shape error of
    a 15° render's landmark fit, though the lens is not the one assumed."""
    images, landmarks, fit, alpha_true = perspective_renders
    got = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), PhotometricConfig(threads=1))
    assert np.all(got.photometric_end < 0.8 * got.photometric_start), (got.photometric_start, got.photometric_end)

    def error(alpha: np.ndarray) -> np.ndarray:
        return np.linalg.norm(sfm_model.vertices(alpha) - sfm_model.vertices(alpha_true), axis=2).mean(axis=1)

    assert np.all(error(got.alpha) < error(fit.alpha)), (error(fit.alpha), error(got.alpha))


def test_bad_levels_are_config_errors() -> None:
    with pytest.raises(ValidationError, match="blur_levels"):
        PhotometricConfig(blur_levels=(-1.0,), shape_from_level=0)
    with pytest.raises(ValidationError, match="blur_levels"):
        PhotometricConfig(blur_levels=(), shape_from_level=0)
    with pytest.raises(ValidationError, match="shape_from_level"):
        PhotometricConfig(blur_levels=(0.0, 0.0), shape_from_level=2)
