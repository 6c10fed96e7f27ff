"""Benchmark: the worker processes' steady heap (:func:`facedetail.io.executors.steady_heap`) against glibc's own
dynamic malloc thresholds, on the local pool's render shards.

    python bench/worker_heap.py [--share data/external/eos-share] [--count 4000] [--workers 2] [--rounds 2]

The same ``render_expressions`` shards (256², PNG, tar shards) built by the local pool, alternately with
the steady heap (the default) and with ``FACEDETAIL_STEADY_HEAP=0`` (glibc's thresholds, as before),
``--rounds`` times each: images/s, the ratio of each steady run to the mean of the glibc runs next to it
(this machine's speed drifts by 10-30 % within minutes), and per render the pool processes' page faults
and system time (their resource usage once reaped). Both give the same bytes (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any


def build(spec: Any, count: int, workers: int, work: Path, steady: bool) -> dict[str, Any]:
    """One local-pool build of ``count`` renders; images/s and the pool processes' faults and system time."""
    from facedetail.io.hashing import sha256_file
    from facedetail.io.shards import build_shards, shard_tasks
    from facedetail.render.expression_set import ExpressionShardWorker, item_id

    os.environ["FACEDETAIL_STEADY_HEAP"] = "1" if steady else "0"  # read by the spawned pool processes
    tasks = shard_tasks([item_id(i) for i in range(count)], 1000)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    build_shards(tasks, work, "bench", partial(ExpressionShardWorker, spec), workers=workers,
                 desc="steady" if steady else "glibc")
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"heap": "steady" if steady else "glibc", "images_per_s": round(count / seconds, 1),
            "faults_per_render": round((after.ru_minflt - before.ru_minflt) / count),
            "system_ms_per_render": round(1000 * (after.ru_stime - before.ru_stime) / count, 2),
            "cpu_ms_per_render": round(1000 * (after.ru_utime - before.ru_utime + after.ru_stime
                                               - before.ru_stime) / count, 2),
            "hashes": {p.name: sha256_file(p) for p in sorted(work.glob("*.tar"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=Path, default=Path("data/external/eos-share"))
    parser.add_argument("--count", type=int, default=4000, help="renders per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="steady runs, each between two glibc runs")
    args = parser.parse_args()

    from facedetail.model import load_model_source
    from facedetail.render.expression_set import ExpressionSetSpec
    from facedetail.render.sampling import SamplingConfig

    model = load_model_source("sfm", args.share / "sfm_shape_3448.bin", args.share)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = ExpressionSetSpec(model.save(Path(tmp) / "model.npz"), "bench", 0, 256, SamplingConfig(), 3, "bench")
        for i, steady in enumerate([False] + [True, False] * args.rounds):
            run = build(spec, args.count, args.workers, Path(tmp) / f"run-{i}", steady)
            if runs and run["hashes"] != runs[0]["hashes"]:
                raise SystemExit("the steady heap built other bytes")
            runs.append(run)
            print(f"{run['heap']:>7}: {run['images_per_s']:6.1f} img/s  {run['faults_per_render']:5d} page faults "
                  f"and {run['system_ms_per_render']:5.2f} ms system time per render "
                  f"({run['cpu_ms_per_render']:5.2f} ms CPU)", flush=True)
    ratios = [round(runs[i]["images_per_s"] / ((runs[i - 1]["images_per_s"] + runs[i + 1]["images_per_s"]) / 2), 3)
              for i in range(1, len(runs), 2)]
    print(f"steady heap: x{' x'.join(f'{r:.3f}' for r in ratios)} of the glibc runs around it")
    print(json.dumps({"count": args.count, "workers": args.workers, "ratios": ratios,
                      "runs": [{k: v for k, v in run.items() if k != "hashes"} for run in runs]}))


if __name__ == "__main__":
    main()
