"""Per-item work over a pool of processes, results in input order.

Capture items are few and heavy (one scan each), so they are mapped one by one rather than
sharded. Each process builds its worker once (``worker_factory()``: loads the face model and
rasterizes its UV layout) and keeps one BLAS/OpenCV thread, like the shard builders
(:func:`facedetail.io.shards.one_thread_per_process`), also when run in-process. Results do not
depend on the number of processes: every item's randomness comes from its own seed, and every
process computes with one BLAS thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from facedetail.errors import InterruptedRunError
from facedetail.io.shards import one_thread_per_process

T = TypeVar("T")
_WORKER: Callable[[Any], Any] | None = None


def _init(factory: Callable[[], Callable[[Any], Any]]) -> None:
    global _WORKER
    one_thread_per_process()
    _WORKER = factory()


def _call(task: Any) -> Any:
    assert _WORKER is not None
    return _WORKER(task)


def map_items(worker_factory: Callable[[], Callable[[Any], T]], tasks: Sequence[Any], workers: int = 1,
              desc: str = "items", unit: str = "item") -> list[T]:
    """``[worker(task) for task in tasks]`` over ``workers`` spawned processes (in-process when 1).

    ``worker_factory`` must be picklable (module-level or a ``functools.partial``). A dead
    worker process raises :class:`InterruptedRunError` (a rerun starts over).
    """
    results: list[Any] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc, unit=unit, dynamic_ncols=True, disable=None) as bar:
        if workers <= 1 or len(tasks) <= 1:
            # One BLAS thread here too: a matrix product (the model's vertices) may round differently
            # with another thread count, and the float32 outputs would then differ in their last bits.
            with threadpool_limits(1):
                worker = worker_factory() if tasks else None
                for i, task in enumerate(tasks):
                    results[i] = worker(task)
                    bar.update(1)
            return results
        # A worker that cannot be built (bad config, corrupt model) would only break the pool, which
        # reads as "a worker died, run again": build one here first so the real error is raised.
        with threadpool_limits(1):
            worker_factory()
        # spawn, not fork: a forked child would share the parent's OpenGL and BLAS state.
        ctx = mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_init,
                                      initargs=(worker_factory,))
        try:
            futures = {pool.submit(_call, task): i for i, task in enumerate(tasks)}
            for future in cf.as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except cf.process.BrokenProcessPool as err:
                    raise InterruptedRunError(f"a worker process died ({err}); run again") from None
                bar.update(1)
        finally:
            # On an error, do not wait for the queued items to run first.
            pool.shutdown(wait=True, cancel_futures=True)
    return results
