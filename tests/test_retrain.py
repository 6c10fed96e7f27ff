"""Scheduled retraining (``flows/retrain.py``): deployment and schedule, the quality gate, git and DVC effects."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_RECONSTRUCT, copy_repo, set_params, sh, tool_env

from flows import retrain_git
from flows.retrain import DEFAULT_CRON, FLOW_NAME

ACCEPTED = "refs/heads/retrain/accepted"


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _api_env() -> dict[str, str]:
    """Tool environment pointing Prefect clients (CLI, served runner) at the harness server."""
    from prefect.settings import PREFECT_API_URL

    return {**tool_env(), "PREFECT_API_URL": str(PREFECT_API_URL.value())}


def _git(repo: Path, *args: str) -> str:
    return sh(["git", *args], repo).stdout.strip()


def _branches(repo: Path) -> dict[str, str]:
    out = _git(repo, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split() for line in out.splitlines())


# --- git plumbing: a commit on a new branch, without touching the user's tree, index or branch ---

@pytest.fixture
def small_git(tmp_path: Path) -> Path:
    repo = tmp_path / "g"
    (repo / "metrics").mkdir(parents=True)
    (repo / "dvc.lock").write_text("old lock\n")
    (repo / "metrics/a.json").write_text('{"mae": 1}\n')
    (repo / "code.py").write_text("x = 1\n")
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "start"], repo)
    return repo


def test_commit_on_new_branch_leaves_user_state_alone(small_git: Path) -> None:
    repo = small_git
    (repo / "dvc.lock").write_text("new lock\n")
    (repo / "metrics/b.json").write_text('{"mae": 2}\n')  # untracked new metrics file
    (repo / "code.py").write_text("x = 2\n")  # a user's edit: must not be committed
    sh(["git", "add", "code.py"], repo)  # ... even when staged
    head, status = _git(repo, "rev-parse", "HEAD"), _git(repo, "status", "--porcelain")

    commit = retrain_git.commit_paths(repo, ["dvc.lock", "metrics", "missing.json"], "retrain/2026-01-01", "msg")

    assert commit and _branches(repo)["retrain/2026-01-01"] == commit
    assert _git(repo, "rev-parse", "HEAD") == head and retrain_git.current_branch(repo) == "main"
    assert _git(repo, "status", "--porcelain") == status  # working tree and index as they were
    assert _git(repo, "show", f"{commit}:dvc.lock") == "new lock"
    assert _git(repo, "show", f"{commit}:metrics/b.json") == '{"mae": 2}'
    assert _git(repo, "show", f"{commit}:code.py") == "x = 1"  # HEAD's, not the user's edit
    assert _git(repo, "rev-parse", f"{commit}^") == head

    with pytest.raises(retrain_git.GitError, match="exists already"):
        retrain_git.commit_paths(repo, ["dvc.lock"], "retrain/2026-01-01", "again")
    assert retrain_git.free_branch_name(repo, "retrain/2026-01-01") == "retrain/2026-01-01-2"
    with pytest.raises(retrain_git.GitError, match="current branch"):
        retrain_git.commit_paths(repo, ["dvc.lock"], "main", "msg")
    assert retrain_git.changed_paths(repo, ["dvc.lock", "metrics"]) == ["code.py"]


def test_commit_on_current_branch_only_when_allowed(small_git: Path) -> None:
    repo = small_git
    (repo / "dvc.lock").write_text("new lock\n")
    (repo / "code.py").write_text("x = 3\n")
    head = _git(repo, "rev-parse", "HEAD")
    commit = retrain_git.commit_paths(repo, ["dvc.lock"], "main", "msg", allow_current_branch=True)
    assert _git(repo, "rev-parse", "HEAD") == commit and _git(repo, "rev-parse", "HEAD^") == head
    assert _git(repo, "status", "--porcelain") == "M code.py"  # dvc.lock clean, the user's edit still there
    assert retrain_git.commit_paths(repo, ["dvc.lock"], "main", "msg", allow_current_branch=True) is None


def test_move_ref_is_compare_and_swap(small_git: Path) -> None:
    repo = small_git
    head = _git(repo, "rev-parse", "HEAD")
    retrain_git.move_ref(repo, "retrain/accepted", head, None)
    with pytest.raises(retrain_git.GitError):
        retrain_git.move_ref(repo, "retrain/accepted", head, None)  # it exists now: refuse
    assert retrain_git.resolve(repo, ACCEPTED) == head


def test_settings_come_from_the_retrain_section(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from flows.retrain import RetrainSettings, load_settings

    assert load_settings(tmp_path) == RetrainSettings()  # no params.yaml: the defaults
    (tmp_path / "params.yaml").write_text(
        "face_model: {preview_size: 64}\n"
        "retrain:\n  threshold: 0.1\n  accepted_ref: team/accepted\n"
        "  gated: [{file: metrics/a.json, key: acc, direction: higher}]\n")
    settings = load_settings(tmp_path)
    assert (settings.threshold, settings.accepted_ref, settings.branch_prefix) == (0.1, "team/accepted", "retrain/")
    assert settings.gated == [{"file": "metrics/a.json", "key": "acc", "direction": "higher"}]
    (tmp_path / "params.yaml").write_text("retrain: {treshold: 0.1}\n")
    with pytest.raises(ValidationError, match="treshold"):
        load_settings(tmp_path)
    (tmp_path / "params.yaml").write_text("retrain: {threshold: -1}\n")
    with pytest.raises(ValidationError, match="threshold"):
        load_settings(tmp_path)


# --- the deployment of prefect.yaml: registered with its schedule; the server schedules its runs ---

def test_prefect_yaml_deployment_schedules_runs(prefect_harness, tmp_path: Path) -> None:
    """`prefect deploy` of prefect.yaml against a process pool registers the cron schedule, and the
    server's scheduling (the endpoint its scheduler service calls) creates runs at those times."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment_spec,) = spec["deployments"]
    assert deployment_spec["schedules"][0]["cron"] == DEFAULT_CRON

    repo = tmp_path / "checkout"
    repo.mkdir()
    for name in ("prefect.yaml", "params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    for name in ("facedetail", "stages", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = _api_env()
    prefect = [str(Path(sys.executable).parent / "prefect"), "--no-prompt"]
    for args in (["work-pool", "create", deployment_spec["work_pool"]["name"], "--type", "process"],
                 ["deploy", "--name", deployment_spec["name"]]):
        proc = subprocess.run(prefect + args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"{FLOW_NAME}/{deployment_spec['name']}")
        assert dep.work_pool_name == "facedetail" and dep.entrypoint == "flows/retrain.py:retrain"
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [
            (DEFAULT_CRON, "UTC", True)]
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
        response = client._client.post(f"/deployments/{dep.id}/schedule", json={})
        assert response.status_code in (200, 201), response.text
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
    assert len(runs) >= 3, runs
    for run in runs:
        assert run.state.is_scheduled() and run.parameters == {"root": "."}
        when = run.expected_start_time
        assert (when.weekday(), when.hour, when.minute) == (6, 3, 0), when  # Sunday 03:00 UTC
    starts = sorted(r.expected_start_time for r in runs)
    assert {(b - a).days for a, b in itertools.pairwise(starts)} == {7}


# --- end to end on the tiny profile ---

@pytest.fixture
def retrain_repo(tmp_path: Path, tiny_pipeline: Path) -> tuple[Path, Path]:
    """A copy of the tiny pipeline with a local DVC remote in .dvc/config.local (an empty store)."""
    repo = copy_repo(tiny_pipeline, tmp_path / "repo")
    store = tmp_path / "store"
    store.mkdir()
    sh(["dvc", "remote", "add", "--local", "-d", "store", str(store)], repo)
    return repo, store


def _store_files(store: Path) -> set[str]:
    return {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}


def _make_accepted_better(repo: Path, factor: float) -> str:
    """A commit on top of the accepted one whose dictionary β MAE is ``factor`` times the accepted value,
    and the accepted ref moved there: an accepted run better than the current workspace."""
    accepted = retrain_git.resolve(repo, ACCEPTED)
    data = json.loads(_git(repo, "show", f"{accepted}:metrics/dictionary.json"))
    data["quality"]["beta_mae"]["dictionary"] *= factor
    blob = subprocess.run(["git", "-C", str(repo), "hash-object", "-w", "--stdin"], input=json.dumps(data),
                          capture_output=True, text=True, check=True).stdout.strip()
    env = {"GIT_INDEX_FILE": str(repo.parent / "tmp-index")}
    retrain_git.git(repo, "read-tree", accepted, env=env)
    retrain_git.git(repo, "update-index", "--cacheinfo", f"100644,{blob},metrics/dictionary.json", env=env)
    tree = retrain_git.git(repo, "write-tree", env=env)
    better = retrain_git.git(repo, "commit-tree", tree, "-p", accepted, "-m", "a better accepted run")
    retrain_git.move_ref(repo, "retrain/accepted", better, accepted)
    return better


def _latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)[0]


