"""Stage ``train_detail``: the Deep Facial Detail Net, both face regions, supervised + unsupervised.

Reads the supervised pairs (``detail_pairs``), the displacement PCA (``detail_pca``) and, for the
unsupervised re-rendering loss, the wild photos' UV textures (``wild_proxy``); trains one generator and
one PatchGAN per region on the paper's schedule (:mod:`facedetail.detail.train`). Subjects are held out
by a hash of their id (``holdout_fraction``, ``split_seed``: the same split as ``detail_pca``), never seen in
training, and score every epoch against three baselines. Pairs that cannot be used (mismatched sizes,
NaN displacement, empty masks, unreadable textures) are quarantined with the reason and training goes on.

Resumable: after every epoch the whole training state is written atomically to
``data/.partial/train_detail/checkpoint.pt`` (``torch.save`` of tensors and plain values, loaded with
``weights_only=True``); a killed run continues from the last epoch and ends with the same bytes.

Outputs in ``data/train_detail/``: ``detail_net.safetensors`` (both generators, their PCA bases included;
the config, regions, chart and units in its metadata), ``detail_net.json`` (the same metadata, readable),
``preview.png`` (held-out patches: texture | true | predicted | shaded), ``quarantine.parquet``,
``manifest.parquet``, ``lineage.json``; per-epoch curves through dvclive in ``dvclive/train_detail/``
(``dvc plots show``); facts in ``metrics/train_detail.json``.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field
from tqdm import tqdm

from facedetail.capture.patches import face_regions
from facedetail.config import content_key, input_path, set_level
from facedetail.detail.networks import parameter_counts
from facedetail.detail.pairs import DetailPair, PairError, decode_pair, texel_mm, wild_pair
from facedetail.detail.pca import load_bases, safetensors_bytes
from facedetail.detail.split import is_held_out, subject_of
from facedetail.detail.train import (
    DetailTrainer,
    TrainConfig,
    TrainData,
    preview_tiles,
    resolve_device,
)
from facedetail.errors import FacedetailError, SourceFileError
from facedetail.features.train import deterministic
from facedetail.io.atomic import atomic_write_bytes
from facedetail.io.hashing import canonical_json
from facedetail.io.manifest import file_row
from facedetail.io.shards import iter_tar_shard
from facedetail.io.tables import QUARANTINE_NAME, reason_kind, write_quarantine
from facedetail.io.transaction import StageOutput
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVChartConfig, rasterize_uv
from facedetail.proxy.texture import TEXTURE_EXT, UVTexels
from stages._common import PARTIAL_DIR, Input, Stage, StageParams, main, model_input

NAME = "train_detail"
MODEL_FILE, MODEL_META, PREVIEW = "detail_net.safetensors", "detail_net.json", "preview.png"
CHECKPOINT = "checkpoint.pt"


class TrainDetailParams(StageParams):
    """Parameters of the ``train_detail`` stage (``train_detail:`` in params.yaml)."""

    pairs: str = input_path("data/detail_pairs")
    """The supervised pairs."""
    pca: str = input_path("data/detail_pca")
    """The per-region displacement PCA bases."""
    wild: str = input_path("data/wild_proxy")
    """UV textures of wild photos for the unsupervised loss; '' = supervised pairs only."""
    model: str = input_path("data/face_model/model.npz")
    """The morphable model (UV chart, proxies of the wild photos)."""
    uv_chart: UVChartConfig = UVChartConfig()
    """The shared UV chart (top-level ``uv_chart:`` section)."""
    train: TrainConfig = TrainConfig()
    """Network profile, patches, schedule, losses, optimiser, seed."""
    region_overlap: int = Field(32, ge=0)
    """Texels each face region extends past the nose-tip line (as ``detail_pca``'s ``overlap``)."""
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """Fraction of capture subjects held out (the same split as ``detail_pca``)."""
    wild_holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """Fraction of wild photos held out of training (for the reconstruction's evaluation)."""
    split_seed: int = 7
    """Seed of both hold-out draws."""
    threads: int = Field(2, ge=1)
    """CPU threads of torch: part of what makes the bytes (a fixed count is needed for a byte-identical rerun).
    NumPy's and every other BLAS run on one thread (:func:`facedetail.features.train.deterministic`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when torch sees a GPU, else CPU (the weights then differ in their last bits)."""
    preview_every: int = set_level(2, ge=1)
    """Epochs between previews (dvclive images); the last epoch's is ``preview.png``."""
    preview_patches: int = set_level(6, ge=1)
    """Held-out patches on each preview."""


def inputs(params: TrainDetailParams) -> list[Input]:
    """Pairs, PCA, model (and the wild textures unless disabled)."""
    listed = [Input(params.pairs, "detail_pairs", kind="folder", what="training pairs"),
              Input(params.pca, "detail_pca", kind="folder", what="displacement PCA"), model_input(params.model)]
    if params.wild:
        listed.append(Input(params.wild, "wild_proxy", kind="folder", what="wild UV textures"))
    return listed


class NoPairsError(FacedetailError):
    """Not one usable training pair."""


def _samples(folder: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    """The shard samples of manifest ``rows`` by id, reading each shard once."""
    wanted: dict[str, dict[str, str]] = {}
    for r in rows:
        wanted.setdefault(r["shard"], {})[r["key"].split(".", 1)[0]] = r["id"]
    out: dict[str, dict[str, bytes]] = {}
    for shard, keys in sorted(wanted.items()):
        for sample in iter_tar_shard(folder / shard):
            if sample["__key__"] in keys:
                out[keys[sample["__key__"]]] = sample
    return out


def load_pairs(folder: Path, resolution: int, model: MorphableModel) -> tuple[list[DetailPair], list[dict[str, Any]]]:
    """Every pair of a ``detail_pairs`` output, checked; (usable pairs, quarantine rows)."""
    rows = pq.read_table(folder / "manifest.parquet", columns=["id", "shard", "key"]).to_pylist()
    samples = _samples(folder, rows)
    good, bad = [], []
    for r in sorted(rows, key=lambda r: r["id"]):
        try:
            if r["id"] not in samples:
                raise PairError(f"missing sample: {r['key']} not in {r['shard']}")
            good.append(decode_pair(samples[r["id"]], resolution, model.n_vertices))
        except PairError as err:
            bad.append({"id": r["id"], "source": "pairs", "reason": str(err)})
    return good, bad


def load_wild(folder: Path, model: MorphableModel, texels: UVTexels, fraction: float,
              seed: int) -> tuple[list[DetailPair], list[dict[str, Any]], int]:
    """The training wild textures of a ``wild_proxy`` output; (pairs, quarantine rows, held out)."""
    rows = pq.read_table(folder / "manifest.parquet", columns=["id", "shard", "key"]).to_pylist()
    held = {r["id"] for r in rows if is_held_out(r["id"], fraction, seed)}
    rows = [r for r in rows if r["id"] not in held]
    samples = _samples(folder, rows)
    good, bad = [], []
    for r in sorted(rows, key=lambda r: r["id"]):
        try:
            good.append(wild_pair(samples[r["id"]], TEXTURE_EXT, model, texels))
        except PairError as err:
            bad.append({"id": r["id"], "source": "wild", "reason": str(err)})
    return good, bad, len(held)


def build(params: TrainDetailParams, root: Path, out: StageOutput, name: str = NAME) -> dict[str, Any]:
    """Train both regions (resuming a killed run), then write the generators, preview and metrics.

    ``name``: the stage this run is (its checkpoint folder and dvclive folder), e.g. the η = 0 ablation's.
    """
    with deterministic(params.threads):
        return _build(params, root, out, name)


def _build(params: TrainDetailParams, root: Path, out: StageOutput, name: str) -> dict[str, Any]:
    started = time.perf_counter()
    cfg, res = params.train, params.uv_chart.resolution
    device = resolve_device(params.device)
    model_path = root / params.model
    model = MorphableModel.load(model_path)
    texels = UVTexels.build(model.uv, model.triangles, res)
    albedo_sigma_px = cfg.albedo_sigma_mm / texel_mm(model, res)

    pairs, bad = load_pairs(root / params.pairs, res, model)
    train = [p for p in pairs if not is_held_out(subject_of(p.id), params.holdout_fraction, params.split_seed)]
    heldout = [p for p in pairs if is_held_out(subject_of(p.id), params.holdout_fraction, params.split_seed)]
    if not train:
        counts = Counter(reason_kind(r["reason"]) for r in bad)
        raise NoPairsError(f"no usable training pair ({len(pairs)} usable, {len(heldout)} of them held out; "
                           f"quarantined: {dict(sorted(counts.items())) or 'none'}) — check detail_pairs' output")
    wild: list[DetailPair] = []
    wild_held = 0
    if params.wild:
        wild, wild_bad, wild_held = load_wild(root / params.wild, model, texels, params.wild_holdout_fraction,
                                              params.split_seed)
        bad += wild_bad
    net = cfg.net()
    bases, pca_meta = load_bases(root / params.pca)
    for region, basis in bases.items():
        if basis.shape != (net.pca_components, net.patch_size ** 2):
            raise SourceFileError(root / params.pca, f"the {region} basis is {basis.shape[0]} x {basis.shape[1]}, the "
                                  f"network needs {net.pca_components} x {net.patch_size ** 2}",
                                  "Set detail_pca.patch_size/components to the network's patch and PCA size")
    boxes = face_regions(model, res, params.region_overlap)
    data = TrainData(train, heldout, wild, boxes, bases, rasterize_uv(model.uv, model.triangles, res),
                     model.triangles, albedo_sigma_px)
    key = content_key(params, {"pairs": out.input_hash(root / params.pairs), "pca": out.input_hash(root / params.pca),
                               "model": out.input_hash(model_path),
                               "wild": out.input_hash(root / params.wild) if params.wild else None})
    trainer = DetailTrainer(cfg, data, device)
    work = root / PARTIAL_DIR / name
    resumed_from, history = _resume(trainer, work / CHECKPOINT, key)
    history = _train(trainer, params, root, work, key, history, name)

    tensors = trainer.generator_tensors()
    meta = {"format": "facedetail-detail-net/1", "units": "mm", "profile": cfg.profile,
            "network": net.model_dump(mode="json"), "regions": {r: {"rows": [int(b.row0), int(b.row1)],
                            "cols": [int(b.col0), int(b.col1)]} for r, b in boxes.items()},
            "chart_resolution": res, "stride": cfg.stride, "input": "(V - patch mean) * 2, V = max(R, G, B) / 255",
            "pca": pca_meta, "params_hash": key}
    atomic_write_bytes(out.dir / MODEL_FILE, safetensors_bytes(
        {k: v.numpy() for k, v in sorted(tensors.items())}, {"facedetail": canonical_json(meta)}))
    (out.dir / MODEL_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if trainer.eval_sets.get("upper") is not None:
        out.write_png(PREVIEW, _preview(trainer, params))
    write_quarantine(out.dir / QUARANTINE_NAME, bad)
    rows = [file_row(out.dir, name, item_id=name, params_hash=key, kind=Path(name).stem)
            for name in (MODEL_FILE, MODEL_META) + ((PREVIEW,) if (out.dir / PREVIEW).exists() else ())]
    out.write_manifest(rows)
    final = history[-1]
    counts = parameter_counts(net)
    out.metrics = {
        "epochs": trainer.epoch, "profile": cfg.profile, "chart_resolution": res, "patch_size": net.patch_size,
        "pairs": {"train": len(train), "heldout": len(heldout), "quarantined": len(bad),
                  "train_subjects": len({p.subject for p in train}),
                  "heldout_subjects": len({p.subject for p in heldout})},
        "wild": {"train": len(wild), "heldout": wild_held},
        "quarantine_reasons": dict(sorted(Counter(reason_kind(r["reason"]) for r in bad).items())),
        "patches_per_epoch": cfg.schedule.patches_per_epoch,
        "parameters": {"generator": counts["generator"], "discriminator": counts["discriminator"]},
        "final": {k: round(v, 6) for k, v in sorted(final.items())},
        "heldout": _heldout_summary(final),
        "recon_signal": {r: round(v, 4) for r, v in trainer.recon_signal().items()},
        "params_hash": key,
    }
    return {"epochs": trainer.epoch, "resumed_from_epoch": resumed_from, "train_pairs": len(train),
            "heldout_pairs": len(heldout), "wild": len(wild), "quarantined": len(bad),
            "heldout_mae_mm": out.metrics["heldout"].get("mae_mm"),
            "beats_baselines": out.metrics["heldout"].get("beats_baselines"),
            "seconds": round(time.perf_counter() - started, 1), "device": device.type}


def _heldout_summary(final: dict[str, float]) -> dict[str, Any]:
    names = ("mae_mm", "zero_mae_mm", "mean_patch_mae_mm", "mean_map_mae_mm")
    if "heldout_mae_mm" not in final:
        return {}
    out: dict[str, Any] = {n: round(final[f"heldout_{n}"], 6) for n in names}
    out["beats_baselines"] = bool(out["mae_mm"] < out["zero_mae_mm"] and out["mae_mm"] < out["mean_patch_mae_mm"])
    out["beats_mean_map"] = bool(out["mae_mm"] < out["mean_map_mae_mm"])
    return out


def _resume(trainer: DetailTrainer, path: Path, key: str) -> tuple[int, list[dict[str, float]]]:
    """Load the last epoch's state of a killed run with the same key: (the epoch it continues from, 0 for none;
    the per-epoch metrics so far)."""
    if not path.is_file():
        return 0, []
    try:
        saved = torch.load(path, map_location=trainer.device, weights_only=True)
    except Exception:  # a checkpoint that cannot be read is not resumed from: training restarts
        return 0, []
    if saved.get("key") != key:
        return 0, []
    trainer.load_state(saved["state"])
    return trainer.epoch, list(saved["history"])


def _train(trainer: DetailTrainer, params: TrainDetailParams, root: Path, work: Path, key: str,
           history: list[dict[str, float]], name: str) -> list[dict[str, float]]:
    """The epochs left, with a checkpoint after each (weights, optimisers and the metrics so far, in one atomic
    file), the dvclive log and the progress bar."""
    from dvclive import Live

    cfg = params.train
    work.mkdir(parents=True, exist_ok=True)
    # dvclive is rebuilt from the checkpoint's history, so its curves never hold an epoch the weights do not.
    live_dir = root / "dvclive" / name
    if live_dir.exists():
        shutil.rmtree(live_dir)
    live = Live(dir=str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
    for past in history:
        for name, value in sorted(past.items()):
            live.log_metric(name, value)
        live.next_step()
    total = cfg.schedule.epochs
    per_epoch = cfg.schedule.patches_per_epoch * len(trainer.regions)
    try:
        while trainer.epoch < total:
            epoch = trainer.epoch
            with tqdm(total=per_epoch, desc=f"{name} epoch {epoch + 1}/{total} ({trainer.phase(epoch)})",
                      unit="patch", dynamic_ncols=True, mininterval=1.0, disable=None) as bar:
                def progress(n: int, losses: dict[str, Any], bar: tqdm = bar) -> None:
                    bar.update(n)
                    bar.set_postfix(losses, refresh=False)

                metrics = trainer.run_epoch(progress)
            history.append(metrics)
            for name, value in sorted(metrics.items()):
                live.log_metric(name, value)
            due = (epoch + 1) % params.preview_every == 0 or epoch + 1 == total
            if due and trainer.eval_sets.get("upper") is not None:
                live.log_image(f"preview-epoch{epoch + 1:03d}.png", _preview(trainer, params))
            live.next_step()
            buf = io.BytesIO()
            torch.save({"key": key, "state": trainer.state(), "history": history}, buf)
            atomic_write_bytes(work / CHECKPOINT, buf.getvalue())
    finally:
        live.end()
    return history


def _preview(trainer: DetailTrainer, params: TrainDetailParams) -> np.ndarray:
    es = trainer.eval_sets["upper"]
    assert es is not None
    return preview_tiles(trainer.models["upper"].generator, es, params.preview_patches, scale_mm=0.5)


STAGE = Stage(NAME, TrainDetailParams, build, inputs, seed=lambda p: p.train.seed, resumable=True,
              headline=("heldout.mae_mm", "heldout.mean_patch_mae_mm", "heldout.beats_baselines"),
              look_at=(PREVIEW,), limits="The default profile trains a narrow network for minutes: a smoke test.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
