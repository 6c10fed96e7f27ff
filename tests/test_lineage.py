"""``facedetail lineage``: the whole upstream chain of a stage, a file, a shard member or an item, from records.

Most tests share one real ``dvc repro render_expressions`` (face_model + a tiny expression set) in a temp repo;
the whole-pipeline chain (dlib's predictor, fer's network) is in ``test_lineage_pipeline.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import TINY_RENDER, copy_repo, make_repo, set_params, sh
from typer.testing import CliRunner

from facedetail.cli import app
from facedetail.io.hashing import sha256_file

ROOT = Path(__file__).resolve().parents[1]
RUNNER = CliRunner()


@pytest.fixture(scope="session")
def expr_repo(tmp_path_factory: pytest.TempPathFactory, eos_share: Path) -> Path:
    """face_model and a 8-image render_expressions built by ``dvc repro`` (read-only: copy it to change it)."""
    repo = make_repo(tmp_path_factory.mktemp("lineage") / "repo", eos_share)
    set_params(repo, "face_model", preview_size=64)
    set_params(repo, "render_expressions", **TINY_RENDER)
    sh(["dvc", "repro", "render_expressions"], repo)
    return repo


def lineage(repo: Path, *args: str) -> tuple[int, str]:
    """``facedetail lineage ARGS --root REPO`` in this process: (exit code, output)."""
    result = RUNNER.invoke(app, ["lineage", *args, "--root", str(repo)])
    return result.exit_code, result.output


def lineage_json(repo: Path, target: str) -> dict:
    code, out = lineage(repo, target, "--json")
    assert code == 0, out
    return json.loads(out)


def _nodes(data: dict) -> dict[str, dict]:
    return {n["node"]: n for n in data["nodes"]}


def test_every_kind_of_target_reaches_the_raw_sources(expr_repo: Path) -> None:
    record = json.loads((expr_repo / "data/render_expressions/lineage.json").read_text())
    shard_member = "shards/shard-00001.tar:expr-0000005.png"
    for target in ("render_expressions", shard_member, f"data/render_expressions/{shard_member}", "expr-0000005",
                   "render_expressions:expr-0000005", "data/render_expressions/contact_sheet.png"):
        data = lineage_json(expr_repo, target)
        nodes = _nodes(data)
        assert {"stage:render_expressions", "stage:face_model"} <= set(nodes), target
        sources = {n["name"] for n in nodes.values() if n["kind"] == "source"}
        assert "data/external/eos-share/sfm_shape_3448.bin" in sources, target
        assert "surrey-face-model" in {c["id"] for c in data["licences"]}, target
        stage = nodes["stage:render_expressions"]
        assert stage["params_hash"] == record["params_hash"] and stage["seed"] == 2019
        assert stage["outputs"] == record["outputs"]
        run = stage["run"]
        # params.yaml was edited after the commit: the runs are rightly marked dirty
        assert run["run_id"] and run["ended"] and len(run["git_commit"]) == 40 and run["git_dirty"] is True
        edge = next(e for e in data["edges"] if e["to"] == "stage:render_expressions")
        assert edge["from"] == "stage:face_model" and edge["files"] == record["inputs"] and edge["stale"] == {}
    item = lineage_json(expr_repo, shard_member)["targets"][0]
    assert (item["kind"], item["stage"], item["id"], item["key"]) == ("item", "render_expressions",
                                                                      "expr-0000005", "expr-0000005.png")
    assert item["seed"] is not None and len(item["sha256"]) == 64


def test_the_text_names_run_commit_params_seed_hashes_sources_and_licences(expr_repo: Path) -> None:
    code, out = lineage(expr_repo, "shards/shard-00000.tar:expr-0000002.png")
    assert code == 0, out
    run = json.loads((expr_repo / "data/lineage/runs/render_expressions.json").read_text())
    assert "target: item expr-0000002 of render_expressions (shard shards/shard-00000.tar member " \
           "expr-0000002.png)" in out
    assert f"stage 'render_expressions', run {run['run_id']}, ended {run['ended']}, git {run['git_commit']}" in out
    assert "differs from params.yaml: nothing; seed 2019" in out
    model = json.loads((expr_repo / "data/face_model/lineage.json").read_text())["outputs"]["data/face_model/model.npz"]
    assert f"input data/face_model/model.npz {model[:12]}…  ← face_model" in out
    assert "input data/external/eos-share/sfm_shape_3448.bin 43750338ae53…  ← raw source (Surrey Face Model" in out
    assert "commercial use not permitted; research use permitted" in out
    assert out.index("stage 'render_expressions'") < out.index("stage 'face_model'") < out.index("raw sources")


def test_params_that_differ_from_todays_params_yaml_are_named(expr_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(expr_repo, tmp_path / "repo")
    set_params(repo, "render_expressions", count=20, sampling={"pose": {"yaw_deg": 30.0}})
    data = lineage_json(repo, "render_expressions")
    diff = _nodes(data)["stage:render_expressions"]["params_diff"]
    assert {(d["key"], d["recorded"], d["now"]) for d in diff["changed"]} == {
        ("count", TINY_RENDER["count"], 20), ("sampling.pose.yaw_deg", 15.0, 30.0)}
    assert _nodes(data)["stage:face_model"]["params_diff"]["changed"] == []
    _, out = lineage(repo, "render_expressions")
    assert "differs from params.yaml: count 8 → 20, sampling.pose.yaw_deg 15.0 → 30.0" in out


def test_a_query_hashes_no_data(expr_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers come from the records: no shard, image or model file is read to hash it."""
    import facedetail.io.lineage_graph as graph

    hashed: list[str] = []
    real = graph.sha256_file
    monkeypatch.setattr(graph, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    for target in ("render_expressions", "shards/shard-00001.tar:expr-0000005.png", "expr-0000003",
                   "data/face_model/model.npz", "data/render_expressions/shards/shard-00000.tar"):
        assert lineage(expr_repo, target)[0] == 0
    assert set(hashed) <= {"lineage.json"}, hashed


def test_a_copy_or_an_extracted_member_is_found_by_its_content(expr_repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model-copy.npz"
    shutil.copy2(expr_repo / "data/face_model/model.npz", copy)
    target = lineage_json(expr_repo, str(copy))["targets"][0]
    assert (target["kind"], target["stage"], target["name"], target["matched"]) == (
        "file", "face_model", "data/face_model/model.npz", "content")
    with tarfile.open(expr_repo / "data/render_expressions/shards/shard-00001.tar") as tar:
        (tmp_path / "face.png").write_bytes(tar.extractfile("expr-0000006.png").read())
    target = lineage_json(expr_repo, str(tmp_path / "face.png"))["targets"][0]
    assert (target["kind"], target["id"], target["matched"]) == ("item", "expr-0000006", "content")


def test_an_unknown_target_is_a_one_line_error(expr_repo: Path, tmp_path: Path) -> None:
    code, out = lineage(expr_repo, "no-such-thing")
    assert code == 2 and "is no stage (face_model, render_expressions)" in out
    code, out = lineage(expr_repo, "shards/shard-00009.tar:expr-0000001.png")
    assert code == 2 and "no manifest lists member" in out
    (tmp_path / "stray.bin").write_bytes(b"never made by a stage")
    code, out = lineage(expr_repo, str(tmp_path / "stray.bin"))
    assert code == 2 and "is not an output of any recorded stage run" in out


def test_the_run_comes_from_the_events_when_its_record_was_replaced(expr_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(expr_repo, tmp_path / "repo")
    run = json.loads((repo / "data/lineage/runs/face_model.json").read_text())
    (repo / "data/lineage/runs/face_model.json").unlink()
    stage = _nodes(lineage_json(repo, "face_model"))["stage:face_model"]
    assert stage["run"]["source"] == "data/lineage/events.jsonl"
    assert (stage["run"]["run_id"], stage["run"]["git_commit"]) == (run["run_id"], run["git_commit"])
    shutil.rmtree(repo / "data/lineage")
    code, out = lineage(repo, "face_model")
    assert code == 0 and "stage 'face_model', run not recorded here" in out


def test_a_stage_rerun_upstream_marks_the_link_stale(expr_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(expr_repo, tmp_path / "repo")
    set_params(repo, "face_model", albedo_components=2)
    sh([sys.executable, "-m", "stages.face_model"], repo)  # outside DVC: render_expressions is not rerun
    data = lineage_json(repo, "render_expressions")
    edge = next(e for e in data["edges"] if e["to"] == "stage:render_expressions")
    now = json.loads((repo / "data/face_model/lineage.json").read_text())["outputs"]["data/face_model/model.npz"]
    assert edge["stale"]["data/face_model/model.npz"]["now"] == now
    _, out = lineage(repo, "render_expressions")
    assert "STALE: changed upstream since this run (fix: dvc repro render_expressions)" in out


def test_mermaid_dot_and_png(expr_repo: Path, tmp_path: Path) -> None:
    code, mermaid = lineage(expr_repo, "expr-0000001", "--format", "mermaid")
    assert code == 0 and mermaid.startswith("flowchart TD\n")
    assert mermaid.count(" --> ") == 5, mermaid  # 3 eos sources -> face_model -> renders -> item
    code, dot = lineage(expr_repo, "expr-0000001", "--format", "dot")
    assert code == 0 and dot.startswith("digraph lineage {") and "shape=cylinder" in dot
    if shutil.which("dot") is None:
        code, out = lineage(expr_repo, "expr-0000001", "--format", "png", "--output", str(tmp_path / "l.png"))
        assert code == 2 and "Debian package graphviz" in out
        pytest.skip("Graphviz's dot is not installed: the PNG itself is not checked")
    checked = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    code, out = lineage(expr_repo, "expr-0000001", "--format", "png", "--output", str(tmp_path / "l.png"))
    assert code == 0 and (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_query_is_the_same_from_a_subfolder_and_ignores_other_files(expr_repo: Path) -> None:
    """--root decides where the records are; a file target is looked up relative to the cwd or the root."""
    before = sha256_file(expr_repo / "data/render_expressions/lineage.json")
    a = lineage_json(expr_repo, "data/face_model/model.npz")
    b = lineage_json(expr_repo, "face_model")
    assert _nodes(a)["stage:face_model"] == _nodes(b)["stage:face_model"]
    assert sha256_file(expr_repo / "data/render_expressions/lineage.json") == before


def test_the_benchmark_repository_answers_under_its_goal(tmp_path: Path) -> None:
    """bench/lineage.py's generated repository, small: every query it times succeeds (the 90K numbers: README)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import lineage as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    bench.build(tmp_path, renders=4000, wild=300, captures=9)
    for _, args in bench.QUERIES:
        code, out = lineage(tmp_path, *args)
        assert code == 0, out
    data = lineage_json(tmp_path, "data/train_detail/detail_net.safetensors")
    assert {c["id"] for c in data["licences"]} == {"affectnet", "eos-apache-2.0", "fer2013", "ibug-300w",
                                                  "surrey-face-model"}
    assert len(_nodes(data)) == 11 + 4 + 2, "11 stages, 3 eos sources and the photo folder, dlib and fer"
