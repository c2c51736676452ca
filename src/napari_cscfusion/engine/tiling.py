"""Tiled inference, generic: every network and rule runs on overlapping tiles, with a result
equal to the whole-image one (to float rounding) because each tile carries a halo as wide as
the context its core pixels depend on. This module knows no network: it runs *kernels*.

A kernel (ivf.IVFKernel, mef.MEFKernel, mmf.MMFKernel) is the whole fusion pipeline of one task
on one crop. What the runners here (and lazy.py) use of it:

* ``halo`` (context in px), ``device``, ``bytes_per_pixel`` (+ optional ``fixed_bytes``),
  ``preferred_tile(device)``, ``outputs()`` ({name: channels}), ``steps(crop_shape, core)``
  (progress ticks of one crop), ``plane_shape(x)``, ``crop(x, tile)`` -> (crop, core in it),
  and ``kernel(crop, core, stats, tick)`` -> {name: (c, h, w) float32 of the core};
* ``needs_stats``: whole-image statistics first when tiled, by ``stats_tiles(shape, tile)``,
  ``extremes(crop, core)``, ``counts(crop, core, stats)`` and ``enc_radius`` (the saliency
  rule's per-channel extremes and histograms; rules.SaliencyStats);
* optional ``INNER_TILE`` ({"cpu", "gpu"}: the side of the cache-sized pieces it runs its
  encoders on, ``inner``) and ``in_parts(crop, core)`` (a kernel whose crop is not one
  array: its own split of a tile task that ran out of memory; lazy.py).

Pieces, all used both by the in-memory runner (``run_tiled``) and the dask one (``lazy.py``):

* ``Tile`` / ``sub_tiles``: cores that partition a window, crops = core + halo clipped to the
  image (at the image border the crop edge *is* the border, so the networks' reflection padding
  happens exactly where it does on the whole image); ``map_in_pieces`` the same inside a crop.
* Memory: ``auto_tile`` picks the tile side from free memory (CUDA: ``torch.cuda.mem_get_info``;
  CPU: psutil, capped so that huge images run in bounded memory) and the kernel's bytes per
  pixel; ``run_tiled`` splits a tile that runs out of memory into four and goes on, with a
  notice (notices.py; the fallback to the CPU is there too).
* Statistics passes: ``saliency_statistics`` (two passes over tiles with the encoder's halo
  only), ``measured_in_parts``, ``combine_extremes`` / ``with_histogram``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .notices import free_cached, gave_up_splitting, is_oom, notify, release_freed_memory
from .rules import SaliencyStats

MIN_TILE = 32  # smallest core side; below it the halo overhead makes tiling pointless


def splittable_oom(exc: BaseException, box) -> bool:
    """Whether ``exc`` is out of memory on a tile ``box`` (y0, y1, x0, x1) that can still be
    split in quarters (its longer side at least 2 * MIN_TILE)."""
    return is_oom(exc) and max(box[1] - box[0], box[3] - box[2]) >= 2 * MIN_TILE


CPU_BUDGET_FRACTION = 0.25  # of psutil's available memory: a whole image whose working set
# fits is run at once (fastest); larger ones are tiled, and then the tile and the results
# held in memory share at most 2 GiB (big images run in bounded memory), the tile at least
# 512 MiB (smaller tiles pay too much halo)
CPU_BUDGET_CAP = 2 << 30
CPU_TILE_FLOOR = 512 << 20
CUDA_BUDGET_FRACTION = 0.6  # of the free GPU memory

PRECISIONS = {None: None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16,
              "fp64": torch.float64}  # fp64: a check of the tiling (no rounding to hide in)


def precision_dtype(precision: str | None) -> torch.dtype | None:
    """The ``precision=`` argument of the fuse functions -> the networks' dtype (None: fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected None/'fp32', 'fp16' or 'bf16', got {precision!r}")
    return PRECISIONS[precision]


# --- tile geometry --------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


def within(box: Box, outer: Box) -> Box:
    """``box`` in the coordinates of ``outer`` (both in the same frame)."""
    return (box[0] - outer[0], box[1] - outer[0], box[2] - outer[2], box[3] - outer[2])


