"""Photometric refinement of landmark fits: identity α, albedo γ, SH lighting (and the camera) against the photo.

After :class:`facedetail.proxy.fit.ProxyFitter` has fitted α and a scaled orthographic camera to 68
landmarks, this optimises, for a batch of faces at once (torch, CPU, Adam), the MAP energy

    E = w_p · mean_visible H((I(π(v)) - a(γ) ⊙ S(R n)) / σ_I)      photometric, per vertex
      + Σ_landmarks rho(|π(v_l) - x_l|² · k² / σ²)                   the landmark term
      + λ |α|² + λ_γ |γ|² + λ_sh |c - c₀|²                           the priors

where ``I`` is the photo (linear RGB in [0, 1], sampled bilinearly), ``π`` the camera, ``a(γ)`` the
model's per-vertex albedo, ``S`` the detail network's SH shading
(:func:`facedetail.detail.shading.render_uv`, here on a (B, 3, V, 1) "map" of vertices: the same
basis, convention and clamping as the re-rendering loss), ``R n`` the vertex normals in the camera
frame, ``H`` the Huber function (clutter and hair in front of the face are outliers, not signal),
``k`` the fit's face-frame scale, so that σ² (px² at a ``face_size`` face) and λ are on the landmark
fit's scale, and ``rho`` the identity (least squares, the default) or a robust penalty
(``landmark_loss``: Huber, Cauchy, Tukey; :func:`landmark_penalty`). Optionally
(``camera_starts_deg``) every face is refined from several rotations of the fit's camera and the start
of lowest final ``E`` is kept.

**Settings, and why they differ from the landmark fit's** (measured on the synthetic wild set with
``bench/photometric.py``; the diagnosis is in the README):

* ``π`` is a pinhole camera (``fov_deg``, principal point at the image centre, distance = focal /
  scale), started at the landmark fit's camera. An orthographic camera can explain a face's ±4 %
  perspective only with another shape. The focal itself is not identified by this energy (freed,
  it drifts), so it is fixed at a generic 30°; 15°–50° give the same error within 0.02x.
* σ² = 64 px², not the fit's 3: the detector's landmarks are ~8 px off, and at σ² = 3 the landmark
  term pulls a start at the true face 5 mm away from it. λ = 3, not the fit's 30: at λ = 30 the prior
  (|α|² ≈ 63 for a true face) moves a start at the true face, even with the true landmarks, 3.3 mm away.
* A Cauchy landmark penalty (``landmark_loss``, c = 0.25 σ): quadratic for the first pixels, then
  only logarithmic, so the detector's grossly wrong landmarks (a contour on the hair, a shifted face) pull
  with a bounded force and the photo decides. Measured: 0.797x the mean face's shape error on the even
  half against 0.830x for least squares, at the same cost.
* Two stages (``blur_levels``, ``shape_from_level``): first the camera, lighting and albedo with α
  held at the landmark fit's, then everything. Started together, α absorbs the landmark fit's
  camera error (~8 px) instead of the camera correcting it.

**Why per-vertex and not a differentiable rasteriser.** The energy is evaluated at the proxy's
vertices (3,448 for the Surrey model: ~0.5 px apart on a 100 px face, so every face pixel is
sampled), which needs no rasteriser on CPU: the gradient reaches α through the image gradient at
the projected positions and through the normals in the shading. Visibility (facing the camera and
not behind a closer part of the face, by a z-buffer splatted from the vertices in cells of
``zbuffer_cell_mm`` on the face, as :mod:`facedetail.proxy.texture` does for texels) is a hard mask,
recomputed from the current geometry every ``visibility_every`` steps without gradient: in a soft
rasteriser (SoftRas, PyTorch3D) the silhouette's gradient is the extra signal, at ~100x the cost on
CPU; here the silhouette constrains only through the samples that leave the face.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)
from pydantic import Field, model_validator
from torch import Tensor

from facedetail.config import Config
from facedetail.detail.shading import render_uv, sh_basis_torch
from facedetail.errors import FacedetailError
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.fit import Cameras, FitConfig, FitResult

__all__ = ["PhotometricConfig", "PhotometricRefiner", "PhotometricResult", "refine_photometric", "vertex_visibility"]


class PhotometricConfig(Config):
    """The photometric refinement's energy and optimiser."""

    enabled: bool = False
    """Run the refinement after the landmark fit (a caller's switch; the function always runs)."""
    iterations: int = Field(120, ge=1)
    """Adam steps."""
    lr_alpha: float = Field(0.05, gt=0)
    """Adam step of α and γ (standard deviations)."""
    lr_light: float = Field(0.01, gt=0)
    """Adam step of the SH coefficients."""
    lr_pose: float = Field(0.01, gt=0)
    """Adam step of the camera's rotation (rad), log-scale and translation (fraction of the face size)."""
    fov_deg: float | None = Field(30.0, gt=0, lt=120)
    """Perspective camera of this vertical field of view (focal = height / 2 / tan(fov / 2), principal point at
    the image centre; the distance follows from the fit's scale, focal / scale); None: the landmark fit's scaled
    orthographic camera. At 1–1.6 m a face's depth changes its scale by ±4 %, which an orthographic
    camera can only explain with a different shape."""
    refine_focal: bool = False
    """With ``fov_deg``: optimise the focal length too (log-scale, from ``fov_deg``)."""
    lr_focal: float = Field(0.02, gt=0)
    """Adam step of the log focal length."""
    refine_camera: bool = True
    """Optimise the camera with the shape (else it stays the landmark fit's)."""
    photo_weight: float = Field(300.0, ge=0)
    """w_p: weight of the mean per-vertex photometric term (0: landmarks and priors only)."""
    photo_sigma: float = Field(0.05, gt=0)
    """σ_I: intensity noise (linear RGB in [0, 1]); residuals beyond it count linearly (Huber)."""
    shape_lambda: float | None = Field(3.0, ge=0)
    """λ of α in the refinement (None: the landmark fit's ``shape_lambda``, the release's 30)."""
    landmark_sigma2: float | None = Field(64.0, gt=0)
    """σ² (px² in the face frame) of the landmark term in the refinement (None: the landmark fit's
    ``landmark_sigma2``). The detector's landmarks are several pixels off, far more than the fit's σ."""
    albedo_lambda: float = Field(1.0, ge=0)
    """λ_γ: prior on the albedo coefficients (standard deviations)."""
    light_lambda: float = Field(0.01, ge=0)
    """λ_sh: pull of the SH coefficients towards their least-squares start."""
    max_view_angle_deg: float = Field(75.0, gt=0, lt=90)
    """Vertices seen more obliquely than this are not compared (their colour is smeared)."""
    zbuffer_cell_mm: float = Field(2.0, gt=0)
    """Z-buffer cell size on the face (mm)."""
    depth_tolerance_mm: float = Field(3.0, gt=0)
    """A vertex is occluded when its cell holds a vertex this much closer to the camera."""
    blur_levels: tuple[float, ...] = (0.0, 0.0)
    """Coarse to fine: Gaussian blur σ of the photo (px at a ``face_size`` face, so it scales with the face)
    for successive equal shares of the steps, e.g. (4, 2, 0). A landmark fit's camera is several pixels
    off; at full resolution the image gradient sees only a pixel or two, a blurred photo sees further."""
    shape_from_level: int = Field(1, ge=0)
    """α is held at the landmark fit's during the blur levels before this one (the camera, lighting and albedo
    settle first, so that α does not absorb a misaligned camera)."""
    landmark_loss: Literal["gaussian", "huber", "cauchy", "tukey"] = "cauchy"
    """Per-landmark penalty rho(u²) of the normalised error u = e · k / σ: "gaussian" u² (least squares), or a
    robust one equal to u² near 0 ("huber": linear beyond ``landmark_robust_scale``; "cauchy":
    c² log(1 + u²/c²); "tukey": biweight, constant beyond c). The detector's landmarks fail in groups (a
    jaw contour on the hair, a whole face shifted); a robust term lets the photo overrule those."""
    landmark_robust_scale: float = Field(0.25, gt=0)
    """c of the robust landmark penalty, in units of σ (c = 0.25 with σ² = 64: 2 px at a ``face_size`` face).
    Chosen on the synthetic wild set's even half (``bench/photometric.py``): c = 4, 2, 1, 0.5, 0.25 gave 0.825,
    0.819, 0.809, 0.806, 0.797x the mean face's shape error, least squares 0.830x."""
    camera_starts_deg: tuple[tuple[float, float], ...] = ((0.0, 0.0),)
    """Multi-start: (yaw, pitch) offsets (degrees, about the camera's y and x axes through the landmarks'
    centroid) of the landmark fit's camera rotation; each face is refined from every one and the start
    with the lowest final energy is kept (never a comparison with any truth). The detector's gross
    failures leave the fit's camera 25–40° off, beyond the photometric term's reach from one start."""
    visibility_every: int = Field(20, ge=1)
    """Steps between visibility updates."""
    threads: int = Field(0, ge=0)
    """torch CPU threads (0: torch's default); results do not depend on it."""

    @model_validator(mode="after")
    def _levels(self) -> PhotometricConfig:
        if not self.blur_levels or any(sigma < 0 for sigma in self.blur_levels):
            raise ValueError(f"blur_levels must be one or more non-negative σ, got {self.blur_levels}")
        if self.shape_from_level >= len(self.blur_levels):
            raise ValueError(f"shape_from_level {self.shape_from_level} leaves α fixed at every one of the "
                             f"{len(self.blur_levels)} levels")
        if not self.camera_starts_deg:
            raise ValueError("camera_starts_deg must hold at least one (yaw, pitch) start")
        return self


