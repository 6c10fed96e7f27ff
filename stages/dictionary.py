"""Stage ``dictionary``: the expression dictionary (render feature -> β) and its measured quality.

Every training-split render with a face gets the feature ``[w_e · emotion ‖ w_a · appearance]``
(emotion: the ``emotion_net`` network's 128-D layer on its aligned crop; appearance: its
Procrustes-aligned dlib landmarks) and is stored with its β. Held-out renders, never seen by
the emotion network nor stored here, measure how well β_prior predicts the true β, against
baselines computed in the same run.

Outputs in ``data/dictionary/``: ``index.faiss`` (+ ``index.faiss.json``), ``entries.parquet``,
``dictionary.json``, ``emotion_net.pt`` (a copy, so the folder answers photo queries on its
own), ``manifest.parquet`` and ``lineage.json``; ``metrics/dictionary.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from facedetail.dictionary.index import FeatureIndex, IndexConfig, recall_at_1
from facedetail.dictionary.prior import EMOTION_DIM, ExpressionDictionary, FeatureConfig
from facedetail.errors import FacedetailError
from facedetail.features.align import appearance_features
from facedetail.features.datasets import read_render_crops, render_face_rows
from facedetail.features.faceset import HOLDOUT, TRAIN
from facedetail.features.train import load_network, predict
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.hashing import params_hash
from facedetail.io.lineage import ParentRef
from facedetail.io.manifest import file_row
from stages._common import Stage, StageParams, StageResult, hash_outputs, lineage_run, main, write_json
from stages.emotion_net import astronaut_image, load_framing

NAME = "dictionary"
OUT_DIR = Path("data/dictionary")
METRICS = Path("metrics/dictionary.json")


class DictionaryParams(StageParams):
    """Parameters of the ``dictionary`` stage (``dictionary:`` in params.yaml)."""

    render_faces: str = "data/render_faces"
    """Output of ``render_faces`` (crops, landmarks, β, split, framing)."""
    emotion_net: str = "data/emotion_net/model.pt"
    """The trained emotion network."""
    features: FeatureConfig = FeatureConfig()
    """Weights and normalisation of the two feature halves."""
    index: IndexConfig = IndexConfig()
    """FAISS index: metric (l1, the release's; or l2), kind (flat = exact; ivf/hnsw for very large sets)."""
    baseline_seed: int = Field(0, ge=0)
    """Seed of the random-entry baseline."""


def run(params: DictionaryParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Build ``data/dictionary`` and measure β_prior on the held-out renders."""
    root = Path(root)
    faces_dir = root / params.render_faces
    net_path = root / params.emotion_net
    framing = load_framing(faces_dir)
    net, net_meta = load_network(net_path)
    lineage = lineage_run(NAME, params, [faces_dir, net_path], root, parent=parent)
    try:
        listed = render_face_rows(faces_dir, ["label", "beta", "split", "landmarks"])
        crops = read_render_crops(faces_dir, listed)
        rows = {name: [r[name] for r in listed] for name in ("id", "label", "beta", "split", "landmarks")}
        _, emotion = predict(net, np.stack([crops[i] for i in rows["id"]]))
        landmarks = np.array(rows["landmarks"], np.float64).reshape(-1, 68, 2)
        appearance = appearance_features(landmarks, framing.reference)
        beta = np.array(rows["beta"], np.float32)
        split = np.array(rows["split"], dtype=object)
        train, held = np.flatnonzero(split == TRAIN), np.flatnonzero(split == HOLDOUT)
        if train.size == 0:
            raise FacedetailError("dictionary: no training-split render has a face")
        ids, labels = rows["id"], rows["label"]
        started = time.perf_counter()
        dictionary = ExpressionDictionary.build([ids[i] for i in train], [labels[i] for i in train], beta[train],
                                                emotion[train], appearance[train], params.features, params.index,
                                                framing, net_path)
        build_s = time.perf_counter() - started
        quality = _quality(dictionary, params, emotion[held], appearance[held], beta[held],
                           [labels[i] for i in held])
        astronaut = _astronaut(dictionary)
        out_dir = root / OUT_DIR
        key = params_hash(params.model_dump(mode="json"))
        with atomic_directory(out_dir) as tmp:
            dictionary.save(tmp, extra={"emotion_network": net_meta["network"], "params_hash": key})
            write_manifest(tmp / MANIFEST_NAME, [file_row(tmp, p.name, params_hash=key)
                                                 for p in sorted(tmp.iterdir()) if p.is_file()])
            outputs = hash_outputs(tmp, out_dir, root)
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        metrics = {"entries": len(train), "holdout_queries": len(held), "feature_dim": EMOTION_DIM + 136,
                   "index": {"metric": params.index.metric, "kind": params.index.kind,
                             "device": dictionary.index.device, "device_note": dictionary.index.device_note,
                             "search_method": dictionary.index.search_method,
                             "search_note": dictionary.index.search_note},
                   "quality": quality, "astronaut": astronaut, "params_hash": key}
        write_json(root / METRICS, metrics)
        lineage.complete_hashed(outputs)
    except BaseException as err:
        lineage.fail(err)
        raise
    summary = {"entries": len(train), "holdout_queries": len(held), "build_seconds": round(build_s, 3),
               "beta_mae": quality.get("beta_mae", {}).get("dictionary"), "astronaut": astronaut.get("neighbour_label")}
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


def _quality(dictionary: ExpressionDictionary, params: DictionaryParams, emotion: np.ndarray,
             appearance: np.ndarray, beta: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """β_prior error on held-out renders against baselines and each feature half alone."""
    if len(beta) == 0:
        return {"note": "no held-out renders (render_faces.holdout_fraction is 0): quality not measured"}
    full = dictionary.prior_features(emotion, appearance)
    predictions = {"dictionary": (full.beta, full.labels)}
    exact_index = params.index.model_copy(update={"kind": "flat"})
    for name, (w_e, w_a) in (("emotion_only", (1.0, 0.0)), ("appearance_only", (0.0, 1.0))):
        half = dictionary.rebuilt(params.features.model_copy(update={"emotion_weight": w_e, "appearance_weight": w_a}),
                                  exact_index)
        got = half.prior_features(emotion, appearance)
        predictions[name] = (got.beta, got.labels)
    rng = np.random.default_rng(params.baseline_seed)
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
    if params.index.kind != "flat":
        exact = dictionary.rebuilt(params.features, exact_index)
        queries = dictionary.maker(emotion, appearance)
        result["recall_at_1_vs_exact"] = round(recall_at_1(dictionary.index.search(queries, 1)[1][:, 0],
                                                           exact.index.search(queries, 1)[1][:, 0]), 4)
    return result


def _astronaut(dictionary: ExpressionDictionary) -> dict[str, Any]:
    prior = dictionary.prior([astronaut_image()])[0]
    if not prior.ok:
        return {"neighbour_label": None, "reason": prior.reason}
    return {"neighbour_label": prior.label, "neighbour_id": prior.neighbour_id,
            "distance": round(float(prior.distance), 4), "beta_prior": [round(float(b), 4) for b in prior.beta]}


STAGE = Stage(NAME, DictionaryParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
