"""Stage ``wild_proxy``: a proxy face (camera, α, β_prior) and a UV texture for every wild photo.

Input: a folder of photos (recursive) or a CSV/Parquet list (path, optional face box and label:
the AffectNet layout), ``input`` in params.yaml. The default profile's input is the synthetic
wild set of ``wild_synth`` (with ground truth) plus the real astronaut photo.

Outputs in ``data/wild_proxy/``: ``proxies.parquet`` (one row per photo, fitted or not, see
facedetail.proxy.pipeline.PROXY_SCHEMA), ``shards/`` (per fitted photo ``texture.png``: RGBA UV
texture, alpha = visibility, and ``json``), ``manifest.parquet`` (the textures),
``quarantine.parquet`` (id, path, reason), ``contact_sheet.png`` (fits drawn over photos) and
``lineage.json``; accuracy (against the synthetic ground truth and against eos-py) goes to
``metrics/wild_proxy.json``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from facedetail.errors import SourceFileError
from facedetail.features.landmarks import DetectorConfig
from facedetail.io import MANIFEST_NAME, atomic_directory, write_manifest
from facedetail.io.atomic import atomic_write_bytes
from facedetail.io.hashing import params_hash, sha256_file
from facedetail.io.images import encode_png
from facedetail.io.lineage import ParentRef
from facedetail.io.shards import build_shards, shard_tasks
from facedetail.io.tables import write_quarantine, write_table
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import FitConfig, ProxyFitter
from facedetail.proxy.inputs import LoadConfig, list_inputs, load_photo
from facedetail.proxy.pipeline import (
    OK,
    ProxyShardWorker,
    ProxySpec,
    fit_to_photo,
    photo_to_fit,
    project_row,
    proxy_table,
    to_decoded,
)
from facedetail.proxy.texture import TextureConfig
from facedetail.render.faces import boundary_loops
from facedetail.render.sheet import label_grid
from stages._common import (
    Stage,
    StageParams,
    StageResult,
    hash_outputs,
    lineage_run,
    link_shards,
    main,
    worker_count,
    write_json,
)

NAME = "wild_proxy"
OUT_DIR = Path("data/wild_proxy")
WORK_DIR = Path("data/.partial") / NAME
METRICS = Path("metrics/wild_proxy.json")
SHARDS = "shards"
PROXIES = "proxies.parquet"
QUARANTINE = "quarantine.parquet"
SHEET = "contact_sheet.png"


class WildProxyParams(StageParams):
    """Parameters of the ``wild_proxy`` stage (``wild_proxy:`` in params.yaml)."""

    input: str = "data/wild_synth/images"
    """Folder of photos (searched recursively) or a .csv/.parquet list of them."""
    input_root: str = ""
    """Where a list's relative paths start ('' = the list's folder)."""
    model: str = "data/face_model/model.npz"
    """The morphable model the proxies are fitted with."""
    dictionary: str = "data/dictionary"
    """Expression dictionary folder (β_prior lookup)."""
    truth: str = "data/wild_synth/truth.parquet"
    """Ground truth of a synthetic input (α, β, landmarks per listed path), for the accuracy metrics; '' = none."""
    expected: str = "data/wild_synth/bad_examples.parquet"
    """Expected outcome per listed path (file, expected: "quarantine: <kind>" / "usable: <note>"),
    checked into the metrics; '' = none."""
    astronaut: str = "astronaut.png"
    """Input path (as listed) of the real photo whose fit is reported on its own; '' = none."""
    eos_share: str = "../shared/assets/eos-share"
    """eos's share folder (Surrey model + fitting files) for the eos-py comparison; '' = skip it."""
    eos_compare_max: int = Field(200, ge=0)
    """Fits compared with eos-py (the first N fitted photos by id; eos fits ~16 photos/s)."""
    load: LoadConfig = LoadConfig()
    """Decoding: size limits and the decode-time downscale."""
    detector: DetectorConfig = DetectorConfig()
    """Face detection and landmarks (policy for several faces included)."""
    fit: FitConfig = FitConfig()
    """Camera and shape fit."""
    texture: TextureConfig = TextureConfig()
    """UV unwrapping."""
    shard_size: int = Field(64, ge=1)
    """Photos per shard (and per fitting batch). A worker holds a shard's decoded photos (up to
    load.max_side² x 3 bytes each) until it is fitted: 64 x 1024² photos is 200 MB per process."""
    sheet_faces: int = Field(16, ge=1)
    """Fits drawn on the contact sheet."""
    workers: int = Field(0, ge=0)
    """Processes; 0 = one per available CPU core."""


