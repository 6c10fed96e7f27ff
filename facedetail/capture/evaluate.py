"""The metrics of a displacement ground-truth run: counts, reasons, alignment, masking, accuracy, patches.

Only deterministic facts (no timings), so that equal outputs give equal metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from facedetail.capture.worker import PatchCountConfig
from facedetail.io.tables import reason_kind


def _stat(values: list[float], digits: int = 5) -> dict[str, float] | None:
    """Mean, min and max, rounded; None without values."""
    if not values:
        return None
    v = np.asarray(values, np.float64)
    return {"mean": round(float(v.mean()), digits), "min": round(float(v.min()), digits),
            "max": round(float(v.max()), digits)}


def reason_counts(bad: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Rejections per kind (:func:`facedetail.io.tables.reason_kind`), sorted by kind."""
    return dict(sorted(Counter(reason_kind(r["reason"]) for r in bad).items()))


def capture_metrics(done: Sequence[dict[str, Any]], bad: Sequence[dict[str, Any]], *, resolution: int,
                    highpass_sigma_mm: float, patches: PatchCountConfig, key: str) -> dict[str, Any]:
    """Metrics of processed (``done``: ``rows``, ``patches``) and rejected (``bad``: ``reason``) worker results.

    The facts are those of each item's first row (every row of an item carries them); accuracy
    is measured over the items with a known ground truth (``gt_mae_mm``).
    """
    facts = [r["rows"][0] for r in done]
    measured = [f for f in facts if f.get("gt_mae_mm") is not None]
    accuracy: dict[str, Any] = {"items": len(measured)}
    if measured:
        mae = np.array([f["gt_mae_mm"] for f in measured])
        signal = np.array([f["gt_mean_abs_mm"] for f in measured])
        accuracy.update({
            "mae_mm_mean": round(float(mae.mean()), 5), "mae_mm_max": round(float(mae.max()), 5),
            "p95_error_mm_mean": round(float(np.mean([f["gt_p95_error_mm"] for f in measured])), 5),
            "gt_mean_abs_mm_mean": round(float(signal.mean()), 5),
            # None, not inf/NaN (invalid JSON), when the ground truth has no details at all.
            "relative_mae": round(float(mae.mean() / signal.mean()), 4) if signal.mean() > 0 else None,
            "masked_fraction_mean": round(float(np.mean([f["masked_fraction"] for f in measured])), 5),
            "per_expression": {
                e: round(float(np.mean([f["gt_mae_mm"] for f in measured if f["expression"] == e])), 5)
                for e in sorted({f["expression"] for f in measured})},
        })
    notes = sorted({f["gt_note"] for f in facts if f.get("gt_note")})
    if notes:
        accuracy["notes"] = notes
    regions = done[0]["patches"] if done else {}
    totals = {name: int(sum(r["patches"][name] for r in done)) for name in regions}
    return {
        "items": len(done) + len(bad),
        "processed": len(done),
        "quarantined": len(bad),
        "quarantine_reasons": reason_counts(bad),
        "resolution": resolution,
        "ray_backend": sorted({f["ray_backend"] for f in facts}),
        "highpass_sigma_mm": highpass_sigma_mm,
        "masked_fraction": _stat([f["masked_fraction"] for f in facts]),
        "icp_residual_mm": _stat([f["icp_residual_mm"] for f in facts]),
        "icp_rotation_deg": _stat([f["icp_rotation_deg"] for f in facts], 4),
        "png_clipped_texels": int(sum(f["png_clipped_texels"] for f in facts)),
        "accuracy": accuracy,
        "patches": {"size": patches.size, "stride": patches.stride, "min_valid": patches.min_valid,
                    "total": totals},
        "params_hash": key,
    }
