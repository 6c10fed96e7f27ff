"""Stage ``reconstruct``: the end product on photos the network never saw, as a gallery.

Runs :class:`facedetail.reconstruct.photo.Reconstructor` — the function behind ``facedetail reconstruct`` — over
the held-out wild photos (the photos of ``wild_synth`` that ``train_detail`` held out, by the same split; or
every photo of ``input``, a folder or list, with ``heldout_only: false``), at most ``limit`` of them by id.
Decoding, face finding, the fit and the unwrap take ``wild_proxy``'s params (linked, not copied); the split
takes ``train_detail``'s.

Outputs in ``data/reconstruct/``: ``faces/<name>/`` (every file of the command: meshes, maps, preview),
``gallery.png`` (the previews in a labelled grid: ``dvc plots show``), ``quarantine.parquet`` (photos that
gave no face, with the reason), ``manifest.parquet``; counts in ``metrics/reconstruct.json``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from facedetail.config import content_key, input_path, run_only, set_level
from facedetail.detail.split import is_held_out
from facedetail.dictionary.prior import ExpressionDictionary
from facedetail.errors import SourceFileError
from facedetail.features.landmarks import DetectorConfig
from facedetail.features.train import deterministic
from facedetail.io.images import decode_png
from facedetail.io.manifest import file_row
from facedetail.io.tables import QUARANTINE_NAME, reason_kind, write_quarantine
from facedetail.io.transaction import StageOutput
from facedetail.proxy.fit import FitConfig
from facedetail.proxy.inputs import InputItem, LoadConfig, display_name, list_inputs
from facedetail.proxy.texture import TextureConfig
from facedetail.reconstruct.detailnet import StitchConfig
from facedetail.reconstruct.photo import FaceResult, Failure, ReconstructConfig, Reconstructor, resolve_device
from facedetail.render.sheet import label_grid
from stages._common import Input, StageParams, main, model_input
from stages._linked import Link, LinkedStage

NAME = "reconstruct"
FACES, GALLERY = "faces", "gallery.png"


class WildPathParams(StageParams):
    """The params a stage that runs photos through the wild-photo path shares with ``wild_proxy`` and
    ``train_detail`` (every field linked: see :data:`LINKS`)."""

    load: LoadConfig = LoadConfig()
    """Linked: ``wild_proxy.load``."""
    detector: DetectorConfig = DetectorConfig()
    """Linked: ``wild_proxy.detector``."""
    fit: FitConfig = FitConfig()
    """Linked: ``wild_proxy.fit``."""
    texture: TextureConfig = TextureConfig()
    """Linked: ``wild_proxy.texture`` (its resolution is the detail network's chart)."""
    wild_holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """Linked: ``train_detail.wild_holdout_fraction``."""
    split_seed: int = 7
    """Linked: ``train_detail.split_seed``."""


class ReconstructParams(WildPathParams):
    """Parameters of the ``reconstruct`` stage (``reconstruct:`` in params.yaml)."""

    input: str = input_path("data/wild_synth/images")
    """A folder or .csv/.parquet list of photos."""
    heldout_only: bool = True
    """Only the photos ``train_detail`` held out of its wild textures (by the same split), as an unseen test set."""
    model: str = input_path("data/face_model/model.npz")
    """The morphable model."""
    dictionary: str = input_path("data/dictionary")
    """The expression dictionary (β_prior)."""
    detail_net: str = input_path("data/train_detail/detail_net.safetensors")
    """The trained detail network."""
    limit: int = set_level(8, ge=0)
    """Photos reconstructed at most (the first by id; 0 = all): each face's files took ~20 MB at 2 subdivisions."""
    stitch: StitchConfig = StitchConfig()
    """Patches and their Gaussian blend."""
    subdivision_levels: int = Field(2, ge=0, le=5)
    """Midpoint subdivisions of ``detailed.obj`` (2: 54,208 vertices; the command's default 3: 216,192)."""
    viewer: bool = False
    """Also write each face's ``view.html`` (the mesh embedded)."""
    preview_size: int = set_level(256, ge=64)
    """Side of each preview tile."""
    gallery_columns: int = set_level(2, ge=1)
    """Previews per row of the gallery."""
    threads: int = Field(1, ge=1)
    """CPU threads of torch (fixed, so that a rerun writes the same bytes).
    NumPy's and every other BLAS run on one thread (:func:`facedetail.features.train.deterministic`)."""
    device: Literal["auto", "cpu", "cuda"] = run_only("cpu")
    """Where the network runs (``cuda`` results differ from the CPU's in their last bits)."""

    def config(self) -> ReconstructConfig:
        """The library config these params describe."""
        return ReconstructConfig(load=self.load, detector=self.detector, fit=self.fit, texture=self.texture,
                                 stitch=self.stitch, subdivision_levels=self.subdivision_levels, viewer=self.viewer,
                                 preview_size=self.preview_size)


def _wild_proxy() -> Any:
    from stages import wild_proxy
    return wild_proxy.STAGE


def _train_detail() -> Any:
    from stages import train_detail
    return train_detail.STAGE


LINKS = (Link("load", _wild_proxy, lambda p: p.load), Link("detector", _wild_proxy, lambda p: p.detector),
         Link("fit", _wild_proxy, lambda p: p.fit), Link("texture", _wild_proxy, lambda p: p.texture),
         Link("wild_holdout_fraction", _train_detail, lambda p: p.wild_holdout_fraction),
         Link("split_seed", _train_detail, lambda p: p.split_seed))


def inputs(params: ReconstructParams) -> list[Input]:
    """The photos, the model, the dictionary and the detail network."""
    return [Input(params.input, "wild_synth", what="photos"), model_input(params.model),
            Input(params.dictionary, "dictionary", check=ExpressionDictionary.check_folder, kind="folder"),
            Input(params.detail_net, "train_detail", what="detail network", kind="file")]


def photos(params: ReconstructParams, root: Path) -> list[InputItem]:
    """The photos to reconstruct: the listed ones, or the held-out wild photos; the first ``limit`` by id."""
    items = list_inputs(root / params.input)
    if params.heldout_only:
        items = [i for i in items if is_held_out(i.id, params.wild_holdout_fraction, params.split_seed)]
    items = sorted(items, key=lambda i: i.id)
    return items[:params.limit] if params.limit else items


def build(params: ReconstructParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Reconstruct every chosen photo; quarantine the ones that give no face; draw the gallery."""
    with deterministic(params.threads):
        return _build(params, root, out)


def _build(params: ReconstructParams, root: Path, out: StageOutput) -> dict[str, Any]:
    started = time.perf_counter()
    items = photos(params, root)
    if not items:
        raise SourceFileError(root / params.input, "no photo to reconstruct",
                              "Point `reconstruct.input` at photos (or set heldout_only: false)")
    key = content_key(params, {"photos": out.input_hash(root / params.input),
                               "model": out.input_hash(root / params.model),
                               "dictionary": out.input_hash(root / params.dictionary),
                               "detail_net": out.input_hash(root / params.detail_net)})
    engine = Reconstructor(root / params.model, root / params.dictionary, root / params.detail_net, params.config(),
                           resolve_device(params.device))
    faces: list[FaceResult] = []
    bad: list[dict[str, Any]] = []
    seconds: Counter[str] = Counter()
    try:
        for item in items:
            for result in engine.reconstruct(item.path, item.id):
                if isinstance(result, Failure):
                    bad.append({"id": item.id, "path": display_name(item.relative), "reason": result.reason})
                    continue
                engine.write(result, out.dir / FACES)
                seconds.update(result.seconds)
                faces.append(result)
    finally:
        engine.close()
    rows = [file_row(out.dir, f.relative_to(out.dir).as_posix(), item_id=f.relative_to(out.dir).as_posix(),
                     params_hash=key, kind=f.name)
            for f in sorted((out.dir / FACES).rglob("*")) if f.is_file()]
    if faces:
        previews = [decode_png((out.dir / FACES / f.name / "preview.png").read_bytes()) for f in faces]
        labels = [f"{f.name}  |d| {float(np.abs(f.maps.displacement[f.maps.covered]).mean()):.3f} mm" for f in faces]
        out.write_png(GALLERY, label_grid(previews, labels, params.gallery_columns))
        rows.append(file_row(out.dir, GALLERY, item_id=GALLERY, params_hash=key, kind="gallery"))
    out.write_manifest(rows)
    write_quarantine(out.dir / QUARANTINE_NAME, bad)
    reasons = dict(sorted(Counter(reason_kind(r["reason"]) for r in bad).items()))
    out.metrics = {"photos": len(items), "faces": len(faces), "failed": len(bad), "failure_reasons": reasons,
                   "patches_mean": round(float(np.mean([f.maps.patches for f in faces])), 1) if faces else None,
                   "mean_abs_displacement_mm": round(float(np.mean([np.abs(f.maps.displacement[f.maps.covered]).mean()
                                                                     for f in faces])), 6) if faces else None,
                   "detailed_vertices": engine.meshes.n_vertices, "params_hash": key}
    per_face = {k: round(v / max(len(faces), 1), 3) for k, v in sorted(seconds.items())}
    return {"photos": len(items), "faces": len(faces), "failed": len(bad), "seconds_per_face": per_face,
            "seconds": round(time.perf_counter() - started, 1)}


STAGE = LinkedStage(NAME, ReconstructParams, build, inputs, headline=("faces", "failed", "mean_abs_displacement_mm"),
                    look_at=(GALLERY,), links=LINKS, sources=lambda p, out: ("dlib-68-predictor",),
                    limits="Details from a network that does not beat the zero displacement (see evaluate).")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
