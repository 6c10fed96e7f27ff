"""Training the Deep Facial Detail Net: patch sampling, the paper's schedule, held-out evaluation, checkpoints.

One generator and one PatchGAN discriminator per face region (``upper``, ``lower``:
:func:`facedetail.capture.patches.face_regions`), trained on patches of the shared UV chart:

* **supervised pairs** (:mod:`facedetail.detail.pairs`): photo texture + ground-truth displacement;
* **wild textures** (``wild_proxy``): photo texture only, for the unsupervised re-rendering loss.

Schedule (the paper: 15 geometry-only epochs of 250, then alternating): for ``warmup_epochs`` the
generator learns from ``λ·L_scans`` alone (no discriminator, no re-rendering); afterwards every step is
``L_cGAN + λ(L_scans + η·L_recon)`` on a supervised batch (and a discriminator step on it), alternating
with ``L_cGAN + λη·L_recon`` on a wild batch when there are wild textures (``alternate``).

An epoch is ``patches_per_epoch`` patches per region drawn from every valid patch origin on the stride
grid, with a generator seeded by (seed, region, epoch) — so an epoch's batches do not depend on whether
the run was resumed. With fixed threads and ``torch.use_deterministic_algorithms(True)`` a rerun gives
byte-identical weights. The held-out evaluation uses a fixed sample of patches of held-out subjects
(never trained on), and compares with the zero displacement, the mean ground-truth patch and the mean
ground-truth map (per texel over the training pairs: the position prior a network without position input
does not have).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field

from facedetail.capture.patches import RegionBox, patch_origins
from facedetail.config import Config
from facedetail.detail.losses import ReconInputs, generator_loss, lsgan_loss, reconstruction_loss
from facedetail.detail.networks import (
    PROFILES,
    DetailGenerator,
    DetailNetConfig,
    PatchDiscriminator,
    normalize_patch,
)
from facedetail.detail.pairs import DetailPair
from facedetail.detail.shading import fine_positions, normals_from_positions, sh_shading, smooth_albedo
from facedetail.io.seeds import derive_seed
from facedetail.model.uvmap import UVRaster

STREAM = "train_detail"


class LossWeights(Config):
    """Weights of ``L_cGAN + λ (L_scans + η L_recon)`` (the paper's values are the defaults)."""

    lambda_scans: float = Field(100.0, ge=0)
    """λ (the paper: 100)."""
    eta_recon: float = Field(0.5, ge=0)
    """η (the paper: 0.5); 0 trains supervised only."""
    pca_weight: float = Field(1.0, ge=0)
    """Weight of the PCA-weight L1 inside L_scans (the release's ``loss_G_parameter``; its value is not known)."""
    gan_weight: float = Field(1.0, ge=0)
    """Weight of L_cGAN (1 in the paper's objective)."""


class ScheduleConfig(Config):
    """Epochs and the paper's two phases."""

    epochs: int = Field(6, ge=1)
    """Epochs in all (the paper: 250)."""
    warmup_epochs: int = Field(2, ge=0)
    """Geometry-only epochs first: λ·L_scans, no discriminator, no re-rendering (the paper: 15)."""
    alternate: bool = True
    """After the warm-up, alternate supervised steps with unsupervised steps on wild textures (when there are any)."""
    patches_per_epoch: int = Field(1024, ge=1)
    """Patches drawn per region and epoch (supervised; as many wild ones when alternating)."""
    batch_size: int = Field(16, ge=1)
    """Patches per step."""


class TrainConfig(Config):
    """Everything that shapes the trained weights."""

    profile: Literal["default", "paper"] = "default"
    """Network sizes: ``default`` (¼ geometry, narrow: trains in minutes on 2 cores) or ``paper`` (the release's)."""
    network: DetailNetConfig | None = None
    """Explicit network sizes instead of the profile's (patch size, widths, depths, FC sizes)."""
    stride: int = Field(16, ge=1)
    """Stride of the patch grid in texels (the paper: 64 at 4096², i.e. 16 at 1024²)."""
    min_valid: float = Field(0.5, ge=0, le=1)
    """A patch is used when at least this fraction of it is valid (visible, and with ground truth where supervised)."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Epochs, warm-up, alternation, batch."""
    loss: LossWeights = LossWeights()
    """Loss weights."""
    lr: float = Field(2e-4, gt=0)
    """Adam learning rate (pix2pix and the release: 2e-4)."""
    beta1: float = Field(0.5, ge=0, lt=1)
    """Adam β1 (pix2pix: 0.5)."""
    albedo_sigma_mm: float = Field(4.0, gt=0)
    """σ of the smooth albedo that L_recon renders with (as the pairs' lighting estimate)."""
    eval_patches: int = Field(256, ge=1)
    """Held-out patches per region scored after every epoch (a fixed sample)."""
    seed: int = 2019
    """Seed of the weights and of every epoch's patch sample."""

    def net(self) -> DetailNetConfig:
        """The network sizes in use."""
        return self.network if self.network is not None else PROFILES[self.profile]


# ----------------------------------------------------------------------------------- patches
@dataclass(frozen=True)
class PatchRef:
    """The patch origins of one region: rows of (pair index, row, col)."""

    region: str
    refs: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.refs.shape[0])


