"""Lazy fusion with dask: larger-than-memory 2-D images, nD stacks and dask.distributed.

The graph is built from the same pieces as the in-memory engine (``tiling.py``): the image is
cut into the kernel's tiles (cores partition each plane; crops carry the kernel's halo), one
task per tile crops every source (a dask slice, so only that window is ever read), normalises
it and runs the kernel; the cores are assembled with ``da.block`` and planes with
``da.stack``. This is ``map_overlap`` written out: explicit crops allow halos wider than a chunk
(113 px for the saliency rule) and leave the image border unpadded (the networks pad it
themselves). Rules that need whole-image statistics (the saliency rule's per-channel extremes
and histograms) get them from two earlier layers of per-tile tasks, per plane.

Leading axes (time, z, ...) are planes fused independently, one chunk each. The normalisation
to [0, 1] follows ``inputs.normalise`` for the whole array (dtype maximum for unsigned
integers; otherwise the global min/max, as lazy reductions).
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from .notices import free_cached, is_oom, notify, release_freed_memory
from .rules import exposure_channel_sums, exposure_prior_logits
from .tiling import (
    IVF_ALPHA,
    IVFKernel,
    MEFKernel,
    MMFKernel,
    combine_extremes,
    inner_tile,
    measured_in_parts,
    resolve_tile,
    run_tiled,
    splittable_oom,
    sub_tiles,
    tile_grid,
    with_histogram,
)


def is_dask(a) -> bool:
    return type(a).__module__.split(".")[0] == "dask" and hasattr(a, "__dask_graph__")


@dataclass
class LazyOutcome:
    image: object  # dask array, or numpy after a cluster run of numpy inputs
    weights: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    tile: int | None = None
    is_lazy: bool = True


def _as_dask(a):
    import dask.array as da

    return a if is_dask(a) else da.from_array(np.asarray(a), chunks=-1)


# --- normalisation, as inputs.normalise but with lazy extremes ------------------------------

def _norm_spec(a, name: str):
    """(description, lo, hi) with lo/hi lazy 0-d dask arrays (None where not needed)."""
    dt = np.dtype(a.dtype)
    if dt.kind == "b" or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise TypeError(f"{name}: expected a numeric image (integers or floats), got dtype {dt}")
    if np.issubdtype(dt, np.unsignedinteger):
        return f"divided by the {dt} maximum {np.iinfo(dt).max}", None, None
    return (f"{dt}: dtype maximum, or [0,1] as is, or min-max over the whole array, as for "
            f"numpy inputs (decided when computed)"), a.min(), a.max()


def normalise_block(block: np.ndarray, lo, hi, name: str = "image") -> np.ndarray:
    """One crop mapped to float32 [0,1] exactly as ``inputs.normalise`` maps the whole array,
    given the whole array's extremes (lo, hi; None for unsigned integers)."""
    a = np.asarray(block)
    if np.issubdtype(a.dtype, np.integer):
        if lo is None or float(lo) >= 0:
            return (a / np.float64(np.iinfo(a.dtype).max)).astype(np.float32)
        return _minmax(a, float(lo), float(hi))
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite pixels; replace or mask them first")
    lo, hi = float(lo), float(hi)
    if lo >= 0.0 and hi <= 1.0:
        return a.astype(np.float32)
    return _minmax(a, lo, hi)


