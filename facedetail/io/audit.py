"""``facedetail audit``: is every recorded link, file and licence still true?

For every stage output with a ``lineage.json`` it checks:

* **links**: each recorded input hash equals its upstream stage's current recorded output (a stage re-run
  upstream without its consumers breaks the link; the fix is ``dvc repro <consumer>``), and the upstream
  has no output, inside a folder the consumer depends on, that the consumer never read;
* **dvc.lock**: the stage is in it, with the parameters its output was made with, and the files DVC
  tracks for the output are the files the record lists;
* **manifest**: ``manifest.parquet`` is the one recorded, and its loose files and shards are recorded outputs
  with the same hashes;
* **files**: the files on disk still have their recorded hashes (their existence always; their content on a
  seeded sample, or all of them with ``full``), shard items included (a member, or a whole WebDataset sample
  where the manifest's ``key`` names one), raw inputs too;
* **cards**: ``CARD.md`` is there, describes these inputs, and carries the licences the lineage gives today;
* **licences** (with a use such as ``commercial``): no licence in a stage's ancestry forbids the use.

Nothing is changed; the result is a list of findings, each with its fix.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from facedetail.io.cards import CARD_NAME, RECORD_NAME
from facedetail.io.hashing import listing_hash, sha256_bytes, sha256_file
from facedetail.io.licences import Carried, LicenceRules, Permission, Use, not_permitted, permission_text
from facedetail.io.lineage_graph import Repository, StageRecord, Target, build_lineage, params_diff
from facedetail.io.manifest import MANIFEST_NAME

DEFAULT_SAMPLE = 16
"""Files and shard members re-hashed per stage without ``--full``."""
KINDS = ("record", "link", "dvc.lock", "manifest", "file", "card", "licence")


@dataclass(frozen=True)
class Finding:
    """One thing that is not as recorded."""

    kind: str
    stage: str
    message: str
    fix: str


@dataclass
class AuditReport:
    """Findings, and how much was checked."""

    findings: list[Finding] = field(default_factory=list)
    stages: int = 0
    links: int = 0
    files_hashed: int = 0
    members_hashed: int = 0
    files_seen: int = 0
    full: bool = False
    sample: int = DEFAULT_SAMPLE
    not_built: list[str] = field(default_factory=list)
    use: str | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, kind: str, stage: str, message: str, fix: str) -> None:
        self.findings.append(Finding(kind, stage, message, fix))

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {"ok": self.ok, "findings": [asdict(f) for f in self.findings],
                "checked": {"stages": self.stages, "links": self.links, "files_on_disk": self.files_seen,
                            "files_hashed": self.files_hashed, "shard_members_hashed": self.members_hashed,
                            "full": self.full, "sample": None if self.full else self.sample, "licence_use": self.use},
                "not_built": self.not_built}

    def text(self) -> str:
        """The readable report: what was checked, then each finding with its fix."""
        how = ("every file" if self.full
               else f"a sample of {self.sample} files and shard members per stage; --full: all")
        lines = [f"facedetail audit: {self.stages} stage output(s), {self.links} recorded link(s), "
                 f"{self.files_seen:,} file(s) on disk; re-hashed {self.files_hashed:,} file(s) and "
                 f"{self.members_hashed:,} shard member(s) ({how})"
                 + (f"; licences checked for {self.use} use" if self.use else "")]
        if self.not_built:
            lines.append(f"not built yet (nothing to check): {', '.join(self.not_built)}")
        if self.ok:
            lines.append("intact: every recorded link, file and licence holds")
            return "\n".join(lines) + "\n"
        lines.append(f"{len(self.findings)} problem(s):")
        order = {k: i for i, k in enumerate(KINDS)}
        for f in sorted(self.findings, key=lambda f: (order.get(f.kind, 99), f.stage, f.message)):
            lines.append(f"  [{f.kind}] {f.stage}: {f.message}")
            lines.append(f"      fix: {f.fix}")
        return "\n".join(lines) + "\n"


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "nothing"


def _names(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_links(repo: Repository, stage: StageRecord, report: AuditReport) -> None:
    """Each recorded input against its upstream's current output; upstream outputs never read."""
    by_upstream: dict[str, list[tuple[str, str, str | None]]] = {}
    for name, recorded in sorted(stage.inputs.items()):
        upstream = repo.producer_of(name)
        if upstream is None or upstream == stage.name:
            continue
        report.links += 1
        now = repo.current_hash(name)
        if now != recorded:
            by_upstream.setdefault(upstream, []).append((name, recorded, now))
    for upstream, broken in sorted(by_upstream.items()):
        gone = [n for n, _, now in broken if now is None]
        changed = [(n, r, now) for n, r, now in broken if now is not None]
        if changed:
            n, r, now = changed[0]
            report.add("link", stage.name, f"{len(changed)} input(s) changed upstream since it ran: {n} was "
                       f"{_short(r)} then, {upstream} now records {_short(now)}"
                       + (f" (also {_names([c[0] for c in changed[1:]])})" if len(changed) > 1 else ""),
                       f"dvc repro {stage.name}")
        if gone:
            report.add("link", stage.name, f"{upstream} no longer outputs {_names(gone)}, which it read",
                       f"dvc repro {stage.name}")
    for dep in stage.lock_deps:
        upstream = repo.producer_of(dep)
        if upstream is None or upstream == stage.name or dep in repo.stages[upstream].outputs:
            continue  # not an upstream output, or a single file of it (checked above)
        record = repo.stages[upstream]
        unseen = sorted(n for n in record.outputs if (n == dep or n.startswith(dep + "/")) and n not in stage.inputs)
        if unseen:
            report.add("link", stage.name, f"{upstream} has {len(unseen)} output(s) in {dep} that it never read: "
                       f"{_names(unseen)}", f"dvc repro {stage.name}")


