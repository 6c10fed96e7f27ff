"""The capture input layout, and loading and checking of scans and proxies.

Layout: one folder per subject and expression, ``<root>/<subject>/<expression>/``, holding

* ``capture.json``: ``{"units": "mm" | "m", "scan": ..., "proxy": ..., "photos": [...]}``
  (see :class:`CaptureInfo`; only ``units`` is required);
* the detailed scan: ``scan.ply`` or ``scan.obj`` (any topology; a texture may come with it and is
  not used: only the geometry makes the displacement);
* the proxy: ``proxy.json`` with the model coefficients ``{"alpha": [...], "beta": [...]}``,
  or ``proxy.ply`` / ``proxy.obj``, a mesh in the face model's topology;
* optionally photos (synthetic sets: ``photo-<k>.png``, listed with their camera ``P`` and SH light as
  :class:`PhotoInfo`), and (synthetic sets) ``displacement_gt.npy``, the analytic displacement.

Every problem with an item raises :class:`CaptureError` whose message starts with a short
kind (``missing scan:``, ``wrong units:``, ...) followed by the specifics, so that the stage
can quarantine the item, count the kinds and carry on with the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import trimesh
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, ValidationError

from facedetail.errors import FacedetailError
from facedetail.model.morphable import MorphableModel

CAPTURE_FILE = "capture.json"
SCAN_NAMES = ("scan.ply", "scan.obj")
PROXY_NAMES = ("proxy.json", "proxy.ply", "proxy.obj")
MESH_SUFFIXES = (".ply", ".obj")
UNIT_TO_MM = {"mm": 1.0, "m": 1000.0}
# A scan whose size differs from its proxy's by more than this factor is in the wrong units
# (or is not this face): real scans include some neck or hair, so up to ~2x is normal.
SCALE_TOLERANCE = 3.0

Units = Literal["mm", "m"]


class CaptureError(FacedetailError):
    """An input item that cannot be used; ``str(err)`` is ``"<kind>: <specifics>"``."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in a Dask or Ray worker, it is pickled back to the run.
        return type(self), (self.kind, self.detail)


class PhotoInfo(BaseModel):
    """One photo of a capture item, with what is known about how it was taken."""

    model_config = ConfigDict(extra="allow", frozen=True)

    file: str
    """Image file, relative to the item folder."""
    P: list[list[float]] | None = None
    """(3, 4) camera matrix from the proxy's frame (model coordinates, mm) to pixels:
    ``(u w, v w, w) = P (X, 1)``, pixel (0, 0) the centre of the top-left pixel (``facedetail.render.camera``).
    Absent: the camera is fitted to the photo's landmarks."""
    camera_file: str | None = None
    """A JSON file beside the photo holding ``{"P": [[...], [...], [...]]}``, instead of an inline ``P``."""
    sh: list[list[float]] | None = None
    """(9, 3) SH lighting the photo was rendered with (synthetic sets only; ``facedetail.render.sh`` order), in
    the proxy's model frame: ``pixel / 255 ≈ albedo ⊙ max(0, Y(n) sh)`` for model-frame unit normals ``n``
    (the frame of the UV chart's normal maps; a synthetic set also lists ``sh_camera``, for ``R n``)."""


class CaptureInfo(BaseModel):
    """``capture.json`` of one item: declared units and the files that make it up."""

    model_config = ConfigDict(extra="allow", frozen=True)

    units: Units
    """Length unit of the scan (and of a proxy mesh): ``mm`` or ``m``."""
    scan: str | None = None
    """Scan file in the folder; default: the first of ``scan.ply``, ``scan.obj`` that exists."""
    proxy: str | None = None
    """Proxy file; default: the first of ``proxy.json``, ``proxy.ply``, ``proxy.obj`` that exists."""
    proxy_units: Units | None = None
    """Unit of a proxy mesh, when it differs from ``units`` (coefficients have none)."""
    photos: list[str | PhotoInfo] = []
    """Photos of the subject in this expression (optional): a file name relative to the folder, or a
    :class:`PhotoInfo` with its camera."""
    ground_truth: str | None = None
    """Known displacement map (float32 .npy, mm; NaN outside the UV chart), e.g. of a synthetic scan."""


