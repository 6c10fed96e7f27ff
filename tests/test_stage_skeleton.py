"""The stage skeleton: field roles and content keys, strict params, the output transaction, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from facedetail.config import Config, content_key, input_path, run_only, set_level
from facedetail.io.lineage import iter_events
from facedetail.io.transaction import RunLayout, stage_output
from stages._common import ParamsError, StageParams, load_section, validate_params

ROOT = Path(__file__).resolve().parents[1]


# --- content keys -------------------------------------------------------------------------------


class Inner(Config):
    depth: float = 1.0


class Before(Config):
    size: int = 64
    inner: Inner = Inner()
    workers: int = run_only(0)


def _with_field(**field: object) -> type[Config]:
    """``Before`` plus one field declared as given: what a developer adding a param writes."""
    return type("After", (Before,), {"__annotations__": {"added": int}, "added": field["value"]})


def test_a_new_field_changes_the_key_unless_it_is_declared_out() -> None:
    before = content_key(Before())
    assert content_key(_with_field(value=3)()) != before          # a plain field is in the key
    assert content_key(_with_field(value=run_only(3))()) == before
    assert content_key(_with_field(value=set_level(3))()) == before
    assert content_key(_with_field(value=input_path(3))()) == before


def test_key_follows_content_not_run_fields_nor_paths() -> None:
    base = Before()
    assert content_key(base.model_copy(update={"workers": 8})) == content_key(base)
    assert content_key(Before(inner=Inner(depth=2.0))) != content_key(base)   # nested configs count
    assert content_key(base, {"model": "aa"}) != content_key(base, {"model": "bb"})  # input content counts


def test_a_switched_off_steps_settings_are_not_in_the_key() -> None:
    """An optional step that is off changes no output, so its settings must not invalidate what was built."""
    base = Before()
    changed = Before(inner=Inner(depth=2.0))
    assert content_key(changed, switched_off=("inner",)) == content_key(base, switched_off=("inner",))
    assert content_key(base, switched_off=("inner",)) != content_key(base)


def test_every_stage_declares_workers_run_only() -> None:
    """No stage's worker count can change an output or a reuse key."""
    from facedetail.config import field_role
    from flows.dag import load_stage, stage_order

    with_workers = []
    for name, module in stage_order(ROOT):
        model = load_stage(module).params_model
        if "workers" in model.model_fields:
            assert field_role(model, "workers") == "run", name
            with_workers.append(name)
    assert len(with_workers) >= 5, with_workers


# --- strict params ------------------------------------------------------------------------------


class Demo(StageParams):
    count: int = 1
    scale: float = 1.0
    span: tuple[float, float] = (0.0, 1.0)


@pytest.mark.parametrize("section, problem", [
    ({"count": True}, "valid integer"),
    ({"count": 2.0}, "valid integer"),
    ({"count": "3"}, "valid integer"),
    ({"scale": float("inf")}, "finite number"),
    ({"scale": float("nan")}, "finite number"),
    ({"colour": "red"}, "Extra inputs"),
])
def test_strict_params_reject_what_lax_parsing_would_coerce(section: dict, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        validate_params(Demo, section)


def test_strict_params_take_yaml_lists_for_tuples_and_ints_for_floats() -> None:
    params = validate_params(Demo, {"span": [1, 2], "scale": 3})
    assert params.span == (1.0, 2.0) and params.scale == 3.0


@pytest.mark.parametrize("text, problem", [
    ("demo: [1, 2\n", "not valid YAML"),
    ("- demo\n", "must be a mapping of stage sections"),
    ("demo: just a string\n", "section 'demo' must be a mapping"),
    ("demo: [1, 2]\n", "section 'demo' must be a mapping"),
])
def test_broken_params_files_are_one_line_errors(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=problem) as err:
        load_section(tmp_path / "params.yaml", "demo")
    assert "\n" not in str(err.value)


# --- the output transaction ---------------------------------------------------------------------


def _transaction(root: Path, content: bytes, fail: bool = False) -> None:
    (root / "in.txt").write_bytes(b"input")
    layout = RunLayout(root, Path("data/demo"), Path("metrics/demo.json"), work_dir=Path("data/.partial/demo"))
    (root / "data/.partial/demo").mkdir(parents=True, exist_ok=True)
    with stage_output("demo", {"a": 1}, [root / "in.txt"], layout, seed=5) as out:
        (out.dir / "x.bin").write_bytes(content)
        out.write_manifest([{"id": "x", "path": "x.bin", "sha256": "0" * 64, "bytes": 1, "params_hash": "k"}])
        out.metrics = {"items": 1}
        if fail:
            raise RuntimeError("boom")


def test_transaction_writes_outputs_records_and_removes_the_work_dir(tmp_path: Path) -> None:
    _transaction(tmp_path, b"one")
    out = tmp_path / "data/demo"
    assert sorted(p.name for p in out.iterdir()) == ["lineage.json", "manifest.parquet", "x.bin"]
    content = json.loads((out / "lineage.json").read_text())
    run = json.loads((tmp_path / "data/lineage/runs/demo.json").read_text())
    assert content["outputs"] == run["outputs"] and "data/demo/x.bin" in content["outputs"]
    # the manifest's hash of x.bin is taken as given (not re-read): the transaction hashes each file once
    assert content["outputs"]["data/demo/x.bin"] == "0" * 64
    assert json.loads((tmp_path / "metrics/demo.json").read_text()) == {"items": 1}
    assert not (tmp_path / "data/.partial/demo").exists()
    first_content = (out / "lineage.json").read_bytes()
    _transaction(tmp_path, b"one")
    assert (out / "lineage.json").read_bytes() == first_content  # same content, same bytes
    assert json.loads((tmp_path / "data/lineage/runs/demo.json").read_text())["run_id"] != run["run_id"]


def test_a_failed_transaction_keeps_the_previous_output_and_records_the_failure(tmp_path: Path) -> None:
    _transaction(tmp_path, b"one")
    before = {p.name: p.read_bytes() for p in (tmp_path / "data/demo").iterdir()}
    (tmp_path / "data/.partial/demo").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="boom"):
        _transaction(tmp_path, b"two", fail=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/demo").iterdir()} == before
    assert (tmp_path / "data/.partial/demo").is_dir()  # resumable work survives a failure
    assert [e["eventType"] for e in iter_events(tmp_path / "data/lineage/events.jsonl")][-2:] == ["START", "FAIL"]
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".demo")]


