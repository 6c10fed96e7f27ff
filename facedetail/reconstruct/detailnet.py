"""The trained Deep Facial Detail Net at inference: patches of a UV texture → one stitched displacement map.

A texture is cut per face region into patches on the training stride (every origin whose patch is at least
``min_valid`` visible, as in training), each patch goes through its region's generator (eval mode), and the
predictions are blended with a Gaussian weight centred on each patch (the release's ``σ = 50`` px on 256 px
patches at 4096²: :attr:`StitchConfig.sigma_fraction` of the patch side), normalised by the summed weights.
The same forward pass gives the PCA part alone (the weights · basis, before the refinement U-Net), which the
evaluation reports as its own row.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field

from facedetail.capture.patches import RegionBox, patch_origins
from facedetail.config import Config
from facedetail.detail.networks import DetailGenerator, DetailNetConfig, normalize_patch
from facedetail.detail.pca import read_safetensors
from facedetail.errors import SourceFileError

MODEL_FORMAT = "facedetail-detail-net/1"
_REMEDY = "Point at a train_detail output (data/train_detail/detail_net.safetensors); run `dvc repro train_detail`"


class StitchConfig(Config):
    """How patch predictions become one map."""

    sigma_fraction: float = Field(50 / 256, gt=0)
    """σ of each patch's Gaussian weight as a fraction of the patch side (the release: 50 px on 256 px patches)."""
    min_valid: float = Field(0.5, ge=0, le=1)
    """A patch is predicted when at least this fraction of it is visible in the texture (training's ``min_valid``)."""
    batch_size: int = Field(64, ge=1)
    """Patches per forward pass."""
    stride: int | None = Field(None, ge=1)
    """Patch stride in texels; None = the training stride (the paper's). A larger one trades accuracy for time:
    2x the stride is 1/4 of the patches (``bench/reconstruct.py`` measures both)."""


@dataclass(frozen=True)
class DetailMaps:
    """The stitched predictions for one texture (R x R, mm, 0 where no patch reached)."""

    displacement: NDArray[np.float32]
    """The network's displacement (refined)."""
    pca_only: NDArray[np.float32]
    """The PCA part alone (the refinement skipped)."""
    covered: NDArray[np.bool_]
    """Texels that some patch predicted."""
    patches: int
    """Patches predicted (both regions)."""
    seconds: dict[str, float]
    """Time of the forward passes (``network``) and of the blend (``stitch``)."""


def gaussian_window(size: int, sigma: float) -> NDArray[np.float64]:
    """(size, size) Gaussian weight centred on the patch (peak 1)."""
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return np.outer(g, g)


