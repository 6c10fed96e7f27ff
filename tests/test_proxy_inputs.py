"""Listing in-the-wild photos and loading them: every kind of bad or odd file, made here on the fly."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from facedetail.errors import SourceFileError
from facedetail.proxy.inputs import (
    ALPHA_COMPOSITED,
    CMYK_CONVERTED,
    GREY_EXPANDED,
    PALETTE_EXPANDED,
    SIXTEEN_BIT,
    InputItem,
    LoadConfig,
    LoadedPhoto,
    LoadFailure,
    item_id,
    list_inputs,
    load_photo,
    scan_inputs,
)

ROOT = Path(__file__).resolve().parents[1]


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (JPEG-friendly) with some detail."""
    grid = np.random.default_rng(seed).uniform(0, 255, (6, 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def _jpeg(path: Path, rgb: np.ndarray, **kw: object) -> Path:
    Image.fromarray(rgb).save(path, "JPEG", quality=92, **kw)
    return path


def _loaded(result: LoadedPhoto | LoadFailure) -> LoadedPhoto:
    assert isinstance(result, LoadedPhoto), result
    assert result.rgb.dtype == np.uint8 and result.rgb.ndim == 3 and result.rgb.shape[2] == 3
    assert result.rgb.flags.c_contiguous
    return result


def _failed(result: LoadedPhoto | LoadFailure) -> LoadFailure:
    assert isinstance(result, LoadFailure), f"expected a failure, got notes {getattr(result, 'notes', None)}"
    return result


# --- bad files -----------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    failure = _failed(load_photo(tmp_path / "empty.jpg", LoadConfig()))
    assert failure.reason == "empty file (0 bytes)" and failure.kind == "empty file"


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert _failed(load_photo(tmp_path / "gone.jpg", LoadConfig())).reason == "no such file"
    assert _failed(load_photo(tmp_path, LoadConfig())).reason == "not a file: a folder"


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_jpeg(tmp_path: Path, cut: float) -> None:
    data = _jpeg(tmp_path / "full.jpg", _pattern(240, 320)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:int(len(data) * cut)])
    failure = _failed(load_photo(tmp_path / "cut.jpg", LoadConfig()))
    assert failure.kind == "truncated image"
    assert failure.reason == ("truncated image: JPEG data ends before the image does "
                              "(libjpeg: Premature end of JPEG file)")


def test_truncated_jpeg_is_caught_even_if_someone_enabled_pil_truncated_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jpeg(tmp_path / "full.jpg", _pattern(240, 320)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert _failed(load_photo(tmp_path / "cut.jpg", LoadConfig())).kind == "truncated image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS == 1000, "settings restored"
    # PIL's own bomb limit (1000 pixels here) is not the loader's limit: max_pixels is
    assert _loaded(load_photo(tmp_path / "full.jpg", LoadConfig())).rgb.shape == (240, 320, 3)


def test_truncated_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_pattern(240, 320)).save(buf, "PNG")
    data = buf.getvalue()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    failure = _failed(load_photo(tmp_path / "cut.png", LoadConfig()))
    assert failure.kind == "truncated image" and failure.reason.startswith("truncated image: PNG data ends early")


def test_text_file_with_an_image_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is a shopping list, not a photo\n")
    failure = _failed(load_photo(tmp_path / "notes.jpg", LoadConfig()))
    assert failure.reason == "not an image: .jpg file is not decodable (text content)"
    assert failure.kind == "not an image"


def test_tiny_image(tmp_path: Path) -> None:
    Image.fromarray(_pattern(24, 20)).save(tmp_path / "tiny.png")
    failure = _failed(load_photo(tmp_path / "tiny.png", LoadConfig()))
    assert failure.reason == "image too small: 20x24 below min_side 32"
    # a thin strip is too small once brought down to max_side
    Image.fromarray(_pattern(40, 2000)).save(tmp_path / "strip.png")
    strip = _failed(load_photo(tmp_path / "strip.png", LoadConfig(max_side=1024)))
    assert strip.reason == "image too small: 2000x40 is 1024x20 at max_side 1024, below min_side 32"


# --- modes ---------------------------------------------------------------------------------------


def test_grayscale(tmp_path: Path) -> None:
    grey = _pattern(60, 80)[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    photo = _loaded(load_photo(tmp_path / "grey.png", LoadConfig()))
    assert photo.source_mode == "L" and photo.notes == (GREY_EXPANDED,)
    np.testing.assert_array_equal(photo.rgb, np.repeat(grey[..., None], 3, axis=2))


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = (200, 30, 10)
    rgba[:, :20, 3] = 255  # opaque
    rgba[:, 20:35, 3] = 0  # transparent
    rgba[:, 35:, 3] = 128  # half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    photo = _loaded(load_photo(tmp_path / "rgba.png", LoadConfig()))
    assert photo.source_mode == "RGBA" and photo.notes == (ALPHA_COMPOSITED,)
    assert tuple(photo.rgb[5, 5]) == (200, 30, 10)
    assert tuple(photo.rgb[5, 25]) == (255, 255, 255)
    a = 128 / 255
    expected = np.round(np.array([200, 30, 10]) * a + 255 * (1 - a))
    np.testing.assert_array_equal(photo.rgb[5, 40], expected)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    rgb = _pattern(120, 160)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    photo = _loaded(load_photo(tmp_path / "cmyk.jpg", LoadConfig()))
    assert photo.source_mode == "CMYK" and photo.notes == (CMYK_CONVERTED,) and photo.format == "JPEG"
    assert np.abs(photo.rgb.astype(int) - rgb).mean() < 4, "colours survive the CMYK round trip"


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32896], [40000, 65280, 65535, 12850]], np.uint16)
    values = np.tile(values, (20, 20))
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    photo = _loaded(load_photo(tmp_path / "deep.png", LoadConfig()))
    assert photo.source_mode == "I;16" and photo.notes == (SIXTEEN_BIT, GREY_EXPANDED)
    np.testing.assert_array_equal(photo.rgb[..., 0], np.round(values / 257.0).astype(np.uint8))
    assert photo.rgb[0, 2, 0] == 4, "1000 / 257 rounds to 4; clipping would give 255"


