"""WebDataset shards: deterministic bytes, resumable builds, dead workers."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest

from facedetail.errors import InterruptedRunError
from facedetail.io.executors import PROBE_NAME
from facedetail.io.shards import (
    ShardRecord,
    ShardTask,
    build_shards,
    completed_record,
    iter_tar_shard,
    read_tar_samples,
    shard_tasks,
    write_tar_shard,
)


def _samples(ids):
    return [{"__key__": i, "txt": f"item {i}".encode(), "json": json.dumps({"id": i}).encode()} for i in ids]


class EchoWorker:
    """Writes one text and one json member per item; optionally dies on one shard."""

    def __init__(self, die_on: str | None = None) -> None:
        self.die_on = die_on

    def __call__(self, task: ShardTask, tar_path: Path, progress) -> list[dict]:
        if task.name == self.die_on:
            os._exit(9)  # a worker killed mid-run (SIGKILL, OOM killer)
        write_tar_shard(tar_path, _samples(task.item_ids))
        progress(len(task.item_ids))
        return [{"id": i} for i in task.item_ids]


def test_tar_shard_is_deterministic_and_webdataset_readable(tmp_path: Path) -> None:
    a = write_tar_shard(tmp_path / "a.tar", _samples(["x-1", "x-2"]))
    b = write_tar_shard(tmp_path / "b.tar", _samples(["x-1", "x-2"]))
    assert a.read_bytes() == b.read_bytes()
    assert [s["__key__"] for s in iter_tar_shard(a)] == ["x-1", "x-2"]
    assert read_tar_samples(a, ["x-2"]) == [_samples(["x-2"])[0]]
    import tarfile

    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}

    import webdataset as wds

    loaded = list(wds.WebDataset(str(a), shardshuffle=False))
    assert [s["__key__"] for s in loaded] == ["x-1", "x-2"]
    assert loaded[1]["txt"] == b"item x-2"


def test_shard_tasks_keep_earlier_shards_when_the_list_grows() -> None:
    small = shard_tasks([f"i{k}" for k in range(7)], 3)
    large = shard_tasks([f"i{k}" for k in range(12)], 3)
    assert [t.name for t in small] == ["shard-00000", "shard-00001", "shard-00002"]
    assert small[:2] == large[:2]


def test_a_unit_carries_its_own_shards_inputs_not_the_whole_lists(tmp_path: Path) -> None:
    import pickle

    from facedetail.io.executors import plan_job
    from facedetail.io.shards import _build_one

    def first_unit_bytes(n: int) -> int:
        ids = [f"i{k}" for k in range(n)]
        tasks = shard_tasks(ids, 4, inputs={i: {"path": f"/photos/{i}.jpg", "box": None} for i in ids})
        job = plan_job(EchoWorker, _build_one, tasks, None, [t.name for t in tasks], [4] * len(tasks))
        return len(pickle.dumps(job.units[0]))

    small, large = first_unit_bytes(8), first_unit_bytes(20_000)
    assert small == large  # the same shard costs the same to send, however long the list
    task = shard_tasks(["a", "b", "c"], 2, inputs={"a": 1, "b": 2, "c": 3})[1]
    assert (task.item_ids, task.inputs, task.inputs_by_id()) == (("c",), (3,), {"c": 3})
    with pytest.raises(ValueError, match="0 inputs for 2 items"):
        shard_tasks(["a", "b"], 2)[0].inputs_by_id()


def test_build_reuses_complete_shards_and_rebuilds_the_rest(tmp_path: Path) -> None:
    tasks = shard_tasks([f"i{k}" for k in range(10)], 4)
    first = build_shards(tasks, tmp_path, "key-1", EchoWorker)
    assert (first.built, first.reused) == (3, 0)

    again = build_shards(tasks, tmp_path, "key-1", EchoWorker)
    assert (again.built, again.reused) == (0, 3)
    assert [r.sha256 for r in again.records] == [r.sha256 for r in first.records]

    # a tampered shard, a shard whose record is missing (killed between tar and record), other inputs
    (tmp_path / "shard-00001.tar").write_bytes(b"truncated")
    (tmp_path / "shard-00002.done.json").unlink()
    assert completed_record(tmp_path, tasks[1], "key-1") is None
    assert completed_record(tmp_path, tasks[2], "key-1") is None
    assert completed_record(tmp_path, tasks[0], "key-2") is None
    repaired = build_shards(tasks, tmp_path, "key-1", EchoWorker)
    assert (repaired.built, repaired.reused) == (2, 1)
    assert [r.sha256 for r in repaired.records] == [r.sha256 for r in first.records]


def test_a_record_reads_back_as_the_record_and_as_asdicts_text(tmp_path: Path) -> None:
    """The record file is written without ``dataclasses.asdict``'s copy: same text as before, read back equal."""
    import dataclasses

    import numpy as np

    from facedetail.io.hashing import canonical_json

    rows = ({"id": "a", "landmarks": [[1.5, 2.0], [3.0, 4.25]], "beta": np.array([0.5, 1.0]), "label": None},
            {"id": "b", "landmarks": [[0.0, 1.0]], "beta": np.array([2.0]), "label": "anger"})
    record = ShardRecord("shard-00000", "0" * 64, 123, "key-1", ("a", "b"), rows)
    assert record.to_json() == canonical_json(dataclasses.asdict(record))
    assert json.loads(record.to_json())["rows"][0] == {"id": "a", "landmarks": [[1.5, 2.0], [3.0, 4.25]],
                                                       "beta": [0.5, 1.0], "label": None}

    tasks = shard_tasks(["i0", "i1"], 4)
    built = build_shards(tasks, tmp_path, "key-1", EchoWorker).records[0]
    assert (tmp_path / "shard-00000.done.json").read_text() == built.to_json()
    assert completed_record(tmp_path, tasks[0], "key-1") == built


