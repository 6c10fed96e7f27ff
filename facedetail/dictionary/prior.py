"""The expression dictionary: semantic feature of each render -> its β, and the β_prior lookup.

A render's feature is ``[w_e · emotion ‖ w_a · appearance]`` (128 + 136 numbers). With
``normalize: scale`` (default) each half is first divided by its mean L2 norm over the
dictionary's entries, so that the weights trade halves of equal typical size; ``l2`` makes
every half a unit vector (drops how strong an expression is); ``standard`` centres every
dimension and divides it by its spread over the entries (a per-dimension scale), then divides
each half by the square root of its size so that both halves have unit RMS norm; ``none`` uses
the raw numbers.

β_prior is the β of the nearest entry (``k: 1``, the original release), or, with ``k > 1``, the
mean β of the k nearest entries, uniform or weighted by inverse distance (``weighting:
distance``; a query that coincides with entries takes theirs alone, as scikit-learn's
``KNeighborsRegressor`` does). The weights and the normalisation are chosen on a validation
split of the training renders by :mod:`facedetail.dictionary.selection`.

A dictionary folder is self-contained: the FAISS index, the entries (id, label, β, both
feature halves), the emotion network and ``dictionary.json`` (feature config, scales, and the
face framing: detector, crop and alignment reference), so a photo is queried through exactly
the path the renders went through.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from facedetail.config import Config
from facedetail.dictionary.index import FeatureIndex, IndexConfig
from facedetail.errors import FacedetailError, SourceFileError
from facedetail.features.align import APPEARANCE_DIM, aligned_crop, appearance_features
from facedetail.features.faceset import FaceAligner, FaceFraming
from facedetail.features.landmarks import WILD_PHOTO_DETECTOR, DetectorConfig
from facedetail.features.train import load_network, predict
from facedetail.io.atomic import atomic_write_text
from facedetail.io.decode import LoadConfig, LoadFailure, load_photo
from facedetail.io.tables import write_table

EMOTION_DIM = 128
INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.parquet"
META_FILE = "dictionary.json"
NETWORK_FILE = "emotion_net.pt"


class FeatureConfig(Config):
    """How the two halves of the semantic feature are scaled and weighted."""

    emotion_weight: float = Field(1.0, ge=0.0)
    """w_e: weight of the 128-D emotion feature."""
    appearance_weight: float = Field(1.0, ge=0.0)
    """w_a: weight of the 136-D landmark-geometry feature."""
    normalize: Literal["scale", "l2", "standard", "none"] = "scale"
    """scale: divide each half by its mean norm over the entries; l2: unit-norm halves; standard: per-dimension
    z-score over the entries (each half then of unit RMS norm); none: raw."""
    k: int = Field(1, ge=1)
    """Neighbours whose β make β_prior (1: the nearest entry's β, the original release)."""
    weighting: Literal["uniform", "distance"] = "uniform"
    """How the k neighbours' β are averaged: equally, or by inverse distance."""


@dataclass(frozen=True)
class FeatureMaker:
    """Turns (emotion, appearance) halves into index vectors; the scales are fixed at build time."""

    config: FeatureConfig
    emotion_scale: float = 1.0
    appearance_scale: float = 1.0
    centre: tuple[float, ...] | None = None
    """``standard`` mode: per-dimension mean over the entries (264 numbers, emotion first)."""
    spread: tuple[float, ...] | None = None
    """``standard`` mode: per-dimension standard deviation over the entries (1 where it is 0)."""

    @classmethod
    def fit(cls, config: FeatureConfig, emotion: np.ndarray, appearance: np.ndarray) -> FeatureMaker:
        """Measure each half's mean norm (``scale``) or each dimension's mean and spread (``standard``)."""
        if config.normalize == "standard":
            both = np.hstack([np.asarray(emotion, np.float64).reshape(-1, EMOTION_DIM),
                              np.asarray(appearance, np.float64).reshape(-1, APPEARANCE_DIM)])
            sd = both.std(axis=0)
            # A constant dimension carries nothing: left unscaled rather than divided by zero.
            sd[sd == 0] = 1.0
            return cls(config, centre=tuple(float(v) for v in both.mean(axis=0)),
                       spread=tuple(float(v) for v in sd))
        if config.normalize != "scale":
            return cls(config)
        mean_norm = [float(np.linalg.norm(x, axis=1).mean()) or 1.0 for x in (emotion, appearance)]
        return cls(config, *mean_norm)

    def __call__(self, emotion: np.ndarray, appearance: np.ndarray) -> np.ndarray:
        """(N, 264) float32 features."""
        e = np.asarray(emotion, np.float64).reshape(-1, EMOTION_DIM)
        a = np.asarray(appearance, np.float64).reshape(-1, APPEARANCE_DIM)
        if self.config.normalize == "l2":
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        elif self.config.normalize == "scale":
            e, a = e / self.emotion_scale, a / self.appearance_scale
        elif self.config.normalize == "standard":
            if self.centre is None or self.spread is None:
                raise FacedetailError("standard normalisation needs the entries' centre and spread (FeatureMaker.fit)")
            z = (np.hstack([e, a]) - np.asarray(self.centre)) / np.asarray(self.spread)
            e, a = z[:, :EMOTION_DIM] / np.sqrt(EMOTION_DIM), z[:, EMOTION_DIM:] / np.sqrt(APPEARANCE_DIM)
        return np.hstack([self.config.emotion_weight * e, self.config.appearance_weight * a]).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"config": self.config.model_dump(mode="json"), "emotion_scale": self.emotion_scale,
                               "appearance_scale": self.appearance_scale}
        if self.centre is not None:
            out["centre"], out["spread"] = list(self.centre), list(self.spread or ())
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureMaker:
        centre, spread = data.get("centre"), data.get("spread")
        return cls(FeatureConfig(**data["config"]), float(data["emotion_scale"]), float(data["appearance_scale"]),
                   tuple(map(float, centre)) if centre is not None else None,
                   tuple(map(float, spread)) if spread is not None else None)


