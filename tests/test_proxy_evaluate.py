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
    fixed_landmark_errors,
    proxy_metrics,
    summarize,
    truth_metrics,
)
from facedetail.proxy.fit import FitConfig, ProxyFitter
from facedetail.proxy.inputs import LoadConfig
from facedetail.proxy.pipeline import OK, QUARANTINED, fit_to_photo, project_row
from facedetail.proxy.sheet import PAD_GREY, face_crop_box, fit_sheet
from facedetail.render.faces import boundary_loops
from facedetail.render.sheet import LABEL_HEIGHT

SIZE = (200, 160)  # photo width, height


def _rotation(yaw_deg: float) -> np.ndarray:
    y = np.radians(yaw_deg)
    return np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])


def _row(path: str, alpha: np.ndarray, beta: np.ndarray, yaw: float, *, decode_scale: float = 1.0,
         size: tuple[int, int] = SIZE, camera_scale: float = 0.6) -> dict[str, Any]:
    """A fitted proxies.parquet row with a scaled orthographic camera (decoded px, y up) centred in a photo
    of ``size``."""
    return {"id": Path(path).stem, "path": path, "status": OK, "reason": None,
            "alpha": np.asarray(alpha, float).tolist(), "beta": np.asarray(beta, float).tolist(),
            "camera_scale": camera_scale * decode_scale, "camera_rotation": _rotation(yaw).ravel().tolist(),
            "camera_translation": [size[0] * decode_scale / 2, -size[1] * decode_scale / 2],
            "decode_scale": decode_scale, "fit_frame_scale": 1.0, "face_frame_scale": 1.0, "yaw_deg": yaw,
            "pitch_deg": 0.0, "roll_deg": 0.0, "reprojection_px": 1.0, "nme": 0.02, "texture_coverage": 0.5,
            "load_notes": []}


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
    result = ProxyFitter(model, FitConfig()).fit(lm, np.array([f["beta"] for f in faces]))
    angles = result.cameras.angles_deg()
    return [{**f, "alpha": result.alpha[i].tolist(), "beta": result.beta[i].tolist(),
             "camera_scale": float(result.cameras.scale[i]),
             "camera_rotation": result.cameras.rotation[i].ravel().tolist(),
             "camera_translation": result.cameras.translation[i].tolist(), "yaw_deg": float(angles[i, 0]),
             "reprojection_px": float(result.reprojection_px[i]), "nme": float(result.nme[i]),
             "face_frame_scale": float(result.face_frame_scale[i])} for i, f in enumerate(faces)]


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
    # 5 original-photo px (3, 4) off: 5 · decode_scale px in the camera frame (the decoded photo's).
    err = fixed_landmark_error(sfm_model, rows, alphas, betas, own + np.array([3.0, 4.0]))
    np.testing.assert_allclose(err, [5.0, 5 * 0.5], rtol=1e-9)
    # ... and 5 original px, or 5 / outer-eye-corner distance, whatever the decode scale.
    rows = [{**r, "landmarks": (o + np.array([3.0, 4.0])).ravel().tolist()} for r, o in zip(rows, own, strict=True)]
    px, nme = fixed_landmark_errors(sfm_model, rows)
    np.testing.assert_allclose(px, 5.0, rtol=1e-9)
    np.testing.assert_allclose(nme, 5.0 / np.linalg.norm(own[:, 36] - own[:, 45], axis=1), rtol=1e-9)
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
    assert m["detector_landmark_error_px"] == {"n": 2, **dict.fromkeys(("mean", "median", "p90"), 5.0)}
    true_lm = np.array([np.reshape(f["landmarks"], (68, 2)) for f in faces[:2]])
    nme = 5.0 / np.linalg.norm(true_lm[:, 36] - true_lm[:, 45], axis=1)  # over the true eye distance
    assert m["detector_landmark_nme"]["mean"] == round(float(nme.mean()), 4)
    # The fit is the truth.
    assert m["fit_vs_true_landmarks_px"]["mean"] == m["fit_vs_true_landmarks_nme"]["mean"] == 0.0
    assert m["yaw_error_deg"]["mean"] == 2.0 and m["pitch_error_deg"]["mean"] == 0.0
    assert m["shape_error_mm"]["mean"] == 0.0 and m["beta_mae"] == 0.0
    gt_alpha = np.array([f["alpha"] for f in faces[:2]])
    mean_face = np.linalg.norm(sfm_model.vertices() - sfm_model.vertices(gt_alpha), axis=2).mean(axis=1)
    assert m["shape_error_mm_mean_face"]["mean"] == round(float(mean_face.mean()), 4) > 1.0
    gt_beta = np.array([f["beta"] for f in faces[:2]])

    def refit_error(landmarks: np.ndarray) -> float:
        fit = ProxyFitter(sfm_model, FitConfig()).fit(landmarks, gt_beta)
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
    m, columns = eos_comparison(eos_share, sfm_model, good, 100.0)
    assert m["compared"] == 2 and m["ours_nme"]["n"] == m["eos_nme"]["n"] == m["eos_px"]["n"] == 2
    # Noise-free landmarks: both fits land within a few percent of the eye distance.
    assert 0 < m["ours_nme"]["mean"] < 0.04 and 0 < m["eos_nme"]["mean"] < 0.06
    ours = fixed_landmark_errors(sfm_model, good)[1]
    theirs = [columns[g["id"]]["eos_fixed_nme"] for g in good]
    assert m["ratio_mean"] == pytest.approx(ours.mean() / np.mean(theirs), abs=1e-4)
    assert m["within_5_percent"] is (m["ratio_mean"] <= 1.05) and m["verdict"]
    assert set(columns) == {g["id"] for g in good}
    for g in good:
        c = columns[g["id"]]
        eyes = np.linalg.norm(np.subtract(*np.reshape(g["landmarks"], (68, 2))[[36, 45]]))
        assert c["eos_fixed_nme"] == pytest.approx(c["eos_fixed_error_px"] / eyes, rel=1e-9)


