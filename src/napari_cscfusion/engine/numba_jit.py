"""numba for the fast path's CPU kernels (dcu_kernel.py, mef_cpu.py), in one place: its
optional import and njit options, whether the kernels may and do run here (``Kernels``),
and the threads they run on (one persistent pool per thread count). numba is optional:
without it, with CSCFUSION_NO_NUMBA set, or when a kernel fails to compile, the callers
run the PyTorch fast form with a FastPathFallback notice."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

try:
    import numba
except ImportError:  # pragma: no cover - exercised by the fallback tests with a stub
    numba = None

NO_NUMBA_ENV = "CSCFUSION_NO_NUMBA"  # set (non-empty): the numba kernels are not used

# fastmath without reassociation: sums stay as written (see jit's ``reassociate``)
_NO_REASSOC = frozenset({"nnan", "ninf", "nsz", "arcp", "contract", "afn"})


def jit(fn=None, *, reassociate: bool = True):
    """numba's njit as the kernels need it (nogil for threads, fastmath: the fast path's
    tolerance allows reassociation), compiled on first call and cached on disk; where no
    cache location is writable, compiled in every process instead. Without numba the
    function stays plain Python and the callers never run it (``Kernels.available``).
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


def switched_off() -> str | None:
    """Why no numba kernel may run here (numba missing, or CSCFUSION_NO_NUMBA set, read at
    each call), or None."""
    if numba is None:
        return "numba is not installed"
    if os.environ.get(NO_NUMBA_ENV):
        return f"{NO_NUMBA_ENV} is set"
    return None


class Kernels:
    """Whether one module's numba kernels run here: numba importable and not switched off
    (``switched_off``), and the kernels compiled for the input kind ``key``: ``smoke(*key)``
    runs them on tiny inputs, once per key and process (from numba's disk cache after the
    first session). A failure to compile is remembered; ``why()`` says what stops them."""

    def __init__(self, what: str, smoke):
        self.what, self.smoke = what, smoke
        self._ready: set = set()
        self._failed: str | None = None
        self._lock = threading.Lock()

    def available(self, *key) -> bool:
        with self._lock:
            if switched_off() is not None or self._failed is not None:
                return False
            if key not in self._ready:
                try:
                    self.smoke(*key)
                except Exception as exc:  # numba's errors have no common public base
                    self._failed = (f"numba failed to compile {self.what} "
                                    f"({type(exc).__name__}: {exc})")
                    return False
                self._ready.add(key)
            return True

    def why(self) -> str | None:
        """What stops the kernels (None where they ran or may run)."""
        return switched_off() or self._failed

    def check(self, *key) -> None:
        """RuntimeError saying why unless ``available(*key)``."""
        if not self.available(*key):
            raise RuntimeError(f"{self.what} is not available: {self.why()}")


def threads() -> int:
    """How many threads the kernels use by default: as many as torch."""
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return os.cpu_count() or 1


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def pool(n: int) -> ThreadPoolExecutor:
    """The process's pool of ``n`` kernel threads (kept: starting threads per call costs
    more than a small tile; the kernels release the GIL)."""
    with _pools_lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="cscfusion-numba")
        return _pools[n]


def on_threads(n: int, fn, args) -> None:
    """fn(*args, i, n) for i < n on ``n`` threads (each call takes every n-th job)."""
    wait_all([pool(n).submit(fn, *args, i, n) for i in range(n)])


def split(fn, args, jobs: int, threads_: int | None = None) -> None:
    """fn(*args, i, n) for i < n, n = min(``threads_`` (default ``threads()``), ``jobs``):
    in this thread for n = 1, else on the pool."""
    n = max(1, min(threads_ or threads(), jobs))
    if n == 1:
        fn(*args, 0, 1)
    else:
        on_threads(n, fn, args)


def wait_all(futures: list[Future], tick=None) -> None:
    """Wait for ``futures`` in order, ``tick()`` after each; on an error (or a tick raising
    to cancel) the futures not yet started are dropped, the running ones finished (nothing
    of the call goes on in the background), and it is raised."""
    try:
        for f in futures:
            f.result()
            if tick is not None:
                tick()
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)
        raise
