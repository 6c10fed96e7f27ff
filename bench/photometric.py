"""Benchmark: photometric refinement vs the landmark-only fit vs the mean face, on the synthetic wild set.

    python bench/photometric.py [--proxies data/wild_proxy/proxies.parquet] [--truth data/wild_synth/truth.parquet]
                                [--images data/wild_synth/images] [--limit 0] [--batch 16] [--iterations 120]
                                [--photo-weight 300] [--camera|--no-camera] [--shape-lambda L]
                                [--landmark-sigma2 S2] [--fov DEG [--refine-focal] | --orthographic]
                                [--blur-levels 0 0] [--shape-from-level 1] [--lr-pose 0.01]
                                [--landmark-loss gaussian|huber|cauchy|tukey] [--landmark-robust-scale 2]
                                [--camera-starts "0,0 25,0 -25,0"]
                                [--threads 0] [--split all|even|odd]
                                [--start fit|truth|truth-camera|truth-shape] [--true-landmarks]

For every fitted row of ``wild_proxy`` that has a truth row: the photo is decoded as the stage decodes
it, the landmark fit is re-run here (``ProxyFitter`` with ``FitConfig()``'s defaults) on the row's
landmarks and β_prior, so both fits come from the same code in the same run; then
:func:`facedetail.detail.photometric.refine_photometric` refines it, in batches. Printed:

* per-vertex shape error (mm, neutral expression, the ``wild_proxy`` stage's own measure, computed by
  :func:`facedetail.proxy.evaluate.truth_metrics` on rows carrying each α) of the landmark fit, the
  refined fit and the mean face, and each as a ratio to the mean face (goal: refined ≤ 0.8);
* the FaceScape-style Chamfer (mm) of each proxy (with the fit's β) against the true mesh, after a rigid
  alignment (Procrustes on corresponding vertices, then ICP), by :mod:`facedetail.reconstruct.evaluate`,
  on the model's vertices (both meshes share the topology; synthetic truth, not FaceScape's scans);
* the photometric term before/after and the refinement's cost per photo (wall and CPU time / photo),
  beside the landmark fit's cost per photo measured in the same run.

``--start truth…`` and ``--true-landmarks`` are oracle diagnostics, never a method: the refinement starts
from the true α and β (``truth-shape``), the true camera (``truth-camera``, in the refinement's camera model)
or both (``truth``), and/or the fit and the refinement use the true landmarks. They tell whether the energy's
minimum lies at the truth (a start there stays) and which of shape and camera the optimiser fails to find.
Printed with them, and always: the camera error, the mean pixel distance between the true mesh placed by a
camera and by the true camera.

``--split even|odd`` measures only the rows of even / odd position (sorted by id), so that a setting can be
chosen on one half and reported on the other.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from facedetail.detail.photometric import PhotometricConfig, refine_photometric
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.evaluate import summarize, truth_metrics
from facedetail.proxy.fit import Cameras, FitConfig, FitResult, ProxyFitter
from facedetail.proxy.inputs import LoadConfig, load_photo
from facedetail.proxy.pipeline import OK, to_decoded
from facedetail.reconstruct.evaluate import Surface, SurfaceConfig, kabsch, rigid_alignment, surface_errors, transform


def chamfer(model: MorphableModel, alpha: np.ndarray, beta: np.ndarray, alpha_gt: np.ndarray,
            beta_gt: np.ndarray, config: SurfaceConfig) -> float:
    """Chamfer (mm) of the proxy (alpha, beta) against the true mesh after a rigid alignment."""
    pred = np.asarray(model.vertices(alpha, beta), np.float64)
    truth = np.asarray(model.vertices(alpha_gt, beta_gt), np.float64)
    truth_surface = Surface(truth, np.asarray(model.vertex_normals(truth), np.float64))
    align = rigid_alignment(pred, truth, config, initial=kabsch(pred, truth))
    pred_normals = np.asarray(model.vertex_normals(pred), np.float64) @ align[:3, :3].T
    got = surface_errors(Surface(transform(pred, align), pred_normals), truth_surface, config)["chamfer_mm"]
    return float("nan") if got is None else float(got)


def subset(fit: FitResult, rows: slice) -> FitResult:
    """The fits of ``rows`` as a FitResult of their own."""
    cams = Cameras(fit.cameras.scale[rows], fit.cameras.rotation[rows], fit.cameras.translation[rows])
    return replace(fit, cameras=cams, **{f.name: getattr(fit, f.name)[rows] for f in fields(fit)
                                         if f.name != "cameras"})


def truth_cameras(rows: list[dict[str, Any]], truth: dict[str, dict[str, Any]], model: MorphableModel,
                  images: list[np.ndarray], perspective: bool) -> Cameras:
    """The true cameras in the refinement's convention (decoded pixels, y up): for a pinhole refinement the
    render's own (scale = focal / depth of the model origin); for an orthographic one the least-squares
    scaled orthographic camera of the true mesh's perspective projection (the closest the model can get)."""
    scales, rotations, shifts = [], [], []
    for r, im in zip(rows, images, strict=True):
        g = truth[r["path"]]
        rotation = np.diag([1.0, -1.0, -1.0]) @ np.asarray(g["R"]).reshape(3, 3)  # OpenCV axes to y up, z to viewer
        t = np.asarray(g["t"])
        if perspective:
            scale = g["focal_px"] * r["decode_scale"] / t[2]
            shift = [scale * t[0] + (im.shape[1] - 1) / 2, -(scale * t[1]) - (im.shape[0] - 1) / 2]
        else:
            verts = np.asarray(model.vertices(np.asarray(g["alpha"]), np.asarray(g["beta"])), np.float64)
            h = np.c_[verts, np.ones(len(verts))] @ np.asarray(g["P"]).reshape(3, 4).T
            target = to_decoded(h[:, :2] / h[:, 2:], r["decode_scale"]) * [1.0, -1.0]
            xy = verts @ rotation[:2].T
            design = np.zeros((2 * len(verts), 3))
            design[0::2, 0], design[1::2, 0], design[0::2, 1], design[1::2, 2] = xy[:, 0], xy[:, 1], 1.0, 1.0
            scale, *shift = np.linalg.lstsq(design, target.ravel(), rcond=None)[0]
        scales.append(scale)
        rotations.append(rotation)
        shifts.append(shift)
    return Cameras(np.array(scales, np.float64), np.array(rotations), np.array(shifts, np.float64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxies", type=Path, default=Path("data/wild_proxy/proxies.parquet"))
    parser.add_argument("--truth", type=Path, default=Path("data/wild_synth/truth.parquet"))
    parser.add_argument("--images", type=Path, default=Path("data/wild_synth/images"))
    parser.add_argument("--model", type=Path, default=Path("data/face_model/model.npz"))
    parser.add_argument("--limit", type=int, default=0, help="first N matched rows (0: all)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=PhotometricConfig().iterations)
    parser.add_argument("--photo-weight", type=float, default=PhotometricConfig().photo_weight)
    parser.add_argument("--photo-sigma", type=float, default=PhotometricConfig().photo_sigma)
    parser.add_argument("--lr-alpha", type=float, default=PhotometricConfig().lr_alpha)
    parser.add_argument("--shape-lambda", type=float, default=PhotometricConfig().shape_lambda, help="λ of α")
    parser.add_argument("--landmark-sigma2", type=float, default=PhotometricConfig().landmark_sigma2,
                        help="σ² (px² in the face frame) of the landmark term")
    parser.add_argument("--fov", type=float, default=PhotometricConfig().fov_deg,
                        help="perspective camera of this vertical field of view (degrees)")
    parser.add_argument("--orthographic", action="store_true", help="the landmark fit's scaled orthographic camera")
    parser.add_argument("--refine-focal", action="store_true", help="with --fov: optimise the focal length too")
    parser.add_argument("--shape-from-level", type=int, default=PhotometricConfig().shape_from_level,
                        help="α held at the landmark fit's before this blur level (camera, light, albedo first)")
    parser.add_argument("--lr-pose", type=float, default=PhotometricConfig().lr_pose)
    parser.add_argument("--blur-levels", type=float, nargs="+", default=list(PhotometricConfig().blur_levels),
                        help="coarse-to-fine blur σ per level (px at a 100 px face)")
    parser.add_argument("--camera", action=argparse.BooleanOptionalAction, default=PhotometricConfig().refine_camera,
                        help="refine the camera too (default: PhotometricConfig's)")
    parser.add_argument("--landmark-loss", choices=["gaussian", "huber", "cauchy", "tukey"],
                        default=PhotometricConfig().landmark_loss, help="per-landmark penalty (robust or not)")
    parser.add_argument("--landmark-robust-scale", type=float, default=PhotometricConfig().landmark_robust_scale,
                        help="c of the robust landmark penalty, in units of σ")
    parser.add_argument("--camera-starts", default=" ".join(f"{y:g},{p:g}" for y, p in
                                                             PhotometricConfig().camera_starts_deg),
                        help='multi-start: "yaw,pitch yaw,pitch ..." offsets (degrees, one quoted argument) of the '
                             "fit's camera; each photo keeps its start of lowest final energy")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--split", choices=["all", "even", "odd"], default="all")
    parser.add_argument("--start", choices=["fit", "truth", "truth-camera", "truth-shape"], default="fit",
                        help="oracle diagnostics: start the refinement from the true α and β, camera, or both")
    parser.add_argument("--true-landmarks", action="store_true",
                        help="oracle diagnostic: fit and refine against the true landmarks, not the detector's")
    args = parser.parse_args()

    model = MorphableModel.load(args.model)
    truth = {r["file"]: r for r in pq.read_table(args.truth).to_pylist()}
    rows = sorted((r for r in pq.read_table(args.proxies).to_pylist() if r["status"] == OK and r["path"] in truth),
                  key=lambda r: r["id"])
    if args.split != "all":
        rows = rows[(0 if args.split == "even" else 1)::2]
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise SystemExit("no fitted rows with a truth row")
    fit_cfg = FitConfig()
    photo_cfg = PhotometricConfig(iterations=args.iterations, photo_weight=args.photo_weight,
                                  photo_sigma=args.photo_sigma, lr_alpha=args.lr_alpha,
                                  refine_camera=args.camera, threads=args.threads,
                                  shape_lambda=args.shape_lambda, landmark_sigma2=args.landmark_sigma2,
                                  fov_deg=None if args.orthographic else args.fov, refine_focal=args.refine_focal,
                                  blur_levels=tuple(args.blur_levels), shape_from_level=args.shape_from_level,
                                  lr_pose=args.lr_pose, landmark_loss=args.landmark_loss,
                                  landmark_robust_scale=args.landmark_robust_scale,
                                  camera_starts_deg=tuple(tuple(float(v) for v in s.split(",")) for s in
                                                          args.camera_starts.split()))
    fitter = ProxyFitter(model, fit_cfg)
    images, landmarks = [], []
    for r in rows:
        photo = load_photo(args.images / r["path"], LoadConfig())
        if isinstance(photo, str) or not hasattr(photo, "rgb"):
            raise SystemExit(f"{r['path']}: {photo}")
        if abs(photo.scale - r["decode_scale"]) > 1e-9:
            raise SystemExit(f"{r['path']}: decoded at {photo.scale}, the stage at {r['decode_scale']}")
        images.append(photo.rgb)
        source = truth[r["path"]] if args.true_landmarks else r
        landmarks.append(to_decoded(np.asarray(source["landmarks"], np.float64).reshape(68, 2), r["decode_scale"]))
    landmarks_arr = np.stack(landmarks)
    beta = np.array([r["beta"] for r in rows], np.float64)

    t0, c0 = time.perf_counter(), time.process_time()
    fit = fitter.fit(landmarks_arr, beta)
    fit_wall, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    start = fit
    true_cameras = truth_cameras(rows, truth, model, images, photo_cfg.fov_deg is not None)
    if args.start in ("truth", "truth-shape"):
        start = replace(start, alpha=np.array([truth[r["path"]]["alpha"] for r in rows], np.float64),
                        beta=np.array([truth[r["path"]]["beta"] for r in rows], np.float64))
    if args.start in ("truth", "truth-camera"):
        start = replace(start, cameras=true_cameras)
    true_verts = np.asarray(model.vertices(np.array([truth[r["path"]]["alpha"] for r in rows]),
                                           np.array([truth[r["path"]]["beta"] for r in rows])), np.float64)
    cameras_out = []
    refined_alpha, photo_start, photo_end, lm_px, fov, chosen = [], [], [], [], [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for i0 in range(0, len(rows), args.batch):
        sl = slice(i0, i0 + args.batch)
        sub = subset(start, sl)
        got = refine_photometric(model, images[sl], landmarks_arr[sl], sub, fit_cfg, photo_cfg)
        cameras_out.append(got.cameras)
        refined_alpha.append(got.alpha)
        photo_start.append(got.photometric_start)
        photo_end.append(got.photometric_end)
        lm_px.append(got.landmark_px)
        if got.chosen_start is not None:
            chosen.append(got.chosen_start)
        if got.focal_px is not None:
            fov.append(np.degrees(2 * np.arctan(np.array([im.shape[0] for im in images[sl]]) / 2 / got.focal_px)))
        print(f"  batch {i0 // args.batch + 1}: {len(got.alpha)} photos, {time.perf_counter() - t0:.1f} s so far",
              flush=True)
    ref_wall, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    alpha_ref = np.concatenate(refined_alpha)

    def measured(alpha: np.ndarray) -> dict[str, Any]:
        fake = [{**r, "alpha": a.tolist(), "beta": b.tolist()} for r, a, b in zip(rows, alpha, start.beta, strict=True)]
        return truth_metrics(args.truth, model, fake, fit_cfg)

    landmark_only, refined = measured(fit.alpha), measured(alpha_ref)
    mean_face = landmark_only["shape_error_mm_mean_face"]["mean"]
    surface = SurfaceConfig()
    gts = [truth[r["path"]] for r in rows]
    cham: dict[str, list[float]] = {"landmark_only": [], "refined": [], "mean_face": []}
    for i, g in enumerate(gts):
        a_gt, b_gt = np.asarray(g["alpha"]), np.asarray(g["beta"])
        cham["landmark_only"].append(chamfer(model, fit.alpha[i], fit.beta[i], a_gt, b_gt, surface))
        cham["refined"].append(chamfer(model, alpha_ref[i], start.beta[i], a_gt, b_gt, surface))
        cham["mean_face"].append(chamfer(model, np.zeros_like(a_gt), fit.beta[i], a_gt, b_gt, surface))

    n = len(rows)
    print(f"{n} photos ({args.split}), batch {args.batch}, {photo_cfg.iterations} iterations, photo_weight "
          f"{photo_cfg.photo_weight}, photo_sigma {photo_cfg.photo_sigma}, camera refined {photo_cfg.refine_camera}, "
          f"shape_lambda {photo_cfg.shape_lambda}, landmark_sigma2 {photo_cfg.landmark_sigma2}, "
          f"fov {photo_cfg.fov_deg} "
          f"(focal refined {photo_cfg.refine_focal}), blur levels {photo_cfg.blur_levels}, shape from level "
          f"{photo_cfg.shape_from_level}, lr_pose {photo_cfg.lr_pose}, landmark loss {photo_cfg.landmark_loss} "
          f"(c {photo_cfg.landmark_robust_scale}), camera starts {photo_cfg.camera_starts_deg}")
    print(f"  {'':<32} {'shape err mm':>12} {'median':>8} {'/ mean face':>11} {'chamfer mm':>11}")
    for name, m, c in (("mean face (alpha = 0)", None, cham["mean_face"]),
                       ("landmark fit", landmark_only, cham["landmark_only"]),
                       ("landmark fit + photometric", refined, cham["refined"])):
        err = landmark_only["shape_error_mm_mean_face"] if m is None else m["shape_error_mm"]
        print(f"  {name:<32} {err['mean']:12.4f} {err['median']:8.4f} {err['mean'] / mean_face:11.3f} "
              f"{np.nanmean(c):11.4f}")
    if chosen:
        counts = np.bincount(np.concatenate(chosen), minlength=len(photo_cfg.camera_starts_deg))
        kept = dict(zip(photo_cfg.camera_starts_deg, counts.tolist(), strict=True))
        print(f"  multi-start: photos keeping each start {kept}")
    if fov:
        print(f"  final vertical fov (deg): {summarize(np.concatenate(fov))}")
    ratio = refined["shape_error_mm"]["mean"] / mean_face
    print(f"  goal refined <= 0.8 x mean face: {ratio:.3f} -> {'met' if ratio <= 0.8 else 'NOT met'}")
    if args.start != "fit" or args.true_landmarks:
        print(f"  ORACLE DIAGNOSTIC (start {args.start}, true landmarks {args.true_landmarks}): uses the truth; the "
              f"start's shape error {measured(start.alpha)['shape_error_mm']['mean']:.4f} mm")

    def camera_px(cams: Cameras) -> np.ndarray:
        """Mean distance (px) between the true mesh placed by ``cams`` and by the true camera (orthographic part)."""
        return np.linalg.norm(cams.project(true_verts) - true_cameras.project(true_verts), axis=2).mean(1)

    refined_cams = Cameras(*(np.concatenate([getattr(c, k) for c in cameras_out])
                             for k in ("scale", "rotation", "translation")))
    print(f"  camera error (true mesh, px): start {summarize(camera_px(start.cameras))}, "
          f"refined {summarize(camera_px(refined_cams))}")
    better = int((np.linalg.norm(model.vertices(alpha_ref) - model.vertices(np.array([g['alpha'] for g in gts])),
                                 axis=2).mean(1) <
                  np.linalg.norm(model.vertices(fit.alpha) - model.vertices(np.array([g['alpha'] for g in gts])),
                                 axis=2).mean(1)).sum())
    print(f"  refined better than landmark fit on {better}/{n} photos")
    print(f"  photometric term (mean Huber): start {np.mean(np.concatenate(photo_start)):.3f}, "
          f"end {np.mean(np.concatenate(photo_end)):.3f}; final landmark error "
          f"{summarize(np.concatenate(lm_px))} px (decoded photo)")
    print(f"  cost per photo: landmark fit {1000 * fit_wall / n:.2f} ms wall ({1000 * fit_cpu / n:.2f} ms CPU); "
          f"refinement {ref_wall / n:.3f} s wall ({ref_cpu / n:.3f} s CPU), "
          f"ratio {ref_wall / max(fit_wall, 1e-9):.0f}x")


if __name__ == "__main__":
    main()
