"""The wild_synth stage: outputs, ground truth against the pixels and the model, bad examples, determinism, DVC."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import sh, shrink_params
from PIL import Image
from pydantic import ValidationError

from facedetail.capture.maps import decode_png, u16_to_displacement
from facedetail.capture.synthetic import (
    DetailConfig,
    SampledDetails,
    SyntheticDetails,
    expression_beta,
    family_strengths,
)
from facedetail.features.landmarks import NO_FACE, LandmarkDetector
from facedetail.io.hashing import sha256_file
from facedetail.io.manifest import verify_manifest
from facedetail.model.anchors import landmark_anchors
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import rasterize_uv
from facedetail.proxy.inputs import LoadConfig, LoadedPhoto, LoadFailure, list_inputs, load_photo
from facedetail.proxy.synthetic import TRUTH_SCHEMA, ClutterConfig, WildSynthConfig, WildSynthesizer
from facedetail.render.sampling import label_names, sample_render
from stages import wild_synth as stage

OUT = Path("data/wild_synth")
TINY = {"count": 6, "synth": {"image_size": 192, "size_jitter": 0.1}, "contact_sheet": 6, "workers": 1,
        "uv_chart": {"resolution": 128}}
BAD = ("cmyk.jpg", "empty.jpg", "exif_rotated.jpg", "grayscale.png", "huge_15000.png", "large_6000.jpg",
       "no_face.jpg", "not_an_image.png", "palette.png", "rgba.png", "sixteen_bit.png", "tiny.png", "truncated.jpg")


def _root(base: Path, model_npz: Path) -> Path:
    root = base / "root"
    (root / "data/face_model").mkdir(parents=True)
    shutil.copy2(model_npz, root / "data/face_model/model.npz")
    return root


def _files(root: Path) -> dict[str, str]:
    out = root / OUT
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_npz: Path) -> Path:
    """A root with a tiny wild set, bad examples included."""
    root = _root(tmp_path_factory.mktemp("wild_synth"), model_npz)
    result = stage.run(stage.WildSynthParams(**TINY, bad_examples=True), root)
    assert result.summary["images"] == 6 and result.summary["bad_examples"] == len(BAD)
    return root


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector()


def test_outputs_manifest_and_tables(built: Path, model_npz: Path) -> None:
    out = built / OUT
    ids = [f"wild-{i:05d}" for i in range(6)]
    expected = {f"images/{i}.jpg" for i in ids} | {"images/astronaut.png"} | {f"images/_bad/{b}" for b in BAD}
    maps = {f"truth/{i}.png" for i in ids}
    assert set(_files(built)) == expected | maps | {"truth.parquet", "bad_examples.parquet", "manifest.parquet",
                                                    "contact_sheet.png", "lineage.json", "CARD.md"}
    assert (out / "lineage.json").is_file()
    assert verify_manifest(out) == []
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["path"] for r in manifest} == expected | maps
    assert {r["kind"] for r in manifest} == {"synthetic", "photo", "bad_example", "truth_displacement"}

    # the images folder is what wild_proxy lists, exactly like a user's photo folder
    listed = [i.relative for i in list_inputs(out / "images")]
    assert listed == sorted(p.removeprefix("images/") for p in expected)

    table = pq.read_table(out / "truth.parquet")
    assert table.schema.equals(TRUTH_SCHEMA)
    truth = table.to_pylist()
    assert [r["id"] for r in truth] == ids and [r["file"] for r in truth] == [f"{i}.jpg" for i in ids]
    model = MorphableModel.load(model_npz)
    lo, hi = WildSynthConfig(**TINY["synth"]).size_range
    for row in truth:
        with Image.open(out / "images" / row["file"]) as img:
            assert img.format == "JPEG" and img.size == (row["width"], row["height"]) and img.mode == "RGB"
        assert lo <= row["width"] <= hi and row["width"] == row["height"]
        assert row["label"] in label_names(model)
        assert 0 < np.abs(row["alpha"]).max() <= 3.0, "random identity, truncated at 3"
        assert abs(row["yaw_deg"]) <= 40 and abs(row["pitch_deg"]) <= 15 and abs(row["roll_deg"]) <= 12
        assert 45 <= row["jpeg_quality"] <= 95 and 0 <= row["blur_sigma"] <= 1.2 and 0 <= row["noise_sigma"] <= 5
    assert len({r["width"] for r in truth}) > 1, "image sizes vary"

    metrics = json.loads((built / "metrics/wild_synth.json").read_text())
    assert metrics["images"] == 6 and metrics["bad_examples"] == len(BAD)
    assert metrics["uv_resolution"] == 128 and metrics["truth_clipped_texels"] == 0
    assert set(metrics["detail_amplitude"]["max_depth_mm"]) == {"forehead", "frown", "crows_feet", "nasolabial"}
    assert sum(metrics["label_counts"].values()) == 6
    with Image.open(out / "images/astronaut.png") as img:
        assert img.size == (512, 512)


def test_truth_landmarks_are_the_model_projected_by_the_stored_camera(built: Path, model_npz: Path) -> None:
    model = MorphableModel.load(model_npz)
    anchors = landmark_anchors(model)
    for row in pq.read_table(built / OUT / "truth.parquet").to_pylist():
        P = np.array(row["P"]).reshape(3, 4)
        K, R, t = np.array(row["K"]).reshape(3, 3), np.array(row["R"]).reshape(3, 3), np.array(row["t"])
        np.testing.assert_allclose(P, K @ np.column_stack([R, t]), rtol=1e-12, atol=1e-6)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
        assert K[0, 2] == K[1, 2] == (row["width"] - 1) / 2 and K[0, 0] == row["focal_px"]
        points = anchors.points(model.vertices(row["alpha"], row["beta"]).astype(np.float64))
        projected = np.column_stack([points, np.ones(len(points))]) @ P.T
        uv = projected[:, :2] / projected[:, 2:]
        stored = np.array(row["landmarks"], np.float64).reshape(68, 2)
        np.testing.assert_allclose(stored, uv, atol=1e-6)
        visible = np.array(row["landmark_visible"])
        assert visible.sum() >= 40
        inside = (uv[visible] >= -0.5).all() and (uv[visible] <= row["width"] - 0.5).all()
        assert inside, "visible landmarks are in the image"


def test_truth_displacement_png_is_the_drawn_field(built: Path, sfm_model) -> None:
    """Each image's details: the JSON is the field that was drawn (depths follow β), and the 16-bit truth PNG
    decodes to it at the chart's texel centres within one quantisation step, 0 outside the chart."""
    raster = rasterize_uv(sfm_model.uv, sfm_model.triangles, 128)
    rows = pq.read_table(built / OUT / "truth.parquet").to_pylist()
    for row in rows:
        drawn = json.loads(row["details"])
        details = SyntheticDetails.from_json(drawn["details"])
        assert drawn["strengths"] == family_strengths(sfm_model, np.array(row["beta"]), DetailConfig().neutral_fraction)
        png = decode_png(built / OUT / row["displacement_png"])
        assert png.dtype == np.uint16 and png.shape == (128, 128) and row["uv_resolution"] == 128
        assert (png[~raster.covered] == 0).all() and (png[raster.covered] > 0).all()
        scale = row["displacement_scale_mm"]
        decoded = u16_to_displacement(png, scale)[raster.covered]
        exact = details.evaluate(raster.texel_uv[raster.covered])
        step = 2.0 * scale / 65535
        assert np.abs(decoded - exact).max() <= step, row["id"]
        assert row["displacement_clipped"] == 0 and np.abs(exact).max() > 0.1  # grooves, not only pores
    assert len({r["details"] for r in rows}) == len(rows), "a new detail layout per image"


