"""UV-space shading for the re-rendering loss: SH shading, fine positions, finite-difference normals, lighting.

Every map is a ``(B, C, H, W)`` tensor in the proxy's UV chart: ``u`` runs along ``W`` (columns) and ``v``
along ``H`` (rows), so texel ``(row, col)`` of a texture, a displacement map and the proxy's position/normal
maps is the same surface point. Works on CPU and CUDA alike (constants follow the input's device and dtype).

**SH convention.** The basis and coefficients are those of :mod:`facedetail.render.sh` (the renders store
theirs in it): ``S(n) = Σ_k c_k Y_k(n)`` over the real orthonormal basis in the order
``1, y, z, x, xy, yz, 3z²-1, xz, x²-y²`` with constants ``Y_k`` 0.282095; 0.488603 for y, z, x; 1.092548 for xy, yz,
xz; 0.315392 for 3z²-1; 0.546274 for x²-y²; and ``c`` (9, 3) the radiance's SH coefficients *already convolved* with
the clamped cosine (``c_k = Â_l L_k``, ``Â = (π, 2π/3, π/4)``), so a directional light gives the clamped
cosine up to the order-2 truncation. The Ramamoorthi–Hanrahan form the issue quotes,
``S = 0.282095 L₀ + 1.023327 (L₁x + L₂y + L₃z) + 0.858086 (L₄xy + L₅xz + L₆yz) + 0.429043 L₇(x²-y²)
+ 0.247708 L₈(3z²-1)``, folds ``Â_l`` into the basis constants (1.023327 = 2π/3·0.488603,
0.858086 = π/4·1.092548, 0.429043 = π/4·0.546274, 0.247708 = π/4·0.315392) except in band 0, whose 0.282095 is
the bare ``Y_0``: there ``L₀`` already carries the factor π. :func:`sh_from_rh` converts (reorders and
scales by ``Â_l``, band 0 unscaled); the two give the same shading.

A directional light of intensity s shades as ``s·(3/32 + t/2 + 15/32·t²)``, t = n·l, clipped at 0: the
order-2 series of ``s·max(0, t)``. Its error is the 6.25 % that render/sh.py names at n = l, at most that
wherever t ≥ 0.1, and largest (9.375 %) at the terminator t = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)
from torch import Tensor

from facedetail.render.sh import _BAND_FACTOR, _Y0, _Y1, _Y2, _Y20, _Y22

# Issue order [1, x, y, z, xy, xz, yz, x²-y², 3z²-1] -> index into ours [1, y, z, x, xy, yz, 3z²-1, xz, x²-y²].
_RH_TO_OURS = (0, 3, 1, 2, 4, 7, 5, 8, 6)


def sh_basis_torch(normals: Tensor) -> Tensor:
    """(B, 9, H, W) real SH basis of unit ``normals`` (B, 3, H, W), in :func:`facedetail.render.sh.sh_basis`'s order."""
    x, y, z = normals[:, 0], normals[:, 1], normals[:, 2]
    return torch.stack([
        torch.full_like(x, _Y0), _Y1 * y, _Y1 * z, _Y1 * x,
        _Y2 * x * y, _Y2 * y * z, _Y20 * (3.0 * z * z - 1.0), _Y2 * x * z, _Y22 * (x * x - y * y),
    ], dim=1)


def sh_shading(normals: Tensor, sh: Tensor) -> Tensor:
    """(B, 3, H, W) non-negative shading of ``normals`` (B, 3, H, W) under ``sh`` (B, 9, 3) or (9, 3).

    Clipped at 0 like :func:`facedetail.render.sh.shade` (the truncated series rings below 0 on the unlit side).
    """
    if sh.ndim == 2:
        sh = sh.unsqueeze(0).expand(normals.shape[0], -1, -1)
    return torch.einsum("bkhw,bkc->bchw", sh_basis_torch(normals), sh.to(normals.dtype)).clamp_min(0.0)


def sh_from_rh(coeffs: Tensor) -> Tensor:
    """(..., 9, 3) coefficients of the Ramamoorthi–Hanrahan form (the issue's order and constants) in our convention."""
    # A copy: as_tensor would share render.sh's array on CPU, and the next line would then change it.
    factor = torch.tensor(_BAND_FACTOR, dtype=coeffs.dtype, device=coeffs.device)
    factor[0] = 1.0  # band 0 of that form carries π in L₀ already
    out = torch.empty_like(coeffs)
    out[..., list(_RH_TO_OURS), :] = coeffs
    return out * factor[:, None]


