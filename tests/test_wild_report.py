"""facedetail.proxy.synthreport: the synthetic wild set's bad-example files, contact sheet and metrics."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from facedetail.io.seeds import derive_seed
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.synthetic import BAD_DIR, WildSynthConfig, WildSynthesizer, encode_jpeg
from facedetail.proxy.synthreport import (
    BAD_SOURCE_ITEM,
    BAD_TABLE_SCHEMA,
    NO_FACE_ITEM,
    TRUE_HIDDEN,
    TRUE_VISIBLE,
    wild_contact_sheet,
    wild_set_metrics,
    write_bad_examples,
)
from facedetail.render.sheet import LABEL_HEIGHT

NAMES = ["empty.jpg", "truncated.jpg", "not_an_image.png", "cmyk.jpg", "sixteen_bit.png", "palette.png",
         "grayscale.png", "rgba.png", "exif_rotated.jpg", "large_6000.jpg", "huge_15000.png", "tiny.png",
         "no_face.jpg"]


@pytest.fixture(scope="module")
def synth(sfm_model: MorphableModel):
    with WildSynthesizer(sfm_model, WildSynthConfig(image_size=96, size_jitter=0.0)) as s:
        yield s


def test_bad_examples_are_written_in_order_from_derived_seeds(synth: WildSynthesizer, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    listed = write_bad_examples(synth, 11, "wild_synth", images)
    assert [r["file"] for r in listed] == [f"{BAD_DIR}/{n}" for n in NAMES]
    assert sorted(p.name for p in (images / BAD_DIR).iterdir()) == sorted(NAMES)
    assert set(listed[0]) == set(BAD_TABLE_SCHEMA.names)
    assert listed[0] == {"file": "_bad/empty.jpg", "kind": "zero-byte file", "expected": "quarantine: empty file"}
    assert (images / "_bad/empty.jpg").read_bytes() == b""
    # The sources are drawn from seeds derived for fixed item names (changing them changes every file).
    assert (BAD_SOURCE_ITEM, NO_FACE_ITEM) == ("bad-source", "bad-no-face")
    clean, _ = synth.clean_face(derive_seed(11, "wild_synth", "bad-source"))
    with Image.open(images / "_bad/grayscale.png") as grey:
        assert np.array_equal(np.asarray(grey), np.asarray(Image.fromarray(clean).convert("L")))
    no_face = synth.no_face(derive_seed(11, "wild_synth", "bad-no-face"))
    assert (images / "_bad/no_face.jpg").read_bytes() == encode_jpeg(no_face, 90)
    with pytest.raises(FileExistsError):  # never written over an existing set
        write_bad_examples(synth, 11, "wild_synth", images)


def test_bad_examples_depend_on_the_seed_and_stage_only(synth: WildSynthesizer, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_bad_examples(synth, 5, "wild_synth", a)
    write_bad_examples(synth, 5, "other_stage", b)
    files = ("cmyk.jpg", "tiny.png", "no_face.jpg")
    assert all((a / BAD_DIR / f).read_bytes() != (b / BAD_DIR / f).read_bytes() for f in files)
    assert (a / BAD_DIR / "not_an_image.png").read_bytes() == (b / BAD_DIR / "not_an_image.png").read_bytes()
    with Image.open(io.BytesIO((a / BAD_DIR / "tiny.png").read_bytes())) as tiny:
        assert tiny.size == (24, 24)


def _image(side: int, landmarks: np.ndarray, visible: np.ndarray, label: str = "happy", yaw: float = 12.4):
    """The parts of a WildImage the contact sheet reads."""
    return SimpleNamespace(side=side, landmarks=landmarks, visible=visible,
                           sample=SimpleNamespace(label=label, yaw=yaw))


def test_contact_sheet_draws_true_landmarks_by_visibility() -> None:
    side, tile = 64, 160
    # Landmarks on a grid of image pixels that scale to whole tile pixels; every other one hidden, one undefined.
    uv = np.array([(3 + 7 * (i % 9), 3 + 7 * (i // 9)) for i in range(68)], np.float64)
    uv[67] = np.nan
    visible = np.arange(68) % 2 == 0
    rgb = np.full((side, side, 3), 90, np.uint8)
    blank = _image(side, np.full((68, 2), np.nan), np.ones(68, bool))
    shown = [(rgb, _image(side, uv, visible))] + [(rgb, blank)] * 6
    sheet = wild_contact_sheet(shown)  # type: ignore[arg-type]
    assert sheet.dtype == np.uint8 and sheet.shape == (2 * (tile + LABEL_HEIGHT), 6 * tile, 3)
    first = sheet[LABEL_HEIGHT:LABEL_HEIGHT + tile, :tile]
    scale = tile / side
    for (u, v), seen in zip(uv[:67], visible[:67], strict=True):
        x, y = round((u + 0.5) * scale - 0.5), round((v + 0.5) * scale - 0.5)
        assert tuple(first[y, x]) == (TRUE_VISIBLE if seen else TRUE_HIDDEN), (u, v)
    # Nothing drawn where no landmark is: an image without defined landmarks is its pixels, resized.
    second = sheet[LABEL_HEIGHT:LABEL_HEIGHT + tile, tile:2 * tile]
    assert (second == 90).all()
    assert (sheet[LABEL_HEIGHT + tile + LABEL_HEIGHT:, tile:] == 255).all(), "the 2nd row's empty tiles are white"


def test_set_metrics() -> None:
    def row(label: str, yaw: float, side: int, seen: int, quality: int, blur: float, noise: float) -> dict:
        return {"label": label, "yaw_deg": yaw, "width": side, "jpeg_quality": quality, "blur_sigma": blur,
                "noise_sigma": noise, "landmark_visible": [True] * seen + [False] * (68 - seen)}

    truth = [row("sad", 10.0, 100, 68, 50, 0.0, 1.0), row("happy", -35.12345, 120, 34, 60, 0.5, 2.0),
             row("happy", 31.0, 90, 0, 91, 1.0, 0.0)]
    bad = [{"file": "_bad/empty.jpg", "kind": "k", "expected": "e"}] * 2
    assert wild_set_metrics(truth, bad) == {
        "images": 3, "photos": 1, "bad_examples": 2, "label_counts": {"happy": 2, "sad": 1},
        "yaw_abs_max": 35.123, "yaw_abs_over_30": 2, "side_min": 90, "side_max": 120,
        "landmarks_visible_fraction": 0.5, "jpeg_quality_mean": 67.0, "blur_sigma_mean": 0.5, "noise_sigma_mean": 1.0}
    assert wild_set_metrics(truth, [], photos=0)["photos"] == 0
    assert list(wild_set_metrics(truth, [])["label_counts"]) == ["happy", "sad"]  # sorted: stable JSON
