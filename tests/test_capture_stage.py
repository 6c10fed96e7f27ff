"""The capture_synth and capture_gt stages: outputs, quarantine of each bad input, metrics, reruns, DVC."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_CAPTURE_GT, TINY_CAPTURE_SYNTH, TINY_CHART, sh, shrink_params, tool_env

from facedetail.capture import UPPER, cut_patches, face_regions, list_items, load_item
from facedetail.capture.maps import decode_png, u16_to_displacement
from facedetail.capture.scan import discover_items
from facedetail.capture.synthset import BAD_KINDS
from facedetail.io.hashing import sha256_file
from facedetail.io.manifest import verify_manifest
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import rasterize_uv
from stages import capture_gt, capture_synth

EXPECTED_REASON = {
    "missing-scan": "missing scan: none of scan.ply, scan.obj",
    "unreadable-mesh": "unreadable mesh: scan.ply",
    "empty-mesh": "empty mesh: scan.ply has 0 vertices and 0 faces",
    "non-manifold": "non-manifold mesh: scan.ply has 1 edges shared by more than two faces",
    "wrong-units": "wrong units:",
    "nan-vertices": "non-finite vertices: scan.ply has 5 vertices with NaN",
    "wrong-topology": "wrong proxy topology: proxy.ply has 13632 vertices",
    "misaligned": "alignment failed: after ICP",
}


CHART = {"uv_chart": {"resolution": TINY_CHART}}


def _build(root: Path, workers: int = 1) -> None:
    chart = CHART
    capture_synth.run(capture_synth.CaptureSynthParams(**{**TINY_CAPTURE_SYNTH, "subjects": 1, "workers": workers,
                                                          "bad_examples": True, **chart}), root)
    capture_gt.run(capture_gt.CaptureGtParams(**{**TINY_CAPTURE_GT, "workers": workers, **chart}), root)


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_npz: Path) -> Path:
    """A root with the face model, the tiny synthetic set (with one broken item per kind) and its maps."""
    root = tmp_path_factory.mktemp("capture") / "root"
    (root / "data/face_model").mkdir(parents=True)
    shutil.copy2(model_npz, root / "data/face_model/model.npz")
    _build(root)
    return root


def test_each_bad_input_is_quarantined_with_its_reason(built: Path) -> None:
    quarantine = {r["id"]: r for r in pq.read_table(built / "data/capture_gt/quarantine.parquet").to_pylist()}
    assert set(quarantine) == {f"bad-{kind}/neutral" for kind in BAD_KINDS}
    for kind, reason in EXPECTED_REASON.items():
        row = quarantine[f"bad-{kind}/neutral"]
        assert row["reason"].startswith(reason), (kind, row["reason"])
        assert row["path"] == f"data/capture_synth/bad-{kind}/neutral"
    units = quarantine["bad-wrong-units/neutral"]["reason"]
    assert "off by a factor of 1000; is the scan in mm rather than m?" in units
    metrics = json.loads((built / "metrics/capture_gt.json").read_text())
    assert metrics["processed"] == 3 and metrics["quarantined"] == len(BAD_KINDS)
    assert sum(metrics["quarantine_reasons"].values()) == len(BAD_KINDS)
    assert list_items(built / "data/capture_gt") == ["s000/happiness", "s000/neutral", "s000/surprise"]


def test_maps_manifest_and_png_scale(built: Path) -> None:
    out = built / "data/capture_gt"
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert verify_manifest(out) == []
    assert (out / "lineage.json").is_file() and (out / "preview.png").is_file()
    R = TINY_CHART
    model = MorphableModel.load(built / "data/face_model/model.npz")
    chart = int(rasterize_uv(model.uv, model.triangles, R).covered.sum())
    rows = {r["id"]: r for r in manifest}
    for item in list_items(out):
        disp_row = rows[f"{item}/displacement_png"]
        assert disp_row["units"] == "mm" and disp_row["png_scale_mm"] == 2.0 and disp_row["resolution"] == R
        maps = load_item(out, item)
        assert maps.displacement.dtype == np.float32 and maps.displacement.shape == (R, R)
        png = decode_png(out / disp_row["path"])
        assert png.dtype == np.uint16
        decoded = u16_to_displacement(png, disp_row["png_scale_mm"])
        assert np.abs(decoded - maps.displacement).max() <= 2.0 / 65535 + 1e-6  # the scale in the manifest is the unit
        assert not maps.displacement[~maps.mask].any()
        assert maps.mask.mean() > 0.7
        lengths = np.linalg.norm(maps.normals[maps.mask], axis=-1)
        assert np.abs(lengths - 1).max() < 1e-3
        row = rows[f"{item}/displacement"]
        assert row["valid_texels"] == int(maps.mask.sum())
        assert row["masked_fraction"] == pytest.approx(1 - row["valid_texels"] / chart, abs=1e-12)
    # The training issue's entry point: patches of a region, straight from the output folder.
    maps = load_item(out, "s000/surprise")
    box = face_regions(model, R, overlap=16)[UPPER]
    patches = cut_patches({"displacement": maps.displacement, "normals": maps.normals}, maps.mask, box, 32, 16)
    assert len(patches) > 10 and patches.maps["normals"].shape[1:] == (32, 32, 3)


def test_accuracy_metrics(built: Path) -> None:
    metrics = json.loads((built / "metrics/capture_gt.json").read_text())
    accuracy = metrics["accuracy"]
    assert accuracy["items"] == 3 and set(accuracy["per_expression"]) == {"neutral", "happiness", "surprise"}
    # Bound derived in test_capture_synth.test_extraction_matches_the_analytic_displacement.
    assert accuracy["mae_mm_max"] < 0.8 * 0.01 + 0.005
    assert accuracy["relative_mae"] < 0.5
    assert metrics["ray_backend"] == ["embree"] and metrics["resolution"] == TINY_CHART
    assert metrics["patches"]["total"]["upper"] > 0 and metrics["patches"]["total"]["lower"] > 0
    synth = json.loads((built / "metrics/capture_synth.json").read_text())
    assert synth["items"] == 3 and synth["bad_examples"] == len(BAD_KINDS)


@pytest.mark.slow
def test_stages_are_byte_identical_on_rerun_with_two_workers(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    shutil.copytree(built / "data/face_model", again / "data/face_model")
    _build(again, workers=2)
    for part in ("data/capture_synth", "data/capture_gt"):
        assert _files(again / part) == _files(built / part), part
    for name in ("capture_synth", "capture_gt"):
        assert (again / f"metrics/{name}.json").read_bytes() == (built / f"metrics/{name}.json").read_bytes()


def test_missing_inputs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    for module in ("stages.capture_synth", "stages.capture_gt"):
        proc = subprocess.run([sys.executable, "-m", module, "--root", str(tmp_path)], capture_output=True,
                              text=True, env=tool_env())
        assert proc.returncode == 2, (module, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "dvc repro face_model" in proc.stderr, proc.stderr


@pytest.mark.slow  # ~70 s; `dvc repro` of these stages runs in the tiny pipeline (conftest) by default, and
# test_flow_agrees_with_dvc checks that a changed param reruns exactly its stage and descendants
def test_dvc_repro_of_the_capture_stages(repo: Path) -> None:
    shrink_params(repo)
    sh(["dvc", "repro", "capture_gt"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"face_model", "capture_synth", "capture_gt"} <= set(lock)
    assert "render_expressions" not in lock, "capture_gt depends on the face model only"
    deps = {d["path"] for d in lock["capture_gt"]["deps"]}
    assert {"data/capture_synth", "data/face_model/model.npz", "stages/capture_gt.py", "facedetail/capture"} <= deps
    assert lock["capture_gt"]["params"]["params.yaml"]["uv_chart"]["resolution"] == TINY_CHART
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "mae_mm_mean" in json.dumps(shown)
    assert "up to date" in sh(["dvc", "status", "capture_gt"], repo).stdout
    # A capture_gt parameter re-runs capture_gt only.
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["capture_gt"]["process"]["png_scale_mm"] = 3.0
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    out = sh(["dvc", "repro", "capture_gt"], repo).stdout
    assert "Running stage 'capture_gt'" in out and "Running stage 'capture_synth'" not in out


def test_an_unexpected_error_in_one_item_is_quarantined(built: Path, tmp_path: Path) -> None:
    """Errors other than the layout checks (here: ground truth saved as .npz, which np.load reads as
    an archive, not an array) quarantine that item with the exception; the other items go on."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data/face_model").symlink_to(built / "data/face_model")
    captures = root / "data/capture_synth"
    shutil.copytree(built / "data/capture_synth/s000", captures / "s000")
    odd = captures / "s000/neutral"
    info = json.loads((odd / "capture.json").read_text())
    np.savez(odd / "gt.npz", d=np.zeros((4, 4)))
    (odd / "capture.json").write_text(json.dumps({**info, "ground_truth": "gt.npz"}))
    capture_gt.run(capture_gt.CaptureGtParams(**{**TINY_CAPTURE_GT, "preview_items": 0, **CHART}), root)
    (row,) = pq.read_table(root / "data/capture_gt/quarantine.parquet").to_pylist()
    assert row["id"] == "s000/neutral" and row["reason"].startswith("unexpected error: AttributeError"), row
    assert list_items(root / "data/capture_gt") == ["s000/happiness", "s000/surprise"]


