"""facedetail.dictionary.quality on tiny dictionaries built from hand-made or random features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facedetail.dictionary import quality
from facedetail.dictionary.index import IndexConfig
from facedetail.dictionary.prior import EMOTION_DIM, ExpressionDictionary, FeatureConfig
from facedetail.dictionary.quality import NO_HOLDOUT_NOTE, astronaut_prior, dictionary_metrics, prior_quality
from facedetail.features.align import APPEARANCE_DIM, CropConfig, Reference
from facedetail.features.emotion import FER_CLASSES, build_network
from facedetail.features.faceset import FaceFraming
from facedetail.features.landmarks import DetectorConfig, LandmarkDetector
from facedetail.features.photos import astronaut_image
from facedetail.features.train import save_network

BASELINES = {"dictionary", "emotion_only", "appearance_only", "random_entry", "oracle_nearest_beta"}


def _four_entries() -> tuple[ExpressionDictionary, np.ndarray, np.ndarray]:
    """Four entries with well separated features and β = the corners of the unit square."""
    rng = np.random.default_rng(3)
    emotion = rng.normal(0, 1, (4, EMOTION_DIM)).astype(np.float32)
    appearance = rng.normal(0, 1, (4, APPEARANCE_DIM)).astype(np.float32)
    beta = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    built = ExpressionDictionary.build(["e0", "e1", "e2", "e3"], ["neutral", "happy", "sad", "both"], beta, emotion,
                                       appearance, FeatureConfig(), IndexConfig())
    return built, emotion, appearance


def test_quality_on_hand_made_queries() -> None:
    built, emotion, appearance = _four_entries()
    # Queries look exactly like entries 1 and 2, but their true β are [1, 0] and [1, 1].
    truth = np.array([[1, 0], [1, 1]], np.float32)
    got = prior_quality(built, FeatureConfig(), IndexConfig(), 11, emotion[[1, 2]], appearance[[1, 2]], truth,
                        ["happy", "sad"])
    mae, agree = got["beta_mae"], got["label_agreement"]
    assert set(mae) == BASELINES | {"zero_beta"} and set(agree) == BASELINES
    assert "recall_at_1_vs_exact" not in got, "exact (flat) search has nothing to be compared with"
    assert mae["zero_beta"] == 0.75
    # Every feature-based lookup finds entries 1 and 2: |[1,0]-[1,0]| + |[0,1]-[1,1]| over 4 numbers.
    for name in ("dictionary", "emotion_only", "appearance_only"):
        assert mae[name] == 0.25 and agree[name] == 1.0
    # The oracle finds entries 1 and 3 (β exactly the truth), whose labels are happy and both.
    assert mae["oracle_nearest_beta"] == 0.0 and agree["oracle_nearest_beta"] == 0.5
    # The random baseline is the seed's draw, not the global RNG's.
    pick = np.random.default_rng(11).integers(0, 4, 2)
    assert mae["random_entry"] == round(float(np.abs(built.beta[pick] - truth).mean()), 4)
    np.random.seed(0)
    again = prior_quality(built, FeatureConfig(), IndexConfig(), 11, emotion[[1, 2]], appearance[[1, 2]], truth,
                          ["happy", "sad"])
    assert again == got


def test_quality_on_random_queries_respects_the_oracle() -> None:
    rng = np.random.default_rng(0)
    n, k = 40, 6
    beta = rng.uniform(0, 1, (n, k)).astype(np.float32)
    labels = [FER_CLASSES[i % 7] for i in range(n)]
    built = ExpressionDictionary.build([f"r{i:02d}" for i in range(n)], labels, beta,
                                       rng.normal(0, 1, (n, EMOTION_DIM)), rng.normal(0, 1, (n, APPEARANCE_DIM)),
                                       FeatureConfig(), IndexConfig())
    q = 15
    queries = (rng.normal(0, 1, (q, EMOTION_DIM)), rng.normal(0, 1, (q, APPEARANCE_DIM)),
               rng.uniform(0, 1, (q, k)).astype(np.float32), [FER_CLASSES[i % 7] for i in range(q)])
    got = prior_quality(built, FeatureConfig(), IndexConfig(), 0, *queries)
    mae = got["beta_mae"]
    assert mae["oracle_nearest_beta"] <= min(mae[name] for name in BASELINES)
    assert mae["oracle_nearest_beta"] < mae["random_entry"]
    assert all(0 <= v <= 1 for v in got["label_agreement"].values())
    other_seed = prior_quality(built, FeatureConfig(), IndexConfig(), 1, *queries)
    assert other_seed["beta_mae"]["random_entry"] != mae["random_entry"]
    assert {k: v for k, v in other_seed["beta_mae"].items() if k != "random_entry"} == \
           {k: v for k, v in mae.items() if k != "random_entry"}


def test_quality_of_an_approximate_index_reports_recall() -> None:
    rng = np.random.default_rng(1)
    n = 30
    index = IndexConfig(kind="hnsw", metric="l2")
    built = ExpressionDictionary.build([f"h{i:02d}" for i in range(n)], ["happy"] * n,
                                       rng.uniform(0, 1, (n, 3)).astype(np.float32),
                                       rng.normal(0, 1, (n, EMOTION_DIM)), rng.normal(0, 1, (n, APPEARANCE_DIM)),
                                       FeatureConfig(), index)
    # Queries are the entries themselves: HNSW on 30 points finds every one of them.
    got = prior_quality(built, FeatureConfig(), index, 0, built.emotion, built.appearance, built.beta, built.labels)
    assert got["recall_at_1_vs_exact"] == 1.0
    assert got["beta_mae"]["dictionary"] == 0.0 and got["label_agreement"]["dictionary"] == 1.0


def test_quality_without_held_out_queries_is_a_note() -> None:
    built, emotion, appearance = _four_entries()
    got = prior_quality(built, FeatureConfig(), IndexConfig(), 0, emotion[:0], appearance[:0],
                        np.zeros((0, 2), np.float32), [])
    assert got == {"note": NO_HOLDOUT_NOTE}


def test_dictionary_metrics_assembly() -> None:
    built, _, _ = _four_entries()
    got = dictionary_metrics(built, 2, IndexConfig(), {"beta_mae": {}}, {"neighbour_label": None}, "abc")
    assert got == {
        "entries": 4, "holdout_queries": 2, "feature_dim": 264,
        "index": {"metric": "l1", "kind": "flat", "device": "cpu", "device_note": built.index.device_note,
                  "search_method": built.index.search_method, "search_note": built.index.search_note},
        "quality": {"beta_mae": {}}, "astronaut": {"neighbour_label": None}, "params_hash": "abc",
    }


@pytest.fixture(scope="module")
def photo_dictionary(tmp_path_factory: pytest.TempPathFactory) -> ExpressionDictionary:
    """Four entries queried through the photo path: a random network and the astronaut's own landmarks as
    the alignment reference (any frontal face would do)."""
    found = LandmarkDetector(DetectorConfig()).detect(astronaut_image())
    assert found.face is not None, found.reason
    framing = FaceFraming(DetectorConfig(), CropConfig(), Reference.from_points(found.face.landmarks))
    torch.manual_seed(0)
    net_path = save_network(tmp_path_factory.mktemp("net") / "net.pt",
                            build_network("mini_xception", False, num_classes=len(FER_CLASSES)), "mini_xception", {})
    base, emotion, appearance = _four_entries()
    return ExpressionDictionary.build(base.ids, base.labels, base.beta, emotion, appearance, FeatureConfig(),
                                      IndexConfig(), framing, net_path)


def test_astronaut_prior_is_an_entry(photo_dictionary: ExpressionDictionary) -> None:
    got = astronaut_prior(photo_dictionary)
    assert set(got) == {"neighbour_label", "neighbour_id", "distance", "beta_prior"}
    i = photo_dictionary.ids.index(got["neighbour_id"])
    assert got["neighbour_label"] == photo_dictionary.labels[i]
    assert got["beta_prior"] == photo_dictionary.beta[i].tolist()
    assert got["distance"] > 0 and got["distance"] == round(got["distance"], 4)


def test_astronaut_prior_without_a_face(photo_dictionary: ExpressionDictionary,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "astronaut_image", lambda: np.full((200, 200, 3), 128, np.uint8))
    assert astronaut_prior(photo_dictionary) == {"neighbour_label": None, "reason": "no face detected"}