@dataclass(frozen=True)
class PhotometricResult:
    """Refined fits; rows follow the input order."""

    alpha: np.ndarray
    """(B, Ks) refined identity (standard deviations)."""
    gamma: np.ndarray
    """(B, Ka) albedo coefficients."""
    sh: np.ndarray
    """(B, 9, 3) SH coefficients shading camera-frame normals (facedetail.render.sh's convention)."""
    cameras: Cameras
    """Refined cameras, in the same pixels (y up) as the landmark fit's."""
    photometric_start: np.ndarray
    """(B,) mean Huber photometric term at the start (after the lighting's least-squares start)."""
    photometric_end: np.ndarray
    """(B,) the same after the refinement, on the starting visibility (the same vertices)."""
    energy: np.ndarray
    """(B, iterations) total energy per step."""
    visible_fraction: np.ndarray
    """(B,) share of the vertices compared at the end."""
    landmark_px: np.ndarray
    """(B,) final mean landmark error in the given pixels (the fit's used landmarks)."""
    focal_px: np.ndarray | None = None
    """(B,) focal length (px) of the perspective camera (``fov_deg`` set; ``cameras`` then holds its scale at
    the model origin's depth, its orthographic approximation); None for the orthographic camera."""
    chosen_start: np.ndarray | None = None
    """(B,) index into ``camera_starts_deg`` of the start kept (lowest final energy); None with one start."""
    final_energy: np.ndarray | None = None
    """(B,) total energy of the returned parameters (what the multi-start compares)."""


