"""Lineage of stage runs as OpenLineage run events.

Each stage run emits a START event and then a COMPLETE (or FAIL) event, appended to one
JSON-lines file through openlineage-python's file transport. Inputs and outputs are
datasets named by their path relative to the repository root and versioned by SHA256, so
"what produced this file?" is answered by matching a file's hash against the outputs of
COMPLETE events (see :func:`find_producer`). The run is also returned as a plain dict
(:meth:`LineageRun.record`: run id, times, host, git, packages), which the output transaction
keeps outside the outputs, and the part of it that the content depends on
(:meth:`LineageRun.content_record`: parameters, seed, input and output hashes), which it stores in
the output folder as ``lineage.json``: equal content, equal bytes.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    dataset_version_dataset,
    error_message_run,
    parent_run,
    source_code_location_job,
)
from openlineage.client.generated.base import RunFacet
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.uuid import generate_new_uuid

from facedetail.io.hashing import params_hash, sha256_file

NAMESPACE = "facedetail"
PRODUCER = "urn:facedetail"
_SCHEMA_BASE = "urn:facedetail:schema"

#: Distributions whose versions every lineage record lists.
TRACKED_PACKAGES = (
    "facedetail", "numpy", "scipy", "pandas", "pyarrow", "h5py", "torch", "eos-py", "pyrender",
    "PyOpenGL", "trimesh", "opencv-python-headless", "faiss-cpu", "faiss-gpu", "dlib-bin",
    "dvc", "prefect", "openlineage-python",
)


@attr.define
class ParametersRunFacet(RunFacet):
    """The stage's parameters, their hash and the run's global seed."""

    parameters: dict[str, Any]
    parametersHash: str  # noqa: N815
    seed: int | None = None

    @staticmethod
    def _get_schema() -> str:
        return f"{_SCHEMA_BASE}:ParametersRunFacet:1"


@attr.define
class EnvironmentRunFacet(RunFacet):
    """Where and with which software the run happened."""

    host: str
    python: str
    platform: str
    packages: dict[str, str]
    gitCommit: str | None = None  # noqa: N815
    gitDirty: bool | None = None  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return f"{_SCHEMA_BASE}:EnvironmentRunFacet:1"


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (absent distributions are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, working tree dirty?) of the git repository at ``root``, or (None, None)."""
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return None, None
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return head, bool(dirty)


def _utcnow() -> str:
    return datetime.now(UTC).isoformat()


def relative_name(path: Path, root: Path) -> str:
    """The dataset name of ``path``: relative to ``root`` when inside it, else absolute.

    Lexical (``..`` folded, symlinks not followed): a file that DVC links from its cache keeps the
    name of where it lies in the repository, not of its cache entry.
    """
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return absolute.as_posix()


