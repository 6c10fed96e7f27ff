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

The events carry OpenLineage's standard facets: per dataset ``version`` (its SHA256) and
``dataSource``, and for Parquet files ``schema`` and the row count as ``dataQualityMetrics``; per run
``processing_engine`` (DVC, Prefect or plain Python), ``parent`` (the Prefect flow run) and, on
failure, ``errorMessage`` with the stack trace. With ``OPENLINEAGE_URL`` set (and optionally
``OPENLINEAGE_ENDPOINT``, ``OPENLINEAGE_API_KEY``) every event also goes to that consumer (e.g.
Marquez) through openlineage-python's HTTP transport, on a background thread: a consumer that is down
or slow never fails a stage, and delays it by at most ``FACEDETAIL_OPENLINEAGE_TIMEOUT`` seconds
(default 2) once, at the end of the run; undelivered events are logged as a warning and stay in the
events file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
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
    data_quality_metrics_dataset,
    data_quality_metrics_input_dataset,
    dataset_version_dataset,
    datasource_dataset,
    error_message_run,
    parent_run,
    processing_engine_run,
    schema_dataset,
    source_code_location_job,
)
from openlineage.client.generated.base import DatasetFacet, InputDatasetFacet, RunFacet
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.transport.http import ApiKeyTokenProvider, HttpConfig, HttpTransport, TokenProvider
from openlineage.client.uuid import generate_new_uuid

from facedetail.io.hashing import params_hash, sha256_file

NAMESPACE = "facedetail"
PRODUCER = "urn:facedetail"
_SCHEMA_BASE = "urn:facedetail:schema"
URL_ENV, ENDPOINT_ENV, API_KEY_ENV = "OPENLINEAGE_URL", "OPENLINEAGE_ENDPOINT", "OPENLINEAGE_API_KEY"
TIMEOUT_ENV = "FACEDETAIL_OPENLINEAGE_TIMEOUT"
DEFAULT_TIMEOUT_S = 2.0
"""Seconds an OpenLineage consumer may delay a stage run (once, when the run ends)."""
_log = logging.getLogger(__name__)

