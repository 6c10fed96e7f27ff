"""Benchmark: the emotion network's inference as ``predict`` runs it, against the way it ran before.

    python bench/emotion.py [--batch 32] [--repeat 30] [--threads 1]

The mini-Xception (random weights: the cost does not depend on them) on a batch of 64x64 faces, as
wild_proxy's β_prior lookup runs it per shard (one thread per worker process), measured in one run:

* baseline: two passes (``net(x)`` for the probabilities, ``net.embed(x)`` for the features) with
  ``F.max_pool2d``, what the lookup did before;
* one pass (``logits_and_embedding``) with ``F.max_pool2d``;
* one pass with the strided maxima of :func:`facedetail.features.emotion._max_pool_same` (the library's
  inference path, what ``facedetail.features.train.predict`` runs).

Prints ms per batch, each one's ratio to the baseline and whether its outputs are bit-identical to it
(they must be: the same operations, and a max rounds nothing).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from facedetail.features import emotion


def _pool2d(t: torch.Tensor, k: int = 3, s: int = 2) -> torch.Tensor:
    """The max pool as it was: padded as Keras's 'same', then ``F.max_pool2d``."""
    top, bottom = emotion._same_pad(t.shape[-2], k, s)
    left, right = emotion._same_pad(t.shape[-1], k, s)
    return F.max_pool2d(F.pad(t, (left, right, top, bottom), value=-float("inf")), k, s)


def best_ms(fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
            repeat: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """Best-of-``repeat`` ms of ``fn`` without gradients, and its output."""
    with torch.no_grad():
        out = fn()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best * 1000, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = emotion.MiniXception().eval()
    x = torch.rand(args.batch, 1, 64, 64) * 2 - 1
    ways: dict[str, tuple[float, tuple[torch.Tensor, torch.Tensor]]] = {}
    with mock.patch.object(emotion, "_max_pool_same", _pool2d):
        ways["two passes, F.max_pool2d (baseline)"] = best_ms(lambda: (net(x), net.embed(x)), args.repeat)
        ways["one pass, F.max_pool2d"] = best_ms(lambda: net.logits_and_embedding(x), args.repeat)
    ways["one pass, strided maxima (library)"] = best_ms(lambda: net.logits_and_embedding(x), args.repeat)
    base_ms, base_out = next(iter(ways.values()))
    print(f"mini-Xception logits + features, batch {args.batch}, {args.threads} thread(s), best of {args.repeat}:")
    for name, (ms, out) in ways.items():
        same = all(torch.equal(a, b) for a, b in zip(out, base_out, strict=True))
        print(f"  {name:<38} {ms:7.2f} ms  {ms / args.batch:.2f} ms/face  x{base_ms / ms:.2f}  "
              f"bit-identical: {same}")


if __name__ == "__main__":
    main()
