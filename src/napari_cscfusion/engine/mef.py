"""Multi-exposure fusion with CSC-MEFN: the public ``fuse_exposures``, the global exposure prior
of weights trained with it, the per-crop kernel ``MEFKernel`` that tiling.py and lazy.py run,
and its dask graph builder ``fuse_exposures_lazy``."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..models.color import LUMA, fuse_chroma, rgb_to_ycbcr, ycbcr_to_rgb
from ..models.folded import folded
from ..models.mefn import exposure_prior
from . import mef_cpu, notices
from .device import resolve_device
from .fast import auto_compile, fast_network, use_fast_path
from .inputs import check_frames, check_min_size, normaliser
from .lazy import (
    LazyOutcome,
    as_dask,
    is_dask,
    lazy_requested,
    norm_spec,
    normalise_block,
    outcome,
    planes_graph,
    split_outputs,
)
from .planes import plane_indices
from .registry import FusionModel, resolve_model
from .result import FusionResult, base_metadata, plane_progress
from .tiling import (
    Box,
    Ticker,
    Tile,
    grown,
    inner_tile,
    map_in_pieces,
    precision_dtype,
    resolve_tile,
    result_bytes,
    run_tiled,
    tile_grid,
    to_device,
    to_numpy,
)

MEF_MIN_SIZE = 2  # 3x3 reflection padding needs 2 px
# Inner pieces on the CPU (see ivf.INNER_TILE): MEF 3 x 4 Mpx 16.8 s with 256 px, 10.2 s with
# 128 px (benchmarks/README.md); on a GPU the whole crop.
INNER_TILE = {"cpu": 128, "gpu": None}
# The fast path's tiles: crops of one shape through one compiled graph, colour to blending
# (benchmarks/README.md); on a GPU large ones
FAST_TILE = {"cpu": 128, "gpu": 1024}
INNER_TILE_EAGER = {"cpu": 1024, "gpu": 2048}  # the fast form uncompiled (no numba)
# The fused numba kernel's tiles (engine/mef_cpu.py): a 128 px tile's codes (24 x 140 x 140
# float32, 1.9 MB) stay in the L2/L3 caches; measured: 96 and 128 px alike, 64 (the halo)
# and 160-256 px slower (benchmarks/README.md)
NUMBA_TILE = 128


def exposure_channel_sums(stack: np.ndarray) -> np.ndarray:
    """Per exposure, the float64 sum of each channel of a normalised stack (K,H,W) or
    (K,H,W,3) (or of one block of it) -> (K,) or (K,3); no full-size temporary."""
    return np.stack([np.sum(x, axis=(0, 1), dtype=np.float64) for x in stack])


def exposure_prior_logits(channel_sums: np.ndarray, pixels: int, sigma: float) -> np.ndarray:
    """The logit ``models.mefn.exposure_prior`` adds to every pixel of each exposure, from
    the exposures' channel sums over the whole image (``exposure_channel_sums``) -> (K,)."""
    means = np.asarray(channel_sums, np.float64) / pixels
    if means.ndim == 2:  # RGB: mean luminance from the channel means (Y is linear)
        means = means @ np.array(LUMA)
    return exposure_prior(torch.from_numpy(means), sigma).numpy().astype(np.float32)


