"""Shards built on a Dask or Ray cluster: same bytes as the local pool, lost workers retried, bad input not."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from conftest import TINY_RENDER, tool_env

from facedetail.errors import InterruptedRunError, SourceFileError
from facedetail.io.executors import (
    LOCAL_DASK_CONFIG,
    PROBE_NAME,
    RAY_NICENESS,
    DaskExecutor,
    RayExecutor,
    SharedFolderError,
    executor_from_url,
    executor_session,
    plan_job,
    run_unit,
    use_executor,
)
from facedetail.io.hashing import sha256_file
from facedetail.io.shards import ShardTask, build_shards, shard_tasks, write_tar_shard

pytest.importorskip("distributed")


class MarkingWorker:
    """Writes one member per item and a mark per attempt; kills its own process (SIGKILL) or raises a
    bad-input error on a first attempt, as asked."""

    def __init__(self, marks: Path, kill_on: str | None = None, bad_on: str | None = None) -> None:
        self.marks, self.kill_on, self.bad_on = marks, kill_on, bad_on

    def __call__(self, task: ShardTask, tar_path: Path, progress) -> list[dict]:
        attempts = len(list(self.marks.glob(f"{task.name}.*")))
        (self.marks / f"{task.name}.{attempts}.{os.getpid()}").touch()
        if task.name == self.bad_on:
            raise SourceFileError(tar_path, "unreadable input", "Fix it")
        if task.name == self.kill_on and attempts == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker lost mid-shard (OOM killer, a node gone)
        write_tar_shard(tar_path, [{"__key__": i, "txt": f"item {i}".encode()} for i in task.item_ids])
        return [{"id": i, "pid_free": True} for i in task.item_ids]


def _build(work: Path, marks: Path, **worker: str) -> dict[str, str]:
    marks.mkdir(parents=True, exist_ok=True)
    tasks = shard_tasks([f"i{k:02d}" for k in range(12)], 2)
    report = build_shards(tasks, work, "key", partial(MarkingWorker, marks, **worker), workers=2)
    assert report.built == len(tasks)
    return {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.name != PROBE_NAME}


ENVIRON_BEFORE_THE_CLUSTER: dict[str, str] = {}
NANNY_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED",
                   "MALLOC_TRIM_THRESHOLD_")


@pytest.fixture(scope="module")
def dask_executor():
    ENVIRON_BEFORE_THE_CLUSTER.update(os.environ)
    executor = DaskExecutor(workers=2)
    executor.start()
    yield executor
    executor.close()


def test_dask_builds_the_same_bytes_and_retries_a_killed_worker(tmp_path: Path, dask_executor) -> None:
    local = _build(tmp_path / "local", tmp_path / "marks-local")
    with use_executor(dask_executor):
        killed = _build(tmp_path / "dask", tmp_path / "marks-dask", kill_on="shard-00003")
    assert killed == local
    attempts = sorted(p.name.split(".")[1] for p in (tmp_path / "marks-dask").glob("shard-00003.*"))
    assert attempts == ["0", "1"], "the shard whose worker was killed ran again, once"
    pids = {p.name.split(".")[2] for p in (tmp_path / "marks-dask").iterdir()}
    assert len(pids) >= 2 and str(os.getpid()) not in pids, "built in the cluster's worker processes"


def _threads() -> tuple[int, int, str, int]:
    import cv2
    from threadpoolctl import threadpool_info

    blas = max((pool["num_threads"] for pool in threadpool_info()), default=1)
    return cv2.getNumThreads(), blas, os.environ.get("PYOPENGL_PLATFORM", ""), os.nice(0)


def test_the_engines_set_up_each_worker_process(tmp_path: Path, dask_executor, monkeypatch) -> None:
    """One OpenCV and one BLAS thread per worker process, offscreen GL: by Dask's worker plugin and Ray's
    worker_process_setup_hook, before any unit runs there; and the workers run at this process's nice value,
    as the local pool's do (Ray's own default is 15)."""
    expected = (1, 1, "osmesa", os.nice(0))
    client = dask_executor.client()
    assert set(client.run(_threads).values()) == {expected}
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv(RAY_NICENESS, raising=False)
    with executor_session("ray", workers=2):
        assert ray.get(ray.remote(_threads).remote()) == expected
    assert RAY_NICENESS not in os.environ


def _worker_settings() -> dict[str, object]:
    import dask

    return {"MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            **{key: dask.config.get(key) for key in LOCAL_DASK_CONFIG if "pre-spawn-environ" not in key}}


def test_the_local_cluster_runs_quiet_workers_also_after_a_restart(dask_executor) -> None:
    """Every worker of the cluster we start has no profiler, slower monitors and glibc's own malloc
    thresholds (the nanny's MALLOC_TRIM_THRESHOLD_ dropped), and so has every worker its nanny starts again;
    this process's own Dask settings are left as they were, and its environment (which Dask's in-process
    nannies write their workers' variables into, so a local pool started later would inherit them) too."""
    import dask

    expected = {"MALLOC_TRIM_THRESHOLD_": None,
                **{key: value for key, value in LOCAL_DASK_CONFIG.items() if "pre-spawn-environ" not in key}}
    def nanny_variables() -> dict[str, str | None]:
        return {key: os.environ.get(key) for key in NANNY_VARIABLES}

    def check() -> None:
        assert list(client.run(_worker_settings).values()) == [expected, expected]
        assert {variables["OMP_NUM_THREADS"] for variables in client.run(nanny_variables).values()} == {"1"}
        assert nanny_variables() == {key: ENVIRON_BEFORE_THE_CLUSTER.get(key) for key in NANNY_VARIABLES}

    client = dask_executor.client()
    client.wait_for_workers(2)  # an earlier test may have killed one: its nanny starts it again
    check()
    # Both worker processes lost (as to the OOM killer); their nannies start them again. Not
    # `client.restart()`: under a full test run on 2 cores one of its nannies once closed instead of
    # restarting its worker (distributed's restart, not ours: this path is the one a crash takes).
    before = set(client.run(os.getpid).values())
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            now = client.run(os.getpid)
            if len(now) == 2 and not before & set(now.values()):
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"the nannies did not start both workers again: {client.run(os.getpid)}")
    check()
    assert dask.config.get("distributed.worker.profile.enabled") is True
    assert dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_") == 65536


