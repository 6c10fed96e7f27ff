"""The wild_proxy stage on a tiny synthetic wild set: outputs, accuracy metrics, every bad-input kind,
determinism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_CHART, TINY_FACES, TINY_PROXY, TINY_TRAIN, tool_env
from skimage import data
from test_hostile_inputs import Case, make_hostile_folder, make_hostile_list, run_without_root

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
    assert astro["reprojection_px"] < 3.0 and astro["nme"] < 0.05 and astro["source_sha256"]
    assert astro["fit_frame_scale"] == 1.0 and astro["face_frame_scale"] > 0
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
    assert truth["detector_landmark_error_px"]["median"] < 15 and truth["detector_landmark_nme"]["median"] < 0.2
    # Every matched photo is scored three ways (fitted α, α fitted to the true landmarks, the mean face).
    for key in ("shape_error_mm", "shape_error_mm_fit_on_true_landmarks", "shape_error_mm_mean_face"):
        assert truth[key]["n"] == truth["matched"] and truth[key]["mean"] > 0, key
    assert truth["beta_mae_zero"] > 0 and truth["yaw_error_deg"]["n"] == truth["matched"]
    eos = m["eos"]
    assert eos["compared"] == 3 and eos["ours_nme"]["n"] == eos["eos_nme"]["n"] == eos["eos_px"]["n"] == 3
    # Per photo, in proxies.parquet: ours on every fit, eos's on the compared ones (the first 3 listed).
    rows = [r for r in pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist() if r["status"] == OK]
    assert all(r["fixed_nme"] > 0 and r["fixed_error_px"] > 0 for r in rows)
    compared = [r for r in rows if r["eos_fixed_nme"] is not None]
    assert len(compared) == 3 and all(r["eos_fixed_nme"] > 0 and -90 <= r["eos_yaw_deg"] <= 90 for r in compared)
    ratio = np.mean([r["fixed_nme"] for r in compared]) / np.mean([r["eos_fixed_nme"] for r in compared])
    assert eos["ratio_mean"] == pytest.approx(ratio, abs=1e-4) and eos["verdict"]
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
    worst = max(fitted, key=lambda r: r["nme"])
    assert worst["nme"] > astro["nme"] + 0.005
    rows = _run_case(built, "diverged", {"a.png": images / "astronaut.png", "b.jpg": images / worst["path"]},
                     fit={"max_nme": (worst["nme"] + astro["nme"]) / 2})
    assert rows["a.png"]["status"] == OK and rows["b.jpg"]["reason"].startswith("fit diverged: NME")
    # The optional bound in photo px: the face with the larger px error (not necessarily the worse NME).
    small, big = sorted([astro, worst], key=lambda r: r["reprojection_px"])
    assert big["reprojection_px"] > small["reprojection_px"]
    a, b = "a" + Path(small["path"]).suffix, "b" + Path(big["path"]).suffix
    rows = _run_case(built, "diverged-px", {a: images / small["path"], b: images / big["path"]},
                     fit={"max_reprojection_px": (big["reprojection_px"] + small["reprojection_px"]) / 2})
    assert rows[a]["status"] == OK and rows[b]["reason"].startswith("fit diverged: mean landmark error")


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
    spec = ProxySpec(built / "data/face_model/model.npz", built / "data/dictionary",
                     LoadConfig(), DetectorConfig(), FitConfig(), TextureConfig(resolution=64), "test")
    worker = ProxyShardWorker(spec)
    real_find = worker.detector.find

    def find(rgb: np.ndarray):
        if rgb.shape[:2] == (512, 512):  # the astronaut
            raise RuntimeError("Unsupported image type, must be 8bit gray or RGB image.")
        return real_find(rgb)

    worker.detector.find = find  # type: ignore[method-assign]
    rows = worker(ShardTask("s", tuple(i.id for i in items), tuple(items)), tmp_path / "s.tar", lambda n: None)
    by_path = {r["path"]: r for r in rows}
    assert by_path["astronaut.png"]["reason"] == (
        "landmarks failed: RuntimeError: Unsupported image type, must be 8bit gray or RGB image.")
    assert by_path["astronaut.png"]["source_sha256"]  # decoded, so the file's facts are kept
    assert by_path[fitted[0]]["status"] == OK and len(rows) == 2


# --- hostile inputs through the stage and `facedetail prior` (the files: tests/test_hostile_inputs.py) ----------

ROOT = Path(__file__).resolve().parents[1]


def _hostile_root(built: Path, name: str) -> Path:
    """A root whose wild_proxy reads ``photos/`` (or a list), with the built model and dictionary linked in."""
    import yaml

    root = built / name
    for sub in ("data/face_model", "data/dictionary"):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).symlink_to(built / sub)
    params = {"uv_chart": {"resolution": TINY_CHART},
              "wild_proxy": {"input": "photos", "truth": "", "expected": "", "astronaut": "", "eos_share": "",
                             "workers": 1, "shard_size": 8, "eos_compare_max": 0, "sheet_faces": 4}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _run_stage(root: Path) -> dict[str, list[dict]]:
    """``python -m stages.wild_proxy`` as DVC runs it, by a user who cannot read a mode-000 file; its tables."""
    proc = run_without_root([sys.executable, "-m", "stages.wild_proxy", "--root", str(root)], cwd=ROOT,
                            env=tool_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = root / "data/wild_proxy"
    tables = {name: pq.read_table(out / f"{name}.parquet").to_pylist()
              for name in ("proxies", "quarantine", "skipped", "duplicates")}
    tables["metrics"] = [json.loads((root / "metrics/wild_proxy.json").read_text())]
    return tables


def _check_accounting(tables: dict[str, list[dict]], cases: list[Case]) -> None:
    """Every case in exactly one table with its specific reason; the metrics' sum is the listing's size."""
    proxies = {r["path"]: r for r in tables["proxies"]}
    skipped = {r["path"]: r for r in tables["skipped"]}
    duplicates = tables["duplicates"]
    quarantine = {q["id"]: q for q in tables["quarantine"]}
    assert {r["id"] for r in proxies.values() if r["status"] != OK} == set(quarantine)
    dup_by_path: dict[str, list[dict]] = {}
    for d in duplicates:
        dup_by_path.setdefault(d["path"], []).append(d)
    for case in cases:
        if case.where in ("fitted", "quarantined"):
            row = proxies.get(case.rel)
            assert row is not None and case.rel not in skipped, case
            if case.where == "fitted":
                assert row["status"] == OK, (case, row["reason"])
                if case.expect.startswith("warning:"):
                    assert (row["decode_warning"] or "").startswith(case.expect[8:]), (case, row["decode_warning"])
                elif case.expect:
                    assert any(n.startswith(case.expect) for n in row["load_notes"]), (case, row["load_notes"])
            else:
                assert row["status"] != OK and row["reason"].startswith(case.expect), (case, row["reason"])
        elif case.where == "skipped":
            assert case.rel not in proxies and skipped[case.rel]["reason"].startswith(case.expect), case
        else:
            assert case.rel not in proxies and case.rel not in skipped, case
            assert any(d["reason"] == case.expect for d in dup_by_path.pop(case.rel)), case
    m = tables["metrics"][0]
    listed = len(tables["proxies"]) + len(tables["skipped"]) + len(tables["duplicates"])
    assert m["inputs"] == sum(m["accounted"].values()) == listed
    assert m["accounted"] == {"fitted": sum(r["status"] == OK for r in tables["proxies"]),
                              "quarantined": len(quarantine), "skipped": len(skipped), "duplicates": len(duplicates)}
    assert m["decode_warnings"] == sum(r["decode_warning"] is not None for r in tables["proxies"]) >= 2


@pytest.fixture(scope="module")
def hostile_folder(built: Path) -> tuple[Path, list[Case]]:
    root = _hostile_root(built, "case-hostile")
    return root, make_hostile_folder(root / "photos", root / "outside", data.astronaut())


def test_a_hostile_folder_runs_through_the_stage_every_file_accounted(hostile_folder: tuple[Path, list[Case]]) -> None:
    root, cases = hostile_folder
    tables = _run_stage(root)
    assert {c.rel for c in cases} == ({r["path"] for r in tables["proxies"]} | {r["path"] for r in tables["skipped"]}
                                      | {r["path"] for r in tables["duplicates"]})
    _check_accounting(tables, cases)
    odd = next(r for r in tables["proxies"] if r["path"] == "caf\\xe9-photo.jpg")
    assert odd["listing_note"].startswith("file name is not valid UTF-8") and odd["status"] == OK
    assert {r["duplicate_of"] for r in tables["duplicates"] if r["path"].startswith("z_copies/")} == {
        next(r["id"] for r in tables["proxies"] if r["path"] == "face.jpg")}


def test_a_hostile_latin1_list_runs_through_the_stage(built: Path, hostile_folder: tuple[Path, list[Case]]) -> None:
    photos, _ = hostile_folder
    root = _hostile_root(built, "case-hostile-list")
    _, cases = make_hostile_list(photos / "photos", root / "list", data.astronaut())
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["wild_proxy"]["input"] = "list/list.csv"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    tables = _run_stage(root)
    by_row = {d["row"]: d for d in tables["duplicates"]}
    rows = {r["path"]: r for r in tables["proxies"]}
    assert len(rows) + len(by_row) == len(cases) and not tables["skipped"]
    for n, case in enumerate(cases, start=1):
        if case.where == "duplicates":
            assert by_row[n]["reason"] == case.expect, (n, by_row.get(n))
        elif case.where == "fitted":
            assert rows[case.rel]["status"] == OK, (case, rows[case.rel]["reason"])
        else:
            assert rows[case.rel]["reason"].startswith(case.expect), (case, rows[case.rel]["reason"])
    assert rows[next(c.rel for c in cases if "caf" in c.rel)]["label"] == "caf\\xe9"


def test_prior_takes_every_hostile_file_one_json_line_each(hostile_folder: tuple[Path, list[Case]]) -> None:
    """`facedetail prior` on the same files: the same decoder and face policy, so the same verdicts, one line each."""
    root, cases = hostile_folder
    photos = root / "photos"
    args = [os.fsencode(photos / c.name) for c in cases if c.where in ("fitted", "quarantined")]
    args += [os.fsencode(photos / n) for n in ("fifo.jpg", "loop.jpg", "broken.jpg", "sub", "missing.jpg")]
    proc = run_without_root([sys.executable, "-m", "facedetail.cli", "prior", *args, "--dictionary",
                             str(root / "data/dictionary")], cwd=ROOT, env=tool_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(args)
    if not (root / "data/wild_proxy/proxies.parquet").is_file():
        _run_stage(root)
    stage = {r["path"]: r for r in pq.read_table(root / "data/wild_proxy/proxies.parquet").to_pylist()}
    for case, line in zip([c for c in cases if c.where in ("fitted", "quarantined")], lines, strict=False):
        assert line["photo"].endswith(case.rel), (case, line["photo"])
        if case.where == "fitted":
            assert line["beta_prior"] is not None, (case, line["reason"])
            # The stage looked the same face up (same decoder, detector and crop): the same neighbour.
            assert line["neighbour"] == stage[case.rel]["beta_prior_id"], case
        else:
            assert line["beta_prior"] is None and line["reason"].startswith(case.expect), (case, line["reason"])
    tail = [line["reason"] for line in lines[-5:]]
    assert tail == ["not a file: a special file (FIFO)", "symlink loop: the link resolves to itself",
                    "no such file (broken symlink)", "not a file: a folder", "no such file"]


_WORKER_PEAK = """
import json, sys
from pathlib import Path
from facedetail.features.landmarks import DetectorConfig
from facedetail.io.shards import ShardTask
from facedetail.proxy.fit import FitConfig
from facedetail.proxy.inputs import LoadConfig, scan_inputs
from facedetail.proxy.pipeline import ProxyShardWorker, ProxySpec
from facedetail.proxy.texture import TextureConfig

