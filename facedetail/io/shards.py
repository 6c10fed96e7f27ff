"""WebDataset tar shards: deterministic, atomic, built in parallel and resumable.

A shard is a plain tar file in the WebDataset layout: the files of one sample share a key
(``expr-0000042.png``, ``expr-0000042.json``, ...) and samples follow each other in order.
Shards are written with :class:`webdataset.TarWriter` with fixed metadata (mtime 0, empty
user and group, mode 0644) and samples in item order, so equal samples give equal bytes.

:func:`build_shards` runs a shard worker over many shards in a pool of processes and keeps a
per-shard completion record (sha256 of the tar, the key of the inputs that made it, the
manifest rows) in a work folder. A rerun after a kill re-uses every shard whose record
exists, whose key matches and whose tar still has the recorded sha256; anything else is
built again, and the temporary files of shards that were being written are removed. A tar
without a record is never counted: the record is written after the tar is complete and
renamed into place.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from facedetail.errors import SourceFileError
from facedetail.io.atomic import atomic_file, atomic_write_text, remove_temp_files
from facedetail.io.hashing import canonical_json, sha256_file

SHARD_SUFFIX = ".tar"
SHARDS_DIR = "shards"
"""Folder of the shards in a stage's output: manifest rows name theirs as ``shards/<file>``."""
_RECORD_SUFFIX = ".done.json"


def write_tar_shard(path: Path | str, samples: Iterable[dict[str, Any]]) -> Path:
    """Write WebDataset samples (``{"__key__": key, ext: bytes, ...}``) to a tar file atomically."""
    # Imported here: webdataset's package imports torch (2.3 of a stage's 3.8 s of imports here), which most
    # stages and every command that only plans or checks never use.
    from webdataset import TarWriter

    with atomic_file(path) as fh:
        writer = TarWriter(fh, user="", group="", mode=0o644, mtime=0, encoder=False)
        for sample in samples:
            writer.write(sample)
        writer.close()
    return Path(path)


MAX_MEMBER_BYTES = 256 << 20
"""Largest shard member the readers accept (4x a 4096² float32 map, 64 MiB, the largest a stage writes): a shard whose
header claims more is refused before a byte of the member is read, so a 2 KB tar cannot make a reader
allocate gigabytes."""


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path | str, max_bytes: int) -> bytes:
    """A member's bytes, refused when sparse (the stages never write one) or larger than ``max_bytes``."""
    remedy = "Shards are written by the stages: rebuild this one (`dvc repro`), or check where it came from"
    if member.issparse():
        raise SourceFileError(path, f"shard member {member.name!r} is a sparse file", remedy)
    if member.size > max_bytes:
        raise SourceFileError(path, f"shard member {member.name!r} is {member.size} bytes, over the "
                                    f"{max_bytes}-byte member cap", remedy)
    fh = tar.extractfile(member)
    return b"" if fh is None else fh.read(max_bytes)


def iter_tar_shard(path: Path | str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, bytes]]:
    """The samples of a shard in order: ``{"__key__": key, ext: bytes, ...}`` (WebDataset grouping).

    Raises :class:`SourceFileError` for a sparse member or one over ``max_member_bytes``.
    """
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = _member_bytes(tar, member, path, max_member_bytes)
    if current is not None:
        yield current