#: Distributions whose versions every lineage record lists.
TRACKED_PACKAGES = (
    "facedetail", "numpy", "scipy", "pandas", "pyarrow", "h5py", "torch", "eos-py", "pyrender",
    "PyOpenGL", "trimesh", "opencv-python-headless", "faiss-cpu", "faiss-gpu", "dlib-bin",
    "dvc", "prefect", "openlineage-python", "simplejpeg", "isal",
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


@attr.define
class RowCountsDatasetFacet(data_quality_metrics_dataset.DataQualityMetricsDatasetFacet):
    """OpenLineage's ``dataQualityMetrics`` dataset facet, declared as its 1-0-0 schema.

    openlineage-python names 1-0-1, whose only addition is ``captureDate``, which this facet never sets;
    1-0-0 is the version the published spec (and the schema test) has.
    """

    @staticmethod
    def _get_schema() -> str:
        return ("https://openlineage.io/spec/facets/1-0-0/DataQualityMetricsDatasetFacet.json"
                "#/$defs/DataQualityMetricsDatasetFacet")


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


UNHASHED = "not hashed: "
"""Start of the recorded version of an input that could not be hashed (``not hashed: unreadable file:
Permission denied``).

The run goes on: the stage that reads the input reports it (a photo is quarantined), and the
version, though not a hash, is the same on every run that finds the file in the same state."""


def expand_files(paths: Sequence[Path]) -> list[Path]:
    """Files named by ``paths``; folders are expanded recursively, in sorted order.

    Symlinked folders are not followed (no cycles) and only regular files (or links to them) are
    listed, so a FIFO in an input folder never blocks the hashing; a sub-folder that cannot be
    read is listed as itself, and :func:`input_version` records why.
    """
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found: list[Path] = []
            # os.walk, not rglob: rglob drops an unreadable sub-folder without a word.
            for folder, _, names in os.walk(p, onerror=lambda err, found=found: found.append(Path(err.filename))):
                found.extend(f for name in names if (f := Path(folder, name)).is_file())
            files.extend(sorted(found))
        else:
            files.append(p)
    return files


def input_name(path: Path, root: Path) -> str:
    """The dataset name of an input file: :func:`relative_name`, its bytes that are not UTF-8 shown as ``\\xNN``.

    POSIX file names are bytes; a name that is not UTF-8 would otherwise make every JSON and hash of the
    run's inputs fail to encode (the stage reports the file under the same escaped name).
    """
    return relative_name(path, root).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def input_version(path: Path) -> str:
    """The recorded version of an input file: its SHA256, or :data:`UNHASHED` and why it is unreadable."""
    from facedetail.io.decode import hash_file  # non-blocking and regular files only: never hangs on a FIFO

    digest = hash_file(path)
    return digest if isinstance(digest, str) else UNHASHED + digest.reason


def parquet_facets(path: Path) -> tuple[dict[str, DatasetFacet], int] | None:
    """(``schema`` facet, row count) of a Parquet file, from its footer alone; None if it is not one."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except (OSError, ValueError):  # not Parquet (or not readable): the version facet still names it
        return None
    schema = meta.schema_arrow
    fields = [schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type), ordinal_position=i + 1)
              for i, f in enumerate(schema)]
    return {"schema": schema_dataset.SchemaDatasetFacet(fields=fields, producer=PRODUCER)}, meta.metadata.num_rows


def _null_counts(path: Path) -> dict[str, int]:
    """Per-column null counts from a Parquet file's row-group statistics (columns without them left out)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    counts: dict[str, int] = {}
    missing: set[str] = set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema.split(".")[0]
            stats = column.statistics
            if column.path_in_schema != name or stats is None or not stats.has_null_count:
                missing.add(name)  # nested or without statistics: no count is better than a wrong one
                continue
            counts[name] = counts.get(name, 0) + stats.null_count
    return {k: v for k, v in sorted(counts.items()) if k not in missing}


def _bounded_timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        _log.warning("%s=%r is not a number of seconds; using %s", TIMEOUT_ENV, os.environ[TIMEOUT_ENV],
                     DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S
    return max(value, 0.0)


class HttpSender:
    """Sends events to an OpenLineage HTTP consumer on a daemon thread, through openlineage-python's transport.

    :meth:`send` never blocks; :meth:`flush` waits at most its timeout. A consumer that refuses, times
    out or answers an error is logged (once per sender, then counted) and never raises into the stage.
    """

    def __init__(self, url: str, endpoint: str = "api/v1/lineage", api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url, self.timeout = url, timeout
        auth = ApiKeyTokenProvider({"api_key": api_key}) if api_key else TokenProvider({})
        # One quick retry for a dropped connection; the request timeout bounds each attempt.
        retry = {"total": 1, "connect": 1, "read": 1, "backoff_factor": 0.1}
        self._transport = HttpTransport(HttpConfig(url=url, endpoint=endpoint, timeout=timeout, auth=auth,
                                                   retry=retry))
        self._queue: queue.Queue[RunEvent] = queue.Queue()
        self.delivered = 0
        self.failed = 0
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="openlineage-http", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> HttpSender | None:
        """A sender for ``OPENLINEAGE_URL`` (None when it is not set)."""
        url = os.environ.get(URL_ENV, "").strip()
        if not url:
            return None
        return cls(url, os.environ.get(ENDPOINT_ENV) or "api/v1/lineage", os.environ.get(API_KEY_ENV) or None,
                   _bounded_timeout())

    def send(self, event: RunEvent) -> None:
        """Queue ``event`` for the consumer."""
        self._queue.put(event)

    def _loop(self) -> None:
        while True:
            event = self._queue.get()
            try:
                self._transport.emit(event)
                self.delivered += 1
            except Exception as err:  # any failure of the consumer (or of the network) is not the stage's
                self.failed += 1
                if not self._warned:
                    self._warned = True
                    _log.warning("OpenLineage consumer %s did not take an event (%s: %s); events stay in the "
                                 "events file", self.url, type(err).__name__, str(err).splitlines()[0][:200])
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was sent (or failed), at most ``timeout`` seconds; True if none is left."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning("OpenLineage consumer %s: %d event(s) not delivered within %.1f s; they stay in the "
                                 "events file", self.url, self._queue.unfinished_tasks, self.timeout)
                    return False
                self._queue.all_tasks_done.wait(left)
        return True


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
        self._http = HttpSender.from_env()

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
                message=f"{type(error).__name__}: {error}", programmingLanguage="python",
                stackTrace="".join(traceback.format_exception(error)), producer=PRODUCER,
            )
        facets["processing_engine"] = self._engine()
        return facets

    def _engine(self) -> processing_engine_run.ProcessingEngineRunFacet:
        """What ran the stage: DVC (``dvc repro`` sets ``DVC_STAGE``), Prefect (a parent flow run), or Python."""
        if os.environ.get("DVC_STAGE"):
            name, version = "dvc", self._packages.get("dvc", "unknown")
        elif self.parent is not None and self.parent.namespace == "prefect":
            name, version = "prefect", self._packages.get("prefect", "unknown")
        else:
            name, version = "python", self._python
        return processing_engine_run.ProcessingEngineRunFacet(
            version=version, name=name, openlineageAdapterVersion=self._packages.get("facedetail", "unknown"),
            producer=PRODUCER)

    def _job(self) -> Job:
        facets = {}
        if self._commit:
            facets["sourceCodeLocation"] = source_code_location_job.SourceCodeLocationJobFacet(
                type="git", url=_git(self.root, "remote", "get-url", "origin") or "local",
                version=self._commit, path=f"stages/{self.stage}.py",
                producer=PRODUCER,
            )
        return Job(namespace=NAMESPACE, name=self.stage, facets=facets)

    def _datasets(self, hashes: Mapping[str, str], output: bool) -> list[InputDataset] | list[OutputDataset]:
        """Datasets with their version, data source and, for Parquet files, schema and row count."""
        source = datasource_dataset.DatasourceDatasetFacet(
            name=f"file://{self._host}", uri=Path(os.path.abspath(self.root)).as_uri(), producer=PRODUCER)
        datasets = []
        for name, digest in sorted(hashes.items()):
            facets: dict[str, DatasetFacet] = {
                "version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=digest, producer=PRODUCER),
                "dataSource": source,
            }
            per_role: dict[str, InputDatasetFacet] = {}
            path = self.root / name
            table = parquet_facets(path) if name.endswith(".parquet") and path.is_file() else None
            if table is not None:
                schema, rows = table
                facets.update(schema)
                nulls = _null_counts(path)
                if output:
                    facets["dataQualityMetrics"] = RowCountsDatasetFacet(
                        rowCount=rows, bytes=path.stat().st_size, fileCount=1, producer=PRODUCER,
                        columnMetrics={c: data_quality_metrics_dataset.ColumnMetrics(nullCount=n, count=rows)
                                       for c, n in nulls.items()})
                else:
                    per_role["dataQualityMetrics"] = \
                        data_quality_metrics_input_dataset.DataQualityMetricsInputDatasetFacet(
                            rowCount=rows, bytes=path.stat().st_size, fileCount=1, producer=PRODUCER,
                            columnMetrics={c: data_quality_metrics_input_dataset.ColumnMetrics(nullCount=n, count=rows)
                                           for c, n in nulls.items()})
            if output:
                datasets.append(OutputDataset(namespace="file", name=name, facets=facets))
            else:
                datasets.append(InputDataset(namespace="file", name=name, facets=facets, inputFacets=per_role))
        return datasets

    def _emit(self, state: RunState, outputs: Mapping[str, str] | None = None,
              error: BaseException | None = None) -> None:
        event = RunEvent(
            eventType=state, eventTime=_utcnow(), run=Run(runId=self.run_id, facets=self._run_facets(error)),
            job=self._job(), producer=PRODUCER,
            inputs=self._datasets(self.input_hashes, output=False),
            outputs=self._datasets(outputs or {}, output=True),
        )
        self._client.emit(event)
        if self._http is not None:
            self._http.send(event)
            if state != RunState.START:  # the run's last event: wait for the consumer, boundedly
                self._http.flush()

    def start(self) -> LineageRun:
        """Hash the inputs and emit START."""
        self.input_hashes = {
            input_name(f, self.root): input_version(f) for f in expand_files([Path(p) for p in self.inputs])
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
