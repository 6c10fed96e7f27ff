"""Loader for the Surrey Face Model as shipped in eos's ``share/`` folder.

``sfm_shape_3448.bin`` is read with eos-py (``eos.morphablemodel.load_model``), which reports
truncated or foreign files as clean errors. The blendshape file is read by our own reader
because eos's reader trusts the length fields of the file: a truncated file makes it try
huge allocations (``std::bad_alloc``); ours checks every length against the bytes that are
there. The tests check our reader against eos-py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from facedetail.errors import SourceFileError
from facedetail.model.albedo import synthetic_skin_albedo
from facedetail.model.landmarks import read_contours, read_landmark_map
from facedetail.model.morphable import MorphableModel, unit_rows

SFM_REMEDY = (
    "Run `make assets` (copies from $FACEDETAIL_ASSET_MIRROR or downloads eos's share/ folder); "
    "the Surrey Face Model is free for non-commercial use, see cvssp.org/facemodel"
)


def read_blendshapes(path: Path | str) -> tuple[list[str], np.ndarray]:
    """Read an eos blendshape file: (names, (K, 3V) float32 deformations)."""
    path = Path(path)
    if not path.is_file():
        raise SourceFileError(path, "blendshape file not found", SFM_REMEDY)
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise SourceFileError(
                path, f"truncated or not an eos blendshape file (needs {n} bytes for {what} at offset {pos}, "
                f"file has {len(data)})", SFM_REMEDY)
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    (count,) = struct.unpack("<Q", take(8, "the count"))
    if count == 0 or count > 1000:
        raise SourceFileError(path, f"implausible blendshape count {count}", SFM_REMEDY)
    names, deformations = [], []
    for i in range(count):
        (name_len,) = struct.unpack("<Q", take(8, f"name length of blendshape {i}"))
        try:
            names.append(take(name_len, f"name of blendshape {i}").decode("utf-8"))
        except UnicodeDecodeError:
            raise SourceFileError(path, f"blendshape {i} has a name that is not UTF-8", SFM_REMEDY) from None
        rows, cols = struct.unpack("<ii", take(8, f"shape of blendshape {i}"))
        if cols != 1 or rows <= 0 or rows % 3:
            raise SourceFileError(path, f"blendshape {i} has an invalid shape {rows}x{cols}", SFM_REMEDY)
        deformations.append(np.frombuffer(take(4 * rows, f"data of blendshape {i}"), dtype="<f4"))
    if pos != len(data):
        raise SourceFileError(path, f"{len(data) - pos} unexpected trailing bytes", SFM_REMEDY)
    if len({d.size for d in deformations}) != 1:
        raise SourceFileError(path, "blendshapes have different vertex counts", SFM_REMEDY)
    return names, np.stack(deformations).astype(np.float32)


def _load_shape_model(path: Path):
    import eos

    if not path.is_file():
        raise SourceFileError(path, "Surrey model file not found", SFM_REMEDY)
    try:
        return eos.morphablemodel.load_model(str(path))
    except (RuntimeError, MemoryError) as err:
        raise SourceFileError(path, f"eos could not read it as a morphable model ({err})", SFM_REMEDY) from None


def load_sfm(model_path: Path | str, blendshapes_path: Path | str, landmark_map_path: Path | str,
             contours_path: Path | str, albedo_components: int = 4) -> MorphableModel:
    """Load the Surrey model, its 6 expression blendshapes, landmark map and contours."""
    model_path, blendshapes_path = Path(model_path), Path(blendshapes_path)
    eos_model = _load_shape_model(model_path)
    shape = eos_model.get_shape_model()
    mean = np.asarray(shape.get_mean(), np.float32).reshape(-1, 3)
    V = mean.shape[0]
    basis = np.asarray(shape.get_orthonormal_pca_basis(), np.float32).T.reshape(-1, V, 3)
    std = np.sqrt(np.asarray(shape.get_eigenvalues(), np.float64)).astype(np.float32)
    triangles = np.asarray(shape.get_triangle_list(), np.int32)
    uv = np.asarray(eos_model.get_texture_coordinates(), np.float32)
    if uv.shape != (V, 2):
        raise SourceFileError(model_path, f"has {len(uv)} texture coordinates for {V} vertices", SFM_REMEDY)

    names, deformations = read_blendshapes(blendshapes_path)
    if deformations.shape[1] != 3 * V:
        raise SourceFileError(
            blendshapes_path, f"blendshapes are for {deformations.shape[1] // 3} vertices, the model has {V} "
            "(they belong to another model resolution)", SFM_REMEDY)
    exp_basis, exp_std = unit_rows(deformations.reshape(-1, V, 3))

    landmark_vertices = read_landmark_map(landmark_map_path, V)
    contour_right, contour_left = read_contours(contours_path, V)
    albedo = synthetic_skin_albedo(mean, landmark_vertices, albedo_components)
    return MorphableModel(
        name=model_path.stem, mean=mean, shape_basis=basis, shape_std=std,
        expression_kind="blendshapes", expression_basis=exp_basis, expression_std=exp_std,
        expression_names=tuple(names), albedo_mean=albedo.mean, albedo_basis=albedo.basis,
        albedo_std=albedo.std, albedo_names=albedo.names, triangles=triangles, uv=uv,
        landmark_vertices=landmark_vertices, contour_right=contour_right, contour_left=contour_left,
        units="mm",
        provenance={
            "format": "sfm",
            "loader": "eos-py (shape model) + facedetail.model.sfm.read_blendshapes",
            "licence": "Surrey Face Model: free for non-commercial use (cvssp.org/facemodel)",
            "albedo": albedo.provenance,
        },
    )
