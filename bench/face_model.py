"""Benchmark: batched model evaluation vs eos-py, batched normals vs trimesh, measured in one run.

    python bench/face_model.py [--share data/external/eos-share] [--batch 1000] [--repeats 3]

Prints faces per second for each implementation and our speed as a ratio of the baseline.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def report(title: str, n: int, ours: tuple[str, float], baseline: tuple[str, float]) -> None:
    """Print both throughputs and our speed-up over the baseline."""
    print(f"{title}:")
    print(f"  {ours[0]:<19}: {n / ours[1]:10.0f} faces/s")
    print(f"  {baseline[0]:<19}: {n / baseline[1]:10.0f} faces/s (baseline)")
    print(f"  {'ratio':<19}: {baseline[1] / ours[1]:10.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=Path, default=Path("data/external/eos-share"))
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import eos
    import trimesh

    from facedetail.model import load_model_source

    model = load_model_source("sfm", args.share / "sfm_shape_3448.bin", args.share)
    eos_shape = eos.morphablemodel.load_model(str(args.share / "sfm_shape_3448.bin")).get_shape_model()
    blendshapes = np.stack([np.asarray(b.deformation) for b in
                            eos.morphablemodel.load_blendshapes(str(args.share / "expression_blendshapes_3448.bin"))])
    rng = np.random.default_rng(0)
    alpha = rng.standard_normal((args.batch, model.n_shape)).astype(np.float32)
    beta = rng.uniform(0, 1, (args.batch, model.n_expression)).astype(np.float32)

    def ours_vertices() -> np.ndarray:
        return model.vertices(alpha, beta)

    def eos_vertices() -> list[np.ndarray]:
        # eos's own API: one draw_sample per face, plus the blendshape sum (as eos.fitting does it).
        return [np.asarray(eos_shape.draw_sample(a)) + b @ blendshapes for a, b in zip(alpha, beta, strict=True)]

    ours = ours_vertices()
    reference = np.stack(eos_vertices()).reshape(ours.shape)
    assert np.abs(ours - reference).max() < 1e-2, "implementations disagree"

    t_ours = best_of(ours_vertices, args.repeats)
    t_eos = best_of(eos_vertices, args.repeats)
    report(f"vertices(alpha, beta), batch {args.batch}, SFM {model.n_vertices} vertices", args.batch,
           ("facedetail batched", t_ours), ("eos-py draw_sample", t_eos))

    n_norm = min(args.batch, 200)
    verts = ours[:n_norm]

    def ours_normals() -> np.ndarray:
        return model.vertex_normals(verts)

    def trimesh_normals() -> list[np.ndarray]:
        return [trimesh.Trimesh(v, model.triangles, process=False).vertex_normals for v in verts]

    t_on = best_of(ours_normals, args.repeats)
    t_tn = best_of(trimesh_normals, args.repeats)
    report(f"vertex normals, batch {n_norm}", n_norm, ("facedetail batched", t_on), ("trimesh per mesh", t_tn))


if __name__ == "__main__":
    main()
