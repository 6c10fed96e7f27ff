"""The wild_proxy stage on a tiny synthetic wild set: outputs, accuracy metrics, every bad-input kind,
determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_CHART, TINY_FACES, TINY_PROXY, TINY_TRAIN

from facedetail.errors import SourceFileError
from facedetail.features.landmarks import DetectorConfig
from facedetail.io.hashing import sha256_file
from facedetail.io.images import decode_png
from facedetail.io.shards import ShardTask, read_tar_samples
from facedetail.proxy.fit import FitConfig
from facedetail.proxy.inputs import LoadConfig, list_inputs
from facedetail.proxy.pipeline import OK, TEXTURE_EXT, ProxyShardWorker, ProxySpec, fit_to_photo, photo_to_fit
from facedetail.proxy.texture import TextureConfig
from stages import dictionary, emotion_net, render_expressions, render_faces, wild_proxy, wild_synth

SYNTH = {"count": 6, "synth": {"image_size": 192, "size_jitter": 0.1}, "bad_examples": True, "contact_sheet": 6,
         "uv_chart": {"resolution": TINY_CHART}}


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file()}


def _params(**values: object) -> wild_proxy.WildProxyParams:
    base = {**TINY_PROXY, "eos_share": "eos-share", "uv_chart": {"resolution": TINY_CHART}}
    return wild_proxy.WildProxyParams.model_validate({**base, **values})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_npz: Path, eos_share: Path) -> Path:
    """A root with the dictionary built from a tiny render set, a tiny wild set and its proxies."""
    root = tmp_path_factory.mktemp("wild") / "root"
    (root / "data/face_model").mkdir(parents=True)
    shutil.copy2(model_npz, root / "data/face_model/model.npz")
    (root / "eos-share").symlink_to(eos_share)
    render_expressions.run(render_expressions.RenderExpressionsParams(**TINY_FACES), root)
    render_faces.run(render_faces.RenderFacesParams(workers=1, holdout_fraction=0.25), root)
    emotion_net.run(emotion_net.EmotionNetParams(train=TINY_TRAIN), root)
    dictionary.run(dictionary.DictionaryParams(), root)
    wild_synth.run(wild_synth.WildSynthParams.model_validate(SYNTH), root)
    wild_proxy.run(_params(), root)
    return root


def test_every_input_has_one_row_and_fits_are_stored(built: Path) -> None:
    out = built / "data/wild_proxy"
    proxies = pq.read_table(out / "proxies.parquet").to_pylist()
    listed = sorted(p.relative_to(built / "data/wild_synth/images").as_posix()
                    for p in (built / "data/wild_synth/images").rglob("*") if p.is_file())
    assert sorted(r["path"] for r in proxies) == listed
    good = [r for r in proxies if r["status"] == OK]
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert len(good) + len(quarantine) == len(proxies) and {q["id"] for q in quarantine} == {
        r["id"] for r in proxies if r["status"] != OK}
    assert all(q["reason"] for q in quarantine)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(m["id"] for m in manifest) == sorted(r["id"] for r in good)
    astro = next(r for r in good if r["path"] == "astronaut.png")
    assert astro["beta_prior_id"] and len(astro["alpha"]) == 63 and len(astro["residuals_px"]) == 10
    assert astro["reprojection_px"] < 3.0 and astro["source_sha256"]
    # The stored texture: RGBA at the configured resolution, alpha = visibility.
    sample = read_tar_samples(out / astro["shard"], [astro["id"]])[0]
    rgba = decode_png(sample[TEXTURE_EXT], alpha=True)
    res = TINY_CHART
    assert rgba.shape == (res, res, 4) and set(np.unique(rgba[..., 3])) <= {0, 255}
    assert (rgba[..., 3] > 0).mean() == pytest.approx(astro["texture_coverage"])
    assert rgba[..., :3][rgba[..., 3] == 0].max() == 0
    assert (out / "contact_sheet.png").is_file()


def test_coordinate_frames_round_trip(built: Path) -> None:
    rows = pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist()
    row = next(r for r in rows if r["status"] == OK)
    lm = np.asarray(row["landmarks"]).reshape(68, 2)
    np.testing.assert_allclose(fit_to_photo(photo_to_fit(lm, row), row), lm, atol=1e-9)


def test_metrics_cover_truth_eos_and_bad_examples(built: Path) -> None:
    m = json.loads((built / "metrics/wild_proxy.json").read_text())
    assert m["photos"] == m["fitted"] + m["quarantined"]
    # Every deliberately bad file ended as bad_examples.parquet says (decode kinds and no face).
    assert m["expected_outcomes"]["as_expected"] == m["expected_outcomes"]["checked"] == 13, m["expected_outcomes"]
    truth = m["truth"]
    assert truth["matched"] >= 3
    assert truth["detector_landmark_error_px"]["median"] < 15
    # Every matched photo is scored three ways (fitted α, α fitted to the true landmarks, the mean face).
    for key in ("shape_error_mm", "shape_error_mm_fit_on_true_landmarks", "shape_error_mm_mean_face"):
        assert truth[key]["n"] == truth["matched"] and truth[key]["mean"] > 0, key
    assert truth["beta_mae_zero"] > 0 and truth["yaw_error_deg"]["n"] == truth["matched"]
    eos = m["eos"]
    assert eos["compared"] == 3 and eos["ours_px"]["n"] == eos["eos_px"]["n"] == 3
    assert eos["ratio_mean"] == pytest.approx(eos["ours_px"]["mean"] / eos["eos_px"]["mean"], rel=1e-3)
    assert m["astronaut"]["status"] == OK and m["astronaut"]["beta_prior_label"]
    assert set(m["quarantine_reasons"]) >= {"empty file (0 bytes)", "no face detected"}


def _photo(built: Path, name: str) -> np.ndarray:
    return cv2.imread(str(built / "data/wild_synth/images" / name))


@pytest.fixture(scope="module")
def face_cases(built: Path) -> Path:
    """Photos for the face and fit kinds of bad input (the decode kinds come from wild_synth)."""
    folder = built / "cases"
    folder.mkdir()
    astronaut = _photo(built, "astronaut.png")
    cv2.imwrite(str(folder / "blank.png"), np.full((200, 200, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "two_faces.png"), np.hstack([astronaut, astronaut]))
    cv2.imwrite(str(folder / "big.png"), cv2.resize(astronaut, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC))
    return folder


def _run_case(built: Path, name: str, photos: dict[str, Path], **params: object) -> dict[str, dict]:
    """wild_proxy on ``photos`` (name -> file) in a root of its own; rows by file name."""
    root = built / f"case-{name}"
    for sub in ("data/face_model", "data/dictionary"):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).symlink_to(built / sub)
    (root / "photos").mkdir()
    for file, src in photos.items():
        shutil.copy2(src, root / "photos" / file)
    wild_proxy.run(_params(input="photos", truth="", expected="", astronaut="", eos_share="", **params), root)
    rows = pq.read_table(root / "data/wild_proxy/proxies.parquet").to_pylist()
    quarantine = pq.read_table(root / "data/wild_proxy/quarantine.parquet").to_pylist()
    assert sorted(q["reason"] for q in quarantine) == sorted(r["reason"] for r in rows if r["status"] != OK)
    return {r["path"]: r for r in rows}


def test_face_failures_are_quarantined_and_the_run_goes_on(built: Path, face_cases: Path) -> None:
    astronaut = built / "data/wild_synth/images/astronaut.png"
    rows = _run_case(built, "faces", {"blank.png": face_cases / "blank.png", "astronaut.png": astronaut},)
    assert rows["blank.png"]["reason"] == "no face detected" and rows["astronaut.png"]["status"] == OK
    rows = _run_case(built, "several", {"two.png": face_cases / "two_faces.png", "astronaut.png": astronaut},
                     detector={"multiple_faces": "reject", "detect_max_side": 1100, "adjust_threshold": 0.0})
    assert rows["two.png"]["reason"].startswith("several faces") and rows["astronaut.png"]["status"] == OK
    # The same face at 512 px (about 100 px wide) and at 1536 px (about 300 px wide).
    rows = _run_case(built, "small", {"astronaut.png": astronaut, "big.png": face_cases / "big.png"},
                     detector={"min_face_px": 150}, load={"max_side": 2048})
    assert rows["astronaut.png"]["reason"].startswith("face too small") and rows["big.png"]["status"] == OK


def test_fit_failures_are_quarantined(built: Path) -> None:
    """Extreme pose and a diverged fit, with thresholds between two photos' measured values."""
    fitted = [r for r in pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist() if r["status"] == OK]
    images = built / "data/wild_synth/images"
    astro = next(r for r in fitted if r["path"] == "astronaut.png")
    turned = max(fitted, key=lambda r: abs(r["yaw_deg"]))
    assert abs(turned["yaw_deg"]) > abs(astro["yaw_deg"]) + 5
    rows = _run_case(built, "pose", {"a.png": images / "astronaut.png", "b.jpg": images / turned["path"]},
                     fit={"max_yaw_deg": (abs(turned["yaw_deg"]) + abs(astro["yaw_deg"])) / 2})
    assert rows["a.png"]["status"] == OK and rows["b.jpg"]["reason"].startswith("extreme pose: yaw")
    worst = max(fitted, key=lambda r: r["reprojection_px"])
    assert worst["reprojection_px"] > astro["reprojection_px"] + 0.5
    rows = _run_case(built, "diverged", {"a.png": images / "astronaut.png", "b.jpg": images / worst["path"]},
                     fit={"max_reprojection_px": (worst["reprojection_px"] + astro["reprojection_px"]) / 2})
    assert rows["a.png"]["status"] == OK and rows["b.jpg"]["reason"].startswith("fit diverged: mean landmark error")


