"""Writing a synthetic capture set in the capture input layout (see :mod:`facedetail.capture.scan`).

Each item ``<subject>/<expression>/`` gets ``capture.json``, the proxy (``proxy.json`` with α
and β, or ``proxy.ply``), the scan (``scan.ply`` or ``scan.obj``, in the declared units), the
analytic ground truth ``displacement_gt.npy`` (float32 mm at the texel centres of the model's
UV raster, NaN outside the chart), ``details.json`` (everything that was drawn) and ``photos``
photos ``photo-<k>.png``.

The photos (:class:`PhotoConfig`) show the clean detailed surface, the proxy subdivided and displaced
by the item's details (:mod:`facedetail.render.detailed`; no scan noise, holes or misalignment), in
the proxy's frame, under a small random head pose, a directional light plus ambient and a solid or
gradient background, with the subject's albedo. ``capture.json`` lists each as a
:class:`~facedetail.capture.scan.PhotoInfo`: ``P`` maps the proxy's model frame (mm) to the photo's
pixels (centres at integers), ``sh`` is the (9, 3) SH lighting in the *model* frame (it shades the
model-frame normals of the UV chart: ``photo ≈ albedo ⊙ max(0, Y(n) sh)`` in 8-bit value / 255),
``sh_camera`` the same light for camera-frame normals, plus the pose and camera (``K``, ``R``, ``t``).

Randomness: a subject's identity α and wrinkle layout come from the seed of
``(seed, stage, subject)``, so they are the same in all its expressions; its albedo from
``(seed, stage, subject/albedo)`` (one skin per person, in every expression and photo); the scan's
noise, holes and misalignment from the seed of ``(seed, stage, subject/expression)``; photo ``k``'s
pose, light and background from ``(seed, stage, subject/expression/photo-k)``.

With ``bad_examples`` the set also holds one broken item per kind of bad input the extraction
must quarantine (folders ``bad-<kind>/neutral``), made from the first subject's neutral proxy.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import trimesh
from numpy.typing import NDArray
from pydantic import Field, field_validator

from facedetail.capture.scan import CAPTURE_FILE, PhotoInfo
from facedetail.capture.synthetic import (
    NEUTRAL,
    DetailConfig,
    ScanConfig,
    amplitude_summary,
    detail_parts,
    details_json,
    draw_mismatch,
    expression_beta,
    expression_details,
    family_strengths,
    ground_truth_map,
    subject_layout,
    synthesize_scan,
)
from facedetail.config import Config
from facedetail.io.atomic import atomic_write_bytes, atomic_write_text
from facedetail.io.images import encode_png
from facedetail.io.seeds import derive_seed, item_rng, truncated_normal
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVRaster, mm_per_uv, rasterize_uv
from facedetail.render.camera import Camera, head_pose
from facedetail.render.detailed import (
    DetailedRender,
    DetailedSurface,
    displace,
    render_surface,
    sh_in_model_frame,
    subdivide_proxy,
    subdivided_cavity,
)
from facedetail.render.faces import MouthCavity, background, composite
from facedetail.render.offscreen import MeshRenderer
from facedetail.render.sampling import (
    BackgroundSampling,
    CameraSampling,
    LightSampling,
    PoseSampling,
    RenderSample,
    SamplingConfig,
    sample_render,
)

GROUND_TRUTH = "displacement_gt.npy"
DETAILS = "details.json"
BAD_KINDS = ("missing-scan", "unreadable-mesh", "empty-mesh", "non-manifold", "wrong-units", "nan-vertices",
             "wrong-topology", "misaligned")
# Broken examples need no fine detail: a coarse scan keeps them small.
_BAD_EDGE_MM = 2.0


class PhotoConfig(Config):
    """The photos of each synthetic item: the clean detailed surface under a random pose, light and background."""

    size: int = Field(512, ge=64, le=4096)
    """Side of the square photos in pixels."""
    pose: PoseSampling = PoseSampling(yaw_deg=15.0, pitch_deg=10.0, roll_deg=5.0, translate_px=8.0)
    """Head pose, uniform in ± these angles (a capture rig's cameras see the face from near the front)."""
    camera: CameraSampling = CameraSampling(projection="perspective", fov_deg=12.0, distance_mm=(1100.0, 1200.0))
    """Lens and distance: at 12° and 1.1-1.2 m the face (~19 cm chin to forehead) fills 75-80 % of the height."""
    light: LightSampling = LightSampling()
    """One directional light within a cone around the camera axis plus ambient, as the expression set draws it."""
    background: BackgroundSampling = BackgroundSampling(kinds=("solid", "gradient"))
    """A flat colour or a linear gradient behind the face."""
    albedo_bound: float = Field(1.5, ge=0)
    """The subject's albedo coefficients: N(0, 1) truncated to ±this (0 = the model's mean albedo)."""
    edge_mm: float | None = Field(None, gt=0)
    """Longest edge of the rendered surface; None: the scan's ``edge_mm``, whose subdivision is then shared
    (one subdivision per item). At 512² a pixel is ~0.45 mm on the face, so 0.7 mm edges are ~1.5 px."""
    png_compression: int = Field(3, ge=0, le=9)
    """zlib level of the PNG files (3: a third of level 9's time for ~5 % more bytes)."""

    def sampling(self) -> SamplingConfig:
        """The per-photo draw as :func:`facedetail.render.sampling.sample_render` makes it: its pose, distance,
        light and background are used; identity and expression are the item's, and albedo the subject's."""
        return SamplingConfig(albedo_bound=0.0, pose=self.pose, camera=self.camera, light=self.light,
                              background=self.background)


class SyntheticSetConfig(Config):
    """The synthetic capture set: subjects x expressions of procedural scans with known displacement."""

    seed: int = 2019
    """Global seed; each subject's and scan's seed is derived from it and its id."""
    expressions: tuple[str, ...] = ("neutral", "happiness", "surprise")
    """Expressions per subject: ``neutral`` or the model's blendshape names (the paper captured three)."""
    expression_weight: float = Field(1.0, gt=0, le=3)
    """Blendshape weight of each non-neutral expression (1 = the full captured expression)."""
    identity_bound: float = Field(2.0, ge=0)
    """Identity α ~ N(0, 1) truncated to ±bound per component (0 = the mean face)."""
    resolution: int = Field(1024, ge=16, le=8192)
    """Side of the ground-truth maps; ``capture_gt`` compares only maps of its own resolution. The
    ``capture_synth`` stage passes the shared ``uv_chart`` resolution to the writer instead."""
    details: DetailConfig = DetailConfig()
    """The procedural details."""
    scan: ScanConfig = ScanConfig()
    """Scan sampling, noise, holes, misalignment."""
    scan_format: Literal["ply", "obj"] = "ply"
    """File format of the scans (binary PLY is ~3x smaller than OBJ text)."""
    units: Literal["mm", "m"] = "mm"
    """Units the scans are written (and declared) in."""
    proxy_format: Literal["coefficients", "mesh"] = "coefficients"
    """The proxy as model coefficients (``proxy.json``) or as a mesh in the model's topology (``proxy.ply``)."""
    photos: int = Field(2, ge=0, le=64)
    """Photos per item (``photo-<k>.png``), each under its own pose, light and background."""
    photo: PhotoConfig = PhotoConfig()
    """How the photos are taken."""

    @field_validator("expressions")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("expressions must be a non-empty list of distinct names")
        return value


@dataclass(frozen=True)
class SynthTask:
    """One item to write: a subject and expression, or a broken example."""

    subject: str
    expression: str
    bad: str | None = None

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.expression}"


