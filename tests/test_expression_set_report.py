"""The expression set's contact sheet and metrics (facedetail.render.expression_set) on hand-made shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facedetail.io.images import encode_png
from facedetail.io.shards import write_tar_shard
from facedetail.model.morphable import MorphableModel
from facedetail.render.expression_set import contact_sheet, expression_set_metrics, item_id, read_contact_sheet
from facedetail.render.sampling import SamplingConfig


def _model(kind: str = "blendshapes", names: tuple[str, ...] = ("happy", "sad")) -> MorphableModel:
    """A one-triangle model: the metrics only read its expression kind and names."""
    k = len(names)
    f32, none = np.float32, np.zeros((0, 3, 3), np.float32)
    return MorphableModel(
        name="tiny", mean=np.eye(3, dtype=f32), shape_basis=none, shape_std=np.zeros(0, f32), expression_kind=kind,
        expression_basis=np.ones((k, 3, 3), f32), expression_std=np.ones(k, f32), expression_names=names,
        albedo_mean=np.full((3, 3), 0.5, f32), albedo_basis=none, albedo_std=np.zeros(0, f32), albedo_names=(),
        triangles=np.array([[0, 1, 2]], np.int32), uv=np.array([[0, 0], [1, 0], [0, 1]], f32),
        landmark_vertices=np.full(68, -1, np.int32), contour_right=np.zeros(0, np.int32),
        contour_left=np.zeros(0, np.int32))


def _rows() -> list[dict]:
    return [
        {"id": item_id(0), "shard": "shards/a.tar", "label": "happy", "beta": [0.8, 0.1], "mask_fraction": 0.25,
         "landmark_visible": [True, True], "bytes": 100},
        {"id": item_id(1), "shard": "shards/a.tar", "label": "neutral", "beta": [0.1, 0.2], "mask_fraction": 0.5,
         "landmark_visible": [True, False], "bytes": 201},
        {"id": item_id(2), "shard": "shards/b.tar", "label": "happy", "beta": [0.6, 0.3], "mask_fraction": 0.75,
         "landmark_visible": [False, False], "bytes": 300},
    ]


def test_expression_set_metrics_on_hand_made_rows() -> None:
    got = expression_set_metrics(_rows(), _model(), SamplingConfig(), "h")
    assert got == {
        "images": 3, "shards": 2, "params_hash": "h", "expression_distribution": "dominant",
        "label_counts": {"neutral": 1, "happy": 2, "sad": 0},
        "beta_mean": {"happy": 0.5, "sad": 0.2},
        "beta_std": {"happy": round(float(np.std([0.8, 0.1, 0.6])), 4), "sad": 0.0816},
        "beta_min": 0.1, "beta_max": 0.8, "landmarks_visible_fraction": 0.5, "mask_fraction_mean": 0.5,
        "png_bytes_mean": 200.3,
    }


def test_expression_set_metrics_of_a_pca_model() -> None:
    rows = [{**r, "label": "unlabelled"} for r in _rows()]
    got = expression_set_metrics(rows, _model("pca", ("exp_0", "exp_1")), SamplingConfig(), "h")
    assert got["expression_distribution"] == "truncnorm"
    assert got["label_counts"] == {"unlabelled": 3}
    assert got["beta_mean"] == {"exp_0": 0.5, "exp_1": 0.2}


def _sample(i: int) -> dict:
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., i % 3] = 40 * (i + 1)
    record = {"label": f"label{i}", "beta": [0.1 * i], "landmarks": [[8.0, 8.0], [None, None]],
              "landmark_visible": [True, False]}
    return {"__key__": item_id(i), "png": encode_png(image, 1), "json": json.dumps(record).encode()}


@pytest.fixture
def expression_set(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Five items in two shards, and a sixth row whose shard file does not exist."""
    samples = [_sample(i) for i in range(5)]
    (tmp_path / "shards").mkdir()
    write_tar_shard(tmp_path / "shards/a.tar", samples[:3])
    write_tar_shard(tmp_path / "shards/b.tar", samples[3:])
    rows = [{"id": item_id(i), "shard": "shards/a.tar" if i < 3 else "shards/b.tar"} for i in range(5)]
    return tmp_path, rows


def test_read_contact_sheet_picks_items_spread_over_the_set(expression_set: tuple[Path, list[dict]]) -> None:
    out_dir, rows = expression_set
    samples = [_sample(i) for i in range(5)]
    sheet = read_contact_sheet(out_dir, rows, 3)  # items 0, 2 and 4
    np.testing.assert_array_equal(sheet, contact_sheet([samples[0], samples[2], samples[4]]))
    assert sheet.shape == (128 + 22, 3 * 128, 3)
    np.testing.assert_array_equal(read_contact_sheet(out_dir, rows, 10), contact_sheet(samples))


def test_read_contact_sheet_opens_only_shards_it_needs(expression_set: tuple[Path, list[dict]]) -> None:
    out_dir, rows = expression_set
    rows = [*rows, {"id": item_id(5), "shard": "shards/missing.tar"}]
    # Six items, two wanted: 0 and 5. Only the first is in a readable shard.
    with pytest.raises(FileNotFoundError):
        read_contact_sheet(out_dir, rows, 2)
    np.testing.assert_array_equal(read_contact_sheet(out_dir, rows, 1), contact_sheet([_sample(0)]))