def test_parallel_build_equals_serial_build(tmp_path: Path) -> None:
    tasks = shard_tasks([f"i{k}" for k in range(9)], 2)
    serial = build_shards(tasks, tmp_path / "serial", "k", EchoWorker, workers=1)
    parallel = build_shards(tasks, tmp_path / "parallel", "k", EchoWorker, workers=2)
    assert [r.sha256 for r in parallel.records] == [r.sha256 for r in serial.records]
    assert [r.rows for r in parallel.records] == [r.rows for r in serial.records]


def test_dead_worker_stops_the_run_and_keeps_finished_shards(tmp_path: Path) -> None:
    tasks = shard_tasks([f"i{k}" for k in range(12)], 2)
    with pytest.raises(InterruptedRunError, match="run again to resume"):
        build_shards(tasks, tmp_path, "k", partial(EchoWorker, die_on="shard-00003"), workers=2)
    finished = [t for t in tasks if completed_record(tmp_path, t, "k") is not None]
    assert "shard-00003" not in {t.name for t in finished}
    resumed = build_shards(tasks, tmp_path, "k", EchoWorker, workers=2)
    assert resumed.reused == len(finished) and resumed.built == len(tasks) - len(finished)


def test_a_rerun_removes_the_temp_files_of_killed_shards(tmp_path: Path) -> None:
    tasks = shard_tasks([f"i{k}" for k in range(4)], 2)
    build_shards(tasks[:1], tmp_path, "k", EchoWorker)
    # what a SIGKILL in the middle of writing shard 1 leaves: a hidden temporary tar, no record
    (tmp_path / ".shard-00001.tar.tmp-abc123").write_bytes(b"half a tar")
    report = build_shards(tasks, tmp_path, "k", EchoWorker)
    assert (report.built, report.reused) == (1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # the probe: see facedetail.io.executors
        PROBE_NAME, "shard-00000.done.json", "shard-00000.tar", "shard-00001.done.json", "shard-00001.tar"]


def _sparse_shard(tmp_path: Path, size: int = 256 << 20) -> Path:
    """A tar of a few KB holding one sparse member of ``size`` bytes (GNU tar's --sparse), WebDataset-named."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse member")
    member = tmp_path / "x-1.bin"
    with open(member, "wb") as fh:
        fh.seek(size - 1)
        fh.write(b"\0")
    shard = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(shard), "-C", str(tmp_path), member.name], check=True)
    member.unlink()
    assert shard.stat().st_size < 64 << 10
    return shard


def test_readers_refuse_a_sparse_member_before_reading_it(tmp_path: Path) -> None:
    from facedetail.errors import SourceFileError

    shard = _sparse_shard(tmp_path)
    with pytest.raises(SourceFileError, match=r"shard member 'x-1.bin' is a sparse file"):
        list(iter_tar_shard(shard))
    with pytest.raises(SourceFileError, match="sparse file"):
        read_tar_samples(shard, ["x-1"])


def test_readers_cap_member_sizes(tmp_path: Path) -> None:
    from facedetail.errors import SourceFileError

    shard = write_tar_shard(tmp_path / "a.tar", [{"__key__": "k", "bin": b"x" * 1000, "json": b"{}"}])
    assert [s["bin"] for s in iter_tar_shard(shard, max_member_bytes=1000)] == [b"x" * 1000]
    with pytest.raises(SourceFileError, match=r"'k.bin' is 1000 bytes, over the 999-byte member cap"):
        list(iter_tar_shard(shard, max_member_bytes=999))
    with pytest.raises(SourceFileError, match="over the 999-byte member cap"):
        read_tar_samples(shard, ["k"], max_member_bytes=999)
    assert read_tar_samples(shard, ["other"], max_member_bytes=10) == [], "members not asked for are not read"