def test_eos_pose_angles_are_degrees_in_a_plausible_range(sfm_model: MorphableModel, faces: list[dict[str, Any]],
                                                          eos_share: Path) -> None:
    """eos's get_yaw_pitch_roll() is in degrees already (converting it again gave values like -3076°)."""
    pytest.importorskip("eos")
    good = _fitted(sfm_model, faces)
    _, columns = eos_comparison(eos_share, sfm_model, good, 100.0)
    for f in faces:
        c = columns[f["id"]]
        assert all(-90 <= c[k] <= 90 for k in ("eos_yaw_deg", "eos_pitch_deg", "eos_roll_deg")), c
        # Yaw 0, 20 and -25 degrees (pitch and roll 0): eos sees the turn, in our sign convention, within
        # 15 degrees (its fit of these landmarks is looser than ours), and little pitch or roll.
        assert abs(c["eos_yaw_deg"] - f["yaw_deg"]) < 15, (f["yaw_deg"], c)
        assert abs(c["eos_pitch_deg"]) < 10 and abs(c["eos_roll_deg"]) < 5, c


def test_proxy_metrics_counts_and_optional_parts(sfm_model: MorphableModel, faces: list[dict[str, Any]],
                                                 tmp_path: Path) -> None:
    truth = _truth_table(tmp_path / "truth.parquet", faces)
    expected = tmp_path / "expected.parquet"
    pq.write_table(pa.table({"file": ["blank.png"], "expected": ["quarantine: no face detected"]}), expected)
    rows = [*faces[:2], {"id": "blank", "path": "blank.png", "status": QUARANTINED, "reason": "no face detected"},
            {"id": "dark", "path": "dark.png", "status": QUARANTINED, "reason": "no face detected"},
            {"id": "far", "path": "far.png", "status": QUARANTINED, "reason": "fit diverged: 13 px"}]
    m, columns = proxy_metrics(rows, sfm_model, FitConfig(), astronaut="wild-00001.jpg", expected=expected,
                               truth=truth, eos_share=None, eos_compare_max=10)
    assert (m["photos"], m["fitted"], m["quarantined"]) == (5, 2, 3)
    assert m["quarantine_reasons"] == {"fit diverged": 1, "no face detected": 2}
    assert m["fit"] == {"expression": "prior", "iterations": 10}
    assert set(columns) == {"wild-00000", "wild-00001"} and set(columns["wild-00000"]) == {"fixed_error_px",
                                                                                           "fixed_nme"}
    assert m["nme"]["mean"] == 0.02
    assert m["reprojection_px"]["mean"] == 1.0 and m["texture_coverage"] == {"n": 2, "mean": 0.5, "median": 0.5,
                                                                              "p90": 0.5}
    assert m["astronaut"] == {"status": OK, "reason": None, "nme": 0.02, "reprojection_px": 1.0,
                              "beta_prior_label": None, "yaw_deg": 20.0}
    assert m["expected_outcomes"]["as_expected"] == 1 and m["truth"]["matched"] == 2
    assert "eos" not in m  # no share folder given
    m, _ = proxy_metrics(rows, sfm_model, FitConfig(expression="free"), astronaut="missing.png",
                         expected=tmp_path / "none.parquet", truth=None, eos_share=tmp_path, eos_compare_max=0)
    assert m["fit"] == {"expression": "free", "iterations": 5} and m["astronaut"] is None
    assert not {"expected_outcomes", "truth", "eos"} & set(m)
    assert "astronaut" not in proxy_metrics(rows, sfm_model, FitConfig(), astronaut="", expected=None, truth=None,
                                            eos_share=None, eos_compare_max=0)[0]


