"""Prefect flow that runs the stale stages of ``dvc.yaml`` in DAG order and records them in ``dvc.lock``.

It agrees with DVC: before each stage (in DVC's own DAG order, :func:`flows.dag.stage_order`) it asks
DVC whether the stage is stale (``dvc status``, after the stages before it ran), runs it only then,
and records it in ``dvc.lock`` as ``dvc repro`` would (``dvc commit`` of that stage, outputs cached),
so that after a flow run ``dvc status`` is clean and ``dvc repro`` does nothing. ``--force`` runs
every selected stage. In a folder that is not a DVC repository every stage runs and nothing is
recorded (said in the log).

Each stage calls the very ``run`` function that ``python -m stages.<name>`` (the DVC command)
calls, with the same ``params.yaml`` section, so both give byte-identical outputs. The shards of
the sharded stages run where ``--runner`` says: ``local`` (the stage's own process pool, one task
per stage), ``dask`` (one Prefect task per shard through ``prefect_dask.DaskTaskRunner``: a
``LocalCluster`` of ``--workers`` processes, or ``--address tcp://host:8786``) or ``ray``
(``prefect_ray.RayTaskRunner``: a local Ray, or ``--address ray://host:10001`` / ``auto``).
Runs against ``PREFECT_API_URL`` when set, otherwise against Prefect's ephemeral server.

    python -m flows.pipeline                         # the stale stages
    python -m flows.pipeline --force --stage face_model
    python -m flows.pipeline --runner dask --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pydantic import Field, ValidationError

from facedetail.errors import FacedetailError
from facedetail.io.cards import CARD_NAME
from facedetail.io.executors import Job, Unit, run_unit, use_executor
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import MANIFEST_NAME, read_manifest
from flows.dag import load_stage, stage_order
from flows.dvc_state import DvcState
from stages._common import PARAMS_FILE, ParamsError, StageParams, load_section, one_line, validate_params

RUNNERS = ("local", "dask", "ray")


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures; a bad source file or bad params (a ``FacedetailError``, e.g. the
    stages' ``ParamsError``) or a missing file will not fix itself."""
    try:
        state.result()
    except (FacedetailError, FileNotFoundError):
        return False
    except Exception:  # anything else may be transient
        pass
    return True


