"""The synthetic capture set: expression-dependent details, their realistic depths, the photos of the detailed
surface, determinism, and the extraction's accuracy on it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import trimesh
from conftest import TINY_SYNTH_SET

from facedetail.capture.extract import highpass
from facedetail.capture.process import CaptureConfig, compare_to_ground_truth, process_capture
from facedetail.capture.scan import CaptureError, CaptureItem, PhotoInfo, discover_items, load_proxy, read_info
from facedetail.capture.synthetic import (
    DetailConfig,
    ScanConfig,
    SyntheticDetails,
    draw_mismatch,
    expression_beta,
    expression_details,
    family_strengths,
    landmark_uv_mm,
    random_rigid,
    subject_layout,
    synthesize_scan,
)
from facedetail.capture.synthset import (
    GROUND_TRUTH,
    SyntheticSetConfig,
    SyntheticSetWriter,
    SynthTask,
    synthetic_set_metrics,
)
from facedetail.io.hashing import sha256_file
from facedetail.io.images import decode_png
from facedetail.io.seeds import item_rng
from facedetail.model.anchors import landmark_anchors
from facedetail.model.uvmap import mm_per_uv, rasterize_uv
from facedetail.render.detailed import displace, subdivide_proxy
from facedetail.render.sh import shade

R = TINY_SYNTH_SET["resolution"]
CONFIG = SyntheticSetConfig(resolution=R, scan=ScanConfig(**TINY_SYNTH_SET["scan"]), photo=TINY_SYNTH_SET["photo"],
                            details=DetailConfig(**TINY_SYNTH_SET["details"]))
ITEM_FILES = ("capture.json", "proxy.json", "scan.ply", GROUND_TRUTH, "details.json", "photo-0.png", "photo-1.png")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, model_npz: Path) -> tuple[Path, list[dict[str, Any]]]:
    """One subject in three expressions, written as the capture_synth stage writes them, and the writer's results."""
    out = tmp_path_factory.mktemp("synth")
    writer = SyntheticSetWriter(model_npz, CONFIG, "capture_synth", out)
    results = [writer(SynthTask("s000", expression)) for expression in CONFIG.expressions]
    writer.close()
    return out, results


@pytest.fixture(scope="module")
def synth_set(written: tuple[Path, list[dict[str, Any]]]) -> Path:
    return written[0]


def test_expressions_drive_their_wrinkles(sfm_model, synth_set: Path) -> None:
    strengths = {e: family_strengths(sfm_model, expression_beta(sfm_model, e), 0.25) for e in CONFIG.expressions}
    assert strengths["neutral"] == dict.fromkeys(strengths["neutral"], 0.25)
    assert strengths["surprise"]["forehead"] == 1.0 and strengths["happiness"]["crows_feet"] == 1.0
    assert strengths["happiness"]["nasolabial"] == 1.0 and strengths["surprise"]["nasolabial"] == 0.25
    anger = family_strengths(sfm_model, expression_beta(sfm_model, "anger"), 0.25)
    assert anger["frown"] == 1.0
    # In the maps: the forehead (above the brows) is grooved ~1/neutral_fraction deeper with surprise than at rest.
    brow_v = float(sfm_model.uv[sfm_model.landmark_vertices[19], 1])
    rows = slice(int(0.05 * R), int(brow_v * R))
    depth = {e: -np.nanmin(np.load(synth_set / "s000" / e / GROUND_TRUTH)[rows]) for e in CONFIG.expressions}
    pores = 3 * CONFIG.details.pore_rms_mm
    assert depth["surprise"] - pores > 2.5 * (depth["neutral"] - pores) > 0
    # ... as deep as the deepest forehead groove drawn (each groove has its own depth, within the spread).
    drawn = json.loads((synth_set / "s000/surprise/details.json").read_text())["details"]["grooves"]
    deepest = max(g["depth_mm"] for g in drawn if g["family"] == "forehead")
    spread = CONFIG.details.depth_spread
    assert (1 - spread) * CONFIG.details.wrinkle_depth_mm <= deepest <= (1 + spread) * CONFIG.details.wrinkle_depth_mm
    assert depth["surprise"] == pytest.approx(deepest, abs=pores + 0.02)