root, photos = Path(sys.argv[1]), Path(sys.argv[2])
items = scan_inputs(photos).items
spec = ProxySpec(root / "data/face_model/model.npz", root / "data/dictionary", LoadConfig(),
                 DetectorConfig(), FitConfig(), TextureConfig(resolution=1024), "rss")
worker = ProxyShardWorker(spec)
rows = worker(ShardTask("s", tuple(i.id for i in items), tuple(items)), Path(sys.argv[3]), lambda n: None)
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024
print(json.dumps({"peak_mb": hwm, "reasons": {r["path"]: r.get("reason") for r in rows}}))
"""
WORKER_BUDGET_MB = 1024
"""Peak resident memory of one wild_proxy worker (default profile: 1024² chart, shards of 32), whatever the input."""


def test_one_worker_stays_under_its_memory_budget_on_any_input(built: Path, tmp_path: Path) -> None:
    """A full shard of 32 (the default): 25 photos of 1024², the bombs, and a 5000² RGBA PNG at max_pixels."""
    from test_hostile_inputs import bad_files

    face = data.astronaut()
    photos = tmp_path / "photos"
    photos.mkdir()
    big = cv2.resize(face, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    for k in range(25):
        cv2.imwrite(str(photos / f"face-{k:02d}.jpg"), big[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80 + k % 15])
    bombs = bad_files(face)
    for name in ("header_65500.jpg", "progressive_16000.jpg", "zlib_bomb_14000.png", "canvas_60000.gif",
                 "header_50000.bmp", "idat_crc.png"):
        (photos / name).write_bytes(bombs[name][0])
    rgba = np.zeros((5000, 5000, 4), np.uint8)
    rgba[..., 1], rgba[:2500, :, 3] = 180, 255
    cv2.imwrite(str(photos / "rgba_5000.png"), rgba, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    del rgba
    proc = subprocess.run([sys.executable, "-c", _WORKER_PEAK, str(built), str(photos), str(tmp_path / "s.tar")],
                          cwd=ROOT, capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["reasons"]["face-00.jpg"] is None and got["reasons"]["zlib_bomb_14000.png"].startswith(
        "image too large")
    assert got["peak_mb"] < WORKER_BUDGET_MB, got["peak_mb"]


# --- the compiled unwrap against the array version it replaced -----------------------------------------


def _reference_texels(photo: np.ndarray, photo_xy: np.ndarray, depth: np.ndarray, facing: np.ndarray,
                      cells: np.ndarray, raster, config: TextureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The array version of unwrap_texels (the part unwrap_projective shares)."""
    from facedetail.proxy.texture import _sample

    cell = np.floor(cells).astype(np.int64)
    lo = cell.min(axis=0)
    span = cell.max(axis=0) - lo + 1
    flat = (cell[:, 1] - lo[1]) * span[0] + (cell[:, 0] - lo[0])
    zbuf = np.full(int(span[0] * span[1]), -np.inf)
    np.maximum.at(zbuf, flat[facing], depth[facing])
    unoccluded = depth >= zbuf[flat] - config.depth_tolerance_mm
    px, py = photo_xy[:, 0].astype(np.float32), photo_xy[:, 1].astype(np.float32)
    h, w = photo.shape[:2]
    visible = facing & unoccluded & (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    colours = _sample(photo, px, py)
    texture = raster.image(np.where(visible[:, None], colours, 0).astype(np.uint8))
    mask = raster.image(visible[:, None].astype(np.uint8))[..., 0].astype(bool)
    return texture, mask


@pytest.mark.parametrize("resolution", [TINY_CHART, 512])
def test_the_compiled_unwrap_gives_the_array_versions_bytes(built: Path, resolution: int) -> None:
    from test_proxy_fit import reference_unwrap

    from facedetail.model.morphable import MorphableModel
    from facedetail.proxy.fit import Cameras
    from facedetail.proxy.inputs import load_photo
    from facedetail.proxy.texture import UVTexels, texel_geometry, unwrap, unwrap_texels

    model = MorphableModel.load(built / "data/face_model/model.npz")
    raster = UVTexels.build(model.uv, model.triangles, resolution)
    config = TextureConfig(resolution=resolution)
    rows = [r for r in pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist() if r["status"] == OK]
    assert len(rows) >= 4
    for row in rows:
        photo = load_photo(built / "data/wild_synth/images" / row["path"], LoadConfig())
        vertices = model.vertices(np.asarray(row["alpha"]), np.asarray(row["beta"]))
        normals = model.vertex_normals(vertices)
        camera = Cameras(np.array([row["camera_scale"]]), np.asarray(row["camera_rotation"]).reshape(1, 3, 3),
                         np.asarray(row["camera_translation"])[None])
        to_photo = 1.0 / row["fit_frame_scale"]
        got = unwrap(photo.rgb, vertices, normals, camera, to_photo, raster, config)
        rgba, mask = reference_unwrap(photo.rgb, vertices, normals, camera, to_photo, raster, config)
        assert mask.any() and (got.mask != mask).sum() <= 3, row["path"]  # see test_proxy_fit
        assert np.array_equal(got.rgba_map[got.mask & mask], rgba[got.mask & mask]), row["path"]
        # The shared part alone, as unwrap_projective calls it: photo positions in pixel cells of 3 px.
        pos, nrm = texel_geometry(raster, vertices, normals)
        xy = camera.project(pos[None])[0] * [to_photo, -to_photo]
        facing = nrm @ camera.rotation[0, 2] >= 0.3
        got = unwrap_texels(photo.rgb, xy, camera.depth(pos[None])[0], facing, xy / 3.0, raster, config)
        texture, mask = _reference_texels(photo.rgb, xy, camera.depth(pos[None])[0], facing, xy / 3.0, raster, config)
        assert np.array_equal(got.mask, mask) and np.array_equal(got.texture, texture), row["path"]


# --- the face chosen (issue 17): composites of the astronaut's face -----------------------------------------


@pytest.fixture(scope="module")
def composites(built: Path) -> Path:
    """two.png: a main face (box ~200 px) on the left and a background face (~110 px) in the centre;
    small.png: a 70 px face in a 1024² photo (under dlib's window at the 640 px detection size)."""
    from test_face_choice import face_patch, paste

    folder = built / "composites"
    folder.mkdir()
    two = np.full((768, 1024, 3), 140, np.uint8)
    paste(two, face_patch(200), 20, 200)
    paste(two, face_patch(110), 433, 305)
    cv2.imwrite(str(folder / "two.png"), two[..., ::-1])
    small = np.full((1024, 1024, 3), 150, np.uint8)
    paste(small, face_patch(70), 300, 600)
    cv2.imwrite(str(folder / "small.png"), small[..., ::-1])
    return folder


def test_the_default_policy_takes_the_main_face_and_finds_the_small_one(built: Path, composites: Path) -> None:
    rows = _run_case(built, "largest", {"two.png": composites / "two.png", "small.png": composites / "small.png"})
    two, small = rows["two.png"], rows["small.png"]
    assert two["status"] == OK and two["faces_found"] == 2 and two["box"][2] - two["box"][0] > 150
    assert small["status"] == OK and 50 < small["box"][2] - small["box"][0] < 100
    assert small["nme"] < 0.1
    rows = _run_case(built, "no-retry", {"small.png": composites / "small.png", "two.png": composites / "two.png"},
                     detector={"retry_max_pixels": 0})
    assert rows["small.png"]["reason"] == "no face detected"


def test_all_faces_give_a_row_each_with_unique_ids(built: Path, composites: Path) -> None:
    _run_case(built, "all", {"two.png": composites / "two.png", "small.png": composites / "small.png"},
              detector={"multiple_faces": "all"})
    out = built / "case-all/data/wild_proxy"
    rows = pq.read_table(out / "proxies.parquet").to_pylist()
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) == 3
    two = sorted((r for r in rows if r["path"] == "two.png"), key=lambda r: r["id"])
    (small,) = (r for r in rows if r["path"] == "small.png")
    photo_id = two[0]["id"].split("#")[0]
    assert [r["id"] for r in two] == [f"{photo_id}#1", f"{photo_id}#2"] and small["id"].endswith("#1")
    assert all(r["status"] == OK for r in rows), [r["reason"] for r in rows]
    width = [r["box"][2] - r["box"][0] for r in two]
    assert width[0] > 150 > width[1] > 80, width  # largest first
    # Each face's texture is its own shard member; the manifest lists every one.
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(m["id"] for m in manifest) == sorted(ids)
    for r in rows:
        (sample,) = read_tar_samples(out / r["shard"], [r["id"]])
        assert decode_png(sample[TEXTURE_EXT], alpha=True).shape[2] == 4
    # The lineage record and the contact sheet took the face ids.
    assert json.loads((out / "lineage.json").read_text()) and (out / "contact_sheet.png").is_file()


