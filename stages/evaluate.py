"""Stage ``evaluate``: how good the detailed faces are, against truth, with every baseline in the same run.

Two held-out sets, never trained on:

* **capture pairs** (``detail_pairs`` of the subjects ``train_detail`` held out): the network sees the pair's
  texture on its known proxy; truth is the pair's displacement map and the synthetic scan
  (``capture_synth``: noisy, holed, misaligned — aligned here by ICP);
* **wild photos** (``wild_synth`` photos ``train_detail`` held out): the whole path from the photo
  (:class:`facedetail.reconstruct.photo.Reconstructor`, as ``facedetail reconstruct``); truth is the photo's
  true displacement and the true face displaced by its true details.

Rows (:data:`facedetail.reconstruct.evaluate.ROWS`): ours, the proxy alone, the mean patch, the mean map, the
PCA part only, and the network trained with η = 0 (``train_detail_supervised``). Measures: displacement MAE
and RMSE (mm) and detailed-normal error (degrees), per region and overall, inside the mask (truth known,
texel visible and predicted); Chamfer (mm), normal error (degrees) and completeness of the detailed mesh
(:mod:`facedetail.reconstruct.evaluate` says how they follow FaceScape's benchmark and where they differ).

Outputs: ``metrics/evaluate.json`` (flat keys: ``wild.ours.mae_mm``, ``capture.zero.chamfer_mm``, ...; the
claims as booleans), ``metrics/evaluate/by_yaw.csv`` (the wild errors per 15° of |yaw|: ``dvc plots``),
``data/evaluate/scores.parquet`` (every sample x row), ``quarantine.parquet`` (photos that gave no face).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field
from tqdm import tqdm

from facedetail.capture.maps import decode_png, u16_to_displacement
from facedetail.capture.scan import discover_items, load_scan, read_info, scan_path
from facedetail.capture.synthetic import SyntheticDetails
from facedetail.config import content_key, input_path, run_only, set_level
from facedetail.detail.split import is_held_out, subject_of
from facedetail.dictionary.prior import ExpressionDictionary
from facedetail.errors import SourceFileError
from facedetail.features.train import deterministic
from facedetail.io.atomic import atomic_write_text
from facedetail.io.manifest import file_row
from facedetail.io.tables import QUARANTINE_NAME, reason_kind, write_quarantine, write_table
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.inputs import display_name, list_inputs
from facedetail.reconstruct.detailnet import DetailNet, StitchConfig
from facedetail.reconstruct.evaluate import ROWS, Surface, SurfaceConfig, kabsch, mean_baselines
from facedetail.reconstruct.photo import Failure, ReconstructConfig, Reconstructor, resolve_device
from facedetail.reconstruct.scoring import Sample, SampleScorer, by_yaw, summarize
from facedetail.render.detailed import displace
from stages._common import Input, main, model_input
from stages._linked import Link, LinkedStage
from stages.reconstruct import LINKS as RECONSTRUCT_LINKS
from stages.reconstruct import WildPathParams
from stages.train_detail import load_pairs

NAME = "evaluate"
SCORES = "scores.parquet"
BY_YAW = Path("metrics") / NAME / "by_yaw.csv"


class EvaluateParams(WildPathParams):
    """Parameters of the ``evaluate`` stage (``evaluate:`` in params.yaml)."""

    pairs: str = input_path("data/detail_pairs")
    """The capture pairs (the held-out subjects' are scored, the others make the baselines)."""
    capture: str = input_path("data/capture_synth")
    """The capture set whose scans are the capture pairs' true surfaces."""
    wild: str = input_path("data/wild_synth")
    """The synthetic wild set: ``images/`` and ``truth.parquet``."""
    model: str = input_path("data/face_model/model.npz")
    """The morphable model."""
    dictionary: str = input_path("data/dictionary")
    """The expression dictionary (β_prior of the wild photos)."""
    detail_net: str = input_path("data/train_detail/detail_net.safetensors")
    """The network (row ``ours``)."""
    supervised_net: str = input_path("data/train_detail_supervised/detail_net.safetensors")
    """The η = 0 network (row ``supervised_only``); '' = leave the row out."""
    capture_limit: int = set_level(6, ge=0)
    """Held-out capture pairs scored at most (the first by id; 0 = all)."""
    wild_limit: int = set_level(12, ge=0)
    """Held-out wild photos scored at most (the first by id; 0 = all)."""
    stitch: StitchConfig = StitchConfig()
    """Patches and their Gaussian blend (as the reconstruction's)."""
    mesh_levels: int = Field(2, ge=0, le=4)
    """Midpoint subdivisions of the compared meshes (2: 54,208 vertices, ~0.7 mm apart)."""
    surface: SurfaceConfig = SurfaceConfig()
    """How surfaces are aligned and compared."""
    threads: int = Field(2, ge=1)
    """CPU threads of torch (fixed, so that a rerun gives the same numbers).
    NumPy's and every other BLAS run on one thread (:func:`facedetail.features.train.deterministic`)."""
    device: Literal["auto", "cpu", "cuda"] = run_only("cpu")
    """Where the networks run."""
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """Linked: ``train_detail.holdout_fraction`` (capture subjects)."""


def _train_detail() -> Any:
    from stages import train_detail
    return train_detail.STAGE


LINKS = (*RECONSTRUCT_LINKS, Link("holdout_fraction", _train_detail, lambda p: p.holdout_fraction))


def inputs(params: EvaluateParams) -> list[Input]:
    """Pairs, scans, wild set, model, dictionary and both networks."""
    listed = [Input(params.pairs, "detail_pairs", kind="folder", what="capture pairs"),
              Input(params.capture, "capture_synth", kind="folder", what="capture scans"),
              Input(params.wild, "wild_synth", kind="folder", what="synthetic wild set"), model_input(params.model),
              Input(params.dictionary, "dictionary", check=ExpressionDictionary.check_folder, kind="folder"),
              Input(params.detail_net, "train_detail", what="detail network", kind="file")]
    if params.supervised_net:
        listed.append(Input(params.supervised_net, "train_detail_supervised", what="η = 0 network", kind="file"))
    return listed


def build(params: EvaluateParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """Score both held-out sets, every row, and write the metrics and the yaw plot."""
    with deterministic(params.threads):
        return _build(params, root, out)


def _build(params: EvaluateParams, root: Path, out: StageOutput) -> dict[str, Any]:
    started = time.perf_counter()
    device = resolve_device(params.device)
    # One engine for both sets: its network, subdivision and chart serve the capture pairs too (loaded once).
    config = ReconstructConfig(load=params.load, detector=params.detector, fit=params.fit, texture=params.texture,
                               stitch=params.stitch, subdivision_levels=params.mesh_levels, viewer=False)
    engine = Reconstructor(root / params.model, root / params.dictionary, root / params.detail_net, config, device)
    net, model = engine.net, engine.model
    supervised = DetailNet.load(root / params.supervised_net, device) if params.supervised_net else None
    R = net.resolution
    pairs, bad_pairs = load_pairs(root / params.pairs, R, model)
    held = [p for p in pairs if is_held_out(subject_of(p.id), params.holdout_fraction, params.split_seed)]
    held_ids = {p.id for p in held}
    train = [p for p in pairs if p.id not in held_ids and p.displacement is not None and p.dmask is not None]
    if not train:
        raise SourceFileError(root / params.pairs, "no training pair to make the baselines from",
                              "Run `dvc repro detail_pairs` (and check train_detail.holdout_fraction)")
    baselines = mean_baselines([p.displacement for p in train], [p.dmask & p.visible for p in train],  # type: ignore[misc]
                               [net.origins(p.visible & p.dmask, params.stitch) for p in train],  # type: ignore[operator]
                               net.patch)
    scorer = SampleScorer(engine, supervised, baselines, params.surface)
    quarantine: list[dict[str, Any]] = [{"id": r["id"], "path": None, "reason": f"capture pair: {r['reason']}"}
                                        for r in bad_pairs]
    records: list[dict[str, Any]] = []

    capture_scores = []
    scans = _Scans(root / params.capture, params.surface.max_points)
    chosen = sorted(held, key=lambda p: p.id)[:params.capture_limit or None]
    for pair in tqdm(chosen, desc=f"{NAME} capture", unit="pair", disable=None):
        scan = scans.get("/".join(pair.id.split("/")[:2]))
        if scan is None:
            quarantine.append({"id": pair.id, "path": None, "reason": "no scan: capture item not found"})
            continue
        vertices = pair.proxy[:, :3].astype(np.float64)
        sample = Sample(pair.id, pair.texture, pair.visible, vertices, pair.displacement.astype(np.float64),  # type: ignore[union-attr]
                        pair.dmask, scan)  # type: ignore[arg-type]
        scores = scorer.score(sample)
        capture_scores.append(scores)
        records += _records("capture", pair.id, None, scores)

    wild_scores, yaws = [], []
    truth = {r["file"]: r for r in pq.read_table(root / params.wild / "truth.parquet").to_pylist()}
    items = sorted((i for i in list_inputs(root / params.wild / "images")
                    if is_held_out(i.id, params.wild_holdout_fraction, params.split_seed)), key=lambda i: i.id)
    no_truth = [i for i in items if i.relative not in truth]
    items = [i for i in items if i.relative in truth][:params.wild_limit or None]
    try:
        for item in tqdm(items, desc=f"{NAME} wild", unit="photo", disable=None):
            t = truth[item.relative]
            results = engine.reconstruct(item.path, item.id)
            result = results[0]
            if isinstance(result, Failure):
                quarantine.append({"id": item.id, "path": display_name(item.relative), "reason": result.reason})
                continue
            sample = _wild_sample(item.id, result, t, root / params.wild, model, scorer)
            scores = scorer.score(sample)
            wild_scores.append(scores)
            yaws.append(float(t["yaw_deg"]))
            records += _records("wild", item.id, float(t["yaw_deg"]), scores)
    finally:
        engine.close()

    write_table(out.dir / SCORES, pa.Table.from_pylist(sorted(records, key=lambda r: (r["set"], r["id"], r["row"]))))
    write_quarantine(out.dir / QUARANTINE_NAME, quarantine)
    table = by_yaw(wild_scores, yaws)
    out.deferred.append(lambda: _write_csv(root / BY_YAW, table))
    metrics: dict[str, Any] = {"capture": summarize(capture_scores), "wild": summarize(wild_scores)}
    reasons = Counter(reason_kind(q["reason"]) for q in quarantine)
    metrics["samples"] = {"capture": len(capture_scores), "wild": len(wild_scores),
                          "wild_without_truth": len(no_truth), "failed": len(quarantine),
                          "failure_reasons": dict(sorted(reasons.items()))}
    metrics["claims"] = _claims(metrics)
    key = content_key(params, {k: out.input_hash(root / getattr(params, k)) for k in
                               ("pairs", "capture", "wild", "model", "dictionary", "detail_net")
                               + (("supervised_net",) if params.supervised_net else ())})
    metrics["params_hash"] = key
    out.metrics = metrics
    out.write_manifest([_file_row(out, SCORES, key), _file_row(out, QUARANTINE_NAME, key)])
    return {"capture_samples": len(capture_scores), "wild_samples": len(wild_scores), "failed": len(quarantine),
            "wild_ours_mae_mm": metrics["wild"].get("ours", {}).get("mae_mm"),
            "wild_zero_mae_mm": metrics["wild"].get("zero", {}).get("mae_mm"),
            "seconds": round(time.perf_counter() - started, 1)}


def _file_row(out: StageOutput, name: str, key: str) -> dict[str, Any]:
    return file_row(out.dir, name, item_id=name, params_hash=key, kind=Path(name).stem)


class _Scans:
    """The capture scans as :class:`Surface` s, each read on first use (~10 MB each: only scored items are read)."""

    def __init__(self, folder: Path, max_points: int) -> None:
        self.max_points = max_points
        self.items = {i.id: i for i in discover_items(folder) if i.problem is None}
        self.loaded: dict[str, Surface] = {}

    def get(self, item_id: str) -> Surface | None:
        """The scan of ``item_id`` (None: no such capture item)."""
        if item_id not in self.items:
            return None
        if item_id not in self.loaded:
            item = self.items[item_id]
            info = read_info(item)
            mesh = load_scan(scan_path(item, info), info.units)
            surface = Surface(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.vertex_normals, np.float64))
            self.loaded[item_id] = surface.subsample(self.max_points)
        return self.loaded[item_id]


def _wild_sample(sample_id: str, result: Any, truth: dict[str, Any], wild: Path, model: MorphableModel,
                 scorer: SampleScorer) -> Sample:
    """A reconstructed wild photo with its truth: the displacement map and the true detailed surface."""
    true_d = u16_to_displacement(decode_png(wild / truth["displacement_png"]),
                                 float(truth["displacement_scale_mm"])).astype(np.float64)
    details = SyntheticDetails.from_json(json.loads(truth["details"])["details"])
    true_vertices = model.vertices(np.asarray(truth["alpha"]), np.asarray(truth["beta"])).astype(np.float64)
    base = scorer.meshes.map.proxy(model, true_vertices)
    surface = displace(base, details)
    initial = kabsch(result.proxy_vertices, true_vertices)
    return Sample(sample_id, result.texture, result.visible, result.proxy_vertices, true_d, scorer.chart.copy(),
                  Surface(surface.vertices, surface.normals), initial, float(truth["yaw_deg"]))


def _records(kind: str, sample_id: str, yaw: float | None, scores: dict[str, dict[str, float | None]]) -> list[dict]:
    return [{"set": kind, "id": sample_id, "row": row, "yaw_deg": yaw, **values} for row, values in scores.items()]


def _claims(metrics: dict[str, Any]) -> dict[str, bool | None]:
    """The questions the evaluation answers, as booleans (None: not measured)."""
    out: dict[str, bool | None] = {}
    for kind in ("capture", "wild"):
        rows = metrics[kind]
        ours = rows.get("ours", {})
        for baseline in ("zero", "mean_patch", "mean_map", "pca_only", "supervised_only"):
            for measure in ("mae_mm", "chamfer_mm"):
                a, b = ours.get(measure), rows.get(baseline, {}).get(measure)
                out[f"{kind}_ours_beats_{baseline}_{measure.split('_')[0]}"] = None if a is None or b is None else a < b
    return out


def _write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    columns = ["yaw_deg", "samples"] + [f"{r}_{m}" for r in ROWS for m in ("chamfer_mm", "mae_mm")]
    lines = [",".join(columns)]
    for line in table:
        lines.append(",".join("" if line.get(c) is None else str(line.get(c)) for c in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


STAGE = LinkedStage(NAME, EvaluateParams, build, inputs,
                    headline=("wild.ours.mae_mm", "wild.zero.mae_mm", "wild.ours.chamfer_mm"), links=LINKS,
                    sources=lambda p, out: ("dlib-68-predictor",),
                    limits="Synthetic truth only; a few held-out samples; one seed.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