def test_gate_accepts_baseline_and_equal_run_blocks_regression(prefect_harness, retrain_repo) -> None:
    """First run: the baseline (branch + commit + push, accepted ref created); an equal run passes with
    nothing new to commit; a run worse than the accepted one fails with the diff, changing nothing."""
    from flows.retrain import QualityGateError, retrain

    repo, store = retrain_repo
    main_before, status_before = _git(repo, "rev-parse", "main"), _git(repo, "status", "--porcelain")

    first = retrain(root=str(repo), stages=["face_model"])
    assert first["passed"] and first["baseline"] and first["branch"].startswith("retrain/")
    branches = _branches(repo)
    assert branches[first["branch"]] == first["commit"] == branches["retrain/accepted"]
    assert _git(repo, "rev-parse", "main") == main_before and retrain_git.current_branch(repo) == "main"
    assert _git(repo, "status", "--porcelain") == status_before  # the user's tree and index untouched
    committed = set(_git(repo, "diff", "--name-only", main_before, first["commit"]).splitlines())
    assert {"dvc.lock", "params.yaml", "metrics/dictionary.json", "metrics/evaluate.json"} <= committed
    assert not any(p.startswith("data/") and not p.endswith(".gitignore") for p in committed)
    assert _git(repo, "show", f"{first['commit']}:dvc.lock") == (repo / "dvc.lock").read_text().strip()
    pushed = _store_files(store)
    assert pushed  # dvc push ran: the tiny profile's outputs are in the remote
    report = _latest_artifact("retrain-report").data
    assert "becomes the baseline" in report and "data/face_model/preview.png" in report
    assert "face_model" in str(_latest_artifact("retrain-stages").data)

    second = retrain(root=str(repo), stages=["face_model"])
    assert second["passed"] and not second["baseline"] and second["branch"] is None
    assert second["commit"] == first["commit"] and _branches(repo) == branches
    assert "| +0 | +0.00 % |" in second["report"]

    better = _make_accepted_better(repo, 0.8)
    branches = _branches(repo)
    with pytest.raises(QualityGateError) as err:
        retrain(root=str(repo), stages=["face_model"])
    assert "quality.beta_mae.dictionary" in str(err.value) and "REGRESSED" in str(err.value)
    assert "+25.00 %" in str(err.value)  # new / (0.8 new) - 1
    assert _branches(repo) == branches and branches["retrain/accepted"] == better  # nothing committed or moved
    assert _store_files(store) == pushed  # nothing pushed
    failed = _latest_artifact("retrain-report").data
    assert "Quality gate: FAILED" in failed and "nothing pushed, nothing committed" in failed
    assert "`metrics/dictionary.json` | `quality.beta_mae.dictionary`" in failed  # the dvc metrics diff table
    assert _git(repo, "rev-parse", "main") == main_before