def manifest_table(out_dir: Path) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact: one per loose file, one per shard for sharded items.

    A 90K-image set becomes ~90 rows (items, bytes, first and last id per shard) instead of 90K.
    """
    table = read_manifest(out_dir / MANIFEST_NAME)
    rows: list[dict[str, Any]] = []
    shards: dict[str, dict[str, Any]] = {}
    for r in table.select(["id", "path", "shard", "bytes", "sha256"]).to_pylist():
        if r["shard"] is None:
            rows.append({"where": r["path"], "items": 1, "bytes": r["bytes"], "first": r["id"], "last": r["id"],
                         "sha256": r["sha256"][:16]})
            continue
        entry = shards.setdefault(r["shard"], {"where": r["shard"], "items": 0, "bytes": 0, "first": r["id"],
                                               "last": r["id"], "sha256": ""})
        entry["items"] += 1
        entry["bytes"] += r["bytes"]
        entry["last"] = r["id"]
    return rows + list(shards.values())


# --- shards as Prefect tasks ---------------------------------------------------------------------

@task(retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_unless_bad_input, cache_policy=NO_CACHE,
      persist_result=False)
def build_shard(unit: Unit) -> Any:
    """Build one shard (or one capture item) in the task runner's worker: what ``python -m stages.<name>``
    does in its process pool."""
    return run_unit(unit)


class PrefectShards:
    """An executor (:mod:`facedetail.io.executors`) that maps a stage's shards as Prefect tasks through the
    flow's task runner (Dask or Ray), one task per shard named with its item count, and keeps a progress
    artifact per stage. A worker lost mid-shard is rescheduled by the engine itself."""

    def __init__(self, runner: str) -> None:
        self.name = f"prefect-{runner}"

    def run(self, job: Job, progress: Callable[[int], None]) -> Iterator[tuple[int, Any]]:
        stage = job.stage or "units"
        key = f"{stage.replace('_', '-')}-progress"
        artifact = create_progress_artifact(0.0, key=key, description=f"{stage}: shards built, % of items")
        futures = {build_shard.with_options(task_run_name=f"{stage}/{label} ({weight} items)").submit(unit): i
                   for i, (unit, label, weight) in enumerate(zip(job.units, job.labels, job.weights, strict=True))}
        total, done = sum(job.weights) or 1, 0
        for future in as_completed(list(futures)):
            i = futures[future]
            result = future.result()
            done += job.weights[i]
            progress(job.weights[i])
            update_progress_artifact(artifact, 100.0 * done / total)
            yield i, result


@contextlib.contextmanager
def task_runner(runner: str, address: str | None, workers: int) -> Iterator[Any]:
    """The flow's task runner for ``runner``, with the engine started (once, for every stage) and its
    worker set-up hook registered: ``None`` for ``local`` (Prefect's default)."""
    if runner == "local":
        yield None
    elif runner == "dask":
        from distributed import Client
        from prefect_dask import DaskTaskRunner

        from facedetail.io.executors import dask_worker_plugin, local_dask_cluster

        cluster = local_dask_cluster(workers) if address is None else None
        scheduler = cluster.scheduler_address if cluster is not None else address
        try:
            with Client(scheduler) as client:
                client.register_plugin(dask_worker_plugin())
                yield DaskTaskRunner(address=scheduler)
        finally:
            if cluster is not None:
                cluster.close()
    elif runner == "ray":
        import ray
        from prefect_ray import RayTaskRunner

        from facedetail.io.executors import ray_init

        owns = ray_init(address, workers)
        try:
            yield RayTaskRunner(address=address)
        finally:
            if owns:
                ray.shutdown()
    else:
        raise ValueError(f"unknown runner {runner!r}; expected one of {RUNNERS}")


# --- stages ------------------------------------------------------------------------------------------

@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_bad_input, cache_policy=NO_CACHE,
      persist_result=False)
def run_stage(name: str, module: str, root: str, runner: str = "local") -> dict[str, Any]:
    """Run one stage exactly as ``python -m <module>`` would, and publish its manifest summary and card."""
    stage = load_stage(module)
    root_path = Path(root)
    params = stage.load_params(root_path)
    parent = None
    if flow_run.id:
        parent = ParentRef(namespace="prefect", name=str(flow_run.flow_name), run_id=str(flow_run.id))
    with use_executor(PrefectShards(runner) if runner != "local" else None):
        result = stage.run(params, root_path, parent=parent)
    rows = manifest_table(result.out_dir)
    create_table_artifact(
        key=f"{name.replace('_', '-')}-manifest", table=rows,
        description=f"{name}: {sum(r['items'] for r in rows)} items, {sum(r['bytes'] for r in rows)} bytes; "
                    f"{result.summary}",
    )
    card = result.out_dir / CARD_NAME
    create_markdown_artifact(key=f"{name.replace('_', '-')}-card", markdown=card.read_text(encoding="utf-8"),
                             description=f"{name}: dataset card ({CARD_NAME} beside its manifest)")
    get_run_logger().info("%s wrote %s: %s", name, result.out_dir, result.summary)
    return {"stage": name, "outputs": result.outputs, "summary": result.summary}


