"""facedetail.proxy.evaluate and facedetail.proxy.sheet on hand-made proxy rows of the Surrey model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facedetail.io.images import encode_png
from facedetail.io.tables import reason_kind
from facedetail.model.anchors import landmark_anchors
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.evaluate import (
    eos_comparison,
    expected_outcomes,
    fixed_landmark_error,
    proxy_metrics,
    summarize,
    truth_metrics,
)
from facedetail.proxy.fit import FitConfig, ProxyFitter
from facedetail.proxy.inputs import LoadConfig
from facedetail.proxy.pipeline import OK, QUARANTINED, fit_to_photo, project_row
from facedetail.proxy.sheet import DETECTED_GREEN, fit_sheet
from facedetail.render.sheet import LABEL_HEIGHT

SIZE = (200, 160)  # photo width, height
FIT_SCALE = 256 / 200


def _rotation(yaw_deg: float) -> np.ndarray:
    y = np.radians(yaw_deg)
    return np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])


def _row(path: str, alpha: np.ndarray, beta: np.ndarray, yaw: float, *, decode_scale: float = 1.0,
         size: tuple[int, int] = SIZE, camera_scale: float = 0.8) -> dict[str, Any]:
    """A fitted proxies.parquet row with a scaled orthographic camera centred in a photo of ``size``."""
    fit_frame = 256 / (max(size) * decode_scale)
    return {"id": Path(path).stem, "path": path, "status": OK, "reason": None,
            "alpha": np.asarray(alpha, float).tolist(), "beta": np.asarray(beta, float).tolist(),
            "camera_scale": camera_scale, "camera_rotation": _rotation(yaw).ravel().tolist(),
            "camera_translation": [size[0] * decode_scale * fit_frame / 2, -size[1] * decode_scale * fit_frame / 2],
            "decode_scale": decode_scale, "fit_frame_scale": fit_frame, "yaw_deg": yaw, "pitch_deg": 0.0,
            "roll_deg": 0.0, "reprojection_px": 1.0, "texture_coverage": 0.5, "load_notes": []}


def _true_landmarks(model: MorphableModel, row: dict[str, Any]) -> np.ndarray:
    """(68, 2) photo px of the row's face's landmark anchors, seen by the row's camera."""
    points = landmark_anchors(model).points(model.vertices(row["alpha"], row["beta"]).astype(np.float64))
    return fit_to_photo(project_row(points, row), row)


@pytest.fixture(scope="module")
def faces(sfm_model: MorphableModel) -> list[dict[str, Any]]:
    """Three true faces (random identity, a smile-ish expression, yaw 0/20/-25) with their landmarks."""
    rng = np.random.default_rng(7)
    rows = []
    for i, yaw in enumerate((0.0, 20.0, -25.0)):
        alpha = rng.normal(0, 0.8, sfm_model.n_shape)
        beta = np.abs(rng.normal(0, 0.3, sfm_model.n_expression))
        row = _row(f"wild-{i:05d}.jpg", alpha, beta, yaw)
        row["landmarks"] = _true_landmarks(sfm_model, row).ravel().tolist()
        rows.append(row)
    return rows


def _truth_table(path: Path, faces: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist([
        {"file": f["path"], "width": SIZE[0], "height": SIZE[1], "alpha": f["alpha"], "beta": f["beta"],
         "landmarks": f["landmarks"], "yaw_deg": f["yaw_deg"], "pitch_deg": 0.0, "roll_deg": 0.0} for f in faces]),
        path)
    return path