def test_a_run_with_no_usable_photo_fails_loudly(built: Path, face_cases: Path) -> None:
    with pytest.raises(SourceFileError, match=r"none of the 1 photos could be fitted: no face detected \(1\)"):
        _run_case(built, "none", {"blank.png": face_cases / "blank.png"})


def test_rerun_is_byte_identical(built: Path) -> None:
    out = built / "data/wild_proxy"
    first = _files(out)
    metrics = (built / "metrics/wild_proxy.json").read_bytes()
    shutil.rmtree(out)
    wild_proxy.run(_params(), built)
    assert _files(out) == first
    assert (built / "metrics/wild_proxy.json").read_bytes() == metrics  # no timings in the metrics


def test_a_list_with_given_boxes_skips_detection(built: Path) -> None:
    rows = pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist()
    astro = next(r for r in rows if r["path"] == "astronaut.png")
    left, top, right, bottom = astro["box"]
    root = built / "case-list"
    for sub in ("data/face_model", "data/dictionary"):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).symlink_to(built / sub)
    (root / "photos").mkdir()
    shutil.copy2(built / "data/wild_synth/images/astronaut.png", root / "photos/astronaut.png")
    (root / "photos/list.csv").write_text(
        "subDirectory_filePath,face_x,face_y,face_width,face_height,expression\n"
        f"astronaut.png,{left},{top},{right - left},{bottom - top},happy\n")
    wild_proxy.run(_params(input="photos/list.csv", truth="", expected="", astronaut="", eos_share=""), root)
    (row,) = pq.read_table(root / "data/wild_proxy/proxies.parquet").to_pylist()
    assert row["status"] == OK and row["label"] == "happy"
    assert row["detection_score"] is None  # no detector ran: the box came from the list
    np.testing.assert_allclose(row["box"], astro["box"], atol=1.0)
    # Same box, same predictor: the landmarks match the detected run's.
    np.testing.assert_allclose(row["landmarks"], astro["landmarks"], atol=1.0)


