"""The reconstruction's parts on their own: stitching, the displacement PNG, UV sampling, the detailed mesh and its
files, the surface measures, and the viewer page in a real headless browser."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from facedetail.capture.patches import RegionBox
from facedetail.reconstruct.detailnet import gaussian_window, stitch
from facedetail.reconstruct.evaluate import (
    Surface,
    SurfaceConfig,
    kabsch,
    masked_errors,
    rigid_alignment,
    surface_errors,
    transform,
    yaw_bin,
)
from facedetail.reconstruct.mesh import (
    DisplacementPNG,
    MeshBuilder,
    glb_bytes,
    obj_files,
    sample_map,
    texture_png,
    textured_mesh,
)
from facedetail.reconstruct.viewer import viewer_html
from facedetail.render.detailed import uniform_subdivision_map


def test_constant_patches_stitch_to_the_constant() -> None:
    rng = np.random.default_rng(0)
    origins = rng.integers(0, 64 - 16, size=(40, 2))
    patches = np.full((40, 16, 16), 0.37)
    blended, weight = stitch(patches, origins, 64, gaussian_window(16, 3.0))
    covered = weight > 0
    assert covered.sum() > 500
    np.testing.assert_allclose(blended[covered], 0.37, rtol=0, atol=1e-12)
    assert (blended[~covered] == 0).all()


def test_stitching_weights_each_patch_by_its_gaussian() -> None:
    # Two overlapping patches of 0 and 1: at the overlap, the blend leans to the patch whose centre is nearer.
    window = gaussian_window(8, 2.0)
    blended, _ = stitch(np.stack([np.zeros((8, 8)), np.ones((8, 8))]), np.array([[0, 0], [0, 4]]), 16, window)
    row = blended[3, 4:8]
    assert np.all(np.diff(row) > 0) and 0 < row[0] < 0.5 < row[-1] < 1


def test_displacement_png_round_trip_within_one_quantisation_step() -> None:
    codec = DisplacementPNG.for_range(2.0)
    d = np.random.default_rng(1).uniform(-1.9, 1.9, (64, 64))
    data = codec.encode(d)
    back = DisplacementPNG.decode(data)
    assert np.abs(back - d).max() <= codec.scale_mm / 2 + 1e-12
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode in ("I;16", "I") and "facedetail:displacement" in img.text


def test_sample_map_is_bilinear_and_leaves_invalid_texels_out() -> None:
    R = 32
    centres = (np.arange(R) + 0.5) / R
    u, v = np.meshgrid(centres, centres)
    plane = 3.0 * u - 2.0 * v  # a linear field is reproduced exactly by bilinear sampling
    valid = np.ones((R, R), bool)
    uv = np.random.default_rng(2).uniform(0.1, 0.9, (500, 2))
    np.testing.assert_allclose(sample_map(plane, valid, uv), 3.0 * uv[:, 0] - 2.0 * uv[:, 1], atol=1e-5)
    # Invalid texels hold garbage: it must not leak into the samples next to them.
    valid[:, : R // 2] = False
    garbage = np.where(valid, 1.0, 1e6)
    right = uv[uv[:, 0] > 0.6]
    np.testing.assert_allclose(sample_map(garbage, valid, right), 1.0, atol=1e-5)


def test_uniform_subdivision_adds_one_vertex_per_edge_and_stays_on_the_proxy(sfm_model) -> None:
    v = sfm_model.vertices().astype(np.float64)
    tri = np.asarray(sfm_model.triangles)
    counts = [len(v)]
    faces = tri
    for _ in range(2):
        edges = np.unique(np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)
        counts.append(counts[-1] + len(edges))
        faces = trimesh.remesh.subdivide(np.zeros((counts[-2], 3)), faces)[1]
    smap = uniform_subdivision_map(v, tri, 2)
    assert smap.weights.shape == (counts[2], len(v)) and len(smap.faces) == 16 * len(tri)
    # Another shape through the same map: every fine vertex on its proxy triangle (weights sum to 1, ≤ 3 non-zero).
    other = sfm_model.vertices(np.full(sfm_model.n_shape, 0.8)).astype(np.float64)
    fine = smap.apply(other)
    np.testing.assert_allclose(np.asarray(smap.weights.sum(axis=1)).ravel(), 1.0)
    assert np.diff(smap.weights.indptr).max() <= 3
    np.testing.assert_allclose(fine[: len(v)], other, atol=1e-9)


def test_detailed_mesh_files_load_with_the_asked_vertex_count_and_uvs(sfm_model, tmp_path: Path) -> None:
    builder = MeshBuilder(sfm_model, 1)
    proxy = sfm_model.vertices().astype(np.float64)
    R = 64
    displacement = np.full((R, R), 0.25)
    surface = builder.detailed(proxy, displacement, np.ones((R, R), bool))
    assert len(surface.vertices) == builder.n_vertices == 13632
    # Every vertex moved 0.25 mm along its normal.
    base = builder.detailed(proxy, None, None)
    np.testing.assert_allclose(np.linalg.norm(surface.vertices - base.vertices, axis=1), 0.25, atol=1e-4)
    mesh = textured_mesh(surface.vertices, surface.faces, surface.uv, np.full((32, 32, 3), 180, np.uint8),
                         surface.normals)
    files = obj_files(mesh, "detailed") | texture_png(np.full((32, 32, 3), 180, np.uint8))
    assert set(files) == {"detailed.obj", "detailed.mtl", "texture.png"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    loaded = trimesh.load(tmp_path / "detailed.obj", process=False, maintain_order=True, force="mesh")
    assert len(loaded.vertices) == builder.n_vertices
    uv = loaded.visual.uv
    assert uv.shape == (builder.n_vertices, 2) and uv.min() >= 0 and uv.max() <= 1
    glb = trimesh.load(io.BytesIO(glb_bytes(mesh)), file_type="glb", force="mesh", process=False)
    assert len(glb.vertices) == builder.n_vertices
    assert glb.visual.uv.min() >= 0 and glb.visual.uv.max() <= 1


def test_surface_measures_of_known_offsets() -> None:
    xs, ys = np.meshgrid(np.linspace(0, 40, 81), np.linspace(0, 40, 81))
    points = np.column_stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)])
    normals = np.tile([0.0, 0.0, 1.0], (len(points), 1))
    flat = Surface(points, normals)
    cfg = SurfaceConfig()
    same = surface_errors(flat, flat, cfg)
    assert same["chamfer_mm"] == 0 and same["mesh_normal_deg"] == 0 and same["completeness"] == 1
    lifted = surface_errors(Surface(points + np.array([0, 0, 0.3]), normals), flat, cfg)
    assert lifted["chamfer_mm"] == pytest.approx(0.3) and lifted["completeness"] == 1
    far = surface_errors(Surface(points + np.array([0, 0, 3.0]), normals), flat, cfg)
    assert far["completeness"] == 0 and far["chamfer_mm"] == pytest.approx(3.0)


def test_rigid_alignment_recovers_a_small_rotation(sfm_model) -> None:
    v = sfm_model.vertices().astype(np.float64)
    angle = np.radians(4.0)
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    moved = v @ rot.T + [1.5, -2.0, 0.5]
    matrix = kabsch(v, moved)
    np.testing.assert_allclose(transform(v, matrix), moved, atol=1e-6)
    icp = rigid_alignment(v, moved, SurfaceConfig(icp_points=2000, icp_iterations=50))
    assert np.abs(transform(v, icp) - moved).max() < 0.05


def test_masked_errors_per_region() -> None:
    pred, truth = np.zeros((8, 8)), np.zeros((8, 8))
    pred[:4] = 0.2
    boxes = {"upper": RegionBox("upper", 0, 4, 0, 8), "lower": RegionBox("lower", 4, 8, 0, 8)}
    errors = masked_errors(pred, truth, np.ones((8, 8), bool), boxes)
    assert errors["upper_mae_mm"] == pytest.approx(0.2) and errors["lower_mae_mm"] == 0
    assert errors["mae_mm"] == pytest.approx(0.1) and errors["rmse_mm"] == pytest.approx(np.sqrt(0.02))
    assert yaw_bin(-7) == "0-15" and yaw_bin(44.9) == "30-45" and yaw_bin(95) == "75-90"


# ---------------------------------------------------------------------------------------- the viewer page
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (make setup installs the Debian package)")
    return exe


def _open_page(page: Path, shot: Path) -> tuple[str, str]:
    """(DOM after the scripts ran, browser log) of ``page`` in headless Chromium with software WebGL."""
    flags = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             "--window-size=480,480", "--virtual-time-budget=8000", "--enable-logging=stderr", "--log-level=0",
             "--no-first-run", "--disable-extensions", f"--user-data-dir={shot.parent / 'profile'}"]
    exe = _chromium()
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    snap = subprocess.run([exe, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                          timeout=180)
    return dom.stdout, dom.stderr + snap.stderr


def _console_errors(log: str) -> list[str]:
    lines = [ln for ln in log.splitlines() if "CONSOLE" in ln]
    return [ln for ln in lines if re.search(r"Uncaught|Error|error", ln)]


def test_viewer_page_shows_the_face_in_a_headless_browser(sfm_model, tmp_path: Path) -> None:
    builder = MeshBuilder(sfm_model, 1)
    surface = builder.detailed(sfm_model.vertices().astype(np.float64), None, None)
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[...] = (200, 150, 120)
    page = tmp_path / "view.html"
    page.write_text(viewer_html(surface.vertices, surface.faces, surface.normals, surface.uv, texture, "test face"),
                    encoding="utf-8")
    dom, log = _open_page(page, tmp_path / "shot.png")
    assert "test face (ready)" in dom, log[-2000:]  # the script ran to its last line
    assert _console_errors(log) == []
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"), np.int16)
    h, w = shot.shape[:2]
    centre = shot[h // 3: 2 * h // 3, w // 3: 2 * w // 3]
    background = np.array([242, 242, 242])
    face = np.abs(centre - background).sum(axis=2) > 30
    assert face.mean() > 0.5, f"only {face.mean():.0%} of the centre is not background"


def test_the_page_check_sees_a_script_error(sfm_model, tmp_path: Path) -> None:
    # The console check above must be able to fail: a page whose script throws is caught.
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>throw new Error('broken on purpose');</script></body></html>")
    _, log = _open_page(page, tmp_path / "shot.png")
    assert any("broken on purpose" in line for line in _console_errors(log))


def test_max_fit_nme_sets_the_fits_nme_bound_and_no_pixel_bound(monkeypatch, tmp_path: Path) -> None:
    """``--max-fit-nme`` is the divergence check in NME; no photo-px bound is added by the command."""
    from typer.testing import CliRunner

    import facedetail.reconstruct.photo as photo_mod
    from facedetail.cli import app

    seen = []

    class StopError(RuntimeError):
        pass

    def capture(self, model, dictionary, detail_net, config, device) -> None:
        seen.append(config)
        raise StopError("stopped after the config")  # the command reports it and exits 2: no model is loaded

    monkeypatch.setattr(photo_mod.Reconstructor, "__init__", capture)
    for extra, expected in (([], 0.2), (["--max-fit-nme", "0.07"], 0.07)):
        run = CliRunner().invoke(app, ["reconstruct", str(tmp_path), "--device", "cpu", *extra])
        assert run.exit_code == 2 and "stopped after the config" in run.output, run.output
        assert seen[-1].fit.max_nme == expected and seen[-1].fit.max_reprojection_px is None
    run = CliRunner().invoke(app, ["reconstruct", str(tmp_path), "--max-fit-error-px", "12"])
    assert run.exit_code == 2 and "No such option" in run.output
