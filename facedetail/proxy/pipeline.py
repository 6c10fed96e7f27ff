"""From wild photos to proxies and UV textures, one shard of photos at a time.

Per shard (run in its own process by :func:`facedetail.io.shards.build_shards`): decode every
photo (bad files become quarantine rows), find the face and its 68 landmarks (or use the
given box), look up β_prior for all faces of the shard in one batch, fit all proxies in one
batch, then unwrap each photo into UV space. Every input gives exactly one row: a fit, or a
reason it could not be used; with ``multiple_faces: all`` a photo gives one row per face instead,
with ids ``<photo id>#1``, ``#2``, ... (largest first; :func:`face_rows` flattens them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from facedetail.dictionary.prior import ExpressionDictionary
from facedetail.features.landmarks import DetectorConfig, LandmarkDetector
from facedetail.io.hashing import canonical_json, sha256_bytes
from facedetail.io.shards import ShardTask, write_tar_shard
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import Cameras, FitConfig, FitResult, ProxyFitter
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


FACE_SEPARATOR = "#"
"""Between a photo's id and its face number with ``multiple_faces: all``; ids never contain it
(:func:`facedetail.proxy.inputs.item_id` keeps only letters, digits and ``-``), so face ids stay unique."""
MORE_FACES = "more_faces"
"""Key under which a shard worker's row carries the photo's further faces (shards hold one row per photo)."""


def photo_to_fit(points: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """(…, 2) original-photo pixels (y down) to a proxies.parquet row's camera frame (y up).

    That frame is the decoded photo's pixels with y negated (``fit_frame_scale`` is 1); the fit itself
    ran in a face-normalised frame (``face_frame_scale``, see facedetail.proxy.fit)."""
    xy = to_decoded(points, row["decode_scale"]) * row["fit_frame_scale"]
    return np.stack([xy[..., 0], -xy[..., 1]], axis=-1)


def fit_to_photo(points: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """(…, 2) camera-frame positions of a row back to original-photo pixels."""
    xy = np.stack([points[..., 0], -points[..., 1]], axis=-1) / row["fit_frame_scale"]
    return to_original(xy, row["decode_scale"])


def project_row(vertices: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """(N, 3) model points to camera-frame (N, 2) positions with a proxies.parquet row's camera."""
    rot = np.asarray(row["camera_rotation"], np.float64).reshape(3, 3)
    return row["camera_scale"] * np.asarray(vertices, np.float64) @ rot[:2].T + np.asarray(row["camera_translation"])


@dataclass(frozen=True)
class ProxySpec:
    """Everything a worker process needs but the photos, which come with each shard's task (picklable)."""

    model_path: Path
    dictionary_path: Path
    load: LoadConfig
    detector: DetectorConfig
    fit: FitConfig
    texture: TextureConfig
    params_hash: str
    refine: Callable[..., Any] | None = None
    """The optional photometric refinement after the landmark fit
    (``refine(model, images, landmarks, fit) -> PhotometricResult``, e.g.
    :class:`facedetail.detail.photometric.PhotometricRefiner`); None: the landmark fit only. Given by the
    stage, so that this package does not import ``detail`` (which imports it)."""


@dataclass
class _Face:
    item: InputItem
    photo: LoadedPhoto
    landmarks: np.ndarray  # (68, 2) in photo (decoded) pixels
    box: tuple[float, float, float, float]
    score: float | None
    faces_found: int
    row_id: str
    too_small: str | None = None