def test_proxy_metrics_compares_the_first_fits_with_eos(sfm_model: MorphableModel, faces: list[dict[str, Any]],
                                                        eos_share: Path) -> None:
    pytest.importorskip("eos")
    rows = [{"id": "blank", "path": "blank.png", "status": QUARANTINED, "reason": "no face detected"},
            *_fitted(sfm_model, faces)]
    m, columns = proxy_metrics(rows, sfm_model, FitConfig(), astronaut=None, expected=None, truth=None,
                               eos_share=eos_share, eos_compare_max=2)
    summary, theirs = eos_comparison(eos_share, sfm_model, rows[1:3], 100.0)
    assert m["eos"] == summary and m["eos"]["compared"] == 2
    # Every fit has our columns; only the two compared have eos's.
    assert set(columns) == {r["id"] for r in rows[1:]} and "eos_fixed_nme" not in columns[rows[3]["id"]]
    assert all(columns[i] == {**columns[i], **theirs[i]} for i in theirs)


def _placed_row(model: MorphableModel, path: str, size: tuple[int, int], centre: tuple[float, float],
                camera_scale: float, yaw: float = 0.0) -> dict[str, Any]:
    """A row whose mean face (camera_scale px/mm) sits at ``centre`` (photo px) of a photo of ``size``, with
    its own landmarks as the detected ones."""
    row = _row(path, np.zeros(model.n_shape), np.zeros(model.n_expression), yaw, size=size,
               camera_scale=camera_scale)
    row["camera_translation"] = [centre[0], -centre[1]]
    row["landmarks"] = _true_landmarks(model, row).ravel().tolist()
    return row


