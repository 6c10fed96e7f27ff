"""Stage ``wild_proxy``: a proxy face (camera, α, β_prior) and a UV texture for every wild photo.

Input: a folder of photos (recursive) or a CSV/Parquet list (path, optional face box and label:
the AffectNet layout), ``input`` in params.yaml. The default profile's input is the synthetic
wild set of ``wild_synth`` (with ground truth) plus the real astronaut photo.

Outputs in ``data/wild_proxy/``: ``proxies.parquet`` (one row per photo, fitted or not, see
facedetail.proxy.pipeline.PROXY_SCHEMA), ``shards/`` (per fitted photo ``texture.png``: RGBA UV
texture, alpha = visibility, and ``json``), ``manifest.parquet`` (the textures),
``quarantine.parquet`` (id, path, reason), ``skipped.parquet`` (entries of the input folder not
taken: hidden, not an image, special files, symlinks, ...), ``duplicates.parquet`` (listed files
not fitted because an earlier one is the same file or has the same bytes), ``contact_sheet.png``
(fits drawn over photos) and ``lineage.json``; accuracy (against the synthetic ground truth and
against eos-py) and the input accounting (``inputs = fitted + quarantined + skipped + duplicates``)
go to ``metrics/wild_proxy.json``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from facedetail.config import content_key, input_path, run_only, set_level
from facedetail.detail.photometric import PhotometricConfig, PhotometricRefiner
from facedetail.dictionary.prior import ExpressionDictionary
from facedetail.errors import SourceFileError
from facedetail.features.landmarks import WILD_PHOTO_DETECTOR, DetectorConfig
from facedetail.io.hashing import params_hash
from facedetail.io.lineage import UNHASHED, input_name
from facedetail.io.shards import build_shards, shard_tasks
from facedetail.io.tables import QUARANTINE_NAME, reason_kind, write_quarantine, write_table
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVChartConfig
from facedetail.proxy.evaluate import proxy_metrics
from facedetail.proxy.fit import FitConfig
from facedetail.proxy.inputs import Listing, LoadConfig, content_duplicates, file_hashes, scan_inputs
from facedetail.proxy.pipeline import (
    OK,
    ProxyShardWorker,
    ProxySpec,
    duplicates_table,
    face_rows,
    proxy_table,
    skipped_table,
)
from facedetail.proxy.sheet import fit_sheet
from facedetail.proxy.texture import TextureConfig
from stages._common import Input, Stage, StageParams, inject_chart, main, model_input, worker_count

NAME = "wild_proxy"
PROXIES = "proxies.parquet"
SKIPPED = "skipped.parquet"
DUPLICATES = "duplicates.parquet"
SHEET = "contact_sheet.png"


DETECTOR = WILD_PHOTO_DETECTOR
"""wild_proxy's detector defaults, shared with ``facedetail prior`` (see :data:`WILD_PHOTO_DETECTOR`)."""


