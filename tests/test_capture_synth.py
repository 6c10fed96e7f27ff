"""The synthetic capture set: expression-dependent details, determinism, and the extraction's accuracy on it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SYNTH_SET

from facedetail.capture.extract import highpass
from facedetail.capture.process import CaptureConfig, compare_to_ground_truth, process_capture
from facedetail.capture.scan import CaptureError, CaptureItem, discover_items
from facedetail.capture.synthetic import DetailConfig, ScanConfig, expression_beta, family_strengths
from facedetail.capture.synthset import GROUND_TRUTH, SyntheticSetConfig, SyntheticSetWriter, SynthTask
from facedetail.io.hashing import sha256_file
from facedetail.model.uvmap import rasterize_uv

R = TINY_SYNTH_SET["resolution"]
CONFIG = SyntheticSetConfig(resolution=R, scan=ScanConfig(**TINY_SYNTH_SET["scan"]),
                            details=DetailConfig(**TINY_SYNTH_SET["details"]))


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory, model_npz: Path) -> Path:
    """One subject in three expressions, written as the capture_synth stage writes them."""
    out = tmp_path_factory.mktemp("synth")
    writer = SyntheticSetWriter(model_npz, CONFIG, "capture_synth", out)
    for expression in CONFIG.expressions:
        writer(SynthTask("s000", expression))
    return out


def test_expressions_drive_their_wrinkles(sfm_model, synth_set: Path) -> None:
    strengths = {e: family_strengths(sfm_model, expression_beta(sfm_model, e), 0.25) for e in CONFIG.expressions}
    assert strengths["neutral"] == dict.fromkeys(strengths["neutral"], 0.25)
    assert strengths["surprise"]["forehead"] == 1.0 and strengths["happiness"]["crows_feet"] == 1.0
    assert strengths["happiness"]["nasolabial"] == 1.0 and strengths["surprise"]["nasolabial"] == 0.25
    anger = family_strengths(sfm_model, expression_beta(sfm_model, "anger"), 0.25)
    assert anger["frown"] == 1.0
    # In the maps: the forehead (above the brows) is grooved 4x deeper with surprise than at rest.
    brow_v = float(sfm_model.uv[sfm_model.landmark_vertices[19], 1])
    rows = slice(int(0.05 * R), int(brow_v * R))
    depth = {e: -np.nanmin(np.load(synth_set / "s000" / e / GROUND_TRUTH)[rows]) for e in CONFIG.expressions}
    pores = 3 * CONFIG.details.pore_rms_mm
    assert depth["surprise"] - pores > 3.0 * (depth["neutral"] - pores) > 0
    assert depth["surprise"] == pytest.approx(CONFIG.details.wrinkle_depth_mm, abs=pores + 0.02)


def test_writing_an_item_twice_gives_the_same_bytes(model_npz: Path, synth_set: Path, tmp_path: Path) -> None:
    SyntheticSetWriter(model_npz, CONFIG, "capture_synth", tmp_path)(SynthTask("s000", "happiness"))
    for name in ("capture.json", "proxy.json", "scan.ply", GROUND_TRUTH, "details.json"):
        assert sha256_file(tmp_path / "s000/happiness" / name) == sha256_file(synth_set / "s000/happiness" / name)


def test_extraction_matches_the_analytic_displacement(sfm_model, synth_set: Path) -> None:
    """Extracted vs analytic displacement on the synthetic scans, and why the bound is what it is.

    Both are high-passed with the same mask and σ, in the same texels, so the difference is the
    extraction's error, which has three parts:

    * sensor noise σ_n per scan vertex: a ray hit interpolates three noisy vertices with
      barycentric weights b, so its error is N(0, σ_n² Σb²), E|·| = sqrt(2/π) σ_n sqrt(Σb²) ≤ 0.80 σ_n
      (0.008 mm at σ_n = 0.01 mm; about 0.6 σ_n on average, since Σb² is 1/2 on average);
    * the scan's sampling: it is piecewise linear between vertices at most h = 1.2 mm apart, off
      by at most h²/8 · max|d''|: 0.18 mm² · 0.35 mm / (1.5 mm)² = 0.028 mm at the bottom of a
      full-depth wrinkle, far less on average because grooves cover a few percent of the face;
    * ICP's residual misalignment (it recovers the 2°, 3 mm motion to ~0.01 mm here): the normal part
      is low-frequency and goes with the high-pass; the tangential part shifts details by ~0.01 mm.

    So the bound is 0.8 σ_n + 0.005 mm = 0.013 mm; without noise, 0.005 mm. Both are also checked
    against the trivial answer "no displacement", whose error is the mean |ground truth|.
    """
    raster = rasterize_uv(sfm_model.uv, sfm_model.triangles, R)
    config = CaptureConfig(resolution=R)
    noise = CONFIG.scan.noise_mm
    for expression in CONFIG.expressions:
        item = CaptureItem(f"s000/{expression}", synth_set / "s000" / expression)
        result = process_capture(item, sfm_model, raster, config, np.random.default_rng(0))
        facts = result.facts
        assert facts["gt_note"] is None and facts["gt_compared_texels"] > 0.9 * raster.covered.sum()
        assert facts["gt_mae_mm"] < 0.8 * noise + 0.005, (expression, facts)
        assert facts["gt_mae_mm"] < 0.5 * facts["gt_mean_abs_mm"], (expression, facts)
        assert 0.0 < facts["masked_fraction"] < 0.05  # the holes (3 of radius 2-5 mm) and folds, no more
        assert facts["icp_residual_mm"] < 0.05 < facts["icp_residual_before_mm"]
        assert facts["icp_rotation_deg"] == pytest.approx(_misalign_deg(item.folder), abs=0.05)


def test_noise_free_extraction_is_within_the_sampling_bound(sfm_model, model_npz: Path, tmp_path: Path) -> None:
    quiet = CONFIG.model_copy(update={"scan": CONFIG.scan.model_copy(update={"noise_mm": 0.0})})
    SyntheticSetWriter(model_npz, quiet, "capture_synth", tmp_path)(SynthTask("s000", "surprise"))
    raster = rasterize_uv(sfm_model.uv, sfm_model.triangles, R)
    item = CaptureItem("s000/surprise", tmp_path / "s000/surprise")
    first = process_capture(item, sfm_model, raster, CaptureConfig(resolution=R), np.random.default_rng(0))
    assert first.facts["gt_mae_mm"] < 0.005, first.facts
    # Deterministic: the same item again gives the same bits.
    again = process_capture(item, sfm_model, raster, CaptureConfig(resolution=R), np.random.default_rng(0))
    np.testing.assert_array_equal(first.maps.displacement, again.maps.displacement)
    np.testing.assert_array_equal(first.maps.normals, again.maps.normals)
    # The comparison itself: the high-passed truth scores 0, the zero map scores mean |truth|.
    gt = np.load(item.folder / GROUND_TRUTH)
    usable = first.maps.mask & np.isfinite(gt)
    truth = highpass(np.where(usable, gt, 0.0), usable, first.maps.sigma_texels).astype(np.float32)
    perfect = compare_to_ground_truth(replace(first.maps, mask=usable, displacement=truth), gt)
    assert perfect["mae_mm"] < 1e-6
    zero = compare_to_ground_truth(replace(first.maps, mask=usable, displacement=np.zeros_like(truth)), gt)
    assert zero["mae_mm"] == pytest.approx(zero["gt_mean_abs_mm"], rel=1e-6)


def _misalign_deg(folder: Path) -> float:
    motion = np.array(json.loads((folder / "details.json").read_text())["misalignment"])
    return float(np.degrees(np.arccos(np.clip((np.trace(motion[:3, :3]) - 1) / 2, -1, 1))))


def test_obj_scans_in_metres_with_a_mesh_proxy_give_the_same_maps(sfm_model, model_npz: Path, synth_set: Path,
                                                                   tmp_path: Path) -> None:
    """The other input forms of the layout: OBJ text, metres, a proxy mesh in the model's topology."""
    other = CONFIG.model_copy(update={"scan_format": "obj", "units": "m", "proxy_format": "mesh"})
    SyntheticSetWriter(model_npz, other, "capture_synth", tmp_path)(SynthTask("s000", "neutral"))
    folder = tmp_path / "s000/neutral"
    assert {p.name for p in folder.iterdir()} >= {"scan.obj", "proxy.ply", "capture.json"}
    assert json.loads((folder / "capture.json").read_text())["units"] == "m"
    raster = rasterize_uv(sfm_model.uv, sfm_model.triangles, R)
    config = CaptureConfig(resolution=R)
    got = process_capture(CaptureItem("s000/neutral", folder), sfm_model, raster, config, np.random.default_rng(0))
    ref = process_capture(CaptureItem("s000/neutral", synth_set / "s000/neutral"), sfm_model, raster, config,
                          np.random.default_rng(0))
    assert got.facts["proxy_kind"] == "mesh" and got.facts["units"] == "m" and got.facts["scan_file"] == "scan.obj"
    both = got.maps.mask & ref.maps.mask
    assert both.sum() > 0.99 * ref.maps.mask.sum()
    # OBJ keeps 6 significant digits of metres (1e-4 mm at 0.1 m) and PLY float32 in mm (~1e-5 mm).
    assert np.abs(got.maps.displacement - ref.maps.displacement)[both].max() < 0.002