def region_patches(pairs: Sequence[DetailPair], box: RegionBox, size: int, stride: int, min_valid: float,
                   supervised: bool) -> PatchRef:
    """Every valid patch origin of ``box`` in every pair (valid: visible, and with ground truth if ``supervised``)."""
    rows = []
    for i, pair in enumerate(pairs):
        valid = pair.visible & pair.dmask if supervised and pair.dmask is not None else pair.visible
        origins = patch_origins(valid, box, size, stride, min_valid)
        rows.append(np.column_stack([np.full(len(origins), i), origins]) if len(origins) else np.zeros((0, 3)))
    refs = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)
    return PatchRef(box.name, refs)


def draw(refs: PatchRef, count: int, seed: int, *tag: str) -> NDArray[np.int64]:
    """``count`` patch refs drawn with replacement by a generator seeded from (seed, tags)."""
    rng = np.random.default_rng(derive_seed(seed, STREAM, "/".join((refs.region, *tag))))
    return refs.refs[rng.integers(0, len(refs), count)]


@dataclass(frozen=True)
class ChartGeometry:
    """Per texel of the chart: the proxy triangle's vertex ids and barycentrics (0 outside the chart), to blend
    a proxy's positions and normals over any patch of it."""

    vertex_ids: NDArray[np.int64]
    """(R, R, 3) vertex ids of the texel's triangle."""
    bary: NDArray[np.float32]
    """(R, R, 3) barycentric weights."""

    @classmethod
    def of(cls, raster: UVRaster, triangles: NDArray[np.integer]) -> ChartGeometry:
        covered = raster.covered
        ids = np.where(covered[..., None], np.asarray(triangles, np.int64)[np.maximum(raster.triangle, 0)], 0)
        return cls(ids, np.where(covered[..., None], raster.bary, 0.0).astype(np.float32))

    def blend(self, per_vertex: NDArray[np.floating], r0: int, c0: int, size: int) -> NDArray[np.float32]:
        """(size, size, C) barycentric blend of per-vertex values over one patch (0 outside the chart)."""
        ids = self.vertex_ids[r0:r0 + size, c0:c0 + size]
        w = self.bary[r0:r0 + size, c0:c0 + size]
        return np.einsum("hwk,hwkc->hwc", w, per_vertex[ids]).astype(np.float32)


ALBEDO_FACTOR = 4
"""The smooth albedo is kept at 1/4 of the chart's resolution: its σ is many texels wide, so bilinear
upsampling loses nothing visible, and a whole pair's albedo costs 1/16 of the memory."""


def pair_albedo(pair: DetailPair, geometry: ChartGeometry, albedo_sigma_px: float,
                factor: int = ALBEDO_FACTOR) -> torch.Tensor:
    """(3, R/f, R/f) smooth albedo of a pair's texture under its SH lighting (see ``smooth_albedo``), computed at
    1/``factor`` resolution: ``texture / S(N_proxy)`` and the visibility averaged over f x f blocks, blurred by σ/f."""
    R = pair.resolution
    normals = torch.from_numpy(geometry.blend(pair.proxy[:, 3:], 0, 0, R)).permute(2, 0, 1)[None].double()
    length = torch.linalg.vector_norm(normals, dim=1, keepdim=True)
    normals = torch.where(length > 0.5, normals / length.clamp_min(1e-12), 0.0)
    tex = torch.from_numpy(pair.texture).permute(2, 0, 1)[None].double() / 255.0
    mask = torch.from_numpy(pair.visible)[None, None] & (length > 0.5)
    shading = sh_shading(normals, torch.from_numpy(pair.sh)[None])
    lit = mask & (shading > 1e-3 * shading.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12))
    weight = lit.double()
    ratio = torch.where(lit, tex / torch.where(lit, shading, 1.0), 0.0)
    pool = torch.nn.functional.avg_pool2d
    low = smooth_albedo(pool(ratio * weight, factor) / pool(weight, factor).clamp_min(1e-12),
                        torch.ones_like(pool(ratio, factor)), pool(weight, factor) > 0, albedo_sigma_px / factor)
    return low[0].float()


