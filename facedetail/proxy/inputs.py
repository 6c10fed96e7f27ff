"""In-the-wild inputs: listing photos (a folder or an AffectNet-style list) and loading them safely.

:func:`list_inputs` turns a folder (recursive) or a CSV/Parquet list into :class:`InputItem`
rows with stable ids. :func:`load_photo` turns one file into RGB uint8 pixels or a
:class:`LoadFailure` with a short, countable reason; it never raises for a bad file, so one
broken photo among 163K never stops a run.

What "safely" means here:

* the file is read once; its bytes are hashed and decoded from memory (files above
  :data:`READ_INTO_MEMORY_MAX` are stream-hashed and decoded from disk instead);
* truncated data is an error (PIL's ``LOAD_TRUNCATED_IMAGES`` is forced off while decoding);
* a huge image is never decoded at full resolution when the format can decode reduced
  (JPEG: libjpeg's DCT scaling through :meth:`PIL.Image.Image.draft`, 1/2, 1/4 or 1/8);
  any other format larger than ``max_pixels`` is refused from its header alone;
* PIL's decompression-bomb limit is replaced by ``max_pixels`` for the duration of one decode
  (set under a lock and restored afterwards; no global setting is changed for good);
* only the formats a photo list plausibly holds are decoded (:data:`DECODED_FORMATS`): PIL's
  other plugins include EPS, which would run Ghostscript on the file;
* every mode becomes RGB uint8 with a note saying what was converted (16-bit by 1/257,
  alpha composited on white, palette expanded, CMYK converted, grey expanded);
* EXIF orientation is applied, and ``original_size`` is the size after it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from pydantic import Field, model_validator

from facedetail.config import Config
from facedetail.errors import SourceFileError
from facedetail.io.hashing import sha256_bytes, sha256_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""Extensions a folder listing picks up (case-insensitive); the same as
:data:`facedetail.features.datasets.IMAGE_EXTENSIONS`, repeated so that listing photos does not
import the emotion network (torch)."""
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""PIL formats :func:`load_photo` decodes, whatever the extension says (a PNG named ``.jpg`` is
fine). PIL's JPEG opener also returns MPO images, which is what many cameras' JPEGs are."""
READ_INTO_MEMORY_MAX = 512 << 20
"""Files up to this size are read once into memory (hashed and decoded from the same bytes)."""
ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on white: what a browser or photo viewer shows."""
PATH_COLUMNS = ("path", "subDirectory_filePath")
"""Path column of a list, in order of preference (the second is AffectNet's)."""
LABEL_COLUMNS = ("label", "expression")
"""Label column of a list, in order of preference (the second is AffectNet's)."""
XYWH_COLUMNS = ("face_x", "face_y", "face_width", "face_height")
"""AffectNet's face box: left, top, width, height in original pixels."""
LTRB_COLUMNS = ("left", "top", "right", "bottom")

# Reason kinds: the text before the first ":" (or " (") of a LoadFailure's reason.
NO_SUCH_FILE = "no such file"
NOT_A_FILE = "not a file"
UNREADABLE = "unreadable file"
EMPTY = "empty file"
NOT_AN_IMAGE = "not an image"
TRUNCATED = "truncated image"
CORRUPT = "corrupt image"
TOO_LARGE = "image too large"
TOO_SMALL = "image too small"
UNSUPPORTED_MODE = "unsupported image mode"

# Notes on what was converted.
GREY_EXPANDED = "grayscale expanded to RGB"
BILEVEL_EXPANDED = "1-bit expanded to RGB"
ALPHA_COMPOSITED = "alpha composited on white"
OPAQUE_ALPHA_DROPPED = "opaque alpha dropped"
PALETTE_EXPANDED = "palette expanded"
CMYK_CONVERTED = "CMYK converted to RGB"
SIXTEEN_BIT = "16-bit scaled to 8-bit"
DOWNSCALED = "downscaled"