def _lock_files(repo: Repository, out: Mapping[str, Any]) -> set[str] | None:
    """The file names DVC recorded for a directory out (its ``.dir`` object in the cache), if the cache has it."""
    digest = str(out.get("md5", ""))
    if not digest.endswith(".dir"):
        return None
    for cache in (repo.root / ".dvc/cache/files/md5", repo.root / ".dvc/cache"):
        path = cache / digest[:2] / digest[2:]
        if path.is_file():
            return {entry["relpath"] for entry in json.loads(path.read_text(encoding="utf-8"))}
    return None


def check_lock(repo: Repository, stage: StageRecord, report: AuditReport) -> None:
    """``dvc.lock`` against the record: the stage is there, with the same parameters and the same files."""
    if not repo.lock:
        return
    if stage.lock is None:
        report.add("dvc.lock", stage.name, "its output exists but dvc.lock has no entry for it (run outside DVC?)",
                   f"dvc repro {stage.name}")
        return
    locked = stage.lock.get("params", {}).get("params.yaml", {})
    diff = params_diff(stage.content.get("params", {}), locked.get(stage.name), locked)
    if diff.changed:
        shown = ", ".join(f"{d['key']} {d['now']} (output made with {d['recorded']})" for d in diff.changed[:4])
        report.add("dvc.lock", stage.name, f"dvc.lock records other parameters than the output was made with: "
                   f"{shown}", f"dvc repro {stage.name}")
    recorded = {n[len(stage.folder) + 1:] for n in stage.outputs} | {RECORD_NAME}
    for out in stage.lock.get("outs", []):
        if out["path"].rstrip("/") != stage.folder:
            continue
        files = _lock_files(repo, out)
        if files is not None and files != recorded:
            extra, missing = sorted(files - recorded), sorted(recorded - files)
            report.add("dvc.lock", stage.name, "dvc.lock's copy of the output lists other files than the record"
                       + (f": only in dvc.lock {_names(extra)}" if extra else "")
                       + (f"; only in the record {_names(missing)}" if missing else ""), f"dvc repro {stage.name}")
        elif files is None and out.get("nfiles") is not None and out["nfiles"] != len(recorded):
            report.add("dvc.lock", stage.name, f"dvc.lock counts {out['nfiles']} files in {stage.folder}, the record "
                       f"{len(recorded)}", f"dvc repro {stage.name}")


