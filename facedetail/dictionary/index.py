"""Nearest-neighbour index over expression-dictionary features (faiss), exact or approximate.

The dictionary maps a query feature (264-D: 128 emotion + 136 appearance) to its nearest
rendered entry. Three kinds of index:

* ``flat``: exact brute force. L2 uses faiss's BLAS path. L1 has no BLAS formulation; on the
  CPU it is searched by :mod:`facedetail.dictionary.screened_l1` (8-bit SAD screen with a
  certified bound, then exact rescoring: the same answer, 3.6x faster on the dev machine), or,
  with ``l1_kernel: faiss`` or on a CPU without AVX2, by faiss's kernel tile by tile (a block
  of entries that stays in cache against a whole batch of queries), which is ~2.5x faster than
  ``IndexFlat(METRIC_L1).search``: that scans the whole database once per query and is
  memory-bound.
* ``ivf``: inverted lists over a k-means partition (``nlist`` lists, ``nprobe`` searched). With
  L1 the k-means assigns by L1 but its centroids are means (faiss added L1 to IVFFlat in PR
  #4409, warning that k-means may suit it less well): measure recall, as the bench does.
* ``hnsw``: a navigable small-world graph (``hnsw_m`` links, ``ef_search`` beam).

Distances are true distances: L1 is the sum of absolute differences; for L2 the square root of
faiss's squared L2 is returned. Ties are broken towards the lowest entry id (improbable with
float features; exact for :func:`brute_force_search` and the CPU flat L1 path).

GPU (``faiss-gpu``, the ``[gpu]`` extra) supports a subset, encoded in :func:`gpu_supported`:

* flat, L1 and L2: ``GpuIndexFlat`` runs every faiss metric through its brute-force kernel
  (faiss ``faiss/gpu/test/TestGpuDistance.cu`` tests ``bfKnn`` with ``METRIC_L1``; faiss
  issue #1646: "Only IndexFlat and GpuIndexFlat currently implement the alternative metrics").
* ivf, L2 only: ``GpuIndexIVF``'s constructor throws ``unsupported metric type`` for anything
  but L2 and inner product (``faiss/gpu/GpuIndexIVF.cu``; faiss issue #1989).
* hnsw: none. ``index_cpu_to_gpu`` only converts ``IndexHNSWCagra`` (cuVS builds), anything
  else is "not implemented on GPU" (``faiss/gpu/GpuCloner.cpp``); HNSW stays on the CPU.

An unsupported combination searches on the CPU and says so in :attr:`FeatureIndex.device_note`.

Determinism: an index is built on the CPU (k-means seeded by ``train_seed``), so two builds of
the same data with the same faiss give byte-identical :meth:`FeatureIndex.save` files. HNSW
insertion is the one multi-threaded step whose result could depend on thread timing; see
:func:`_deterministic_hnsw_build`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import Field, ValidationError

from facedetail.config import Config, run_only
from facedetail.dictionary.screened_l1 import ScreenedL1, screen_backend
from facedetail.errors import FacedetailError
from facedetail.io.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

Metric = Literal["l1", "l2"]
Device = Literal["cpu", "gpu"]

_FAISS_METRIC = {"l1": faiss.METRIC_L1, "l2": faiss.METRIC_L2}
_SIDECAR_FORMAT = "facedetail.feature-index"
_SIDECAR_VERSION = 1
# Entries per tile of the CPU flat L1 search: 8192 x 264 float32 is 8.7 MB, which stays in cache
# while a whole query batch streams past it. On the 2-core dev machine (90K entries) 4096-8192
# measured fastest, 1024-16384 within 10%, and the whole database at once 2.4x slower.
_L1_ENTRY_BLOCK = 8192
# numpy brute force blocks, as (queries per block, elements of the (queries, entries) block).
# L1 loops over dimensions on a 512 KB accumulator that stays in L2 cache (narrow query blocks
# measured fastest); L2 is one BLAS product per block, which wants large blocks.
_BRUTE_BLOCKS = {"l1": (32, 1 << 17), "l2": (1024, 1 << 22)}


class IndexConfig(Config):
    """How the expression dictionary's feature index is built and searched."""

    metric: Metric = "l1"
    """Distance: l1 (the original release's metric) or l2."""
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    """flat: exact brute force; ivf: inverted lists (approximate); hnsw: graph (approximate)."""
    nlist: int = Field(0, ge=0)
    """IVF lists; 0 = auto, about 4·sqrt(N), at most N/39 so k-means has 39 points per centroid."""
    nprobe: int = Field(16, ge=1)
    """IVF lists searched per query (capped at nlist); more is slower and closer to exact."""
    hnsw_m: int = Field(32, ge=2)
    """HNSW links per node (level 0 has twice as many)."""
    ef_construction: int = Field(80, ge=1)
    """HNSW beam width while inserting; more builds slower, a better graph."""
    ef_search: int = Field(64, ge=1)
    """HNSW beam width while searching (at least k is used)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """auto: a GPU when faiss sees one (and supports the metric and kind), else the CPU."""
    train_seed: int = Field(2019, ge=0, le=2**31 - 1)
    """Seed of the IVF k-means, so that builds are reproducible."""
    query_batch: int = run_only(16384, ge=1)
    """Queries per search call; bounds the memory of the result buffers."""
    l1_kernel: Literal["screened", "faiss"] = "screened"
    """Exact flat L1 on the CPU: screened (8-bit SAD screen + exact rescoring, needs AVX2 or
    AVX-512BW, else faiss is used and said so in ``search_note``) or faiss (its own L1 kernel)."""


def select_device(requested: str, num_gpus: int | None = None) -> Device:
    """Resolve ``auto``/``cpu``/``gpu`` against the GPUs faiss sees (``num_gpus``, injectable for tests)."""
    if requested not in ("auto", "cpu", "gpu"):
        raise FacedetailError(f"device must be auto, cpu or gpu, not {requested!r}")
    if requested == "cpu":
        return "cpu"
    if num_gpus is None:
        num_gpus = faiss.get_num_gpus()
    if num_gpus > 0:
        return "gpu"
    if requested == "gpu":
        raise FacedetailError(
            "device: gpu was requested but faiss sees no GPU; install faiss-gpu (the [gpu] extra) or set device: cpu"
        )
    return "cpu"


def gpu_unsupported_reason(config: IndexConfig) -> str | None:
    """Why faiss-gpu cannot search this metric and kind, or None when it can."""
    if config.kind == "hnsw":
        return "faiss has no GPU HNSW index (index_cpu_to_gpu converts only CAGRA graphs)"
    if config.kind == "ivf" and config.metric != "l2":
        return f"faiss GPU IVF supports only L2 and inner product, not {config.metric.upper()}"
    return None


def gpu_supported(config: IndexConfig) -> bool:
    """Whether faiss-gpu implements this metric and kind (flat: L1 and L2; ivf: L2; hnsw: none)."""
    return gpu_unsupported_reason(config) is None


def _to_gpu(index: faiss.Index) -> tuple[faiss.Index, Any]:
    """Copy a CPU index to GPU 0; returns the GPU index and the resources it needs kept alive."""
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


def auto_nlist(n: int) -> int:
    """IVF list count for ``n`` entries: round(4·sqrt(n)), clamped to [1, n // 39]."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _as_matrix(x: Any, dim: int | None, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (rows, dim) array of finite values, else FacedetailError."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise FacedetailError(f"{what}: expected a 2-D array (rows, dim), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise FacedetailError(f"{what}: expected a real numeric array, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise FacedetailError(f"{what}: rows have {arr.shape[1]} values, the index has dimension {dim}")
    if arr.shape[1] == 0:
        raise FacedetailError(f"{what}: rows have no values (dimension 0)")
    # Convert first: a float64 beyond the float32 range becomes inf and is reported below.
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise FacedetailError(
            f"{what}: {rows.size} of {arr.shape[0]} rows contain NaN or inf (first: row {rows[0]})"
        )
    return arr


def _check_k(k: int, ntotal: int) -> None:
    if k < 1:
        raise FacedetailError(f"k must be at least 1, got {k}")
    if k > ntotal:
        raise FacedetailError(f"k={k} exceeds the {ntotal} entries of the index")


def _merge_topk(
    best_d: np.ndarray, best_i: np.ndarray, new_d: np.ndarray, new_i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of two candidate sets per row, ordered by (distance, id): lowest id wins ties."""
    d = np.concatenate([best_d, new_d], axis=1)
    i = np.concatenate([best_i, new_i], axis=1)
    order = np.lexsort((i, d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def _empty_topk(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((m, k), np.inf, dtype=np.float32), np.full((m, k), -1, dtype=np.int64)


def _tiled_l1_knn(entries: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L1 k-NN with faiss's kernel, one cache-sized block of entries at a time."""
    best_d, best_i = _empty_topk(len(queries), k)
    for j0 in range(0, len(entries), _L1_ENTRY_BLOCK):
        block = entries[j0 : j0 + _L1_ENTRY_BLOCK]
        d, i = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_L1)
        best_d, best_i = _merge_topk(best_d, best_i, d, i + j0, k)
    return best_d, best_i


def brute_force_search(
    entries: np.ndarray, queries: np.ndarray, metric: Metric, k: int = 1, batch: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in plain numpy: (distances (M, k) float32, ids (M, k) int64), lowest id on ties.

    ``batch`` queries (default 32 for L1, 1024 for L2) at a time against blocks of entries, so
    the temporaries stay small (2 MB for L1, 16 MB for L2) whatever N and M. L2 distances are
    true (not squared) L2.
    """
    entries = _as_matrix(entries, None, "entries")
    queries = _as_matrix(queries, entries.shape[1], "queries")
    if metric not in _FAISS_METRIC:
        raise FacedetailError(f"metric must be l1 or l2, not {metric!r}")
    default_batch, block_elems = _BRUTE_BLOCKS[metric]
    batch = default_batch if batch is None else batch
    if batch < 1:
        raise FacedetailError(f"batch must be at least 1, got {batch}")
    _check_k(k, len(entries))
    m, n = len(queries), len(entries)
    out_d, out_i = _empty_topk(m, k)
    entry_block = max(1, block_elems // batch)
    sq_entries = np.einsum("ij,ij->i", entries, entries) if metric == "l2" else None
    for j0 in range(0, n, entry_block):
        block = entries[j0 : j0 + entry_block]
        # L1 walks the dimensions over a (batch, block) accumulator: no (batch, block, D)
        # temporary, and each entry column is contiguous once the block is transposed.
        block_t = np.ascontiguousarray(block.T) if metric == "l1" else None
        acc = np.empty((batch, len(block)), dtype=np.float32)
        tmp = np.empty_like(acc)
        for i0 in range(0, m, batch):
            q = queries[i0 : i0 + batch]
            a, t = acc[: len(q)], tmp[: len(q)]
            if metric == "l1":
                a.fill(0)
                for c in range(block_t.shape[0]):
                    np.subtract(q[:, c, None], block_t[c][None, :], out=t)
                    np.abs(t, out=t)
                    a += t
            else:
                # |q - e|² = |q|² - 2 q·e + |e|² (BLAS); clamped, as rounding can dip below 0.
                np.matmul(q, block.T, out=a)
                a *= -2
                a += np.einsum("ij,ij->i", q, q)[:, None]
                a += sq_entries[None, j0 : j0 + len(block)]
                np.maximum(a, 0, out=a)
            # Both keep the lowest id among equal distances: argmin returns the first minimum.
            sel = np.argmin(a, axis=1)[:, None] if k == 1 else np.argsort(a, axis=1, kind="stable")[:, :k]
            d = np.take_along_axis(a, sel, axis=1)
            ids = sel.astype(np.int64) + j0
            out_d[i0 : i0 + len(q)], out_i[i0 : i0 + len(q)] = _merge_topk(
                out_d[i0 : i0 + len(q)], out_i[i0 : i0 + len(q)], d, ids, k
            )
    if metric == "l2":
        np.sqrt(out_d, out=out_d)
    return out_d, out_i


def recall_at_1(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of queries whose first approximate neighbour is the exact nearest one."""
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    a = a[:, 0] if a.ndim == 2 else a
    e = e[:, 0] if e.ndim == 2 else e
    if a.ndim != 1 or a.shape != e.shape:
        raise FacedetailError(
            f"recall_at_1: id arrays differ in shape: {np.shape(approx_ids)} vs {np.shape(exact_ids)}"
        )
    if a.size == 0:
        raise FacedetailError("recall_at_1: no queries")
    return float(np.mean(a == e))


@contextlib.contextmanager
def _deterministic_hnsw_build() -> Iterator[None]:
    """Make HNSW insertion independent of thread timing, whichever faiss is installed.

    faiss up to 1.14 inserts nodes in parallel under per-node locks, so the graph depends on
    thread interleaving unless one thread builds it. faiss PR #5486 added a lock-free
    deterministic build behind ``faiss.cvar.hnsw_deterministic_build``; later releases (1.15.1
    has no flag, only ``hnsw_add_vertices_deterministic``) made it the only build.
    """
    try:
        previous = faiss.cvar.hnsw_deterministic_build
    except AttributeError:
        previous = None
    if previous is not None:
        faiss.cvar.hnsw_deterministic_build = True
        try:
            yield
        finally:
            faiss.cvar.hnsw_deterministic_build = previous
    elif hasattr(faiss, "hnsw_add_vertices_deterministic"):
        yield
    else:
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(threads)


def _build_cpu(features: np.ndarray, config: IndexConfig) -> faiss.Index:
    n, d = features.shape
    metric = _FAISS_METRIC[config.metric]
    if config.kind == "flat":
        index = faiss.IndexFlat(d, metric)
        index.add(features)
    elif config.kind == "ivf":
        nlist = config.nlist or auto_nlist(n)
        if nlist > n:
            raise FacedetailError(f"nlist={nlist} exceeds the {n} entries; lower nlist or use 0 (auto)")
        index = faiss.index_factory(d, f"IVF{nlist},Flat", metric)
        index.cp.seed = config.train_seed
        index.train(features)
        index.add(features)
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, metric)
        index.hnsw.efConstruction = config.ef_construction
        with _deterministic_hnsw_build():
            index.add(features)
    _apply_search_params(index, config)
    return index


def _apply_search_params(index: faiss.Index, config: IndexConfig) -> None:
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(config.nprobe, index.nlist)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.ef_search


_KIND_CLASS = {"flat": faiss.IndexFlat, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class FeatureIndex:
    """A built faiss index plus the config it was built with and the device it searches on.

    ``device`` is where searches run; ``device_note`` says why, when that was not a plain
    ``cpu``/``gpu`` request honoured as asked (``auto`` resolved, or a GPU fallback).
    """

    def __init__(
        self, cpu_index: faiss.Index, config: IndexConfig, num_gpus: int | None = None
    ) -> None:
        self.config = config
        self.dim: int = cpu_index.d
        self.ntotal: int = cpu_index.ntotal
        self._cpu = cpu_index
        self._search_index = cpu_index
        self._gpu_resources: Any = None
        self.device: Device = "cpu"
        self.device_note: str | None = None
        self._screened: ScreenedL1 | None = None
        self.search_note: str | None = None
        """How an exact CPU L1 search runs when that is not the configured kernel (no AVX2)."""

        resolved = select_device(config.device, num_gpus)
        reason = gpu_unsupported_reason(config)
        if resolved == "gpu" and reason is not None:
            self.device_note = f"device {config.device} resolved to gpu, but {reason}; searching on the CPU"
            log.warning("feature index: %s", self.device_note)
        elif resolved == "gpu":
            try:
                self._search_index, self._gpu_resources = _to_gpu(cpu_index)
            except Exception as err:  # faiss raises RuntimeError/AttributeError with long C++ traces
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise FacedetailError(
                    f"moving the {config.kind} {config.metric} index to the GPU failed ({first_line}); "
                    "set device: cpu"
                ) from err
            self.device = "gpu"
            if config.device == "auto":
                self.device_note = "device auto: faiss sees a GPU"
        elif config.device == "auto":
            self.device_note = "device auto: faiss sees no GPU"
        if self._exact_cpu_l1() and config.l1_kernel == "screened" and screen_backend() is None:
            self.search_note = (
                "l1_kernel screened needs AVX2 or AVX-512BW, which this CPU lacks; using faiss's L1 kernel"
            )
            log.warning("feature index: %s", self.search_note)

    def _exact_cpu_l1(self) -> bool:
        return self.device == "cpu" and self.config.kind == "flat" and self.config.metric == "l1"

    @property
    def search_method(self) -> str:
        """What answers :meth:`search`: the faiss index, or which exact L1 kernel."""
        if not self._exact_cpu_l1():
            return f"faiss {self.config.kind} {self.config.metric} on {self.device}"
        backend = screen_backend() if self.config.l1_kernel == "screened" else None
        return f"screened L1 ({backend} SAD)" if backend else "faiss L1, tiled"

    @classmethod
    def build(
        cls, features: np.ndarray, config: IndexConfig | None = None, num_gpus: int | None = None
    ) -> FeatureIndex:
        """Index ``features`` (N, D): built on the CPU (reproducibly), then moved to a GPU if chosen."""
        config = config or IndexConfig()
        features = _as_matrix(features, None, "features")
        if len(features) == 0:
            raise FacedetailError("features: no rows to index")
        # Resolve the device before the (possibly long) build so a bad request fails fast.
        select_device(config.device, num_gpus)
        return cls(_build_cpu(features, config), config, num_gpus)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k nearest entries per query: (distances (M, k) float32, ids (M, k) int64), nearest first.

        Approximate kinds may return id -1 where they found fewer than k entries.
        """
        queries = _as_matrix(queries, self.dim, "queries")
        _check_k(k, self.ntotal)
        m = len(queries)
        out_d = np.empty((m, k), dtype=np.float32)
        out_i = np.empty((m, k), dtype=np.int64)
        entries = None
        if self._exact_cpu_l1():
            # A zero-copy view of the flat index's storage, for the tiled or screened search.
            entries = faiss.rev_swig_ptr(self._cpu.get_xb(), self.ntotal * self.dim).reshape(-1, self.dim)
            if self.config.l1_kernel == "screened" and self._screened is None and screen_backend():
                self._screened = ScreenedL1(entries, threads=faiss.omp_get_max_threads())
        for i0 in range(0, m, self.config.query_batch):
            q = queries[i0 : i0 + self.config.query_batch]
            if self._screened is not None:
                d, i = self._screened.search(q, k)
            elif entries is not None:
                d, i = _tiled_l1_knn(entries, q, k)
            else:
                d, i = self._search_index.search(q, k)
            out_d[i0 : i0 + len(q)] = d
            out_i[i0 : i0 + len(q)] = i
        if self.config.metric == "l2":
            # faiss returns squared L2; rounding in |q|² - 2q·e + |e|² can make it slightly negative.
            np.sqrt(np.maximum(out_d, 0, out=out_d), out=out_d)
        return out_d, out_i

    def save(self, path: Path | str) -> Path:
        """Write the CPU index to ``path`` and its config to ``<path>.json``, each atomically.

        The index bytes are faiss's serialisation, identical for identical builds. The sidecar
        holds their SHA256, so a pair torn by a crash between the two writes is refused on load.
        """
        path = Path(path)
        data = faiss.serialize_index(self._cpu).tobytes()
        meta = {
            "format": _SIDECAR_FORMAT,
            "version": _SIDECAR_VERSION,
            "config": self.config.model_dump(mode="json"),
            "dim": self.dim,
            "ntotal": self.ntotal,
            "index_sha256": hashlib.sha256(data).hexdigest(),
            "faiss_version": faiss.__version__,
        }
        atomic_write_bytes(path, data)
        atomic_write_text(_sidecar(path), json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path | str, device: str = "auto", num_gpus: int | None = None) -> FeatureIndex:
        """Read an index written by :meth:`save`; ``device`` replaces the saved config's device."""
        path = Path(path)
        sidecar = _sidecar(path)
        if device not in ("auto", "cpu", "gpu"):
            raise FacedetailError(f"device must be auto, cpu or gpu, not {device!r}")
        for p in (path, sidecar):
            if not p.is_file():
                raise FacedetailError(f"{p}: no such file; build and save the index first")
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            if meta.get("format") != _SIDECAR_FORMAT or meta.get("version") != _SIDECAR_VERSION:
                raise ValueError(f"not a {_SIDECAR_FORMAT} v{_SIDECAR_VERSION} sidecar")
            config = IndexConfig.model_validate({**meta["config"], "device": device})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise FacedetailError(f"{sidecar}: bad index config: {where}: {first['msg']}") from err
        except (ValueError, KeyError, TypeError) as err:
            raise FacedetailError(f"{sidecar}: unreadable index metadata ({err})") from err
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("index_sha256"):
            raise FacedetailError(f"{path}: does not match {sidecar.name} (interrupted save?); save the index again")
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        expected = _KIND_CLASS[config.kind]
        if (
            not isinstance(index, expected)
            or index.metric_type != _FAISS_METRIC[config.metric]
            or index.d != meta.get("dim")
            or index.ntotal != meta.get("ntotal")
        ):
            raise FacedetailError(f"{path}: index does not match the kind, metric or size recorded in {sidecar.name}")
        _apply_search_params(index, config)
        return cls(index, config, num_gpus)

    def __repr__(self) -> str:
        return (
            f"FeatureIndex(kind={self.config.kind}, metric={self.config.metric}, dim={self.dim}, "
            f"ntotal={self.ntotal}, device={self.device})"
        )
