"""bench/detail.py: runs with tiny arguments, its JSON has every field with sane values, its arithmetic holds."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facedetail.detail.networks import DEFAULT, PAPER, DetailNetConfig, PatchGANConfig, UNetConfig, flops_per_patch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "detail.py"
# Small, with BatchNorm in the middle of both U-Nets (as in test_detail_networks.py).
SMALL = DetailNetConfig(patch_size=16, generator=UNetConfig(ngf=4, downsamplings=4), fc_hidden=(8,), pca_components=4,
                        refine=UNetConfig(ngf=4, downsamplings=3), discriminator=PatchGANConfig(ndf=4, layers=2))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_detail", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_bench_runs_with_tiny_arguments_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "detail.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--profiles", "default", "--batch", "2", "--infer-batch", "2", "--steps", "1",
         "--warmup", "1", "--repeats", "2", "--peak-seconds", "0.02", "--matmul-size", "256", "--conv-batch", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("dense float32 throughput", "<- peak used below", "profile default, training, batch 2",
                   "profile default, inference, batch 2", "ratio (ours / baseline)", "baseline: the trainer's way",
                   "projection: needs the paper profile"):
        assert needle in text, (needle, text)

    result = json.loads(out.read_text())
    assert set(result["peaks"]) == {"matmul", "conv3x3", "conv4x4s2"}
    assert all(p["flops"] > 1e8 and p["flops"] == max(p["all_flops"]) and len(p["all_flops"]) == 2
               for p in result["peaks"].values())
    assert result["peak_flops"] == max(p["flops"] for p in result["peaks"].values())
    assert result["peaks"][result["peak_kernel"]]["flops"] == result["peak_flops"]
    assert result["threads"]["ours"] >= 1 and result["cores"] >= 1

    entry = result["profiles"]["default"]
    flops = flops_per_patch(DEFAULT)
    assert entry["flops_per_patch"] == flops
    assert entry["train_flops_per_patch"] == 3 * flops["generator"] + 8 * flops["discriminator"]
    assert entry["infer_flops_per_patch"] == flops["generator"]
    assert entry["parameters"]["generator"] == 4_486_850
    train, infer = entry["training"], entry["inference"]
    assert train[0]["setting"].startswith("baseline") and train[1]["setting"] == "ours"
    assert (train[0]["adam"], train[0]["freeze_d"], train[0]["thp"], train[0]["deterministic"]) == (
        "loop", False, False, True)  # the trainer's way
    assert (train[1]["adam"], train[1]["freeze_d"], train[1]["thp"], train[1]["deterministic"],
            train[1]["fill_new"]) == ("fused", True, True, True, False)
    assert not train[0]["channels_last"] and not infer[0]["channels_last"] and infer[1]["channels_last"]
    assert len(train) == len(infer) == 2  # no --variants
    assert infer[0]["setting"].startswith("baseline") and infer[1]["setting"] == "ours"
    assert all(r["adam"] == "" and not r["freeze_d"] for r in infer)
    for r in train + infer:
        assert r["finite"] and r["batch"] == 2
        assert r["patches_per_s"] > 0 and math.isclose(r["patches_per_s"], 2 / r["seconds_per_call"])
        assert r["seconds_per_call"] == min(r["all_seconds_per_call"]) and len(r["all_seconds_per_call"]) == 2
        assert math.isclose(r["flops_per_s"], r["patches_per_s"] * (
            entry["train_flops_per_patch"] if r in train else entry["infer_flops_per_patch"]))
        assert math.isclose(r["fraction_of_peak"], r["flops_per_s"] / result["peak_flops"])
        assert 0 < r["fraction_of_peak"] < 10  # tiny peaks on a shared machine: only the order of magnitude
        assert r["cores"] > 0
    assert math.isclose(entry["training_ratio"], train[1]["patches_per_s"] / train[0]["patches_per_s"])
    assert math.isclose(entry["inference_ratio"], infer[1]["patches_per_s"] / infer[0]["patches_per_s"])
    assert "projection" not in result


def test_bad_arguments_are_one_line_errors(bench) -> None:
    with pytest.raises(SystemExit, match=r"--batch '1,2,3': give one value or one per profile \(2\)"):
        bench.main(["--profiles", "default,paper", "--batch", "1,2,3"])
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--profiles", "default,huge"])


def test_per_profile_values(bench) -> None:
    assert bench.per_profile(None, ["default", "paper"], "batch") == {"default": 16, "paper": 1}
    assert bench.per_profile("8", ["default", "paper"], "batch") == {"default": 8, "paper": 8}
    assert bench.per_profile("4,2", ["paper", "default"], "steps") == {"paper": 4, "default": 2}


def test_the_step_flop_accounting(bench) -> None:
    flops = flops_per_patch(PAPER)
    assert bench.step_flops(flops) == 3 * 23_854_120_960 + 8 * 7_186_305_024  # 129.05 GFLOP per patch


def test_the_projection_arithmetic(bench) -> None:
    assert bench.paper_schedule_patches() == 706 * (1547 + 1390) * 250 == 518_380_500
    proj = bench.projection(0.5, 10**11, 0.25)
    assert proj["patches"] == 518_380_500 and proj["flops"] == 518_380_500 * 10**11
    assert math.isclose(proj["here_days"], 518_380_500 / 0.5 / 86400)
    a100 = proj["gpus"]["A100 (TF32)"]
    assert math.isclose(a100["days_at_fraction_here"], proj["flops"] / (156e12 * 0.25) / 86400)
    assert math.isclose(a100["days_at_assumed_fraction"], proj["flops"] / (156e12 * 0.40) / 86400)


def test_settings_are_distinct_and_the_baseline_is_torchs_default(bench) -> None:
    baseline, ours, alone = bench.settings(bench.TORCH_THREADS, use_compile=False, variants=True)
    assert (baseline.threads, baseline.channels_last, baseline.adam, baseline.freeze_d, baseline.deterministic,
            baseline.mkldnn, baseline.compile, baseline.thp) == (
                torch.get_num_threads(), False, "loop", False, True, True, False, False)
    keys = [bench._key(s) for s in (baseline, ours, *alone)]
    assert len(keys) == len(set(keys))
    names = {s.name for s in alone}
    assert {"+ channels_last", "+ Adam foreach", "+ Adam fused", "+ D frozen in G step", "+ huge pages",
            "- deterministic", "- oneDNN (mkldnn off)"} <= names
    assert bench.settings(3, use_compile=False, variants=False)[2] == []
    assert any(s.compile for s in bench.settings(3, use_compile=True, variants=True)[2])


def test_every_setting_runs_the_same_training_step(bench) -> None:
    # Two steps' generator losses are the same whatever the memory format, Adam implementation and freezing.
    baseline, ours, alone = bench.settings(bench.TORCH_THREADS, use_compile=False, variants=True)
    losses = []
    for s in (baseline, ours, *[a for a in alone if a.name in ("+ channels_last", "+ Adam foreach")]):
        with bench.applied(s):
            step = bench.training_step(SMALL, s, 2)
            losses.append((step(), step()))  # the second step follows both networks' first updates
    for first, second in losses:
        assert math.isfinite(first) and math.isfinite(second)
        assert math.isclose(first, losses[0][0], rel_tol=1e-5) and math.isclose(second, losses[0][1], rel_tol=1e-4)
    assert losses[0][0] != losses[0][1]


def test_ours_is_still_reproducible_bit_for_bit(bench) -> None:
    # Without torch's NaN fill of new buffers, deterministic algorithms still give the same bits twice.
    _, ours, _ = bench.settings(bench.TORCH_THREADS, use_compile=False, variants=False)
    assert ours.deterministic and not ours.fill_new
    runs = []
    for _ in range(2):
        with bench.applied(ours):
            step = bench.training_step(SMALL, ours, 2)
            runs.append([step() for _ in range(3)])
    assert runs[0] == runs[1]
    with bench.applied(ours):
        y = bench.inference_call(SMALL, ours, 3)()
    assert y.shape == (3, 1, 16, 16) and bool(torch.isfinite(y).all())
