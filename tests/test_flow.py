"""The Prefect flow runs the same stage functions as DVC and gives byte-identical outputs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_repo, set_params, sh, shrink_params, tree_hashes

from facedetail.io.lineage import iter_events

DATA_FILES = ("face_model/model.npz", "face_model/manifest.parquet", "face_model/preview.png",
              "render_expressions/manifest.parquet", "render_expressions/shards/shard-00000.tar",
              "render_expressions/shards/shard-00001.tar", "render_expressions/contact_sheet.png",
              "render_faces/manifest.parquet", "render_faces/quarantine.parquet", "render_faces/shards/shard-00000.tar",
              "emotion_net/model.pt", "dictionary/index.faiss", "dictionary/entries.parquet",
              "dictionary/dictionary.json", "wild_synth/truth.parquet", "wild_synth/images/wild-00000.jpg",
              "wild_proxy/proxies.parquet", "wild_proxy/quarantine.parquet", "wild_proxy/shards/shard-00000.tar",
              "wild_proxy/contact_sheet.png", "capture_synth/manifest.parquet", "capture_gt/manifest.parquet",
              "detail_pairs/manifest.parquet", "detail_pairs/shards/pairs-00000.tar", "detail_pca/bases.safetensors",
              "train_detail/detail_net.safetensors", "train_detail/preview.png",
              "train_detail_supervised/detail_net.safetensors", "reconstruct/gallery.png",
              "reconstruct/manifest.parquet", "evaluate/scores.parquet",
              # the content lineage records are deterministic too: no run id, time or host in an output
              *(f"{stage}/lineage.json" for stage in ("face_model", "render_expressions", "render_faces",
                                                      "emotion_net", "dictionary", "wild_synth", "wild_proxy",
                                                      "capture_synth", "capture_gt", "detail_pairs", "detail_pca",
                                                      "train_detail", "train_detail_supervised", "reconstruct",
                                                      "evaluate")))
STAGES = {"face_model", "render_expressions", "render_faces", "emotion_net", "dictionary", "wild_synth", "wild_proxy",
          "capture_synth", "capture_gt", "detail_pairs", "detail_pca", "train_detail", "train_detail_supervised",
          "reconstruct", "evaluate"}


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _pipeline_repo(dest: Path, dvc_yaml: str, *, dvc: bool = True) -> Path:
    """A folder holding only ``dvc_yaml`` and this project's ``params.yaml`` (git + ``dvc init`` if ``dvc``)."""
    dest.mkdir(parents=True)
    (dest / "dvc.yaml").write_text(dvc_yaml)
    shutil.copy2(ROOT / "params.yaml", dest / "params.yaml")
    if dvc:
        sh(["git", "init", "-q", "-b", "main"], dest)
        sh(["dvc", "init", "-q"], dest)
        sh(["dvc", "config", "core.analytics", "false"], dest)
    return dest


def _dvc_dag_edges(repo: Path) -> set[tuple[str, str]]:
    """(dependency, dependent) pairs as ``dvc dag --dot`` prints them."""
    dot = sh(["dvc", "dag", "--dot"], repo).stdout
    return set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, flags=re.MULTILINE))


def test_stage_order_respects_every_dvc_dag_edge(tmp_path: Path) -> None:
    """The real dvc.yaml with its stages in reverse order: the flow still runs them as ``dvc dag`` links them."""
    from flows.dag import stage_order

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    file_order = list(reversed(spec["stages"]))
    spec["stages"] = {name: spec["stages"][name] for name in file_order}
    repo = _pipeline_repo(tmp_path / "reversed", yaml.safe_dump(spec, sort_keys=False))

    order = stage_order(repo)
    edges = _dvc_dag_edges(repo)
    names = [name for name, _ in order]
    assert sorted(names) == sorted(file_order)
    assert order == [(name, f"stages.{name}") for name in names]
    position = {name: i for i, name in enumerate(names)}
    assert {n for edge in edges for n in edge} <= set(names)
    broken = [(dep, user) for dep, user in sorted(edges) if position[dep] > position[user]]
    assert not broken, f"the flow would run these stages before their dependencies: {broken}; order {names}"
    file_position = {name: i for i, name in enumerate(file_order)}
    assert any(file_position[dep] > file_position[user] for dep, user in edges), "test has no teeth"


