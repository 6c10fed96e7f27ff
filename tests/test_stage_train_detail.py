"""Stage ``train_detail`` on a hand-made repository: outputs, quarantine, byte-identical reruns, kill and resume."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from conftest import ROOT, tool_env
from detail_fixtures import RES, TINY_NET, synthetic_pair

from facedetail.detail.pairs import TEXTURE, encode_pair
from facedetail.detail.pca import save_bases
from facedetail.detail.split import is_held_out
from facedetail.io.shards import write_tar_shard
from facedetail.proxy.texture import UVTexels
from stages import train_detail
from stages._common import main

SUBJECTS = ("s000", "s001", "s002")
HOLDOUT = {"holdout_fraction": 0.34, "split_seed": 7}


def _params(epochs: int) -> dict:
    return {
        "uv_chart": {"resolution": RES},
        "train_detail": {
            "wild": "", "region_overlap": 16, **HOLDOUT, "preview_patches": 2, "threads": 1,
            "train": {"network": TINY_NET.model_dump(mode="json"), "stride": 16, "eval_patches": 16,
                      "schedule": {"epochs": epochs, "warmup_epochs": 1, "patches_per_epoch": 16, "batch_size": 8}},
        },
    }


def make_root(dest: Path, model_npz: Path, sfm_model, epochs: int = 2, bad: bool = True) -> Path:
    """data/face_model, data/detail_pairs (one shard: 3 subjects + broken samples), data/detail_pca, params.yaml."""
    (dest / "data" / "face_model").mkdir(parents=True)
    shutil.copy(model_npz, dest / "data" / "face_model" / "model.npz")
    texels = UVTexels.build(sfm_model.uv, sfm_model.triangles, RES)
    samples, ids = [], []
    for i, subject in enumerate(SUBJECTS):
        pair = synthetic_pair(sfm_model, texels, f"{subject}/neutral/photo-0", phase=0.7 * i)
        samples.append(encode_pair(pair, 2.0, 1, photo="photo-0.png")[0])
        ids.append(pair.id)
    if bad:
        broken = dict(samples[1], __key__="s001__happiness__photo-0")
        broken[TEXTURE] = b"\x89PNG\r\n\x1a\n cut short"
        small = synthetic_pair(sfm_model, UVTexels.build(sfm_model.uv, sfm_model.triangles, RES // 2),
                               "s002/happiness/photo-0", phase=0.1)
        samples += [broken, encode_pair(small, 2.0, 1)[0]]
        ids += ["s001/happiness/photo-0", "s002/happiness/photo-0"]
    pairs_dir = dest / "data" / "detail_pairs"
    (pairs_dir / "shards").mkdir(parents=True)
    order = np.argsort(ids)
    write_tar_shard(pairs_dir / "shards" / "pairs-00000.tar", [samples[i] for i in order])
    pq.write_table(pa.table({"id": [ids[i] for i in order], "shard": ["shards/pairs-00000.tar"] * len(ids),
                             "key": [samples[i]["__key__"] for i in order]}), pairs_dir / "manifest.parquet")
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((TINY_NET.patch_size ** 2, TINY_NET.pca_components)))
    (dest / "data" / "detail_pca").mkdir(parents=True)
    save_bases(dest / "data" / "detail_pca", {"upper": q.T.astype(np.float32), "lower": q.T.astype(np.float32)},
               {"units": "mm"})
    (dest / "params.yaml").write_text(yaml.safe_dump(_params(epochs), sort_keys=False))
    return dest


def _run(root: Path) -> train_detail.StageResult:
    stage = train_detail.STAGE
    return stage.run(stage.load_params(root), root)


def test_the_split_holds_out_s000_only() -> None:
    assert [s for s in SUBJECTS if is_held_out(s, **{"fraction": 0.34, "seed": 7})] == ["s000"]


def test_training_writes_the_model_and_quarantines_bad_pairs(tmp_path: Path, model_npz: Path, sfm_model) -> None:
    root = make_root(tmp_path / "a", model_npz, sfm_model)
    result = _run(root)
    out = root / "data" / "train_detail"
    for name in ("detail_net.safetensors", "detail_net.json", "preview.png", "quarantine.parquet", "manifest.parquet"):
        assert (out / name).is_file(), name
    metrics = json.loads((root / "metrics" / "train_detail.json").read_text())
    assert metrics["pairs"] == {"train": 2, "heldout": 1, "quarantined": 2, "train_subjects": 2,
                                "heldout_subjects": 1}
    quarantine = {r["id"]: r["reason"] for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert quarantine["s001/happiness/photo-0"].startswith("unreadable texture")
    assert quarantine["s002/happiness/photo-0"].startswith("mismatched sizes")
    held = metrics["heldout"]
    assert held["zero_mae_mm"] > 0 and np.isfinite(held["mae_mm"]) and "beats_baselines" in held
    # The per-epoch curves went to dvclive, one value per epoch.
    live = root / "dvclive" / "train_detail" / "plots" / "metrics" / "heldout_mae_mm.tsv"
    assert len(live.read_text().strip().splitlines()) == 1 + 2
    assert result.summary["resumed_from_epoch"] == 0
    from facedetail.detail.pca import read_safetensors

    tensors, meta = read_safetensors(out / "detail_net.safetensors")
    assert json.loads(meta["facedetail"])["units"] == "mm"
    assert any(k.startswith("upper.") for k in tensors) and any(k.startswith("lower.") for k in tensors)

    again = make_root(tmp_path / "b", model_npz, sfm_model)
    _run(again)
    for name in ("detail_net.safetensors", "preview.png", "quarantine.parquet"):
        assert (again / "data" / "train_detail" / name).read_bytes() == (out / name).read_bytes(), name


def test_no_usable_pair_is_one_clear_error(tmp_path: Path, model_npz: Path, sfm_model, capsys) -> None:
    root = make_root(tmp_path / "r", model_npz, sfm_model)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_detail"]["holdout_fraction"] = 0.99  # every subject held out: nothing to train on
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(train_detail.STAGE, ["--root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable training pair" in err[0]


def test_a_killed_run_resumes_to_the_same_weights(tmp_path: Path, model_npz: Path, sfm_model) -> None:
    whole = make_root(tmp_path / "whole", model_npz, sfm_model, epochs=4, bad=False)
    _run(whole)
    killed = make_root(tmp_path / "killed", model_npz, sfm_model, epochs=4, bad=False)
    checkpoint = killed / "data" / ".partial" / "train_detail" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train_detail", "--root", str(killed)], cwd=ROOT,
                            env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (killed / "data" / "train_detail").exists()
    result = _run(killed)
    assert result.summary["resumed_from_epoch"] >= 1
    name = Path("data") / "train_detail" / "detail_net.safetensors"
    assert (killed / name).read_bytes() == (whole / name).read_bytes()
