"""The Prefect flow runs the same stage functions as DVC and gives byte-identical outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_repo, sh, shrink_params

from facedetail.io.hashing import sha256_file
from facedetail.io.lineage import iter_events

DATA_FILES = ("face_model/model.npz", "face_model/manifest.parquet", "face_model/preview.png",
              "render_expressions/manifest.parquet", "render_expressions/shards/shard-00000.tar",
              "render_expressions/shards/shard-00001.tar", "render_expressions/contact_sheet.png",
              "render_faces/manifest.parquet", "render_faces/quarantine.parquet", "render_faces/shards/shard-00000.tar",
              "emotion_net/model.pt", "dictionary/index.faiss", "dictionary/entries.parquet",
              "dictionary/dictionary.json", "wild_synth/truth.parquet", "wild_synth/images/wild-00000.jpg",
              "wild_proxy/proxies.parquet", "wild_proxy/quarantine.parquet", "wild_proxy/shards/shard-00000.tar",
              "wild_proxy/contact_sheet.png", "capture_synth/manifest.parquet", "capture_gt/manifest.parquet")


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_stage_order_follows_dvc_yaml() -> None:
    from flows.pipeline import stage_order

    root = Path(__file__).resolve().parents[1]
    assert stage_order(root / "dvc.yaml")[:2] == [("face_model", "stages.face_model"),
                                                  ("render_expressions", "stages.render_expressions")]


def test_stage_order_sorts_by_dependencies(tmp_path: Path) -> None:
    from flows.pipeline import stage_order

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  b:\n    cmd: python -m stages.b\n    deps: [data/a/x.npz]\n    outs: [data/b]\n"
        "  a:\n    cmd: python -m stages.a\n    outs: [data/a]\n"
    )
    assert [n for n, _ in stage_order(tmp_path / "dvc.yaml")] == ["a", "b"]


def test_flow_matches_dvc_repro(prefect_harness, tmp_path: Path, eos_share: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline

    dvc_repo = make_repo(tmp_path / "dvc", eos_share)
    shrink_params(dvc_repo)
    sh(["dvc", "repro"], dvc_repo)
    flow_repo = make_repo(tmp_path / "flow", eos_share, dvc=False)
    shrink_params(flow_repo)

    results = pipeline(root=str(flow_repo))
    assert [r["stage"] for r in results] == ["face_model", "render_expressions", "render_faces", "emotion_net",
                                             "dictionary", "wild_synth", "wild_proxy", "capture_synth", "capture_gt"]
    for name in DATA_FILES:
        assert sha256_file(flow_repo / "data" / name) == sha256_file(dvc_repo / "data" / name), name

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


def test_flow_does_not_retry_bad_source(prefect_harness, tmp_path: Path, eos_share: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import State

    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "bad", eos_share, dvc=False)
    shutil.rmtree(repo / "data/external/eos-share")
    state: State = pipeline(root=str(repo), return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert [(r.name.split("-")[0], r.run_count) for r in runs] == [("run_stage", 1)]
    events = list(iter_events(repo / "data/lineage/events.jsonl"))
    assert events == []  # the stage refused before starting: no input to record
    assert not (repo / "data/face_model").exists()


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
