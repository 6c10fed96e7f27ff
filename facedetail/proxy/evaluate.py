"""Accuracy of a batch of proxy fits: the metrics of the ``wild_proxy`` stage.

Rows are ``proxies.parquet`` rows (see :data:`facedetail.proxy.pipeline.PROXY_SCHEMA`), as dicts.
Three optional checks go beyond the rows' own numbers:

* **expected outcomes**: a table (file, expected) of inputs with a known fate, such as the bad
  examples of :func:`facedetail.proxy.synthetic.bad_examples` ("quarantine: <reason kind>" or
  "usable: <start of a load note>"), checked against what happened to them;
* **ground truth**: a synthetic set's ``truth.parquet`` (α, β, pose and landmarks per file): landmark,
  pose, shape and expression errors, with the same fit also run on the true landmarks, which
  separates the detector's error from the fitter's;
* **eos-py**: eos's ``fit_shape_and_pose`` on the same landmarks, in the same face-normalised frame
  as ours (same scale, so the same regularisation balance), and the landmark error of both fits on
  the landmarks with a fixed vertex, per photo and summarised.

Errors are NME (mean point error over the outer-eye-corner distance, iBUG 37-46: the 300-W
convention; against the truth, the true landmarks' distance) and px of the original photo.

Every number is rounded (4 decimals) so that equal fits give byte-identical metrics files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from facedetail.io.tables import reason_kind
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import FitConfig, ProxyFitter, outer_eye_distance
from facedetail.proxy.pipeline import OK, photo_to_fit, project_row, to_decoded

__all__ = ["eos_comparison", "expected_outcomes", "fixed_landmark_error", "fixed_landmark_errors", "proxy_metrics",
           "summarize", "truth_metrics"]

EOS_COLUMNS = ("eos_fixed_error_px", "eos_fixed_nme", "eos_yaw_deg", "eos_pitch_deg", "eos_roll_deg")
"""The per-photo proxies.parquet columns :func:`eos_comparison` fills."""


def summarize(values: np.ndarray) -> dict[str, float]:
    """n, mean, median and 90th percentile of the finite ``values`` (NaN and inf are left out);
    ``{"n": 0}`` when none is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "p90": round(float(np.percentile(v, 90)), 4)}


def fixed_landmark_error(model: MorphableModel, rows: list[dict[str, Any]], alphas: np.ndarray, betas: np.ndarray,
                         target: np.ndarray) -> np.ndarray:
    """(N,) mean distance, in camera-frame px (the decoded photo's), between each fit's projected
    fixed-vertex landmarks and ``target`` (N, 68, 2) photo pixels.

    Row ``i`` gives the camera and frames, ``alphas[i]`` / ``betas[i]`` the shape; only the landmarks
    the model defines by one vertex count (the contour ones slide with pose).
    """
    ids = model.landmark_vertices[model.landmark_defined]
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        xy = project_row(model.vertices(alphas[i], betas[i])[ids], r)
        out[i] = np.linalg.norm(xy - photo_to_fit(target[i][model.landmark_defined], r), axis=1).mean()
    return out


