"""Benchmark: seconds per photo of ``facedetail reconstruct``, split by step, on one core.

    python bench/reconstruct.py [--photos P ...] [--count 6] [--levels 3] [--threads 1]
                                [--paper-patches 24] [--peak-seconds 1.5] [--json PATH]

Needs the default profile's models (``dvc repro train_detail``). Photos: ``--photos``, else the first
``--count`` capture photos of ``data/capture_synth`` (512², the issue's reference size). With the models loaded
once (their load time is printed apart), each photo goes through :class:`~facedetail.reconstruct.photo.Reconstructor`
end to end (``reconstruct`` + ``write``) and its steps are timed (proxy, network, stitch, mesh, files); the proxy
step is then split by timing its parts alone on the same photo (decode, landmarks, β_prior, fit, unwrap + PNG).
Medians over the photos are printed.

Ratios against baselines measured in the same run:

* network: patches/s of the stitching path (batches of 64, ``torch.no_grad``) against one patch per forward
  pass, and the achieved FLOP/s (``flops_per_patch``) as a fraction of this core's dense float32 matmul
  (``bench/detail.py``'s ``dense_peaks``); channels_last is timed too;
* mesh: the precomputed subdivision map (a sparse product per photo) against subdividing each proxy with
  trimesh (``subdivide`` x levels with the UVs and normals carried), the same vertices; both then sample the
  displacement and displace the same way.

The stride trade-off: the network + stitch time at 2x and 4x the training stride on the first 3 photos, and how
far (mean |difference|, mm) each map is from the training stride's.

The paper profile (the release's layer sizes, 256² patches on a 4096² chart, 2,937 patches per face): the
generator's forward is timed on ``--paper-patches`` random patches and projected to 2,937.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detail import dense_peaks, rate_for

from facedetail.detail.networks import PROFILES, DetailGenerator, flops_per_patch, normalize_patch
from facedetail.proxy.inputs import LoadFailure, load_photo
from facedetail.proxy.texture import unwrap
from facedetail.reconstruct.mesh import sample_map
from facedetail.reconstruct.photo import STEPS, Failure, ReconstructConfig, Reconstructor
from facedetail.render.detailed import SubdividedProxy, displace

ROOT = Path(__file__).resolve().parents[1]
PAPER_PATCHES = 2937


def default_photos(count: int) -> list[Path]:
    """The first ``count`` capture photos (512² renders of the synthetic capture set)."""
    found = sorted((ROOT / "data" / "capture_synth").glob("*/*/photo-0.png"))
    if not found:
        sys.exit("no photos: run `dvc repro capture_synth` or pass --photos")
    return found[:count]


def proxy_parts(engine: Reconstructor, photo: Path) -> dict[str, float]:
    """The proxy step's parts on one photo, each timed alone (as the wild_proxy worker runs them)."""
    w = engine.worker
    t = time.perf_counter()
    loaded = load_photo(photo, engine.config.load)
    out = {"decode": time.perf_counter() - t}
    if isinstance(loaded, LoadFailure):
        return out
    t = time.perf_counter()
    det = w.detector.detect(loaded.rgb)
    out["landmarks"] = time.perf_counter() - t
    if det.face is None:
        return out
    lm = det.face.landmarks[None]
    t = time.perf_counter()
    prior = w.dictionary.prior_for_faces([loaded.rgb], lm)
    out["prior"] = time.perf_counter() - t
    t = time.perf_counter()
    fit = w.fitter.fit(lm, prior.beta)
    out["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    vertices = w.model.vertices(fit.alpha[0], fit.beta[0])
    unwrapped = unwrap(loaded.rgb, vertices, w.model.vertex_normals(vertices), fit.cameras.select(0),
                       1.0, w.raster, w.spec.texture)
    from facedetail.io.images import encode_png
    encode_png(unwrapped.rgba(), w.spec.texture.png_compression)
    out["unwrap_png"] = time.perf_counter() - t
    return out


def network_rates(engine: Reconstructor, seconds: float) -> dict[str, float]:
    """Patches/s of one region's generator: batch 64 channels_last (ours), batch 1 NCHW (baseline), batch 64 NCHW."""
    gen = next(iter(engine.net.generators.values()))
    p = gen.config.patch_size
    v = torch.from_numpy(normalize_patch(np.random.default_rng(0).random((64, 1, p, p), np.float32)))
    out = {}
    with torch.no_grad():
        gen.to(memory_format=torch.contiguous_format)
        per_s, _ = rate_for(lambda: gen(v[:1]), seconds)
        out["batch1"] = per_s
        per_s, _ = rate_for(lambda: gen(v), seconds)
        out["batch64_nchw"] = per_s * 64
        gen.to(memory_format=torch.channels_last)
        cl = v.contiguous(memory_format=torch.channels_last)
        per_s, _ = rate_for(lambda: gen(cl), seconds)
        out["batch64"] = per_s * 64
    return out


def mesh_rates(engine: Reconstructor, proxy: np.ndarray, levels: int, seconds: float) -> dict[str, float]:
    """Detailed-surface builds/s: the precomputed map (ours) against trimesh subdividing each proxy."""
    model = engine.model
    R = engine.net.resolution
    d, valid = np.zeros((R, R)), np.ones((R, R), bool)
    ours, _ = rate_for(lambda: engine.meshes.detailed(proxy, d, valid), seconds)

    def baseline() -> None:
        v, f = proxy, np.asarray(model.triangles)
        attrs = {"uv": model.uv.astype(np.float64), "n": model.vertex_normals(proxy.astype(np.float32))}
        for _ in range(levels):
            v, f, attrs = trimesh.remesh.subdivide(v, f, vertex_attributes=attrs)
        n = attrs["n"] / np.linalg.norm(attrs["n"], axis=1, keepdims=True)
        base = SubdividedProxy(v, f, attrs["uv"], n, None, len(proxy))
        displace(base, None, sample_map(d, valid, base.uv))  # the same displacement step as ours
    base, _ = rate_for(baseline, seconds)
    return {"ours": ours, "baseline": base}


def stride_tradeoff(engine: Reconstructor, photos: list[Path], strides: list[int]) -> list[dict[str, float]]:
    """Network + stitch seconds and the mean |difference| (mm) from the training stride's map, per stride."""
    from facedetail.reconstruct.detailnet import StitchConfig

    textures = []
    for photo in photos:
        for r in engine.reconstruct(photo):
            if not isinstance(r, Failure):
                textures.append((r.texture, r.visible))
    base_cfg = engine.config.stitch
    reference = [engine.net.predict(t, v, base_cfg) for t, v in textures]
    out = []
    for stride in strides:
        cfg = base_cfg.model_copy(update={"stride": stride})
        secs, diffs, patches = [], [], []
        for (t, v), ref in zip(textures, reference, strict=True):
            started = time.perf_counter()
            maps = engine.net.predict(t, v, StitchConfig.model_validate(cfg.model_dump()))
            secs.append(time.perf_counter() - started)
            both = maps.covered & ref.covered
            diffs.append(float(np.abs(maps.displacement - ref.displacement)[both].mean()))
            patches.append(maps.patches)
        out.append({"stride": stride, "seconds": statistics.median(secs), "patches": statistics.median(patches),
                    "mean_abs_diff_mm": statistics.mean(diffs),
                    "mean_abs_d_mm": statistics.mean(float(np.abs(r.displacement[r.covered]).mean())
                                                     for r in reference)})
    return out


def paper_network(count: int) -> dict[str, float]:
    """Seconds per patch of the paper profile's generator forward (random weights), and per 2,937-patch face."""
    config = PROFILES["paper"]
    gen = DetailGenerator(config, seed=0).eval()
    p = config.patch_size
    v = torch.from_numpy(normalize_patch(np.random.default_rng(0).random((count, 1, p, p), np.float32)))
    with torch.no_grad():
        gen(v[:1])
        t = time.perf_counter()
        for i in range(0, count, 4):
            gen(v[i:i + 4])
        per_patch = (time.perf_counter() - t) / count
    return {"seconds_per_patch": per_patch, "seconds_per_face": per_patch * PAPER_PATCHES,
            "gflop_per_patch": flops_per_patch(config)["generator"] / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", nargs="*", type=Path)
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paper-patches", type=int, default=24)
    ap.add_argument("--peak-seconds", type=float, default=1.5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    photos = args.photos or default_photos(args.count)
    t = time.perf_counter()
    engine = Reconstructor(ROOT / "data/face_model/model.npz", ROOT / "data/dictionary",
                           ROOT / "data/train_detail/detail_net.safetensors",
                           ReconstructConfig(subdivision_levels=args.levels, viewer=True))
    load_s = time.perf_counter() - t
    out_dir = Path("/tmp") / "facedetail-bench-reconstruct"
    per_photo, parts, totals, proxy_vertices = [], [], [], None
    for photo in photos:
        t = time.perf_counter()
        results = engine.reconstruct(photo)
        for r in results:
            if isinstance(r, Failure):
                print(f"{photo}: failed: {r.reason}")
                continue
            engine.write(r, out_dir)
            per_photo.append(r.seconds)
            proxy_vertices = r.proxy_vertices
        totals.append(time.perf_counter() - t)
        parts.append(proxy_parts(engine, photo))
    engine.close()
    if not per_photo or proxy_vertices is None:
        sys.exit("no photo could be reconstructed")
    med = {k: statistics.median(s.get(k, 0.0) for s in per_photo) for k in STEPS}
    med_parts = {k: statistics.median(p[k] for p in parts if k in p) for k in parts[0]}
    size = sorted({x.original_size for x in map(load_photo, photos) if not isinstance(x, LoadFailure)})
    print(f"facedetail reconstruct on {len(per_photo)} photos {size}, {args.threads} thread(s), "
          f"{args.levels} subdivisions; models loaded once in {load_s:.2f} s")
    print("median seconds per photo: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
          + f"; end to end {statistics.median(totals):.3f}")
    print("  proxy split (each part alone): " + ", ".join(f"{k} {v:.3f}" for k, v in med_parts.items()))
    peaks = dense_peaks(args.threads, args.peak_seconds, 2048, 4)
    peak = max(v["flops"] for v in peaks.values())
    net = network_rates(engine, args.peak_seconds)
    g_flops = flops_per_patch(engine.net.generators[next(iter(engine.net.generators))].config)["generator"]
    print(f"network: {net['batch64']:.0f} patches/s (batches of 64, channels_last) vs {net['batch1']:.0f} one at a "
          f"time: ratio {net['batch64'] / net['batch1']:.2f}; NCHW batches {net['batch64_nchw']:.0f} "
          f"({net['batch64'] / net['batch64_nchw']:.2f}x); {net['batch64'] * g_flops / 1e9:.1f} GFLOP/s = "
          f"{net['batch64'] * g_flops / peak:.0%} of this core's measured dense peak ({peak / 1e9:.1f} GFLOP/s)")
    mesh = mesh_rates(engine, proxy_vertices, args.levels, args.peak_seconds)
    print(f"mesh: {mesh['ours']:.1f} detailed surfaces/s with the precomputed map vs {mesh['baseline']:.1f} "
          f"subdividing each proxy with trimesh: ratio {mesh['ours'] / mesh['baseline']:.1f}")
    strides = stride_tradeoff(engine, photos[:3], [engine.net.stride * k for k in (2, 4)])
    for row in strides:
        print(f"stride {row['stride']}: network + stitch {row['seconds']:.2f} s for {row['patches']:.0f} patches; "
              f"its map differs from the training stride's by {row['mean_abs_diff_mm']:.4f} mm on average "
              f"(the maps' own mean |d|: {row['mean_abs_d_mm']:.4f} mm)")
    paper = paper_network(args.paper_patches)
    print(f"paper profile: {paper['gflop_per_patch']:.1f} GFLOP per patch, {paper['seconds_per_patch']:.3f} s per "
          f"patch here -> {paper['seconds_per_face']:.0f} s for the {PAPER_PATCHES} patches of one face "
          f"(projected from {args.paper_patches} patches)")
    budget = 1.0 - (med["proxy"] + med["stitch"] + med["mesh"] + med["files"])
    print(f"goal <= 1 s per photo: {'met' if statistics.median(totals) <= 1.0 else 'NOT met'}; "
          f"the network alone takes {med['network']:.2f} s at the training stride (the other steps leave it "
          f"{max(budget, 0):.2f} s of a 1 s photo)")
    if args.json:
        args.json.write_text(json.dumps({"steps": med, "proxy_parts": med_parts, "end_to_end": statistics.median(
            totals), "load_s": load_s, "network": net, "peak_flops": peak, "mesh": mesh, "paper": paper,
            "strides": strides}, indent=1))


if __name__ == "__main__":
    main()