def expand_files(paths: Sequence[Path]) -> list[Path]:
    """Files named by ``paths``; folders are expanded recursively, in sorted order."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            files.append(p)
    return files


@dataclass
class ParentRef:
    """The orchestrator run (e.g. a Prefect flow run) that started this stage run."""

    namespace: str
    name: str
    run_id: str


@dataclass
class LineageRun:
    """One stage run: emits START on construction via :meth:`start`, COMPLETE or FAIL after.

    Args:
        stage: stage name (the OpenLineage job name).
        params: the stage's parameters as plain data.
        inputs: input files or folders (folders are expanded to their files).
        events_file: JSON-lines file the events are appended to.
        root: repository root; dataset names are paths relative to it.
        seed: global seed of the run, if the stage uses randomness.
        parent: orchestrator run that started this one, if any.
    """

    stage: str
    params: Mapping[str, Any]
    inputs: Sequence[Path]
    events_file: Path
    root: Path
    seed: int | None = None
    parent: ParentRef | None = None
    content_params: Mapping[str, Any] | None = None
    """The parameters that shape the outputs (``params`` without run-only fields), for the content record."""
    run_id: str = field(default_factory=lambda: str(generate_new_uuid()))
    started: str = field(default_factory=_utcnow)
    input_hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events_file = Path(self.events_file)
        self.events_file.parent.mkdir(parents=True, exist_ok=True)
        self._client = OpenLineageClient(
            transport=FileTransport(FileConfig(log_file_path=str(self.events_file), append=True))
        )
        self._commit, self._dirty = git_state(self.root)
        # Looked up once per run: every event and the record carry the same environment.
        self._host, self._python = socket.gethostname(), sys.version.split()[0]
        self._packages = package_versions()

    def _run_facets(self, error: BaseException | None = None) -> dict[str, RunFacet]:
        facets: dict[str, RunFacet] = {
            "facedetail_parameters": ParametersRunFacet(
                parameters=dict(self.params), parametersHash=params_hash(self.params), seed=self.seed,
                producer=PRODUCER,
            ),
            "facedetail_environment": EnvironmentRunFacet(
                host=self._host, python=self._python, platform=platform.platform(),
                packages=self._packages, gitCommit=self._commit, gitDirty=self._dirty, producer=PRODUCER,
            ),
        }
        if self.parent is not None:
            facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=self.parent.run_id),
                job=parent_run.Job(namespace=self.parent.namespace, name=self.parent.name),
                producer=PRODUCER,
            )
        if error is not None:
            facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=f"{type(error).__name__}: {error}", programmingLanguage="python", producer=PRODUCER
            )
        return facets

    def _job(self) -> Job:
        facets = {}
        if self._commit:
            facets["sourceCodeLocation"] = source_code_location_job.SourceCodeLocationJobFacet(
                type="git", url=_git(self.root, "remote", "get-url", "origin") or "local",
                version=self._commit, path=f"stages/{self.stage}.py",
                producer=PRODUCER,
            )
        return Job(namespace=NAMESPACE, name=self.stage, facets=facets)

    @staticmethod
    def _versioned(hashes: Mapping[str, str], cls: type) -> list:
        return [
            cls(namespace="file", name=name, facets={
                "version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=h, producer=PRODUCER)
            })
            for name, h in sorted(hashes.items())
        ]

    def _emit(self, state: RunState, outputs: Mapping[str, str] | None = None,
              error: BaseException | None = None) -> None:
        event = RunEvent(
            eventType=state, eventTime=_utcnow(), run=Run(runId=self.run_id, facets=self._run_facets(error)),
            job=self._job(), producer=PRODUCER,
            inputs=self._versioned(self.input_hashes, InputDataset),
            outputs=self._versioned(outputs or {}, OutputDataset),
        )
        self._client.emit(event)

    def start(self) -> LineageRun:
        """Hash the inputs and emit START."""
        self.input_hashes = {
            relative_name(f, self.root): sha256_file(f) for f in expand_files([Path(p) for p in self.inputs])
        }
        self._emit(RunState.START)
        return self

    def complete(self, outputs: Mapping[str, Path]) -> dict[str, Any]:
        """Emit COMPLETE for ``outputs`` (dataset name -> file) and return the lineage record."""
        output_hashes = {name: sha256_file(p) for name, p in outputs.items()}
        self.complete_hashed(output_hashes)
        return self.record(output_hashes)

    def complete_hashed(self, output_hashes: Mapping[str, str]) -> None:
        """Emit COMPLETE for outputs already hashed (dataset name -> sha256).

        Stages hash their outputs while they are still in the temporary folder, store the
        record with them, swap the folder in, and only then call this.
        """
        self._emit(RunState.COMPLETE, outputs=output_hashes)

    def fail(self, error: BaseException) -> None:
        """Emit FAIL with the error message."""
        self._emit(RunState.FAIL, error=error)

    def content_record(self, output_hashes: Mapping[str, str]) -> dict[str, Any]:
        """What the outputs were made from: the same for every run that makes the same outputs."""
        params = self.params if self.content_params is None else self.content_params
        return {
            "stage": self.stage,
            "params": dict(params),
            "params_hash": params_hash(params),
            "seed": self.seed,
            "inputs": dict(sorted(self.input_hashes.items())),
            "outputs": dict(sorted(output_hashes.items())),
        }

    def record(self, output_hashes: Mapping[str, str]) -> dict[str, Any]:
        """The run as one plain, JSON-serializable dict: the content record plus when, where and with what."""
        return {
            **self.content_record(output_hashes),
            "params": dict(self.params),
            "params_hash": params_hash(self.params),
            "run_id": self.run_id,
            "started": self.started,
            "ended": _utcnow(),
            "git_commit": self._commit,
            "git_dirty": self._dirty,
            "packages": self._packages,
            "python": self._python,
            "host": self._host,
            "parent": None if self.parent is None else vars(self.parent),
            "events_file": relative_name(self.events_file, self.root),
        }


def iter_events(events_file: Path | str) -> Iterator[dict[str, Any]]:
    """Parsed events of a JSON-lines lineage file, oldest first (unreadable lines are skipped)."""
    path = Path(events_file)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def find_producer(events_file: Path | str, sha256: str) -> dict[str, Any] | None:
    """The newest COMPLETE event with an output whose version is ``sha256``, or None."""
    found = None
    for event in iter_events(events_file):
        if event.get("eventType") != "COMPLETE":
            continue
        for out in event.get("outputs") or []:
            if out.get("facets", {}).get("version", {}).get("datasetVersion") == sha256:
                found = event
    return found
