"""Benchmark: the batched proxy fitter against eos-py's per-image fitter, and wild_proxy end to end.

    python bench/proxy.py [--faces 2000] [--eos-faces 200] [--photos data/wild_synth/images] [--repeat 4]
                          [--model data/face_model/model.npz] [--share data/external/eos-share]
                          [--resolution 512 1024] [--runs 3] [--processes 1 2]
                          [--retry-max-pixels N] [--encodings] [--skip-fit]

1. Fitting only: the same landmarks (exact 2-D landmarks of random Surrey-model faces, random
   pose up to ±40° yaw, plus 1 px noise) go to our ``ProxyFitter`` (batches of 256, β fixed as
   in the paper's default, 10 iterations; and β free, 5 iterations) and to eos-py's
   ``fit_shape_and_pose`` (5 iterations, its default), one image at a time, given the landmarks in
   our face-normalised frame (as the stage's comparison does). Prints fits/s of each, the ratio
   (target >= 10x) and both mean landmark errors in the photos' px.
2. End to end: the wild_proxy shard worker over a folder of photos (decode, detect, landmarks,
   β_prior lookup, fit, UV unwrap, texture encode), per texture resolution: the split per step of
   one warm process (photos without a face apart: their detection, retries included, per input), then
   ``--runs`` runs in each of ``--processes`` (1 and 2) processes counting their start-up (model,
   detector, dictionary, emotion network, UV raster, compiled loops), on the photos once and three
   times over: the best of each, the spread, the steady rate from their difference (start-up
   cancels out), and the projected time for the paper's 163K photos. The machine's load is
   printed: on a shared machine, trust the best run.
3. ``--encodings``: each way to store a texture (PNG through OpenCV at zlib levels 1, 3, 6; PNG
   with the Up filter through ISA-L, what the stage writes; WebP lossless at its fastest method;
   raw RGBA bytes), time and size per texture, at every resolution.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from facedetail.io.images import encode_png, encode_png_fast
from facedetail.io.shards import ShardTask, build_shards, shard_tasks
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.eos_reference import EosFitter
from facedetail.proxy.fit import LEFT_CONTOUR, RIGHT_CONTOUR, Cameras, FitConfig, ProxyFitter, face_size_px
from facedetail.proxy.inputs import InputItem, LoadConfig, LoadedPhoto, list_inputs, load_photo
from facedetail.proxy.pipeline import ProxyShardWorker, ProxySpec
from facedetail.proxy.texture import TextureConfig, Unwrapped, encode_texture, unwrap
from facedetail.render.camera import euler_rotation
from stages.wild_proxy import DETECTOR

PAPER_PHOTOS = 163_000


def synthetic_landmarks(model: MorphableModel, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 68, 2) landmarks in 256 px images (y down) of random faces, and their β."""
    rng = np.random.default_rng(seed)
    alpha = np.clip(rng.standard_normal((n, model.n_shape)), -2.5, 2.5)
    beta = np.abs(rng.standard_normal((n, model.n_expression))) * 0.4
    rot = np.stack([euler_rotation(y, p, r) for y, p, r in
                    zip(rng.uniform(-40, 40, n), rng.uniform(-15, 15, n), rng.uniform(-10, 10, n), strict=True)])
    cams = Cameras(rng.uniform(0.9, 1.3, n), rot, np.c_[rng.uniform(110, 146, n), -rng.uniform(110, 146, n)])
    verts = model.vertices(alpha, beta).astype(np.float64)
    ids = np.where(model.landmark_defined, model.landmark_vertices, 0)
    for side, cand in ((RIGHT_CONTOUR, model.contour_right), (LEFT_CONTOUR, model.contour_left)):
        ids[side] = cand[np.linspace(0, len(cand) - 1, len(side)).astype(int)]
    xy = cams.project(verts[:, ids])
    xy[..., 1] *= -1
    return xy + rng.normal(0, 1.0, xy.shape), beta


def fixed_landmark_error(model: MorphableModel, verts: np.ndarray, project, landmarks: np.ndarray) -> float:
    ids = model.landmark_vertices[model.landmark_defined]
    return float(np.linalg.norm(project(verts[:, ids]) - landmarks[:, model.landmark_defined], axis=2).mean())


