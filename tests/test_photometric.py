"""Photometric refinement of landmark fits, on renders of the Surrey model whose identity is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facedetail.detail.photometric import PhotometricConfig, refine_photometric, vertex_visibility
from facedetail.errors import FacedetailError
from facedetail.io.seeds import item_rng
from facedetail.proxy.fit import FitConfig, ProxyFitter
from facedetail.render.faces import FaceRenderer
from facedetail.render.sampling import SamplingConfig, sample_render

# Few steps keep the test in seconds; the bench runs the default. The renders here are orthographic and their
# landmarks exact, so the energy is the landmark fit's own (its camera model, σ² and λ) in one stage.
QUICK = PhotometricConfig(iterations=30, visibility_every=10, fov_deg=None, shape_lambda=None, landmark_sigma2=None,
                          blur_levels=(0.0,), shape_from_level=0, lr_pose=0.002, landmark_loss="gaussian")


def render_and_fit(model, camera: dict, seed: int, name: str):
    """Two renders of random identities with ``camera`` (SamplingConfig's), their true landmarks, the landmark
    fit of each (given the true β) and the true α."""
    config = SamplingConfig.model_validate({"camera": camera, "identity": {"mode": "random", "bound": 2.0}})
    images, landmarks, samples = [], [], []
    with FaceRenderer(model, 256, config) as renderer:
        for i in range(2):
            sample = sample_render(item_rng(seed, name, str(i)), config, model)
            face = renderer.render(sample)
            images.append(face.image)
            landmarks.append(face.landmarks)
            samples.append(sample)
    landmarks_arr = np.stack(landmarks)
    fit = ProxyFitter(model, FitConfig()).fit(landmarks_arr, np.stack([s.beta for s in samples]))
    assert fit.status == ["ok", "ok"]
    return images, landmarks_arr, fit, np.stack([s.alpha for s in samples])


@pytest.fixture(scope="module")
def renders(sfm_model):
    """Two orthographic renders (the fit's camera model) of random identities, with their true landmarks,
    and the landmark fit of each."""
    return render_and_fit(sfm_model, {"projection": "orthographic"}, 5, "photometric-test")


def _shape_error(model, alpha: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(model.vertices(alpha) - model.vertices(truth), axis=2).mean(axis=1)


def test_refinement_lowers_the_photometric_loss_and_the_shape_error(sfm_model, renders) -> None:
    images, landmarks, fit, alpha_true = renders
    got = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), QUICK)
    assert got.alpha.shape == fit.alpha.shape and got.sh.shape == (2, 9, 3) and got.gamma.shape == (2, 4)
    assert np.all(got.photometric_end < 0.8 * got.photometric_start), (got.photometric_start, got.photometric_end)
    before, after = _shape_error(sfm_model, fit.alpha, alpha_true), _shape_error(sfm_model, got.alpha, alpha_true)
    assert np.all(after < before), (before, after)
    # Each step lowers the energy on average (Adam is not monotone step by step).
    assert np.all(got.energy[:, -1] < got.energy[:, 0])
    assert np.all(got.visible_fraction > 0.5) and np.all(got.landmark_px < 5.0)


def test_landmarks_and_prior_alone_keep_the_landmark_fit(sfm_model, renders) -> None:
    """With no photometric term, the energy is the landmark fit's own: its optimum barely moves."""
    images, landmarks, fit, _ = renders
    got = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(),
                             QUICK.model_copy(update={"photo_weight": 0.0, "refine_camera": False}))
    # Adam's first steps move every coordinate by about lr; the closed-form optimum is where it stays near.
    assert np.abs(got.alpha - fit.alpha).max() < 0.2
    # The camera is kept when not refined.
    np.testing.assert_array_equal(got.cameras.rotation, fit.cameras.rotation)
    np.testing.assert_array_equal(got.cameras.translation, fit.cameras.translation)


def test_refinement_is_deterministic(sfm_model, renders) -> None:
    images, landmarks, fit, _ = renders
    config = QUICK.model_copy(update={"iterations": 8, "refine_camera": True})
    first = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), config)
    torch.manual_seed(123)  # global RNG state plays no part
    again = refine_photometric(sfm_model, images, landmarks, fit, FitConfig(), config)
    for name in ("alpha", "gamma", "sh", "photometric_end", "energy"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name), err_msg=name)
    np.testing.assert_array_equal(first.cameras.rotation, again.cameras.rotation)


def test_vertex_visibility_hides_the_farther_of_two_points_in_a_cell() -> None:
    projected = torch.tensor([[[10.2, 10.3], [10.8, 10.9], [30.0, 30.0], [-1.0, 5.0], [50.0, 50.0]]],
                             dtype=torch.float64)
    depth = torch.tensor([[5.0, 0.0, 0.0, 9.0, 2.0]], dtype=torch.float64)  # larger = closer
    facing = torch.tensor([[True, True, True, True, False]])
    got = vertex_visibility(projected, depth, facing, torch.tensor([4.0], dtype=torch.float64),
                            torch.tensor([[64.0, 64.0]], dtype=torch.float64), tolerance_mm=3.0)
    # 0 and 1 share a cell: 1 is 5 mm behind 0; 3 is outside the image; 4 faces away.
    assert got.tolist() == [[True, False, True, False, False]]


def test_bad_inputs_are_errors(sfm_model, renders) -> None:
    images, landmarks, fit, _ = renders
    with pytest.raises(FacedetailError, match="images"):
        refine_photometric(sfm_model, images[:1], landmarks, fit)
    with pytest.raises(FacedetailError, match="uint8"):
        refine_photometric(sfm_model, [im.astype(np.float32) for im in images], landmarks, fit)
