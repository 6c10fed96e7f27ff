"""Building the training pairs of :mod:`facedetail.detail.pairs` from capture items and their photos.

The photo is unwrapped onto the item's proxy with the unwrap ``wild_proxy`` uses
(:mod:`facedetail.proxy.texture`): through the photo's known camera (``P`` in ``capture.json``, or a
camera file), or, for a photo without one, through a scaled orthographic camera fitted to its dlib
landmarks with the proxy's shape held fixed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from facedetail.capture.maps import CaptureMaps
from facedetail.capture.scan import CaptureError, CaptureItem, PhotoInfo, load_proxy, proxy_path, read_info
from facedetail.config import Config
from facedetail.detail.pairs import (
    DetailPair,
    PairError,
    encode_pair,
    lighting_estimate,
    proxy_maps,
)
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import Cameras, estimate_cameras
from facedetail.proxy.texture import TextureConfig, Unwrapped, UVTexels, unwrap, unwrap_projective
from facedetail.render.sh import shade


class PairConfig(Config):
    """How a photo becomes a training pair."""

    max_view_angle_deg: float = Field(75.0, gt=0, le=90)
    """Texels whose normal is further than this from the direction to the camera are not visible."""
    depth_tolerance_mm: float = Field(5.0, gt=0)
    """Occlusion test tolerance of the unwrap (as ``wild_proxy.texture``)."""
    zbuffer_cell_mm: float = Field(2.0, gt=0)
    """Z-buffer cell of the unwrap (as ``wild_proxy.texture``)."""
    min_visible_fraction: float = Field(0.2, ge=0, le=1)
    """Quarantine a pair whose photo shows less than this fraction of the displacement's valid texels."""
    displacement_scale_mm: float = Field(2.0, gt=0)
    """Displacement at the 16-bit PNG's extremes (step 2·scale/65535 mm)."""
    png_compression: int = Field(3, ge=0, le=9)
    """zlib level of the PNGs."""

    def texture_config(self, resolution: int) -> TextureConfig:
        """The unwrap's settings at the chart ``resolution``."""
        return TextureConfig(resolution=resolution, max_view_angle_deg=self.max_view_angle_deg,
                             depth_tolerance_mm=self.depth_tolerance_mm, zbuffer_cell_mm=self.zbuffer_cell_mm,
                             png_compression=self.png_compression)


def pair_tasks(item: CaptureItem) -> list[tuple[str, PhotoInfo]]:
    """(pair id, photo) of every photo listed by an item's ``capture.json`` (a bare name becomes a PhotoInfo)."""
    info = read_info(item)
    out = []
    for photo in info.photos:
        entry = PhotoInfo(file=photo) if isinstance(photo, str) else photo
        out.append((f"{item.id}/{Path(entry.file).stem}", entry))
    return out


def photo_projection(item: CaptureItem, photo: PhotoInfo) -> NDArray[np.float64] | None:
    """The photo's (3, 4) camera from ``P`` or its camera file, or None when it has neither."""
    if photo.P is not None:
        P = np.asarray(photo.P, np.float64)
    elif photo.camera_file is not None:
        path = item.folder / photo.camera_file
        try:
            P = np.asarray(json.loads(path.read_text(encoding="utf-8"))["P"], np.float64)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PairError(f"unreadable camera: {photo.camera_file}: {err}") from None
    else:
        return None
    if P.shape != (3, 4) or not np.isfinite(P).all():
        raise PairError(f"bad camera: P must be a finite 3x4 matrix, not shape {P.shape}")
    return P


def landmark_camera(landmarks_px: NDArray[np.floating], model: MorphableModel,
                    vertices: NDArray[np.float64]) -> Cameras:
    """A scaled orthographic camera (fitting frame = photo px with y up) from 68 landmarks, shape fixed."""
    ids = model.landmark_vertices
    ok = (ids >= 0) & np.isfinite(landmarks_px).all(axis=1)
    if ok.sum() < 6:
        raise PairError("no camera: fewer than 6 landmarks to fit the camera to")
    image = np.column_stack([landmarks_px[:, 0], -landmarks_px[:, 1]])
    return estimate_cameras(vertices[ids[ok]][None], image[ok][None])


def shading_error(estimated: NDArray[np.float64], known: NDArray[np.float64], normal_map: NDArray[np.floating],
                  visible: NDArray[np.bool_]) -> float:
    """Mean relative difference of the estimated and the known shading over the visible texels, each
    normalised by its mean (the estimate takes the albedo's overall scale into the light)."""
    n = np.asarray(normal_map, np.float64)[visible][::16]  # a 1/16 sample of the texels measures it as well
    est, true = shade(n, estimated).mean(axis=1), shade(n, known).mean(axis=1)
    est, true = est / max(est.mean(), 1e-12), true / max(true.mean(), 1e-12)
    return round(float(np.mean(np.abs(est - true))), 6)


