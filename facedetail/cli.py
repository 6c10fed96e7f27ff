"""``facedetail`` command line: fetch assets, audit lineage, verify outputs, look up a photo's expression prior."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from facedetail.assets import MIRROR_ENV, fetch_share
from facedetail.errors import FacedetailError
from facedetail.io.manifest import MANIFEST_NAME, read_manifest
from facedetail.reconstruct.command import reconstruct_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

DEFAULT_EVENTS = Path("data/lineage/events.jsonl")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


# The reconstruction command lives with its library (it imports torch lazily, so `facedetail --help` stays fast).
app.command("reconstruct")(reconstruct_command)


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


def _today(root: Path, params_file: Path) -> tuple[dict[str, Any], Any]:
    """Today's params file as plain YAML, and its ``licences`` rules (the records are compared with it)."""
    import yaml

    from facedetail.io.licences import parse_rules

    path = root / params_file
    if not path.is_file():
        return {}, parse_rules(None)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return data, parse_rules(data.get("licences"))
    except (yaml.YAMLError, ValueError, AttributeError) as err:
        _fail(f"{path}: {' '.join(str(err).split())}")
        raise  # unreachable: _fail exits


FORMATS = ("text", "json", "mermaid", "dot", "png")


@app.command()
def lineage(
    target: Annotated[str, typer.Argument(help="a stage name, an output file (a checkpoint...), a shard member "
                                               "such as shards/shard-00003.tar:expr-0003042.png, an item id of a "
                                               "manifest, or <stage>:<item id>")],
    fmt: Annotated[str, typer.Option("--format", help=f"one of {', '.join(FORMATS)} (png needs Graphviz)")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="the same as --format json")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here, not to stdout (png: "
                                                                        "default lineage.png)")] = None,
    root: Annotated[Path, typer.Option(help="repository root")] = Path("."),
    params: Annotated[Path, typer.Option(help="today's params file (relative to the root), to compare "
                                              "the recorded parameters with")] = Path("params.yaml"),
    events: Annotated[Path, typer.Option(help="OpenLineage events file (relative to the root)")] = DEFAULT_EVENTS,
) -> None:
    """The whole upstream chain of TARGET down to the raw sources: per stage its run, git commit, parameters (and
    how they differ from params.yaml), seed, input and output hashes; the raw files and package-shipped models
    at the leaves with their versions and licences. From the records only: nothing large is re-hashed."""
    from facedetail.io import lineage_view
    from facedetail.io.lineage_graph import LineageError, Repository, build_lineage, resolve_target

    fmt = "json" if as_json else fmt
    if fmt not in FORMATS:
        _fail(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    today, rules = _today(root, params)
    repo = Repository.load(root, events_file=events)
    try:
        found = build_lineage(repo, resolve_target(repo, target), today, rules)
    except LineageError as err:
        _fail(str(err))
    if fmt == "png":
        try:
            data = lineage_view.png(found)
        except FacedetailError as err:
            _fail(str(err))
        (output or Path("lineage.png")).write_bytes(data)
        typer.echo(f"wrote {output or 'lineage.png'}")
        return
    text = {"json": lambda: json.dumps(found.to_json(), indent=2, sort_keys=True) + "\n",
            "mermaid": lambda: lineage_view.mermaid(found), "dot": lambda: lineage_view.dot_source(found),
            "text": lambda: lineage_view.text(found)}[fmt]()
    if output is not None:
        output.write_text(text, encoding="utf-8")
    else:
        typer.echo(text, nl=False)


@app.command()
def audit(
    root: Annotated[Path, typer.Option(help="repository root")] = Path("."),
    full: Annotated[bool, typer.Option("--full", help="re-hash every file and shard member (default: a sample)")
                    ] = False,
    sample: Annotated[int, typer.Option(help="files and shard members re-hashed per stage without --full")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the sample (the same seed checks the same files)")] = 0,
    licence: Annotated[str | None, typer.Option("--licence", help="also fail when a licence in the lineage does not "
                                                                  "grant this use: commercial or research")] = None,
    params: Annotated[Path, typer.Option(help="params file with the `licences` rules (relative to the root)")
                      ] = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON")] = False,
) -> None:
    """Check that every recorded link still holds: inputs against their upstreams' current outputs, dvc.lock
    against the records, manifests against the records, files against their hashes, cards and licences.
    Exit code 0 when intact, 1 with the list of problems and their fixes."""
    from facedetail.io.audit import audit as run_audit
    from facedetail.io.audit import expected_stages
    from facedetail.io.licences import USES
    from facedetail.io.lineage_graph import Repository

    if licence is not None and licence not in USES:
        _fail(f"--licence {licence}: use one of {', '.join(USES)}")
    _, rules = _today(root, params)
    report = run_audit(Repository.load(root), full=full, sample=sample, seed=seed, use=licence,  # type: ignore[arg-type]
                       rules=rules, expected=expected_stages(root))
    typer.echo(json.dumps(report.to_json(), indent=2, sort_keys=True) if as_json else report.text().rstrip("\n"))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def verify(folder: Annotated[Path, typer.Argument(help="a stage output folder with manifest.parquet")]) -> None:
    """Re-hash every item listed in FOLDER/manifest.parquet: loose files, shard members and whole samples."""
    from facedetail.io.audit import verify_items

    if not (folder / MANIFEST_NAME).is_file():
        _fail(f"{folder / MANIFEST_NAME}: no manifest")
    rows = read_manifest(folder / MANIFEST_NAME).select(["id", "path", "shard", "key", "sha256"]).to_pylist()
    bad, _ = verify_items(folder, rows)
    if bad:
        _fail(f"{len(bad)} item(s) differ from the manifest: {', '.join(bad[:10])}")
    typer.echo(f"{folder}: every item matches its manifest sha256")


@app.command()
def prior(
    # readable=False: click would refuse the whole command for one unreadable file; the decoder reports it.
    photos: Annotated[list[Path], typer.Argument(help="image files (jpg, png, ...)", readable=False)],
    dictionary: Annotated[Path, typer.Option(help="a dictionary stage output folder")] = Path("data/dictionary"),
) -> None:
    """β_prior of each photo from the expression dictionary: one JSON line per photo, in order.

    Photos are decoded and their faces found as ``wild_proxy`` does (one decoder, one face policy). A
    photo without a prior (not decodable, no usable face, ...) gets ``"beta_prior": null`` and a
    one-line reason, and never hides the other photos' lines; the exit code is 1 when any photo got
    no prior. A path that is not valid UTF-8 is shown with its bytes escaped (``caf\\xe9.jpg``).
    """
    from facedetail.dictionary.prior import ExpressionDictionary
    from facedetail.proxy.inputs import display_name

    try:
        lookup = ExpressionDictionary.load(dictionary)
        results = lookup.prior(photos)
    except FacedetailError as err:
        _fail(str(err))
    for path, result in zip(photos, results, strict=True):
        line = {"photo": display_name(str(path)),
                "beta_prior": None if result.beta is None else [round(float(b), 6) for b in result.beta],
                "neighbour": result.neighbour_id, "label": result.label,
                "distance": None if result.distance is None else round(result.distance, 6), "reason": result.reason,
                "decode_warning": result.decode_warning}
        typer.echo(json.dumps(line))
    if not all(r.ok for r in results):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
