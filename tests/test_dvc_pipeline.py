"""A real `dvc repro` of the pipeline in a throw-away git repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY_FACES, copy_repo, sh

from facedetail.io.hashing import sha256_file


def _set_param(repo: Path, **values: object) -> None:
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["face_model"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.slow  # ~40 s; face_model's `dvc repro` runs in the tiny pipeline (conftest) by default
def test_dvc_repro_face_model(repo: Path, tmp_path: Path) -> None:
    _set_param(repo, preview_size=64)
    sh(["dvc", "repro", "face_model"], repo)

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["face_model"]
    outs = {o["path"]: o for o in lock["outs"]}
    assert outs["data/face_model"]["nfiles"] == 5  # model, preview, manifest, lineage, card
    assert lock["params"]["params.yaml"]["face_model"]["preview_size"] == 64
    dep_paths = {d["path"] for d in lock["deps"]}
    assert "data/external/eos-share/sfm_shape_3448.bin" in dep_paths
    assert "stages/face_model.py" in dep_paths
    assert (repo / "metrics/face_model.json").is_file()
    assert "face_model" in (repo / "data/.gitignore").read_text()

    status = sh(["dvc", "status", "face_model"], repo).stdout
    assert "up to date" in status
    again = sh(["dvc", "repro", "face_model"], repo).stdout
    assert "didn't change, skipping" in again

    model_hash = sha256_file(repo / "data/face_model/model.npz")
    preview_hash = sha256_file(repo / "data/face_model/preview.png")
    _set_param(repo, preview_size=80)
    assert "face_model" in sh(["dvc", "status", "face_model"], repo).stdout
    sh(["dvc", "repro", "face_model"], repo)
    assert sha256_file(repo / "data/face_model/model.npz") == model_hash
    assert sha256_file(repo / "data/face_model/preview.png") != preview_hash

    # the documented local remote: push fills it, and a fresh pull restores the outputs
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "local", str(remote)], repo)
    sh(["dvc", "push", "face_model"], repo)
    assert any(p.is_file() for p in remote.rglob("*"))
    sh(["rm", "-rf", "data/face_model", ".dvc/cache"], repo)
    sh(["dvc", "pull", "face_model"], repo)
    assert sha256_file(repo / "data/face_model/model.npz") == model_hash

    # an auditor's one command: what produced this file?
    shown = sh(["facedetail", "lineage", "data/face_model/model.npz"], repo).stdout
    assert "stage 'face_model'" in shown
    assert "data/external/eos-share/sfm_shape_3448.bin" in shown


def _out_hashes(repo: Path) -> dict[str, dict[str, str]]:
    """{stage: {out path: md5}} of dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in stage["outs"]} for name, stage in lock.items()}


def test_dvc_repro_render_expressions(tiny_pipeline: Path, tmp_path: Path) -> None:
    repo = copy_repo(tiny_pipeline, tmp_path / "repo")
    # every stage's run record is where the lineage command finds it, outside the DVC outs
    assert sorted(p.stem for p in (repo / "data/lineage/runs").glob("*.json")) == sorted(_out_hashes(repo))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["render_expressions"]
    outs = {o["path"]: o for o in lock["outs"]}
    # one directory out holding a few files (2 shards, manifest, contact sheet, lineage, card), not one per image
    assert outs["data/render_expressions"]["nfiles"] == 6
    assert {d["path"] for d in lock["deps"]} >= {"data/face_model/model.npz", "stages/render_expressions.py"}
    assert "up to date" in sh(["dvc", "status"], repo).stdout

    metrics = json.loads((repo / "metrics/render_expressions.json").read_text())
    assert metrics["images"] == TINY_FACES["count"]
    shown = sh(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "label_counts" in shown

    # the dictionary half of the DAG: crops -> emotion network -> FAISS dictionary
    lock_all = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"render_faces", "emotion_net", "dictionary"} <= set(lock_all)
    dict_deps = {d["path"] for d in lock_all["dictionary"]["deps"]}
    assert {"data/render_faces", "data/emotion_net/model.pt"} <= dict_deps
    for name in ("render_faces", "emotion_net", "dictionary"):
        assert name in shown, f"metrics of {name} are declared"
    plots = sh(["dvc", "plots", "show", "--json"], repo).stdout
    assert "metrics/emotion_net/confusion.csv" in plots
    assert (repo / "data/dictionary/index.faiss").is_file()

    # the wild half: synthetic wild photos -> proxies and UV textures, with the dictionary's β_prior
    assert {"wild_synth", "wild_proxy"} <= set(lock_all)
    proxy_deps = {d["path"] for d in lock_all["wild_proxy"]["deps"]}
    assert {"data/wild_synth/images", "data/dictionary", "data/face_model/model.npz"} <= proxy_deps
    assert "wild_proxy" in shown and "expected_outcomes" in shown
    assert (repo / "data/wild_proxy/proxies.parquet").is_file()


@pytest.mark.slow
def test_an_experiment_changes_the_profile_and_keeps_the_earlier_shards(tiny_pipeline: Path, tmp_path: Path) -> None:
    """The documented way to change the profile: ``dvc exp run -S``, which reruns the renders' whole descendance
    (~2 minutes on 2 cores)."""
    repo = copy_repo(tiny_pipeline, tmp_path / "repo")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "tiny run"], repo)
    first_shard = sha256_file(repo / "data/render_expressions/shards/shard-00000.tar")
    out = sh(["dvc", "exp", "run", "-S", "render_expressions.count=10"], repo).stdout
    assert "Stage 'face_model' didn't change, skipping" in out
    assert json.loads((repo / "metrics/render_expressions.json").read_text())["images"] == 10
    assert sha256_file(repo / "data/render_expressions/shards/shard-00000.tar") == first_shard


@pytest.mark.slow
def test_default_profile_forced_twice_gives_the_same_lock(repo: Path) -> None:
    """The default profile of params.yaml (what `make demo` runs), forced twice: ~8 minutes on 2 cores."""
    sh(["dvc", "repro"], repo)
    first = _out_hashes(repo)
    sh(["dvc", "repro", "--force"], repo)
    assert _out_hashes(repo) == first
