"""Per-item work on the executor in effect, results in input order.

Capture items are few and heavy (one scan each), so they are mapped one by one rather than
sharded. Each worker process builds its worker once (``worker_factory()``: loads the face model and
rasterizes its UV layout) and keeps one BLAS/OpenCV thread, like the shard builders
(:func:`facedetail.io.executors.set_up_worker_process`), also when run in-process. Results do not
depend on the number of processes or the engine: every item's randomness comes from its own seed,
and every process computes with one BLAS thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from facedetail.io.executors import current_executor, plan_job

T = TypeVar("T")


def _call_item(worker: Callable[[Any], Any], task: Any, work_dir: Path | None,
               progress: Callable[[int], None]) -> Any:
    return worker(task)


def map_items(worker_factory: Callable[[], Callable[[Any], T]], tasks: Sequence[Any], workers: int = 1,
              desc: str = "items", unit: str = "item", work_dir: Path | None = None,
              labels: Sequence[str] | None = None) -> list[T]:
    """``[worker(task) for task in tasks]`` on the executor in effect (by default ``workers`` spawned
    processes of this machine, in-process when 1).

    ``worker_factory`` must be picklable (module-level or a ``functools.partial``). ``work_dir``: the
    folder the workers write into, checked to be the same folder on every worker (None: results are
    only returned). A dead worker process raises :class:`~facedetail.errors.InterruptedRunError`.
    """
    results: list[Any] = [None] * len(tasks)
    if not tasks:
        return results
    names = list(labels) if labels is not None else [f"{i:05d}" for i in range(len(tasks))]
    job = plan_job(worker_factory, _call_item, tasks, work_dir, names, [1] * len(tasks), stage=desc)
    with tqdm(total=len(tasks), desc=desc, unit=unit, dynamic_ncols=True, disable=None) as bar:
        for i, result in current_executor(workers).run(job, bar.update):
            results[i] = result
    return results