def test_the_contact_sheet_opens_on_the_worst_fits(built: Path) -> None:
    rows = [r for r in pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist() if r["status"] == OK]
    order = wild_proxy.worst_first(rows)
    assert [r["nme"] for r in order] == sorted((r["nme"] for r in rows), reverse=True)
    sheet = decode_png((built / "data/wild_proxy/contact_sheet.png").read_bytes())
    assert sheet.shape[1] == 4 * 192 and sheet.shape[0] >= 192


def test_photometric_refinement_is_wired_into_the_stage(built: Path, tmp_path: Path) -> None:
    """`photometric.enabled: true` runs the refinement after the landmark fit on every usable face: α and the
    camera change, the photometric term goes down, and the rows carry it; the fit's NME stays the fit's."""
    root = tmp_path / "root"
    for part in ("data/face_model", "data/dictionary", "data/wild_synth"):  # the stage's inputs only: other
        shutil.copytree(built / part, root / part)                          # tests leave FIFOs in `built`
    (root / "eos-share").symlink_to((built / "eos-share").resolve())
    params = _params(photometric={"enabled": True, "iterations": 8})
    wild_proxy.run(params, root)
    before = {r["id"]: r for r in pq.read_table(built / "data/wild_proxy/proxies.parquet").to_pylist()}
    after = [r for r in pq.read_table(root / "data/wild_proxy/proxies.parquet").to_pylist() if r["status"] == OK]
    assert after and all(r["photometric_start"] is not None and r["photometric_end"] is not None for r in after)
    assert np.mean([r["photometric_end"] < r["photometric_start"] for r in after]) >= 0.5
    changed = [r for r in after if not np.allclose(r["alpha"], before[r["id"]]["alpha"])]
    assert changed, "the refinement left every α as the landmark fit's"
    assert all(r["nme"] == pytest.approx(before[r["id"]]["nme"]) for r in after)
    assert all(before[r["id"]]["photometric_start"] is None for r in after), "off by default"
