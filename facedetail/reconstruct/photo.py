"""One photo in, a detailed 3D face out: the library function behind ``facedetail reconstruct`` and its stage.

The proxy comes from the very code ``wild_proxy`` runs (:class:`facedetail.proxy.pipeline.ProxyShardWorker`:
the checked decoder, face and landmarks, β_prior from the dictionary, the landmark fit, the UV unwrap), one
photo at a time; then the detail network predicts patches of the texture and they are stitched
(:mod:`facedetail.reconstruct.detailnet`), and the displacement is applied to a subdivided proxy
(:mod:`facedetail.reconstruct.mesh`). Every failure is a :class:`Failure` with a one-line reason; nothing
raises for a bad photo.

Files per face in ``OUT/<photo stem>/`` (:meth:`Reconstructor.write`): ``proxy.obj`` + ``proxy.mtl``,
``texture.png`` (the photo unwrapped to the UV chart, hidden texels filled with the mean colour),
``displacement.npy`` (float32 mm, R x R), ``displacement.png`` (+ ``displacement.json``), ``normal.png``,
``detailed.obj`` + ``detailed.mtl``, ``detailed.glb``, ``preview.png``, ``view.html`` (optional) and
``face.json`` (the fit, the counts, the files). The bytes depend only on the photo, the models and the config.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field

from facedetail.config import Config
from facedetail.detail.pairs import npy_bytes, proxy_maps
from facedetail.detail.shading import normals_from_positions
from facedetail.detail.train import resolve_device as train_device
from facedetail.features.landmarks import SEVERAL_FACES, DetectorConfig, LandmarkDetector
from facedetail.io.atomic import atomic_directory
from facedetail.io.hashing import sha256_bytes
from facedetail.io.images import decode_png, encode_png
from facedetail.io.shards import ShardTask, iter_tar_shard
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import FitConfig
from facedetail.proxy.inputs import (
    InputItem,
    LoadConfig,
    LoadedPhoto,
    LoadFailure,
    display_name,
    item_id,
    load_photo,
)
from facedetail.proxy.pipeline import OK, ProxyShardWorker, ProxySpec, to_decoded, to_original
from facedetail.proxy.texture import TEXTURE_EXT, TextureConfig, UVTexels
from facedetail.reconstruct.detailnet import DetailMaps, DetailNet, StitchConfig
from facedetail.reconstruct.mesh import (
    DisplacementPNG,
    MeshBuilder,
    chart_mask,
    fill_texture,
    glb_bytes,
    normal_map_png,
    obj_files,
    texture_png,
    textured_mesh,
)
from facedetail.reconstruct.preview import PreviewRenderer, diverging, face_crop, preview_panel
from facedetail.reconstruct.viewer import viewer_html
from facedetail.render.detailed import DetailedSurface

STEPS = ("proxy", "network", "stitch", "mesh", "files")
"""Timed steps of one face (``proxy``: decode, landmarks, β_prior, fit and unwrap, as in ``wild_proxy``)."""


class ReconstructConfig(Config):
    """Everything that shapes a reconstruction besides the model files."""

    load: LoadConfig = LoadConfig()
    """Decoding (as ``wild_proxy.load``)."""
    detector: DetectorConfig = DetectorConfig(multiple_faces="reject")
    """Face detection and landmarks (as ``wild_proxy.detector``); several faces are an error unless ``all_faces``."""
    fit: FitConfig = FitConfig()
    """The landmark fit (as ``wild_proxy.fit``)."""
    texture: TextureConfig = TextureConfig()
    """The UV unwrap (as ``wild_proxy.texture``); its resolution is always the detail network's chart."""
    stitch: StitchConfig = StitchConfig()
    """Patches and their Gaussian blend."""
    subdivision_levels: int = Field(3, ge=0, le=5)
    """Midpoint subdivisions of the proxy for ``detailed.obj``: each quadruples the triangles (Surrey model:
    3: 216,192 vertices, 2: 54,208, 1: 13,632)."""
    all_faces: bool = False
    """Reconstruct every face of a photo (``<stem>-face1``, ... largest first) instead of refusing several."""
    preview_size: int = Field(320, ge=64)
    """Side of each preview tile in pixels."""
    preview_range_mm: float = Field(0.5, gt=0)
    """Displacement at full colour in the preview."""
    viewer: bool = True
    """Write ``view.html`` (the mesh embedded: 12.5 MB measured at 3 subdivisions)."""