def test_the_rendered_field_is_the_drawn_one(sfm_model) -> None:
    """Renders read the pores from a UV grid: within 0.003 mm of the exact field (pores RMS 0.015 mm)."""
    with WildSynthesizer(sfm_model, WildSynthConfig(image_size=96, size_jitter=0.0)) as synth:
        sample = sample_render(np.random.default_rng(1), synth.config.sampling, sfm_model)
        details, _ = synth.draw_details(sample, np.random.default_rng(2))
    uv = np.random.default_rng(3).uniform(0.05, 0.95, (20_000, 2))
    error = np.abs(SampledDetails(details).evaluate(uv) - details.evaluate(uv))
    assert error.max() < 0.003 and np.sqrt(np.mean(error ** 2)) < 0.001


def test_wild_photos_show_their_details(sfm_model) -> None:
    """A wild render with its details differs from the same face without them where the grooves are."""
    config = WildSynthConfig(image_size=192, size_jitter=0.0)
    with WildSynthesizer(sfm_model, config) as synth:
        face_seq, _, detail_seq = np.random.SeedSequence(7).spawn(3)
        sample = sample_render(np.random.default_rng(face_seq), config.sampling, sfm_model)
        # A smile at full weight: crow's feet and nasolabial folds at full depth.
        sample = replace(sample, beta=expression_beta(sfm_model, "happiness"), yaw=5.0, pitch=0.0, roll=0.0)
        details, _ = synth.draw_details(sample, np.random.default_rng(detail_seq))
        detailed = synth.renderer.render(sample, SampledDetails(details))
        plain = synth.renderer.render(sample, None)
        surface_uv = synth.renderer.map.apply(sfm_model.uv)
    diff = np.abs(detailed.image.astype(int) - plain.image.astype(int)).max(axis=2)
    inside = detailed.mask & plain.mask
    # The folds project where the subdivided proxy's grooved vertices are.
    xy = surface_uv * details.mm_per_uv
    grooved = np.abs(sum(g.evaluate(xy) for g in details.grooves if g.family == "nasolabial")) > 0.1
    vertices = synth.renderer.map.apply(sfm_model.vertices(sample.alpha, sample.beta))
    P = detailed.projection
    hom = np.column_stack([vertices[grooved], np.ones(int(grooved.sum()))]) @ P.T
    px = np.round(hom[:, :2] / hom[:, 2:]).astype(int)
    folds = np.zeros(diff.shape, bool)
    folds[px[:, 1], px[:, 0]] = True
    assert diff[folds & inside].mean() > 3.0 * diff[inside & ~folds].mean()
    assert (diff[folds & inside] >= 4).sum() >= 20