def test_fit_sheet_crops_each_face_and_draws_the_fit(sfm_model: MorphableModel, tmp_path: Path) -> None:
    # A small face (about 45 px) in a 1000 x 800 photo, and one at the photo's corner.
    photo = tmp_path / "big.png"
    photo.write_bytes(encode_png(np.full((800, 1000, 3), 120, np.uint8), 6))
    row = _placed_row(sfm_model, "big.png", (1000, 800), (700.0, 200.0), 0.3)
    corner = {**_placed_row(sfm_model, "big.png", (1000, 800), (10.0, 10.0), 0.3, yaw=20.0), "id": "big#2"}
    items = {"big": SimpleNamespace(path=photo)}
    sheet = fit_sheet([row, corner], items, LoadConfig(), sfm_model)  # type: ignore[arg-type]
    assert sheet.dtype == np.uint8 and sheet.shape == (192 + LABEL_HEIGHT, 2 * 192, 3)
    first = sheet[LABEL_HEIGHT:, :192].astype(int)
    # The tile is the face's neighbourhood, scaled up: the landmarks span most of it.
    lm = np.reshape(row["landmarks"], (68, 2))
    side = face_crop_box(lm, 0.25)[2]
    assert side < 120, "cropped to the face, not the photo"
    green = (first[..., 1] > 200) & (first[..., 0] < 80) & (first[..., 2] < 80)
    ys, xs = np.nonzero(green)
    assert green.sum() > 60 and np.ptp(xs) > 0.4 * 192 and np.ptp(ys) > 0.4 * 192
    assert abs(xs.mean() - 96) < 25 and abs(ys.mean() - 96) < 30, "the face in the middle of its tile"
    red = (first[..., 0] > 200) & (first[..., 1] < 80) & (first[..., 2] < 80)
    assert red.sum() > 50
    assert (first[:4, :4] == 120).all(), "the photo's own pixels around the face"
    # The face at the corner: the crop leaves the photo, which shows as grey padding, not stretched pixels.
    second = sheet[LABEL_HEIGHT:, 192:].astype(int)
    assert (second[:10, :10] == PAD_GREY).all() and (second[-10:, -10:] == 120).all()
    # Same rows, same pixels.
    assert np.array_equal(fit_sheet([row, corner], items, LoadConfig(), sfm_model), sheet)  # type: ignore[arg-type]


def test_fit_sheet_draws_landmarks_at_subpixel_precision(sfm_model: MorphableModel, tmp_path: Path) -> None:
    photo = tmp_path / "face.png"
    photo.write_bytes(encode_png(np.full((300, 300, 3), 90, np.uint8), 6))
    row = _placed_row(sfm_model, "face.png", (300, 300), (170.0, 150.0), 0.6)
    # Landmarks on a grid left of the face, 11.3 px apart (arbitrary sub-pixel positions).
    row["landmarks"] = np.array([(3.1 + 11.3 * (i % 4), 40.7 + 11.3 * (i // 4)) for i in range(68)]).ravel().tolist()
    items = {"face": SimpleNamespace(path=photo)}
    tile = fit_sheet([row], items, LoadConfig(), sfm_model)[LABEL_HEIGHT:].astype(int)  # type: ignore[arg-type]
    lm = np.reshape(row["landmarks"], (68, 2))
    proxy = fit_to_photo(project_row(sfm_model.vertices().astype(np.float64), row), row)
    outline = max(boundary_loops(sfm_model.triangles), key=len)
    left, top, side = face_crop_box(np.vstack([lm, proxy[outline]]), 0.25)
    at = (lm + 0.5 - [left, top]) * 192 / side - 0.5  # tile px of each landmark
    green = np.clip(tile[..., 1] - tile[..., 0], 0, None).astype(float)
    # Landmarks away from the proxy's red drawing.
    checked = 0
    for x, y in at:
        cx, cy = round(x), round(y)
        w = green[cy - 2:cy + 3, cx - 2:cx + 3]
        if w.sum() == 0 or (tile[cy - 3:cy + 4, cx - 3:cx + 4, 0] > 200).any():
            continue
        dy, dx = np.mgrid[-2:3, -2:3]
        # Drawn at sub-pixel precision: the dot's centroid is the landmark's position.
        assert abs((w * dx).sum() / w.sum() - (x - cx)) < 0.25 and abs((w * dy).sum() / w.sum() - (y - cy)) < 0.25
        checked += 1
    assert checked >= 40


def test_fit_sheet_reports_a_photo_that_no_longer_decodes(sfm_model: MorphableModel, tmp_path: Path) -> None:
    (tmp_path / "gone.png").write_bytes(b"")
    row = {**_row("gone.png", np.zeros(sfm_model.n_shape), np.zeros(sfm_model.n_expression), 0.0),
           "landmarks": [0.0] * 136, "id": "gone#1"}
    with pytest.raises(ValueError, match=r"gone\.png: cannot draw a fit on it"):
        fit_sheet([row], {"gone": SimpleNamespace(path=tmp_path / "gone.png")}, LoadConfig(), sfm_model)  # type: ignore[arg-type]
