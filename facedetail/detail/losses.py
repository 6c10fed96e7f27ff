"""The Deep Facial Detail Net's losses: LSGAN, the supervised scan terms and the UV re-rendering loss.

The paper's objective is ``min_G max_D L_cGAN + λ (L_scans + η L_recon)`` with λ = 100 and η = 0.5.
``L_scans`` is the L1 of the displacement (mm) inside the ground-truth mask plus, as in the release
(``loss_G_parameter``), an L1 on the 64 PCA weights with its own weight. ``L_recon`` re-renders the
detailed surface in UV space (:mod:`facedetail.detail.shading`): ``P_fine = P_proxy + D·N_proxy``,
``N_fine`` from ``P_fine`` by finite differences, ``I_recon = albedo ⊙ S(N_fine)``, L1 to the photo's UV
texture on visible texels. The albedo and SH lighting come from
:func:`~facedetail.detail.shading.estimate_lighting` and are constants here: no gradient reaches them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from facedetail.detail.shading import fine_positions, normals_from_positions, render_uv

#: The paper's weights (Sec. 4): L_cGAN + λ (L_scans + η L_recon).
DEFAULT_LAMBDA = 100.0
DEFAULT_ETA = 0.5
#: Weight of the PCA-weight L1 inside L_scans. The release's value is not recoverable from its bytecode;
#: 1.0 weighs a weight error like a displacement error of the same size in mm (the bases are unit vectors).
DEFAULT_PCA_WEIGHT = 1.0


def lsgan_loss(prediction: Tensor, real: bool) -> Tensor:
    """Least-squares GAN loss ``mean((D(x) - t)²)`` with target ``t`` = 1 for ``real``, 0 otherwise."""
    return torch.mean((prediction - (1.0 if real else 0.0)) ** 2)


def masked_l1(prediction_mm: Tensor, target_mm: Tensor, mask: Tensor) -> Tensor:
    """Mean ``|prediction - target|`` over the texels of ``mask`` (broadcast over channels); 0 for an empty mask.

    ``mask`` is bool or 0/1, (B, 1, H, W) or (B, H, W). Values outside it (NaN included) neither count nor
    give NaN gradients.
    """
    m = mask if mask.ndim == prediction_mm.ndim else mask.unsqueeze(1)
    m = (m if m.dtype == torch.bool else m > 0.5).expand_as(prediction_mm)
    diff = torch.where(m, prediction_mm - target_mm, 0.0)
    count = m.sum()
    # An empty mask gives a 0 that stays attached to the graph (backward works, gradient 0), not 0/0 = NaN.
    return diff.abs().sum() / count.clamp_min(1)


def pca_weight_l1(pred_weights: Tensor, target_weights: Tensor) -> Tensor:
    """Mean ``|w_pred - w_true|`` over the (B, K) PCA weights (the release's ``loss_G_parameter``)."""
    return torch.mean(torch.abs(pred_weights - target_weights))


def _chart(proxy_normals: Tensor) -> Tensor:
    """(B, 1, H, W) texels where the proxy's maps are defined (its normal maps are 0 outside the chart)."""
    return torch.linalg.vector_norm(proxy_normals, dim=1, keepdim=True) > 0.5


def reconstruction_loss(displacement_mm: Tensor, proxy_positions_mm: Tensor, proxy_normals: Tensor, texture: Tensor,
                        visible: Tensor, albedo: Tensor, sh: Tensor, *, chart: Tensor | None = None,
                        smooth_base: bool = False) -> Tensor:
    """L1 between the UV ``texture`` and ``albedo ⊙ S(N_fine)`` on visible texels whose fine normal is valid.

    ``N_fine`` is the normal of ``P_fine = P_proxy + D·N_proxy`` by finite differences over ``chart``
    (default: where the proxy normals are non-zero), oriented like the proxy normals. Gradients reach
    ``displacement_mm`` only through ``N_fine``; ``albedo`` and ``sh`` are used as constants (detached).

    ``smooth_base``: use ``normalize(N_proxy + N(P_fine) - N(P_proxy))`` instead of ``N(P_fine)``. A proxy
    rasterised from a mesh is piecewise flat, so ``N(P_proxy)`` shows the triangles' facets, while the
    lighting was fitted to the smooth interpolated normals; this keeps what the displacement adds and
    the smooth base (it equals ``N_proxy`` at D = 0 exactly), the same idea as
    :func:`facedetail.capture.extract.detail_normals`. For a smooth proxy both give the same loss.
    """
    on_chart = _chart(proxy_normals) if chart is None else chart
    fine = fine_positions(proxy_positions_mm, proxy_normals, displacement_mm)
    normals, valid = normals_from_positions(fine, on_chart, proxy_normals)
    if smooth_base:
        with torch.no_grad():
            base, base_valid = normals_from_positions(proxy_positions_mm, on_chart, proxy_normals)
        normals = torch.nn.functional.normalize(proxy_normals + normals - base, dim=1)
        valid = valid & base_valid
    rendered = render_uv(albedo.detach(), normals, sh.detach())
    vis = visible if visible.ndim == texture.ndim else visible.unsqueeze(1)
    vis = vis if vis.dtype == torch.bool else vis > 0.5
    return masked_l1(rendered, texture, vis & valid)


@dataclass(frozen=True)
class ReconInputs:
    """What :func:`reconstruction_loss` needs besides the displacement: the photo's UV texture and its lighting."""

    proxy_positions_mm: Tensor
    proxy_normals: Tensor
    texture: Tensor
    visible: Tensor
    albedo: Tensor
    sh: Tensor
    smooth_base: bool = False
    """See :func:`reconstruction_loss`."""


def generator_loss(fake_scores: Tensor | None, displacement_mm: Tensor, *, target_mm: Tensor | None = None,
                   target_mask: Tensor | None = None, pred_weights: Tensor | None = None,
                   target_weights: Tensor | None = None, recon: ReconInputs | None = None,
                   lambda_: float = DEFAULT_LAMBDA, eta: float = DEFAULT_ETA,
                   pca_weight: float = DEFAULT_PCA_WEIGHT) -> tuple[Tensor, dict[str, float]]:
    """``L_cGAN + λ (L_scans + η L_recon)`` and its parts (floats, for logging).

    * ``L_cGAN = lsgan_loss(fake_scores, real=True)`` (the generator wants its fakes called real);
    * ``L_scans = masked_l1(displacement_mm, target_mm, target_mask) + pca_weight · pca_weight_l1(...)``
      (``target_mask`` defaults to where ``target_mm`` is finite);
    * ``L_recon = reconstruction_loss(displacement_mm, **recon)``.

    A term whose inputs are ``None`` is left out (0), so the same call serves the geometry-only warm-up
    (``fake_scores=None, recon=None``), the supervised pairs, and wild photos without ground truth
    (``target_mm=None``). The dict holds ``total`` and each part computed (``gan``, ``scans_l1``,
    ``pca``, ``scans``, ``recon``).
    """
    zero = displacement_mm.new_zeros(())
    parts: dict[str, Tensor] = {}
    gan = zero
    if fake_scores is not None:
        gan = parts["gan"] = lsgan_loss(fake_scores, real=True)
    scans = zero
    if target_mm is not None:
        mask = torch.isfinite(target_mm) if target_mask is None else target_mask
        scans = parts["scans_l1"] = masked_l1(displacement_mm, target_mm, mask)
        if pred_weights is not None and target_weights is not None:
            parts["pca"] = pca_weight_l1(pred_weights, target_weights)
            scans = scans + pca_weight * parts["pca"]
        parts["scans"] = scans
    recon_term = zero
    if recon is not None:
        recon_term = parts["recon"] = reconstruction_loss(
            displacement_mm, recon.proxy_positions_mm, recon.proxy_normals, recon.texture, recon.visible,
            recon.albedo, recon.sh, smooth_base=recon.smooth_base)
    total = gan + lambda_ * (scans + eta * recon_term)
    logged = {name: float(value.detach()) for name, value in parts.items()}
    logged["total"] = float(total.detach())
    return total, logged