class MEFKernel:
    """CSC-MEFN fusion of K exposures on one crop: [K, h, w] grey or [K, h, w, 3] RGB.

    Outputs: image [1] (grey) or [3] (RGB, channel-first), weights [K] (softmax over
    exposures), and with ``codes`` each exposure's codes after the last DCU."""

    task = "mef"
    INNER_TILE = INNER_TILE

    def __init__(self, net, k: int, rgb: bool, device: torch.device, codes: bool = False,
                 weights: bool = True, precision: str | None = None, compile: bool = False,
                 exposure_prior: np.ndarray | None = None):
        self.dtype = precision_dtype(precision)
        self.net = folded("mef", net, self.dtype, compile)
        self.k, self.rgb, self.device = k, rgb, device
        # (K,) logits of the global exposure prior (exposure_prior_logits) for weights
        # trained with it; lazy runs pass them per bracket as ``stats`` instead
        self.exposure_prior = exposure_prior
        self.codes, self.weights = codes, weights
        self.q = net.hparams["code_channels"]
        self.halo = self.net.radius
        self.needs_stats = False
        self.inner = inner_tile(INNER_TILE, device)
        # per crop pixel: the luminance/colour planes, logits and weights (+ the codes if
        # asked); the encoder's transients are bounded by the inner pieces
        self.bytes_per_pixel = 4 * k * ((self.q if codes else 1) * 2 + 12) + 64
        if self.inner is None:
            self.bytes_per_pixel += 4 * k * self.q * 4

    def crop(self, x, t: Tile):
        return x[:, t.crop_slices[0], t.crop_slices[1]], t.inner

    def plane_shape(self, x) -> tuple[int, int]:
        return tuple(x.shape[1:3])

    def preferred_tile(self, device: torch.device) -> int | None:
        # 1024 px crops keep progress steps short; the cache-sized work happens inside a crop
        # (inner pieces of INNER_TILE), so the crop size itself matters little on the CPU
        return 1024 if device.type == "cpu" else None

    def outputs(self) -> dict[str, int]:
        out = {"image": 3 if self.rgb else 1}
        if self.weights:
            out["weights"] = self.k
        if self.codes:
            for i in range(self.k):
                out[f"exposure_{i}"] = self.q
        return out

    def steps(self, shape, core) -> int:
        return 1

    def __call__(self, crop: np.ndarray, core: Box, stats=None, tick=None
                 ) -> dict[str, np.ndarray]:
        y0, y1, x0, x1 = core
        res = {}
        with torch.inference_mode():
            x = to_device(crop, self.device)
            if self.rgb:
                ycc = rgb_to_ycbcr(x, dim=-1)  # (K,h,w,3)
                y = ycc[..., 0][:, None]
            else:
                y = x[:, None]
            yn = y.to(self.dtype) if self.dtype else y
            if self.codes:
                def fn(t):
                    z = self.net.codes(t)
                    return torch.cat((F.conv2d(z, self.net.head_w), z), 1)
            else:
                fn = self.net.logits
            # encoder on cache-sized pieces of the core (+ its context), see INNER_TILE
            lz = map_in_pieces(fn, yn, core, self.inner, self.halo)
            logits = lz[:, 0].float()
            prior = stats if stats is not None else self.exposure_prior
            if prior is not None:
                logits = logits + torch.as_tensor(prior, device=logits.device)[:, None, None]
            z = lz[:, 1:] if self.codes else None
            w = torch.softmax(logits, dim=0)
            y_f = (w * y[:, 0, y0:y1, x0:x1]).sum(0)
            if self.rgb:
                c = ycc[:, y0:y1, x0:x1]
                cb = fuse_chroma(c[..., 1], dim=0)
                cr = fuse_chroma(c[..., 2], dim=0)
                fused = ycbcr_to_rgb(torch.stack((y_f, cb, cr), 0), dim=0)
            else:
                fused = y_f[None]
            res["image"] = to_numpy(fused.clamp(0.0, 1.0))
            if self.weights:
                res["weights"] = to_numpy(w)
            if self.codes:
                for i in range(self.k):
                    res[f"exposure_{i}"] = to_numpy(z[i])
        if tick is not None:
            tick()
        return res


# --- multi-exposure with CSC-MEFN ---------------------------------------------------------

def exposure_prior_sigma(model: FusionModel) -> float | None:
    """sigma of the global exposure prior the weights were trained with (None: none, as the
    authors' weights); the loader set it on the network from our header."""
    return getattr(model.network, "prior_sigma", None)


def fuse_exposure_stack(stack: np.ndarray, model: FusionModel, device: torch.device,
                        codes: bool = False, progress=None, *, tile=None,
                        weights: bool = True, precision: str | None = None,
                        compile: bool = False) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """One bracket, already normalised: (K,H,W) or (K,H,W,3) float32 in [0,1] ->
    (image (H,W) or (H,W,3), codes, weights (K,H,W) or None)."""
    rgb = stack.ndim == 4
    sigma = exposure_prior_sigma(model)
    prior = None if sigma is None else exposure_prior_logits(
        exposure_channel_sums(stack), stack.shape[1] * stack.shape[2], sigma)

    def attempt(dev: torch.device) -> dict:
        net = model.network_on(dev)
        kernel = MEFKernel(net, stack.shape[0], rgb, dev, codes=codes, weights=weights,
                           precision=precision, compile=compile, exposure_prior=prior)
        side = resolve_tile(tile, stack.shape[1:3], kernel, dev,
                            held=result_bytes(kernel, stack.shape[1:3]))
        return run_tiled(kernel, stack, side, progress)

    outs = notices.on_device_or_cpu(attempt, device)
    image = np.moveaxis(outs.pop("image"), 0, -1) if rgb else outs.pop("image")[0]
    w = outs.pop("weights", None)
    return image, outs, w


