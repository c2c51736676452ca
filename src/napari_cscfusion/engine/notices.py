"""Notices: what a fusion run had to do differently from what was asked, and says so.

Out of memory (issue 7): a tile that runs out of memory is split and retried (tiling.run_tiled),
and when even the smallest tiles do not fit on a GPU the fusion is rerun on the CPU
(``on_device_or_cpu``; lazy runs do both inside each dask task, lazy.py). Each such event is

* a ``warnings.warn`` of category ``OutOfMemoryRetry`` (a RuntimeWarning: shown by default, unlike
  ResourceWarning, which Python ignores unless asked), and
* a line in the result's ``metadata["notices"]`` (``result.base_metadata`` takes the lines
  recorded on this thread since the run began).

State is per thread (a fusion run happens on one thread; the GUI runs several at once), started
by ``begin_run`` and taken by ``take``. A run that raises discards its notices.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
import warnings

import torch


class OutOfMemoryRetry(RuntimeWarning):
    """A fusion run ran out of memory and was retried with smaller tiles, or on the CPU."""


class FastPathFallback(RuntimeWarning):
    """The fast path ran a slower form than usual (its numba kernel or compiler unavailable);
    the result is the same to the fast path's tolerance."""


class _State(threading.local):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fallback: torch.device | None = None  # the device the run gave up on
        self.gave_up: int | None = None  # run_tiled's smallest tiles (px) still ran out
        self.quiet = 0  # > 0: record only (the caller shows metadata["notices"] itself)


_state = _State()


def begin_run() -> None:
    """Forget what an earlier run on this thread recorded (the start of a fuse_* call)."""
    _state.lines = []
    _state.fallback = None
    _state.gave_up = None


discard = begin_run  # a run that raised: its notices go with it


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside this package (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def notify(message: str, category: type[Warning] = OutOfMemoryRetry) -> None:
    """Record ``message`` for this run's metadata (once) and warn with it, attributed to the
    user's call into the package."""
    if message not in _state.lines:
        _state.lines.append(message)
    if not _state.quiet:
        warnings.warn(message, category, stacklevel=_caller_level())


def take(device: torch.device | str) -> tuple[list[str], str]:
    """(the notices of this run, the device it finally ran on) for the metadata; resets."""
    lines = list(_state.lines)
    used = "cpu" if _state.fallback is not None else str(device)
    begin_run()
    return lines, used


def gave_up_splitting(side: int) -> None:
    """run_tiled: its smallest tiles (``side`` px) ran out of memory too."""
    _state.gave_up = side


def device_for(device: torch.device) -> torch.device:
    """``device``, or the CPU once this run has fallen back to it (later planes go there at
    once rather than failing on the GPU again)."""
    return torch.device("cpu") if _state.fallback is not None else device


@contextlib.contextmanager
def recorded_only():
    """Within: notices are recorded in the metadata but not warned (on this thread only) — for
    callers that show ``metadata["notices"]`` themselves (the GUI worker)."""
    _state.quiet += 1
    try:
        yield
    finally:
        _state.quiet -= 1


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError (torch >= 2.5 also uses it for MPS), or older MPS and CUDA
    runtime errors that say so."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cached(device: torch.device) -> None:
    """Give the allocator's cached blocks back after an out-of-memory error."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache"):
            with contextlib.suppress(RuntimeError):
                mps.empty_cache()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Hand the pages of freed heap memory back to the OS (glibc ``malloc_trim(0)``); called
    after every tile. Why: a tile's tens-of-MB temporaries come from the heap, and the small
    results kept between them (per-tile extremes, histograms) pin its top, so glibc, which
    only shrinks the heap from the top, kept every tile's freed pages: a 64 Mpx IVF run grew
    by ~7 MB per tile (measured 0.5 -> 1.6 GB in the first pass) with 99 MB in use. Returns
    whether it could ask (False where the C library has no malloc_trim)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def on_device_or_cpu(attempt, device: torch.device):
    """``attempt(device)``; if that runs out of memory on a device other than the CPU (after
    run_tiled has split its tiles down to the smallest), ``attempt(cpu)`` with a notice. The
    CPU is then used for the rest of this run. Any other failure propagates (and discards the
    run's notices)."""
    dev = device_for(device)
    try:
        return attempt(dev)
    except BaseException as exc:
        if dev.type == "cpu" or not is_oom(exc):
            discard()
            raise
    free_cached(dev)
    how = f" even with {_state.gave_up} px tiles" if _state.gave_up else ""
    _state.fallback = dev
    notify(f"out of memory on {dev}{how}; ran on the CPU instead (slower)")
    try:
        return attempt(torch.device("cpu"))
    except BaseException:
        discard()
        raise
