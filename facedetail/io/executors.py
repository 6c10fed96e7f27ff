"""Where the sharded work of a stage runs: this machine's process pool, a Dask cluster or a Ray cluster.

A sharded stage is *plan → build one shard → finish*: the stage plans its shards (ids, key, a
picklable worker factory), :func:`facedetail.io.shards.build_shards` (or
:func:`facedetail.capture.worker.process_items` for capture scans) hands the shards still to
build to the executor in effect, and the stage finishes from their records. The executor is
chosen by whoever runs the stage, never by the stage: the process pool by default,
:func:`use_executor` to set another (the Prefect flow sets one that maps shards as Prefect
tasks; ``python -m stages.<name>`` sets one from ``FACEDETAIL_EXECUTOR``).

Every engine runs the same unit, :func:`run_unit`: in each worker process it builds the worker
once (a GL context, the model) after the per-process set-up (one BLAS/OpenCV thread, set by the
engine's worker hook where the engine has one), checks that the shared work folder is the one
the run planned in, then builds one shard. Shards are written by the workers straight into the
run's work folder, which therefore must be one path that every worker mounts (a shared
filesystem): a 90K render set is ~4 GB, which would otherwise travel through the scheduler.
The records (sha256, rows) are written by the process that planned the run, so the bytes of a
run do not depend on the engine or the number of workers.

Lost workers: Dask reschedules a task whose worker died (up to its ``allowed-failures``), Ray
retries it (``max_retries``); a task that raises is not retried here (bad input does not fix
itself), and the error is raised in the planning process as it was raised in the worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import gc
import multiprocessing as mp
import os
import queue
import socket
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from facedetail.errors import FacedetailError, InterruptedRunError

EXECUTOR_ENV = "FACEDETAIL_EXECUTOR"
"""``local`` (default), ``dask`` (a local cluster), ``dask://host:8786``, ``ray`` (a local Ray),
``ray://host:10001`` or ``ray:auto`` (the Ray cluster this machine belongs to)."""
PROBE_NAME = ".executor-probe"
_PROGRESS_EVERY = 10

Call = Callable[[Any, Any, Path | None, Callable[[int], None]], Any]
"""``call(worker, task, work_dir, progress)``: one unit of work with a built worker, writing into the shared
``work_dir``; ``progress(n)`` counts items (optional: the rest of a unit's weight is counted when it ends)."""


class SharedFolderError(FacedetailError):
    """A worker does not see the run's work folder as the planning process wrote it."""


@dataclass(frozen=True)
class Unit:
    """One unit of work as an engine carries it to a worker process (picklable)."""

    factory: Callable[[], Any]
    """Builds the worker (once per process and job)."""
    call: Call
    task: Any
    work_dir: str
    """The shared folder the unit writes into ('' when it only returns a value)."""
    token: str
    """The job's token: a worker process builds one worker per job; ``work_dir/PROBE_NAME`` holds it."""


def set_up_worker_process() -> None:
    """Per-process set-up of every engine's workers: one BLAS/OpenCV/llvmpipe thread each, offscreen GL.

    The engines run one worker process per core; each library's own thread pool would make those
    processes spin against each other (see :func:`facedetail.io.shards.one_thread_per_process`).
    Idempotent: the engines' hooks call it, and :func:`run_unit` again where no hook ran.
    """
    global _SET_UP
    if _SET_UP:
        return
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    from facedetail.io.shards import one_thread_per_process

    one_thread_per_process()
    steady_heap()
    _SET_UP = True


STEADY_HEAP_MMAP_THRESHOLD = 32 << 20
"""Buffers below this come from the heap (glibc's largest dynamic mmap threshold on 64-bit systems)."""
STEADY_HEAP_TRIM_THRESHOLD = 128 << 20
"""Free memory at the heap's top that a worker keeps instead of handing it back to the system at once."""
_MALLOPT = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # glibc's malloc.h
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
"""glibc's own variables for what :func:`steady_heap` sets (``GLIBC_TUNABLES``' ``glibc.malloc.*`` too)."""