def face_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard rows (one per photo) to proxies.parquet rows (one per face): each photo's further faces
    (``multiple_faces: all``) follow it, with its shard."""
    out = []
    for r in rows:
        more = r.get(MORE_FACES) or []
        out.append({k: v for k, v in r.items() if k != MORE_FACES})
        out.extend({**m, "shard": r.get("shard")} for m in more)
    return out


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
        row_ids: dict[str, list[str]] = {}
        faces: list[_Face] = []
        with_faces = 0
        items: dict[str, InputItem] = task.inputs_by_id()
        for item_id in task.item_ids:
            item = items[item_id]
            photo, found = self._face(item)
            if isinstance(found, str):
                rows[item_id] = self._row(item, photo, None, status=QUARANTINED, reason=found)
                row_ids[item_id] = [item_id]
                progress(1)
                continue
            row_ids[item_id] = [f.row_id for f in found]
            with_faces += 1
            for f in found:
                if f.too_small:
                    rows[f.row_id] = self._row(item, photo, f, status=QUARANTINED, reason=f.too_small)
                else:
                    faces.append(f)
        samples = []
        if faces:
            samples = self._fit_and_unwrap(faces, rows)
        progress(with_faces)
        write_tar_shard(tar_path, samples)
        out = []
        for item_id in task.item_ids:
            first, *more = (rows[r] for r in row_ids[item_id])
            out.append({**first, MORE_FACES: more} if more else first)
        return out

    # ------------------------------------------------------------------ steps
    def _face(self, item: InputItem) -> tuple[LoadedPhoto | None, list[_Face] | str]:
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

    def _landmarks(self, item: InputItem, photo: LoadedPhoto) -> list[_Face] | str:
        if item.box is not None:
            corners = to_decoded(np.reshape(item.box, (2, 2)), photo.scale).ravel()
            found = self.detector.landmarks_in_box(photo.rgb, tuple(float(v) for v in corners))  # type: ignore[arg-type]
            return [_Face(item, photo, found.landmarks, found.box, None, 1, item.id)]
        faces = self.detector.find(photo.rgb)
        if isinstance(faces, str):
            return faces
        every = self.spec.detector.multiple_faces == "all"
        return [_Face(item, photo, f.landmarks, f.box, f.score, f.faces_found,
                      f"{item.id}{FACE_SEPARATOR}{k}" if every else item.id, f.too_small)
                for k, f in enumerate(faces, start=1)]

    def _fit_and_unwrap(self, faces: list[_Face], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        spec = self.spec
        landmarks = np.stack([f.landmarks for f in faces])
        prior = self.dictionary.prior_for_faces([f.photo.rgb for f in faces], landmarks)
        result = self.fitter.fit(landmarks, prior.beta)
        photometric = self._refine(faces, landmarks, result) if spec.refine is not None else None
        if photometric is not None:
            result, refined = photometric
        angles = result.cameras.angles_deg()
        samples = []
        for i, face in enumerate(faces):
            to_original_px = 1.0 / face.photo.scale
            fit_row = {
                "alpha": result.alpha[i].astype(np.float32).tolist(),
                "beta": result.beta[i].astype(np.float32).tolist(),
                "beta_prior_id": prior.neighbour_ids[i], "beta_prior_label": prior.labels[i],
                "beta_prior_distance": float(prior.distances[i]),
                "camera_scale": float(result.cameras.scale[i]),
                "camera_rotation": result.cameras.rotation[i].ravel().tolist(),
                "camera_translation": result.cameras.translation[i].tolist(),
                "decode_scale": float(face.photo.scale),
                "fit_frame_scale": 1.0,
                "face_frame_scale": float(result.face_frame_scale[i]),
                "yaw_deg": float(angles[i, 0]), "pitch_deg": float(angles[i, 1]), "roll_deg": float(angles[i, 2]),
                "residuals_px": (result.residuals[i] * to_original_px).tolist(),
                "reprojection_px": float(result.reprojection_px[i] * to_original_px),
                "nme": float(result.nme[i]),
            }
            if photometric is not None and result.status[i] == OK:
                fit_row.update(photometric_start=float(refined.photometric_start[i]),
                               photometric_end=float(refined.photometric_end[i]),
                               photometric_landmark_px=float(refined.landmark_px[i] * to_original_px))
            status = result.status[i]
            if status != OK:
                rows[face.row_id] = self._row(face.item, face.photo, face, status=QUARANTINED, reason=status,
                                              **fit_row)
                continue
            try:
                vertices = self.model.vertices(result.alpha[i], result.beta[i])
                # The camera maps to the decoded photo's pixels (y up): to_photo is 1.
                unwrapped = unwrap(face.photo.rgb, vertices, self.model.vertex_normals(vertices),
                                   result.cameras.select(i), 1.0, self.raster, spec.texture)
                png = encode_texture(unwrapped, spec.texture)
            except Exception as err:  # one photo's failure must not lose the shard: report it
                rows[face.row_id] = self._row(face.item, face.photo, face, status=QUARANTINED,
                                              reason=f"unwrap failed: {type(err).__name__}: {err}", **fit_row)
                continue
            meta = {"id": face.row_id, "source": face.item.relative, **fit_row}
            samples.append({"__key__": face.row_id, TEXTURE_EXT: png, "json": canonical_json(meta).encode()})
            rows[face.row_id] = self._row(face.item, face.photo, face, status=OK, reason=None,
                                          key=f"{face.row_id}.{TEXTURE_EXT}",
                                          sha256=sha256_bytes(png), bytes=len(png),
                                          texture_coverage=unwrapped.coverage(), **fit_row)
        return samples

    def _refine(self, faces: list[_Face], landmarks: np.ndarray, result: FitResult) -> tuple[FitResult, Any]:
        """The landmark fit with α and the cameras of its usable faces replaced by the photometric refinement's
        (faces the fit already rejected keep their fit and status)."""
        refined = self.spec.refine(self.model, [f.photo.rgb for f in faces], landmarks, result)
        keep = np.array([s == OK for s in result.status])

        def pick(new: np.ndarray, old: np.ndarray) -> np.ndarray:
            return np.where(keep.reshape(-1, *([1] * (old.ndim - 1))), new, old)

        cameras = Cameras(pick(refined.cameras.scale, result.cameras.scale),
                          pick(refined.cameras.rotation, result.cameras.rotation),
                          pick(refined.cameras.translation, result.cameras.translation))
        return replace(result, alpha=pick(refined.alpha, result.alpha), cameras=cameras), refined

    def _row(self, item: InputItem, photo: LoadedPhoto | None, face: _Face | None, **values: Any) -> dict[str, Any]:
        """One proxies.parquet row; geometry in the original photo's pixels."""
        row: dict[str, Any] = {"id": item.id if face is None else face.row_id, "path": item.relative,
                               "label": item.label,
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
    ("reprojection_px", pa.float64()), ("nme", pa.float64()), ("face_frame_scale", pa.float64()),
    # The photometric refinement (null unless enabled): its mean Huber photometric term before and after,
    # and its final landmark error in original-photo px (nme and reprojection_px stay the landmark fit's).
    ("photometric_start", pa.float64()), ("photometric_end", pa.float64()),
    ("photometric_landmark_px", pa.float64()),
    ("fixed_error_px", pa.float64()), ("fixed_nme", pa.float64()), ("eos_fixed_error_px", pa.float64()),
    ("eos_fixed_nme", pa.float64()), ("eos_yaw_deg", pa.float64()), ("eos_pitch_deg", pa.float64()),
    ("eos_roll_deg", pa.float64()), ("key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("texture_coverage", pa.float64()), ("shard", pa.string()), ("params_hash", pa.string()),
])
"""``proxies.parquet``: one row per input photo, fitted or not (status/reason say which).

``decode_warning`` holds a decoder warning that left the pixels usable (see facedetail.io.decode);
``listing_note`` what the listing noticed (a name that is not UTF-8, a symlink followed out of the folder).
Geometry is in the original photo's pixels (x right, y down, pixel centres at integers): box
(left, top, right, bottom) and landmarks (68 x/y pairs, flattened). The photo was decoded at
``decode_scale`` (huge photos are decoded smaller); the camera maps model mm to the decoded photo's
pixels with y up (``fit_frame_scale`` = 1): use :func:`photo_to_fit`, :func:`fit_to_photo` and
:func:`project_row` rather than redoing the maths. The fit ran in a face-normalised frame,
``face_frame_scale`` px per decoded px (facedetail.proxy.fit).

Errors: ``reprojection_px`` / ``residuals_px`` (the fit's mean landmark error, original-photo px)
and ``nme`` (the same over the outer-eye-corner distance, 300-W). The eos-py comparison
(facedetail.proxy.evaluate) adds, for the landmarks with a fixed vertex, ours (``fixed_error_px``,
``fixed_nme``: every fitted row) and eos-py's (``eos_*``: the compared rows; eos's pose too).
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
