"""How good β_prior is: error on held-out renders against baselines, and the astronaut photo's prior.

Baselines are computed in the same run on the same queries, so the numbers compare: the zero β,
a random entry (seeded), each feature half alone (with the dictionary's normalisation, k and
weighting), an oracle (the entry whose β is closest to the truth: the best any
1-nearest-neighbour lookup over these entries could do), and any further named configs the
caller passes (e.g. the release's both-halves 1-NN, or the best combination on validation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from facedetail.dictionary.index import FeatureIndex, IndexConfig, recall_at_1
from facedetail.dictionary.prior import EMOTION_DIM, ExpressionDictionary, FeatureConfig
from facedetail.features.align import APPEARANCE_DIM
from facedetail.features.photos import astronaut_image

NO_HOLDOUT_NOTE = "no held-out renders (render_faces.holdout_fraction is 0): quality not measured"


def prior_quality(dictionary: ExpressionDictionary, features: FeatureConfig, index: IndexConfig, baseline_seed: int,
                  emotion: np.ndarray, appearance: np.ndarray, beta: np.ndarray,
                  labels: Sequence[str], others: Mapping[str, FeatureConfig] | None = None) -> dict[str, Any]:
    """β_prior error (mean |β_prior - β|) and label agreement on held-out renders, against baselines.

    ``features``/``index`` are the configs ``dictionary`` was built with (the halves are rebuilt
    from them with exact search); ``emotion``, ``appearance``, ``beta``, ``labels`` describe the
    held-out queries; ``others`` are further named feature configs measured the same way. With an
    approximate index (kind other than flat) its recall@1 against exact search is reported too.
    No queries: a note instead of numbers.
    """
    if len(beta) == 0:
        return {"note": NO_HOLDOUT_NOTE}
    full = dictionary.prior_features(emotion, appearance)
    predictions = {"dictionary": (full.beta, full.labels)}
    exact_index = index.model_copy(update={"kind": "flat"})
    configs = {name: features.model_copy(update={"emotion_weight": w_e, "appearance_weight": w_a})
               for name, (w_e, w_a) in (("emotion_only", (1.0, 0.0)), ("appearance_only", (0.0, 1.0)))}
    for name, config in {**configs, **(others or {})}.items():
        got = dictionary.rebuilt(config, exact_index).prior_features(emotion, appearance)
        predictions[name] = (got.beta, got.labels)
    rng = np.random.default_rng(baseline_seed)
    pick = rng.integers(0, len(dictionary.ids), len(beta))
    predictions["random_entry"] = (dictionary.beta[pick], [dictionary.labels[i] for i in pick])
    # The best any 1-NN lookup could do: the entry whose β is closest to the truth.
    oracle = FeatureIndex.build(dictionary.beta, IndexConfig(metric="l1")).search(beta, k=1)[1][:, 0]
    predictions["oracle_nearest_beta"] = (dictionary.beta[oracle], [dictionary.labels[i] for i in oracle])
    result: dict[str, Any] = {
        "beta_mae": {"zero_beta": round(float(np.abs(beta).mean()), 4)},
        "label_agreement": {},
    }
    for name, (pred, pred_labels) in predictions.items():
        result["beta_mae"][name] = round(float(np.abs(pred - beta).mean()), 4)
        result["label_agreement"][name] = round(float(np.mean([a == b for a, b in zip(pred_labels, labels,
                                                                                        strict=True)])), 4)
    if index.kind != "flat":
        exact = dictionary.rebuilt(features, exact_index)
        queries = dictionary.maker(emotion, appearance)
        result["recall_at_1_vs_exact"] = round(recall_at_1(dictionary.index.search(queries, 1)[1][:, 0],
                                                           exact.index.search(queries, 1)[1][:, 0]), 4)
    return result


def astronaut_prior(dictionary: ExpressionDictionary) -> dict[str, Any]:
    """β_prior of :func:`~facedetail.features.photos.astronaut_image` (a photo-path smoke check).

    ``{"neighbour_label": None, "reason": ...}`` when the photo has no usable face.
    """
    prior = dictionary.prior([astronaut_image()])[0]
    if not prior.ok:
        return {"neighbour_label": None, "reason": prior.reason}
    return {"neighbour_label": prior.label, "neighbour_id": prior.neighbour_id,
            "distance": round(float(prior.distance), 4), "beta_prior": [round(float(b), 4) for b in prior.beta]}


def dictionary_metrics(dictionary: ExpressionDictionary, holdout_queries: int, index: IndexConfig,
                       quality: dict[str, Any], astronaut: dict[str, Any], params_hash: str) -> dict[str, Any]:
    """The ``dictionary`` stage's metrics: sizes, the index actually used, quality and the astronaut prior.

    ``index`` is the requested config; where it ran and how it searched come from ``dictionary.index``.
    """
    built = dictionary.index
    return {"entries": len(dictionary.ids), "holdout_queries": holdout_queries,
            "feature_dim": EMOTION_DIM + APPEARANCE_DIM,
            "index": {"metric": index.metric, "kind": index.kind, "device": built.device,
                      "device_note": built.device_note, "search_method": built.search_method,
                      "search_note": built.search_note},
            "quality": quality, "astronaut": astronaut, "params_hash": params_hash}