def _rotation_matrix(axis_angle: Tensor) -> Tensor:
    """(B, 3, 3) rotations of (B, 3) axis-angle vectors (Rodrigues), differentiable at 0."""
    theta2 = (axis_angle * axis_angle).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-24)
    k = axis_angle / theta
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    cross = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype).expand_as(cross)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    return eye + s * cross + (1 - c) * cross @ cross


def _vertex_normals(vertices: Tensor, triangles: Tensor) -> Tensor:
    """(B, V, 3) unit area-weighted vertex normals, as :meth:`MorphableModel.vertex_normals`."""
    tri = vertices[:, triangles]  # (B, T, 3, 3)
    face_n = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    summed = torch.zeros_like(vertices)
    for corner in range(3):
        summed = summed.index_add(1, triangles[:, corner], face_n)
    return F.normalize(summed, dim=-1, eps=1e-12)


def vertex_visibility(projected: Tensor, depth: Tensor, facing: Tensor, cell_px: Tensor, size: Tensor,
                      tolerance_mm: float) -> Tensor:
    """(B, V) bool: facing vertices inside their image and within ``tolerance_mm`` of the closest facing
    vertex of their z-buffer cell.

    projected (B, V, 2) image px (y down); depth (B, V) mm, larger = closer; cell_px (B,) cell size in px;
    size (B, 2) image width and height.
    """
    b = depth.shape[0]
    inside = (projected >= 0).all(-1) & (projected[..., 0] <= size[:, None, 0] - 1) & \
        (projected[..., 1] <= size[:, None, 1] - 1)
    ok = facing & inside
    cells = torch.floor(projected / cell_px[:, None, None]).to(torch.int64)
    cells = cells - cells.amin(dim=1, keepdim=True)
    width = int(cells[..., 0].max()) + 1
    flat = cells[..., 1] * width + cells[..., 0] + torch.arange(b)[:, None] * (width * (int(cells[..., 1].max()) + 1))
    closest = torch.full((int(flat.max()) + 1,), -torch.inf, dtype=depth.dtype)
    closest = closest.scatter_reduce(0, flat[ok], depth[ok], reduce="amax")
    return ok & (depth >= closest[flat] - tolerance_mm)


