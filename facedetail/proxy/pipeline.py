"""From wild photos to proxies and UV textures, one shard of photos at a time.

Per shard (run in its own process by :func:`facedetail.io.shards.build_shards`): decode every
photo (bad files become quarantine rows), find the face and its 68 landmarks (or use the
given box), look up β_prior for all faces of the shard in one batch, fit all proxies in one
batch, then unwrap each photo into UV space. Every input gives exactly one row: a fit, or a
reason it could not be used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from facedetail.dictionary.prior import ExpressionDictionary
from facedetail.features.landmarks import DetectorConfig, LandmarkDetector
from facedetail.io.hashing import canonical_json, sha256_bytes
from facedetail.io.shards import ShardTask, write_tar_shard
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import FitConfig, ProxyFitter
from facedetail.proxy.inputs import InputItem, Listing, LoadConfig, LoadedPhoto, LoadFailure, load_photo
from facedetail.proxy.texture import TEXTURE_EXT, TextureConfig, UVTexels, encode_texture, unwrap

OK = "ok"
QUARANTINED = "quarantined"


def to_decoded(points: np.ndarray, decode_scale: float) -> np.ndarray:
    """Original-photo pixels to decoded-image pixels (pixel centres at integers, edges aligned)."""
    return (np.asarray(points, np.float64) + 0.5) * decode_scale - 0.5


def to_original(points: np.ndarray, decode_scale: float) -> np.ndarray:
    """Decoded-image pixels back to original-photo pixels."""
    return (np.asarray(points, np.float64) + 0.5) / decode_scale - 0.5


def photo_to_fit(points: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """(…, 2) original-photo pixels (y down) to a proxies.parquet row's fitting frame (y up)."""
    xy = to_decoded(points, row["decode_scale"]) * row["fit_frame_scale"]
    return np.stack([xy[..., 0], -xy[..., 1]], axis=-1)


