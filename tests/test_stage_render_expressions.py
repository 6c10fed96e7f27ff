"""The render_expressions stage: outputs, byte-identical reruns, prefix stability, resume after kills."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_RENDER, tool_env

from facedetail.io.hashing import sha256_bytes, sha256_file
from facedetail.io.images import decode_png
from facedetail.io.shards import iter_tar_shard
from stages import render_expressions as stage

OUT = Path("data/render_expressions")
WORK = Path("data/.partial/render_expressions")


def _root(tmp_path: Path, model_npz: Path, name: str = "root") -> Path:
    root = tmp_path / name
    (root / "data/face_model").mkdir(parents=True)
    shutil.copy2(model_npz, root / "data/face_model/model.npz")
    return root


def _params(**overrides: object) -> stage.RenderExpressionsParams:
    return stage.RenderExpressionsParams(**{**TINY_RENDER, **overrides})


def _files(root: Path) -> dict[str, str]:
    out = root / OUT
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}


def test_outputs_manifest_and_records(tmp_path: Path, model_npz: Path) -> None:
    root = _root(tmp_path, model_npz)
    result = stage.run(_params(), root)
    out = root / OUT
    assert sorted(_files(root)) == ["CARD.md", "contact_sheet.png", "lineage.json", "manifest.parquet",
                                    "shards/shard-00000.tar", "shards/shard-00001.tar"]
    assert not (root / WORK).exists(), "the work folder is cleared once the set is complete"
    assert result.summary["shards_built"] == 2

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in manifest] == [f"expr-{i:07d}" for i in range(8)]
    for column in ("shard", "key", "sha256", "seed", "beta", "yaw", "pitch", "roll", "light_direction", "sh",
                   "label", "landmarks", "landmark_visible", "projection"):
        assert all(r[column] is not None for r in manifest), column

    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "shards/shard-00001.tar"), shardshuffle=False))
    assert [s["__key__"] + ".png" for s in samples] == [r["key"] for r in manifest[4:]]
    for sample, row in zip(samples, manifest[4:], strict=True):
        assert set(sample) >= {"png", "mask.png", "json"}
        assert sha256_bytes(sample["png"]) == row["sha256"]
        record = json.loads(sample["json"])
        assert record["beta"] == row["beta"] and record["label"] == row["label"]
        assert record["seed"] == row["seed"] and len(record["landmarks"]) == 68
        assert np.array(record["camera"]["P"]).shape == (3, 4)
        mask = decode_png(sample["mask.png"], grey=True)
        assert set(np.unique(mask)) <= {0, 255}
        assert abs((mask > 0).mean() - record["mask_fraction"]) < 1e-6
        assert decode_png(sample["png"]).shape == (64, 64, 3)

    metrics = json.loads((root / "metrics/render_expressions.json").read_text())
    assert sum(metrics["label_counts"].values()) == 8
    assert metrics["label_counts"] == {k: [r["label"] for r in manifest].count(k) for k in metrics["label_counts"]}
    assert 0.5 < metrics["landmarks_visible_fraction"] <= 1.0
    from facedetail.io.manifest import verify_manifest

    assert verify_manifest(out) == []
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["outputs"]["data/render_expressions/shards/shard-00000.tar"] == sha256_file(
        out / "shards/shard-00000.tar")


def test_verify_finds_a_changed_image_inside_a_shard(tmp_path: Path, model_npz: Path) -> None:
    from facedetail.io.manifest import verify_manifest
    from facedetail.io.shards import write_tar_shard

    root = _root(tmp_path, model_npz)
    stage.run(_params(), root)
    shard = root / OUT / "shards/shard-00000.tar"
    samples = list(iter_tar_shard(shard))
    samples[2]["png"] = samples[3]["png"]
    write_tar_shard(shard, samples)
    assert verify_manifest(root / OUT) == ["expr-0000002"]
    shard.unlink()
    assert verify_manifest(root / OUT) == [f"expr-{i:07d}" for i in range(4)]


def test_same_params_same_bytes_whatever_the_worker_count(tmp_path: Path, model_npz: Path) -> None:
    one = _root(tmp_path, model_npz, "one")
    two = _root(tmp_path, model_npz, "two")
    stage.run(_params(workers=1), one)
    stage.run(_params(workers=2), two)
    a, b = _files(one), _files(two)
    assert a == b
    metrics = Path("metrics/render_expressions.json")
    assert (one / metrics).read_bytes() == (two / metrics).read_bytes()


def test_growing_the_count_keeps_the_first_images(tmp_path: Path, model_npz: Path) -> None:
    small = _root(tmp_path, model_npz, "small")
    large = _root(tmp_path, model_npz, "large")
    stage.run(_params(count=6), small)
    stage.run(_params(count=11), large)
    assert _files(small)["shards/shard-00000.tar"] == _files(large)["shards/shard-00000.tar"]
    rows_small = pq.read_table(small / OUT / "manifest.parquet").to_pylist()
    rows_large = pq.read_table(large / OUT / "manifest.parquet").to_pylist()[:6]
    assert [(r["sha256"], r["seed"], r["params_hash"]) for r in rows_small] == [
        (r["sha256"], r["seed"], r["params_hash"]) for r in rows_large]


def _start(root: Path, **params: object) -> subprocess.Popen:
    (root / "params.yaml").write_text(yaml.safe_dump({"render_expressions": params}))
    return subprocess.Popen([sys.executable, "-m", "stages.render_expressions", "--root", str(root)],
                            cwd=Path(__file__).resolve().parents[1], env=tool_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_record(root: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not list((root / WORK).glob("*.done.json")):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before any shard finished:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("no shard finished in time")
        time.sleep(0.02)


KILL_PARAMS = {"count": 240, "shard_size": 4, "image_size": 128, "contact_sheet": 4}


def test_resume_after_the_run_is_killed(tmp_path: Path, model_npz: Path) -> None:
    root = _root(tmp_path, model_npz)
    proc = _start(root, workers=1, **KILL_PARAMS)
    _wait_for_record(root, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / OUT).exists(), "a killed run leaves nothing that looks complete"
    done_before = len(list((root / WORK).glob("*.done.json")))
    assert 1 <= done_before < 60

    result = stage.run(stage.RenderExpressionsParams(workers=1, **KILL_PARAMS), root)
    assert result.summary["shards_reused"] >= done_before
    assert result.summary["shards_built"] == 60 - result.summary["shards_reused"]

    clean = _root(tmp_path, model_npz, "clean")
    stage.run(stage.RenderExpressionsParams(workers=2, **KILL_PARAMS), clean)
    resumed, fresh = _files(root), _files(clean)
    assert resumed == fresh


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow  # ~20 s; a dead pool worker is tested in tests/test_shards.py and a killed run's resume
# in test_resume_after_the_run_is_killed by default
def test_a_killed_worker_fails_the_run_cleanly_and_the_rerun_resumes(tmp_path: Path, model_npz: Path) -> None:
    root = _root(tmp_path, model_npz)
    proc = _start(root, workers=2, **KILL_PARAMS)
    _wait_for_record(root, proc)
    workers = _worker_pids(proc.pid)
    assert workers, "no worker process found"
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "worker process died" in err and "run again to resume" in err
    assert "Traceback" not in err
    assert not (root / OUT).exists()

    result = stage.run(stage.RenderExpressionsParams(workers=2, **KILL_PARAMS), root)
    assert result.summary["shards_reused"] >= 1
    assert len(pq.read_table(root / OUT / "manifest.parquet")) == 240


def test_bad_params_and_missing_model_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({"render_expressions": {"count": 4}}))
    cmd = [sys.executable, "-m", "stages.render_expressions", "--root", str(root)]
    cwd = Path(__file__).resolve().parents[1]
    missing = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    assert missing.returncode == 2
    assert "model.npz: morphable model not found. Run `dvc repro face_model` first" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    (root / "params.yaml").write_text(yaml.safe_dump(
        {"render_expressions": {"sampling": {"expression": {"neutral_below": 0.9}}}}))
    bad = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    assert bad.returncode == 2
    assert "invalid params" in bad.stderr and "neutral_below" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [{"count": 0}, {"shard_size": 0}, {"image_size": 8}, {"unknown": 1}])
def test_params_are_validated(bad: dict) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        stage.RenderExpressionsParams(**bad)


def test_contact_sheet_shows_spread_items(tmp_path: Path, model_npz: Path) -> None:
    from facedetail.render.expression_set import contact_sheet_ids

    assert contact_sheet_ids(5, 64) == [f"expr-{i:07d}" for i in range(5)]
    assert contact_sheet_ids(90_000, 64)[-1] == "expr-0089999"
    root = _root(tmp_path, model_npz)
    stage.run(_params(contact_sheet=4, count=8), root)
    import cv2

    sheet = cv2.imread(str(root / OUT / "contact_sheet.png"))
    assert sheet.shape[1] == 4 * 128
    keys = [s["__key__"] for s in iter_tar_shard(root / OUT / "shards/shard-00000.tar")]
    assert keys[0] == "expr-0000000"
