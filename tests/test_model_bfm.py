"""Tests of the Basel Face Model loaders on tiny synthetic BFM 2017 (.h5) and BFM 2009 (.mat) files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from facedetail.errors import SourceFileError
from facedetail.model import SHARE_FILES, MorphableModel, load_model_source
from facedetail.model.bfm import cylindrical_uv
from facedetail.render.preview import preview_expressions

ROWS, COLS = 10, 10
V = ROWS * COLS
KS, KE, KC = 5, 3, 4
LANDMARKS = {9: 5, 31: 55, 37: 41, 46: 48, 52: 65}  # iBUG id (1-based) -> vertex
RIGHT_CONTOUR, LEFT_CONTOUR = [0, 10, 20, 30], [9, 19, 29]
CENTRE_VERTEX = 4 * COLS + 5  # middle row, the column nearest to theta = 0 (facing +z)


@dataclass(frozen=True)
class Synthetic:
    """A half-cylinder 'face' with random orthonormal PCA parts."""

    mean: np.ndarray  # (V, 3) mm
    triangles: np.ndarray  # (T, 3) CCW from outside
    shape_basis: np.ndarray  # (3V, KS), orthonormal columns
    shape_var: np.ndarray  # (KS,) mm^2
    expr_basis: np.ndarray
    expr_var: np.ndarray
    colour_mean: np.ndarray  # (V, 3) in [0, 1]
    colour_basis: np.ndarray
    colour_var: np.ndarray


def _orthonormal(rng: np.random.Generator, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((3 * V, k)))
    return q


def make_synthetic(seed: int = 0) -> Synthetic:
    rng = np.random.default_rng(seed)
    theta = np.linspace(-0.45 * np.pi, 0.45 * np.pi, COLS)
    y = np.linspace(60.0, -60.0, ROWS)  # top row first
    radius = 80.0
    tt, yy = np.meshgrid(theta, y)
    mean = np.column_stack([radius * np.sin(tt).ravel(), yy.ravel(), radius * np.cos(tt).ravel()])
    tris = []
    for i in range(ROWS - 1):
        for j in range(COLS - 1):
            a, b, c, d = i * COLS + j, i * COLS + j + 1, (i + 1) * COLS + j, (i + 1) * COLS + j + 1
            # rows go down (-y), columns go +theta: (a, c, b) and (b, c, d) are CCW seen from outside
            tris += [(a, c, b), (b, c, d)]
    return Synthetic(
        mean=mean, triangles=np.asarray(tris, np.int64),
        shape_basis=_orthonormal(rng, KS), shape_var=np.array([400.0, 100.0, 50.0, 20.0, 10.0]),
        expr_basis=_orthonormal(rng, KE), expr_var=np.array([30.0, 10.0, 5.0]),
        colour_mean=rng.uniform(0.3, 0.7, (V, 3)), colour_basis=_orthonormal(rng, KC),
        colour_var=np.array([0.01, 0.004, 0.002, 0.001]),
    )


SYN = make_synthetic()


def write_share(directory: Path, fmt: str, landmarks: dict[int, int] | None = None) -> Path:
    names = SHARE_FILES[fmt]
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# tiny test map", "[landmark_mappings]"]
    lines += [f"{k} = {v}  # landmark {k}" for k, v in (LANDMARKS if landmarks is None else landmarks).items()]
    (directory / names.landmark_map).write_text("\n".join(lines) + "\n", encoding="utf-8")
    contours = {"model_contour": {"right_contour": RIGHT_CONTOUR, "left_contour": LEFT_CONTOUR}}
    (directory / names.contours).write_text(json.dumps(contours), encoding="utf-8")
    return directory


def write_bfm2017(path: Path, syn: Synthetic = SYN, *, skip: str | None = None,
                  overrides: dict[str, np.ndarray] | None = None) -> Path:
    """Write a BFM 2017 HDF5 file with the real layout; ``skip`` leaves out a group or dataset."""
    data = {
        "shape/model/mean": syn.mean.reshape(-1).astype(np.float32),
        "shape/model/pcaBasis": syn.shape_basis.astype(np.float32),
        "shape/model/pcaVariance": syn.shape_var.astype(np.float32),
        "expression/model/mean": np.zeros(3 * V, np.float32),
        "expression/model/pcaBasis": syn.expr_basis.astype(np.float32),
        "expression/model/pcaVariance": syn.expr_var.astype(np.float32),
        "color/model/mean": syn.colour_mean.reshape(-1).astype(np.float32),
        "color/model/pcaBasis": syn.colour_basis.astype(np.float32),
        "color/model/pcaVariance": syn.colour_var.astype(np.float32),
        "shape/representer/points": syn.mean.T.astype(np.float32),
        "shape/representer/cells": syn.triangles.T.astype(np.int32),
    }
    data.update(overrides or {})
    with h5py.File(path, "w") as hf:
        for key, value in data.items():
            if skip is None or not key.startswith(skip):
                hf.create_dataset(key, data=value)
    return path


def bfm2009_arrays(syn: Synthetic = SYN) -> dict[str, np.ndarray]:
    """The arrays of a BFM 2009 .mat file: micrometres, colour in [0, 255], std devs, clockwise 1-based tl."""
    return {
        "shapeMU": (syn.mean.reshape(-1, 1) * 1e3),
        "shapePC": syn.shape_basis,
        "shapeEV": np.sqrt(syn.shape_var).reshape(-1, 1) * 1e3,
        "texMU": syn.colour_mean.reshape(-1, 1) * 255.0,
        "texPC": syn.colour_basis,
        "texEV": np.sqrt(syn.colour_var).reshape(-1, 1) * 255.0,
        "tl": (syn.triangles[:, [0, 2, 1]] + 1).astype(np.float64),  # as in the real file: doubles
    }


def write_bfm2009(path: Path, arrays: dict[str, np.ndarray] | None = None) -> Path:
    scipy.io.savemat(str(path), bfm2009_arrays() if arrays is None else arrays)
    return path


@pytest.fixture(scope="module")
def bfm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bfm")
    write_share(root / "share", "bfm2017")
    write_share(root / "share", "bfm2009")
    write_bfm2017(root / "model2017-1_bfm_nomouth.h5")
    write_bfm2009(root / "01_MorphableModel.mat")
    return root


@pytest.fixture(scope="module")
def bfm2017(bfm_dir: Path) -> MorphableModel:
    return load_model_source("bfm2017", bfm_dir / "model2017-1_bfm_nomouth.h5", bfm_dir / "share")


@pytest.fixture(scope="module")
def bfm2009(bfm_dir: Path) -> MorphableModel:
    return load_model_source("bfm2009", bfm_dir / "01_MorphableModel.mat", bfm_dir / "share")


def _expected_landmarks() -> np.ndarray:
    out = np.full(68, -1)
    for ibug, vertex in LANDMARKS.items():
        out[ibug - 1] = vertex
    return out


def _assert_names(err: pytest.ExceptionInfo[SourceFileError], path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert err.value.path == path


# ------------------------------------------------------------------------------ the synthetic mesh itself
def test_synthetic_mesh_is_sane() -> None:
    assert SYN.mean.shape == (V, 3)
    assert SYN.triangles.shape == (2 * (ROWS - 1) * (COLS - 1), 3)
    gram = SYN.shape_basis.T @ SYN.shape_basis
    np.testing.assert_allclose(gram, np.eye(KS), atol=1e-12)
    v = SYN.mean
    face_n = np.cross(v[SYN.triangles[:, 1]] - v[SYN.triangles[:, 0]], v[SYN.triangles[:, 2]] - v[SYN.triangles[:, 0]])
    centroid = v[SYN.triangles].mean(1)
    outward = centroid * np.array([1.0, 0.0, 1.0])
    assert np.all((face_n * outward).sum(1) > 0)  # CCW seen from outside


# ------------------------------------------------------------------------------ BFM 2017
def test_bfm2017_contents(bfm2017: MorphableModel) -> None:
    m = bfm2017
    assert m.name == "model2017-1_bfm_nomouth"
    assert (m.n_vertices, m.n_triangles, m.n_shape, m.n_expression, m.n_albedo) == (V, 162, KS, KE, KC)
    assert m.expression_kind == "pca"
    assert m.expression_names == ("exp_0", "exp_1", "exp_2")
    assert m.albedo_names == ("albedo_0", "albedo_1", "albedo_2", "albedo_3")
    assert m.units == "mm"
    assert m.provenance["format"] == "bfm2017"
    np.testing.assert_allclose(m.mean, SYN.mean, atol=1e-4)
    np.testing.assert_array_equal(m.mean, SYN.mean.astype(np.float32))
    np.testing.assert_array_equal(m.triangles, SYN.triangles)
    assert m.triangles.dtype == np.int32
    np.testing.assert_allclose(m.albedo_mean, SYN.colour_mean, atol=1e-6)
    np.testing.assert_allclose(m.shape_std, np.sqrt(SYN.shape_var), rtol=1e-5)
    np.testing.assert_allclose(m.expression_std, np.sqrt(SYN.expr_var), rtol=1e-5)
    np.testing.assert_allclose(m.albedo_std, np.sqrt(SYN.colour_var), rtol=1e-5)
    np.testing.assert_allclose(m.shape_basis.reshape(KS, -1), SYN.shape_basis.T, atol=1e-6)


def test_bfm2017_vertices_follow_the_file(bfm2017: MorphableModel) -> None:
    rng = np.random.default_rng(1)
    for _ in range(3):
        alpha, beta = rng.standard_normal(KS), rng.standard_normal(KE)
        expected = (SYN.mean.reshape(-1) + SYN.shape_basis @ (alpha * np.sqrt(SYN.shape_var))
                    + SYN.expr_basis @ (beta * np.sqrt(SYN.expr_var))).reshape(V, 3)
        out = bfm2017.vertices(alpha, beta)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
        assert np.abs(out - bfm2017.mean).max() > 0.5
    np.testing.assert_array_equal(bfm2017.vertices(), bfm2017.mean)


def test_bfm2017_batched_vertices(bfm2017: MorphableModel) -> None:
    rng = np.random.default_rng(2)
    A, Bt = rng.standard_normal((4, KS)), rng.standard_normal((4, KE))
    out = bfm2017.vertices(A, Bt)
    assert out.shape == (4, V, 3)
    for i in range(4):
        np.testing.assert_allclose(out[i], bfm2017.vertices(A[i], Bt[i]), atol=1e-5)
    with pytest.raises(ValueError, match="expression coefficients"):
        bfm2017.vertices(None, np.zeros(KE + 1))


def test_bfm2017_albedo_follows_the_file(bfm2017: MorphableModel) -> None:
    gamma = np.array([1.0, -0.5, 0.25, 2.0])
    expected = np.clip(SYN.colour_mean.reshape(-1) + SYN.colour_basis @ (gamma * np.sqrt(SYN.colour_var)), 0, 1)
    np.testing.assert_allclose(bfm2017.albedo(gamma), expected.reshape(V, 3), atol=1e-5)
    np.testing.assert_allclose(bfm2017.albedo(), SYN.colour_mean, atol=1e-6)


def test_bfm2017_uv_landmarks_contours(bfm2017: MorphableModel) -> None:
    m = bfm2017
    assert m.uv.shape == (V, 2)
    assert m.uv.min() >= 0.0
    assert m.uv.max() <= 1.0
    np.testing.assert_allclose([m.uv[:, 0].min(), m.uv[:, 0].max()], [0.02, 0.98], atol=1e-6)
    np.testing.assert_array_equal(m.uv, cylindrical_uv(SYN.mean.astype(np.float32).astype(np.float64)))
    # u follows the angle (left to right), v runs down: the top row has the smallest v
    assert np.all(np.diff(m.uv.reshape(ROWS, COLS, 2)[:, :, 0], axis=1) > 0)
    assert np.all(np.diff(m.uv.reshape(ROWS, COLS, 2)[:, :, 1], axis=0) > 0)
    np.testing.assert_array_equal(m.landmark_vertices, _expected_landmarks())
    assert m.landmark_defined.sum() == len(LANDMARKS)
    lm = m.landmarks()
    assert lm.shape == (68, 3)
    np.testing.assert_array_equal(lm[30], m.mean[55])
    np.testing.assert_array_equal(np.isnan(lm).all(1), ~m.landmark_defined)
    np.testing.assert_array_equal(m.contour_right, RIGHT_CONTOUR)
    np.testing.assert_array_equal(m.contour_left, LEFT_CONTOUR)


def test_bfm2017_normals_face_outwards(bfm2017: MorphableModel) -> None:
    normals = bfm2017.vertex_normals()
    assert normals[CENTRE_VERTEX, 2] > 0.9
    outward = bfm2017.mean * np.array([1.0, 0.0, 1.0])
    outward /= np.linalg.norm(outward, axis=1, keepdims=True)
    assert np.all((normals * outward).sum(1) > 0.9)


def test_bfm2017_non_unit_basis_keeps_the_product(tmp_path: Path, bfm_dir: Path) -> None:
    scale = np.array([2.0, 0.5, 1.0, 3.0, 1.0], np.float32)
    path = write_bfm2017(tmp_path / "scaled.h5",
                         overrides={"shape/model/pcaBasis": (SYN.shape_basis * scale).astype(np.float32)})
    m = load_model_source("bfm2017", path, bfm_dir / "share")
    np.testing.assert_allclose(np.linalg.norm(m.shape_basis.reshape(KS, -1), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(m.shape_std, np.sqrt(SYN.shape_var) * scale, rtol=1e-5)
    alpha = np.array([1.0, -1.0, 0.5, 0.3, 2.0])
    expected = SYN.mean.reshape(-1) + (SYN.shape_basis * scale) @ (alpha * np.sqrt(SYN.shape_var))
    np.testing.assert_allclose(m.vertices(alpha), expected.reshape(V, 3), atol=1e-4, rtol=0)


def test_bfm2017_round_trip(bfm2017: MorphableModel, tmp_path: Path) -> None:
    loaded = MorphableModel.load(bfm2017.save(tmp_path / "bfm.npz"))
    for name in MorphableModel._ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(bfm2017, name), err_msg=name)
    assert loaded.expression_kind == "pca"
    assert loaded.to_bytes() == bfm2017.to_bytes()


def test_bfm2017_preview_labels(bfm2017: MorphableModel) -> None:
    items = preview_expressions(bfm2017, pca_sigma=2.0)
    assert [label for label, _ in items] == ["mean", "exp_0 +2sd", "exp_1 +2sd", "exp_2 +2sd"]
    np.testing.assert_array_equal(items[2][1], [0.0, 2.0, 0.0])


# ------------------------------------------------------------------------------ BFM 2009
def test_bfm2009_contents(bfm2009: MorphableModel) -> None:
    m = bfm2009
    assert m.name == "01_MorphableModel"
    assert (m.n_vertices, m.n_triangles, m.n_shape, m.n_expression, m.n_albedo) == (V, 162, KS, 0, KC)
    assert m.expression_kind == "none"
    assert m.expression_names == ()
    assert m.expression_basis.shape == (0, V, 3)
    assert m.units == "mm"
    assert m.provenance["format"] == "bfm2009"
    np.testing.assert_allclose(m.mean, SYN.mean, atol=1e-4)  # micrometres -> mm
    np.testing.assert_allclose(m.shape_std, np.sqrt(SYN.shape_var), rtol=1e-5)  # std devs, um -> mm
    np.testing.assert_allclose(m.albedo_mean, SYN.colour_mean, atol=1e-6)  # /255
    np.testing.assert_allclose(m.albedo_std, np.sqrt(SYN.colour_var), rtol=1e-5)
    np.testing.assert_array_equal(m.landmark_vertices, _expected_landmarks())
    np.testing.assert_array_equal(m.contour_left, LEFT_CONTOUR)


def test_bfm2009_triangles_are_rewound(bfm2009: MorphableModel) -> None:
    tl = bfm2009_arrays()["tl"].astype(np.int64)
    np.testing.assert_array_equal(bfm2009.triangles, (tl - 1)[:, [0, 2, 1]])
    np.testing.assert_array_equal(bfm2009.triangles, SYN.triangles)
    assert bfm2009.triangles.min() == 0
    assert bfm2009.vertex_normals()[CENTRE_VERTEX, 2] > 0.9


def test_bfm2009_vertices_follow_the_file(bfm2009: MorphableModel) -> None:
    arrays = bfm2009_arrays()
    rng = np.random.default_rng(3)
    for _ in range(3):
        alpha = rng.standard_normal(KS)
        expected = (arrays["shapeMU"][:, 0] + arrays["shapePC"] @ (alpha * arrays["shapeEV"][:, 0])) * 1e-3
        np.testing.assert_allclose(bfm2009.vertices(alpha), expected.reshape(V, 3), atol=1e-4, rtol=0)
    gamma = np.array([0.5, 1.0, -1.0, 0.0])
    colour = (arrays["texMU"][:, 0] + arrays["texPC"] @ (gamma * arrays["texEV"][:, 0])) / 255.0
    np.testing.assert_allclose(bfm2009.albedo(gamma), np.clip(colour, 0, 1).reshape(V, 3), atol=1e-5)


def test_bfm2009_expression_input(bfm2009: MorphableModel) -> None:
    np.testing.assert_array_equal(bfm2009.vertices(None, None), bfm2009.mean)
    np.testing.assert_array_equal(bfm2009.vertices(None, []), bfm2009.mean)
    with pytest.raises(ValueError, match="expression coefficients"):
        bfm2009.vertices(None, [1.0])
    A = np.random.default_rng(4).standard_normal((3, KS))
    assert bfm2009.vertices(A).shape == (3, V, 3)
    assert bfm2009.landmarks(A).shape == (3, 68, 3)


def test_bfm2009_batched_empty_beta_keeps_the_batch(bfm2009: MorphableModel) -> None:
    assert bfm2009.vertices(None, np.zeros((3, 0))).shape == (3, V, 3)


# ------------------------------------------------------------------------------ bad BFM files
def test_bfm2017_missing(bfm_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "missing.h5"
    with pytest.raises(SourceFileError, match="BFM 2017 file not found") as err:
        load_model_source("bfm2017", path, bfm_dir / "share")
    _assert_names(err, path)


@pytest.mark.parametrize("skip", ["expression", "color/model/pcaVariance", "shape/representer"])
def test_bfm2017_missing_group(bfm_dir: Path, tmp_path: Path, skip: str) -> None:
    path = write_bfm2017(tmp_path / "partial.h5", skip=skip)
    with pytest.raises(SourceFileError, match="not a readable BFM 2017 HDF5 file") as err:
        load_model_source("bfm2017", path, bfm_dir / "share")
    _assert_names(err, path)


def test_bfm2017_text_file(bfm_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    path.write_text("not an HDF5 file\n", encoding="utf-8")
    with pytest.raises(SourceFileError, match="not a readable BFM 2017 HDF5 file") as err:
        load_model_source("bfm2017", path, bfm_dir / "share")
    _assert_names(err, path)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"shape/model/pcaVariance": np.ones(KS + 1, np.float32)}, "shape model has inconsistent sizes"),
    ({"expression/model/pcaBasis": np.ones((3 * V - 3, KE), np.float32)}, "expression model has inconsistent"),
    ({"color/model/mean": np.ones(3 * V + 3, np.float32)}, "color model has inconsistent sizes"),
    ({"shape/representer/points": np.zeros((3, V + 1), np.float32)}, "inconsistent sizes"),
    ({"shape/model/pcaBasis": np.full((3 * V, KS), np.nan, np.float32)}, "NaN or infinite"),
    ({"shape/representer/cells": np.array([[0, 1, V]] * 3, np.int32)}, "triangle list is malformed"),
])
def test_bfm2017_inconsistent(bfm_dir: Path, tmp_path: Path, overrides: dict, match: str) -> None:
    path = write_bfm2017(tmp_path / "bad.h5", overrides=overrides)
    with pytest.raises(SourceFileError, match=match) as err:
        load_model_source("bfm2017", path, bfm_dir / "share")
    _assert_names(err, path)


def test_bfm2017_landmark_map_for_another_model(bfm_dir: Path, tmp_path: Path) -> None:
    share = write_share(tmp_path / "share", "bfm2017", landmarks={9: 5, 31: V})
    with pytest.raises(SourceFileError, match=f"vertex {V} but the model has {V} vertices") as err:
        load_model_source("bfm2017", bfm_dir / "model2017-1_bfm_nomouth.h5", share)
    _assert_names(err, share / SHARE_FILES["bfm2017"].landmark_map)


def test_bfm2009_missing(bfm_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "missing.mat"
    with pytest.raises(SourceFileError, match="BFM 2009 file not found") as err:
        load_model_source("bfm2009", path, bfm_dir / "share")
    _assert_names(err, path)


def test_bfm2009_text_file(bfm_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.mat"
    path.write_text("not a MATLAB file\n" * 10, encoding="utf-8")
    with pytest.raises(SourceFileError, match=r"not a readable BFM 2009 \.mat file") as err:
        load_model_source("bfm2009", path, bfm_dir / "share")
    _assert_names(err, path)


def _without(key: str) -> dict[str, np.ndarray]:
    arrays = bfm2009_arrays()
    del arrays[key]
    return arrays


def _replaced(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**bfm2009_arrays(), key: value}


@pytest.mark.parametrize(("arrays", "match"), [
    (_without("texPC"), r"not a readable BFM 2009 \.mat file"),
    (_without("tl"), r"not a readable BFM 2009 \.mat file"),
    (_replaced("shapeEV", np.ones((KS + 2, 1))), "shape model has inconsistent sizes"),
    (_replaced("texMU", np.ones((3 * V - 3, 1))), "colour model has inconsistent sizes"),
    (_replaced("tl", np.array([[1.0, 2.0, V + 1.0]])), "triangle list is malformed"),
    (_replaced("tl", np.array([[0.0, 1.0, 2.0]])), "triangle list is malformed"),  # 0-based by mistake
])
def test_bfm2009_inconsistent(bfm_dir: Path, tmp_path: Path, arrays: dict, match: str) -> None:
    path = write_bfm2009(tmp_path / "bad.mat", arrays)
    with pytest.raises(SourceFileError, match=match) as err:
        load_model_source("bfm2009", path, bfm_dir / "share")
    _assert_names(err, path)
