"""Tests of facedetail.model on the real Surrey Face Model, with eos-py and trimesh as references."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import tomllib
import zipfile
from pathlib import Path

import eos
import numpy as np
import pytest
import trimesh

from facedetail.assets import packaged_checksums
from facedetail.errors import SourceFileError
from facedetail.model import SHARE_FILES, MorphableModel, load_model_source
from facedetail.model.albedo import BASE_SKIN
from facedetail.model.sfm import read_blendshapes
from facedetail.render.preview import render_preview

SHARE = (Path(os.environ["FACEDETAIL_ASSET_MIRROR"]) if os.environ.get("FACEDETAIL_ASSET_MIRROR")
         else Path(__file__).resolve().parents[2] / "shared/assets/eos-share")
MODEL_FILE = "sfm_shape_3448.bin"
NAMES = SHARE_FILES["sfm"]
EMOTIONS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
N_VERTICES, N_TRIANGLES, N_SHAPE, N_EXPR, N_ALBEDO = 3448, 6736, 63, 6, 4


def _need_share() -> Path:
    if not (SHARE / MODEL_FILE).is_file():
        pytest.skip(f"Surrey Face Model share files not found at {SHARE} (set FACEDETAIL_ASSET_MIRROR "
                    "or run `make assets`)")
    return SHARE


@pytest.fixture(scope="module")
def share() -> Path:
    return _need_share()


@pytest.fixture(scope="module")
def sfm(share: Path) -> MorphableModel:
    return load_model_source("sfm", share / MODEL_FILE, share)


@pytest.fixture(scope="module")
def eos_model(share: Path):
    return eos.morphablemodel.load_model(str(share / MODEL_FILE))


@pytest.fixture(scope="module")
def eos_blendshapes(share: Path) -> list:
    return eos.morphablemodel.load_blendshapes(str(share / NAMES.blendshapes))


@pytest.fixture
def share_copy(share: Path, tmp_path: Path) -> Path:
    """A writable copy of the 13 packaged share files."""
    dest = tmp_path / "share"
    dest.mkdir()
    for name in packaged_checksums():
        shutil.copyfile(share / name, dest / name)
    return dest


def _write_blendshapes(path: Path, shapes: list[tuple[str, np.ndarray]]) -> Path:
    """Write a blendshape file in eos's binary format."""
    out = [struct.pack("<Q", len(shapes))]
    for name, data in shapes:
        raw = name.encode("utf-8")
        flat = np.asarray(data, "<f4").reshape(-1)
        out += [struct.pack("<Q", len(raw)), raw, struct.pack("<ii", flat.size, 1), flat.tobytes()]
    path.write_bytes(b"".join(out))
    return path


# ------------------------------------------------------------------------------ counts and contents
def test_counts_and_names(sfm: MorphableModel) -> None:
    assert sfm.mean.shape == (N_VERTICES, 3)
    assert sfm.n_vertices == N_VERTICES
    assert sfm.n_triangles == N_TRIANGLES
    assert sfm.n_shape == N_SHAPE
    assert sfm.shape_std.shape == (N_SHAPE,)
    assert sfm.expression_kind == "blendshapes"
    assert sfm.n_expression == N_EXPR
    assert sfm.expression_names == EMOTIONS
    assert sfm.n_albedo == N_ALBEDO
    assert sfm.albedo_names == ("melanin", "hemoglobin", "lip_tone", "brow_darkness")
    assert sfm.units == "mm"
    assert sfm.name == "sfm_shape_3448"
    assert sfm.mean.dtype == np.float32
    assert sfm.triangles.dtype == np.int32
    assert sfm.uv.shape == (N_VERTICES, 2)
    assert sfm.uv.min() >= 0.0
    assert sfm.uv.max() <= 1.0
    # a face-sized mesh in millimetres (not metres, not micrometres)
    extent = sfm.mean.max(0) - sfm.mean.min(0)
    assert 100 < extent[0] < 250
    assert 100 < extent[1] < 300


