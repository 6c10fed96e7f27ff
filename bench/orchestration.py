"""Benchmark: the cost of the engines. The same render shards built by the local pool, by Prefect + Dask and
by Prefect + Ray (and by Dask alone, as ``FACEDETAIL_EXECUTOR=dask`` does), all measured in one run.

    python bench/orchestration.py [--share data/external/eos-share] [--count 8000] [--shard-size 1000]
                                  [--workers 2] [--noop 200] [--engines local dask prefect-dask prefect-ray]
                                  [--rounds 1] [--warm-up 2000] [--startup-root .]

Per engine, three times: images/s of ``render_expressions``' shard worker over ``--count`` renders
(256², PNG, tar shards), once with the engine's start-up included (a one-off run, as a user pays
it), once on the engine started before the clock ("running": its workers idle and nothing imported
yet) and once on an engine that has built ``--warm-up`` renders of another job before the clock
("warm": a team's long-lived cluster, whose workers have imported what a shard needs; 0 leaves it
out); its fraction of the machine's own limit (the local pool's
single-process rate times the worker count); and the CPU per image of every process in the run
(workers, scheduler, nannies, raylet, Prefect's server; it drifts with the machine too: a busy host
shows up as more CPU per image).
The local pool (the baseline, today's ``dvc repro``) runs before every engine run and once more
at the end; each engine run's ratio is taken against the mean of the two local-pool runs next to
it (goal >= 0.9), and ``--rounds`` repeats the whole sequence. Every engine's shards are checked
byte-identical to the local pool's. Then the Prefect overhead per task (``--noop`` empty
tasks through each task runner, per task) and, with ``--startup-root`` (a repository whose
default profile is built and up to date), the flow's fixed cost: ``python -m flows.pipeline`` when
DVC says every stage is up to date, once per runner of ``--startup-runners`` (with ``dask`` / ``ray``
the flow starts that engine first, as a run with stale stages would), against the default run's own
duration (the stages' run times in its lineage records; goal <= 10 %). ``--count 0`` measures only that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

ENGINES = ("local", "dask", "prefect-dask", "prefect-ray")


def _hashes(work: Path) -> dict[str, str]:
    from facedetail.io.hashing import sha256_file

    return {p.name: sha256_file(p) for p in sorted(work.glob("*.tar"))}


@contextlib.contextmanager
def engine_session(engine: str, workers: int) -> Iterator[Any]:
    """The engine of ``engine`` started (a Dask ``LocalCluster`` / a local Ray with the worker hooks), closed
    after: what :func:`build` runs on. ``None`` for the local pool, which has nothing to start."""
    from facedetail.io.executors import executor_session

    if engine == "local":
        yield None
    elif engine == "dask":
        with executor_session("dask", workers) as executor:
            yield executor
    else:
        from flows.pipeline import task_runner

        with task_runner(engine.split("-", 1)[1], None, workers) as runner:
            yield runner


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every process below it, each with the children it has
    reaped: the pool's workers, a Dask cluster's worker processes, Ray's raylet and workers, Prefect's server
    (a process that outlives its parent is lost)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def bracketed_ratios(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per engine, the images/s of each of its runs over the mean of the local-pool runs just before and
    just after it (only the one before when none follows)."""
    local = [i for i, run in enumerate(runs) if run["engine"] == "local"]
    ratios: dict[str, list[float]] = {}
    for i, run in enumerate(runs):
        if run["engine"] == "local":
            continue
        around = [j for j in (max((j for j in local if j < i), default=None),
                              min((j for j in local if j > i), default=None)) if j is not None]
        baseline = sum(runs[j]["images_per_s"] for j in around) / len(around)
        ratios.setdefault(run["engine"], []).append(round(run["images_per_s"] / baseline, 3))
    return ratios


def build(engine: str, spec: Any, count: int, shard_size: int, workers: int, work: Path,
          started: Any = None) -> tuple[float, float]:
    """Seconds to build the shards on ``engine``, and the CPU seconds of every process in the meantime
    (:func:`tree_cpu_seconds`): on the already ``started`` engine (:func:`engine_session`), or, with None,
    its start-up included (as a user of a one-off run pays it; its shut-down is not)."""
    from facedetail.io.executors import use_executor
    from facedetail.io.shards import build_shards, shard_tasks
    from facedetail.render.expression_set import ExpressionShardWorker, item_id

    tasks = shard_tasks([item_id(i) for i in range(count)], shard_size)
    factory = partial(ExpressionShardWorker, spec)
    start, cpu_start = time.perf_counter(), tree_cpu_seconds()
    with contextlib.ExitStack() as stack:
        if started is None and engine != "local":
            started = stack.enter_context(engine_session(engine, workers))
        if engine == "local":
            build_shards(tasks, work, "bench", factory, workers=workers, desc=engine)
        elif engine == "dask":
            with use_executor(started):
                build_shards(tasks, work, "bench", factory, workers=workers, desc=engine)
        else:
            _prefect_build(engine.split("-", 1)[1], tasks, factory, work, workers, started)
        seconds = time.perf_counter() - start
        cpu = tree_cpu_seconds() - cpu_start  # before the engine's shut-down, while its processes still live
    return seconds, cpu


