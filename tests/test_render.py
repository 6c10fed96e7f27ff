"""Rendering library: sampling, SH shading, cameras, landmark anchors, the reusable renderer."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from facedetail.io.seeds import item_rng, truncated_normal
from facedetail.model.anchors import landmark_anchors
from facedetail.render.camera import Camera, euler_rotation, head_pose
from facedetail.render.faces import FaceRenderer, MouthCavity, boundary_loops
from facedetail.render.sampling import (
    NEUTRAL,
    ExpressionSampling,
    SamplingConfig,
    dominant_emotion,
    sample_expression,
    sample_render,
)
from facedetail.render.sh import directional_sh, sh_basis, shade

# --- sampling -----------------------------------------------------------------------------


def test_truncated_normal_is_truncated_not_clipped() -> None:
    x = truncated_normal(np.random.default_rng(0), 200_000, bound=3.0)
    assert np.abs(x).max() <= 3.0
    assert np.sum(np.abs(x) == 3.0) == 0  # clipping would pile ~540 values on the bounds
    # std of N(0,1) truncated at ±3 is 0.9866; of the untruncated normal 1
    assert abs(x.std() - 0.9866) < 0.005
    assert abs(x.mean()) < 0.01
    half = np.abs(truncated_normal(np.random.default_rng(1), 100_000, bound=0.25, sigma=0.1))
    assert half.min() >= 0 and half.max() <= 0.25


def test_dominant_sampling_labels_the_drawn_emotion(sfm_model) -> None:
    config = ExpressionSampling()
    n = 7000
    labels = []
    for i in range(n):
        beta = sample_expression(np.random.default_rng(i), config, sfm_model)
        assert beta.min() >= 0.0, "blendshape weights are never negative (no anti-expressions)"
        assert beta.max() <= config.dominant_weight[1]
        assert np.sum(beta >= config.neutral_below) <= 1, "at most one dominant emotion"
        labels.append(dominant_emotion(beta, sfm_model, config.neutral_below))
    counts = {name: labels.count(name) for name in (NEUTRAL, *sfm_model.expression_names)}
    # each of the 7 classes has probability 1/7: 1000 expected, binomial sd ~29
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts


def test_truncnorm_is_the_papers_distribution_for_pca_models(sfm_model) -> None:
    from dataclasses import replace

    pca = replace(sfm_model, expression_kind="pca", expression_names=tuple(f"exp_{k}" for k in range(6)))
    config = ExpressionSampling()
    betas = np.stack([sample_expression(np.random.default_rng(i), config, pca) for i in range(3000)])
    assert betas.min() < -2.0 and betas.max() > 2.0 and np.abs(betas).max() <= 3.0
    assert dominant_emotion(betas[0], pca, 0.3) == "unlabelled"


def test_inconsistent_label_thresholds_are_rejected() -> None:
    with pytest.raises(ValidationError, match="secondary_max < neutral_below"):
        ExpressionSampling(neutral_below=0.5, dominant_weight=(0.4, 1.0))


def test_same_seed_same_parameters(sfm_model) -> None:
    config = SamplingConfig()
    a = sample_render(item_rng(7, "render_expressions", "expr-0000001"), config, sfm_model)
    b = sample_render(item_rng(7, "render_expressions", "expr-0000001"), config, sfm_model)
    c = sample_render(item_rng(7, "render_expressions", "expr-0000002"), config, sfm_model)
    assert a.record() == b.record()
    assert a.record() != c.record()
    assert abs(a.yaw) <= config.pose.yaw_deg and config.camera.distance_mm[0] <= a.distance_mm
    assert np.allclose(a.alpha, 0.0), "identity is the mean by default (the paper)"


# --- spherical harmonics -----------------------------------------------------------------


def test_directional_sh_approximates_the_clamped_cosine() -> None:
    light = np.array([0.3, -0.2, -0.93])
    light /= np.linalg.norm(light)
    sh = directional_sh(light, intensity=0.8, ambient=0.25)
    normals = np.random.default_rng(0).standard_normal((5000, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    exact = 0.8 * np.maximum(normals @ light, 0.0) + 0.25
    approx = shade(normals, sh)[:, 0]
    # order-2 SH of the clamped cosine: worst case 0.1 of the light's intensity, mean error far below
    assert np.abs(approx - exact).max() < 0.1 * 0.8 + 1e-9
    assert np.abs(approx - exact).mean() < 0.03
    assert sh_basis(normals).shape == (5000, 9)


# --- cameras ------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["perspective", "orthographic"])
def test_projection_matrix_matches_project(projection: str) -> None:
    camera = Camera.framing(200, 160, projection, 12.0, 1200.0)
    rotation, translation = head_pose(np.array([1.0, 2.0, -30.0]), 10.0, -5.0, 3.0, 1200.0,
                                      np.array([4.0, -3.0]), camera)
    points = np.random.default_rng(0).uniform(-80, 80, (50, 3))
    uvw = np.column_stack([points, np.ones(50)]) @ camera.projection_matrix(rotation, translation).T
    assert np.allclose(uvw[:, :2] / uvw[:, 2:], camera.project(points @ rotation.T + translation))
    # the rotation centre lands on the principal point plus the requested shift
    centre_uv = camera.project((rotation @ np.array([1.0, 2.0, -30.0]) + translation)[None])[0]
    assert np.allclose(centre_uv, np.add(camera.principal_point, [4.0, -3.0]))


def test_euler_rotation_signs() -> None:
    nose = np.array([0.0, 0.0, 1.0])  # the model looks towards +z
    assert (euler_rotation(20, 0, 0) @ nose)[0] > 0  # positive yaw: towards +x (image right)
    assert (euler_rotation(0, 20, 0) @ nose)[1] < 0  # positive pitch: down
    assert np.allclose(np.linalg.det(euler_rotation(12, -30, 44)), 1.0)


# --- landmarks and mesh -------------------------------------------------------------------


def test_every_sfm_landmark_is_anchored(sfm_model) -> None:
    anchors = landmark_anchors(sfm_model)
    assert anchors.kinds.count("vertex") == 50
    assert anchors.kinds.count("contour") == 16
    assert anchors.kinds.count("derived") == 2
    assert np.allclose(anchors.weights.sum(1), 1.0)
    points = anchors.points(sfm_model.mean)
    jaw = points[:17]
    # the jaw runs from the right temple down to the chin and up to the left temple
    assert np.all(np.diff(jaw[:9, 0]) > 0) and np.all(np.diff(jaw[8:, 0]) > 0)
    assert np.argmin(jaw[:, 1]) in (7, 8, 9)
    assert np.allclose(jaw[:8, 0], -jaw[16:8:-1, 0], atol=2.0), "left and right are mirror images"


def test_boundary_loops_and_mouth_cavity(sfm_model) -> None:
    square = np.array([[0, 1, 2], [0, 2, 3]])
    (loop,) = boundary_loops(square)
    assert sorted(loop.tolist()) == [0, 1, 2, 3]
    cavity = MouthCavity.of(sfm_model)
    assert cavity is not None and len(cavity.loop) == 48
    # the cap continues the mesh's winding: each boundary edge appears reversed in the cap
    edges = {(a, b) for t in sfm_model.triangles.tolist() for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0]))}
    cap = {(a, b) for t in cavity.triangles.tolist() for a, b in ((t[0], t[1]),)}
    assert all((b, a) in edges for a, b in cap)


# --- rendering ----------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["perspective", "orthographic"])
def test_projected_landmarks_land_on_the_face(sfm_model, projection: str) -> None:
    config = SamplingConfig.model_validate({"camera": {"projection": projection}})
    anchors = landmark_anchors(sfm_model)
    inner = np.array([k == "vertex" for k in anchors.kinds])
    with FaceRenderer(sfm_model, 256, config) as renderer:
        for i in range(6):
            sample = sample_render(item_rng(3, "test", str(i)), config, sfm_model)
            face = renderer.render(sample)
            assert face.image.shape == (256, 256, 3) and face.mask.any()
            seen = face.visible & inner
            assert seen.sum() >= 40
            cols, rows = np.round(face.landmarks[seen]).astype(int).T
            assert face.mask[rows, cols].all()
            # the depth buffer agrees with the landmark's depth: at its pixel for most landmarks,
            # within one pixel for all (at the nostrils and lips the surface folds within a pixel)
            err = np.abs(face.depth[rows, cols] - face.landmark_depth[seen])
            assert np.median(err) < 1.0, err
            for r, c, z in zip(rows, cols, face.landmark_depth[seen], strict=True):
                patch = face.depth[r - 1:r + 2, c - 1:c + 2]
                assert np.abs(patch[patch > 0] - z).min() < 3.0
            # and P maps the model-space landmark to the same pixel
            model_pts = anchors.points(sfm_model.vertices(sample.alpha, sample.beta))
            uvw = np.column_stack([model_pts, np.ones(68)]) @ face.projection.T
            assert np.allclose(uvw[:, :2] / uvw[:, 2:], face.landmarks, atol=1e-6)


def test_turned_head_hides_the_far_jaw(sfm_model) -> None:
    from dataclasses import replace

    config = SamplingConfig()
    sample = sample_render(item_rng(0, "test", "turn"), config, sfm_model)
    with FaceRenderer(sfm_model, 128, config) as renderer:
        right_turn = renderer.render(replace(sample, yaw=60.0, pitch=0.0, roll=0.0))
        frontal = renderer.render(replace(sample, yaw=0.0, pitch=0.0, roll=0.0))
    # the nose turns towards the image's right: the jaw on that side (10-17, the subject's left) hides
    assert right_turn.visible[9:17].sum() < 4 and right_turn.visible[:8].all()
    assert frontal.visible[:17].sum() >= 15


def test_renderer_compiles_its_shader_once(sfm_model) -> None:
    config = SamplingConfig()
    with FaceRenderer(sfm_model, 64, config) as renderer:
        for i in range(5):
            renderer.render(sample_render(item_rng(0, "t", str(i)), config, sfm_model))
        assert renderer._mesh.compiled_programs == 1


def test_mouth_never_shows_the_background(sfm_model) -> None:
    from dataclasses import replace

    config = SamplingConfig()
    sample = sample_render(item_rng(0, "test", "mouth"), config, sfm_model)
    surprise = np.zeros(6)
    surprise[list(sfm_model.expression_names).index("surprise")] = 1.0
    with FaceRenderer(sfm_model, 256, config) as renderer:
        face = renderer.render(replace(sample, beta=surprise, yaw=0.0, pitch=0.0, roll=0.0))
    # the mouth centre lies between the inner-lip landmarks 63 (top) and 67 (bottom)
    u, v = np.round((face.landmarks[62] + face.landmarks[66]) / 2).astype(int)
    assert abs(face.landmarks[62, 1] - face.landmarks[66, 1]) > 5, "surprise opens the mouth"
    assert face.mask[v, u]