def subject_name(index: int) -> str:
    """Folder name of subject ``index``."""
    return f"s{index:03d}"


def synth_tasks(subjects: int, expressions: tuple[str, ...] | list[str], bad_examples: bool) -> list[SynthTask]:
    """Every item of a set, sorted by id."""
    tasks = [SynthTask(subject_name(s), e) for s in range(subjects) for e in expressions]
    if bad_examples:
        tasks += [SynthTask(f"bad-{kind}", NEUTRAL, kind) for kind in BAD_KINDS]
    return sorted(tasks, key=lambda t: t.id)


def _mesh_bytes(mesh: trimesh.Trimesh, fmt: str) -> bytes:
    if fmt == "ply":
        return trimesh.exchange.ply.export_ply(mesh, encoding="binary", include_attributes=False)
    text = trimesh.exchange.obj.export_obj(mesh, include_normals=False, include_color=False,
                                           include_texture=False, digits=6, header=None)
    return text.encode("ascii")


def _npy_bytes(array: NDArray[np.generic]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class SyntheticPhoto:
    """One photo of a synthetic item and how it was taken."""

    image: NDArray[np.uint8]
    """(S, S, 3) RGB over the background."""
    render: DetailedRender
    """The face alone: pixels, mask, depth and ``P``."""
    camera: Camera
    rotation: NDArray[np.float64]
    """(3, 3) proxy frame to camera."""
    translation: NDArray[np.float64]
    """(3,) mm."""


class SyntheticSetWriter:
    """Writes items of a synthetic set into ``out_dir``; one per process (holds the model, its raster and,
    once the first photo is taken, a GL context)."""

    def __init__(self, model_path: Path, config: SyntheticSetConfig, stage: str, out_dir: Path,
                 resolution: int | None = None) -> None:
        self.model = MorphableModel.load(model_path)
        self.config = config
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.resolution = config.resolution if resolution is None else int(resolution)
        """Side of the ground-truth maps (``resolution``, else the config's)."""
        self.mm_per_uv = mm_per_uv(self.model.mean, self.model.uv, self.model.triangles)
        self.raster: UVRaster = rasterize_uv(self.model.uv, self.model.triangles, self.resolution)
        self.cavity = MouthCavity.of(self.model)
        self._renderer: MeshRenderer | None = None
        for name in config.expressions:
            expression_beta(self.model, name)  # fail early, with the list of names, on a typo

    def _subject(self, subject: str) -> tuple[NDArray[np.float64], Any]:
        rng = item_rng(self.config.seed, self.stage, subject)
        alpha = truncated_normal(rng, self.model.n_shape, self.config.identity_bound)
        layout = subject_layout(self.model, self.mm_per_uv, self.config.details, rng)
        return alpha, layout

    def subject_albedo(self, subject: str) -> NDArray[np.float64]:
        """The albedo coefficients of ``subject`` (rounded to 6 decimals, as recorded)."""
        rng = item_rng(self.config.seed, self.stage, f"{subject}/albedo")
        return np.round(truncated_normal(rng, self.model.n_albedo, self.config.photo.albedo_bound), 6)

    def __call__(self, task: SynthTask) -> dict[str, Any]:
        """Write one item; returns ``{"files": [relative paths], "facts": {...}}``."""
        folder = self.out_dir / task.subject / task.expression
        folder.mkdir(parents=True, exist_ok=True)
        if task.bad is not None:
            return self._bad(task, folder)
        cfg = self.config
        alpha, layout = self._subject(task.subject)
        beta = expression_beta(self.model, task.expression, cfg.expression_weight)
        rng = item_rng(cfg.seed, self.stage, task.id)
        strengths = family_strengths(self.model, beta, cfg.details.neutral_fraction)
        details = expression_details(layout, strengths, cfg.details, self.mm_per_uv)
        mismatch = draw_mismatch(self.model, self.mm_per_uv, cfg.scan, rng)
        proxy = self.model.vertices(alpha, beta).astype(np.float64)
        gamma = self.subject_albedo(task.subject)
        shared = cfg.photos > 0 and cfg.photo.edge_mm in (None, cfg.scan.edge_mm)
        # The photos render the scan's own subdivision when they can: the costliest step, done once.
        fine = subdivide_proxy(self.model, proxy, cfg.scan.edge_mm, self.model.albedo(gamma) if shared else None)
        values = details.evaluate(fine.uv)
        scan = synthesize_scan(self.model, proxy, details, mismatch, cfg.scan, rng, fine=fine, detail_values=values)
        scale = 1e-3 if cfg.units == "m" else 1.0
        scan_name = f"scan.{cfg.scan_format}"
        mesh = trimesh.Trimesh(scan.mesh.vertices * scale, scan.mesh.faces, process=False, validate=False)
        atomic_write_bytes(folder / scan_name, _mesh_bytes(mesh, cfg.scan_format))
        proxy_name = self._write_proxy(folder, alpha, beta, proxy)
        parts = detail_parts(details, self.raster)
        gt = ground_truth_map(details, self.raster, parts)
        atomic_write_bytes(folder / GROUND_TRUTH, _npy_bytes(gt))
        atomic_write_text(folder / DETAILS, details_json(details, mismatch, strengths, scan))
        photos: list[dict[str, Any]] = []
        if cfg.photos:
            if not shared:
                fine = subdivide_proxy(self.model, proxy, cfg.photo.edge_mm or cfg.scan.edge_mm,
                                       self.model.albedo(gamma))
                values = details.evaluate(fine.uv)
            photos = self._photos(task, folder, proxy, displace(fine, None, values), gamma)
        info = {"units": cfg.units, "scan": scan_name, "proxy": proxy_name, "photos": photos,
                "ground_truth": GROUND_TRUTH, "synthetic": True, "subject": task.subject,
                "expression": task.expression}
        atomic_write_text(folder / CAPTURE_FILE, json.dumps(info, sort_keys=True, indent=1) + "\n")
        files = [CAPTURE_FILE, proxy_name, scan_name, GROUND_TRUTH, DETAILS, *(p["file"] for p in photos)]
        facts = {"scan_vertices": len(mesh.vertices), "scan_faces": len(mesh.faces),
                 "gt_mean_abs_mm": float(np.nanmean(np.abs(gt))), "strengths": strengths,
                 "amplitude": parts.amplitude(), "photos": len(photos),
                 "misalign_deg": float(np.degrees(np.arccos(np.clip((np.trace(scan.misalignment[:3, :3]) - 1) / 2,
                                                                    -1, 1))))}
        return {"id": task.id, "seed": derive_seed(cfg.seed, self.stage, task.id),
                "files": [f"{task.id}/{f}" for f in files], "facts": facts}

    @property
    def renderer(self) -> MeshRenderer:
        """The GL renderer of the photos, made on first use (a worker that takes no photo opens no context)."""
        if self._renderer is None:
            self._renderer = MeshRenderer(self.config.photo.size, self.config.photo.size)
        return self._renderer

    def photo_sample(self, item_id: str, k: int) -> RenderSample:
        """The draw of photo ``k`` of item ``item_id`` (pose, distance, light, background)."""
        rng = item_rng(self.config.seed, self.stage, f"{item_id}/photo-{k}")
        return sample_render(rng, self.config.photo.sampling(), self.model)

    def cavity_of(self, surface: DetailedSurface) -> MouthCavity | None:
        """The mouth cavity of ``surface``'s topology (None for a model without a mouth opening)."""
        return None if self.cavity is None else subdivided_cavity(self.cavity, surface.faces, len(surface.vertices))

    def render_photo(self, surface: DetailedSurface, proxy: NDArray[np.float64], sample: RenderSample,
                     cavity: MouthCavity | None = None) -> SyntheticPhoto:
        """The photo of ``surface`` (the item's detailed surface, or any other of its topology) under ``sample``.

        ``cavity``: :meth:`cavity_of` the surface (the mouth stays open, showing the background, without it).
        """
        cfg = self.config.photo
        camera = Camera.framing(cfg.size, cfg.size, cfg.camera.projection, cfg.camera.fov_deg, sample.distance_mm)
        # The head turns about the centre of the proxy's bounding box, which lands on the image centre (plus the
        # shift): the vertex mean sits ~1 cm below it (the forehead is sparsely meshed) and would crop the forehead.
        centre = (proxy.min(axis=0) + proxy.max(axis=0)) / 2.0
        rotation, translation = head_pose(centre, sample.yaw, sample.pitch, sample.roll, sample.distance_mm,
                                          sample.translate_px, camera)
        out = render_surface(self.renderer, surface, camera, rotation, translation, sample.sh, cavity)
        image = composite(out.rgb, out.mask, background(sample, cfg.size, cfg.size, cfg.background))
        return SyntheticPhoto(image, out, camera, rotation, translation)

    def _photos(self, task: SynthTask, folder: Path, proxy: NDArray[np.float64], surface: DetailedSurface,
                gamma: NDArray[np.float64]) -> list[dict[str, Any]]:
        """Render, write and describe the item's photos (``PhotoInfo`` dicts for ``capture.json``)."""
        photos = []
        cavity = self.cavity_of(surface)
        for k in range(self.config.photos):
            sample = self.photo_sample(task.id, k)
            photo = self.render_photo(surface, proxy, sample, cavity)
            camera, out = photo.camera, photo.render
            name = f"photo-{k}.png"
            atomic_write_bytes(folder / name, encode_png(photo.image, self.config.photo.png_compression))
            info = PhotoInfo(
                file=name, P=out.projection.tolist(), sh=sh_in_model_frame(sample.sh, photo.rotation).tolist(),
                sh_camera=sample.sh.tolist(), width=camera.width, height=camera.height,
                K=camera.intrinsic_matrix().tolist(), R=photo.rotation.tolist(), t=photo.translation.tolist(),
                yaw_deg=sample.yaw, pitch_deg=sample.pitch, roll_deg=sample.roll, distance_mm=sample.distance_mm,
                light_direction=sample.light_direction.tolist(), light_intensity=sample.light_intensity,
                ambient=sample.ambient, light_color=sample.light_color.tolist(), albedo=gamma.tolist(),
                background=sample.background_kind, face_pixels=int(out.mask.sum()))
            photos.append(info.model_dump(mode="json", exclude_none=True))
        return photos

    def close(self) -> None:
        """Release the GL context, if one was made."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def _write_proxy(self, folder: Path, alpha: NDArray[np.float64], beta: NDArray[np.floating],
                     proxy: NDArray[np.float64]) -> str:
        if self.config.proxy_format == "coefficients":
            data = {"alpha": [round(float(a), 9) for a in alpha], "beta": [round(float(b), 9) for b in beta],
                    "model": self.model.name}
            atomic_write_text(folder / "proxy.json", json.dumps(data, indent=1) + "\n")
            return "proxy.json"
        scale = 1e-3 if self.config.units == "m" else 1.0
        mesh = trimesh.Trimesh(proxy * scale, self.model.triangles, process=False, validate=False)
        atomic_write_bytes(folder / "proxy.ply", _mesh_bytes(mesh, "ply"))
        return "proxy.ply"

    def _bad(self, task: SynthTask, folder: Path) -> dict[str, Any]:
        """One broken item of kind ``task.bad``, made from the first subject's neutral proxy."""
        cfg = self.config
        alpha, layout = self._subject(subject_name(0))
        beta = expression_beta(self.model, NEUTRAL)
        rng = item_rng(cfg.seed, self.stage, task.id)
        strengths = family_strengths(self.model, beta, cfg.details.neutral_fraction)
        details = expression_details(layout, strengths, cfg.details, self.mm_per_uv)
        proxy = self.model.vertices(alpha, beta).astype(np.float64)
        coarse = cfg.scan.model_copy(update={"edge_mm": max(cfg.scan.edge_mm, _BAD_EDGE_MM)})
        mesh = synthesize_scan(self.model, proxy, details, draw_mismatch(self.model, self.mm_per_uv, coarse, rng),
                               coarse, rng).mesh
        units = "mm"
        proxy_name = self._write_proxy(folder, alpha, beta, proxy)
        files = [CAPTURE_FILE, proxy_name]
        scan_bytes: bytes | None = None
        if task.bad == "unreadable-mesh":
            scan_bytes = b"ply\nformat binary_little_endian 1.0\nthis is not a mesh header\n\x00\x01\x02"
        elif task.bad == "empty-mesh":
            scan_bytes = _mesh_bytes(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False),
                                     "ply")
        elif task.bad == "non-manifold":
            # A flap: one extra triangle on an edge that already has two faces.
            a, b = mesh.edges_unique[mesh.edges_unique_length.argmax()]
            flap = mesh.vertices[[a, b]].mean(axis=0) + 5.0 * mesh.vertex_normals[a]
            verts = np.vstack([mesh.vertices, flap])
            faces = np.vstack([mesh.faces, [[a, b, len(mesh.vertices)]]])
            scan_bytes = _mesh_bytes(trimesh.Trimesh(verts, faces, process=False), "ply")
        elif task.bad == "wrong-units":
            units = "m"  # written in mm, declared in metres: 1000x too large once converted
            scan_bytes = _mesh_bytes(mesh, "ply")
        elif task.bad == "nan-vertices":
            verts = np.array(mesh.vertices)
            verts[rng.choice(len(verts), 5, replace=False)] = np.nan
            scan_bytes = _mesh_bytes(trimesh.Trimesh(verts, mesh.faces, process=False, validate=False), "ply")
        elif task.bad == "wrong-topology":
            # A proxy mesh that is not in the model's topology (the scan itself is fine).
            (folder / proxy_name).unlink()
            sub_v, sub_f = trimesh.remesh.subdivide(proxy, self.model.triangles)
            proxy_name = files[1] = "proxy.ply"
            atomic_write_bytes(folder / proxy_name, _mesh_bytes(trimesh.Trimesh(sub_v, sub_f, process=False), "ply"))
            scan_bytes = _mesh_bytes(mesh, "ply")
        elif task.bad == "misaligned":
            # Turned to face backwards: no rigid alignment starting from identity recovers that.
            turn = trimesh.transformations.rotation_matrix(np.pi, [0.0, 1.0, 0.0], point=proxy.mean(axis=0))
            scan_bytes = _mesh_bytes(mesh.copy().apply_transform(turn), "ply")
        if scan_bytes is not None:
            atomic_write_bytes(folder / "scan.ply", scan_bytes)
            files.append("scan.ply")
        info = {"units": units, "proxy": proxy_name, "bad_example": task.bad}
        atomic_write_text(folder / CAPTURE_FILE, json.dumps(info, sort_keys=True, indent=1) + "\n")
        return {"id": task.id, "seed": derive_seed(cfg.seed, self.stage, task.id),
                "files": [f"{task.id}/{f}" for f in sorted(files)], "facts": {"bad_example": task.bad}}