_ID_SLUG_MAX = 48
_ID_HASH_HEX = 12
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9]+")
# EXIF orientation -> the transpose that makes the image upright (as PIL's ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"), (b"GIF8", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_TRUNCATION_WORDS = ("truncated", "premature end", "broken data stream", "end of file", "unexpected end")
# PIL's decompression-bomb limit and truncated-image switch are module globals; one decode at a
# time changes them (and puts them back), so two threads never see each other's settings.
_PIL_SETTINGS = threading.Lock()


# --- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One photo to process, as listed."""

    id: str
    """Stable, unique and filesystem-safe: ``<slug>-<hash>``, where the slug is the relative path
    with every run of characters other than ``[A-Za-z0-9]`` replaced by ``-`` (at most 48 characters,
    kept from the end, where file names differ) and the hash is the first 12 hex digits of the SHA256
    of ``relative``. The same relative path always gives the same id, on any machine."""
    path: Path
    """Absolute path of the file."""
    relative: str
    """POSIX path relative to the source folder (folders), or as written in the list (lists)."""
    box: tuple[float, float, float, float] | None = None
    """Face box from the list: (left, top, right, bottom) in original pixels; None when not given."""
    label: str | None = None
    """Label from the list, kept as written (AffectNet's expression ids stay ``"0"``..``"10"``)."""


def item_id(relative: str) -> str:
    """The id of an input listed as ``relative`` (see :attr:`InputItem.id`)."""
    slug = _SLUG_UNSAFE.sub("-", relative).strip("-")[-_ID_SLUG_MAX:].strip("-") or "input"
    return f"{slug}-{sha256_bytes(relative.encode('utf-8'))[:_ID_HASH_HEX]}"


def list_inputs(source: Path, root: Path | None = None) -> list[InputItem]:
    """The photos of a folder (recursive) or of a ``.csv`` / ``.parquet`` list, in a fixed order.

    Folder: files with an extension in :data:`IMAGE_EXTENSIONS` (any case), hidden files and
    folders (name starting with ``.``) skipped, sorted by relative path; ``root`` must be None.
    List: one row per photo, in the list's order; the path column is ``path`` or AffectNet's
    ``subDirectory_filePath``; an optional box is ``face_x, face_y, face_width, face_height``
    (AffectNet) or ``left, top, right, bottom`` (all four cells empty: no box); an optional label
    is ``label`` or ``expression``. Relative paths resolve against ``root`` (default: the list's
    folder). Listed files are kept whatever their extension: the loader reports what is wrong
    with them. A malformed list (no path column, an empty path, the same path twice, a box cell
    that is not a number, a box of non-positive size) raises :class:`SourceFileError`.
    """
    source = Path(source)
    if source.is_dir():
        if root is not None:
            raise ValueError("root applies to lists only; a folder's paths are relative to the folder")
        return _list_folder(source)
    if not source.is_file():
        raise SourceFileError(source, "input folder or list not found", "Check the input path in params.yaml")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        columns, rows = _read_csv(source)
    elif suffix == ".parquet":
        columns, rows = _read_parquet(source)
    else:
        raise SourceFileError(source, f"unsupported input list type {source.suffix!r}",
                              "Give a folder of images, a .csv or a .parquet list")
    return _list_rows(source, Path(root) if root is not None else source.parent, columns, rows)


def _list_folder(folder: Path) -> list[InputItem]:
    found = []
    # os.walk rather than rglob: it does not follow symlinked folders (no cycles) and lets hidden
    # folders be pruned before they are entered.
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(folder).as_posix())
    base = Path(os.path.abspath(folder))
    return [InputItem(item_id(rel), base / rel, rel) for rel in sorted(found)]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return list(table.column_names), table.to_pylist()