def test_detail_amplitude_is_measured_and_realistic(written: tuple[Path, list[dict[str, Any]]]) -> None:
    """The measured depths (from the drawn fields on the ground-truth texels) in the ranges real skin shows."""
    _, results = written
    rows = [{"bytes": 1}]
    metrics = synthetic_set_metrics(results, rows, subjects=1, expressions=CONFIG.expressions, resolution=R, key="k")
    amp = metrics["detail_amplitude"]
    per = {e: metrics["per_expression"][e]["detail_amplitude"]["max_depth_mm"] for e in CONFIG.expressions}
    assert set(amp["max_depth_mm"]) == {"forehead", "frown", "crows_feet", "nasolabial"}
    # Forehead lines and crow's feet 0.1-0.5 mm deep at full expression (crow's feet overlap where they fan out).
    assert 0.25 <= per["surprise"]["forehead"] <= 0.5 and 0.25 <= per["happiness"]["crows_feet"] <= 0.7
    # At rest they are fine lines, about a tenth of a millimetre.
    assert all(0.05 <= per["neutral"][f] <= 0.2 for f in ("forehead", "frown", "crows_feet"))
    # Nasolabial folds: up to ~1 mm at a full smile.
    assert 0.5 <= per["happiness"]["nasolabial"] <= 1.05 and per["neutral"]["nasolabial"] <= 0.35
    # Pores: a few hundredths of a millimetre.
    assert 0.01 <= amp["pore_rms_mm"] <= 0.025
    assert 0.01 <= amp["mean_abs_mm"] <= 0.05
    # Measured, not copied: the mean |d| is the ground truth map's.
    gt = np.load(written[0] / "s000/happiness" / GROUND_TRUTH)
    happy = results[CONFIG.expressions.index("happiness")]["facts"]["amplitude"]
    assert happy["mean_abs_mm"] == pytest.approx(float(np.nanmean(np.abs(gt))), rel=1e-5)
    assert metrics["photos"] == 2 * len(CONFIG.expressions)


def _scan_before_the_refactor(model, proxy_vertices, details, mismatch, config, rng) -> trimesh.Trimesh:
    """``synthesize_scan`` as it was before its subdivision moved to :mod:`facedetail.render.detailed` (verbatim)."""
    normals = model.vertex_normals(proxy_vertices).astype(np.float64)
    stacked = np.hstack([np.asarray(proxy_vertices, np.float64), model.uv.astype(np.float64), normals])
    fine, faces = trimesh.remesh.subdivide_to_size(stacked, model.triangles, max_edge=config.edge_mm, max_iter=16)
    points, uv, n = fine[:, :3], fine[:, 3:5], fine[:, 5:8]
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    xy = uv * details.mm_per_uv
    offset = details.evaluate(uv) + mismatch.evaluate(xy)
    points = points + offset[:, None] * n
    if config.noise_mm > 0:
        points = points + rng.normal(0.0, config.noise_mm, points.shape)
    keep = np.ones(len(faces), bool)
    if config.holes:
        centroid_xy = xy[faces].mean(axis=1)
        L = landmark_uv_mm(model, details.mm_per_uv)
        lo, hi = np.nanmin(L[17:], axis=0), np.nanmax(L[17:], axis=0)
        for _ in range(config.holes):
            centre = rng.uniform(lo, hi)
            radius = float(rng.uniform(*config.hole_radius_mm))
            keep &= ((centroid_xy - centre) ** 2).sum(axis=1) > radius ** 2
    mesh = trimesh.Trimesh(points, faces[keep], process=False, validate=False)
    mesh.remove_unreferenced_vertices()
    mesh.apply_transform(random_rigid(rng, config.misalign_deg, config.misalign_mm,
                                      np.asarray(proxy_vertices, np.float64).mean(axis=0)))
    return mesh


def test_subdivision_refactor_keeps_the_scan(sfm_model) -> None:
    """``synthesize_scan`` gives the bytes of the code it replaced, also when it is handed the photos' subdivision
    (which carries an albedo too) and the details at its vertices."""
    model, s = sfm_model, mm_per_uv(sfm_model.mean, sfm_model.uv, sfm_model.triangles)
    config = ScanConfig(edge_mm=1.5)
    beta = expression_beta(model, "happiness")
    details = expression_details(subject_layout(model, s, CONFIG.details, item_rng(1, "t", "s")),
                                 family_strengths(model, beta, 0.3), CONFIG.details, s)
    proxy = model.vertices(None, beta).astype(np.float64)
    mismatch = draw_mismatch(model, s, config.model_copy(update={"mismatch_mm": 0.5}), np.random.default_rng(5))
    before = _scan_before_the_refactor(model, proxy, details, mismatch, config, np.random.default_rng(7))
    fine = subdivide_proxy(model, proxy, config.edge_mm, model.albedo())
    for scan in (synthesize_scan(model, proxy, details, mismatch, config, np.random.default_rng(7)).mesh,
                 synthesize_scan(model, proxy, details, mismatch, config, np.random.default_rng(7), fine=fine,
                                 detail_values=details.evaluate(fine.uv)).mesh):
        assert scan.vertices.tobytes() == before.vertices.tobytes()
        assert scan.faces.tobytes() == before.faces.tobytes()


def test_writing_an_item_twice_gives_the_same_bytes(model_npz: Path, synth_set: Path, tmp_path: Path) -> None:
    SyntheticSetWriter(model_npz, CONFIG, "capture_synth", tmp_path)(SynthTask("s000", "happiness"))
    for name in ITEM_FILES:
        assert sha256_file(tmp_path / "s000/happiness" / name) == sha256_file(synth_set / "s000/happiness" / name)


