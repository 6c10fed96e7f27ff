"""Mean-free PCA of ground-truth displacement patches: the basis the detail generator predicts weights of.

The original release's generator outputs 64 weights of a PCA of displacement patches
(``project.mat['p'][:, :64]``, 65,536 x 64 for 256² patches) and reconstructs a patch as
``basis.T @ weights`` with **no mean term**; one PCA per face region (upper, lower). The basis is
therefore the top right singular vectors of the uncentred patch matrix ``X`` (N patches x D
texels), and what a component "explains" is *energy* ``σ_i² / Σ‖x‖²`` (mean-free: the second
moment about 0, not the variance about the mean); :attr:`PatchPCA.explained_ratio` is that.

Why written here: the paper's matrix (~2M patches of 65,536 values, ~0.5 TB as float32) does not
fit in memory, and neither library routine fits the problem: scikit-learn's ``randomized_svd``
multiplies by the matrix held in memory, and ``IncrementalPCA`` streams batches but centres the
data (subtracts a running mean), which is a different basis from the release's. (scikit-learn is
not a dependency either.) Two solvers, both streaming the batches of a callable that returns a
fresh iterator of (n_i, D) float32 batches, so the data is read in several passes:

* ``randomized``: the randomized range finder of Halko, Martinsson & Tropp (2011, Alg. 4.4
  with oversampling ``p`` and ``q`` power iterations), run on the row side through the Gram
  operator ``G = XᵀX = Σ X_iᵀ X_i``, which one pass applies to a (D, k+p) block. The sketch
  ``Z = G^(q+1) Ω`` (Ω Gaussian, re-orthonormalised after each pass) spans exactly the subspace
  from which Halko's algorithm takes its right singular vectors (the row space of ``B = QᵀX``
  with ``Q = orth((XXᵀ)^q XΩ)`` is ``(XᵀX)^(q+1) Ω``), so the accuracy is the same, but it
  needs ``q + 2`` passes instead of ``2q + 2`` and memory ``O((k+p)·D)``, without the textbook
  version's (N, k+p) sketch ``Y = XΩ`` (2M x 74 float64 = 1.2 GB at the paper's scale). A last
  pass forms ``QᵀGQ`` for the Rayleigh-Ritz step: its eigenpairs give ``σ²`` and the rotation
  of ``Q`` into the basis;
* ``gram``: the exact ``G`` (D x D, float64) in one pass and its top ``k`` eigenpairs; exact,
  ``O(D²)`` memory, ``O(N·D²)`` time for ``G`` and ``O(D³)`` for the eigenpairs: for small patches.

``auto`` picks ``gram`` up to ``gram_max_dim`` values per patch (1,024 = 32²). Measured on this
project's 2-core machine, 20,000 patches of 64² (D = 4,096), 64 components: ``gram`` 33 s (of
which ~20 s are LAPACK's eigenpairs of the 4,096² matrix), ``randomized`` (p = 10, q = 4,
6 passes) 11-13 s, the two agreeing to 2e-5 in captured energy. All products accumulate in
float64, so a result depends on the batch partition only at rounding level (~1e-12); a fixed
partition (the patch source's is) gives the same bytes on every run with the same BLAS. Each
basis row has unit norm and a deterministic sign: its entry of largest magnitude is positive.

Patches (:class:`DisplacementPatches`) come from a ``capture_gt`` output folder: each item's
``displacement.npy`` (mm) and ``mask.png``, cut per region by :mod:`facedetail.capture.patches`.
Invalid texels inside a kept patch are set to 0: in a mean-free PCA a 0 adds no energy and pulls
no direction (whereas a mean fill would add a constant component), and the network's loss on
those texels is masked anyway, so what the basis does there never matters.

Bases are saved as ``bases.safetensors`` (one (k, D) float32 tensor per region, with metadata)
and as ``<region>.npy``. The safetensors file is written by the small writer here, following the
format's specification (8-byte little-endian header length, JSON header padded to 8 bytes, raw
little-endian data), not by the ``safetensors`` package: the package (0.8) writes ``__metadata__``
in the order of a Rust ``HashMap``, which changes from process to process (five runs, five
different files), so the stage's output would not be byte-identical on a rerun. The writer here
sorts the keys; without metadata its bytes equal the package's, and the package reads its files
(both tested).
"""

from __future__ import annotations

import io
import itertools
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from facedetail.capture.maps import DISPLACEMENT, MASK_PNG, decode_png
from facedetail.capture.patches import RegionBox, patch_origins
from facedetail.io.atomic import atomic_write_bytes

Method = Literal["auto", "randomized", "gram"]
BatchSource = Callable[[], Iterable[NDArray[np.floating]]]
"""Returns a fresh iterator of (n_i, D) batches, the same rows in the same order on every call."""