def test_an_exception_on_one_photo_is_quarantined_not_fatal(built: Path, tmp_path: Path) -> None:
    """dlib raises RuntimeError on some inputs; the shard must report that photo and go on."""
    images = built / "data/wild_synth/images"
    fitted = [r["path"] for r in pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist()
              if r["status"] == OK and r["path"].startswith("wild-")]
    items = [i for i in list_inputs(images) if i.relative in ("astronaut.png", fitted[0])]
    spec = ProxySpec({i.id: i for i in items}, built / "data/face_model/model.npz", built / "data/dictionary",
                     LoadConfig(), DetectorConfig(), FitConfig(), TextureConfig(resolution=64), "test")
    worker = ProxyShardWorker(spec)
    real_detect = worker.detector.detect

    def detect(rgb: np.ndarray):
        if rgb.shape[:2] == (512, 512):  # the astronaut
            raise RuntimeError("Unsupported image type, must be 8bit gray or RGB image.")
        return real_detect(rgb)

    worker.detector.detect = detect  # type: ignore[method-assign]
    rows = worker(ShardTask("s", tuple(i.id for i in items)), tmp_path / "s.tar", lambda n: None)
    by_path = {r["path"]: r for r in rows}
    assert by_path["astronaut.png"]["reason"] == (
        "landmarks failed: RuntimeError: Unsupported image type, must be 8bit gray or RGB image.")
    assert by_path["astronaut.png"]["source_sha256"]  # decoded, so the file's facts are kept
    assert by_path[fitted[0]]["status"] == OK and len(rows) == 2
