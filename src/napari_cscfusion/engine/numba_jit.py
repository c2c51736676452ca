"""numba for the fast path's CPU kernels (dcu_kernel.py, mef_cpu.py), imported and applied
in one place: numba is optional (without it the PyTorch fast form runs)."""

from __future__ import annotations

try:
    import numba
except ImportError:  # pragma: no cover - exercised by the fallback tests with a stub
    numba = None


# fastmath without reassociation: sums stay as written (see jit's ``reassociate``)
_NO_REASSOC = frozenset({"nnan", "ninf", "nsz", "arcp", "contract", "afn"})


def jit(fn=None, *, reassociate: bool = True):
    """numba's njit as the kernels need it (nogil for threads, fastmath: the fast path's
    tolerance allows reassociation), compiled on first call and cached on disk; where no
    cache location is writable, compiled in every process instead. Without numba the
    function stays plain Python and the callers never run it (their ``available()``).
    ``reassociate=False`` keeps the order of additions as written: LLVM otherwise turns a
    sum written as independent partial sums back into one chain of dependent FMAs, whose
    latency bounds a loop that has no reduction to vectorise."""
    if fn is None:
        return lambda f: jit(f, reassociate=reassociate)
    if numba is None:
        return fn
    options = {"nogil": True, "fastmath": True if reassociate else set(_NO_REASSOC),
               "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # numba refuses cache=True with no writable cache directory
        return numba.njit(**options)(fn)
