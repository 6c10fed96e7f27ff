"""Capture items end to end in worker processes, resumable after a kill.

:class:`CaptureWorker` turns one capture item into its four map files (in a folder it is
given) and the manifest rows that describe them, or into a rejection with its reason.

:func:`process_items` runs it over every item, each in ``WORK/<item id>/`` of a persistent work
folder, and writes a completion record ``WORK/<item id>.done.json`` (the stage's key, a hash of
the item's input files, and the whole result: rows with each file's sha256 and size, facts,
patch counts, timing; or the rejection) after the item's files are complete. A rerun re-uses
every item whose record exists, whose key and inputs match and whose files still hash as
recorded; anything else (no record, another key, changed inputs, a missing or altered file, the
temporary files of a killed write) is cleared and built again. As with
:func:`facedetail.io.shards.build_shards`, a file without a record is never counted.

:func:`link_items` then puts the finished files into an output folder as hard links, at the
manifest rows' paths ``maps/<item id>/<file>``.

Results do not depend on what was re-used: a freshly built item returns its result as read
back from its record, so built and re-used items give the same values.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from facedetail.capture.maps import MAP_FILES, write_item_maps
from facedetail.capture.parallel import map_items
from facedetail.capture.patches import face_regions, patch_origins
from facedetail.capture.process import CaptureConfig, process_capture
from facedetail.capture.scan import CaptureError, CaptureItem
from facedetail.config import Config
from facedetail.errors import InterruptedRunError
from facedetail.io.atomic import atomic_write_text, remove_stale_temps
from facedetail.io.files import link_or_copy
from facedetail.io.hashing import listing_hash, sha256_file
from facedetail.io.manifest import file_row
from facedetail.io.seeds import derive_seed, item_rng
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import rasterize_uv

MAPS = "maps"
"""Folder of the maps in an output folder: manifest rows' paths are ``maps/<item id>/<file>``."""
TIMING_FACTS = ("seconds", "extract_seconds")
"""Facts that vary from run to run: in the result's ``timing``, never in the rows (so never in manifest or metrics)."""
RECORD_SUFFIX = ".done.json"
_RECORD_VERSION = 1


class PatchCountConfig(Config):
    """Training patches counted per region in the metrics (cut by ``facedetail.capture.patches``)."""

    size: int = Field(256, ge=8)
    """Patch side in texels (the paper: 256)."""
    stride: int = Field(64, ge=1)
    """Step between patches (the paper: 64)."""
    min_valid: float = Field(0.5, ge=0, le=1)
    """Least valid fraction of a patch's texels for it to count."""
    overlap: int = Field(128, ge=0)
    """Texels each face region extends past the nose-tip line."""


def patch_counts(model: MorphableModel, mask: np.ndarray, config: PatchCountConfig) -> dict[str, int]:
    """Patches of each face region (upper, lower) that ``mask`` makes valid."""
    regions = face_regions(model, mask.shape[0], config.overlap)
    return {name: len(patch_origins(mask, box, config.size, config.stride, config.min_valid))
            for name, box in regions.items()}


