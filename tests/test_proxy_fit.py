"""The proxy fitter: Gold Standard camera, nearest rotation, regularised shape LSQ, contour, failure reports;
and the UV unwrap."""

from __future__ import annotations

import numpy as np
import pytest

from facedetail.proxy.fit import (
    LEFT_CONTOUR,
    RIGHT_CONTOUR,
    Cameras,
    FitConfig,
    ProxyFitter,
    estimate_cameras,
    gold_standard_affine,
    nearest_scaled_rotation,
    solve_coefficients,
)
from facedetail.proxy.texture import (
    TextureConfig,
    Unwrapped,
    UVTexels,
    hsv_value,
    texel_geometry,
    unwrap,
    unwrap_projective,
    unwrap_texels,
)
from facedetail.render.camera import euler_rotation


def random_cameras(rng: np.random.Generator, b: int, max_yaw: float = 40.0) -> Cameras:
    angles = np.c_[rng.uniform(-max_yaw, max_yaw, b), rng.uniform(-15, 15, b), rng.uniform(-10, 10, b)]
    rotation = np.stack([euler_rotation(*a) for a in angles])
    return Cameras(rng.uniform(0.5, 2.0, b), rotation, rng.uniform(50, 200, (b, 2)))


# --- camera -------------------------------------------------------------------------------------


def test_gold_standard_recovers_an_affine_camera_exactly():
    rng = np.random.default_rng(0)
    points = rng.normal(0, 50, (5, 30, 3))
    affine = rng.normal(0, 1, (5, 2, 4))
    image = np.einsum("bij,bnj->bni", affine[:, :, :3], points) + affine[:, None, :, 3]
    np.testing.assert_allclose(gold_standard_affine(points, image), affine, atol=1e-9)


def test_scaled_orthographic_camera_is_recovered_and_degrades_gracefully_with_noise():
    rng = np.random.default_rng(1)
    truth = random_cameras(rng, 200)
    points = rng.normal(0, 60, (200, 50, 3))
    image = truth.project(points)
    exact = estimate_cameras(points, image)
    np.testing.assert_allclose(exact.rotation, truth.rotation, atol=1e-9)
    np.testing.assert_allclose(exact.scale, truth.scale, rtol=1e-9)
    np.testing.assert_allclose(exact.translation, truth.translation, atol=1e-7)
    errors = []
    for sigma in (0.5, 2.0, 8.0):
        noisy = estimate_cameras(points, image + rng.normal(0, sigma, image.shape))
        # Angle between true and estimated rotations.
        cos = (np.trace(np.transpose(noisy.rotation, (0, 2, 1)) @ truth.rotation, axis1=1, axis2=2) - 1) / 2
        errors.append(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())
        assert np.all(np.isfinite(noisy.rotation))
        np.testing.assert_allclose(np.linalg.det(noisy.rotation), 1.0, atol=1e-9)
    # Error grows with the noise and stays small relative to it (50 points, 60 mm spread, ~1 px/mm).
    assert errors[0] < errors[1] < errors[2] < 10.0, errors


def test_nearest_rotation_is_proper_and_nan_stays_contained():
    rng = np.random.default_rng(2)
    affine = rng.normal(0, 1, (4, 2, 4))
    affine[1] = np.nan
    scale, rotation = nearest_scaled_rotation(affine)
    good = [0, 2, 3]
    np.testing.assert_allclose(rotation[good] @ np.transpose(rotation[good], (0, 2, 1)), np.eye(3)[None].repeat(3, 0),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotation[good]), 1.0)
    assert np.isnan(scale[1]) and np.isnan(rotation[1]).all() and np.isfinite(scale[good]).all()


# --- shape fit ----------------------------------------------------------------------------------


