"""Writing a synthetic capture set in the capture input layout (see :mod:`facedetail.capture.scan`).

Each item ``<subject>/<expression>/`` gets ``capture.json``, the proxy (``proxy.json`` with α
and β, or ``proxy.ply``), the scan (``scan.ply`` or ``scan.obj``, in the declared units), the
analytic ground truth ``displacement_gt.npy`` (float32 mm at the texel centres of the model's
UV raster, NaN outside the chart) and ``details.json`` (everything that was drawn).

Randomness: a subject's identity α and wrinkle layout come from the seed of
``(seed, stage, subject)``, so they are the same in all its expressions; the scan's noise, holes
and misalignment from the seed of ``(seed, stage, subject/expression)``.

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

from facedetail.capture.scan import CAPTURE_FILE
from facedetail.capture.synthetic import (
    NEUTRAL,
    DetailConfig,
    ScanConfig,
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
from facedetail.io.seeds import derive_seed, item_rng, truncated_normal
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVRaster, mm_per_uv, rasterize_uv

GROUND_TRUTH = "displacement_gt.npy"
DETAILS = "details.json"
BAD_KINDS = ("missing-scan", "unreadable-mesh", "empty-mesh", "non-manifold", "wrong-units", "nan-vertices",
             "wrong-topology", "misaligned")
# Broken examples need no fine detail: a coarse scan keeps them small.
_BAD_EDGE_MM = 2.0


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
    """Side of the ground-truth maps; ``capture_gt`` compares only maps of its own resolution."""
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


class SyntheticSetWriter:
    """Writes items of a synthetic set into ``out_dir``; one per process (holds the model and its raster)."""

    def __init__(self, model_path: Path, config: SyntheticSetConfig, stage: str, out_dir: Path) -> None:
        self.model = MorphableModel.load(model_path)
        self.config = config
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.mm_per_uv = mm_per_uv(self.model.mean, self.model.uv, self.model.triangles)
        self.raster: UVRaster = rasterize_uv(self.model.uv, self.model.triangles, config.resolution)
        for name in config.expressions:
            expression_beta(self.model, name)  # fail early, with the list of names, on a typo

    def _subject(self, subject: str) -> tuple[NDArray[np.float64], Any]:
        rng = item_rng(self.config.seed, self.stage, subject)
        alpha = truncated_normal(rng, self.model.n_shape, self.config.identity_bound)
        layout = subject_layout(self.model, self.mm_per_uv, self.config.details, rng)
        return alpha, layout

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
        scan = synthesize_scan(self.model, proxy, details, mismatch, cfg.scan, rng)
        scale = 1e-3 if cfg.units == "m" else 1.0
        scan_name = f"scan.{cfg.scan_format}"
        mesh = trimesh.Trimesh(scan.mesh.vertices * scale, scan.mesh.faces, process=False, validate=False)
        atomic_write_bytes(folder / scan_name, _mesh_bytes(mesh, cfg.scan_format))
        proxy_name = self._write_proxy(folder, alpha, beta, proxy)
        gt = ground_truth_map(details, self.raster)
        atomic_write_bytes(folder / GROUND_TRUTH, _npy_bytes(gt))
        atomic_write_text(folder / DETAILS, details_json(details, mismatch, strengths, scan))
        info = {"units": cfg.units, "scan": scan_name, "proxy": proxy_name, "photos": [],
                "ground_truth": GROUND_TRUTH, "synthetic": True, "subject": task.subject,
                "expression": task.expression}
        atomic_write_text(folder / CAPTURE_FILE, json.dumps(info, sort_keys=True, indent=1) + "\n")
        files = [CAPTURE_FILE, proxy_name, scan_name, GROUND_TRUTH, DETAILS]
        facts = {"scan_vertices": len(mesh.vertices), "scan_faces": len(mesh.faces),
                 "gt_mean_abs_mm": float(np.nanmean(np.abs(gt))), "strengths": strengths,
                 "misalign_deg": float(np.degrees(np.arccos(np.clip((np.trace(scan.misalignment[:3, :3]) - 1) / 2,
                                                                    -1, 1))))}
        return {"id": task.id, "seed": derive_seed(cfg.seed, self.stage, task.id),
                "files": [f"{task.id}/{f}" for f in files], "facts": facts}

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
    """Deterministic facts about a written set, from the writer's results and the manifest rows of its files."""
    good = [r for r in results if "bad_example" not in r["facts"]]
    by_expression: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in good:
        by_expression[r["id"].split("/", 1)[1]].append(r["facts"])
    return {
        "items": len(good),
        "subjects": subjects,
        "expressions": list(expressions),
        "bad_examples": len(results) - len(good),
        "resolution": resolution,
        "scan_faces_mean": int(np.mean([r["facts"]["scan_faces"] for r in good])),
        "megabytes": round(sum(r["bytes"] for r in rows) / 1e6, 2),
        "per_expression": {
            name: {"gt_mean_abs_mm": round(float(np.mean([f["gt_mean_abs_mm"] for f in facts])), 5),
                   "strengths": {k: round(v, 4) for k, v in facts[0]["strengths"].items()}}
            for name, facts in sorted(by_expression.items())
        },
        "params_hash": key,
    }
