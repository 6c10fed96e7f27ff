"""The detail network: the release's parameter counts, shapes and ranges, seeded init, PCA basis, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from facedetail.detail.networks import (
    DEFAULT,
    PAPER,
    DetailGenerator,
    DetailNetConfig,
    PatchDiscriminator,
    PatchGANConfig,
    UNet,
    UNetConfig,
    count_flops,
    flops_per_patch,
    normalize_patch,
    parameter_counts,
)

# Small enough to be counted by hand: 4x4 patches, two-level U-Nets of width 2, one hidden FC layer of 3.
TINY = DetailNetConfig(patch_size=4, generator=UNetConfig(ngf=2, downsamplings=2), fc_hidden=(3,), pca_components=2,
                       refine=UNetConfig(ngf=2, downsamplings=2), discriminator=PatchGANConfig(ndf=1, layers=1))
# Small but with BatchNorm in the middle of both U-Nets, for forward/backward.
SMALL = DetailNetConfig(patch_size=16, generator=UNetConfig(ngf=4, downsamplings=4), fc_hidden=(8,), pca_components=4,
                        refine=UNetConfig(ngf=4, downsamplings=3), discriminator=PatchGANConfig(ndf=4, layers=2),
                        max_displacement_mm=1.5)


def _inputs(n: int, p: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return normalize_patch(torch.rand(n, 1, p, p, generator=gen))


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the release's sizes ---------------------------------------------------------------------------

def test_paper_profile_has_the_release_parameter_counts() -> None:
    counts = parameter_counts(PAPER)
    assert counts == {"unet": 54_413_313, "fc": 136_875_584, "refine": 29_242_369, "generator": 220_531_266,
                      "discriminator": 2_765_505}
    assert 2 * counts["generator"] == 441_062_532  # the "both regions 441 M" (≈ 1.76 GB fp32)


def test_paper_modules_build_on_meta_under_a_device_context() -> None:
    with torch.device("meta"):
        g = DetailGenerator(PAPER)
        d = PatchDiscriminator(PAPER.discriminator)
    assert all(t.is_meta for t in [*g.parameters(), *g.buffers(), *d.parameters()])
    assert (_params(g.unet), _params(g.fc), _params(g.refine), _params(d)) == (
        54_413_313, 136_875_584, 29_242_369, 2_765_505)
    # The release's FC: 65536 → 2048 → 1024 → 512 → 64, LeakyReLU(0.2) between the linears.
    linears = [m for m in g.fc if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(65536, 2048), (2048, 1024), (1024, 512), (512, 64)]
    assert [m.negative_slope for m in g.fc if isinstance(m, torch.nn.LeakyReLU)] == [0.2, 0.2, 0.2]
    out = g(torch.zeros(2, 1, 256, 256, device="meta"))
    assert out.displacement_mm.shape == (2, 1, 256, 256) and out.pca_weights.shape == (2, 64)
    assert d(torch.zeros(2, 2, 256, 256, device="meta")).shape == (2, 1, 35, 35)


def test_a_tiny_unet_has_its_hand_counted_parameters() -> None:
    # conv 1→2 (32+2) + conv 2→4 (128+4) + convT 4→2 (128+2) + BN(2) (4) + convT 4→1 (64+1) = 365
    assert _params(UNet(1, 1, TINY.generator)) == 365


# --- forward, backward, PCA basis -------------------------------------------------------------------

def test_default_profile_forward_gives_bounded_millimetres() -> None:
    g = DetailGenerator(DEFAULT, seed=1)
    g.set_pca_basis(torch.randn(64, 64 * 64, generator=torch.Generator().manual_seed(2)) * 0.05)
    out = g(_inputs(2, 64))
    assert out.displacement_mm.shape == (2, 1, 64, 64)
    assert out.pca_weights.shape == (2, 64) and out.pca_patch_mm.shape == (2, 1, 64, 64)
    d = out.displacement_mm.detach()
    assert bool(torch.isfinite(d).all())
    assert float(d.abs().max()) <= DEFAULT.max_displacement_mm == 2.0
    assert float(d.std()) > 1e-3  # not a constant map


def test_gradients_reach_the_first_convs_and_the_fc_layers() -> None:
    g = DetailGenerator(SMALL, seed=0)
    g.set_pca_basis(torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1)))
    out = g(_inputs(3, 16))
    (out.displacement_mm.square().mean() + out.pca_weights.square().mean()).backward()
    for conv in (g.unet.down[0][0], g.refine.down[0][0], g.fc[0]):
        assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0


def test_the_pca_basis_is_used_and_saved() -> None:
    g = DetailGenerator(SMALL, seed=0)  # training mode: batch statistics, as when the basis matters
    x = _inputs(2, 16)
    with torch.no_grad():
        zero = g(x)
        assert float(zero.pca_patch_mm.abs().max()) == 0.0
        basis = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
        g.set_pca_basis(basis)
        used = g(x)
    expected = (used.pca_weights @ torch.from_numpy(basis)).view(2, 1, 16, 16)
    torch.testing.assert_close(used.pca_patch_mm, expected)
    torch.testing.assert_close(used.pca_weights, zero.pca_weights)  # the basis acts after the weights ...
    change = float((used.displacement_mm - zero.displacement_mm).abs().max())
    assert change > 0.02 * float(zero.displacement_mm.abs().max()) > 0  # ... and changes the output
    assert torch.equal(g.state_dict()["pca_basis"], torch.from_numpy(basis))


def test_bad_basis_and_bad_input_shapes_are_one_line_errors() -> None:
    g = DetailGenerator(SMALL)
    with pytest.raises(ValueError, match=r"needs \(4, 256\)") as info:
        g.set_pca_basis(np.zeros((4, 255)))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="non-finite"):
        g.set_pca_basis(np.full((4, 256), np.nan))
    with pytest.raises(ValueError, match=r"needs \(B, 1, 16, 16\)"):
        g(torch.zeros(1, 1, 32, 32))


def test_discriminator_scores_patches_of_both_sizes() -> None:
    d = PatchDiscriminator(DEFAULT.discriminator, seed=0)
    x = torch.randn(2, 2, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert d(x[:, :, :64, :64]).shape == (2, 1, 11, 11)
        scores = d(x)
    assert scores.shape == (2, 1, 35, 35) and bool(torch.isfinite(scores).all())
    convs = [m for m in d.model if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.stride[0]) for m in convs] == [
        (2, 16, 2), (16, 32, 2), (32, 64, 2), (64, 128, 1), (128, 1, 1)]


# --- seeded init -------------------------------------------------------------------------------------

def test_seeded_init_is_bitwise_reproducible_and_leaves_the_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b, c = (DetailGenerator(DEFAULT, seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["unet.down.0.0.weight"], c["unet.down.0.0.weight"])
    d1, d2 = (PatchDiscriminator(seed=5).state_dict() for _ in range(2))
    assert all(torch.equal(d1[k], d2[k]) for k in d1)


def test_init_follows_pix2pix() -> None:
    g = DetailGenerator(DEFAULT, seed=0)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    norms = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    w = torch.cat([m.weight.detach().flatten() for m in convs])
    assert abs(float(w.mean())) < 1e-3 and abs(float(w.std()) - 0.02) < 0.001
    bn = torch.cat([m.weight.detach() for m in norms])
    assert abs(float(bn.mean()) - 1.0) < 0.005 and abs(float(bn.std()) - 0.02) < 0.005
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in [*convs, *norms])
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in g.fc if isinstance(m, torch.nn.Linear))
    assert all(float(m.running_mean.abs().max()) == 0.0 and bool((m.running_var == 1).all()) for m in norms)
    first = g.fc[0].weight.detach()  # U(±1/√4096) = U(±1/64)
    assert float(first.abs().max()) <= 1 / 64 and abs(float(first.std()) - 1 / 64 / 3**0.5) < 1e-4
    assert float(g.pca_basis.abs().max()) == 0.0


# --- config, input, FLOPs ------------------------------------------------------------------------------

def test_a_patch_the_unet_cannot_halve_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError) as info:  # pydantic's ValidationError is a ValueError
        DetailNetConfig(patch_size=48)
    assert isinstance(info.value, ValidationError)
    msg = info.value.errors()[0]["msg"]
    assert "\n" not in msg and "patch_size 48 is not divisible by 2**generator.downsamplings = 64" in msg
    with pytest.raises(ValidationError, match=r"refine\.downsamplings = 32"):
        DetailNetConfig(patch_size=16, generator=UNetConfig(downsamplings=4), refine=UNetConfig(downsamplings=5))
    with pytest.raises(ValidationError, match="extra"):
        DetailNetConfig(patch=64)  # type: ignore[call-arg]


def test_normalize_patch_is_zero_mean_times_two_per_patch() -> None:
    v = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    out = normalize_patch(v)
    assert torch.equal(out, torch.tensor([[[[-3.0, -1.0], [1.0, 3.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]))
    np.testing.assert_array_equal(normalize_patch(v.numpy()), out.numpy())


def test_flops_of_a_tiny_config_by_hand() -> None:
    # 2 · multiply–adds. Conv: output elements · in · 16; transposed conv: input elements · out · 16.
    # U-Net 1→1: conv 1→2 (8 out · 16) 128 + conv 2→4 (4 · 32) 128 + convT 4→2 (4 in · 32) 128
    #            + convT 4→1 (16 in · 16) 256 = 640 MACs. Refinement 2→1: 256 + 128 + 128 + 256 = 768.
    # FC 16→3→2: 48 + 6 = 54. PCA 2 · 16 = 32. Discriminator (padding 2): 2→1 s2 on 4² → 3² (9 · 32) 288,
    #            1→2 s1 → 4² (32 · 16) 512, 2→1 s1 → 5² (25 · 32) 800 = 1600.
    assert flops_per_patch(TINY) == {"unet": 1280, "fc": 108, "pca": 64, "refine": 1536, "generator": 2988,
                                     "discriminator": 3200}
    # Per patch: a batch of 3 counts three times as much.
    g = DetailGenerator(TINY, device="meta")
    assert count_flops(g, torch.zeros(3, 1, 4, 4, device="meta")) == {"unet": 3840, "fc": 324, "pca": 192,
                                                                      "refine": 4608}


def test_flops_of_the_profiles() -> None:
    paper, default = flops_per_patch(PAPER), flops_per_patch(DEFAULT)
    assert paper["fc"] == 2 * (136_875_584 - 3_648)  # every FC weight (parameters less the 3,648 biases) once
    assert paper["generator"] == 23_854_120_960 and paper["discriminator"] == 7_186_305_024
    assert default["generator"] == 87_375_872 and default["discriminator"] == 37_868_544
