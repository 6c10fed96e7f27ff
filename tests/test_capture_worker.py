"""The capture worker, its resumable per-item work folder, the link step, metrics and preview (library level)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_CAPTURE_GT, TINY_CHART, TINY_SYNTH_SET

from facedetail.capture.evaluate import capture_metrics, reason_counts
from facedetail.capture.maps import MAP_FILES, load_item
from facedetail.capture.patches import face_regions
from facedetail.capture.preview import capture_preview, displacement_image
from facedetail.capture.process import CaptureConfig
from facedetail.capture.scan import CAPTURE_FILE, CaptureItem, discover_items
from facedetail.capture.synthetic import DetailConfig, ScanConfig
from facedetail.capture.synthset import SyntheticSetConfig, SyntheticSetWriter, SynthTask, synthetic_set_metrics
from facedetail.capture.worker import (
    TIMING_FACTS,
    CaptureWorker,
    ItemsReport,
    PatchCountConfig,
    completed_item,
    input_digest,
    link_items,
    patch_counts,
    process_items,
    record_path,
)
from facedetail.io.hashing import sha256_file
from facedetail.io.manifest import verify_manifest, write_manifest
from facedetail.io.seeds import derive_seed
from facedetail.render.sheet import LABEL_HEIGHT

R = TINY_CHART
CONFIG = CaptureConfig(resolution=R)
PATCHES = PatchCountConfig(**TINY_CAPTURE_GT["patches"])
SEED = 2019
KEY = "0123456789abcdef"
BAD = "bad/neutral"
GOOD = ["s000/happiness", "s000/neutral", "s000/surprise"]


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory, model_npz: Path) -> Path:
    """The tiny synthetic set (one subject, three expressions) and one item without a scan."""
    out = tmp_path_factory.mktemp("captures")
    config = SyntheticSetConfig(resolution=TINY_SYNTH_SET["resolution"], scan=ScanConfig(**TINY_SYNTH_SET["scan"]),
                                details=DetailConfig(**TINY_SYNTH_SET["details"]))
    writer = SyntheticSetWriter(model_npz, config, "capture_synth", out)
    for expression in config.expressions:
        writer(SynthTask("s000", expression))
    (out / BAD).mkdir(parents=True)
    (out / BAD / CAPTURE_FILE).write_text('{"units": "mm"}\n')
    return out


def counting(model_npz: Path, calls: list[str], kill_after_writing: str | None = None) -> Callable[[], Any]:
    """A worker factory that records the items it is asked to build (and can die mid-item, files written)."""

    def factory() -> Callable[[CaptureItem, Path], dict[str, Any]]:
        inner = CaptureWorker(model_npz, CONFIG, SEED, "capture_gt", KEY, PATCHES)

        def work(item: CaptureItem, folder: Path) -> dict[str, Any]:
            calls.append(item.id)
            result = inner(item, folder)
            if item.id == kill_after_writing:
                raise KeyboardInterrupt  # killed after the maps, before the record
            return result

        return work

    return factory


def run(captures: Path, work: Path, model_npz: Path, **kw: Any) -> tuple[ItemsReport, list[str]]:
    calls: list[str] = []
    report = process_items(discover_items(captures), work, KEY, counting(model_npz, calls, **kw), workers=1)
    return report, calls


def linked(results: list[dict[str, Any]], work: Path, out: Path) -> dict[str, str]:
    """{path: sha256} of the files of ``results`` linked into ``out``."""
    link_items(results, work, out)
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}


def untimed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "timing"} for r in results]


@pytest.fixture(scope="module")
def clean(captures: Path, model_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run from an empty work folder, and its outputs linked into a folder."""
    base = tmp_path_factory.mktemp("clean")
    report, calls = run(captures, base / "work", model_npz)
    return {"report": report, "calls": calls, "work": base / "work", "out": base / "out",
            "files": linked(report.results, base / "work", base / "out")}


