"""`make assets`: copy from a mirror or download at the pinned commit, always checked by SHA256."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ROOT, sh

from facedetail.assets import fetch_share, packaged_checksums, parse_checksums
from facedetail.errors import ChecksumError, SourceFileError


def test_packaged_sums_match_the_shared_list(eos_share: Path) -> None:
    sums = packaged_checksums()
    assert len(sums) == 13
    shared = eos_share / "SHA256SUMS"
    if not shared.is_file():
        pytest.skip(f"{shared} is absent: there is no published list to compare the packaged sums with")
    assert parse_checksums(shared.read_text()) == sums


def test_fetch_from_mirror_then_idempotent(tmp_path: Path, eos_share: Path) -> None:
    dest = tmp_path / "share"
    files = fetch_share(dest, mirror=eos_share)
    assert sorted(p.name for p in files) == sorted(packaged_checksums())
    stamp = {p.name: p.stat().st_mtime_ns for p in files}
    fetch_share(dest, mirror=eos_share)  # good files are kept, not copied again
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamp


def test_corrupt_mirror_is_a_clear_error(tmp_path: Path, eos_share: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(eos_share, mirror)
    (mirror / "ibug_to_sfm.txt").write_text("tampered")
    with pytest.raises(ChecksumError, match=r"ibug_to_sfm\.txt: SHA256 is .* expected 810810c45718"):
        fetch_share(tmp_path / "dest", mirror=mirror)
    assert not (tmp_path / "dest/ibug_to_sfm.txt").exists()


def test_missing_file_in_mirror(tmp_path: Path, eos_share: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(eos_share, mirror)
    (mirror / "sfm_shape_3448.bin").unlink()
    with pytest.raises(SourceFileError, match="missing from the asset mirror"):
        fetch_share(tmp_path / "dest", mirror=mirror)


def test_download_path_checks_every_file(tmp_path: Path, eos_share: Path) -> None:
    # The download code path, served from a file:// URL (this machine has no outside network).
    served = tmp_path / "served"
    shutil.copytree(eos_share, served)
    files = fetch_share(tmp_path / "dest", base_url=served.as_uri())
    assert len(files) == 13
    (served / "sfm_model_contours.json").write_text("{}")
    (tmp_path / "dest/sfm_model_contours.json").unlink()
    with pytest.raises(ChecksumError, match="downloaded file"):
        fetch_share(tmp_path / "dest", base_url=served.as_uri())
    assert not (tmp_path / "dest/sfm_model_contours.json").exists()


def test_cli_assets_reports_one_line_error(tmp_path: Path, eos_share: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(eos_share, mirror)
    (mirror / "readme.txt").write_text("x")
    proc = sh(["facedetail", "assets", "--dest", str(tmp_path / "d"), "--mirror", str(mirror)], ROOT, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "readme.txt" in proc.stderr and "Traceback" not in proc.stderr
