"""Benchmark: the orthographic UV unwrap (``facedetail.proxy.texture.unwrap``) against its previous version.

    python bench/unwrap.py [--photos data/wild_synth/images] [--faces 24] [--repeat 5] [--resolution 512 1024]
                           [--model data/face_model/model.npz] [--dictionary data/dictionary]

Real fits: the wild_proxy shard worker (stage defaults) detects and fits the first ``--faces`` usable
faces of the photo folder. Per resolution, each fit is unwrapped ``--repeat`` times by the library's
``unwrap`` and by the previous one (kept below, not in the library: a compiled loop over per-texel rows
and columns grouped by triangle, then ``cv2.remap`` of float maps), interleaved, timed with
``time.process_time`` (CPU time of this process: the machine is shared and wall time drifts). Prints
ms per texture of each, their ratio, and how far the two textures differ (texels whose RGBA differs,
visibility flips, the largest colour difference).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from facedetail.compiled import cached_njit
from facedetail.proxy import texture
from facedetail.proxy.fit import Cameras, FitConfig
from facedetail.proxy.inputs import LoadConfig, list_inputs
from facedetail.proxy.pipeline import ProxyShardWorker, ProxySpec
from facedetail.proxy.texture import TextureConfig, Unwrapped, UVTexels, _camera_vertices, unwrap, unwrap_maps
from stages.wild_proxy import DETECTOR

KERNEL_S = {"old": 0.0, "new": 0.0}
"""CPU seconds spent in each version's compiled loop alone."""


def _timed_kernel(kernel: Callable[..., int]) -> Callable[..., int]:
    """The library's compiled loop, adding its CPU time to ``KERNEL_S["new"]``."""

    def run(*args: object) -> int:
        t0 = time.process_time()
        out = kernel(*args)
        KERNEL_S["new"] += time.process_time() - t0
        return out

    return run


# --- the previous unwrap (before issue 16 item 7), for the before/after ---------------------------------------


def _group(triangle: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    order = np.argsort(triangle, kind="stable")
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(triangle, minlength=n), out=starts[1:])
    return starts, np.ascontiguousarray(rows[order], np.int32), np.ascontiguousarray(cols[order], np.int32)