def read_tar_samples(path: Path | str, keys: Iterable[str],
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> list[dict[str, bytes]]:
    """Only the samples with these keys, in shard order; seeks past the others without reading them.

    Raises :class:`SourceFileError` for a wanted member that is sparse or over ``max_member_bytes``.
    """
    wanted = set(keys)
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            if key in wanted and member.isfile():
                samples.setdefault(key, {"__key__": key})[ext] = _member_bytes(tar, member, path, max_member_bytes)
    return list(samples.values())


@dataclass(frozen=True)
class ShardTask:
    """One shard to build: its name (file stem) and the ids of its items, in order."""

    name: str
    item_ids: tuple[str, ...]
    inputs: tuple[Any, ...] = ()
    """What the worker needs of each item (parallel to ``item_ids``), or nothing when its spec has it all.

    A unit carries its own shard's inputs, never the whole list's: with 163K photos in the worker's spec,
    each of 5,100 units pickled 12.5 MB (0.4 s to pickle and 0.8 s to unpickle, per unit)."""

    def inputs_by_id(self) -> dict[str, Any]:
        """``{item id: its input}`` (ValueError when the task was not built with one input per item)."""
        if len(self.inputs) != len(self.item_ids):
            raise ValueError(f"shard {self.name}: {len(self.inputs)} inputs for {len(self.item_ids)} items")
        return dict(zip(self.item_ids, self.inputs, strict=True))


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: what was built, from which inputs, and its manifest rows."""

    name: str
    sha256: str
    bytes: int
    key: str
    """Hash of everything that determines the shard's content (params, input hashes)."""
    item_ids: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    """One manifest row per item (the shard's sha256 is not in them)."""

    @property
    def filename(self) -> str:
        return self.name + SHARD_SUFFIX

    def to_json(self) -> str:
        """The record as canonical JSON (what the ``.done.json`` beside the shard holds).

        Built from the fields as they are: ``dataclasses.asdict`` deep-copies every row first, 550 ms per
        shard of 1,000 renders (0.55 ms an image, in the process that drives the workers) for the same text.
        """
        return canonical_json({field.name: getattr(self, field.name) for field in fields(self)})


class ShardWorker(Protocol):
    """Builds one shard: writes ``task``'s items to ``tar_path``; returns one manifest row per item."""

    def __call__(self, task: ShardTask, tar_path: Path, progress: Callable[[int], None]) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build_shards` did."""

    records: list[ShardRecord]
    built: int
    reused: int
    seconds: float
    items_built: int
    executor: str = "local"
    """Where the shards were built (:mod:`facedetail.io.executors`): ``local``, ``dask``, ``ray``, ``prefect-…``."""

    def summary(self) -> dict[str, Any]:
        """Counts and time for a run's printed summary (not for metrics: the time varies)."""
        return {"shards": len(self.records), "shards_built": self.built, "shards_reused": self.reused,
                "executor": self.executor,
                "seconds": round(self.seconds, 1),
                "items_per_s": round(self.items_built / self.seconds, 1) if self.items_built else None}


def shard_tasks(item_ids: Sequence[str], shard_size: int, prefix: str = "shard",
                inputs: Mapping[str, Any] | None = None) -> list[ShardTask]:
    """Consecutive items in shards named ``{prefix}-00000``, ...; growing the list keeps earlier shards.

    ``inputs`` (item id → what the worker needs of it) go with each shard's own items.
    """
    tasks = []
    for i in range(0, len(item_ids), shard_size):
        ids = tuple(item_ids[i:i + shard_size])
        tasks.append(ShardTask(f"{prefix}-{i // shard_size:05d}", ids,
                               tuple(inputs[k] for k in ids) if inputs is not None else ()))
    return tasks


def completed_record(work_dir: Path, task: ShardTask, key: str) -> ShardRecord | None:
    """The record of ``task`` in ``work_dir`` if it is complete, made from ``key`` and intact."""
    record_path = work_dir / (task.name + _RECORD_SUFFIX)
    tar_path = work_dir / (task.name + SHARD_SUFFIX)
    if not record_path.is_file() or not tar_path.is_file():
        return None
    try:
        data = json.loads(record_path.read_text(encoding="utf-8"))
        record = ShardRecord(**{**data, "item_ids": tuple(data["item_ids"]), "rows": tuple(data["rows"])})
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    if record.key != key or record.item_ids != task.item_ids or record.bytes != tar_path.stat().st_size:
        return None
    return record if sha256_file(tar_path) == record.sha256 else None


def build_shards(tasks: Sequence[ShardTask], work_dir: Path, key: str, worker_factory: Callable[[], ShardWorker],
                 workers: int = 1, desc: str = "shards", unit: str = "item") -> BuildReport:
    """Build every shard not already complete in ``work_dir`` on the executor in effect, then record it.

    The executor is :func:`facedetail.io.executors.current_executor`: by default ``workers``
    processes of this machine; a Dask or Ray cluster when the caller set one. ``worker_factory``
    must be picklable (a module-level callable or ``functools.partial``): each worker process
    calls it once (e.g. to open a GL context) and then builds shards with the result. Shards are
    written by the workers into ``work_dir``; their records by this process, in task order of
    completion, each as soon as its shard is done, so a kill keeps every finished shard. A dead
    worker process raises :class:`InterruptedRunError`; finished shards stay reusable.
    """
    from facedetail.io.executors import current_executor, plan_job

    start = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(work_dir)  # half-written shards of a killed run
    done: dict[str, ShardRecord] = {}
    for task in tasks:
        record = completed_record(work_dir, task, key)
        if record is not None:
            done[task.name] = record
    todo = [t for t in tasks if t.name not in done]
    reused = len(done)
    total = sum(len(t.item_ids) for t in tasks)
    executor = current_executor(workers)
    if todo:
        job = plan_job(worker_factory, _build_one, todo, work_dir, [t.name for t in todo],
                       [len(t.item_ids) for t in todo], stage=desc)
        with tqdm(total=total, initial=total - sum(len(t.item_ids) for t in todo), desc=desc, unit=unit,
                  dynamic_ncols=True, mininterval=1.0, disable=None) as bar:
            for i, built in executor.run(job, bar.update):
                done[todo[i].name] = _finish(work_dir, key, todo[i], built)
    records = [done[t.name] for t in tasks]
    return BuildReport(records, len(todo), reused, time.perf_counter() - start,
                       sum(len(t.item_ids) for t in todo), executor.name)


def _build_one(worker: ShardWorker, task: ShardTask, work_dir: Path,
               progress: Callable[[int], None]) -> tuple[list[dict[str, Any]], str, int]:
    tar_path = work_dir / (task.name + SHARD_SUFFIX)
    rows = worker(task, tar_path, progress)
    if len(rows) != len(task.item_ids):
        raise RuntimeError(f"shard worker returned {len(rows)} rows for {len(task.item_ids)} items of {task.name}")
    return rows, sha256_file(tar_path), tar_path.stat().st_size


def _finish(work_dir: Path, key: str, task: ShardTask, built: tuple[list[dict[str, Any]], str, int]) -> ShardRecord:
    rows, sha, size = built
    record = ShardRecord(task.name, sha, size, key, task.item_ids, tuple(rows))
    atomic_write_text(work_dir / (task.name + _RECORD_SUFFIX), record.to_json())
    return record


# --- worker processes -------------------------------------------------------------------------

def one_thread_per_process() -> None:
    """Keep a pool process on one core: the pool already runs one process per core.

    OpenBLAS (NumPy's matrix products), OpenCV and Mesa's llvmpipe each start a thread per
    core in every process; with one process per core those threads spin against each other.
    Measured here rendering faces with 2 processes on 2 cores: 27.7 ms per image each with
    the default threads, 12.3 ms each with one thread (12.4 ms for one process alone).
    Runs before the worker is made, so before any GL context; a user's ``LP_NUM_THREADS`` is kept.
    """
    import cv2
    from threadpoolctl import threadpool_limits

    os.environ.setdefault("LP_NUM_THREADS", "0")
    cv2.setNumThreads(1)
    threadpool_limits(1)