def run(params: WildProxyParams, root: Path, parent: ParentRef | None = None) -> StageResult:
    """Fit every photo of ``params.input``."""
    root = Path(root)
    source = root / params.input
    model_path = root / params.model
    dictionary_path = root / params.dictionary
    for path, stage in ((source, "wild_synth"), (model_path, "face_model"), (dictionary_path, "dictionary")):
        if not path.exists():
            raise SourceFileError(path, "input not found", f"Run `dvc repro {stage}` first (or fix the path)")
    lineage = lineage_run(NAME, params, [source, model_path, dictionary_path], root, parent=parent)
    start = time.perf_counter()
    try:
        items = list_inputs(source, root / params.input_root if params.input_root else None)
        if not items:
            raise SourceFileError(source, "no photos found", "Point `wild_proxy.input` at a folder of photos or a list")
        key = params_hash({**params.model_dump(mode="json", exclude={"workers", "eos_compare_max", "sheet_faces"}),
                           "model_sha256": sha256_file(model_path),
                           "dictionary_sha256": sha256_file(dictionary_path / "index.faiss")})
        spec = ProxySpec({i.id: i for i in items}, model_path, dictionary_path, params.load, params.detector,
                         params.fit, params.texture, key)
        tasks = shard_tasks([i.id for i in items], params.shard_size)
        work_dir = root / WORK_DIR
        # Shards are reused only for the same params and the same photo list.
        shard_key = params_hash({"params": key, "items": [[i.id, i.relative, i.box] for i in items]})
        report = build_shards(tasks, work_dir, shard_key, partial(ProxyShardWorker, spec),
                              workers=worker_count(params.workers), desc=NAME, unit="photo")
        rows = _with_shards(report.records)
        good = [r for r in rows if r["status"] == OK]
        bad = [r for r in rows if r["status"] != OK]
        if not good:
            counts = Counter(reason_kind(r.get("reason")) for r in bad)
            raise SourceFileError(source, f"none of the {len(rows)} photos could be fitted: " + ", ".join(
                f"{kind} ({n})" for kind, n in sorted(counts.items())), "Check the input and the detector/fit params")
        out_dir = root / OUT_DIR
        model = MorphableModel.load(model_path)
        metrics = _metrics(params, root, model, rows, spec)
        with atomic_directory(out_dir) as tmp:
            known = link_shards(report.records, work_dir, tmp, SHARDS)
            write_table(tmp / PROXIES, proxy_table(rows))
            write_manifest(tmp / MANIFEST_NAME, [
                {"id": r["id"], "path": None, "shard": r["shard"], "key": r["key"], "sha256": r["sha256"],
                 "bytes": r["bytes"], "seed": None, "params_hash": key, "source": r["path"]} for r in good])
            write_quarantine(tmp / QUARANTINE, bad)
            if good:
                _write_sheet(tmp / SHEET, good[: params.sheet_faces], spec, model)
            outputs = hash_outputs(tmp, out_dir, root, known)
            lineage_record = lineage.record(outputs)
            write_json(tmp / "lineage.json", lineage_record)
        # Timings go to the printed summary, not the metrics: those are byte-identical on rerun.
        write_json(root / METRICS, {**metrics, "params_hash": key})
        lineage.complete_hashed(outputs)
        shutil.rmtree(work_dir, ignore_errors=True)
    except BaseException as err:
        lineage.fail(err)
        raise
    summary = {"photos": len(rows), "fitted": len(good), "quarantined": len(bad),
               "quarantine_reasons": metrics["quarantine_reasons"], "seconds": round(time.perf_counter() - start, 1),
               "photos_per_second": round(len(rows) / max(report.seconds, 1e-9), 2)}
    return StageResult(NAME, out_dir, outputs, summary, lineage_record)


def _with_shards(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        for r in record.rows:
            rows.append({**r, "shard": f"{SHARDS}/{record.filename}" if r["status"] == OK else None})
    return rows


def reason_kind(reason: str | None) -> str:
    """The counted kind of a quarantine reason: its text before the first colon."""
    return (reason or "unknown").split(":")[0].strip()


# --- metrics ------------------------------------------------------------------------------------


def _fixed_landmark_error(model: MorphableModel, rows: list[dict[str, Any]], alphas: np.ndarray, betas: np.ndarray,
                          target: np.ndarray) -> np.ndarray:
    """(N,) mean distance, in fitting-frame px, between each fit's projected fixed-vertex landmarks
    and ``target`` (N, 68, 2) photo pixels."""
    ids = model.landmark_vertices[model.landmark_defined]
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        xy = project_row(model.vertices(alphas[i], betas[i])[ids], r)
        out[i] = np.linalg.norm(xy - photo_to_fit(target[i][model.landmark_defined], r), axis=1).mean()
    return out


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "p90": round(float(np.percentile(v, 90)), 4)}


