"""The public fusion functions: numpy (or dask) in, the same out, with codes and weight maps.

Tiling lives in tiling.py, the dask graphs in lazy.py; both run the same per-tile kernels."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from .. import __version__
from ..models.color import luma
from . import notices
from .device import resolve_device
from .inputs import (
    NormalisedStack,
    check_frames,
    check_min_size,
    check_ndim,
    check_same_shape,
    normalise,
    normaliser,
)
from .lazy import fuse_exposures_lazy, fuse_grey_lazy, fuse_guided_lazy, is_dask
from .registry import FusionModel, resolve_model
from .rules import RULES, exposure_channel_sums, exposure_prior_logits
from .tiling import (  # noqa: F401  (Cancelled and IVF_ALPHA are re-exported here)
    IVF_ALPHA,
    Cancelled,
    IVFKernel,
    MEFKernel,
    MMFKernel,
    check_code_gain,
    resolve_tile,
    result_bytes,
    run_tiled,
    splittable_oom,
)

IVF_MIN_SIZE = 6  # the 11x11 reflection-padded blur needs more than 5 px per side
MEF_MIN_SIZE = 2  # 3x3 reflection padding needs 2 px
MMF_MIN_LOW_SIZE = 4  # the fast guided filter (r=1) needs more than 3 px per side


def report(progress, done: int, total: int) -> None:
    """Call the user's progress(done, total) callback, if any. It may raise Cancelled."""
    if progress is not None:
        progress(done, total)


@dataclass
class FusionResult:
    """image: float32 in [0,1] (a numpy array, or a lazy dask array for dask inputs);
    codes: name -> float32 (q,H,W) when asked for; weights: name -> per-source weight maps
    (sources first); metadata: task, weights, device (the one the run finally used: "cpu" after
    an out-of-memory fallback), tile, timings, notices (what the run had to do differently,
    e.g. out-of-memory retries; also given as OutOfMemoryRetry warnings)."""

    image: np.ndarray  # or a dask array (lazy results)
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def _base_metadata(model: FusionModel, device: torch.device, notes: dict) -> dict:
    """The metadata every fuse_* result carries. Called once the run's work is done: it takes
    the notices this run recorded (notices.py) and the device it finally ran on."""
    info = model.info
    lines, used = notices.take(device)
    return {
        "task": model.task,
        "network": model.name,
        "weights": info.get("label"),
        "weights_sha256": info.get("sha256"),
        "weights_format": info.get("format"),
        "device": used,
        "normalisation": notes,
        # what makes each kind of code (PReLU / sparse / soft threshold): the code layers' names
        "code_activation": model.network.code_activations(),
        "package_version": __version__,
        "notices": lines,
    }


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --- infrared + visible (and any N grey sources) with CSC-IVFN ----------------------------

def _check_rules(base_rule: str, detail_rule: str) -> None:
    for rule, arg in ((base_rule, "base_rule"), (detail_rule, "detail_rule")):
        if rule not in RULES:
            raise ValueError(f"{arg}: must be one of {RULES}, got {rule!r}")


def fuse_grey_sources(images: dict[str, np.ndarray], model: FusionModel, base_rule: str,
                      detail_rule: str, device: torch.device, codes: bool, progress=None, *,
                      tile=None, weights: bool = True, precision: str | None = None,
                      compile: bool = False, exact_rules: bool = False,
                      code_gain: float = IVF_ALPHA) -> tuple[np.ndarray, dict, dict]:
    """Fuse S >= 2 registered grey float32 images in [0,1] (name -> (H,W)) with CSC-IVFN.

    All sources go through each encoder as one batch, tile by tile (see ``tile`` in
    fuse_infrared_visible). ``code_gain``: the factor on the fused codes before decoding
    (default 2, the authors'; see fuse_infrared_visible). Returns (image (H,W), codes
    name -> (q,H,W) if ``codes``, weights {"base": (S,H,W) channel-mean saliency/l1 weights,
    "detail": (S,H,W)}, empty when ``weights=False``).
    """
    _check_rules(base_rule, detail_rule)
    names = list(images)
    x = np.stack([np.asarray(images[n], dtype=np.float32) for n in names])
    return _fuse_grey_stack(x, names, model, base_rule, detail_rule, device, codes, progress,
                            tile=tile, weights=weights, precision=precision, compile=compile,
                            exact_rules=exact_rules, code_gain=code_gain)


