"""The output transaction of one stage run: the single place that owns the run skeleton.

:func:`stage_output` does, in this order: lineage START (input hashes), an empty temporary
output folder, then — once the stage's own code has filled it — the output hashes, the
content lineage record (``lineage.json``, in the output), the swap of the folder into place,
the metrics file, the deferred side files (plots), the per-run record, the removal of the
stage's work folder, and COMPLETE. Any exception before the swap emits FAIL and leaves the previous
output as it was; one after it (writing the metrics, plots or run record) emits FAIL with the new
output already in place.

Two lineage records, on purpose:

* ``<out>/lineage.json`` holds only what the content depends on (stage, parameters, seed, input
  and output hashes), so identical reruns give identical bytes and DVC sees an unchanged out;
* ``<runs_dir>/<stage>.json`` holds the run itself (run id, times, host, git commit, packages),
  outside every DVC out, beside the OpenLineage events file.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from facedetail.io.atomic import atomic_directory
from facedetail.io.files import link_or_copy
from facedetail.io.hashing import listing_hash, sha256_file
from facedetail.io.images import encode_png
from facedetail.io.jsonfiles import write_json
from facedetail.io.lineage import LineageRun, ParentRef, relative_name
from facedetail.io.manifest import MANIFEST_NAME, write_manifest
from facedetail.io.shards import SHARDS_DIR, ShardRecord

LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class RunLayout:
    """Where one stage run reads and writes, all under the repository ``root``."""

    root: Path
    out_dir: Path
    """The stage's output folder (a DVC out)."""
    metrics: Path | None = None
    """The stage's metrics file (a DVC metric, not cached)."""
    events_file: Path = Path("data/lineage/events.jsonl")
    """OpenLineage events of every run, appended (relative to ``root``)."""
    runs_dir: Path = Path("data/lineage/runs")
    """Per-run records, one file per stage, replaced by each run (relative to ``root``)."""
    work_dir: Path | None = None
    """Resumable work of the stage (finished shards, items); removed once the output is in place."""

    def at(self, path: Path) -> Path:
        """``path`` under the root (absolute paths stay as they are)."""
        return self.root / path


@dataclass
class StageOutput:
    """The open output folder of a stage run: what the stage's code writes into, and declares."""

    dir: Path
    """Temporary folder that becomes the output; write every output file here."""
    root: Path
    """The repository root."""
    input_hashes: Mapping[str, str] = field(default_factory=dict)
    """sha256 of every input file of the run, by dataset name (hashed once, at lineage START)."""
    known: dict[str, str] = field(default_factory=dict)
    """Hashes already computed (path relative to ``dir`` -> sha256), so large files are not read twice."""
    metrics: dict[str, Any] | None = None
    """Deterministic facts for the metrics file (no timings: equal outputs give equal metrics)."""
    deferred: list[Callable[[], None]] = field(default_factory=list)
    """Writes outside the output (plots), run after the output is in place."""
    outputs: dict[str, str] = field(default_factory=dict)
    """After the transaction: repo-relative path -> sha256 of every output file."""
    record: dict[str, Any] = field(default_factory=dict)
    """After the transaction: the per-run lineage record."""

    def input_hash(self, path: Path) -> str:
        """The content hash of an input file, or the :func:`listing_hash` of an input folder or of a
        folder inside one (an empty folder has the hash of the empty listing)."""
        name = relative_name(path, self.root)
        if name in self.input_hashes:
            return self.input_hashes[name]
        inside = {k[len(name) + 1:]: v for k, v in self.input_hashes.items() if k.startswith(name + "/")}
        if not inside and not path.is_dir():
            raise KeyError(f"{name} is not an input of this run")
        return listing_hash(inside)

    def write_manifest(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``manifest.parquet``; the loose files it lists need not be hashed again."""
        write_manifest(self.dir / MANIFEST_NAME, rows)
        self.known.update(manifest_hashes(rows))

    def add_shards(self, records: Sequence[ShardRecord], work_dir: Path,
                   subdir: str = SHARDS_DIR) -> list[dict[str, Any]]:
        """Hard-link finished shards from ``work_dir`` into ``subdir`` of the output (their hashes are
        known); returns every shard's manifest rows with ``shard`` set to its path in the output."""
        self.known.update(link_shards(records, work_dir, self.dir, subdir))
        return [{**row, "shard": f"{subdir}/{record.filename}"} for record in records for row in record.rows]

    def write_png(self, name: str, image: NDArray[np.integer]) -> None:
        """An image of the output (a contact sheet, a preview) as PNG (zlib level 6)."""
        (self.dir / name).write_bytes(encode_png(image, 6))


def manifest_hashes(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """{path: sha256} of the manifest rows of loose files: hashes :func:`hash_outputs` need not recompute."""
    return {r["path"]: r["sha256"] for r in rows if r.get("path") and r.get("sha256")}


def link_shards(records: Sequence[ShardRecord], work_dir: Path, out_dir: Path,
                subdir: str = SHARDS_DIR) -> dict[str, str]:
    """Link finished shards from ``work_dir`` into ``out_dir/subdir``; {relative path: sha256}."""
    (out_dir / subdir).mkdir(parents=True, exist_ok=True)
    known = {}
    for record in records:
        rel = f"{subdir}/{record.filename}"
        link_or_copy(work_dir / record.filename, out_dir / rel)
        known[rel] = record.sha256
    return known


def hash_outputs(tmp_dir: Path, final_dir: Path, root: Path, known: Mapping[str, str] | None = None) -> dict[str, str]:
    """{repo-relative final path: sha256} of every file assembled in ``tmp_dir``.

    ``known`` maps paths relative to ``tmp_dir`` to hashes already computed (large shards).
    """
    rel = final_dir.resolve().relative_to(root.resolve())
    known = known or {}
    out = {}
    for f in sorted(tmp_dir.rglob("*")):
        if f.is_file():
            inner = f.relative_to(tmp_dir).as_posix()
            out[(rel / inner).as_posix()] = known[inner] if inner in known else sha256_file(f)
    return out


@contextlib.contextmanager
def stage_output(stage: str, params: Mapping[str, Any], inputs: Sequence[Path], layout: RunLayout,
                 seed: int | None = None, parent: ParentRef | None = None,
                 content_params: Mapping[str, Any] | None = None) -> Iterator[StageOutput]:
    """Run the body of a stage inside its output transaction (see the module docstring).

    ``params`` go into the run record; ``content_params`` (default: the same), the ones that shape
    the outputs, into ``lineage.json``.
    """
    root = layout.root
    lineage = LineageRun(stage=stage, params=params, inputs=list(inputs), events_file=layout.at(layout.events_file),
                         root=root, seed=seed, parent=parent, content_params=content_params).start()
    out_dir = layout.at(layout.out_dir)
    try:
        with atomic_directory(out_dir) as tmp:
            out = StageOutput(tmp, root, lineage.input_hashes)
            yield out
            out.outputs = hash_outputs(tmp, out_dir, root, out.known)
            write_json(tmp / LINEAGE_FILE, lineage.content_record(out.outputs))
        if out.metrics is not None and layout.metrics is not None:
            write_json(layout.at(layout.metrics), out.metrics)
        for write in out.deferred:
            write()
        out.record = lineage.record(out.outputs)
        write_json(layout.at(layout.runs_dir) / f"{stage}.json", out.record)
        if layout.work_dir is not None:
            shutil.rmtree(layout.at(layout.work_dir), ignore_errors=True)
        lineage.complete_hashed(out.outputs)
    except BaseException as err:
        lineage.fail(err)
        raise
