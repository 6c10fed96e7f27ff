"""The retraining quality gate (``facedetail.io.quality_gate``): pure comparisons of two metric sets."""

from __future__ import annotations

import json
import math

import pytest
from conftest import ROOT

from facedetail.io.quality_gate import (
    DEFAULT_GATED,
    GatedMetric,
    evaluate_gate,
    lookup,
    parse_gated,
    verdict_markdown,
)

MAE = GatedMetric("metrics/evaluate.json", "capture.ours.mae_mm")
ACC = GatedMetric("metrics/acc.json", "accuracy", direction="higher")


def _set(mae: float | None = 0.02, acc: float | None = 0.8) -> dict:
    out: dict = {"metrics/evaluate.json": {"capture": {"ours": {}}}, "metrics/acc.json": {}}
    if mae is not None:
        out["metrics/evaluate.json"]["capture"]["ours"]["mae_mm"] = mae
    if acc is not None:
        out["metrics/acc.json"]["accuracy"] = acc
    return out


def test_default_gated_metrics_exist_in_this_repository() -> None:
    """The defaults name real keys of the committed metrics files (so the gate can see them)."""
    for m in DEFAULT_GATED:
        data = json.loads((ROOT / m.file).read_text())
        value = lookup(data, m.key)
        assert isinstance(value, float) and math.isfinite(value), (m.name, value)


def test_equal_run_passes_and_regression_beyond_tolerance_fails() -> None:
    equal = evaluate_gate(_set(), _set(), [MAE, ACC], relative=0.05)
    assert equal.passed and not equal.baseline
    assert [c.change for c in equal.checks] == [0.0, 0.0]

    # 0.02 -> 0.0209 is 4.5 % worse: within 5 %; 0.0211 is 5.5 % worse: regressed.
    within = evaluate_gate(_set(), _set(mae=0.0209), [MAE, ACC], relative=0.05)
    assert within.passed and "within" in within.checks[0].note
    worse = evaluate_gate(_set(), _set(mae=0.0211), [MAE, ACC], relative=0.05)
    assert not worse.passed
    assert [c.metric for c in worse.regressions] == [MAE]
    assert worse.checks[0].relative_change == pytest.approx(0.055)
    assert worse.checks[0].tolerance == pytest.approx(0.001)


def test_direction_and_improvements() -> None:
    """Higher-is-better metrics regress downwards; any improvement passes."""
    assert not evaluate_gate(_set(), _set(acc=0.7), [ACC], relative=0.05).passed
    better = evaluate_gate(_set(), _set(mae=0.01, acc=0.95), [MAE, ACC], relative=0.0)
    assert better.passed and all(c.note == "ok" for c in better.checks)


def test_absolute_floor_and_per_metric_tolerance() -> None:
    """Tolerance is max(absolute, relative * |old|); a metric's own tolerance overrides the default."""
    tiny_old, tiny_new = _set(mae=1e-6), _set(mae=3e-6)  # 200 % worse, but 2e-6 in absolute terms
    assert not evaluate_gate(tiny_old, tiny_new, [MAE], relative=0.05).passed
    assert evaluate_gate(tiny_old, tiny_new, [MAE], relative=0.05, absolute=1e-5).passed
    strict = GatedMetric(MAE.file, MAE.key, relative=0.0)
    assert not evaluate_gate(_set(), _set(mae=0.0201), [strict], relative=0.5).passed


def test_no_accepted_run_is_the_baseline() -> None:
    verdict = evaluate_gate(None, _set(), [MAE, ACC])
    assert verdict.passed and verdict.baseline
    assert all(c.old is None and c.note == "no accepted run (baseline)" for c in verdict.checks)
    assert "becomes the baseline" in verdict_markdown(verdict)


def test_missing_or_non_finite_new_metric_fails_closed() -> None:
    missing = evaluate_gate(_set(), _set(mae=None), [MAE, ACC])
    assert not missing.passed and missing.regressions[0].note == "missing in the new run"
    nan = evaluate_gate(_set(), _set(mae=math.nan), [MAE])
    assert not nan.passed and "not a finite number" in nan.regressions[0].note
    # even without an accepted run: a gate that cannot see its metric does not pass it
    assert not evaluate_gate(None, _set(mae=None), [MAE]).passed
    # a metric that is new in this run (absent from the accepted one) passes, and says so
    new_metric = evaluate_gate(_set(mae=None), _set(), [MAE])
    assert new_metric.passed and new_metric.checks[0].note == "new metric (not in the accepted run)"


def test_markdown_table_shows_old_new_change_and_verdict() -> None:
    text = verdict_markdown(evaluate_gate(_set(), _set(mae=0.03), [MAE, ACC], relative=0.05))
    assert text.startswith("**Quality gate: FAILED**: 1 of 2")
    row = next(line for line in text.splitlines() if MAE.key in line)
    assert "| 0.02 | 0.03 | +0.01 | +50.00 % | 0.001 | **REGRESSED**" in row
    assert text.count("\n| `") == 2


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="checks nothing"):
        evaluate_gate(_set(), _set(), [])
    with pytest.raises(ValueError, match=">= 0"):
        evaluate_gate(_set(), _set(), [MAE], relative=-0.1)
    with pytest.raises(ValueError, match="direction"):
        parse_gated([{"file": "m.json", "key": "a", "direction": "up"}])
    with pytest.raises(ValueError, match="needs file and key"):
        parse_gated([{"file": "m.json", "threshold": 1}])
    assert parse_gated([{"file": "m.json", "key": "a.b", "direction": "higher", "relative": 0.1}]) == (
        GatedMetric("m.json", "a.b", "higher", 0.1, None),)