def _list_rows(source: Path, root: Path, columns: list[str], rows: list[dict[str, Any]]) -> list[InputItem]:
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise SourceFileError(source, f"no path column (columns: {', '.join(columns) or 'none'})",
                              "Name it `path` (AffectNet's `subDirectory_filePath` also works)")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    box_cols = _box_columns(source, columns)
    base = Path(os.path.abspath(root))
    items, seen = [], {}
    for n, row in enumerate(rows, start=1):
        where = f"row {n}"
        rel = _cell_text(row.get(path_col))
        if rel is None:
            raise SourceFileError(source, f"{where}: empty {path_col}", "Every row needs a file path")
        rel = rel.replace("\\", "/")
        if rel in seen:
            raise SourceFileError(source, f"{where}: {rel} is listed twice (first in row {seen[rel]})",
                                  "List each photo once")
        seen[rel] = n
        box = _box(source, where, row, box_cols) if box_cols else None
        label = _cell_text(row.get(label_col)) if label_col else None
        items.append(InputItem(item_id(rel), Path(os.path.abspath(base / rel)), rel, box, label))
    return items


def _box_columns(source: Path, columns: list[str]) -> tuple[str, tuple[str, ...]] | None:
    for kind, names in (("xywh", XYWH_COLUMNS), ("ltrb", LTRB_COLUMNS)):
        present = [c for c in names if c in columns]
        if len(present) == len(names):
            return kind, names
        if present:
            missing = ", ".join(c for c in names if c not in columns)
            raise SourceFileError(source, f"face box columns incomplete (missing {missing})",
                                  f"Give all of {', '.join(names)} or none")
    return None


def _box(source: Path, where: str, row: dict[str, Any],
         box_cols: tuple[str, tuple[str, ...]]) -> tuple[float, float, float, float] | None:
    kind, names = box_cols
    cells = [_cell_text(row.get(c)) for c in names]
    if all(c is None for c in cells):
        return None
    try:
        values = [float(c) for c in cells]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SourceFileError(source, f"{where}: face box {dict(zip(names, cells, strict=True))} is not four numbers",
                              "Fill all four box cells with numbers, or leave all four empty") from None
    if not all(np.isfinite(values)):
        raise SourceFileError(source, f"{where}: face box has a non-finite value", "Fix or empty the box cells")
    left, top, a, b = values
    right, bottom = (left + a, top + b) if kind == "xywh" else (a, b)
    if right <= left or bottom <= top:
        raise SourceFileError(source, f"{where}: face box ({left:g}, {top:g}, {right:g}, {bottom:g}) has no area",
                              "Boxes are left, top, right, bottom (or x, y, width, height) in pixels")
    return left, top, right, bottom


def _cell_text(value: Any) -> str | None:
    """A list cell as text; None for empty cells (CSV ``""``, Parquet null or NaN)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    text = str(value).strip()
    return text or None


# --- loading ------------------------------------------------------------------------------------


class LoadConfig(Config):
    """How photos are decoded."""

    max_side: int = Field(1024, ge=32)
    """Longer side of the loaded pixels at most this: larger photos are downscaled while decoding
    (fitting runs at 256 px later and detection downscales further, so more is wasted memory)."""
    max_pixels: int = Field(200_000_000, ge=1)
    """Refuse an image whose decoded pixel count would exceed this (read from its header, before any
    decoding). A JPEG counts at the reduced size it can be decoded at (1/8 at most), so a 12000x12000
    JPEG is loaded while a 20000x20000 PNG is refused."""
    min_side: int = Field(32, ge=1)
    """Refuse an image whose shorter side is below this, in original pixels or after downscaling to
    ``max_side`` (a thin panorama): no face can be found in it."""

    @model_validator(mode="after")
    def _consistent(self) -> LoadConfig:
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        return self


@dataclass(frozen=True)
class LoadedPhoto:
    """A decoded photo."""

    rgb: np.ndarray
    """(H, W, 3) uint8 RGB, upright (EXIF orientation applied), longer side at most ``max_side``."""
    scale: float
    """``rgb`` size over ``original_size``: a point at original pixel ``p`` is at ``(p + 0.5) * scale -
    0.5`` in ``rgb`` (pixel centres at integers, image edges aligned). Exact along the longer side;
    along the shorter one the size was rounded to whole pixels (off by less than half a pixel)."""
    original_size: tuple[int, int]
    """(W, H) of the full-resolution image after EXIF orientation."""
    sha256: str
    """SHA256 of the file's bytes."""
    source_mode: str
    """PIL mode of the file before conversion (``RGB``, ``L``, ``RGBA``, ``P``, ``CMYK``, ``I;16``...)."""
    notes: tuple[str, ...]
    """What was done to get RGB uint8, e.g. ``grayscale expanded to RGB``, ``downscaled 12000x12000 ->
    1024x1024``, ``EXIF orientation 6 applied``; empty for an upright 8-bit RGB photo of allowed size."""
    format: str = ""
    """The format PIL decoded (``JPEG``, ``PNG``...), whatever the file's extension."""