def test_layout_problems_are_reasons(sfm_model, tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/scan.ply").write_bytes(b"")  # a scan one level too high
    (tmp_path / "nojson/neutral").mkdir(parents=True)
    (tmp_path / "badjson/neutral").mkdir(parents=True)
    (tmp_path / "badjson/neutral/capture.json").write_text("{units: mm")
    (tmp_path / "inches/neutral").mkdir(parents=True)
    (tmp_path / "inches/neutral/capture.json").write_text('{"units": "inch"}')
    (tmp_path / "noproxy/neutral").mkdir(parents=True)
    (tmp_path / "noproxy/neutral/capture.json").write_text('{"units": "mm"}')
    (tmp_path / ".hidden/neutral").mkdir(parents=True)
    items = discover_items(tmp_path)
    assert [i.id for i in items] == ["badjson/neutral", "flat", "inches/neutral", "nojson/neutral",
                                     "noproxy/neutral"]
    raster = rasterize_uv(sfm_model.uv, sfm_model.triangles, 32)
    reasons = {}
    for item in items:
        with pytest.raises(CaptureError) as err:
            process_capture(item, sfm_model, raster, CaptureConfig(resolution=32), np.random.default_rng(0))
        reasons[item.id] = str(err.value)
    assert reasons["flat"].startswith("not in the layout: flat/ has no <expression> folders")
    assert reasons["nojson/neutral"].startswith("missing capture.json")
    assert reasons["badjson/neutral"].startswith("bad capture.json: capture.json is not valid JSON")
    assert reasons["inches/neutral"].startswith("bad capture.json: units:")
    assert reasons["noproxy/neutral"].startswith("missing proxy: none of proxy.json, proxy.ply, proxy.obj")
