"""facedetail.io.tables: the CSV writer behind `dvc plots` tables, and quarantine reason kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from facedetail.io.tables import reason_kind, write_csv


def test_write_csv_bytes_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "history.csv"  # the folder does not exist yet
    rows = [{"epoch": 0, "loss": 1.5, "train_accuracy": 0.25}, {"epoch": 1, "loss": 0.75, "train_accuracy": 0.5}]
    assert write_csv(path, ["epoch", "loss", "train_accuracy"], rows) == path
    assert path.read_bytes() == b"epoch,loss,train_accuracy\n0,1.5,0.25\n1,0.75,0.5\n"
    assert [p.name for p in path.parent.iterdir()] == ["history.csv"], "no temporary file is left behind"


def test_write_csv_quotes_missing_and_order(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    # Field order is the header's, not the rows'; a missing key is empty; commas and quotes are quoted.
    write_csv(path, ("b", "a"), iter([{"a": "x,y", "b": 'say "hi"'}, {"b": 2}]))
    assert path.read_bytes() == b'b,a\n"say ""hi""","x,y"\n2,\n'
    write_csv(path, ["a"], [])
    assert path.read_bytes() == b"a\n", "no rows: the header alone, overwriting the old file"


def test_write_csv_rejects_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in fieldnames"):
        write_csv(tmp_path / "t.csv", ["a"], [{"a": 1, "b": 2}])
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize(("reason", "kind"), [
    (None, "unknown"),
    ("", "unknown"),
    ("no face detected", "no face detected"),
    ("face too small: 70 px < min_face_px 80", "face too small"),
    ("several faces: 2 found", "several faces"),
    (" shape fit diverged : nan at step 3: again", "shape fit diverged"),
])
def test_reason_kind(reason: str | None, kind: str) -> None:
    assert reason_kind(reason) == kind