def _fuse_grey_stack(x: np.ndarray | NormalisedStack, names: list[str], model: FusionModel,
                     base_rule: str, detail_rule: str, device: torch.device, codes: bool,
                     progress=None, *, tile=None, weights: bool = True,
                     precision: str | None = None, compile: bool = False,
                     exact_rules: bool = False, code_gain: float = IVF_ALPHA
                     ) -> tuple[np.ndarray, dict, dict]:
    """fuse_grey_sources on sources already stacked: x [S, H, W] float32 in [0,1] (an array or
    a NormalisedStack, which converts the crops the tiles read)."""
    code_gain = check_code_gain(code_gain)

    def attempt(dev: torch.device) -> dict:
        net = model.network_on(dev)
        kernel = IVFKernel(net, names, base_rule, detail_rule, dev, codes=codes,
                           weights=weights, precision=precision, compile=compile,
                           exact_rules=exact_rules, code_gain=code_gain)
        side = resolve_tile(tile, x.shape[-2:], kernel, dev,
                            held=result_bytes(kernel, x.shape[-2:]))
        return run_tiled(kernel, x, side, progress)

    outs = notices.on_device_or_cpu(attempt, device)
    code_maps = {k: v for k, v in outs.items() if k not in ("image", "weights_base",
                                                            "weights_detail")}
    w = {"base": outs["weights_base"], "detail": outs["weights_detail"]} if weights else {}
    return outs["image"][0], code_maps, w


def _planes(shape: tuple[int, ...], n_core: int) -> list[tuple[int, ...]]:
    """Indices of the leading (time, z, ...) axes of an array whose last n_core axes are one
    plane's."""
    return list(np.ndindex(*shape[:len(shape) - n_core]))


def _plane_progress(progress, k: int, n: int):
    if progress is None:
        return None
    return lambda done, total: progress(k * total + done, n * total)


def _lazy_requested(client, scheduler, *arrays) -> bool:
    return client is not None or scheduler is not None or any(is_dask(a) for a in arrays)