def fuse_exposure_stack_fast(stack: np.ndarray, scale: float, model: FusionModel,
                             device: torch.device, progress=None, *, tile=None,
                             weights: bool = True, precision: str | None = None,
                             compile: bool | None = None
                             ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """One bracket on the fast path: stack (K,H,W) or (K,H,W,3) as the user gave it (uint8 or
    uint16 with ``scale`` = 1 / dtype max, or float32 in [0, 1] with scale 1) ->
    (image (H,W[,3]) float32, weights (K,H,W) or None, the kernel that ran: "numba" or
    "pytorch").

    On the CPU in float32 (``precision`` None) and unless ``compile=True`` asks for
    torch.compile: the fused numba kernel (engine/mef_cpu.py), tiles on threads. Elsewhere, or
    where numba is missing or fails (with a notice), the PyTorch fast form
    (fastpath.FastMEFN), compiled where ``compile`` (None: ``fast.AUTO_COMPILE``) says. Either
    way the stack is never converted to float32 as a whole."""
    K, H, W = stack.shape[:3]
    sigma = exposure_prior_sigma(model)
    if device.type == "cpu" and precision is None and not compile:
        if mef_cpu.available(stack.dtype, stack.ndim == 4):
            return (*_fuse_stack_numba(stack, scale, model, sigma, progress, tile, weights),
                    "numba")
        notices.notify(f"the fused CPU kernel is unavailable ({mef_cpu.unavailable_reason()}); the "
                       f"fast path runs in PyTorch (slower)", notices.FastPathFallback)
    prior = np.zeros(K, np.float32) if sigma is None else exposure_prior_logits(
        exposure_channel_sums(stack) * scale, H * W, sigma)
    compile = auto_compile("mef", True, device) if compile is None else compile
    return (*_fuse_stack_torch(stack, scale, model, device, prior, progress, tile, weights,
                               precision, compile), "pytorch")


def _fuse_stack_numba(stack, scale, model, sigma, progress, tile, weights):
    K, H, W = stack.shape[:3]
    params = mef_cpu.MEFParams(model.network_on(torch.device("cpu")))
    prior = np.zeros(K, np.float32) if sigma is None else exposure_prior_logits(
        mef_cpu.channel_sums(stack) * scale, H * W, sigma)
    side = (NUMBA_TILE if tile is None else tile) or max(H, W)
    tiles = tile_grid((H, W), side, params.radius)
    return mef_cpu.fuse_bracket(stack, scale, params, prior, tiles, weights,
                                threads=torch.get_num_threads(),
                                tick=Ticker(progress, len(tiles)))


def _fuse_stack_torch(stack, scale, model, device, prior, progress, tile, weights, precision,
                      compile):
    """The PyTorch fast form: every crop (one shape, ``tile`` px + the network's 5 px halo)
    through one graph from the raw values to the blended colour (fastpath.FastMEFN), compiled
    if ``compile``: a crop's codes stay in cache."""
    K, H, W = stack.shape[:3]
    rgb = stack.ndim == 4

    def attempt(dev: torch.device):
        net = model.network_on(dev)
        fnet = fast_network("mef", net, precision_dtype(precision), compile=compile,
                            scale=scale)
        # compiled: cache-sized crops of one shape; eager: large ones (per-crop overhead)
        sides = FAST_TILE if compile else INNER_TILE_EAGER
        side = sides["cpu" if dev.type == "cpu" else "gpu"] if tile is None else tile
        side = side or max(H, W)
        bounds = (0, H, 0, W)
        tiles = [grown(t, bounds, side + 2 * fnet.radius)
                 for t in tile_grid((H, W), side, fnet.radius)]
        image = np.empty((H, W, 3) if rgb else (H, W), np.float32)
        w_out = np.empty((K, H, W), np.float32) if weights else None
        src = torch.from_numpy(np.ascontiguousarray(stack))
        prior_t = torch.from_numpy(np.asarray(prior, np.float32)).to(dev)
        ticker = Ticker(progress, len(tiles))
        with torch.inference_mode():
            for t in tiles:
                crop = src[:, t.crop_slices[0], t.crop_slices[1]].to(dev)
                img, w = fnet.run(crop, prior_t)
                iy0, iy1, ix0, ix1 = t.inner
                image[t.core_slices] = to_numpy(img[iy0:iy1, ix0:ix1])
                if weights:
                    w_out[(slice(None), *t.core_slices)] = to_numpy(w[:, iy0:iy1, ix0:ix1])
                ticker()
        return image, w_out

    return notices.on_device_or_cpu(attempt, device)


def _raw_for_fast_path(norm) -> tuple[np.ndarray, float] | None:
    """(values as given, scale to [0, 1]) where the fast path can map the values itself inside
    its compiled graph: uint8/uint16 divided by their maximum, float32 already in [0, 1]."""
    a = norm.array
    if norm.kind == "divide" and a.dtype in (np.uint8, np.uint16):
        return a, 1.0 / norm.span
    if norm.kind == "as is" and a.dtype == np.float32:
        return a, 1.0
    return None


def _split_exposures(shape: tuple[int, ...], rgb) -> tuple[bool, int]:
    """(is RGB, index of the exposure axis) for a stack of this shape."""
    if rgb is None:
        if len(shape) >= 4 and shape[-1] in (1, 2, 4):
            raise ValueError(f"stack: RGB exposures need 3 channels last, (K, H, W, 3); got "
                             f"shape {shape} (pass rgb=False for grey planes this narrow)")
        rgb = len(shape) >= 4 and shape[-1] == 3
    core = 4 if rgb else 3
    if len(shape) < core:
        want = "(..., K, H, W, 3) RGB" if rgb else "(..., K, H, W) grey"
        raise ValueError(f"stack: expected {want} exposures, got shape {shape}")
    return bool(rgb), len(shape) - core


def fuse_exposures(stack, model=None, device="auto", codes: bool = False,
                   progress=None, *, rgb: bool | None = None, tile=None, weights: bool = True,
                   precision: str | None = None, compile: bool | None = None, client=None,
                   scheduler: str | None = None, exact: bool = False) -> FusionResult:
    """Fuse K >= 2 registered exposures: stack (K,H,W) grey or (K,H,W,3) RGB.

    RGB goes through YCbCr: the network weighs each exposure's luminance (softmax over
    exposures) and chroma is blended by saturation. Returns (H,W) or (H,W,3) float32.
    Weights trained with the global exposure prior (the packaged ones; header
    ``exposure_prior_sigma``) add it to each exposure's logits, from that exposure's mean
    luminance over the whole image (``models.mefn.exposure_prior``; in metadata).

    nD: leading axes before the exposure axis, (..., K, H, W[, 3]), are independent brackets
    (time, z, ...), each fused on its own; a last axis of length 3 means RGB unless
    ``rgb=False``. One normalisation for the whole input (per-exposure min-max would undo the
    exposure differences the fusion depends on). ``tile``, ``precision``, ``compile``,
    ``weights``, ``client``/``scheduler``, dask inputs, ``exact`` and the fast path as in
    fuse_infrared_visible (the network's halo is 5 px; automatic tiles on the CPU are at most
    1024 px on the exact path, 128 px on the fast path, which reads uint8/uint16 and float32
    stacks as they are, converting crop by crop; ``codes=True`` runs the exact path).
    weights {"exposures": (K, ..., H, W)}.
    """
    t0 = time.perf_counter()
    notices.begin_run()
    check_frames(stack, "stack")  # a list of frames of different shapes: name them
    shape = tuple(np.shape(stack))
    is_rgb, lead = _split_exposures(shape, rgb)
    core_shape = shape[lead:]
    if core_shape[0] < 2:
        raise ValueError(f"stack: at least 2 exposures are needed, got {core_shape[0]} "
                         f"(shape {shape}; the exposure axis comes first)")
    check_min_size(core_shape[:3], "stack", MEF_MIN_SIZE, "3x3 reflection padding")
    model = resolve_model(model, "mef")
    prior_sigma = exposure_prior_sigma(model)
    dev = resolve_device(device)
    k = core_shape[0]
    names = [f"exposure_{i}" for i in range(k)]
    colour = "YCbCr" if is_rgb else "grey"
    if lazy_requested(client, scheduler, stack):
        if codes:
            raise ValueError("codes: not available for dask inputs or cluster runs")
        lazy = fuse_exposures_lazy(stack, model, dev, is_rgb, tile=tile, weights=weights,
                                   precision=precision, client=client, scheduler=scheduler,
                                   prior_sigma=prior_sigma)
        meta = base_metadata(model, dev, lazy.notes)
        meta.update(sources=names, colour=colour, lazy=lazy.is_lazy, tile=lazy.tile,
                    exposure_prior_sigma=prior_sigma, path="exact",
                    timings={"prepare_s": time.perf_counter() - t0})
        return FusionResult(lazy.image, {}, lazy.weights, meta)
    fast = not codes and use_fast_path(model.network, exact)
    norm = normaliser(stack, "stack")
    raw = _raw_for_fast_path(norm) if fast else None
    data, scale = raw if raw is not None else (norm(), 1.0)
    t1 = time.perf_counter()
    planes = plane_indices(shape[:lead])
    if codes and len(planes) > 1:
        raise ValueError("codes: only for a single bracket; fuse brackets one at a time to "
                         "look at their codes")
    out_shape = shape[:lead] + core_shape[1:]
    # one bracket: its arrays are the result (no copy of 2 x 144 MB at 12 Mpx RGB)
    single = not shape[:lead]
    image = None if single else np.empty(out_shape, np.float32)
    w_out = None if single or not weights else np.empty(
        (k, *shape[:lead], *core_shape[1:3]), np.float32)
    code_maps = {}
    kernel = None
    for i, idx in enumerate(planes):
        if fast:
            img, w, kernel = fuse_exposure_stack_fast(
                data[idx], scale, model, dev, plane_progress(progress, i, len(planes)),
                tile=tile, weights=weights, precision=precision, compile=compile)
        else:
            img, code_maps, w = fuse_exposure_stack(
                data[idx], model, dev, codes, plane_progress(progress, i, len(planes)),
                tile=tile, weights=weights, precision=precision, compile=bool(compile))
        if single:
            image = np.ascontiguousarray(img, np.float32)
            w_out = None if w is None else np.ascontiguousarray(w, np.float32)
            continue
        image[idx] = img
        if weights:
            w_out[(slice(None), *idx)] = w
    del data
    meta = base_metadata(model, dev, {"stack": norm.note})
    meta.update(sources=names, colour=colour, planes=len(planes), tile=tile,
                precision=precision, exposure_prior_sigma=prior_sigma,
                path="fast" if fast else "exact", fast_kernel=kernel,
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, {"exposures": w_out} if weights else {}, meta)


def stretch_percentiles(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Optional display post-process of the authors' MEF test script: stretch the 0.5-99.5 %
    percentiles to [0,1]. Off by default everywhere; returns a new array."""
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return image.copy()
    return np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32)


def _crop_stack(block, lo, hi):
    return normalise_block(block, lo, hi, "stack")


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
    a = as_dask(stack)
    core = 4 if rgb else 3
    lead, (K, H, W) = tuple(a.shape[:a.ndim - core]), tuple(a.shape[a.ndim - core:][:3])
    note, lo, hi = norm_spec(a, "stack")
    net = model.network_on(device)
    kernel = MEFKernel(net, K, rgb, device, weights=weights, precision=precision)

    def crop_of(idx, t):
        return dask.delayed(_crop_stack)(a[idx + (slice(None),) + t.crop_slices], lo, hi)

    def prior_of(idx):
        # blocks holding every exposure (and colour channel) of their pixels
        whole = {0: -1, 3: -1} if rgb else {0: -1}
        blocks = a[idx].rechunk(whole).to_delayed().ravel()
        sums = [dask.delayed(_exposure_sums)(b, lo, hi) for b in blocks]
        return dask.delayed(_exposure_prior)(sums, H * W, prior_sigma)

    out, side = planes_graph(kernel, device, tile, lead, (H, W), crop_of, client=client,
                             scheduler=scheduler,
                             stats_of=None if prior_sigma is None else prior_of)
    parts = split_outputs(kernel, out, len(lead))
    img = parts["image"]
    img = da.moveaxis(img, len(lead), -1) if rgb else img[(slice(None),) * len(lead) + (0,)]
    result = {"image": img}
    if weights:
        result["exposures"] = da.moveaxis(parts["weights"], len(lead), 0)
    return outcome(result, {"stack": note}, side, client, scheduler, from_numpy)