def test_no_remote_is_said_not_failed(prefect_harness, tmp_path: Path, tiny_pipeline: Path) -> None:
    """Without a DVC remote the run still gates and commits, and its report says nothing was pulled or pushed."""
    from flows.retrain import retrain

    repo = copy_repo(tiny_pipeline, tmp_path / "repo")
    result = retrain(root=str(repo), stages=["face_model"], branch="nightly")
    assert result["passed"] and result["branch"] == "nightly"
    assert "no DVC remote configured: nothing pulled" in result["report"]
    assert "no DVC remote configured: nothing pushed" in result["report"]
    with pytest.raises(ValueError, match="current branch"):
        retrain(root=str(repo), stages=["face_model"], branch="main")


@pytest.mark.slow
def test_served_deployment_runs_end_to_end(prefect_harness, retrain_repo) -> None:
    """`python -m flows.retrain --serve` registers a scheduled deployment; `run_deployment` runs it to the end."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    repo, store = retrain_repo
    # one stale stage: a leaf's params changed (the gallery's photo count), so exactly it reruns
    set_params(repo, "reconstruct", limit=TINY_RECONSTRUCT["limit"] - 1)
    main_before = _git(repo, "rev-parse", "main")
    name = f"{FLOW_NAME}/e2e"
    # the pipeline limited to the stale leaf and one up-to-date stage: DVC's status of all 15 stages costs ~15 s
    command = [sys.executable, "-m", "flows.retrain", "--serve", "--name", "e2e", "--root", str(repo),
               "--stage", "reconstruct", "--stage", "face_model"]
    server = subprocess.Popen(command, cwd=ROOT, env=_api_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    dep = client.read_deployment_by_name(name)
                    break
                except Exception as err:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log = server.stdout.read() if server.poll() is not None else ""
                        raise AssertionError(f"the served runner never registered {name}: {log}") from err
                    time.sleep(1)
        assert [s.schedule.cron for s in dep.schedules] == [DEFAULT_CRON]
        run = run_deployment(name, timeout=600)
        assert run.state.is_completed(), run.state
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    branches = _branches(repo)
    (branch,) = [b for b in branches if b.startswith("retrain/2")]
    assert branches["retrain/accepted"] == branches[branch]
    assert _git(repo, "rev-parse", "main") == main_before and retrain_git.current_branch(repo) == "main"
    assert _store_files(store)  # pushed
    table = _latest_artifact("retrain-stages").data
    ran = {row["stage"]: row["ran"] for row in (json.loads(table) if isinstance(table, str) else table)}
    assert ran == {"face_model": False, "reconstruct": True}, ran
    assert sh(["dvc", "status", "-q"], repo, check=False).returncode == 0  # dvc.lock records the run
    lock = yaml.safe_load(_git(repo, "show", f"{branch}:dvc.lock"))
    assert lock["stages"]["reconstruct"]["params"]["params.yaml"]["reconstruct"]["limit"] == (
        TINY_RECONSTRUCT["limit"] - 1)
