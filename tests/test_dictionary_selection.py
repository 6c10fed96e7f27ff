"""k-NN β_prior, per-dimension normalisation and the validation-split choice of the feature config."""

from __future__ import annotations

import numpy as np
import pytest

from facedetail.dictionary.index import IndexConfig
from facedetail.dictionary.prior import (
    EMOTION_DIM,
    ExpressionDictionary,
    FeatureConfig,
    FeatureMaker,
    combine_neighbours,
)
from facedetail.dictionary.selection import SelectionConfig, select_features, validation_mask
from facedetail.errors import FacedetailError
from facedetail.features.align import APPEARANCE_DIM


def test_combine_neighbours_uniform_distance_and_exact_matches() -> None:
    beta = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 4.0]], np.float32)
    labels = ["a", "b", "b"]
    rows = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    distances = np.array([[1.0, 1.0, 2.0], [1.0, 3.0, 3.0], [0.0, 0.0, 5.0]])
    uniform, uniform_labels = combine_neighbours(beta, labels, distances, rows, "uniform")
    np.testing.assert_allclose(uniform, np.tile([[1 / 3, 4 / 3]], (3, 1)), rtol=1e-6)
    assert uniform_labels == ["b", "b", "b"]
    weighted, weighted_labels = combine_neighbours(beta, labels, distances, rows, "distance")
    # Row 0: weights 1, 1, 1/2 (sum 2.5); row 1: 1, 1/3, 1/3; row 2: its two exact matches share it alone.
    np.testing.assert_allclose(weighted[0], [1 / 2.5, 0.5 * 4 / 2.5], rtol=1e-6)
    np.testing.assert_allclose(weighted[1], [1 / (5 / 3), (4 / 3) / (5 / 3)], rtol=1e-6)
    np.testing.assert_allclose(weighted[2], [0.0, 2.0], rtol=1e-6)
    # Row 0: b wins 1.5 to 1; row 2: the exact matches tie, a half each, and the nearer one (entry 2, b) wins.
    assert weighted_labels == ["b", "b", "b"]
    _, tie = combine_neighbours(beta, labels, np.array([[1.0, 1.0]]), np.array([[0, 1]]), "uniform")
    assert tie == ["a"], "a tie goes to the nearer neighbour's label"
    with pytest.raises(FacedetailError, match="weighting"):
        combine_neighbours(beta, labels, distances, rows, "gaussian")


