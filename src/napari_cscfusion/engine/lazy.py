"""Lazy fusion with dask, generic: larger-than-memory 2-D images, nD stacks and
dask.distributed. This module knows no network: the per-network builders (ivf.fuse_grey_lazy,
mef.fuse_exposures_lazy, mmf.fuse_guided_lazy) give it a kernel (tiling.py's protocol) and a
``crop_of(tile)`` that makes one tile's inputs as a delayed value.

The graph is built from the same pieces as the in-memory engine (``tiling.py``): the image is
cut into the kernel's tiles (cores partition each plane; crops carry the kernel's halo), one
task per tile crops every source (a dask slice, so only that window is ever read), normalises
it and runs the kernel; the cores are assembled with ``da.block`` (``_plane_graph``) and planes
with ``da.stack``. This is ``map_overlap`` written out: explicit crops allow halos wider than a
chunk (113 px for the saliency rule) and leave the image border unpadded (the networks pad it
themselves). Rules that need whole-image statistics (the saliency rule's per-channel extremes
and histograms) get them from two earlier layers of per-tile tasks, per plane.

Leading axes (time, z, ...) are planes fused independently, one chunk each. The normalisation
to [0, 1] is ``inputs.value_mapping`` for the whole array (dtype maximum for unsigned
integers; otherwise the global min/max, as lazy reductions). A task that runs out of memory is
split (``halved_tile_task``), then run on a CPU twin of its kernel.
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from .device import module_on_cpu
from .fast import fast_on_cpu
from .inputs import map_values, mapped_mean, value_mapping
from .notices import free_cached, is_oom, notify, release_freed_memory
from .tiling import (
    combine_extremes,
    inner_tile,
    measured_in_parts,
    resolve_tile,
    run_tiled,
    splittable_oom,
    tile_grid,
    with_histogram,
)


def is_dask(a) -> bool:
    return type(a).__module__.split(".")[0] == "dask" and hasattr(a, "__dask_graph__")


def lazy_requested(client, scheduler, *arrays) -> bool:
    """Whether a fuse_* call builds a dask graph: dask inputs, or a cluster to run on."""
    return client is not None or scheduler is not None or any(is_dask(a) for a in arrays)


@dataclass
class LazyOutcome:
    image: object  # dask array, or numpy after a cluster run of numpy inputs
    weights: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    tile: int | None = None
    is_lazy: bool = True


def as_dask(a):
    import dask.array as da

    return a if is_dask(a) else da.from_array(np.asarray(a), chunks=-1)


# --- normalisation, as inputs.normalise but with lazy extremes ------------------------------

def norm_spec(a, name: str):
    """(description, lo, hi) with lo/hi lazy 0-d dask arrays (None where not needed)."""
    dt = np.dtype(a.dtype)
    if dt.kind == "b" or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise TypeError(f"{name}: expected a numeric image (integers or floats), got dtype {dt}")
    if np.issubdtype(dt, np.unsignedinteger):
        return f"divided by the {dt} maximum {np.iinfo(dt).max}", None, None
    return (f"{dt}: dtype maximum, or [0,1] as is, or min-max over the whole array, as for "
            f"numpy inputs (decided when computed)"), a.min(), a.max()


def plane_mean_level(raw_means, dtypes, specs) -> float:
    """The mean grey of a plane's normalised sources (each source's mean, averaged) from the
    raw means of its sources and their (lo, hi), as ``normalise_block`` maps them."""
    return float(np.mean([mapped_mean(m, *value_mapping(dt, lo, hi))
                          for m, dt, (lo, hi) in zip(raw_means, dtypes, specs, strict=True)]))


def normalise_block(block: np.ndarray, lo, hi, name: str = "image") -> np.ndarray:
    """One crop mapped to float32 [0,1] exactly as ``inputs.normalise`` maps the whole array,
    given the whole array's extremes (lo, hi; None for unsigned integers)."""
    a = np.asarray(block)
    if not np.issubdtype(a.dtype, np.integer) and not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite pixels; replace or mask them first")
    return map_values(a, *value_mapping(a.dtype, lo, hi))


# --- tasks ------------------------------------------------------------------------------------

def normalised_crops(blocks, specs, names):
    """A tile task's crops of S sources, normalised and stacked [S, h, w]."""
    return np.stack([normalise_block(b, lo, hi, n)
                     for b, (lo, hi), n in zip(blocks, specs, names, strict=True)])


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
            if isinstance(kernel.net, torch.nn.Module):
                twin.net = module_on_cpu(kernel.net)
            else:  # a fast form (engine/fast.py: closures over its tensors) is built again
                twin.net = fast_on_cpu(kernel.net)
            twin.device = cpu
            if hasattr(twin, "tensors_to"):  # tensors of its own besides the network's
                twin.tensors_to(cpu)
            if hasattr(kernel, "INNER_TILE"):
                twin.inner = inner_tile(kernel.INNER_TILE, cpu)
            kernel._cpu_twin = twin
        return twin