def test_dask_does_not_retry_bad_input(tmp_path: Path, dask_executor) -> None:
    with use_executor(dask_executor), pytest.raises(SourceFileError, match="unreadable input"):
        _build(tmp_path / "dask", tmp_path / "marks", bad_on="shard-00001")
    assert len(list((tmp_path / "marks").glob("shard-00001.*"))) == 1


def test_a_worker_that_does_not_see_the_work_folder_refuses(tmp_path: Path) -> None:
    """What a worker on another machine without the shared filesystem meets: the probe is not there. (Run here,
    in the test process: the refusal comes before the per-process set-up, which would leave this process
    with one BLAS thread and change later tests' float results.)"""
    work = tmp_path / "work"
    work.mkdir()
    job = plan_job(partial(MarkingWorker, tmp_path), lambda *a: None, [ShardTask("s", ("a",))], work, ["s"], [1])
    (work / PROBE_NAME).write_text("another run's token")
    with pytest.raises(SharedFolderError, match="every worker mounts at the same path"):
        run_unit(job.units[0])
    (work / PROBE_NAME).unlink()
    with pytest.raises(SharedFolderError, match="does not exist here"):
        run_unit(job.units[0])


def test_executor_urls() -> None:
    assert executor_from_url(None) is None and executor_from_url("local") is None
    assert executor_from_url("dask", 3) == DaskExecutor(None, 3)
    assert executor_from_url("dask://10.0.0.5:8786") == DaskExecutor("tcp://10.0.0.5:8786", 2)
    assert executor_from_url("ray://head:10001") == RayExecutor("ray://head:10001", 2)
    assert executor_from_url("ray:auto") == RayExecutor("auto", 2)
    assert executor_from_url("ray") == RayExecutor(None, 2)
    with pytest.raises(ValueError, match="expected local, dask"):
        executor_from_url("spark://x")