class WildProxyParams(StageParams):
    """Parameters of the ``wild_proxy`` stage (``wild_proxy:`` in params.yaml)."""

    input: str = input_path("data/wild_synth/images")
    """Folder of photos (searched recursively) or a .csv/.parquet list of them."""
    input_root: str = input_path("")
    """Where a list's relative paths start ('' = the list's folder)."""
    outside_symlinks: Literal["follow", "refuse"] = "follow"
    """A symlink in the input folder whose target lies outside it: ``follow`` (fitted, with a
    ``listing_note``; DVC's symlink cache links every tracked file out of its folder) or ``refuse``
    (a ``skipped`` row). Symlinked folders inside the folder are never followed (their files are
    listed where they lie); loops are skipped rows either way. Lists name their files explicitly."""
    model: str = input_path("data/face_model/model.npz")
    """The morphable model the proxies are fitted with."""
    dictionary: str = input_path("data/dictionary")
    """Expression dictionary folder (β_prior lookup)."""
    truth: str = input_path("data/wild_synth/truth.parquet")
    """Ground truth of a synthetic input (α, β, landmarks per listed path), for the accuracy metrics; '' = none."""
    expected: str = input_path("data/wild_synth/bad_examples.parquet")
    """Expected outcome per listed path (file, expected: "quarantine: <kind>" / "usable: <note>"),
    checked into the metrics; '' = none."""
    astronaut: str = set_level("astronaut.png")
    """Input path (as listed) of the real photo whose fit is reported on its own; '' = none."""
    eos_share: str = input_path("data/external/eos-share")
    """eos's share folder (Surrey model + fitting files) for the eos-py comparison; '' = skip it."""
    eos_compare_max: int = set_level(200, ge=0)
    """Fits compared with eos-py (the first N fitted photos by id; eos fits ~16 photos/s)."""
    load: LoadConfig = LoadConfig()
    """Decoding: size limits and the decode-time downscale."""
    detector: DetectorConfig = DETECTOR
    """Face detection and landmarks: the policy for several faces (``all``: one row per face, ids
    ``<photo id>#k``) and the retry, within a pixel budget, when no face is found. Keys not given
    take these defaults (not DetectorConfig's, which keep the other stages' behaviour)."""
    fit: FitConfig = FitConfig()
    """Camera and shape fit."""
    texture: TextureConfig = TextureConfig()
    """UV unwrapping."""
    photometric: PhotometricConfig = PhotometricConfig()
    """The optional photometric refinement of α and the camera after the landmark fit (off by default:
    0.78x the mean face's shape error for ~0.75 s of CPU per photo, ~190x the landmark fit; see the README)."""
    shard_size: int = Field(32, ge=1)
    """Photos per shard (and per fitting batch). A worker holds a shard's decoded photos (up to
    load.max_side² x 3 bytes each) until it is fitted: 32 x 1024² photos is 100 MB, which with one
    decode at load.max_pixels keeps a worker under 1 GB (tests/test_stage_wild_proxy.py measures it)."""
    sheet_faces: int = set_level(16, ge=1)
    """Fits drawn on the contact sheet: the worst by NME, worst first."""
    workers: int = run_only(0, ge=0)
    """Processes; 0 = one per available CPU core."""
    uv_chart: UVChartConfig = UVChartConfig()
    """The shared UV chart (top-level ``uv_chart:`` section): the resolution of the textures."""

    @model_validator(mode="before")
    @classmethod
    def _shared_chart(cls, data: Any) -> Any:
        return inject_chart(data, "texture", "resolution")

    @model_validator(mode="before")
    @classmethod
    def _detector_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("detector"), dict):
            return {**data, "detector": {**DETECTOR.model_dump(), **data["detector"]}}
        return data


def inputs(params: WildProxyParams) -> list[Input]:
    """The photos (a folder or a list), the model and the expression dictionary."""
    return [Input(params.input, "wild_synth"), model_input(params.model),
            Input(params.dictionary, "dictionary", check=ExpressionDictionary.check_folder, kind="folder")]