def cut(a: torch.Tensor, box: Box, outer: Box) -> torch.Tensor:
    """The ``box`` part of ``a``, whose last two axes cover ``outer``."""
    y0, y1, x0, x1 = within(box, outer)
    return a[..., y0:y1, x0:x1]


@dataclass(frozen=True)
class Tile:
    core: Box  # the pixels this tile produces (image coordinates)
    crop: Box  # core + halo, clipped to the bounds (image coordinates)

    @property
    def core_slices(self) -> tuple[slice, slice]:
        return slice(self.core[0], self.core[1]), slice(self.core[2], self.core[3])

    @property
    def crop_slices(self) -> tuple[slice, slice]:
        return slice(self.crop[0], self.crop[1]), slice(self.crop[2], self.crop[3])

    @property
    def inner(self) -> Box:
        """The core in the crop's coordinates."""
        return within(self.core, self.crop)


def expand(box: Box, by: int, bounds: Box) -> Box:
    """``box`` grown by ``by`` pixels on every side, clipped to ``bounds``."""
    return (max(bounds[0], box[0] - by), min(bounds[1], box[1] + by),
            max(bounds[2], box[2] - by), min(bounds[3], box[3] + by))


def _starts(lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil((hi - lo) / step))
    # equal-ish pieces rather than a thin last one (a thin tile pays the full halo)
    edges = [lo + round(i * (hi - lo) / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def sub_tiles(window: Box, bounds: Box, tile: int | None, halo: int) -> list[Tile]:
    """Cores of side <= ``tile`` that partition ``window``; crops are cores + ``halo`` clipped
    to ``bounds`` (the extent of the data at hand). ``tile`` None or 0: one tile."""
    if not tile:
        return [Tile(window, expand(window, halo, bounds))]
    out = []
    for y0, y1 in _starts(window[0], window[1], tile):
        for x0, x1 in _starts(window[2], window[3], tile):
            core = (y0, y1, x0, x1)
            out.append(Tile(core, expand(core, halo, bounds)))
    return out


def _grown_span(a: int, b: int, lo: int, hi: int, side: int) -> tuple[int, int]:
    want = min(hi - lo, side)
    if b - a < want:
        b = min(hi, a + want)
        a = b - want
    return a, b


def grown(t: Tile, bounds: Box, side: int) -> Tile:
    """``t`` with its crop grown (forwards, or backwards at the end of ``bounds``) to ``side``
    pixels per axis, or the bounds' extent: every crop of a window then has one shape, so a
    compiled graph is built once (fast path). Growing only adds context; where a crop
    touches the bounds its edge is their edge, as before."""
    y = _grown_span(t.crop[0], t.crop[1], bounds[0], bounds[1], side)
    x = _grown_span(t.crop[2], t.crop[3], bounds[2], bounds[3], side)
    return Tile(t.core, (*y, *x))


def tile_grid(shape: tuple[int, int], tile: int | None, halo: int) -> list[Tile]:
    """Tiles covering an image of ``shape`` (H, W)."""
    full = (0, shape[0], 0, shape[1])
    return sub_tiles(full, full, tile, halo)


# --- memory ---------------------------------------------------------------------------------

def available_memory(device: torch.device) -> int:
    """Bytes a fusion may use on ``device``: a share of the free GPU memory, or of the
    memory the system has available (psutil)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_BUDGET_FRACTION)
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # psutil is optional: assume a modest machine
        available = 4 << 30
    return int(available * CPU_BUDGET_FRACTION)


def memory_budget(device: torch.device, held: int = 0) -> int:
    """Bytes one tile's working set may take on ``device`` in a tiled run that also holds
    ``held`` bytes of results in (host) memory. On the CPU the tile and those results share
    CPU_BUDGET_CAP, so that a huge image runs in bounded memory (the tile gets at least
    CPU_TILE_FLOOR); on a GPU the results live on the host and do not count."""
    budget = available_memory(device)
    if device.type == "cuda":
        return budget
    return int(min(budget, max(CPU_TILE_FLOOR, CPU_BUDGET_CAP - held)))


def result_bytes(kernel, shape: tuple[int, int]) -> int:
    """Bytes of the float32 results a kernel's run over an image of ``shape`` holds."""
    return 4 * sum(kernel.outputs().values()) * shape[0] * shape[1]


def auto_tile(bytes_per_pixel: float, halo: int, device: torch.device,
              budget: int | None = None, preferred: int | None = None) -> int:
    """The largest core side whose crop (core + 2 halo)^2 fits the memory budget, at most
    ``preferred`` (a speed optimum, e.g. cache-sized tiles on the CPU)."""
    budget = memory_budget(device) if budget is None else budget
    side = int(math.sqrt(max(budget, 1) / bytes_per_pixel)) - 2 * halo
    side = max(MIN_TILE, side)
    return min(side, preferred) if preferred else side


def resolve_tile(tile, shape: tuple[int, int], kernel, device: torch.device,
                 parallel: int = 1, held: int = 0) -> int | None:
    """The ``tile=`` argument of the fuse functions -> a core side, or None for one tile.

    None: automatic. The whole image at once when its working set fits the available memory
    (``available_memory``: no halo overhead, no statistics passes: the fastest run), else
    tiles as large as ``memory_budget`` allows (``held``: bytes of results the run keeps in
    memory besides the tile), at most the kernel's preferred side; both budgets are shared by
    ``parallel`` tiles in flight (e.g. dask threads). 0 or False: the whole image at once;
    an int >= 1: that core side (the crop adds the kernel's halo)."""
    if tile is None:
        fixed = getattr(kernel, "fixed_bytes", 0)
        parallel = max(1, parallel)
        preferred = kernel.preferred_tile(device)
        whole = shape[0] * shape[1] * kernel.bytes_per_pixel + fixed
        if whole <= available_memory(device) // parallel and (
                preferred is None or max(shape) <= preferred):
            return None  # the whole image fits: no halo overhead, no statistics pass
        budget = memory_budget(device, held) // parallel - fixed
        side = auto_tile(kernel.bytes_per_pixel, kernel.halo, device, budget=max(budget, 1),
                         preferred=preferred)
    elif tile is False or (isinstance(tile, (int, np.integer)) and not isinstance(tile, bool)
                           and int(tile) == 0):
        return None
    elif isinstance(tile, (int, np.integer)) and not isinstance(tile, bool) and tile > 0:
        side = int(tile)
    else:
        raise ValueError(f"tile: expected None (automatic), 0/False (whole image) or a positive "
                         f"number of pixels, got {tile!r}")
    return None if side >= max(shape) else side


# --- pieces inside a crop, tensors in and out -----------------------------------------------

def map_in_pieces(fn, x: torch.Tensor, window: Box, piece: int | None, radius: int,
                  tick=None, fixed: bool = False, blocked: bool = False) -> torch.Tensor:
    """fn (a local operation of context ``radius``: output pixel = f(input within radius),
    same size out as in, e.g. an encoder) applied to x [N, c, h, w] and cut to ``window``,
    computed piece by piece (cores of side ``piece``, each with its ``radius`` halo clipped
    to x): equal to fn(x)[..., window] because every piece sees its full context, and where
    a piece touches x's border its edge *is* that border (fn's reflection padding).
    ``fixed``: crops of one shape (``grown``), for compiled ``fn``. ``blocked``: fn's output
    is channel-blocked, [N, nb, h, w, lanes] (dcu_kernel.encode_chain). Where one piece is
    the whole window, fn's output itself is returned (no copy)."""
    bounds = (0, x.shape[-2], 0, x.shape[-1])
    side = piece + 2 * radius if piece else 0
    if fixed and piece and max(x.shape[-2:]) <= side:
        piece = None  # x is no larger than one grown crop: one piece
    out = None
    tiles = sub_tiles(window, bounds, piece, radius)
    for t in tiles:
        if fixed and piece:
            t = grown(t, bounds, side)
        z = fn(x[..., t.crop_slices[0], t.crop_slices[1]])
        iy0, iy1, ix0, ix1 = t.inner
        rows, cols = slice(iy0, iy1), slice(ix0, ix1)
        spatial = z.shape[2:4] if blocked else z.shape[-2:]
        if len(tiles) == 1 and (iy1 - iy0, ix1 - ix0) == tuple(spatial):
            out = z  # the whole window in one piece
        else:
            z = z[:, :, rows, cols] if blocked else z[..., rows, cols]
            if out is None:
                h, w = window[1] - window[0], window[3] - window[2]
                out = z.new_empty((*z.shape[:2], h, w, *z.shape[4:]) if blocked
                                  else (*z.shape[:2], h, w))
            core = (slice(t.core[0] - window[0], t.core[1] - window[0]),
                    slice(t.core[2] - window[2], t.core[3] - window[2]))
            if blocked:
                out[:, :, core[0], core[1]] = z
            else:
                out[..., core[0], core[1]] = z
        if tick is not None:
            tick()
    return out


def to_device(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
    return t if dtype is None else t.to(dtype)


def inner_tile(sides: dict, device: torch.device) -> int | None:
    """A kernel's inner piece side on ``device`` from its INNER_TILE {"cpu": .., "gpu": ..}
    (None: the whole crop)."""
    return sides["cpu" if device.type == "cpu" else "gpu"]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """float32 numpy (float64 stays float64: the fp64 check path)."""
    t = t.detach()
    return (t if t.dtype == torch.float64 else t.float()).cpu().numpy()


# --- whole-image statistics (the saliency rule's), from parts ---------------------------------

def combine_extremes(parts) -> SaliencyStats:
    los, his = zip(*parts, strict=True)
    return SaliencyStats(torch.stack([torch.as_tensor(v).cpu() for v in los]).amin(0),
                         torch.stack([torch.as_tensor(v).cpu() for v in his]).amax(0))


def with_histogram(stats: SaliencyStats, counts) -> SaliencyStats:
    total = sum(torch.as_tensor(c).cpu().to(torch.float64) for c in counts)
    return SaliencyStats(stats.lo, stats.hi, total / total.sum(-1, keepdim=True))


# --- the in-memory driver -----------------------------------------------------------------------

class Ticker:
    """Counts progress ticks and forwards them to the user's progress(done, total)."""

    def __init__(self, progress, total: int):
        self.progress, self.done, self.total = progress, 0, max(int(total), 1)
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def __call__(self) -> None:
        self.done += 1
        self.report()


def measured_in_parts(kernel, measure, crop: np.ndarray, core) -> list:
    """``measure(crop, core)`` of one saliency-statistics tile (in memory or in a lazy task), as
    a list of parts. A crop that runs out of memory is measured in quarters of its core (then
    smaller, down to ``MIN_TILE``), each with the encoder's halo, which the crop holds (where
    it does not, the crop's edge is the image's): the parts' extremes / counts combine to the
    whole core's exactly."""
    try:
        part = measure(crop, core)
        release_freed_memory()
        return [part]
    except Exception as exc:
        if not splittable_oom(exc, core):
            raise
        del exc
    free_cached(kernel.device)
    side = max(core[1] - core[0], core[3] - core[2])
    half = (side + 1) // 2
    notify(f"out of memory on {kernel.device} in the saliency statistics of a {side} px tile; "
           f"measured in tiles of {half} px")
    parts = []
    for t in sub_tiles(core, (0, crop.shape[-2], 0, crop.shape[-1]), half, kernel.enc_radius):
        sub = crop[..., t.crop_slices[0], t.crop_slices[1]]
        parts += measured_in_parts(kernel, measure, sub, t.inner)
    return parts


def saliency_statistics(kernel, x: np.ndarray, tile: int | None,
                        ticker: Ticker | None = None) -> SaliencyStats:
    """Whole-image extremes, then histograms, of the codes the saliency rule fuses (the
    kernel's ``extremes``/``counts``): two passes over tiles (each with the encoders' 20 px
    halo only)."""
    tiles = kernel.stats_tiles(x.shape[-2:], tile)
    parts = []
    for t in tiles:
        parts += measured_in_parts(kernel, kernel.extremes,
                                   x[:, t.crop_slices[0], t.crop_slices[1]], t.inner)
        if ticker is not None:
            ticker()
    stats = combine_extremes(parts)
    counts = []
    for t in tiles:
        counts += measured_in_parts(kernel, lambda c, k: kernel.counts(c, k, stats),
                                    x[:, t.crop_slices[0], t.crop_slices[1]], t.inner)
        if ticker is not None:
            ticker()
    return with_histogram(stats, counts)


def run_tiled(kernel, x: np.ndarray, tile: int | None, progress=None,
              stats: SaliencyStats | None = None) -> dict[str, np.ndarray]:
    """Run ``kernel`` over the image x [S, H, W(, C)] tile by tile (``tile``: core side or
    None for one tile) and assemble full-size channel-first outputs {name: [c, H, W]}.

    Whole-image statistics (saliency) are computed first when the image takes more than one
    tile. A tile that runs out of memory is split into four and retried (down to
    ``MIN_TILE``), with one ``OutOfMemoryRetry`` notice per call naming the tile sides
    (notices.py). ``progress(done, total)`` is called after every inner step and may raise
    Cancelled."""
    retried: list[int] = []  # the core sides the split tiles had
    try:
        return _run_tiled(kernel, x, tile, progress, stats, retried)
    except BaseException as exc:
        tried = retried + ([tile] if tile else [])
        if tried and is_oom(exc):
            gave_up_splitting(min(tried))
        raise
    finally:
        if retried:
            H, W = kernel.plane_shape(x)
            was = f"{tile} px tiles" if tile else f"the whole {H}x{W} image"
            notify(f"out of memory on {kernel.device} with {was}; retried with tiles of "
                   f"{min(retried)} px")


def _run_tiled(kernel, x, tile, progress, stats, retried: list[int]) -> dict[str, np.ndarray]:
    H, W = kernel.plane_shape(x)
    tiles = tile_grid((H, W), tile, kernel.halo)
    shapes = [(t.crop[1] - t.crop[0], t.crop[3] - t.crop[2]) for t in tiles]
    total = sum(kernel.steps(s, t.inner) for s, t in zip(shapes, tiles, strict=True))
    multi = len(tiles) > 1
    if kernel.needs_stats and multi and stats is None:
        total += 2 * len(kernel.stats_tiles((H, W), tile))
    ticker = Ticker(progress, total)
    if kernel.needs_stats and multi and stats is None:
        stats = saliency_statistics(kernel, x, tile, ticker)
    outs = {name: np.empty((c, H, W), np.float32) for name, c in kernel.outputs().items()}

    def run(t: Tile) -> None:
        try:
            crop, inner = kernel.crop(x, t)
            res = kernel(crop, inner, stats if multi else None, ticker)
        except Exception as exc:
            if not splittable_oom(exc, t.core):
                raise
            del exc
            free_cached(kernel.device)
            half = (max(t.core[1] - t.core[0], t.core[3] - t.core[2]) + 1) // 2
            retried.append(half)
            for sub in sub_tiles(t.core, (0, H, 0, W), half, kernel.halo):
                run(sub)
            return
        for name, a in res.items():
            outs[name][:, t.core_slices[0], t.core_slices[1]] = a
        del res
        release_freed_memory()

    if not multi and kernel.needs_stats:
        # one tile: statistics come from the tile itself; a one-tile run that hits OOM is
        # split, and the split tiles need the whole-image statistics
        try:
            crop, inner = kernel.crop(x, Tile((0, H, 0, W), (0, H, 0, W)))
            res = kernel(crop, inner, None, ticker)
            for name, a in res.items():
                outs[name][...] = a
            return outs
        except Exception as exc:
            if not splittable_oom(exc, (0, H, 0, W)):
                raise
        free_cached(kernel.device)
        half = (max(H, W) + 1) // 2
        retried.append(half)
        return _run_tiled(kernel, x, half, progress, stats, retried)
    for t in tiles:
        run(t)
    return outs