def stitch(patches: NDArray[np.floating], origins: NDArray[np.integer], resolution: int,
           window: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Weighted blend of (N, P, P) patches at their (row, col) origins: (Σ w·patch / Σ w, Σ w); 0 where Σ w = 0."""
    p = window.shape[0]
    acc = np.zeros((resolution, resolution))
    weight = np.zeros((resolution, resolution))
    for patch, (r, c) in zip(np.asarray(patches, np.float64), np.asarray(origins, np.int64), strict=True):
        acc[r:r + p, c:c + p] += window * patch
        weight[r:r + p, c:c + p] += window
    return np.divide(acc, weight, out=np.zeros_like(acc), where=weight > 0), weight


class DetailNet:
    """Both regions' generators of a ``train_detail`` model file, loaded once."""

    def __init__(self, generators: dict[str, DetailGenerator], boxes: dict[str, RegionBox], resolution: int,
                 stride: int, meta: dict[str, Any], device: torch.device) -> None:
        self.generators, self.boxes, self.resolution, self.stride = generators, boxes, resolution, stride
        self.meta, self.device = meta, device
        self.patch = next(iter(generators.values())).config.patch_size

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> DetailNet:
        """Read ``detail_net.safetensors`` (weights, PCA bases, regions and chart in its metadata)."""
        path = Path(path)
        try:
            tensors, metadata = read_safetensors(path)
            meta = json.loads(metadata["facedetail"])
        except FileNotFoundError:
            raise SourceFileError(path, "detail network not found", _REMEDY) from None
        except Exception as err:  # any unreadable file is one line, not a traceback
            raise SourceFileError(path, f"not a detail network file ({type(err).__name__}: {err})", _REMEDY) from None
        if meta.get("format") != MODEL_FORMAT:
            raise SourceFileError(path, f"unknown model format {meta.get('format')!r}, expected {MODEL_FORMAT}",
                                  _REMEDY)
        device = torch.device(device)
        config = DetailNetConfig.model_validate(meta["network"])
        generators, boxes = {}, {}
        for region, box in sorted(meta["regions"].items()):
            generator = DetailGenerator(config, seed=0, device=device)
            prefix = f"{region}."
            state = {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(prefix)}
            try:
                generator.load_state_dict(state)
            except RuntimeError as err:
                raise SourceFileError(path, f"the {region} weights do not fit the network in its metadata "
                                      f"({' '.join(str(err).split())[:200]})", _REMEDY) from None
            # channels_last: measured 1.16x the patches/s of NCHW for this forward on one core (bench/reconstruct.py).
            generator.eval().to(memory_format=torch.channels_last)
            generators[region] = generator
            boxes[region] = RegionBox(region, *box["rows"], *box["cols"])
        return cls(generators, boxes, int(meta["chart_resolution"]), int(meta["stride"]), meta, device)

    def origins(self, visible: NDArray[np.bool_], config: StitchConfig) -> dict[str, NDArray[np.int64]]:
        """Patch origins per region on the training stride."""
        stride = config.stride or self.stride
        return {r: patch_origins(visible, box, self.patch, stride, config.min_valid) for r, box in self.boxes.items()}

    @torch.no_grad()
    def predict(self, texture: NDArray[np.uint8], visible: NDArray[np.bool_],
                config: StitchConfig | None = None) -> DetailMaps:
        """The stitched displacement of an (R, R, 3) UV texture with its (R, R) visibility."""
        config = config or StitchConfig()
        R = self.resolution
        if texture.shape[:2] != (R, R) or visible.shape != (R, R):
            raise ValueError(f"texture {texture.shape[:2]} / mask {visible.shape} do not match the network's "
                             f"{R}x{R} chart")
        value = texture.max(axis=2).astype(np.float32) / 255.0  # HSV V, as in training
        window = gaussian_window(self.patch, config.sigma_fraction * self.patch)
        p = self.patch
        started = time.perf_counter()
        all_d, all_pca, all_origins = [], [], []
        for region, origins in self.origins(visible, config).items():
            if not len(origins):
                continue
            generator = self.generators[region]
            for start in range(0, len(origins), config.batch_size):
                chunk = origins[start:start + config.batch_size]
                v = np.stack([value[r:r + p, c:c + p] for r, c in chunk])[:, None]
                x = torch.from_numpy(normalize_patch(v)).to(self.device).contiguous(memory_format=torch.channels_last)
                out = generator(x)
                all_d.append(out.displacement_mm[:, 0].float().cpu().numpy())
                all_pca.append(out.pca_patch_mm[:, 0].float().cpu().numpy())
            all_origins.append(origins)
        if not all_origins:
            empty = np.zeros((R, R), np.float32)
            return DetailMaps(empty, empty.copy(), np.zeros((R, R), bool), 0, {"network": 0.0, "stitch": 0.0})
        network_s = time.perf_counter() - started
        started = time.perf_counter()
        origins = np.concatenate(all_origins)
        displacement, weight = stitch(np.concatenate(all_d), origins, R, window)
        pca_only, _ = stitch(np.concatenate(all_pca), origins, R, window)
        return DetailMaps(displacement.astype(np.float32), pca_only.astype(np.float32), weight > 0, len(origins),
                          {"network": network_s, "stitch": time.perf_counter() - started})