def test_bases_are_unit_norm(sfm: MorphableModel) -> None:
    for basis in (sfm.shape_basis, sfm.expression_basis, sfm.albedo_basis):
        norms = np.linalg.norm(basis.reshape(basis.shape[0], -1), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    gram = sfm.shape_basis.reshape(N_SHAPE, -1).astype(np.float64)
    np.testing.assert_allclose(gram @ gram.T, np.eye(N_SHAPE), atol=1e-5)
    assert np.all(sfm.shape_std > 0)
    assert np.all(np.diff(sfm.shape_std) <= 0)  # PCA order: decreasing variance


def test_landmark_map_matches_file(sfm: MorphableModel, share: Path) -> None:
    table = tomllib.loads((share / NAMES.landmark_map).read_text(encoding="utf-8"))["landmark_mappings"]
    expected = np.full(68, -1)
    for key, vertex in table.items():
        expected[int(key) - 1] = vertex
    assert sfm.landmark_vertices.shape == (68,)
    np.testing.assert_array_equal(sfm.landmark_vertices, expected)
    assert set(np.flatnonzero(sfm.landmark_defined) + 1) == {int(k) for k in table}
    assert sfm.landmark_defined.sum() == 50
    assert sfm.landmark_vertices[30] == 114  # iBUG 31, nose tip


def test_contours_match_file(sfm: MorphableModel, share: Path) -> None:
    data = json.loads((share / NAMES.contours).read_text(encoding="utf-8"))["model_contour"]
    assert sfm.contour_right.size == 17
    assert sfm.contour_left.size == 17
    np.testing.assert_array_equal(sfm.contour_right, data["right_contour"])
    np.testing.assert_array_equal(sfm.contour_left, data["left_contour"])


def test_summary(sfm: MorphableModel) -> None:
    assert sfm.summary() == {
        "name": "sfm_shape_3448", "vertices": 3448, "triangles": 6736, "shape_components": 63,
        "expression_kind": "blendshapes", "expression_components": 6, "albedo_components": 4,
        "landmarks_defined": 50, "contour_vertices": 34, "units": "mm",
    }


# ------------------------------------------------------------------------------ against eos
def test_uv_and_triangles_equal_eos(sfm: MorphableModel, eos_model) -> None:
    np.testing.assert_array_equal(sfm.uv, np.asarray(eos_model.get_texture_coordinates(), np.float32))
    np.testing.assert_array_equal(sfm.triangles, np.asarray(eos_model.get_shape_model().get_triangle_list()))
    np.testing.assert_array_equal(
        sfm.mean, np.asarray(eos_model.get_shape_model().get_mean(), np.float32).reshape(-1, 3))


def test_zero_coefficients_give_the_mean_exactly(sfm: MorphableModel) -> None:
    np.testing.assert_array_equal(sfm.vertices(), sfm.mean)
    np.testing.assert_array_equal(sfm.vertices(0, 0), sfm.mean)
    np.testing.assert_array_equal(sfm.vertices(np.zeros(N_SHAPE), np.zeros(N_EXPR)), sfm.mean)
    assert sfm.vertices().shape == (N_VERTICES, 3)
    assert sfm.vertices().dtype == np.float32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shape_matches_eos_draw_sample(sfm: MorphableModel, eos_model, seed: int) -> None:
    alpha = np.random.default_rng(seed).standard_normal(N_SHAPE).astype(np.float32) * 1.5
    ref = np.asarray(eos_model.get_shape_model().draw_sample(alpha)).reshape(-1, 3)
    ours = sfm.vertices(alpha)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    assert np.abs(ours - sfm.mean).max() > 1.0  # the sample really moved the face


def test_partial_alpha_matches_eos(sfm: MorphableModel, eos_model) -> None:
    alpha = np.array([2.0, -1.0, 0.5], np.float32)
    ref = np.asarray(eos_model.get_shape_model().draw_sample(alpha)).reshape(-1, 3)
    np.testing.assert_allclose(sfm.vertices(alpha), ref, atol=1e-3, rtol=0)


def test_read_blendshapes_equals_eos(share: Path, eos_blendshapes: list) -> None:
    names, deformations = read_blendshapes(share / NAMES.blendshapes)
    assert names == [b.name for b in eos_blendshapes] == list(EMOTIONS)
    assert deformations.shape == (N_EXPR, 3 * N_VERTICES)
    assert deformations.dtype == np.float32
    for k, b in enumerate(eos_blendshapes):
        np.testing.assert_array_equal(deformations[k], np.asarray(b.deformation, np.float32))


@pytest.mark.parametrize("k", range(N_EXPR))
def test_blendshape_unit_weight_is_eos_deformation(sfm: MorphableModel, eos_blendshapes: list,
                                                   k: int) -> None:
    beta = np.zeros(N_EXPR, np.float32)
    beta[k] = 1.0
    deformation = np.asarray(eos_blendshapes[k].deformation).reshape(-1, 3)
    np.testing.assert_allclose(sfm.vertices(None, beta), sfm.mean + deformation, atol=1e-4, rtol=0)
    np.testing.assert_allclose(sfm.expression_std[k], np.linalg.norm(deformation), rtol=1e-5)
    assert np.abs(deformation).max() > 1.0


def test_identity_and_expression_add_up(sfm: MorphableModel) -> None:
    rng = np.random.default_rng(5)
    alpha, beta = rng.standard_normal(N_SHAPE), rng.uniform(0, 1, N_EXPR)
    both = sfm.vertices(alpha, beta)
    separate = sfm.vertices(alpha) + sfm.vertices(None, beta) - sfm.mean
    np.testing.assert_allclose(both, separate, atol=1e-3)


# ------------------------------------------------------------------------------ batching
def test_batched_vertices_equal_single_calls(sfm: MorphableModel) -> None:
    rng = np.random.default_rng(11)
    A = rng.standard_normal((4, N_SHAPE)).astype(np.float32)
    Bt = rng.uniform(0, 1, (4, N_EXPR)).astype(np.float32)
    batched = sfm.vertices(A, Bt)
    assert batched.shape == (4, N_VERTICES, 3)
    single = np.stack([sfm.vertices(a, b) for a, b in zip(A, Bt, strict=True)])
    np.testing.assert_allclose(batched, single, atol=1e-4, rtol=0)
    assert np.abs(batched[0] - batched[1]).max() > 1.0


def test_batch_broadcasts_against_a_single_vector(sfm: MorphableModel) -> None:
    rng = np.random.default_rng(12)
    A = rng.standard_normal((3, N_SHAPE)).astype(np.float32)
    beta = rng.uniform(0, 1, N_EXPR).astype(np.float32)
    out = sfm.vertices(A, beta)
    assert out.shape == (3, N_VERTICES, 3)
    np.testing.assert_allclose(out[2], sfm.vertices(A[2], beta), atol=1e-4, rtol=0)
    assert sfm.vertices(None, np.zeros((2, N_EXPR))).shape == (2, N_VERTICES, 3)
    assert sfm.vertices(A[:1]).shape == (1, N_VERTICES, 3)  # a (1, K) batch stays batched


def test_fewer_coefficients_are_zero_padded(sfm: MorphableModel) -> None:
    alpha = np.array([1.0, -2.0, 0.5], np.float32)
    beta = np.array([0.0, 0.7], np.float32)
    full_a = np.zeros(N_SHAPE, np.float32)
    full_a[:3] = alpha
    full_b = np.zeros(N_EXPR, np.float32)
    full_b[:2] = beta
    np.testing.assert_array_equal(sfm.vertices(alpha, beta), sfm.vertices(full_a, full_b))
    np.testing.assert_array_equal(sfm.vertices(alpha[None].repeat(2, 0))[1], sfm.vertices(full_a))


@pytest.mark.parametrize(("alpha", "beta"), [
    (np.zeros(N_SHAPE + 1), None),
    (None, np.zeros(N_EXPR + 1)),
    (np.zeros((2, N_SHAPE + 1)), None),
    (np.zeros((2, 2, N_SHAPE)), None),
])
def test_too_many_coefficients_raise(sfm: MorphableModel, alpha, beta) -> None:
    with pytest.raises(ValueError, match="coefficients"):
        sfm.vertices(alpha, beta)


def test_mismatched_batch_sizes_raise(sfm: MorphableModel) -> None:
    with pytest.raises(ValueError, match="batch sizes differ"):
        sfm.vertices(np.zeros((2, N_SHAPE)), np.zeros((3, N_EXPR)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        sfm.landmarks(np.zeros((4, 5)), np.zeros((2, 2)))


# ------------------------------------------------------------------------------ landmarks
def test_landmarks(sfm: MorphableModel) -> None:
    alpha = np.random.default_rng(3).standard_normal(N_SHAPE)
    verts = sfm.vertices(alpha)
    lm = sfm.landmarks(alpha)
    assert lm.shape == (68, 3)
    nan_rows = np.isnan(lm)
    np.testing.assert_array_equal(nan_rows.all(1), ~sfm.landmark_defined)
    np.testing.assert_array_equal(nan_rows.any(1), ~sfm.landmark_defined)
    defined = sfm.landmark_defined
    np.testing.assert_array_equal(lm[defined], verts[sfm.landmark_vertices[defined]])
    np.testing.assert_array_equal(lm[30], verts[114])
    assert np.isnan(lm[0]).all()  # iBUG 1 is a contour point


def test_landmarks_batched(sfm: MorphableModel) -> None:
    rng = np.random.default_rng(4)
    A, Bt = rng.standard_normal((3, N_SHAPE)), rng.uniform(0, 1, (3, N_EXPR))
    lm = sfm.landmarks(A, Bt)
    assert lm.shape == (3, 68, 3)
    np.testing.assert_array_equal(np.isnan(lm).all(-1), np.broadcast_to(~sfm.landmark_defined, (3, 68)))
    for i in range(3):
        np.testing.assert_allclose(lm[i], sfm.landmarks(A[i], Bt[i]), atol=1e-4, equal_nan=True)


# ------------------------------------------------------------------------------ normals
def _area_weighted_normals(verts: np.ndarray, tri: np.ndarray) -> np.ndarray:
    v = verts.astype(np.float64)
    face = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
    acc = np.zeros_like(v)
    for c in range(3):
        np.add.at(acc, tri[:, c], face)
    return acc / np.linalg.norm(acc, axis=1, keepdims=True)


def test_vertex_normals_on_the_mean(sfm: MorphableModel) -> None:
    normals = sfm.vertex_normals()
    assert normals.shape == (N_VERTICES, 3)
    assert normals.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    nose_tip = sfm.landmark_vertices[30]
    assert normals[nose_tip, 2] > 0.9  # the face looks towards +z and triangles are CCW from outside
    np.testing.assert_allclose(normals, _area_weighted_normals(sfm.mean, sfm.triangles), atol=1e-5)


def test_vertex_normals_close_to_trimesh(sfm: MorphableModel) -> None:
    verts = sfm.vertices(np.random.default_rng(8).standard_normal(N_SHAPE))
    ref = trimesh.Trimesh(verts, sfm.triangles, process=False).vertex_normals  # angle-weighted
    cosine = (sfm.vertex_normals(verts) * ref).sum(1)
    assert np.median(cosine) > 0.99
    assert np.mean(cosine > 0.95) > 0.98


def test_vertex_normals_batched(sfm: MorphableModel) -> None:
    rng = np.random.default_rng(9)
    verts = sfm.vertices(rng.standard_normal((3, N_SHAPE)), rng.uniform(0, 1, (3, N_EXPR)))
    batched = sfm.vertex_normals(verts)
    assert batched.shape == (3, N_VERTICES, 3)
    for i in range(3):
        np.testing.assert_allclose(batched[i], sfm.vertex_normals(verts[i]), atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-2


def test_to_trimesh(sfm: MorphableModel) -> None:
    mesh = sfm.to_trimesh(colors=sfm.albedo())
    assert mesh.vertices.shape == (N_VERTICES, 3)
    np.testing.assert_array_equal(mesh.faces, sfm.triangles)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], (sfm.albedo() * 255).astype(np.uint8))


# ------------------------------------------------------------------------------ albedo
def _forehead_vertex(model: MorphableModel) -> int:
    """The mean-shape vertex nearest to 30 mm above the midpoint of the inner brow corners (iBUG 22, 23)."""
    brow = (model.mean[model.landmark_vertices[21]] + model.mean[model.landmark_vertices[22]]) / 2
    target = brow + np.array([0.0, 30.0, 0.0])
    return int(np.linalg.norm(model.mean - target, axis=1).argmin())


def test_albedo_range_and_regions(sfm: MorphableModel) -> None:
    albedo = sfm.albedo()
    assert albedo.shape == (N_VERTICES, 3)
    assert albedo.dtype == np.float32
    assert albedo.min() >= 0.0
    assert albedo.max() <= 1.0
    lip = albedo[sfm.landmark_vertices[51]]  # iBUG 52, upper lip centre
    forehead = albedo[_forehead_vertex(sfm)]
    np.testing.assert_allclose(forehead, BASE_SKIN, atol=0.03)
    assert lip[0] / lip[1] > 1.25 * forehead[0] / forehead[1]
    assert lip[1] < forehead[1] - 0.1
    brow = albedo[sfm.landmark_vertices[19]]  # iBUG 20, brow middle: darker than skin
    assert brow.sum() < 0.6 * forehead.sum()
    assert np.all(albedo[:, 0] >= albedo[:, 2])  # skin-like: red never below blue


def test_albedo_coefficients_change_the_colour(sfm: MorphableModel) -> None:
    base = sfm.albedo()
    forehead, lip = _forehead_vertex(sfm), sfm.landmark_vertices[51]
    melanin = sfm.albedo([1.0])
    assert melanin.sum() < 0.8 * base.sum()
    np.testing.assert_allclose(melanin[forehead], 0.7 * base[forehead], atol=1e-3)  # delta = -0.3 * mean
    hemoglobin = sfm.albedo([0.0, 1.0])
    assert hemoglobin[lip, 0] > base[lip, 0] + 0.03
    assert hemoglobin[lip, 1] < base[lip, 1] - 0.02
    lip_tone = sfm.albedo([0.0, 0.0, 1.0])
    assert lip_tone[lip, 0] > base[lip, 0] + 0.03
    np.testing.assert_allclose(lip_tone[forehead], base[forehead], atol=1e-4)
    extreme = sfm.albedo([-50.0, 50.0, 50.0, 50.0])
    assert extreme.min() >= 0.0
    assert extreme.max() <= 1.0
    assert extreme.max() == 1.0  # clipped
    batch = sfm.albedo(np.eye(N_ALBEDO))
    assert batch.shape == (N_ALBEDO, N_VERTICES, 3)
    np.testing.assert_allclose(batch[1], hemoglobin, atol=1e-6)
    with pytest.raises(ValueError, match="albedo"):
        sfm.albedo(np.zeros(N_ALBEDO + 1))


# ------------------------------------------------------------------------------ storage
def _assert_same_model(a: MorphableModel, b: MorphableModel) -> None:
    for name in MorphableModel._ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in ("name", "expression_kind", "expression_names", "albedo_names", "units", "provenance"):
        assert getattr(a, name) == getattr(b, name), name


def test_save_load_round_trip(sfm: MorphableModel, tmp_path: Path) -> None:
    path = sfm.save(tmp_path / "model.npz")
    assert path == tmp_path / "model.npz"
    loaded = MorphableModel.load(path)
    _assert_same_model(sfm, loaded)
    np.testing.assert_array_equal(loaded.vertices([1.0, 2.0], [0.5]), sfm.vertices([1.0, 2.0], [0.5]))
    assert loaded.provenance["albedo"]["version"] == "facedetail-synthetic-skin-v1"


def test_to_bytes_is_deterministic(sfm: MorphableModel, tmp_path: Path) -> None:
    first = sfm.to_bytes()
    assert first == sfm.to_bytes()
    a = sfm.save(tmp_path / "a.npz")
    b = MorphableModel.load(a).save(tmp_path / "b.npz")
    c = sfm.save(tmp_path / "c.npz")
    assert a.read_bytes() == b.read_bytes() == c.read_bytes() == first
    # determinism does not hang on the clock: fixed timestamps, sorted entries, no compression
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        infos = zf.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(f"{n}.npy" for n in (*MorphableModel._ARRAYS, "meta"))
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.compress_type for info in infos} == {zipfile.ZIP_STORED}


def test_npz_readable_without_pickle(sfm: MorphableModel, tmp_path: Path) -> None:
    path = sfm.save(tmp_path / "model.npz")
    with np.load(path) as npz:  # allow_pickle defaults to False
        assert set(npz.files) == {*MorphableModel._ARRAYS, "meta"}
        np.testing.assert_array_equal(npz["mean"], sfm.mean)
        np.testing.assert_array_equal(npz["triangles"], sfm.triangles)
        meta = json.loads(str(npz["meta"]))
    assert meta["format_version"] == 1
    assert meta["expression_names"] == list(EMOTIONS)
    assert meta["units"] == "mm"


def test_load_rejects_other_format_version(sfm: MorphableModel, tmp_path: Path) -> None:
    with np.load(sfm.save(tmp_path / "model.npz")) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["format_version"] = 99
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(SourceFileError, match="format version 99"):
        MorphableModel.load(tmp_path / "future.npz")


# ------------------------------------------------------------------------------ validate
def _with_nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[10, 1] = np.nan
    return a


def _with_value(a: np.ndarray, value: int) -> np.ndarray:
    a = a.copy()
    a.flat[5] = value
    return a


@pytest.mark.parametrize(("field", "make", "message"), [
    ("uv", lambda m: m.uv[:-1], "uv must be"),
    ("uv", lambda m: m.uv * 1.5, "uv outside"),
    ("triangles", lambda m: _with_value(m.triangles, N_VERTICES), "triangle indices out of range"),
    ("triangles", lambda m: _with_value(m.triangles, -1), "triangle indices out of range"),
    ("triangles", lambda m: m.triangles[:, :2], "triangles must be"),
    ("mean", lambda m: _with_nan(m.mean), "non-finite"),
    ("shape_basis", lambda m: _with_nan(m.shape_basis[0])[None].repeat(N_SHAPE, 0), "non-finite"),
    ("shape_std", lambda m: m.shape_std[:-1], "shape_std"),
    ("shape_basis", lambda m: m.shape_basis[:, :-1], "shape_basis"),
    ("expression_names", lambda m: m.expression_names[:-1], "expression_names"),
    ("albedo_mean", lambda m: m.albedo_mean[:-1], "albedo_mean"),
    ("albedo_std", lambda m: m.albedo_std[:2], "albedo_std"),
    ("landmark_vertices", lambda m: m.landmark_vertices[:-1], "68 rows"),
    ("landmark_vertices", lambda m: _with_value(m.landmark_vertices, N_VERTICES), "landmark vertex out of"),
    ("landmark_vertices", lambda m: _with_value(m.landmark_vertices, -2), "landmark vertex out of"),
    ("contour_left", lambda m: _with_value(m.contour_left, N_VERTICES), "contour vertex out of range"),
])
def test_validate_rejects_inconsistent_arrays(sfm: MorphableModel, field: str, make, message: str) -> None:
    bad = make(sfm)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(sfm, **{field: bad})


@pytest.mark.parametrize("change, message", [
    (lambda m: {"triangles": np.where(m.triangles == 0, m.n_vertices, m.triangles)}, "triangle indices out of range"),
    (lambda m: {"uv": m.uv + 1.5}, "uv outside"),
    (lambda m: {"shape_std": m.shape_std[:-1]}, "shape_std must be"),
    (lambda m: {"landmark_vertices": m.landmark_vertices[:60]}, "68 rows"),
    (lambda m: {"mean": np.where(np.arange(m.n_vertices)[:, None] == 7, np.nan, m.mean)}, "non-finite"),
    (lambda m: {"expression_names": m.expression_names[:-1]}, "expression_names must have"),
])
def test_validate_names_the_broken_array(sfm: MorphableModel, change, message: str) -> None:
    sfm.validate()  # the loaded model is consistent ...
    with pytest.raises(ValueError, match=message):  # ... and each kind of damage is caught, by name
        dataclasses.replace(sfm, **change(sfm))


def test_expression_kind_none_needs_no_components(sfm: MorphableModel) -> None:
    with pytest.raises(ValueError, match="expression_kind 'none'"):
        dataclasses.replace(sfm, expression_kind="none")


# ------------------------------------------------------------------------------ bad sources
def _assert_names(err: pytest.ExceptionInfo[SourceFileError], path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert err.value.path == path


def test_missing_model_file(share_copy: Path) -> None:
    missing = share_copy / "nope.bin"
    with pytest.raises(SourceFileError, match="not found") as err:
        load_model_source("sfm", missing, share_copy)
    _assert_names(err, missing)


@pytest.mark.parametrize("name", [NAMES.blendshapes, NAMES.landmark_map, NAMES.contours])
def test_missing_share_file(share_copy: Path, name: str) -> None:
    (share_copy / name).unlink()
    with pytest.raises(SourceFileError, match="not found") as err:
        load_model_source("sfm", share_copy / MODEL_FILE, share_copy)
    _assert_names(err, share_copy / name)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_model_file(share_copy: Path, keep: float) -> None:
    path = share_copy / MODEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(SourceFileError, match="eos could not read it") as err:
        load_model_source("sfm", path, share_copy)
    _assert_names(err, path)


def test_text_file_named_bin(share_copy: Path) -> None:
    path = share_copy / "model.bin"
    path.write_text("this is not a morphable model\n" * 20, encoding="utf-8")
    with pytest.raises(SourceFileError) as err:
        load_model_source("sfm", path, share_copy)
    _assert_names(err, path)


@pytest.mark.parametrize("corrupt", [
    lambda d: d[:len(d) // 2],
    lambda d: d[:20],
    lambda d: b"",
    lambda d: d + b"\0\0\0\0",
    lambda d: struct.pack("<Q", 2**40) + d[8:],
])
def test_corrupt_blendshape_file(share_copy: Path, corrupt) -> None:
    path = share_copy / NAMES.blendshapes
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(SourceFileError) as err:
        load_model_source("sfm", share_copy / MODEL_FILE, share_copy)
    _assert_names(err, path)


def test_blendshapes_for_another_vertex_count(share_copy: Path) -> None:
    rng = np.random.default_rng(0)
    path = _write_blendshapes(share_copy / NAMES.blendshapes,
                              [(name, rng.standard_normal(300)) for name in EMOTIONS])
    names, deformations = read_blendshapes(path)  # the file itself is well-formed
    assert names == list(EMOTIONS)
    assert deformations.shape == (6, 300)
    with pytest.raises(SourceFileError, match="for 100 vertices, the model has 3448") as err:
        load_model_source("sfm", share_copy / MODEL_FILE, share_copy)
    _assert_names(err, path)


def test_blendshape_writer_matches_eos_format(tmp_path: Path) -> None:
    data = np.arange(30, dtype=np.float32)
    path = _write_blendshapes(tmp_path / "b.bin", [("smile", data), ("frown", -data)])
    shapes = eos.morphablemodel.load_blendshapes(str(path))
    assert [s.name for s in shapes] == ["smile", "frown"]
    np.testing.assert_array_equal(np.asarray(shapes[1].deformation, np.float32), -data)
    names, deformations = read_blendshapes(path)
    assert names == ["smile", "frown"]
    np.testing.assert_array_equal(deformations, np.stack([data, -data]))


@pytest.mark.parametrize(("text", "match"), [
    ("[landmark_mappings]\n9 = 3448\n", "maps a landmark to vertex 3448 but the model has 3448"),
    ("[landmark_mappings]\n9 = 100000\n31 = 114\n", "vertex 100000"),
    ("[landmark_mappings]\n69 = 5\n", "not a valid iBUG landmark map"),
    ("[other]\n9 = 5\n", "not a valid iBUG landmark map"),
    ("[landmark_mappings\n9 = 5\n", "not a valid iBUG landmark map"),
    ("[landmark_mappings]\n9 = \"tip\"\n", "not a valid iBUG landmark map"),
])
def test_bad_landmark_map(share_copy: Path, text: str, match: str) -> None:
    path = share_copy / NAMES.landmark_map
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SourceFileError, match=match) as err:
        load_model_source("sfm", share_copy / MODEL_FILE, share_copy)
    _assert_names(err, path)


def test_negative_vertex_in_landmark_map(share_copy: Path) -> None:
    path = share_copy / NAMES.landmark_map
    path.write_text("[landmark_mappings]\n9 = -5\n31 = 114\n", encoding="utf-8")
    with pytest.raises(SourceFileError) as err:
        load_model_source("sfm", share_copy / MODEL_FILE, share_copy)
    _assert_names(err, path)


@pytest.mark.parametrize(("text", "match"), [
    ("{not json", "not a valid contour file"),
    ('{"model_contour": {"right_contour": [1, 2]}}', "not a valid contour file"),
    ('{"model_contour": {"right_contour": [], "left_contour": [1]}}', "non-empty"),
    ('{"model_contour": {"right_contour": [1, 3448], "left_contour": [1]}}', "outside 0..3447"),
    ('{"model_contour": {"right_contour": [-1], "left_contour": [1]}}', "outside 0..3447"),
])
def test_bad_contours(share_copy: Path, text: str, match: str) -> None:
    path = share_copy / NAMES.contours
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SourceFileError, match=match) as err:
        load_model_source("sfm", share_copy / MODEL_FILE, share_copy)
    _assert_names(err, path)


def test_unknown_format(share_copy: Path) -> None:
    with pytest.raises(ValueError, match="unknown face model format"):
        load_model_source("flame", share_copy / MODEL_FILE, share_copy)  # type: ignore[arg-type]


def test_share_copy_loads_like_the_original(sfm: MorphableModel, share_copy: Path) -> None:
    copy = load_model_source("sfm", share_copy / MODEL_FILE, share_copy)
    assert copy.to_bytes() == sfm.to_bytes()
    fewer = load_model_source("sfm", share_copy / MODEL_FILE, share_copy, albedo_components=2)
    assert fewer.albedo_names == ("melanin", "hemoglobin")
    np.testing.assert_array_equal(fewer.albedo_mean, sfm.albedo_mean)


# ------------------------------------------------------------------------------ preview
def test_render_preview(sfm: MorphableModel) -> None:
    tile, label = 64, 22
    image = render_preview(sfm, tile_size=tile)
    assert image.dtype == np.uint8
    assert image.shape == (2 * (tile + label), 4 * tile, 3)
    for i in range(8):
        r, c = divmod(i, 4)
        top, left = r * (tile + label), c * tile
        render = image[top + label:top + label + tile, left:left + tile]
        centre = render[tile // 2 - 2:tile // 2 + 2, tile // 2 - 2:tile // 2 + 2]
        if i < 7:  # mean + 6 expressions: a face in the middle, a text label above
            assert np.all(centre.max(-1) < 250), f"tile {i} has no face at its centre"
            assert image[top:top + label, left:left + tile].min() < 128, f"tile {i} has no label"
        else:  # padding tile
            assert np.all(image[top:top + tile + label, left:left + tile] == 255)
    assert np.array_equal(image, render_preview(sfm, tile_size=tile))