def bench_fit(model: MorphableModel, share: Path, faces: int, eos_faces: int) -> None:
    # One core each: the batched fitter's matrices are small (63 x 63), so BLAS threads only add
    # contention (measured 47 fits/s with 2 OpenBLAS threads on a busy machine, 549 with 1); eos is
    # single-threaded too. The stage gets its parallelism from processes.
    with threadpool_limits(1):
        _bench_fit(model, share, faces, eos_faces)


def _bench_fit(model: MorphableModel, share: Path, faces: int, eos_faces: int) -> None:
    landmarks, beta = synthetic_landmarks(model, faces, 0)
    print(f"== fitting only, one core: {faces} faces (ours), {eos_faces} (eos-py), landmarks with 1 px noise, 256 px")
    results = {}
    for mode in ("prior", "free"):
        fitter = ProxyFitter(model, FitConfig(expression=mode))
        fitter.fit(landmarks[:8], beta[:8])  # warm-up (BLAS, caches)
        t0 = time.perf_counter()
        out = [fitter.fit(landmarks[i:i + 256], beta[i:i + 256]) for i in range(0, faces, 256)]
        dt = time.perf_counter() - t0
        alpha = np.concatenate([r.alpha for r in out])
        fitted_beta = np.concatenate([r.beta for r in out])
        scale = np.concatenate([r.cameras.scale for r in out])
        rot = np.concatenate([r.cameras.rotation for r in out])
        trans = np.concatenate([r.cameras.translation for r in out])
        verts = model.vertices(alpha, fitted_beta).astype(np.float64)

        def project(p, scale=scale, rot=rot, trans=trans):
            xy = scale[:, None, None] * np.einsum("bij,bnj->bni", rot[:, :2], p) + trans[:, None]
            return xy * [1, -1]

        results[mode] = (faces / dt, fixed_landmark_error(model, verts, project, landmarks))
    eos = EosFitter(share)
    # eos in our face frame (face_size px, centred in a 4x canvas), its errors back in photo px.
    face = FitConfig().face_size
    k = face / face_size_px(landmarks[:eos_faces])
    framed = (landmarks[:eos_faces] - landmarks[:eos_faces].mean(axis=1, keepdims=True)) * k[:, None, None] + 2 * face
    canvas = int(4 * face)
    eos.fit(framed[0], canvas, canvas)
    t0 = time.perf_counter()
    fits = [eos.fit(framed[i], canvas, canvas) for i in range(eos_faces)]
    eos_dt = time.perf_counter() - t0
    ids = model.landmark_vertices[model.landmark_defined]
    eos_err = float(np.mean([np.linalg.norm(f.projected[ids] - framed[i, model.landmark_defined], axis=1).mean() / k[i]
                             for i, f in enumerate(fits)]))
    eos_rate = eos_faces / eos_dt
    print(f"  {'fitter':<44} {'fits/s':>9} {'vs eos':>7} {'landmark err px':>16}")
    print(f"  {'eos-py fit_shape_and_pose (5 it, per image)':<44} {eos_rate:9.1f} {1.0:6.1f}x {eos_err:16.3f}")
    labels = {"prior": "ours, β = prior, 10 it, batches of 256", "free": "ours, β free, 5 it, batches of 256"}
    for mode, label in labels.items():
        rate, err = results[mode]
        print(f"  {label:<44} {rate:9.1f} {rate / eos_rate:6.1f}x {err:16.3f}")
    print("  (landmark error: mean over the 50 landmarks with fixed vertices; the β-prior run is given the true β)")


SHARD_SIZE = 32
"""Photos per shard, as the stage's default (params.yaml: wild_proxy.shard_size)."""


