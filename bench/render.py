"""Benchmark: the expression-set renderer vs a naive pyrender loop, measured in one run.

    python bench/render.py [--share data/external/eos-share] [--count 2000] [--workers 0] [--naive 40]

Ours: the ``render_expressions`` code path end to end (sampling, posing, SH shading, one
reused GL context per process, background, PNG encoding, tar shards) over ``--count``
images on ``--workers`` processes (0 = all cores), pool start-up included; and the same per
image in one process. Baseline: what a first pyrender script does per image: a new
``pyrender.Scene`` and ``OffscreenRenderer``, the mesh through trimesh, pyrender's own lit
shading, PNG encoding, one process. Prints images/s, our ratio to the baseline and the
projected time for the paper's 90,000 images.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np

PAPER_IMAGES = 90_000


def naive_images_per_s(model, size: int, n: int) -> float:
    """Images/s of a new scene + renderer per image (pyrender's lit shading), one process."""
    import trimesh

    from facedetail.render.offscreen import import_pyrender
    from facedetail.render.sampling import SamplingConfig, sample_render

    pr = import_pyrender()
    config = SamplingConfig()
    rng = np.random.default_rng(0)
    rgba = (np.column_stack([model.albedo(), np.ones(model.n_vertices)]) * 255).astype(np.uint8)
    start = time.perf_counter()
    for _ in range(n):
        sample = sample_render(rng, config, model)
        verts = model.vertices(sample.alpha, sample.beta)
        scene = pr.Scene(bg_color=[*sample.background_colors[0], 1.0], ambient_light=[sample.ambient] * 3)
        scene.add(pr.Mesh.from_trimesh(trimesh.Trimesh(verts, model.triangles, vertex_colors=rgba, process=False)))
        pose = np.eye(4)
        pose[2, 3] = sample.distance_mm
        scene.add(pr.PerspectiveCamera(yfov=np.radians(config.camera.fov_deg)), pose=pose)
        scene.add(pr.DirectionalLight(intensity=3.0 * sample.light_intensity), pose=pose)
        renderer = pr.OffscreenRenderer(size, size)
        color, _ = renderer.render(scene)
        renderer.delete()
        cv2.imencode(".png", color[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=Path, default=Path("data/external/eos-share"))
    parser.add_argument("--count", type=int, default=2000, help="images for our parallel run")
    parser.add_argument("--workers", type=int, default=0, help="render processes (0 = all cores)")
    parser.add_argument("--single", type=int, default=200, help="images for our one-process run")
    parser.add_argument("--naive", type=int, default=40, help="images for the naive baseline")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    from facedetail.io.shards import build_shards, shard_tasks
    from facedetail.model import load_model_source
    from facedetail.render.expression_set import ExpressionSetSpec, ExpressionShardWorker, item_id
    from facedetail.render.sampling import SamplingConfig

    model = load_model_source("sfm", args.share / "sfm_shape_3448.bin", args.share)
    workers = args.workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        model_path = model.save(Path(tmp) / "model.npz")
        spec = ExpressionSetSpec(model_path, "bench", 0, args.size, SamplingConfig(), 3, "bench")

        worker = ExpressionShardWorker(spec)
        worker.render_item(item_id(0))  # first frame compiles the shader
        start = time.perf_counter()
        for i in range(args.single):
            worker.render_item(item_id(i))
        single = args.single / (time.perf_counter() - start)
        worker.renderer.close()

        tasks = shard_tasks([item_id(i) for i in range(args.count)], max(1, args.count // (2 * workers)))
        start = time.perf_counter()
        build_shards(tasks, Path(tmp) / "shards", "bench", partial(ExpressionShardWorker, spec), workers=workers,
                     desc="bench", unit="img")
        parallel = args.count / (time.perf_counter() - start)

    naive = naive_images_per_s(model, args.size, args.naive)
    print(f"expression renders at {args.size}x{args.size}, SFM {model.n_vertices} vertices, {workers} workers:")
    print(f"  {'facedetail, ' + str(workers) + ' processes':<30}: {parallel:8.1f} images/s "
          f"({args.count} images into tar shards, pool start-up included)")
    print(f"  {'facedetail, 1 process':<30}: {single:8.1f} images/s")
    print(f"  {'naive pyrender loop':<30}: {naive:8.1f} images/s (baseline: new Scene + OffscreenRenderer per image)")
    print(f"  {'ratio (parallel / naive)':<30}: {parallel / naive:8.1f}x")
    print(f"  {'ratio (1 process / naive)':<30}: {single / naive:8.1f}x")
    print(f"  {'projected 90,000 images':<30}: {PAPER_IMAGES / parallel / 60:8.1f} min "
          f"(naive: {PAPER_IMAGES / naive / 60:.0f} min)")


if __name__ == "__main__":
    main()
