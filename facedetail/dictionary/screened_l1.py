"""Exact L1 nearest neighbours, screened by 8-bit codes with a certified error bound.

faiss has no BLAS formulation for L1: its kernel sums |q - e| one pair at a time, about 35 G
absolute differences per second on the 2-core dev machine, so 163K queries against 90K entries
(3.9e12 differences) take 110 s. This module answers the same queries exactly in a fraction of
that by doing most of the work on bytes:

1. Every vector ``x`` (entries and queries) gets an 8-bit code ``c`` on one shared grid,
   ``x̂ = offset + step * c``, and its own residual ``r(x) = Σ |x - x̂|`` (float64, exact).
2. The code distance ``step * SAD(c_q, c_e)`` equals ``L1(q̂, ê)``. By the triangle inequality
   ``|L1(q, e) - L1(q̂, ê)| <= r(q) + r(e)``, so every entry has a lower and an upper bound on its
   true distance. SAD over bytes is one x86 instruction per 64 (AVX-512BW) or 32 (AVX2) bytes.
3. Per query: the exact distance of the k entries with the smallest code distance gives a
   threshold ``T`` (the true k-th distance is at most ``T``); only entries whose lower bound is
   at most ``T`` are scored exactly (float64), and the k smallest are returned, lowest id first
   among equal distances. No entry that could be among the k nearest is ever skipped, so the
   answer is the brute-force answer, not an approximation; the bound only decides how many
   entries are rescored (a handful per query on dictionary-like data).

The grid: a per-dimension offset centres each dimension's central range (quantiles ``clip_q`` and
``1 - clip_q`` of the entries) in [0, 255], and one step covers the widest such range (SAD has no
per-dimension weights). Values outside the range are clipped; the clipping error is part of the
residual, so outliers make the screen looser, never wrong.

Why hand-written: LLVM (numba) does not turn a byte |a - b| reduction into ``psadbw`` (measured:
the loop vectorizes to byte min/max/widen at 26-33 G/s), so the SAD is a numba intrinsic that
calls ``llvm.x86.avx512.psad.bw.512`` or ``llvm.x86.avx2.psad.bw`` directly. On a CPU with
neither, :func:`screen_backend` returns None and callers keep faiss's kernel. The kernels are
module-level and cached on disk by numba (one entry per backend), so only the first process on a
machine pays their 1.5-2 s compile; the next ones load them.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import literally, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from facedetail.compiled import cached_njit

Backend = Literal["avx512", "avx2"]

# Bytes per SAD instruction, accumulator lanes, and the LLVM intrinsic, per backend.
_SAD = {
    "avx512": (64, 8, "llvm.x86.avx512.psad.bw.512"),
    "avx2": (32, 4, "llvm.x86.avx2.psad.bw"),
}
# Entries per intrinsic call: one query chunk load feeds this many SADs (measured 8 > 4 > 1).
_ROWS = 8
# Queries that share one pass over a cache-sized tile of entries, and the tile's entry count
# (1024 x 320 B = 320 KB stays in L2 while the queries stream past it).
_QUERY_BLOCK = 8
_ENTRY_TILE = 1024
# Queries per task handed to the thread pool: large enough to amortise the call, small enough
# to balance the threads.
_QUERIES_PER_TASK = 512
# Relative slack on the pruning test, far above float64 rounding of sums of a few hundred terms.
_SLACK = 1e-9


def screen_backend() -> Backend | None:
    """The SAD instruction set this CPU offers (AVX-512BW preferred), or None."""
    features = llvm_binding.get_host_cpu_features()
    if features.get("avx512bw", False):
        return "avx512"
    if features.get("avx2", False):
        return "avx2"
    return None


_BACKEND_OF_WIDTH: dict[int, Backend] = {spec[0]: backend for backend, spec in _SAD.items()}


@intrinsic
def _sad_rows(typingctx, q, q_off, e, e_off, stride, nchunks, width):
    """SAD of one query code row against ``_ROWS`` consecutive entry code rows.

    ``width`` (bytes per instruction) must be a compile-time constant: it picks the backend's
    instruction, so each backend's kernel is its own specialisation (and cache entry).
    """
    if not isinstance(width, types.IntegerLiteral) or width.literal_value not in _BACKEND_OF_WIDTH:
        return None
    bytes_per_sad, lanes, name = _SAD[_BACKEND_OF_WIDTH[width.literal_value]]
    sig = types.UniTuple(types.int64, _ROWS)(q, q_off, e, e_off, stride, nchunks, width)

    def codegen(context, builder, signature, args):
        q_arr, q_off, e_arr, e_off, stride, n, _ = args
        q_ty, q_off_ty, e_ty, e_off_ty, stride_ty, n_ty, _ = signature.args
        i64 = ir.IntType(64)
        q_off = context.cast(builder, q_off, q_off_ty, types.int64)
        e_off = context.cast(builder, e_off, e_off_ty, types.int64)
        stride = context.cast(builder, stride, stride_ty, types.int64)
        n = context.cast(builder, n, n_ty, types.int64)
        q_data = context.make_array(q_ty)(context, builder, q_arr).data
        e_data = context.make_array(e_ty)(context, builder, e_arr).data
        vec_t = ir.VectorType(ir.IntType(8), bytes_per_sad)
        acc_t = ir.VectorType(i64, lanes)
        sad = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc_t, [vec_t, vec_t]), name)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_t, [0] * lanes)) for _ in range(_ROWS)]
        with cgutils.for_range(builder, n) as loop:
            off = builder.mul(loop.index, ir.Constant(i64, bytes_per_sad))
            vq = builder.load(builder.gep(q_data, [builder.add(q_off, off)]), align=1, typ=vec_t)
            for r, acc in enumerate(accs):
                row = builder.add(e_off, builder.mul(stride, ir.Constant(i64, r)))
                ve = builder.load(builder.gep(e_data, [builder.add(row, off)]), align=1, typ=vec_t)
                builder.store(builder.add(builder.load(acc), builder.call(sad, [vq, ve])), acc)
        total = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [acc_t]), f"llvm.vector.reduce.add.v{lanes}i64"
        )
        sums = [builder.call(total, [builder.load(acc)]) for acc in accs]
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


# The backends' widths as plain ints: numba compiles module-level ints as constants.
_WIDTH_AVX512 = _SAD["avx512"][0]
_WIDTH_AVX2 = _SAD["avx2"][0]


# The kernels are module-level functions of their arguments and module constants only: numba keys its
# cache on the function's code and the pickled values of any closure, and a closure over a per-process
# intrinsic never matches, so the former factory-made kernel compiled in every process.
@cached_njit
def _exact_l1(a, b):
    """float64 L1 distance of two rows, summed in index order (the order the results' bits depend on)."""
    acc = 0.0
    for t in range(a.shape[0]):
        acc += abs(np.float64(a[t]) - np.float64(b[t]))
    return acc


@njit(nogil=True, boundscheck=False)
def _search(width, q_codes, q_res, queries, e_codes, e_res, entries, n, step, k, out_d, out_i, scored):
    """k exact nearest entries of each query; ``scored[i]`` counts exact distances computed.

    ``width`` is the backend's bytes per SAD instruction, a compile-time constant (``literally``):
    the per-backend entry points below pass their own and are cached with this body compiled in.
    """
    literally(width)
    stride = e_codes.shape[1]
    nchunks = stride // width
    n_pad = e_codes.shape[0]
    q_flat = q_codes.ravel()
    e_flat = e_codes.ravel()
    res_max = e_res[:n].max()
    sads = np.empty((_QUERY_BLOCK, n_pad), dtype=np.int64)
    seed_s = np.empty(k, dtype=np.int64)
    seed_j = np.empty(k, dtype=np.int64)
    for b0 in range(0, q_codes.shape[0], _QUERY_BLOCK):
        b1 = min(q_codes.shape[0], b0 + _QUERY_BLOCK)
        for j0 in range(0, n_pad, _ENTRY_TILE):
            j1 = min(n_pad, j0 + _ENTRY_TILE)
            for i in range(b0, b1):
                for j in range(j0, j1, _ROWS):
                    s = _sad_rows(q_flat, i * stride, e_flat, j * stride, stride, nchunks, width)
                    for r in range(_ROWS):
                        sads[i - b0, j + r] = s[r]
        for i in range(b0, b1):
            row = sads[i - b0]
            # Seed: the k smallest code distances (ties to the lower id), scored exactly.
            seed_s[:] = np.iinfo(np.int64).max
            seed_j[:] = -1
            for j in range(n):
                if row[j] < seed_s[k - 1]:
                    p = k - 1
                    while p > 0 and seed_s[p - 1] > row[j]:
                        seed_s[p] = seed_s[p - 1]
                        seed_j[p] = seed_j[p - 1]
                        p -= 1
                    seed_s[p] = row[j]
                    seed_j[p] = j
            threshold = 0.0
            for p in range(k):
                threshold = max(threshold, _exact_l1(queries[i], entries[seed_j[p]]))
            rq = q_res[i]
            best_d = out_d[i]
            best_i = out_i[i]
            best_d[:] = np.inf
            best_i[:] = -1
            count = 0
            limit = threshold
            # Entries whose code distance alone rules them out, whatever their residual.
            sad_cut = math.floor((limit + rq + res_max) * (1.0 + _SLACK) / step) + 1
            for j in range(n):
                if row[j] > sad_cut:
                    continue
                lower = step * row[j] - rq - e_res[j]
                if lower > limit * (1.0 + _SLACK) + _SLACK:
                    continue
                d = _exact_l1(queries[i], entries[j])
                count += 1
                if d < best_d[k - 1] or (d == best_d[k - 1] and j < best_i[k - 1]):
                    p = k - 1
                    while p > 0 and (best_d[p - 1] > d or (best_d[p - 1] == d and best_i[p - 1] > j)):
                        best_d[p] = best_d[p - 1]
                        best_i[p] = best_i[p - 1]
                        p -= 1
                    best_d[p] = d
                    best_i[p] = j
                    if best_d[k - 1] < limit:
                        limit = best_d[k - 1]
                        sad_cut = math.floor((limit + rq + res_max) * (1.0 + _SLACK) / step) + 1
            scored[i] = count



@cached_njit
def _search_avx512(q_codes, q_res, queries, e_codes, e_res, entries, n, step, k, out_d, out_i, scored):
    """:func:`_search` with 64-byte SADs (AVX-512BW)."""
    _search(_WIDTH_AVX512, q_codes, q_res, queries, e_codes, e_res, entries, n, step, k,
            out_d, out_i, scored)


@cached_njit
def _search_avx2(q_codes, q_res, queries, e_codes, e_res, entries, n, step, k, out_d, out_i, scored):
    """:func:`_search` with 32-byte SADs (AVX2)."""
    _search(_WIDTH_AVX2, q_codes, q_res, queries, e_codes, e_res, entries, n, step, k,
            out_d, out_i, scored)


_KERNELS = {"avx512": _search_avx512, "avx2": _search_avx2}


@dataclass(frozen=True)
class CodeGrid:
    """The shared 8-bit grid: ``x̂[d] = offset[d] + step * code[d]``."""

    offset: np.ndarray
    """(D,) float64 value of code 0 per dimension."""
    step: float
    """Grid spacing, shared by all dimensions."""

    @classmethod
    def fit(cls, entries: np.ndarray, clip_q: float = 1e-3) -> CodeGrid:
        """Centre each dimension's [clip_q, 1 - clip_q] quantile range in [0, 255], one step for all."""
        lo, hi = np.quantile(entries, [clip_q, 1.0 - clip_q], axis=0).astype(np.float64)
        widest = float((hi - lo).max())
        step = widest / 255.0 if widest > 0 else 1.0
        return cls(offset=(lo + hi) / 2.0 - 127.5 * step, step=step)

    def encode(self, x: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes (rows, D padded to ``width``) uint8, zero-padded, and residuals r(x) (rows,) float64."""
        rows, dim = x.shape
        padded = -(-dim // width) * width
        codes = np.zeros((rows, padded), dtype=np.uint8)
        residual = np.empty(rows, dtype=np.float64)
        for i0 in range(0, rows, 8192):
            block = x[i0 : i0 + 8192].astype(np.float64)
            c = np.clip(np.rint((block - self.offset) / self.step), 0, 255)
            codes[i0 : i0 + len(block), :dim] = c.astype(np.uint8)
            residual[i0 : i0 + len(block)] = np.abs(block - (self.offset + self.step * c)).sum(axis=1)
        return codes, residual


class ScreenedL1:
    """Exact L1 k-NN over fixed entries, searched through 8-bit codes (see the module docstring)."""

    def __init__(self, entries: np.ndarray, backend: Backend | None = None, threads: int | None = None) -> None:
        """Encode ``entries`` (N, D) float32; ``backend`` defaults to :func:`screen_backend`."""
        backend = backend or screen_backend()
        if backend is None:
            raise RuntimeError("this CPU has neither AVX-512BW nor AVX2; use faiss's L1 kernel instead")
        self.backend: Backend = backend
        self.entries = np.ascontiguousarray(entries, dtype=np.float32)
        self.threads = threads or len(os.sched_getaffinity(0))
        self.grid = CodeGrid.fit(self.entries)
        width = _SAD[backend][0]
        codes, self._residual = self.grid.encode(self.entries, width)
        # Pad to whole groups of _ROWS entries; padded rows are never read past n.
        n_pad = -(-len(codes) // _ROWS) * _ROWS
        self._codes = np.zeros((n_pad, codes.shape[1]), dtype=np.uint8)
        self._codes[: len(codes)] = codes
        self._residual = np.concatenate([self._residual, np.zeros(n_pad - len(codes))])
        self.queries_seen = 0
        """Queries answered by :meth:`search` so far."""
        self.scored = 0
        """Exact distances computed for them (the screen's cost beyond the SAD pass)."""

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(distances (M, k) float32, ids (M, k) int64), nearest first, lowest id on equal distance."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(self.entries)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        m = len(queries)
        codes, residual = self.grid.encode(queries, _SAD[self.backend][0])
        out_d = np.empty((m, k), dtype=np.float64)
        out_i = np.empty((m, k), dtype=np.int64)
        scored = np.zeros(m, dtype=np.int64)
        kernel = _KERNELS[self.backend]

        def run(i0: int) -> None:
            i1 = min(m, i0 + _QUERIES_PER_TASK)
            kernel(codes[i0:i1], residual[i0:i1], queries[i0:i1], self._codes, self._residual, self.entries,
                   n, self.grid.step, k, out_d[i0:i1], out_i[i0:i1], scored[i0:i1])

        starts = range(0, m, _QUERIES_PER_TASK)
        if self.threads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(run, starts))
        else:
            for i0 in starts:
                run(i0)
        self.queries_seen += m
        self.scored += int(scored.sum())
        return out_d.astype(np.float32), out_i