def _minmax(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(hi - lo):  # as inputs.normalise: halve first (exact), not inf/inf
        a, lo, hi = a * 0.5, lo * 0.5, hi * 0.5
    if hi > lo:
        return ((a.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    return np.zeros(a.shape, np.float32)


# --- tasks ------------------------------------------------------------------------------------

def _crop(blocks, specs, names):
    return np.stack([normalise_block(b, lo, hi, n)
                     for b, (lo, hi), n in zip(blocks, specs, names, strict=True)])


def _crop_stack(block, lo, hi):
    return normalise_block(block, lo, hi, "stack")


_cpu_twin_lock = threading.Lock()


def _on_device_or_cpu(kernel, what: str, fn):
    """``fn(kernel)``; if that runs out of memory on a GPU even after the task split its tile
    down to the smallest, ``fn`` of the kernel's CPU twin, with a notice (as
    ``notices.on_device_or_cpu`` does for a whole in-memory run, but task by task)."""
    try:
        return fn(kernel)
    except Exception as exc:
        if kernel.device.type == "cpu" or not is_oom(exc):
            raise
        del exc
    free_cached(kernel.device)
    notify(f"out of memory on {kernel.device} in a {what} task, split as far as it goes; ran "
           f"that task on the CPU instead (slower)")
    return fn(_cpu_twin(kernel))


def _cpu_twin(kernel):
    """The kernel with its inference network copied to the CPU, made once per kernel (per
    worker process)."""
    with _cpu_twin_lock:
        twin = kernel.__dict__.get("_cpu_twin")
        if twin is None:
            cpu = torch.device("cpu")
            twin = copy.copy(kernel)
            # parameters and buffers copied straight to the CPU (a deepcopy first would
            # allocate them again on the GPU that just ran out of memory)
            memo = {id(t): (torch.nn.Parameter(t.detach().to(cpu), t.requires_grad)
                            if isinstance(t, torch.nn.Parameter) else t.to(cpu))
                    for t in (*kernel.net.parameters(), *kernel.net.buffers())}
            twin.net = copy.deepcopy(kernel.net, memo)
            twin.device = cpu
            if hasattr(kernel, "inner"):
                twin.inner = inner_tile(kernel.task, cpu)
            kernel._cpu_twin = twin
        return twin


def _run(kernel, crop, core, stats):
    return _on_device_or_cpu(kernel, "tile", lambda k: _run_on(k, crop, core, stats))


def _run_on(kernel, crop, core, stats):
    if isinstance(crop, np.ndarray):  # IVF, MEF: crops of one array
        try:
            res = kernel(crop, core, stats)
        except Exception as exc:
            if not splittable_oom(exc, core):
                raise  # (as run_tiled: no tiles below MIN_TILE)
            del exc
            res = _split_after_oom(kernel, crop, core, stats)
    else:  # MMF: a low-res and a guide crop
        res = {"image": _guided_in_parts(kernel, crop)}
    out = np.concatenate([res[name] for name in kernel.outputs()], 0)
    del res
    release_freed_memory()
    return out


def _guided_in_parts(kernel: MMFKernel, crop) -> np.ndarray:
    """The MMF image of a crop (low-res crop, guide crop, core in output coordinates). If it
    runs out of memory the core is fused in quarters (then smaller, down to ``MIN_TILE``),
    each from the part of both crops that its windows need (inside the crop's: windows grow
    with the core). The kernel resamples at whole-image coordinates, so the parts are the
    tiles an in-memory run would make."""
    lr, g, core = crop
    try:
        return kernel(crop, core)["image"]
    except Exception as exc:
        if not splittable_oom(exc, core):
            raise
        del exc
    half = _halved_tile_task(kernel, core)
    (_, _, ly, gy), (_, _, lx, gx) = (kernel.windows(core)[ax] for ax in (0, 1))
    out = np.empty((kernel.c, core[1] - core[0], core[3] - core[2]), np.float32)
    for t in sub_tiles(core, core, half, 0):
        (_, _, sly, sgy), (_, _, slx, sgx) = (kernel.windows(t.core)[ax] for ax in (0, 1))
        sub = (lr[:, sly[0] - ly[0]:sly[1] - ly[0], slx[0] - lx[0]:slx[1] - lx[0]],
               g[:, sgy[0] - gy[0]:sgy[1] - gy[0], sgx[0] - gx[0]:sgx[1] - gx[0]], t.core)
        out[:, t.core[0] - core[0]:t.core[1] - core[0], t.core[2] - core[2]:t.core[3] - core[2]] \
            = _guided_in_parts(kernel, sub)
    return out


def _halved_tile_task(kernel, core) -> int:
    """After a tile task ran out of memory: free the device's cache, say so, and return the
    side of the tiles to retry the task's core with (half its side)."""
    free_cached(kernel.device)
    side = max(core[1] - core[0], core[3] - core[2])
    half = (side + 1) // 2
    notify(f"out of memory on {kernel.device} in a tile task of {side} px; retried with tiles "
           f"of {half} px")
    return half


def _split_after_oom(kernel, crop: np.ndarray, core, stats) -> dict:
    """A tile task that ran out of memory: its crop (the core plus the kernel's halo) goes
    through run_tiled in tiles of half the core (split further there if needed, with the
    OutOfMemoryRetry notice); only the core is kept, whose context lies inside the crop. The
    whole-image statistics are the graph's (or, for a one-tile graph, the crop is the image)."""
    full = run_tiled(kernel, crop, _halved_tile_task(kernel, core), None, stats)
    return {name: a[:, core[0]:core[1], core[2]:core[3]] for name, a in full.items()}


def _extremes(kernel, crop, core):
    parts = _on_device_or_cpu(kernel, "statistics", lambda k: measured_in_parts(
        k, k.extremes, crop, core))
    whole = combine_extremes(parts)  # one part: the same tensors, on the CPU
    return whole.lo, whole.hi


def _counts(kernel, crop, core, stats):
    parts = _on_device_or_cpu(kernel, "statistics", lambda k: measured_in_parts(
        k, lambda c, box: k.counts(c, box, stats), crop, core))
    return sum(c.cpu() for c in parts)


def _plane_graph(kernel, key, crop_of, shape, side, stats=None):
    """One plane: statistics tasks if needed, one task per tile, assembled (C, H, W).
    ``kernel`` gives the geometry; the tasks get it through ``key`` (one graph node, so a
    cluster receives it once). ``stats``: the plane's statistics made by the caller
    (a delayed value every tile task gets), if the kernel does not compute its own."""
    import dask
    import dask.array as da

    tiles = tile_grid(shape, side, kernel.halo)
    if kernel.needs_stats and len(tiles) > 1:
        st_tiles = kernel.stats_tiles(shape, side)
        ext = [dask.delayed(_extremes)(key, crop_of(t), t.inner) for t in st_tiles]
        base = dask.delayed(combine_extremes)(ext)
        counts = [dask.delayed(_counts)(key, crop_of(t), t.inner, base) for t in st_tiles]
        stats = dask.delayed(with_histogram)(base, counts)
    channels = sum(kernel.outputs().values())
    rows: dict[int, list] = {}
    for t in tiles:
        task = dask.delayed(_run)(key, crop_of(t), t.inner, stats)
        h, w = t.core[1] - t.core[0], t.core[3] - t.core[2]
        rows.setdefault(t.core[0], []).append(
            da.from_delayed(task, shape=(channels, h, w), dtype=np.float32))
    return da.block([row for _, row in sorted(rows.items())])


def _split(kernel, out, lead: int) -> dict:
    """Cut the stacked (*lead, C, H, W) result into the kernel's named outputs."""
    res, c = {}, 0
    for name, n in kernel.outputs().items():
        res[name] = out[(slice(None),) * lead + (slice(c, c + n),)]
        c += n
    return res


def _finish(arrays: dict, client, scheduler, from_numpy: bool) -> tuple[dict, bool]:
    """Run on a dask.distributed cluster when asked: numpy results for numpy inputs, arrays
    persisted on the cluster for dask inputs; else leave the graphs lazy."""
    if client is None and scheduler is None:
        return arrays, True
    if client is None:
        client = _client_for(scheduler)
    keys = list(arrays)
    if from_numpy:
        values = client.compute([arrays[k] for k in keys], sync=True)
        return dict(zip(keys, values, strict=True)), False
    values = client.persist([arrays[k] for k in keys])
    return dict(zip(keys, values, strict=True)), True


_CLIENTS: dict = {}


def _client_for(address: str):
    """The process's current client when it is already connected to ``address`` (a second
    client to the same scheduler made later computes of the persisted results lose their
    dependencies now and then); else one client per address, kept (and dask's default) so
    that persisted results stay reachable; close_clients() ends those."""
    from distributed import Client, default_client

    try:
        current = default_client()
    except ValueError:
        current = None
    if current is not None and current.status == "running" \
            and current.scheduler.address == address:
        return current
    client = _CLIENTS.get(address)
    if client is None or client.status not in ("running", "connecting"):
        client = _CLIENTS[address] = Client(address)
    return client


def _parallel(client, scheduler) -> int:
    """Tiles computed at once by the local threaded scheduler (a cluster's workers have
    their own memory: there one tile per worker thread is budgeted as in-process)."""
    if client is not None or scheduler is not None:
        return 1
    import dask

    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def close_clients() -> None:
    """Close the dask.distributed clients opened for ``scheduler=`` addresses."""
    while _CLIENTS:
        _, client = _CLIENTS.popitem()
        client.close()


def _kernel_key(kernel):
    import dask

    return dask.delayed(kernel, name=f"cscfusion-kernel-{uuid.uuid4().hex}", traverse=False)


# --- public graph builders (called by fusion.py) ---------------------------------------------

def fuse_grey_lazy(images: dict, model, base_rule: str, detail_rule: str, device, *,
                   tile=None, weights: bool = True, precision: str | None = None,
                   client=None, scheduler: str | None = None,
                   code_gain: float = IVF_ALPHA) -> LazyOutcome:
    """CSC-IVFN fusion of S grey sources (name -> (..., H, W), numpy or dask) as a dask graph:
    image (..., H, W) and weights {"base", "detail"} (S, ..., H, W); ``code_gain`` as in
    fuse_infrared_visible."""
    import dask.array as da

    from_numpy = not any(is_dask(a) for a in images.values())
    names = list(images)
    arrays = [_as_dask(images[n]) for n in names]
    shape = tuple(arrays[0].shape)
    lead, (H, W) = shape[:-2], shape[-2:]
    specs, notes = [], {}
    for n, a in zip(names, arrays, strict=True):
        note, lo, hi = _norm_spec(a, n)
        specs.append((lo, hi))
        notes[n] = note
    net = model.network_on(device)
    kernel = IVFKernel(net, names, base_rule, detail_rule, device, weights=weights,
                       precision=precision, code_gain=code_gain)
    side = resolve_tile(tile, (H, W), kernel, device, parallel=_parallel(client, scheduler))
    k = _kernel_key(kernel)
    planes = []
    for idx in np.ndindex(*lead):
        def crop_of(t, idx=idx):
            import dask

            blocks = [a[idx + t.crop_slices] for a in arrays]
            return dask.delayed(_crop)(blocks, specs, names)

        planes.append(_plane_graph(kernel, k, crop_of, (H, W), side))
    out = da.stack(planes).reshape(*lead, -1, H, W) if lead else planes[0]
    parts = _split(kernel, out, len(lead))
    result = {"image": parts["image"][(slice(None),) * len(lead) + (0,)]}
    if weights:
        for key in ("base", "detail"):
            result[key] = da.moveaxis(parts[f"weights_{key}"], len(lead), 0)
    result, lazy = _finish(result, client, scheduler, from_numpy)
    image = result.pop("image")
    return LazyOutcome(image, result, notes, side, lazy)


def _exposure_sums(block, lo, hi):
    return exposure_channel_sums(normalise_block(block, lo, hi, "stack"))


def _exposure_prior(sums, pixels: int, sigma: float):
    return exposure_prior_logits(np.sum(sums, 0), pixels, sigma)


def fuse_exposures_lazy(stack, model, device, rgb: bool, *, tile=None, weights: bool = True,
                        precision: str | None = None, client=None,
                        scheduler: str | None = None,
                        prior_sigma: float | None = None) -> LazyOutcome:
    """CSC-MEFN fusion of (..., K, H, W[, 3]) brackets as a dask graph: image (..., H, W[, 3])
    and weights {"exposures": (K, ..., H, W)}. ``prior_sigma``: weights trained with the
    global exposure prior; each bracket's prior logits come from one reduction task over
    its blocks, which every tile task of that bracket reads."""
    import dask
    import dask.array as da

    from_numpy = not is_dask(stack)
    a = _as_dask(stack)
    core = 4 if rgb else 3
    lead, (K, H, W) = tuple(a.shape[:a.ndim - core]), tuple(a.shape[a.ndim - core:][:3])
    note, lo, hi = _norm_spec(a, "stack")
    net = model.network_on(device)
    kernel = MEFKernel(net, K, rgb, device, weights=weights, precision=precision)
    side = resolve_tile(tile, (H, W), kernel, device, parallel=_parallel(client, scheduler))
    k = _kernel_key(kernel)
    planes = []
    for idx in np.ndindex(*lead):
        def crop_of(t, idx=idx):
            return dask.delayed(_crop_stack)(a[idx + (slice(None),) + t.crop_slices], lo, hi)

        prior = None
        if prior_sigma is not None:
            # blocks holding every exposure (and colour channel) of their pixels
            whole = {0: -1, 3: -1} if rgb else {0: -1}
            blocks = a[idx].rechunk(whole).to_delayed().ravel()
            sums = [dask.delayed(_exposure_sums)(b, lo, hi) for b in blocks]
            prior = dask.delayed(_exposure_prior)(sums, H * W, prior_sigma)
        planes.append(_plane_graph(kernel, k, crop_of, (H, W), side, prior))
    out = da.stack(planes).reshape(*lead, -1, H, W) if lead else planes[0]
    parts = _split(kernel, out, len(lead))
    img = parts["image"]
    img = da.moveaxis(img, len(lead), -1) if rgb else img[(slice(None),) * len(lead) + (0,)]
    result = {"image": img}
    if weights:
        result["exposures"] = da.moveaxis(parts["weights"], len(lead), 0)
    result, lazy = _finish(result, client, scheduler, from_numpy)
    image = result.pop("image")
    return LazyOutcome(image, result, {"stack": note}, side, lazy)


# --- guided super-resolution (CSC-MMFN) --------------------------------------------------------

_KEYS_A = np.float32(-0.75)  # PyTorch's (and OpenCV's INTER_CUBIC) Keys parameter


def _keys1(x):
    return ((_KEYS_A + np.float32(2)) * x - (_KEYS_A + np.float32(3))) * x * x + np.float32(1)


def _keys2(x):
    return ((_KEYS_A * x - np.float32(5) * _KEYS_A) * x + np.float32(8) * _KEYS_A) * x \
        - np.float32(4) * _KEYS_A


def bicubic_taps(lo: int, hi: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (n, 4) and Keys weights (n, 4) of output indices [lo, hi) of a bicubic
    resize n_in -> n_out (half-pixel centres, border samples repeated), in PyTorch's float32
    arithmetic (``interpolate(mode="bicubic", align_corners=False)``)."""
    scale = np.float32(n_in) / np.float32(n_out)
    real = scale * (np.arange(lo, hi).astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    i0 = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    t = np.clip(real - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    u = np.float32(1) - t
    weights = np.stack([_keys2(t + np.float32(1)), _keys1(t), _keys1(u),
                        _keys2(u + np.float32(1))], 1).astype(np.float32)
    return np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1), weights


def bicubic_span(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Source indices [a, b) that output indices [lo, hi) of the bicubic resize read (their
    2-sample Keys support, clamped to the image)."""
    idx, _ = bicubic_taps(lo, hi, n_in, n_out)
    return int(idx.min()), int(idx.max()) + 1


def bicubic_window(x: np.ndarray, origin: tuple[int, int], full: tuple[int, int],
                   out_shape: tuple[int, int], window) -> np.ndarray:
    """Rows window[0]:window[1], columns window[2]:window[3] of the bicubic resize of a whole
    (..., h, w) image (``full``) to ``out_shape``, from ``x``, its crop starting at ``origin``
    that covers ``bicubic_span`` on both axes. Separable, columns first, float32: the same
    taps, weights and order of sums as the whole-image resize, at whole-image coordinates."""
    iy, wy = bicubic_taps(window[0], window[1], full[0], out_shape[0])
    ix, wx = bicubic_taps(window[2], window[3], full[1], out_shape[1])
    iy, ix = iy - origin[0], ix - origin[1]
    x = np.asarray(x, np.float32)
    rows = x[..., ix[:, 0]] * wx[:, 0]
    for k in range(1, 4):
        rows = rows + x[..., ix[:, k]] * wx[:, k]
    out = rows[..., iy[:, 0], :] * wy[:, 0, None]
    for k in range(1, 4):
        out = out + rows[..., iy[:, k], :] * wy[:, k, None]
    return out.astype(np.float32, copy=False)


def _guided_crop(lr_blk, g_blk, lr_spec, g_spec, resize, prepare_guide, core):
    """One tile's inputs for MMFKernel: the low-res crop normalised (and, for weights trained
    on bicubic input, resized to its window of the guide-sized image), the guide crop
    normalised and converted to the network's guide channels."""
    lr = normalise_block(lr_blk, *lr_spec, "low_res")
    if resize is not None:
        lr = np.clip(bicubic_window(lr, *resize), 0.0, 1.0)
    g = prepare_guide(normalise_block(g_blk, *g_spec, "guide"))
    return np.ascontiguousarray(lr, np.float32), np.ascontiguousarray(g, np.float32), core


def fuse_guided_lazy(low_res, guide, model, device, prepare_guide, *, bicubic: bool,
                     squeeze: bool, tile=None, precision: str | None = None, client=None,
                     scheduler: str | None = None) -> LazyOutcome:
    """CSC-MMFN guided super-resolution as a dask graph: low_res (..., C, h, w) and guide
    (..., H, W) or (..., H, W, 3) (numpy or dask, same leading shape) -> image
    (..., C, H, W), or (..., H, W) with ``squeeze``. Tiles are cut in the guide's
    coordinates; each task reads the MMFKernel's crops of both inputs (with ``bicubic``, the
    low-res rows and columns the bicubic pre-upsampling of the kernel's crop reads) and
    ``prepare_guide`` maps a normalised guide crop to (G, h', w')."""
    import dask
    import dask.array as da

    from_numpy = not (is_dask(low_res) or is_dask(guide))
    lr, g = _as_dask(low_res), _as_dask(guide)
    nl = lr.ndim - 3
    lead, (C, h, w), (H, W) = tuple(lr.shape[:nl]), tuple(lr.shape[nl:]), tuple(g.shape[nl:nl + 2])
    note_l, *spec_l = _norm_spec(lr, "low_res")
    note_g, *spec_g = _norm_spec(g, "guide")
    net = model.network_on(device)
    kernel = MMFKernel(net, (H, W) if bicubic else (h, w), (H, W), device, precision=precision)
    side = resolve_tile(tile, (H, W), kernel, device, parallel=_parallel(client, scheduler))
    k = _kernel_key(kernel)
    planes = []
    for idx in np.ndindex(*lead):
        def crop_of(t, idx=idx):
            win = kernel.windows(t.core)
            (_, _, ly, gy), (_, _, lx, gx) = win[0], win[1]
            resize = None
            if bicubic:  # the kernel's crop of the guide-sized bicubic image, made here
                sy, sx = bicubic_span(*ly, h, H), bicubic_span(*lx, w, W)
                resize = ((sy[0], sx[0]), (h, w), (H, W), (*ly, *lx))
                ly, lx = sy, sx
            lr_blk = lr[idx + (slice(None), slice(*ly), slice(*lx))]
            g_blk = g[idx + (slice(*gy), slice(*gx))]
            return dask.delayed(_guided_crop)(lr_blk, g_blk, spec_l, spec_g, resize,
                                              prepare_guide, t.core)

        planes.append(_plane_graph(kernel, k, crop_of, (H, W), side))
    out = da.stack(planes).reshape(*lead, C, H, W) if lead else planes[0]
    if squeeze:
        out = out[(slice(None),) * nl + (0,)]
    result, lazy = _finish({"image": out}, client, scheduler, from_numpy)
    return LazyOutcome(result["image"], {}, {"low_res": note_l, "guide": note_g}, side, lazy)


# --- big TIFFs: lazy reading, streamed writing ---------------------------------------------------

def read_tiff_lazy(path, chunk: int = 1024):
    """A TIFF as a dask array without reading it: via zarr when installed
    (``tifffile.imread(aszarr=True)``), else a memory map (uncompressed, contiguous files —
    what ``store_tiff`` writes), else read whole (compressed files without zarr)."""
    import dask.array as da
    import tifffile

    try:
        import zarr  # noqa: F401
    except ImportError:
        zarr = None
    if zarr is not None:
        store = tifffile.imread(path, aszarr=True)
        return da.from_zarr(store)
    try:
        arr = tifffile.memmap(path, mode="r")
    except (ValueError, OSError):
        arr = tifffile.imread(path)
    spatial = 2 if arr.ndim == 2 or arr.shape[-1] not in (3, 4) else 3
    chunks = tuple([1] * (arr.ndim - spatial) + [chunk, chunk] + [-1] * (spatial - 2))
    return da.from_array(arr, chunks=chunks)


def store_tiff(path, image, metadata: dict | None = None, progress=None) -> None:
    """Compute the dask array ``image`` block by block into an uncompressed TIFF at ``path``
    (BigTIFF when over 2 GB) with bounded memory: the blocks go into a memory map of the file
    as they finish, and the graph is computed once (shared statistics tasks run once).
    ``progress(done, total)`` after every block. The map is of a temporary file beside
    ``path``, renamed over it at the end: a failure, Ctrl-C or a ``Cancelled`` from
    ``progress`` mid-stream leaves no partial file and an existing ``path`` untouched."""
    import json

    import dask.array as da
    import tifffile

    from .io import _jsonable, replaced_on_success

    arr = image if is_dask(image) else da.from_array(np.asarray(image))
    rgb = arr.ndim >= 3 and arr.shape[-1] == 3
    with replaced_on_success(path) as tmp:
        _store_into(tifffile.memmap(tmp, shape=arr.shape, dtype=arr.dtype,
                                    bigtiff=arr.nbytes > 2 ** 31 - 2 ** 25,
                                    photometric="rgb" if rgb else "minisblack",
                                    description=json.dumps(_jsonable(metadata or {})),
                                    metadata=None), arr, rgb, progress)


def _store_into(mm, arr, rgb: bool, progress) -> None:
    """store_tiff's computation of ``arr`` into the memory map ``mm``, flushed and closed."""
    import dask.array as da
    from dask.callbacks import Callback

    class _Ticks(Callback):
        def _start_state(self, dsk, state):
            self.total = len(state["ready"]) + len(state["waiting"])
            self.done = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            self.done += 1
            if progress is not None:
                progress(self.done, self.total)

    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    try:
        if client is None:
            with _Ticks():
                da.store(arr, mm, lock=True, scheduler="threads")
        else:
            # a cluster (results persisted there by the fuse_* call): gather row bands here
            row = arr.ndim - (3 if rgb else 2)
            edges = np.cumsum((0,) + arr.chunks[row])
            lead = list(np.ndindex(*arr.shape[:row]))
            total, done = len(lead) * (len(edges) - 1), 0
            for idx in lead:
                for y0, y1 in zip(edges[:-1], edges[1:], strict=True):
                    sl = idx + (slice(int(y0), int(y1)),)
                    mm[sl] = arr[sl].compute()
                    done += 1
                    if progress is not None:
                        progress(done, total)
        mm.flush()
    finally:
        del mm