BASES_FILE = "bases.safetensors"
GRAM_MAX_DIM = 1024
"""``auto`` uses the exact Gram matrix up to this many values per patch (32²; the D³ eigensolver takes
under a second there and ~20 s at 64² on 2 cores)."""
BATCH_TEXELS = 1 << 24
"""Texels per batch of :class:`DisplacementPatches` (64 MB of float32). Fixed, not a parameter: the
partition sets the float64 summation order, hence the last bits of the result."""

_ST_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64", np.dtype("<i4"): "I32"}
_ST_NUMPY = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True, eq=False)
class PatchPCA:
    """A mean-free PCA of N patches of D values."""

    basis: NDArray[np.float32]
    """(k, D) unit rows, largest-magnitude entry of each positive; a patch ≈ ``basis.T @ weights``."""
    singular_values: NDArray[np.float64]
    """(k,) descending; ``σ_i² = Σ_n (x_n · basis_i)²``."""
    energy: float
    """``Σ‖x‖²`` over all patches (mm² when the patches are in mm): the total that ratios are of."""
    count: int
    """N, patches seen."""
    method: Literal["randomized", "gram"]
    """The solver that ran (``auto`` resolved)."""
    passes: int
    """Passes made over the batches."""

    @property
    def explained_ratio(self) -> NDArray[np.float64]:
        """(k,) share of the total energy ``Σ‖x‖²`` each component captures (energy, not variance: mean-free)."""
        return self.singular_values**2 / self.energy

    @property
    def cumulative_ratio(self) -> NDArray[np.float64]:
        """(k,) energy captured by the first 1..k components together."""
        return np.cumsum(self.explained_ratio)


# --- the solvers --------------------------------------------------------------------------------


class _Passes:
    """Streams the batches, applying the Gram operator; checks every pass sees the same data."""

    def __init__(self, batches: BatchSource) -> None:
        self.batches = batches
        self.count: int | None = None
        self.energy: float | None = None
        self.dim: int | None = None
        self.passes = 0

    def _iter(self) -> Iterator[NDArray[np.float64]]:
        for batch in self.batches():
            x = np.asarray(batch)
            if x.ndim != 2 or (self.dim is not None and x.shape[1] != self.dim):
                raise ValueError(f"batches must be (n, D) with one D; got {x.shape} after D = {self.dim}")
            if x.shape[0] == 0:
                continue
            self.dim = x.shape[1]
            x = x.astype(np.float64)
            if not np.isfinite(x).all():
                raise ValueError("a batch has non-finite values (NaN or inf): fill invalid texels first")
            yield x

    def _finish(self, count: int, energy: float) -> None:
        if count == 0:
            raise ValueError("no patches: every batch is empty")
        self.passes += 1
        if self.count is None:
            self.count, self.energy = count, energy
        elif count != self.count or not np.isclose(energy, self.energy, rtol=1e-9, atol=0.0):
            raise ValueError(f"the batches changed between passes ({self.count} then {count} rows): the source "
                             "must return the same data on every call")

    def dimension(self) -> int:
        """D, from the first non-empty batch (reads one batch)."""
        if self.dim is None:
            for _ in self._iter():
                break
        if self.dim is None:
            raise ValueError("no patches: every batch is empty")
        return self.dim

    def gram(self) -> NDArray[np.float64]:
        """``XᵀX`` (D, D) in one pass."""
        g, count, energy = np.zeros((self.dimension(),) * 2), 0, 0.0
        for x in self._iter():
            g += x.T @ x
            count += x.shape[0]
            energy += float(np.einsum("ij,ij->", x, x))
        self._finish(count, energy)
        return g

    def apply(self, m: NDArray[np.float64]) -> NDArray[np.float64]:
        """``XᵀX m`` for a (D, l) block in one pass (``X_iᵀ (X_i m)``: nothing of size N is kept)."""
        out, count, energy = np.zeros_like(m), 0, 0.0
        for x in self._iter():
            out += x.T @ (x @ m)
            count += x.shape[0]
            energy += float(np.einsum("ij,ij->", x, x))
        self._finish(count, energy)
        return out