def fixed_landmark_errors(model: MorphableModel, rows: list[dict[str, Any]],
                          target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N,) original-photo px and (N,) NME of each fitted row's fixed-vertex landmarks against ``target``
    (N, 68, 2) photo px (default: the row's own detected landmarks, whose eye distance is the normaliser)."""
    if not rows:
        return np.zeros(0), np.zeros(0)
    detected = np.array([np.asarray(r["landmarks"], np.float64).reshape(68, 2) for r in rows])
    target = detected if target is None else np.asarray(target, np.float64)
    decoded_px = fixed_landmark_error(model, rows, np.array([r["alpha"] for r in rows]),
                                      np.array([r["beta"] for r in rows]), target)
    scale = np.array([r["decode_scale"] for r in rows], np.float64)
    return decoded_px / scale, decoded_px / (outer_eye_distance(target) * scale)


def expected_outcomes(path: Path, by_path: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Check listed inputs against their expected outcome.

    ``path`` is a Parquet table with columns ``file`` (as listed) and ``expected``: "quarantine:
    <start of the reason>" or "usable: <start of a load note>" (decoded, with that conversion note).
    ``by_path`` maps each listed path to its row. Returns the counts and every mismatch.
    """
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


def truth_metrics(path: Path, model: MorphableModel, good: list[dict[str, Any]], fit: FitConfig) -> dict[str, Any]:
    """Against a synthetic set's ground truth ``path`` (truth.parquet): landmark, pose, shape and
    expression errors of the fitted rows ``good`` whose path is a truth ``file``.

    The same fit (``fit``) is also run on the true landmarks, which separates the detector's error from
    the fitter's: what the shape error would be with perfect landmarks.
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
    eyes = outer_eye_distance(lm_gt)

    vs_truth_px, vs_truth_nme = fixed_landmark_errors(model, list(fits), lm_gt)

    def shape_error(alpha: np.ndarray) -> np.ndarray:
        return np.linalg.norm(model.vertices(alpha) - model.vertices(alpha_gt), axis=2).mean(axis=1)

    on_truth = ProxyFitter(model, fit).fit(lm_gt, beta_fit)
    pose = {f"{k[:-4]}_error_deg": summarize(np.abs(np.array([f[k] for f in fits]) - np.array([g[k] for g in gts])))
            for k in ("yaw_deg", "pitch_deg", "roll_deg")}
    return {
        "matched": len(matched),
        "detector_landmark_nme": summarize(np.linalg.norm(lm_det - lm_gt, axis=2).mean(axis=1) / eyes),
        "detector_landmark_error_px": summarize(np.linalg.norm(lm_det - lm_gt, axis=2).mean(axis=1)),
        "fit_vs_true_landmarks_nme": summarize(vs_truth_nme),
        "fit_vs_true_landmarks_px": summarize(vs_truth_px),
        **pose,
        "shape_error_mm": summarize(shape_error(alpha_fit)),
        "shape_error_mm_fit_on_true_landmarks": summarize(shape_error(on_truth.alpha)),
        "shape_error_mm_mean_face": summarize(shape_error(np.zeros_like(alpha_gt))),
        "beta_mae": round(float(np.abs(beta_fit - beta_gt).mean()), 4),
        "beta_mae_zero": round(float(np.abs(beta_gt).mean()), 4),
    }


def eos_comparison(share: Path, model: MorphableModel, good: list[dict[str, Any]],
                   face_size: float) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """eos-py's fit_shape_and_pose (Surrey model from the eos ``share`` folder) on the landmarks of the
    fitted rows ``good``, in our face-normalised frame; both fits' error on the landmarks with a fixed vertex.

    Returns the summary (NME and original-photo px of both, the ratio of the means) and, per row id,
    the :data:`EOS_COLUMNS` values.
    """
    # Imported here: eos is only needed (and only installed) where the comparison runs.
    from facedetail.proxy.eos_reference import EosFitter

    eos = EosFitter(share)
    ids = model.landmark_vertices[model.landmark_defined]
    canvas = int(np.ceil(4 * face_size))
    theirs_px, theirs_nme, columns = [], [], {}
    for r in good:
        # eos gets the very landmarks we fitted, moved to our face frame (face_size px, as a canvas x canvas
        # image, y down): the same resolution, so the same balance of data term and prior as ours.
        lm = to_decoded(np.asarray(r["landmarks"], np.float64).reshape(68, 2), r["decode_scale"])
        k = float(r["face_frame_scale"])
        framed = (lm - lm.mean(axis=0)) * k + canvas / 2
        fit = eos.fit(framed, canvas, canvas)
        decoded_px = float(np.linalg.norm(fit.projected[ids] - framed[model.landmark_defined], axis=1).mean()) / k
        theirs_px.append(decoded_px / r["decode_scale"])
        theirs_nme.append(decoded_px / float(outer_eye_distance(lm[None])[0]))
        columns[r["id"]] = {"eos_fixed_error_px": theirs_px[-1], "eos_fixed_nme": theirs_nme[-1],
                            "eos_yaw_deg": fit.yaw_deg, "eos_pitch_deg": fit.pitch_deg, "eos_roll_deg": fit.roll_deg}
    ours_px, ours_nme = fixed_landmark_errors(model, good)
    ratio = float(np.mean(ours_nme) / np.mean(theirs_nme))
    better = int((ours_nme < np.array(theirs_nme)).sum())
    summary = {"compared": len(good), "frame": f"face-normalised ({face_size:g} px), the same landmarks",
               "ours_nme": summarize(ours_nme), "eos_nme": summarize(np.array(theirs_nme)),
               "ours_px": summarize(ours_px), "eos_px": summarize(np.array(theirs_px)),
               "ratio_mean": round(ratio, 4), "ours_better_photos": better,
               "within_5_percent": bool(ratio <= 1.05),
               "verdict": ("parity (means within 5 %)" if abs(ratio - 1) <= 0.05 else
                           f"ours {'lower' if ratio < 1 else 'higher'} by {abs(ratio - 1) * 100:.0f} %")}
    return summary, columns


def proxy_metrics(rows: list[dict[str, Any]], model: MorphableModel, fit: FitConfig, *, astronaut: str | None,
                  expected: Path | None, truth: Path | None, eos_share: Path | None,
                  eos_compare_max: int) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The metrics of a run (counts, quarantine reasons, NME, reprojection and texture coverage of the
    fits, and the optional checks), and per fitted row id its comparison columns (``fixed_error_px``,
    ``fixed_nme`` and, for the rows compared with eos, :data:`EOS_COLUMNS`).

    ``astronaut``: the listed path of a photo reported on its own ('' or None: none). ``expected`` /
    ``truth``: tables for :func:`expected_outcomes` / :func:`truth_metrics`, each skipped when None or
    not a file. ``eos_share``: eos's share folder for :func:`eos_comparison` on the first
    ``eos_compare_max`` fitted rows (None or 0: skipped).
    """
    good = [r for r in rows if r["status"] == OK]
    reasons = Counter(reason_kind(r.get("reason")) for r in rows if r["status"] != OK)
    out: dict[str, Any] = {
        "photos": len(rows), "fitted": len(good), "quarantined": len(rows) - len(good),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "fit": {"expression": fit.expression, "iterations": fit.iterations_prior
                if fit.expression == "prior" else fit.iterations_free},
        "nme": summarize(np.array([r["nme"] for r in good])),
        "reprojection_px": summarize(np.array([r["reprojection_px"] for r in good])),
        "texture_coverage": summarize(np.array([r["texture_coverage"] for r in good])),
    }
    by_path = {r["path"]: r for r in rows}
    if astronaut:
        a = by_path.get(astronaut)
        out["astronaut"] = None if a is None else {
            "status": a["status"], "reason": a.get("reason"), "nme": a.get("nme"),
            "reprojection_px": a.get("reprojection_px"),
            "beta_prior_label": a.get("beta_prior_label"), "yaw_deg": a.get("yaw_deg")}
    if expected is not None and expected.is_file():
        out["expected_outcomes"] = expected_outcomes(expected, by_path)
    if truth is not None and truth.is_file():
        out["truth"] = truth_metrics(truth, model, good, fit)
    fixed_px, fixed_nme = fixed_landmark_errors(model, good)
    columns = {r["id"]: {"fixed_error_px": float(p), "fixed_nme": float(n)}
               for r, p, n in zip(good, fixed_px, fixed_nme, strict=True)}
    if eos_share is not None and eos_compare_max and good:
        out["eos"], theirs = eos_comparison(eos_share, model, good[:eos_compare_max], fit.face_size)
        for row_id, values in theirs.items():
            columns[row_id].update(values)
    return out, columns
