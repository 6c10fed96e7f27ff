"""Benchmark: displacement extraction (texels/s) against a naive per-texel nearest-point query, in one run.

    python bench/capture.py [--share data/external/eos-share] [--resolution 1024] [--edge 0.5]
                            [--naive 300] [--batched 20000] [--triangle 500] [--paper-resolution 4096]
                            [--workers 0]

One synthetic scan pair (Surrey model, identity and details from the ``capture_synth`` code,
``--edge`` mm scan edges) is measured at ``--resolution``²:

* ours: ``extract_displacement`` over every texel of the proxy's UV chart (two rays per texel,
  along ± the normal, trimesh with Embree when ``embreex`` is installed; ray-scene build,
  high-pass and normal map included), and the ray casting alone;
* trimesh's NumPy ray intersector (the backend used without ``embreex``) on ``--triangle``
  texels, when ``rtree`` is installed;
* baseline: what a first script does per texel: ``mesh.nearest.on_surface([p])`` (trimesh's
  closest point on the scan), signed by the proxy normal, one texel at a time, on ``--naive``
  texels.

Then one whole item (load, checks, ICP, extraction, writing the maps) at
``--paper-resolution``² (0 skips it) gives the projected time of the paper's 706 pairs, on one
process and on ``--workers`` processes (0 = all cores; items are independent).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

PAPER_PAIRS = 706


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=Path, default=Path("data/external/eos-share"))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--edge", type=float, default=0.5, help="longest scan edge (mm)")
    parser.add_argument("--naive", type=int, default=300, help="texels for the naive nearest-point baseline")
    parser.add_argument("--batched", type=int, default=20000, help="texels for trimesh's batched closest point")
    parser.add_argument("--triangle", type=int, default=500, help="texels for trimesh's NumPy intersector")
    parser.add_argument("--paper-resolution", type=int, default=4096, help="one whole item at this size (0: skip)")
    parser.add_argument("--workers", type=int, default=0, help="processes assumed for the projection (0 = cores)")
    args = parser.parse_args()

    import trimesh

    from facedetail.capture.align import align_scan
    from facedetail.capture.extract import (
        ExtractConfig,
        RayCaster,
        embree_available,
        extract_displacement,
        signed_distance,
    )
    from facedetail.capture.maps import write_item_maps
    from facedetail.capture.process import CaptureConfig, process_capture, proxy_maps
    from facedetail.capture.scan import CaptureItem
    from facedetail.capture.synthset import SyntheticSetConfig, SyntheticSetWriter, SynthTask
    from facedetail.model import load_model_source
    from facedetail.model.uvmap import rasterize_uv

    model = load_model_source("sfm", args.share / "sfm_shape_3448.bin", args.share)
    workers = args.workers or len(os.sched_getaffinity(0))
    config = ExtractConfig()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_path = model.save(tmp / "model.npz")
        synth = SyntheticSetConfig(resolution=args.resolution, scan=SyntheticSetConfig().scan.model_copy(
            update={"edge_mm": args.edge}))
        SyntheticSetWriter(model_path, synth, "bench", tmp / "set")(SynthTask("s000", "happiness"))
        folder = tmp / "set/s000/happiness"
        scan = trimesh.load(folder / "scan.ply", process=False, force="mesh")
        proxy = model.vertices(**{k: np.asarray(v) for k, v in json.loads((folder / "proxy.json").read_text())
                                  .items() if k in ("alpha", "beta")}).astype(np.float64)

        start = time.perf_counter()
        raster = rasterize_uv(model.uv, model.triangles, args.resolution)
        raster_s = time.perf_counter() - start
        pm = proxy_maps(raster, model, proxy)
        rng = np.random.default_rng(0)
        alignment = align_scan(pm.positions[pm.covered], np.asarray(scan.vertices), np.asarray(scan.vertex_normals),
                               CaptureConfig().align, rng)
        aligned = trimesh.Trimesh(trimesh.transform_points(scan.vertices, alignment.transform), scan.faces,
                                  process=False)
        cast = pm.covered & ~pm.folded(config.max_fold_deg)
        texels = int(cast.sum())
        points, normals = pm.positions[cast], pm.normals[cast]

        start = time.perf_counter()
        maps = extract_displacement(pm, aligned, config)
        ours_s = time.perf_counter() - start
        caster = RayCaster(aligned, config.ray_backend)
        start = time.perf_counter()
        ours_d = signed_distance(caster, points, normals, config.max_distance_mm)
        rays_s = time.perf_counter() - start

        pick = np.random.default_rng(1).choice(texels, min(args.naive, texels), replace=False)
        triangle_rate = None
        try:
            import rtree  # noqa: F401 - trimesh's nearest-point and NumPy ray queries need it
        except ImportError:
            raise SystemExit("the baseline needs rtree (trimesh's nearest-point query): pip install rtree") from None
        aligned.nearest.on_surface(points[:1])  # builds trimesh's triangle tree: not timed (favours the baseline)
        start = time.perf_counter()
        naive_d = np.empty(len(pick))
        for j, i in enumerate(pick):
            q = aligned.nearest.on_surface(points[i:i + 1])[0][0]
            naive_d[j] = float(np.dot(q - points[i], normals[i]))
        naive_s = time.perf_counter() - start
        bpick = np.random.default_rng(3).choice(texels, min(args.batched, texels), replace=False)
        start = time.perf_counter()
        trimesh.proximity.closest_point(aligned, points[bpick])
        batched_rate = len(bpick) / (time.perf_counter() - start)
        if args.triangle and embree_available():
            tpick = np.random.default_rng(2).choice(texels, min(args.triangle, texels), replace=False)
            slow = RayCaster(aligned, "triangle")
            slow.first_hit(points[:1], normals[:1])  # the tree again, not timed
            start = time.perf_counter()
            signed_distance(slow, points[tpick], normals[tpick], config.max_distance_mm)
            triangle_rate = len(tpick) / (time.perf_counter() - start)

        paper = None
        if args.paper_resolution:
            big = SyntheticSetConfig(resolution=args.paper_resolution, scan=synth.scan)
            SyntheticSetWriter(model_path, big, "bench", tmp / "big")(SynthTask("s000", "happiness"))
            start = time.perf_counter()
            big_raster = rasterize_uv(model.uv, model.triangles, args.paper_resolution)
            big_raster_s = time.perf_counter() - start
            cfg = CaptureConfig(resolution=args.paper_resolution)
            start = time.perf_counter()
            result = process_capture(CaptureItem("s000/happiness", tmp / "big/s000/happiness"), model, big_raster,
                                     cfg, np.random.default_rng(0))
            write_item_maps(tmp / "big/out", result.maps.displacement, result.maps.mask, result.maps.normals,
                            cfg.png_scale_mm)
            paper = (time.perf_counter() - start, big_raster_s, int(result.maps.mask.sum()),
                     result.facts["extract_seconds"])

    agree = np.abs(ours_d[pick] - naive_d)
    both = np.isfinite(agree)
    print(f"displacement extraction at {args.resolution}², SFM proxy, scan {len(scan.faces):,} faces "
          f"(edge {args.edge} mm), {texels:,} texels cast, backend {caster.backend}:")
    print(f"  {'facedetail extract_displacement':<36}: {texels / ours_s:12,.0f} texels/s "
          f"({ours_s:.2f} s: rays, high-pass, normal map; masked {maps.masked_fraction:.2%})")
    print(f"  {'facedetail rays only (2 per texel)':<36}: {texels / rays_s:12,.0f} texels/s ({rays_s:.2f} s)")
    if triangle_rate:
        print(f"  {'trimesh NumPy intersector (no embree)':<36}: {triangle_rate:12,.0f} texels/s")
    print(f"  {'naive per-texel nearest point':<36}: {len(pick) / naive_s:12,.0f} texels/s "
          f"(baseline: mesh.nearest.on_surface per texel, {len(pick)} texels)")
    print(f"  {'trimesh closest_point, batched':<36}: {batched_rate:12,.0f} texels/s "
          f"(stronger reference: one call for {len(bpick):,} texels)")
    print(f"  {'ratio (extract / naive)':<36}: {(texels / ours_s) / (len(pick) / naive_s):12,.0f}x")
    print(f"  {'|ours - nearest point| (same texels)':<36}: median {np.median(agree[both]):.2e} mm, "
          f"p99 {np.percentile(agree[both], 99):.2e} mm")
    print(f"  {'UV raster (once per run)':<36}: {raster_s:.2f} s")
    if paper:
        total, big_raster_s, valid, extract_s = paper
        print(f"one whole item at {args.paper_resolution}² (load, checks, ICP, rays, high-pass, normals, "
              f"4 files written): {total:.1f} s ({valid:,} valid texels, extraction {extract_s:.1f} s); "
              f"UV raster once per run: {big_raster_s:.1f} s")
        print(f"  {'projected 706 pairs, 1 process':<36}: {PAPER_PAIRS * total / 3600:8.2f} h")
        print(f"  {'projected 706 pairs, ' + str(workers) + ' processes':<36}: "
              f"{PAPER_PAIRS * total / workers / 3600:8.2f} h")
        naive_h = PAPER_PAIRS * valid / (len(pick) / naive_s) / 3600
        print(f"  {'naive baseline, 706 pairs, 1 process':<36}: {naive_h:8.0f} h")


if __name__ == "__main__":
    main()
