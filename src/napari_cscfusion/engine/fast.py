"""The engine side of the fast path (models/fastpath.py): which runs take it, the compiled
copies of the networks (one per network and device, with an eager fallback), and crops of
one fixed shape, so that a compiled graph is built once per run rather than per tile shape.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from ..models import fastpath
from . import notices

_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def use_fast_path(net: nn.Module, exact: bool) -> bool:
    """The fast form unless ``exact`` or a soft threshold is negative (see fastpath)."""
    return fastpath.fast_path_applies(net, exact)


class Compiled:
    """``torch.compile`` (inductor, weights frozen into the graph) of a callable, falling back
    to the eager call with a notice when compilation fails (no C++ compiler, an unsupported
    platform): the fast form is still exact to the tolerance, only slower."""

    def __init__(self, fn, dynamic: bool | None = None):
        self.eager = fn
        self.fn = torch.compile(fn, dynamic=dynamic, options={"freezing": True})
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.fn(*args)
            except Exception as exc:  # inductor/dynamo errors have no common public base
                if notices.is_oom(exc):
                    raise
                self.failed = True
                notices.notify(f"torch.compile failed ({type(exc).__name__}); the fast path "
                               f"runs uncompiled (slower)")
        return self.eager(*args)


def fast_network(task: str, net: nn.Module, compile: bool = True, **kw) -> nn.Module:
    """The fast form of ``net`` for ``task`` (cached per network, weights version and compile
    flag), in eval mode on the network's device."""
    p = next(net.parameters())
    key = (task, str(p.device), bool(compile), p.data_ptr(), p._version,
           tuple(sorted(kw.items())))
    with _lock:
        per_net = _cache.setdefault(net, {})
        if key not in per_net:
            with torch.no_grad():
                f = _FAST[task](net, **kw).to(p.device).eval()
            per_net.clear()
            per_net[key] = (f, compile)
        return per_net[key][0]


_FAST = {"ivf": fastpath.FastIVFN, "mef": fastpath.FastMEFN, "mmf": None}


def fixed_span(lo: int, hi: int, n: int, side: int, halo: int) -> tuple[int, int]:
    """The crop [a, b) of a core [lo, hi) along an axis of length n: core + halo clipped to
    [0, n), then grown (forwards, or backwards at the end) to ``side`` (or n) pixels, so that
    every crop of a run has one shape. A grown crop only adds context: where it touches the
    border, its edge is the border, as in the clipped crop."""
    a, b = max(0, lo - halo), min(n, hi + halo)
    want = min(n, side)
    if b - a < want:
        b = min(n, a + want)
        a = b - want
    return a, b


def spans(n: int, step: int) -> list[tuple[int, int]]:
    """Equal-ish cores of at most ``step`` covering [0, n)."""
    k = max(1, -(-n // step))
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def fixed_tiles(shape: tuple[int, int], tile: int, halo: int):
    """(core, crop) boxes (y0, y1, x0, x1) covering ``shape``: cores of at most ``tile``, crops
    of one shape (``fixed_span``)."""
    H, W = shape
    side = tile + 2 * halo
    out = []
    for y0, y1 in spans(H, tile):
        a, b = fixed_span(y0, y1, H, side, halo)
        for x0, x1 in spans(W, tile):
            c, d = fixed_span(x0, x1, W, side, halo)
            out.append(((y0, y1, x0, x1), (a, b, c, d)))
    return out
