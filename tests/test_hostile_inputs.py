"""Hostile inputs, made here: a folder and a CSV list with every kind of bad, odd or dangerous file we know of.

The generator (:func:`make_hostile_folder`, :func:`make_hostile_list`) is shared with the stage-level
tests in ``test_stage_wild_proxy.py``, which run ``wild_proxy`` and ``facedetail prior`` over the same
files. Here: the decoder's verdict on every file, the listing's accounting of every entry, the
decoder's peak memory on the bombs, and what a user without read permission on one file gets.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from skimage import data

from facedetail.errors import SourceFileError
from facedetail.io.decode import LoadedPhoto, LoadFailure, load_photo
from facedetail.io.lineage import UNHASHED, expand_files, input_version
from facedetail.proxy.inputs import content_duplicates, file_hashes, scan_inputs
from facedetail.proxy.synthetic import grey_png

ROOT = Path(__file__).resolve().parents[1]
NON_UTF8 = os.fsdecode(b"caf\xe9-photo.jpg")
"""A file name that is not valid UTF-8 (Latin-1 e-acute)."""
NEWLINE_NAME = "line\nbreak & sp\u00e4ces \U0001f600.jpg"


@dataclass(frozen=True)
class Case:
    """One hostile entry and where it must end."""

    rel: str
    """Path relative to the folder, as the listing shows it (``\\xe9`` escapes for non-UTF-8 bytes)."""
    where: str
    """``fitted`` (decoded and a face fitted), ``quarantined``, ``skipped`` or ``duplicates``."""
    expect: str
    """Start of the reason (quarantined, skipped, duplicates), or of a load note / decode warning (fitted: ''
    for none); ``warning:`` asks for a decode warning."""
    decodes: bool | None = None
    """For the decoder-level test: whether load_photo decodes it (None: not a decoder case)."""
    raw: str = ""
    """The file's relative path as the file system has it (surrogate escapes), when it differs from ``rel``."""

    @property
    def name(self) -> str:
        return self.raw or self.rel


