"""Loaders for the user's own Basel Face Model files (not redistributable; users bring them).

* BFM 2017 (``model2017-1_bfm_nomouth.h5``, read with h5py): shape, PCA expression and colour
  models; geometry already in millimetres, colour in [0, 1].
* BFM 2009 (``01_MorphableModel.mat``, read with scipy): shape and colour, no expression;
  geometry in micrometres (converted to mm), colour in [0, 255] (converted to [0, 1]), and
  triangles wound clockwise (re-wound to counter-clockwise), as eos's conversion scripts do.

Neither ships texture coordinates. We give both a cylindrical unwrap of the mean shape
(u = angle around the vertical axis, v = height), documented in ``provenance``; the original
release used its own custom layout, which is not public.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facedetail.errors import SourceFileError
from facedetail.model.landmarks import read_contours, read_landmark_map
from facedetail.model.morphable import MorphableModel

BFM_REMEDY = (
    "The Basel Face Model is licensed per user: request it at faces.dmi.unibas.ch/bfm, then set "
    "face_model.model_path in params.yaml to the file"
)
_MARGIN = 0.02


def cylindrical_uv(mean: np.ndarray) -> np.ndarray:
    """(V, 2) texture coordinates in [margin, 1 - margin] from a cylindrical projection of ``mean``."""
    centred = mean - mean.mean(0)
    angle = np.arctan2(centred[:, 0], centred[:, 2])  # 0 straight ahead (+z)
    height = centred[:, 1]

    def span(x: np.ndarray) -> np.ndarray:
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo if hi > lo else 1.0)

    u = _MARGIN + (1 - 2 * _MARGIN) * span(angle)
    v = _MARGIN + (1 - 2 * _MARGIN) * (1.0 - span(height))  # v down: top of the head at small v
    return np.column_stack([u, v]).astype(np.float32)


def _pca(mean: np.ndarray, basis: np.ndarray, variance_or_std: np.ndarray, *, is_std: bool,
         V: int, path: Path, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.asarray(mean, np.float64).reshape(-1)
    basis = np.asarray(basis, np.float64)
    scale = np.asarray(variance_or_std, np.float64).reshape(-1)
    if mean.size != 3 * V or basis.shape[0] != 3 * V or basis.shape[1] != scale.size:
        raise SourceFileError(path, f"{what} model has inconsistent sizes (mean {mean.size}, basis "
                              f"{basis.shape}, scales {scale.size}, vertices {V})", BFM_REMEDY)
    if not (np.isfinite(basis).all() and np.isfinite(scale).all() and np.isfinite(mean).all()):
        raise SourceFileError(path, f"{what} model contains NaN or infinite values", BFM_REMEDY)
    std = scale if is_std else np.sqrt(np.clip(scale, 0, None))
    norms = np.linalg.norm(basis, axis=0)
    unit = basis / np.where(norms > 0, norms, 1.0)
    std = std * norms  # keep the product std * basis exactly as the file defines it
    return (mean.reshape(V, 3), unit.T.reshape(-1, V, 3), std)


def _finish(name: str, fmt: str, mean: np.ndarray, shape: tuple, expression: tuple | None,
            colour: tuple, triangles: np.ndarray, landmark_map_path: Path, contours_path: Path,
            model_path: Path, unit_note: str) -> MorphableModel:
    V = mean.shape[0]
    landmark_vertices = read_landmark_map(landmark_map_path, V)
    contour_right, contour_left = read_contours(contours_path, V)
    if triangles.ndim != 2 or triangles.shape[1] != 3 or triangles.min() < 0 or triangles.max() >= V:
        raise SourceFileError(model_path, "triangle list is malformed or indexes missing vertices", BFM_REMEDY)
    exp_basis, exp_std = (expression[1], expression[2]) if expression else (
        np.zeros((0, V, 3)), np.zeros(0))
    return MorphableModel(
        name=name, mean=mean.astype(np.float32),
        shape_basis=shape[1].astype(np.float32), shape_std=shape[2].astype(np.float32),
        expression_kind="pca" if expression else "none",
        expression_basis=exp_basis.astype(np.float32), expression_std=exp_std.astype(np.float32),
        expression_names=tuple(f"exp_{k}" for k in range(exp_basis.shape[0])),
        albedo_mean=np.clip(colour[0], 0, 1).astype(np.float32),
        albedo_basis=colour[1].astype(np.float32), albedo_std=colour[2].astype(np.float32),
        albedo_names=tuple(f"albedo_{k}" for k in range(colour[1].shape[0])),
        triangles=triangles.astype(np.int32), uv=cylindrical_uv(mean),
        landmark_vertices=landmark_vertices, contour_right=contour_right, contour_left=contour_left,
        units="mm",
        provenance={
            "format": fmt,
            "units_conversion": unit_note,
            "uv": "cylindrical unwrap of the mean shape (facedetail.model.bfm.cylindrical_uv)",
            "albedo": {"kind": "pca", "source": fmt},
            "licence": "Basel Face Model: licensed per user by the University of Basel",
        },
    )


def load_bfm2017(model_path: Path | str, landmark_map_path: Path | str, contours_path: Path | str) -> MorphableModel:
    """Load ``model2017-1_bfm_nomouth.h5`` (or ``face12``) with its eos iBUG map and contours."""
    import h5py

    model_path = Path(model_path)
    if not model_path.is_file():
        raise SourceFileError(model_path, "BFM 2017 file not found", BFM_REMEDY)
    try:
        with h5py.File(model_path, "r") as hf:
            points = np.asarray(hf["shape/representer/points"])
            V = points.shape[1] if points.shape[0] == 3 else points.shape[0]
            parts = {}
            for part in ("shape", "expression", "color"):
                parts[part] = _pca(hf[f"{part}/model/mean"][()], hf[f"{part}/model/pcaBasis"][()],
                                   hf[f"{part}/model/pcaVariance"][()], is_std=False, V=V, path=model_path,
                                   what=part)
            cells = np.asarray(hf["shape/representer/cells"])
    except (OSError, KeyError) as err:
        raise SourceFileError(model_path, f"not a readable BFM 2017 HDF5 file ({err})", BFM_REMEDY) from None
    triangles = cells.T if cells.shape[0] == 3 and cells.shape[1] != 3 else cells
    return _finish(model_path.stem, "bfm2017", parts["shape"][0], parts["shape"], parts["expression"],
                   parts["color"], np.asarray(triangles, np.int64), Path(landmark_map_path),
                   Path(contours_path), model_path, "none (BFM 2017 is in millimetres)")


def load_bfm2009(model_path: Path | str, landmark_map_path: Path | str, contours_path: Path | str) -> MorphableModel:
    """Load ``01_MorphableModel.mat`` with its eos iBUG map and contours."""
    import scipy.io

    model_path = Path(model_path)
    if not model_path.is_file():
        raise SourceFileError(model_path, "BFM 2009 file not found", BFM_REMEDY)
    try:
        mat = scipy.io.loadmat(str(model_path))
        V = np.asarray(mat["shapeMU"]).size // 3
        mm_per_um = 1e-3
        shape = _pca(np.asarray(mat["shapeMU"]) * mm_per_um, mat["shapePC"], np.asarray(mat["shapeEV"]) * mm_per_um,
                     is_std=True, V=V, path=model_path, what="shape")
        colour = _pca(np.asarray(mat["texMU"]) / 255.0, mat["texPC"], np.asarray(mat["texEV"]) / 255.0,
                      is_std=True, V=V, path=model_path, what="colour")
        triangles = np.asarray(mat["tl"], np.int64) - 1
    except (OSError, KeyError, ValueError, NotImplementedError) as err:
        raise SourceFileError(model_path, f"not a readable BFM 2009 .mat file ({err})", BFM_REMEDY) from None
    triangles = triangles[:, [0, 2, 1]]  # BFM 2009 winds front faces clockwise
    return _finish(model_path.stem, "bfm2009", shape[0], shape, None, colour, triangles,
                   Path(landmark_map_path), Path(contours_path), model_path,
                   "micrometres -> millimetres (x 1e-3); colour [0, 255] -> [0, 1]")