def combine_neighbours(beta: np.ndarray, labels: Sequence[str], distances: np.ndarray, rows: np.ndarray,
                       weighting: str) -> tuple[np.ndarray, list[str]]:
    """β_prior and label of each query from its k nearest entries (``rows``/``distances``: (N, k), nearest first).

    β is the (inverse-distance weighted) mean of the neighbours' β; the label is the neighbours' weighted
    vote, ties going to the nearer neighbour's label. With ``distance`` weighting, a query at distance 0
    from some entries takes only those (the weights would be infinite).
    """
    distances = np.asarray(distances, np.float64)
    if weighting == "distance":
        exact = distances <= 0
        with np.errstate(divide="ignore"):
            weights = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), 1.0 / distances)
    elif weighting == "uniform":
        weights = np.ones_like(distances)
    else:
        raise FacedetailError(f"weighting must be uniform or distance, not {weighting!r}")
    weights /= weights.sum(axis=1, keepdims=True)
    prior = np.einsum("nk,nkd->nd", weights, np.asarray(beta, np.float64)[rows]).astype(np.float32)
    voted = []
    for row, w in zip(rows, weights, strict=True):
        score: dict[str, float] = {}
        for entry, weight in zip(row, w, strict=True):
            score[labels[entry]] = score.get(labels[entry], 0.0) + float(weight)
        best = max(score.values())
        # The first label (nearest neighbour first) reaching the best score wins a tie.
        voted.append(next(labels[e] for e in row if score[labels[e]] == best))
    return prior, voted


@dataclass(frozen=True)
class PriorBatch:
    """β_prior of a batch of queries."""

    beta: np.ndarray
    """(N, n_expression) float32: the neighbour's β (k = 1) or the k neighbours' weighted mean β."""
    neighbour_ids: list[str]
    """The nearest entry."""
    labels: list[str]
    """The neighbour's dominant emotion (k = 1) or the k neighbours' weighted vote."""
    distances: np.ndarray
    """(N,) distance to the nearest entry in the index's metric."""


@dataclass(frozen=True)
class Prior:
    """β_prior of one photo, or the reason there is none (``beta`` is None then)."""

    beta: np.ndarray | None
    neighbour_id: str | None = None
    distance: float | None = None
    label: str | None = None
    reason: str | None = None
    decode_warning: str | None = None
    """A decoder warning that left the photo usable (see :attr:`facedetail.io.decode.LoadedPhoto.decode_warning`)."""

    @property
    def ok(self) -> bool:
        return self.beta is not None