def _prefect_build(runner: str, tasks: list, factory: Any, work: Path, workers: int, engine: Any) -> None:
    from prefect import flow

    from facedetail.io.executors import use_executor
    from facedetail.io.shards import build_shards
    from flows.pipeline import PrefectShards

    @flow(name=f"bench-{runner}")
    def shards() -> None:
        with use_executor(PrefectShards(runner)):
            build_shards(tasks, work, "bench", factory, workers=workers, desc=runner)

    shards.with_options(task_runner=engine)()


def noop_overhead(runner: str, n: int, workers: int) -> float:
    """Seconds per task of ``n`` empty Prefect tasks mapped through ``runner``'s task runner (engine started)."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.pipeline import task_runner

    @task(cache_policy=NO_CACHE, persist_result=False)
    def noop(i: int) -> int:
        return i

    @flow(name=f"bench-noop-{runner}")
    def many() -> float:
        start = time.perf_counter()
        futures = noop.map(list(range(n)))
        futures.result()
        return time.perf_counter() - start

    with task_runner(runner, None, workers) as engine:
        flow_fn = many if engine is None else many.with_options(task_runner=engine)
        return flow_fn() / n


def default_run_seconds(root: Path) -> float | None:
    """The default profile's run time on this machine: each stage's last completed run in the lineage events."""
    events = root / "data/lineage/events.jsonl"
    if not events.is_file():
        return None
    from datetime import datetime

    from facedetail.io.lineage import iter_events

    started: dict[str, datetime] = {}
    last: dict[str, float] = {}
    for event in iter_events(events):
        job, when = event["job"]["name"], datetime.fromisoformat(event["eventTime"])
        if event["eventType"] == "START":
            started[job] = when
        elif event["eventType"] == "COMPLETE" and job in started:
            last[job] = (when - started.pop(job)).total_seconds()
    return sum(last.values()) if last else None


def flow_fixed_cost(root: Path, runner: str = "local") -> float:
    """Seconds of ``python -m flows.pipeline --runner runner`` on ``root`` (every stage up to date: only the
    fixed cost; with ``dask`` / ``ray`` it includes starting and closing that engine)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root), "--runner", runner],
                          cwd=root, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "all up to date" not in proc.stdout:
        raise SystemExit(f"the flow did not find {root} up to date (run `dvc repro` first):\n{proc.stdout[-2000:]}"
                         f"\n{proc.stderr[-2000:]}")
    return seconds