class PairBuilder:
    """Builds pairs of one chart resolution (one per process: holds the model, the raster and a detector)."""

    def __init__(self, model: MorphableModel, resolution: int, config: PairConfig) -> None:
        self.model = model
        self.resolution = resolution
        self.config = config
        self.texture_config = config.texture_config(resolution)
        self.raster = UVTexels.build(model.uv, model.triangles, resolution)
        self._detector: Any = None

    def landmarks(self, rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
        """68 dlib landmarks of the one face in a photo (a photo without a camera needs them)."""
        from facedetail.features.landmarks import LandmarkDetector

        if self._detector is None:
            self._detector = LandmarkDetector()
        found = self._detector.detect(rgb)
        if not found.ok:
            raise PairError(f"no camera: no face found to fit one ({found.reason})")
        return np.asarray(found.face.landmarks, np.float64)

    def build(self, item: CaptureItem, pair_id: str, photo: PhotoInfo, rgb: NDArray[np.uint8],
              maps: CaptureMaps) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The shard sample and the facts of one pair; raises :class:`PairError` with the reason."""
        if maps.displacement.shape != (self.resolution,) * 2:
            raise PairError(f"mismatched sizes: the ground truth is {maps.displacement.shape[0]}² texels, the chart "
                            f"{self.resolution}² (set capture_gt's and this stage's uv_chart alike)")
        if not np.isfinite(maps.displacement[maps.mask]).all():
            raise PairError("NaN displacement: the ground truth has non-finite values inside its mask")
        dmask = maps.mask.copy()
        if not dmask.any():
            raise PairError("empty mask: the ground truth has no valid texel")
        try:
            info = read_info(item)
            vertices = load_proxy(proxy_path(item, info), self.model, info.proxy_units or info.units)
        except CaptureError as err:
            raise PairError(f"unreadable proxy: {err}") from None
        normals = self.model.vertex_normals(vertices).astype(np.float64)
        P = photo_projection(item, photo)
        camera_kind = "known"
        if P is not None:
            try:
                unwrapped = unwrap_projective(rgb, vertices, normals, P, self.raster, self.texture_config)
            except ValueError as err:
                raise PairError(f"bad camera: {err}") from None
        else:
            camera_kind = "landmarks"
            camera = landmark_camera(self.landmarks(rgb), self.model, vertices)
            unwrapped = unwrap(rgb, vertices, normals, camera, 1.0, self.raster, self.texture_config)
        return self._sample(item, pair_id, photo, unwrapped, maps.displacement, dmask, vertices, normals,
                            camera_kind, P)

    def _sample(self, item: CaptureItem, pair_id: str, photo: PhotoInfo, unwrapped: Unwrapped,
                displacement: NDArray[np.floating], dmask: NDArray[np.bool_], vertices: NDArray[np.float64],
                normals: NDArray[np.float64], camera_kind: str,
                P: NDArray[np.float64] | None) -> tuple[dict[str, bytes], dict[str, Any]]:
        cfg = self.config
        seen = unwrapped.mask & dmask
        visible_fraction = float(seen.sum() / dmask.sum())
        if visible_fraction < cfg.min_visible_fraction:
            raise PairError(f"texture mostly hidden: the photo shows {visible_fraction:.0%} of the ground truth's "
                            f"texels (minimum {cfg.min_visible_fraction:.0%})")
        proxy = np.hstack([vertices, normals]).astype(np.float32)
        _, normal_map = proxy_maps(self.raster, proxy)
        sh = lighting_estimate(unwrapped.texture, unwrapped.mask, normal_map)
        pair = DetailPair(pair_id, pair_id.split("/", 1)[0], unwrapped.texture, unwrapped.mask,
                          np.where(dmask, displacement, 0.0).astype(np.float32), dmask, proxy, sh)
        sample, clipped = encode_pair(pair, cfg.displacement_scale_mm, cfg.png_compression,
                                      photo=photo.file, camera=camera_kind,
                                      P=None if P is None else np.round(P, 9).tolist(), sh_known=photo.sh)
        subject, expression, _ = pair_id.split("/", 2)
        facts = {"visible_fraction": round(visible_fraction, 6), "texture_coverage": float(unwrapped.mask.mean()),
                 "clipped_texels": int(clipped), "camera": camera_kind, "subject": subject,
                 "expression": expression,
                 "lighting_error": None if photo.sh is None else shading_error(sh, np.asarray(photo.sh, np.float64),
                                                                                normal_map, unwrapped.mask)}
        return sample, facts


