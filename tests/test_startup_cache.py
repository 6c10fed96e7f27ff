"""A fresh process loads the compiled screened-L1 and UV-raster kernels from numba's disk cache.

Each worker process of wild_proxy used to compile the screened-L1 search (about 2 s: a closure, which
numba cannot cache) and run the NumPy UV rasterizer (0.5-0.9 s at 1024²). The kernels are now
module-level and cached: the first process compiles and writes the cache, the next one loads it. Where
no cache folder can be found (a read-only install without a home), they compile in process, with the
same results. Each case runs in its own interpreter, the cache in a temporary folder; numba's own
per-dispatcher counters say whether the code was compiled or loaded (no timing here: ``bench/``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys
import numpy as np
if sys.argv[1] == "no-cache-folder":
    from numba.core import caching
    caching.CacheImpl._locator_classes = []  # what numba finds on a read-only install without a home
from facedetail.dictionary import screened_l1
from facedetail.model import uvmap

backend = screened_l1.screen_backend()
rs = np.random.RandomState(7)
entries = rs.standard_normal((500, 40)).astype(np.float32)
d, i = screened_l1.ScreenedL1(entries, threads=1).search(rs.standard_normal((50, 40)).astype(np.float32), k=3)
raster = uvmap.rasterize_uv(rs.uniform(-0.1, 1.1, (30, 2)), rs.randint(0, 30, (60, 3)), 64)
digest = hashlib.sha256(d.tobytes() + i.tobytes() + raster.triangle.tobytes() + raster.bary.tobytes()).hexdigest()
kernels = {"search": screened_l1._KERNELS[backend], "raster": uvmap._compiled_raster_loop()}
print(json.dumps({
    "digest": digest,
    "cache": {name: type(k._cache).__name__ for name, k in kernels.items()},
    "hits": {name: sum(k.stats.cache_hits.values()) for name, k in kernels.items()},
    "misses": {name: sum(k.stats.cache_misses.values()) for name, k in kernels.items()},
}))
"""


def run_child(mode: str, cache_dir: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cold_and_warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    cache = tmp_path_factory.mktemp("numba_cache")
    return run_child("cached", cache), run_child("cached", cache)


def test_the_second_process_loads_the_kernels_from_the_disk_cache(cold_and_warm) -> None:
    cold, warm = cold_and_warm
    assert cold["cache"] == warm["cache"] == {"search": "FunctionCache", "raster": "FunctionCache"}
    # The first process finds an empty cache folder and compiles; the second compiles nothing.
    assert cold["hits"] == {"search": 0, "raster": 0} and cold["misses"] == {"search": 1, "raster": 1}
    assert warm["hits"] == {"search": 1, "raster": 1} and warm["misses"] == {"search": 0, "raster": 0}
    assert warm["digest"] == cold["digest"]


def test_without_a_cache_folder_the_kernels_compile_in_process_with_the_same_results(cold_and_warm,
                                                                                      tmp_path: Path) -> None:
    bare = run_child("no-cache-folder", tmp_path / "unused")
    assert bare["cache"] == {"search": "NullCache", "raster": "NullCache"}
    assert not (tmp_path / "unused").exists()
    assert bare["digest"] == cold_and_warm[0]["digest"]