def synthetic_set_metrics(results: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], *, subjects: int,
                          expressions: Sequence[str], resolution: int, key: str) -> dict[str, Any]:
    """Deterministic facts about a written set, from the writer's results and the manifest rows of its files.

    ``detail_amplitude`` is measured on the ground-truth texels of what was drawn (not read from the config):
    per wrinkle family the deepest point of its grooves (overlapping grooves add up), the pore texture's RMS
    and the mean |displacement| over the chart, over the whole set and per expression.
    """
    good = [r for r in results if "bad_example" not in r["facts"]]
    by_expression: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in good:
        by_expression[r["id"].split("/", 1)[1]].append(r["facts"])
    # Results of a writer that took no photos or measured no amplitude (older records) leave those keys out.
    measured = bool(good) and all("amplitude" in r["facts"] for r in good)
    out: dict[str, Any] = {
        "items": len(good),
        "subjects": subjects,
        "expressions": list(expressions),
        "bad_examples": len(results) - len(good),
        "resolution": resolution,
    }
    if any("photos" in r["facts"] for r in good):
        out["photos"] = int(sum(r["facts"].get("photos", 0) for r in good))
    out |= {
        "scan_faces_mean": int(np.mean([r["facts"]["scan_faces"] for r in good])),
        "megabytes": round(sum(r["bytes"] for r in rows) / 1e6, 2),
    }
    if measured:
        out["detail_amplitude"] = amplitude_summary([r["facts"]["amplitude"] for r in good])
    out["per_expression"] = {
        name: {"gt_mean_abs_mm": round(float(np.mean([f["gt_mean_abs_mm"] for f in facts])), 5),
               "strengths": {k: round(v, 4) for k, v in facts[0]["strengths"].items()},
               **({"detail_amplitude": amplitude_summary([f["amplitude"] for f in facts])} if measured else {})}
        for name, facts in sorted(by_expression.items())
    }
    out["params_hash"] = key
    return out
