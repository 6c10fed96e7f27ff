"""The retraining quality gate: is a new run's evaluation no worse than the last accepted run's?

Pure: it compares two sets of metrics (``{"metrics/<stage>.json": <that file's nested dict>}``)
on a list of gated metrics and renders the verdict as a markdown table. Reading the metrics (from
DVC, at a git revision) and deciding what to do with a failed gate is the caller's business.

A metric regresses when it moves in its bad direction by more than its tolerance,
``max(absolute, relative * |old|)``: a relative tolerance alone follows the metric's scale, and an
absolute floor keeps a metric near zero from failing on noise. A gated metric that the new run
lacks (or that is not a finite number) fails the gate: a gate that cannot see a metric must not
pass it. With no accepted run at all, every gate passes and the verdict says it is the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from facedetail.io.report import metric

Direction = Literal["lower", "higher"]
MetricsSet = Mapping[str, Mapping[str, Any]]
"""Metrics files by path (``metrics/dictionary.json``), each its parsed JSON object."""


@dataclass(frozen=True)
class GatedMetric:
    """One metric the gate watches: where it is, which way is better, how much worse is allowed."""

    file: str
    """Metrics file, relative to the repository root (``metrics/evaluate.json``)."""
    key: str
    """Dotted key into that file (``capture.ours.mae_mm``)."""
    direction: Direction = "lower"
    """``lower`` when smaller is better (errors), ``higher`` when larger is better (accuracies)."""
    relative: float | None = None
    """Allowed worsening as a fraction of the old value; None: the gate's default."""
    absolute: float | None = None
    """Allowed worsening in the metric's units; None: the gate's default."""

    @property
    def name(self) -> str:
        """``file:key``, as reports show it."""
        return f"{self.file}:{self.key}"


# The detail network's held-out MAE (capture scans and wild photos with truth), our row of
# metrics/evaluate.json; the dictionary's beta MAE on its held-out queries; the proxy fit's
# median landmark NME (in the face's frame: pixel errors would weigh large faces more).
DEFAULT_GATED: tuple[GatedMetric, ...] = (
    GatedMetric("metrics/evaluate.json", "capture.ours.mae_mm"),
    GatedMetric("metrics/evaluate.json", "wild.ours.mae_mm"),
    GatedMetric("metrics/dictionary.json", "quality.beta_mae.dictionary"),
    GatedMetric("metrics/wild_proxy.json", "nme.median"),
)


@dataclass(frozen=True)
class MetricCheck:
    """The gate's finding on one metric."""

    metric: GatedMetric
    old: float | None
    new: float | None
    tolerance: float | None
    """Allowed worsening, in the metric's units (None without an old value)."""
    regressed: bool
    note: str
    """Why: ``ok``, ``regressed by ...``, ``new metric``, ``missing in the new run``, ..."""

    @property
    def change(self) -> float | None:
        """``new - old`` (None when either is missing)."""
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def relative_change(self) -> float | None:
        """``(new - old) / |old|`` (None when either is missing or old is 0)."""
        change = self.change
        return None if change is None or self.old == 0 else change / abs(self.old)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Verdict:
    """All checks of one gate evaluation."""

    checks: tuple[MetricCheck, ...]
    baseline: bool
    """True when there was no accepted run to compare with (the gate passes)."""

    @property
    def passed(self) -> bool:
        return not self.regressions

    @property
    def regressions(self) -> tuple[MetricCheck, ...]:
        return tuple(c for c in self.checks if c.regressed)


