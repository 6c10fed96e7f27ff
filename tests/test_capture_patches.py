"""Training patches cut from UV maps: positions, contents, masks and the two face regions."""

from __future__ import annotations

import numpy as np
import pytest

from facedetail.capture.patches import LOWER, UPPER, RegionBox, cut_patches, face_regions, patch_origins
from facedetail.model.uvmap import rasterize_uv


def test_patch_origins_match_a_brute_force_scan() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((100, 90)) < 0.6
    mask[:, :30] = False
    box = RegionBox("all", 3, 97, 0, 90)
    got = patch_origins(mask, box, size=16, stride=8, min_valid=0.5)
    expected = [(r, c) for r in range(3, 97 - 16 + 1, 8) for c in range(0, 90 - 16 + 1, 8)
                if mask[r:r + 16, c:c + 16].mean() >= 0.5]
    assert [tuple(o) for o in got] == expected
    assert 0 < len(expected) < len(range(3, 82, 8)) * len(range(0, 75, 8)), "some windows are dropped, some kept"
    assert len(patch_origins(mask, RegionBox("small", 0, 10, 0, 10), size=16)) == 0


def test_cut_patches_are_the_map_windows() -> None:
    rng = np.random.default_rng(1)
    disp = rng.normal(size=(64, 64)).astype(np.float32)
    normals = rng.normal(size=(64, 64, 3)).astype(np.float32)
    mask = np.ones((64, 64), bool)
    mask[40:, :] = False
    patches = cut_patches({"displacement": disp, "normals": normals}, mask, RegionBox(UPPER, 0, 64, 0, 64),
                          size=16, stride=16, min_valid=1.0)
    assert len(patches) == 2 * 4 + 4 * 0  # rows 0 and 16 are fully valid; row 32 reaches into the masked rows
    assert patches.maps["displacement"].shape == (len(patches), 16, 16)
    assert patches.maps["normals"].shape == (len(patches), 16, 16, 3)
    for k, (r, c) in enumerate(patches.origins):
        np.testing.assert_array_equal(patches.maps["displacement"][k], disp[r:r + 16, c:c + 16])
        np.testing.assert_array_equal(patches.maps["normals"][k], normals[r:r + 16, c:c + 16])
        np.testing.assert_array_equal(patches.mask[k], mask[r:r + 16, c:c + 16])
    with pytest.raises(ValueError, match="map 'bad'"):
        cut_patches({"bad": disp[:10]}, mask, RegionBox(UPPER, 0, 64, 0, 64))


def test_face_regions_split_at_the_nose_tip(sfm_model) -> None:
    R = 1024
    regions = face_regions(sfm_model, R, overlap=128)
    upper, lower = regions[UPPER], regions[LOWER]
    nose_v = float(sfm_model.uv[sfm_model.landmark_vertices[30], 1]) * R
    brow_v = float(sfm_model.uv[sfm_model.landmark_vertices[19], 1]) * R
    chin_v = float(sfm_model.uv[sfm_model.landmark_vertices[8], 1]) * R
    assert upper.row0 < brow_v < nose_v < upper.row1 == round(nose_v) + 128
    assert lower.row0 == round(nose_v) - 128 < nose_v < chin_v < lower.row1
    assert (upper.col0, upper.col1) == (lower.col0, lower.col1) == (0, R)
    # The paper's setting (256² at a stride of 64) on a full chart: both regions give patches.
    mask = rasterize_uv(sfm_model.uv, sfm_model.triangles, R).covered
    counts = {name: len(patch_origins(mask, box, 256, 64, 0.5)) for name, box in regions.items()}
    assert counts[UPPER] > 50 and counts[LOWER] > 50
