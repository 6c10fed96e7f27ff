"""Stage ``dictionary``: the expression dictionary (render feature -> β) and its measured quality.

Every training-split render with a face gets the feature ``[w_e · emotion ‖ w_a · appearance]``
(emotion: the ``emotion_net`` network's 128-D layer on its aligned crop; appearance: its
Procrustes-aligned dlib landmarks) and is stored with its β. With ``selection.enabled`` the
weights, normalisation, k and weighting are chosen on a validation share of the *training*
renders (:mod:`facedetail.dictionary.selection`); ``features`` is used as given otherwise.
Held-out renders, never seen by the emotion network, the selection nor stored here, measure
how well β_prior predicts the true β, against baselines computed in the same run.

Outputs in ``data/dictionary/``: ``index.faiss`` (+ ``index.faiss.json``), ``entries.parquet``,
``dictionary.json``, ``emotion_net.pt`` (a copy, so the folder answers photo queries on its
own), ``selection.parquet`` (every grid point's validation score, when selecting),
``manifest.parquet`` and ``lineage.json``; ``metrics/dictionary.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from facedetail.config import content_key, input_path
from facedetail.dictionary.index import IndexConfig
from facedetail.dictionary.prior import ExpressionDictionary, FeatureConfig
from facedetail.dictionary.quality import astronaut_prior, dictionary_metrics, prior_quality
from facedetail.dictionary.selection import Selection, SelectionConfig, select_features, selection_summary, to_config
from facedetail.errors import FacedetailError
from facedetail.features.align import appearance_features
from facedetail.features.datasets import read_render_crops, render_face_rows
from facedetail.features.faceset import FRAMING_FILE, HOLDOUT, TRAIN, load_framing
from facedetail.features.train import load_network, predict
from facedetail.io.manifest import file_row
from facedetail.io.tables import write_table
from facedetail.io.transaction import StageOutput
from stages._common import Input, Stage, StageParams, main

NAME = "dictionary"


class DictionaryParams(StageParams):
    """Parameters of the ``dictionary`` stage (``dictionary:`` in params.yaml)."""

    render_faces: str = input_path("data/render_faces")
    """Output of ``render_faces`` (crops, landmarks, β, split, framing)."""
    emotion_net: str = input_path("data/emotion_net/model.pt")
    """The trained emotion network."""
    features: FeatureConfig = FeatureConfig()
    """Weights, normalisation, k and weighting of the lookup, used as given when selection is disabled."""
    selection: SelectionConfig = SelectionConfig()
    """The validation split of the training renders and the grid the feature config is chosen from."""
    index: IndexConfig = IndexConfig()
    """FAISS index: metric (l1, the release's; or l2), kind (flat = exact; ivf/hnsw for very large sets)."""
    baseline_seed: int = Field(0, ge=0)
    """Seed of the random-entry baseline."""


def inputs(params: DictionaryParams) -> list[Input]:
    """The render crops (with their framing) and the emotion network."""
    return [Input(f"{params.render_faces}/{FRAMING_FILE}", "render_faces", lineage=False, kind="file"),
            Input(params.render_faces, "render_faces", kind="folder"),
            Input(params.emotion_net, "emotion_net", kind="file")]


def build(params: DictionaryParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Build the dictionary from the training-split renders and measure β_prior on the held-out ones."""
    faces_dir, net_path = root / params.render_faces, root / params.emotion_net
    framing = load_framing(faces_dir)
    net, net_meta = load_network(net_path)
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
    train_ids, train_labels = [ids[i] for i in train], [labels[i] for i in train]
    started = time.perf_counter()
    selection: Selection | None = None
    # The release's lookup (both halves, 1-NN) and the emotion half by 1-NN, measured beside the chosen one.
    features = params.features
    others = {"release_both_halves_1nn": FeatureConfig(), "emotion_only_1nn": FeatureConfig(appearance_weight=0.0)}
    if params.selection.enabled:
        selection = select_features(train_ids, train_labels, beta[train], emotion[train], appearance[train],
                                    params.selection, params.index)
        features = selection.chosen
        # Measured on the held-out renders too, so "do both halves help?" is answered there.
        others["best_combination_on_validation"] = to_config(selection.best(emotion=True, appearance=True))
        write_table(out.dir / "selection.parquet", pa.Table.from_pylist(selection.rows))
    select_s = time.perf_counter() - started
    dictionary = ExpressionDictionary.build(train_ids, train_labels, beta[train], emotion[train], appearance[train],
                                            features, params.index, framing, net_path)
    build_s = time.perf_counter() - started - select_s
    quality = prior_quality(dictionary, features, params.index, params.baseline_seed, emotion[held],
                            appearance[held], beta[held], [labels[i] for i in held], others)
    astronaut = astronaut_prior(dictionary)
    key = content_key(params, {"render_faces": out.input_hash(faces_dir), "emotion_net": out.input_hash(net_path)})
    dictionary.save(out.dir, extra={"emotion_network": net_meta["network"], "params_hash": key})
    out.write_manifest([file_row(out.dir, p.name, params_hash=key) for p in sorted(out.dir.iterdir()) if p.is_file()])
    out.metrics = dictionary_metrics(dictionary, len(held), params.index, quality, astronaut, key)
    out.metrics["features"] = features.model_dump(mode="json")
    if selection is not None:
        out.metrics["selection"] = selection_summary(selection, quality)
    return {"entries": len(train), "holdout_queries": len(held), "build_seconds": round(build_s, 3),
            "selection_seconds": round(select_s, 3),
            "beta_mae": quality.get("beta_mae", {}).get("dictionary"), "astronaut": astronaut.get("neighbour_label")}


STAGE = Stage(NAME, DictionaryParams, build, inputs,
              headline=("entries", "quality.beta_mae.dictionary", "quality.beta_mae.zero_beta"),
              limits="Entries are renders only: a photo's prior is its nearest synthetic face by its features.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
