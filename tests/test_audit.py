"""``facedetail audit``: each kind of link broken in a copy of a real ``dvc repro``, then reported with its fix.

The repository is ``test_lineage.py``'s (face_model + a tiny render_expressions by ``dvc repro``); every test
breaks one thing in its own copy.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import copy_repo, set_params, sh
from test_lineage import expr_repo  # noqa: F401 (the shared fixture)
from typer.testing import CliRunner

from facedetail.cli import app
from facedetail.io.audit import audit, verify_items
from facedetail.io.lineage_graph import Repository

RUNNER = CliRunner()


def run_audit(repo: Path, *args: str) -> tuple[int, str]:
    result = RUNNER.invoke(app, ["audit", "--root", str(repo), *args])
    return result.exit_code, result.output


def findings(repo: Path, *args: str) -> list[dict]:
    code, out = run_audit(repo, "--json", *args)
    data = json.loads(out)
    assert code == (0 if data["ok"] else 1)
    return data["findings"]


@pytest.fixture
def repo(expr_repo: Path, tmp_path: Path) -> Path:  # noqa: F811
    return copy_repo(expr_repo, tmp_path / "repo")


def test_an_intact_repository_passes_and_says_what_it_checked(expr_repo: Path) -> None:  # noqa: F811
    code, out = run_audit(expr_repo)
    assert code == 0, out
    assert "facedetail audit: 2 stage output(s), 1 recorded link(s)" in out
    assert "intact: every recorded link, file and licence holds" in out
    assert "not built yet (nothing to check): capture_gt," in out
    code, out = run_audit(expr_repo, "--full")
    assert code == 0 and "(every file)" in out


def test_a_stage_rerun_upstream_is_a_broken_link_and_its_fix_mends_it(repo: Path) -> None:
    set_params(repo, "face_model", albedo_components=2)
    sh([sys.executable, "-m", "stages.face_model"], repo)  # outside DVC: its consumer is not rerun
    found = findings(repo)
    kinds = {(f["kind"], f["stage"]) for f in found}
    assert ("link", "render_expressions") in kinds
    link = next(f for f in found if f["kind"] == "link")
    assert "data/face_model/model.npz was" in link["message"] and link["fix"] == "dvc repro render_expressions"
    lock = next(f for f in found if f["kind"] == "dvc.lock")
    assert lock["stage"] == "face_model" and "albedo_components 4 (output made with 2)" in lock["message"]
    code, out = run_audit(repo)
    assert code == 1 and "fix: dvc repro render_expressions" in out
    sh(["dvc", "repro", "render_expressions"], repo)  # the fix the audit gave
    assert findings(repo) == []


def test_a_run_outside_dvc_with_other_params_disagrees_with_dvc_lock(repo: Path) -> None:
    set_params(repo, "render_expressions", count=12)  # one more shard than dvc.lock knows
    sh([sys.executable, "-m", "stages.render_expressions"], repo)
    found = [f for f in findings(repo) if f["kind"] == "dvc.lock"]
    assert {f["stage"] for f in found} == {"render_expressions"}
    messages = " | ".join(f["message"] for f in found)
    assert "count 8 (output made with 12)" in messages
    assert "only in the record shards/shard-00002.tar" in messages


def test_a_changed_manifest_disagrees_with_the_record(repo: Path) -> None:
    path = repo / "data/render_expressions/manifest.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(1), path)  # one row fewer
    found = findings(repo)
    assert [(f["kind"], f["stage"]) for f in found] == [("manifest", "render_expressions")]
    assert "dvc repro render_expressions --force" in found[0]["fix"]


def _corrupt_member(shard: Path, member: str) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    shard.unlink()
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == member:
                data = data[:-1] + bytes([data[-1] ^ 1])
            tar.addfile(m, io.BytesIO(data))


def test_a_changed_shard_member_a_changed_file_and_a_missing_one_are_found(repo: Path) -> None:
    out = repo / "data/render_expressions"
    _corrupt_member(out / "shards/shard-00001.tar", "expr-0000006.png")
    (out / "contact_sheet.png").write_bytes(b"not the contact sheet")
    (repo / "data/face_model/preview.png").unlink()
    found = findings(repo, "--full")
    messages = {(f["stage"], f["message"]) for f in found if f["kind"] == "file"}
    assert ("render_expressions", "1 shard item(s) differ from the manifest: expr-0000006") in messages
    assert any(s == "render_expressions" and "output file(s) differ from the record" in m and "shard-00001.tar" in m
               and "contact_sheet.png" in m for s, m in messages), messages
    assert ("face_model", "1 recorded output file(s) are missing: data/face_model/preview.png") in messages
    # the sampled audit finds the member too when the sample covers the set, and names its seed-stable sample
    assert any("expr-0000006" in f["message"] for f in findings(repo, "--sample", "8"))


def test_a_sample_is_reproducible_and_smaller_than_full(expr_repo: Path) -> None:  # noqa: F811
    one = audit(Repository.load(expr_repo), sample=2, seed=5)
    two = audit(Repository.load(expr_repo), sample=2, seed=5)
    full = audit(Repository.load(expr_repo), full=True)
    assert (one.files_hashed, one.members_hashed) == (two.files_hashed, two.members_hashed)
    assert one.members_hashed == 2 < full.members_hashed == 8


def test_a_raw_input_changed_since_the_run_is_found(repo: Path) -> None:
    contours = repo / "data/external/eos-share/sfm_model_contours.json"
    contours.write_text(contours.read_text() + " ")
    found = findings(repo, "--full")
    assert [(f["kind"], f["stage"]) for f in found] == [("file", "face_model")]
    assert "raw input(s) changed since it ran: data/external/eos-share/sfm_model_contours.json" in found[0]["message"]


def test_a_missing_output_and_a_missing_card_are_found(repo: Path) -> None:
    (repo / "data/face_model/CARD.md").unlink()
    import shutil

    shutil.rmtree(repo / "data/render_expressions")
    kinds = {(f["kind"], f["stage"]) for f in findings(repo)}
    assert ("record", "render_expressions") in kinds
    assert ("card", "face_model") in kinds


def test_commercial_use_fails_on_the_surrey_model_and_research_passes(expr_repo: Path) -> None:  # noqa: F811
    code, out = run_audit(expr_repo, "--licence", "commercial")
    assert code == 1
    assert "[licence] face_model, render_expressions: commercial use not permitted by Surrey Face Model licence" in out
    assert run_audit(expr_repo, "--licence", "research")[0] == 0
    assert run_audit(expr_repo, "--licence", "resale")[0] == 2


def test_a_declared_licence_clears_commercial_use_but_leaves_the_cards_stale(repo: Path) -> None:
    """Declaring a commercial agreement for the eos share changes today's lineage; the cards still record the old
    union until the stages rerun, and the audit says so."""
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["licences"] = {"sources": {"data/external/eos-share": {"name": "Surrey commercial licence (ours)",
                                                                 "commercial": "yes"}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    found = findings(repo, "--licence", "commercial")
    assert {f["kind"] for f in found} == {"card"}, found
    assert "carries licences eos-apache-2.0, surrey-face-model" in found[0]["message"]
    sh(["dvc", "repro", "--force", "render_expressions"], repo)
    sh(["dvc", "repro", "--force", "face_model"], repo)
    assert findings(repo, "--licence", "commercial") == []


def test_verify_checks_members_and_whole_samples(tmp_path: Path) -> None:
    """A row whose key names a WebDataset sample (detail_pairs') is checked over the sample's members."""
    from facedetail.io.hashing import sha256_bytes

    shard = tmp_path / "s.tar"
    parts = {"a.json": b"{}", "a.png": b"png", "b.png": b"other"}
    with tarfile.open(shard, "w") as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = [{"id": "a", "shard": "s.tar", "key": "a", "sha256": sha256_bytes(b"{}" + b"png")},
            {"id": "b", "shard": "s.tar", "key": "b.png", "sha256": sha256_bytes(b"other")},
            {"id": "c", "shard": "s.tar", "key": "c", "sha256": "0" * 64}]
    assert verify_items(tmp_path, rows) == (["c"], 3)
