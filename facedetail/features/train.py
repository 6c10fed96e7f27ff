"""Training and evaluation of the emotion classifier: deterministic on CPU, no DataLoader workers.

Batches are drawn from a NumPy generator seeded by the config, augmentation (horizontal flip,
which keeps the emotion) comes from the same generator, and torch's deterministic algorithms
are switched on while training with a fixed number of threads (a reduction split over more threads
adds in another order), so equal inputs, seed and threads give equal weights on any machine.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from facedetail.config import Config
from facedetail.errors import SourceFileError
from facedetail.features.emotion import FER_CLASSES, build_network, to_input
from facedetail.io.atomic import atomic_write_bytes


class TrainConfig(Config):
    """Optimisation of the emotion network."""

    epochs: int = Field(6, ge=0)
    """Passes over the training crops (0: keep the initial weights, e.g. fer's pretrained network)."""
    batch_size: int = Field(64, ge=1)
    """Crops per step."""
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate."""
    weight_decay: float = Field(1e-4, ge=0)
    """Adam weight decay."""
    hflip: bool = True
    """Mirror half the crops of each batch at random (expressions are left-right symmetric enough)."""
    seed: int = 2019
    """Seeds the initial weights (networks trained from scratch), the batch order and the flips."""
    threads: int = Field(2, ge=1)
    """torch threads while training. The weights depend on it, so it is a param and not the machine's core
    count (torch's default, and ``OMP_NUM_THREADS``: 1 and 2 threads gave different weights)."""


@dataclass(frozen=True)
class Evaluation:
    """Accuracy of a classifier on labelled crops."""

    confusion: np.ndarray
    """(C, C) int64 counts, rows = true class, columns = predicted."""

    @property
    def accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    def per_class(self, classes: tuple[str, ...] = FER_CLASSES) -> dict[str, float | None]:
        """Recall of each class (None where the class has no sample)."""
        rows, hits = self.confusion.sum(1), np.diag(self.confusion)
        return {c: (round(float(hits[i] / rows[i]), 4) if rows[i] else None) for i, c in enumerate(classes)}


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed threads and deterministic kernels inside the block, so a rerun gives the same bits on one machine
    and build whatever ``OMP_NUM_THREADS`` or the core count say: torch on ``threads`` threads with its
    deterministic algorithms, and every BLAS loaded (NumPy's, SciPy's, OpenCV's, faiss's OpenBLAS) on one
    thread, as in the stages' pool workers (:func:`facedetail.io.shards.one_thread_per_process`). OpenBLAS
    rounds differently on one thread than on several: ``evaluate``'s scores changed with
    ``OPENBLAS_NUM_THREADS=1`` before it was pinned here (a library first loaded inside the block keeps its
    own threads: threadpoolctl sets those loaded). The previous settings are restored after the block, so
    other stages in the same process (a Prefect flow) run as they would alone."""
    from threadpoolctl import threadpool_limits

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_classifier(net: torch.nn.Module, crops: np.ndarray, labels: np.ndarray, config: TrainConfig,
                     on_epoch: Callable[[int, float, float], None] | None = None) -> list[dict[str, float]]:
    """Train ``net`` in place on uint8 crops; returns per-epoch mean loss and training accuracy."""
    history: list[dict[str, float]] = []
    if config.epochs == 0 or len(crops) == 0:
        return history
    rng = np.random.default_rng(config.seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_all, y_all = to_input(crops), torch.as_tensor(labels, dtype=torch.int64)
    with deterministic(config.threads):
        for epoch in range(1, config.epochs + 1):
            net.train()
            total, correct, seen = 0.0, 0, 0
            for idx in _batches(len(crops), config.batch_size, rng):
                x, y = x_all[idx], y_all[idx]
                if config.hflip:
                    flip = torch.as_tensor(rng.random(len(idx)) < 0.5)
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                optimiser.zero_grad(set_to_none=True)
                logits = net(x)
                loss = loss_fn(logits, y)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(idx)
            history.append({"epoch": epoch, "loss": round(total / seen, 6), "train_accuracy": round(correct / seen, 6)})
            if on_epoch is not None:
                on_epoch(epoch, total / seen, correct / seen)
    net.eval()
    return history


@torch.no_grad()
def predict(net: torch.nn.Module, crops: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, C) float32, features (N, 128) float32) of uint8 crops, in eval mode."""
    net.eval()
    probs, feats = [], []
    for start in range(0, len(crops), batch):
        logits, embedding = net.logits_and_embedding(to_input(crops[start:start + batch]))
        probs.append(torch.softmax(logits, dim=1).numpy())
        feats.append(embedding.numpy())
    n_classes = getattr(net, "num_classes", len(FER_CLASSES))
    if not probs:
        return np.zeros((0, n_classes), np.float32), np.zeros((0, 128), np.float32)
    return np.concatenate(probs).astype(np.float32), np.concatenate(feats).astype(np.float32)


def evaluate(probabilities: np.ndarray, labels: np.ndarray, n_classes: int = len(FER_CLASSES)) -> Evaluation:
    """Confusion matrix of argmax predictions against labels."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (np.asarray(labels, np.int64), probabilities.argmax(1)), 1)
    return Evaluation(confusion)


def save_network(path: Path, net: torch.nn.Module, name: str, meta: dict[str, Any]) -> Path:
    """Weights plus what is needed to rebuild the network (its name, classes, training facts), atomically."""
    buf = io.BytesIO()
    torch.save({"network": name, "classes": list(FER_CLASSES), "meta": meta, "state_dict": net.state_dict()}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_network(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A network saved by :func:`save_network`, in eval mode, with its saved record (minus the weights)."""
    if not path.is_file():
        raise SourceFileError(path, "emotion network not found", "Run `dvc repro emotion_net` first")
    data = torch.load(path, map_location="cpu", weights_only=True)
    net = build_network(data["network"], pretrained=False, num_classes=len(data["classes"]))
    net.load_state_dict(data["state_dict"])
    net.eval()
    return net, {k: v for k, v in data.items() if k != "state_dict"}