@dataclass
class Failure:
    """A photo (or one of its faces) that gave no reconstruction."""

    photo: Path
    reason: str


@dataclass
class FaceResult:
    """A reconstructed face, in memory."""

    photo: Path
    name: str
    """Output folder name."""
    row: dict[str, Any]
    """The proxy's ``proxies.parquet``-style row (fit, camera, landmarks in original pixels)."""
    rgb: NDArray[np.uint8]
    """The decoded photo."""
    decode_scale: float
    texture: NDArray[np.uint8]
    """(R, R, 3) the photo unwrapped to the chart."""
    visible: NDArray[np.bool_]
    proxy_vertices: NDArray[np.float64]
    maps: DetailMaps
    seconds: dict[str, float] = field(default_factory=dict)


def resolve_device(name: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """:func:`facedetail.detail.train.resolve_device`, but ``cuda`` without a GPU is an error here at once, not a
    failure in the first forward pass."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    return train_device(name)


class Reconstructor:
    """The models loaded once (detector, dictionary, morphable model, detail network), for any number of photos."""

    def __init__(self, model_path: Path, dictionary_path: Path, net_path: Path,
                 config: ReconstructConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config = config or ReconstructConfig()
        self.net = DetailNet.load(net_path, device)
        texture = config.texture.model_copy(update={"resolution": self.net.resolution})
        self.spec = ProxySpec(Path(model_path), Path(dictionary_path), config.load, config.detector, config.fit,
                              texture, params_hash="reconstruct")
        self.worker = ProxyShardWorker(self.spec)
        self.model: MorphableModel = self.worker.model
        self.texels = UVTexels.build(self.model.uv, self.model.triangles, self.net.resolution)
        self.chart = chart_mask(self.texels)
        self.meshes = MeshBuilder(self.model, config.subdivision_levels)
        self.png = DisplacementPNG.for_range(float(self.net.meta["network"]["max_displacement_mm"]))
        self._preview: PreviewRenderer | None = None
        self._detector: LandmarkDetector | None = None

    # ------------------------------------------------------------------ steps
    def reconstruct(self, photo: Path, name: str | None = None) -> list[FaceResult | Failure]:
        """Every face of ``photo`` that the config asks for (one, or all with ``all_faces``), or the failures."""
        photo = Path(photo)
        name = name or photo.stem
        started = time.perf_counter()
        first = self._proxy(photo, InputItem(item_id(name), photo.resolve(), name))
        if isinstance(first, Failure) and first.reason.startswith(SEVERAL_FACES) and self.config.all_faces:
            return self._all_faces(photo, name)
        if isinstance(first, Failure):
            return [first]
        first.seconds["proxy"] = time.perf_counter() - started
        return [self.detail(first, name)]

    def _all_faces(self, photo: Path, name: str) -> list[FaceResult | Failure]:
        loaded = load_photo(photo, self.config.load)
        if isinstance(loaded, LoadFailure):
            return [Failure(photo, loaded.reason)]
        if self._detector is None:
            self._detector = LandmarkDetector(self.config.detector)
        out: list[FaceResult | Failure] = []
        for k, face in enumerate(self._detector.detect_all(loaded.rgb), start=1):
            started = time.perf_counter()
            box = tuple(float(v) for v in to_original(np.reshape(face.box, (2, 2)), loaded.scale).ravel())
            face_name = f"{name}-face{k}"
            got = self._proxy(photo, InputItem(item_id(face_name), photo.resolve(), face_name, box=box))  # type: ignore[arg-type]
            if isinstance(got, Failure):
                out.append(Failure(photo, f"face {k}: {got.reason}"))
                continue
            got.seconds["proxy"] = time.perf_counter() - started
            out.append(self.detail(got, face_name))
        return out or [Failure(photo, "no face detected")]

    def _proxy(self, photo: Path, item: InputItem) -> _Proxy | Failure:
        """The ``wild_proxy`` worker on this one photo: its row and its texture sample."""
        with tempfile.TemporaryDirectory(prefix="facedetail-reconstruct-") as tmp:
            tar = Path(tmp) / "one.tar"
            rows = self.worker(ShardTask("one", (item.id,), (item,)), tar, lambda n: None)
            samples = list(iter_tar_shard(tar)) if tar.exists() else []
        row = rows[0]
        if row["status"] != OK or not samples:
            return Failure(photo, str(row.get("reason") or "no proxy"))
        loaded = load_photo(photo, self.config.load)
        if isinstance(loaded, LoadFailure):  # decoded a moment ago by the worker: only a changed file gets here
            return Failure(photo, loaded.reason)
        rgba = decode_png(samples[0][TEXTURE_EXT], alpha=True)
        vertices = self.model.vertices(np.asarray(row["alpha"]), np.asarray(row["beta"])).astype(np.float64)
        return _Proxy(photo, row, loaded, np.ascontiguousarray(rgba[..., :3]), rgba[..., 3] > 127, vertices)

    def detail(self, proxy: _Proxy, name: str) -> FaceResult:
        """Network, stitching: the displacement of a fitted proxy."""
        maps = self.net.predict(proxy.texture, proxy.visible, self.config.stitch)
        result = FaceResult(proxy.photo_path, name, proxy.row, proxy.photo.rgb, proxy.photo.scale,
                            proxy.texture, proxy.visible, proxy.vertices, maps, dict(proxy.seconds))
        result.seconds.update(network=maps.seconds["network"], stitch=maps.seconds["stitch"])
        return result

    def detailed_surface(self, result: FaceResult, displacement: NDArray[np.floating] | None = None) -> DetailedSurface:
        """The proxy subdivided and displaced by ``displacement`` (default: the network's; ``None`` maps: 0)."""
        d = result.maps.displacement if displacement is None else displacement
        return self.meshes.detailed(result.proxy_vertices, d, result.maps.covered & self.chart)

    # ------------------------------------------------------------------ files
    def write(self, result: FaceResult, out_dir: Path) -> list[str]:
        """Write every file of one face into ``out_dir/<name>/`` atomically; returns the file names."""
        cfg = self.config
        started = time.perf_counter()
        detailed = self.detailed_surface(result)
        proxy_surface = self.meshes.detailed(result.proxy_vertices, None, None)
        mesh_s = time.perf_counter() - started
        started = time.perf_counter()
        files: dict[str, bytes] = {}
        texture = fill_texture(result.texture, result.visible)
        normals = self.model.vertex_normals(result.proxy_vertices.astype(np.float32)).astype(np.float64)
        files.update(texture_png(texture))
        files.update(obj_files(textured_mesh(result.proxy_vertices, self.model.triangles, self.model.uv, texture,
                                             normals), "proxy"))
        detailed_mesh = textured_mesh(detailed.vertices, detailed.faces, detailed.uv, texture, detailed.normals)
        files.update(obj_files(detailed_mesh, "detailed"))
        files["detailed.glb"] = glb_bytes(detailed_mesh)
        d = result.maps.displacement
        valid = result.maps.covered & self.chart
        files["displacement.npy"] = npy_bytes(np.where(valid, d, 0.0).astype(np.float32))
        files["displacement.png"] = self.png.encode(np.where(valid, d, 0.0))
        sidecar = {**self.png.meta(), "resolution": int(d.shape[0]),
                   "uv": "texel (row, col) centre at ((col + 0.5) / R, (row + 0.5) / R)"}
        files["displacement.json"] = (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode()
        normal_map, normal_ok = self.normal_map(result)
        files["normal.png"] = normal_map_png(normal_map, normal_ok)
        files["preview.png"] = encode_png(self.preview(result, proxy_surface, detailed), 3)
        if cfg.viewer:
            files["view.html"] = viewer_html(detailed.vertices, detailed.faces, detailed.normals, detailed.uv,
                                             texture, result.name).encode("utf-8")
        files["face.json"] = (json.dumps(self.summary(result, detailed, sorted([*files, "face.json"])), indent=1,
                                         sort_keys=True) + "\n").encode()
        with atomic_directory(out_dir / result.name) as tmp:
            for fname, data in sorted(files.items()):
                (tmp / fname).write_bytes(data)
        result.seconds.update(mesh=mesh_s, files=time.perf_counter() - started)
        return sorted(files)

    def normal_map(self, result: FaceResult) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        """(R, R, 3) model-frame normals of the detailed surface per texel, and where they are defined."""
        proxy = np.hstack([result.proxy_vertices, self.model.vertex_normals(
            result.proxy_vertices.astype(np.float32)).astype(np.float64)])
        positions, normals = proxy_maps(self.texels, proxy)
        valid = result.maps.covered & self.chart
        return detail_normals(positions, normals, result.maps.displacement, valid)

    def preview(self, result: FaceResult, proxy: DetailedSurface, detailed: DetailedSurface) -> NDArray[np.uint8]:
        """photo | proxy shaded | detailed shaded | displacement."""
        if self._preview is None:
            self._preview = PreviewRenderer(self.model, self.config.preview_size)
        landmarks = to_decoded(np.reshape(result.row["landmarks"], (-1, 2)), result.decode_scale)
        crop = face_crop(result.rgb, landmarks, self.config.preview_size)
        valid = result.maps.covered & self.chart
        return preview_panel(crop, self._preview.shaded(proxy), self._preview.shaded(detailed),
                             diverging(result.maps.displacement, valid, self.config.preview_range_mm),
                             self.config.preview_range_mm)

    def summary(self, result: FaceResult, detailed: DetailedSurface, files: list[str]) -> dict[str, Any]:
        """``face.json``: what was fitted and written (no timings: the file is the same on every run)."""
        row = result.row
        valid = result.maps.covered & self.chart
        d = result.maps.displacement[valid]
        keep = ("alpha", "beta", "beta_prior_id", "beta_prior_label", "camera_scale", "camera_rotation",
                "camera_translation", "yaw_deg", "pitch_deg", "roll_deg", "reprojection_px", "box", "landmarks",
                "detection_score", "width", "height", "source_sha256")
        return {"photo": display_name(result.photo.name), "name": display_name(result.name),
                "fit": {k: row.get(k) for k in keep},
                "chart_resolution": self.net.resolution, "patches": result.maps.patches,
                "texture_visible": round(float(result.visible.mean()), 6),
                "displacement_mm": {"mean_abs": round(float(np.abs(d).mean()), 6) if d.size else None,
                                    "max_abs": round(float(np.abs(d).max()), 6) if d.size else None},
                "detailed_vertices": len(detailed.vertices), "detailed_faces": len(detailed.faces),
                "subdivision": f"{self.config.subdivision_levels} midpoint subdivisions, UVs and normals linear",
                "detail_net": {k: self.net.meta.get(k) for k in ("params_hash", "profile")},
                "files": files}

    def close(self) -> None:
        """Release the preview's GL context."""
        if self._preview is not None:
            self._preview.close()
            self._preview = None


@dataclass
class _Proxy:
    photo_path: Path
    row: dict[str, Any]
    photo: LoadedPhoto
    texture: NDArray[np.uint8]
    visible: NDArray[np.bool_]
    vertices: NDArray[np.float64]
    seconds: dict[str, float] = field(default_factory=dict)


def detail_normals(positions: NDArray[np.floating], normals: NDArray[np.floating], displacement: NDArray[np.floating],
                   valid: NDArray[np.bool_]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Unit normals of ``P + d·N`` over the chart (finite differences, as the re-rendering loss computes them)."""
    p = torch.from_numpy(np.asarray(positions, np.float64)).permute(2, 0, 1)[None]
    n = torch.from_numpy(np.asarray(normals, np.float64)).permute(2, 0, 1)[None]
    length = torch.linalg.vector_norm(n, dim=1, keepdim=True)
    n = torch.where(length > 0.5, n / length.clamp_min(1e-12), 0.0)
    d = torch.from_numpy(np.asarray(displacement, np.float64))[None, None]
    ok = torch.from_numpy(np.asarray(valid, bool))[None, None]
    out, good = normals_from_positions(p + d * n, ok, reference_normals=n)
    return out[0].permute(1, 2, 0).numpy(), good[0, 0].numpy().astype(bool)


def output_names(photos: list[Path]) -> list[str]:
    """A distinct folder name per photo: its stem, or ``stem-<hash of the path>`` where stems repeat."""
    stems = [p.stem for p in photos]
    return [s if stems.count(s) == 1 else f"{s}-{sha256_bytes(str(p).encode('utf-8', 'surrogateescape'))[:8]}"
            for s, p in zip(stems, photos, strict=True)]