def fuse_infrared_visible(ir, vis, model=None, base_rule: str = "saliency",
                          detail_rule: str = "l1", device="auto", codes: bool = False,
                          progress=None, *, tile=None, weights: bool = True,
                          precision: str | None = None, compile: bool = False,
                          client=None, scheduler: str | None = None,
                          code_gain: float = IVF_ALPHA) -> FusionResult:
    """Fuse a registered infrared/visible pair of grey images with CSC-IVFN.

    ir, vis: (H,W), or nD stacks (..., H, W) of equal shape (time, z, ...): every plane is
    fused independently (and the result is the same as a Python loop over the planes; the
    normalisation to [0,1] is done once for the whole stack). numpy or dask arrays.
    base_rule / detail_rule: 'saliency' (authors' base default), 'l1' (authors' detail
    default) or 'average'. codes=True also returns the sparse codes after the last DCU
    (q maps per source: memory-hungry; 2-D numpy inputs only).
    code_gain: the factor applied to the fused base and detail codes before decoding (a
    finite number > 0). The default 2 is the authors' test-time heuristic for infrared/visible
    (it stretches the contrast); 1 keeps the sources' intensity scale (an image fused with
    itself comes back as it was), as fuse_multimodal does for medical images.
    progress(done, total) is called after every tile step and may raise Cancelled.

    Scale: ``tile`` is the tile side in pixels (None: the whole image when its working set
    fits the available memory, else tiles chosen from it, GPU memory on CUDA; on the CPU the
    tile and the results then share 2 GiB; 0 or False: the whole image at once). Tiles carry
    a halo as wide as the network's and the rules' context (113 px with the saliency rule,
    whose whole-image statistics are computed first in a separate pass), so tiled and
    whole-image results agree to float rounding. A tile that runs out of memory is split and
    retried (down to 32 px), and when even that fails on a GPU the run goes on on the CPU;
    either way with an OutOfMemoryRetry warning and a line in ``metadata["notices"]``
    (``metadata["device"]`` is then "cpu").
    ``precision``: None/'fp32' (default), or 'fp16'/'bf16' for the networks on a GPU (the
    rules stay float32; error against fp32 in benchmarks/README.md). ``compile``: run the
    encoders through torch.compile (pays off on large images; the first call compiles).
    ``weights=False`` skips the weight maps (two (S,H,W) arrays: memory on huge images).

    Dask: with dask inputs the result's image and weights are lazy dask arrays (chunked by
    tile and by plane) that compute the same values; napari displays them directly. With
    ``client`` (a dask.distributed Client) or ``scheduler`` (its address) the work runs on
    that cluster: numpy inputs give numpy results, dask inputs a dask array persisted there.

    Returns a FusionResult: image (H,W) or (..., H, W) float32; weights {"base", "detail"}
    as (S, ..., H, W) with S = 2 (infrared, visible).
    """
    t0 = time.perf_counter()
    notices.begin_run()
    for a, n in ((ir, "ir"), (vis, "vis")):
        shp = tuple(np.shape(a))
        if len(shp) < 2 or (len(shp) >= 3 and shp[-1] in (3, 4)):
            raise ValueError(f"{n}: expected a grey image (H, W) or a stack of grey planes "
                             f"(..., H, W), got an array of shape {shp} (convert colour "
                             f"images to grey first)")
        if np.ndim(a) == 3 and np.shape(a)[-1] in (3, 4):
            # an RGB(A) photo, not a stack of 3-pixel-wide planes: say so
            raise ValueError(f"{n}: expected a grey image (H, W); got shape "
                             f"{tuple(np.shape(a))}, which looks like RGB (ir is "
                             f"{tuple(np.shape(ir))}, vis {tuple(np.shape(vis))}) — convert "
                             f"it to grey (e.g. its luminance) first")
    check_same_shape({"ir": np.shape(ir), "vis": np.shape(vis)})
    check_min_size(np.shape(ir), "ir", IVF_MIN_SIZE, "CSC-IVFN's 11x11 blur")
    _check_rules(base_rule, detail_rule)
    code_gain = check_code_gain(code_gain)
    model = resolve_model(model, "ivf")
    dev = resolve_device(device)
    names = ["infrared", "visible"]
    if _lazy_requested(client, scheduler, ir, vis):
        if codes:
            raise ValueError("codes: not available for dask inputs or cluster runs; fuse a "
                             "numpy plane to look at its codes")
        lazy = fuse_grey_lazy({"infrared": ir, "visible": vis}, model, base_rule, detail_rule,
                              dev, tile=tile, weights=weights, precision=precision,
                              client=client, scheduler=scheduler, code_gain=code_gain)
        meta = _base_metadata(model, dev, lazy.notes)
        meta.update(sources=names, base_rule=base_rule, detail_rule=detail_rule,
                    code_gain=code_gain, lazy=lazy.is_lazy, tile=lazy.tile,
                    timings={"prepare_s": time.perf_counter() - t0})
        return FusionResult(lazy.image, {}, lazy.weights, meta)
    shape = tuple(np.shape(ir))
    # normalised crop by crop as the tiles need them: no float32 copy of the sources
    parts = [normaliser(ir, "ir"), normaliser(vis, "vis")]
    x = NormalisedStack(parts)
    notes = {"ir": parts[0].note, "vis": parts[1].note}
    t1 = time.perf_counter()
    planes = _planes(shape, 2)
    if codes and len(planes) > 1:
        raise ValueError("codes: only for a single (H, W) plane; fuse planes one at a time to "
                         "look at their codes")
    if len(planes) == 1:
        image, code_maps, w_out = _fuse_grey_stack(
            x, names, model, base_rule, detail_rule, dev, codes, progress, tile=tile,
            weights=weights, precision=precision, compile=compile, code_gain=code_gain)
    else:
        image = np.empty(shape, np.float32)
        w_out = {k: np.empty((2, *shape), np.float32) for k in ("base", "detail")} \
            if weights else {}
        code_maps = {}
        for k, idx in enumerate(planes):
            img, code_maps, w = _fuse_grey_stack(
                x.plane(idx), names, model, base_rule, detail_rule, dev, codes,
                _plane_progress(progress, k, len(planes)), tile=tile, weights=weights,
                precision=precision, compile=compile, code_gain=code_gain)
            image[idx] = img
            for key, a in w.items():
                w_out[key][(slice(None), *idx)] = a
    del x
    meta = _base_metadata(model, dev, notes)
    meta.update(sources=names, base_rule=base_rule, detail_rule=detail_rule,
                code_gain=code_gain, planes=len(planes), tile=tile, precision=precision,
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, w_out, meta)


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
                   precision: str | None = None, compile: bool = False, client=None,
                   scheduler: str | None = None) -> FusionResult:
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
    ``weights``, ``client``/``scheduler`` and dask inputs as in fuse_infrared_visible (the
    network's halo is 5 px; automatic tiles on the CPU are at most 1024 px).
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
    if _lazy_requested(client, scheduler, stack):
        if codes:
            raise ValueError("codes: not available for dask inputs or cluster runs")
        lazy = fuse_exposures_lazy(stack, model, dev, is_rgb, tile=tile, weights=weights,
                                   precision=precision, client=client, scheduler=scheduler,
                                   prior_sigma=prior_sigma)
        meta = _base_metadata(model, dev, lazy.notes)
        meta.update(sources=names, colour=colour, lazy=lazy.is_lazy, tile=lazy.tile,
                    exposure_prior_sigma=prior_sigma,
                    timings={"prepare_s": time.perf_counter() - t0})
        return FusionResult(lazy.image, {}, lazy.weights, meta)
    norm = normalise(stack, "stack")
    t1 = time.perf_counter()
    planes = _planes(shape, len(core_shape))
    if codes and len(planes) > 1:
        raise ValueError("codes: only for a single bracket; fuse brackets one at a time to "
                         "look at their codes")
    out_shape = shape[:lead] + core_shape[1:]
    image = np.empty(out_shape, np.float32)
    w_out = np.empty((k, *shape[:lead], *core_shape[1:3]), np.float32) if weights else None
    code_maps = {}
    for i, idx in enumerate(planes):
        img, code_maps, w = fuse_exposure_stack(
            norm.data[idx], model, dev, codes, _plane_progress(progress, i, len(planes)),
            tile=tile, weights=weights, precision=precision, compile=compile)
        image[idx] = img
        if weights:
            w_out[(slice(None), *idx)] = w
    meta = _base_metadata(model, dev, {"stack": norm.note})
    meta.update(sources=names, colour=colour, planes=len(planes), tile=tile,
                precision=precision, exposure_prior_sigma=prior_sigma,
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, {"exposures": w_out} if weights else {}, meta)


def stretch_percentiles(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Optional display post-process of the authors' MEF test script: stretch the 0.5-99.5 %
    percentiles to [0,1]. Off by default everywhere; returns a new array."""
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return image.copy()
    return np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32)


# --- guided super-resolution with CSC-MMFN ------------------------------------------------

def _luminance(rgb: np.ndarray) -> np.ndarray:
    return luma(rgb).astype(np.float32)


def _guide_for_network(g: np.ndarray, net_g: int, network: str) -> np.ndarray:
    """A normalised guide (H,W) or (H,W,3) (or a crop of one) -> the network's (net_g, H, W):
    luminance for grey-guide networks, a grey guide repeated for RGB-guide ones."""
    if g.ndim == 3 and net_g == 1:
        return _luminance(g)[None]
    if g.ndim == 3 and net_g == 3:
        return np.moveaxis(g, -1, 0)
    if g.ndim == 2 and net_g == 3:
        return np.repeat(g[None], 3, 0)
    if g.ndim == 2 and net_g == 1:
        return g[None]
    raise ValueError(f"guide: this {network} model expects {net_g}-channel guides")


def _as_array(a, name: str):
    check_frames(a, name)
    return a if hasattr(a, "ndim") and hasattr(a, "shape") else np.asarray(a)


def _guided_layout(lr_shape: tuple, g_shape: tuple, net_c: int | None) -> tuple[int, bool]:
    """(number of leading plane axes, whether low_res has a channel axis) for fuse_guided,
    with a clear error when guide's planes do not line up with low_res's. ``net_c`` None: a
    2-D low_res (no model needed to tell)."""
    if net_c is None or (net_c == 1 and len(lr_shape) == 3 and lr_shape[0] == 1
                         and len(g_shape) in (2, 3)
                         and not (len(g_shape) == 3 and g_shape[0] == 1)):
        # a single plane: (h, w), or (1, h, w) channels first for a 1-channel model
        nl, chan = 0, net_c is not None
    else:
        chan = net_c > 1
        nl = max(len(lr_shape) - (3 if chan else 2), 0)
    if nl == 0:
        if len(g_shape) not in (2, 3):
            raise ValueError(f"guide: expected (H, W) grey or (H, W, 3) RGB, got an array of "
                             f"shape {g_shape}")
        if len(g_shape) == 3 and g_shape[-1] != 3:
            raise ValueError(f"guide: an RGB guide needs 3 channels last, (H, W, 3); got shape "
                             f"{g_shape}")
        return 0, chan
    lead = lr_shape[:nl]
    if g_shape[:nl] == lead and len(g_shape) == nl + 3 and g_shape[-1] != 3:
        raise ValueError(f"guide: an RGB guide needs 3 channels last, (..., H, W, 3); got "
                         f"shape {g_shape}")
    if g_shape[:nl] != lead or len(g_shape) not in (nl + 2, nl + 3):
        planes = "(C, h, w)" if chan else "(h, w)"
        raise ValueError(f"low_res and guide: the leading (time, z, ...) axes must be the same, "
                         f"one guide plane per low-res plane; low_res has shape {lr_shape} "
                         f"(leading {lead}, then {planes}), guide has shape {g_shape} "
                         f"(expected {lead} followed by (H, W) or (H, W, 3))")
    return nl, chan


def fuse_guided(low_res, guide, model=None, device="auto", codes: bool = False,
                progress=None, *, tile=None, precision: str | None = None,
                compile: bool = False, client=None, scheduler: str | None = None
                ) -> FusionResult:
    """Super-resolve ``low_res`` (h,w) or (C,h,w) to the guide's size (H,W) with CSC-MMFN.

    guide: (H,W) grey or (H,W,3) RGB; a grey guide is repeated to RGB for a network trained
    on RGB guides, an RGB guide is reduced to luminance for a network trained on grey ones.
    Returns (H,W) or (C,H,W) float32 in [0,1].

    nD stacks (time, z, ...): for a 1-channel model (the packaged one) low_res (..., h, w)
    with guide (..., H, W) or (..., H, W, 3); for a multi-band model low_res (..., C, h, w).
    The leading axes must be the same; every plane is fused independently (as a loop over
    the planes would; one normalisation for the whole stack) into (..., [C,] H, W).

    ``tile``: output tile side (None: from free memory; 0/False: whole image). Tiles are cut
    in the guide's coordinates; each crops both inputs with the context its pixels need and
    resamples at whole-image coordinates, so tiled and whole-image results agree (1e-5).
    ``precision``/``compile`` as in fuse_infrared_visible. ``codes=True`` returns the guide,
    low-resolution and fused codes and needs one plane, whole (no tiling).
    progress(done, total) is called after every tile and may raise Cancelled.

    Dask: dask inputs (or ``client``/``scheduler``, as in fuse_infrared_visible) give a lazy
    image (..., [C,] H, W), chunked by plane and tile, each task reading only its crops of
    both inputs; the values are those of the in-memory run with the same tile (the whole
    image at once, tile=0, runs the network's own forward instead: up to ~1e-4 apart in fp32).
    """
    t0 = time.perf_counter()
    notices.begin_run()
    lr_arr, g_arr = _as_array(low_res, "low_res"), _as_array(guide, "guide")
    lr_shape, g_shape = tuple(lr_arr.shape), tuple(g_arr.shape)
    if len(lr_shape) < 2:
        check_ndim(lr_arr, "low_res", {2: "(h, w)", 3: "(C, h, w) channels first"})
    if len(g_shape) < 2:
        check_ndim(g_arr, "guide", {2: "(H, W) grey", 3: "(H, W, 3) RGB"})
    if len(lr_shape) > 2:  # the model's channels tell planes from bands
        model = resolve_model(model, "mmf")
    nl, chan = _guided_layout(lr_shape, g_shape,
                              model.network.lr_channels if len(lr_shape) > 2 else None)
    h, w = lr_shape[-2:]
    H, W = g_shape[nl:nl + 2]
    check_min_size(lr_shape, "low_res", MMF_MIN_LOW_SIZE, "the fast guided filter window")
    if H < h or W < w:
        raise ValueError(f"guide: must be at least as large as low_res; guide is {H}x{W}, "
                         f"low_res {h}x{w}")
    model = resolve_model(model, "mmf")
    net_c, net_g = model.network.lr_channels, model.network.guide_channels
    c = lr_shape[nl] if chan else 1
    if c != net_c:
        raise ValueError(f"low_res: this {model.name} model expects {net_c} channel(s), got {c} "
                         f"(shape {lr_shape})")
    lr_input = model.info.get("header", {}).get("training", {}).get("lr_input")
    if lr_input not in (None, "native", "bicubic"):
        raise ValueError(f"model: low-res input preparation {lr_input!r} (recorded in "
                         f"{model.weights_label}) is not supported for inference; train with "
                         f"the default 'bicubic'")
    prepare_guide = partial(_guide_for_network, net_g=net_g, network=model.name)
    dev = resolve_device(device)
    if not chan:  # one channel axis for every layout: (..., C, h, w)
        lr_arr = lr_arr[..., None, :, :]
    if _lazy_requested(client, scheduler, low_res, guide):
        if codes:
            raise ValueError("codes: not available for dask inputs or cluster runs; fuse a "
                             "numpy plane to look at its codes")
        lazy = fuse_guided_lazy(lr_arr, g_arr, model, dev, prepare_guide,
                                bicubic=lr_input == "bicubic", squeeze=not chan, tile=tile,
                                precision=precision, client=client, scheduler=scheduler)
        meta = _base_metadata(model, dev, lazy.notes)
        meta.update(sources=["low_res", "guide"], scale=(H / h, W / w), lazy=lazy.is_lazy,
                    tile=lazy.tile, precision=precision,
                    timings={"prepare_s": time.perf_counter() - t0})
        return FusionResult(lazy.image, {}, {}, meta)
    n_lr, n_g = normalise(lr_arr, "low_res"), normalise(g_arr, "guide")
    planes = _planes(lr_shape[:nl], 0)
    if codes and len(planes) > 1:
        raise ValueError("codes: only for a single plane; fuse planes one at a time to look at "
                         "their codes")
    t1 = time.perf_counter()
    image = np.empty((*lr_shape[:nl], net_c, H, W), np.float32)
    code_maps = {}
    for k, idx in enumerate(planes):
        lr = n_lr.data[idx]
        if lr_input == "bicubic":
            # Our weights were trained on the low-res input bicubically upsampled to the
            # guide's size (a guided residual over bicubic; the network's own upsampling is
            # then the identity): prepare it exactly so (Keys a=-0.75, half-pixel centres, as
            # cv2 INTER_CUBIC).
            lr = torch.nn.functional.interpolate(torch.from_numpy(lr)[None], size=(H, W),
                                                 mode="bicubic", align_corners=False)[0]
            lr = lr.clamp(0.0, 1.0).numpy()
        image[idx], code_maps = _guided_plane(
            model, lr, prepare_guide(n_g.data[idx]), dev, codes,
            _plane_progress(progress, k, len(planes)), tile=tile, precision=precision,
            compile=compile)
    if not chan:
        image = image[..., 0, :, :]
    meta = _base_metadata(model, dev, {"low_res": n_lr.note, "guide": n_g.note})
    meta.update(sources=["low_res", "guide"], scale=(H / h, W / w), planes=len(planes),
                tile=tile, precision=precision,
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, {}, meta)


def _guided_plane(model: FusionModel, lr: np.ndarray, g: np.ndarray, dev: torch.device,
                  codes: bool, progress=None, *, tile=None, precision: str | None = None,
                  compile: bool = False) -> tuple[np.ndarray, dict]:
    """One plane of fuse_guided: lr (C, h_in, w_in) and g (G, H, W) float32 in [0,1], as the
    network takes them -> (image (C, H, W), codes)."""
    h_in, w_in = lr.shape[-2:]
    H, W = g.shape[-2:]

    def attempt(d: torch.device) -> tuple[np.ndarray, dict]:
        net = model.network_on(d)
        kernel = MMFKernel(net, (h_in, w_in), (H, W), d, precision=precision,
                           compile=compile)
        side = resolve_tile(tile, (H, W), kernel, d, held=result_bytes(kernel, (H, W)))
        if codes or (side is None and precision in (None, "fp32")):
            # One pass through the network's own forward: the authors' arithmetic exactly (the
            # fast guided filter's E[xy] - E[x]E[y] cancels, so summation order shows in fp32).
            try:
                with torch.inference_mode():
                    lr_t = torch.from_numpy(np.ascontiguousarray(lr))[None].to(d)
                    g_t = torch.from_numpy(np.ascontiguousarray(g))[None].to(d)
                    report(progress, 0, 1)
                    z = net.encode(lr_t, g_t)
                    out = net.decode(z["fused"], lr_t).clamp(0.0, 1.0)[0]
                    code_maps = {k: _to_numpy(v[0]) for k, v in z.items()} if codes else {}
                report(progress, 1, 1)
                return _to_numpy(out), code_maps
            except Exception as exc:
                if codes or not splittable_oom(exc, (0, H, 0, W)):
                    raise
            # out of memory on the whole image: tiles (whose results agree to 1e-5)
            notices.free_cached(d)
            side = (max(H, W) + 1) // 2
            notices.notify(f"out of memory on {d} with the whole {H}x{W} image; retried "
                           f"with tiles of {side} px")
        x = (np.ascontiguousarray(lr, np.float32), np.ascontiguousarray(g, np.float32))
        return run_tiled(kernel, x, side, progress)["image"], {}

    return notices.on_device_or_cpu(attempt, dev)
