"""The Deep Facial Detail Net of Chen et al. (ICCV 2019): per-region generator and PatchGAN discriminator.

Layer shapes follow the authors' release (apchenstu/Facial_Details_Synthesis, ``src/DFDN/models/networks.py``,
itself pix2pix's ``networks.py``); the code here is written anew, iteratively rather than as nested blocks:

* :class:`UNet` – pix2pix's U-Net: 4x4 stride-2 convs down (LeakyReLU 0.2 before every one but the first,
  BatchNorm after every one but the first and the innermost), 4x4 stride-2 transposed convs up (ReLU before,
  BatchNorm after, tanh after the outermost), the skip of each level concatenated after its up conv;
* :class:`DetailGenerator` – U-Net (1 → 1 channel) → flatten (P²) → FC (LeakyReLU 0.2 between layers) →
  K PCA weights → PCA patch = weights @ basis (a buffer, in mm; no mean term, as the release) → refinement
  U-Net on (PCA patch ‖ input) → tanh · ``max_displacement_mm``, so the output is a displacement in mm;
* :class:`PatchDiscriminator` – pix2pix's n-layer PatchGAN (4x4 convs, padding 2).

As in the release every conv and transposed conv has a bias, BatchNorm next to it included, so the
:data:`PAPER` profile has the release's parameter counts exactly: U-Net 54,413,313, FC 136,875,584,
refinement 29,242,369 (generator 220,531,266 per region, 441,062,532 for both regions), discriminator
2,765,505. Skip connections carry the level's input where pix2pix (through its in-place LeakyReLU) carries
LeakyReLU(input): every concatenation is followed by a ReLU, and ReLU∘LeakyReLU = ReLU, so both compute
the same function.

Modules are built on the ``meta`` device and then materialized on the target device with weights drawn
from a ``torch.Generator`` seeded by the ``seed`` argument (pix2pix's init: conv weights N(0, 0.02),
BatchNorm weights N(1, 0.02), biases 0), so the global RNG is neither read nor advanced and two builds
with the same seed are bitwise identical on any device. ``device="meta"`` (or construction inside
``with torch.device("meta"):``) allocates nothing, for counting the paper profile's 441 M parameters.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Annotated, NamedTuple, TypeVar

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from facedetail.config import Config

LEAKY_SLOPE = 0.2
"""Negative slope of every LeakyReLU (pix2pix's and the release's FC layers)."""
WIDTH_CAP = 8
"""A U-Net level or discriminator layer is at most this many times the base width wide (pix2pix's ngf·8)."""
_META = torch.device("meta")

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


class UNetConfig(Config):
    """A pix2pix U-Net: ``downsamplings`` levels of widths ngf·min(2^i, 8), mirrored back up with skips.

    The defaults are the default profile's generator U-Net: the paper's ``unet_256`` (ngf 64, 8
    downsamplings on 256² patches) at ¼ width (ngf 16) and two levels fewer (6), so that a 64² patch
    still narrows to a 1x1 bottleneck as the paper's 256² patch does.
    """

    ngf: int = Field(16, ge=1)
    """Channels of the outermost level; level i has ngf·min(2^i, 8) (paper 64)."""
    downsamplings: int = Field(6, ge=2, le=12)
    """4x4 stride-2 convs; the bottleneck is patch_size / 2^downsamplings across (paper generator 8, refinement 6)."""


class PatchGANConfig(Config):
    """pix2pix's n-layer PatchGAN on (input patch ‖ displacement).

    Defaults: the paper's 3-layer discriminator at ¼ width (ndf 16 instead of 64); depth unchanged.
    """

    ndf: int = Field(16, ge=1)
    """Channels of the first conv; layer n has ndf·min(2^n, 8) (paper 64)."""
    layers: int = Field(3, ge=1, le=8)
    """Stride-2 convs (the first without BatchNorm) before the stride-1 pair (paper 3)."""


class DetailNetConfig(Config):
    """Sizes of one region's detail network; the defaults are the :data:`DEFAULT` profile.

    The default profile is the paper's design at the paper's geometry scaled by ¼ (64² patches at stride
    16 on a 1024² chart, where the paper has 256² at stride 64 on 4096²) and narrowed so that it trains in
    minutes on 2 CPU cores: generator U-Net ngf 64 → 16 with 8 → 6 downsamplings (1x1 bottleneck kept),
    FC hidden 2048/1024/512 → 512/256/128 (÷4; its input P² shrinks ÷16 with the patch), refinement
    U-Net ngf 64 → 16 with 6 → 4 downsamplings (4x4 bottleneck kept), discriminator ndf 64 → 16; the 64
    PCA components, the depths of FC and discriminator, every kernel and activation are the paper's.
    Per region: 4,486,850 generator parameters (U-Net 1,829,889, FC 2,270,144, refinement 386,817) instead
    of 220,531,266, and 175,281 discriminator parameters instead of 2,765,505; forward FLOPs per patch
    (:func:`flops_per_patch`) 87.4 M (generator) and 37.9 M (discriminator) instead of 23.85 G and 7.19 G.
    """

    patch_size: int = Field(64, ge=4)
    """Side of the square UV patch in texels (paper 256, ÷4); divisible by 2^downsamplings of both U-Nets."""
    generator: UNetConfig = UNetConfig()
    """U-Net from the input patch to the 1-channel PxP map that the FC layers read (paper ngf 64, 8 downsamplings)."""
    fc_hidden: tuple[Annotated[int, Field(ge=1)], ...] = (512, 256, 128)
    """Hidden sizes of the FC layers from the flattened P² map to the PCA weights (paper 2048, 1024, 512: ÷4)."""
    pca_components: int = Field(64, ge=1)
    """PCA weights the FC layers predict, i.e. rows of the basis from the ``detail_pca`` stage (paper 64)."""
    refine: UNetConfig = UNetConfig(ngf=16, downsamplings=4)
    """U-Net from (PCA patch ‖ input patch) to the displacement (paper ``unet_64``: ngf 64, 6 downs, 4x4 bottleneck)."""
    discriminator: PatchGANConfig = PatchGANConfig()
    """PatchGAN on (input patch ‖ displacement) (paper ndf 64, 3 layers)."""
    max_displacement_mm: float = Field(2.0, gt=0)
    """Output scale: displacement = tanh(...) · this, in mm (the release's tanh output has no documented unit).

    Real wrinkles are at most ~1 mm deep, so they stay in tanh's unsaturated half."""

    @model_validator(mode="after")
    def _fits_the_patch(self) -> DetailNetConfig:
        for name in ("generator", "refine"):
            factor = 2 ** getattr(self, name).downsamplings
            if self.patch_size % factor:
                raise ValueError(f"patch_size {self.patch_size} is not divisible by 2**{name}.downsamplings = {factor}")
        if self.pca_components > self.patch_size**2:
            raise ValueError(f"pca_components {self.pca_components} exceeds the {self.patch_size**2} values of a patch")
        return self


DEFAULT = DetailNetConfig()
"""The default profile: the paper's design at ¼ geometry and narrow widths (see :class:`DetailNetConfig`)."""
PAPER = DetailNetConfig(
    patch_size=256,
    generator=UNetConfig(ngf=64, downsamplings=8),
    fc_hidden=(2048, 1024, 512),
    pca_components=64,
    refine=UNetConfig(ngf=64, downsamplings=6),
    discriminator=PatchGANConfig(ndf=64, layers=3),
)
"""The release's exact layer sizes: ``unet_256`` → FC 65536→2048→1024→512→64 → ``unet_64`` on 256² patches."""
PROFILES: dict[str, DetailNetConfig] = {"default": DEFAULT, "paper": PAPER}
"""The named profiles, for a stage's ``profile`` parameter."""


class DetailOutput(NamedTuple):
    """What the generator returns for a batch of B patches of side P."""

    displacement_mm: torch.Tensor
    """(B, 1, P, P) displacement along the proxy normal, in mm, within ±max_displacement_mm."""
    pca_weights: torch.Tensor
    """(B, K) predicted PCA weights (the release's ``loss_G_parameter`` compares them with the truth's)."""
    pca_patch_mm: torch.Tensor
    """(B, 1, P, P) the PCA reconstruction weights @ basis that the refinement U-Net refines, in mm."""


def normalize_patch(v: ArrayT) -> ArrayT:
    """The network input from HSV V-channel patches (..., P, P): ``(V - patch mean)·2``, each patch on its own."""
    if isinstance(v, np.ndarray):
        return (v - v.mean(axis=(-2, -1), keepdims=True)) * 2
    return (v - v.mean(dim=(-2, -1), keepdim=True)) * 2


def _target_device(device: torch.device | str | None) -> torch.device:
    # None means the current default device, including one set by a ``with torch.device(...)`` block.
    return torch.device(device) if device is not None else torch.empty(0).device


def _draw(param: torch.Tensor, fill: str, a: float, b: float, gen: torch.Generator) -> None:
    # Drawn on the CPU and copied, so that a CUDA build gets the same bits as a CPU build.
    values = torch.empty(param.shape, dtype=torch.float32, device="cpu")
    getattr(values, fill)(a, b, generator=gen)
    param.copy_(values)


@torch.no_grad()
def init_weights(module: nn.Module, seed: int) -> None:
    """pix2pix's init from a generator seeded by ``seed``: conv weights N(0, 0.02), BatchNorm N(1, 0.02), biases 0.

    Linear weights are U(±1/√fan_in), the distribution torch gives them by default, which the release keeps
    (its init only touches Conv and BatchNorm layers). BatchNorm running statistics are reset. Meta tensors
    are left alone.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for m in module.modules():
        if not isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.BatchNorm2d | nn.Linear) or m.weight.is_meta:
            continue
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            _draw(m.weight, "normal_", 0.0, 0.02, gen)
        elif isinstance(m, nn.BatchNorm2d):
            _draw(m.weight, "normal_", 1.0, 0.02, gen)
            m.reset_running_stats()
        else:
            bound = 1.0 / math.sqrt(m.in_features)
            _draw(m.weight, "uniform_", -bound, bound, gen)
        if m.bias is not None:
            m.bias.zero_()


def _materialize(module: nn.Module, device: torch.device, seed: int) -> None:
    if device.type != "meta":
        module.to_empty(device=device)
        init_weights(module, seed)


def _widths(config: UNetConfig) -> list[int]:
    return [config.ngf * min(2**i, WIDTH_CAP) for i in range(config.downsamplings)]


class UNet(nn.Module):
    """pix2pix's U-Net generator: (B, in, H, W) → (B, out, H, W) in [-1, 1]; H, W divisible by 2^downsamplings."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, *, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        target = _target_device(device)
        w = _widths(config)
        n = len(w)
        down: list[nn.Module] = []
        for i in range(n):
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(LEAKY_SLOPE)]
            layers.append(nn.Conv2d(in_channels if i == 0 else w[i - 1], w[i], 4, stride=2, padding=1, device=_META))
            if 0 < i < n - 1:  # no norm on the raw input's conv, none on the bottleneck (1x1 at the paper's size)
                layers.append(nn.BatchNorm2d(w[i], device=_META))
            down.append(nn.Sequential(*layers))
        up: list[nn.Module] = []
        for i in range(n):
            # up[i] brings level i back to level i-1's resolution; all but the innermost read (up ‖ skip).
            c_in = w[i] if i == n - 1 else 2 * w[i]
            c_out = out_channels if i == 0 else w[i - 1]
            tail = nn.Tanh() if i == 0 else nn.BatchNorm2d(c_out, device=_META)
            up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, device=_META),
                                    tail))
        self.down = nn.ModuleList(down)
        self.up = nn.ModuleList(up)
        _materialize(self, target, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        for i in range(len(self.up) - 1, -1, -1):
            x = self.up[i](x)
            if i > 0:
                x = torch.cat([x, skips[i - 1]], dim=1)
        return x


class DetailGenerator(nn.Module):
    """One region's generator: normalized V patch (B, 1, P, P) → :class:`DetailOutput` (displacement in mm).

    The PCA basis is a zero buffer until :meth:`set_pca_basis` loads the ``detail_pca`` stage's; it is part
    of the state dict, so a checkpoint carries the basis it was trained with.
    """

    pca_basis: torch.Tensor

    def __init__(self, config: DetailNetConfig = DEFAULT, *, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        target = _target_device(device)
        self.config = config
        p2 = config.patch_size**2
        self.unet = UNet(1, 1, config.generator, device=_META)
        sizes = (p2, *config.fc_hidden, config.pca_components)
        fc: list[nn.Module] = []
        for j, (a, b) in enumerate(pairwise(sizes)):
            if j:
                fc.append(nn.LeakyReLU(LEAKY_SLOPE))
            fc.append(nn.Linear(a, b, device=_META))
        self.fc = nn.Sequential(*fc)
        self.refine = UNet(2, 1, config.refine, device=_META)
        self.register_buffer("pca_basis", torch.zeros(config.pca_components, p2, device=_META))
        _materialize(self, target, seed)
        if target.type != "meta":
            self.pca_basis.zero_()  # to_empty left it uninitialized

    @torch.no_grad()
    def set_pca_basis(self, basis_mm: torch.Tensor | np.ndarray) -> None:
        """Load a (K, P²) or (K, P, P) basis in mm; row k is component k, the patch flattened row by row."""
        k, p = self.config.pca_components, self.config.patch_size
        basis = torch.as_tensor(np.asarray(basis_mm) if not isinstance(basis_mm, torch.Tensor) else basis_mm)
        if basis.ndim == 3:
            basis = basis.reshape(basis.shape[0], -1)
        if tuple(basis.shape) != (k, p * p):
            raise ValueError(f"PCA basis has shape {tuple(basis.shape)}, the network needs ({k}, {p * p}) "
                             f"({k} components of {p}x{p} patches)")
        if not bool(torch.isfinite(basis).all()):
            raise ValueError("PCA basis has non-finite values")
        self.pca_basis.copy_(basis.to(self.pca_basis.dtype))

    def forward(self, v: torch.Tensor) -> DetailOutput:
        """Displacement (mm), PCA weights and PCA patch for input patches from :func:`normalize_patch`."""
        p = self.config.patch_size
        if v.ndim != 4 or tuple(v.shape[1:]) != (1, p, p):
            raise ValueError(f"input has shape {tuple(v.shape)}, the network needs (B, 1, {p}, {p})")
        weights = self.fc(self.unet(v).flatten(1))
        pca_patch = (weights @ self.pca_basis).view(-1, 1, p, p)
        refined = self.refine(torch.cat([pca_patch, v], dim=1))  # ends in tanh
        return DetailOutput(refined * self.config.max_displacement_mm, weights, pca_patch)


class PatchDiscriminator(nn.Module):
    """pix2pix's n-layer PatchGAN: (B, in, H, W) → (B, 1, h, w) real/fake scores (no sigmoid: LSGAN).

    Input in the release's order: the condition (input patch) then the displacement, real or generated.
    With 3 layers a 64² input gives 11x11 scores and a 256² input 35x35.
    """

    def __init__(self, config: PatchGANConfig = DEFAULT.discriminator, in_channels: int = 2, *, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        target = _target_device(device)
        nf = [config.ndf * min(2**n, WIDTH_CAP) for n in range(config.layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, nf[0], 4, stride=2, padding=2, device=_META),
                                   nn.LeakyReLU(LEAKY_SLOPE)]
        for n in range(1, config.layers + 1):
            stride = 2 if n < config.layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2d(nf[n - 1], nf[n], 4, stride=stride, padding=2, device=_META),
                       nn.BatchNorm2d(nf[n], device=_META), nn.LeakyReLU(LEAKY_SLOPE)]
        layers.append(nn.Conv2d(nf[-1], 1, 4, stride=1, padding=2, device=_META))
        self.model = nn.Sequential(*layers)
        _materialize(self, target, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(config: DetailNetConfig) -> dict[str, int]:
    """Parameters of one region's parts (``unet``, ``fc``, ``refine``, ``generator`` = their sum, ``discriminator``)."""
    g = DetailGenerator(config, device=_META)
    d = PatchDiscriminator(config.discriminator, device=_META)
    return {"unet": _count(g.unet), "fc": _count(g.fc), "refine": _count(g.refine), "generator": _count(g),
            "discriminator": _count(d)}


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """FLOPs (2 · multiply–adds) of one forward pass, per top-level child (``""`` for the module's own layers).

    Counted: Conv2d (output elements · in/groups · k²), ConvTranspose2d (input elements · out/groups · k²),
    Linear (input elements · out features) and a :class:`DetailGenerator`'s PCA product (``pca``: B · K · P²);
    biases, norms and activations are not. Run it on ``meta`` modules and inputs to count without computing.
    """
    totals: dict[str, int] = {}

    def hook(name: str) -> object:
        def record(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = args[0]
            if isinstance(m, nn.Conv2d):
                macs = out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            elif isinstance(m, nn.ConvTranspose2d):
                macs = x.numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)
            else:
                macs = x.numel() * m.out_features
            totals[name] = totals.get(name, 0) + 2 * macs
        return record

    handles = [m.register_forward_hook(hook(name.split(".")[0]))  # type: ignore[arg-type]
               for name, m in module.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    if isinstance(module, DetailGenerator):
        totals["pca"] = 2 * inputs[0].shape[0] * module.pca_basis.numel()
    return totals


def flops_per_patch(config: DetailNetConfig) -> dict[str, int]:
    """Forward FLOPs of one patch: ``unet``, ``fc``, ``pca``, ``refine``, ``generator`` (sum), ``discriminator``."""
    p = config.patch_size
    g = DetailGenerator(config, device=_META).eval()
    d = PatchDiscriminator(config.discriminator, device=_META).eval()
    parts = count_flops(g, torch.zeros(1, 1, p, p, device=_META))
    out = {k: parts[k] for k in ("unet", "fc", "pca", "refine")}
    out["generator"] = sum(out.values())
    out["discriminator"] = sum(count_flops(d, torch.zeros(1, 2, p, p, device=_META)).values())
    return out
