"""The public fusion functions: numpy in, numpy out (results with codes and weight maps)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import __version__
from ..models.color import fuse_chroma, rgb_to_ycbcr, ycbcr_to_rgb
from .device import resolve_device
from .inputs import check_min_size, check_ndim, check_same_shape, normalise
from .registry import FusionModel, resolve_model
from .rules import RULES, apply_rule

IVF_ALPHA = 2.0  # the authors scale both fused codes by 2 before decoding
IVF_MIN_SIZE = 6  # the 11x11 reflection-padded blur needs more than 5 px per side
MEF_MIN_SIZE = 2  # 3x3 reflection padding needs 2 px
MMF_MIN_LOW_SIZE = 4  # the fast guided filter (r=1) needs more than 3 px per side
# Exposures are pushed through the network together; above this many code values they go in
# chunks (the softmax only needs each exposure's 1-channel logits).
MEF_BATCH_VALUES = 64_000_000


class Cancelled(Exception):
    """Raised by a ``progress`` callback to stop a fusion run between steps."""


def report(progress, done: int, total: int) -> None:
    """Call the user's progress(done, total) callback, if any. It may raise Cancelled."""
    if progress is not None:
        progress(done, total)


@dataclass
class FusionResult:
    """image: float32 in [0,1]; codes: name -> float32 (q,H,W) when asked for; weights:
    name -> per-source weight maps (sources first); metadata: task, weights, device, timings."""

    image: np.ndarray
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def _base_metadata(model: FusionModel, device: torch.device, notes: dict) -> dict:
    info = model.info
    return {
        "task": model.task,
        "network": model.name,
        "weights": info.get("label"),
        "weights_sha256": info.get("sha256"),
        "weights_format": info.get("format"),
        "device": str(device),
        "normalisation": notes,
        "package_version": __version__,
    }


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --- infrared + visible (and any N grey sources) with CSC-IVFN ----------------------------

def fuse_grey_sources(images: dict[str, np.ndarray], model: FusionModel, base_rule: str,
                      detail_rule: str, device: torch.device, codes: bool, progress=None
                      ) -> tuple[np.ndarray, dict, dict]:
    """Fuse S >= 2 registered grey float32 images in [0,1] (name -> (H,W)) with CSC-IVFN.

    All sources go through each encoder as one batch. Returns (image, codes, weights).
    """
    for rule, arg in ((base_rule, "base_rule"), (detail_rule, "detail_rule")):
        if rule not in RULES:
            raise ValueError(f"{arg}: must be one of {RULES}, got {rule!r}")
    names = list(images)
    net = model.network_on(device)
    x = torch.from_numpy(np.stack([images[n] for n in names]))[:, None].to(device)
    with torch.inference_mode():
        report(progress, 0, 3)
        z_base, z_detail = net.encode(x)
        report(progress, 1, 3)
        fused_base, w_base = apply_rule(base_rule, z_base)
        fused_detail, w_detail = apply_rule(detail_rule, z_detail)
        report(progress, 2, 3)
        out = net.decode(IVF_ALPHA * fused_base[None], IVF_ALPHA * fused_detail[None])[0, 0]
        weights = {
            # per-channel base weights are summarised by their mean over channels
            "base": _to_numpy(w_base.mean(1)),
            "detail": _to_numpy(w_detail[:, 0]),
        }
        code_maps = {}
        if codes:
            for i, n in enumerate(names):
                code_maps[f"{n}_base"] = _to_numpy(z_base[i])
                code_maps[f"{n}_detail"] = _to_numpy(z_detail[i])
            code_maps["fused_base"] = _to_numpy(fused_base)
            code_maps["fused_detail"] = _to_numpy(fused_detail)
    report(progress, 3, 3)
    return _to_numpy(out), code_maps, weights