def model_landmarks(model, alpha: np.ndarray, beta: np.ndarray, cameras: Cameras, contour_pick: int = 4) -> np.ndarray:
    """Exact 2-D landmarks (image px, y down) of a model face: fixed vertices plus one contour
    candidate per contour landmark (so the fitter's nearest-candidate matching can be exact)."""
    verts = model.vertices(alpha, beta).astype(np.float64)
    ids = np.where(model.landmark_defined, model.landmark_vertices, 0)
    for side, cand in ((RIGHT_CONTOUR, model.contour_right), (LEFT_CONTOUR, model.contour_left)):
        ids[side] = cand[np.linspace(0, len(cand) - 1, len(side)).astype(int)]
    xy = cameras.project(verts[:, ids])
    xy[..., 1] *= -1
    return xy


@pytest.fixture(scope="module")
def sfm_faces(sfm_model):
    rng = np.random.default_rng(3)
    b = 24
    alpha = np.clip(rng.standard_normal((b, sfm_model.n_shape)), -2, 2)
    beta = np.abs(rng.standard_normal((b, sfm_model.n_expression))) * 0.3
    cameras = random_cameras(rng, b, max_yaw=30)
    cameras = Cameras(cameras.scale, cameras.rotation, cameras.translation - [0, 256])  # y up: image rows 0..256
    return alpha, beta, cameras, model_landmarks(sfm_model, alpha, beta, cameras)


def test_shape_fit_recovers_alpha_from_exact_landmarks(sfm_model, sfm_faces):
    alpha, beta, cameras, landmarks = sfm_faces
    b = len(alpha)
    fitter = ProxyFitter(sfm_model, FitConfig(shape_lambda=0.0, use_contour=False, iterations_prior=15))
    # With the true camera the shape step is one linear LSQ: 50 fixed landmarks, 100 equations, 63
    # unknowns; without regularisation it returns α exactly.
    ids = np.tile(fitter._landmark_local, (b, 1))
    weights = np.tile(fitter._fixed.astype(float), (b, 1))
    x = landmarks.copy()
    x[..., 1] *= -1
    x[:, ~fitter._fixed] = 0.0
    base = fitter._mean[ids] + fitter._expression_points(beta, ids)
    direct = solve_coefficients(cameras, base, fitter._shape[ids], x, weights, lam=0.0, sigma2=3.0)
    np.testing.assert_allclose(direct, alpha, atol=1e-3)
    # From α = 0 the camera/shape alternation gets there slowly (scale and some identity components
    # trade off against each other), but monotonically and close.
    result = fitter.fit(landmarks, beta_prior=beta)
    assert result.status == ["ok"] * b
    assert np.all(np.diff(result.residuals, axis=1) <= 1e-9) and result.reprojection_px.max() < 0.5
    shape_error = np.linalg.norm(sfm_model.vertices(result.alpha) - sfm_model.vertices(alpha), axis=2).mean()
    mean_face = np.linalg.norm(sfm_model.vertices(np.zeros_like(alpha)) - sfm_model.vertices(alpha), axis=2).mean()
    assert shape_error < 0.8 * mean_face, (shape_error, mean_face)


def test_default_fit_with_contour_and_regularisation(sfm_model, sfm_faces):
    alpha, beta, _, landmarks = sfm_faces
    result = ProxyFitter(sfm_model).fit(landmarks, beta_prior=beta)
    assert result.status == ["ok"] * len(alpha)
    assert result.residuals.shape == (len(alpha), 10)
    # λ = 30 pulls α towards the mean: a small residual remains. The residual falls over iterations on
    # average; per face it may rise a little (the alternation lowers data term + prior, not the data term).
    assert np.all(result.nme < 0.04) and result.residuals[:, -1].mean() < result.residuals[:, 0].mean()
    assert np.all(result.residuals[:, -1] <= 1.02 * result.residuals[:, 0])
    # Contour landmarks were matched to contour candidates on their own side.
    assert np.isin(result.landmark_vertices[:, RIGHT_CONTOUR], sfm_model.contour_right).all()
    assert np.isin(result.landmark_vertices[:, LEFT_CONTOUR], sfm_model.contour_left).all()
    np.testing.assert_array_equal(result.beta, beta)