def _blurred(batch: Tensor, sigmas: np.ndarray) -> Tensor:
    """(B, 3, H, W) ``batch`` with photo i blurred by a Gaussian of σ ``sigmas[i]`` px (OpenCV, reflected border)."""
    out = batch.clone()
    for i, sigma in enumerate(sigmas):
        if sigma > 0:
            chw = batch[i].numpy()
            out[i] = torch.from_numpy(np.stack([cv2.GaussianBlur(c, (0, 0), float(sigma),
                                                                 borderType=cv2.BORDER_REFLECT_101) for c in chw]))
    return out


def _huber(r: Tensor) -> Tensor:
    a = r.abs()
    return torch.where(a <= 1.0, 0.5 * r * r, a - 0.5)


def landmark_penalty(u2: Tensor, loss: str, c: float) -> Tensor:
    """rho(u²) of squared normalised landmark errors ``u2``: u² for "gaussian"; the robust ones equal u² to
    first order at 0 and grow linearly ("huber"), logarithmically ("cauchy") or not at all ("tukey")
    beyond ``c``."""
    if loss == "gaussian":
        return u2
    c2 = c * c
    if loss == "huber":
        u = torch.sqrt(u2 + 1e-12)  # the offset keeps the gradient finite at u = 0
        return torch.where(u <= c, u2, 2.0 * c * u - c2)
    if loss == "cauchy":
        return c2 * torch.log1p(u2 / c2)
    if loss == "tukey":
        inside = (1.0 - u2.clamp(max=c2) / c2) ** 3
        return c2 / 3.0 * (1.0 - inside)
    raise ValueError(f"unknown landmark loss {loss!r}")