def _orthonormal(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """An orthonormal basis of the columns of a tall (D, l) block (Householder QR)."""
    # One BLAS thread: OpenBLAS's threaded QR of a tall, thin block is ~30x slower here (1.1 s vs
    # 36 ms at 4,096 x 74 on 2 busy cores), its threads mostly waiting on each other's small panels.
    with threadpool_limits(1):
        return np.linalg.qr(z)[0]


def _signed_unit_rows(v: NDArray[np.float64]) -> NDArray[np.float32]:
    """(k, D) rows of unit norm whose largest-magnitude entry (the first such) is positive."""
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    lead = v[np.arange(v.shape[0]), np.abs(v).argmax(axis=1)]
    return (v * np.where(lead < 0, -1.0, 1.0)[:, None]).astype(np.float32)


def uncentred_pca(batches: BatchSource, components: int, *, method: Method = "auto", oversample: int = 10,
                  power_iterations: int = 4, seed: int = 0, gram_max_dim: int = GRAM_MAX_DIM) -> PatchPCA:
    """The top ``components`` right singular vectors of the uncentred matrix the batches stack up.

    ``method``: ``randomized`` (streaming range finder, ``power_iterations + 2`` passes), ``gram``
    (exact, one pass, D x D memory) or ``auto`` (``gram`` for ``D <= gram_max_dim``). ``seed``
    seeds the Gaussian test matrix (a NumPy Generator; ``gram`` draws nothing).
    """
    if components < 1 or oversample < 0 or power_iterations < 0:
        raise ValueError("components must be positive, oversample and power_iterations non-negative")
    passes = _Passes(batches)
    dim = passes.dimension()
    chosen: Literal["randomized", "gram"] = ("gram" if dim <= gram_max_dim else "randomized") if method == "auto" \
        else method
    if chosen == "gram":
        g = passes.gram()
        _check_rank(components, passes.count, dim)
        # Only the top eigenpairs (LAPACK's subset driver): much faster than all D of them.
        w, v = scipy.linalg.eigh(g, subset_by_index=[dim - components, dim - 1])
        w, v = w[::-1], v[:, ::-1]
    elif chosen == "randomized":
        width = min(components + oversample, dim)
        omega = np.random.default_rng(seed).standard_normal((dim, width))
        z = passes.apply(omega)
        _check_rank(components, passes.count, dim)
        for _ in range(power_iterations):
            # Re-orthonormalise between passes, or every column drifts to the top singular vector.
            z = passes.apply(_orthonormal(z))
        q = _orthonormal(z)
        h = q.T @ passes.apply(q)  # Rayleigh-Ritz: QᵀGQ, (l, l)
        w, u = np.linalg.eigh((h + h.T) / 2.0)
        w, v = w[::-1][:components], (q @ u[:, ::-1])[:, :components]
    else:
        raise ValueError(f"unknown method {method!r}: auto, randomized or gram")
    count, energy = int(passes.count or 0), float(passes.energy or 0.0)
    if energy <= 0:
        raise ValueError("every patch is zero: there is no energy to explain")
    return PatchPCA(_signed_unit_rows(v.T), np.sqrt(np.clip(w, 0.0, None)), energy, count, chosen, passes.passes)


def _check_rank(components: int, count: int | None, dim: int) -> None:
    if count is not None and components > min(count, dim):
        raise ValueError(f"{components} components need at least as many patches and values per patch "
                         f"({count} patches of {dim})")


def array_batches(x: NDArray[np.floating], sizes: Sequence[int] | int) -> BatchSource:
    """A batch source over an in-memory matrix: consecutive row blocks of ``sizes`` (or of one size)."""
    n = x.shape[0]
    bounds = [*range(0, n, sizes), n] if isinstance(sizes, int) else [0, *np.cumsum(sizes).tolist()]
    if bounds[-1] != n:
        raise ValueError(f"batch sizes add up to {bounds[-1]}, not {n}")
    return lambda: (x[a:b] for a, b in itertools.pairwise(bounds))


# --- patches from capture_gt maps ----------------------------------------------------------------


def map_shape(maps_dir: Path | str, item: str) -> tuple[int, ...]:
    """The shape of one item's ``displacement.npy`` (read from its header only)."""
    return tuple(np.load(Path(maps_dir) / "maps" / item / DISPLACEMENT, mmap_mode="r", allow_pickle=False).shape)


@dataclass(frozen=True)
class DisplacementPatches:
    """The patches of one face region over some ``capture_gt`` items: a re-readable batch source.

    Each call streams the items in the given order, cutting ``size``² windows at ``stride`` from
    ``box`` whose valid fraction is at least ``min_valid``; a batch is (n, size²) float32 mm, rows
    of a patch flattened row-major, invalid texels 0 (see the module docstring).
    """

    maps_dir: Path
    """A ``capture_gt`` output folder (``maps/<subject>/<expression>/``)."""
    items: tuple[str, ...]
    """Item ids (``subject/expression``) to read, in this order (the training items only)."""
    box: RegionBox
    """The face region the patches lie in, wholly."""
    size: int
    """Patch side in texels."""
    stride: int
    """Step between patch origins in texels."""
    min_valid: float
    """Least valid fraction of a patch's texels for it to be kept."""

    def _load(self, item: str) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        folder = Path(self.maps_dir) / "maps" / item
        disp = np.load(folder / DISPLACEMENT, allow_pickle=False)
        # As facedetail.capture.maps.load_item reads it, without decoding the normals (not needed here).
        valid = (decode_png(folder / MASK_PNG) > 127) & np.isfinite(disp)
        return np.where(valid, disp, np.float32(0.0)).astype(np.float32), valid

    def origins(self, item: str) -> NDArray[np.int64]:
        """(n, 2) top-left corners of the item's kept patches."""
        _, valid = self._load(item)
        return patch_origins(valid, self.box, self.size, self.stride, self.min_valid)

    def counts(self) -> dict[str, int]:
        """Patches per item."""
        return {item: len(self.origins(item)) for item in self.items}

    def __call__(self) -> Iterator[NDArray[np.float32]]:
        per_batch = max(1, BATCH_TEXELS // (self.size * self.size))
        offs = np.arange(self.size)
        for item in self.items:
            disp, valid = self._load(item)
            origins = patch_origins(valid, self.box, self.size, self.stride, self.min_valid)
            # Cut in chunks (as facedetail.capture.patches.cut_patches does, without its full copy):
            # one item's patches at 4096² are ~400 MB.
            for start in range(0, len(origins), per_batch):
                o = origins[start:start + per_batch]
                rr = o[:, 0, None, None] + offs[None, :, None]
                cc = o[:, 1, None, None] + offs[None, None, :]
                yield disp[rr, cc].reshape(len(o), -1)


def basis_sheet(bases: Mapping[str, NDArray[np.floating]], size: int, columns: int = 16,
                tile: int = 64) -> NDArray[np.uint8]:
    """An 8-bit sheet of the first ``columns`` components of each region (a row each, in the given order):
    each tile scaled by its own largest magnitude, mid-grey = 0, upscaled to at least ``tile`` px."""
    scale = max(1, -(-tile // size))
    side, gap = size * scale, 2
    columns = min(columns, max(len(b) for b in bases.values()))
    rows = []
    for basis in bases.values():
        b = np.asarray(basis, np.float64)[:columns].reshape(-1, size, size)
        peak = np.abs(b).max(axis=(1, 2), keepdims=True)
        tiles = np.round(127.5 + 127.5 * b / np.where(peak > 0, peak, 1.0)).astype(np.uint8)
        row = np.zeros((side, columns * (side + gap) - gap), np.uint8)
        for i, t in enumerate(tiles):
            row[:, i * (side + gap):i * (side + gap) + side] = np.repeat(np.repeat(t, scale, 0), scale, 1)
        rows.append(row)
    sheet = np.zeros((len(rows) * (side + gap) - gap, rows[0].shape[1]), np.uint8)
    for i, row in enumerate(rows):
        sheet[i * (side + gap):i * (side + gap) + side] = row
    return sheet


# --- files ---------------------------------------------------------------------------------------


def safetensors_bytes(tensors: Mapping[str, NDArray[np.generic]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``tensors`` (in name order) with string ``metadata``; deterministic."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if np.dtype(dtype) not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} is not supported here")
        data = a.astype(dtype, copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read_safetensors(path: Path | str) -> tuple[dict[str, NDArray[np.generic]], dict[str, str]]:
    """Tensors and metadata of a safetensors file (the dtypes :func:`safetensors_bytes` writes)."""
    raw = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size].decode("utf-8"))
    data = memoryview(raw)[8 + size:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        tensors[name] = np.frombuffer(data[begin:end], _ST_NUMPY[spec["dtype"]]).reshape(spec["shape"]).copy()
    return tensors, metadata


def save_bases(folder: Path | str, bases: Mapping[str, NDArray[np.float32]], metadata: Mapping[str, str]) -> list[str]:
    """Write ``bases.safetensors`` (every region, with ``metadata``) and ``<region>.npy``; the file names."""
    folder = Path(folder)
    atomic_write_bytes(folder / BASES_FILE, safetensors_bytes({k: np.asarray(v, np.float32) for k, v in bases.items()},
                                                              metadata))
    names = [BASES_FILE]
    for region in sorted(bases):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(bases[region], np.float32), allow_pickle=False)
        atomic_write_bytes(folder / f"{region}.npy", buf.getvalue())
        names.append(f"{region}.npy")
    return names


def load_bases(folder_or_file: Path | str) -> tuple[dict[str, NDArray[np.float32]], dict[str, str]]:
    """The (k, D) basis of each region and the metadata, from ``bases.safetensors`` (or its folder)."""
    path = Path(folder_or_file)
    tensors, metadata = read_safetensors(path / BASES_FILE if path.is_dir() else path)
    return {k: v.astype(np.float32, copy=False) for k, v in tensors.items()}, metadata