def test_free_expression_is_fitted_and_non_negative(sfm_model, sfm_faces):
    _, beta, _, landmarks = sfm_faces
    result = ProxyFitter(sfm_model, FitConfig(expression="free")).fit(landmarks)
    assert result.residuals.shape[1] == 5 and np.all(result.beta >= 0)
    # Recovered β is much closer to the truth than β = 0.
    assert np.abs(result.beta - beta).mean() < 0.6 * np.abs(beta).mean()


def test_fit_is_in_a_face_frame_the_photo_size_does_not_change(sfm_model, sfm_faces):
    """The same face, alone in its photo or small in a photo padded to 4x its canvas, gets the same α,
    the same camera in photo px (moved by the padding) and the same error; scaled 4x, the same α and NME."""
    _, beta, _, landmarks = sfm_faces
    lm = landmarks[:6]
    fitter = ProxyFitter(sfm_model)
    alone = fitter.fit(lm, beta[:6])
    pad = np.array([768.0, 768.0])  # a 256 px photo in the middle of a 1792 px canvas
    padded = fitter.fit(lm + pad, beta[:6])
    np.testing.assert_allclose(padded.alpha, alone.alpha, atol=1e-9)
    np.testing.assert_allclose(padded.cameras.scale, alone.cameras.scale, rtol=1e-12)
    np.testing.assert_allclose(padded.cameras.rotation, alone.cameras.rotation, atol=1e-12)
    np.testing.assert_allclose(padded.cameras.translation, alone.cameras.translation + pad * [1, -1], atol=1e-9)
    np.testing.assert_allclose(padded.reprojection_px, alone.reprojection_px, rtol=1e-9)
    np.testing.assert_allclose(padded.nme, alone.nme, rtol=1e-9)
    assert padded.status == alone.status == ["ok"] * 6
    big = fitter.fit(lm * 4.0, beta[:6])  # the same faces 4x larger (a close-up)
    np.testing.assert_allclose(big.alpha, alone.alpha, atol=1e-9)
    np.testing.assert_allclose(big.nme, alone.nme, rtol=1e-9)
    np.testing.assert_allclose(big.reprojection_px, 4 * alone.reprojection_px, rtol=1e-9)
    np.testing.assert_allclose(big.cameras.scale, 4 * alone.cameras.scale, rtol=1e-12)
    # The camera maps the model to the given photo px (y up): its projection is the fit.
    verts = sfm_model.vertices(padded.alpha, padded.beta).astype(np.float64)
    ids = padded.landmark_vertices
    used = ids[0] >= 0
    proj = padded.cameras.project(np.take_along_axis(verts, np.maximum(ids, 0)[..., None], axis=1)) * [1, -1]
    err = np.linalg.norm(proj - (lm + pad), axis=2)[:, used].mean(axis=1)
    np.testing.assert_allclose(err, padded.reprojection_px, rtol=1e-5)  # model.vertices is float32
    eyes = np.linalg.norm(lm[:, 36] - lm[:, 45], axis=1)
    np.testing.assert_allclose(alone.nme, alone.reprojection_px / eyes, rtol=1e-12)
    np.testing.assert_allclose(alone.face_frame_scale * np.sqrt(np.prod(np.ptp(lm, axis=1), axis=1)), 100.0)


def test_the_release_frame_regularised_small_faces_more(sfm_model, sfm_faces):
    """Under the 256 px photo rule a face 4x smaller was fitted 4x smaller, so λ pulled α to the mean:
    in the face frame its α is the close-up's."""
    _, beta, _, landmarks = sfm_faces
    small = landmarks[:6] / 4
    close = ProxyFitter(sfm_model).fit(landmarks[:6], beta[:6])
    far = ProxyFitter(sfm_model).fit(small, beta[:6])
    np.testing.assert_allclose(far.alpha, close.alpha, atol=1e-9)
    # The release's rule, emulated: the far face's frame 4x smaller (σ² relatively 16x larger).
    release = ProxyFitter(sfm_model, FitConfig(landmark_sigma2=3.0 * 16)).fit(landmarks[:6], beta[:6])
    assert np.abs(release.alpha).mean() < 0.7 * np.abs(close.alpha).mean()