def albedo_patch(low: torch.Tensor, r0: int, c0: int, size: int, resolution: int) -> torch.Tensor:
    """(3, size, size) bilinear samples of a low-resolution albedo at the texel centres of one patch."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / resolution) - 1.0
    ys, xs = centres + r0 * (2.0 / resolution), centres + c0 * (2.0 / resolution)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    return torch.nn.functional.grid_sample(low[None], grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)[0]


@dataclass
class Batch:
    """Tensors of one batch of patches (B, C, P, P)."""

    v: torch.Tensor
    target: torch.Tensor | None
    target_mask: torch.Tensor | None
    recon: ReconInputs


def make_batch(pairs: Sequence[DetailPair], albedo: Sequence[torch.Tensor], refs: NDArray[np.int64], size: int,
               geometry: ChartGeometry, device: torch.device) -> Batch:
    """Cut the patches of ``refs`` (rows of pair index, row, col) with everything the losses need; ``albedo`` holds
    each pair's :func:`pair_albedo`."""
    tex, vis, pos, nrm, tgt, tmask, alb, shs = ([] for _ in range(8))
    for i, r, c in refs.tolist():
        pair = pairs[i]
        tex.append(pair.texture[r:r + size, c:c + size])
        vis.append(pair.visible[r:r + size, c:c + size])
        pos.append(geometry.blend(pair.proxy[:, :3], r, c, size))
        nrm.append(geometry.blend(pair.proxy[:, 3:], r, c, size))
        alb.append(albedo_patch(albedo[i], r, c, size, pair.resolution))
        shs.append(pair.sh)
        if pair.displacement is not None and pair.dmask is not None:
            tgt.append(pair.displacement[r:r + size, c:c + size])
            tmask.append(pair.dmask[r:r + size, c:c + size])

    def t(arrays: list[NDArray[Any]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        a = np.stack(arrays)
        a = a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    texture = t(tex) / 255.0
    raw = t(nrm)
    length = torch.linalg.vector_norm(raw, dim=1, keepdim=True)
    normals = torch.where(length > 0.5, raw / length.clamp_min(1e-12), 0.0)
    sh = torch.from_numpy(np.stack(shs)).to(device=device, dtype=torch.float32)
    value = texture.amax(dim=1, keepdim=True)  # HSV V = max(R, G, B)
    recon = ReconInputs(t(pos), normals, texture, t(vis, torch.bool), torch.stack(alb).to(device), sh,
                        smooth_base=True)
    has_target = len(tgt) == len(refs)
    return Batch(normalize_patch(value), t(tgt) if has_target else None, t(tmask, torch.bool) if has_target else None,
                 recon)


# ----------------------------------------------------------------------------------- model
class RegionModel(torch.nn.Module):
    """The generator and discriminator of one region, with their optimizers."""

    def __init__(self, config: TrainConfig, basis: NDArray[np.float32], seed: int, device: torch.device) -> None:
        super().__init__()
        net = config.net()
        self.generator = DetailGenerator(net, seed=seed, device=device)
        self.generator.set_pca_basis(basis)
        self.discriminator = PatchDiscriminator(net.discriminator, seed=seed + 1, device=device)
        betas = (config.beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=betas)

    def checkpoint(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


def _d_input(batch_v: torch.Tensor, displacement_mm: torch.Tensor, scale: float) -> torch.Tensor:
    # The discriminator sees the displacement in the generator's tanh units, next to the input patch.
    return torch.cat([batch_v, displacement_mm / scale], dim=1)


def train_step(model: RegionModel, batch: Batch, phase: Literal["warmup", "supervised", "wild"],
               weights: LossWeights) -> dict[str, float]:
    """One optimisation step of one region; returns the logged loss parts."""
    g, d = model.generator, model.discriminator
    scale = g.config.max_displacement_mm
    g.train()
    d.train()
    out = g(batch.v)
    target_weights = None
    if batch.target is not None:
        masked = torch.where(batch.target_mask, batch.target, 0.0).flatten(1)
        target_weights = masked @ g.pca_basis.T  # the basis rows are orthonormal
    logged: dict[str, float] = {}
    fake_scores = None
    if phase != "warmup":
        if phase == "supervised":
            model.opt_d.zero_grad(set_to_none=True)
            real = d(_d_input(batch.v, torch.where(batch.target_mask, batch.target, 0.0), scale))
            fake = d(_d_input(batch.v, out.displacement_mm.detach(), scale))
            loss_d = 0.5 * (lsgan_loss(real, True) + lsgan_loss(fake, False))
            loss_d.backward()
            model.opt_d.step()
            logged["d"] = float(loss_d.detach())
        fake_scores = d(_d_input(batch.v, out.displacement_mm, scale))
    supervised = phase != "wild"
    total, parts = generator_loss(
        fake_scores, out.displacement_mm,
        target_mm=batch.target if supervised else None, target_mask=batch.target_mask if supervised else None,
        pred_weights=out.pca_weights if supervised else None, target_weights=target_weights if supervised else None,
        recon=batch.recon if phase != "warmup" and weights.eta_recon > 0 else None,
        lambda_=weights.lambda_scans, eta=weights.eta_recon, pca_weight=weights.pca_weight)
    if fake_scores is not None and weights.gan_weight != 1.0:
        total = total + (weights.gan_weight - 1.0) * lsgan_loss(fake_scores, True)
    model.opt_g.zero_grad(set_to_none=True)
    total.backward()
    model.opt_g.step()
    logged.update(parts)
    return logged


@torch.no_grad()
def predict(generator: DetailGenerator, v: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Displacement (mm) of normalized input patches, in eval mode (BatchNorm running statistics)."""
    generator.eval()
    return torch.cat([generator(v[i:i + batch_size]).displacement_mm for i in range(0, len(v), batch_size)])


# ----------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalSet:
    """A fixed sample of held-out patches of one region and the baselines' predictions for them."""

    region: str
    v: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    mean_patch: torch.Tensor
    """(1, 1, P, P) the mean ground-truth patch over the training patches."""
    mean_map: torch.Tensor
    """(N, 1, P, P) the mean ground-truth map over the training pairs, cut at each patch's place."""
    batch: Batch


def mean_truth(pairs: Sequence[DetailPair], refs: PatchRef, size: int,
               resolution: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(P, P) mean ground-truth patch over ``refs`` (masked texels left out) and the (R, R) mean map over the pairs."""
    patch_sum = np.zeros((size, size))
    patch_n = np.zeros((size, size))
    for i, r, c in refs.refs.tolist():
        m = pairs[i].dmask[r:r + size, c:c + size]
        patch_sum += np.where(m, pairs[i].displacement[r:r + size, c:c + size], 0.0)
        patch_n += m
    map_sum = np.zeros((resolution, resolution))
    map_n = np.zeros((resolution, resolution))
    for i in sorted(set(refs.refs[:, 0].tolist())):
        map_sum += np.where(pairs[i].dmask, pairs[i].displacement, 0.0)
        map_n += pairs[i].dmask
    return patch_sum / np.maximum(patch_n, 1), map_sum / np.maximum(map_n, 1)


def masked_mae(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |prediction - target| (mm) over the masked texels of all patches."""
    return float((prediction - target).abs()[mask].mean()) if bool(mask.any()) else float("nan")


def evaluate(generator: DetailGenerator, eval_set: EvalSet) -> dict[str, float]:
    """Held-out MAE (mm) of the network and of the three baselines, on the same texels."""
    pred = predict(generator, eval_set.v)
    t, m = eval_set.target, eval_set.mask
    return {"mae_mm": masked_mae(pred, t, m), "zero_mae_mm": masked_mae(torch.zeros_like(t), t, m),
            "mean_patch_mae_mm": masked_mae(eval_set.mean_patch.expand_as(t), t, m),
            "mean_map_mae_mm": masked_mae(eval_set.mean_map, t, m)}


# ----------------------------------------------------------------------------------- preview
def preview_tiles(generator: DetailGenerator, eval_set: EvalSet, count: int, scale_mm: float) -> NDArray[np.uint8]:
    """(count·P, 4·P, 3) rows of input texture | true displacement | predicted | predicted shaded fine normals."""
    n = min(count, len(eval_set.v))
    pred = predict(generator, eval_set.v[:n])
    rows = []
    for k in range(n):
        tex = eval_set.batch.recon.texture[k].permute(1, 2, 0).cpu().numpy()
        true = eval_set.target[k, 0].cpu().numpy() * eval_set.mask[k, 0].cpu().numpy()
        d = pred[k, 0].cpu().numpy()
        rec = eval_set.batch.recon
        fine = fine_positions(rec.proxy_positions_mm[k:k + 1], rec.proxy_normals[k:k + 1], pred[k:k + 1])
        normals, valid = normals_from_positions(fine, torch.linalg.vector_norm(rec.proxy_normals[k:k + 1], dim=1,
                                                                               keepdim=True) > 0.5,
                                                rec.proxy_normals[k:k + 1])
        shaded = sh_shading(normals, rec.sh[k:k + 1]).mean(dim=1)[0].cpu().numpy() * valid[0, 0].cpu().numpy()

        def grey(x: NDArray[np.floating]) -> NDArray[np.float64]:
            return np.repeat(np.clip(x, 0, 1)[..., None], 3, axis=2)

        rows.append(np.hstack([np.clip(tex, 0, 1), grey(0.5 + 0.5 * true / scale_mm), grey(0.5 + 0.5 * d / scale_mm),
                               grey(shaded / max(float(shaded.max()), 1e-6))]))
    return np.round(np.vstack(rows) * 255).astype(np.uint8)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


ProgressFn = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------- trainer
@dataclass(frozen=True)
class TrainData:
    """What a training run reads: the pairs split by subject, the wild textures, the regions and bases."""

    train: list[DetailPair]
    """Supervised pairs of training subjects."""
    heldout: list[DetailPair]
    """Supervised pairs of held-out subjects (evaluation only)."""
    wild: list[DetailPair]
    """Wild textures without ground truth (unsupervised steps)."""
    boxes: dict[str, RegionBox]
    bases: dict[str, NDArray[np.float32]]
    """Per region, the (K, P²) PCA basis in mm."""
    raster: UVRaster
    triangles: NDArray[np.int64]
    albedo_sigma_px: float


def _sum_errors(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    return float((prediction - target).abs()[mask].sum()), int(mask.sum())


class DetailTrainer:
    """Both regions' networks, the schedule, the evaluation; state in and out for checkpoints."""

    def __init__(self, config: TrainConfig, data: TrainData, device: torch.device) -> None:
        self.config = config
        self.data = data
        self.device = device
        net = config.net()
        self.patch = net.patch_size
        self.geometry = ChartGeometry.of(data.raster, data.triangles)
        self.albedo = {name: [pair_albedo(p, self.geometry, data.albedo_sigma_px) for p in pairs]
                       for name, pairs in (("train", data.train), ("heldout", data.heldout), ("wild", data.wild))}
        self.regions = sorted(data.boxes)
        self.models = {r: RegionModel(config, data.bases[r], derive_seed(config.seed, STREAM, f"{r}/weights")
                                      & 0x7FFFFFFF, device) for r in self.regions}
        size, stride, valid = self.patch, config.stride, config.min_valid
        self.supervised = {r: region_patches(data.train, data.boxes[r], size, stride, valid, True)
                           for r in self.regions}
        self.wild = {r: region_patches(data.wild, data.boxes[r], size, stride, valid, False) for r in self.regions}
        for r, refs in self.supervised.items():
            if not len(refs):
                raise ValueError(f"region {r}: no training patch with at least {valid:.0%} valid texels")
        self.eval_sets = {r: self._eval_set(r) for r in self.regions}
        self.epoch = 0
        """Epochs completed."""

    def _eval_set(self, region: str) -> EvalSet | None:
        refs = region_patches(self.data.heldout, self.data.boxes[region], self.patch, self.config.stride,
                              self.config.min_valid, True)
        if not len(refs):
            return None
        rng = np.random.default_rng(derive_seed(self.config.seed, STREAM, f"{region}/eval"))
        picked = refs.refs[np.sort(rng.choice(len(refs), min(self.config.eval_patches, len(refs)), replace=False))]
        batch = make_batch(self.data.heldout, self.albedo["heldout"], picked, self.patch, self.geometry, self.device)
        mean_patch, mean_map = mean_truth(self.data.train, self.supervised[region], self.patch,
                                          self.data.raster.resolution)
        cut = np.stack([mean_map[r:r + self.patch, c:c + self.patch] for _, r, c in picked.tolist()])[:, None]
        return EvalSet(region, batch.v, batch.target, batch.target_mask,
                       torch.from_numpy(mean_patch[None, None]).float().to(self.device),
                       torch.from_numpy(cut).float().to(self.device), batch)

    def phase(self, epoch: int) -> Literal["warmup", "supervised"]:
        return "warmup" if epoch < self.config.schedule.warmup_epochs else "supervised"

    def run_epoch(self, progress: ProgressFn | None = None) -> dict[str, float]:
        """Train one epoch of both regions, then score the held-out patches; returns flat per-epoch metrics."""
        cfg, sched = self.config, self.config.schedule
        epoch, phase = self.epoch, self.phase(self.epoch)
        use_wild = phase != "warmup" and sched.alternate and cfg.loss.eta_recon > 0
        metrics: dict[str, float] = {}
        for region in self.regions:
            model = self.models[region]
            sup = draw(self.supervised[region], sched.patches_per_epoch, cfg.seed, "supervised", str(epoch))
            wild = (draw(self.wild[region], sched.patches_per_epoch, cfg.seed, "wild", str(epoch))
                    if use_wild and len(self.wild[region]) else None)
            sums: dict[str, float] = {}
            steps = 0
            for start in range(0, len(sup), sched.batch_size):
                jobs: list[tuple[str, NDArray[np.int64], Literal["warmup", "supervised", "wild"]]]
                jobs = [("train", sup[start:start + sched.batch_size], phase)]
                if wild is not None:
                    jobs.append(("wild", wild[start:start + sched.batch_size], "wild"))
                for name, refs, kind in jobs:
                    pairs = self.data.wild if name == "wild" else self.data.train
                    batch = make_batch(pairs, self.albedo[name], refs, self.patch, self.geometry, self.device)
                    logged = train_step(model, batch, kind, cfg.loss)
                    prefix = "wild_" if kind == "wild" else ""
                    for k, v in logged.items():
                        sums[prefix + k] = sums.get(prefix + k, 0.0) + v
                    if progress is not None:
                        progress(len(refs), {"region": region, **{k: round(v, 4) for k, v in logged.items()
                                                                  if k in ("total", "scans_l1", "recon")}})
                steps += 1
            for k, v in sums.items():
                metrics[f"{region}/loss_{k}"] = v / steps
        metrics.update(self.evaluate())
        self.epoch += 1
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out MAE per region and overall (texel-weighted), with the baselines."""
        out: dict[str, float] = {}
        totals: dict[str, list[float]] = {}
        for region, es in self.eval_sets.items():
            if es is None:
                continue
            pred = predict(self.models[region].generator, es.v)
            rows = {"mae_mm": pred, "zero_mae_mm": torch.zeros_like(es.target),
                    "mean_patch_mae_mm": es.mean_patch.expand_as(es.target), "mean_map_mae_mm": es.mean_map}
            for name, value in rows.items():
                s, n = _sum_errors(value, es.target, es.mask)
                out[f"{region}/heldout_{name}"] = s / max(n, 1)
                acc = totals.setdefault(name, [0.0, 0])
                acc[0] += s
                acc[1] += n
        for name, (s, n) in totals.items():
            out[f"heldout_{name}"] = s / max(n, 1)
        return out

    @torch.no_grad()
    def recon_signal(self) -> dict[str, float]:
        """Per region, ``L_recon(true D) / L_recon(0)`` on the held-out patches: below 1 when the photos' shading
        carries the displacement the way the shading model says (the unsupervised loss can then teach it)."""
        out: dict[str, float] = {}
        for region, es in self.eval_sets.items():
            if es is None:
                continue
            r = es.batch.recon
            losses = [float(reconstruction_loss(d, r.proxy_positions_mm, r.proxy_normals, r.texture, r.visible,
                                                r.albedo, r.sh, smooth_base=r.smooth_base))
                      for d in (torch.where(es.mask, es.target, 0.0), torch.zeros_like(es.target))]
            out[region] = losses[0] / max(losses[1], 1e-12)
        return out

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain values only: loads with ``weights_only=True``)."""
        return {"epoch": self.epoch, "regions": {r: m.checkpoint() for r, m in self.models.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`."""
        for region, model in self.models.items():
            model.restore(state["regions"][region])
        self.epoch = int(state["epoch"])

    def generator_tensors(self) -> dict[str, torch.Tensor]:
        """The trained generators as one flat ``{region.param: tensor}`` dict (for the model file)."""
        return {f"{r}.{k}": v.detach().cpu().contiguous() for r, m in self.models.items()
                for k, v in m.generator.state_dict().items()}