lookup = metric
"""``data["a"]["b"]`` for ``"a.b"``; None when a key is missing (the summary's :func:`~facedetail.io.report.metric`)."""


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, not a number, a bool, NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def check_metric(metric: GatedMetric, old_value: Any, new_value: Any, *, has_old_run: bool,
                 relative: float, absolute: float) -> MetricCheck:
    """The finding on one metric; ``relative``/``absolute`` apply where the metric sets none."""
    old, new = _number(old_value), _number(new_value)
    if new is None:
        what = "missing in the new run" if new_value is None else f"not a finite number in the new run ({new_value!r})"
        return MetricCheck(metric, old, None, None, True, what)
    if old is None:
        note = "no accepted run (baseline)" if not has_old_run else "new metric (not in the accepted run)"
        return MetricCheck(metric, None, new, None, False, note)
    rel = metric.relative if metric.relative is not None else relative
    tol = max(metric.absolute if metric.absolute is not None else absolute, rel * abs(old))
    worse = new - old if metric.direction == "lower" else old - new
    if worse > tol:
        return MetricCheck(metric, old, new, tol, True, f"regressed by {worse:.6g} (allowed {tol:.6g})")
    return MetricCheck(metric, old, new, tol, False, "ok" if worse <= 0 else f"worse by {worse:.6g}, within {tol:.6g}")


def evaluate_gate(old: MetricsSet | None, new: MetricsSet, gated: Sequence[GatedMetric] = DEFAULT_GATED, *,
                  relative: float = 0.05, absolute: float = 0.0) -> Verdict:
    """Compare ``new`` with the accepted run's ``old`` metrics (None: there is no accepted run).

    ``relative`` and ``absolute`` are the default tolerances (see the module docstring); a
    :class:`GatedMetric` may set its own.
    """
    if relative < 0 or absolute < 0:
        raise ValueError(f"tolerances must be >= 0, got relative={relative}, absolute={absolute}")
    if not gated:
        raise ValueError("no gated metrics: a gate that checks nothing would pass everything")
    checks = tuple(
        check_metric(m, lookup(old.get(m.file, {}), m.key) if old is not None else None,
                     lookup(new.get(m.file, {}), m.key), has_old_run=old is not None,
                     relative=relative, absolute=absolute)
        for m in gated)
    return Verdict(checks, baseline=old is None)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.6g}" if signed else f"{value:.6g}"


def verdict_markdown(verdict: Verdict) -> str:
    """The verdict as a markdown table, one row per gated metric, with a one-line conclusion above."""
    if verdict.baseline:
        head = "**Quality gate: passed** (no accepted run yet: this run becomes the baseline)."
    elif verdict.passed:
        head = "**Quality gate: passed** (no gated metric regressed beyond its tolerance)."
    else:
        head = f"**Quality gate: FAILED**: {len(verdict.regressions)} of {len(verdict.checks)} gated metrics regressed."
    lines = [head, "", "| metric | better | accepted | new | change | change % | allowed | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in verdict.checks:
        pct = c.relative_change
        lines.append(f"| `{c.metric.name}` | {c.metric.direction} | {_fmt(c.old)} | {_fmt(c.new)} | "
                     f"{_fmt(c.change, signed=True)} | {'–' if pct is None else f'{100 * pct:+.2f} %'} | "
                     f"{_fmt(c.tolerance)} | {'**REGRESSED**: ' if c.regressed else ''}{c.note} |")
    return "\n".join(lines) + "\n"


def parse_gated(entries: Sequence[Mapping[str, Any]]) -> tuple[GatedMetric, ...]:
    """Gated metrics from plain mappings (``{file, key, direction?, relative?, absolute?}``), e.g. a params section."""
    allowed = {"file", "key", "direction", "relative", "absolute"}
    out = []
    for i, entry in enumerate(entries):
        extra = set(entry) - allowed
        if extra or "file" not in entry or "key" not in entry:
            raise ValueError(f"gated metric {i}: needs file and key, may have direction/relative/absolute; "
                             f"got {sorted(entry)}")
        direction = entry.get("direction", "lower")
        if direction not in ("lower", "higher"):
            raise ValueError(f"gated metric {i}: direction must be lower or higher, not {direction!r}")
        out.append(GatedMetric(str(entry["file"]), str(entry["key"]), direction,
                               None if entry.get("relative") is None else float(entry["relative"]),
                               None if entry.get("absolute") is None else float(entry["absolute"])))
    return tuple(out)