def test_sixteen_bit_colour_png(tmp_path: Path) -> None:
    rgb16 = _pattern(50, 60).astype(np.uint16) * 257 + 100
    cv2.imwrite(str(tmp_path / "deep.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    photo = _loaded(load_photo(tmp_path / "deep.png", LoadConfig()))
    assert photo.source_mode == "RGB" and photo.notes == (SIXTEEN_BIT,)
    assert np.abs(photo.rgb.astype(int) - rgb16 / 257.0).max() <= 1.0


def test_palette_png(tmp_path: Path) -> None:
    img = Image.fromarray(_pattern(60, 80)).quantize(32)
    img.save(tmp_path / "palette.png")
    photo = _loaded(load_photo(tmp_path / "palette.png", LoadConfig()))
    assert photo.source_mode == "P" and photo.notes == (PALETTE_EXPANDED,)
    np.testing.assert_array_equal(photo.rgb, np.asarray(img.convert("RGB")))
    # a palette with a transparent entry is expanded and composited
    img.info["transparency"] = 0
    img.save(tmp_path / "palette_alpha.png", transparency=0)
    alpha = _loaded(load_photo(tmp_path / "palette_alpha.png", LoadConfig()))
    assert alpha.notes == (PALETTE_EXPANDED, ALPHA_COMPOSITED)
    assert (alpha.rgb[np.asarray(img) == 0] == 255).all()


def test_exif_orientation_6_swaps_width_and_height(tmp_path: Path) -> None:
    stored = np.full((120, 200, 3), 128, np.uint8)
    stored[:20, :30] = (255, 0, 0)  # red block at the stored image's top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    _jpeg(tmp_path / "rotated.jpg", stored, exif=exif.tobytes())
    photo = _loaded(load_photo(tmp_path / "rotated.jpg", LoadConfig()))
    assert photo.original_size == (120, 200) and photo.rgb.shape == (200, 120, 3)
    assert photo.notes == ("EXIF orientation 6 applied",)
    # turned clockwise, the top-left corner goes to the top-right
    assert photo.rgb[5, 115, 0] > 200 and photo.rgb[5, 115, 1] < 60
    assert photo.rgb[195, 5, 0] < 160


def test_hash_is_of_the_file_bytes(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "a.jpg", _pattern(64, 64))
    photo = _loaded(load_photo(path, LoadConfig()))
    assert photo.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert photo.notes == () and photo.scale == 1.0 and photo.original_size == (64, 64)


def test_a_file_over_max_file_bytes_is_refused_from_its_size(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "a.jpg", _pattern(600, 800))
    size = path.stat().st_size
    photo = _loaded(load_photo(path, LoadConfig(max_side=256)))
    assert photo.notes == ("JPEG decoded at 1/2", "downscaled 800x600 -> 256x192")
    assert photo.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    failure = _failed(load_photo(path, LoadConfig(max_file_bytes=size - 1)))
    assert failure.reason == f"file too large: {size} bytes, over max_file_bytes {size - 1}"
    with open(tmp_path / "hole.jpg", "wb") as fh:  # 10 GB on paper: refused without a read
        fh.truncate(10 << 30)
    assert _failed(load_photo(tmp_path / "hole.jpg", LoadConfig())).kind == "file too large"


# --- size limits ---------------------------------------------------------------------------------


def test_large_non_jpeg_is_refused_above_max_pixels(tmp_path: Path) -> None:
    Image.fromarray(_pattern(500, 600)).save(tmp_path / "big.png")
    failure = _failed(load_photo(tmp_path / "big.png", LoadConfig(max_pixels=100_000)))
    assert failure.reason == "image too large: 600x500 exceeds max_pixels 100000"
    # a JPEG of the same size is decoded at 1/8 (75x63 pixels), within the limit, so it loads
    _jpeg(tmp_path / "big.jpg", _pattern(500, 600))
    photo = _loaded(load_photo(tmp_path / "big.jpg", LoadConfig(max_pixels=100_000, max_side=64)))
    assert photo.rgb.shape == (53, 64, 3) and photo.notes[0] == "JPEG decoded at 1/8"


def test_huge_png_is_refused_from_its_header_alone(tmp_path: Path) -> None:
    """A 20000x20000 header followed by a few bytes of pixel data: refused as too large, never decoded
    (decoding would have found it truncated, and would need 1.2 GB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    (tmp_path / "huge.png").write_bytes(data)
    failure = _failed(load_photo(tmp_path / "huge.png", LoadConfig()))
    assert failure.reason == "image too large: 20000x20000 exceeds max_pixels 25000000"


_MEASURE = """
import json, sys, time
from facedetail.proxy.inputs import LoadConfig, load_photo

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

before = status("VmRSS")
start = time.perf_counter()
photo = load_photo(sys.argv[1], LoadConfig())
seconds = time.perf_counter() - start
print(json.dumps({"shape": list(photo.rgb.shape), "notes": list(photo.notes), "scale": photo.scale,
                  "original_size": list(photo.original_size), "peak_growth_mb": status("VmHWM") - before,
                  "seconds": seconds}))
"""


def test_12000_square_jpeg_is_decoded_reduced_in_little_memory(tmp_path: Path) -> None:
    small = _pattern(375, 375)
    big = Image.fromarray(small).resize((12000, 12000), Image.Resampling.BILINEAR)
    big.save(tmp_path / "huge.jpg", "JPEG", quality=80)
    del big
    # Measured in a fresh process: its peak resident memory (VmHWM) over its resident memory before the
    # load bounds what the load needed (the file's 7 MB of bytes included).
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "huge.jpg")], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert result["shape"] == [1024, 1024, 3] and result["original_size"] == [12000, 12000]
    assert result["notes"] == ["JPEG decoded at 1/8", "downscaled 12000x12000 -> 1024x1024"]
    assert result["scale"] == pytest.approx(1024 / 12000)
    full_decode_mb = 12000 * 12000 * 3 / 2**20  # 412 MiB
    assert result["peak_growth_mb"] < 100 < full_decode_mb, result
    # and the pixels are the image, not noise
    photo = _loaded(load_photo(tmp_path / "huge.jpg", LoadConfig()))
    reference = cv2.resize(small, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    assert np.abs(photo.rgb.astype(int) - reference).mean() < 4


# --- listing -------------------------------------------------------------------------------------


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_list_a_folder_tree(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    for rel in ("happy/b.JPG", "happy/a.jpeg", "sad/deep/c.png", "z.webp", "y.BMP", "notes.txt", ".hidden.jpg",
                ".cache/d.jpg", "sad/e.gif", "t.tiff", "p.ppm", "README"):
        _touch(src / rel)
    listing = scan_inputs(src)
    items = listing.items
    assert items == list_inputs(src)
    assert [i.relative for i in items] == ["happy/a.jpeg", "happy/b.JPG", "p.ppm", "sad/deep/c.png", "sad/e.gif",
                                           "t.tiff", "y.BMP", "z.webp"]
    assert [(s.path, s.reason) for s in listing.skipped] == [
        (".cache/", "hidden folder (not searched)"), (".hidden.jpg", "hidden file"), ("README", "no file extension"),
        ("notes.txt", "extension not an image (.txt)")]
    assert listing.entries == 12
    assert all(i.path == (src / i.relative).resolve() and i.path.is_absolute() for i in items)
    assert all(i.box is None and i.label is None for i in items)
    assert len({i.id for i in items}) == len(items)
    assert items[3].id == "sad-deep-c-png-" + hashlib.sha256(b"sad/deep/c.png").hexdigest()[:12]
    with pytest.raises(ValueError, match="lists only"):
        list_inputs(src, root=tmp_path)


def test_ids_are_stable_and_filesystem_safe(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        _touch(root / "Happy Faces/img 001 (copy).JPG")
        _touch(root / "Happy Faces/img_001_copy.JPG")
    a, b = list_inputs(one), list_inputs(two)
    assert [i.id for i in a] == [i.id for i in b], "the id depends on the relative path only"
    assert a[0].id != a[1].id, "paths with the same slug still get different ids"
    for item in a:
        assert re.fullmatch(r"[A-Za-z0-9-]+-[0-9a-f]{12}", item.id) and len(item.id) <= 61
    assert item_id("x" * 300 + "/IMG_0001.jpg").startswith("x" * 35 + "-IMG-0001-jpg-")


def test_affectnet_style_csv(tmp_path: Path) -> None:
    images = tmp_path / "Manually_Annotated_Images"
    csv_text = (
        "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
        '689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg,134,134,899,899,"1.0;2.0",1,0.78,-0.04\n'
        "392/c4db2f9b7e4b422d14b6e038f0cdc3ecee239b55326e9181ee4520f9.jpg,20,30,400,420,,0,-0.05,0.0\n"
        "1/readme.txt,,,,,,8,,\n"
    )
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/training.csv").write_text(csv_text)
    items = list_inputs(tmp_path / "lists/training.csv", root=images)
    assert [i.relative for i in items] == [
        "689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg",
        "392/c4db2f9b7e4b422d14b6e038f0cdc3ecee239b55326e9181ee4520f9.jpg",
        "1/readme.txt",
    ], "list order is kept, and a listed non-image stays listed (the loader reports it)"
    assert items[0].box == (134.0, 134.0, 1033.0, 1033.0) and items[1].box == (20.0, 30.0, 420.0, 450.0)
    assert items[2].box is None
    assert [i.label for i in items] == ["1", "0", "8"]
    assert items[0].path == images.resolve() / items[0].relative
    failure = _failed(load_photo(items[0].path, LoadConfig()))
    assert failure.reason == "no such file"


def test_parquet_list_with_ltrb_boxes(tmp_path: Path) -> None:
    table = pa.table({
        "path": ["a/one.jpg", "/abs/two.png", "three.jpg"],
        "left": [1.5, None, 0.0], "top": [2.0, None, 0.0], "right": [50.0, None, 10.0], "bottom": [60.0, None, 12.0],
        "label": ["happy", None, "sad"],
    })
    pq.write_table(table, tmp_path / "list.parquet")
    items = list_inputs(tmp_path / "list.parquet")
    assert [i.path for i in items] == [tmp_path / "a/one.jpg", Path("/abs/two.png"), tmp_path / "three.jpg"]
    assert [i.box for i in items] == [(1.5, 2.0, 50.0, 60.0), None, (0.0, 0.0, 10.0, 12.0)]
    assert [i.label for i in items] == ["happy", None, "sad"]
    assert all(isinstance(i, InputItem) for i in items)


def test_malformed_lists_raise_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "nopath.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(SourceFileError, match=r"no path column \(columns: file, label\).*`path`"):
        list_inputs(tmp_path / "nopath.csv")
    (tmp_path / "halfbox.csv").write_text("path,face_x,face_y\na.jpg,1,2\n")
    with pytest.raises(SourceFileError, match="face box columns incomplete"):
        list_inputs(tmp_path / "halfbox.csv")
    (tmp_path / "badbox.csv").write_text("path,left,top,right,bottom\na.jpg,1,2,oops,4\n")
    with pytest.raises(SourceFileError, match=r"row 1: face box .* is not four numbers"):
        list_inputs(tmp_path / "badbox.csv")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SourceFileError, match="unsupported input list type"):
        list_inputs(tmp_path / "list.json")
    with pytest.raises(SourceFileError, match="not found"):
        list_inputs(tmp_path / "missing")


def test_a_photo_listed_twice_or_under_another_spelling_is_one_item_and_duplicates(tmp_path: Path) -> None:
    (tmp_path / "list").mkdir()
    _jpeg(tmp_path / "list/a.jpg", _pattern(64, 64))
    (tmp_path / "list/link.jpg").symlink_to("a.jpg")
    (tmp_path / "list/twice.csv").write_text("path\na.jpg\nb.jpg\n./a.jpg\n../list/a.jpg\na.jpg\nlink.jpg\n")
    listing = scan_inputs(tmp_path / "list/twice.csv")
    assert [(i.relative, i.row) for i in listing.items] == [("a.jpg", 1), ("b.jpg", 2)]
    first = listing.items[0].id
    assert [(d.path, d.row, d.duplicate_of, d.reason) for d in listing.duplicates] == [
        ("./a.jpg", 3, first, "same file as a.jpg (row 1)"), ("../list/a.jpg", 4, first, "same file as a.jpg (row 1)"),
        ("a.jpg", 5, first, "same file as a.jpg (row 1)"), ("link.jpg", 6, first, "same file as a.jpg (row 1)")]
    assert listing.entries == 6
