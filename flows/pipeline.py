"""Prefect flow that runs the stages of ``dvc.yaml`` in DAG order, as tasks.

Each task calls the very ``run`` function that ``python -m stages.<name>`` (the DVC command)
calls, with the same ``params.yaml`` section, so both runners produce byte-identical outputs.
Runs against ``PREFECT_API_URL`` when set, otherwise against Prefect's ephemeral server.

    python -m flows.pipeline                 # every stage
    python -m flows.pipeline --stage face_model
"""

from __future__ import annotations

import argparse
import graphlib
import importlib
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from facedetail.errors import FacedetailError
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import MANIFEST_NAME, read_manifest
from stages._common import Stage

_CMD = re.compile(r"python -m (stages\.\w+)")


def stage_order(dvc_yaml: Path) -> list[tuple[str, str]]:
    """(stage name, module) pairs of ``dvc.yaml`` in dependency order (file order among equals)."""
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    outs = {name: [_path(o) for o in s.get("outs", [])] for name, s in spec.items()}
    graph: dict[str, list[str]] = {}
    for name, s in spec.items():
        deps = [_path(d) for d in s.get("deps", [])]
        graph[name] = [
            other for other, their_outs in outs.items() if other != name
            and any(d == o or d.startswith(o.rstrip("/") + "/") for d in deps for o in their_outs)
        ]
    order = list(graphlib.TopologicalSorter(graph).static_order())
    modules = []
    for name in order:
        match = _CMD.search(spec[name]["cmd"])
        if match is None:
            raise ValueError(f"dvc.yaml stage {name!r}: cmd must be `python -m stages.<module>`")
        modules.append((name, match.group(1)))
    return modules


def _path(entry: str | dict[str, Any]) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def load_stage(module: str) -> Stage[Any]:
    """The ``STAGE`` spec of a stage module."""
    return importlib.import_module(module).STAGE


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures; a bad source file or bad params will not fix itself."""
    try:
        state.result()
    except FacedetailError:
        return False
    except Exception:  # anything else may be transient
        pass
    return True


def manifest_table(out_dir: Path) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact: one per loose file, one per shard for sharded items.

    A 90K-image set becomes ~90 rows (items, bytes, first and last id per shard) instead of 90K.
    """
    table = read_manifest(out_dir / MANIFEST_NAME)
    rows: list[dict[str, Any]] = []
    shards: dict[str, dict[str, Any]] = {}
    for r in table.select(["id", "path", "shard", "bytes", "sha256"]).to_pylist():
        if r["shard"] is None:
            rows.append({"where": r["path"], "items": 1, "bytes": r["bytes"], "first": r["id"], "last": r["id"],
                         "sha256": r["sha256"][:16]})
            continue
        entry = shards.setdefault(r["shard"], {"where": r["shard"], "items": 0, "bytes": 0, "first": r["id"],
                                               "last": r["id"], "sha256": ""})
        entry["items"] += 1
        entry["bytes"] += r["bytes"]
        entry["last"] = r["id"]
    return rows + list(shards.values())


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_bad_input)
def run_stage(name: str, module: str, root: str) -> dict[str, Any]:
    """Run one stage exactly as ``python -m <module>`` would, and publish its manifest summary."""
    stage = load_stage(module)
    root_path = Path(root)
    params = stage.load_params(root_path)
    parent = None
    if flow_run.id:
        parent = ParentRef(namespace="prefect", name=str(flow_run.flow_name), run_id=str(flow_run.id))
    result = stage.run(params, root_path, parent=parent)
    rows = manifest_table(result.out_dir)
    create_table_artifact(
        key=f"{name.replace('_', '-')}-manifest", table=rows,
        description=f"{name}: {sum(r['items'] for r in rows)} items, {sum(r['bytes'] for r in rows)} bytes; "
                    f"{result.summary}",
    )
    get_run_logger().info("%s wrote %s: %s", name, result.out_dir, result.summary)
    return {"stage": name, "outputs": result.outputs, "summary": result.summary}


@flow(name="facedetail-pipeline", log_prints=True)
def pipeline(root: str = ".", stages: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the ``dvc.yaml`` stages (all, or the named ones) in order under ``root``."""
    order = stage_order(Path(root) / "dvc.yaml")
    unknown = set(stages or []) - {name for name, _ in order}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; dvc.yaml has {[n for n, _ in order]}")
    results = []
    for name, module in order:
        if stages and name not in stages:
            continue
        results.append(run_stage(name, module, str(Path(root).resolve())))
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: run the flow once."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="repository root (default: cwd)")
    parser.add_argument("--stage", action="append", dest="stages", help="run only this stage (repeatable)")
    args = parser.parse_args(argv)
    try:
        pipeline(root=args.root, stages=args.stages)
    except (FacedetailError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