def check_manifest(repo: Repository, stage: StageRecord, report: AuditReport) -> list[dict[str, Any]]:
    """The manifest against the record; returns its rows of shard members (for the content check)."""
    name = f"{stage.folder}/{MANIFEST_NAME}"
    path = repo.root / name
    if name not in stage.outputs:
        return []
    if not path.is_file():
        return []  # reported with the other missing files
    report.files_hashed += 1
    if _digest(path) != stage.outputs[name]:
        report.add("manifest", stage.name, f"{MANIFEST_NAME} is not the one recorded (sha256 differs)",
                   f"dvc checkout {stage.folder}, or dvc repro {stage.name} --force")
        return []
    rows = pq.read_table(path, columns=["id", "path", "shard", "key", "sha256"]).to_pylist()
    wrong = [r["id"] for r in rows if r["path"] is not None
             and stage.outputs.get(f"{stage.folder}/{r['path']}") != r["sha256"]]
    if wrong:
        report.add("manifest", stage.name, f"{len(wrong)} manifest row(s) disagree with the recorded outputs: "
                   f"{_names(wrong)}", f"dvc repro {stage.name} --force")
    shards = sorted({r["shard"] for r in rows if r["shard"] is not None})
    unrecorded = [s for s in shards if f"{stage.folder}/{s}" not in stage.outputs]
    if unrecorded:
        report.add("manifest", stage.name, f"shard(s) in the manifest but not in the record: {_names(unrecorded)}",
                   f"dvc repro {stage.name} --force")
    return [r for r in rows if r["shard"] is not None]


def check_files(repo: Repository, stage: StageRecord, members: list[dict[str, Any]], report: AuditReport,
                rng: random.Random) -> None:
    """Every recorded output and raw input exists; their content (sampled, or all) has the recorded hash."""
    outputs = sorted(stage.outputs.items())
    raw = sorted((n, h) for n, h in stage.inputs.items() if repo.producer_of(n) is None)
    missing = [n for n, _ in outputs if not (repo.root / n).is_file()]
    gone = [n for n, _ in raw if not (repo.root / n).is_file()]
    report.files_seen += len(outputs) - len(missing)
    if missing:
        report.add("file", stage.name, f"{len(missing)} recorded output file(s) are missing: {_names(missing)}",
                   f"dvc checkout {stage.folder}, or dvc repro {stage.name}")
    if gone:
        report.add("file", stage.name, f"{len(gone)} raw input(s) it read are gone: {_names(gone)}",
                   f"restore them, or dvc repro {stage.name} on the inputs you have now")
    present = [(n, h) for n, h in outputs if n not in missing and not n.endswith(f"/{MANIFEST_NAME}")]
    raw_present = [(n, h) for n, h in raw if n not in gone]
    if not report.full:
        present = rng.sample(present, min(report.sample, len(present)))
        raw_present = rng.sample(raw_present, min(report.sample, len(raw_present)))
        members = rng.sample(members, min(report.sample, len(members)))
    for files, what, fix in ((present, "output file(s) differ from the record",
                              f"dvc checkout {stage.folder} (DVC's copy), or dvc repro {stage.name} --force"),
                             (raw_present, "raw input(s) changed since it ran", f"dvc repro {stage.name}")):
        changed = [n for n, h in files if _digest(repo.root / n) != h]
        report.files_hashed += len(files)
        if changed:
            report.add("file", stage.name, f"{len(changed)} {what}: {_names(changed)}", fix)
    bad, hashed = verify_items(repo.root / stage.folder, members)
    report.members_hashed += hashed
    if bad:
        report.add("file", stage.name, f"{len(bad)} shard item(s) differ from the manifest: {_names(bad)}",
                   f"dvc checkout {stage.folder}, or dvc repro {stage.name} --force")