def _run(kernel, crop, core, stats):
    return _on_device_or_cpu(kernel, "tile", lambda k: _run_on(k, crop, core, stats))


def _run_on(kernel, crop, core, stats):
    if hasattr(kernel, "in_parts"):  # a crop that is not one array (MMF): its own split
        res = kernel.in_parts(crop, core)
    else:  # crops of one array (IVF, MEF)
        try:
            res = kernel(crop, core, stats)
        except Exception as exc:
            if not splittable_oom(exc, core):
                raise  # (as run_tiled: no tiles below MIN_TILE)
            del exc
            res = _split_after_oom(kernel, crop, core, stats)
    out = np.concatenate([res[name] for name in kernel.outputs()], 0)
    del res
    release_freed_memory()
    return out


def halved_tile_task(kernel, core) -> int:
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
    full = run_tiled(kernel, crop, halved_tile_task(kernel, core), None, stats)
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


def split_outputs(kernel, out, lead: int) -> dict:
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


def _parallel_tiles(client, scheduler) -> int:
    """Tiles computed at once by the local threaded scheduler (a cluster's workers have
    their own memory: there one tile per worker thread is budgeted as in-process)."""
    if client is not None or scheduler is not None:
        return 1
    import dask

    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _load(blob: bytes) -> None:
    from distributed.protocol.pickle import loads

    loads(blob)


def check_workers_load(kernel, client) -> None:
    """RuntimeError unless every worker of ``client``'s cluster can unpickle ``kernel`` (the
    network and its weights; a worker without this package, or without torch, cannot).

    A task a worker cannot unpickle leaves the client waiting for ever: the worker drops the
    message it cannot read and the scheduler waits for the task (dask/distributed#3558,
    #6705). Sent first as bytes, unpickled inside a function that ``client.run`` calls, the
    same failure comes back at once as an error. Workers that join later are not checked."""
    from distributed.protocol.pickle import dumps

    try:
        client.run(_load, dumps(kernel))
    except OSError:  # the cluster itself (connection, timeout): as it is
        raise
    except Exception as exc:
        from .._version import __version__

        raise RuntimeError(
            f"client/scheduler: the dask cluster's workers cannot load the fusion network "
            f"({type(exc).__name__}: {exc}); they need napari-cscfusion {__version__} and "
            f"torch {torch.__version__.split('+')[0]} installed, as this process has") from exc


def close_clients() -> None:
    """Close the dask.distributed clients opened for ``scheduler=`` addresses."""
    while _CLIENTS:
        _, client = _CLIENTS.popitem()
        client.close()


def _kernel_key(kernel):
    import dask

    return dask.delayed(kernel, name=f"cscfusion-kernel-{uuid.uuid4().hex}", traverse=False)


def planes_graph(kernel, device, tile, lead: tuple, shape: tuple[int, int], crop_of, *,
                 client=None, scheduler: str | None = None, stats_of=None,
                 plane_kernel=None):
    """``kernel`` over every plane of the leading (time, z, ...) axes ``lead``, each plane of
    ``shape`` (H, W): (a dask array (*lead, C, H, W), C the kernel's output channels in
    ``outputs()`` order; the tile side it is cut in, from ``tile`` as in the fuse functions).
    ``crop_of(idx, tile)``: one tile's inputs from plane ``idx``, a delayed value;
    ``stats_of(idx)``: that plane's statistics for every tile task (delayed), or None;
    ``plane_kernel(idx, key)``: the kernel plane ``idx`` runs (delayed, made from the shared
    kernel's graph node ``key``: same geometry, a per-plane setting), or None for ``key``."""
    import dask.array as da

    side = resolve_tile(tile, shape, kernel, device, parallel=_parallel_tiles(client, scheduler))
    if client is not None or scheduler is not None:
        check_workers_load(kernel, client if client is not None else _client_for(scheduler))
    key = _kernel_key(kernel)
    planes = [_plane_graph(kernel, key if plane_kernel is None else plane_kernel(idx, key),
                           partial(crop_of, idx), shape, side,
                           None if stats_of is None else stats_of(idx))
              for idx in np.ndindex(*lead)]
    out = da.stack(planes).reshape(*lead, -1, *shape) if lead else planes[0]
    return out, side


def outcome(arrays: dict, notes: dict, side, client, scheduler: str | None,
            from_numpy: bool) -> LazyOutcome:
    """The builders' result: ``arrays`` ({"image": ..., weight maps}) left lazy, or run on the
    cluster of ``client``/``scheduler`` (numpy results for numpy inputs)."""
    arrays, lazy = _finish(arrays, client, scheduler, from_numpy)
    image = arrays.pop("image")
    return LazyOutcome(image, arrays, notes, side, lazy)