def test_fit_reports_bad_rows(sfm_model, sfm_faces):
    _, beta, _, landmarks = sfm_faces
    lm = landmarks[:5].copy()
    fitter = ProxyFitter(sfm_model)
    lm[1, 30] = np.nan
    lm[2] = lm[2] * 1e-9 + 100  # all landmarks on one point
    lm[3] = lm[3][np.random.default_rng(5).permutation(68)]  # scrambled landmarks: no face fits them
    result = fitter.fit(lm, beta[:5])
    assert result.status[0] == "ok" and result.status[4] == "ok"
    assert result.status[1] == "fit failed: landmarks contain NaN or inf"
    assert result.status[2].startswith("fit failed: degenerate landmarks"), result.status[2]
    assert result.status[3].startswith("fit diverged: NME"), result.status[3]
    assert result.nme[3] > 0.2 > result.nme[0]
    assert np.isnan(result.face_frame_scale[[1, 2]]).all()
    # The optional px bound, in photo px: 4x the photo, 4x the px error, same NME.
    px = ProxyFitter(sfm_model, FitConfig(max_reprojection_px=float(result.reprojection_px[0]) * 2))
    assert px.fit(lm[[0]], beta[:1]).status == ["ok"]
    assert px.fit(lm[[0]] * 4, beta[:1]).status[0].startswith("fit diverged: mean landmark error")


def test_extreme_pose_is_reported(sfm_model):
    rng = np.random.default_rng(4)
    cams = Cameras(np.array([1.0]), euler_rotation(85, 0, 0)[None], np.array([[128.0, -128.0]]))
    landmarks = model_landmarks(sfm_model, np.zeros((1, sfm_model.n_shape)), np.zeros((1, 6)), cams)
    result = ProxyFitter(sfm_model, FitConfig(max_nme=1e6)).fit(
        landmarks + rng.normal(0, 0.1, landmarks.shape), np.zeros((1, 6)))
    assert result.status[0].startswith("extreme pose: yaw"), result.status


# --- UV texture ---------------------------------------------------------------------------------


def test_uv_texels_blend_exactly(sfm_model):
    texels = UVTexels.build(sfm_model.uv, sfm_model.triangles, 256)
    # Each row of the blend matrix is a texel's barycentric weights: non-negative, summing to 1.
    assert texels.matrix.nnz == 3 * len(texels.rows) and texels.matrix.data.min() >= 0
    np.testing.assert_allclose(np.asarray(texels.matrix.sum(axis=1)).ravel(), 1.0, atol=1e-12)
    # Blending the per-vertex UVs gives back each texel's centre: the raster is exact.
    uv_back = texels.blend(sfm_model.uv.astype(np.float64))
    centres = np.c_[(texels.cols + 0.5) / 256, (texels.rows + 0.5) / 256]
    np.testing.assert_allclose(uv_back, centres, atol=1e-9)
    assert 0.4 < len(texels.rows) / 256**2 < 1.0