def fuse_infrared_visible(ir, vis, model=None, base_rule: str = "saliency",
                          detail_rule: str = "l1", device="auto", codes: bool = False,
                          progress=None) -> FusionResult:
    """Fuse a registered infrared/visible pair of grey images (H,W) with CSC-IVFN.

    base_rule / detail_rule: 'saliency' (authors' base default), 'l1' (authors' detail
    default) or 'average'. codes=True also returns the sparse codes after the last DCU
    (q maps per source: memory-hungry). progress(done, total) is called between steps and
    may raise Cancelled. Returns a FusionResult with a (H,W) float32 image.
    """
    t0 = time.perf_counter()
    for a, n in ((ir, "ir"), (vis, "vis")):
        check_ndim(a, n, {2: "a grey image (H, W)"})
    check_same_shape({"ir": np.shape(ir), "vis": np.shape(vis)})
    check_min_size(np.shape(ir), "ir", IVF_MIN_SIZE, "CSC-IVFN's 11x11 blur")
    n_ir, n_vis = normalise(ir, "ir"), normalise(vis, "vis")
    model = resolve_model(model, "ivf")
    dev = resolve_device(device)
    t1 = time.perf_counter()
    image, code_maps, weights = fuse_grey_sources(
        {"infrared": n_ir.data, "visible": n_vis.data}, model, base_rule, detail_rule, dev, codes,
        progress)
    meta = _base_metadata(model, dev, {"ir": n_ir.note, "vis": n_vis.note})
    meta.update(sources=["infrared", "visible"], base_rule=base_rule, detail_rule=detail_rule,
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, weights, meta)


# --- multi-exposure with CSC-MEFN ---------------------------------------------------------

