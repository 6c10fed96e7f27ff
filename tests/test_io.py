"""Tests of facedetail.io: atomic writes, hashing, seeds, manifests and lineage events."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import facedetail
from facedetail.io.atomic import atomic_directory, atomic_write_bytes, atomic_write_text, remove_stale_temps
from facedetail.io.hashing import canonical_json, params_hash, sha256_bytes, sha256_file
from facedetail.io.lineage import (
    LineageRun,
    ParentRef,
    expand_files,
    find_producer,
    git_state,
    iter_events,
)
from facedetail.io.manifest import (
    BASE_SCHEMA,
    MANIFEST_NAME,
    file_row,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from facedetail.io.seeds import derive_seed, item_rng

PACKAGE_ROOT = Path(facedetail.__file__).resolve().parents[1]
BASE_COLUMNS = ["id", "path", "shard", "key", "sha256", "bytes", "seed", "params_hash"]


def _tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fail_replace(*_args, **_kwargs):
    raise OSError("simulated crash in os.replace")


# --------------------------------------------------------------------------- atomic files


def test_atomic_write_bytes_writes_content_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "data.bin"
    payload = bytes(range(256)) * 7

    returned = atomic_write_bytes(target, payload)

    assert returned == target
    assert target.read_bytes() == payload
    assert sorted(os.listdir(target.parent)) == ["data.bin"]


def test_atomic_write_text_writes_utf8(tmp_path):
    target = tmp_path / "note.txt"
    text = "h\u00e9llo \u2713\nline 2\n"

    atomic_write_text(str(target), text)

    assert target.read_bytes() == text.encode("utf-8")
    assert target.read_text(encoding="utf-8") == text


def test_atomic_write_overwrites_existing_file(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old content that is longer than the new one")

    atomic_write_text(target, "new")

    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["data.txt"]


@pytest.mark.parametrize("writer", ["bytes", "text"])
def test_atomic_write_failure_leaves_no_final_file_and_no_temp(tmp_path, monkeypatch, writer):
    target = tmp_path / "out.bin"
    monkeypatch.setattr(os, "replace", _fail_replace)

    with pytest.raises(OSError, match="simulated crash"):
        if writer == "bytes":
            atomic_write_bytes(target, b"payload")
        else:
            atomic_write_text(target, "payload")

    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_keeps_existing_file_unchanged(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    monkeypatch.setattr(os, "replace", _fail_replace)

    with pytest.raises(OSError):
        atomic_write_bytes(target, b"replacement")

    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.bin"]


# --------------------------------------------------------------------------- atomic folders


def test_atomic_directory_success_holds_exactly_what_was_written(tmp_path):
    final = tmp_path / "stage_out"
    with atomic_directory(final) as tmp:
        assert tmp.is_dir()
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".stage_out.tmp-")
        assert list(tmp.iterdir()) == []
        assert not final.exists()
        (tmp / "a.txt").write_text("alpha")
        (tmp / "sub" / "deeper").mkdir(parents=True)
        (tmp / "sub" / "deeper" / "b.bin").write_bytes(b"\x00\x01\x02")

    assert _tree(final) == {"a.txt": b"alpha", "sub/deeper/b.bin": b"\x00\x01\x02"}
    assert not tmp.exists()
    assert sorted(os.listdir(tmp_path)) == ["stage_out"]
    assert final.stat().st_mode & 0o777 == 0o755


def test_atomic_directory_replaces_existing_folder_as_a_whole(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("from the previous run")
    (final / "keep.txt").write_text("old")

    with atomic_directory(final) as tmp:
        (tmp / "keep.txt").write_text("new")

    assert _tree(final) == {"keep.txt": b"new"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_directory_exception_leaves_existing_folder_untouched(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("original")
    before = _tree(final)

    with pytest.raises(RuntimeError, match="stage crashed"), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("partial")
        (tmp / "b.txt").write_text("partial")
        raise RuntimeError("stage crashed")

    assert _tree(final) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_directory_exception_without_existing_folder_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("partial")
        raise KeyboardInterrupt

    assert os.listdir(tmp_path) == []


def test_atomic_directory_failed_swap_restores_existing_folder(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("original")
    real_replace = os.replace
    calls = []

    def replace_failing_second_call(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the call that moves the new folder under the final name
            raise OSError("simulated failure during swap")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_second_call)
    with pytest.raises(OSError), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("new")

    assert _tree(final) == {"a.txt": b"original"}


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from facedetail.io.atomic import atomic_directory

    with atomic_directory(Path(sys.argv[1])) as tmp:
        (tmp / "half.txt").write_text("half-written")
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("preexisting", [False, True], ids=["fresh", "over-existing"])
def test_atomic_directory_survives_sigkill_and_stale_temp_is_removed(tmp_path, preexisting):
    final = tmp_path / "out"
    if preexisting:
        final.mkdir()
        (final / "a.txt").write_text("complete earlier run")
    before = _tree(final) if preexisting else None

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(final)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr

    # the final name shows either nothing or the previous complete folder, never the partial one
    if preexisting:
        assert _tree(final) == before
    else:
        assert not final.exists()
    leftovers = sorted(p for p in tmp_path.iterdir() if p.name != "out")
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith(".out.tmp-")
    assert _tree(leftovers[0]) == {"half.txt": b"half-written"}

    assert remove_stale_temps(final) == leftovers
    assert sorted(os.listdir(tmp_path)) == (["out"] if preexisting else [])

    with atomic_directory(final) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert _tree(final) == {"done.txt": b"ok"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_remove_stale_temps_only_touches_siblings_of_that_name(tmp_path):
    final = tmp_path / "out"
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / ".out.tmp-abc" / "x").write_text("x")
    (tmp_path / ".out.old-def").mkdir()
    (tmp_path / ".out.tmp-file").write_text("temp file of atomic_write_bytes")
    for keep in (".outer.tmp-1", "out.tmp-visible", ".other.tmp-2", "out"):
        (tmp_path / keep).mkdir()

    removed = remove_stale_temps(final)

    assert sorted(p.name for p in removed) == [".out.old-def", ".out.tmp-abc", ".out.tmp-file"]
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-2", ".outer.tmp-1", "out", "out.tmp-visible"]
    assert remove_stale_temps(tmp_path / "missing_parent" / "x") == []


# --------------------------------------------------------------------------- hashing


def test_sha256_file_matches_hashlib_on_multi_mib_file(tmp_path):
    data = np.random.default_rng(7).integers(0, 256, size=(3 << 20) + 12345, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)

    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(str(path)) == expected
    assert sha256_bytes(data) == expected


def test_sha256_file_of_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_canonical_json_is_key_order_independent_and_compact():
    a = {"b": [2, {"d": 4, "c": 3}], "a": 1, "u": "\u00e9"}
    b = {"u": "\u00e9", "a": 1, "b": [2, {"c": 3, "d": 4}]}

    assert canonical_json(a) == canonical_json(b) == '{"a":1,"b":[2,{"c":3,"d":4}],"u":"\u00e9"}'
    assert canonical_json({"b": [1, 2]}) != canonical_json({"b": [2, 1]})


def test_params_hash_stable_under_reordering_and_sensitive_to_values():
    p1 = {"lr": 0.001, "size": [256, 256], "nested": {"x": 1, "y": "two"}}
    p2 = {"nested": {"y": "two", "x": 1}, "size": [256, 256], "lr": 0.001}

    h = params_hash(p1)
    assert h == params_hash(p2)
    assert len(h) == 16
    assert int(h, 16) >= 0  # hex digits only
    assert h == hashlib.sha256(canonical_json(p1).encode("utf-8")).hexdigest()[:16]
    assert params_hash({**p1, "lr": 0.002}) != h
    assert params_hash({**p1, "nested": {"x": 2, "y": "two"}}) != h
    assert params_hash({**p1, "extra": None}) != h


# --------------------------------------------------------------------------- seeds


def test_derive_seed_regression_value_matches_independent_computation():
    digest = hashlib.sha256(b"0\x1frender_expressions\x1f000001").digest()
    expected = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)

    assert derive_seed(0, "render_expressions", "000001") == expected
    assert expected == 6063178104420248220  # frozen: changing it would silently change every dataset


def test_derive_seed_is_deterministic_in_range_and_distinct():
    seeds = {derive_seed(42, "stage", f"{i:06d}") for i in range(500)}
    assert len(seeds) == 500
    assert all(0 <= s < 2**63 for s in seeds)

    base = derive_seed(42, "stage", "000001")
    assert derive_seed(42, "stage", "000001") == base
    assert derive_seed(43, "stage", "000001") != base
    assert derive_seed(42, "other_stage", "000001") != base
    assert derive_seed(42, "stage", "000002") != base
    # the separator keeps the fields apart: shifting text between stage and item id changes the seed
    assert derive_seed(42, "stage0", "00001") != base


def test_item_rng_reproducible_and_leaves_global_state_alone():
    state_before = np.random.get_state()

    draws1 = item_rng(5, "augment", "000010").random(8)
    draws2 = item_rng(5, "augment", "000010").random(8)
    other = item_rng(5, "augment", "000011").random(8)
    ints = item_rng(5, "augment", "000010").integers(0, 1000, size=4)

    state_after = np.random.get_state()
    assert state_before[0] == state_after[0]
    np.testing.assert_array_equal(state_before[1], state_after[1])
    assert state_before[2:] == state_after[2:]

    np.testing.assert_array_equal(draws1, draws2)
    assert not np.array_equal(draws1, other)
    reference = np.random.default_rng(derive_seed(5, "augment", "000010"))
    np.testing.assert_array_equal(draws1, reference.random(8))
    np.testing.assert_array_equal(
        ints, np.random.default_rng(derive_seed(5, "augment", "000010")).integers(0, 1000, size=4)
    )


# --------------------------------------------------------------------------- manifests


def _rows() -> list[dict]:
    return [
        {"id": "000003", "path": "img/000003.png", "shard": None, "key": None, "sha256": "c" * 64,
         "bytes": 30, "seed": 2**63 - 1, "params_hash": "p" * 16, "split": "test", "score": 0.5},
        {"id": "000001", "path": None, "shard": "shard-000.tar", "key": "000001", "sha256": "a" * 64,
         "bytes": 10, "seed": None, "params_hash": "p" * 16, "split": "train"},
        {"id": "000002", "path": "img/000002.png", "shard": None, "key": None, "sha256": "b" * 64,
         "bytes": 20, "seed": 7, "params_hash": "p" * 16, "split": "val", "score": 1.25},
    ]


def test_write_read_manifest_roundtrip_sorted_with_extra_columns(tmp_path):
    path = write_manifest(tmp_path / MANIFEST_NAME, _rows())
    assert path == tmp_path / MANIFEST_NAME
    assert MANIFEST_NAME == "manifest.parquet"

    table = read_manifest(path)
    assert table.column_names == [*BASE_COLUMNS, "score", "split"]
    assert table.schema.field("bytes").type == pa.int64()
    assert table.schema.field("seed").type == pa.int64()
    assert table.schema.field("sha256").type == pa.string()
    assert table.num_rows == 3

    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["000001", "000002", "000003"]
    assert [r["split"] for r in rows] == ["train", "val", "test"]
    assert [r["score"] for r in rows] == [None, 1.25, 0.5]
    assert rows[0]["path"] is None and rows[0]["shard"] == "shard-000.tar" and rows[0]["key"] == "000001"
    assert [r["seed"] for r in rows] == [None, 7, 2**63 - 1]
    assert [r["bytes"] for r in rows] == [10, 20, 30]
    assert [r["sha256"] for r in rows] == ["a" * 64, "b" * 64, "c" * 64]


def test_write_manifest_is_byte_identical_regardless_of_row_and_key_order(tmp_path):
    rows = _rows()
    shuffled = [dict(reversed(list(r.items()))) for r in (rows[1], rows[2], rows[0])]

    a = write_manifest(tmp_path / "a.parquet", rows).read_bytes()
    b = write_manifest(tmp_path / "b.parquet", shuffled).read_bytes()

    assert a == b
    changed = [{**r, "bytes": r["bytes"] + 1} for r in rows]
    assert write_manifest(tmp_path / "c.parquet", changed).read_bytes() != a


def test_write_manifest_rejects_empty_and_duplicate_ids(tmp_path):
    target = tmp_path / MANIFEST_NAME
    with pytest.raises(ValueError, match="at least one row"):
        write_manifest(target, [])
    rows = _rows()
    with pytest.raises(ValueError, match="unique"):
        write_manifest(target, [*rows, {**rows[0], "sha256": "d" * 64}])
    assert os.listdir(tmp_path) == []


def test_file_row_hashes_a_real_file(tmp_path):
    (tmp_path / "img").mkdir()
    content = b"\x89PNG fake image bytes" * 100
    (tmp_path / "img" / "000001.png").write_bytes(content)

    row = file_row(tmp_path, "img/000001.png", params_hash="f" * 16, seed=11, split="train")
    assert row == {
        "id": "img/000001.png",
        "path": "img/000001.png",
        "shard": None,
        "key": None,
        "sha256": hashlib.sha256(content).hexdigest(),
        "bytes": len(content),
        "seed": 11,
        "params_hash": "f" * 16,
        "split": "train",
    }
    assert file_row(tmp_path, "img/000001.png", item_id="000001", params_hash="f" * 16)["id"] == "000001"


def test_verify_manifest_detects_changed_and_missing_files(tmp_path):
    for name, data in [("a.bin", b"aaa"), ("b.bin", b"bbb"), ("c.bin", b"ccc")]:
        (tmp_path / name).write_bytes(data)
    rows = [file_row(tmp_path, n, item_id=n[0], params_hash="0" * 16) for n in ("a.bin", "b.bin", "c.bin")]
    from facedetail.io.shards import write_tar_shard

    write_tar_shard(tmp_path / "s.tar", [{"__key__": "d", "txt": b"ddd"}, {"__key__": "e", "txt": b"eee"}])
    for item in ("d", "e"):  # items inside a shard: checked by member
        rows.append({"id": item, "shard": "s.tar", "key": f"{item}.txt", "sha256": sha256_bytes(item.encode() * 3),
                     "bytes": 3, "params_hash": "0" * 16})
    write_manifest(tmp_path / MANIFEST_NAME, rows)

    assert verify_manifest(tmp_path) == []
    write_tar_shard(tmp_path / "s.tar", [{"__key__": "d", "txt": b"ddd"}, {"__key__": "e", "txt": b"eeE"}])
    assert verify_manifest(tmp_path) == ["e"]
    write_tar_shard(tmp_path / "s.tar", [{"__key__": "d", "txt": b"ddd"}, {"__key__": "e", "txt": b"eee"}])

    (tmp_path / "b.bin").write_bytes(b"bbB")  # same size, different content
    assert verify_manifest(tmp_path) == ["b"]

    (tmp_path / "c.bin").unlink()
    assert verify_manifest(str(tmp_path)) == ["b", "c"]
    assert verify_manifest(tmp_path, read_manifest(tmp_path / MANIFEST_NAME)) == ["b", "c"]


def test_manifest_keeps_the_base_columns_first_and_refuses_rows_without_a_hash(tmp_path):
    """Readers outside the project rely on the base columns' order and on id/sha256/bytes never being null."""
    rows = [{"score": 1.0, "bytes": 3, "params_hash": "k", "sha256": "ab", "path": "x", "id": "x"}]
    table = read_manifest(write_manifest(tmp_path / "m.parquet", rows))
    assert table.column_names[:len(BASE_COLUMNS)] == BASE_COLUMNS
    assert [table.schema.field(n).nullable for n in ("id", "sha256", "bytes", "params_hash")] == [False] * 4
    assert table.schema.field("seed").type == BASE_SCHEMA.field("seed").type
    with pytest.raises(Exception, match="non-nullable"):
        write_manifest(tmp_path / "bad.parquet", [{**rows[0], "sha256": None}])
    assert not (tmp_path / "bad.parquet").exists()