@pytest.mark.slow  # ~60 s of Ray start-up and retries; the Dask twin above runs by default
def test_ray_builds_the_same_bytes_and_retries_a_killed_worker(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    # Ray's workers import the test's worker class by module name: give them this folder, as a user's
    # cluster gets the installed package.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    local = _build(tmp_path / "local", tmp_path / "marks-local")
    with executor_session("ray", workers=2):
        killed = _build(tmp_path / "ray", tmp_path / "marks-ray", kill_on="shard-00002")
        with pytest.raises(SourceFileError, match="unreadable input"):
            _build(tmp_path / "ray-bad", tmp_path / "marks-bad", bad_on="shard-00001")
    assert killed == local
    assert len(list((tmp_path / "marks-ray").glob("shard-00002.*"))) == 2
    assert len(list((tmp_path / "marks-bad").glob("shard-00001.*"))) == 1


def test_a_stage_under_facedetail_executor_renders_the_same_bytes(tmp_path: Path, model_npz: Path) -> None:
    """`dvc repro` users: FACEDETAIL_EXECUTOR=dask makes `python -m stages.render_expressions` build its shards
    on a local Dask cluster; the GL context is set up per worker process; the output equals the local pool's."""
    import shutil

    def run(name: str, executor: str) -> tuple[dict[str, str], dict]:
        root = tmp_path / name
        (root / "data/face_model").mkdir(parents=True)
        shutil.copy2(model_npz, root / "data/face_model/model.npz")
        params = {"render_expressions": {**TINY_RENDER, "count": 12, "workers": 2}}
        (root / "params.yaml").write_text(json.dumps(params))
        env = {**tool_env(), "FACEDETAIL_EXECUTOR": executor}
        proc = subprocess.run([sys.executable, "-m", "stages.render_expressions", "--root", str(root)],
                              cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.split("(", 1)[1].rsplit(")", 1)[0])
        out = root / "data/render_expressions"
        return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}, summary

    local, local_summary = run("local", "local")
    dask, dask_summary = run("dask", "dask")
    assert (local_summary["executor"], dask_summary["executor"]) == ("local", "dask")
    assert dask == local


def test_a_dead_local_pool_worker_is_an_interrupted_run(tmp_path: Path) -> None:
    """The local pool does not retry a lost worker (it has no spare): the run stops, finished shards kept."""
    with pytest.raises(InterruptedRunError, match="run again to resume"):
        _build(tmp_path / "work", tmp_path / "marks", kill_on="shard-00001")


class UnbuildableWorker:
    def __init__(self) -> None:
        raise ValueError("corrupt model: no such component")


def test_a_worker_that_cannot_be_built_raises_its_own_error_in_the_local_pool(tmp_path: Path) -> None:
    """Built in the worker processes only (no trial build in the planning process): the factory's error comes
    back as itself, not as a dead pool."""
    tasks = shard_tasks([f"i{k:02d}" for k in range(8)], 2)
    with pytest.raises(ValueError, match="corrupt model"):
        build_shards(tasks, tmp_path / "work", "key", UnbuildableWorker, workers=2)


class FreezeReportingWorker:
    """Reports how many objects the garbage collector had frozen when it ran."""

    def __call__(self, task: ShardTask, tar_path: Path, progress) -> list[dict]:
        import gc

        write_tar_shard(tar_path, [{"__key__": i, "txt": b"x"} for i in task.item_ids])
        return [{"id": i, "frozen": gc.get_freeze_count()} for i in task.item_ids]


def test_a_pool_process_freezes_its_heap_once_its_worker_is_built_and_this_process_does_not(
        tmp_path: Path) -> None:
    import gc

    tasks = shard_tasks([f"i{k:02d}" for k in range(6)], 2)
    pooled = build_shards(tasks, tmp_path / "pool", "key", FreezeReportingWorker, workers=2)
    assert all(row["frozen"] > 1000 for record in pooled.records for row in record.rows)
    here = build_shards(tasks, tmp_path / "here", "key", FreezeReportingWorker, workers=1)
    assert {row["frozen"] for record in here.records for row in record.rows} == {gc.get_freeze_count()} == {0}
