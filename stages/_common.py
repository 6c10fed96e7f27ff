"""What every stage shares: params loading, the stage spec, lineage wiring and the CLI wrapper."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from facedetail.config import Config
from facedetail.errors import FacedetailError, InterruptedRunError
from facedetail.io.atomic import atomic_write_text
from facedetail.io.hashing import sha256_file
from facedetail.io.lineage import LineageRun, ParentRef
from facedetail.io.shards import ShardRecord

PARAMS_FILE = "params.yaml"
EVENTS_FILE = Path("data/lineage/events.jsonl")


class StageParams(Config):
    """Base of every stage's params: unknown keys are errors, field docstrings are descriptions."""


P = TypeVar("P", bound=StageParams)


@dataclass(frozen=True)
class StageResult:
    """What a stage run produced."""

    stage: str
    out_dir: Path
    outputs: dict[str, str]
    """Output dataset name (repo-relative path) -> sha256."""
    summary: dict[str, Any]
    """Small, flat facts about the outputs (counts, sizes) for reports and Prefect artifacts."""
    lineage: dict[str, Any]


@dataclass(frozen=True)
class Stage(Generic[P]):
    """A stage: its name, params model and run function ``run(params, root, parent=None)``."""

    name: str
    params_model: type[P]
    run: Callable[..., StageResult]

    def load_params(self, root: Path, params_file: str = PARAMS_FILE) -> P:
        """This stage's section of ``root/params.yaml``, validated."""
        return self.params_model.model_validate(load_section(root / params_file, self.name))


def load_section(params_path: Path, section: str) -> dict[str, Any]:
    """One section of a params file; a missing section means all defaults."""
    data = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    return dict(data.get(section) or {})


def lineage_run(stage: str, params: BaseModel, inputs: list[Path], root: Path, seed: int | None = None,
                parent: ParentRef | None = None) -> LineageRun:
    """Start the lineage record (START event) of one stage run."""
    return LineageRun(stage=stage, params=params.model_dump(mode="json"), inputs=inputs,
                      events_file=root / EVENTS_FILE, root=root, seed=seed, parent=parent).start()


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


def worker_count(requested: int) -> int:
    """Processes to use: ``requested``, or one per CPU core this process may run on when 0."""
    return requested or len(os.sched_getaffinity(0))


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a finished shard into an output (no second copy of gigabytes); copy across devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def manifest_hashes(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """{path: sha256} of the manifest rows of loose files: hashes :func:`hash_outputs` need not recompute."""
    return {r["path"]: r["sha256"] for r in rows if r.get("path") and r.get("sha256")}


def link_shards(records: Sequence[ShardRecord], work_dir: Path, out_dir: Path,
                subdir: str = "shards") -> dict[str, str]:
    """Link finished shards from ``work_dir`` into ``out_dir/subdir``; {relative path: sha256} for hash_outputs."""
    (out_dir / subdir).mkdir(exist_ok=True)
    known = {}
    for record in records:
        rel = f"{subdir}/{record.filename}"
        link_or_copy(work_dir / record.filename, out_dir / rel)
        known[rel] = record.sha256
    return known


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Deterministic, human-readable JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object written by :func:`write_json`."""
    return json.loads(path.read_text(encoding="utf-8"))


def one_line(err: ValidationError) -> str:
    """A pydantic validation error as one line: ``key: problem; key: problem``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in err.errors())


def main(stage: Stage[Any], argv: list[str] | None = None) -> int:
    """CLI entry point used by ``python -m stages.<name>``: one-line errors, exit code 2."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage.name}", description=f"Run stage {stage.name}.")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: cwd)")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file relative to the root")
    args = parser.parse_args(argv)
    try:
        params = stage.load_params(args.root, args.params)
        result = stage.run(params, args.root)
    except ValidationError as err:
        print(f"error: {stage.name}: invalid params in {args.params}: {one_line(err)}", file=sys.stderr)
        return 2
    except (FacedetailError, FileNotFoundError) as err:
        print(f"error: {stage.name}: {err}", file=sys.stderr)
        return 2
    except InterruptedRunError as err:
        print(f"error: {stage.name}: {err}", file=sys.stderr)
        return 1
    shown = result.out_dir.resolve().relative_to(args.root.resolve())
    print(f"{stage.name}: wrote {shown} ({json.dumps(result.summary, sort_keys=True)})")
    return 0