def bench_end_to_end(model_path: Path, dictionary: Path, photos: Path, repeat: int, resolution: int,
                     runs: int, processes: tuple[int, ...] = (1, 2),
                     retry_max_pixels: int | None = None) -> list[Unwrapped]:
    """Per-step split and end-to-end photos/s at one texture resolution; returns some textures for --encodings."""
    base = list_inputs(photos)
    if not base:
        raise SystemExit(f"no photos in {photos}")
    # The same photos several times under new ids: enough work to see steady throughput.
    items = [InputItem(f"{i.id}-r{r}", i.path, i.relative, i.box, i.label) for r in range(repeat) for i in base]
    detector = DETECTOR if retry_max_pixels is None else DETECTOR.model_copy(
        update={"retry_max_pixels": retry_max_pixels})
    if retry_max_pixels is not None:
        print(f"  (detector.retry_max_pixels {retry_max_pixels}, not the stage's {DETECTOR.retry_max_pixels}: "
              "outputs differ from the stage's where a retry would find a face)")
    spec = ProxySpec(model_path, dictionary, LoadConfig(), detector, FitConfig(),
                     TextureConfig(resolution=resolution), "bench")
    print(f"== end to end at {resolution}² textures: {len(base)} inputs x {repeat} from {photos} (decode, detect, "
          f"landmarks, β_prior, fit, UV unwrap, texture PNG ({spec.texture.png_encoder}))")
    with threadpool_limits(1), tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        worker = ProxyShardWorker(spec)
        init_s = time.perf_counter() - t0
        steps, textures = _step_times(worker, base)
        t0 = time.perf_counter()
        worker(ShardTask("all", tuple(i.id for i in items), tuple(items)), Path(tmp) / "all.tar", lambda n: None)
        steady = len(items) / (time.perf_counter() - t0)
    print(f"  one warm process, one thread: start-up {init_s:.1f} s, then {steady:.2f} photos/s")
    misses, miss_s = steps.pop("_misses"), steps.pop("no-face detect")
    print("  per usable photo: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in steps.items())
          + f" (total {sum(steps.values()) * 1000:.1f} ms)")
    print(f"  photos without a face: {misses} of {len(base)} inputs, their detection (retries included) "
          f"{miss_s * len(base) / max(misses, 1) * 1000:.1f} ms each = {miss_s * 1000:.1f} ms per input")
    for workers in processes:
        runs_at: dict[int, list[float]] = {}
        for times in (1, 3):  # the photos once and three times over: the difference is free of start-up
            work = [InputItem(f"{i.id}-x{k}", i.path, i.relative, i.box, i.label) for k in range(times) for i in items]
            runs_at[len(work)] = [_shard_run(spec, work, workers, f"{workers}-{times}-{run}") for run in range(runs)]
        (n1, t1), (n3, t3) = ((n, min(ts)) for n, ts in sorted(runs_at.items()))
        steady = (n3 - n1) / (t3 - t1)
        start = max(t1 - n1 / steady, 0.0)
        spread = "; ".join(f"{n} photos: {', '.join(f'{n / t:.1f}' for t in ts)}" for n, ts in sorted(runs_at.items()))
        print(f"  {workers} process(es), shards of {SHARD_SIZE}, start-up included: best {n1 / t1:.1f} photos/s on "
              f"{n1}, {n3 / t3:.1f} on {n3} (runs, photos/s: {spread}; load average now {os.getloadavg()[0]:.2f})")
        print(f"    steady rate (from the difference) {steady:.1f} photos/s, start-up {start:.1f} s: {PAPER_PHOTOS} "
              f"photos in {(start + PAPER_PHOTOS / steady) / 3600:.2f} h")
    return textures