@pytest.mark.parametrize("dvc", [False, True], ids=["no-dvc-init", "dvc-init"])
def test_stage_order_sorts_by_dependencies(tmp_path: Path, dvc: bool) -> None:
    """Dependencies first (an out folder covers a dep file inside it); otherwise dvc.yaml order."""
    from flows.dag import stage_order

    repo = _pipeline_repo(tmp_path / "repo", (
        "stages:\n"
        "  b:\n    cmd: python -m stages.b\n    deps: [data/a/x.npz]\n    outs: [data/b]\n"
        "  c:\n    cmd: python -m stages.c\n    outs: [data/c]\n"
        "  a:\n    cmd: python -m stages.a\n    outs: [data/a]\n"
    ), dvc=dvc)
    assert stage_order(repo) == [("c", "stages.c"), ("a", "stages.a"), ("b", "stages.b")]


def test_stage_order_refuses_other_commands_and_subfolders(tmp_path: Path) -> None:
    from flows.dag import stage_order

    repo = _pipeline_repo(tmp_path / "repo", "stages:\n  a:\n    cmd: python -m stages.a --fast\n    outs: [data/a]\n")
    with pytest.raises(ValueError, match=re.escape("cmd must be `python -m stages.<module>`")):
        stage_order(repo)
    (repo / "sub").mkdir()
    with pytest.raises(ValueError, match="inside the DVC repository"):
        stage_order(repo / "sub")


def _descendants(repo: Path, stage: str) -> set[str]:
    edges = _dvc_dag_edges(repo)
    found, frontier = set(), {stage}
    while frontier:
        frontier = {user for dep, user in edges if dep in frontier} - found
        found |= frontier
    return found


def test_flow_agrees_with_dvc(prefect_harness, tmp_path: Path, eos_share: Path, tiny_pipeline: Path) -> None:
    """A flow run in a fresh DVC repository: every output file (lineage.json included), every metrics file and
    dvc.lock equal `dvc repro`'s, and `dvc status` is clean after it. A second run runs nothing; after one
    param of a late stage changes, exactly that stage and its DAG descendants run, and DVC agrees again."""
    from prefect.client.orchestration import get_client

    from flows.dag import stage_order
    from flows.pipeline import pipeline

    flow_repo = make_repo(tmp_path / "flow", eos_share)
    shrink_params(flow_repo)

    results = pipeline(root=str(flow_repo))
    assert [r["stage"] for r in results] == [name for name, _ in stage_order(tiny_pipeline)]
    assert {r["stage"] for r in results} == STAGES and all(r["ran"] for r in results)
    outs = [f"data/{r['stage']}" for r in results]
    flow_files, dvc_files = tree_hashes(flow_repo, *outs, "metrics"), tree_hashes(tiny_pipeline, *outs, "metrics")
    assert {f"data/{name}" for name in DATA_FILES} <= set(dvc_files)
    assert flow_files == dvc_files
    assert (flow_repo / "dvc.lock").read_text() == (tiny_pipeline / "dvc.lock").read_text()
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], flow_repo).stdout
    assert "Data and pipelines are up to date" in sh(["dvc", "repro", "--dry"], flow_repo).stdout

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    table = [a for a in artifacts if a.key == "face-model-manifest"]
    assert table, [a.key for a in artifacts]
    assert "model" in str(table[0].data)
    shards = [a for a in artifacts if a.key == "render-expressions-manifest"]
    assert shards and "shards/shard-00001.tar" in str(shards[0].data)

    events = list(iter_events(flow_repo / "data/lineage/events.jsonl"))
    complete = [e for e in events if e["eventType"] == "COMPLETE"]
    assert complete and complete[-1]["run"]["facets"]["parent"]["job"]["namespace"] == "prefect"

    again = pipeline(root=str(flow_repo))
    assert [r["stage"] for r in again if r["ran"]] == []
    assert {r["reason"] for r in again} == {"up to date"}

    set_params(flow_repo, "detail_pca", min_valid=0.45)
    changed = pipeline(root=str(flow_repo))
    ran = {r["stage"] for r in changed if r["ran"]}
    assert ran == {"detail_pca"} | _descendants(flow_repo, "detail_pca")
    assert ran != STAGES and len(ran) >= 3
    reason = next(r["reason"] for r in changed if r["stage"] == "detail_pca")
    assert "params.yaml" in reason and "detail_pca" in reason, reason  # DVC's own status of the stage
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], flow_repo).stdout
    forced = pipeline(root=str(flow_repo), stages=["face_model"], force=True)
    assert [(r["stage"], r["ran"], r["reason"]) for r in forced] == [("face_model", True, "forced")]
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], flow_repo).stdout


