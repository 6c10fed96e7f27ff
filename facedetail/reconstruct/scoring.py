"""Every row of the evaluation for one sample (a texture with its proxy, and the truth): maps, normals, surfaces.

The rows (:data:`facedetail.reconstruct.evaluate.ROWS`) are scored on the same texels and the same aligned
surface, so they differ by their displacement only. Aggregation over samples: :func:`summarize` and
:func:`by_yaw`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from facedetail.detail.pairs import proxy_maps
from facedetail.reconstruct.detailnet import DetailNet, gaussian_window, stitch
from facedetail.reconstruct.evaluate import (
    ROWS,
    Baselines,
    Surface,
    SurfaceConfig,
    masked_errors,
    mean_or_none,
    normal_errors,
    rigid_alignment,
    surface_errors,
    transform,
    yaw_bin,
)
from facedetail.reconstruct.mesh import sample_map
from facedetail.reconstruct.photo import Reconstructor, detail_normals
from facedetail.render.detailed import displace


@dataclass(frozen=True)
class Sample:
    """One thing to score."""

    id: str
    texture: NDArray[np.uint8]
    """(R, R, 3) the photo unwrapped to the chart."""
    visible: NDArray[np.bool_]
    proxy_vertices: NDArray[np.float64]
    """(V, 3) the proxy the prediction is made on (model frame, mm)."""
    truth: NDArray[np.float64]
    """(R, R) true displacement (mm) on that chart."""
    truth_mask: NDArray[np.bool_]
    """Texels where ``truth`` is known."""
    truth_surface: Surface
    """The true detailed surface (a scan, or the true face displaced by its true details)."""
    initial: NDArray[np.float64] | None = None
    """4x4 starting alignment of the proxy onto the truth (e.g. Procrustes on corresponding vertices)."""
    yaw_deg: float | None = None


class SampleScorer:
    """The networks, baselines and geometry, loaded once (shared with a :class:`Reconstructor`)."""

    def __init__(self, engine: Reconstructor, supervised: DetailNet | None, baselines: Baselines,
                 surface: SurfaceConfig) -> None:
        """``engine``'s model, network, stitching, subdivision and chart are the ones scored with."""
        self.model, self.net, self.supervised, self.baselines = engine.model, engine.net, supervised, baselines
        self.stitch_config, self.surface = engine.config.stitch, surface
        self.meshes, self.texels, self.chart = engine.meshes, engine.texels, engine.chart
        net, stitch_config = self.net, self.stitch_config
        self.window = gaussian_window(net.patch, stitch_config.sigma_fraction * net.patch)

    def predictions(self, texture: NDArray[np.uint8],
                    visible: NDArray[np.bool_]) -> tuple[dict[str, NDArray[np.float64]], NDArray[np.bool_]]:
        """Every row's displacement map, and the texels the patches cover."""
        maps = self.net.predict(texture, visible, self.stitch_config)
        origins = self.net.origins(visible, self.stitch_config)
        regions = [r for r in sorted(origins) if len(origins[r])]
        if regions:
            patches = np.concatenate([np.repeat(self.baselines.mean_patch[r][None], len(origins[r]), 0)
                                      for r in regions])
            mean_patch, _ = stitch(patches, np.concatenate([origins[r] for r in regions]), self.net.resolution,
                                   self.window)
        else:
            mean_patch = np.zeros_like(self.baselines.mean_map)
        out = {"ours": maps.displacement.astype(np.float64), "zero": np.zeros_like(self.baselines.mean_map),
               "mean_patch": mean_patch, "mean_map": self.baselines.mean_map,
               "pca_only": maps.pca_only.astype(np.float64)}
        if self.supervised is not None:
            other = self.supervised.predict(texture, visible, self.stitch_config)
            out["supervised_only"] = other.displacement.astype(np.float64)
        return out, maps.covered

    def score(self, sample: Sample) -> dict[str, dict[str, float | None]]:
        """Per row: map errors (mm), normal errors (degrees), surface errors; and the texels scored."""
        preds, covered = self.predictions(sample.texture, sample.visible)
        valid = covered & self.chart
        mask = valid & sample.visible & sample.truth_mask
        proxy = np.hstack([sample.proxy_vertices,
                           self.model.vertex_normals(sample.proxy_vertices.astype(np.float32)).astype(np.float64)])
        positions, normals = proxy_maps(self.texels, proxy)
        true_n, true_ok = detail_normals(positions, normals, sample.truth, valid)
        base = self.meshes.map.proxy(self.model, sample.proxy_vertices)
        align = rigid_alignment(base.points, sample.truth_surface.points, self.surface, sample.initial)
        out: dict[str, dict[str, float | None]] = {}
        for row in ROWS:
            if row not in preds:
                continue
            d = preds[row]
            entry = masked_errors(d, sample.truth, mask, self.net.boxes)
            pred_n, pred_ok = detail_normals(positions, normals, d, valid)
            entry.update(normal_errors(pred_n, true_n, mask & pred_ok & true_ok, self.net.boxes))
            surface = displace(base, None, sample_map(d, valid, base.uv))
            moved = Surface(transform(surface.vertices, align), surface.normals @ align[:3, :3].T)
            entry.update(surface_errors(moved, sample.truth_surface, self.surface))
            entry["texels"] = float(mask.sum())
            out[row] = entry
        return out


def summarize(scores: Sequence[Mapping[str, Mapping[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """Per row, the mean of every measure over the samples (6 decimals)."""
    rows: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for sample in scores:
        for row, values in sample.items():
            for k, v in values.items():
                if k != "texels":
                    rows[row][k].append(v)
    out: dict[str, dict[str, float | None]] = {}
    for row in [r for r in ROWS if r in rows]:
        out[row] = {}
        for k, vs in sorted(rows[row].items()):
            m = mean_or_none(vs)
            out[row][k] = None if m is None else round(m, 6)
    return out


def by_yaw(scores: Sequence[Mapping[str, Mapping[str, float | None]]], yaws: Sequence[float | None],
           measures: Sequence[str] = ("chamfer_mm", "mae_mm")) -> list[dict[str, Any]]:
    """Rows of a plot table: per |yaw| bin of 15°, the count and each row's mean of ``measures``."""
    groups: dict[str, list[Mapping[str, Mapping[str, float | None]]]] = defaultdict(list)
    for s, yaw in zip(scores, yaws, strict=True):
        if yaw is not None:
            groups[yaw_bin(yaw)].append(s)
    table = []
    for label in sorted(groups, key=lambda b: float(b.split("-")[0])):
        summary = summarize(groups[label])
        line: dict[str, Any] = {"yaw_deg": label, "samples": len(groups[label])}
        for row, values in summary.items():
            for m in measures:
                line[f"{row}_{m}"] = values.get(m)
        table.append(line)
    return table