def _fitted(model: MorphableModel, faces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the pipeline writes them for ProxyFitter's fits of the faces' true landmarks."""
    lm = np.array([np.reshape(f["landmarks"], (68, 2)) for f in faces])
    result = ProxyFitter(model, FitConfig()).fit(lm, np.array([SIZE] * len(faces), float),
                                                 np.array([f["beta"] for f in faces]))
    angles = result.cameras.angles_deg()
    return [{**f, "alpha": result.alpha[i].tolist(), "beta": result.beta[i].tolist(),
             "camera_scale": float(result.cameras.scale[i]),
             "camera_rotation": result.cameras.rotation[i].ravel().tolist(),
             "camera_translation": result.cameras.translation[i].tolist(), "yaw_deg": float(angles[i, 0]),
             "reprojection_px": float(result.reprojection_px[i])} for i, f in enumerate(faces)]


def test_reason_kind_and_summarize() -> None:
    assert reason_kind("fit diverged: mean landmark error 13.0 px > 12 px") == "fit diverged"
    assert reason_kind("no face detected") == "no face detected" and reason_kind(None) == "unknown"
    assert summarize(np.array([4.0, np.nan, 1.0, np.inf, 3.0, 2.0, -np.inf])) == {
        "n": 4, "mean": 2.5, "median": 2.5, "p90": 3.7}
    assert summarize(np.array([1 / 3])) == {"n": 1, "mean": 0.3333, "median": 0.3333, "p90": 0.3333}
    assert summarize(np.array([np.nan])) == summarize(np.array([])) == {"n": 0}


def test_fixed_landmark_error_is_zero_on_the_fits_own_landmarks(sfm_model: MorphableModel) -> None:
    alpha = np.linspace(-1, 1, sfm_model.n_shape)
    rows = [_row("a.jpg", alpha, np.zeros(sfm_model.n_expression), 15.0),
            _row("b.jpg", -alpha, np.full(sfm_model.n_expression, 0.2), -30.0, decode_scale=0.5)]
    alphas, betas = np.array([r["alpha"] for r in rows]), np.array([r["beta"] for r in rows])
    own = np.array([fit_to_photo(project_row(sfm_model.landmarks(a, b), r), r)
                    for a, b, r in zip(alphas, betas, rows, strict=True)])  # NaN where undefined: not counted
    np.testing.assert_allclose(fixed_landmark_error(sfm_model, rows, alphas, betas, own), 0, atol=1e-9)
    # 5 original-photo px (3, 4) off: 5 · decode_scale · fit_frame_scale px in the fitting frame.
    err = fixed_landmark_error(sfm_model, rows, alphas, betas, own + np.array([3.0, 4.0]))
    np.testing.assert_allclose(err, [5 * FIT_SCALE, 5 * 0.5 * rows[1]["fit_frame_scale"]], rtol=1e-9)
    # The other face's shape is measurably off.
    assert fixed_landmark_error(sfm_model, rows, alphas[::-1], betas, own).min() > 1.0


def test_expected_outcomes_count_every_mismatch(tmp_path: Path) -> None:
    table = tmp_path / "bad.parquet"
    pq.write_table(pa.table({
        "file": ["empty.jpg", "cmyk.jpg", "tiny.png", "gone.png", "grey.png"],
        "kind": ["k"] * 5,
        "expected": ["quarantine: empty file", "usable: CMYK converted", "quarantine: image too small",
                     "quarantine: empty file", "usable: grey"]}), table)
    by_path = {
        "empty.jpg": {"status": QUARANTINED, "reason": "empty file (0 bytes)"},
        "cmyk.jpg": {"status": OK, "reason": None, "load_notes": ["CMYK converted to RGB"]},
        "tiny.png": {"status": OK, "reason": None, "load_notes": []},
        "grey.png": {"status": QUARANTINED, "reason": "no face detected", "load_notes": None},
    }
    assert expected_outcomes(table, by_path) == {"checked": 5, "as_expected": 2, "mismatches": [
        {"file": "tiny.png", "expected": "quarantine: image too small", "got": "ok"},
        {"file": "gone.png", "expected": "quarantine: empty file", "got": "not listed"},
        {"file": "grey.png", "expected": "usable: grey", "got": "no face detected"}]}


def test_truth_metrics_of_exact_fits(sfm_model: MorphableModel, faces: list[dict[str, Any]], tmp_path: Path) -> None:
    truth = _truth_table(tmp_path / "truth.parquet", faces[:2])
    # Fits equal to the truth, but detected landmarks 5 px off (alternately (3, 4) and (-3, -4): not a mere
    # shift, so a refit on them would differ) and yaw 2° off; a third photo has no truth.
    off = np.outer((-1.0) ** np.arange(68), [3.0, 4.0]).ravel()
    good = [{**f, "landmarks": (np.asarray(f["landmarks"]) + off).tolist(), "yaw_deg": f["yaw_deg"] + 2}
            for f in faces]
    m = truth_metrics(truth, sfm_model, good, FitConfig())
    assert m["matched"] == 2
    assert m["detector_landmark_error_px"] == {"n": 2, **dict.fromkeys(("mean", "median", "p90"),
                                                                      round(5 * FIT_SCALE, 4))}
    assert m["fit_vs_true_landmarks_px"]["mean"] == 0.0  # the fit is the truth
    assert m["yaw_error_deg"]["mean"] == 2.0 and m["pitch_error_deg"]["mean"] == 0.0
    assert m["shape_error_mm"]["mean"] == 0.0 and m["beta_mae"] == 0.0
    gt_alpha = np.array([f["alpha"] for f in faces[:2]])
    mean_face = np.linalg.norm(sfm_model.vertices() - sfm_model.vertices(gt_alpha), axis=2).mean(axis=1)
    assert m["shape_error_mm_mean_face"]["mean"] == round(float(mean_face.mean()), 4) > 1.0
    gt_beta = np.array([f["beta"] for f in faces[:2]])

    def refit_error(landmarks: np.ndarray) -> float:
        fit = ProxyFitter(sfm_model, FitConfig()).fit(landmarks, np.array([SIZE] * 2, float), gt_beta)
        return round(float(np.linalg.norm(sfm_model.vertices(fit.alpha) - sfm_model.vertices(gt_alpha),
                                          axis=2).mean()), 4)

    # The refit is on the true landmarks (not the detected ones) and recovers much of the identity.
    lm = np.array([np.reshape(f["landmarks"], (68, 2)) for f in good[:2]])
    on_truth = m["shape_error_mm_fit_on_true_landmarks"]["mean"]
    assert on_truth == refit_error(lm - off.reshape(68, 2)) != refit_error(lm)
    assert 0 < on_truth < 0.8 * m["shape_error_mm_mean_face"]["mean"]
    assert m["beta_mae_zero"] == round(float(np.abs([f["beta"] for f in faces[:2]]).mean()), 4)
    zero_beta = truth_metrics(truth, sfm_model, [{**f, "beta": [0.0] * len(f["beta"])} for f in good], FitConfig())
    assert zero_beta["beta_mae"] == zero_beta["beta_mae_zero"] == m["beta_mae_zero"] > 0
    assert truth_metrics(truth, sfm_model, [{**faces[2], "path": "other.jpg"}], FitConfig()) == {"matched": 0}


def test_eos_comparison_on_the_same_landmarks(sfm_model: MorphableModel, faces: list[dict[str, Any]],
                                              eos_share: Path) -> None:
    pytest.importorskip("eos")
    good = _fitted(sfm_model, faces[:2])
    m = eos_comparison(eos_share, sfm_model, good, 256)
    assert m["compared"] == 2 and m["ours_px"]["n"] == m["eos_px"]["n"] == 2
    # Noise-free landmarks: both fits land within a few px.
    assert 0 < m["ours_px"]["mean"] < 3 and 0 < m["eos_px"]["mean"] < 5
    assert m["ratio_mean"] == pytest.approx(m["ours_px"]["mean"] / m["eos_px"]["mean"], rel=1e-3)
    assert m["within_5_percent"] is (m["ratio_mean"] <= 1.05)


def test_proxy_metrics_counts_and_optional_parts(sfm_model: MorphableModel, faces: list[dict[str, Any]],
                                                 tmp_path: Path) -> None:
    truth = _truth_table(tmp_path / "truth.parquet", faces)
    expected = tmp_path / "expected.parquet"
    pq.write_table(pa.table({"file": ["blank.png"], "expected": ["quarantine: no face detected"]}), expected)
    rows = [*faces[:2], {"id": "blank", "path": "blank.png", "status": QUARANTINED, "reason": "no face detected"},
            {"id": "dark", "path": "dark.png", "status": QUARANTINED, "reason": "no face detected"},
            {"id": "far", "path": "far.png", "status": QUARANTINED, "reason": "fit diverged: 13 px"}]
    m = proxy_metrics(rows, sfm_model, FitConfig(), astronaut="wild-00001.jpg", expected=expected, truth=truth,
                      eos_share=None, eos_compare_max=10)
    assert (m["photos"], m["fitted"], m["quarantined"]) == (5, 2, 3)
    assert m["quarantine_reasons"] == {"fit diverged": 1, "no face detected": 2}
    assert m["fit"] == {"expression": "prior", "iterations": 10}
    assert m["reprojection_px"]["mean"] == 1.0 and m["texture_coverage"] == {"n": 2, "mean": 0.5, "median": 0.5,
                                                                              "p90": 0.5}
    assert m["astronaut"] == {"status": OK, "reason": None, "reprojection_px": 1.0, "beta_prior_label": None,
                              "yaw_deg": 20.0}
    assert m["expected_outcomes"]["as_expected"] == 1 and m["truth"]["matched"] == 2
    assert "eos" not in m  # no share folder given
    m = proxy_metrics(rows, sfm_model, FitConfig(expression="free"), astronaut="missing.png",
                      expected=tmp_path / "none.parquet", truth=None, eos_share=tmp_path, eos_compare_max=0)
    assert m["fit"] == {"expression": "free", "iterations": 5} and m["astronaut"] is None
    assert not {"expected_outcomes", "truth", "eos"} & set(m)
    assert "astronaut" not in proxy_metrics(rows, sfm_model, FitConfig(), astronaut="", expected=None, truth=None,
                                            eos_share=None, eos_compare_max=0)


def test_proxy_metrics_compares_the_first_fits_with_eos(sfm_model: MorphableModel, faces: list[dict[str, Any]],
                                                        eos_share: Path) -> None:
    pytest.importorskip("eos")
    rows = [{"id": "blank", "path": "blank.png", "status": QUARANTINED, "reason": "no face detected"},
            *_fitted(sfm_model, faces)]
    m = proxy_metrics(rows, sfm_model, FitConfig(), astronaut=None, expected=None, truth=None, eos_share=eos_share,
                      eos_compare_max=2)
    assert m["eos"] == eos_comparison(eos_share, sfm_model, rows[1:3], 256) and m["eos"]["compared"] == 2


def test_fit_sheet_draws_the_fit_and_the_landmarks(sfm_model: MorphableModel, tmp_path: Path) -> None:
    # A 384 x 192 photo: the 192 px tile shows it at half size over white padding below.
    photo = tmp_path / "wide.png"
    photo.write_bytes(encode_png(np.full((192, 384, 3), 120, np.uint8), 6))
    row = _row("wide.png", np.zeros(sfm_model.n_shape), np.zeros(sfm_model.n_expression), 0.0, size=(384, 192),
               camera_scale=0.4)
    # Landmarks on a grid of tile pixels left of the face: photo px 2·t + 0.5 lands on tile pixel centre t.
    tile_xy = np.array([(4 + 4 * (i % 17), 70 + 4 * (i // 17)) for i in range(68)])
    row["landmarks"] = (2 * tile_xy + 0.5).ravel().tolist()
    tall = tmp_path / "tall.png"
    tall.write_bytes(encode_png(np.full((384, 192, 3), 60, np.uint8), 6))
    row2 = {**_row("tall.png", np.zeros(sfm_model.n_shape), np.zeros(sfm_model.n_expression), 30.0,
                   size=(192, 384), camera_scale=0.4), "id": "tall", "landmarks": row["landmarks"]}
    items = {"wide": SimpleNamespace(path=photo), "tall": SimpleNamespace(path=tall)}
    sheet = fit_sheet([row, row2], items, LoadConfig(), sfm_model)  # type: ignore[arg-type]
    assert sheet.dtype == np.uint8 and sheet.shape == (192 + LABEL_HEIGHT, 2 * 192, 3)
    first = sheet[LABEL_HEIGHT:, :192].astype(int)
    green = np.clip(first[..., 1] - first[..., 0], 0, None).astype(float)
    for x, y in tile_xy:
        assert tuple(first[y, x]) == DETECTED_GREEN, (x, y)
        # Drawn at sub-pixel precision: the dot's centroid is the landmark's position.
        w = green[y - 1:y + 2, x - 1:x + 2]
        dy, dx = np.mgrid[-1:2, -1:2]
        assert abs((w * dx).sum() / w.sum()) < 0.12 and abs((w * dy).sum() / w.sum()) < 0.12, (x, y)
    red = (first[..., 0] > 200) & (first[..., 1] < 80) & (first[..., 2] < 80)  # outline and landmark vertices
    ys, xs = np.nonzero(red)
    assert red.sum() > 50 and 48 - 40 < ys.mean() < 48 + 40 and abs(xs.mean() - 96) < 10  # around the centre
    assert (first[96:] == 255).all(), "white below the photo"
    assert (first[:6, :6] == 120).all(), "the photo's own pixels away from the drawing"
    second = sheet[LABEL_HEIGHT:, 192:].astype(int)
    assert (second[:, 100:] == 255).all() and (second[:6, :6] == 60).all(), "a tall photo is padded on the right"
    # Same rows, same pixels.
    assert np.array_equal(fit_sheet([row, row2], items, LoadConfig(), sfm_model), sheet)  # type: ignore[arg-type]


def test_fit_sheet_reports_a_photo_that_no_longer_decodes(sfm_model: MorphableModel, tmp_path: Path) -> None:
    (tmp_path / "gone.png").write_bytes(b"")
    row = {**_row("gone.png", np.zeros(sfm_model.n_shape), np.zeros(sfm_model.n_expression), 0.0),
           "landmarks": [0.0] * 136}
    with pytest.raises(ValueError, match=r"gone\.png: cannot draw a fit on it"):
        fit_sheet([row], {"gone": SimpleNamespace(path=tmp_path / "gone.png")}, LoadConfig(), sfm_model)  # type: ignore[arg-type]