@dataclass(frozen=True)
class LoadFailure:
    """Why a file could not be loaded."""

    reason: str
    """Starts with a kind (one of the module's reason constants), then specifics after ``:`` or ``(``,
    e.g. ``empty file (0 bytes)``, ``truncated image: JPEG data ends early (image file is truncated)``."""

    @property
    def kind(self) -> str:
        """The countable part of the reason (``empty file``, ``truncated image``, ...)."""
        return self.reason.split(":")[0].split(" (")[0]


def load_photo(path: Path, config: LoadConfig | None = None) -> LoadedPhoto | LoadFailure:
    """Decode one photo to RGB uint8 (see the module docstring); never raises for a bad file."""
    config = config or LoadConfig()
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return LoadFailure(NO_SUCH_FILE)
    except OSError as err:
        return LoadFailure(f"{UNREADABLE}: {err.strerror or err}")
    if not stat.S_ISREG(st.st_mode):
        return LoadFailure(f"{NOT_A_FILE}: {'a folder' if stat.S_ISDIR(st.st_mode) else 'a special file'}")
    if st.st_size == 0:
        return LoadFailure(f"{EMPTY} (0 bytes)")
    big = st.st_size > READ_INTO_MEMORY_MAX
    try:
        if big:  # hash in a stream and let PIL read the file: never the whole file in memory
            digest = sha256_file(path)
            with path.open("rb") as fh:
                head = fh.read(512)
        else:
            data = path.read_bytes()
            digest, head = sha256_bytes(data), data[:512]
    except OSError as err:
        return LoadFailure(f"{UNREADABLE}: {err.strerror or err}")
    with _decode_settings():
        if not big:
            return _decode(io.BytesIO(data), path, digest, head, config)
        try:
            fh = path.open("rb")
        except OSError as err:
            return LoadFailure(f"{UNREADABLE}: {err.strerror or err}")
        with fh:
            return _decode(fh, path, digest, head, config)


@contextlib.contextmanager
def _decode_settings() -> Iterator[None]:
    """PIL's bomb limit off (``max_pixels`` is checked instead) and truncated images refused, for one decode."""
    with _PIL_SETTINGS:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode(fp: BinaryIO, path: Path, digest: str, head: bytes, config: LoadConfig) -> LoadedPhoto | LoadFailure:
    ext = path.suffix.lower() or "extensionless"
    try:
        img = Image.open(fp, formats=DECODED_FORMATS)
    except UnidentifiedImageError:
        known = _signature(head)
        if known:  # the header of a known format, which PIL could not parse: cut short or damaged
            return LoadFailure(f"{CORRUPT}: {known} header unreadable")
        return LoadFailure(f"{NOT_AN_IMAGE}: {ext} file is not decodable ({_describe(head)})")
    except Exception as err:  # PIL's plugins raise many types on damaged headers
        return _decode_error(_signature(head) or "image", err)
    with img:
        return _convert(img, digest, config)