def _shard_run(spec: ProxySpec, items: list[InputItem], workers: int, name: str) -> float:
    """Seconds of build_shards over ``items`` in ``workers`` processes, their start-up included.

    One process runs in this one, limited to one thread as the stage's pool processes are
    (shards.one_thread_per_process); otherwise BLAS, OpenCV and torch threads fight over the cores.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tasks = shard_tasks([i.id for i in items], SHARD_SIZE, inputs={i.id: i for i in items})
        factory = partial(ProxyShardWorker, spec)
        if workers == 1:
            with threadpool_limits(1):
                torch.set_num_threads(1)
                return build_shards(tasks, Path(tmp), f"bench-{name}", factory, workers=1, desc=name).seconds
        return build_shards(tasks, Path(tmp), f"bench-{name}", factory, workers=workers, desc=name).seconds


def bench_encodings(textures: list[Unwrapped], resolution: int) -> None:
    """Time and size of each way to store a texture."""
    from PIL import Image

    def webp(rgba: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, "WEBP", lossless=True, method=0, quality=0, exact=True)
        return buf.getvalue()

    rgbas = [t.rgba() for t in textures]
    ways = {f"PNG, OpenCV zlib level {k}": partial(lambda r, k: encode_png(r, k), k=k) for k in (1, 3, 6)}
    ways |= {"PNG, Up filter + ISA-L level 1 (the stage)": encode_png_fast, "WebP lossless, method 0": webp,
             "raw RGBA bytes": lambda r: r.tobytes()}
    print(f"== texture encodings at {resolution}², {len(rgbas)} textures of real fits")
    for name, fn in ways.items():
        fn(rgbas[0])
        t0 = time.perf_counter()
        sizes = [len(fn(r)) for r in rgbas]
        ms = (time.perf_counter() - t0) / len(rgbas) * 1000
        print(f"  {name:<44} {ms:7.1f} ms {np.mean(sizes) / 1e3:8.0f} KB")


def _step_times(worker: ProxyShardWorker, items: list[InputItem]) -> tuple[dict[str, float], list[Unwrapped]]:
    """Mean seconds per photo with a face, step by step, over ``items`` (after one warm-up pass), and the textures."""
    spec = worker.spec
    faces, misses = [], []
    for item in items:
        photo = load_photo(item.path, spec.load)
        if isinstance(photo, LoadedPhoto):
            found = worker.detector.detect(photo.rgb)
            if found.face is not None:
                faces.append((item, found.face.landmarks))
            else:
                misses.append(photo.rgb)
    worker.dictionary.prior_for_faces([load_photo(faces[0][0].path, spec.load).rgb], faces[0][1][None])
    times = dict.fromkeys(("decode", "detect", "β_prior", "fit", "unwrap", "encode"), 0.0)

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] += time.perf_counter() - t0
        return out

    rgbs = [timed("decode", lambda i=i: load_photo(i.path, spec.load).rgb) for i, _ in faces]
    lms = np.stack([timed("detect", lambda rgb=rgb: worker.detector.detect(rgb).face.landmarks) for rgb in rgbs])
    prior = timed("β_prior", lambda: worker.dictionary.prior_for_faces(rgbs, lms))
    fit = timed("fit", lambda: worker.fitter.fit(lms, prior.beta))
    textures = []
    for k, rgb in enumerate(rgbs):
        verts = worker.model.vertices(fit.alpha[k], fit.beta[k])
        out = timed("unwrap", lambda rgb=rgb, verts=verts, k=k: unwrap(
            rgb, verts, worker.model.vertex_normals(verts), fit.cameras.select(k), 1.0, worker.raster, spec.texture))
        timed("encode", lambda out=out: encode_texture(out, spec.texture))
        if len(textures) < 16:
            textures.append(out)
    per_face = {k: v / len(faces) for k, v in times.items()}
    # Photos without a face cost their detection, retries on enlarged copies included: per input of the set.
    t0 = time.perf_counter()
    for rgb in misses:
        worker.detector.detect(rgb)
    per_face["no-face detect"] = (time.perf_counter() - t0) / len(items)
    per_face["_misses"] = len(misses)
    return per_face, textures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=2000)
    parser.add_argument("--eos-faces", type=int, default=200)
    parser.add_argument("--model", type=Path, default=Path("data/face_model/model.npz"))
    parser.add_argument("--share", type=Path, default=Path("data/external/eos-share"))
    parser.add_argument("--dictionary", type=Path, default=Path("data/dictionary"))
    parser.add_argument("--photos", type=Path, default=Path("data/wild_synth/images"))
    parser.add_argument("--repeat", type=int, default=4, help="times each photo is processed end to end")
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 1024], help="texture sides to measure")
    parser.add_argument("--runs", type=int, default=2, help="end-to-end runs per process count (best is reported)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts of the runs")
    parser.add_argument("--retry-max-pixels", type=int, default=None,
                        help="override the stage's detector.retry_max_pixels (0 = no retry), to measure its cost")
    parser.add_argument("--encodings", action="store_true", help="also time every texture encoding")
    parser.add_argument("--skip-fit", action="store_true", help="leave out the fitting-only comparison with eos-py")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")
    if not args.skip_fit:
        bench_fit(MorphableModel.load(args.model), args.share, args.faces, args.eos_faces)
    for resolution in args.resolution:
        textures = bench_end_to_end(args.model, args.dictionary, args.photos, args.repeat, resolution, args.runs,
                                    tuple(args.processes), args.retry_max_pixels)
        if args.encodings:
            bench_encodings(textures, resolution)


if __name__ == "__main__":
    main()
