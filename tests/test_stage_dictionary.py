"""The render_faces, emotion_net and dictionary stages on a tiny render set, and the β_prior API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_FACES, TINY_TRAIN, tool_env

from facedetail.dictionary.prior import ExpressionDictionary
from facedetail.dictionary.screened_l1 import screen_backend
from facedetail.features.emotion import FER_CLASSES
from facedetail.features.faceset import CROP_EXT
from facedetail.io.hashing import sha256_file
from facedetail.io.images import decode_png
from facedetail.io.shards import read_tar_samples
from stages import dictionary, emotion_net, render_expressions, render_faces


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file()}


def _build(root: Path) -> None:
    render_faces.run(render_faces.RenderFacesParams(workers=1, holdout_fraction=0.25), root)
    emotion_net.run(emotion_net.EmotionNetParams(train=TINY_TRAIN), root)
    dictionary.run(dictionary.DictionaryParams(), root)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_npz: Path) -> Path:
    """A root with a tiny render set and the three stages run on it."""
    root = tmp_path_factory.mktemp("dictionary") / "root"
    (root / "data/face_model").mkdir(parents=True)
    shutil.copy2(model_npz, root / "data/face_model/model.npz")
    render_expressions.run(render_expressions.RenderExpressionsParams(**TINY_FACES), root)
    _build(root)
    return root


def test_render_faces_outputs(built: Path) -> None:
    out = built / "data/render_faces"
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert len(manifest) + len(quarantine) == TINY_FACES["count"]
    assert len(manifest) >= TINY_FACES["count"] - 2, quarantine
    assert all(q["reason"] for q in quarantine)
    row = manifest[0]
    assert len(row["landmarks"]) == 136 and row["split"] in ("train", "holdout") and row["label"]
    crop = decode_png(read_tar_samples(out / row["shard"], [row["id"]])[0][CROP_EXT], grey=True)
    assert crop.shape == (64, 64) and crop.dtype == np.uint8
    metrics = json.loads((built / "metrics/render_faces.json").read_text())
    assert metrics["landmark_error_px_median"] < 10, "dlib's landmarks should sit near the rendered ones"
    assert (out / "framing.json").is_file()


def test_emotion_net_metrics_and_plots(built: Path) -> None:
    metrics = json.loads((built / "metrics/emotion_net.json").read_text())
    assert set(metrics["holdout_accuracy_per_class"]) == set(FER_CLASSES)
    assert metrics["astronaut"]["predicted"] in FER_CLASSES
    assert abs(sum(metrics["astronaut"]["probabilities"].values()) - 1) < 1e-3
    confusion = (built / "metrics/emotion_net/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1 + metrics["holdout_crops"]
    history = (built / "metrics/emotion_net/history.csv").read_text().splitlines()
    assert len(history) == 1 + TINY_TRAIN["epochs"]


def test_dictionary_retrieves_exact_beta_of_its_own_renders(built: Path) -> None:
    lookup = ExpressionDictionary.load(built / "data/dictionary")
    batch = lookup.prior_features(lookup.emotion, lookup.appearance)
    assert batch.neighbour_ids == lookup.ids
    np.testing.assert_array_equal(batch.beta, lookup.beta)
    assert np.all(batch.distances == 0)


def test_prior_of_a_render_image_finds_that_render(built: Path) -> None:
    """The photo path (detect, crop, network, landmarks) reproduces the stored feature exactly."""
    lookup = ExpressionDictionary.load(built / "data/dictionary")
    item = lookup.ids[0]
    shard = pq.read_table(built / "data/render_expressions/manifest.parquet").to_pylist()
    where = next(r["shard"] for r in shard if r["id"] == item)
    image = decode_png(read_tar_samples(built / "data/render_expressions" / where, [item])[0]["png"])
    result = lookup.prior([image])[0]
    assert result.ok and result.neighbour_id == item and result.distance < 1e-3
    if lookup.maker.config.k == 1:
        np.testing.assert_array_equal(result.beta, lookup.beta[0])
    else:
        # k neighbours weighted by inverse distance: the others' weights are ~1e-3 / their distance.
        np.testing.assert_allclose(result.beta, lookup.beta[0], atol=1e-4)


def test_prior_reports_photos_without_prior(built: Path, tmp_path: Path) -> None:
    lookup = ExpressionDictionary.load(built / "data/dictionary")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a picture")
    blank = np.full((200, 200, 3), 128, np.uint8)
    results = lookup.prior([blank, not_image, tmp_path / "missing.png"])
    assert [r.ok for r in results] == [False, False, False]
    assert results[0].reason == "no face detected"
    assert results[1].reason.startswith("not an image"), results[1].reason
    assert "no such file" in results[2].reason


def test_dictionary_metrics_compare_baselines(built: Path) -> None:
    metrics = json.loads((built / "metrics/dictionary.json").read_text())
    mae = metrics["quality"]["beta_mae"]
    assert set(mae) == {"dictionary", "emotion_only", "appearance_only", "zero_beta", "random_entry",
                        "oracle_nearest_beta", "release_both_halves_1nn", "emotion_only_1nn",
                        "best_combination_on_validation"}
    assert mae["oracle_nearest_beta"] <= min(mae["random_entry"], mae["release_both_halves_1nn"])
    # The dictionary is built with the config the validation split chose, and says which.
    selection = metrics["selection"]
    chosen = selection["validation"]["chosen"]
    assert metrics["features"] == chosen["features"]
    assert chosen["beta_mae"] == min(selection["validation"][name]["beta_mae"] for name in
                                     ("best_emotion_only", "best_appearance_only", "best_combination"))
    assert selection["holdout_combination_beats_emotion_only"] == (
        mae["best_combination_on_validation"] < mae["emotion_only"])
    grid = pq.read_table(built / "data/dictionary/selection.parquet").to_pylist()
    assert len(grid) == selection["grid_points"] and min(r["beta_mae"] for r in grid) == pytest.approx(
        chosen["beta_mae"], abs=5e-5)
    lookup = ExpressionDictionary.load(built / "data/dictionary")
    assert lookup.maker.config.model_dump(mode="json") == metrics["features"]
    assert metrics["index"] == {"metric": "l1", "kind": "flat", "device": "cpu",
                                "device_note": metrics["index"]["device_note"],
                                "search_method": f"screened L1 ({screen_backend()} SAD)", "search_note": None}
    assert metrics["astronaut"]["neighbour_label"] is not None


def test_stages_are_byte_identical_on_rerun(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    for part in ("data/face_model", "data/render_expressions"):
        shutil.copytree(built / part, again / part)
    _build(again)
    for part in ("data/render_faces", "data/emotion_net", "data/dictionary"):
        assert _files(again / part) == _files(built / part), part
    for name in ("render_faces", "emotion_net", "dictionary"):
        assert (again / f"metrics/{name}.json").read_bytes() == (built / f"metrics/{name}.json").read_bytes()


def test_cli_prior(built: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from PIL import Image
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(blank)
    proc = subprocess.run([sys.executable, "-m", "facedetail.cli", "prior", str(photo), str(blank), "--dictionary",
                           str(built / "data/dictionary")], capture_output=True, text=True, env=tool_env())
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1, proc.stderr
    assert lines[0]["beta_prior"] is not None and lines[0]["neighbour"].startswith("expr-")
    assert lines[1]["beta_prior"] is None and lines[1]["reason"] == "no face detected"


def test_missing_inputs_are_one_line_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("{}\n")
    for module in ("stages.render_faces", "stages.emotion_net", "stages.dictionary"):
        proc = subprocess.run([sys.executable, "-m", module, "--root", str(tmp_path)], capture_output=True,
                              text=True, env=tool_env())
        assert proc.returncode == 2, (module, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "dvc repro" in proc.stderr, proc.stderr