@pytest.mark.parametrize("resolution", [128, 512])
def test_texel_runs_hold_every_covered_texel_once(sfm_model, resolution):
    """The unwrap's runs (by triangle, along rows) expand to exactly the covered texels, each in its own triangle
    and box; the z-buffer's runs to exactly the grid's."""
    from facedetail.model.uvmap import rasterize_uv
    from facedetail.proxy.texture import ZBUFFER_GRID

    texels = UVTexels.build(sfm_model.uv, sfm_model.triangles, resolution)
    owner = rasterize_uv(sfm_model.uv, sfm_model.triangles, resolution).triangle
    stride = max(1, resolution // ZBUFFER_GRID)
    for runs, keep in [(texels.by_triangle, np.ones(len(texels.rows), bool)),
                       (texels.zbuffer_texels, (texels.rows % stride == 0) & (texels.cols % stride == 0))]:
        assert len(np.unique(runs.triangle)) == len(runs.triangle)
        np.testing.assert_array_equal(runs.corners, sfm_model.triangles[runs.triangle])
        got = []
        for e, t in enumerate(runs.triangle):
            rc = [(r, c) for q in range(runs.starts[e], runs.starts[e + 1])
                  for r, c in zip([runs.rows[q]] * len(range(runs.first[q], runs.stop[q], runs.step)),
                                  range(runs.first[q], runs.stop[q], runs.step), strict=True)]
            r, c = np.array(rc).T
            assert (owner[r, c] == t).all()
            if runs.step == 1:
                assert runs.box[e].tolist() == [r.min(), r.max(), c.min(), c.max()]
            got += rc
        assert len(got) == runs.count() == keep.sum()
        assert sorted(got) == sorted(zip(texels.rows[keep].tolist(), texels.cols[keep].tolist(), strict=True))
    # Runs, not texels: at 128² most triangles are a few texels wide, at 512² several.
    assert len(texels.by_triangle.rows) < len(texels.rows) / (3 if resolution >= 512 else 1)


@pytest.mark.parametrize(("yaw", "pitch", "resolution"), [(0.0, 0.0, 256), (60.0, -10.0, 512), (-75.0, 20.0, 1024)])
def test_the_depth_test_decided_per_triangle_is_the_per_texel_one(sfm_model, yaw, pitch, resolution):
    """Where a triangle's exact value bounds settle the depth test for all of its texels, the maps are the bytes
    of testing every texel alone; the turned poses do occlude texels (more are visible without the test)."""
    from facedetail.proxy.texture import unwrap_maps

    raster = UVTexels.build(sfm_model.uv, sfm_model.triangles, resolution)
    verts = sfm_model.vertices().astype(np.float64)
    normals = sfm_model.vertex_normals(verts)
    cams = Cameras(np.array([1.1]), euler_rotation(yaw, pitch, 4.0)[None], np.array([[140.0, -150.0]]))
    config = TextureConfig(resolution=resolution)
    decided = unwrap_maps((300, 260), verts, normals, cams, 1.0, raster, config)
    per_texel = unwrap_maps((300, 260), verts, normals, cams, 1.0, raster, config, box_cells=0)
    assert decided[0].tobytes() == per_texel[0].tobytes() and decided[1].tobytes() == per_texel[1].tobytes()
    unoccluded = unwrap_maps((300, 260), verts, normals, cams, 1.0, raster,
                             TextureConfig(resolution=resolution, depth_tolerance_mm=1e9))
    visible, without_depth_test = (decided[0] >= 0).sum(), (unoccluded[0] >= 0).sum()
    assert visible > 1000 and (without_depth_test > visible or yaw == 0.0)


def test_unwrap_samples_visible_texels_and_masks_hidden_ones(sfm_model):
    raster = UVTexels.build(sfm_model.uv, sfm_model.triangles, 128)
    verts = sfm_model.vertices().astype(np.float64)
    normals = sfm_model.vertex_normals(verts)
    # A photo whose left half is red and right half blue: a frontal face gets both colours.
    photo = np.zeros((256, 256, 3), np.uint8)
    photo[:, :128] = (255, 0, 0)
    photo[:, 128:] = (0, 0, 255)
    config = TextureConfig(resolution=128)
    coverage = {}
    for yaw in (0.0, 50.0):
        cams = Cameras(np.array([1.2]), euler_rotation(yaw, 0, 0)[None], np.array([[128.0, -128.0]]))
        out = unwrap(photo, verts, normals, cams, 1.0, raster, config)
        coverage[yaw] = out.mask.mean()
        # the unwrap's own count of visible texels is the alpha's
        assert out.visible == np.count_nonzero(out.mask) and out.coverage() == Unwrapped(out.rgba_map).coverage()
        assert out.texture[~out.mask].max() == 0
        visible = out.texture[out.mask]
        # Only the photo's colours (and their bilinear blends at the border) appear.
        assert visible[:, 1].max() == 0 and np.all(visible[:, 0].astype(int) + visible[:, 2] >= 254)
        if yaw == 0.0:
            assert (visible[:, 0] == 255).mean() > 0.3 and (visible[:, 2] == 255).mean() > 0.3
    assert coverage[50.0] < coverage[0.0] - 0.1
    np.testing.assert_allclose(hsv_value(np.array([[[255, 0, 0]]], np.uint8)), [[1.0]])


@pytest.mark.parametrize(("yaw", "pitch", "roll", "to_photo"), [(0.0, 0.0, 0.0, 1.0), (50.0, -10.0, 5.0, 1.0),
                                                                 (-70.0, 20.0, -8.0, 0.5), (180.0, 0.0, 0.0, 1.0)])
def test_orthographic_unwrap_is_the_array_versions_bytes(sfm_model, yaw, pitch, roll, to_photo):
    """Below the z-buffer grid's resolution (every texel splats the z-buffer), the compiled per-triangle unwrap
    gives the bytes of the texel arrays computed with NumPy, fed through the general path."""
    raster = UVTexels.build(sfm_model.uv, sfm_model.triangles, 128)
    verts = sfm_model.vertices().astype(np.float64)
    normals = sfm_model.vertex_normals(verts)
    photo = np.random.default_rng(3).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    cams = Cameras(np.array([1.1]), euler_rotation(yaw, pitch, roll)[None], np.array([[140.0, -150.0]]))
    config = TextureConfig(resolution=128)
    fast = unwrap(photo, verts, normals, cams, to_photo, raster, config)

    pos, nrm = texel_geometry(raster, verts, normals)
    (r00, r01, r02), (r10, r11, r12), (r20, r21, r22) = cams.rotation[0]
    x, y, z = pos.T
    fx = cams.scale[0] * (r00 * x + r01 * y + r02 * z) + cams.translation[0, 0]
    fy = cams.scale[0] * (r10 * x + r11 * y + r12 * z) + cams.translation[0, 1]
    facing = nrm[:, 0] * r20 + nrm[:, 1] * r21 + nrm[:, 2] * r22 >= np.cos(np.radians(config.max_view_angle_deg))
    xy = np.c_[(fx * to_photo).astype(np.float32), (-fy * to_photo).astype(np.float32)]
    cell = cams.scale[0] * config.zbuffer_cell_mm
    cells = np.c_[np.floor(fx / cell), np.floor(fy / cell)]
    slow = unwrap_texels(photo, xy, r20 * x + r21 * y + r22 * z, facing, cells, raster, config)
    assert fast.mask.tobytes() == slow.mask.tobytes() and fast.texture.tobytes() == slow.texture.tobytes()
    assert (fast.mask.sum() > 1000) == (yaw != 180.0)  # seen from behind: nothing faces the camera


def reference_unwrap(photo: np.ndarray, verts: np.ndarray, normals: np.ndarray, cams: Cameras, to_photo: float,
                     raster: UVTexels, config: TextureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The orthographic unwrap as NumPy arrays over every covered texel (sparse blend, normalised normals,
    np.maximum.at z-buffer from the z-buffer grid's texels, one cv2.remap): (R, R, 4) RGBA and (R, R) mask."""
    import cv2

    from facedetail.proxy.texture import ZBUFFER_GRID

    pos, nrm = texel_geometry(raster, verts, normals)
    rot, scale, trans = cams.rotation[0], float(cams.scale[0]), cams.translation[0]
    fitted = scale * pos @ rot[:2].T + trans
    x, y = fitted[:, 0] * to_photo, -fitted[:, 1] * to_photo
    depth = pos @ rot[2]
    facing = nrm @ rot[2] >= np.cos(np.radians(config.max_view_angle_deg))
    per_cell = 1.0 / (scale * config.zbuffer_cell_mm * to_photo)
    cells = np.c_[np.floor(x * per_cell), np.floor(y * per_cell)].astype(np.int64)
    cells -= cells.min(axis=0)
    flat = cells[:, 1] * (cells[:, 0].max() + 1) + cells[:, 0]
    stride = max(1, raster.resolution // ZBUFFER_GRID)
    splat = facing & (raster.rows % stride == 0) & (raster.cols % stride == 0)
    zbuf = np.full(flat.max() + 1, -np.inf)
    np.maximum.at(zbuf, flat[splat], depth[splat])
    h, w = photo.shape[:2]
    visible = (facing & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
               & (depth >= zbuf[flat] - config.depth_tolerance_mm))
    mask = raster.image(visible[:, None].astype(np.uint8))[..., 0].astype(bool)
    map_x = raster.image(np.where(visible, x, -16.0)[:, None].astype(np.float32), fill=-16.0)[..., 0]
    map_y = raster.image(np.where(visible, y, -16.0)[:, None].astype(np.float32), fill=-16.0)[..., 0]
    rgba = cv2.remap(cv2.cvtColor(photo, cv2.COLOR_RGB2RGBA), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return rgba, mask


@pytest.mark.parametrize(("yaw", "pitch", "to_photo", "resolution"),
                         [(35.0, 5.0, 1.0, 1024), (-60.0, -15.0, 0.5, 512), (10.0, 25.0, 1.0, 256)])
def test_unwrap_at_high_resolution_is_the_array_version(sfm_model, yaw, pitch, to_photo, resolution):
    """At and above the z-buffer grid's resolution, the compiled unwrap equals the array version whose z-buffer
    is splatted from the grid's texels, and its alpha is exactly 0 or 255."""
    raster = UVTexels.build(sfm_model.uv, sfm_model.triangles, resolution)
    verts = sfm_model.vertices().astype(np.float64)
    normals = sfm_model.vertex_normals(verts)
    photo = np.random.default_rng(3).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    cams = Cameras(np.array([1.1]), euler_rotation(yaw, pitch, 4.0)[None], np.array([[140.0, -150.0]]))
    config = TextureConfig(resolution=resolution)
    fast = unwrap(photo, verts, normals, cams, to_photo, raster, config)
    rgba, mask = reference_unwrap(photo, verts, normals, cams, to_photo, raster, config)
    # Affine texel values round differently from the sparse blend in the last bits: a texel exactly at the
    # facing threshold or on a z-buffer cell's edge may flip; never more than a handful.
    assert mask.sum() > 10000 and (fast.mask != mask).sum() <= 3
    both = fast.mask & mask
    assert np.array_equal(fast.rgba_map[both], rgba[both])
    assert set(np.unique(fast.rgba_map[..., 3]).tolist()) == {0, 255} and not fast.rgba_map[~fast.mask].any()


def test_orthographic_unwrap_agrees_with_the_projective_one(sfm_model):
    """The affine camera equal to a fit's camera, through the general path (its z-buffer from every facing
    texel, cells in the projection's px per mm), sees the same texels but a few at occlusion edges, in the
    same colours."""
    raster = UVTexels.build(sfm_model.uv, sfm_model.triangles, 512)
    verts = sfm_model.vertices().astype(np.float64)
    normals = sfm_model.vertex_normals(verts)
    photo = np.random.default_rng(5).integers(0, 256, (320, 300, 3), dtype=np.uint8)
    rot, scale, trans = euler_rotation(40.0, -5.0, 3.0), 1.2, np.array([150.0, -160.0])
    config = TextureConfig(resolution=512)
    fast = unwrap(photo, verts, normals, Cameras(np.array([scale]), rot[None], trans[None]), 1.0, raster, config)
    projection = np.zeros((3, 4))
    projection[0, :3], projection[0, 3] = scale * rot[0], trans[0]
    projection[1, :3], projection[1, 3] = -scale * rot[1], -trans[1]
    projection[2, 3] = 1.0
    general = unwrap_projective(photo, verts, normals, projection, raster, config)
    assert fast.mask.sum() > 10000 and (fast.mask != general.mask).mean() < 0.01
    both = fast.mask & general.mask
    assert np.array_equal(fast.texture[both], general.texture[both])