def _metrics(params: WildProxyParams, root: Path, model: MorphableModel, rows: list[dict[str, Any]],
             spec: ProxySpec) -> dict[str, Any]:
    good = [r for r in rows if r["status"] == OK]
    reasons = Counter(reason_kind(r.get("reason")) for r in rows if r["status"] != OK)
    out: dict[str, Any] = {
        "photos": len(rows), "fitted": len(good), "quarantined": len(rows) - len(good),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "fit": {"expression": params.fit.expression, "iterations": params.fit.iterations_prior
                if params.fit.expression == "prior" else params.fit.iterations_free},
        "reprojection_px": _summary(np.array([r["reprojection_px"] for r in good])),
        "texture_coverage": _summary(np.array([r["texture_coverage"] for r in good])),
    }
    by_path = {r["path"]: r for r in rows}
    if params.astronaut:
        a = by_path.get(params.astronaut)
        out["astronaut"] = None if a is None else {
            "status": a["status"], "reason": a.get("reason"), "reprojection_px": a.get("reprojection_px"),
            "beta_prior_label": a.get("beta_prior_label"), "yaw_deg": a.get("yaw_deg")}
    if params.expected and (root / params.expected).is_file():
        out["expected_outcomes"] = _expected_outcomes(root / params.expected, by_path)
    if params.truth and (root / params.truth).is_file():
        out["truth"] = _truth_metrics(root / params.truth, model, good, params.fit)
    if params.eos_share and params.eos_compare_max and good:
        out["eos"] = _eos_comparison(root / params.eos_share, model, good[: params.eos_compare_max],
                                     params.fit.fit_size)
    return out