def steady_heap() -> bool:
    """Fixed glibc malloc thresholds in a worker process, so that a render's buffers are re-used from the heap.

    A fresh process starts with glibc's dynamic thresholds: a buffer over 128 KiB (a 256² image, a PNG, a
    depth map) is a fresh ``mmap`` until frees have raised the threshold past it, and the heap's top is
    handed back and faulted in again. A pool process never got there: 511-566 page faults and 1.37-1.50 ms
    of system time per 256² render (``bench/worker_heap.py``), 44 faults and 0.35-0.38 ms with these
    thresholds (a long-lived Dask worker got down to ~4 faults only after ~4,000 renders of its own).
    Nothing is set where the C library is not glibc, where the user set one of these thresholds
    (:data:`_MALLOC_VARIABLES`: theirs is kept), or with ``FACEDETAIL_STEADY_HEAP=0``; returns whether the
    thresholds were set."""
    import ctypes
    import platform

    if (os.environ.get("FACEDETAIL_STEADY_HEAP", "1") == "0" or any(v in os.environ for v in _MALLOC_VARIABLES)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # this process's own C library
    return bool(libc.mallopt(_MALLOPT["M_MMAP_THRESHOLD"], STEADY_HEAP_MMAP_THRESHOLD)
                and libc.mallopt(_MALLOPT["M_TRIM_THRESHOLD"], STEADY_HEAP_TRIM_THRESHOLD))


_SET_UP = False
_WORKERS: OrderedDict[str, Any] = OrderedDict()
_KEEP_WORKERS = 2
"""Workers kept per process (the last jobs'): a long-lived cluster worker must not keep every stage's model."""
_CHECKED: set[tuple[str, str]] = set()


def run_unit(unit: Unit, progress: Callable[[int], None] | None = None) -> Any:
    """Build (or re-use) this process's worker for ``unit.factory`` and run one unit of work."""
    _check_shared_folder(unit.work_dir, unit.token)  # before the set-up: a refusing process stays as it was
    set_up_worker_process()
    # One worker per job, not per factory: a long-lived cluster worker must not keep a model that a
    # later run changed on disk under the same path.
    worker = _WORKERS.get(unit.token)
    if worker is None:
        worker = unit.factory()
        _WORKERS[unit.token] = worker
        while len(_WORKERS) > _KEEP_WORKERS:
            _WORKERS.popitem(last=False)
        if _IN_POOL_PROCESS:
            _freeze_heap()
    _WORKERS.move_to_end(unit.token)
    return unit.call(worker, unit.task, Path(unit.work_dir) if unit.work_dir else None, progress or (lambda n: None))


_IN_POOL_PROCESS = False
"""True in the local pool's processes, which live for one job (one worker) and are this package's own."""


def _freeze_heap() -> None:
    """Move what a pool process holds once its worker is built (models, torch, compiled code) out of the
    garbage collector's sight. Full collections then skip it, during the run and at exit: a wild_proxy
    worker's exit took 1.0 s, of which 0.8 s was the interpreter's last collection over torch's objects
    (measured in a fresh process, with and without), and its full collections cost ~3 % of a shard. Not
    in an engine's long-lived workers: their heap is the engine's, and the collector cost a render 1 %
    there (0.24 ms of 20 ms, measured in a Dask worker)."""
    gc.collect()
    gc.freeze()


def _check_shared_folder(work_dir: str, token: str) -> None:
    if not work_dir or (work_dir, token) in _CHECKED:
        return
    path = Path(work_dir) / PROBE_NAME
    try:
        found = path.read_text(encoding="utf-8")
    except OSError:
        found = None
    if found != token:
        what = "does not exist" if found is None else "holds another run's probe"
        raise SharedFolderError(
            f"worker on {socket.gethostname()}: the work folder {work_dir} {what} here. Shards are written "
            "straight into it: run from a repository on a filesystem that every worker mounts at the same path")
    _CHECKED.add((work_dir, token))


def write_probe(work_dir: Path, token: str) -> None:
    """Write the job's token into ``work_dir`` (which workers check before writing there)."""
    from facedetail.io.atomic import atomic_write_text

    atomic_write_text(Path(work_dir) / PROBE_NAME, token)


@dataclass(frozen=True)
class Job:
    """What an executor is given: the units, with a label (the shard name) and a weight (its items) each."""

    units: Sequence[Unit]
    labels: Sequence[str]
    weights: Sequence[int]
    stage: str = ""


class Executor(Protocol):
    """Runs units of work and yields ``(index, result)`` as each finishes, in any order."""

    name: str

    def run(self, job: Job, progress: Callable[[int], None]) -> Iterator[tuple[int, Any]]: ...


def plan_job(factory: Callable[[], Any], call: Call, tasks: Sequence[Any], work_dir: Path | None,
             labels: Sequence[str], weights: Sequence[int], stage: str = "") -> Job:
    """The units of ``tasks`` for an executor; writes the shared-folder probe into ``work_dir`` (None: the
    units only return values, nothing to check)."""
    token = uuid.uuid4().hex
    if work_dir is not None:
        write_probe(work_dir, token)
    folder = str(Path(work_dir).resolve()) if work_dir is not None else ""
    units = [Unit(factory, call, task, folder, token) for task in tasks]
    return Job(units, labels, weights, stage)


# --- this machine's process pool --------------------------------------------------------------

@dataclass
class LocalPool:
    """``workers`` spawned processes on this machine (in-process when 1 or a single unit): the default."""

    workers: int = 1
    name: str = "local"

    def run(self, job: Job, progress: Callable[[int], None]) -> Iterator[tuple[int, Any]]:
        if self.workers <= 1 or len(job.units) <= 1:
            from threadpoolctl import threadpool_limits

            # One BLAS thread in-process too: a matrix product may round differently with another
            # thread count, and float32 outputs would then differ in their last bits.
            with threadpool_limits(1):
                worker = job.units[0].factory()  # in this process, for this job only
                for i, unit in enumerate(job.units):
                    counted = _Counted(progress)
                    result = unit.call(worker, unit.task, Path(unit.work_dir) if unit.work_dir else None, counted)
                    progress(job.weights[i] - counted.total)  # a call that does not count its items
                    yield i, result
            return
        yield from _pool_run(job, min(self.workers, len(job.units)), progress)


_QUEUE: Any = None


def _init_pool_process(progress_queue: Any) -> None:
    global _QUEUE, _IN_POOL_PROCESS
    set_up_worker_process()
    _QUEUE = progress_queue
    _IN_POOL_PROCESS = True


class _Counted:
    """A progress callback that also counts what it was told, so the rest of a unit's weight can be added."""

    def __init__(self, progress: Callable[[int], None]) -> None:
        self.progress = progress
        self.total = 0

    def __call__(self, n: int) -> None:
        self.total += n
        self.progress(n)


def _pool_unit(unit: Unit) -> tuple[Any, int]:
    pending = 0

    def progress(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= _PROGRESS_EVERY:
            _QUEUE.put(pending)
            pending = 0

    counted = _Counted(progress)
    result = run_unit(unit, counted)
    if pending:
        _QUEUE.put(pending)
    return result, counted.total


def _pool_run(job: Job, workers: int, progress: Callable[[int], None]) -> Iterator[tuple[int, Any]]:
    # The workers are built inside the units (run_unit), not in the pool's initializer: a worker that cannot
    # be built (bad config, corrupt model) raises its own error through the unit's future, where an
    # initializer's error would break the pool and read as "a worker died, run again".
    # spawn, not fork: a forked child would share the parent's OpenGL and BLAS state.
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_process, initargs=(progress_queue,))
    try:
        futures = {pool.submit(_pool_unit, unit): i for i, unit in enumerate(job.units)}
        pending = set(futures)
        finished_count = 0
        while pending:
            finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            _drain(progress_queue, progress)
            for future in finished:
                try:
                    result, reported = future.result()
                except cf.process.BrokenProcessPool as err:
                    raise InterruptedRunError(
                        f"a worker process died while building {job.labels[futures[future]]} ({err}); "
                        f"{finished_count} of {len(job.units)} are finished and will be re-used: run again "
                        "to resume") from None
                finished_count += 1
                _drain(progress_queue, progress)
                progress(job.weights[futures[future]] - reported)
                yield futures[future], result
    finally:
        # On an error, do not wait for the queued units to run first.
        pool.shutdown(wait=True, cancel_futures=True)
        progress_queue.close()


def _drain(progress_queue: Any, progress: Callable[[int], None]) -> None:
    while True:
        try:
            progress(progress_queue.get_nowait())
        except queue.Empty:
            return


# --- Dask ---------------------------------------------------------------------------------------

def dask_worker_plugin() -> Any:
    """A ``distributed.WorkerPlugin`` that runs :func:`set_up_worker_process` in each worker as it starts."""
    from distributed import WorkerPlugin

    class FacedetailSetUp(WorkerPlugin):
        name = "facedetail-set-up"

        def setup(self, worker: Any) -> None:
            set_up_worker_process()

    return FacedetailSetUp()


LOCAL_DASK_CONFIG: dict[str, Any] = {
    # glibc switches off its dynamic mmap threshold once any malloc threshold is set explicitly, so
    # with the nanny's MALLOC_TRIM_THRESHOLD_ every buffer over 128 KiB became a fresh mmap: ~2,000
    # page faults and 4.4-5.1 ms of system time per 256² render, 1.1-1.2 ms without it.
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    # The cluster we start has no dashboard: the statistical profiler (a stack sample every 10 ms) and
    # the system monitor (every 0.5 s) would feed nothing anyone sees.
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
    # Memory limits are still enforced, checked each second instead of every 100 ms; the event-loop
    # health check ticks every 200 ms instead of 20 ms.
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.tick.interval": "200ms",
}
"""Dask settings of the clusters :func:`local_dask_cluster` starts (a cluster you attach to keeps its own; the
README says which of these to set there). Measured on 2,000 renders, 2 workers: 72 img/s without them, 101
with the malloc line alone, 104 with all (the others took each worker's event-loop thread from 0.06-0.10 to
0.03 of a core)."""


def _environ_keeping_nanny() -> type:
    """Dask's ``Nanny`` that leaves this process's environment as it found it.

    A nanny runs in the process that starts the cluster, and before it spawns a worker it writes the worker's
    variables (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``, ``PYTHONHASHSEED``:
    ``distributed.nanny.pre-spawn-environ``) into *this* process's ``os.environ``, for good: every process
    started later (a local pool, ``dvc``, a test's next stage) inherited them. The worker needs them at its
    start only, so they are put back once it is spawned; also when the nanny starts a lost worker again."""
    from distributed import Nanny

    class EnvironKeepingNanny(Nanny):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._environ_before = dict(os.environ)
            super().__init__(*args, **kwargs)

        async def instantiate(self) -> Any:
            try:
                return await super().instantiate()
            finally:
                for key in self.pre_spawn_env:
                    if key in self._environ_before:
                        os.environ[key] = self._environ_before[key]
                    else:
                        os.environ.pop(key, None)

    return EnvironKeepingNanny


def local_dask_cluster(workers: int) -> Any:
    """A ``LocalCluster`` of ``workers`` single-threaded processes, on 127.0.0.1, no dashboard, with
    :data:`LOCAL_DASK_CONFIG` (the nannies keep it for the workers they restart); this process's environment
    is left as it was (:func:`_environ_keeping_nanny`)."""
    import copy

    import dask
    from distributed import LocalCluster

    with dask.config.set(LOCAL_DASK_CONFIG):
        # A nanny keeps a shallow copy of the global config (toolz.merge), whose nested dicts this block
        # restores on exit: without a deep copy of its own, a worker it starts again after a crash ran with
        # Dask's defaults (tested).
        worker_config = copy.deepcopy(dask.config.config)
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=None, config=worker_config, worker_class=_environ_keeping_nanny())


