"""Tiled inference: every network and rule run on overlapping tiles, with a result equal to the
whole-image one (to float rounding) because each tile carries a halo as wide as the context its
core pixels depend on.

Pieces, all used both by the in-memory engine (``run_tiled``) and the dask one (``lazy.py``):

* ``Tile`` / ``sub_tiles``: cores that partition a window, crops = core + halo clipped to the
  image (at the image border the crop edge *is* the border, so the networks' reflection padding
  happens exactly where it does on the whole image).
* Folded networks (``folded``): inference copies of the CSC networks with batch norm folded
  into the convolutions (scale into the weights, shift into a bias; the residual scale becomes
  one ``addcmul``) and a two-pass soft threshold; optional ``torch.compile``.
* Kernels (``IVFKernel``, ``MEFKernel``, ``MMFKernel``): the whole fusion pipeline of one task
  on one crop, returning the core's outputs as channel-first float32 arrays. Their ``halo`` is
  designed per rule: CSC-IVFN with the saliency base rule needs 20 px (blur + 8 DCUs) + 90 px
  (guided filter r=45, applied twice) + 3 px (decoder); with the l1/average rules 24 px.
* Memory: ``auto_tile`` picks the tile side from free memory (CUDA: ``torch.cuda.mem_get_info``;
  CPU: psutil, capped so that huge images run in bounded memory) and the kernel's bytes per
  pixel; ``run_tiled`` splits a tile that runs out of memory into four and goes on, with a
  notice (notices.py; the fallback to the CPU is there too).
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.color import fuse_chroma, rgb_to_ycbcr, ycbcr_to_rgb
from ..models.csc import DCU, CSCEncoder, SoftThreshold, reflect_pad
from ..models.ivfn import BLUR_SIZE, box_blur
from .notices import free_cached, gave_up_splitting, is_oom, notify, release_freed_memory
from .rules import SALIENCY_RADIUS, SaliencyStats, apply_rule

IVF_ALPHA = 2.0  # the authors scale both fused codes by 2 before decoding
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
# Inner tiles on the CPU: the element-wise passes between convolutions (batch norm, padding,
# soft threshold, residual) stream q maps per pixel and are memory-bound there, so the
# encoders run on cache-sized pieces of each crop. Measured (benchmarks/README.md, 1 thread,
# bit-identical output): IVF 768x576 pair 32.9 s with 512 px, 14.2 s with 192 px; MEF 3 x 4
# Mpx 16.8 s with 256 px, 10.2 s with 128 px. On a GPU big pieces are faster.
INNER_TILE = {("ivf", "cpu"): 192, ("mef", "cpu"): 128, ("ivf", "gpu"): 512, ("mef", "gpu"): None}
PRECISIONS = {None: None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16,
              "fp64": torch.float64}  # fp64: a check of the tiling (no rounding to hide in)


def check_code_gain(code_gain) -> float:
    """``code_gain`` (the factor on the fused base and detail codes before decoding) as a
    float; ValueError naming it unless it is a finite number > 0."""
    ok = isinstance(code_gain, (int, float, np.integer, np.floating)) \
        and not isinstance(code_gain, (bool, np.bool_))
    if ok:
        value = float(code_gain)
        if math.isfinite(value) and value > 0.0:
            return value
    raise ValueError(f"code_gain: expected a finite number > 0 (the factor on the fused codes "
                     f"before decoding: 2 as the authors for infrared/visible, 1 keeps the "
                     f"sources' intensity scale), got {code_gain!r}")


class Cancelled(Exception):
    """Raised by a ``progress`` callback to stop a fusion run between steps (tiles)."""


# --- tile geometry --------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


def _within(box: Box, outer: Box) -> Box:
    """``box`` in the coordinates of ``outer`` (both in the same frame)."""
    return (box[0] - outer[0], box[1] - outer[0], box[2] - outer[2], box[3] - outer[2])


def _cut(a: torch.Tensor, box: Box, outer: Box) -> torch.Tensor:
    """The ``box`` part of ``a``, whose last two axes cover ``outer``."""
    y0, y1, x0, x1 = _within(box, outer)
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
        return _within(self.core, self.crop)


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


# --- folded inference networks --------------------------------------------------------------

def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight.detach() / torch.sqrt(bn.running_var.detach() + bn.eps)
    return s, bn.bias.detach() - bn.running_mean.detach() * s


class FoldedShrink(nn.Module):
    """Soft threshold sign(v) relu(|v| - t) as v - clamp(v, -t+, t+) - sign(v) t- (two passes
    when no threshold is negative; exact: the same roundings), or a PReLU."""

    def __init__(self, act: nn.Module):
        super().__init__()
        if isinstance(act, nn.PReLU):
            self.kind = "prelu"
            self.register_buffer("weight", act.weight.detach().clone())
            return
        assert isinstance(act, SoftThreshold)
        self.kind = "sst"
        theta = act.theta.detach().clone()
        if act.nonnegative:
            theta = theta.clamp(min=0.0)
        self.register_buffer("pos", theta.clamp(min=0.0))
        neg = theta.clamp(max=0.0)
        self.has_neg = bool((neg < 0).any())
        self.register_buffer("neg", neg)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.kind == "prelu":
            return F.prelu(v, self.weight)
        out = v - torch.clamp(v, -self.pos, self.pos)
        if self.has_neg:
            out.addcmul_(torch.sign(v), self.neg, value=-1.0)
        return out


class _BN(nn.Module):
    """Eval-mode batch norm as its own pass (identical arithmetic to nn.BatchNorm2d)."""

    def __init__(self, bn: nn.Module | None, q: int):
        super().__init__()
        self.on = isinstance(bn, nn.BatchNorm2d)
        if self.on:
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(name, getattr(bn, name).detach().clone())
            self.eps = bn.eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return v
        return F.batch_norm(v, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


class FoldedDCU(nn.Module):
    """z_next = f(BN(z + W1 * (x - W0 * z))) with an in-place residual add and the two-pass
    soft threshold.

    Batch norm is deliberately NOT folded into W1 here: the published IVFN/MEFN weights have
    negative soft thresholds, which make f jump by 2|theta| at v = 0, so the last-bit rounding
    change of a folded convolution moves isolated code values by up to 0.03 (measured on TNO)
    and the 1e-5 agreement with the reference network would be lost. Folding is exact enough
    where nothing is discontinuous: the IVFN decoder (see FoldedIVFN)."""

    def __init__(self, dcu: DCU):
        super().__init__()
        self.register_buffer("w0", dcu.dictionary.weight.detach().clone())
        self.register_buffer("w1", dcu.adjoint.weight.detach().clone())
        self.norm = _BN(dcu.norm, self.w1.shape[0])
        self.shrink = FoldedShrink(dcu.shrink)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if z is None:
            v = F.conv2d(reflect_pad(x, 1), self.w1)
        else:
            r = x - F.conv2d(reflect_pad(z, 1), self.w0)
            v = F.conv2d(reflect_pad(r, 1), self.w1).add_(z)
        return self.shrink(self.norm(v))


class FoldedEncoder(nn.Module):
    def __init__(self, enc: CSCEncoder):
        super().__init__()
        self.radius = enc.receptive_radius
        if enc.stem is not None:
            self.register_buffer("stem_w", enc.stem.conv.weight.detach().clone())
            self.stem_norm = _BN(getattr(enc.stem, "norm", None), self.stem_w.shape[0])
            self.stem_shrink = FoldedShrink(enc.stem.shrink)
        else:
            self.stem_w = None
        self.dcus = nn.ModuleList(FoldedDCU(d) for d in enc.dcus)

    def forward(self, x: torch.Tensor, first_input: torch.Tensor | None = None) -> torch.Tensor:
        z = None
        if self.stem_w is not None:
            z = self.stem_shrink(self.stem_norm(F.conv2d(reflect_pad(x, 1), self.stem_w)))
        for i, dcu in enumerate(self.dcus):
            z = dcu(first_input if (i == 0 and first_input is not None) else x, z)
        return z


class FoldedIVFN(nn.Module):
    """CSC-IVFN for fusion: encoders and the affine decoder with BN folded and the authors'
    code scale (x2, exact in binary floating point) folded into the decoder's first conv."""

    def __init__(self, net):
        super().__init__()
        self.base = FoldedEncoder(net.base)
        self.detail = FoldedEncoder(net.detail)
        self.encoder_radius = BLUR_SIZE // 2 + net.base.receptive_radius
        ws, bs = [], []
        convs = [m for m in net.decoder.layers if isinstance(m, nn.Conv2d)]
        bns = [m for m in net.decoder.layers if isinstance(m, nn.BatchNorm2d)]
        for i, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
            s, t = _bn_scale_shift(bn)
            w = conv.weight.detach() * s.view(-1, 1, 1, 1)
            ws.append(w * IVF_ALPHA if i == 0 else w)
            bs.append(t)
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            self.register_buffer(f"dw{i}", w.clone())
            self.register_buffer(f"db{i}", b.clone())
        self.n_dec = len(ws)

    def encode_base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x, first_input=box_blur(x))

    def encode_detail(self, x: torch.Tensor) -> torch.Tensor:
        return self.detail(x, first_input=x - box_blur(x))

    def _dec(self, z: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_dec):
            z = F.conv2d(reflect_pad(z, 1), getattr(self, f"dw{i}"), getattr(self, f"db{i}"))
        return z

    def decode(self, fused_base: torch.Tensor, fused_detail: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
        """sigmoid(dec(2 s z_B) + dec(2 s z_D)) for fused codes [N, q, H, W] -> [N, 1, H, W].

        ``scale`` s (None: 1, no multiply) applies to the summed codes: s = code_gain / 2
        gives a code gain other than the authors' 2 folded into the weights (exact for 0.5)."""
        return self.decode_sum(fused_base + fused_detail, scale)

    def decode_sum(self, z: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """``decode`` of the summed fused codes z_B + z_D [N, q, H, W] (scaled in place)."""
        zero = z.new_zeros(1, z.shape[1], 2, 2)
        if scale is not None:
            z.mul_(scale)
        return torch.sigmoid(self._dec(z) + self._dec(zero)[0, 0, 0, 0])


class FoldedMEFN(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.encoder = FoldedEncoder(net.encoder)
        self.register_buffer("head_w", net.head.weight.detach().clone())
        self.radius = self.encoder.radius

    def codes(self, y: torch.Tensor) -> torch.Tensor:
        return self.encoder(y)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.encoder(y), self.head_w)


class FoldedMMFN(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.lr_encoder = FoldedEncoder(net.lr_encoder)
        self.guide_encoder = FoldedEncoder(net.guide_encoder)
        self.register_buffer("dec_w", net.decoder.weight.detach().clone())
        self.radius_, self.eps = net.radius, net.eps

    def decode_codes(self, z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(reflect_pad(z, 1), self.dec_w)


_FOLDERS = {"ivf": FoldedIVFN, "mef": FoldedMEFN, "mmf": FoldedMMFN}
_folded_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_folded_lock = threading.Lock()


def folded(task: str, net: nn.Module, dtype: torch.dtype | None = None,
           compile: bool = False) -> nn.Module:
    """The inference copy of ``net`` (cached per network, dtype and compile flag), on the
    network's device. ``compile=True`` wraps it with ``torch.compile(dynamic=True)``."""
    p = next(net.parameters())
    key = (str(p.device), dtype, bool(compile), p.data_ptr(), p._version)
    with _folded_lock:
        per_net = _folded_cache.setdefault(net, {})
        if key not in per_net:
            with torch.no_grad():
                f = _FOLDERS[task](net).to(p.device).eval()
                if dtype is not None:
                    f = f.to(dtype)
            if compile:
                f = _compiled(f)
            per_net.clear()  # weights changed or another variant: keep one
            per_net[key] = f
        return per_net[key]


def _compiled(f: nn.Module) -> nn.Module:
    f = copy.copy(f)
    for name in ("base", "detail", "encoder", "lr_encoder", "guide_encoder"):
        if hasattr(f, name):
            f._modules[name] = torch.compile(getattr(f, name), dynamic=True)
    return f


def inner_tile(task: str, device: torch.device) -> int | None:
    """The side of the pieces a kernel runs its encoders on within a crop (None: whole)."""
    return INNER_TILE[(task, "cpu" if device.type == "cpu" else "gpu")]


def map_in_pieces(fn, x: torch.Tensor, window: Box, piece: int | None, radius: int,
                  tick=None) -> torch.Tensor:
    """fn (a local operation of context ``radius``: output pixel = f(input within radius),
    same size out as in, e.g. an encoder) applied to x [N, c, h, w] and cut to ``window``,
    computed piece by piece (cores of side ``piece``, each with its ``radius`` halo clipped
    to x): equal to fn(x)[..., window] because every piece sees its full context, and where
    a piece touches x's border its edge *is* that border (fn's reflection padding)."""
    bounds = (0, x.shape[-2], 0, x.shape[-1])
    out = None
    for t in sub_tiles(window, bounds, piece, radius):
        z = fn(x[..., t.crop_slices[0], t.crop_slices[1]])
        iy0, iy1, ix0, ix1 = t.inner
        z = z[..., iy0:iy1, ix0:ix1]
        if out is None:
            out = z.new_empty((*z.shape[:2], window[1] - window[0], window[3] - window[2]))
        out[..., t.core[0] - window[0]:t.core[1] - window[0],
            t.core[2] - window[2]:t.core[3] - window[2]] = z
        if tick is not None:
            tick()
    return out


def to_device(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
    return t if dtype is None else t.to(dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """float32 numpy (float64 stays float64: the fp64 check path)."""
    t = t.detach()
    return (t if t.dtype == torch.float64 else t.float()).cpu().numpy()


# --- kernels: the fusion of one crop ----------------------------------------------------------

RULE_RADIUS = {"saliency": 2 * SALIENCY_RADIUS, "l1": 1, "average": 0}


class IVFKernel:
    """CSC-IVFN fusion of S grey sources on one crop [S, h, w].

    Inside a crop the work is staged, each stage with only the context it needs: base codes
    on the core + decoder + base-rule margin (inner tiles of ``inner`` px with the encoder's
    20 px halo, one progress tick each), the base rule, detail codes on the core + decoder +
    detail-rule margin, the detail rule, and one decoder pass on the summed fused codes.
    Outputs (channel-first, core only): image [1], base/detail weights [S] (channel mean for
    the saliency rule), and with ``codes`` every source's base/detail codes and the fused ones
    (before ``code_gain``).

    ``code_gain``: the factor on the fused base and detail codes before decoding. The folded
    decoder carries the authors' IVF_ALPHA = 2 (their infrared/visible heuristic); any other
    gain multiplies the summed fused codes by code_gain / IVF_ALPHA first (none for 2, so the
    default results are unchanged; 1 keeps a source fused with itself at its own scale).
    """

    task = "ivf"

    def __init__(self, net, names: list[str], base_rule: str, detail_rule: str,
                 device: torch.device, codes: bool = False, weights: bool = True,
                 precision: str | None = None, compile: bool = False,
                 inner: int | None = None, exact_rules: bool = False,
                 code_gain: float = IVF_ALPHA):
        self.dtype = _precision(precision)
        self.code_gain = check_code_gain(code_gain)
        # None: the folded decoder's x IVF_ALPHA as it is (bit-identical default results)
        self.code_scale = None if self.code_gain == IVF_ALPHA else self.code_gain / IVF_ALPHA
        self.net = folded("ivf", net, self.dtype, compile)
        self.names, self.S = list(names), len(names)
        self.q = net.hparams["code_channels"]
        self.base_rule, self.detail_rule = base_rule, detail_rule
        self.device, self.codes, self.weights = device, codes, weights
        # encoder pieces: cache-sized on the CPU (see INNER_TILE); None picks by device
        self.inner = inner_tile("ivf", device) if inner is None else inner
        self.exact_rules = exact_rules
        self.enc_radius = self.net.encoder_radius
        self.dec_radius = 3
        self.halo = (self.enc_radius + self.dec_radius
                     + max(RULE_RADIUS[base_rule], RULE_RADIUS[detail_rule]))
        self.needs_stats = base_rule == "saliency"
        # per crop pixel, what a crop holds at once (+ small maps; the encoders' transients
        # are bounded by the inner tile): with codes, one encoder's codes of all sources +
        # fused base and detail codes; else the saliency rule's base codes of all sources +
        # their fusion, or (local base rules) the two fused code maps: detail codes, local
        # rules and the decoder run piece by piece
        held = self.S + 2 if codes else (self.S + 1 if base_rule == "saliency" else 2)
        self.bytes_per_pixel = 4 * self.q * held + 16 * self.S + 64
        if self.inner:
            side = self.inner + 2 * self.enc_radius
            self.fixed_bytes = 4 * 4 * self.q * self.S * side * side
        else:  # the encoders' transients span the whole crop
            self.fixed_bytes = 0
            self.bytes_per_pixel += 4 * 4 * self.q * self.S

    def crop(self, x, t: Tile):
        return x[:, t.crop_slices[0], t.crop_slices[1]], t.inner

    def plane_shape(self, x) -> tuple[int, int]:
        return tuple(x.shape[1:3])

    def preferred_tile(self, device: torch.device) -> int | None:
        return None  # big tiles: the 113 px saliency halo is costly, and inner tiles keep cache

    def outputs(self) -> dict[str, int]:
        out = {"image": 1}
        if self.weights:
            out["weights_base"] = self.S
            out["weights_detail"] = self.S
        if self.codes:
            for n in self.names:
                out[f"{n}_base"] = self.q
                out[f"{n}_detail"] = self.q
            out["fused_base"] = self.q
            out["fused_detail"] = self.q
        return out

    def _windows(self, shape: tuple[int, int], core: Box) -> tuple[Box, Box, Box]:
        bounds = (0, shape[0], 0, shape[1])
        dec = expand(core, self.dec_radius, bounds)
        wb = expand(dec, RULE_RADIUS[self.base_rule], bounds)
        wd = expand(dec, RULE_RADIUS[self.detail_rule], bounds)
        return dec, wb, wd

    def steps(self, shape: tuple[int, int], core: Box) -> int:
        """Progress ticks one crop of ``shape`` takes."""
        bounds = (0, shape[0], 0, shape[1])
        _, wb, wd = self._windows(shape, core)
        n = len(sub_tiles(wb, bounds, self.inner, self.enc_radius))
        n += len(sub_tiles(wd, bounds, self.inner, self.enc_radius))
        return n + 1

    def encode(self, which: str, x: torch.Tensor, window: Box, tick=None) -> torch.Tensor:
        """Codes [S, q, window] of the crop x [S, 1, h, w], inner tile by inner tile."""
        return map_in_pieces(self._encoder(which), x, window, self.inner, self.enc_radius,
                             tick)

    def _encoder(self, which: str):
        return self.net.encode_base if which == "base" else self.net.encode_detail

    def fuse_in_pieces(self, which: str, rule: str, x: torch.Tensor, window: Box, tick=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused codes [q, window], weights [S, 1, window]) of a local rule (l1, average),
        encoder and rule together inner tile by inner tile (their context: the encoder's
        radius + the rule's), so the [S, q] codes never exist for the whole window."""
        enc = self._encoder(which)

        def fn(piece: torch.Tensor) -> torch.Tensor:
            fused, w = apply_rule(rule, enc(piece).float())
            return torch.cat((fused, w[:, 0]))[None]

        out = map_in_pieces(fn, x, window, self.inner, self.enc_radius + RULE_RADIUS[rule],
                            tick)[0]
        return out[:self.q], out[self.q:, None]

    def decode(self, z: torch.Tensor, window: Box) -> torch.Tensor:
        """The image [1, window] of the summed fused codes z [q, h, w] (z is scaled in place,
        once: the pieces overlap), decoder piece by piece (context 3 px): no decoder
        transients of the whole crop."""
        if self.code_scale is not None:
            z.mul_(self.code_scale)
        return map_in_pieces(self.net.decode_sum, z[None], window, self.inner,
                             self.dec_radius)[0]

    def __call__(self, crop: np.ndarray, core: Box, stats: SaliencyStats | None = None,
                 tick=None) -> dict[str, np.ndarray]:
        shape = crop.shape[-2:]
        if self.needs_stats and stats is None and core != (0, shape[0], 0, shape[1]):
            raise ValueError("the saliency rule on a tile needs the whole image's statistics")
        x = to_device(crop, self.device, self.dtype)[:, None]
        dec, wb, wd = self._windows(shape, core)

        if not self.codes:
            return self._fuse(x, core, dec, wb, wd, stats, tick)
        # with codes: every source's base and detail codes of the core are results anyway
        res: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            z_b = self.encode("base", x, wb, tick).float()
            st = None if stats is None else stats.to(self.device)
            f_b, w_b = apply_rule(self.base_rule, z_b, stats=st, exact=self.exact_rules,
                                  mean_weights=True)
            if self.base_rule != "saliency":
                w_b = w_b.mean(1, keepdim=True)
            if self.weights:
                res["weights_base"] = to_numpy(_cut(w_b, core, wb)[:, 0])
            z_core = _cut(z_b, core, wb)
            for i, n in enumerate(self.names):
                res[f"{n}_base"] = to_numpy(z_core[i])
            res["fused_base"] = to_numpy(_cut(f_b, core, wb))
            f_b = _cut(f_b, dec, wb).clone()
            del z_b, z_core, w_b
            z_d = self.encode("detail", x, wd, tick).float()
            f_d, w_d = apply_rule(self.detail_rule, z_d)
            if self.weights:
                res["weights_detail"] = to_numpy(_cut(w_d.mean(1), core, wd))
            z_core = _cut(z_d, core, wd)
            for i, n in enumerate(self.names):
                res[f"{n}_detail"] = to_numpy(z_core[i])
            res["fused_detail"] = to_numpy(_cut(f_d, core, wd))
            f_d = _cut(f_d, dec, wd)
            del z_d, z_core, w_d
            out = self.net.decode(f_b[None].to(x.dtype), f_d[None].to(x.dtype),
                                  self.code_scale)
            res["image"] = to_numpy(_cut(out[0], core, dec))
        if tick is not None:
            tick()
        return res

    def _fuse(self, x: torch.Tensor, core: Box, dec: Box, wb: Box, wd: Box,
              stats: SaliencyStats | None, tick) -> dict[str, np.ndarray]:
        """__call__ without codes, holding less: the saliency rule needs the base codes of the
        whole window (its guided filter reaches 90 px), the local rules and the decoder work
        piece by piece. The same values as the staged path (the same operations per pixel)."""
        res: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            if self.base_rule == "saliency":
                z_b = self.encode("base", x, wb, tick).float()
                st = None if stats is None else stats.to(self.device)
                f_b, w_b = apply_rule("saliency", z_b, stats=st, exact=self.exact_rules,
                                      mean_weights=True)
                del z_b
            else:
                f_b, w_b = self.fuse_in_pieces("base", self.base_rule, x, wb, tick)
            if self.weights:
                res["weights_base"] = to_numpy(_cut(w_b, core, wb)[:, 0])
            # the sum of the fused codes goes here, in the networks' precision
            f_b = _cut(f_b, dec, wb).to(x.dtype, copy=True)
            del w_b
            f_d, w_d = self.fuse_in_pieces("detail", self.detail_rule, x, wd, tick)
            if self.weights:
                res["weights_detail"] = to_numpy(_cut(w_d, core, wd)[:, 0])
            f_b.add_(_cut(f_d, dec, wd).to(x.dtype))
            del f_d, w_d
            res["image"] = to_numpy(self.decode(f_b, _within(core, dec)))
        if tick is not None:
            tick()
        return res

    # whole-image statistics of the base codes (saliency rule), by passes over tiles
    def stats_tiles(self, shape: tuple[int, int], tile: int | None) -> list[Tile]:
        return tile_grid(shape, tile, self.enc_radius)

    def base_codes(self, crop: np.ndarray, core: Box) -> torch.Tensor:
        x = to_device(crop, self.device, self.dtype)[:, None]
        with torch.inference_mode():
            return self.encode("base", x, core).float()

    def extremes(self, crop: np.ndarray, core: Box) -> tuple[torch.Tensor, torch.Tensor]:
        return SaliencyStats.extremes(self.base_codes(crop, core))

    def counts(self, crop: np.ndarray, core: Box, stats: SaliencyStats) -> torch.Tensor:
        return stats.to(self.device).counts(self.base_codes(crop, core))


def combine_extremes(parts) -> SaliencyStats:
    los, his = zip(*parts, strict=True)
    return SaliencyStats(torch.stack([torch.as_tensor(v).cpu() for v in los]).amin(0),
                         torch.stack([torch.as_tensor(v).cpu() for v in his]).amax(0))


def with_histogram(stats: SaliencyStats, counts) -> SaliencyStats:
    total = sum(torch.as_tensor(c).cpu().to(torch.float64) for c in counts)
    return SaliencyStats(stats.lo, stats.hi, total / total.sum(-1, keepdim=True))


class MEFKernel:
    """CSC-MEFN fusion of K exposures on one crop: [K, h, w] grey or [K, h, w, 3] RGB.

    Outputs: image [1] (grey) or [3] (RGB, channel-first), weights [K] (softmax over
    exposures), and with ``codes`` each exposure's codes after the last DCU."""

    task = "mef"

    def __init__(self, net, k: int, rgb: bool, device: torch.device, codes: bool = False,
                 weights: bool = True, precision: str | None = None, compile: bool = False,
                 exposure_prior: np.ndarray | None = None):
        self.dtype = _precision(precision)
        self.net = folded("mef", net, self.dtype, compile)
        self.k, self.rgb, self.device = k, rgb, device
        # (K,) logits of the global exposure prior (rules.exposure_prior_logits) for weights
        # trained with it; lazy runs pass them per bracket as ``stats`` instead
        self.exposure_prior = exposure_prior
        self.codes, self.weights = codes, weights
        self.q = net.hparams["code_channels"]
        self.halo = self.net.radius
        self.needs_stats = False
        self.inner = inner_tile("mef", device)
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


def align_corners_positions(n_out_range: range, n_in: int, n_out: int,
                            device: torch.device) -> torch.Tensor:
    """Source coordinates (float32, as PyTorch computes them) of output indices
    ``n_out_range`` for a bilinear resize with align_corners=True from n_in to n_out."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    idx = torch.arange(n_out_range.start, n_out_range.stop, dtype=torch.float32, device=device)
    return idx * float(scale)


def interp_axis(x: torch.Tensor, dim: int, pos: torch.Tensor, offset: int,
                n_in: int) -> torch.Tensor:
    """Linear interpolation of x along ``dim`` at global source coordinates ``pos``; x holds
    global indices [offset, offset + x.shape[dim]). PyTorch's bilinear arithmetic (index
    floor clamped to n_in - 1, neighbour + 1 unless at the end, lambdas clamped to [0, 1])."""
    i0 = torch.clamp(torch.floor(pos).long(), max=n_in - 1)
    lam1 = torch.clamp(pos - i0.float(), 0.0, 1.0)
    lam0 = 1.0 - lam1
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    shape = [1] * x.ndim
    shape[dim] = -1
    a = x.index_select(dim, i0 - offset)
    b = x.index_select(dim, i1 - offset)
    return a * lam0.view(shape).to(x.dtype) + b * lam1.view(shape).to(x.dtype)


def _src_span(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Source indices [a, b) that output indices [lo, hi) of an align_corners resize read."""
    pos = align_corners_positions(range(lo, hi), n_in, n_out, torch.device("cpu"))
    i0 = torch.clamp(torch.floor(pos).long(), max=n_in - 1)
    return int(i0.min()), min(n_in, int(i0.max()) + 2)


class MMFKernel:
    """CSC-MMFN guided super-resolution on one high-resolution tile.

    Tiles are cut in the guide's (output) coordinates. For a core C the kernel derives, per
    axis: the decoder's context D = C +- 1; the low-resolution rows the upsampled guided-filter
    coefficients read on D, grown by the box radius; the guide rows the downsampled guide codes
    read there; and each encoder's 7 px context — so every crop is just large enough, and all
    resampling is done at the whole image's coordinates (align_corners=True), so tiles agree
    with the whole image."""

    task = "mmf"
    needs_stats = False

    def __init__(self, net, lr_shape: tuple[int, int], hr_shape: tuple[int, int],
                 device: torch.device, precision: str | None = None, compile: bool = False):
        self.dtype = _precision(precision)
        self.net = folded("mmf", net, self.dtype, compile)
        self.c = net.lr_channels
        self.q = net.hparams["code_channels"]
        self.lr_shape, self.hr_shape, self.device = tuple(lr_shape), tuple(hr_shape), device
        self.r_lr = self.net.lr_encoder.radius
        self.r_g = self.net.guide_encoder.radius
        self.box = self.net.radius_
        scale = max(hr_shape[0] / lr_shape[0], hr_shape[1] / lr_shape[1])
        # context in output pixels (for the tile-size estimate only; crops are exact)
        self.halo = int(math.ceil((self.r_lr + self.box + 2) * scale)) + self.r_g + 2
        g_c = net.guide_channels
        self.bytes_per_pixel = 4 * (self.q * 5 + g_c + 2 * self.c) \
            + 4 * (self.q * 4 + self.c) / (scale * scale)

    def preferred_tile(self, device: torch.device) -> int | None:
        return None

    def outputs(self) -> dict[str, int]:
        return {"image": self.c}

    def steps(self, shape, core) -> int:
        return 1

    def windows(self, core: Box) -> dict[str, tuple[int, int, int, int]]:
        """Per axis (y then x): D, low-res box window, low-res crop, guide crop (global)."""
        out = {}
        for ax, (lo, hi) in enumerate(((core[0], core[1]), (core[2], core[3]))):
            n_lr, n_hr = self.lr_shape[ax], self.hr_shape[ax]
            d = (max(0, lo - 1), min(n_hr, hi + 1))
            la = _src_span(d[0], d[1], n_lr, n_hr)
            lbox = (max(0, la[0] - self.box), min(n_lr, la[1] + self.box))
            lcrop = (max(0, lbox[0] - self.r_lr), min(n_lr, lbox[1] + self.r_lr))
            gneed = _src_span(lbox[0], lbox[1], n_hr, n_lr)
            gall = (min(gneed[0], d[0]), max(gneed[1], d[1]))
            gcrop = (max(0, gall[0] - self.r_g), min(n_hr, gall[1] + self.r_g))
            out[ax] = (d, lbox, lcrop, gcrop)
        return out

    def crop(self, x, t: Tile):
        lr, guide = x
        win = self.windows(t.core)
        (_, _, ly, gy), (_, _, lx, gx) = win[0], win[1]
        return ((lr[:, ly[0]:ly[1], lx[0]:lx[1]], guide[:, gy[0]:gy[1], gx[0]:gx[1]], t.core),
                t.core)

    def __call__(self, crop, core: Box, stats=None, tick=None) -> dict[str, np.ndarray]:
        lr_np, g_np, core = crop
        win = self.windows(core)
        dev, dt = self.device, self.dtype
        with torch.inference_mode():
            # half precision for the networks only; the guided filter in float32 (or fp64)
            work = torch.float64 if dt == torch.float64 else torch.float32
            lr = to_device(lr_np, dev, work)[None]
            g = to_device(g_np, dev, dt)[None]
            z_gc = self.net.guide_encoder(g).to(work)  # guide crop codes
            z_lc = self.net.lr_encoder(lr.to(dt) if dt else lr).to(work)
            # low-res box window: z_L there, and z_G resampled to low-res positions
            (dy, lby, lcy, gcy), (dx, lbx, lcx, gcx) = win[0], win[1]
            z_l = z_lc[..., lby[0] - lcy[0]:lby[1] - lcy[0], lbx[0] - lcx[0]:lbx[1] - lcx[0]]
            (h, w), (H, W) = self.lr_shape, self.hr_shape
            py = align_corners_positions(range(*lby), H, h, dev)
            px = align_corners_positions(range(*lbx), W, w, dev)
            z_g = interp_axis(interp_axis(z_gc, 3, px, gcx[0], W), 2, py, gcy[0], H)
            # box means with exact border counts, summed window by window (not by cumulative
            # sums as the model does: those round differently in every crop, and eps = 1e-4
            # on code variances amplifies rounding to ~1e-3 in the output)
            def mean(t):
                k = 2 * self.box + 1
                return F.avg_pool2d(t, k, stride=1, padding=self.box, count_include_pad=False)

            mean_x, mean_y = mean(z_g), mean(z_l)
            cov = mean(z_g * z_l) - mean_x * mean_y
            var = mean(z_g * z_g) - mean_x * mean_x
            a = cov / (var + self.net.eps)
            b = mean_y - a * mean_x
            qy = align_corners_positions(range(*dy), h, H, dev)
            qx = align_corners_positions(range(*dx), w, W, dev)

            def up(t, oy, ox):
                return interp_axis(interp_axis(t, 3, qx, ox, w), 2, qy, oy, h)

            z_G = z_gc[..., dy[0] - gcy[0]:dy[1] - gcy[0], dx[0] - gcx[0]:dx[1] - gcx[0]]
            z_f = up(a, lby[0], lbx[0]) * z_G + up(b, lby[0], lbx[0])
            dec = self.net.decode_codes(z_f.to(dt) if dt else z_f).to(work)
            cy = slice(core[0] - dy[0], core[1] - dy[0])
            cx = slice(core[2] - dx[0], core[3] - dx[0])
            out = dec[..., cy, cx] + up(lr, lcy[0], lcx[0])[..., cy, cx]
            image = to_numpy(out[0].clamp(0.0, 1.0))
        if tick is not None:
            tick()
        return {"image": image}

    def plane_shape(self, x) -> tuple[int, int]:
        return self.hr_shape


def _precision(precision: str | None) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected None/'fp32', 'fp16' or 'bf16', got {precision!r}")
    return PRECISIONS[precision]


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


def saliency_statistics(kernel: IVFKernel, x: np.ndarray, tile: int | None,
                        ticker: Ticker | None = None) -> SaliencyStats:
    """Whole-image extremes, then histograms, of the base codes: two passes over tiles (each
    with the encoder's 20 px halo only)."""
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