class CaptureWorker:
    """Processes items in one process: holds the model and its UV raster, writes an item's maps into a folder."""

    def __init__(self, model_path: Path, config: CaptureConfig, seed: int, stage: str, key: str,
                 patches: PatchCountConfig) -> None:
        self.model = MorphableModel.load(model_path)
        self.raster = rasterize_uv(self.model.uv, self.model.triangles, config.resolution)
        self.config = config
        self.seed = seed
        self.stage = stage
        """Stage name in the per-item seed ``derive_seed(seed, stage, item id)``."""
        self.key = key
        """The rows' ``params_hash``."""
        self.patches = patches

    def __call__(self, item: CaptureItem, folder: Path) -> dict[str, Any]:
        """Write ``item``'s maps into ``folder``.

        Returns ``{"id", "rows", "timing", "patches"}`` for a processed item (rows' paths are
        ``maps/<item id>/<file>``, their hashes those of the files in ``folder``) or
        ``{"id", "path", "reason"}`` for a rejected one (nothing written).
        """
        seed = derive_seed(self.seed, self.stage, item.id)
        try:
            result = process_capture(item, self.model, self.raster, self.config,
                                     item_rng(self.seed, self.stage, item.id))
        except CaptureError as err:
            return {"id": item.id, "path": item.id, "reason": str(err)}
        except (InterruptedRunError, MemoryError):
            raise  # not this item's fault: the run itself must stop
        except Exception as err:  # anything else one item's files provoke: report it, go on
            return {"id": item.id, "path": item.id, "reason": f"unexpected error: {type(err).__name__}: {err}"}
        folder = Path(folder)
        maps = result.maps
        clipped = write_item_maps(folder, maps.displacement, maps.mask, maps.normals, self.config.png_scale_mm)
        facts = {k: v for k, v in result.facts.items() if k not in TIMING_FACTS}
        facts["scan_units"] = facts.pop("units", None)  # the declared input unit; the maps are in mm
        facts.update(png_scale_mm=self.config.png_scale_mm, png_clipped_texels=clipped, units="mm")
        # Hash and size from the file in the work folder; the path is where the output folder will have it.
        rows = [{**file_row(folder, name, item_id=f"{item.id}/{kind}", seed=seed, params_hash=self.key,
                            kind=kind, **facts), "path": map_path(item.id, name)}
                for kind, name in MAP_FILES.items()]
        return {"id": item.id, "rows": rows, "timing": {k: result.facts[k] for k in TIMING_FACTS},
                "patches": patch_counts(self.model, maps.mask, self.patches)}


def map_path(item_id: str, name: str) -> str:
    """Path of one map file relative to the output folder: ``maps/<item id>/<name>``."""
    return f"{MAPS}/{item_id}/{name}"


# --- resumable processing ---------------------------------------------------------------------


class ItemWorker(Protocol):
    """Processes one item, writing its files into ``folder``; returns a JSON-able result (as :class:`CaptureWorker`)."""

    def __call__(self, item: CaptureItem, folder: Path) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ItemsReport:
    """What :func:`process_items` did."""

    results: list[dict[str, Any]]
    """One result per item, in the items' order (processed: has ``rows``; rejected: has ``reason``)."""
    built: int
    reused: int
    seconds: float


def record_path(work_dir: Path, item_id: str) -> Path:
    """Completion record of one item: ``work_dir/<item id>.done.json`` (beside its folder)."""
    return Path(work_dir) / f"{item_id}{RECORD_SUFFIX}"


def work_path(work_dir: Path, row_path: str) -> Path:
    """The work-folder file behind a manifest row's path: ``maps/<id>/<file>`` -> ``work_dir/<id>/<file>``."""
    return Path(work_dir) / PurePosixPath(row_path).relative_to(MAPS)


def input_digest(item: CaptureItem) -> str:
    """:func:`listing_hash` of the item's folder (relative paths and contents): a changed input is rebuilt.

    Equal to the stage's ``out.input_hash(folder)``, which reuses the hashes taken at lineage START.
    """
    folder = Path(item.folder)
    return listing_hash({p.relative_to(folder).as_posix(): sha256_file(p)
                         for p in sorted(folder.rglob("*")) if p.is_file()})


def completed_item(work_dir: Path, item: CaptureItem, key: str, inputs: str | None = None) -> dict[str, Any] | None:
    """The recorded result of ``item`` if its record is complete, made with ``key`` from the same inputs, and intact.

    ``inputs`` is the item's :func:`input_digest` when already known. Cheap checks first (record,
    key, id, file sizes), then the hashes of the inputs and of the files.
    """
    path = record_path(work_dir, item.id)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        result = record["result"]
        if (record["version"] != _RECORD_VERSION or record["key"] != key or record["id"] != item.id
                or result["id"] != item.id):
            return None
        files = [(work_path(work_dir, row["path"]), row) for row in result.get("rows", [])]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError):
        return None
    if not all(f.is_file() and f.stat().st_size == row["bytes"] for f, row in files):
        return None
    if record["inputs"] != (inputs if inputs is not None else input_digest(item)):
        return None
    if not all(sha256_file(f) == row["sha256"] for f, row in files):
        return None
    return result


