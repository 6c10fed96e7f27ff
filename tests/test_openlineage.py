"""OpenLineage events: standard facets, valid against the published JSON schema, and delivered over HTTP.

The schemas are vendored in ``tests/openlineage_spec`` (see its README); a local HTTP consumer on
127.0.0.1 stands in for Marquez and stops by itself.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from referencing import Registry, Resource

from facedetail.io.lineage import ParentRef, iter_events
from facedetail.io.transaction import RunLayout, stage_output

SPEC = Path(__file__).parent / "openlineage_spec"
EVENT_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
OL_FACETS = "https://openlineage.io/spec/facets/"


def _registry() -> Registry:
    resources = [Resource.from_contents(json.loads(p.read_text())) for p in sorted(SPEC.rglob("*.json"))]
    return Registry().with_resources((r.contents["$id"], r) for r in resources)


REGISTRY = _registry()
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("uri", raises=ValueError)
def _is_uri(value: object) -> bool:
    """An absolute URI (jsonschema checks ``uri`` only with an optional package; this is the part that matters)."""
    return not isinstance(value, str) or bool(urlparse(value).scheme)


def _validate(instance: Any, ref: str) -> None:
    jsonschema.Draft202012Validator({"$ref": ref}, registry=REGISTRY, format_checker=FORMATS).validate(instance)


def _facets(event: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from event["run"]["facets"].items()
    yield from event["job"]["facets"].items()
    for dataset in event["inputs"] + event["outputs"]:
        yield from dataset["facets"].items()
        yield from dataset.get("inputFacets", {}).items()
        yield from dataset.get("outputFacets", {}).items()


def validate_event(event: dict[str, Any]) -> None:
    """The event against RunEvent, and every standard facet against the schema its ``_schemaURL`` names,
    under the key that schema gives it (``dataSource``, ``schema``, ...)."""
    _validate(event, EVENT_SCHEMA)
    for key, facet in _facets(event):
        url = facet["_schemaURL"]
        if url.startswith(OL_FACETS):
            document = url.split("#")[0]
            _validate(facet, url)
            assert key in REGISTRY.contents(document)["properties"], f"{key}: not the key {document} names"
            _validate({key: facet}, document)
        else:
            assert url.startswith("urn:facedetail:schema:"), f"{key}: unknown schema {url}"


def _run(root: Path, *, fail: bool = False, parent: ParentRef | None = None) -> None:
    """One stage transaction with a Parquet input and a Parquet output (and a failing variant)."""
    (root / "data/raw").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["a", "b", None], "v": [1.0, 2.0, 3.0]}), root / "data/raw/table.parquet")
    (root / "data/raw/blob.bin").write_bytes(b"raw bytes")
    layout = RunLayout(root, Path("data/demo"), Path("metrics/demo.json"))
    with stage_output("demo", {"n": 2}, [root / "data/raw"], layout, seed=3, parent=parent) as out:
        out.write_manifest([{"id": f"x{i}", "path": f"x{i}.bin", "sha256": "0" * 64, "bytes": 1, "params_hash": "k"}
                            for i in range(2)])
        for i in range(2):
            (out.dir / f"x{i}.bin").write_bytes(b"x")
        if fail:
            raise RuntimeError("boom")


def _events(root: Path) -> list[dict[str, Any]]:
    return list(iter_events(root / "data/lineage/events.jsonl"))


@pytest.fixture(autouse=True)
def _no_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENLINEAGE_URL", raising=False)


def test_events_carry_the_standard_facets_and_validate_against_the_schema(tmp_path: Path) -> None:
    _run(tmp_path, parent=ParentRef("prefect", "facedetail-pipeline", "0190a3b2-0000-7000-8000-000000000001"))
    with pytest.raises(RuntimeError, match="boom"):
        _run(tmp_path, fail=True)
    events = _events(tmp_path)
    assert [e["eventType"] for e in events] == ["START", "COMPLETE", "START", "FAIL"]
    for event in events:
        validate_event(event)
    start, complete, _, failed = events
    assert complete["run"]["facets"]["parent"]["run"]["runId"] == "0190a3b2-0000-7000-8000-000000000001"
    parent_job = complete["run"]["facets"]["parent"]["job"]
    assert (parent_job["namespace"], parent_job["name"]) == ("prefect", "facedetail-pipeline")
    assert complete["run"]["facets"]["processing_engine"]["name"] == "prefect"
    assert failed["run"]["facets"]["processing_engine"]["name"] == "python"
    error = failed["run"]["facets"]["errorMessage"]
    assert error["message"] == "RuntimeError: boom" and "raise RuntimeError" in error["stackTrace"]
    assert "errorMessage" not in complete["run"]["facets"]
    table_in = next(d for d in start["inputs"] if d["name"] == "data/raw/table.parquet")
    assert [f["name"] for f in table_in["facets"]["schema"]["fields"]] == ["id", "v"]
    assert table_in["inputFacets"]["dataQualityMetrics"]["rowCount"] == 3
    assert table_in["inputFacets"]["dataQualityMetrics"]["columnMetrics"]["id"]["nullCount"] == 1
    blob = next(d for d in start["inputs"] if d["name"] == "data/raw/blob.bin")
    assert set(blob["facets"]) == {"version", "dataSource"}  # not Parquet: no schema, no row count
    assert blob["facets"]["dataSource"]["uri"] == tmp_path.resolve().as_uri()
    manifest = next(d for d in complete["outputs"] if d["name"] == "data/demo/manifest.parquet")
    assert manifest["facets"]["dataQualityMetrics"]["rowCount"] == 2
    assert "id" in {f["name"] for f in manifest["facets"]["schema"]["fields"]}
    assert manifest["facets"]["version"]["datasetVersion"] == json.loads(
        (tmp_path / "data/demo/lineage.json").read_text())["outputs"]["data/demo/manifest.parquet"]


@pytest.mark.parametrize("breakage", ["no event time", "facet without producer", "metrics without columnMetrics",
                                      "bad run id"])
def test_the_schema_check_rejects_broken_events(tmp_path: Path, breakage: str) -> None:
    """The validation above can fail: each broken copy of a real event is refused."""
    _run(tmp_path)
    event = _events(tmp_path)[1]
    manifest = next(d for d in event["outputs"] if d["name"].endswith("manifest.parquet"))
    if breakage == "no event time":
        del event["eventTime"]
    elif breakage == "facet without producer":
        del event["run"]["facets"]["processing_engine"]["_producer"]
    elif breakage == "metrics without columnMetrics":
        del manifest["facets"]["dataQualityMetrics"]["columnMetrics"]
    else:
        event["run"]["runId"] = "not-a-uuid"
    with pytest.raises(jsonschema.ValidationError):
        validate_event(event)


class _Consumer(ThreadingHTTPServer):
    """An OpenLineage consumer on 127.0.0.1 that keeps what it is sent; stops by itself after ``life`` seconds."""

    daemon_threads = True

    def __init__(self, life: float = 60.0) -> None:
        self.received: list[dict[str, Any]] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(life, self.shutdown)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> _Consumer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        self.server.received.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_events_go_to_an_http_consumer_when_openlineage_url_is_set(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with _Consumer() as consumer:
        monkeypatch.setenv("OPENLINEAGE_URL", consumer.url)
        _run(tmp_path)
        with pytest.raises(RuntimeError):
            _run(tmp_path, fail=True)
    assert consumer.paths == ["/api/v1/lineage"] * 4
    assert [e["eventType"] for e in consumer.received] == ["START", "COMPLETE", "START", "FAIL"]
    for event in consumer.received:
        validate_event(event)
    assert consumer.received == _events(tmp_path), "the consumer gets exactly the events of the file"


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


@pytest.mark.parametrize("consumer", ["refuses connections", "never answers"])
def test_a_down_consumer_never_fails_a_stage_nor_slows_it_beyond_the_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, consumer: str) -> None:
    start = time.perf_counter()
    _run(tmp_path / "baseline")
    baseline = time.perf_counter() - start
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts connections; nobody reads or answers
        url = _refused_url() if consumer == "refuses connections" else f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("OPENLINEAGE_URL", url)
        monkeypatch.setenv("FACEDETAIL_OPENLINEAGE_TIMEOUT", "0.5")
        with caplog.at_level(logging.WARNING, logger="facedetail.io.lineage"):
            start = time.perf_counter()
            _run(tmp_path / "down")
            took = time.perf_counter() - start
    assert [e["eventType"] for e in _events(tmp_path / "down")] == ["START", "COMPLETE"], "the run completed"
    assert took < baseline + 0.5 + 0.75, f"{took:.2f} s with the consumer down vs {baseline:.2f} s"
    assert any(url in r.getMessage() for r in caplog.records), "the undelivered events are reported"