# --- one-line errors through the CLI ------------------------------------------------------------


def _cli(module: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"stages.{module}", "--root", str(root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _params(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(text)
    return root


def _assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("module, text, needles", [
    ("render_expressions", "render_expressions:\n  count: true\n", ("count", "valid integer")),
    ("render_expressions", "render_expressions:\n  sampling:\n    pose:\n      translate_px: .inf\n",
     ("sampling.pose.translate_px", "finite number")),
    ("capture_gt", "capture_gt: just a string\n", ("section 'capture_gt' must be a mapping",)),
    ("capture_gt", "capture_gt: [1, 2]\n", ("section 'capture_gt' must be a mapping",)),
    ("capture_gt", "capture_gt:\n  process:\n    resolution: [512\n", ("not valid YAML",)),
])
def test_bad_params_are_one_line_errors(tmp_path: Path, module: str, text: str, needles: tuple[str, ...]) -> None:
    _assert_one_line(_cli(module, _params(tmp_path, text)), *needles)


def test_a_model_that_is_not_a_model_is_one_line_error(tmp_path: Path) -> None:
    root = _params(tmp_path, "render_expressions:\n  workers: 2\ncapture_gt:\n  captures: data/captures\n")
    (root / "data/face_model").mkdir(parents=True)
    (root / "data/face_model/model.npz").write_text("this is not a model\n")
    (root / "data/captures").mkdir()
    for module in ("render_expressions", "capture_gt"):
        _assert_one_line(_cli(module, root), "not a facedetail morphable model")
    assert not (root / "data/.partial/render_expressions").exists()  # refused before any worker started


def test_a_dictionary_folder_without_its_index_is_one_line_error(tmp_path: Path, model_npz: Path) -> None:
    root = _params(tmp_path, "wild_proxy:\n  input: photos\n  eos_share: ''\n")
    (root / "photos").mkdir()
    (root / "data/face_model").mkdir(parents=True)
    shutil.copy(model_npz, root / "data/face_model/model.npz")
    (root / "data/dictionary").mkdir()
    (root / "data/dictionary/dictionary.json").write_text("{}")
    (root / "data/dictionary/entries.parquet").write_text("")
    _assert_one_line(_cli("wild_proxy", root), "index.faiss", "dvc repro dictionary")


def test_input_hashes_name_files_where_they_lie_and_cover_empty_folders(tmp_path: Path) -> None:
    """A file that DVC links from its cache keeps its repository name; a folder's hash is its listing."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache/blob").write_bytes(b"scan")
    folder = tmp_path / "data/items"
    (folder / "a").mkdir(parents=True)
    (folder / "a/scan.ply").symlink_to(tmp_path / "cache/blob")
    (folder / "empty").mkdir()
    hashes = {}
    layout = RunLayout(tmp_path, Path("data/out"))
    with stage_output("demo", {}, [folder], layout) as out:
        (out.dir / "x").write_text("x")
        hashes = {"a": out.input_hash(folder / "a"), "empty": out.input_hash(folder / "empty"),
                  "all": out.input_hash(folder), "file": out.input_hash(folder / "a/scan.ply")}
        with pytest.raises(KeyError, match="not an input"):
            out.input_hash(tmp_path / "elsewhere.txt")
    from facedetail.io.hashing import listing_hash, sha256_bytes

    assert hashes["file"] == sha256_bytes(b"scan")
    assert hashes["a"] == listing_hash({"scan.ply": sha256_bytes(b"scan")})
    assert hashes["empty"] == listing_hash({})
    assert hashes["all"] == listing_hash({"a/scan.ply": sha256_bytes(b"scan")})


def test_the_stages_that_need_no_torch_start_without_it() -> None:
    # Each `dvc repro` stage is its own process: torch's import (~2.3 s here, through webdataset's package)
    # was most of these stages' start-up. One interpreter imports them in turn and names the first that pulls
    # torch or webdataset in.
    code = ("import importlib, sys\n"
            "for name in ('face_model', 'render_expressions', 'render_faces', 'capture_synth', 'capture_gt',\n"
            "             'wild_synth', 'detail_pca'):\n"
            "    importlib.import_module(f'stages.{name}')\n"
            "    heavy = sorted(m for m in ('torch', 'webdataset') if m in sys.modules)\n"
            "    if heavy:\n"
            "        sys.exit(f'stages.{name} imports {heavy}')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
