"""CARD.md: a deterministic dataset card beside every manifest, and the licences it carries downstream.

Toy stages on the real stage machinery (``stages._common.Stage``): what a card says comes from this module's
docstring, the manifest, the quarantine table, the metrics and the upstream cards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from facedetail.io.cards import CARD_NAME, read_card
from facedetail.io.manifest import MANIFEST_NAME
from facedetail.io.tables import QUARANTINE_NAME, write_quarantine
from facedetail.io.transaction import StageOutput
from stages._common import Input, ParamsError, Stage, StageParams


class ToyParams(StageParams):
    """A toy stage's params."""

    n: int = 4
    source: str = "data/external/photos"


def _photos_inputs(params: ToyParams) -> list[Input]:
    return [Input(params.source, remedy="make the photos", kind="folder")]


def _build_photos(params: ToyParams, root: Path, out: StageOutput) -> dict[str, Any]:
    rows = []
    for i in range(params.n):
        (out.dir / f"p{i}.bin").write_bytes(bytes([i]))
        rows.append({"id": f"p{i}", "path": f"p{i}.bin", "sha256": "", "bytes": 1, "params_hash": "k", "seed": i,
                     "label": ["happy", "sad"][i % 2], "yaw": float(i * 10 - 10)})
    from facedetail.io.hashing import sha256_file

    for row in rows:
        row["sha256"] = sha256_file(out.dir / row["path"])
    out.write_manifest(rows)
    write_quarantine(out.dir / QUARANTINE_NAME, [{"id": "bad1", "path": "x.jpg", "reason": "no face: score 0.1"},
                                                 {"id": "bad2", "path": "y.jpg", "reason": "no face: too small"},
                                                 {"id": "bad3", "path": "z.jpg", "reason": "truncated file"}])
    out.metrics = {"faces": params.n, "nested": {"score": 0.5}}
    return {"faces": params.n}


PHOTOS = Stage("photos", ToyParams, _build_photos, _photos_inputs, seed=lambda p: 7, headline=("faces", "nested.score"),
               limits="Toy photos only.", sources=lambda p, out: ("skimage-astronaut",))


def _derived_inputs(params: ToyParams) -> list[Input]:
    return [Input("data/photos", "photos", kind="folder")]


def _build_derived(params: ToyParams, root: Path, out: StageOutput) -> dict[str, Any]:
    (out.dir / "model.bin").write_bytes(b"derived")
    out.write_manifest([{"id": "model", "path": "model.bin", "sha256": "", "bytes": 7, "params_hash": "k"}])
    return {}


DERIVED = Stage("derived", ToyParams, _build_derived, _derived_inputs)


def _root(tmp_path: Path, licences: dict[str, Any] | None = None) -> Path:
    root = tmp_path / "repo"
    (root / "data/external/photos").mkdir(parents=True)
    for i in range(3):
        (root / f"data/external/photos/{i}.jpg").write_bytes(b"jpeg %d" % i)
    (root / "params.yaml").write_text(yaml.safe_dump({"licences": licences} if licences is not None else {}))
    return root


def _run_both(root: Path) -> tuple[str, str]:
    PHOTOS.run(ToyParams(), root)
    DERIVED.run(ToyParams(), root)
    return ((root / "data/photos" / CARD_NAME).read_text(), (root / "data/derived" / CARD_NAME).read_text())


def test_a_card_says_what_how_many_which_distributions_sources_and_how_to_reproduce(tmp_path: Path) -> None:
    root = _root(tmp_path, {"sources": {"data/external/photos": "affectnet"}})
    card, _ = _run_both(root)
    lineage = json.loads((root / "data/photos/lineage.json").read_text())
    assert card.startswith("---\n") and "# Dataset card: `photos`" in card
    assert "CARD.md: a deterministic dataset card" in card, "the description is the stage module's docstring"
    assert "* 4 items in `manifest.parquet`" in card and "* 3 inputs quarantined" in card
    assert "* **label**: happy 2 · sad 2" in card
    assert "| yaw | -10 | 0 | 20 | 4 |" in card, "min, exact median (lower), max and count of a numeric column"
    assert "**Quarantined inputs** (3, see `quarantine.parquet`): no face 2 · truncated file 1" in card
    assert "* faces: 4" in card and "* nested.score: 0.5" in card
    assert f"dvc repro photos   # params hash {lineage['params_hash']}" in card
    assert "## Known limits\n\nToy photos only." in card
    assert "`data/external/photos/` (3 files)" in card and "| affectnet | photos |" in card
    assert "`scikit-image`" in card and "public-domain" in card
    assert "* **Commercial use: not permitted** (AffectNet research licence)." in card
    front = read_card(root / "data/photos" / CARD_NAME)
    assert front["items"] == 4 and front["quarantined"] == 3 and front["params_hash"] == lineage["params_hash"]
    assert {s["kind"] for s in front["sources"]} == {"files", "package"}
    assert front["permits"] == {"commercial": "no", "research": "yes"}
    assert "data/photos/CARD.md" in lineage["outputs"], "the card is a hashed output like any other"