@flow(name="facedetail-pipeline", log_prints=True)
def pipeline(root: str = ".", stages: list[str] | None = None, force: bool = False,
             runner: str = "local") -> list[dict[str, Any]]:
    """Run the stale ``dvc.yaml`` stages (of all, or of the named ones) in DAG order under ``root``.

    One dict per selected stage: ``stage``, ``ran`` (False: DVC said it was up to date), ``reason``
    (DVC's status, ``forced`` or ``no DVC repository``), ``summary`` and ``seconds``. ``runner`` names
    the engine of the flow's task runner (set with :func:`run_pipeline` or ``with_options``).
    """
    logger = get_run_logger()
    order = stage_order(root)
    unknown = set(stages or []) - {name for name, _ in order}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; dvc.yaml has {[n for n, _ in order]}")
    root_path = Path(root).resolve()
    dvc = DvcState.open(root_path)
    if dvc is None:
        logger.warning("%s is not a DVC repository: every selected stage runs and dvc.lock is not written",
                       root_path)
    results = []
    for name, module in order:
        if stages and name not in stages:
            continue
        reason = "forced" if force else ("no DVC repository" if dvc is None else dvc.stale_reason(name))
        if reason is None:
            logger.info("%s: up to date (dvc status), not run", name)
            results.append({"stage": name, "ran": False, "reason": "up to date", "summary": {}, "seconds": 0.0})
            continue
        logger.info("%s: runs (%s)", name, reason)
        started = time.perf_counter()
        done = run_stage(name, module, str(root_path), runner)
        if dvc is not None:
            dvc.commit(name)
        results.append({**done, "ran": True, "reason": reason, "seconds": round(time.perf_counter() - started, 1)})
    create_table_artifact(key="pipeline-stages", description="What this run did per stage",
                          table=[{k: r[k] for k in ("stage", "ran", "reason", "seconds")} for r in results])
    return results


def run_pipeline(root: str = ".", stages: list[str] | None = None, force: bool = False, runner: str = "local",
                 address: str | None = None, workers: int = 2, return_state: bool = False) -> Any:
    """Start the engine for ``runner`` (a local Dask cluster or Ray when no ``address``) and run the flow on it."""
    with task_runner(runner, address, workers) as engine:
        flow_fn = pipeline if engine is None else pipeline.with_options(task_runner=engine)
        return flow_fn(root=root, stages=stages, force=force, runner=runner, return_state=return_state)


class FlowParams(StageParams):
    """The ``flow:`` section of params.yaml: where ``python -m flows.pipeline`` runs shards (the command line
    overrides it). Not a stage's params: changing it changes no output (the bytes do not depend on the engine)."""

    runner: Literal["local", "dask", "ray"] = "local"
    """``local``: each stage's own process pool; ``dask`` / ``ray``: one Prefect task per shard on that engine."""
    address: str | None = None
    """The cluster to attach to (``tcp://host:8786``; ``ray://host:10001`` or ``auto``); None: start a local one."""
    workers: int = Field(2, ge=1)
    """Processes of a local Dask cluster or Ray (one per core is the fastest here)."""


def flow_params(root: Path) -> FlowParams:
    """``root/params.yaml``'s ``flow:`` section (all defaults without the file or the section)."""
    if not (root / PARAMS_FILE).is_file():
        return FlowParams()
    try:
        return validate_params(FlowParams, load_section(root / PARAMS_FILE, "flow"))
    except ValidationError as err:
        raise ParamsError(f"invalid params in {PARAMS_FILE}: flow: {one_line(err)}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI: run the flow once."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="repository root (default: cwd)")
    parser.add_argument("--stage", action="append", dest="stages", help="run only this stage (repeatable)")
    parser.add_argument("--force", action="store_true", help="run the selected stages even when DVC says they are "
                                                            "up to date")
    parser.add_argument("--runner", choices=RUNNERS,
                        help="where shards run: the stages' own process pools, Dask or Ray (default: params.yaml "
                             "flow.runner, else local)")
    parser.add_argument("--address", help="attach to this cluster: tcp://host:8786 (dask), ray://host:10001 or "
                                          "auto (ray); default: flow.address, else start a local one")
    parser.add_argument("--workers", type=int, help="processes of a local Dask cluster or Ray (default: "
                                                    "flow.workers, else 2)")
    args = parser.parse_args(argv)
    try:
        defaults = flow_params(Path(args.root))
        results = run_pipeline(root=args.root, stages=args.stages, force=args.force,
                               runner=args.runner or defaults.runner, address=args.address or defaults.address,
                               workers=args.workers or defaults.workers)
    except (FacedetailError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ran = [r["stage"] for r in results if r["ran"]]
    print(f"ran {len(ran)} of {len(results)} stages" + (f": {', '.join(ran)}" if ran else " (all up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
