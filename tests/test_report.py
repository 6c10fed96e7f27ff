"""The end-of-run summary: what each stage made, its headline metrics, where to look."""

from __future__ import annotations

import json
from pathlib import Path

from facedetail.io.manifest import write_manifest
from facedetail.io.report import StageView, metric, stage_block, summary_text
from facedetail.io.tables import write_quarantine


def _stage(root: Path) -> StageView:
    out = root / "data/demo"
    (out / "shards").mkdir(parents=True)
    (out / "shards/a.bin").write_bytes(b"x" * 1500)
    (out / "sheet.png").write_bytes(b"png")
    write_manifest(out / "manifest.parquet", [
        {"id": f"i{k}", "path": None, "shard": "shards/a.bin", "key": f"i{k}", "sha256": "0", "bytes": 1,
         "params_hash": "k"} for k in range(3)])
    write_quarantine(out / "quarantine.parquet", [{"id": "bad", "path": "x.jpg", "reason": "no face detected"}])
    (root / "metrics").mkdir()
    (root / "metrics/demo.json").write_text(json.dumps({"fitted": 1234, "error": {"median": 0.123456}}))
    return StageView("demo", Path("data/demo"), Path("metrics/demo.json"),
                     ("fitted", "error.median", "missing.key"), ("sheet.png", "absent.png"))


def test_metric_reads_dotted_keys() -> None:
    data = {"a": {"b": 2}, "c": 1}
    assert (metric(data, "a.b"), metric(data, "c"), metric(data, "a.x"), metric(data, "c.d")) == (2, 1, None, None)


def test_a_stage_block_counts_items_quarantine_files_and_shows_headlines(tmp_path: Path) -> None:
    view = _stage(tmp_path)
    lines = stage_block(view, tmp_path)
    files = sorted(p for p in (tmp_path / "data/demo").rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files) / 1000
    assert lines[0] == (f"demo: 3 items; {len(files)} files, {size:.1f} kB; 1 input quarantined "
                        "(see data/demo/quarantine.parquet)")
    assert lines[1] == "    fitted 1,234 · error.median 0.1235"  # absent keys are left out, not shown as None
    assert lines[2] == "    look at data/demo/sheet.png"


def test_a_stage_not_built_says_how_to_build_it(tmp_path: Path) -> None:
    view = StageView("later", Path("data/later"), Path("metrics/later.json"), ("x",), ())
    assert stage_block(view, tmp_path) == ["later: not built yet (dvc repro later)"]
    assert summary_text([view], tmp_path).splitlines()[-1].startswith("full metrics: dvc metrics show")


def test_the_summary_of_the_real_stages_is_short(tmp_path: Path) -> None:
    """Every stage of dvc.yaml declares headline metrics, and the whole summary stays a screenful."""
    from flows.summary import views

    root = Path(__file__).resolve().parents[1]
    stage_views = views(root)
    assert [v.name for v in stage_views][:2] == ["face_model", "render_expressions"]
    assert all(2 <= len(v.headline) <= 3 for v in stage_views)
    assert summary_text(stage_views, tmp_path).count("not built yet") == len(stage_views)


def test_a_stage_whose_manifest_lists_files_counts_its_items_by_metric(tmp_path: Path) -> None:
    view = _stage(tmp_path)
    by_metric = StageView(view.name, view.out_dir, view.metrics, ("fitted",), (), items="fitted")
    assert stage_block(by_metric, tmp_path)[0].startswith("demo: 1,234 items; ")