def _start_rotations(fit: FitResult, model: MorphableModel, starts: Sequence[tuple[float, float]]) -> FitResult:
    """``fit`` repeated once per (yaw, pitch) start (start-major), each camera rotated by the offset about
    the camera axes through the fitted landmarks' centroid (so that the face stays on its landmarks)."""
    b = fit.alpha.shape[0]
    verts = np.asarray(model.vertices(np.nan_to_num(fit.alpha), fit.beta), np.float64)
    if verts.ndim == 2:
        verts = np.broadcast_to(verts, (b, *verts.shape))
    used = fit.landmark_vertices >= 0
    lm = np.take_along_axis(verts, np.maximum(fit.landmark_vertices, 0)[..., None], axis=1)
    centroid = (lm * used[..., None]).sum(1) / np.maximum(used.sum(1), 1)[:, None]  # (B, 3) model mm
    scales, rotations, shifts = [], [], []
    for yaw, pitch in starts:
        y, p = np.radians(yaw), np.radians(pitch)
        ry = np.array([[np.cos(y), 0.0, np.sin(y)], [0.0, 1.0, 0.0], [-np.sin(y), 0.0, np.cos(y)]])
        rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(p), -np.sin(p)], [0.0, np.sin(p), np.cos(p)]])
        rot = (rx @ ry)[None] @ fit.cameras.rotation
        # Keep the centroid's image position: t' = t + s (R c - R' c)[:2].
        moved = np.einsum("bij,bj->bi", fit.cameras.rotation - rot, centroid)[:, :2]
        scales.append(fit.cameras.scale)
        rotations.append(rot)
        shifts.append(fit.cameras.translation + fit.cameras.scale[:, None] * moved)
    k = len(starts)
    tiled = {f.name: (getattr(fit, f.name) * k if isinstance(getattr(fit, f.name), list)
                      else np.concatenate([getattr(fit, f.name)] * k))
             for f in fields(fit) if f.name != "cameras"}
    return replace(fit, cameras=Cameras(np.concatenate(scales), np.concatenate(rotations), np.concatenate(shifts)),
                   **tiled)


def refine_photometric(model: MorphableModel, images: Sequence[np.ndarray], landmarks: np.ndarray, fit: FitResult,
                       fit_config: FitConfig | None = None,
                       config: PhotometricConfig | None = None) -> PhotometricResult:
    """Refine B landmark fits against their photos (see the module docstring for the energy).

    ``images``: B RGB uint8 (H, W, 3) photos, in the pixels of the ``landmarks`` (B, 68, 2; x right, y
    down) that ``fit`` was fitted to (``ProxyFitter(model, fit_config).fit(landmarks, ...)``), so that
    its cameras map model mm to these pixels with y up. β stays the fit's. Faces whose fit status is not
    "ok" are refined too; the caller decides what to keep. Deterministic: same inputs, same bytes.
    With several ``camera_starts_deg`` every face is refined from each (as one batch) and the start of lowest
    final energy is kept.
    """
    cfg = config or PhotometricConfig()
    fit_cfg = fit_config or FitConfig()
    b = len(images)
    if b == 0:
        raise FacedetailError("refine_photometric: no images")
    if not (len(landmarks) == fit.alpha.shape[0] == b):
        raise FacedetailError(f"{b} images, {len(landmarks)} landmark sets and {fit.alpha.shape[0]} fits")
    starts = cfg.camera_starts_deg
    if starts == ((0.0, 0.0),):
        return _refine(model, images, landmarks, fit, fit_cfg, cfg)
    k = len(starts)
    got = _refine(model, list(images) * k, np.concatenate([np.asarray(landmarks)] * k),
                  _start_rotations(fit, model, starts), fit_cfg, cfg)
    assert got.final_energy is not None
    chosen = np.argmin(got.final_energy.reshape(k, b), axis=0)  # first of equal energies: deterministic
    rows = chosen * b + np.arange(b)
    cams = Cameras(got.cameras.scale[rows], got.cameras.rotation[rows], got.cameras.translation[rows])
    return PhotometricResult(got.alpha[rows], got.gamma[rows], got.sh[rows], cams, got.photometric_start[rows],
                             got.photometric_end[rows], got.energy[rows], got.visible_fraction[rows],
                             got.landmark_px[rows], None if got.focal_px is None else got.focal_px[rows],
                             chosen, got.final_energy[rows])


