"""The face_model stage: outputs, determinism, and one-line errors for bad sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_repo, sh

from facedetail.errors import ChecksumError, SourceFileError
from facedetail.io.hashing import sha256_file
from facedetail.io.lineage import iter_events
from facedetail.model import MorphableModel
from stages import face_model

DATA_FILES = ("model.npz", "manifest.parquet", "preview.png")


def _params(**overrides: object) -> face_model.FaceModelParams:
    return face_model.FaceModelParams(preview_size=96, **overrides)


@pytest.fixture
def plain_root(tmp_path: Path, eos_share: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(eos_share, root / "data/external/eos-share")
    return root


def test_run_writes_model_preview_manifest_lineage(plain_root: Path) -> None:
    result = face_model.run(_params(), plain_root)
    out = plain_root / "data/face_model"
    assert sorted(p.name for p in out.iterdir()) == ["CARD.md", "lineage.json", "manifest.parquet", "model.npz",
                                                    "preview.png"]
    model = MorphableModel.load(out / "model.npz")
    assert (model.n_vertices, model.n_triangles, model.n_expression) == (3448, 6736, 6)
    assert model.provenance["albedo"]["kind"] == "synthetic"

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in manifest] == ["model", "preview"]
    for row in manifest:
        assert row["sha256"] == sha256_file(out / row["path"])
        assert row["bytes"] == (out / row["path"]).stat().st_size

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["stage"] == "face_model"
    assert lineage["outputs"]["data/face_model/model.npz"] == sha256_file(out / "model.npz")
    assert set(lineage["inputs"]) == {
        f"data/external/eos-share/{n}" for n in
        ("sfm_shape_3448.bin", "expression_blendshapes_3448.bin", "ibug_to_sfm.txt", "sfm_model_contours.json")
    }
    events = list(iter_events(plain_root / "data/lineage/events.jsonl"))
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    # the run (id, times, host) is recorded beside the events, never inside the DVC out
    run_record = json.loads((plain_root / "data/lineage/runs/face_model.json").read_text())
    assert events[1]["run"]["runId"] == run_record["run_id"] == events[0]["run"]["runId"]
    assert result.lineage == run_record and run_record["outputs"] == lineage["outputs"]
    assert not {"run_id", "started", "ended", "host", "git_commit"} & set(lineage)

    metrics = json.loads((plain_root / "metrics/face_model.json").read_text())
    assert metrics["vertices"] == 3448 and metrics["format"] == "sfm"
    assert result.summary == metrics

    # the preview: 7 tiles (mean + 6 emotions) in a 4-column grid of 96 px renders + 22 px labels
    import cv2

    preview = cv2.imread(str(out / "preview.png"))
    assert preview.shape == (2 * (96 + 22), 4 * 96, 3)


def test_same_params_give_byte_identical_outputs(tmp_path: Path, eos_share: Path) -> None:
    hashes = []
    for name in ("a", "b"):
        root = tmp_path / name
        shutil.copytree(eos_share, root / "data/external/eos-share")
        face_model.run(_params(), root)
        hashes.append({f: sha256_file(root / "data/face_model" / f) for f in DATA_FILES})
    assert hashes[0] == hashes[1]


def test_changed_param_changes_only_what_it_should(plain_root: Path) -> None:
    face_model.run(_params(), plain_root)
    out = plain_root / "data/face_model"
    before = {f: sha256_file(out / f) for f in DATA_FILES}
    face_model.run(_params(albedo_components=2), plain_root)
    after = {f: sha256_file(out / f) for f in DATA_FILES}
    assert before["model.npz"] != after["model.npz"]
    assert MorphableModel.load(out / "model.npz").n_albedo == 2


def test_failed_run_keeps_previous_output_and_records_fail(plain_root: Path) -> None:
    face_model.run(_params(), plain_root)
    out = plain_root / "data/face_model"
    before = sha256_file(out / "model.npz")
    blend = plain_root / "data/external/eos-share/expression_blendshapes_3448.bin"
    blend.write_bytes(blend.read_bytes()[:5000])
    with pytest.raises(SourceFileError):
        face_model.run(_params(verify_checksums=False), plain_root)
    assert sha256_file(out / "model.npz") == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    events = list(iter_events(plain_root / "data/lineage/events.jsonl"))
    assert events[-1]["eventType"] == "FAIL"
    assert "truncated" in events[-1]["run"]["facets"]["errorMessage"]["message"]


def test_checksum_mismatch_is_reported(plain_root: Path) -> None:
    contours = plain_root / "data/external/eos-share/sfm_model_contours.json"
    contours.write_text(contours.read_text().replace("380", "381"))
    with pytest.raises(ChecksumError, match=r"sfm_model_contours\.json"):
        face_model.run(_params(), plain_root)


def _cli(root: Path, params: dict | None = None) -> tuple[int, str, str]:
    if params is not None:
        data = yaml.safe_load((root / "params.yaml").read_text())
        data["face_model"].update(params)
        (root / "params.yaml").write_text(yaml.safe_dump(data))
    proc = sh(["python", "-m", "stages.face_model"], root, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _assert_one_line_error(rc: int, stderr: str, *needles: str) -> None:
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: face_model: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def cli_repo(tmp_path: Path, eos_share: Path) -> Path:
    return make_repo(tmp_path / "repo", eos_share, dvc=False)


def test_cli_missing_model_file(cli_repo: Path) -> None:
    (cli_repo / "data/external/eos-share/sfm_shape_3448.bin").unlink()
    rc, _, err = _cli(cli_repo)
    _assert_one_line_error(rc, err, "sfm_shape_3448.bin", "not found", "make assets")


def test_cli_truncated_model_file_without_checksums(cli_repo: Path) -> None:
    path = cli_repo / "data/external/eos-share/sfm_shape_3448.bin"
    path.write_bytes(path.read_bytes()[:100_000])
    rc, _, err = _cli(cli_repo, {"verify_checksums": False})
    _assert_one_line_error(rc, err, "sfm_shape_3448.bin", "eos could not read it")


def test_cli_corrupt_file_with_checksums(cli_repo: Path) -> None:
    path = cli_repo / "data/external/eos-share/sfm_shape_3448.bin"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    rc, _, err = _cli(cli_repo)
    _assert_one_line_error(rc, err, "sfm_shape_3448.bin", "SHA256")


def test_cli_mis_sized_blendshapes(cli_repo: Path) -> None:
    import struct

    path = cli_repo / "data/external/eos-share/expression_blendshapes_3448.bin"
    name = b"smile"
    blob = struct.pack("<Q", 1) + struct.pack("<Q", len(name)) + name + struct.pack("<ii", 300, 1)
    path.write_bytes(blob + np.zeros(300, "<f4").tobytes())
    rc, _, err = _cli(cli_repo, {"verify_checksums": False})
    _assert_one_line_error(rc, err, "expression_blendshapes_3448.bin", "100 vertices", "3448")


def test_cli_bad_params_are_one_line(cli_repo: Path) -> None:
    rc, _, err = _cli(cli_repo, {"albedo_componentz": 3})
    _assert_one_line_error(rc, err, "invalid params", "albedo_componentz")


def test_cli_success_prints_summary(cli_repo: Path) -> None:
    rc, out, err = _cli(cli_repo, {"preview_size": 64})
    assert rc == 0, err
    assert "face_model: wrote" in out and '"vertices": 3448' in out


def test_lineage_command_answers_from_the_run_record_or_the_output(plain_root: Path) -> None:
    """Without the events file (another machine), the run record answers; without it too (a DVC
    pull), the content record inside the output still names stage, params and inputs."""
    face_model.run(_params(), plain_root)
    (plain_root / "data/lineage/events.jsonl").unlink()
    shown = sh(["facedetail", "lineage", "data/face_model/model.npz"], plain_root).stdout
    assert "stage 'face_model', run " in shown and "not recorded here" not in shown
    shutil.rmtree(plain_root / "data/lineage")
    shown = sh(["facedetail", "lineage", "data/face_model/model.npz"], plain_root).stdout
    assert "stage 'face_model', run not recorded here" in shown
    assert "input data/external/eos-share/sfm_shape_3448.bin" in shown
