"""One photo in, a detailed face out, on the tiny profile's trained network: the command (good photos, a batch,
every kind of bad input), the library's truth comparison, and the ``reconstruct``/``evaluate``/
``train_detail_supervised`` stages through ``dvc repro``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh
from conftest import sh
from PIL import Image

from facedetail.capture.synthetic import SyntheticDetails
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import FitConfig
from facedetail.reconstruct.evaluate import Surface, SurfaceConfig, kabsch, rigid_alignment, surface_errors, transform
from facedetail.reconstruct.mesh import DisplacementPNG
from facedetail.reconstruct.photo import Failure, ReconstructConfig, Reconstructor
from facedetail.render.detailed import displace

FILES = {"proxy.obj", "proxy.mtl", "texture.png", "displacement.npy", "displacement.png", "displacement.json",
         "normal.png", "detailed.obj", "detailed.mtl", "detailed.glb", "preview.png", "view.html", "face.json"}


def _models(repo: Path) -> list[str]:
    return ["--model", str(repo / "data/face_model/model.npz"), "--dictionary", str(repo / "data/dictionary"),
            "--detail-net", str(repo / "data/train_detail/detail_net.safetensors")]


def _truth(repo: Path) -> dict[str, dict]:
    return {r["file"]: r for r in pq.read_table(repo / "data/wild_synth/truth.parquet").to_pylist()}


def _usable_photo(repo: Path) -> Path:
    """A tiny wild photo that the tiny wild_proxy fitted (so it has a face)."""
    rows = pq.read_table(repo / "data/wild_proxy/proxies.parquet").to_pylist()
    truth = _truth(repo)
    for r in sorted(rows, key=lambda r: r["id"]):
        if r["status"] == "ok" and r["path"] in truth:
            return repo / "data/wild_synth/images" / r["path"]
    raise AssertionError("no fitted wild photo in the tiny pipeline")


def test_the_command_reconstructs_a_photo_and_reports_each_bad_one(tiny_pipeline: Path, tmp_path: Path) -> None:
    repo = tiny_pipeline
    good = _usable_photo(repo)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.jpg").write_text("not an image at all")
    Image.new("RGB", (200, 200), (128, 128, 128)).save(bad / "blank.png")
    pair = np.asarray(Image.open(good).convert("RGB"))
    Image.fromarray(np.hstack([pair, pair])).save(bad / "two.png")
    out = tmp_path / "out"
    run = sh(["facedetail", "reconstruct", str(good), str(bad / "text.jpg"), str(bad / "blank.png"),
              str(bad / "two.png"), str(bad / "missing.jpg"), "-o", str(out), "--levels", "1", "--device", "cpu",
              *_models(repo)], tmp_path, check=False)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 5, run.stdout
    by_photo = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines}
    assert by_photo[str(good)].startswith("ok -> ") and "network" in by_photo[str(good)]
    assert by_photo[str(bad / "text.jpg")].startswith("failed: not an image")
    assert by_photo[str(bad / "blank.png")].startswith("failed: no face detected")
    assert by_photo[str(bad / "two.png")].startswith("failed: several faces") and "--all-faces" in by_photo[
        str(bad / "two.png")]
    assert by_photo[str(bad / "missing.jpg")].startswith("failed: ")
    assert run.stderr.count("models loaded") == 1  # one load for the whole batch
    face = out / good.stem
    assert {p.name for p in face.iterdir()} == FILES
    meta = json.loads((face / "face.json").read_text())
    mesh = trimesh.load(face / "detailed.obj", process=False, maintain_order=True, force="mesh")
    assert len(mesh.vertices) == meta["detailed_vertices"] == 13632
    assert mesh.visual.uv.min() >= 0 and mesh.visual.uv.max() <= 1
    glb = trimesh.load(face / "detailed.glb", force="mesh", process=False)
    assert len(glb.vertices) == 13632
    npy = np.load(face / "displacement.npy")
    back = DisplacementPNG.decode((face / "displacement.png").read_bytes())
    assert npy.dtype == np.float32 and npy.shape == back.shape
    sidecar = json.loads((face / "displacement.json").read_text())
    assert np.abs(back - npy).max() <= sidecar["scale_mm"] / 2 + 1e-6 and sidecar["unit"] == "mm"

    # With --all-faces the two faces of the composite are both reconstructed.
    run = sh(["facedetail", "reconstruct", str(bad / "two.png"), "-o", str(out), "--levels", "0", "--all-faces",
              "--no-viewer", *_models(repo)], tmp_path, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {p.name for p in out.iterdir()} >= {"two-face1", "two-face2"}

    # A face smaller than --min-face-px, and a fit whose NME ends above --max-fit-nme: one line each, exit 1.
    for option, value, reason in (("--min-face-px", "5000", "failed: face too small"),
                                  ("--max-fit-nme", "0.0001", "failed: fit diverged: NME")):
        run = sh(["facedetail", "reconstruct", str(good), "-o", str(tmp_path / "o2"), "--levels", "0", option, value,
                  *_models(repo)], tmp_path, check=False)
        assert run.returncode == 1 and reason in run.stdout and "Traceback" not in run.stderr, run.stdout


@pytest.mark.slow  # ~30 s; the reconstruct stage's bytes are checked against a second run (the flow's) in
# test_flow_agrees_with_dvc by default
def test_the_same_photo_gives_the_same_bytes(tiny_pipeline: Path, tmp_path: Path) -> None:
    good = _usable_photo(tiny_pipeline)
    for name in ("a", "b"):
        sh(["facedetail", "reconstruct", str(good), "-o", str(tmp_path / name), "--levels", "1", "--device", "cpu",
            *_models(tiny_pipeline)], tmp_path)
    a, b = tmp_path / "a" / good.stem, tmp_path / "b" / good.stem
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_a_detailed_mesh_is_measured_against_the_true_surface(tiny_pipeline: Path) -> None:
    """The whole path on a wild photo, then the measure: a mesh carrying the photo's *true* displacement is closer
    to the true detailed surface than the bare proxy (the mesh path and the Chamfer measure are right); the
    trained network's own mesh is measured the same way (its value is reported by ``evaluate``, not asserted)."""
    repo = tiny_pipeline
    photo = _usable_photo(repo)
    model = MorphableModel.load(repo / "data/face_model/model.npz")
    engine = Reconstructor(repo / "data/face_model/model.npz", repo / "data/dictionary",
                           repo / "data/train_detail/detail_net.safetensors", ReconstructConfig(subdivision_levels=2))
    try:
        result = engine.reconstruct(photo)[0]
        assert not isinstance(result, Failure), result
        truth = _truth(repo)[photo.name]
        details = SyntheticDetails.from_json(json.loads(truth["details"])["details"])
        true_vertices = model.vertices(np.asarray(truth["alpha"]), np.asarray(truth["beta"])).astype(np.float64)
        true_surface = displace(engine.meshes.map.proxy(model, true_vertices), details)
        target = Surface(true_surface.vertices, true_surface.normals)
        cfg = SurfaceConfig()
        base = engine.meshes.map.proxy(model, result.proxy_vertices)
        align = rigid_alignment(base.points, target.points, cfg, kabsch(result.proxy_vertices, true_vertices))

        def chamfer(values: np.ndarray | None) -> float:
            s = displace(base, None, values)
            return surface_errors(Surface(transform(s.vertices, align), s.normals @ align[:3, :3].T), target,
                                  cfg)["chamfer_mm"]

        # The true field carried on the fitted proxy, at its UVs: what a perfect network would predict.
        proxy_only = chamfer(None)
        with_truth = chamfer(details.evaluate(base.uv))
        ours = chamfer(engine.detailed_surface(result).displacement)
        assert with_truth < proxy_only, (with_truth, proxy_only)
        assert np.isfinite(ours)
    finally:
        engine.close()