@dataclass
class DaskExecutor:
    """Units as Dask tasks on the cluster at ``address`` (``tcp://host:8786``), or a local cluster of ``workers``.

    The cluster's lost-worker handling retries a unit whose worker died; the plugin sets up every worker.
    """

    address: str | None = None
    workers: int = 2
    name: str = "dask"
    _client: Any = field(default=None, init=False, repr=False)
    _cluster: Any = field(default=None, init=False, repr=False)

    def start(self) -> None:
        """Start (or attach to) the cluster now, not at the first job."""
        self.client()

    def client(self) -> Any:
        """The cluster's client, the cluster started and the worker plugin registered at the first call."""
        if self._client is None:
            from distributed import Client

            if self.address is None:
                self._cluster = local_dask_cluster(self.workers)
                self._client = Client(self._cluster)
            else:
                self._client = Client(self.address)
            self._client.register_plugin(dask_worker_plugin())
        return self._client

    def run(self, job: Job, progress: Callable[[int], None]) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        client = self.client()
        stage = job.stage or "units"
        futures = {client.submit(run_unit, unit, key=f"{stage}-{label}-{uuid.uuid4().hex[:8]}", pure=False): i
                   for i, (unit, label) in enumerate(zip(job.units, job.labels, strict=True))}
        try:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    result = future.result()
                except KilledWorker as err:
                    raise InterruptedRunError(f"{job.labels[i]}: the Dask workers running it died too often "
                                              f"({err}); finished shards are kept: run again to resume") from None
                progress(job.weights[i])
                yield i, result
        finally:
            client.cancel(list(futures))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None


