"""One entry point for every supported morphable-model source format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from facedetail.model.bfm import load_bfm2009, load_bfm2017
from facedetail.model.morphable import MorphableModel
from facedetail.model.sfm import load_sfm

SourceFormat = Literal["sfm", "bfm2017", "bfm2009"]


@dataclass(frozen=True)
class ShareFiles:
    """Names of a format's companion files inside eos's ``share/`` folder."""

    landmark_map: str
    contours: str
    blendshapes: str | None = None


SHARE_FILES: dict[str, ShareFiles] = {
    "sfm": ShareFiles("ibug_to_sfm.txt", "sfm_model_contours.json", "expression_blendshapes_3448.bin"),
    "bfm2017": ShareFiles("ibug_to_bfm2017-1_bfm_nomouth.txt", "bfm2017-1_bfm_nomouth_model_contours.json"),
    "bfm2009": ShareFiles("ibug_to_bfm2009.txt", "bfm2009_model_contours.json"),
}


def source_files(fmt: SourceFormat, model_path: Path | str, share_dir: Path | str) -> list[Path]:
    """Every file the loader of ``fmt`` reads (for hashing and lineage)."""
    share_dir = Path(share_dir)
    names = SHARE_FILES[fmt]
    files = [Path(model_path), share_dir / names.landmark_map, share_dir / names.contours]
    if names.blendshapes:
        files.append(share_dir / names.blendshapes)
    return files


def load_model_source(fmt: SourceFormat, model_path: Path | str, share_dir: Path | str,
                      albedo_components: int = 4) -> MorphableModel:
    """Load a model of format ``fmt`` from ``model_path`` with the landmark files from ``share_dir``.

    ``albedo_components`` applies to the Surrey model's synthetic albedo only; BFM files bring
    their own PCA colour model.
    """
    if fmt not in SHARE_FILES:
        raise ValueError(f"unknown face model format {fmt!r}; expected one of {sorted(SHARE_FILES)}")
    share_dir = Path(share_dir)
    names = SHARE_FILES[fmt]
    lm, ct = share_dir / names.landmark_map, share_dir / names.contours
    if fmt == "sfm":
        return load_sfm(model_path, share_dir / names.blendshapes, lm, ct, albedo_components)
    if fmt == "bfm2017":
        return load_bfm2017(model_path, lm, ct)
    return load_bfm2009(model_path, lm, ct)
