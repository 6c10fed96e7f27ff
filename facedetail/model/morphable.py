"""The in-memory morphable face model and its deterministic on-disk format.

Conventions (all loaders convert to these):

* geometry in millimetres, right-handed, +y up, the face looking towards +z;
* triangles wound counter-clockwise seen from outside (OpenGL front faces);
* every linear part is ``value = mean + sum_k coef_k * std_k * basis_k``: coefficients are in
  units of standard deviations (as in eos and the paper), basis rows have unit norm
  (orthonormal for PCA parts);
* blendshape expressions (the Surrey model) use ``std = 1``: a weight of 1 is the full
  expression as captured;
* the iBUG-68 map has 68 rows, 0-based vertex indices, ``-1`` where the model defines no
  fixed vertex (the contour points, which follow the pose: see ``contour_right/left``);
* albedo is linear RGB reflectance in [0, 1].

Stored as an ``.npz`` (a zip of ``.npy`` arrays readable with ``numpy.load`` anywhere, no
pickle) written with fixed zip timestamps, so the same model always gives the same bytes.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from facedetail.errors import SourceFileError
from facedetail.io.atomic import atomic_write_bytes

ExpressionKind = Literal["pca", "blendshapes", "none"]
N_LANDMARKS = 68
FORMAT_VERSION = 1
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

F32 = NDArray[np.float32]
I32 = NDArray[np.int32]


def unit_rows(basis: NDArray[np.floating]) -> tuple[F32, F32]:
    """Split (K, V, 3) deltas into unit-norm rows and their norms (the std of each row)."""
    flat = basis.reshape(basis.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (flat / safe[:, None]).reshape(basis.shape).astype(np.float32), norms.astype(np.float32)


@dataclass(frozen=True, eq=False)
class MorphableModel:
    """A 3D morphable face model: shape, expression and albedo parts over one mesh."""

    name: str
    """Human-readable model name, e.g. ``sfm_shape_3448``."""
    mean: F32
    """(V, 3) mean shape in millimetres."""
    shape_basis: F32
    """(Ks, V, 3) unit-norm identity basis."""
    shape_std: F32
    """(Ks,) standard deviation of each identity component (mm)."""
    expression_kind: ExpressionKind
    """``pca`` (BFM 2017), ``blendshapes`` (Surrey) or ``none`` (BFM 2009)."""
    expression_basis: F32
    """(Ke, V, 3) unit-norm expression basis."""
    expression_std: F32
    """(Ke,) scale of each expression component (PCA std dev, or blendshape norm)."""
    expression_names: tuple[str, ...]
    """Name of each expression component (emotions for blendshapes, ``exp_k`` for PCA)."""
    albedo_mean: F32
    """(V, 3) mean linear-RGB reflectance in [0, 1]."""
    albedo_basis: F32
    """(Ka, V, 3) unit-norm albedo basis."""
    albedo_std: F32
    """(Ka,) standard deviation of each albedo component."""
    albedo_names: tuple[str, ...]
    """Name of each albedo component."""
    triangles: I32
    """(T, 3) vertex indices, counter-clockwise from outside."""
    uv: F32
    """(V, 2) per-vertex texture coordinates in [0, 1]; u right, v down (image rows, as in eos)."""
    landmark_vertices: I32
    """(68,) iBUG-68 landmark -> vertex index, -1 where the landmark is a pose-dependent contour point."""
    contour_right: I32
    """Candidate vertices for the right-side contour landmarks (iBUG 1-8), outer to chin."""
    contour_left: I32
    """Candidate vertices for the left-side contour landmarks (iBUG 10-17), outer to chin."""
    units: str = "mm"
    """Length unit of the geometry."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Source files with their SHA256, loader, albedo model description, licence note."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ sizes
    @property
    def n_vertices(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_triangles(self) -> int:
        return int(self.triangles.shape[0])

    @property
    def n_shape(self) -> int:
        return int(self.shape_basis.shape[0])

    @property
    def n_expression(self) -> int:
        return int(self.expression_basis.shape[0])

    @property
    def n_albedo(self) -> int:
        return int(self.albedo_basis.shape[0])

    @property
    def landmark_defined(self) -> NDArray[np.bool_]:
        """(68,) True where the landmark has a fixed vertex."""
        return self.landmark_vertices >= 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent array."""
        V = self.mean.shape[0]
        checks: list[tuple[str, bool]] = [
            ("mean must be (V, 3)", self.mean.ndim == 2 and self.mean.shape[1] == 3 and V > 0),
            ("shape_basis must be (Ks, V, 3)", self.shape_basis.shape[1:] == (V, 3)),
            ("shape_std must be (Ks,)", self.shape_std.shape == self.shape_basis.shape[:1]),
            ("expression_basis must be (Ke, V, 3)", self.expression_basis.shape[1:] == (V, 3)),
            ("expression_std must be (Ke,)", self.expression_std.shape == self.expression_basis.shape[:1]),
            ("expression_names must have Ke entries", len(self.expression_names) == self.n_expression),
            ("expression_kind 'none' needs Ke = 0", self.expression_kind != "none" or self.n_expression == 0),
            ("albedo_mean must be (V, 3)", self.albedo_mean.shape == (V, 3)),
            ("albedo_basis must be (Ka, V, 3)", self.albedo_basis.shape[1:] == (V, 3)),
            ("albedo_std must be (Ka,)", self.albedo_std.shape == self.albedo_basis.shape[:1]),
            ("albedo_names must have Ka entries", len(self.albedo_names) == self.n_albedo),
            ("triangles must be (T, 3)", self.triangles.ndim == 2 and self.triangles.shape[1] == 3),
            ("triangle indices out of range",
             self.triangles.size == 0 or (self.triangles.min() >= 0 and self.triangles.max() < V)),
            ("uv must be (V, 2)", self.uv.shape == (V, 2)),
            ("uv outside [0, 1]", bool(np.all((self.uv >= 0) & (self.uv <= 1)))),
            ("landmark_vertices must have 68 rows", self.landmark_vertices.shape == (N_LANDMARKS,)),
            ("landmark vertex out of range",
             bool(np.all((self.landmark_vertices >= -1) & (self.landmark_vertices < V)))),
            ("contour vertex out of range",
             all(c.size == 0 or (c.min() >= 0 and c.max() < V) for c in (self.contour_right, self.contour_left))),
            ("non-finite values in the model",
             all(np.isfinite(a).all() for a in (self.mean, self.shape_basis, self.shape_std,
                                                self.expression_basis, self.expression_std,
                                                self.albedo_mean, self.albedo_basis, self.albedo_std))),
        ]
        for message, ok in checks:
            if not ok:
                raise ValueError(f"{self.name}: {message}")

    # ------------------------------------------------------------- evaluation
    @staticmethod
    def _coefficients(coef: ArrayLike | None, n: int, what: str) -> tuple[NDArray[np.float32], bool]:
        """Coefficients as (B, n) float32 (zero-padded, like eos), and whether the input was batched."""
        if coef is None:
            return np.zeros((1, n), np.float32), False
        arr = np.asarray(coef, dtype=np.float32)
        if arr.ndim == 0:
            return np.full((1, n), arr, np.float32), False
        batched = arr.ndim == 2
        arr = np.atleast_2d(arr)
        if arr.ndim != 2 or arr.shape[1] > n:
            raise ValueError(f"{what} coefficients must be (K,) or (B, K) with K <= {n}, got {np.shape(coef)}")
        if arr.shape[1] < n:
            arr = np.pad(arr, ((0, 0), (0, n - arr.shape[1])))
        return arr, batched

    @cached_property
    def _shape_scaled(self) -> F32:
        return (self.shape_basis * self.shape_std[:, None, None]).reshape(self.n_shape, -1)

    @cached_property
    def _expression_scaled(self) -> F32:
        return (self.expression_basis * self.expression_std[:, None, None]).reshape(self.n_expression, -1)

    @cached_property
    def _albedo_scaled(self) -> F32:
        return (self.albedo_basis * self.albedo_std[:, None, None]).reshape(self.n_albedo, -1)

    def vertices(self, alpha: ArrayLike | None = None, beta: ArrayLike | None = None) -> F32:
        """Vertex positions (mm) for identity ``alpha`` and expression ``beta``.

        Each may be None (zeros), a (K,) vector or a (B, K) batch; fewer than K coefficients
        are zero-padded. Returns (V, 3), or (B, V, 3) when either input is batched.
        """
        a, a_batched = self._coefficients(alpha, self.n_shape, "shape")
        b, b_batched = self._coefficients(beta, self.n_expression, "expression")
        if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
            raise ValueError(f"batch sizes differ: alpha {a.shape[0]}, beta {b.shape[0]}")
        offset = a @ self._shape_scaled
        if self.n_expression:
            offset = offset + b @ self._expression_scaled
        else:  # no expression part: the batch size may still come from beta
            offset = np.broadcast_to(offset, (max(a.shape[0], b.shape[0]), offset.shape[1]))
        out = self.mean.reshape(1, -1) + offset
        out = out.reshape(-1, self.n_vertices, 3)
        return out if (a_batched or b_batched) else out[0]

    def albedo(self, gamma: ArrayLike | None = None) -> F32:
        """Per-vertex linear-RGB albedo for coefficients ``gamma``, clipped to [0, 1]."""
        g, batched = self._coefficients(gamma, self.n_albedo, "albedo")
        out = self.albedo_mean.reshape(1, -1) + (g @ self._albedo_scaled if self.n_albedo else 0.0)
        out = np.clip(out, 0.0, 1.0).reshape(-1, self.n_vertices, 3).astype(np.float32)
        return out if batched else out[0]

    def landmarks(self, alpha: ArrayLike | None = None, beta: ArrayLike | None = None) -> F32:
        """(…, 68, 3) landmark positions; NaN rows where :attr:`landmark_defined` is False."""
        verts = self.vertices(alpha, beta)
        idx = np.where(self.landmark_defined, self.landmark_vertices, 0)
        out = verts[..., idx, :].copy()
        out[..., ~self.landmark_defined, :] = np.nan
        return out

    @cached_property
    def _vertex_face_incidence(self) -> sp.csr_matrix:
        T = self.n_triangles
        rows = self.triangles.reshape(-1)
        cols = np.repeat(np.arange(T), 3)
        return sp.csr_matrix((np.ones(3 * T, np.float32), (rows, cols)), shape=(self.n_vertices, T))

    def vertex_normals(self, vertices: ArrayLike | None = None) -> F32:
        """Unit area-weighted vertex normals of (V, 3) or (B, V, 3) ``vertices`` (default: the mean)."""
        verts = np.asarray(self.mean if vertices is None else vertices, dtype=np.float32)
        batched = verts.ndim == 3
        v = verts if batched else verts[None]
        tri = v[:, self.triangles]  # (B, T, 3 corners, 3)
        face_n = np.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])  # |n| = 2 * area
        B, T = face_n.shape[:2]
        summed = self._vertex_face_incidence @ face_n.transpose(1, 0, 2).reshape(T, B * 3)
        summed = np.asarray(summed).reshape(self.n_vertices, B, 3).transpose(1, 0, 2)
        norms = np.linalg.norm(summed, axis=-1, keepdims=True)
        normals = (summed / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        return normals if batched else normals[0]

    def to_trimesh(self, vertices: ArrayLike | None = None, colors: ArrayLike | None = None):
        """A ``trimesh.Trimesh`` of one shape, with optional per-vertex RGB colours in [0, 1]."""
        import trimesh

        verts = self.mean if vertices is None else np.asarray(vertices)
        vc = None if colors is None else (np.clip(np.asarray(colors), 0, 1) * 255).astype(np.uint8)
        return trimesh.Trimesh(verts, self.triangles, vertex_colors=vc, process=False)

    # -------------------------------------------------------------- storage
    _ARRAYS = ("mean", "shape_basis", "shape_std", "expression_basis", "expression_std", "albedo_mean",
               "albedo_basis", "albedo_std", "triangles", "uv", "landmark_vertices", "contour_right",
               "contour_left")

    def to_bytes(self) -> bytes:
        """The model as deterministic ``.npz`` bytes (fixed zip timestamps, sorted entries)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "expression_kind": self.expression_kind,
            "expression_names": list(self.expression_names),
            "albedo_names": list(self.albedo_names),
            "units": self.units,
            "provenance": self.provenance,
        }
        entries = {name: np.ascontiguousarray(getattr(self, name)) for name in self._ARRAYS}
        entries["meta"] = np.array(json.dumps(meta, sort_keys=True, indent=1))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in sorted(entries):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                arr_buf = io.BytesIO()
                np.lib.format.write_array(arr_buf, entries[name], allow_pickle=False)
                zf.writestr(info, arr_buf.getvalue())
        return buf.getvalue()

    def save(self, path: Path | str) -> Path:
        """Write the model atomically to ``path`` (``.npz``)."""
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path | str) -> MorphableModel:
        """Read a model written by :meth:`save`; a file that is not one is a :class:`SourceFileError`."""
        remedy = "Point it at the model.npz that the face_model stage writes (`dvc repro face_model`)"
        if not Path(path).is_file():
            raise SourceFileError(path, "morphable model not found", remedy)
        try:
            if not zipfile.is_zipfile(path):
                raise SourceFileError(path, "not a facedetail morphable model (not an .npz archive)", remedy)
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                if meta.get("format_version") != FORMAT_VERSION:
                    raise SourceFileError(path, f"unsupported model format version {meta.get('format_version')}",
                                          remedy)
                arrays = {name: npz[name] for name in cls._ARRAYS}
            return cls(
                name=meta["name"], expression_kind=meta["expression_kind"],
                expression_names=tuple(meta["expression_names"]), albedo_names=tuple(meta["albedo_names"]),
                units=meta["units"], provenance=meta["provenance"], **arrays,
            )
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as err:
            raise SourceFileError(path, f"not a facedetail morphable model ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:120]})", remedy) from None

    def summary(self) -> dict[str, Any]:
        """Sizes and kinds, for metrics files and manifests."""
        return {
            "name": self.name,
            "vertices": self.n_vertices,
            "triangles": self.n_triangles,
            "shape_components": self.n_shape,
            "expression_kind": self.expression_kind,
            "expression_components": self.n_expression,
            "albedo_components": self.n_albedo,
            "landmarks_defined": int(self.landmark_defined.sum()),
            "contour_vertices": int(self.contour_right.size + self.contour_left.size),
            "units": self.units,
        }