def test_cards_are_byte_identical_on_rerun_and_free_of_run_facts(tmp_path: Path) -> None:
    root = _root(tmp_path)
    first = _run_both(root)
    again = _run_both(root)
    assert first == again
    run = json.loads((root / "data/lineage/runs/photos.json").read_text())
    for card in first:
        for fact in (run["run_id"], run["host"], run["started"][:19], str(root)):
            assert fact not in card


def test_licences_travel_from_every_ancestor_to_the_derived_card(tmp_path: Path) -> None:
    root = _root(tmp_path, {"sources": {"data/external/photos": {"name": "Consented photos", "commercial": True}}})
    _, derived = _run_both(root)
    front = read_card(root / "data/derived" / CARD_NAME)
    ids = {entry["id"]: entry for entry in front["licences"]}
    assert set(ids) == {"declared:data/external/photos", "public-domain"}
    assert ids["declared:data/external/photos"]["name"] == "Consented photos"
    assert ids["declared:data/external/photos"]["via"] == ["data/external/photos"]
    assert [s["read_by"] for s in front["sources"]] == [["photos"], ["photos"]]
    assert front["permits"]["commercial"] == "yes", "a declared commercial licence and a public-domain photo"
    assert "**Commercial use: permitted**" in derived
    assert front["unrecorded"] == []


def test_an_undeclared_raw_input_is_not_shown_to_permit_any_use(tmp_path: Path) -> None:
    root = _root(tmp_path)
    _, derived = _run_both(root)
    front = read_card(root / "data/derived" / CARD_NAME)
    assert "undeclared" in {entry["id"] for entry in front["licences"]}
    assert front["permits"] == {"commercial": "unknown", "research": "unknown"}
    assert "declare it in the `licences` section of params.yaml" in derived


def test_an_upstream_without_a_card_is_named_not_skipped(tmp_path: Path) -> None:
    root = _root(tmp_path)
    PHOTOS.run(ToyParams(), root)
    (root / "data/photos" / CARD_NAME).unlink()
    DERIVED.run(ToyParams(), root)
    front = read_card(root / "data/derived" / CARD_NAME)
    assert front["unrecorded"] == ["data/photos"]
    assert "**Incomplete:** upstream output(s) without a card: data/photos" in (
        root / "data/derived" / CARD_NAME).read_text()


@pytest.mark.parametrize(("licences", "problem"), [
    ({"sources": {"data/x": "no-such-licence"}}, "unknown licence 'no-such-licence'"),
    ({"sources": {"data/x": {"name": "mine", "commercial": "maybe"}}}, "commercial"),
    ({"rules": {}}, "rules: Extra inputs are not permitted"),
])
def test_a_bad_licences_section_is_a_one_line_params_error_before_the_run(tmp_path: Path, licences: dict,
                                                                         problem: str) -> None:
    root = _root(tmp_path, licences)
    with pytest.raises(ParamsError, match=problem) as err:
        PHOTOS.run(ToyParams(), root)
    assert "\n" not in str(err.value)
    assert not (root / "data/photos").exists() and not (root / "data/lineage").exists(), "nothing ran"


def test_a_card_reads_every_column_kind_of_a_real_manifest(tmp_path: Path) -> None:
    """Lists, nulls and booleans are summarised or named, never dropped silently."""
    from facedetail.io.cards import distributions
    from facedetail.io.manifest import read_manifest, write_manifest

    rows = [{"id": f"i{i}", "path": f"{i}", "sha256": "0", "bytes": 1, "params_hash": "k", "beta": [0.1, 0.2],
             "visible": i % 2 == 0, "note": None, "score": None if i == 0 else float(i)} for i in range(5)]
    write_manifest(tmp_path / MANIFEST_NAME, rows)
    lines, skipped = distributions(read_manifest(tmp_path / MANIFEST_NAME))
    assert skipped == ["beta"]
    assert "* **visible**: True 3 · False 2" in lines
    assert "| score | 1 | 2 | 4 | 4 |" in lines, "nulls are left out of the numbers and the count says so"
    assert not any("note" in line for line in lines), "an all-null column has nothing to show"


@pytest.mark.slow
def test_the_prefect_flow_publishes_each_card_as_a_markdown_artifact(tmp_path: Path, eos_share: Path) -> None:
    from conftest import make_repo, set_params
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import run_stage

    repo = make_repo(tmp_path / "repo", eos_share, dvc=False)
    set_params(repo, "face_model", preview_size=64)

    @flow
    def one_stage() -> None:
        run_stage("face_model", "stages.face_model", str(repo))

    with prefect_test_harness(server_startup_timeout=120):
        one_stage()
        with get_client(sync_client=True) as client:
            cards = [a for a in client.read_artifacts() if a.key == "face-model-card"]
    assert cards and cards[0].type == "markdown"
    assert cards[0].data == (repo / "data/face_model" / CARD_NAME).read_text()
