"""``CARD.md``: the short dataset card every stage writes beside its manifest.

A card says what the dataset is, how many items it has (and how many inputs were quarantined, why),
the distributions of its manifest's columns (labels, poses, amplitudes...), its headline metrics,
the raw sources at the leaves of its lineage with their licences (the union over every ancestor),
how to reproduce it, and its known limits. All of it comes from data: the stage's description, the
manifest, the quarantine table, the metrics and the upstream cards; nothing in it depends on when or
where it was written, so equal content gives equal bytes.

The YAML front matter is the card's machine-readable part (the convention of dataset cards): the
licence union, the sources, the counts. Upstream cards are how licences travel: a stage's union is
its own sources' licences plus the union recorded in the card of each stage it read from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from facedetail.io.atomic import atomic_write_text
from facedetail.io.hashing import listing_hash
from facedetail.io.licences import (
    LICENCES,
    USES,
    Carried,
    Licence,
    LicenceRules,
    Permission,
    Use,
    classify,
    licence_from_json,
    licence_union,
    merge_sources,
    package_source,
    permission_text,
    raw_sources,
)
from facedetail.io.manifest import BASE_SCHEMA, MANIFEST_NAME
from facedetail.io.report import _number as _fmt  # the summary's number format, so both read alike
from facedetail.io.report import _size, metric
from facedetail.io.tables import QUARANTINE_NAME, reason_kind

CARD_NAME = "CARD.md"
RECORD_NAME = "lineage.json"
"""The content lineage record that marks a folder as a stage's output."""
CATEGORIES_SHOWN = 20
"""A text column with at most this many distinct values is shown as counts."""


@dataclass(frozen=True)
class CardSpec:
    """What a stage says about its output, beside the data."""

    stage: str
    description: str
    """What the dataset is (the stage module's docstring)."""
    limits: str = ""
    """Known limits, one line."""
    headline: Sequence[str] = ()
    """Dotted metric keys worth showing."""
    params_hash: str = ""
    """Hash of the parameters that shape the output (``lineage.json``'s ``params_hash``)."""
    package_sources: Sequence[str] = ()
    """Ids of the package-shipped sources the stage read (:data:`facedetail.io.licences.PACKAGE_SOURCES`)."""
    input_paths: Sequence[str] = ()
    """The stage's declared inputs (repo-relative), which group raw files into sources."""
    rules: LicenceRules = field(default_factory=LicenceRules)


def stage_folder(name: str, root: Path, exclude: Path | None = None) -> Path | None:
    """The stage output folder (the nearest folder with a ``lineage.json``) that holds repo-relative ``name``."""
    base = root.resolve()
    here = (root / name).parent
    while True:
        try:
            here.resolve().relative_to(base)
        except ValueError:
            return None
        if here.resolve() == base:
            return None
        if (here / RECORD_NAME).is_file() and (exclude is None or here.resolve() != exclude.resolve()):
            return here
        here = here.parent


def read_card(path: Path) -> dict[str, Any] | None:
    """The front matter of a card (None when there is no card or it has none)."""
    if not path.is_file():
        return None
    match = re.match(r"---\n(.*?)\n---\n", path.read_text(encoding="utf-8"), re.S)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser where PyYAML has it
    return yaml.load(match.group(1), Loader=loader) if match else None


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def lineage_sources(spec: CardSpec, root: Path, out_dir: Path, input_hashes: Mapping[str, str]
                    ) -> tuple[list[dict[str, Any]], list[Carried], list[str]]:
    """(sources, licence union, upstream stages without a card) of a stage whose inputs had these hashes.

    Raw inputs are the input files no stage wrote; the upstream stages' cards bring theirs.
    """
    raw: dict[str, str] = {}
    upstream: dict[str, Path] = {}
    folders: dict[str, Path | None] = {}  # by parent folder: 163K photos of one folder are one look-up
    for name, sha in input_hashes.items():
        parent = name.rpartition("/")[0]
        if parent not in folders:
            folders[parent] = stage_folder(name, root, exclude=out_dir)
        folder = folders[parent]
        if folder is None:
            raw[name] = sha
        else:
            upstream[_rel(folder, root)] = folder
    own = raw_sources(raw, spec.rules, spec.input_paths, read_by=spec.stage)
    own += [{**package_source(s), "read_by": [spec.stage]} for s in sorted(set(spec.package_sources))]
    pairs = [(classify(name, sha, spec.rules)[0], name) for name, sha in raw.items()]
    pairs += [(LICENCES[s["licence"]], s["name"]) for s in own if s["kind"] == "package"]
    sources, missing = list(own), []
    for rel, folder in sorted(upstream.items()):
        card = read_card(folder / CARD_NAME)
        if card is None:
            missing.append(rel)
            continue
        sources += card.get("sources", [])
        pairs += [(licence_from_json(entry), via) for entry in card.get("licences", []) for via in entry["via"]]
        missing += card.get("unrecorded", [])
    return merge_sources(sources), _grouped_union(pairs, own), sorted(set(missing))