def clear_item(work_dir: Path, item_id: str) -> None:
    """Remove whatever a previous attempt left of one item: record first (so nothing looks complete), then files."""
    record = record_path(work_dir, item_id)
    record.unlink(missing_ok=True)
    remove_stale_temps(record)  # a record being written when the run was killed
    shutil.rmtree(Path(work_dir) / item_id, ignore_errors=True)  # its map files and their temporaries


class _RecordingWorker:
    """Runs an :class:`ItemWorker` in a pool process and writes each item's record once its files are complete.

    Written here, per item, not by the parent after the pool: a kill must leave every item
    finished so far recorded.
    """

    def __init__(self, factory: Callable[[], ItemWorker], work_dir: Path, key: str) -> None:
        self.worker = factory()
        self.work_dir = Path(work_dir)
        self.key = key

    def __call__(self, task: tuple[CaptureItem, str | None]) -> dict[str, Any]:
        item, inputs = task
        if inputs is None:
            inputs = input_digest(item)  # before reading them: a change while processing shows at the next check
        result = self.worker(item, self.work_dir / item.id)
        record = {"version": _RECORD_VERSION, "id": item.id, "key": self.key, "inputs": inputs, "result": result}
        # Key order kept (not sorted), so a result read back equals the one built, dicts included.
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        atomic_write_text(record_path(self.work_dir, item.id), text + "\n")
        return json.loads(text)["result"]


def process_items(items: Sequence[CaptureItem], work_dir: Path, key: str,
                  worker_factory: Callable[[], ItemWorker], workers: int = 1, desc: str = "items",
                  unit: str = "item", input_digests: Mapping[str, str] | None = None) -> ItemsReport:
    """Results of every item: re-used from ``work_dir`` where complete (:func:`completed_item`), built otherwise.

    ``key`` is the hash of everything besides the item's own files that determines a result
    (params, model). Items to build are first cleared (:func:`clear_item`), then run through
    :func:`facedetail.capture.parallel.map_items` with ``workers`` processes; ``worker_factory``
    must be picklable (a ``functools.partial`` of :class:`CaptureWorker`). A kill or a dead
    worker leaves every finished item recorded: run again to resume.

    ``input_digests`` (item id -> :func:`input_digest`) spares hashing the inputs a second time
    where the caller already has their hashes; by default each item's folder is hashed here.
    """
    started = time.perf_counter()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # Hashing is I/O and hashlib releases the GIL: threads check many records at once.
    digests = {item.id: None if input_digests is None else input_digests[item.id] for item in items}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = list(pool.map(lambda item: completed_item(work_dir, item, key, digests[item.id]), items))
    todo = [item for item, result in zip(items, found, strict=True) if result is None]
    for item in todo:
        clear_item(work_dir, item.id)
    built = map_items(partial(_RecordingWorker, worker_factory, work_dir, key),
                      [(item, digests[item.id]) for item in todo], workers, desc=desc, unit=unit,
                      work_dir=work_dir, labels=[item.id for item in todo])
    fresh = {item.id: result for item, result in zip(todo, built, strict=True)}
    results = [fresh[item.id] if result is None else result for item, result in zip(items, found, strict=True)]
    return ItemsReport(results, len(todo), len(items) - len(todo), time.perf_counter() - started)


def link_items(results: Sequence[dict[str, Any]], work_dir: Path, out_dir: Path) -> dict[str, str]:
    """Hard-link the files of every processed result from ``work_dir`` into ``out_dir`` at their rows' paths.

    Returns ``{path relative to out_dir: sha256}`` of the linked files (hashes not to recompute).
    """
    known = {}
    for result in results:
        for row in result.get("rows", []):
            link_or_copy(work_path(work_dir, row["path"]), Path(out_dir) / row["path"])
            known[row["path"]] = row["sha256"]
    return known