class ExpressionDictionary:
    """Renders' semantic features with their β, searchable by a FAISS index."""

    def __init__(self, ids: list[str], labels: list[str], beta: np.ndarray, emotion: np.ndarray,
                 appearance: np.ndarray, maker: FeatureMaker, index: FeatureIndex, framing: FaceFraming | None,
                 network_path: Path | None = None, meta: dict[str, Any] | None = None) -> None:
        self.ids, self.labels, self.beta = ids, labels, np.asarray(beta, np.float32)
        self.emotion, self.appearance = emotion, appearance
        self.maker, self.index, self.framing = maker, index, framing
        self.network_path = network_path
        self.meta = meta or {}
        self._net: Any = None
        self._aligner: FaceAligner | None = None

    @classmethod
    def build(cls, ids: Sequence[str], labels: Sequence[str], beta: np.ndarray, emotion: np.ndarray,
              appearance: np.ndarray, features: FeatureConfig, index: IndexConfig,
              framing: FaceFraming | None = None, network_path: Path | None = None,
              num_gpus: int | None = None) -> ExpressionDictionary:
        """A dictionary over entries given in any order (they are stored sorted by id)."""
        if len(ids) == 0:
            raise FacedetailError("a dictionary needs at least one entry")
        order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
        emotion, appearance = np.asarray(emotion, np.float32)[order], np.asarray(appearance, np.float32)[order]
        maker = FeatureMaker.fit(features, emotion, appearance)
        built = FeatureIndex.build(maker(emotion, appearance), index, num_gpus=num_gpus)
        return cls([ids[i] for i in order], [labels[i] for i in order], np.asarray(beta, np.float32)[order],
                   emotion, appearance, maker, built, framing, network_path)

    def rebuilt(self, features: FeatureConfig, index: IndexConfig) -> ExpressionDictionary:
        """The same entries under another feature or index config (for ablations and exact-search checks)."""
        return ExpressionDictionary.build(self.ids, self.labels, self.beta, self.emotion, self.appearance, features,
                                          index, self.framing, self.network_path)

    def save(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the dictionary into an existing (temporary) folder."""
        self.index.save(directory / INDEX_FILE)
        write_table(directory / ENTRIES_FILE, pa.table({
            "id": self.ids, "label": self.labels, "beta": self.beta.tolist(),
            "emotion": self.emotion.tolist(), "appearance": self.appearance.tolist(),
        }))
        if self.network_path is not None:
            shutil.copyfile(self.network_path, directory / NETWORK_FILE)
        meta = {"features": self.maker.to_json(), "framing": self.framing.to_json() if self.framing else None,
                "entries": len(self.ids), "beta_dim": int(self.beta.shape[1]), **(extra or {})}
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def check_folder(directory: Path) -> None:
        """Raise a one-line :class:`SourceFileError` unless ``directory`` holds a complete dictionary."""
        for name in (META_FILE, ENTRIES_FILE, INDEX_FILE):
            if not (Path(directory) / name).is_file():
                raise SourceFileError(Path(directory) / name, "expression dictionary file not found",
                                      "Run `dvc repro dictionary` (or point at a dictionary stage's output folder)")

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> ExpressionDictionary:
        """A dictionary written by :meth:`save` (e.g. ``data/dictionary``)."""
        cls.check_folder(directory)
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        table = pq.read_table(directory / ENTRIES_FILE).to_pydict()
        framing = FaceFraming.from_json(meta["framing"]) if meta.get("framing") else None
        network = directory / NETWORK_FILE
        return cls(table["id"], table["label"], np.array(table["beta"], np.float32),
                   np.array(table["emotion"], np.float32), np.array(table["appearance"], np.float32),
                   FeatureMaker.from_json(meta["features"]), FeatureIndex.load(directory / INDEX_FILE, device=device),
                   framing, network if network.is_file() else None, meta)

    def prior_features(self, emotion: np.ndarray, appearance: np.ndarray) -> PriorBatch:
        """β_prior of each (emotion, appearance) pair from its k nearest entries (see :class:`FeatureConfig`)."""
        config = self.maker.config
        if config.k > len(self.ids):
            raise FacedetailError(f"features.k={config.k} exceeds the dictionary's {len(self.ids)} entries")
        distances, ids = self.index.search(self.maker(emotion, appearance), k=config.k)
        if config.k == 1:
            rows = ids[:, 0]
            return PriorBatch(self.beta[rows], [self.ids[i] for i in rows], [self.labels[i] for i in rows],
                              distances[:, 0].astype(np.float32))
        beta, labels = combine_neighbours(self.beta, self.labels, distances, ids, config.weighting)
        return PriorBatch(beta, [self.ids[i] for i in ids[:, 0]], labels, distances[:, 0].astype(np.float32))

    def prior(self, images: Sequence[np.ndarray | Path | str], load: LoadConfig | None = None,
              detector: DetectorConfig | None = None) -> list[Prior]:
        """β_prior of each photo (RGB/grey uint8 array or file path), one :class:`Prior` per photo, in order.

        Files go through the project's one decoder (:func:`facedetail.io.decode.load_photo` with ``load``,
        ``wild_proxy``'s defaults unless given): the same formats, size limits, corrupt-data checks and
        conversions. Faces are found on the decoded pixels with ``detector``, by default ``wild_proxy``'s
        (:data:`~facedetail.features.landmarks.WILD_PHOTO_DETECTOR`: the largest face over a score floor, a
        retry at a larger size when none is found), then cropped with the dictionary's framing, as
        ``wild_proxy`` crops the faces it found. A photo that cannot be decoded, has no usable face or fails
        in any other way gets ``beta`` None and a one-line reason; it never costs the other photos their
        results. The found faces are looked up in one batch.
        """
        aligner, _ = self._query_tools(detector or WILD_PHOTO_DETECTOR)
        load = load or LoadConfig()
        results: list[Prior | None] = []
        crops, landmarks, where, warnings = [], [], [], {}
        for i, image in enumerate(images):
            try:
                if isinstance(image, str | Path):
                    loaded = load_photo(image, load)
                    if isinstance(loaded, LoadFailure):
                        results.append(Prior(None, reason=loaded.reason))
                        continue
                    pixels, warnings[i] = loaded.rgb, loaded.decode_warning
                else:
                    pixels = np.asarray(image)
                face = aligner.align(pixels)
            except Exception as err:  # dlib raises RuntimeError on some images: this photo's reason, not the batch's
                results.append(Prior(None, reason=f"face search failed: {type(err).__name__}: {err}"))
                continue
            if isinstance(face, str):
                results.append(Prior(None, reason=face, decode_warning=warnings.get(i)))
                continue
            results.append(None)
            crops.append(face.crop)
            landmarks.append(face.landmarks)
            where.append(i)
        if where:
            batch = self._lookup(aligner.framing, np.stack(crops), np.stack(landmarks))
            for j, i in enumerate(where):
                results[i] = Prior(batch.beta[j], batch.neighbour_ids[j], float(batch.distances[j]), batch.labels[j],
                                   decode_warning=warnings.get(i))
        return [r for r in results if r is not None]

    def prior_for_faces(self, images: Sequence[np.ndarray], landmarks: np.ndarray) -> PriorBatch:
        """β_prior of faces whose 68 landmarks (B, 68, 2) are already known (no second detection).

        The crops go through the same alignment as the renders' (``framing.json``). No detector is
        loaded (dlib's predictor is 100 MB and 1.4 s to load: ``wild_proxy``'s workers have their own).
        """
        framing, _ = self._network()
        landmarks = np.asarray(landmarks, dtype=np.float64)
        if len(images) != len(landmarks):
            raise FacedetailError(f"{len(images)} images but {len(landmarks)} landmark sets")
        if not len(images):
            return PriorBatch(np.zeros((0, self.beta.shape[1]), self.beta.dtype), [], [], np.zeros(0, np.float32))
        crops = np.stack([aligned_crop(img, lm, framing.reference, framing.crop)
                          for img, lm in zip(images, landmarks, strict=True)])
        return self._lookup(framing, crops, landmarks)

    def _lookup(self, framing: FaceFraming, crops: np.ndarray, landmarks: np.ndarray) -> PriorBatch:
        _, net = self._network()
        _, emotion = predict(net, crops)
        return self.prior_features(emotion, appearance_features(landmarks, framing.reference))

    def _network(self) -> tuple[FaceFraming, Any]:
        """The framing and the emotion network (loaded once)."""
        if self.framing is None or self.network_path is None:
            raise FacedetailError("this dictionary has no face framing or emotion network: query it with features")
        if self._net is None:
            self._net, _ = load_network(self.network_path)
        return self.framing, self._net

    def _query_tools(self, detector: DetectorConfig) -> tuple[FaceAligner, Any]:
        """The aligner (finding faces with ``detector``, cropping with the dictionary's framing) and the
        emotion network."""
        framing, net = self._network()
        if self._aligner is None or self._aligner.framing.detector != detector:
            self._aligner = FaceAligner(dataclasses.replace(framing, detector=detector))
        return self._aligner, net