def test_photos_show_the_detailed_proxy_through_their_camera(sfm_model, model_npz: Path, synth_set: Path,
                                                              tmp_path: Path) -> None:
    """Each photo is listed with ``P`` and SH; ``P`` puts the proxy's landmarks on the face; the photo is the
    render of the detailed surface, and differs from the same proxy rendered without details exactly where the
    grooves are (the details are visible)."""
    model = sfm_model
    writer = SyntheticSetWriter(model_npz, CONFIG, "capture_synth", tmp_path)
    anchors = landmark_anchors(model)
    strong_total = {}
    for expression in CONFIG.expressions:
        item = CaptureItem(f"s000/{expression}", synth_set / "s000" / expression)
        info = read_info(item)
        assert len(info.photos) == CONFIG.photos
        proxy = load_proxy(item.folder / "proxy.json", model, "mm")
        details = SyntheticDetails.from_json(json.loads((item.folder / "details.json").read_text())["details"])
        strong_total[expression] = 0
        for k, photo in enumerate(info.photos):
            assert isinstance(photo, PhotoInfo) and photo.file == f"photo-{k}.png"
            P, sh = np.array(photo.P), np.array(photo.sh)
            assert P.shape == (3, 4) and sh.shape == (9, 3)
            image = decode_png((item.folder / photo.file).read_bytes())
            assert image.shape == (CONFIG.photo.size,) * 2 + (3,) and image.dtype == np.uint8
            # Re-render: the surface from the recorded details and albedo, the draw from the photo's seed.
            fine = subdivide_proxy(model, proxy, CONFIG.scan.edge_mm, model.albedo(photo.model_extra["albedo"]))
            sample = writer.photo_sample(item.id, k)
            detailed, flat = displace(fine, details), displace(fine, None)
            shot = writer.render_photo(detailed, proxy, sample, writer.cavity_of(detailed))
            np.testing.assert_array_equal(shot.image, image)
            np.testing.assert_allclose(shot.render.projection, P, rtol=0, atol=1e-9)
            # The SH in the model frame shades model-frame normals as the camera-frame SH shades R n.
            n, sh_camera = fine.normals[:50], np.array(photo.model_extra["sh_camera"])
            np.testing.assert_allclose(shade(n, sh), shade(n @ shot.rotation.T, sh_camera), atol=1e-9)
            # P puts the proxy's inner-face landmarks (brows, eyes, nose, mouth) on the rendered face.
            points = anchors.points(proxy)[17:]
            hom = np.column_stack([points, np.ones(len(points))]) @ P.T
            px = np.round(hom[:, :2] / hom[:, 2:]).astype(int)
            assert (px >= 0).all() and (px < CONFIG.photo.size).all()
            assert shot.render.mask[px[:, 1], px[:, 0]].all()
            # Where the photo differs from the undetailed render: at the grooves' projected vertices.
            plain = writer.render_photo(flat, proxy, sample, writer.cavity_of(flat))
            diff = np.abs(shot.image.astype(int) - plain.image.astype(int)).max(axis=2)
            inside = cv2.erode((shot.render.mask & plain.render.mask).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            grooves = _groove_pixels(details, fine.uv, detailed.vertices, P, shot.render.depth)
            strong = (diff >= 6) & inside
            strong_total[expression] += int(strong.sum())
            if strong.sum() >= 20:
                assert (strong & grooves).sum() >= 0.9 * strong.sum(), (item.id, k)
            assert diff[inside & grooves].mean() > 1.25 * diff[inside & ~grooves].mean(), (item.id, k)
    # Full-expression grooves are plainly visible (hundreds of pixels change by >= 6 levels); resting ones are faint.
    assert strong_total["happiness"] >= 100 and strong_total["surprise"] >= 100, strong_total
    writer.close()


def _groove_pixels(details: SyntheticDetails, uv: np.ndarray, vertices: np.ndarray, P: np.ndarray,
                   depth: np.ndarray) -> np.ndarray:
    """(S, S) pixels within 2 px of a visible surface vertex where the grooves (not the pores) exceed 0.03 mm."""
    xy = uv * details.mm_per_uv
    groove = np.abs(sum(g.evaluate(xy) for g in details.grooves)) > 0.03
    hom = np.column_stack([vertices[groove], np.ones(int(groove.sum()))]) @ P.T
    px = np.round(hom[:, :2] / hom[:, 2:]).astype(int)
    size = depth.shape[0]
    ok = (px >= 0).all(axis=1) & (px < size).all(axis=1)
    px, z = px[ok], hom[ok, 2]
    seen = depth[px[:, 1], px[:, 0]] > z - 3.0  # not behind another part of the face
    out = np.zeros(depth.shape, np.uint8)
    out[px[seen, 1], px[seen, 0]] = 1
    return cv2.dilate(out, np.ones((5, 5), np.uint8)) > 0


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
