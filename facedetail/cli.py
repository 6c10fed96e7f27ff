"""``facedetail`` command line: fetch assets, audit lineage, verify outputs, look up a photo's expression prior."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from facedetail.assets import MIRROR_ENV, fetch_share
from facedetail.errors import FacedetailError
from facedetail.io.hashing import sha256_file
from facedetail.io.lineage import find_producer
from facedetail.io.manifest import MANIFEST_NAME, verify_manifest

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

DEFAULT_EVENTS = Path("data/lineage/events.jsonl")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def assets(
    dest: Annotated[Path, typer.Option(help="where the pipeline reads the eos share files")] = Path(
        "data/external/eos-share"),
    mirror: Annotated[str | None, typer.Option(help=f"folder to copy from (default: ${MIRROR_ENV})")] = None,
) -> None:
    """Put the eos share files (Surrey Face Model: non-commercial licence) in DEST, checked by SHA256."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    try:
        files = fetch_share(dest, mirror=mirror)
    except FacedetailError as err:
        _fail(str(err))
    typer.echo(f"{len(files)} eos share files verified in {dest} (from {mirror or 'the eos repository'})")


def _from_stage_records(sha: str, root: Path) -> dict[str, Any] | None:
    """The run record (``data/lineage/runs/<stage>.json``) or, for outputs pulled from a DVC remote
    without their run, the content record inside the output (``data/<stage>/lineage.json``)."""
    for pattern in ("data/lineage/runs/*.json", "data/*/lineage.json"):
        for record_path in sorted(root.glob(pattern)):
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if sha in record.get("outputs", {}).values():
                return {**record, "source": record_path.relative_to(root).as_posix()}
    return None


@app.command()
def lineage(
    path: Annotated[Path, typer.Argument(help="any file a stage produced")],
    events: Annotated[Path, typer.Option(help="OpenLineage events file")] = DEFAULT_EVENTS,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole record as JSON")] = False,
) -> None:
    """Say what produced PATH: stage, run, git commit, parameters, inputs (matched by content hash)."""
    if not path.is_file():
        _fail(f"{path}: no such file")
    sha = sha256_file(path)
    event = find_producer(events, sha)
    if event is not None:
        facets = event["run"]["facets"]
        record = {
            "stage": event["job"]["name"],
            "run_id": event["run"]["runId"],
            "ended": event["eventTime"],
            "git_commit": facets.get("facedetail_environment", {}).get("gitCommit"),
            "git_dirty": facets.get("facedetail_environment", {}).get("gitDirty"),
            "params_hash": facets.get("facedetail_parameters", {}).get("parametersHash"),
            "params": facets.get("facedetail_parameters", {}).get("parameters"),
            "inputs": {i["name"]: i["facets"]["version"]["datasetVersion"] for i in event.get("inputs", [])},
            "source": str(events),
        }
    else:
        record = _from_stage_records(sha, Path.cwd())
        if record is None:
            _fail(f"{path} (sha256 {sha[:12]}…) is not an output of any recorded stage run")
    if as_json:
        typer.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    typer.echo(f"{path}  sha256 {sha}")
    typer.echo(f"  produced by stage {record['stage']!r}, run {record.get('run_id', 'not recorded here')}, "
               f"ended {record.get('ended', 'not recorded here')}")
    dirty = " (with uncommitted changes)" if record.get("git_dirty") else ""
    typer.echo(f"  git commit {record.get('git_commit')}{dirty}; params hash {record.get('params_hash')}")
    typer.echo(f"  params: {json.dumps(record.get('params'), sort_keys=True)}")
    for name, digest in sorted(record.get("inputs", {}).items()):
        typer.echo(f"  input {name}  sha256 {digest[:16]}…")


@app.command()
def verify(folder: Annotated[Path, typer.Argument(help="a stage output folder with manifest.parquet")]) -> None:
    """Re-hash every file listed in FOLDER/manifest.parquet."""
    if not (folder / MANIFEST_NAME).is_file():
        _fail(f"{folder / MANIFEST_NAME}: no manifest")
    bad = verify_manifest(folder)
    if bad:
        _fail(f"{len(bad)} item(s) differ from the manifest: {', '.join(bad[:10])}")
    typer.echo(f"{folder}: every item matches its manifest sha256")


@app.command()
def prior(
    photos: Annotated[list[Path], typer.Argument(help="image files (jpg, png, ...)")],
    dictionary: Annotated[Path, typer.Option(help="a dictionary stage output folder")] = Path("data/dictionary"),
) -> None:
    """β_prior of each photo from the expression dictionary: one JSON line per photo.

    A photo without a usable face gets ``"beta_prior": null`` and the reason; the exit code is 1
    when any photo got no prior.
    """
    from facedetail.dictionary.prior import ExpressionDictionary

    try:
        lookup = ExpressionDictionary.load(dictionary)
        results = lookup.prior(photos)
    except FacedetailError as err:
        _fail(str(err))
    for path, result in zip(photos, results, strict=True):
        line = {"photo": str(path), "beta_prior": None if result.beta is None else [round(float(b), 6) for b in
                                                                                   result.beta],
                "neighbour": result.neighbour_id, "label": result.label,
                "distance": None if result.distance is None else round(result.distance, 6), "reason": result.reason}
        typer.echo(json.dumps(line))
    if not all(r.ok for r in results):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