def test_a_killed_capture_gt_resumes_from_its_finished_items(built: Path, tmp_path: Path) -> None:
    """SIGKILL of `python -m stages.capture_gt` mid-run: nothing that looks complete is left, the rerun
    reuses every finished item, and the result equals the uninterrupted run's byte for byte."""
    import os
    import signal
    import time

    root = tmp_path / "killed"
    for part in ("data/face_model", "data/capture_synth"):
        shutil.copytree(built / part, root / part)
    (root / "params.yaml").write_text(yaml.safe_dump({"capture_gt": TINY_CAPTURE_GT, **CHART}))
    work = root / "data/.partial/capture_gt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.capture_gt", "--root", str(root)],
                            cwd=Path(__file__).resolve().parents[1], env=tool_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(work.rglob("*.done.json")):  # records sit beside the item folders: WORK/<subject>/<expr>.done.json
        assert proc.poll() is None, f"the run ended before any item finished:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no item finished in time"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "data/capture_gt").exists(), "a killed run leaves nothing that looks complete"
    finished = len(list(work.rglob("*.done.json")))
    items = len(discover_items(built / "data/capture_synth"))
    assert 1 <= finished < items

    result = capture_gt.run(capture_gt.CaptureGtParams(**TINY_CAPTURE_GT, **CHART), root)
    assert result.summary["items_reused"] >= finished
    assert result.summary["items_built"] == items - result.summary["items_reused"]
    assert _files(root / "data/capture_gt") == _files(built / "data/capture_gt")
    assert (root / "metrics/capture_gt.json").read_bytes() == (built / "metrics/capture_gt.json").read_bytes()
    assert not work.exists(), "the work folder goes once the output is in place"


def test_an_empty_item_folder_is_quarantined_not_fatal(built: Path, tmp_path: Path) -> None:
    root = tmp_path / "empty-item"
    shutil.copytree(built / "data/face_model", root / "data/face_model")
    shutil.copytree(built / "data/capture_synth/s000/neutral", root / "data/capture_synth/s000/neutral")
    (root / "data/capture_synth/s999/neutral").mkdir(parents=True)
    result = capture_gt.run(capture_gt.CaptureGtParams(**{**TINY_CAPTURE_GT, "preview_items": 0, **CHART}), root)
    reasons = {r["id"]: r["reason"] for r in pq.read_table(root / "data/capture_gt/quarantine.parquet").to_pylist()}
    assert list(reasons) == ["s999/neutral"] and reasons["s999/neutral"].startswith("missing capture.json")
    assert result.summary["processed"] == 1