def copy_work(clean: dict[str, Any], tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    return work


def flip_byte(path: Path) -> None:
    """The same size, another content: only the hash can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_worker_results_rows_and_records(clean: dict[str, Any], captures: Path) -> None:
    report, work = clean["report"], clean["work"]
    assert clean["calls"] == [BAD, *GOOD] and (report.built, report.reused) == (4, 0)
    by_id = {r["id"]: r for r in report.results}
    assert [r["id"] for r in report.results] == [BAD, *GOOD]
    assert set(by_id[BAD]) == {"id", "path", "reason"} and by_id[BAD]["path"] == BAD
    assert by_id[BAD]["reason"].startswith("missing ")
    for item_id in GOOD:
        result = by_id[item_id]
        assert set(result) == {"id", "rows", "timing", "patches"} and set(result["timing"]) == set(TIMING_FACTS)
        assert result["patches"]["upper"] > 0 and result["patches"]["lower"] > 0
        rows = result["rows"]
        assert [r["path"] for r in rows] == [f"maps/{item_id}/{name}" for name in MAP_FILES.values()]
        assert [r["id"] for r in rows] == [f"{item_id}/{kind}" for kind in MAP_FILES]
        for row in rows:
            file = work / item_id / Path(row["path"]).name
            assert row["sha256"] == sha256_file(file) and row["bytes"] == file.stat().st_size
            # The stage name goes into the seed, as the stage had it.
            assert row["seed"] == derive_seed(SEED, "capture_gt", item_id) and row["params_hash"] == KEY
            assert not set(TIMING_FACTS) & set(row) and row["units"] == "mm" and row["resolution"] == R
    # Every item, the rejection too, has its record, and the record holds the result as returned.
    for item in discover_items(captures):
        assert completed_item(work, item, KEY) == by_id[item.id]


def test_link_items_hard_links_the_maps_at_their_manifest_paths(clean: dict[str, Any]) -> None:
    out, work = clean["out"], clean["work"]
    rows = [row for r in clean["report"].results for row in r.get("rows", [])]
    assert sorted(clean["files"]) == sorted(r["path"] for r in rows)  # nothing for the rejection
    for row in rows:
        assert os.stat(out / row["path"]).st_ino == os.stat(work / row["path"].removeprefix("maps/")).st_ino
    assert link_items(clean["report"].results, work, out / "again") == {r["path"]: r["sha256"] for r in rows}
    write_manifest(out / "manifest.parquet", rows)
    assert verify_manifest(out) == []


def test_resume_after_a_kill_builds_only_the_unfinished_items(clean: dict[str, Any], captures: Path,
                                                              model_npz: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        run(captures, work, model_npz, kill_after_writing="s000/neutral")
    assert record_path(work, "s000/happiness").is_file() and not record_path(work, "s000/neutral").is_file()
    assert (work / "s000/neutral/displacement.npy").is_file()  # files without a record: not counted
    report, calls = run(captures, work, model_npz)
    assert calls == ["s000/neutral", "s000/surprise"] and (report.built, report.reused) == (2, 2)
    assert untimed(report.results) == untimed(clean["report"].results)
    assert linked(report.results, work, tmp_path / "out") == clean["files"]


def test_a_missing_record_or_an_altered_file_rebuilds_only_that_item(clean: dict[str, Any], captures: Path,
                                                                    model_npz: Path, tmp_path: Path) -> None:
    work = copy_work(clean, tmp_path)
    record_path(work, "s000/happiness").unlink()
    flip_byte(work / "s000/surprise/normal.png")
    report, calls = run(captures, work, model_npz)
    assert calls == ["s000/happiness", "s000/surprise"] and (report.built, report.reused) == (2, 2)
    expected = clean["report"].results
    # Re-used results are the recorded ones, timing included; rebuilt ones differ in timing only.
    assert [r for r in report.results if r["id"] not in calls] == [r for r in expected if r["id"] not in calls]
    assert untimed(report.results) == untimed(expected)
    assert linked(report.results, work, tmp_path / "out") == clean["files"]
    report, calls = run(captures, work, model_npz)
    assert calls == [] and report.reused == 4
    # Digests known to the caller stand for hashing the inputs: one that differs rebuilds that item only.
    items = discover_items(captures)
    digests = {item.id: input_digest(item) for item in items}
    calls = []
    report = process_items(items, work, KEY, counting(model_npz, calls), input_digests=digests)
    assert calls == [] and report.reused == 4
    report = process_items(items, work, KEY, counting(model_npz, calls),
                           input_digests={**digests, "s000/neutral": "another listing"})
    assert calls == ["s000/neutral"] and untimed(report.results) == untimed(expected)


def test_a_half_written_item_is_cleared_and_rebuilt(clean: dict[str, Any], captures: Path, model_npz: Path,
                                                    tmp_path: Path) -> None:
    work = copy_work(clean, tmp_path)
    item = work / "s000/neutral"
    record_path(work, "s000/neutral").unlink()
    (item / "mask.png").write_bytes((item / "mask.png").read_bytes()[:10])
    (item / ".normal.png.tmp-k1ll3d").write_bytes(b"half a file")
    (item / "stray.bin").write_bytes(b"left by an older run")
    (work / "s000/.neutral.done.json.tmp-k1ll3d").write_text('{"half": ')
    report, calls = run(captures, work, model_npz)
    assert calls == ["s000/neutral"] and report.reused == 3
    assert sorted(p.name for p in item.iterdir()) == sorted(MAP_FILES.values())
    assert not list((work / "s000").glob(".*.tmp-*"))
    assert untimed(report.results) == untimed(clean["report"].results)
    assert linked(report.results, work, tmp_path / "out") == clean["files"]


def test_completed_item_checks_key_inputs_and_files(clean: dict[str, Any], captures: Path, tmp_path: Path) -> None:
    work = copy_work(clean, tmp_path)
    shutil.copytree(captures / "s000/happiness", tmp_path / "in/happiness")
    item = CaptureItem("s000/happiness", tmp_path / "in/happiness")
    bad = CaptureItem(BAD, captures / BAD)
    expected = {r["id"]: r for r in clean["report"].results}
    assert completed_item(work, item, KEY) == expected[item.id]
    assert completed_item(work, bad, KEY) == expected[BAD]  # a rejection is re-used too
    assert completed_item(work, item, "another key") is None
    assert completed_item(work, item, KEY, inputs=input_digest(item)) == expected[item.id]
    assert completed_item(work, item, KEY, inputs="another listing") is None
    assert completed_item(work, CaptureItem("s000/neutral", item.folder), KEY) is None  # the inputs of another item
    details = item.folder / "details.json"
    original = details.read_bytes()
    details.write_bytes(original + b" ")
    assert completed_item(work, item, KEY) is None  # an input changed
    details.write_bytes(original)
    assert completed_item(work, item, KEY) == expected[item.id]
    disp = work / "s000/happiness/displacement.npy"
    flip_byte(disp)
    assert completed_item(work, item, KEY) is None
    disp.unlink()
    assert completed_item(work, item, KEY) is None
    record_path(work, BAD).write_text('{"version": 1, "id": ')
    assert completed_item(work, bad, KEY) is None


def test_input_digest_follows_names_and_contents(tmp_path: Path) -> None:
    item = CaptureItem("s/e", tmp_path)
    (tmp_path / "scan.ply").write_bytes(b"abc")
    first = input_digest(item)
    assert input_digest(item) == first
    (tmp_path / "scan.ply").write_bytes(b"abd")
    second = input_digest(item)
    (tmp_path / "scan.ply").rename(tmp_path / "scan2.ply")
    third = input_digest(item)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos/a.jpg").write_bytes(b"")
    assert len({first, second, third, input_digest(item)}) == 4


def test_patch_counts_are_the_grid_positions_the_mask_allows(sfm_model) -> None:
    config = PatchCountConfig(size=32, stride=16, min_valid=0.5, overlap=16)
    expected = {}
    for name, box in face_regions(sfm_model, R, config.overlap).items():
        expected[name] = (len(range(box.row0, box.row1 - 32 + 1, 16)) * len(range(box.col0, box.col1 - 32 + 1, 16)))
    assert min(expected.values()) > 0
    assert patch_counts(sfm_model, np.ones((R, R), bool), config) == expected
    assert patch_counts(sfm_model, np.zeros((R, R), bool), config) == dict.fromkeys(expected, 0)
    # Every other row valid: half of each patch exactly, which min_valid 0.5 keeps and 0.6 does not.
    half = np.zeros((R, R), bool)
    half[::2] = True
    assert patch_counts(sfm_model, half, config) == expected
    assert patch_counts(sfm_model, half, config.model_copy(update={"min_valid": 0.6})) == dict.fromkeys(expected, 0)


def _done(item_id: str, patches: dict[str, int], **facts: Any) -> dict[str, Any]:
    return {"id": item_id, "rows": [{"expression": item_id.split("/")[1], **facts}], "patches": patches}


def test_capture_metrics_on_known_numbers() -> None:
    done = [
        _done("a/neutral", {"upper": 3, "lower": 4}, gt_mae_mm=0.01, gt_mean_abs_mm=0.02, gt_p95_error_mm=0.03,
              masked_fraction=0.1, gt_note=None, ray_backend="embree", icp_residual_mm=0.02, icp_rotation_deg=1.0,
              png_clipped_texels=2),
        _done("a/happiness", {"upper": 5, "lower": 0}, gt_mae_mm=0.03, gt_mean_abs_mm=0.06, gt_p95_error_mm=0.05,
              masked_fraction=0.3, gt_note=None, ray_backend="triangle", icp_residual_mm=0.04, icp_rotation_deg=3.0,
              png_clipped_texels=1),
        _done("b/neutral", {"upper": 1, "lower": 1}, gt_note="ground truth gt.npy unreadable", masked_fraction=0.2,
              ray_backend="embree", icp_residual_mm=0.06, icp_rotation_deg=2.0, png_clipped_texels=0),
    ]
    bad = [{"id": "c/x", "reason": "missing scan: none"}, {"id": "d/x", "reason": "wrong units: 1000x"},
           {"id": "e/x", "reason": "missing scan: none of scan.ply"}]
    patches = PatchCountConfig(size=32, stride=16, min_valid=0.5)
    metrics = capture_metrics(done, bad, resolution=192, highpass_sigma_mm=4.0, patches=patches, key=KEY)
    assert metrics == {
        "items": 6, "processed": 3, "quarantined": 3,
        "quarantine_reasons": {"missing scan": 2, "wrong units": 1},
        "resolution": 192, "ray_backend": ["embree", "triangle"], "highpass_sigma_mm": 4.0,
        "masked_fraction": {"mean": 0.2, "min": 0.1, "max": 0.3},
        "icp_residual_mm": {"mean": 0.04, "min": 0.02, "max": 0.06},
        "icp_rotation_deg": {"mean": 2.0, "min": 1.0, "max": 3.0},
        "png_clipped_texels": 3,
        "accuracy": {"items": 2, "mae_mm_mean": 0.02, "mae_mm_max": 0.03, "p95_error_mm_mean": 0.04,
                     "gt_mean_abs_mm_mean": 0.04, "relative_mae": 0.5, "masked_fraction_mean": 0.2,
                     "per_expression": {"happiness": 0.03, "neutral": 0.01},
                     "notes": ["ground truth gt.npy unreadable"]},
        "patches": {"size": 32, "stride": 16, "min_valid": 0.5, "total": {"upper": 9, "lower": 5}},
        "params_hash": KEY,
    }
    assert reason_counts(bad) == metrics["quarantine_reasons"]
    # No detail in the ground truth: no relative error (None, not inf); nothing processed: empty counts.
    flat = [_done("a/neutral", {"upper": 1}, gt_mae_mm=0.01, gt_mean_abs_mm=0.0, gt_p95_error_mm=0.01,
                  masked_fraction=0.1, ray_backend="embree", icp_residual_mm=0.0, icp_rotation_deg=0.0,
                  png_clipped_texels=0)]
    assert capture_metrics(flat, [], resolution=1, highpass_sigma_mm=1.0, patches=patches,
                           key=KEY)["accuracy"]["relative_mae"] is None
    empty = capture_metrics([], bad, resolution=1, highpass_sigma_mm=1.0, patches=patches, key=KEY)
    assert empty["processed"] == 0 and empty["masked_fraction"] is None and empty["patches"]["total"] == {}


def test_capture_preview_shows_the_maps_of_the_output_folder(clean: dict[str, Any], captures: Path,
                                                             model_npz: Path) -> None:
    tile, ids = 64, ["s000/happiness", "s000/neutral"]
    sheet = capture_preview(clean["out"], model_npz, captures, ids, R, 0.5, tile)
    assert sheet.dtype == np.uint8 and sheet.shape == (2 * (tile + LABEL_HEIGHT), 3 * tile, 3)
    for row, item_id in enumerate(ids):
        maps = load_item(clean["out"], item_id)
        top = row * (tile + LABEL_HEIGHT) + LABEL_HEIGHT
        np.testing.assert_array_equal(sheet[top:top + tile, :tile], displacement_image(maps.displacement, maps.mask,
                                                                                       0.5, tile))
        render = sheet[top:top + tile, 2 * tile:]
        assert (render != 255).any(axis=-1).mean() > 0.2  # the detailed mesh was rendered
    np.testing.assert_array_equal(capture_preview(clean["out"], model_npz, captures, ids, R, 0.5, tile), sheet)


def test_synthetic_set_metrics_on_known_numbers() -> None:
    results = [
        {"id": "s000/neutral",
         "facts": {"scan_faces": 100, "gt_mean_abs_mm": 0.01, "strengths": {"forehead": 0.123456}}},
        {"id": "s001/neutral", "facts": {"scan_faces": 201, "gt_mean_abs_mm": 0.03, "strengths": {"forehead": 0.5}}},
        {"id": "s000/surprise", "facts": {"scan_faces": 300, "gt_mean_abs_mm": 0.05, "strengths": {"forehead": 1.0}}},
        {"id": "bad-empty-mesh/neutral", "facts": {"bad_example": "empty-mesh"}},
    ]
    rows = [{"bytes": 1_500_000}, {"bytes": 250_000}]
    metrics = synthetic_set_metrics(results, rows, subjects=2, expressions=("neutral", "surprise"), resolution=64,
                                    key=KEY)
    assert metrics == {
        "items": 3, "subjects": 2, "expressions": ["neutral", "surprise"], "bad_examples": 1, "resolution": 64,
        "scan_faces_mean": 200, "megabytes": 1.75,
        "per_expression": {"neutral": {"gt_mean_abs_mm": 0.02, "strengths": {"forehead": 0.1235}},
                           "surprise": {"gt_mean_abs_mm": 0.05, "strengths": {"forehead": 1.0}}},
        "params_hash": KEY,
    }
    assert json.loads(json.dumps(metrics)) == metrics
