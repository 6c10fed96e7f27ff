"""A short, readable account of what a pipeline run made: one block per stage, read in ten seconds.

Each block says what the stage wrote (items in its manifest, quarantined inputs, files and bytes
in its output folder), two or three headline metrics, and which files to open to judge it.
The full metrics stay in ``metrics/<stage>.json`` (``dvc metrics show metrics/<stage>.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from facedetail.io.jsonfiles import read_json
from facedetail.io.manifest import MANIFEST_NAME
from facedetail.io.tables import QUARANTINE_NAME


@dataclass(frozen=True)
class StageView:
    """What the summary shows of one stage."""

    name: str
    out_dir: Path
    metrics: Path
    headline: Sequence[str]
    """Dotted keys into the metrics file."""
    look_at: Sequence[str]
    """Files of the output folder a person opens to judge it."""
    items: str | None = None
    """Dotted metric key that counts the stage's items, where the manifest has one row per file."""


def metric(data: Mapping[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None when a key is missing."""
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _count(n: Any, noun: str) -> str:
    return f"{_number(n)} {noun}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _rows(path: Path) -> int | None:
    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else None


def stage_block(view: StageView, root: Path) -> list[str]:
    """The lines of one stage: made / headline / look at, or that it has not run."""
    out = root / view.out_dir
    if not out.is_dir():
        return [f"{view.name}: not built yet (dvc repro {view.name})"]
    files = [f for f in out.rglob("*") if f.is_file()]
    made = f"{len(files)} files, {_size(sum(f.stat().st_size for f in files))}"
    metrics = read_json(root / view.metrics) if (root / view.metrics).is_file() else {}
    items = metric(metrics, view.items) if view.items else _rows(out / MANIFEST_NAME)
    if items is not None:
        made = f"{_count(items, 'item')}; " + made
    quarantined = _rows(out / QUARANTINE_NAME)
    if quarantined:
        made += f"; {_count(quarantined, 'input')} quarantined (see {view.out_dir.as_posix()}/{QUARANTINE_NAME})"
    lines = [f"{view.name}: {made}"]
    shown = [f"{key} {_number(metric(metrics, key))}" for key in view.headline if metric(metrics, key) is not None]
    if shown:
        lines.append("    " + " · ".join(shown))
    looks = [f"{view.out_dir.as_posix()}/{name}" for name in view.look_at if (out / name).is_file()]
    if looks:
        lines.append("    look at " + ", ".join(looks))
    return lines


def summary_text(views: Sequence[StageView], root: Path) -> str:
    """The whole summary, stages in pipeline order."""
    lines = [line for view in views for line in stage_block(view, root)]
    lines.append("full metrics: dvc metrics show metrics/<stage>.json; lineage of a file: facedetail lineage <file>")
    return "\n".join(lines) + "\n"