def _grouped_union(pairs: list[tuple[Licence, str]], own: list[dict[str, Any]]) -> list[Carried]:
    """The union, with raw files named by their source record (a folder of photos once, not per photo)."""
    label = {}
    for record in own:
        for member in record.get("members", {}) or ([record["name"]] if record["kind"] == "file" else []):
            label[member] = record["name"]
    return licence_union((licence, label.get(via, _group_of(via, own))) for licence, via in pairs)


def _group_of(name: str, own: list[dict[str, Any]]) -> str:
    for record in own:
        if record["kind"] == "files" and (name == record["name"] or name.startswith(record["name"] + "/")):
            return record["name"]
    return name


def _counts(values: pa.ChunkedArray) -> list[tuple[str, int]]:
    counted = pc.value_counts(values.drop_null() if values.null_count else values).to_pylist()
    return sorted(((str(c["values"]), int(c["counts"])) for c in counted), key=lambda vc: (-vc[1], vc[0]))


def distributions(table: pa.Table) -> tuple[list[str], list[str]]:
    """(markdown lines, columns not summarised) of a manifest's own columns (the fixed ones left out)."""
    lines, numeric, skipped = [], [], []
    for name in sorted(set(table.column_names) - set(BASE_SCHEMA.names)):
        column = table.column(name)
        kind = column.type
        if column.null_count == len(column):
            continue
        if pa.types.is_string(kind) or pa.types.is_boolean(kind) or pa.types.is_large_string(kind):
            counts = _counts(column)
            if len(counts) <= CATEGORIES_SHOWN:
                shown = " · ".join(f"{v} {_fmt(n)}" for v, n in counts)
                lines.append(f"* **{name}**: {shown}")
            else:
                lines.append(f"* **{name}**: {len(counts):,} distinct values")
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
            values = column.drop_null()
            # The exact median (an element of the column): approximate_median's t-digest is not exact.
            median = pc.quantile(values, q=0.5, interpolation="lower")[0].as_py()
            numeric.append(f"| {name} | {_fmt(pc.min(values).as_py())} | {_fmt(median)} | "
                           f"{_fmt(pc.max(values).as_py())} | {_fmt(len(values))} |")
        else:
            skipped.append(name)
    if numeric:
        lines += ["", "| column | min | median | max | items |", "|---|---|---|---|---|", *numeric]
    return lines, skipped