def render_uv(albedo: Tensor, normals: Tensor, sh: Tensor) -> Tensor:
    """(B, 3, H, W) Lambertian image ``albedo ⊙ S(normals)`` in UV space."""
    return albedo * sh_shading(normals, sh)


def fine_positions(proxy_positions_mm: Tensor, proxy_normals: Tensor, displacement_mm: Tensor) -> Tensor:
    """(B, 3, H, W) detailed surface ``P_fine = P_proxy + D·N_proxy`` (mm); ``displacement_mm`` is (B, 1, H, W)."""
    return proxy_positions_mm + displacement_mm * proxy_normals


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` as a (B, 1, H, W) bool tensor (accepts (B, H, W) and 0/1 floats)."""
    m = mask if mask.ndim == like.ndim else mask.unsqueeze(1)
    return m.to(torch.bool) if m.dtype == torch.bool else m > 0.5


def _chart_derivative(values: Tensor, valid: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-texel derivative along ``dim`` (2: v, 3: u) and the number of valid neighbour steps used (0, 1, 2).

    The mean of the valid forward and backward steps: central ``(P[i+1] - P[i-1]) / 2`` where both neighbours
    are valid, one-sided at the mask's border, 0 where neither is (the same rule as the NumPy
    :func:`facedetail.capture.extract._derivative`). Built from ``where`` so texels outside the mask (NaN,
    zeros) give neither values nor NaN gradients.
    """
    n = values.shape[dim]
    ok = valid.narrow(dim, 1, n - 1) & valid.narrow(dim, 0, n - 1)
    step = torch.where(ok, values.narrow(dim, 1, n - 1) - values.narrow(dim, 0, n - 1), 0.0)
    after = (0, 1) if dim == 3 else (0, 0, 0, 1)
    before = (1, 0) if dim == 3 else (0, 0, 1, 0)
    total = F.pad(step, after) + F.pad(step, before)  # forward step of texel i + its backward step
    count = F.pad(ok.to(values.dtype), after) + F.pad(ok.to(values.dtype), before)
    return total / count.clamp_min(1.0), count


def normals_from_positions(positions_mm: Tensor, valid: Tensor,
                           reference_normals: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, 3, H, W) unit normals ``normalize(cross(∂P/∂u, ∂P/∂v))`` of a UV position map, and their validity.

    Central differences along u (columns) and v (rows), one-sided at the border of ``valid`` (B, 1, H, W);
    a texel is invalid when it is, or when it has no valid neighbour along u or along v (or the two
    tangents are parallel). The positions are 3D points in mm, so the chart's texel spacing is carried by
    the positions themselves: no mm-per-texel factor enters (and a common step scale would cancel in the
    normalisation anyway). ``cross(u, v)`` follows the chart's handedness; where ``reference_normals`` (the
    proxy's) are given, each normal is flipped to their side. Invalid texels get the zero vector.
    Differentiable with respect to ``positions_mm``.
    """
    ok = _as_mask(valid, positions_mm)
    pu, count_u = _chart_derivative(positions_mm, ok, 3)
    pv, count_v = _chart_derivative(positions_mm, ok, 2)
    cross = torch.linalg.cross(pu, pv, dim=1)
    length = torch.linalg.vector_norm(cross, dim=1, keepdim=True)
    # Parallel tangents (degenerate chart) relative to their own size, not an absolute mm² threshold.
    scale = torch.linalg.vector_norm(pu, dim=1, keepdim=True) * torch.linalg.vector_norm(pv, dim=1, keepdim=True)
    out_valid = ok & (count_u > 0) & (count_v > 0) & (length > 1e-6 * scale)
    normals = cross / torch.where(out_valid, length, 1.0)
    if reference_normals is not None:
        flip = (normals * reference_normals).sum(dim=1, keepdim=True) < 0
        normals = torch.where(flip, -normals, normals)
    return torch.where(out_valid, normals, 0.0), out_valid


def _gaussian_blur(image: Tensor, sigma_px: float) -> Tensor:
    """Separable Gaussian blur (truncated at 3σ, zero padding) of (B, C, H, W)."""
    radius = max(1, math.ceil(3.0 * sigma_px))
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(image, horizontal, padding=(0, radius), groups=channels)
    return F.conv2d(out, vertical, padding=(radius, 0), groups=channels)


def _fit_sh(tex: Tensor, basis: Tensor, ridge: float) -> Tensor:
    """(B, 9, 3) least squares of ``tex ≈ Σ_k c_k Y_k`` over the texels where ``basis`` (masked) is non-zero."""
    gram = torch.einsum("bkhw,bjhw->bkj", basis, basis)
    rhs = torch.einsum("bkhw,bchw->bkc", basis, tex)
    diag = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)
    eye = torch.eye(9, dtype=tex.dtype, device=tex.device)
    # The absolute 1e-12 keeps an empty mask solvable (its lighting is then 0).
    return torch.linalg.solve(gram + (ridge * diag + 1e-12)[:, None, None] * eye, rhs)


def smooth_albedo(tex: Tensor, shading: Tensor, mask: Tensor, sigma_px: float) -> Tensor:
    """``blur(ratio·m) / blur(m)`` of ``ratio = tex / shading`` over the lit texels ``m`` of ``mask``."""
    # Texels the light barely reaches would divide noise by ~0; they are left out of the average.
    lit = mask & (shading > 1e-3 * shading.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12))
    weight = lit.to(tex.dtype)
    ratio = torch.where(lit, tex / torch.where(lit, shading, 1.0), 0.0)
    if sigma_px > 0:
        numerator, denominator = _gaussian_blur(ratio * weight, sigma_px), _gaussian_blur(weight, sigma_px)
    else:
        numerator, denominator = ratio * weight, weight
    return torch.where(denominator > 1e-3, numerator / denominator.clamp_min(1e-3), 0.0)


def estimate_sh(texture: Tensor, proxy_normals: Tensor, mask: Tensor, ridge: float = 1e-9) -> Tensor:
    """(B, 9, 3) step 1 of :func:`estimate_lighting` alone: the SH lighting, without the smooth albedo."""
    with torch.no_grad():
        tex, normals, m = _lighting_inputs(texture, proxy_normals, mask)
        return _fit_sh(tex, sh_basis_torch(normals) * m, ridge).to(texture.dtype)


def _lighting_inputs(texture: Tensor, proxy_normals: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    tex = texture.detach().to(torch.float64)
    normals = proxy_normals.detach().to(torch.float64)
    m = _as_mask(mask, tex) & (torch.linalg.vector_norm(normals, dim=1, keepdim=True) > 0.5)
    m = m & torch.isfinite(tex).all(dim=1, keepdim=True)
    return torch.where(m, tex, 0.0), normals, m


def estimate_lighting(texture: Tensor, proxy_normals: Tensor, mask: Tensor, albedo_sigma_px: float,
                      ridge: float = 1e-9) -> tuple[Tensor, Tensor]:
    """Per photo, SH lighting and a smooth albedo from the UV ``texture`` (B, 3, H, W) and the proxy's normals.

    1. ``sh`` (B, 9, 3): least squares of ``texture ≈ Σ_k c_k Y_k(N_proxy)`` over ``mask`` with a constant
       (unit) albedo, by the 9x9 normal equations per channel in float64 with a small ridge (``ridge`` x
       their mean diagonal), which keeps directions the proxy's normals do not constrain at ≈ 0 (a
       degenerate chart still solves) without biasing a face-sized fit, and works batched on CPU and CUDA.
       The albedo's overall scale is absorbed into ``sh``.
    2. ``albedo`` (B, 3, H, W): the ratio ``texture / S(N_proxy)`` blurred by a Gaussian of
       ``albedo_sigma_px`` texels, normalised over the mask (``blur(ratio·m) / blur(m)``), 0 far outside it.
       The albedo must be low-frequency: a per-texel ratio would absorb the fine shading itself, and the
       re-rendering loss would then carry no signal about the displacement. ``albedo_sigma_px`` should be
       several times the width of the details (wrinkles, pores) in texels.

    The estimate cannot know the details, so it is biased by them: the smooth albedo absorbs the
    low-frequency part of their shading (a groove darkens on average, second order in its slope) and a
    smooth albedo gradient is partly taken for light. On the tests' wrinkled sphere this leaves
    L_recon(true D) at about 0.2 x L_recon(0) instead of the 0.03 floor of the finite differences.
    Where a pair has a ground-truth displacement, passing the normals of its detailed surface as
    ``proxy_normals`` removes the first bias (measured 0.10 there).

    The normals must vary (a curved face, not a plane): with a single normal the fit is rank 1 and the
    (ridge-regularised) answer is zonal around that normal, blind to first order to the tilts of the details.
    No gradient flows through the estimate (run under ``torch.no_grad``; the outputs are plain tensors).
    """
    with torch.no_grad():
        dtype = texture.dtype
        tex, normals, m = _lighting_inputs(texture, proxy_normals, mask)
        basis = sh_basis_torch(normals) * m
        sh = _fit_sh(tex, basis, ridge)
        albedo = smooth_albedo(tex, sh_shading(normals, sh), m, albedo_sigma_px)
        return albedo.to(dtype), sh.to(dtype)
