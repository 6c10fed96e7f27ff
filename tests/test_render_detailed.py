"""The detailed-surface renderer: subdivision carrying attributes, the fixed subdivision map, displacement and
shading normals, SH in the model frame, the subdivided mouth cavity, and renders against FaceRenderer's."""

from __future__ import annotations

import numpy as np
import pytest

from facedetail.render.camera import euler_rotation
from facedetail.render.detailed import (
    DetailedFaceRenderer,
    displace,
    sh_in_model_frame,
    subdivide,
    subdivide_proxy,
    subdivided_cavity,
    subdivision_map,
    vertex_normals,
)
from facedetail.render.faces import FaceRenderer, MouthCavity
from facedetail.render.sampling import SamplingConfig, sample_render
from facedetail.render.sh import directional_sh, shade

EDGE = 3.0  # coarse: these tests are about bookkeeping, not sampling


class Ripple:
    """A displacement field: 0.3 mm waves along u."""

    def evaluate(self, uv: np.ndarray) -> np.ndarray:
        return 0.3 * np.sin(2 * np.pi * 40 * uv[:, 0])


def test_subdivision_carries_attributes_linearly_and_keeps_vertex_ids(sfm_model) -> None:
    model = sfm_model
    colour = model.albedo()
    points, faces, (uv, carried) = subdivide(model.mean, model.triangles, EDGE, [model.uv, colour])
    V = model.n_vertices
    np.testing.assert_array_equal(points[:V], model.mean.astype(np.float64))
    np.testing.assert_array_equal(carried[:V], colour)
    edges = points[faces[:, [0, 1, 2]]] - points[faces[:, [1, 2, 0]]]
    assert np.linalg.norm(edges, axis=2).max() <= EDGE
    # Every attribute is the same affine function of the positions on each proxy triangle: a fine vertex's
    # UV, mapped back to its proxy triangle's barycentrics, gives its colour.
    fmap = subdivision_map(model.mean, model.triangles, EDGE)
    np.testing.assert_array_equal(fmap.faces, faces)
    np.testing.assert_array_equal(fmap.apply(model.mean), points)
    np.testing.assert_allclose(fmap.apply(model.uv), uv, atol=1e-15)
    np.testing.assert_allclose(fmap.apply(colour), carried, atol=1e-12)
    np.testing.assert_allclose(np.asarray(fmap.weights.sum(axis=1)).ravel(), 1.0, atol=0)
    assert fmap.weights.getnnz(axis=1).max() <= 3


def test_the_map_subdivides_other_shapes_of_the_topology(sfm_model) -> None:
    model = sfm_model
    fmap = subdivision_map(model.mean, model.triangles, EDGE)
    alpha = np.clip(np.random.default_rng(0).standard_normal(model.n_shape), -2, 2)
    shape = model.vertices(alpha).astype(np.float64)
    via_map = fmap.proxy(model, shape)
    assert via_map.points.shape == (fmap.weights.shape[0], 3)
    # The fine vertices are on the shape's own triangles, and the first V are its vertices.
    np.testing.assert_array_equal(via_map.points[:model.n_vertices], shape)
    np.testing.assert_allclose(np.linalg.norm(via_map.normals, axis=1), 1.0, atol=1e-12)


def test_displacement_moves_along_the_normal_and_turns_the_shading_normal(sfm_model) -> None:
    model = sfm_model
    base = subdivide_proxy(model, model.mean, EDGE, model.albedo())
    flat = displace(base, None)
    np.testing.assert_array_equal(flat.vertices, base.points)
    # Undisplaced, the shading normal is the smooth interpolated one (no facets).
    np.testing.assert_allclose(flat.normals, base.normals, atol=1e-12)
    rippled = displace(base, Ripple())
    offset = ((rippled.vertices - base.points) * base.normals).sum(axis=1)
    np.testing.assert_allclose(offset, Ripple().evaluate(base.uv), atol=1e-12)
    assert np.degrees(np.arccos(np.clip((rippled.normals * base.normals).sum(1), -1, 1))).max() > 5.0
    # Area-weighted vertex normals: the sum of the incident faces' (unnormalized) cross products.
    v, f = rippled.vertices, rippled.faces
    face_n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    summed = np.zeros_like(v)
    np.add.at(summed, f.ravel(), np.repeat(face_n, 3, axis=0))
    np.testing.assert_allclose(vertex_normals(v, f), summed / np.linalg.norm(summed, axis=1, keepdims=True),
                               atol=1e-12)


@pytest.mark.parametrize("angles", [(0.0, 0.0, 0.0), (25.0, -10.0, 7.0), (-40.0, 15.0, -12.0)])
def test_sh_in_the_model_frame_shades_like_the_camera_frame(angles: tuple[float, float, float]) -> None:
    rotation = np.diag([1.0, -1.0, -1.0]) @ euler_rotation(*angles)
    sh = directional_sh(np.array([0.3, -0.4, -0.85]), 0.8, 0.35, np.array([1.0, 0.95, 0.9]))
    n = np.random.default_rng(1).standard_normal((500, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    np.testing.assert_allclose(shade(n, sh_in_model_frame(sh, rotation)), shade(n @ rotation.T, sh), atol=1e-10)


def test_the_subdivided_cavity_follows_the_mouth_loop(sfm_model) -> None:
    coarse = MouthCavity.of(sfm_model)
    assert coarse is not None
    base = subdivide_proxy(sfm_model, sfm_model.mean, 1.0)  # fine enough to split the lips' edges
    fine = subdivided_cavity(coarse, base.faces, len(base.points))
    order = [v for v in fine.loop.tolist() if v < sfm_model.n_vertices]
    start = order.index(int(coarse.loop[0]))
    assert order[start:] + order[:start] == coarse.loop.tolist()
    assert len(fine.loop) > len(coarse.loop) and fine.triangles.shape == (len(fine.loop), 3)
    assert (fine.triangles[:, 2] == len(base.points)).all()


def test_an_undetailed_render_is_the_face_renderers_and_details_show(sfm_model) -> None:
    """With no details the detailed renderer draws FaceRenderer's image (same camera, pose, light, albedo,
    cavity, landmarks); with details the shading changes, and ``P`` maps the proxy into the face's pixels."""
    config = SamplingConfig()
    sample = sample_render(np.random.default_rng(3), config, sfm_model)
    with FaceRenderer(sfm_model, 192, config) as plain, DetailedFaceRenderer(sfm_model, 192, config, 2.0) as fine:
        a = plain.render(sample)
        b = fine.render(sample, None)
        c = fine.render(sample, Ripple())
    both = a.mask & b.mask
    assert both.sum() > 0.97 * max(a.mask.sum(), b.mask.sum())
    diff = np.abs(a.image.astype(int) - b.image.astype(int))[both]
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 12, (diff.mean(), np.percentile(diff, 99))
    np.testing.assert_allclose(b.landmarks, a.landmarks, atol=1e-9)
    np.testing.assert_allclose(b.projection, a.projection, atol=1e-9)
    assert (b.visible == a.visible).mean() > 0.95
    ripple = np.abs(c.image.astype(int) - b.image.astype(int)).max(axis=2)[both]
    assert (ripple >= 8).mean() > 0.2