def _manifest_section(out_dir: Path) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    facts: dict[str, Any] = {}
    manifest = out_dir / MANIFEST_NAME
    if manifest.is_file():
        table = pq.read_table(manifest)
        facts["items"] = table.num_rows
        shards = table.column("shard").drop_null()
        facts["shards"] = len(set(shards.to_pylist())) if len(shards) else 0
        dist, skipped = distributions(table)
        if dist:
            lines += ["## Distributions", "", f"Over the {table.num_rows:,} manifest rows:", "", *dist, ""]
        if skipped:
            lines += [f"Not summarised here (nested values): {', '.join(skipped)}.", ""]
    quarantine = out_dir / QUARANTINE_NAME
    if quarantine.is_file():
        reasons = pq.read_table(quarantine, columns=["reason"]).column("reason").to_pylist()
        facts["quarantined"] = len(reasons)
        if reasons:
            kinds: dict[str, int] = {}
            for reason in reasons:
                kinds[reason_kind(reason)] = kinds.get(reason_kind(reason), 0) + 1
            shown = " · ".join(f"{k} {n:,}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
            lines += [f"**Quarantined inputs** ({len(reasons):,}, see `{QUARANTINE_NAME}`): {shown}", ""]
    return lines, facts


def _source_line(s: Mapping[str, Any]) -> str:
    if s["kind"] == "package":
        what = f"{s['what']}: `{s['package']}` {s['version']}, `{s['name'].split(':', 1)[1]}`"
        digest = s["sha256"][:16]
    elif s["kind"] == "file":
        what, digest = f"`{s['name']}`", s["sha256"][:16]
    else:
        what, digest = f"`{s['name']}/` ({s['files']:,} files)", f"listing {s['listing'][:16]}"
    return f"| {what} | {digest} | {s['licence']} | {', '.join(s.get('read_by', []))} |"


def render_card(spec: CardSpec, root: Path, out_dir: Path, input_hashes: Mapping[str, str],
                metrics: Mapping[str, Any] | None) -> str:
    """The card's text for the output assembled in ``out_dir`` (deterministic: same inputs, same bytes)."""
    sources, union, missing = lineage_sources(spec, root, out_dir, input_hashes)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != CARD_NAME)
    body, facts = _manifest_section(out_dir)
    facts = {"files": len(files), "bytes": sum(p.stat().st_size for p in files), **facts}
    front = {
        "stage": spec.stage,
        "params_hash": spec.params_hash,
        "inputs_listing": listing_hash(dict(sorted(input_hashes.items()))),
        **facts,
        "licences": [c.to_json() for c in union],
        "permits": {use: verdict(union, use) for use in USES},
        "sources": sources,
        "unrecorded": missing,
        "licence_rules": spec.rules.to_json(),
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=True, allow_unicode=True, width=100).rstrip(), "---",
             f"# Dataset card: `{spec.stage}`", "", _markdown(spec.description), ""]
    count = [f"* {_fmt(facts['items'])} items in `{MANIFEST_NAME}`" if "items" in facts else None,
             f"* {facts['shards']:,} shards" if facts.get("shards") else None,
             f"* {facts['quarantined']:,} inputs quarantined" if "quarantined" in facts else None,
             f"* {facts['files']:,} files, {_size(facts['bytes'])}, besides this card and `{RECORD_NAME}`"]
    lines += ["## Contents", "", *[c for c in count if c], "", *body]
    shown = [(key, metric(metrics or {}, key)) for key in spec.headline]
    if any(v is not None for _, v in shown):
        lines += ["## Headline metrics", "", *[f"* {k}: {_fmt(v)}" for k, v in shown if v is not None],
                  f"* all of them: `metrics/{spec.stage}.json`", ""]
    lines += ["## Sources and licences", "",
              "The raw sources at the leaves of this dataset's lineage (every ancestor stage included):", "",
              "| source | sha256 | licence | read by |", "|---|---|---|---|", *[_source_line(s) for s in sources], ""]
    if missing:
        lines += [f"**Incomplete:** upstream output(s) without a card: {', '.join(missing)} (made before cards "
                  "existed: rerun them to record their sources).", ""]
    lines += ["Licences carried (the union over all ancestors):", ""]
    for c in union:
        lic = c.licence
        lines.append(f"* **{lic.name}** (`{lic.id}`): commercial use {permission_text(lic.commercial)}, research "
                     f"{permission_text(lic.research)}. {lic.terms} Source: {lic.source}. Via: "
                     f"{', '.join(f'`{v}`' for v in c.via)}.")
    lines += ["", *[_verdict_line(union, use) for use in USES], ""]
    lines += ["## Reproduce", "", "```bash", f"dvc repro {spec.stage}   # params hash {spec.params_hash}",
              f"facedetail lineage {spec.stage}   # the whole chain: stages, runs, parameters, sources",
              "facedetail audit   # every recorded link, file and licence still true?", "```", "",
              "## Known limits", "", spec.limits or "None recorded for this stage (its spec has no `limits`).", ""]
    return "\n".join(lines)


_SEVERITY = ("no", "per-user", "unknown", "yes")


def verdict(union: Sequence[Carried], use: Use) -> Permission:
    """What the union says about ``use``: the most restrictive of its licences (``yes`` for an empty union)."""
    return min((c.licence.permits(use) for c in union), key=_SEVERITY.index, default="yes")


def _verdict_line(union: Sequence[Carried], use: Use) -> str:
    blocking = [c.licence.name for c in union if c.licence.permits(use) != "yes"]
    why = f" ({'; '.join(blocking)})" if blocking else ""
    return f"* **{use.capitalize()} use: {permission_text(verdict(union, use))}**{why}."


def _markdown(doc: str) -> str:
    """A module docstring as markdown: reST double backticks become single ones."""
    return re.sub(r"``([^`]+)``", r"`\1`", doc.strip())


def write_card(spec: CardSpec, root: Path, out_dir: Path, input_hashes: Mapping[str, str],
               metrics: Mapping[str, Any] | None) -> Path:
    """Write ``out_dir/CARD.md`` atomically; returns its path."""
    return atomic_write_text(out_dir / CARD_NAME, render_card(spec, root, out_dir, input_hashes, metrics))