def test_truth_landmarks_sit_on_the_face_in_the_pixels(built: Path, detector: LandmarkDetector) -> None:
    """dlib's landmarks on the degraded JPEGs agree with the stored ones: the pixels and the truth match."""
    errors = []
    for row in pq.read_table(built / OUT / "truth.parquet").to_pylist():
        photo = load_photo(built / OUT / "images" / row["file"], LoadConfig())
        assert isinstance(photo, LoadedPhoto) and photo.notes == ()
        found = detector.detect(photo.rgb)
        if found.ok:
            stored = np.array(row["landmarks"]).reshape(68, 2)
            errors.append(np.median(np.linalg.norm(found.face.landmarks - stored, axis=1)) / row["width"])
    assert len(errors) >= 3, "most faces are found"
    assert np.median(errors) < 0.05, errors


def test_bad_examples_meet_their_expected_outcome(built: Path, detector: LandmarkDetector) -> None:
    images = built / OUT / "images"
    listed = pq.read_table(built / OUT / "bad_examples.parquet").to_pylist()
    assert sorted(r["file"] for r in listed) == [f"_bad/{b}" for b in BAD]
    outcomes = {}
    for row in listed:
        result = load_photo(images / row["file"], LoadConfig())
        verdict, _, what = row["expected"].partition(": ")
        if verdict == "usable":
            assert isinstance(result, LoadedPhoto), (row, result)
            assert any(note.startswith(what) for note in result.notes), (row, result.notes)
            assert detector.detect(result.rgb).ok, f"{row['file']}: the converted image still shows its face"
        elif what == NO_FACE:
            assert isinstance(result, LoadedPhoto)
            assert detector.detect(result.rgb).reason == NO_FACE
        else:
            assert isinstance(result, LoadFailure) and result.kind == what, (row, result)
        outcomes[row["file"]] = row["expected"]
    assert outcomes["_bad/huge_15000.png"] == "quarantine: image too large"
    assert outcomes["_bad/large_6000.jpg"] == "usable: downscaled 6000x6000"


def test_same_params_same_bytes(built: Path, tmp_path: Path, model_npz: Path) -> None:
    again = _root(tmp_path, model_npz)
    stage.run(stage.WildSynthParams(**TINY, bad_examples=True), again)
    assert _files(again) == _files(built)
    metrics = Path("metrics/wild_synth.json")
    assert (again / metrics).read_bytes() == (built / metrics).read_bytes()


def test_growing_the_count_keeps_the_first_images(built: Path, tmp_path: Path, model_npz: Path) -> None:
    more = _root(tmp_path, model_npz)
    stage.run(stage.WildSynthParams(**{**TINY, "count": 8}, bad_examples=False), more)
    small, large = _files(built), _files(more)
    assert all(large[f"images/wild-{i:05d}.jpg"] == small[f"images/wild-{i:05d}.jpg"] for i in range(6))
    assert "images/wild-00007.jpg" in large and not any(k.startswith("images/_bad/") for k in large)
    assert pq.read_table(more / OUT / "bad_examples.parquet").num_rows == 0


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="at least 64 pixels"):
        WildSynthConfig(image_size=64, size_jitter=0.5)
    with pytest.raises(ValidationError, match="increasing pair"):
        ClutterConfig(count=(5, 2))
    with pytest.raises(ValidationError):
        stage.WildSynthParams(degradation={"jpeg_quality": [0, 101]})


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    from facedetail.errors import SourceFileError

    with pytest.raises(SourceFileError, match="dvc repro face_model"):
        stage.run(stage.WildSynthParams(**TINY), tmp_path)


@pytest.mark.slow  # ~35 s; wild_synth's `dvc repro` runs in the tiny pipeline (conftest) by default
def test_dvc_repro_wild_synth(repo: Path) -> None:
    shrink_params(repo)
    sh(["dvc", "repro", "wild_synth"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"face_model", "wild_synth"}, "only wild_synth and what it needs ran"
    deps = {d["path"] for d in lock["wild_synth"]["deps"]}
    assert {"data/face_model/model.npz", "stages/wild_synth.py", "facedetail/proxy/synthetic.py"} <= deps
    assert lock["wild_synth"]["params"]["params.yaml"]["wild_synth"]["count"] == 6
    outs = {o["path"]: o for o in lock["wild_synth"]["outs"]}
    # 6 images + their 6 truth maps + astronaut + truth, bad_examples, manifest, contact sheet, lineage, card
    assert outs["data/wild_synth"]["nfiles"] == 19
    assert verify_manifest(repo / OUT) == []
    assert "up to date" in sh(["dvc", "status", "wild_synth"], repo).stdout
    assert json.loads((repo / "metrics/wild_synth.json").read_text())["images"] == 6
