"""Compiled loops (numba) whose machine code is cached on disk, shared by the library's hot paths.

numba keys its cache on a function's code and the pickled values of its globals and closure, and
stores it beside the module (``__pycache__``): the first process on a machine compiles (1-2 s per
kernel), the next ones load it. Where no cache folder is writable (a read-only install without a
home), numba refuses ``cache=True`` when the function is decorated; the loop then compiles in each
process instead: the same code, the same results. No fastmath anywhere: fused or reassociated
arithmetic would change results' last bits, and outputs must be the same bytes on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FAST: dict[str, Any] = {"nogil": True, "boundscheck": False}
"""Options of every cached loop: releases the GIL, no bounds checks."""


def cached_njit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``numba.njit(cache=True, nogil=True, boundscheck=False, **options)``, or without the cache where numba
    has nowhere to write it. Use as ``@cached_njit`` or ``@cached_njit(inline="always")``.

    numba is imported at the first decoration, so a module may defer it by decorating lazily.
    """
    import numba

    def wrap(f: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, **FAST, **options)(f)
        except RuntimeError:
            return numba.njit(**FAST, **options)(f)

    return wrap(fn) if fn is not None else wrap
