"""Prefect flow that runs the stages of ``dvc.yaml`` in DAG order, as tasks.

The order comes from DVC's own stage graph, the one ``dvc dag`` shows (:func:`flows.dag.stage_order`).

Each task calls the very ``run`` function that ``python -m stages.<name>`` (the DVC command)
calls, with the same ``params.yaml`` section, so both runners produce byte-identical outputs.
Runs against ``PREFECT_API_URL`` when set, otherwise against Prefect's ephemeral server.

    python -m flows.pipeline                 # every stage
    python -m flows.pipeline --stage face_model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from facedetail.errors import FacedetailError
from facedetail.io.cards import CARD_NAME
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import MANIFEST_NAME, read_manifest
from flows.dag import load_stage, stage_order


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures; a bad source file or bad params (a ``FacedetailError``, e.g. the
    stages' ``ParamsError``) or a missing file will not fix itself."""
    try:
        state.result()
    except (FacedetailError, FileNotFoundError):
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
    card = result.out_dir / CARD_NAME
    create_markdown_artifact(key=f"{name.replace('_', '-')}-card", markdown=card.read_text(encoding="utf-8"),
                             description=f"{name}: dataset card ({CARD_NAME} beside its manifest)")
    get_run_logger().info("%s wrote %s: %s", name, result.out_dir, result.summary)
    return {"stage": name, "outputs": result.outputs, "summary": result.summary}


@flow(name="facedetail-pipeline", log_prints=True)
def pipeline(root: str = ".", stages: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the ``dvc.yaml`` stages (all, or the named ones) in order under ``root``."""
    order = stage_order(root)
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