# Ray's flow run is slow here (a local Ray starts ~8 processes on 2 cores); its shards, retries and hook are
# tested in tests/test_executors.py in the default run.
@pytest.mark.parametrize("runner", ["dask", pytest.param("ray", marks=pytest.mark.slow)])
def test_flow_maps_shards_on_a_cluster(prefect_harness, tmp_path: Path, eos_share: Path, tiny_pipeline: Path,
                                       runner: str) -> None:
    """--runner dask|ray: one Prefect task per shard (named with its item count) on a 2-process local cluster,
    the same bytes as `dvc repro`'s, and a progress artifact per sharded stage."""
    pytest.importorskip({"dask": "prefect_dask", "ray": "prefect_ray"}[runner])
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import run_pipeline

    repo = make_repo(tmp_path / runner, eos_share)
    shrink_params(repo)
    wanted = ["face_model", "render_expressions", "render_faces"]
    state = run_pipeline(root=str(repo), stages=wanted, runner=runner, workers=2, return_state=True)
    assert state.is_completed(), state
    outs = [f"data/{name}" for name in wanted]
    assert tree_hashes(repo, *outs) == tree_hashes(tiny_pipeline, *outs)
    assert "Data and pipelines are up to date" in sh(["dvc", "status", *wanted], repo).stdout
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        progress = [a for a in client.read_artifacts() if a.key == "render-expressions-progress"]
    names = sorted(r.name for r in runs if r.name.startswith("render_expressions/"))
    assert names == ["render_expressions/shard-00000 (6 items)", "render_expressions/shard-00001 (6 items)"]
    assert any(r.name.startswith("render_faces/shard-") for r in runs)
    assert all(r.state.is_completed() for r in runs)
    assert progress and progress[0].data == 100.0


def _task_runs(state) -> list[tuple[str, int]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return [(r.name.split("-")[0], r.run_count) for r in runs]


def test_flow_does_not_retry_bad_source(prefect_harness, tmp_path: Path, eos_share: Path) -> None:
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "bad", eos_share, dvc=False)
    shutil.rmtree(repo / "data/external/eos-share")
    state = pipeline(root=str(repo), return_state=True)
    assert state.is_failed()
    assert _task_runs(state) == [("run_stage", 1)]
    events = list(iter_events(repo / "data/lineage/events.jsonl"))
    assert events == []  # the stage refused before starting: no input to record
    assert not (repo / "data/face_model").exists()


def test_flow_does_not_retry_bad_params(prefect_harness, tmp_path: Path, eos_share: Path) -> None:
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "badparams", eos_share, dvc=False)
    set_params(repo, "face_model", preview_size=True)
    state = pipeline(root=str(repo), stages=["face_model"], return_state=True)
    assert state.is_failed()
    assert "preview_size: Input should be a valid integer" in str(state.result(raise_on_failure=False))
    assert _task_runs(state) == [("run_stage", 1)]


def test_flow_does_not_retry_a_file_that_is_not_a_model(prefect_harness, tmp_path: Path, eos_share: Path) -> None:
    """A corrupt model used to surface as "a worker process died, run again" and be retried three times."""
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "notamodel", eos_share, dvc=False)
    (repo / "data/face_model").mkdir(parents=True)
    (repo / "data/face_model/model.npz").write_bytes(b"PK\x03\x04 not really a zip")
    state = pipeline(root=str(repo), stages=["render_expressions"], return_state=True)
    assert state.is_failed()
    assert "not a facedetail morphable model" in str(state.result(raise_on_failure=False))
    assert _task_runs(state) == [("run_stage", 1)]
    assert not (repo / "data/.partial/render_expressions").exists()


@pytest.mark.slow
def test_flow_cli_on_ephemeral_server(tmp_path: Path, eos_share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No PREFECT_API_URL: the CLI starts Prefect's ephemeral server by itself."""
    repo = make_repo(tmp_path / "eph", eos_share, dvc=False)
    shrink_params(repo)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    proc = sh(["python", "-m", "flows.pipeline", "--root", str(repo)], repo)
    assert "Finished in state Completed" in proc.stdout + proc.stderr
    assert (repo / "data/face_model/model.npz").is_file()
