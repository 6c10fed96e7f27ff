"""The photometric refinement's robust landmark term and its multi-start over the camera."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_photometric import render_and_fit

from facedetail.detail.photometric import PhotometricConfig, _start_rotations, landmark_penalty, refine_photometric
from facedetail.proxy.fit import FitConfig


@pytest.fixture(scope="module")
def perspective_renders(sfm_model):
    """Two perspective renders (15° lens, as the wild set) of random identities, their true landmarks, the
    landmark fit of each and the true α."""
    return render_and_fit(sfm_model, {"projection": "perspective", "fov_deg": 15.0, "distance_mm": [1000.0, 1600.0]},
                          23, "photometric-robust-test")


@pytest.mark.parametrize("loss", ["huber", "cauchy", "tukey"])
def test_robust_penalties_are_least_squares_near_zero_and_bounded_in_slope_beyond(loss) -> None:
    c = 2.0
    u = torch.tensor([0.0, 0.01, 0.5, 1.9, 2.5, 6.0, 40.0], dtype=torch.float64, requires_grad=True)
    rho = landmark_penalty(u * u, loss, c)
    (slope,) = torch.autograd.grad(rho.sum(), u)
    # Near 0 every one is u² (value and slope 2u).
    np.testing.assert_allclose(rho[:2].detach(), (u[:2] ** 2).detach(), atol=1e-5)
    np.testing.assert_allclose(slope[:2], 2 * u[:2].detach(), atol=1e-4)
    far = slope[5:].detach().numpy()  # u = 6, 40: well beyond c
    if loss == "huber":
        np.testing.assert_allclose(far, 2 * c)  # linear: constant slope 2c
        np.testing.assert_allclose(rho[5].item(), 2 * c * 6.0 - c * c)
    elif loss == "cauchy":
        np.testing.assert_allclose(far, 2 * c * c * u[5:].detach().numpy() / (c * c + u[5:].detach().numpy() ** 2))
        assert far[1] < far[0] < 2 * c  # redescending slope
    else:
        np.testing.assert_array_equal(far, 0.0)  # Tukey: constant beyond c
        np.testing.assert_allclose(rho[5:].detach(), c * c / 3)
    assert torch.all(rho[1:] > 0) and torch.all(torch.diff(rho) >= 0)
    with pytest.raises(ValueError, match="unknown"):
        landmark_penalty(u * u, "l1", c)


def test_robust_landmark_term_is_the_energy_computed_by_hand(sfm_model, perspective_renders) -> None:
    """With the photo off and nothing moving, the final energy is Σ rho(|e|² k² / σ²) + λ|α|², by hand."""
    images, landmarks, fit, _ = perspective_renders
    cfg = PhotometricConfig(iterations=1, photo_weight=0.0, refine_camera=False, lr_alpha=1e-12, fov_deg=None,
                            blur_levels=(0.0,), shape_from_level=0, landmark_loss="cauchy", landmark_robust_scale=0.5)
    got = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), cfg)
    verts = np.asarray(sfm_model.vertices(fit.alpha, fit.beta), np.float64)
    used = fit.landmark_vertices >= 0
    lm = np.take_along_axis(fit.cameras.project(verts), np.maximum(fit.landmark_vertices, 0)[..., None], axis=1)
    u2 = (np.linalg.norm(lm - landmarks * [1.0, -1.0], axis=2) * fit.face_frame_scale[:, None]) ** 2 / 64.0
    c2 = 0.25
    expected = (c2 * np.log1p(u2 / c2) * used).sum(1) + 3.0 * (fit.alpha ** 2).sum(1)
    np.testing.assert_allclose(got.final_energy, expected, rtol=1e-6)
    # At c = 0.5 σ this is well below the least-squares term of the same errors: the outliers are discounted.
    assert np.all(expected < (u2 * used).sum(1) + 3.0 * (fit.alpha ** 2).sum(1))


def test_multi_start_recovers_a_grossly_rotated_camera_by_energy(sfm_model, perspective_renders) -> None:
    """A fit whose camera is 30° off in yaw (a detector's gross failure) refined from one start stays worse
    than the multi-start, which keeps, by the lowest final energy alone, the start that undoes the offset."""
    images, landmarks, fit, _ = perspective_renders
    broken = _start_rotations(fit, sfm_model, [(30.0, 0.0)])
    cfg = PhotometricConfig(iterations=10, visibility_every=5, threads=1)
    single = refine_photometric(sfm_model, images, landmarks, broken, FitConfig(), cfg)
    starts = ((0.0, 0.0), (-30.0, 0.0), (0.0, 20.0))
    multi = refine_photometric(sfm_model, images, landmarks, broken, FitConfig(),
                               cfg.model_copy(update={"camera_starts_deg": starts}))
    np.testing.assert_array_equal(multi.chosen_start, [1, 1])
    assert np.all(multi.final_energy < single.final_energy), (single.final_energy, multi.final_energy)
    assert np.all(multi.landmark_px < single.landmark_px)
    # The kept start is the (-30°) start refined on its own, row for row.
    alone = refine_photometric(sfm_model, images, landmarks, broken, FitConfig(),
                               cfg.model_copy(update={"camera_starts_deg": ((-30.0, 0.0),)}))
    np.testing.assert_allclose(multi.alpha, alone.alpha, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(multi.final_energy, alone.final_energy, rtol=1e-9)


def test_a_start_rotation_keeps_the_landmark_centroid_in_place(sfm_model, perspective_renders) -> None:
    _, _, fit, _ = perspective_renders
    turned = _start_rotations(fit, sfm_model, [(0.0, 0.0), (25.0, -15.0)])
    assert turned.alpha.shape[0] == 4 and turned.status == fit.status * 2
    np.testing.assert_array_equal(turned.cameras.rotation[:2], fit.cameras.rotation)
    verts = np.asarray(sfm_model.vertices(fit.alpha, fit.beta), np.float64)
    lm = np.take_along_axis(verts, np.maximum(fit.landmark_vertices, 0)[..., None], axis=1)
    used = (fit.landmark_vertices >= 0)[..., None]
    centroid = ((lm * used).sum(1) / used.sum(1))[:, None, :]
    before = fit.cameras.project(centroid)
    after = turned.cameras.project(np.concatenate([centroid, centroid]))[2:]
    np.testing.assert_allclose(after, before, atol=1e-9)
    relative = turned.cameras.rotation[2:] @ fit.cameras.rotation.transpose(0, 2, 1)
    angle = np.degrees(np.arccos((np.trace(relative, axis1=1, axis2=2) - 1) / 2))
    np.testing.assert_allclose(angle, 29.0, atol=1.0)  # Rx(-15°) Ry(25°): a 29° turn


def test_no_camera_start_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="camera_starts_deg"):
        PhotometricConfig(camera_starts_deg=())