def test_reconstruct_and_evaluate_stages_through_dvc(tiny_pipeline: Path) -> None:
    repo = tiny_pipeline
    status = sh(["dvc", "status", "reconstruct", "evaluate", "train_detail_supervised"], repo).stdout
    assert "changed" not in status and "modified" not in status, status
    gallery = repo / "data/reconstruct/gallery.png"
    assert gallery.is_file()
    rec = json.loads((repo / "metrics/reconstruct.json").read_text())
    assert rec["faces"] + rec["failed"] >= rec["photos"] >= 1
    faces = sorted((repo / "data/reconstruct/faces").iterdir())
    assert len(faces) == rec["faces"] and all((f / "detailed.obj").is_file() for f in faces)
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    for kind in ("capture", "wild"):
        assert set(ev[kind]) >= {"ours", "zero", "mean_patch", "mean_map", "pca_only", "supervised_only"}, kind
        for row in ev[kind].values():
            assert {"mae_mm", "rmse_mm", "normal_deg", "chamfer_mm", "completeness", "upper_mae_mm"} <= set(row)
        assert ev[kind]["zero"]["mae_mm"] > 0
    assert ev["samples"]["capture"] >= 1 and ev["samples"]["wild"] >= 1
    # The zero row's MAE is the mean |truth| on the scored texels: check it against the scores table.
    scores = pq.read_table(repo / "data/evaluate/scores.parquet").to_pylist()
    zero = [r["mae_mm"] for r in scores if r["set"] == "wild" and r["row"] == "zero"]
    assert ev["wild"]["zero"]["mae_mm"] == pytest.approx(float(np.mean(zero)), abs=1e-6)
    with (repo / "metrics/evaluate/by_yaw.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert table and {"yaw_deg", "ours_chamfer_mm", "zero_chamfer_mm"} <= set(table[0])
    plots = sh(["dvc", "plots", "show", "--json"], repo).stdout
    assert "error_by_yaw" in plots and "gallery.png" in plots
    supervised = json.loads((repo / "metrics/train_detail_supervised.json").read_text())
    assert supervised["wild"] == {"train": 0, "heldout": 0}  # η = 0: the wild textures are not read
    assert "loss_wild_total" not in "".join(p.name for p in (repo / "dvclive/train_detail_supervised").rglob("*"))


def test_fit_config_is_shared_with_wild_proxy(tiny_pipeline: Path, tmp_path: Path) -> None:
    """The reconstruct stage's fit params are wild_proxy's: setting them in its own section is refused."""
    import shutil

    import yaml

    from stages import reconstruct

    root = tmp_path / "r"
    root.mkdir()
    shutil.copy(tiny_pipeline / "params.yaml", root / "params.yaml")
    params = reconstruct.STAGE.load_params(root)
    wild = yaml.safe_load((root / "params.yaml").read_text())["wild_proxy"]
    assert params.fit == FitConfig.model_validate(wild["fit"])
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["reconstruct"]["fit"] = {"shape_lambda": 1.0}
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    from stages._common import ParamsError
    with pytest.raises(ParamsError, match="wild_proxy"):
        reconstruct.STAGE.load_params(root)