# --------------------------------------------------------------------------- lineage


def _git(root: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.email=test@example.com", "-c", "user.name=Test", "-c", "commit.gpgsign=false",
           "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository with one commit; returns (root, HEAD commit)."""
    monkeypatch.delenv("OPENLINEAGE_DISABLED", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "README").write_text("test repo\n")
    _git(root, "add", "README")
    _git(root, "commit", "-q", "-m", "init")
    return root, _git(root, "rev-parse", "HEAD")


def _make_inputs(root: Path) -> tuple[Path, dict[str, str]]:
    folder = root / "data" / "in"
    (folder / "sub").mkdir(parents=True)
    files = {"data/in/x.txt": b"x-content", "data/in/sub/y.txt": b"y-content", "data/in/a.txt": b"a"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return folder, {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lineage_start_complete_appends_two_events(repo):
    root, head = repo
    folder, input_hashes = _make_inputs(root)
    out = root / "data" / "out" / "result.bin"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"result bytes")
    out_sha = hashlib.sha256(b"result bytes").hexdigest()
    events_file = root / "lineage" / "events.jsonl"
    params = {"size": 256, "mode": "fast"}

    run = LineageRun(
        stage="render", params=params, inputs=[folder], events_file=events_file, root=root, seed=3
    )
    assert run.start() is run
    record = run.complete({"data/out/result.bin": out})

    events = _read_lines(events_file)
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert {e["run"]["runId"] for e in events} == {run.run_id}
    assert [(e["job"]["namespace"], e["job"]["name"]) for e in events] == [("facedetail", "render")] * 2

    start, complete = events
    assert start["outputs"] == []
    assert [(o["name"], o["facets"]["version"]["datasetVersion"]) for o in complete["outputs"]] == [
        ("data/out/result.bin", out_sha)
    ]
    for event in events:
        got = {i["name"]: i["facets"]["version"]["datasetVersion"] for i in event["inputs"]}
        assert got == input_hashes

    facets = complete["run"]["facets"]
    assert facets["facedetail_parameters"]["parametersHash"] == params_hash(params)
    assert facets["facedetail_parameters"]["parameters"] == params
    assert facets["facedetail_parameters"]["seed"] == 3
    assert facets["facedetail_environment"]["gitCommit"] == head
    assert facets["facedetail_environment"]["gitDirty"] is False
    assert "parent" not in facets
    assert "errorMessage" not in facets
    assert complete["job"]["facets"]["sourceCodeLocation"]["version"] == head

    assert record["stage"] == "render"
    assert record["run_id"] == run.run_id
    assert record["params_hash"] == params_hash(params)
    assert record["params"] == params
    assert record["seed"] == 3
    assert record["inputs"] == dict(sorted(input_hashes.items()))
    assert list(record["inputs"]) == sorted(input_hashes)
    assert record["outputs"] == {"data/out/result.bin": out_sha}
    assert record["git_commit"] == head
    assert record["parent"] is None
    assert record["events_file"] == "lineage/events.jsonl"
    json.dumps(record)  # plain, serializable data


def test_lineage_events_are_appended_across_runs(repo):
    root, _ = repo
    events_file = root / "events.jsonl"
    (root / "o.bin").write_bytes(b"o")
    runs = []
    for _ in range(2):
        run = LineageRun(stage="s", params={}, inputs=[], events_file=events_file, root=root).start()
        run.complete({"o.bin": root / "o.bin"})
        runs.append(run.run_id)

    assert runs[0] != runs[1]
    events = _read_lines(events_file)
    assert [(e["eventType"], e["run"]["runId"]) for e in events] == [
        ("START", runs[0]), ("COMPLETE", runs[0]), ("START", runs[1]), ("COMPLETE", runs[1])
    ]


def test_lineage_fail_emits_error_message(repo):
    root, _ = repo
    events_file = root / "events.jsonl"
    run = LineageRun(stage="fit", params={"k": 1}, inputs=[], events_file=events_file, root=root).start()

    run.fail(ValueError("bad input mesh"))

    events = _read_lines(events_file)
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert events[1]["run"]["runId"] == run.run_id
    error = events[1]["run"]["facets"]["errorMessage"]
    assert "bad input mesh" in error["message"]
    assert error["message"] == "ValueError: bad input mesh"
    assert error["programmingLanguage"] == "python"
    assert events[1]["outputs"] == []


def test_lineage_parent_facet(repo):
    root, _ = repo
    events_file = root / "events.jsonl"
    parent = ParentRef(
        namespace="prefect", name="build_dataset", run_id="123e4567-e89b-12d3-a456-426614174000"
    )
    (root / "o.bin").write_bytes(b"o")

    run = LineageRun(stage="s", params={}, inputs=[], events_file=events_file, root=root, parent=parent)
    record = run.start().complete({"o.bin": root / "o.bin"})

    for event in _read_lines(events_file):
        facet = event["run"]["facets"]["parent"]
        assert facet["run"]["runId"] == parent.run_id
        assert facet["job"]["namespace"] == "prefect"
        assert facet["job"]["name"] == "build_dataset"
    assert record["parent"] == {"namespace": "prefect", "name": "build_dataset", "run_id": parent.run_id}


def test_find_producer_returns_newest_complete_event_for_hash(repo):
    root, _ = repo
    events_file = root / "events.jsonl"
    (root / "a.bin").write_bytes(b"aaa")
    (root / "b.bin").write_bytes(b"bbb")
    sha_a = hashlib.sha256(b"aaa").hexdigest()
    sha_b = hashlib.sha256(b"bbb").hexdigest()

    first = LineageRun(stage="one", params={}, inputs=[], events_file=events_file, root=root).start()
    first.complete({"a.bin": root / "a.bin"})
    second = LineageRun(stage="two", params={}, inputs=[root / "a.bin"], events_file=events_file, root=root)
    second.start().complete({"a.bin": root / "a.bin", "b.bin": root / "b.bin"})
    failed = LineageRun(stage="three", params={}, inputs=[], events_file=events_file, root=root).start()
    failed.fail(RuntimeError("x"))

    found_b = find_producer(events_file, sha_b)
    assert found_b is not None
    assert found_b["eventType"] == "COMPLETE"
    assert found_b["run"]["runId"] == second.run_id
    assert found_b["job"]["name"] == "two"

    found_a = find_producer(events_file, sha_a)
    assert found_a is not None and found_a["run"]["runId"] == second.run_id  # newest of two producers

    assert find_producer(events_file, "0" * 64) is None
    assert find_producer(root / "missing.jsonl", sha_a) is None


def test_iter_events_skips_corrupt_and_blank_lines(tmp_path):
    events_file = tmp_path / "events.jsonl"
    sha = "ab" * 32
    good = {"eventType": "COMPLETE", "run": {"runId": "r1"},
            "outputs": [{"name": "x", "facets": {"version": {"datasetVersion": sha}}}]}
    events_file.write_text(
        json.dumps({"eventType": "START", "run": {"runId": "r1"}}) + "\n"
        + '{"eventType": "COMPLETE", "run": {"runI\n'  # truncated by a crash mid-write
        + "\n"
        + json.dumps(good) + "\n"
    )

    events = list(iter_events(events_file))
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert events[1] == good
    assert find_producer(events_file, sha) == good
    assert list(iter_events(tmp_path / "absent.jsonl")) == []


def test_git_state_outside_repo_and_dirty_tree(repo, tmp_path):
    root, head = repo
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    assert git_state(not_a_repo) == (None, None)

    assert git_state(root) == (head, False)
    (root / "untracked.txt").write_text("ignored for dirtiness")
    assert git_state(root) == (head, False)
    (root / "README").write_text("modified\n")
    assert git_state(root) == (head, True)


def test_expand_files_recurses_folders_in_sorted_order(tmp_path):
    folder, _ = _make_inputs(tmp_path)
    single = tmp_path / "single.txt"
    single.write_text("s")

    files = expand_files([single, folder])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "single.txt", "data/in/a.txt", "data/in/sub/y.txt", "data/in/x.txt"
    ]


def test_remove_stale_temps_restores_previous_folder_after_kill_mid_swap(tmp_path):
    final = tmp_path / "out"
    stranded = tmp_path / ".out.old-abc" / "out"
    stranded.mkdir(parents=True)
    (stranded / "a.txt").write_text("previous complete run")
    removed = remove_stale_temps(final)
    assert (final / "a.txt").read_text() == "previous complete run"
    assert removed == [tmp_path / ".out.old-abc"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_remove_stale_temps_escapes_glob_characters(tmp_path):
    other = tmp_path / ".a1.tmp-zzz"
    other.mkdir()
    mine = tmp_path / ".a[1].tmp-zzz"
    mine.mkdir()
    assert remove_stale_temps(tmp_path / "a[1]") == [mine]
    assert other.exists()


def test_params_hash_treats_numpy_scalars_as_numbers():
    assert params_hash({"n": np.int64(5)}) == params_hash({"n": 5})
    assert params_hash({"n": np.int64(5)}) != params_hash({"n": "5"})


_HEAP_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from facedetail.io.executors import steady_heap
    steady = steady_heap()
    keep, before = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(300):  # buffers of a render's sizes (0.3-2.1 MB), freed in another order than taken
        a = np.ones((1 + i % 7) * 300_000 // 8)
        b = np.ones(2_000_000 // 8)
        keep.append(np.ones(100))
        del a, b
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 300
    print(json.dumps({"steady": steady, "faults": faults}))
""")


def _heap_probe(**env: str) -> dict:
    theirs = ("MALLOC_", "GLIBC_TUNABLES", "FACEDETAIL_STEADY_HEAP")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(theirs)}
    done = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env={**clean, **env}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_worker_process_takes_its_buffers_from_a_steady_heap() -> None:
    """With glibc's dynamic thresholds a fresh process maps and faults in every large buffer again; a worker
    process (``steady_heap``, in every engine's set-up) re-uses its heap. A user's own ``MALLOC_*`` setting,
    and ``FACEDETAIL_STEADY_HEAP=0``, are left alone."""
    steady, glibc = _heap_probe(), _heap_probe(FACEDETAIL_STEADY_HEAP="0")
    assert steady["steady"] is True and glibc["steady"] is False
    assert steady["faults"] * 4 < glibc["faults"], (steady, glibc)
    assert _heap_probe(MALLOC_TRIM_THRESHOLD_="65536")["steady"] is False