def _expected_outcomes(path: Path, by_path: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Check listed inputs against their expected outcome ("quarantine: <reason kind>" or
    "usable: <load note>": decoded, with that conversion note)."""
    mismatches = []
    expected = pq.read_table(path, columns=["file", "expected"]).to_pylist()
    for e in expected:
        row = by_path.get(e["file"])
        outcome, _, detail = e["expected"].partition(": ")
        if row is None:
            ok, got = False, "not listed"
        elif outcome == "quarantine":
            ok = row["status"] != OK and (row.get("reason") or "").startswith(detail)
            got = row.get("reason") or row["status"]
        else:
            notes = row.get("load_notes") or []
            ok = any(n.startswith(detail) for n in notes)
            got = "; ".join(notes) or row.get("reason") or row["status"]
        if not ok:
            mismatches.append({"file": e["file"], "expected": e["expected"], "got": got})
    return {"checked": len(expected), "as_expected": len(expected) - len(mismatches), "mismatches": mismatches}


def _truth_metrics(path: Path, model: MorphableModel, good: list[dict[str, Any]], fit: FitConfig) -> dict[str, Any]:
    """Against a synthetic set's ground truth: landmark, pose, shape and expression errors.

    The same fit is also run on the true landmarks, which separates the detector's error from the
    fitter's: what the shape error would be with perfect landmarks.
    """
    truth = {r["file"]: r for r in pq.read_table(path).to_pylist()}
    matched = [(r, truth[r["path"]]) for r in good if r["path"] in truth]
    if not matched:
        return {"matched": 0}
    fits, gts = zip(*matched, strict=True)
    alpha_fit = np.array([f["alpha"] for f in fits])
    beta_fit = np.array([f["beta"] for f in fits])
    alpha_gt = np.array([g["alpha"] for g in gts])
    beta_gt = np.array([g["beta"] for g in gts])
    lm_gt = np.array([np.asarray(g["landmarks"], np.float64).reshape(68, 2) for g in gts])
    lm_det = np.array([np.asarray(f["landmarks"]).reshape(68, 2) for f in fits])
    to_fit = np.array([f["fit_frame_scale"] * f["decode_scale"] for f in fits])
    def shape_error(alpha: np.ndarray) -> np.ndarray:
        return np.linalg.norm(model.vertices(alpha) - model.vertices(alpha_gt), axis=2).mean(axis=1)

    sizes = np.array([(g["width"], g["height"]) for g in gts], np.float64)
    on_truth = ProxyFitter(model, fit).fit(lm_gt, sizes, beta_fit)
    pose = {f"{k[:-4]}_error_deg": _summary(np.abs(np.array([f[k] for f in fits]) - np.array([g[k] for g in gts])))
            for k in ("yaw_deg", "pitch_deg", "roll_deg")}
    return {
        "matched": len(matched),
        "detector_landmark_error_px": _summary(np.linalg.norm(lm_det - lm_gt, axis=2).mean(axis=1) * to_fit),
        "fit_vs_true_landmarks_px": _summary(_fixed_landmark_error(model, list(fits), alpha_fit, beta_fit, lm_gt)),
        **pose,
        "shape_error_mm": _summary(shape_error(alpha_fit)),
        "shape_error_mm_fit_on_true_landmarks": _summary(shape_error(on_truth.alpha)),
        "shape_error_mm_mean_face": _summary(shape_error(np.zeros_like(alpha_gt))),
        "beta_mae": round(float(np.abs(beta_fit - beta_gt).mean()), 4),
        "beta_mae_zero": round(float(np.abs(beta_gt).mean()), 4),
    }


def _eos_comparison(share: Path, model: MorphableModel, good: list[dict[str, Any]], fit_size: int) -> dict[str, Any]:
    """eos-py's fit_shape_and_pose on the same landmarks; error on the landmarks with fixed vertices."""
    from facedetail.proxy.eos_reference import EosFitter

    eos = EosFitter(share)
    ids = model.landmark_vertices[model.landmark_defined]
    theirs = []
    for r in good:
        # eos gets the landmarks in the same fitting frame, as a fit_size x fit_size image (y down).
        lm = photo_to_fit(np.asarray(r["landmarks"], np.float64).reshape(68, 2), r) * [1, -1]
        fit = eos.fit(lm, fit_size, fit_size)
        theirs.append(np.linalg.norm(fit.projected[ids] - lm[model.landmark_defined], axis=1).mean())
    alphas = np.array([r["alpha"] for r in good])
    betas = np.array([r["beta"] for r in good])
    ours = _fixed_landmark_error(model, good, alphas, betas,
                                 np.array([np.asarray(r["landmarks"]).reshape(68, 2) for r in good]))
    ratio = float(np.mean(ours) / np.mean(theirs))
    return {"compared": len(good), "ours_px": _summary(ours), "eos_px": _summary(np.array(theirs)),
            "ratio_mean": round(ratio, 4), "within_5_percent": bool(ratio <= 1.05)}


# --- contact sheet ------------------------------------------------------------------------------


def _write_sheet(path: Path, rows: list[dict[str, Any]], spec: ProxySpec, model: MorphableModel,
                 tile: int = 192) -> None:
    """Photos with the fit drawn over them: the proxy's visible wireframe (faint red), its outline and
    landmark vertices (red), and the detected landmarks (green)."""
    tiles, labels = [], []
    edges = np.unique(np.sort(model.triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)
    outline = max(boundary_loops(model.triangles), key=len)
    fixed = model.landmark_vertices[model.landmark_defined]
    for r in rows:
        photo = load_photo(spec.items[r["id"]].path, spec.load)
        rgb = photo.rgb  # a row with status ok was decodable
        k = tile / max(rgb.shape[:2])
        img = cv2.resize(rgb, (round(rgb.shape[1] * k), round(rgb.shape[0] * k)), interpolation=cv2.INTER_AREA)
        canvas = np.full((tile, tile, 3), 255, np.uint8)
        canvas[: img.shape[0], : img.shape[1]] = img
        verts = model.vertices(r["alpha"], r["beta"]).astype(np.float64)
        rot = np.asarray(r["camera_rotation"]).reshape(3, 3)

        def to_tile(photo_px: np.ndarray, k: float = k, r: dict[str, Any] = r) -> np.ndarray:
            """Original-photo px to tile px, in 1/16 px for cv2's shift."""
            return np.round((to_decoded(photo_px, r["decode_scale"]) + 0.5) * k * 16 - 8).astype(np.int32)

        px = to_tile(fit_to_photo(project_row(verts, r), r))
        facing = (model.vertex_normals(verts) @ rot[2]) > 0
        wire = canvas.copy()
        shown = edges[facing[edges].all(axis=1)]
        cv2.polylines(wire, list(px[shown].reshape(-1, 2, 1, 2)), False, (230, 40, 40), 1, cv2.LINE_AA, shift=4)
        canvas = cv2.addWeighted(wire, 0.35, canvas, 0.65, 0)
        cv2.polylines(canvas, [px[outline].reshape(-1, 1, 2)], True, (230, 40, 40), 1, cv2.LINE_AA, shift=4)
        for x, y in px[fixed]:
            cv2.circle(canvas, (int(x), int(y)), 2 * 16, (230, 40, 40), -1, cv2.LINE_AA, shift=4)
        for x, y in to_tile(np.asarray(r["landmarks"]).reshape(68, 2)):
            cv2.circle(canvas, (int(x), int(y)), 16, (0, 220, 0), -1, cv2.LINE_AA, shift=4)
        tiles.append(canvas)
        labels.append(f"{Path(r['path']).stem[:14]} {r['reprojection_px']:.1f}px")
    atomic_write_bytes(path, encode_png(label_grid(tiles, labels, columns=4), 6))


STAGE = Stage(NAME, WildProxyParams, run)

if __name__ == "__main__":
    sys.exit(main(STAGE))
