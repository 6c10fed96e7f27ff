"""Ways to show a :class:`~facedetail.io.lineage_graph.Lineage`: text for people, Mermaid and DOT for pictures,
PNG through Graphviz's ``dot`` where it is installed (JSON is :meth:`Lineage.to_json`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx

from facedetail.errors import FacedetailError
from facedetail.io.cards import verdict
from facedetail.io.licences import USES, permission_text
from facedetail.io.lineage_graph import Lineage

FILES_SHOWN = 3
"""An edge with at most this many files names each; a larger one shows a count and its listing hash."""


def _short(digest: str | None, n: int = 12) -> str:
    return f"{digest[:n]}…" if digest else "—"


def _order(lineage: Lineage) -> list[str]:
    """Nodes downstream first (targets, then stages towards the sources), ties by name."""
    return list(reversed(list(nx.lexicographical_topological_sort(lineage.graph))))


def _value(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def _edge_lines(lineage: Lineage, source: str, target: str) -> list[str]:
    """``input <file> <hash>  ← <where from>`` lines of one edge (a count for many files)."""
    graph = lineage.graph
    edge, up = graph.edges[source, target], graph.nodes[source]
    files = edge.get("files", {})
    if up["kind"] == "stage":
        where = f"← {up['stage']}"
    elif up["kind"] == "package":
        where = f"← package {up['package']} {up['version']} ({up['licence_name']})"
    else:
        where = f"← raw source ({up['licence_name']})"
    stale = edge.get("stale") or {}
    flag = (f"  STALE: changed upstream since this run (fix: dvc repro {graph.nodes[target]['stage']})"
            if stale else "")
    if len(files) <= FILES_SHOWN:
        return [f"input {n} {_short(h)}  {where}" + (flag if n in stale else "") for n, h in files.items()]
    changed = f"  STALE: {len(stale)} changed upstream since this run (fix: dvc repro " \
              f"{graph.nodes[target]['stage']})" if stale else ""
    folder = edge.get("folder") or up.get("name", "")
    return [f"input {folder}/ {len(files):,} files (listing {_short(edge.get('listing'))})  {where}{changed}"]


def text(lineage: Lineage) -> str:
    """A readable account: the targets, the licence union, then each stage once (downstream first), then the
    raw sources."""
    graph = lineage.graph
    lines = []
    for t in lineage.targets:
        facts = t.facts
        if t.kind == "stage":
            lines.append(f"target: stage {t.stage}")
        elif t.kind == "file":
            how = f" (matched by content; the file is {facts['copy']})" if facts.get("matched") == "content" else ""
            lines.append(f"target: file {facts['name']}{how}, output of {t.stage}, "
                         f"sha256 {_short(facts['sha256'], 16)}")
        else:
            where = (f"shard {facts['shard']} member {facts['key']}" if facts.get("shard")
                     else f"file {facts.get('path')}")
            lines.append(f"target: item {facts['id']} of {t.stage} ({where}), sha256 {_short(facts['sha256'], 16)}, "
                         f"seed {_value(facts.get('seed'))}, item params {facts.get('params_hash')}")
    union = lineage.licences
    lines.append("licences (union over every raw source): " + (" · ".join(
        f"{c.licence.name} [commercial {c.licence.commercial}, research {c.licence.research}]" for c in union)
        or "none recorded"))
    lines.append("; ".join(f"{use} use {permission_text(verdict(union, use))}" for use in USES))
    lines.append("")
    for node in _order(lineage):
        attrs = graph.nodes[node]
        if attrs["kind"] != "stage":
            continue
        run = attrs.get("run", {})
        if run.get("run_id"):
            dirty = " (uncommitted changes)" if run.get("git_dirty") else ""
            parent = run.get("parent") or {}
            by = f", in {parent.get('namespace')} run {parent.get('run_id')}" if parent else ""
            lines.append(f"stage '{attrs['stage']}', run {run['run_id']}, ended {run.get('ended')}, git "
                         f"{_value(run.get('git_commit'))}{dirty}{by}  [{run['source']}]")
        else:
            lines.append(f"stage '{attrs['stage']}', run not recorded here ({run.get('note')})")
        diff = attrs.get("params_diff")
        differs = "" if diff is None else "; differs from params.yaml: " + (", ".join(
            [f"{d['key']} {_value(d['recorded'])} → {_value(d['now'])}" for d in diff["changed"]]
            + [f"{d['key']} set to {_value(d['now'])} (not recorded)" for d in diff["added"]]) or "nothing")
        lines.append(f"  output folder {attrs['folder']}; params {attrs['params_hash']}{differs}; "
                     f"seed {_value(attrs.get('seed'))}")
        for up in sorted(graph.predecessors(node)):
            lines += [f"  {line}" for line in _edge_lines(lineage, up, node)]
        lines.append(f"  outputs {len(attrs['outputs']):,} files (listing {_short(attrs['outputs_listing'])})"
                     + ("" if attrs.get("card") else f"; package sources {attrs.get('packages')}"))
        lines.append(f"  licences {', '.join(attrs.get('licences', [])) or 'none'}")
    leaves = [n for n in _order(lineage) if graph.nodes[n]["kind"] in ("source", "package")]
    if leaves:
        lines += ["", "raw sources"]
    for node in leaves:
        a = graph.nodes[node]
        readers = ", ".join(sorted(graph.nodes[s]["stage"] for s in graph.successors(node)))
        if a["kind"] == "package":
            what = f"{a['what']}: {a['package']} {a['version']}, {a['name'].split(':', 1)[1]} {_short(a['sha256'])}"
        elif a["source_kind"] == "file":
            what = f"{a['name']} {_short(a['sha256'])}"
        else:
            what = f"{a['name']}/ ({a['files']:,} files, listing {_short(a['listing'])})"
        how = a.get("matched", "the package's record")
        lines.append(f"  {what}  — {a['licence_name']} ({how}); read by {readers}")
    return "\n".join(lines) + "\n"


def _label(attrs: Mapping[str, Any]) -> list[str]:
    kind = attrs["kind"]
    if kind == "stage":
        run = attrs.get("run", {})
        # UUIDv7 run ids begin with their time: the tail tells two runs apart.
        when = (f"run …{run['run_id'][-12:]} {str(run.get('ended') or '')[:19]}" if run.get("run_id")
                else "run not recorded")
        return [attrs["stage"], when, f"params {attrs['params_hash']}"]
    if kind == "item":
        return [f"item {attrs['id']}", f"{attrs.get('shard') or attrs.get('path')}",
                f"sha256 {_short(attrs['sha256'])}"]
    if kind == "file":
        return [attrs["name"], f"sha256 {_short(attrs['sha256'])}"]
    if kind == "package":
        return [f"{attrs['package']} {attrs['version']}", attrs["name"].split(":", 1)[1].rsplit("/", 1)[-1],
                attrs["licence_name"]]
    count = f" ({attrs['files']} files)" if attrs.get("files") else ""
    return [f"{attrs['name']}{count}", attrs["licence_name"]]


def mermaid(lineage: Lineage) -> str:
    """A Mermaid flowchart, sources at the top, targets at the bottom; stale links dotted."""
    graph = lineage.graph
    order = list(reversed(_order(lineage)))
    ids = {n: f"n{i}" for i, n in enumerate(order)}
    shapes = {"stage": ("[", "]"), "source": ("[(", ")]"), "package": ("[[", "]]"), "item": ("([", "])"),
              "file": ("([", "])")}
    lines = ["flowchart TD"]
    for node in order:
        attrs = graph.nodes[node]
        left, right = shapes[attrs["kind"]]
        label = "<br/>".join(part.replace('"', "#quot;") for part in _label(attrs))
        lines.append(f'  {ids[node]}{left}"{label}"{right}')
    for a, b in sorted(graph.edges, key=lambda e: (ids[e[0]], ids[e[1]])):
        arrow = " -. stale .-> " if graph.edges[a, b].get("stale") else " --> "
        lines.append(f"  {ids[a]}{arrow}{ids[b]}")
    return "\n".join(lines) + "\n"


def digraph(lineage: Lineage) -> Any:
    """The lineage as a ``graphviz.Digraph`` (DOT source: ``.source``)."""
    import graphviz

    graph = lineage.graph
    dot = graphviz.Digraph("lineage", graph_attr={"rankdir": "TB"}, node_attr={"fontname": "Helvetica",
                                                                               "fontsize": "10"})
    shapes = {"stage": "box", "source": "cylinder", "package": "component", "item": "ellipse", "file": "ellipse"}
    order = list(reversed(_order(lineage)))
    ids = {n: f"n{i}" for i, n in enumerate(order)}
    for node in order:
        attrs = graph.nodes[node]
        dot.node(ids[node], "\n".join(_label(attrs)), shape=shapes[attrs["kind"]])
    for a, b in sorted(graph.edges, key=lambda e: (ids[e[0]], ids[e[1]])):
        stale = bool(graph.edges[a, b].get("stale"))
        dot.edge(ids[a], ids[b], **({"style": "dashed", "color": "red", "label": "stale"} if stale else {}))
    return dot


def dot_source(lineage: Lineage) -> str:
    """Graphviz DOT text."""
    return digraph(lineage).source


def png(lineage: Lineage) -> bytes:
    """A PNG drawn by Graphviz's ``dot``; a one-line :class:`FacedetailError` where it is not installed."""
    import graphviz

    try:
        return digraph(lineage).pipe(format="png")
    except graphviz.ExecutableNotFound:
        raise FacedetailError("PNG needs Graphviz's `dot` (Debian package graphviz; `make setup` installs it); "
                              "--format dot or mermaid need nothing") from None