def build(params: WildProxyParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Fit every listed photo in resumable shards; quarantine the ones that cannot be fitted."""
    start = time.perf_counter()
    source, model_path, dictionary_path = root / params.input, root / params.model, root / params.dictionary
    listing = _listing(params, root, out)
    items = listing.items
    if not items:
        skipped = Counter(reason_kind(s.reason) for s in listing.skipped)
        detail = f" ({', '.join(f'{k}: {n}' for k, n in sorted(skipped.items()))} skipped)" if skipped else ""
        raise SourceFileError(source, f"no photos found{detail}",
                              "Point `wild_proxy.input` at a folder of photos or a list")
    # The photos count by content: a folder's files (or a list's text) were hashed at lineage START.
    key = content_key(params, {"photos": out.input_hash(source), "model": out.input_hash(model_path),
                               "dictionary": out.input_hash(dictionary_path)},
                      switched_off=() if params.photometric.enabled else ("photometric",))
    refine = PhotometricRefiner(params.fit, params.photometric) if params.photometric.enabled else None
    spec = ProxySpec(model_path, dictionary_path, params.load, params.detector, params.fit, params.texture, key,
                     refine)
    by_id = {i.id: i for i in items}
    # Shards are reused only for the same params and the same photo list.
    shard_key = params_hash({"params": key, "items": [[i.id, i.relative, i.box] for i in items]})
    work_dir = root / STAGE.work_dir
    report = build_shards(shard_tasks(list(by_id), params.shard_size, inputs=by_id), work_dir, shard_key,
                          partial(ProxyShardWorker, spec), workers=worker_count(params.workers), desc=NAME,
                          unit="photo")
    rows = [r if r["status"] == OK else {**r, "shard": None}
            for r in face_rows(out.add_shards(report.records, work_dir))]
    if len({r["id"] for r in rows}) != len(rows):  # face ids are <photo id>#k: a clash is a bug, not bad input
        raise RuntimeError("wild_proxy: row ids are not unique")
    good = [r for r in rows if r["status"] == OK]
    bad = [r for r in rows if r["status"] != OK]
    if not good:
        counts = Counter(reason_kind(r.get("reason")) for r in bad)
        raise SourceFileError(source, f"none of the {len(rows)} photos could be fitted: " + ", ".join(
            f"{kind} ({n})" for kind, n in sorted(counts.items())), "Check the input and the detector/fit params")
    model = MorphableModel.load(model_path)
    metrics, columns = proxy_metrics(rows, model, params.fit, astronaut=params.astronaut,
                            expected=root / params.expected if params.expected else None,
                            truth=root / params.truth if params.truth else None,
                            eos_share=root / params.eos_share if params.eos_share else None,
                            eos_compare_max=params.eos_compare_max)
    rows = [{**r, **columns.get(r["id"], {})} for r in rows]
    good = [r for r in rows if r["status"] == OK]
    write_table(out.dir / PROXIES, proxy_table(rows))
    out.write_manifest([{"id": r["id"], "path": None, "shard": r["shard"], "key": r["key"], "sha256": r["sha256"],
                         "bytes": r["bytes"], "seed": None, "params_hash": key, "source": r["path"]} for r in good])
    write_quarantine(out.dir / QUARANTINE_NAME, bad)
    write_table(out.dir / SKIPPED, skipped_table(listing))
    write_table(out.dir / DUPLICATES, duplicates_table(listing))
    out.write_png(SHEET, fit_sheet(worst_first(good)[: params.sheet_faces], by_id, spec.load, model))
    # Timings go to the printed summary, not the metrics: those are byte-identical on rerun.
    out.metrics = {**metrics, **accounting(listing, rows), "params_hash": key}
    return {"inputs": listing.entries, "photos": len(rows), "fitted": len(good), "quarantined": len(bad),
            "skipped": len(listing.skipped), "duplicates": len(listing.duplicates),
            "quarantine_reasons": metrics["quarantine_reasons"], "seconds": round(time.perf_counter() - start, 1),
            "photos_per_second": round(len(rows) / max(report.seconds, 1e-9), 2)}


def _listing(params: WildProxyParams, root: Path, out: StageOutput) -> Listing:
    """The input's listing, byte-identical files taken out as duplicates.

    A folder's files were hashed at lineage START (those hashes are reused); a list's files are
    hashed here, once each.
    """
    source = root / params.input
    listing = scan_inputs(source, root / params.input_root if params.input_root else None, params.outside_symlinks)
    known = {}
    for item in listing.items:
        digest = out.input_hashes.get(input_name(item.path, root))
        if digest is not None and not digest.startswith(UNHASHED):
            known[item.path] = digest
    hashes = file_hashes(listing.items, known, params.load.max_file_bytes)
    return content_duplicates(listing, lambda item: hashes[item.id])


def worst_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fitted rows by NME, worst first (ties by id), so the contact sheet opens on the fits to check."""
    return sorted(rows, key=lambda r: (-r["nme"], r["id"]))


def accounting(listing: Listing, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where every input went: ``inputs = fitted + quarantined + skipped + duplicates``, with the kinds."""
    fitted = sum(r["status"] == OK for r in rows)
    return {
        "inputs": listing.entries,
        "accounted": {"fitted": fitted, "quarantined": len(rows) - fitted, "skipped": len(listing.skipped),
                      "duplicates": len(listing.duplicates)},
        "skipped_reasons": dict(sorted(Counter(reason_kind(s.reason.split(" (")[0]) for s in
                                               listing.skipped).items())),
        "duplicate_reasons": dict(sorted(Counter(d.reason.split(" as ")[0] for d in listing.duplicates).items())),
        "decode_warnings": sum(r.get("decode_warning") is not None for r in rows),
    }


STAGE = Stage(NAME, WildProxyParams, build, inputs, resumable=True,
              headline=("fitted", "nme.median", "eos.ratio_mean"), look_at=(SHEET,),
              limits="Proxies fit dlib's 68 landmarks only.", sources=lambda p, out: ("dlib-68-predictor",))
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
