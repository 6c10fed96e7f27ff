"""The one photo decoder of the project: any file in, RGB uint8 pixels or a countable reason out.

Every entry point that opens a photo (``wild_proxy``, ``facedetail prior``, ``reconstruct``,
``detail_pairs``) calls :func:`load_photo` (a path) or :func:`decode_photo` (bytes). Neither raises
for a bad file: one broken photo among 163K never stops a run, and every refusal is a
:class:`LoadFailure` whose reason starts with a kind that metrics count.

What the decoder guarantees, in order:

1. **Only regular files, read once, within a size cap.** The file is opened without blocking
   (a FIFO or device never hangs the run), checked to be a regular file, refused above
   ``max_file_bytes`` from its size alone (a sparse 100 GB file is never read), then read once
   into memory; its SHA256 is of exactly the bytes decoded.
2. **An allow-list of formats, chosen by content, not by extension** (:data:`DECODED_FORMATS`):
   JPEG (and MPO, what many cameras write), PNG, WebP, BMP, TIFF, PNM (PBM/PGM/PPM) and GIF's first
   frame. These are the formats photo collections hold and that PIL decodes in-process with
   bounded memory. PIL's other plugins are never tried: EPS would run Ghostscript on the file,
   and WMF, FITS, PSD and the like are no photos. Known other formats get a specific reason
   (``unsupported format: PostScript``, ``... HEIF``), HTML pages saved as ``.jpg`` (common in
   scraped sets) and other text ``not an image``.
3. **A pixel budget from the header, before any decoding** (``max_pixels``): the pixel count the
   decoder will hold, i.e. after JPEG's DCT reduction (libjpeg decodes at 1/2, 1/4 or 1/8
   straight from the coefficients). A progressive or multi-scan JPEG counts at full size: libjpeg
   keeps all its coefficients in memory whatever the output scale. PNG and WebP decompress into
   exactly the header's size, so the header bounds what a zlib bomb can inflate to; the budget
   (25 MP by default) keeps one decode and its conversions under ~225 MB.
4. **Corrupt data is caught, not fitted.** PIL's JPEG decoder silences libjpeg's warnings, so a
   JPEG cut short with an end marker appended decodes "fine" with its bottom half grey. Every JPEG
   is therefore also run through libjpeg-turbo with warnings as errors (``simplejpeg``'s strict mode,
   at 1/8 scale: the entropy decoding, where the warnings come from, is complete; the IDCT is
   skipped). A warning about the data is a quarantine reason (``corrupt image`` / ``truncated
   image``); a warning that does not touch the pixels (an unknown JFIF revision, a thumbnail of the
   wrong size) is kept as :attr:`LoadedPhoto.decode_warning` and the photo is used. PNG chunks are
   checked as libpng checks them: a bad CRC on a critical chunk (IHDR, PLTE, IDAT) is an error, on
   an ancillary chunk (text, EXIF, colour profile) a warning and the chunk is dropped.
5. **Every mode becomes RGB uint8**, with a note saying what was converted (16-bit by 1/257 with
   rounding, alpha composited on white, palette expanded, CMYK converted, grey expanded); EXIF
   orientation is applied and ``original_size`` is the size after it. Images larger than
   ``max_side`` are downscaled *before* the conversions that cost memory (alpha compositing,
   16-bit scaling), so no full-size float copy is ever made.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import stat
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

DECODED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "PPM", "GIF")
"""PIL formats that are decoded (chosen by the file's first bytes, whatever its extension says)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".pbm", ".pgm",
                    ".ppm", ".pnm", ".gif")
