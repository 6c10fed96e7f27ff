"""The streaming mean-free PCA (against NumPy's exact SVD) and the detail_pca stage on tiny synthetic maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import yaml

from facedetail.capture.maps import DISPLACEMENT, MAP_FILES, list_items, write_item_maps
from facedetail.capture.patches import face_regions
from facedetail.detail.pca import (
    BASES_FILE,
    DisplacementPatches,
    array_batches,
    load_bases,
    read_safetensors,
    safetensors_bytes,
    uncentred_pca,
)
from facedetail.detail.split import is_held_out
from facedetail.errors import FacedetailError
from facedetail.io.hashing import sha256_file
from facedetail.io.manifest import file_row, verify_manifest, write_manifest
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVChartConfig, rasterize_uv
from stages import detail_pca
from stages.detail_pca import STAGE, DetailPcaParams

# --- the solver ---------------------------------------------------------------------------------


def _low_rank(n: int = 600, d: int = 120, rank: int = 10, seed: int = 0, offset: float = 0.5) -> np.ndarray:
    """Low rank plus noise, plus a constant ``offset`` (a large one is an uncentred PCA's first component)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, rank))
    v = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    x = (u * np.geomspace(40.0, 2.0, rank)) @ v.T + 0.05 * rng.standard_normal((n, d)) + offset
    return x.astype(np.float32)


def _exact(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k right singular vectors and the energy ratios from NumPy's SVD of the uncentred matrix."""
    x64 = x.astype(np.float64)
    _, s, vt = np.linalg.svd(x64, full_matrices=False)
    return vt[:k], s[:k] ** 2 / float((x64**2).sum())


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_matches_the_exact_uncentred_svd(method: str) -> None:
    x, k = _low_rank(offset=10.0), 8
    vt, ratio = _exact(x, k)
    pca = uncentred_pca(array_batches(x, 64), k, method=method, oversample=10, power_iterations=2, seed=3)
    assert pca.method == method and pca.count == len(x) and pca.basis.shape == (k, x.shape[1])
    assert pca.basis.dtype == np.float32
    assert scipy.linalg.subspace_angles(pca.basis.T.astype(np.float64), vt.T).max() < 1e-5
    np.testing.assert_allclose(pca.explained_ratio, ratio, rtol=1e-6)
    np.testing.assert_allclose(np.abs((pca.basis * vt).sum(axis=1)), 1.0, atol=1e-6)  # each vector, not just the span
    np.testing.assert_allclose(pca.cumulative_ratio, np.cumsum(ratio), rtol=1e-6)
    assert pca.passes == (1 if method == "gram" else 2 + 2)
    # Mean-free: the first direction is the offset's, not the centred PCA's first.
    centred = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][0]
    assert float(pca.basis[0] @ np.full(x.shape[1], x.shape[1] ** -0.5)) > 0.99
    assert abs(float(pca.basis[0] @ centred)) < 0.5


def test_both_solvers_and_auto_agree() -> None:
    x = _low_rank(n=400, d=64, seed=1)
    gram = uncentred_pca(array_batches(x, 50), 6, method="gram")
    rand = uncentred_pca(array_batches(x, 50), 6, method="randomized", seed=0)
    auto = uncentred_pca(array_batches(x, 50), 6)  # D = 64 <= 1024: the exact path
    np.testing.assert_allclose(rand.basis, gram.basis, atol=1e-5)  # same signs too
    np.testing.assert_allclose(rand.singular_values, gram.singular_values, rtol=1e-9)
    assert auto.method == "gram" and np.array_equal(auto.basis, gram.basis)
    assert uncentred_pca(array_batches(x, 50), 6, gram_max_dim=10).method == "randomized"


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_batch_sizes_do_not_change_the_answer(method: str) -> None:
    x = _low_rank(n=300, d=40, seed=2)
    one = uncentred_pca(array_batches(x, 300), 5, method=method, seed=9)
    uneven = uncentred_pca(array_batches(x, [1, 7, 0, 100, 45, 147]), 5, method=method, seed=9)
    np.testing.assert_allclose(uneven.basis, one.basis, atol=1e-6)
    np.testing.assert_allclose(uneven.singular_values, one.singular_values, rtol=1e-10)
    assert uneven.energy == pytest.approx(one.energy, rel=1e-12) and uneven.count == one.count == 300
    again = uncentred_pca(array_batches(x, [1, 7, 0, 100, 45, 147]), 5, method=method, seed=9)
    assert again.basis.tobytes() == uneven.basis.tobytes()  # same partition, same seed: same bytes


def test_unit_rows_with_a_positive_largest_entry() -> None:
    x = -_low_rank(n=200, d=30, seed=4)  # negated data: the sign must still come out the same
    for method in ("randomized", "gram"):
        pca = uncentred_pca(array_batches(x, 32), 6, method=method)
        np.testing.assert_allclose(np.linalg.norm(pca.basis.astype(np.float64), axis=1), 1.0, atol=1e-6)
        lead = pca.basis[np.arange(6), np.abs(pca.basis).argmax(axis=1)]
        assert (lead > 0).all()
        flipped = uncentred_pca(array_batches(-x, 32), 6, method=method)
        np.testing.assert_allclose(flipped.basis, pca.basis, atol=1e-6)


def test_bad_sources_are_errors() -> None:
    x = _low_rank(n=20, d=8, rank=4)
    with pytest.raises(ValueError, match="at least as many patches"):
        uncentred_pca(array_batches(x, 5), 9)
    with pytest.raises(ValueError, match="every batch is empty"):
        uncentred_pca(lambda: iter([np.zeros((0, 8), np.float32)]), 2)
    with pytest.raises(ValueError, match="non-finite"):
        uncentred_pca(array_batches(np.where(x > 1, np.nan, x), 5), 2)
    calls = iter(range(100))
    with pytest.raises(ValueError, match="changed between passes"):
        uncentred_pca(lambda: iter([x[: 10 + next(calls)]]), 2, method="randomized")


def test_safetensors_layout_and_reference_reader(tmp_path: Path) -> None:
    tensors = {"upper": np.arange(12, dtype=np.float32).reshape(3, 4), "lower": np.ones((2, 4), np.float32)}
    data = safetensors_bytes(tensors, {"units": "mm", "patch_size": "2"})
    size = int.from_bytes(data[:8], "little")
    assert size % 8 == 0 and data[8:9] == b"{"
    assert data == safetensors_bytes(dict(reversed(tensors.items())), {"patch_size": "2", "units": "mm"})
    (tmp_path / "b.safetensors").write_bytes(data)
    back, meta = read_safetensors(tmp_path / "b.safetensors")
    assert meta == {"units": "mm", "patch_size": "2"}
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    st = pytest.importorskip("safetensors.numpy")
    ref = st.load_file(str(tmp_path / "b.safetensors"))
    assert all(np.array_equal(ref[k], v) for k, v in tensors.items())
    assert safetensors_bytes(tensors) == st.save(tensors)  # the reference layout (its metadata order is random)


# --- the stage on tiny synthetic maps ---------------------------------------------------------------

R, SUBJECTS, EXPRESSIONS = 128, ("s000", "s001", "s002", "s003"), ("neutral", "smile")
FRACTION = 0.34  # with split seed 7: s000 is held out, the other three are not
TINY = {"patch_size": 16, "stride": 8, "overlap": 8, "components": 8, "holdout_fraction": FRACTION,
        "uv_chart": {"resolution": R}}


def _grooves(subject: int, expression: int, mask: np.ndarray) -> np.ndarray:
    """Horizontal wrinkle-like grooves (Gaussian cross-section) whose spacing and depth vary per item."""
    rows, cols = np.mgrid[0:R, 0:R].astype(np.float64)
    spacing = 9.0 + subject + 2 * expression
    phase = 3.0 * subject
    dist = np.abs((rows + 0.15 * cols + phase) % spacing - spacing / 2)
    d = -0.2 * (1 + 0.5 * expression) * np.exp(-(dist**2) / 2.0)
    d += 0.05 * np.sin(cols / (3.0 + subject))  # a second, vertical pattern
    return np.where(mask, d - d[mask].mean(), 0.0).astype(np.float32)


def write_capture_gt(out: Path, mask: np.ndarray, held_scale: float = 1.0) -> None:
    """A capture_gt output folder: maps of every subject x expression and the manifest list_items reads."""
    rows = []
    normals = np.zeros((R, R, 3), np.float32)
    normals[..., 2] = 1.0
    for s, subject in enumerate(SUBJECTS):
        for e, expression in enumerate(EXPRESSIONS):
            item = f"{subject}/{expression}"
            disp = _grooves(s, e, mask) * (held_scale if subject == "s000" else 1.0)
            write_item_maps(out / "maps" / item, disp, mask, normals, 2.0)
            rows += [file_row(out, f"maps/{item}/{name}", item_id=f"{item}/{kind}", params_hash="test", kind=kind,
                              item=item) for kind, name in MAP_FILES.items()]
    write_manifest(out / "manifest.parquet", rows)


@pytest.fixture(scope="module")
def model(model_npz: Path) -> MorphableModel:
    return MorphableModel.load(model_npz)


@pytest.fixture
def root(tmp_path: Path, model_npz: Path, model: MorphableModel) -> Path:
    """A repository root with the face model and a tiny capture_gt output."""
    (tmp_path / "data/face_model").mkdir(parents=True)
    shutil.copy2(model_npz, tmp_path / "data/face_model/model.npz")
    write_capture_gt(tmp_path / "data/capture_gt", rasterize_uv(model.uv, model.triangles, R).covered)
    return tmp_path


def _outputs(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for part in ("data/detail_pca", "metrics")
            for p in sorted((root / part).rglob("*")) if p.is_file()}


def test_stage_writes_bases_curves_and_metrics(root: Path) -> None:
    assert [s for s in SUBJECTS if is_held_out(s, FRACTION, 7)] == ["s000"]
    result = STAGE.run(DetailPcaParams(**TINY), root)
    out = root / "data/detail_pca"
    assert verify_manifest(out) == []
    assert {p.name for p in out.iterdir()} == {BASES_FILE, "upper.npy", "lower.npy", "explained_variance.csv",
                                               "components.png", "manifest.parquet", "lineage.json", "CARD.md"}
    bases, meta = load_bases(out)
    assert sorted(bases) == ["lower", "upper"]
    for region, basis in bases.items():
        assert basis.shape == (8, 16 * 16) and basis.dtype == np.float32
        assert np.array_equal(np.load(out / f"{region}.npy"), basis)
        np.testing.assert_allclose(basis.astype(np.float64) @ basis.T.astype(np.float64), np.eye(8), atol=1e-5)
    assert meta["units"] == "mm" and meta["patch_size"] == "16" and meta["stride"] == "8"
    assert meta["resolution"] == str(R) and meta["components"] == "8"

    metrics = json.loads((root / "metrics/detail_pca.json").read_text())
    assert metrics["subjects"] == {"total": 4, "train": 3, "held_out": 1} and metrics["held_out_subjects"] == ["s000"]
    assert metrics["items"] == {"train": 6, "held_out": 2} and metrics["units"] == "mm"
    for region in ("upper", "lower"):
        m = metrics[region]
        assert m["patches"] == int(meta[f"patches_{region}"]) == result.summary[f"{region}_patches"] > 8
        assert m["subjects_used"] == 3 and m["subjects_held_out"] == 1 and m["items"] == 6
        assert list(m["explained_energy"]) == ["first_08"]  # the reported counts up to `components`
        assert 0.5 < m["explained_energy"]["first_08"] == m["explained_energy_all"] <= 1.0

    lines = (out / "explained_variance.csv").read_text().splitlines()
    assert lines[0] == "region,component,ratio,cumulative" and len(lines) == 1 + 2 * 8
    upper = [line.split(",") for line in lines[1:] if line.startswith("upper,")]
    ratios = [float(r[2]) for r in upper]
    assert [int(r[1]) for r in upper] == list(range(1, 9)) and ratios == sorted(ratios, reverse=True)
    assert float(upper[-1][3]) == pytest.approx(sum(ratios), rel=1e-6)
    assert float(upper[-1][3]) == pytest.approx(metrics["upper"]["explained_energy_all"], abs=1e-6)


def test_the_bases_are_those_of_the_training_patches_only(root: Path, model: MorphableModel) -> None:
    STAGE.run(DetailPcaParams(**TINY), root)
    first = _outputs(root)
    # The same stage on the training items alone, straight through the library: the same basis.
    gt = root / "data/capture_gt"
    train = tuple(i for i in list_items(gt) if not i.startswith("s000/"))
    box = face_regions(model, R, 8)["upper"]
    direct = uncentred_pca(DisplacementPatches(gt, train, box, 16, 8, 0.5), 8, method="gram")
    np.testing.assert_array_equal(load_bases(root / "data/detail_pca")[0]["upper"], direct.basis)
    # A held-out subject's maps changed beyond recognition: not one byte of the bases moves.
    write_capture_gt(gt, rasterize_uv(model.uv, model.triangles, R).covered, held_scale=50.0)
    STAGE.run(DetailPcaParams(**TINY), root)
    again = _outputs(root)
    for name in (BASES_FILE, "upper.npy", "lower.npy", "explained_variance.csv", "components.png"):
        assert again[f"data/detail_pca/{name}"] == first[f"data/detail_pca/{name}"], name
    assert again["data/detail_pca/lineage.json"] != first["data/detail_pca/lineage.json"]  # the input did change


def test_a_rerun_is_byte_identical(root: Path) -> None:
    params = DetailPcaParams(**{**TINY, "method": "randomized", "power_iterations": 2})
    STAGE.run(params, root)
    first = _outputs(root)
    STAGE.run(params, root)
    assert _outputs(root) == first
    assert json.loads((root / "metrics/detail_pca.json").read_text())["upper"]["method"] == "randomized"


def test_resolution_mismatch_and_too_few_patches_are_one_line_errors(root: Path) -> None:
    with pytest.raises(detail_pca.ChartMismatchError) as err:
        STAGE.run(DetailPcaParams(**{**TINY, "uv_chart": {"resolution": 256}}), root)
    message = str(err.value)
    assert "\n" not in message and "128x128" in message and "uv_chart.resolution is 256" in message
    with pytest.raises(detail_pca.NoPatchesError) as err:
        STAGE.run(DetailPcaParams(**{**TINY, "patch_size": 120}), root)
    assert "\n" not in str(err.value) and "0 training patches in the upper region" in str(err.value)
    assert isinstance(err.value, FacedetailError) and not (root / "data/detail_pca").exists()


def test_params_take_the_shared_uv_chart_section(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"uv_chart": {"resolution": 512},
                                                          "detail_pca": {"components": 16}}))
    params = STAGE.load_params(tmp_path)
    assert params.uv_chart == UVChartConfig(resolution=512) and params.components == 16
    assert params.capture_gt == "data/capture_gt" and params.patch_size == 64 and params.overlap == 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"detail_pca": {"uv_chart": {"resolution": 512}}}))
    with pytest.raises(FacedetailError, match="not a stage param"):
        STAGE.load_params(tmp_path)


def test_map_files_are_read_as_written(root: Path) -> None:
    """The patch source reads the float maps (not the 16-bit PNG) and zeroes invalid texels."""
    gt = root / "data/capture_gt"
    item = "s001/neutral"
    disp = np.load(gt / "maps" / item / DISPLACEMENT)
    disp[40:44, :] = np.nan  # a foreign capture folder may store NaN where invalid
    np.save(gt / "maps" / item / DISPLACEMENT, disp)
    from facedetail.capture.patches import RegionBox

    source = DisplacementPatches(gt, (item,), RegionBox("all", 0, R, 0, R), 16, 8, 0.5)
    batches = list(source())
    assert batches and all(b.dtype == np.float32 and b.shape[1] == 256 and np.isfinite(b).all() for b in batches)
    origins = source.origins(item)
    assert sum(len(b) for b in batches) == len(origins) == source.counts()[item]
    k = int(np.flatnonzero((origins[:, 0] <= 40) & (origins[:, 0] + 16 > 44))[0])
    r, c = origins[k]
    patch = np.vstack(batches)[k].reshape(16, 16)
    expected = np.nan_to_num(disp[r:r + 16, c:c + 16], nan=0.0)
    np.testing.assert_array_equal(patch, expected)