def _refine(model: MorphableModel, images: Sequence[np.ndarray], landmarks: np.ndarray, fit: FitResult,
            fit_cfg: FitConfig, cfg: PhotometricConfig) -> PhotometricResult:
    """One start per face: :func:`refine_photometric`'s optimisation."""
    b = len(images)
    dt = torch.float64
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        k = fit.alpha.shape[1]
        # (K, 3V): one matrix product per step (einsum over (K, V, 3) took the slow path).
        shape_basis = torch.as_tensor((model.shape_basis[:k] * model.shape_std[:k, None, None]).reshape(k, -1),
                                      dtype=dt)
        mean = torch.as_tensor(model.mean, dtype=dt)
        fixed = mean + torch.as_tensor(np.asarray(model.vertices(None, fit.beta), np.float64) - model.mean, dtype=dt)
        if fixed.ndim == 2:
            fixed = fixed.expand(b, -1, -1)
        albedo_basis = torch.as_tensor(
            (model.albedo_basis * model.albedo_std[:, None, None]).reshape(model.n_albedo, -1), dtype=dt)
        n_vertices = model.n_vertices
        albedo_mean = torch.as_tensor(model.albedo_mean, dtype=dt)
        triangles = torch.as_tensor(model.triangles, dtype=torch.int64)

        # The photos as one padded (B, 3, H, W) batch in linear [0, 1]; grid_sample's normalisation uses the
        # padded size, so every photo is sampled in its own pixels.
        heights = [im.shape[0] for im in images]
        widths = [im.shape[1] for im in images]
        batch = torch.zeros((b, 3, max(heights), max(widths)), dtype=dt)
        for i, im in enumerate(images):
            rgb = np.asarray(im)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise FacedetailError(f"image {i}: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
            batch[i, :, : rgb.shape[0], : rgb.shape[1]] = torch.from_numpy(rgb.astype(np.float64) / 255.0).permute(
                2, 0, 1)
        face_px_np = fit_cfg.face_size / np.nan_to_num(np.asarray(fit.face_frame_scale, np.float64), nan=1.0)
        levels = [batch if sigma == 0 else _blurred(batch, sigma * face_px_np / fit_cfg.face_size)
                  for sigma in cfg.blur_levels]
        size = torch.tensor(np.stack([widths, heights], 1), dtype=dt)
        pad = torch.tensor([max(widths) - 1, max(heights) - 1], dtype=dt)

        # Landmark targets in the camera frame (y up), the used landmarks and their vertices (fixed here).
        lm_vertices = torch.as_tensor(np.maximum(fit.landmark_vertices, 0), dtype=torch.int64)
        lm_used = torch.as_tensor(fit.landmark_vertices >= 0)
        target = torch.as_tensor(np.asarray(landmarks, np.float64) * [1.0, -1.0], dtype=dt)
        frame = torch.as_tensor(np.nan_to_num(fit.face_frame_scale, nan=1.0), dtype=dt)  # face-frame px per px

        base_rot = torch.as_tensor(fit.cameras.rotation, dtype=dt)
        base_scale = torch.as_tensor(fit.cameras.scale, dtype=dt)
        base_t = torch.as_tensor(fit.cameras.translation, dtype=dt)
        face_px = fit_cfg.face_size / frame  # the face's size in these pixels
        shape_lambda = fit_cfg.shape_lambda if cfg.shape_lambda is None else cfg.shape_lambda
        landmark_sigma2 = fit_cfg.landmark_sigma2 if cfg.landmark_sigma2 is None else cfg.landmark_sigma2

        alpha = torch.tensor(np.nan_to_num(fit.alpha), dtype=dt, requires_grad=True)
        gamma = torch.zeros((b, model.n_albedo), dtype=dt, requires_grad=True)
        rot_delta = torch.zeros((b, 3), dtype=dt, requires_grad=True)
        log_scale = torch.zeros(b, dtype=dt, requires_grad=True)
        shift = torch.zeros((b, 2), dtype=dt, requires_grad=True)
        log_focal = torch.zeros(b, dtype=dt, requires_grad=True)
        if cfg.fov_deg is not None:
            focal0 = torch.tensor(heights, dtype=dt) / 2.0 / float(np.tan(np.radians(cfg.fov_deg) / 2.0))
            centre = torch.stack([(torch.tensor(widths, dtype=dt) - 1) / 2, -(torch.tensor(heights, dtype=dt) - 1) / 2],
                                 -1)

        def geometry() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
            verts = fixed + (alpha @ shape_basis).view(b, n_vertices, 3)
            rot = _rotation_matrix(rot_delta) @ base_rot if cfg.refine_camera else base_rot
            scale = base_scale * torch.exp(log_scale) if cfg.refine_camera else base_scale
            trans = base_t + shift * face_px[:, None] if cfg.refine_camera else base_t
            cam_verts = torch.bmm(verts, rot.transpose(1, 2))
            xy_up = scale[:, None, None] * cam_verts[..., :2] + trans[:, None, :]
            if cfg.fov_deg is not None:
                # Exact pinhole about the image centre: the distance is focal / scale, depth z towards the viewer.
                focal = focal0 * torch.exp(log_focal) if cfg.refine_focal else focal0
                # A vertex as near as the camera would divide by 0; no face is (at 30° a 100 px face is 60 cm
                # away and its depth 0.1 m), so the bound only keeps a broken start finite.
                shrink = (1.0 - (scale / focal)[:, None] * cam_verts[..., 2]).clamp_min(0.1)
                xy_up = centre[:, None, :] + (xy_up - centre[:, None, :]) / shrink[..., None]
            normals = torch.bmm(_vertex_normals(verts, triangles), rot.transpose(1, 2))
            return verts, xy_up, cam_verts[..., 2], normals, scale

        def albedo() -> Tensor:
            return (albedo_mean + (gamma @ albedo_basis).view(b, n_vertices, 3)).clamp(0.0, 1.0)

        def sample(xy_up: Tensor, photos: Tensor) -> Tensor:
            pixels = torch.stack([xy_up[..., 0], -xy_up[..., 1]], -1)
            grid = (2.0 * pixels / pad - 1.0)[:, :, None, :]  # (B, V, 1, 2)
            return F.grid_sample(photos, grid, mode="bilinear", padding_mode="border", align_corners=True)  # (B,3,V,1)

        def visible(xy_up: Tensor, depth: Tensor, normals: Tensor, scale: Tensor) -> Tensor:
            with torch.no_grad():
                pixels = torch.stack([xy_up[..., 0], -xy_up[..., 1]], -1)
                facing = normals[..., 2] >= float(np.cos(np.radians(cfg.max_view_angle_deg)))
                return vertex_visibility(pixels, depth, facing, scale * cfg.zbuffer_cell_mm, size,
                                         cfg.depth_tolerance_mm)

        def maps(normals: Tensor) -> Tensor:
            return normals.permute(0, 2, 1)[..., None]  # (B, 3, V, 1): a "UV map" of the vertices

        # Lighting's start: per face and channel, linear least squares of the observed colour on albedo x basis
        # (the clamp at 0 ignored), ridge-damped so that a face with few visible vertices stays finite.
        with torch.no_grad():
            _, xy_up, depth, normals, scale = geometry()
            mask = visible(xy_up, depth, normals, scale)
            observed = sample(xy_up, levels[0])[..., 0].permute(0, 2, 1)  # (B, V, 3)
            basis = sh_basis_torch(maps(normals))[..., 0].permute(0, 2, 1)  # (B, V, 9)
            a0 = albedo()
            sh0 = torch.zeros((b, 9, 3), dtype=dt)
            for i in range(b):
                m = mask[i]
                for c in range(3):
                    design = basis[i, m] * a0[i, m, c : c + 1]
                    lhs = design.T @ design + 1e-3 * torch.eye(9, dtype=dt)
                    sh0[i, :, c] = torch.linalg.solve(lhs, design.T @ observed[i, m, c])
        sh = sh0.clone().requires_grad_(True)

        def energy(mask: Tensor, photos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            _, xy_up, _, normals, _ = geometry()
            rendered = render_uv(albedo().permute(0, 2, 1)[..., None], maps(normals), sh)  # (B, 3, V, 1)
            residual = (sample(xy_up, photos) - rendered)[..., 0] / cfg.photo_sigma  # (B, 3, V)
            per_vertex = _huber(residual).sum(1)
            weights = mask.to(dt)
            photo = (per_vertex * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            lm_xy = torch.gather(xy_up, 1, lm_vertices[..., None].expand(-1, -1, 2))
            lm_err2 = ((lm_xy - target) ** 2).sum(-1) * lm_used
            u2 = lm_err2 * (frame ** 2)[:, None] / landmark_sigma2
            landmark = (landmark_penalty(u2, cfg.landmark_loss, cfg.landmark_robust_scale) * lm_used).sum(1)
            prior = shape_lambda * (alpha ** 2).sum(1) + cfg.albedo_lambda * (gamma ** 2).sum(1) + \
                cfg.light_lambda * ((sh - sh0) ** 2).sum((1, 2))
            lm_px = (lm_err2.sqrt() * lm_used).sum(1) / lm_used.sum(1).clamp_min(1)
            return cfg.photo_weight * photo + landmark + prior, photo, lm_px

        groups = [{"params": [alpha, gamma], "lr": cfg.lr_alpha}, {"params": [sh], "lr": cfg.lr_light}]
        if cfg.refine_camera:
            groups.append({"params": [rot_delta, log_scale, shift], "lr": cfg.lr_pose})
        if cfg.fov_deg is not None and cfg.refine_focal:
            groups.append({"params": [log_focal], "lr": cfg.lr_focal})
        optimiser = torch.optim.Adam(groups)
        start_mask = mask
        with torch.no_grad():
            _, start_photo, _ = energy(start_mask, batch)
        history = np.zeros((b, cfg.iterations))
        for step in range(cfg.iterations):
            if step and step % cfg.visibility_every == 0:
                with torch.no_grad():
                    _, xy_up, depth, normals, scale = geometry()
                    mask = visible(xy_up, depth, normals, scale)
            optimiser.zero_grad()
            level = step * len(levels) // cfg.iterations
            total, _, _ = energy(mask, levels[level])
            # The faces' energies are independent: their sum's gradient is each face's own.
            total.sum().backward()
            if level < cfg.shape_from_level:
                alpha.grad = None  # Adam skips a parameter without a gradient: α stays where it is
            optimiser.step()
            history[:, step] = total.detach().numpy()
        with torch.no_grad():
            _, xy_up, depth, normals, scale = geometry()
            end_mask = visible(xy_up, depth, normals, scale)
            # On the starting visibility, so that start and end compare the same vertices.
            _, end_photo, lm_px = energy(start_mask, batch)
            final_total, _, _ = energy(end_mask, batch)
            rot = (_rotation_matrix(rot_delta) @ base_rot) if cfg.refine_camera else base_rot
            trans = base_t + shift * face_px[:, None] if cfg.refine_camera else base_t
            focal = None if cfg.fov_deg is None else \
                (focal0 * torch.exp(log_focal) if cfg.refine_focal else focal0).numpy().copy()
        cameras = Cameras(scale.numpy().copy(), rot.numpy().copy(), trans.numpy().copy())
        return PhotometricResult(alpha.detach().numpy().copy(), gamma.detach().numpy().copy(),
                                 sh.detach().numpy().copy(), cameras, start_photo.numpy().copy(),
                                 end_photo.numpy().copy(), history, end_mask.to(dt).mean(1).numpy().copy(),
                                 lm_px.numpy().copy(), focal, None, final_total.numpy().copy())
    finally:
        torch.set_num_threads(previous_threads)


@dataclass(frozen=True)
class PhotometricRefiner:
    """:func:`refine_photometric` with its configs bound: the picklable refine step a ``wild_proxy`` worker
    runs after the landmark fit (:attr:`facedetail.proxy.pipeline.ProxySpec.refine`)."""

    fit_config: FitConfig
    config: PhotometricConfig

    def __call__(self, model: MorphableModel, images: Sequence[np.ndarray], landmarks: np.ndarray,
                 fit: FitResult) -> PhotometricResult:
        return refine_photometric(model, images, landmarks, fit, self.fit_config, self.config)