def _exposure_logits(net, y: torch.Tensor, code_channels: int, progress=None) -> torch.Tensor:
    per = max(1, MEF_BATCH_VALUES // (code_channels * y.shape[-2] * y.shape[-1]))
    out = []
    for i in range(0, y.shape[0], per):
        report(progress, i, y.shape[0])
        out.append(net.logits(y[i:i + per]))
    report(progress, y.shape[0], y.shape[0])
    return torch.cat(out, 0)


def fuse_exposures(stack, model=None, device="auto", codes: bool = False,
                   progress=None) -> FusionResult:
    """Fuse K >= 2 registered exposures: stack (K,H,W) grey or (K,H,W,3) RGB.

    RGB goes through YCbCr: the network weighs each exposure's luminance (softmax over
    exposures) and chroma is blended by saturation. Returns (H,W) or (H,W,3) float32.
    """
    t0 = time.perf_counter()
    arr = check_ndim(stack, "stack", {3: "(K, H, W) grey exposures",
                                      4: "(K, H, W, 3) RGB exposures"})
    shape = tuple(np.shape(arr))
    if len(shape) == 4 and shape[-1] != 3:
        raise ValueError(f"stack: RGB exposures need 3 channels last, (K, H, W, 3); got shape "
                         f"{shape}")
    if shape[0] < 2:
        raise ValueError(f"stack: at least 2 exposures are needed, got {shape[0]} "
                         f"(shape {shape}; the exposure axis comes first)")
    check_min_size(shape[:3], "stack", MEF_MIN_SIZE, "3x3 reflection padding")
    # One normalisation for the whole bracket: per-exposure min-max would undo the exposure
    # differences the fusion depends on.
    norm = normalise(arr, "stack")
    model = resolve_model(model, "mef")
    dev = resolve_device(device)
    net = model.network_on(dev)
    t1 = time.perf_counter()
    x = torch.from_numpy(norm.data).to(dev)
    with torch.inference_mode():
        if x.ndim == 4:
            ycc = rgb_to_ycbcr(x, dim=-1)  # (K,H,W,3)
            y = ycc[..., 0][:, None]
        else:
            y = x[:, None]
        logits = _exposure_logits(net, y, net.hparams["code_channels"], progress)
        w = torch.softmax(logits[:, 0], dim=0)
        y_f = (w * y[:, 0]).sum(0)
        if x.ndim == 4:
            cb = fuse_chroma(ycc[..., 1], dim=0)
            cr = fuse_chroma(ycc[..., 2], dim=0)
            fused = ycbcr_to_rgb(torch.stack((y_f, cb, cr), -1), dim=-1)
        else:
            fused = y_f
        fused = fused.clamp(0.0, 1.0)
        code_maps = {}
        if codes:
            for i in range(y.shape[0]):
                code_maps[f"exposure_{i}"] = _to_numpy(net.codes(y[i:i + 1])[0])
    meta = _base_metadata(model, dev, {"stack": norm.note})
    meta.update(sources=[f"exposure_{i}" for i in range(shape[0])], colour="YCbCr" if
                x.ndim == 4 else "grey",
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(_to_numpy(fused), code_maps, {"exposures": _to_numpy(w)}, meta)


def stretch_percentiles(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Optional display post-process of the authors' MEF test script: stretch the 0.5-99.5 %
    percentiles to [0,1]. Off by default everywhere; returns a new array."""
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return image.copy()
    return np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32)


# --- guided super-resolution with CSC-MMFN ------------------------------------------------

def _luminance(rgb: np.ndarray) -> np.ndarray:
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.float32)


def fuse_guided(low_res, guide, model=None, device="auto", codes: bool = False,
                progress=None) -> FusionResult:
    """Super-resolve ``low_res`` (h,w) or (C,h,w) to the guide's size (H,W) with CSC-MMFN.

    guide: (H,W) grey or (H,W,3) RGB; a grey guide is repeated to RGB for a network trained
    on RGB guides, an RGB guide is reduced to luminance for a network trained on grey ones.
    Returns (H,W) or (C,H,W) float32 in [0,1].
    """
    t0 = time.perf_counter()
    lr_arr = check_ndim(low_res, "low_res", {2: "(h, w)", 3: "(C, h, w) channels first"})
    g_arr = check_ndim(guide, "guide", {2: "(H, W) grey", 3: "(H, W, 3) RGB"})
    if np.ndim(g_arr) == 3 and np.shape(g_arr)[-1] != 3:
        raise ValueError(f"guide: an RGB guide needs 3 channels last, (H, W, 3); got shape "
                         f"{tuple(np.shape(g_arr))}")
    lr_shape, g_shape = tuple(np.shape(lr_arr)), tuple(np.shape(g_arr))
    h, w = lr_shape[-2:]
    H, W = g_shape[:2]
    check_min_size(lr_shape, "low_res", MMF_MIN_LOW_SIZE, "the fast guided filter window")
    if H < h or W < w:
        raise ValueError(f"guide: must be at least as large as low_res; guide is {H}x{W}, "
                         f"low_res {h}x{w}")
    model = resolve_model(model, "mmf")
    net_c, net_g = model.network.lr_channels, model.network.guide_channels
    c = 1 if len(lr_shape) == 2 else lr_shape[0]
    if c != net_c:
        raise ValueError(f"low_res: this {model.name} model expects {net_c} channel(s), got {c} "
                         f"(shape {lr_shape})")
    n_lr, n_g = normalise(lr_arr, "low_res"), normalise(g_arr, "guide")
    g = n_g.data
    if g.ndim == 3 and net_g == 1:
        g = _luminance(g)[None]
    elif g.ndim == 3 and net_g == 3:
        g = np.moveaxis(g, -1, 0)
    elif g.ndim == 2 and net_g == 3:
        g = np.repeat(g[None], 3, 0)
    elif g.ndim == 2 and net_g == 1:
        g = g[None]
    else:
        raise ValueError(f"guide: this {model.name} model expects {net_g}-channel guides")
    lr = n_lr.data if n_lr.data.ndim == 3 else n_lr.data[None]
    dev = resolve_device(device)
    net = model.network_on(dev)
    t1 = time.perf_counter()
    with torch.inference_mode():
        lr_t = torch.from_numpy(np.ascontiguousarray(lr))[None].to(dev)
        g_t = torch.from_numpy(np.ascontiguousarray(g))[None].to(dev)
        report(progress, 0, 1)
        z = net.encode(lr_t, g_t)
        out = net.decode(z["fused"], lr_t).clamp(0.0, 1.0)[0]
        code_maps = {k: _to_numpy(v[0]) for k, v in z.items()} if codes else {}
    report(progress, 1, 1)
    image = _to_numpy(out)
    if len(lr_shape) == 2:
        image = image[0]
    meta = _base_metadata(model, dev, {"low_res": n_lr.note, "guide": n_g.note})
    meta.update(sources=["low_res", "guide"], scale=(H / h, W / w),
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, {}, meta)
