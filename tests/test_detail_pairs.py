"""Training pairs: the projective unwrap, the pair's encoding, and every kind of bad pair."""

from __future__ import annotations

import numpy as np
import pytest

from facedetail.capture.maps import CaptureMaps
from facedetail.capture.scan import CaptureItem, PhotoInfo
from facedetail.detail.pairbuild import PairBuilder, PairConfig
from facedetail.detail.pairs import DISPLACEMENT, DMASK, TEXTURE, PairError, decode_pair
from facedetail.io.images import encode_png
from facedetail.proxy.fit import Cameras
from facedetail.proxy.texture import TextureConfig, UVTexels, unwrap, unwrap_projective
from facedetail.render.camera import Camera, head_pose

RES = 128


@pytest.fixture(scope="module")
def texels(sfm_model) -> UVTexels:
    return UVTexels.build(sfm_model.uv, sfm_model.triangles, RES)


def coordinate_photo(size: int) -> np.ndarray:
    """A photo whose red channel is x/2 and green channel y/2 (px), so a sample tells where it was taken."""
    ys, xs = np.mgrid[0:size, 0:size]
    return np.dstack([xs // 2, ys // 2, np.full_like(xs, 128)]).astype(np.uint8)


def test_a_known_perspective_camera_samples_where_the_texel_projects(sfm_model, texels: UVTexels) -> None:
    vertices = sfm_model.mean.astype(np.float64)
    normals = sfm_model.vertex_normals(vertices).astype(np.float64)
    camera = Camera.framing(480, 480, "perspective", 15.0, 1200.0)
    rotation, translation = head_pose(vertices.mean(axis=0), 10.0, 5.0, 0.0, 1200.0, np.zeros(2), camera)
    P = camera.projection_matrix(rotation, translation)
    got = unwrap_projective(coordinate_photo(480), vertices, normals, P, texels, TextureConfig(resolution=RES))
    assert got.mask.mean() > 0.3
    pos = texels.blend(vertices)
    h = np.hstack([pos, np.ones((len(pos), 1))]) @ P.T
    expect = np.zeros((RES, RES, 2))
    expect[texels.rows, texels.cols] = h[:, :2] / h[:, 2:]
    err = np.abs(got.texture[..., :2].astype(float) * 2 - expect)[got.mask]
    assert np.percentile(err, 99) <= 2.5  # 2 px per level plus bilinear rounding


def test_a_profile_view_hides_the_far_cheek(sfm_model, texels: UVTexels) -> None:
    vertices = sfm_model.mean.astype(np.float64)
    normals = sfm_model.vertex_normals(vertices).astype(np.float64)
    camera = Camera.framing(256, 256, "perspective", 15.0, 1200.0)
    rotation, translation = head_pose(vertices.mean(axis=0), 70.0, 0.0, 0.0, 1200.0, np.zeros(2), camera)
    got = unwrap_projective(coordinate_photo(256), vertices, normals, camera.projection_matrix(rotation, translation),
                            texels, TextureConfig(resolution=RES))
    left, right = got.mask[:, : RES // 2].mean(), got.mask[:, RES // 2:].mean()
    assert min(left, right) < 0.25 * max(left, right)


def test_the_projective_unwrap_agrees_with_the_fitted_camera_one(sfm_model, texels: UVTexels) -> None:
    vertices = sfm_model.mean.astype(np.float64)
    normals = sfm_model.vertex_normals(vertices).astype(np.float64)
    from facedetail.render.camera import euler_rotation

    rotation = euler_rotation(20.0, -5.0, 3.0)
    cams = Cameras(np.array([1.2]), rotation[None], np.array([[150.0, -160.0]]))
    to_photo = 1.5
    photo = coordinate_photo(512)
    config = TextureConfig(resolution=RES)
    fitted = unwrap(photo, vertices, normals, cams, to_photo, texels, config)
    s = cams.scale[0] * to_photo
    P = np.vstack([np.r_[s * rotation[0], to_photo * cams.translation[0, 0]],
                   np.r_[-s * rotation[1], -to_photo * cams.translation[0, 1]], [0.0, 0.0, 0.0, 1.0]])
    known = unwrap_projective(photo, vertices, normals, P, texels, config)
    assert (fitted.mask == known.mask).mean() > 0.995  # z-buffer cells may split differently at their borders
    both = fitted.mask & known.mask
    assert np.array_equal(fitted.texture[both], known.texture[both])


def _maps(texels: UVTexels, value: float = 0.1) -> CaptureMaps:
    mask = np.zeros((RES, RES), bool)
    mask[texels.rows, texels.cols] = True
    disp = np.where(mask, value, 0.0).astype(np.float32)
    return CaptureMaps("s000/neutral", disp, mask, np.zeros((RES, RES, 3), np.float32))


@pytest.fixture()
def item(tmp_path, sfm_model) -> tuple[CaptureItem, PhotoInfo, np.ndarray]:
    import json

    folder = tmp_path / "s000" / "neutral"
    folder.mkdir(parents=True)
    (folder / "capture.json").write_text(json.dumps({"units": "mm", "proxy": "proxy.json"}))
    (folder / "proxy.json").write_text(json.dumps({"alpha": [], "beta": []}))
    vertices = sfm_model.mean.astype(np.float64)
    camera = Camera.framing(256, 256, "perspective", 15.0, 1200.0)
    rotation, translation = head_pose(vertices.mean(axis=0), 0.0, 0.0, 0.0, 1200.0, np.zeros(2), camera)
    photo = PhotoInfo(file="photo-0.png", P=camera.projection_matrix(rotation, translation).tolist())
    return CaptureItem("s000/neutral", folder), photo, np.full((256, 256, 3), 160, np.uint8)


def test_a_pair_round_trips(sfm_model, texels: UVTexels, item) -> None:
    builder = PairBuilder(sfm_model, RES, PairConfig())
    capture, photo, rgb = item
    sample, facts = builder.build(capture, "s000/neutral/photo-0", photo, rgb, _maps(texels, 0.1234))
    assert facts["camera"] == "known" and facts["visible_fraction"] > 0.3
    pair = decode_pair(sample, RES, sfm_model.n_vertices)
    assert pair.subject == "s000" and pair.texture.shape == (RES, RES, 3)
    step = 2 * 2.0 / 65535
    assert np.abs(pair.displacement[pair.dmask] - 0.1234).max() <= step
    # A uniform grey photo: the lighting estimate explains it with mostly the constant band.
    assert abs(pair.sh[0]).max() > 5 * np.abs(pair.sh[1:]).max()


@pytest.mark.parametrize("kind", ["mismatched sizes", "NaN displacement", "empty mask", "unreadable texture",
                                  "texture mostly hidden"])
def test_every_bad_pair_is_refused_with_its_reason(sfm_model, texels: UVTexels, item, kind: str) -> None:
    builder = PairBuilder(sfm_model, RES, PairConfig())
    capture, photo, rgb = item
    maps = _maps(texels)
    if kind == "mismatched sizes":
        maps = CaptureMaps(maps.id, np.zeros((64, 64), np.float32), np.ones((64, 64), bool), maps.normals)
    elif kind == "NaN displacement":
        maps.displacement[texels.rows[:10], texels.cols[:10]] = np.nan
    elif kind == "empty mask":
        maps = CaptureMaps(maps.id, maps.displacement, np.zeros_like(maps.mask), maps.normals)
    elif kind == "texture mostly hidden":
        builder = PairBuilder(sfm_model, RES, PairConfig(min_visible_fraction=0.99))
    if kind == "unreadable texture":
        sample, _ = builder.build(capture, "s000/neutral/photo-0", photo, rgb, maps)
        sample[TEXTURE] = b"\x89PNG\r\n\x1a\n broken"
        with pytest.raises(PairError, match=r"^unreadable texture"):
            decode_pair(sample, RES, sfm_model.n_vertices)
        return
    with pytest.raises(PairError, match=rf"^{kind}"):
        builder.build(capture, "s000/neutral/photo-0", photo, rgb, maps)


def test_decoding_checks_sizes_and_masks(sfm_model, texels: UVTexels, item) -> None:
    builder = PairBuilder(sfm_model, RES, PairConfig())
    capture, photo, rgb = item
    sample, _ = builder.build(capture, "s000/neutral/photo-0", photo, rgb, _maps(texels))
    with pytest.raises(PairError, match=r"^mismatched sizes"):
        decode_pair(sample, 2 * RES, sfm_model.n_vertices)
    empty = {**sample, DMASK: encode_png(np.zeros((RES, RES), np.uint8), 3)}
    with pytest.raises(PairError, match=r"^empty mask"):
        decode_pair(empty, RES, sfm_model.n_vertices)
    short = {**sample, DISPLACEMENT: encode_png(np.zeros((RES // 2, RES // 2), np.uint16), 3)}
    with pytest.raises(PairError, match=r"^mismatched sizes"):
        decode_pair(short, RES, sfm_model.n_vertices)


def test_a_photo_without_a_camera_is_paired_through_its_landmarks(sfm_model, tiny_pipeline, tmp_path) -> None:
    """A user's capture photo listed by name only: the camera is fitted to its dlib landmarks, and the texture
    agrees with the one unwrapped through the photo's true camera."""
    import json
    import shutil

    from facedetail.capture.maps import load_item
    from facedetail.proxy.inputs import LoadConfig, load_photo

    source = tiny_pipeline / "data" / "capture_synth" / "s001" / "neutral"
    folder = tmp_path / "s001" / "neutral"
    shutil.copytree(source, folder)
    info = json.loads((folder / "capture.json").read_text())
    known = PhotoInfo.model_validate(info["photos"][0])
    maps = load_item(tiny_pipeline / "data" / "capture_gt", "s001/neutral")
    resolution = maps.displacement.shape[0]
    builder = PairBuilder(sfm_model, resolution, PairConfig())
    rgb = load_photo(folder / known.file, LoadConfig(max_side=8192)).rgb
    item = CaptureItem("s001/neutral", folder)
    with_camera, _ = builder.build(item, "s001/neutral/photo-0", known, rgb, maps)
    fitted, facts = builder.build(item, "s001/neutral/photo-0", PhotoInfo(file=known.file), rgb, maps)
    assert facts["camera"] == "landmarks" and facts["visible_fraction"] > 0.3
    a = decode_pair(with_camera, resolution, sfm_model.n_vertices)
    b = decode_pair(fitted, resolution, sfm_model.n_vertices)
    both = a.visible & b.visible
    assert both.sum() > 0.5 * a.visible.sum()
    close = np.abs(a.texture[both].astype(int) - b.texture[both].astype(int)).max(axis=1) <= 24
    assert close.mean() > 0.8, close.mean()