def engine_runs(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The machine's limit, every engine's runs between local-pool runs, and the Prefect overhead per task,
    into ``results``."""
    from facedetail.io.executors import set_up_worker_process
    from facedetail.model import load_model_source
    from facedetail.render.expression_set import ExpressionSetSpec, ExpressionShardWorker, item_id
    from facedetail.render.sampling import SamplingConfig

    model = load_model_source("sfm", args.share / "sfm_shape_3448.bin", args.share)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = model.save(Path(tmp) / "model.npz")
        spec = ExpressionSetSpec(model_path, "bench", 0, 256, SamplingConfig(), 3, "bench")

        set_up_worker_process()  # as every pool process and engine worker is set up
        worker = ExpressionShardWorker(spec)
        worker.render_item(item_id(0))
        start = time.perf_counter()
        for i in range(args.single):
            worker.render_item(item_id(i))
        limit = args.workers * args.single / (time.perf_counter() - start)
        print(f"machine limit: {limit:.1f} img/s ({args.workers} x one process's rate, no engine, no tar)")
        results["limit_images_per_s"] = round(limit, 1)

        # One Prefect server for every Prefect run (as a team's long-running server): its start-up is a fixed
        # cost of a flow run, printed on its own, not a cost of the engine.
        from prefect.testing.utilities import prefect_test_harness

        server = contextlib.ExitStack()
        start = time.perf_counter()
        server.enter_context(prefect_test_harness(server_startup_timeout=120))
        results["prefect_server_start_s"] = round(time.perf_counter() - start, 1)
        print(f"Prefect server start: {results['prefect_server_start_s']} s (once; not in the rates below)")

        # The local pool runs before every engine run and once more at the end, and each engine run is
        # compared with the mean of the two local-pool runs next to it: this machine's speed drifts by
        # 10-30 % within minutes (one worker's 1,000-render shards took 16 s to 28 s in one run), so a
        # baseline measured once at the start would land the drift on whichever engine ran when it struck.
        sequence: list[tuple[str, str]] = []
        for _ in range(args.rounds):
            for engine in (e for e in args.engines if e != "local"):
                sequence += [("local", ""), (engine, ""), ("local", ""), (engine, "running")]
                sequence += [("local", ""), (engine, "warm")] if args.warm_up > 0 else []
        sequence += [("local", "")]
        reference = None
        runs: list[dict[str, Any]] = []
        for engine, state in sequence:
            name = f"{engine} ({state})" if state else engine
            work = Path(tmp) / f"run-{len(runs)}"
            if state:
                # The engine as a team keeps it: started before the clock, and for "warm" one other job built
                # on it first (its workers have imported what a shard needs, their heaps have grown).
                with engine_session(engine, args.workers) as started:
                    if state == "warm":
                        build(engine, spec, args.warm_up, args.shard_size, args.workers, Path(tmp) / "warm-up",
                              started)
                    seconds, cpu = build(engine, spec, args.count, args.shard_size, args.workers, work, started)
            else:
                seconds, cpu = build(engine, spec, args.count, args.shard_size, args.workers, work)
            hashes = _hashes(work)
            reference = hashes if reference is None else reference
            run = {"engine": name, "seconds": round(seconds, 1), "images_per_s": round(args.count / seconds, 1),
                   "of_limit": round(args.count / seconds / limit, 3),
                   "cpu_ms_per_image": round(1000 * cpu / args.count, 2), "same_bytes": hashes == reference}
            runs.append(run)
            print(f"{name:>24}: {run['images_per_s']:7.1f} img/s  {seconds:6.1f} s  "
                  f"{100 * run['of_limit']:5.1f} % of the limit  {run['cpu_ms_per_image']:5.1f} ms CPU per image "
                  f"(every process)  same bytes: {run['same_bytes']}", flush=True)
            if not run["same_bytes"]:
                raise SystemExit(f"{name} built other bytes than the local pool")
        results["runs"] = runs
        results["ratios"] = bracketed_ratios(runs)
        for name, ratios in results["ratios"].items():
            print(f"{name:>24}: x{' x'.join(f'{r:.3f}' for r in ratios)} of the local pool around it")

    runners = ("local", *[e.split("-", 1)[1] for e in args.engines if e.startswith("prefect-")])
    for runner in runners if args.noop > 0 else ():  # --noop 0: no overhead measurement
        per_task = noop_overhead(runner, args.noop, args.workers)
        results[f"prefect_overhead_s_per_task_{runner}"] = round(per_task, 4)
        print(f"Prefect overhead per task ({runner} task runner, {args.noop} empty tasks): {1000 * per_task:.1f} ms")

    server.close()


def main() -> None:
    from flows.pipeline import RUNNERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=Path, default=Path("data/external/eos-share"))
    parser.add_argument("--count", type=int, default=8000, help="renders per engine (0: only the flow's "
                                                                  "fixed cost of --startup-root)")
    parser.add_argument("--shard-size", type=int, default=1000, help="the stage's default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--single", type=int, default=200, help="renders in one process, for the machine's limit")
    parser.add_argument("--noop", type=int, default=200, help="empty tasks per task runner for the overhead")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of every engine, each run between two local-pool runs")
    parser.add_argument("--warm-up", type=int, default=2000,
                        help="renders built on the engine before its warm run (0: no warm run)")
    parser.add_argument("--startup-root", type=Path, help="a built, up-to-date repository: measure the flow's "
                                                          "fixed cost there")
    parser.add_argument("--startup-runners", nargs="+", choices=RUNNERS, default=list(RUNNERS),
                        help="the flow's runners whose fixed cost is measured")
    args = parser.parse_args()

    results: dict[str, Any] = {"count": args.count, "shard_size": args.shard_size, "workers": args.workers}
    if args.count > 0:
        engine_runs(args, results)

    if args.startup_root is not None:
        default = default_run_seconds(args.startup_root)
        results["default_run_s"] = None if default is None else round(default, 1)
        for runner in args.startup_runners:
            fixed = flow_fixed_cost(args.startup_root, runner)
            results[f"flow_fixed_cost_s_{runner}"] = round(fixed, 1)
            share = f"{100 * fixed / default:.1f} % of the default run's {default:.0f} s" if default else "no lineage"
            print(f"flow fixed cost, --runner {runner} (nothing stale): {fixed:.1f} s = {share} (goal <= 10 %)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
