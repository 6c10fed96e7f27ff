"""Scheduled retraining: pull, rebuild what is stale, gate on the metrics, then push and commit.

    python -m flows.retrain [--root R]                     # one run now
    python -m flows.retrain --serve [--cron "0 3 * * 0"]   # a served deployment on a cron schedule
    prefect deploy --name weekly                           # or the deployment of prefect.yaml (process pool)

One run:

1. ``dvc pull`` (DVC's Python API). No remote configured, or objects missing from it (a new,
   empty remote): said in the log, not an error; the stages whose outputs are missing rebuild.
2. The stale stages, by :func:`flows.pipeline.pipeline` as a subflow; ``dvc status`` must be
   clean afterwards (every stage that ran recorded in ``dvc.lock``), or the run fails.
3. ``dvc metrics diff`` against the last accepted run: the commit that the branch
   ``retrain/accepted`` (param ``retrain.accepted_ref``) points at. With none, this run is the
   baseline and passes.
4. The quality gate (:mod:`facedetail.io.quality_gate`) on the gated metrics, with the tolerances of
   the ``retrain:`` section of ``params.yaml``. A regression fails the flow run with the gate's
   table: nothing is pushed, nothing committed, the accepted ref stays.
5. Otherwise ``dvc push`` (when a remote is configured), then ``dvc.lock``, ``params.yaml`` and every
   git-tracked (``cache: false``) output, ``metrics/`` among them, committed on a new branch
   ``retrain/<YYYY-MM-DD>`` made from ``HEAD`` without a checkout (:mod:`flows.retrain_git`), and
   the accepted ref moved to that commit. The current branch only with ``allow_current_branch``.

Prefect artifacts: ``retrain-report`` (markdown: the gate, the metrics, params and data diffs and
the files to look at) and ``retrain-stages`` (a table of the stages and whether they ran).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from facedetail.io.quality_gate import (
    DEFAULT_GATED,
    MetricsSet,
    Verdict,
    evaluate_gate,
    parse_gated,
    verdict_markdown,
)
from flows import retrain_git
from flows.dag import load_stage, stage_order

DEFAULT_CRON = "0 3 * * 0"
"""Sundays at 03:00 (the deployment's timezone, UTC by default): a night the machine is otherwise idle."""
DEPLOYMENT_NAME = "weekly"
FLOW_NAME = "facedetail-retrain"


class RetrainSettings(BaseModel):
    """The ``retrain:`` section of ``params.yaml`` (every key optional)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.05, ge=0)
    """Allowed worsening of each gated metric, relative to the accepted value (0.05: 5 %)."""
    absolute: float = Field(0.0, ge=0)
    """Allowed worsening in the metric's units, whatever the relative change (for metrics near 0)."""
    accepted_ref: str = "retrain/accepted"
    """Branch that points at the last accepted run's commit."""
    branch_prefix: str = "retrain/"
    """New branches are ``<prefix><YYYY-MM-DD>`` (``-2``, ``-3`` ... when that exists)."""
    gated: list[dict[str, Any]] | None = None
    """``[{file, key, direction?, relative?, absolute?}]``; None: the library's defaults."""


class QualityGateError(RuntimeError):
    """The new run regressed: its message is the gate's markdown table."""


def load_settings(root: Path) -> RetrainSettings:
    """``root/params.yaml``'s ``retrain:`` section (defaults when it has none)."""
    path = root / "params.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    section = (data or {}).get("retrain") or {}
    return RetrainSettings.model_validate(section)


def _repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


def _default_remote(root: Path) -> str | None:
    with _repo(root) as repo:
        return repo.config["core"].get("remote")


@task
def dvc_pull(root: str) -> str:
    """``dvc pull`` of everything ``dvc.lock`` names; tolerant of no remote and of missing objects."""
    logger = get_run_logger()
    remote = _default_remote(Path(root))
    if remote is None:
        msg = "no DVC remote configured: nothing pulled; stages whose outputs are missing will be rebuilt"
        logger.warning(msg)
        return msg
    with _repo(Path(root)) as repo:
        # allow_missing: objects absent from the remote (an empty one, a first run) are not an error;
        # DVC logs which, and the pipeline rebuilds those stages.
        stats = repo.pull(allow_missing=True)
    msg = (f"dvc pull from remote {remote!r}: {stats['stats']['fetched']} files fetched, "
           f"{len(stats['added']) + len(stats['modified'])} outputs checked out")
    logger.info(msg)
    return msg


@task
def dvc_status(root: str) -> dict[str, Any]:
    """``dvc status`` (empty when every stage is recorded in ``dvc.lock``)."""
    with _repo(Path(root)) as repo:
        return repo.status()


@task
def metrics_at(root: str, rev: str | None) -> dict[str, Any]:
    """The metrics files DVC knows, ``{path: parsed JSON}``, at git ``rev`` (None: the workspace)."""
    with _repo(Path(root)) as repo:
        if rev is None:
            shown = repo.metrics.show()  # keyed by "" (the workspace alone)
            files = next(iter(shown.values()), {}).get("data", {})
        else:
            files = repo.metrics.show(revs=[rev]).get(rev, {}).get("data", {})
    return {path: entry["data"] for path, entry in files.items() if isinstance(entry, Mapping) and "data" in entry}


@task
def diffs(root: str, rev: str) -> dict[str, Any]:
    """``dvc metrics diff``, ``dvc params diff`` and ``dvc diff`` of the workspace against ``rev``."""
    with _repo(Path(root)) as repo:
        return {"metrics": repo.metrics.diff(a_rev=rev).get("diff", {}),
                "params": repo.params.diff(a_rev=rev).get("diff", {}),
                "data": repo.diff(a_rev=rev)}


@task
def dvc_push(root: str) -> str:
    """``dvc push`` to the default remote; says so when there is none."""
    remote = _default_remote(Path(root))
    if remote is None:
        return "no DVC remote configured: nothing pushed"
    with _repo(Path(root)) as repo:
        pushed = repo.push()
    return f"dvc push to remote {remote!r}: {pushed} files uploaded"


def committed_paths(root: Path) -> list[str]:
    """What a retraining commit holds: ``dvc.lock``, ``params.yaml``, every ``cache: false`` output
    (metrics, plots, dvclive logs) and the ``.gitignore`` files DVC keeps beside cached outputs."""
    paths = {"dvc.lock", "params.yaml"}
    with _repo(root) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                rel = Path(out.fs_path).relative_to(root.resolve())
                if out.use_cache:
                    paths.add((rel.parent / ".gitignore").as_posix())
                else:
                    paths.add(rel.as_posix())
    return sorted(paths)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "–" if value is None else str(value)


def _diff_table(diff: Mapping[str, Mapping[str, Mapping[str, Any]]], limit: int = 60) -> list[str]:
    rows = [(f, k, v) for f, keys in sorted(diff.items()) for k, v in sorted(keys.items())]
    if not rows:
        return ["No change."]
    lines = ["| file | key | accepted | new | change |", "|---|---|---|---|---|"]
    for f, k, v in rows[:limit]:
        lines.append(f"| `{f}` | `{k}` | {_fmt(v.get('old'))} | {_fmt(v.get('new'))} | {_fmt(v.get('diff'))} |")
    if len(rows) > limit:
        lines.append(f"\n… and {len(rows) - limit} more (`dvc metrics diff`/`dvc params diff`).")
    return lines


def _data_lines(data: Mapping[str, Sequence[Mapping[str, Any]]], limit: int = 20) -> list[str]:
    lines = []
    for kind in ("added", "modified", "deleted", "renamed"):
        entries = data.get(kind) or []
        if entries:
            names = [str(e.get("path")) for e in entries]
            shown = ", ".join(f"`{n}`" for n in names[:limit])
            lines.append(f"* {kind}: {len(entries)}: {shown}" + (" …" if len(names) > limit else ""))
    return lines or ["No DVC-tracked output changed."]


def look_at(root: Path) -> list[str]:
    """The contact sheets and previews each stage declares (``Stage.look_at``) that exist under ``root``."""
    paths = []
    for _, module in stage_order(root):
        stage = load_stage(module)
        paths += [(stage.out_dir / n).as_posix() for n in stage.look_at if (root / stage.out_dir / n).is_file()]
    return paths


def report_markdown(*, root: Path, verdict: Verdict, accepted_ref: str, accepted: str | None,
                    ran: Sequence[Mapping[str, Any]], diff: Mapping[str, Any] | None, outcome: Sequence[str],
                    looks: Sequence[str]) -> str:
    """The ``retrain-report`` artifact."""
    base = f"`{accepted_ref}` = `{accepted[:12]}`" if accepted else f"none yet (`{accepted_ref}` does not exist)"
    ran_names = [r["stage"] for r in ran if r["ran"]]
    lines = [f"# Retraining run of `{root}`", "", f"Accepted run: {base}. "
             f"Stages run: {', '.join(ran_names) if ran_names else 'none (all up to date)'}.", "",
             "## Quality gate", "", verdict_markdown(verdict), "## Outcome", "", *[f"* {o}" for o in outcome], ""]
    if diff is None:
        lines += ["## Changes", "", "No accepted run to compare with.", ""]
    else:
        lines += ["## Metrics (`dvc metrics diff`)", "", *_diff_table(diff["metrics"]), "",
                  "## Params (`dvc params diff`)", "", *_diff_table(diff["params"]), "",
                  "## Data (`dvc diff`)", "", *_data_lines(diff["data"]), ""]
    lines += ["## Look at", "", *([f"* `{p}`" for p in looks] or ["Nothing declared."]), ""]
    return "\n".join(lines)


def _artifact_key(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


@flow(name=FLOW_NAME, log_prints=True)
def retrain(root: str = ".", branch: str | None = None, allow_current_branch: bool = False,
            threshold: float | None = None, accepted_ref: str | None = None, stages: list[str] | None = None,
            force: bool = False) -> dict[str, Any]:
    """One retraining run of the repository at ``root`` (see the module docstring).

    ``threshold`` and ``accepted_ref`` override ``params.yaml``'s ``retrain:`` section; ``branch``
    the default ``retrain/<YYYY-MM-DD>``; ``stages``/``force`` are passed to the pipeline.
    """
    root_path = Path(root).resolve()
    # Parts of DVC's API resolve paths against the process's working directory (pull, push, metrics and
    # params diffs, as flows.dvc_state notes for status and commit): run where `dvc repro` would.
    with contextlib.chdir(root_path):
        return _retrain(root_path, branch, allow_current_branch, threshold, accepted_ref, stages, force)


def _retrain(root_path: Path, branch: str | None, allow_current_branch: bool, threshold: float | None,
             accepted_ref: str | None, stages: list[str] | None, force: bool) -> dict[str, Any]:
    from flows.pipeline import pipeline

    logger = get_run_logger()
    settings = load_settings(root_path)
    ref = accepted_ref or settings.accepted_ref
    rel = settings.threshold if threshold is None else threshold
    gated = parse_gated(settings.gated) if settings.gated is not None else DEFAULT_GATED
    target = branch or retrain_git.free_branch_name(
        root_path, f"{settings.branch_prefix}{datetime.datetime.now(datetime.UTC):%Y-%m-%d}")
    current = retrain_git.current_branch(root_path)
    if target == ref:
        raise ValueError(f"the retraining branch and the accepted ref must differ (both {ref!r})")
    if current in (target, ref) and not allow_current_branch:
        raise ValueError(f"retraining would move the current branch {current!r} "
                         f"(branch {target!r}, accepted ref {ref!r}): pass allow_current_branch to allow it")

    pulled = dvc_pull(str(root_path))
    ran = pipeline(root=str(root_path), stages=stages, force=force)
    stale = dvc_status(str(root_path))
    if stale:
        raise RuntimeError(f"after the pipeline, dvc status is not clean (a stage that ran is not recorded in "
                           f"dvc.lock): {sorted(stale)}")

    accepted = retrain_git.resolve(root_path, f"refs/heads/{ref}")
    new = metrics_at(str(root_path), None)
    old: MetricsSet | None = metrics_at(str(root_path), accepted) if accepted else None
    verdict = evaluate_gate(old, new, gated, relative=rel, absolute=settings.absolute)
    diff = diffs(str(root_path), accepted) if accepted else None
    looks = look_at(root_path)
    rows = [{"stage": r["stage"], "ran": bool(r["ran"]), "summary": str(r.get("summary", ""))[:200]}
            for r in ran]
    create_table_artifact(key="retrain-stages", table=rows or [{"stage": "-", "ran": False, "summary": ""}],
                          description=f"retraining of {root_path}: {sum(r['ran'] for r in rows)} of {len(rows)} "
                                      "stages ran")
    outcome = [pulled]
    result: dict[str, Any] = {"passed": verdict.passed, "baseline": verdict.baseline, "accepted_before": accepted,
                              "branch": None, "commit": None, "stages": rows}

    if not verdict.passed:
        outcome += ["**Gate failed: nothing pushed, nothing committed**, "
                    f"`{ref}` stays at {accepted[:12] if accepted else 'nothing'}."]
        report = report_markdown(root=root_path, verdict=verdict, accepted_ref=ref, accepted=accepted, ran=ran,
                                 diff=diff, outcome=outcome, looks=looks)
        create_markdown_artifact(key="retrain-report", markdown=report, description="retraining: gate FAILED")
        raise QualityGateError(verdict_markdown(verdict))

    outcome.append(dvc_push(str(root_path)))
    paths = committed_paths(root_path)
    others = retrain_git.changed_paths(root_path, paths)
    if others:
        logger.warning("uncommitted changes outside the retraining files are not in the commit: %s", others)
        outcome.append(f"not committed (changed outside the retraining files): {', '.join(others)}")
    message = (f"retrain: {'baseline' if verdict.baseline else 'gate passed'} "
               f"({len(verdict.checks)} gated metrics, threshold {rel:g})\n\n{verdict_markdown(verdict)}")
    if flow_run.id:
        message += f"\nPrefect flow run {flow_run.id}\n"
    on_current = target == current
    tree = retrain_git.tree_with(root_path, "HEAD", paths)
    target_made: str | None = None
    if accepted and tree == retrain_git.tree_of(root_path, accepted):
        commit = accepted
        outcome.append(f"nothing to commit: the retraining files and HEAD equal the accepted run {accepted[:12]}")
    elif tree == retrain_git.tree_of(root_path, "HEAD"):
        commit = retrain_git.resolve(root_path, "HEAD")
        outcome.append(f"nothing to commit: HEAD ({str(commit)[:12]}) already records this run")
    else:
        commit = retrain_git.commit_paths(root_path, paths, target, message, allow_current_branch=allow_current_branch)
        target_made = target
        outcome.append(f"committed {str(commit)[:12]} on {'the current ' if on_current else 'new '}branch `{target}`")
    if commit and commit != accepted:
        retrain_git.move_ref(root_path, ref, commit, accepted)
        outcome.append(f"`{ref}` moved to {commit[:12]}")
    report = report_markdown(root=root_path, verdict=verdict, accepted_ref=ref, accepted=accepted, ran=ran,
                             diff=diff, outcome=outcome, looks=looks)
    create_markdown_artifact(key="retrain-report", markdown=report,
                             description=f"retraining: gate passed{' (baseline)' if verdict.baseline else ''}")
    logger.info("\n%s", "\n".join(outcome))
    result.update(branch=target_made, commit=commit, accepted=commit, report=report)
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI: one run, or ``--serve`` the flow as a deployment on a cron schedule."""
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="repository root (default: cwd)")
    parser.add_argument("--serve", action="store_true", help="serve the flow as a deployment (blocks)")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule of --serve (default {DEFAULT_CRON!r})")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name of --serve")
    parser.add_argument("--branch", help="branch to commit on (default retrain/<YYYY-MM-DD>)")
    parser.add_argument("--allow-current-branch", action="store_true", help="allow committing on the current branch")
    parser.add_argument("--threshold", type=float, help="relative regression allowed (default params.yaml)")
    parser.add_argument("--stage", action="append", dest="stages", help="limit the pipeline to this stage")
    args = parser.parse_args(argv)
    parameters = {"root": str(Path(args.root).resolve()), "branch": args.branch,
                  "allow_current_branch": args.allow_current_branch, "threshold": args.threshold,
                  "stages": args.stages}
    if args.serve:
        retrain.serve(name=args.name, cron=args.cron, parameters=parameters)
        return 0
    try:
        retrain(**parameters)
    except QualityGateError as err:
        print(f"quality gate failed:\n{err}", file=sys.stderr)
        return 1
    except (retrain_git.GitError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