def _convert(img: Image.Image, digest: str, config: LoadConfig) -> LoadedPhoto | LoadFailure:
    """Size checks, reduced decoding, mode conversion, downscaling and orientation of an opened image."""
    fmt, mode = img.format or "image", img.mode
    notes: list[str] = []
    raw_w, raw_h = img.size
    header_orientation = _orientation(img)  # a PNG's eXIf chunk may come after the pixels: re-read after load
    shown = "x".join(map(str, _oriented((raw_w, raw_h), header_orientation)))
    if min(raw_w, raw_h) < config.min_side:
        return LoadFailure(f"{TOO_SMALL}: {shown} below min_side {config.min_side}")
    scale = min(1.0, config.max_side / max(raw_w, raw_h))
    target = (max(1, round(raw_w * scale)), max(1, round(raw_h * scale)))
    if min(target) < config.min_side:
        small = "x".join(map(str, _oriented(target, header_orientation)))
        return LoadFailure(f"{TOO_SMALL}: {shown} is {small} at max_side {config.max_side}, "
                           f"below min_side {config.min_side}")
    box = None
    if scale < 1.0 and fmt in ("JPEG", "MPO"):
        # libjpeg decodes at 1/2, 1/4 or 1/8 straight from the DCT coefficients: the largest
        # reduction still at least ``target`` is used, and full resolution is never in memory.
        drafted = img.draft(None, target)
        if drafted is not None and img.size != (raw_w, raw_h):
            box = drafted[1]
            notes.append(f"{fmt} decoded at 1/{round(raw_w / box[2])}")
    if img.size[0] * img.size[1] > config.max_pixels:
        at = "" if img.size == (raw_w, raw_h) else f" (even decoded reduced to {img.size[0]}x{img.size[1]})"
        return LoadFailure(f"{TOO_LARGE}: {shown} exceeds max_pixels {config.max_pixels}{at}")
    rawmode = _rawmode(img)
    try:
        img.load()
    except MemoryError:
        return LoadFailure(f"{TOO_LARGE}: {shown} ran out of memory while decoding")
    except Exception as err:  # decoders raise OSError mostly, but not only
        return _decode_error(fmt, err)
    orientation = _orientation(img, notes)
    size = _oriented((raw_w, raw_h), orientation)
    shown = f"{size[0]}x{size[1]}"
    if getattr(img, "n_frames", 1) > 1 and fmt != "MPO":  # MPO's first frame is the photo itself
        notes.append(f"first of {img.n_frames} frames")
    try:
        rgb = _to_rgb(img, mode, rawmode, notes)
    except _UnsupportedModeError as err:
        return LoadFailure(f"{UNSUPPORTED_MODE}: {err}")
    except (OSError, ValueError) as err:  # PIL's convert on a mode it cannot map
        return LoadFailure(f"{UNSUPPORTED_MODE}: {mode} ({' '.join(str(err).split())})")
    if scale < 1.0:
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
        notes.append(f"{DOWNSCALED} {shown} -> {'x'.join(map(str, _oriented(target, orientation)))}")
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
        notes.append(f"EXIF orientation {orientation} applied")
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:  # a conversion path above is wrong: say so, do not guess
        return LoadFailure(f"{UNSUPPORTED_MODE}: {mode} converted to shape {pixels.shape}")
    return LoadedPhoto(np.ascontiguousarray(pixels), scale, size, digest, mode, tuple(notes), fmt)


class _UnsupportedModeError(Exception):
    """A PIL mode this loader does not know how to turn into RGB."""


def _to_rgb(img: Image.Image, mode: str, rawmode: str, notes: list[str]) -> Image.Image:
    """The loaded image as an RGB PIL image; ``notes`` gets what was converted."""
    if mode == "RGB":
        if ";16" in rawmode:  # 16-bit colour PNG: PIL's unpacker keeps the high byte, within 1 level of /257
            notes.append(SIXTEEN_BIT)
        return img
    if mode == "1":
        notes.append(BILEVEL_EXPANDED)
        return img.convert("L").convert("RGB")
    if mode == "L":
        notes.append(GREY_EXPANDED)
        return img.convert("RGB")
    if mode in ("P", "PA"):
        notes.append(PALETTE_EXPANDED)
        has_alpha = mode == "PA" or img.has_transparency_data
        return _composite(img.convert("RGBA"), notes) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La"):
        if mode[0] == "L":
            notes.append(GREY_EXPANDED)
        if ";16" in rawmode:
            notes.append(SIXTEEN_BIT)
        return _composite(img.convert("RGBA"), notes)
    if mode == "CMYK":
        notes.append(CMYK_CONVERTED)
        return img.convert("RGB")
    if mode in ("YCbCr", "LAB", "HSV", "RGBX"):
        notes.append(f"{mode} converted to RGB")
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if mode == "I" and (lo < 0 or hi > 65535):
            notes.append(f"32-bit integer range [{lo}, {hi}] rescaled to 8-bit")
            grey = _rescale(values.astype(np.float64), lo, hi)
        else:
            # 16-bit: 65535 / 257 = 255 exactly, so the full range maps onto the full range.
            notes.append(SIXTEEN_BIT)
            grey = np.round(values / 257.0).astype(np.uint8)
        notes.append(GREY_EXPANDED)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise _UnsupportedModeError("F (32-bit float) with non-finite pixels")
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            notes.append("float [0, 1] scaled to 8-bit")
            grey = np.round(values * 255.0).astype(np.uint8)
        else:
            notes.append(f"float range [{lo:g}, {hi:g}] rescaled to 8-bit")
            grey = _rescale(values, lo, hi)
        notes.append(GREY_EXPANDED)
        return Image.fromarray(grey, "L").convert("RGB")
    raise _UnsupportedModeError(mode)


