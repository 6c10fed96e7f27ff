"""Atomic writes: a killed process never leaves a half-written file or folder under its final name.

Files are written to a hidden temporary sibling, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX within one file system). Folders are assembled in a
hidden temporary sibling and swapped in as a whole. Leftovers of a killed run keep their
hidden ``.NAME.tmp-*`` names, which nothing reads; :func:`remove_stale_temps` clears them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """Yield a binary file that appears at ``path`` only once the block completes (flushed, fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns the path."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(final: Path | str) -> list[Path]:
    """Clear the temporary siblings that a killed run left next to ``final``; returns them.

    A run killed in the middle of swapping a folder in leaves the previous complete folder in
    ``.NAME.old-*``; when ``final`` is missing, that copy is put back instead of deleted.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    pattern = glob.escape(f".{final.name}")
    for stale in sorted(final.parent.glob(f"{pattern}{_OLD_MARK}*")):
        kept = stale / final.name
        if not final.exists() and kept.exists():
            os.replace(kept, final)
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    for stale in sorted(final.parent.glob(f"{pattern}{_TMP_MARK}*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def remove_temp_files(folder: Path | str) -> list[Path]:
    """Remove every temporary sibling (``.NAME.tmp-*``) that killed writes left directly in ``folder``.

    Only for a folder that one run owns at a time (a stage's work folder): a temporary file of a
    write still in progress elsewhere would be removed too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = sorted(p for p in folder.glob(f".*{_TMP_MARK}*"))
    for stale in removed:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def atomic_directory(final: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final`` as a whole.

    On any exception the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARK}", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            # Two renames: POSIX has no atomic exchange of non-empty folders. Until the second
            # lands, the previous folder survives in .NAME.old-* and is restored on failure
            # (or by remove_stale_temps after a kill).
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_OLD_MARK}", dir=final.parent))
            os.replace(final, old / final.name)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old / final.name, final)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