# --- Ray ----------------------------------------------------------------------------------------

RAY_SETUP_HOOK = "facedetail.io.executors.set_up_worker_process"
RAY_MAX_RETRIES = 3
"""Ray re-runs a unit whose worker process died up to this many times (exceptions are not retried)."""


RAY_NICENESS = "RAY_worker_niceness"
"""Ray's variable for its workers' nice value: 0 (the local pool's) for the local Ray :func:`ray_init` starts."""


def ray_init(address: str | None, workers: int) -> bool:
    """Start or join Ray with the facedetail worker hook; False if this process had already initialised Ray."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"worker_process_setup_hook": RAY_SETUP_HOOK,
                   "env_vars": {"PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "osmesa")}}
    if address is None:
        # Ray starts its workers at nice 15 (its `worker_niceness`), so that its own processes keep CPU when
        # the workers are busy. Where every core runs a worker, that put the renders behind the flow's and
        # Prefect's processes, which the local pool's workers are not: one bench run each, 4,000 renders on
        # a running Ray, 0.885x the local pool at nice 15, 0.968x at 0. A value the user set is kept.
        set_here = RAY_NICENESS not in os.environ
        os.environ.setdefault(RAY_NICENESS, "0")  # read by the raylet this call starts
        try:
            ray.init(num_cpus=workers, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
                     configure_logging=False)
        finally:
            if set_here:
                os.environ.pop(RAY_NICENESS, None)
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
    return True


@dataclass
class RayExecutor:
    """Units as Ray tasks on the cluster at ``address`` (``ray://host:10001``, ``auto``), or a local Ray."""

    address: str | None = None
    workers: int = 2
    name: str = "ray"
    _owns: bool = field(default=False, init=False, repr=False)

    def start(self) -> None:
        """Start or join Ray (with the worker hook) now, not at the first job."""
        self._owns = ray_init(self.address, self.workers) or self._owns

    def run(self, job: Job, progress: Callable[[int], None]) -> Iterator[tuple[int, Any]]:
        import ray

        self.start()
        remote = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(run_unit)
        refs = {remote.options(name=f"{job.stage}-{label}").remote(unit): i
                for i, (unit, label) in enumerate(zip(job.units, job.labels, strict=True))}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = refs[done[0]]
                try:
                    result = ray.get(done[0])
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as err:
                    raise InterruptedRunError(f"{job.labels[i]}: the Ray workers running it died "
                                              f"{RAY_MAX_RETRIES + 1} times ({err}); finished shards are "
                                              "kept: run again to resume") from None
                except ray.exceptions.RayTaskError as err:
                    raise err.as_instanceof_cause() from None
                progress(job.weights[i])
                yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        import ray

        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False


# --- choosing one -------------------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("facedetail_executor", default=None)


def current_executor(workers: int) -> Executor:
    """The executor set with :func:`use_executor`, or this machine's pool of ``workers`` processes."""
    return _CURRENT.get() or LocalPool(workers)


@contextlib.contextmanager
def use_executor(executor: Executor | None) -> Iterator[Executor | None]:
    """Run the sharded stages inside the block on ``executor`` (None: the local pool)."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)


def executor_from_url(url: str | None, workers: int = 2) -> Executor | None:
    """``local``/empty → None (the pool), ``dask[://host:port]``, ``ray``, ``ray://host:port``, ``ray:auto``.

    ``workers`` sizes a local cluster (ignored when attaching to one).
    """
    if not url or url == "local":
        return None
    parsed = urlparse(url)
    scheme = parsed.scheme or url
    if scheme == "dask":
        return DaskExecutor(f"tcp://{parsed.netloc}" if parsed.netloc else None, workers)
    if scheme == "tcp":
        return DaskExecutor(url, workers)
    if scheme == "ray":
        if parsed.netloc:
            return RayExecutor(url, workers)
        return RayExecutor("auto" if parsed.path == "auto" else None, workers)
    raise ValueError(f"{EXECUTOR_ENV}={url!r}: expected local, dask, dask://host:8786, ray, ray://host:10001 "
                     "or ray:auto")


@contextlib.contextmanager
def executor_session(url: str | None, workers: int = 2) -> Iterator[Executor | None]:
    """:func:`use_executor` for :func:`executor_from_url`'s executor, closed (its local cluster stopped) after."""
    executor = executor_from_url(url, workers)
    try:
        if executor is not None:
            executor.start()  # type: ignore[attr-defined]
        with use_executor(executor):
            yield executor
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()