def _composite(rgba: Image.Image, notes: list[str]) -> Image.Image:
    """RGBA over :data:`ALPHA_BACKGROUND`, in float (PIL's own alpha_composite rounds per step)."""
    pixels = np.asarray(rgba, dtype=np.float32)
    alpha = pixels[..., 3:4] / 255.0
    if bool((alpha == 1.0).all()):
        notes.append(OPAQUE_ALPHA_DROPPED)
        return rgba.convert("RGB")
    notes.append(ALPHA_COMPOSITED)
    out = pixels[..., :3] * alpha + np.float32(ALPHA_BACKGROUND) * (1.0 - alpha)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def _rescale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo
    scaled = (values - lo) / span * 255.0 if span > 0 else np.zeros_like(values)
    return np.round(scaled).astype(np.uint8)


def _orientation(img: Image.Image, notes: list[str] | None = None) -> int:
    """EXIF orientation (1 when absent); an unreadable or invalid tag is noted (when ``notes`` is given) and ignored.

    Read from the EXIF block PIL found while opening (``info["exif"]``), never through
    ``getexif()`` on a PNG, which decodes the whole image to look for a late eXIf chunk.
    After :meth:`~PIL.Image.Image.load`, ``info`` holds a late chunk too.
    """
    try:
        if img.format == "TIFF":  # TIFF tags are the EXIF; reading them decodes nothing
            value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        else:
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(_EXIF_ORIENTATION_TAG, 1)
    except Exception as err:  # EXIF parsers raise many types on damaged blocks
        if notes is not None:
            notes.append(f"EXIF unreadable ({type(err).__name__}), orientation ignored")
        return 1
    try:
        value = int(value)
    except (TypeError, ValueError):
        value = -1
    if value != 1 and value not in _ORIENTATION:
        if notes is not None:
            notes.append(f"EXIF orientation {value} invalid, ignored")
        return 1
    return value


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode (``RGB;16B`` for a 16-bit colour PNG), before loading."""
    tile = getattr(img, "tile", None) or []
    args = tile[0][3] if tile and len(tile[0]) > 3 else None
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else ""


def _decode_error(fmt: str, err: BaseException) -> LoadFailure:
    message = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, OSError | SyntaxError | EOFError):  # say which error: it is an unusual one
        message = f"{type(err).__name__}: {message}"
    if isinstance(err, Image.DecompressionBombError):
        return LoadFailure(f"{TOO_LARGE}: {message}")
    if isinstance(err, EOFError) or any(w in message.lower() for w in _TRUNCATION_WORDS):
        return LoadFailure(f"{TRUNCATED}: {fmt} data ends early ({message})")
    return LoadFailure(f"{CORRUPT}: {fmt} data does not decode ({message})")


def _signature(head: bytes) -> str | None:
    """The format whose magic bytes start the file, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _describe(head: bytes) -> str:
    """A few words on what a non-image file holds, for the reason."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not merely a character cut at the end of the 512 bytes
            return f"binary content starting {head[:4].hex()}"
        text = head[:err.start].decode("utf-8")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text content"
    return f"binary content starting {head[:4].hex()}"