def test_standard_normalisation_and_its_round_trip() -> None:
    rng = np.random.default_rng(0)
    emotion = rng.normal(5, 3, (50, EMOTION_DIM))
    appearance = rng.normal(-2, 0.1, (50, APPEARANCE_DIM))
    appearance[:, 0] = 7.0  # a constant dimension is left unscaled, not divided by zero
    maker = FeatureMaker.fit(FeatureConfig(normalize="standard"), emotion, appearance)
    got = maker(emotion, appearance).astype(np.float64)
    e, a = got[:, :EMOTION_DIM] * np.sqrt(EMOTION_DIM), got[:, EMOTION_DIM:] * np.sqrt(APPEARANCE_DIM)
    np.testing.assert_allclose(e.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(e.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(a[:, 1:].std(0), 1, atol=1e-4)
    np.testing.assert_array_equal(a[:, 0], 0)
    again = FeatureMaker.from_json(maker.to_json())
    np.testing.assert_array_equal(again(emotion, appearance), maker(emotion, appearance))
    with pytest.raises(FacedetailError, match="centre and spread"):
        FeatureMaker(FeatureConfig(normalize="standard"))(emotion, appearance)


def _entries(informative: str, n: int = 160, seed: int = 0) -> tuple[list[str], list[str], np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """β in 2-D; one half encodes β (plus small noise), the other is noise of a larger size."""
    rng = np.random.default_rng(seed)
    beta = rng.uniform(0, 1, (n, 2)).astype(np.float32)
    labels = ["up" if b[0] > 0.5 else "down" for b in beta]
    signal = {dim: np.hstack([np.repeat(beta, dim // 2, axis=1), np.zeros((n, dim % 2))])
              + rng.normal(0, 0.02, (n, dim)) for dim in (EMOTION_DIM, APPEARANCE_DIM)}
    noise = {dim: rng.normal(0, 3, (n, dim)) for dim in (EMOTION_DIM, APPEARANCE_DIM)}
    emotion = signal[EMOTION_DIM] if informative == "emotion" else noise[EMOTION_DIM]
    appearance = signal[APPEARANCE_DIM] if informative == "appearance" else noise[APPEARANCE_DIM]
    return [f"x{i:03d}" for i in range(n)], labels, beta, emotion, appearance


SMALL_GRID = SelectionConfig(appearance_weights=[0.0, 0.5, 1.0], normalizations=["scale", "standard"],
                             neighbours=[1, 5], weightings=["uniform", "distance"])


def test_selection_drops_a_noise_half_and_keeps_an_informative_one() -> None:
    chosen = select_features(*_entries("emotion"), SMALL_GRID, IndexConfig()).chosen
    assert chosen.emotion_weight == 1.0 and chosen.appearance_weight == 0.0
    picked = select_features(*_entries("appearance"), SMALL_GRID, IndexConfig())
    assert picked.chosen.emotion_weight == 0.0 and picked.chosen.appearance_weight == 1.0
    # 3 weights + appearance alone, 2 normalisations, k=1 plus k=5 twice.
    assert len(picked.rows) == 4 * 2 * 3
    best = picked.best(emotion=False, appearance=True)
    assert best["beta_mae"] == min(r["beta_mae"] for r in picked.rows)
    assert best["beta_mae"] < picked.best(emotion=True, appearance=False)["beta_mae"]


def test_selection_is_deterministic_and_uses_a_stable_validation_draw() -> None:
    entries = _entries("emotion", seed=3)
    first = select_features(*entries, SMALL_GRID, IndexConfig())
    again = select_features(*entries, SMALL_GRID, IndexConfig())
    assert first.rows == again.rows and first.chosen == again.chosen
    ids = entries[0]
    mask = validation_mask(ids, SMALL_GRID)
    assert first.validation_entries == int(mask.sum()) and first.fit_entries == len(ids) - int(mask.sum())
    assert 0.1 < mask.mean() < 0.3
    # A per-id draw: an entry's side does not depend on which other entries exist.
    np.testing.assert_array_equal(validation_mask(ids[:40], SMALL_GRID), mask[:40])
    other = validation_mask(ids, SMALL_GRID.model_copy(update={"seed": 12}))
    assert (other != mask).any()


def test_selection_needs_both_sides_and_a_usable_k() -> None:
    ids, labels, beta, emotion, appearance = _entries("emotion", n=3)
    with pytest.raises(FacedetailError, match="both must be non-empty"):
        select_features(ids, labels, beta, emotion, appearance, SMALL_GRID, IndexConfig())
    ids, labels, beta, emotion, appearance = _entries("emotion", n=40)
    with pytest.raises(FacedetailError, match="no k"):
        select_features(ids, labels, beta, emotion, appearance,
                        SMALL_GRID.model_copy(update={"neighbours": [100]}), IndexConfig())


def test_knn_prior_of_the_dictionary() -> None:
    ids, labels, beta, emotion, appearance = _entries("emotion", n=30)
    config = FeatureConfig(appearance_weight=0.0, k=5, weighting="distance")
    built = ExpressionDictionary.build(ids, labels, beta, emotion, appearance, config, IndexConfig())
    # An entry queried as itself is at distance 0 and takes its own β alone.
    own = built.prior_features(built.emotion, built.appearance)
    np.testing.assert_array_equal(own.beta, built.beta)
    assert own.neighbour_ids == built.ids and own.labels == built.labels
    # A query between entries gets the weighted mean of its 5 neighbours' β, by the index's own distances.
    query_e, query_a = emotion[:2].mean(0, keepdims=True), appearance[:2].mean(0, keepdims=True)
    got = built.prior_features(query_e, query_a)
    d, rows = built.index.search(built.maker(query_e, query_a), k=5)
    w = 1 / d[0].astype(np.float64)
    np.testing.assert_allclose(got.beta[0], (w[:, None] * built.beta[rows[0]]).sum(0) / w.sum(), rtol=1e-5)
    assert got.neighbour_ids[0] == built.ids[rows[0, 0]] and got.distances[0] == d[0, 0]
    too_many = ExpressionDictionary.build(ids[:3], labels[:3], beta[:3], emotion[:3], appearance[:3], config,
                                          IndexConfig())
    with pytest.raises(FacedetailError, match="exceeds"):
        too_many.prior_features(emotion[:1], appearance[:1])