@dataclass(frozen=True)
class CaptureItem:
    """One subject/expression folder."""

    id: str
    """``<subject>/<expression>``."""
    folder: Path
    problem: str | None = None
    """Why the folder does not fit the layout (it is then quarantined, not skipped)."""


def discover_items(root: Path | str) -> list[CaptureItem]:
    """Every ``<subject>/<expression>`` folder under ``root``, sorted by id (hidden folders skipped).

    A subject folder without expression folders is listed too, with its problem, so that scans
    put one level too high are reported rather than silently left out.
    """
    root = Path(root)
    items = []
    for subject in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        expressions = sorted(p for p in subject.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not expressions:
            items.append(CaptureItem(subject.name, subject, f"{subject.name}/ has no <expression> folders (the "
                                     "layout is <subject>/<expression>/capture.json)"))
        for expression in expressions:
            items.append(CaptureItem(f"{subject.name}/{expression.name}", expression))
    return items


def read_info(item: CaptureItem) -> CaptureInfo:
    """The item's ``capture.json``, validated."""
    if item.problem is not None:
        raise CaptureError("not in the layout", item.problem)
    path = item.folder / CAPTURE_FILE
    if not path.is_file():
        raise CaptureError("missing capture.json", f"{item.id} has no {CAPTURE_FILE} (it declares the units)")
    try:
        return CaptureInfo.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CaptureError("bad capture.json", f"{path.name} is not valid JSON ({err})") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise CaptureError("bad capture.json", problems) from None


def _pick(folder: Path, named: str | None, defaults: tuple[str, ...], what: str) -> Path:
    if named is not None:
        path = folder / named
        if not path.is_file():
            raise CaptureError(f"missing {what}", f"capture.json names {named}, which does not exist")
        return path
    for name in defaults:
        if (folder / name).is_file():
            return folder / name
    raise CaptureError(f"missing {what}", f"none of {', '.join(defaults)} in the folder")


def scan_path(item: CaptureItem, info: CaptureInfo) -> Path:
    """The scan file of an item (raises ``missing scan``)."""
    return _pick(item.folder, info.scan, SCAN_NAMES, "scan")


def proxy_path(item: CaptureItem, info: CaptureInfo) -> Path:
    """The proxy file of an item (raises ``missing proxy``)."""
    return _pick(item.folder, info.proxy, PROXY_NAMES, "proxy")


def load_mesh(path: Path, what: str) -> trimesh.Trimesh:
    """A triangle mesh read with trimesh, as stored (no merging, no repair); raises ``unreadable mesh``."""
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise CaptureError(f"unreadable {what}", f"{path.name}: only .ply and .obj are read")
    try:
        # maintain_order: an OBJ with UV seams would otherwise get vertices split at its seams (and a
        # proxy in the model's topology would no longer match it).
        mesh = trimesh.load(path, process=False, force="mesh", maintain_order=True)
    except Exception as err:  # trimesh raises many kinds for corrupt files: all mean "cannot be read"
        raise CaptureError(f"unreadable {what}", f"{path.name}: {type(err).__name__}: {err}") from None
    if not isinstance(mesh, trimesh.Trimesh):
        raise CaptureError(f"unreadable {what}", f"{path.name} holds a {type(mesh).__name__}, not a triangle mesh")
    return mesh


def check_mesh(mesh: trimesh.Trimesh, name: str) -> None:
    """Reject an empty mesh, non-finite coordinates and non-manifold edges."""
    if len(mesh.faces) == 0 or len(mesh.vertices) == 0:
        raise CaptureError("empty mesh", f"{name} has {len(mesh.vertices)} vertices and {len(mesh.faces)} faces")
    bad = ~np.isfinite(mesh.vertices).all(axis=1)
    if bad.any():
        raise CaptureError("non-finite vertices", f"{name} has {int(bad.sum())} vertices with NaN or inf")
    if mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices):
        raise CaptureError("unreadable mesh", f"{name} has face indices outside its {len(mesh.vertices)} vertices")
    # An edge shared by more than two faces has no consistent surface side: ray hits there are
    # ambiguous, and it is the usual sign of a broken export or a bad merge of scan parts.
    edges = np.sort(np.asarray(mesh.faces, np.int64)[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    # One int64 key per edge: a 1-D unique sorts ~5x faster than np.unique(axis=0) on 2M rows.
    _, counts = np.unique(edges[:, 0] * len(mesh.vertices) + edges[:, 1], return_counts=True)
    shared = int((counts > 2).sum())
    if shared:
        raise CaptureError("non-manifold mesh", f"{name} has {shared} edges shared by more than two faces")


def load_scan(path: Path, units: Units) -> trimesh.Trimesh:
    """The scan in millimetres, checked (raises :class:`CaptureError`)."""
    mesh = load_mesh(path, "mesh")
    check_mesh(mesh, path.name)
    scale = UNIT_TO_MM[units]
    vertices = np.asarray(mesh.vertices, np.float64) * scale
    return trimesh.Trimesh(vertices, np.asarray(mesh.faces, np.int64), process=False, validate=False)


def load_proxy(path: Path, model: MorphableModel, units: Units) -> NDArray[np.float64]:
    """(V, 3) proxy vertices in mm: from coefficients through ``model``, or a mesh in its topology."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            alpha = np.asarray(data.get("alpha", []), np.float64)
            beta = np.asarray(data.get("beta", []), np.float64)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as err:
            raise CaptureError("unreadable proxy", f"{path.name}: {err}") from None
        if alpha.ndim != 1 or alpha.size > model.n_shape or beta.ndim != 1 or beta.size > model.n_expression:
            raise CaptureError(
                "wrong proxy topology", f"{path.name} has {alpha.size} shape and {beta.size} expression "
                f"coefficients; the model {model.name} has {model.n_shape} and {model.n_expression}")
        if not (np.isfinite(alpha).all() and np.isfinite(beta).all()):
            raise CaptureError("non-finite vertices", f"{path.name} has NaN or inf coefficients")
        return model.vertices(alpha if alpha.size else None, beta if beta.size else None).astype(np.float64)
    mesh = load_mesh(path, "proxy")
    if len(mesh.vertices) != model.n_vertices or len(mesh.faces) != model.n_triangles \
            or not np.array_equal(np.asarray(mesh.faces), model.triangles):
        raise CaptureError(
            "wrong proxy topology", f"{path.name} has {len(mesh.vertices)} vertices and {len(mesh.faces)} "
            f"triangles; the model {model.name} has {model.n_vertices} and {model.n_triangles}, in its order")
    vertices = np.asarray(mesh.vertices, np.float64)
    if not np.isfinite(vertices).all():
        raise CaptureError("non-finite vertices", f"{path.name} has NaN or inf vertices")
    return vertices * UNIT_TO_MM[units]


def check_scale(scan: trimesh.Trimesh, proxy_vertices: NDArray[np.float64], units: Units) -> float:
    """Ratio of scan size to proxy size (bounding-box diagonals); rejects a scan in the wrong units."""
    scan_size = float(np.linalg.norm(np.ptp(scan.vertices, axis=0)))
    proxy_size = float(np.linalg.norm(np.ptp(proxy_vertices, axis=0)))
    ratio = scan_size / proxy_size if proxy_size > 0 else float("inf")
    if not (1.0 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE):
        hint = ""
        for factor, other in ((1000.0, "mm"), (0.001, "m")):
            if 1.0 / SCALE_TOLERANCE <= ratio / factor <= SCALE_TOLERANCE:
                hint = f": off by a factor of {factor:g}; is the scan in {other} rather than {units}?"
        raise CaptureError(
            "wrong units", f"the scan is {scan_size:.4g} mm across and its proxy {proxy_size:.4g} mm "
            f"(ratio {ratio:.4g}, declared units {units!r}){hint}")
    return ratio