def _digest(path: Path) -> str | None:
    """sha256 of a file, None when it cannot be read (which then differs from any recorded hash)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def _member_digest(tar: tarfile.TarFile, names: Mapping[str, tarfile.TarInfo], key: str) -> str | None:
    """The sha256 a manifest row with this ``key`` records: of the member ``key``, or, where ``key`` names a whole
    WebDataset sample (members ``key.<ext>``, as detail_pairs' rows do), of its members' bytes in the order of
    their extensions. None when the shard has neither."""
    if key in names:
        data = tar.extractfile(names[key])
        return None if data is None else sha256_bytes(data.read())
    parts = sorted(n for n in names if n.startswith(key + "."))
    if not parts:
        return None
    return sha256_bytes(b"".join(tar.extractfile(names[n]).read() for n in parts))  # type: ignore[union-attr]


def verify_items(folder: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], int]:
    """(ids whose content differs from their manifest row, items hashed) for rows of loose files and of shard
    members or samples; each shard is opened once."""
    bad, hashed = [], 0
    by_shard: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("path") is not None:
            path = folder / row["path"]
            hashed += 1
            if not path.is_file() or _digest(path) != row["sha256"]:
                bad.append(row["id"])
        elif row.get("shard") is not None:
            by_shard.setdefault(row["shard"], []).append(row)
    for shard, members in sorted(by_shard.items()):
        path = folder / shard
        if not path.is_file():
            bad += [r["id"] for r in members]
            continue
        with tarfile.open(path, "r:") as tar:
            names = {m.name: m for m in tar.getmembers() if m.isfile()}
            for row in members:
                hashed += 1
                if _member_digest(tar, names, row["key"] or row["id"]) != row["sha256"]:
                    bad.append(row["id"])
    return bad, hashed


def check_card(repo: Repository, stage: StageRecord, licences: Sequence[Carried], report: AuditReport) -> None:
    """The card is there, describes this output's inputs and carries the licences the lineage gives now."""
    card = repo.card(stage.name)
    if card is None:
        report.add("card", stage.name, f"no {CARD_NAME} (made before cards existed, or removed)",
                   f"dvc repro {stage.name} --force")
        return
    if card.get("inputs_listing") != listing_hash(stage.inputs):
        report.add("card", stage.name, f"{CARD_NAME} describes other inputs than the record",
                   f"dvc repro {stage.name} --force")
    carried = sorted(entry["id"] for entry in card.get("licences", []))
    now = sorted(c.licence.id for c in licences)
    if carried != now:
        report.add("card", stage.name, f"{CARD_NAME} carries licences {', '.join(carried) or 'none'}; its lineage "
                   f"gives {', '.join(now) or 'none'} today (a licence declaration changed, or an upstream card)",
                   f"dvc repro {stage.name} --force")


def check_licences(stage_licences: Mapping[str, Sequence[Carried]], use: Use, report: AuditReport) -> None:
    """A finding per licence that does not grant ``use``, naming every stage whose ancestry carries it."""
    found: dict[str, tuple[Carried, Permission, list[str]]] = {}
    for stage, union in sorted(stage_licences.items()):
        for carried, permission in not_permitted(union, use):
            found.setdefault(carried.licence.id, (carried, permission, []))[2].append(stage)
    for carried, permission, stages in found.values():
        lic = carried.licence
        report.add("licence", ", ".join(stages), f"{use} use {permission_text(permission)} by {lic.name} "
                   f"({lic.source}), via {_names(list(carried.via))}",
                   "do not use these for that, replace those sources, or declare your own licence for them in "
                   "params.yaml `licences.sources` (e.g. a commercial agreement)")


def audit(repo: Repository, *, full: bool = False, sample: int = DEFAULT_SAMPLE, seed: int = 0,
          use: Use | None = None, rules: LicenceRules | None = None, expected: Sequence[str] = ()) -> AuditReport:
    """Check every stage output of ``repo`` (see the module docstring); ``expected`` names the pipeline's stages,
    so that one never built is listed (not a problem) and one in dvc.lock without its output is."""
    report = AuditReport(full=full, sample=sample, use=use)
    report.stages = len(repo.stages)
    for name in sorted(set(repo.lock) - set(repo.stages)):
        report.add("record", name, f"dvc.lock has it, but its output or its {RECORD_NAME} is missing",
                   f"dvc checkout, or dvc repro {name}")
    report.not_built = sorted(set(expected) - set(repo.stages) - set(repo.lock))
    if not repo.stages:
        return report
    lineage = build_lineage(repo, [Target("stage", s, s) for s in sorted(repo.stages)], rules=rules)
    for name in sorted(repo.stages):
        stage = repo.stages[name]
        rng = random.Random(f"{seed}:{name}")  # a reproducible sample per stage
        check_links(repo, stage, report)
        check_lock(repo, stage, report)
        members = check_manifest(repo, stage, report)
        check_files(repo, stage, members, report, rng)
        check_card(repo, stage, lineage.stage_licences.get(name, []), report)
    if use is not None:
        check_licences(lineage.stage_licences, use, report)
    return report


def expected_stages(root: Path) -> list[str]:
    """The stage names of ``dvc.yaml`` (read as plain YAML; empty without one)."""
    import yaml

    path = root / "dvc.yaml"
    if not path.is_file():
        return []
    return sorted((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {}))