def fit_to_photo(points: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """(…, 2) fitting-frame positions of a row back to original-photo pixels."""
    xy = np.stack([points[..., 0], -points[..., 1]], axis=-1) / row["fit_frame_scale"]
    return to_original(xy, row["decode_scale"])


def project_row(vertices: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """(N, 3) model points to fitting-frame (N, 2) with a proxies.parquet row's camera."""
    rot = np.asarray(row["camera_rotation"], np.float64).reshape(3, 3)
    return row["camera_scale"] * np.asarray(vertices, np.float64) @ rot[:2].T + np.asarray(row["camera_translation"])


@dataclass(frozen=True)
class ProxySpec:
    """Everything a worker process needs (picklable)."""

    items: dict[str, InputItem]
    model_path: Path
    dictionary_path: Path
    load: LoadConfig
    detector: DetectorConfig
    fit: FitConfig
    texture: TextureConfig
    params_hash: str


@dataclass
class _Face:
    item: InputItem
    photo: LoadedPhoto
    landmarks: np.ndarray  # (68, 2) in photo (decoded) pixels
    box: tuple[float, float, float, float]
    score: float | None
    faces_found: int


class ProxyShardWorker:
    """Fits and unwraps one shard of photos (one instance per process: it holds the detector,
    the dictionary's emotion network and index, the model and the UV raster)."""

    def __init__(self, spec: ProxySpec) -> None:
        self.spec = spec
        self.model = MorphableModel.load(spec.model_path)
        self.detector = LandmarkDetector(spec.detector)
        self.dictionary = ExpressionDictionary.load(spec.dictionary_path, device="cpu")
        self.fitter = ProxyFitter(self.model, spec.fit)
        self.raster = UVTexels.build(self.model.uv, self.model.triangles, spec.texture.resolution)

    def __call__(self, task: ShardTask, tar_path: Path, progress: Callable[[int], None]) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        faces: list[_Face] = []
        for item_id in task.item_ids:
            item = self.spec.items[item_id]
            photo, face_or_reason = self._face(item)
            if isinstance(face_or_reason, str):
                rows[item_id] = self._row(item, photo, None, status=QUARANTINED, reason=face_or_reason)
                progress(1)
            else:
                faces.append(face_or_reason)
        samples = []
        if faces:
            samples = self._fit_and_unwrap(faces, rows)
            progress(len(faces))
        write_tar_shard(tar_path, samples)
        return [rows[i] for i in task.item_ids]

    # ------------------------------------------------------------------ steps
    def _face(self, item: InputItem) -> tuple[LoadedPhoto | None, _Face | str]:
        try:
            photo = load_photo(item.path, self.spec.load)
        except Exception as err:  # the decoder reports every bad file itself; a bug in it must not lose the shard
            return None, f"decode failed: {type(err).__name__}: {err}"
        if isinstance(photo, LoadFailure):
            return None, photo.reason
        try:
            return photo, self._landmarks(item, photo)
        except Exception as err:  # dlib raises RuntimeError on images it cannot take: report, go on
            return photo, f"landmarks failed: {type(err).__name__}: {err}"

    def _landmarks(self, item: InputItem, photo: LoadedPhoto) -> _Face | str:
        if item.box is not None:
            corners = to_decoded(np.reshape(item.box, (2, 2)), photo.scale).ravel()
            found = self.detector.landmarks_in_box(photo.rgb, tuple(float(v) for v in corners))  # type: ignore[arg-type]
            return _Face(item, photo, found.landmarks, found.box, None, 1)
        detection = self.detector.detect(photo.rgb)
        if detection.face is None:
            return detection.reason or "no face detected"
        f = detection.face
        return _Face(item, photo, f.landmarks, f.box, f.score, f.faces_found)

    def _fit_and_unwrap(self, faces: list[_Face], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        spec = self.spec
        landmarks = np.stack([f.landmarks for f in faces])
        sizes = np.array([(f.photo.rgb.shape[1], f.photo.rgb.shape[0]) for f in faces], np.float64)
        prior = self.dictionary.prior_for_faces([f.photo.rgb for f in faces], landmarks)
        result = self.fitter.fit(landmarks, sizes, prior.beta)
        angles = result.cameras.angles_deg()
        samples = []
        for i, face in enumerate(faces):
            fit_row = {
                "alpha": result.alpha[i].astype(np.float32).tolist(),
                "beta": result.beta[i].astype(np.float32).tolist(),
                "beta_prior_id": prior.neighbour_ids[i], "beta_prior_label": prior.labels[i],
                "beta_prior_distance": float(prior.distances[i]),
                "camera_scale": float(result.cameras.scale[i]),
                "camera_rotation": result.cameras.rotation[i].ravel().tolist(),
                "camera_translation": result.cameras.translation[i].tolist(),
                "decode_scale": float(face.photo.scale),
                "fit_frame_scale": float(spec.fit.fit_size / sizes[i].max()),
                "yaw_deg": float(angles[i, 0]), "pitch_deg": float(angles[i, 1]), "roll_deg": float(angles[i, 2]),
                "residuals_px": result.residuals[i].tolist(),
                "reprojection_px": float(result.reprojection_px[i]),
            }
            status = result.status[i]
            if status != OK:
                rows[face.item.id] = self._row(face.item, face.photo, face, status=QUARANTINED, reason=status,
                                               **fit_row)
                continue
            try:
                vertices = self.model.vertices(result.alpha[i], result.beta[i])
                unwrapped = unwrap(face.photo.rgb, vertices, self.model.vertex_normals(vertices),
                                   result.cameras.select(i), sizes[i].max() / spec.fit.fit_size, self.raster,
                                   spec.texture)
                png = encode_texture(unwrapped, spec.texture)
            except Exception as err:  # one photo's failure must not lose the shard: report it
                rows[face.item.id] = self._row(face.item, face.photo, face, status=QUARANTINED,
                                               reason=f"unwrap failed: {type(err).__name__}: {err}", **fit_row)
                continue
            meta = {"id": face.item.id, "source": face.item.relative, **fit_row}
            samples.append({"__key__": face.item.id, TEXTURE_EXT: png, "json": canonical_json(meta).encode()})
            rows[face.item.id] = self._row(face.item, face.photo, face, status=OK, reason=None,
                                           key=f"{face.item.id}.{TEXTURE_EXT}",
                                           sha256=sha256_bytes(png), bytes=len(png),
                                           texture_coverage=float(unwrapped.mask.mean()), **fit_row)
        return samples

    def _row(self, item: InputItem, photo: LoadedPhoto | None, face: _Face | None, **values: Any) -> dict[str, Any]:
        """One proxies.parquet row; geometry in the original photo's pixels."""
        row: dict[str, Any] = {"id": item.id, "path": item.relative, "label": item.label,
                               "listing_note": item.note, "params_hash": self.spec.params_hash}
        if photo is not None:
            row.update(source_sha256=photo.sha256, width=photo.original_size[0], height=photo.original_size[1],
                       load_notes=list(photo.notes), decode_warning=photo.decode_warning,
                       decode_scale=float(photo.scale))
        if face is not None:
            box = to_original(np.reshape(face.box, (2, 2)), face.photo.scale).ravel()
            row.update(box=np.round(box, 3).tolist(), detection_score=face.score, faces_found=face.faces_found,
                       landmarks=to_original(face.landmarks, face.photo.scale).ravel().round(3).tolist())
        row.update(values)
        return row


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(t)


PROXY_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("label", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("listing_note", pa.string()), ("source_sha256", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("load_notes", _list(pa.string())), ("decode_warning", pa.string()),
    ("box", _list(pa.float64())), ("detection_score", pa.float64()),
    ("faces_found", pa.int32()), ("landmarks", _list(pa.float64())), ("alpha", _list(pa.float32())),
    ("beta", _list(pa.float32())), ("beta_prior_id", pa.string()), ("beta_prior_label", pa.string()),
    ("beta_prior_distance", pa.float64()), ("camera_scale", pa.float64()), ("camera_rotation", _list(pa.float64())),
    ("camera_translation", _list(pa.float64())), ("decode_scale", pa.float64()), ("fit_frame_scale", pa.float64()),
    ("yaw_deg", pa.float64()),
    ("pitch_deg", pa.float64()), ("roll_deg", pa.float64()), ("residuals_px", _list(pa.float64())),
    ("reprojection_px", pa.float64()), ("key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("texture_coverage", pa.float64()), ("shard", pa.string()), ("params_hash", pa.string()),
])
"""``proxies.parquet``: one row per input photo, fitted or not (status/reason say which).

``decode_warning`` holds a decoder warning that left the pixels usable (see facedetail.io.decode);
``listing_note`` what the listing noticed (a name that is not UTF-8, a symlink followed out of the folder).
Geometry is in the original photo's pixels (x right, y down, pixel centres at integers): box
(left, top, right, bottom) and landmarks (68 x/y pairs, flattened). The photo was decoded at
``decode_scale`` (huge photos are decoded smaller) and fitted in the fitting frame (see
facedetail.proxy.fit), ``fit_frame_scale`` times the decoded image, y up: use
:func:`photo_to_fit`, :func:`fit_to_photo` and :func:`project_row` rather than redoing the maths.
"""


def proxy_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (any subset of the columns each) as a PROXY_SCHEMA table, sorted by id."""
    ordered = sorted(rows, key=lambda r: r["id"])
    unknown = {k for r in ordered for k in r} - set(PROXY_SCHEMA.names)
    if unknown:
        raise ValueError(f"proxy rows have columns outside PROXY_SCHEMA: {sorted(unknown)}")
    return pa.Table.from_pylist([{k: r.get(k) for k in PROXY_SCHEMA.names} for r in ordered], schema=PROXY_SCHEMA)


SKIPPED_SCHEMA = pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("reason", pa.string(),
                                                                                    nullable=False)])
"""``skipped.parquet``: every entry of an input folder that the listing did not take (hidden, not an
image by its extension, special file, symlink loop, ...), sorted by path."""
DUPLICATES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False), pa.field("row", pa.int64()),
    pa.field("duplicate_of", pa.string(), nullable=False), pa.field("reason", pa.string(), nullable=False),
])
"""``duplicates.parquet``: every listed file not fitted because another is the same file (a list row with
another spelling of a path) or holds the same bytes; ``duplicate_of`` is the id that was fitted."""


def skipped_table(listing: Listing) -> pa.Table:
    """The listing's skipped entries as a SKIPPED_SCHEMA table."""
    rows = sorted(listing.skipped, key=lambda s: s.path)
    return pa.table({"path": [s.path for s in rows], "reason": [s.reason for s in rows]}, schema=SKIPPED_SCHEMA)


def duplicates_table(listing: Listing) -> pa.Table:
    """The listing's duplicates as a DUPLICATES_SCHEMA table, in listing order (list row, then path)."""
    rows = sorted(listing.duplicates, key=lambda d: (d.row if d.row is not None else 0, d.path))
    return pa.table({"path": [d.path for d in rows], "row": [d.row for d in rows],
                     "duplicate_of": [d.duplicate_of for d in rows], "reason": [d.reason for d in rows]},
                    schema=DUPLICATES_SCHEMA)