def _jpeg(rgb: np.ndarray, quality: int = 90, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _save(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def _sof(jpeg: bytes, marker: bytes = b"\xff\xc0") -> int:
    return jpeg.index(marker)


def _png_chunks(png: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, kind, length) of every chunk."""
    out, pos = [], 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        out.append((pos, kind, length))
        pos += 12 + length
    return out


def face_photos(face: np.ndarray) -> dict[str, bytes]:
    """The same face in every format and mode the decoder must take, each file with different bytes."""
    pil = Image.fromarray(face)
    rgba = np.dstack([face, np.full(face.shape[:2], 255, np.uint8)])
    rgba[:40] = 0  # a transparent band at the top
    exif = Image.Exif()
    exif[0x0112] = 6
    jfif = bytearray(_jpeg(face, 88))
    at = jfif.index(b"JFIF\x00")
    jfif[at + 5:at + 7] = b"\x03\x00"  # JFIF revision 3.00: libjpeg warns, the pixels are intact
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "a text chunk whose CRC is broken")
    text_png = bytearray(_save(pil, "PNG", pnginfo=info))
    off, _, length = next(c for c in _png_chunks(bytes(text_png)) if c[1] == b"tEXt")
    text_png[off + 8 + length] ^= 0xFF  # first CRC byte of the tEXt chunk
    photos = {
        "face.jpg": _jpeg(face, 90),
        "face_progressive.jpg": _jpeg(face, 91, progressive=True),
        "face_cmyk.jpg": _save(pil.convert("CMYK"), "JPEG", quality=90),
        "face_grey.jpg": _save(pil.convert("L"), "JPEG", quality=90),
        "face_exif6.jpg": _jpeg(np.ascontiguousarray(np.rot90(face)), 90, exif=exif.tobytes()),
        "face_jfif3.jpg": bytes(jfif),
        "face_trailing.jpg": _jpeg(face, 87) + b"trailing bytes after the end marker",
        "face.png": _save(pil, "PNG"),
        "face16.png": cv2.imencode(".png", face[..., ::-1].astype(np.uint16) * 257)[1].tobytes(),
        "face_grey16.png": _save(Image.fromarray(face[..., 1].astype(np.uint16) * 257), "PNG"),
        "face_palette.png": _save(pil.quantize(256), "PNG"),
        "face_rgba.png": _save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "face_textcrc.png": bytes(text_png),
        "face.webp": _save(pil, "WEBP", lossless=True),
        "face.bmp": _save(pil, "BMP"),
        "face.tif": _save(pil, "TIFF", compression="tiff_lzw"),
        "face.ppm": _save(pil, "PPM"),
        "face.pgm": _save(pil.convert("L"), "PPM"),
        "face.gif": _save(pil.quantize(256), "GIF"),
        NON_UTF8: _jpeg(face, 85),
        NEWLINE_NAME: _jpeg(face, 84),
    }
    assert len(set(photos.values())) == len(photos), "each face photo must have its own bytes"
    return photos


FACE_NOTES = {
    "face_cmyk.jpg": "CMYK converted", "face_grey.jpg": "grayscale expanded", "face_exif6.jpg": "EXIF orientation 6",
    "face_jfif3.jpg": "warning:JPEG: Warning: unknown JFIF revision", "face16.png": "16-bit scaled",
    "face_grey16.png": "16-bit scaled", "face_palette.png": "palette expanded", "face_rgba.png": "alpha composited",
    "face_textcrc.png": "warning:PNG tEXt chunk CRC mismatch", "face.pgm": "grayscale expanded",
    "face.gif": "palette expanded",
}


def bad_files(face: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """Files the decoder must refuse: name -> (bytes, start of the reason)."""
    good = _jpeg(face, 90)
    sos = good.index(b"\xff\xda")
    rng = np.random.default_rng(16)
    flipped = bytearray(good)
    for p in rng.choice(np.arange(sos + 200, len(good) - 10), 40, replace=False):
        flipped[p] ^= 0xFF
    small = _jpeg(face[::8, ::8], 80)
    huge_header = _patch(small, _sof(small) + 5, struct.pack(">HH", 65500, 65500))
    tall = _patch(good, _sof(good) + 5, struct.pack(">H", 900))
    progressive = _jpeg(face[::8, ::8], 80, progressive=True)
    progressive = _patch(progressive, _sof(progressive, b"\xff\xc2") + 5, struct.pack(">HH", 16000, 16000))
    png = _save(Image.fromarray(face), "PNG")
    off, _, length = next(c for c in _png_chunks(png) if c[1] == b"IDAT")
    idat = _patch(png, off + 8 + length // 2, bytes([png[off + 8 + length // 2] ^ 0x55]))
    gif = _save(Image.fromarray(face[:4, :4]).quantize(4), "GIF")
    gif = _patch(gif, 6, struct.pack("<HH", 60000, 60000))
    bmp = _save(Image.fromarray(face[:8, :8]), "BMP")
    bmp = _patch(bmp, 18, struct.pack("<ii", 50000, 50000))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("photo.jpg", good)
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (good[:len(good) * 6 // 10], "truncated image"),
        "cut_then_end_marker.jpg": (good[:len(good) * 6 // 10] + b"\xff\xd9", "truncated image"),
        "flipped_bytes.jpg": (bytes(flipped), "corrupt image"),
        "header_taller_than_data.jpg": (tall, "truncated image"),
        "header_65500.jpg": (huge_header, "image too large"),
        "progressive_16000.jpg": (progressive, "image too large"),
        "zlib_bomb_14000.png": (grey_png(14000, 14000, 128), "image too large"),
        "truncated.png": (png[:len(png) // 2], "truncated image"),
        "idat_crc.png": (idat, "corrupt image"),
        "canvas_60000.gif": (gif, "image too large"),
        "header_50000.bmp": (bmp, "image too large"),
        "text.jpg": (b"this is a shopping list, not a photo\n", "not an image"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not an image"),
        "postscript.jpg": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
                           "unsupported format: PostScript"),
        "document.png": (b"%PDF-1.4\n1 0 obj << >> endobj\n%%EOF\n", "unsupported format: PDF"),
        "iphone.jpg": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "unsupported format: HEIF"),
        "vector.png": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported format: SVG"),
        "archive.png": (zipped.getvalue(), "unsupported format: ZIP"),
        "tiny.png": (_save(Image.fromarray(face[:10, :10]), "PNG"), "image too small"),
        "strip.png": (_save(Image.fromarray(np.zeros((40, 2000, 3), np.uint8)), "PNG"), "image too small"),
    }


def make_hostile_folder(folder: Path, outside: Path, face: np.ndarray) -> list[Case]:
    """Fill ``folder`` with every hostile kind (``outside``: a folder beside it, for symlinks that leave)."""
    folder.mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    photos = face_photos(face)
    for name, blob in photos.items():
        (folder / name).write_bytes(blob)
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        cases.append(Case(shown, "fitted", FACE_NOTES.get(name, ""), True, raw=name))
    for name, (blob, reason) in bad_files(face).items():
        (folder / name).write_bytes(blob)
        cases.append(Case(name, "quarantined", reason, False))
    blank = np.full((200, 200, 3), 128, np.uint8)
    (folder / "no_face.jpg").write_bytes(_jpeg(blank, 90))
    cases.append(Case("no_face.jpg", "quarantined", "no face detected", True))
    with open(folder / "sparse_300mb.jpg", "wb") as fh:  # a hole: 300 MB on paper, no block on disk
        fh.truncate(300 << 20)
    cases.append(Case("sparse_300mb.jpg", "quarantined", "file too large", False))
    unreadable = folder / "unreadable.jpg"
    unreadable.write_bytes(_jpeg(face, 83))
    unreadable.chmod(0)
    # Root reads it anyway: the tests that need the refusal drop the capability (see run_without_root).
    cases.append(Case("unreadable.jpg", "quarantined", "unreadable file", None))
    # 13 byte-identical copies under other names, and a symlink to one photo inside the folder.
    copies = folder / "z_copies"  # listed after face.jpg (byte order), so face.jpg is the one fitted
    copies.mkdir()
    for k in range(13):
        (copies / f"copy-{k:02d}.jpg").write_bytes(photos["face.jpg"])
        cases.append(Case(f"z_copies/copy-{k:02d}.jpg", "duplicates", "same content as face.jpg"))
    (folder / "inside_link.jpg").symlink_to("face.png")
    cases.append(Case("inside_link.jpg", "duplicates", "same content as face.png"))
    # Everything a listing must skip, with a reason.
    (folder / ".hidden.jpg").write_bytes(_jpeg(face, 70))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "thumb.jpg").write_bytes(_jpeg(face, 71))
    (folder / "notes.txt").write_text("not a photo\n")
    (folder / "README").write_text("no extension\n")
    (folder / "face.jpg.json").write_text("{}\n")
    os.mkfifo(folder / "fifo.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "broken.jpg").symlink_to("does-not-exist.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "nested_face.jpg").write_bytes(_jpeg(face, 86))
    cases.append(Case("sub/nested_face.jpg", "fitted", "", True))
    (folder / "sub_link").symlink_to("sub", target_is_directory=True)
    (folder / "sub" / "parent_loop").symlink_to("..", target_is_directory=True)
    cases += [Case(".hidden.jpg", "skipped", "hidden file"), Case(".cache/", "skipped", "hidden folder"),
              Case("notes.txt", "skipped", "extension not an image (.txt)"), Case("README", "skipped",
                                                                                   "no file extension"),
              Case("face.jpg.json", "skipped", "extension not an image (.json)"),
              Case("fifo.jpg", "skipped", "special file (FIFO)"), Case("loop.jpg", "skipped", "symlink loop"),
              Case("broken.jpg", "skipped", "broken symlink"),
              Case("sub_link/", "skipped", "folder symlink into the input folder"),
              Case("sub/parent_loop/", "skipped", "folder symlink into the input folder")]
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(folder / "socket.jpg"))
        cases.append(Case("socket.jpg", "skipped", "special file (socket)"))
    except OSError:  # a path too long for AF_UNIX: one kind fewer
        pass
    # Symlinks out of the folder: followed by default (and noted), refused with outside_symlinks=refuse.
    (outside / "elsewhere.jpg").write_bytes(_jpeg(face, 82))
    (outside / "album").mkdir()
    (outside / "album" / "far.jpg").write_bytes(_jpeg(face, 81))
    (folder / "outside_link.jpg").symlink_to(outside / "elsewhere.jpg")
    (folder / "outside_album").symlink_to(outside / "album", target_is_directory=True)
    cases += [Case("outside_link.jpg", "fitted", "", True), Case("outside_album/far.jpg", "fitted", "", True)]
    return cases


def make_hostile_list(folder: Path, list_dir: Path, face: np.ndarray) -> tuple[Path, list[Case]]:
    """A Latin-1 CSV list (with AffectNet's columns) naming the hostile folder's files and list-only kinds."""
    list_dir.mkdir(parents=True, exist_ok=True)
    (list_dir / "a.jpg").write_bytes(_jpeg(face, 79))
    rel = os.path.relpath(folder, list_dir)
    rows: list[tuple[bytes, str, Case | None]] = [
        (b"a.jpg", "happy", Case("a.jpg", "fitted", "", True)),
        (b"./a.jpg", "happy", Case("./a.jpg", "duplicates", "same file as a.jpg (row 1)")),
        (f"../{list_dir.name}/a.jpg".encode(), "happy", Case(f"../{list_dir.name}/a.jpg", "duplicates",
                                                             "same file as a.jpg (row 1)")),
        (b"a.jpg", "happy", Case("a.jpg", "duplicates", "same file as a.jpg (row 1)")),
        (b"missing.jpg", "sad", Case("missing.jpg", "quarantined", "no such file")),
        (f"{rel}/sub".encode(), "sad", Case(f"{rel}/sub", "quarantined", "not a file: a folder")),
        (f"{rel}/fifo.jpg".encode(), "sad", Case(f"{rel}/fifo.jpg", "quarantined",
                                                 "not a file: a special file (FIFO)")),
        (f"{rel}/loop.jpg".encode(), "sad", Case(f"{rel}/loop.jpg", "quarantined", "symlink loop")),
        (f"{rel}/broken.jpg".encode(), "sad", Case(f"{rel}/broken.jpg", "quarantined",
                                                   "no such file (broken symlink)")),
        (f"{rel}/face.ppm".encode(), "sad", Case(f"{rel}/face.ppm", "fitted", "", True)),
        (f"{rel}/".encode() + os.fsencode(NON_UTF8), "caf\xe9", Case(f"{rel}/caf\\xe9-photo.jpg", "fitted", "", True)),
        (f"{rel}/postscript.jpg".encode(), "sad", Case(f"{rel}/postscript.jpg", "quarantined",
                                                       "unsupported format: PostScript")),
        (f"{rel}/cut_then_end_marker.jpg".encode(), "sad", Case(f"{rel}/cut_then_end_marker.jpg", "quarantined",
                                                                "truncated image")),
        (f"{rel}/z_copies/copy-03.jpg".encode(), "sad", Case(f"{rel}/z_copies/copy-03.jpg", "fitted", "", True)),
        (f"{rel}/face.jpg".encode(), "sad", Case(f"{rel}/face.jpg", "duplicates",
                                                 f"same content as {rel}/z_copies/copy-03.jpg")),
    ]
    lines = [b"subDirectory_filePath,expression"]
    for path, label, _ in rows:
        lines.append(b'"' + path.replace(b'"', b'""') + b'",' + label.encode("latin-1"))
    listing = list_dir / "list.csv"
    listing.write_bytes(b"\r\n".join(lines) + b"\r\n")  # Latin-1 bytes, Windows line ends
    return listing, [c for _, _, c in rows if c is not None]


def run_without_root(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as a user who cannot read a mode-000 file: as root, without the capabilities that let
    root read anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), through util-linux's setpriv."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop the read-anything capability")
        args = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                "--inh-caps=-dac_override,-dac_read_search", *args]
    return subprocess.run(args, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, face: np.ndarray) -> tuple[Path, list[Case]]:
    base = tmp_path_factory.mktemp("hostile")
    folder = base / "photos"
    return folder, make_hostile_folder(folder, base / "outside", face)


# --- the decoder ----------------------------------------------------------------------------------


def test_the_decoder_gives_every_file_a_specific_verdict(hostile: tuple[Path, list[Case]]) -> None:
    folder, cases = hostile
    checked = 0
    for case in cases:
        if case.decodes is None:
            continue
        got = load_photo(folder / case.name)
        if case.decodes:
            assert isinstance(got, LoadedPhoto), (case.rel, got)
            assert got.rgb.dtype == np.uint8 and got.rgb.shape[2] == 3 and got.rgb.flags.c_contiguous
            if case.where != "fitted":  # decoded; the face search refuses it later
                pass
            elif case.expect.startswith("warning:"):
                assert (got.decode_warning or "").startswith(case.expect[8:]), (case.rel, got.decode_warning)
            else:
                assert got.decode_warning is None, (case.rel, got.decode_warning)
                assert not case.expect or any(n.startswith(case.expect) for n in got.notes), (case.rel, got.notes)
        else:
            assert isinstance(got, LoadFailure), (case.rel, getattr(got, "notes", None))
            assert got.reason.startswith(case.expect), (case.rel, got.reason)
        checked += 1
    assert checked >= 40


def test_corrupt_jpegs_that_pil_alone_decodes_are_refused(face: np.ndarray) -> None:
    """What the issue found fitted as good: PIL decodes all three without a word; libjpeg's warnings refuse them."""
    files = bad_files(face)
    for name in ("cut_then_end_marker.jpg", "header_taller_than_data.jpg"):
        img = Image.open(io.BytesIO(files[name][0]))
        img.load()  # no error from PIL
        from facedetail.io.decode import decode_photo

        got = decode_photo(files[name][0])
        assert isinstance(got, LoadFailure)
        assert "libjpeg: Corrupt JPEG data: premature end of data segment" in got.reason


def test_a_sixteen_bit_png_is_scaled_with_rounding_not_clipped(face: np.ndarray, tmp_path: Path) -> None:
    values = (face[..., 1].astype(np.uint16) * 257 + np.arange(512, dtype=np.uint16)[None, :] % 200)
    (tmp_path / "deep.png").write_bytes(_save(Image.fromarray(values), "PNG"))
    got = load_photo(tmp_path / "deep.png")
    assert isinstance(got, LoadedPhoto)
    np.testing.assert_array_equal(got.rgb[..., 0], np.round(values / 257.0).astype(np.uint8))
    assert (got.rgb == 255).mean() < 0.05, "convert('RGB') would clip most pixels to 255"


# --- the listing ----------------------------------------------------------------------------------


def _accounted(folder: Path, cases: list[Case], **kw: object) -> dict[str, tuple[str, str]]:
    listing = scan_inputs(folder, **kw)  # type: ignore[arg-type]
    hashes = file_hashes(listing.items, {}, 256 << 20)
    listing = content_duplicates(listing, lambda item: hashes[item.id])
    where: dict[str, tuple[str, str]] = {}
    for item in listing.items:
        assert item.relative not in where
        where[item.relative] = ("items", item.note or "")
    for s in listing.skipped:
        assert s.path not in where
        where[s.path] = ("skipped", s.reason)
    for d in listing.duplicates:
        assert d.path not in where
        where[d.path] = ("duplicates", d.reason)
    assert len(where) == listing.entries
    return where


def test_every_entry_of_the_folder_lands_in_exactly_one_table(hostile: tuple[Path, list[Case]]) -> None:
    folder, cases = hostile
    where = _accounted(folder, cases)
    expected = {c.rel: c for c in cases}
    assert set(where) == set(expected), (sorted(set(where) - set(expected)), sorted(set(expected) - set(where)))
    for rel, (table, reason) in where.items():
        case = expected[rel]
        if case.where in ("fitted", "quarantined"):
            assert table == "items", (rel, table, reason)
        else:
            assert table == case.where and reason.startswith(case.expect), (rel, table, reason)
    assert where["caf\\xe9-photo.jpg"][1].startswith("file name is not valid UTF-8")
    assert where["outside_link.jpg"][1] == "symlink leaves the input folder (followed)"
    assert where["outside_album/far.jpg"][1].startswith("in a folder symlink that leaves the input folder")


def test_symlinks_out_of_the_folder_can_be_refused(hostile: tuple[Path, list[Case]]) -> None:
    folder, cases = hostile
    where = _accounted(folder, cases, outside_symlinks="refuse")
    assert where["outside_link.jpg"] == ("skipped", "symlink leaves the input folder (refused: outside_symlinks "
                                                    "is refuse)")
    assert where["outside_album/"][0] == "skipped" and "outside_album/far.jpg" not in where


def test_ids_of_non_utf8_names_come_from_their_bytes(hostile: tuple[Path, list[Case]]) -> None:
    folder, _ = hostile
    items = {i.relative: i for i in scan_inputs(folder).items}
    odd = items["caf\\xe9-photo.jpg"]
    import hashlib

    assert odd.id.endswith(hashlib.sha256(b"caf\xe9-photo.jpg").hexdigest()[:12])
    assert odd.path.exists() and os.fsencode(odd.path.name) == b"caf\xe9-photo.jpg"
    assert items[NEWLINE_NAME].path.is_file()


def test_a_latin1_csv_list_is_read_byte_faithfully(hostile: tuple[Path, list[Case]], face: np.ndarray,
                                                   tmp_path: Path) -> None:
    folder, _ = hostile
    listing_path, cases = make_hostile_list(folder, tmp_path / "list", face)
    listing = scan_inputs(listing_path)
    hashes = file_hashes(listing.items, {}, 256 << 20)
    listing = content_duplicates(listing, lambda item: hashes[item.id])
    by_row: dict[int, object] = {i.row: i for i in listing.items} | {d.row: d for d in listing.duplicates}
    assert sorted(by_row) == list(range(1, len(cases) + 1)), "every row lands once"
    for n, case in enumerate(cases, start=1):
        entry = by_row[n]
        if case.where == "duplicates":
            assert entry.reason == case.expect, (n, entry)  # type: ignore[union-attr]
        else:
            assert entry.relative == case.rel, (n, entry)  # type: ignore[union-attr]
    odd = next(i for i in listing.items if "caf" in i.relative)
    assert odd.path.is_file() and odd.label == "caf\\xe9"


def test_a_list_that_is_not_csv_text_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "utf16.csv").write_bytes("path\na.jpg\n".encode("utf-16"))
    with pytest.raises(SourceFileError, match="UTF-16"):
        scan_inputs(tmp_path / "utf16.csv")
    (tmp_path / "nul.csv").write_bytes(b"path\na.jpg\nb\x00.jpg\n")
    with pytest.raises(SourceFileError, match=r"row 2: the path holds a NUL byte"):
        scan_inputs(tmp_path / "nul.csv")
    (tmp_path / "quote.csv").write_bytes(b'path,label\n"a.jpg,1\n')
    with pytest.raises(SourceFileError, match=r"line \d+: not readable as CSV"):
        scan_inputs(tmp_path / "quote.csv")


# --- memory ---------------------------------------------------------------------------------------

_PEAK = """
import json, sys
from facedetail.io.decode import load_photo

def kb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1])

before = kb("VmRSS")
got = load_photo(sys.argv[1])
print(json.dumps({"reason": getattr(got, "reason", None), "peak_growth_mb": (kb("VmHWM") - before) / 1024,
                  "peak_mb": kb("VmHWM") / 1024}))
"""
DECODE_BUDGET_MB = 250
"""Peak resident memory a single decode may add (the worker's own budget, 1 GB, is tested with the worker)."""


@pytest.mark.parametrize("name", ["header_65500.jpg", "progressive_16000.jpg", "zlib_bomb_14000.png",
                                  "canvas_60000.gif", "header_50000.bmp", "sparse_300mb.jpg"])
def test_bombs_are_refused_in_little_memory(hostile: tuple[Path, list[Case]], name: str) -> None:
    folder, cases = hostile
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(folder / name)], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    got = json.loads(proc.stdout)
    expect = next(c.expect for c in cases if c.rel == name)
    assert got["reason"].startswith(expect), got
    assert got["peak_growth_mb"] < DECODE_BUDGET_MB, got


def test_a_large_legitimate_png_decodes_within_the_budget(tmp_path: Path) -> None:
    """5000² RGBA (25 MP, max_pixels): decoded, downscaled before compositing, within the budget."""
    side = 5000
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[: side // 2, :, 3] = 255
    cv2.imwrite(str(tmp_path / "big.png"), rgba, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    del rgba
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "big.png")], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    got = json.loads(proc.stdout)
    assert got["reason"] is None and got["peak_growth_mb"] < DECODE_BUDGET_MB, got


# --- a user who cannot read everything ------------------------------------------------------------

_UNREADABLE = """
import json, sys
from pathlib import Path
from facedetail.io.decode import load_photo
from facedetail.io.lineage import expand_files, input_version
folder = Path(sys.argv[1])
versions = {f.name: input_version(f) for f in expand_files([folder])}
print(json.dumps({"load": load_photo(folder / "unreadable.jpg").reason, "version": versions["unreadable.jpg"],
                  "others_hashed": sum(len(v) == 64 for v in versions.values())}))
"""


def test_an_unreadable_file_is_a_reason_and_lineage_hashing_goes_on(hostile: tuple[Path, list[Case]]) -> None:
    folder, _ = hostile
    proc = run_without_root([sys.executable, "-c", _UNREADABLE, str(folder)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["load"] == "unreadable file: Permission denied"
    assert got["version"] == UNHASHED + "unreadable file: Permission denied"
    assert got["others_hashed"] >= 40


def test_lineage_lists_only_regular_files_and_names_unreadable_folders(tmp_path: Path) -> None:
    (tmp_path / "in" / "locked").mkdir(parents=True)
    (tmp_path / "in" / "locked" / "x.jpg").write_bytes(b"x")
    (tmp_path / "in" / "a.jpg").write_bytes(b"a")
    os.mkfifo(tmp_path / "in" / "fifo.jpg")
    (tmp_path / "in" / "loop").symlink_to("loop")
    files = expand_files([tmp_path / "in"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["in/a.jpg", "in/locked/x.jpg"]
    assert input_version(tmp_path / "in" / "fifo.jpg") == UNHASHED + "not a file: a special file (FIFO)"
    (tmp_path / "in" / "locked").chmod(0)
    try:
        script = ("import sys; from pathlib import Path; from facedetail.io.lineage import expand_files; "
                  "print([p.name for p in expand_files([Path(sys.argv[1])])])")
        proc = run_without_root([sys.executable, "-c", script, str(tmp_path / "in")], cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "['a.jpg', 'locked']"
    finally:
        (tmp_path / "in" / "locked").chmod(stat.S_IRWXU)


def test_hostile_kinds_are_at_least_25(hostile: tuple[Path, list[Case]], tmp_path: Path, face: np.ndarray) -> None:
    """The issue asks for 25 kinds of bad or odd input; count the distinct expectations of both generators."""
    _, cases = hostile
    _, list_cases = make_hostile_list(hostile[0], tmp_path / "l", face)
    bad = {(c.where, c.expect) for c in cases + list_cases if c.where != "fitted"}
    odd = {c.rel for c in cases if c.where == "fitted" and c.expect}
    assert len(bad) + len(odd) >= 25, (len(bad), len(odd))
