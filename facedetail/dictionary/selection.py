"""Choosing the dictionary's feature weights, normalisation and k on a validation split of the renders.

The paper concatenates an emotion feature and an appearance feature; nothing says in what
proportion. :func:`select_features` holds out a seeded hash-drawn share of the *training*
entries (the held-out test renders are never seen here), builds a dictionary of the rest under
every grid point (appearance weight against an emotion weight of 1, plus the appearance half
alone; each normalisation; each k and weighting) and scores the validation entries' β_prior
by mean |β_prior - β|. The lowest error wins (ties: the earlier grid point, so the grid order
says which of equals is preferred). One exact search at the largest k serves every k and
weighting of a grid point.

Caveat the caller should report: the emotion network was trained on the training renders, so
its features of validation entries are in-sample; compare the emotion half's validation score
with its held-out score to see how large that bias is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from facedetail.config import Config
from facedetail.dictionary.index import IndexConfig
from facedetail.dictionary.prior import ExpressionDictionary, FeatureConfig, combine_neighbours
from facedetail.errors import FacedetailError
from facedetail.io.seeds import in_holdout

_SPLIT_STAGE = "dictionary-validation"


class SelectionConfig(Config):
    """The validation split and the grid searched for the dictionary's feature config."""

    enabled: bool = True
    """Choose the feature config on the validation split (false: use ``features`` as given)."""
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of the training entries held out to score the grid (hash-drawn per id, seeded)."""
    seed: int = Field(11, ge=0)
    """Seed of the validation draw."""
    appearance_weights: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0,
                                                                     1.5, 2.0])
    """w_a values tried against w_e = 1 (0: the emotion half alone); the appearance half alone is always tried."""
    normalizations: list[Literal["scale", "l2", "standard", "none"]] = Field(
        default_factory=lambda: ["scale", "l2", "standard", "none"])
    """Normalisations tried."""
    neighbours: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    """k values tried (those above the fitting entries' count are skipped)."""
    weightings: list[Literal["uniform", "distance"]] = Field(default_factory=lambda: ["uniform", "distance"])
    """Weightings tried for k > 1 (k = 1 has only one)."""


@dataclass(frozen=True)
class Selection:
    """The chosen config and every grid point's validation score."""

    chosen: FeatureConfig
    rows: list[dict[str, Any]]
    """One per grid point: normalize, emotion_weight, appearance_weight, k, weighting, beta_mae, label_agreement."""
    fit_entries: int
    validation_entries: int

    def best(self, emotion: bool, appearance: bool) -> dict[str, Any]:
        """The best validation row using the given halves (weight > 0 exactly for the halves asked for)."""
        rows = [r for r in self.rows if (r["emotion_weight"] > 0) == emotion and (r["appearance_weight"] > 0)
                == appearance]
        if not rows:
            raise FacedetailError(f"the grid has no point with emotion={emotion}, appearance={appearance}")
        return rows[_argbest(rows)]


def _argbest(rows: Sequence[dict[str, Any]]) -> int:
    """Index of the lowest β MAE; the first of equals (grid order)."""
    return int(np.argmin([r["beta_mae"] for r in rows]))


def validation_mask(ids: Sequence[str], config: SelectionConfig) -> np.ndarray:
    """(N,) bool: which training entries are validation entries (a per-id hash draw: stable as the set grows)."""
    return np.array([in_holdout(config.seed, _SPLIT_STAGE, i, config.validation_fraction) for i in ids], bool)


def to_config(row: dict[str, Any]) -> FeatureConfig:
    """The :class:`FeatureConfig` of a grid row."""
    return FeatureConfig(emotion_weight=row["emotion_weight"], appearance_weight=row["appearance_weight"],
                         normalize=row["normalize"], k=row["k"], weighting=row["weighting"])


def select_features(ids: Sequence[str], labels: Sequence[str], beta: np.ndarray, emotion: np.ndarray,
                    appearance: np.ndarray, config: SelectionConfig, index: IndexConfig) -> Selection:
    """Score the grid on the validation share of the training entries and return the best config.

    ``index`` gives the metric; the search is always exact (flat) so the scores do not depend on
    an approximate index's recall.
    """
    ids = list(ids)
    held = validation_mask(ids, config)
    fit, val = np.flatnonzero(~held), np.flatnonzero(held)
    if fit.size == 0 or val.size == 0:
        raise FacedetailError(f"validation split of {len(ids)} entries at fraction {config.validation_fraction} "
                              f"leaves {fit.size} to fit and {val.size} to validate: both must be non-empty")
    beta = np.asarray(beta, np.float32)
    emotion, appearance = np.asarray(emotion, np.float32), np.asarray(appearance, np.float32)
    exact = index.model_copy(update={"kind": "flat", "device": "cpu"})
    ks = sorted({k for k in config.neighbours if k <= fit.size})
    if not ks:
        raise FacedetailError(f"no k in {config.neighbours} fits {fit.size} fitting entries")
    weights = [(1.0, w) for w in dict.fromkeys(config.appearance_weights)] + [(0.0, 1.0)]
    truth, truth_labels = beta[val], [labels[i] for i in val]
    rows: list[dict[str, Any]] = []
    for normalize in dict.fromkeys(config.normalizations):
        for w_e, w_a in weights:
            features = FeatureConfig(emotion_weight=w_e, appearance_weight=w_a, normalize=normalize)
            part = ExpressionDictionary.build([ids[i] for i in fit], [labels[i] for i in fit], beta[fit],
                                              emotion[fit], appearance[fit], features, exact)
            distances, found = part.index.search(part.maker(emotion[val], appearance[val]), k=ks[-1])
            for k in ks:
                for weighting in (["uniform"] if k == 1 else dict.fromkeys(config.weightings)):
                    pred, pred_labels = combine_neighbours(part.beta, part.labels, distances[:, :k], found[:, :k],
                                                           weighting)
                    rows.append({"normalize": normalize, "emotion_weight": w_e, "appearance_weight": w_a, "k": k,
                                 "weighting": weighting,
                                 "beta_mae": round(float(np.abs(pred - truth).mean()), 6),
                                 "label_agreement": round(float(np.mean([a == b for a, b in
                                                                         zip(pred_labels, truth_labels,
                                                                             strict=True)])), 6)})
    return Selection(to_config(rows[_argbest(rows)]), rows, int(fit.size), int(val.size))


def _score(row: dict[str, Any]) -> dict[str, Any]:
    return {"features": to_config(row).model_dump(mode="json"), "beta_mae": round(row["beta_mae"], 4),
            "label_agreement": round(row["label_agreement"], 4)}


def selection_summary(selection: Selection, holdout: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics/dictionary.json`` says about the selection: the split, the chosen config and the best of
    each family on validation, and whether the combination beats the emotion half on the held-out renders.

    ``holdout`` is :func:`facedetail.dictionary.quality.prior_quality`'s result, measured with
    ``best_combination_on_validation`` among its named configs.
    """
    chosen = next(r for r in selection.rows if to_config(r) == selection.chosen)
    out: dict[str, Any] = {
        "fit_entries": selection.fit_entries, "validation_entries": selection.validation_entries,
        "grid_points": len(selection.rows),
        "validation": {"chosen": _score(chosen),
                       "best_emotion_only": _score(selection.best(emotion=True, appearance=False)),
                       "best_appearance_only": _score(selection.best(emotion=False, appearance=True)),
                       "best_combination": _score(selection.best(emotion=True, appearance=True))},
    }
    mae = holdout.get("beta_mae", {})
    if "best_combination_on_validation" in mae:
        combined, emotion_only = mae["best_combination_on_validation"], mae["emotion_only"]
        out["holdout_combination_beats_emotion_only"] = bool(combined < emotion_only)
    return out