"""Extensions a folder listing takes (case-insensitive): the decoded formats' usual names."""
ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on white: what a browser or photo viewer shows."""

# Reason kinds: the text before the first ":" (or " (") of a LoadFailure's reason.
NO_SUCH_FILE = "no such file"
NOT_A_FILE = "not a file"
UNREADABLE = "unreadable file"
SYMLINK_LOOP = "symlink loop"
EMPTY = "empty file"
FILE_TOO_LARGE = "file too large"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED_FORMAT = "unsupported format"
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

# EXIF orientation -> the transpose that makes the image upright (as PIL's ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
_HEAD = 512
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (_PNG_MAGIC, "PNG"), (b"BM", "BMP"), (b"GIF87a", "GIF"),
               (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
# Formats PIL or another program could open that are refused by name (the reason says which).
_OTHER_SIGNATURES = (
    (b"%!PS", "PostScript"), (b"\xc5\xd0\xd3\xc6", "PostScript (binary EPS)"), (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"II\xbc", "JPEG XR"),
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"), (b"8BPS", "Photoshop PSD"), (b"gimp xcf", "GIMP XCF"),
    (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "Radiance HDR"),
    (b"\xd7\xcd\xc6\x9a", "Windows metafile"),
    (b"PK\x03\x04", "ZIP archive"), (b"\x1f\x8b", "gzip archive"), (b"BZh", "bzip2 archive"),
    (b"\xfd7zXZ\x00", "xz archive"), (b"7z\xbc\xaf\x27\x1c", "7z archive"), (b"Rar!", "RAR archive"),
    (b"\x7fELF", "ELF executable"), (b"MZ", "Windows executable"), (b"\x1a\x45\xdf\xa3", "Matroska/WebM video"),
    (b"OggS", "Ogg media"), (b"ID3", "MP3 audio"), (b"fLaC", "FLAC audio"), (b"SIMPLE  =", "FITS"),
    (b"\x89HDF\r\n\x1a\n", "HDF5"), (b"Pf", "PFM float map"), (b"PF", "PFM float map"), (b"P7", "PAM"),
)
_ISO_BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"hevc": "HEIF", b"heim": "HEIF", b"heis": "HEIF", b"mif1": "HEIF",
               b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
_TRUNCATION_WORDS = ("truncated", "premature end", "broken data stream", "end of file", "unexpected end")
# libjpeg warnings that say nothing about the pixels: the photo is used and the warning kept.
_HARMLESS_JPEG_WARNINGS = ("unknown jfif revision", "thumbnail image size does not match")
_STRAY_BYTES = re.compile(r"(\d+) extraneous bytes before marker 0xd9")
_STRAY_BYTES_HARMLESS = 16
"""A few stray bytes before the end marker come from some cameras' encoders, after complete image data;
hundreds mean the entropy decoding lost step and finished early (corrupt data libjpeg did not otherwise flag)."""
# PIL's decompression-bomb limit and truncated-image switch are module globals; one decode at a
# time changes them (and puts them back), so two threads never see each other's settings.
_PIL_SETTINGS = threading.Lock()


class LoadConfig(BaseModel):
    """How photos are decoded (the limits of :func:`load_photo`)."""

    # The library's Config settings (facedetail.config.Config, which io cannot import: it sits above io).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)

    max_side: int = Field(1024, ge=32)
    """Longer side of the loaded pixels at most this: larger photos are downscaled while decoding
    (fitting runs at 256 px later and detection downscales further, so more is wasted memory)."""
    max_pixels: int = Field(25_000_000, ge=1)
    """Refuse an image whose decoded pixel count would exceed this, read from its header before any
    decoding. A baseline JPEG counts at the reduced size it is decoded at (1/8 at most), so a
    12000x12000 JPEG is loaded while a 14000x14000 PNG is refused; a progressive JPEG counts at full
    size (libjpeg holds all its coefficients). A decode and its conversions hold at most ~9 bytes a
    decoded pixel (a palette image with transparency, downscaled): 25 MP bound one decode to ~225 MB."""
    min_side: int = Field(32, ge=1)
    """Refuse an image whose shorter side is below this, in original pixels or after downscaling to
    ``max_side`` (a thin panorama): no face can be found in it."""
    max_file_bytes: int = Field(256 << 20, ge=1)
    """Refuse a file larger than this from its size alone (never read): photos are a few MB."""

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
    decode_warning: str | None = None
    """A decoder warning that left the pixels intact (``JPEG: Warning: unknown JFIF revision number 3.00``,
    ``PNG tEXt chunk CRC mismatch: chunk ignored``); None when the decoders had nothing to say."""


@dataclass(frozen=True)
class LoadFailure:
    """Why a file could not be loaded."""

    reason: str
    """Starts with a kind (one of the module's reason constants), then specifics after ``:`` or ``(``,
    e.g. ``empty file (0 bytes)``, ``truncated image: JPEG data ends early (Premature end of JPEG file)``."""

    @property
    def kind(self) -> str:
        """The countable part of the reason (``empty file``, ``truncated image``, ...)."""
        return self.reason.split(":")[0].split(" (")[0]


# --- reading files --------------------------------------------------------------------------------


def open_regular(path: Path | str, max_bytes: int | None = None) -> int | LoadFailure:
    """A read-only file descriptor of the regular file at ``path`` (symlinks followed), or why not.

    Opened non-blocking, so that a FIFO or a terminal never hangs the caller, and checked with
    ``fstat`` on the open descriptor (no race between a check and the open). The caller closes it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        return _open_failure(Path(path), err)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            failure: LoadFailure | None = LoadFailure(f"{NOT_A_FILE}: a folder")
        elif not stat.S_ISREG(st.st_mode):
            failure = LoadFailure(f"{NOT_A_FILE}: a special file ({file_type(st.st_mode)})")
        elif max_bytes is not None and st.st_size > max_bytes:
            failure = LoadFailure(f"{FILE_TOO_LARGE}: {st.st_size} bytes, over max_file_bytes {max_bytes}")
        else:
            failure = None
    except OSError as err:
        failure = LoadFailure(f"{UNREADABLE}: {err.strerror or err}")
    if failure is not None:
        os.close(fd)
        return failure
    return fd


def read_file(path: Path | str, max_bytes: int) -> bytes | LoadFailure:
    """The bytes of the regular file at ``path`` (at most ``max_bytes``), or why they cannot be read."""
    fd = open_regular(path, max_bytes)
    if isinstance(fd, LoadFailure):
        return fd
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(max_bytes + 1)  # a file that grew while read is refused, not cut
    except OSError as err:
        return LoadFailure(f"{UNREADABLE}: {err.strerror or err}")
    if len(data) > max_bytes:
        return LoadFailure(f"{FILE_TOO_LARGE}: over max_file_bytes {max_bytes}")
    return data


def hash_file(path: Path | str, max_bytes: int | None = None) -> str | LoadFailure:
    """Hex SHA256 of the regular file at ``path``, read in 1 MiB chunks, or why it cannot be read."""
    fd = open_regular(path, max_bytes)
    if isinstance(fd, LoadFailure):
        return fd
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError as err:
        return LoadFailure(f"{UNREADABLE}: {err.strerror or err}")
    return digest.hexdigest()


def _open_failure(path: Path, err: OSError) -> LoadFailure:
    if err.errno == errno.ENOENT:
        return LoadFailure(f"{NO_SUCH_FILE} (broken symlink)" if os.path.islink(path) else NO_SUCH_FILE)
    if err.errno == errno.ELOOP:
        return LoadFailure(f"{SYMLINK_LOOP}: the link resolves to itself")
    if err.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing elsewhere
        return LoadFailure(f"{NOT_A_FILE}: a special file (socket)")
    if err.errno == errno.ENOTDIR:
        return LoadFailure(f"{NO_SUCH_FILE}: a parent is not a folder")
    return LoadFailure(f"{UNREADABLE}: {err.strerror or err}")


def file_type(mode: int) -> str:
    """A few words for a stat mode that is not a regular file or folder (``FIFO``, ``socket``...)."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown type"


# --- decoding ------------------------------------------------------------------------------------


def load_photo(path: Path | str, config: LoadConfig | None = None) -> LoadedPhoto | LoadFailure:
    """Read and decode one photo file (see the module docstring); never raises for a bad file."""
    config = config or LoadConfig()
    data = read_file(path, config.max_file_bytes)
    if isinstance(data, LoadFailure):
        return data
    return decode_photo(data, config, Path(os.fsdecode(path)).suffix)


def decode_photo(data: bytes, config: LoadConfig | None = None, extension: str = "") -> LoadedPhoto | LoadFailure:
    """Decode photo bytes (``extension``, e.g. ``.jpg``, only words the reason of a non-image)."""
    config = config or LoadConfig()
    if not data:
        return LoadFailure(f"{EMPTY} (0 bytes)")
    if len(data) > config.max_file_bytes:
        return LoadFailure(f"{FILE_TOO_LARGE}: {len(data)} bytes, over max_file_bytes {config.max_file_bytes}")
    head = data[:_HEAD]
    fmt = sniff_format(head)
    if fmt is None:
        other = _other_format(head)
        if other is not None:
            return LoadFailure(f"{UNSUPPORTED_FORMAT}: {other} (decoded: JPEG, PNG, WebP, BMP, TIFF, PNM, GIF)")
        return LoadFailure(f"{NOT_AN_IMAGE}: {extension.lower() or 'extensionless'} file is not decodable "
                           f"({_describe(head)})")
    digest = hashlib.sha256(data).hexdigest()
    warning = None
    if fmt == "PNG":
        checked = _check_png(data)
        if isinstance(checked, LoadFailure):
            return checked
        data, warning = checked
    with _decode_settings():
        try:
            img = Image.open(io.BytesIO(data), formats=("JPEG", "MPO") if fmt == "JPEG" else (fmt,))
        except UnidentifiedImageError:
            return LoadFailure(f"{CORRUPT}: {fmt} header unreadable")
        except Exception as err:  # PIL's plugins raise many types on damaged headers
            return _decode_error(fmt, err)
        with img:
            result = _convert(img, data, config)
    if isinstance(result, LoadFailure):
        return result
    rgb, scale, size, mode, notes, jpeg_warning = result
    return LoadedPhoto(rgb, scale, size, digest, mode, notes, img.format or fmt, warning or jpeg_warning)


def sniff_format(head: bytes) -> str | None:
    """The allowed format whose magic bytes start ``head``, if any (PIL's name: ``JPEG``, ``PNG``...)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PPM"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _other_format(head: bytes) -> str | None:
    if head[4:8] == b"ftyp":
        return _ISO_BRANDS.get(head[8:12], "ISO media (MP4/QuickTime)")
    if head[:4] == b"RIFF":
        return f"RIFF {head[8:12].decode('latin-1').strip() or 'media'}"
    found = next((name for magic, name in _OTHER_SIGNATURES if head.startswith(magic)), None)
    if found is None and b"<svg" in head.lower():
        return "SVG"
    return found


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


_Converted = tuple[np.ndarray, float, tuple[int, int], str, tuple[str, ...], str | None]


def _convert(img: Image.Image, data: bytes, config: LoadConfig) -> _Converted | LoadFailure:
    """Size checks, reduced decoding, the JPEG check, mode conversion, downscaling and orientation."""
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
    jpeg = fmt in ("JPEG", "MPO")
    if jpeg and not _streams(data) and raw_w * raw_h > config.max_pixels:
        return LoadFailure(f"{TOO_LARGE}: {shown} exceeds max_pixels {config.max_pixels} (a progressive or "
                           "multi-scan JPEG: libjpeg holds all its coefficients at full size, whatever the scale)")
    box = None
    if scale < 1.0 and jpeg:
        # libjpeg decodes at 1/2, 1/4 or 1/8 straight from the DCT coefficients: the largest
        # reduction still at least ``target`` is used, and full resolution is never in memory.
        drafted = img.draft(None, target)
        if drafted is not None and img.size != (raw_w, raw_h):
            box = drafted[1]
            notes.append(f"{fmt} decoded at 1/{round(raw_w / box[2])}")
    if img.size[0] * img.size[1] > config.max_pixels:
        at = "" if img.size == (raw_w, raw_h) else f" (even decoded reduced to {img.size[0]}x{img.size[1]})"
        return LoadFailure(f"{TOO_LARGE}: {shown} exceeds max_pixels {config.max_pixels}{at}")
    warning = None
    if jpeg:
        checked = _check_jpeg(data, mode)
        if isinstance(checked, LoadFailure):
            return checked
        warning = checked
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
    if getattr(img, "is_animated", False) and fmt != "MPO":  # MPO's first frame is the photo itself
        notes.append(f"first of {img.n_frames} frames" if fmt != "GIF" else "first frame of an animated GIF")
    try:
        rgb = _to_rgb(img, mode, rawmode, notes, target if scale < 1.0 else None, box)
    except _UnsupportedModeError as err:
        return LoadFailure(f"{UNSUPPORTED_MODE}: {err}")
    except (OSError, ValueError) as err:  # PIL's convert on a mode it cannot map
        return LoadFailure(f"{UNSUPPORTED_MODE}: {mode} ({' '.join(str(err).split())})")
    if scale < 1.0:
        notes.append(f"{DOWNSCALED} {shown} -> {'x'.join(map(str, _oriented(target, orientation)))}")
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
        notes.append(f"EXIF orientation {orientation} applied")
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:  # a conversion path above is wrong: say so, do not guess
        return LoadFailure(f"{UNSUPPORTED_MODE}: {mode} converted to shape {pixels.shape}")
    return np.ascontiguousarray(pixels), scale, size, mode, tuple(notes), warning


def _check_jpeg(data: bytes, mode: str) -> str | LoadFailure | None:
    """libjpeg-turbo's verdict on the JPEG's data, warnings included: a failure, a harmless warning, or None.

    Decoded at 1/8 (every coefficient is entropy-decoded, which is where corrupt data shows; the
    IDCT is skipped), to grey: the colour conversion is irrelevant to the check.
    """
    try:
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if mode == "CMYK" else "GRAY", min_height=1, min_width=1,
                               strict=True)
    except ValueError as err:
        message = " ".join(str(err).split()) or "decoder error"
        lowered = message.lower()
        stray = _STRAY_BYTES.search(lowered)
        if any(w in lowered for w in _HARMLESS_JPEG_WARNINGS) or (stray and int(stray[1]) <= _STRAY_BYTES_HARMLESS):
            return f"JPEG: {message}"
        if "precision" in lowered or "unsupported color conversion" in lowered:
            return LoadFailure(f"{UNSUPPORTED_MODE}: JPEG ({message})")
        if "premature end" in lowered:  # of the file, or of the scan data before the image's last row
            return LoadFailure(f"{TRUNCATED}: JPEG data ends before the image does (libjpeg: {message})")
        return LoadFailure(f"{CORRUPT}: JPEG data is damaged (libjpeg: {message})")
    return None


_SEQUENTIAL_FRAMES = (0xC0, 0xC1, 0xC9)  # baseline, extended sequential (Huffman), sequential arithmetic
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _streams(data: bytes) -> bool:
    """Whether libjpeg decodes this JPEG row by row: a sequential frame whose first scan holds every
    component. Anything else (progressive, or components in separate scans) is buffered whole."""
    pos, frame, components = 2, None, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _FRAME_MARKERS and pos + 10 <= len(data):
            frame, components = marker, data[pos + 9]
        elif marker == 0xDA and pos + 5 <= len(data):
            return frame in _SEQUENTIAL_FRAMES and data[pos + 4] == components
        pos += 2 + length
    return False


def _check_png(data: bytes) -> tuple[bytes, str | None] | LoadFailure:
    """Walk the PNG's chunks and check every CRC, as libpng does.

    A bad CRC on a critical chunk (IHDR, PLTE, IDAT, IEND) is corrupt data; on an ancillary chunk it
    is a warning and the chunk is left out of the returned bytes (PIL would refuse the whole file
    for a damaged text chunk). Data after IEND is ignored, as libpng ignores it.
    """
    pos, kept, dropped = len(_PNG_MAGIC), [], []
    while pos < len(data):
        if pos + 12 > len(data):
            return LoadFailure(f"{TRUNCATED}: PNG data ends early (inside a chunk header)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return LoadFailure(f"{TRUNCATED}: PNG data ends early (in a {_chunk_name(kind)} chunk)")
        crc = struct.unpack(">I", data[end - 4:end])[0]
        if zlib.crc32(data[pos + 4:end - 4]) != crc:
            if not kind[0] & 0x20:  # bit 5 of the first letter clear: a critical chunk
                return LoadFailure(f"{CORRUPT}: PNG {_chunk_name(kind)} chunk CRC mismatch (data damaged)")
            dropped.append(_chunk_name(kind))
        else:
            kept.append((pos, end))
        pos = end
        if kind == b"IEND":
            break
    if not dropped:
        return data, None
    rebuilt = _PNG_MAGIC + b"".join(data[a:b] for a, b in kept)
    return rebuilt, f"PNG {', '.join(dropped)} chunk CRC mismatch: chunk ignored"


def _chunk_name(kind: bytes) -> str:
    return kind.decode("latin-1") if kind.isalpha() else kind.hex()


class _UnsupportedModeError(Exception):
    """A PIL mode this loader does not know how to turn into RGB."""


def _to_rgb(img: Image.Image, mode: str, rawmode: str, notes: list[str], target: tuple[int, int] | None,
            box: tuple[float, float, float, float] | None) -> Image.Image:
    """The loaded image as an RGB PIL image at ``target`` size (None: as it is); ``notes`` gets what was converted.

    Downscaling comes before the conversions that cost memory: a 40 MP RGBA image is resized as RGBA
    (PIL premultiplies alpha for that) and composited at 1 MP, never copied to float at full size.
    """

    def fit(image: Image.Image) -> Image.Image:
        if target is None or image.size == target:
            return image
        return image.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)

    if mode == "RGB":
        if ";16" in rawmode:  # 16-bit colour PNG: PIL's unpacker keeps the high byte, within 1 level of /257
            notes.append(SIXTEEN_BIT)
        return fit(img)
    if mode == "1":
        notes.append(BILEVEL_EXPANDED)
        return fit(img.convert("L")).convert("RGB")
    if mode == "L":
        notes.append(GREY_EXPANDED)
        return fit(img).convert("RGB")
    if mode in ("P", "PA"):
        notes.append(PALETTE_EXPANDED)
        has_alpha = mode == "PA" or img.has_transparency_data
        return _composite(fit(img.convert("RGBA")), notes) if has_alpha else fit(img.convert("RGB"))
    if mode in ("RGBA", "RGBa", "LA", "La"):
        if mode[0] == "L":
            notes.append(GREY_EXPANDED)
        if ";16" in rawmode:
            notes.append(SIXTEEN_BIT)
        return _composite(fit(img if mode == "RGBA" else img.convert("RGBA")), notes)  # convert() would copy
    if mode == "CMYK":
        notes.append(CMYK_CONVERTED)
        return fit(img.convert("RGB"))
    if mode in ("YCbCr", "LAB", "HSV", "RGBX"):
        notes.append(f"{mode} converted to RGB")
        return fit(img.convert("RGB"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return fit(Image.fromarray(_grey8(img, mode, notes), "L")).convert("RGB")
    raise _UnsupportedModeError(mode)


_ROWS = 512  # rows converted at a time: a 16-bit or float image is never copied wider than its own size


def _grey8(img: Image.Image, mode: str, notes: list[str]) -> np.ndarray:
    """16-bit, 32-bit integer or float grey as uint8, in blocks of rows (bounded memory)."""
    values = np.asarray(img)
    out = np.empty(values.shape[:2], np.uint8)
    if mode == "F" and not all(np.isfinite(values[r:r + _ROWS]).all() for r in range(0, len(values), _ROWS)):
        raise _UnsupportedModeError("F (32-bit float) with non-finite pixels")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        notes.append("float [0, 1] scaled to 8-bit")
        kind = "unit"
    elif mode == "F" or lo < 0 or hi > 65535:
        notes.append(f"{'float' if mode == 'F' else '32-bit integer'} range [{lo:g}, {hi:g}] rescaled to 8-bit")
        kind = "range"
    else:
        notes.append(SIXTEEN_BIT)
        kind = "16-bit"

    def convert(v: np.ndarray) -> np.ndarray:
        if kind == "16-bit":  # round(v / 257) exactly, in integers (257 is odd: no ties)
            return (v.astype(np.uint32) + 128) // 257
        if kind == "unit":
            return np.round(v.astype(np.float64) * 255.0)
        span = hi - lo
        return np.round((v.astype(np.float64) - lo) / span * 255.0) if span > 0 else np.zeros(v.shape)

    for r in range(0, len(values), _ROWS):
        out[r:r + _ROWS] = convert(values[r:r + _ROWS])
    notes.append(GREY_EXPANDED)
    return out


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


def _describe(head: bytes) -> str:
    """A few words on what a non-image file holds, for the reason."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not merely a character cut at the end of the 512 bytes
            return f"binary content starting {head[:4].hex()}"
        text = head[:err.start].decode("utf-8")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        lowered = text.lstrip().lower()
        if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered[:200]:
            return "an HTML page"
        return "text content"
    return f"binary content starting {head[:4].hex()}"
