"""In-the-wild inputs: listing photos (a folder or an AffectNet-style list), with a record of everything not taken.

:func:`scan_inputs` turns a folder (recursive) or a CSV/Parquet list into a :class:`Listing`:
the :class:`InputItem` rows to process (stable ids), every entry of the folder it did not take
(:class:`Skipped`: hidden, not an image by its extension, a special file, a symlink loop, ...) and
every list row naming a file listed before (:class:`Duplicate`); :func:`content_duplicates` then
takes out byte-identical files. Nothing a listing sees disappears without a row, so a run can
state ``inputs = fitted + quarantined + skipped + duplicates``.

File names are bytes on POSIX: a name that is not valid UTF-8 gets its id from those bytes and
is shown (``relative``, every table) with the bytes escaped (``caf\\xe9.jpg``), while ``path``
still opens the file. A list that is not UTF-8 is read the same way: each path cell's bytes are
the file name, exactly as the file system holds it (no replacement character that would name a
file that does not exist).

Decoding lives in :mod:`facedetail.io.decode` (one decoder for every entry point); its API is
re-exported here (:func:`load_photo`, :class:`LoadConfig`, the reason kinds and notes).
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from facedetail.errors import SourceFileError
from facedetail.io.decode import (
    ALPHA_BACKGROUND,
    ALPHA_COMPOSITED,
    BILEVEL_EXPANDED,
    CMYK_CONVERTED,
    CORRUPT,
    DECODED_FORMATS,
    DOWNSCALED,
    EMPTY,
    FILE_TOO_LARGE,
    GREY_EXPANDED,
    IMAGE_EXTENSIONS,
    NO_SUCH_FILE,
    NOT_A_FILE,
    NOT_AN_IMAGE,
    OPAQUE_ALPHA_DROPPED,
    PALETTE_EXPANDED,
    SIXTEEN_BIT,
    SYMLINK_LOOP,
    TOO_LARGE,
    TOO_SMALL,
    TRUNCATED,
    UNREADABLE,
    UNSUPPORTED_FORMAT,
    UNSUPPORTED_MODE,
    LoadConfig,
    LoadedPhoto,
    LoadFailure,
    decode_photo,
    file_type,
    hash_file,
    load_photo,
)
from facedetail.io.hashing import sha256_bytes

__all__ = [
    "ALPHA_BACKGROUND", "ALPHA_COMPOSITED", "BILEVEL_EXPANDED", "CMYK_CONVERTED", "CORRUPT", "DECODED_FORMATS",
    "DOWNSCALED", "EMPTY", "FILE_TOO_LARGE", "GREY_EXPANDED", "IMAGE_EXTENSIONS", "NOT_AN_IMAGE", "NOT_A_FILE",
    "NO_SUCH_FILE", "OPAQUE_ALPHA_DROPPED", "PALETTE_EXPANDED", "SIXTEEN_BIT", "SYMLINK_LOOP", "TOO_LARGE",
    "TOO_SMALL", "TRUNCATED", "UNREADABLE", "UNSUPPORTED_FORMAT", "UNSUPPORTED_MODE", "Duplicate", "InputItem",
    "Listing", "LoadConfig", "LoadFailure", "LoadedPhoto", "OutsideSymlinks", "Skipped", "content_duplicates",
    "decode_photo", "display_name", "file_hashes", "item_id", "list_inputs", "load_photo", "scan_inputs",
]

PATH_COLUMNS = ("path", "subDirectory_filePath")
"""Path column of a list, in order of preference (the second is AffectNet's)."""
LABEL_COLUMNS = ("label", "expression")
"""Label column of a list, in order of preference (the second is AffectNet's)."""
XYWH_COLUMNS = ("face_x", "face_y", "face_width", "face_height")
"""AffectNet's face box: left, top, width, height in original pixels."""
LTRB_COLUMNS = ("left", "top", "right", "bottom")

OutsideSymlinks = Literal["follow", "refuse"]
"""What a folder listing does with a symlink whose target lies outside the folder."""

# Skip and duplicate reason kinds (text before the first ":" or " (").
HIDDEN_FILE = "hidden file"
HIDDEN_FOLDER = "hidden folder"
NO_EXTENSION = "no file extension"
NOT_IMAGE_EXTENSION = "extension not an image"
SPECIAL_FILE = "special file"
BROKEN_SYMLINK = "broken symlink"
FOLDER_SYMLINK = "folder symlink"
OUTSIDE_SYMLINK = "symlink leaves the input folder"
UNREADABLE_FOLDER = "unreadable folder"
SAME_FILE = "same file"
SAME_CONTENT = "same content"
NOT_UTF8 = "file name is not valid UTF-8 (shown with its bytes escaped)"

_ID_SLUG_MAX = 48
_ID_HASH_HEX = 12
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


@dataclass(frozen=True)
class InputItem:
    """One photo to process, as listed."""

    id: str
    """Stable, unique and filesystem-safe: ``<slug>-<hash>``, where the slug is the relative path
    with every run of characters other than ``[A-Za-z0-9]`` replaced by ``-`` (at most 48 characters,
    kept from the end, where file names differ) and the hash is the first 12 hex digits of the SHA256
    of the relative path's bytes. The same relative path always gives the same id, on any machine."""
    path: Path
    """Absolute path of the file (lexical: ``..`` folded, symlinks kept, so that its name is the listed one)."""
    relative: str
    """POSIX path relative to the source folder (folders), or as written in the list (lists); bytes that
    are not UTF-8 are escaped (``\\xe9``), so it is always valid text (see :func:`display_name`)."""
    box: tuple[float, float, float, float] | None = None
    """Face box from the list: (left, top, right, bottom) in original pixels; None when not given."""
    label: str | None = None
    """Label from the list, kept as written (AffectNet's expression ids stay ``"0"``..``"10"``)."""
    note: str | None = None
    """What the listing noticed (a name that is not UTF-8, a symlink out of the folder followed); None if nothing."""
    row: int | None = None
    """Row of the list (1 = the first after the header); None for a folder."""


@dataclass(frozen=True)
class Skipped:
    """An entry of a folder that the listing did not take."""

    path: str
    """Relative to the folder, as :attr:`InputItem.relative`; a folder ends with ``/``."""
    reason: str
    """Starts with a kind (``hidden file``, ``extension not an image``, ``special file``, ``symlink loop``...)."""


@dataclass(frozen=True)
class Duplicate:
    """A listed file that is not processed because another listed one is the same file or has the same bytes."""

    path: str
    row: int | None
    """Its list row (None for a folder's file)."""
    duplicate_of: str
    """The id of the item that is processed instead."""
    reason: str
    """``same file as <path> (row n)`` (lists: the same file under another spelling) or ``same content as <path>``."""


@dataclass(frozen=True)
class Listing:
    """What a folder or list holds: the items to process and a row for everything else."""

    items: list[InputItem]
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Every entry seen: items, skipped entries and duplicates."""
        return len(self.items) + len(self.skipped) + len(self.duplicates)


def display_name(name: str) -> str:
    """``name`` as valid text: bytes that were not UTF-8 (surrogate escapes) shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def item_id(relative: str) -> str:
    """The id of an input listed as ``relative`` (see :attr:`InputItem.id`); the hash is of its raw bytes."""
    slug = _SLUG_UNSAFE.sub("-", relative).strip("-")[-_ID_SLUG_MAX:].strip("-") or "input"
    return f"{slug}-{sha256_bytes(relative.encode('utf-8', 'surrogateescape'))[:_ID_HASH_HEX]}"


def _item(rel: str, path: Path, note: str | None = None, **values: Any) -> InputItem:
    shown = display_name(rel)
    if shown != rel:
        note = "; ".join(n for n in (NOT_UTF8, note) if n)
    return InputItem(item_id(rel), path, shown, note=note, **values)


def list_inputs(source: Path, root: Path | None = None) -> list[InputItem]:
    """The items of :func:`scan_inputs` (what is skipped or duplicated is left out: use that for a run)."""
    return scan_inputs(source, root).items


def scan_inputs(source: Path, root: Path | None = None, outside_symlinks: OutsideSymlinks = "follow") -> Listing:
    """The photos of a folder (recursive) or of a ``.csv`` / ``.parquet`` list, in a fixed order.

    Folder: files with an extension in :data:`IMAGE_EXTENSIONS` (any case), sorted by the bytes of
    their relative path; ``root`` must be None. Skipped, each with a row: hidden files and folders
    (name starting with ``.``; a hidden folder is one row, never entered), other extensions, files
    without one, special files (FIFO, socket, device), broken symlinks and symlink loops, unreadable
    folders, symlinked folders whose target is inside the folder (its files are listed where they
    lie), and, with ``outside_symlinks="refuse"``, every symlink whose target lies outside the folder
    (``"follow"``, the default, takes them with a note: DVC's symlink cache links every tracked file
    out of its folder).

    List: one row per photo, in the list's order; the path column is ``path`` or AffectNet's
    ``subDirectory_filePath``; an optional box is ``face_x, face_y, face_width, face_height``
    (AffectNet) or ``left, top, right, bottom`` (all four cells empty: no box); an optional label
    is ``label`` or ``expression``. Relative paths resolve against ``root`` (default: the list's
    folder). Listed files are kept whatever their extension: the loader reports what is wrong
    with them. A row naming a file listed before (the same path, or another spelling of it:
    ``./a.jpg``, ``../list/a.jpg``, a symlink) is a :class:`Duplicate`. A malformed list (no path
    column, an empty path, a box cell that is not a number, a box of non-positive size, a line the
    CSV reader cannot parse) raises :class:`SourceFileError` naming the row.
    """
    source = Path(source)
    if source.is_dir():
        if root is not None:
            raise ValueError("root applies to lists only; a folder's paths are relative to the folder")
        return _FolderWalk(source, outside_symlinks).run()
    if not source.is_file():
        raise SourceFileError(display_name(str(source)), "input folder or list not found",
                              "Check the input path in params.yaml")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        columns, rows = _read_csv(source)
    elif suffix == ".parquet":
        columns, rows = _read_parquet(source)
    else:
        raise SourceFileError(source, f"unsupported input list type {source.suffix!r}",
                              "Give a folder of images, a .csv or a .parquet list")
    return _list_rows(source, Path(root) if root is not None else source.parent, columns, rows)


class _FolderWalk:
    """A recursive listing of one folder with a :class:`Skipped` row for every entry not taken.

    os.scandir rather than rglob/os.walk: each entry's type is known without following links, so a
    symlink loop, a FIFO or an unreadable folder becomes a row instead of an exception or a hang.
    """

    def __init__(self, folder: Path, outside: OutsideSymlinks) -> None:
        self.base = Path(os.path.abspath(folder))
        self.real = os.path.realpath(self.base)
        self.outside = outside
        self.found: list[tuple[str, str | None]] = []
        self.skipped: list[Skipped] = []
        self.seen: set[tuple[int, int]] = set()

    def run(self) -> Listing:
        st = os.stat(self.base)
        self.seen.add((st.st_dev, st.st_ino))
        self._walk(self.base, "", None)
        order = sorted(self.found, key=lambda f: f[0].encode("utf-8", "surrogateescape"))
        items = [_item(rel, self.base / rel, note) for rel, note in order]
        skipped = sorted(self.skipped, key=lambda s: s.path.encode("utf-8", "surrogateescape"))
        return Listing(items, skipped)

    def _skip(self, rel: str, reason: str) -> None:
        self.skipped.append(Skipped(display_name(rel), reason))

    def _inside(self, target: str) -> bool:
        return target == self.real or target.startswith(self.real.rstrip(os.sep) + os.sep)

    def _walk(self, folder: Path, prefix: str, note: str | None) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as err:
            self._skip(prefix or "./", f"{UNREADABLE_FOLDER}: {err.strerror or err}")
            return
        for entry in entries:
            self._entry(entry, prefix + entry.name, note)

    def _entry(self, entry: os.DirEntry[str], rel: str, note: str | None) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as err:
            self._skip(rel, f"{UNREADABLE}: {err.strerror or err}")
            return
        link = stat.S_ISLNK(st.st_mode)
        if entry.name.startswith("."):
            if not link and stat.S_ISDIR(st.st_mode):
                self._skip(rel + "/", f"{HIDDEN_FOLDER} (not searched)")
            else:
                self._skip(rel, HIDDEN_FILE)
            return
        if link:
            try:
                st = os.stat(entry.path)
            except OSError as err:
                self._skip(rel, SYMLINK_LOOP if err.errno == errno.ELOOP else (
                    BROKEN_SYMLINK if err.errno == errno.ENOENT else f"{UNREADABLE}: {err.strerror or err}"))
                return
            inside = self._inside(os.path.realpath(entry.path))
            if stat.S_ISDIR(st.st_mode):
                self._folder_link(entry, rel, st, inside)
                return
            if not inside:
                if self.outside == "refuse":
                    self._skip(rel, f"{OUTSIDE_SYMLINK} (refused: outside_symlinks is refuse)")
                    return
                note = note or f"{OUTSIDE_SYMLINK} (followed)"
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in self.seen:  # a bind mount of a folder above: listed once
                self._skip(rel + "/", f"{SYMLINK_LOOP}: folder already listed")
                return
            self.seen.add((st.st_dev, st.st_ino))
            self._walk(Path(entry.path), rel + "/", note)
            return
        if not stat.S_ISREG(st.st_mode):
            self._skip(rel, f"{SPECIAL_FILE} ({file_type(st.st_mode)}{', via a symlink' if link else ''})")
            return
        ext = os.path.splitext(entry.name)[1].lower()
        if not ext:
            self._skip(rel, NO_EXTENSION)
        elif ext not in IMAGE_EXTENSIONS:
            self._skip(rel, f"{NOT_IMAGE_EXTENSION} ({display_name(ext)})")
        else:
            self.found.append((rel, note))

    def _folder_link(self, entry: os.DirEntry[str], rel: str, st: os.stat_result, inside: bool) -> None:
        if inside:
            self._skip(rel + "/", f"{FOLDER_SYMLINK} into the input folder (not followed: its files are listed "
                                  "where they lie)")
        elif self.outside == "refuse":
            self._skip(rel + "/", f"{FOLDER_SYMLINK}: {OUTSIDE_SYMLINK} (refused: outside_symlinks is refuse)")
        elif (st.st_dev, st.st_ino) in self.seen:
            self._skip(rel + "/", f"{SYMLINK_LOOP}: folder already listed")
        else:
            self.seen.add((st.st_dev, st.st_ino))
            self._walk(Path(entry.path), rel + "/", f"in a {FOLDER_SYMLINK} that leaves the input folder (followed)")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of a CSV list; the bytes of a cell that are not UTF-8 are kept (surrogate escapes)."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SourceFileError(path, "the list is UTF-16 text", "Save it as UTF-8 CSV")
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # strict: a stray quote is an error
    try:
        rows = list(reader)
    except csv.Error as err:
        raise SourceFileError(path, f"line {reader.line_num}: not readable as CSV ({err})",
                              "Fix that line (a list is UTF-8 CSV with a header row)") from None
    return list(reader.fieldnames or []), rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return list(table.column_names), table.to_pylist()


def _list_rows(source: Path, root: Path, columns: list[str], rows: list[dict[str, Any]]) -> Listing:
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        shown = ", ".join(display_name(c) for c in columns) or "none"
        raise SourceFileError(source, f"no path column (columns: {shown})",
                              "Name it `path` (AffectNet's `subDirectory_filePath` also works)")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    box_cols = _box_columns(source, columns)
    base = Path(os.path.abspath(root))
    items, duplicates, seen = [], [], {}
    for n, row in enumerate(rows, start=1):
        where = f"row {n}"
        rel = _cell_text(row.get(path_col))
        if rel is None:
            raise SourceFileError(source, f"{where}: empty {path_col}", "Every row needs a file path")
        rel = rel.replace("\\", "/")
        if "\x00" in rel:  # no file name holds a NUL: the list is not text (a UTF-16 or binary file)
            raise SourceFileError(source, f"{where}: the path holds a NUL byte", "Save the list as UTF-8 CSV")
        path = Path(os.path.abspath(base / rel))
        box = _box(source, where, row, box_cols) if box_cols else None
        label = _cell_text(row.get(label_col)) if label_col else None
        same = os.path.realpath(path)
        first = seen.get(same)
        if first is not None:
            duplicates.append(Duplicate(display_name(rel), n, first.id, f"{SAME_FILE} as {first.relative} "
                                                                        f"(row {first.row})"))
            continue
        item = _item(rel, path, None, box=box, label=None if label is None else display_name(label), row=n)
        seen[same] = item
        items.append(item)
    return Listing(items, [], duplicates)


def content_duplicates(listing: Listing, hash_of: Callable[[InputItem], str | None]) -> Listing:
    """``listing`` with every item whose bytes equal an earlier item's moved to its duplicates.

    ``hash_of`` gives an item's content SHA256, or None when it cannot be read (the item is kept: the
    loader will say why). The first item in listing order is the one processed.
    """
    kept, duplicates, first = [], list(listing.duplicates), {}
    for item in listing.items:
        digest = hash_of(item)
        if digest is not None and digest in first:
            original = first[digest]
            duplicates.append(Duplicate(item.relative, item.row, original.id,
                                        f"{SAME_CONTENT} as {original.relative}"))
            continue
        if digest is not None:
            first[digest] = item
        kept.append(item)
    return replace(listing, items=kept, duplicates=duplicates)


def file_hashes(items: Sequence[InputItem], known: Mapping[Path, str], max_bytes: int) -> dict[str, str | None]:
    """Content SHA256 of each item by id: from ``known`` (e.g. hashed at lineage start), else read here."""
    out: dict[str, str | None] = {}
    for item in items:
        digest = known.get(item.path)
        if digest is None:
            got = hash_file(item.path, max_bytes)
            digest = None if isinstance(got, LoadFailure) else got
        out[item.id] = digest
    return out


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
        shown = {k: None if v is None else display_name(v) for k, v in zip(names, cells, strict=True)}
        raise SourceFileError(source, f"{where}: face box {shown} is not four numbers",
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
    """A list cell as text; None for empty cells (CSV ``""``, Parquet null or NaN); bytes keep their bytes."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    text = str(value).strip()
    return text or None