def old_runs(uv: np.ndarray, triangles: np.ndarray, resolution: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """The previous UVTexels' ``zbuffer_texels`` and ``by_triangle`` (starts, per-texel rows, cols)."""
    from facedetail.model.uvmap import rasterize_uv
    from facedetail.proxy.texture import ZBUFFER_GRID

    raster = rasterize_uv(uv, triangles, resolution)
    rows, cols = np.nonzero(raster.covered)
    triangle = raster.triangle[rows, cols].astype(np.int64)
    stride = max(1, resolution // ZBUFFER_GRID)
    on_grid = (rows % stride == 0) & (cols % stride == 0)
    n = len(triangles)
    return (_group(triangle[on_grid], rows[on_grid], cols[on_grid], n), _group(triangle, rows, cols, n))


@cached_njit(error_model="numpy", inline="always")
def _old_texel(g, row, col, all_facing, cos_max):
    u, v = np.float64(col), np.float64(row)
    if not all_facing:
        nx = g[3, 0] * u + g[3, 1] * v + g[3, 2]
        ny = g[4, 0] * u + g[4, 1] * v + g[4, 2]
        nz = g[5, 0] * u + g[5, 1] * v + g[5, 2]
        if not nz >= cos_max * np.sqrt(nx * nx + ny * ny + nz * nz):
            return False, 0.0, 0.0, 0.0
    return (True, g[0, 0] * u + g[0, 1] * v + g[0, 2], g[1, 0] * u + g[1, 1] * v + g[1, 2],
            g[2, 0] * u + g[2, 1] * v + g[2, 2])


@cached_njit(error_model="numpy", inline="always")
def _old_cell(x, y, per_cell, lo0, lo1, span0, span1):
    c0 = min(max(np.int64(np.floor(x * per_cell) - lo0), 0), span0 - 1)
    c1 = min(max(np.int64(np.floor(y * per_cell) - lo1), 0), span1 - 1)
    return c1 * span0 + c0


@cached_njit(error_model="numpy")
def _old_unwrap_ortho(triangles, to_bary, zb_starts, zb_rows, zb_cols, starts, rows, cols, per_vertex, per_cell,
                      lo0, lo1, span0, span1, cos_max, tolerance, max_x, max_y, map_x, map_y):
    zbuf = np.full(span0 * span1, -np.inf)
    g = np.empty((6, 3))
    for t in range(len(zb_starts) - 1):
        if zb_starts[t + 1] == zb_starts[t]:
            continue
        all_facing = texture._triangle_affine(triangles, to_bary, per_vertex, t, g, cos_max)
        for q in range(zb_starts[t], zb_starts[t + 1]):
            facing, x, y, depth = _old_texel(g, zb_rows[q], zb_cols[q], all_facing, cos_max)
            if facing:
                k = _old_cell(x, y, per_cell, lo0, lo1, span0, span1)
                if depth > zbuf[k]:
                    zbuf[k] = depth
    visible = 0
    for t in range(len(starts) - 1):
        if starts[t + 1] == starts[t]:
            continue
        all_facing = texture._triangle_affine(triangles, to_bary, per_vertex, t, g, cos_max)
        inside = True
        for j in range(3):
            x, y = per_vertex[triangles[t, j], 0], per_vertex[triangles[t, j], 1]
            inside = inside and 0.0 <= x <= max_x and 0.0 <= y <= max_y
        for q in range(starts[t], starts[t + 1]):
            facing, x, y, depth = _old_texel(g, rows[q], cols[q], all_facing, cos_max)
            if not facing:
                continue
            if inside:
                x, y = min(max(x, 0.0), max_x), min(max(y, 0.0), max_y)
            elif not (0.0 <= x <= max_x and 0.0 <= y <= max_y):
                continue
            if depth < zbuf[_old_cell(x, y, per_cell, lo0, lo1, span0, span1)] - tolerance:
                continue
            map_x[rows[q], cols[q]] = x
            map_y[rows[q], cols[q]] = y
            visible += 1
    return visible


def old_maps(photo_shape: tuple[int, ...], vertices: np.ndarray, normals: np.ndarray, camera: Cameras,
             to_photo: float, raster: UVTexels, runs: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]],
             config: TextureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The previous ``unwrap``'s two float32 maps."""
    per_vertex = _camera_vertices(vertices, normals, camera, float(to_photo))
    per_cell = 1.0 / (float(camera.scale[0]) * config.zbuffer_cell_mm * float(to_photo))
    lo = np.floor(per_vertex[:, :2].min(axis=0) * per_cell) - 1
    span = (np.floor(per_vertex[:, :2].max(axis=0) * per_cell) + 2 - lo).astype(np.int64)
    h, w = photo_shape[:2]
    map_x = np.full((raster.resolution, raster.resolution), -16.0, np.float32)
    map_y = map_x.copy()
    (zs, zr, zc), (s, r, c) = runs
    t0 = time.process_time()
    _old_unwrap_ortho(raster.triangles, raster.to_bary, zs, zr, zc, s, r, c, per_vertex, per_cell, float(lo[0]),
                      float(lo[1]), int(span[0]), int(span[1]), float(np.cos(np.radians(config.max_view_angle_deg))),
                      float(config.depth_tolerance_mm), float(w - 1), float(h - 1), map_x, map_y)
    KERNEL_S["old"] += time.process_time() - t0
    return map_x, map_y


def old_unwrap(photo: np.ndarray, vertices: np.ndarray, normals: np.ndarray, camera: Cameras, to_photo: float,
               raster: UVTexels, runs: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]],
               config: TextureConfig) -> Unwrapped:
    """The previous ``unwrap``: its maps, then one ``cv2.remap`` of float maps."""
    map_x, map_y = old_maps(photo.shape, vertices, normals, camera, to_photo, raster, runs, config)
    opaque = cv2.cvtColor(np.ascontiguousarray(photo, np.uint8), cv2.COLOR_RGB2RGBA)
    rgba = cv2.remap(opaque, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return Unwrapped(rgba)


# --- the measurement ----------------------------------------------------------------------------------------------


def real_fits(args: argparse.Namespace) -> tuple[ProxyShardWorker, list[tuple[np.ndarray, np.ndarray, Cameras]]]:
    """The worker and the first ``args.faces`` usable fits of the folder: (photo, vertices, camera)."""
    items = list_inputs(args.photos)
    spec = ProxySpec(model_path=args.model, dictionary_path=args.dictionary, load=LoadConfig(), detector=DETECTOR,
                     fit=FitConfig(), texture=TextureConfig(resolution=16), params_hash="bench-unwrap")
    worker = ProxyShardWorker(spec)
    faces = []
    for item in items:
        _, found = worker._face(item)
        if not isinstance(found, str):
            faces += [f for f in found if not f.too_small]
        if len(faces) >= args.faces:
            break
    faces = faces[:args.faces]
    landmarks = np.stack([f.landmarks for f in faces])
    prior = worker.dictionary.prior_for_faces([f.photo.rgb for f in faces], landmarks)
    fit = worker.fitter.fit(landmarks, prior.beta)
    return worker, [(f.photo.rgb, worker.model.vertices(fit.alpha[k], fit.beta[k]), fit.cameras.select(k))
                    for k, f in enumerate(faces)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("data/wild_synth/images"))
    parser.add_argument("--model", type=Path, default=Path("data/face_model/model.npz"))
    parser.add_argument("--dictionary", type=Path, default=Path("data/dictionary"))
    parser.add_argument("--faces", type=int, default=24, help="real fits to unwrap")
    parser.add_argument("--repeat", type=int, default=5, help="times each fit is unwrapped by each version")
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args()
    texture._unwrap_ortho = _timed_kernel(texture._unwrap_ortho)  # unwrap_maps looks it up at each call
    with threadpool_limits(1):
        torch.set_num_threads(1)
        cv2.setNumThreads(1)  # as the stage's pool processes (shards.one_thread_per_process)
        worker, fits = real_fits(args)
        print(f"{len(fits)} real fits of {args.photos}")
        for resolution in args.resolution:
            config = TextureConfig(resolution=resolution)
            raster = UVTexels.build(worker.model.uv, worker.model.triangles, resolution)
            runs = old_runs(worker.model.uv, worker.model.triangles, resolution)
            normals = [worker.model.vertex_normals(v) for _, v, _ in fits]
            for (rgb, v, cam), n in zip(fits[:1], normals[:1], strict=True):  # compile / load both before timing
                unwrap(rgb, v, n, cam, 1.0, raster, config)
                old_unwrap(rgb, v, n, cam, 1.0, raster, runs, config)
            spent = dict.fromkeys(("old maps", "new maps", "old unwrap", "new unwrap"), 0.0)
            KERNEL_S.update(old=0.0, new=0.0)
            differ = flips = total = worst = 0
            for _ in range(args.repeat):
                for k, ((rgb, v, cam), n) in enumerate(zip(fits, normals, strict=True)):
                    calls = {
                        "old maps": partial(old_maps, rgb.shape, v, n, cam, 1.0, raster, runs, config),
                        "new maps": partial(unwrap_maps, rgb.shape, v, n, cam, 1.0, raster, config),
                        "old unwrap": partial(old_unwrap, rgb, v, n, cam, 1.0, raster, runs, config),
                        "new unwrap": partial(unwrap, rgb, v, n, cam, 1.0, raster, config),
                    }
                    got = {}
                    for name in list(calls)[::-1] if k % 2 else calls:  # alternate the order: no order bias
                        t0 = time.process_time()
                        got[name] = calls[name]()
                        spent[name] += time.process_time() - t0
                    a, b = got["new unwrap"].rgba_map, got["old unwrap"].rgba_map
                    differ += int(np.count_nonzero((a != b).any(axis=-1)))
                    flips += int(np.count_nonzero(a[..., 3] != b[..., 3]))
                    total += int(np.count_nonzero(b[..., 3]))
                    both = (a[..., 3] > 0) & (b[..., 3] > 0)
                    worst = max(worst, int(np.abs(a[both].astype(int) - b[both]).max(initial=0)))
            n_tex = args.repeat * len(fits)
            ms = {name: t / n_tex * 1000 for name, t in spent.items()}
            print(f"== {resolution}², {n_tex} unwraps of each (CPU ms per texture, process_time)")
            # Each version's loop runs twice per fit and repeat (in "maps" and in "unwrap").
            kernel = {k: v / (2 * n_tex) * 1000 for k, v in KERNEL_S.items()}
            print(f"  compiled loop alone: previous {kernel['old']:.2f} ms, now {kernel['new']:.2f} ms: "
                  f"{kernel['old'] / kernel['new']:.2f}x")
            print(f"  maps (the compiled loop and its set-up): previous {ms['old maps']:.2f} ms, now "
                  f"{ms['new maps']:.2f} ms: {ms['old maps'] / ms['new maps']:.2f}x")
            print(f"  unwrap (maps, remap, RGBA): previous {ms['old unwrap']:.2f} ms, now {ms['new unwrap']:.2f} ms: "
                  f"{ms['old unwrap'] / ms['new unwrap']:.2f}x")
            print(f"  texels whose RGBA differs: {differ} of {total} visible ({differ / max(total, 1):.2e}), "
                  f"visibility flips {flips}, largest colour difference where both visible {worst}")


if __name__ == "__main__":
    main()
