"""The detail network's training: batches, the schedule's steps, held-out scoring, overfitting, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detail_fixtures import RES, TINY_NET, synthetic_pair

from facedetail.capture.patches import face_regions
from facedetail.detail.pairs import texel_mm
from facedetail.detail.train import (
    ChartGeometry,
    DetailTrainer,
    ScheduleConfig,
    TrainConfig,
    TrainData,
    make_batch,
    pair_albedo,
    region_patches,
    train_step,
)
from facedetail.features.train import deterministic
from facedetail.model.uvmap import rasterize_uv
from facedetail.proxy.texture import UVTexels


@pytest.fixture(autouse=True)
def one_deterministic_thread():
    with deterministic(1):
        yield


@pytest.fixture(scope="module")
def tiny_data(sfm_model) -> TrainData:
    model = sfm_model
    texels = UVTexels.build(model.uv, model.triangles, RES)
    train = [synthetic_pair(model, texels, f"s{i:03d}/neutral/photo-0", phase=0.7 * i) for i in range(3)]
    held = [synthetic_pair(model, texels, "s900/neutral/photo-0", phase=2.0)]
    boxes = face_regions(model, RES, overlap=16)
    rng = np.random.default_rng(0)
    bases = {}
    for region in boxes:
        q, _ = np.linalg.qr(rng.standard_normal((TINY_NET.patch_size ** 2, TINY_NET.pca_components)))
        bases[region] = q.T.astype(np.float32)
    return TrainData(train, held, [], boxes, bases, rasterize_uv(model.uv, model.triangles, RES),
                     model.triangles, 4.0 / texel_mm(model, RES))


def tiny_config(**schedule: object) -> TrainConfig:
    sched = {"epochs": 2, "warmup_epochs": 1, "patches_per_epoch": 16, "batch_size": 8, **schedule}
    return TrainConfig(network=TINY_NET, stride=16, eval_patches=16, schedule=ScheduleConfig(**sched))


def test_batches_carry_patches_of_the_pairs(tiny_data: TrainData) -> None:
    refs = region_patches(tiny_data.train, tiny_data.boxes["upper"], 32, 16, 0.5, True)
    assert len(refs) > 0
    geometry = ChartGeometry.of(tiny_data.raster, tiny_data.triangles)
    albedo = [pair_albedo(p, geometry, tiny_data.albedo_sigma_px) for p in tiny_data.train]
    batch = make_batch(tiny_data.train, albedo, refs.refs[:4], 32, geometry, torch.device("cpu"))
    assert batch.v.shape == (4, 1, 32, 32)
    i, r, c = refs.refs[0]
    np.testing.assert_allclose(batch.target[0, 0].numpy(), tiny_data.train[i].displacement[r:r + 32, c:c + 32])
    # The V input of each patch is mean-free (the release's normalisation).
    assert abs(float(batch.v[0].mean())) < 1e-5
    # Positions of the patch are the proxy's surface: distances between neighbours ~ one texel in mm.
    pos = batch.recon.proxy_positions_mm[0]
    inside = batch.recon.proxy_normals[0].norm(dim=0) > 0.5
    step = (pos[:, :, 1:] - pos[:, :, :-1]).norm(dim=0)[inside[:, 1:] & inside[:, :-1]]
    assert 0.2 < float(step.median()) < 5.0
    # The synthetic texture is 0.7 x shading: the smooth albedo recovers ~0.7 (up to the lighting fit's scale).
    alb = batch.recon.albedo[0][:, batch.recon.visible[0, 0]]
    assert 0.4 < float(alb.mean()) < 1.0 and float(alb.std()) < 0.1


def test_the_network_overfits_a_tiny_set(tiny_data: TrainData) -> None:
    config = tiny_config().model_copy(update={"lr": 1e-3})
    trainer = DetailTrainer(config, tiny_data, torch.device("cpu"))
    model = trainer.models["upper"]
    refs = trainer.supervised["upper"].refs[:8]
    batch = make_batch(tiny_data.train, trainer.albedo["train"], refs, TINY_NET.patch_size, trainer.geometry,
                       torch.device("cpu"))
    losses = [train_step(model, batch, "warmup", config.loss)["scans_l1"] for _ in range(80)]
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_every_phase_trains_and_scores(tiny_data: TrainData) -> None:
    trainer = DetailTrainer(tiny_config(), tiny_data, torch.device("cpu"))
    warm = trainer.run_epoch()
    full = trainer.run_epoch()
    assert "upper/loss_d" not in warm and "upper/loss_recon" not in warm
    assert full["upper/loss_d"] > 0 and full["upper/loss_recon"] > 0 and full["upper/loss_gan"] > 0
    for key in ("heldout_mae_mm", "heldout_zero_mae_mm", "heldout_mean_patch_mae_mm", "heldout_mean_map_mae_mm"):
        assert np.isfinite(full[key])
    # The zero baseline is the mean |d| of the held-out grooves (0.3 mm sine: 2/π · 0.3 on average).
    assert full["heldout_zero_mae_mm"] == pytest.approx(0.3 * 2 / np.pi, rel=0.2)


def test_the_reconstruction_loss_sees_the_true_displacement(tiny_data: TrainData) -> None:
    # The synthetic pairs' textures are the shading model's own images: through the whole batch path
    # (patch positions, normals, the smooth albedo, the estimated light) L_recon is clearly smaller at the truth
    # (measured 0.41 lower, 0.53 upper: 8-bit textures, and the estimated albedo and light absorb part of it).
    trainer = DetailTrainer(tiny_config(), tiny_data, torch.device("cpu"))
    signal = trainer.recon_signal()
    assert set(signal) == {"upper", "lower"} and max(signal.values()) < 0.65, signal


def test_a_resumed_run_ends_with_the_same_weights(tiny_data: TrainData) -> None:
    whole = DetailTrainer(tiny_config(), tiny_data, torch.device("cpu"))
    whole.run_epoch()
    whole.run_epoch()
    first = DetailTrainer(tiny_config(), tiny_data, torch.device("cpu"))
    first.run_epoch()
    state = first.state()
    resumed = DetailTrainer(tiny_config(), tiny_data, torch.device("cpu"))
    resumed.load_state(state)
    resumed.run_epoch()
    a, b = whole.generator_tensors(), resumed.generator_tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
