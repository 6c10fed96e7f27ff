"""Synthetic detail-training data shared by the detail tests: pairs whose texture is the shading model's image."""

from __future__ import annotations

import numpy as np
import torch

from facedetail.detail.networks import DetailNetConfig, PatchGANConfig, UNetConfig
from facedetail.detail.pairs import DetailPair, lighting_estimate, proxy_maps
from facedetail.detail.shading import fine_positions, normals_from_positions, sh_shading
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.texture import UVTexels
from facedetail.render.sh import directional_sh

RES = 128
TINY_NET = DetailNetConfig(patch_size=32, generator=UNetConfig(ngf=8, downsamplings=5), fc_hidden=(64, 32),
                           pca_components=8, refine=UNetConfig(ngf=8, downsamplings=3),
                           discriminator=PatchGANConfig(ndf=8, layers=2), max_displacement_mm=2.0)


def grooves(resolution: int, phase: float) -> np.ndarray:
    """(R, R) mm: horizontal sinusoidal wrinkles, 0.3 mm deep, 8 texels apart."""
    rows = np.arange(resolution)[:, None] + np.zeros((1, resolution))
    return (0.3 * np.sin(2 * np.pi * rows / 8.0 + phase)).astype(np.float32)


def synthetic_pair(model: MorphableModel, texels: UVTexels, pair_id: str, phase: float,
                   light: tuple[float, float, float] = (0.3, 0.4, 1.0)) -> DetailPair:
    """A pair whose texture is the shading model's image of the proxy displaced by :func:`grooves`."""
    vertices = model.mean.astype(np.float64)
    proxy = np.hstack([vertices, model.vertex_normals(vertices)]).astype(np.float32)
    pos_map, nrm_map = proxy_maps(texels, proxy)
    chart = np.linalg.norm(nrm_map, axis=2) > 0.5
    disp = np.where(chart, grooves(texels.resolution, phase), 0.0).astype(np.float32)
    pos = torch.from_numpy(pos_map).permute(2, 0, 1)[None]
    nrm = torch.from_numpy(nrm_map).permute(2, 0, 1)[None]
    d = torch.from_numpy(disp)[None, None].double()
    fine, valid = normals_from_positions(fine_positions(pos, nrm, d), torch.from_numpy(chart)[None, None], nrm)
    sh_true = torch.from_numpy(directional_sh(np.array(light), 0.7, 0.3))[None]
    shading = sh_shading(fine, sh_true)[0].permute(1, 2, 0).numpy()
    visible = valid[0, 0].numpy() & (nrm_map[..., 2] > 0.2)
    texture = np.where(visible[..., None], np.clip(0.7 * shading, 0, 1) * 255, 0).round().astype(np.uint8)
    sh = lighting_estimate(texture, visible, nrm_map)
    return DetailPair(pair_id, pair_id.split("/")[0], texture, visible, disp, chart.copy(), proxy, sh)


