"""Infrared + visible (and any N registered grey sources) with CSC-IVFN: the public
``fuse_infrared_visible``, the grey-sources core that medical.py also uses, the per-crop kernel
``IVFKernel`` that tiling.py and lazy.py run, and its dask graph builder ``fuse_grey_lazy``."""

from __future__ import annotations

import copy
import functools
import math
import time

import numpy as np
import torch

from ..models.folded import folded
from ..models.ivfn import IVF_ALPHA
from . import dcu_kernel, notices
from .device import resolve_device
from .fast import auto_compile, fast_network, run_path, use_fast_path
from .inputs import NormalisedStack, check_min_size, check_same_shape, normaliser
from .lazy import (
    LazyOutcome,
    as_dask,
    is_dask,
    lazy_requested,
    norm_spec,
    normalised_crops,
    outcome,
    plane_mean_level,
    planes_graph,
    split_outputs,
)
from .planes import plane_indices
from .registry import FusionModel, resolve_model
from .result import FusionResult, base_metadata, plane_progress
from .rules import (
    REFERENCE_RULES,
    RULE_RADIUS,
    SALIENCY_EPS,
    SALIENCY_RADIUS,
    SaliencyStats,
    apply_rule,
    check_rules,
)
from .tiling import (
    Box,
    Tile,
    cut,
    expand,
    inner_tile,
    map_in_pieces,
    precision_dtype,
    resolve_tile,
    result_bytes,
    run_tiled,
    sub_tiles,
    tile_grid,
    to_device,
    to_numpy,
    within,
)

IVF_MIN_SIZE = 6  # the 11x11 reflection-padded blur needs more than 5 px per side
BLACK_LEVEL = 1.0 / 255  # "black" for the black-pivot test of black_codes
# the pivot of code gains above 1 for weights that keep black when no scene is given
# (gain_pivot; the fuse functions give each plane's mean grey)
MID_GREY = 0.5
# Inner tiles on the CPU: the element-wise passes between convolutions (batch norm, padding,
# soft threshold, residual) stream q maps per pixel and are memory-bound there, so the
# encoders run on cache-sized pieces of each crop. Measured (benchmarks/README.md, 1 thread,
# bit-identical output): IVF 768x576 pair 32.9 s with 512 px, 14.2 s with 192 px; MEF 3 x 4
# Mpx 16.8 s with 256 px, 10.2 s with 128 px (mef.py). On a GPU big pieces are faster.
INNER_TILE = {"cpu": 192, "gpu": 512}
# The compiled fast path's pieces (crops of one shape): see benchmarks/README.md
FAST_INNER_TILE = {"cpu": 128, "gpu": 512}
# The DCU kernel's pieces (it tiles them itself for the cache; bigger pieces recompute less
# halo and copy less: 768 px took 15-20% less CPU time than 512 on the TNO pair, which it
# encodes in one piece): see benchmarks/README.md (issue 18)
KERNEL_INNER_TILE = {"cpu": 768, "gpu": 512}


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


def _flat_maps(net, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(net.parameters())
    return net.encode(torch.full((1, 1, 16, 16), float(level), device=p.device, dtype=p.dtype))


def flat_codes(net, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (base, detail) codes [q] (float32) of a flat image at ``level`` for the CSC-IVFN
    ``net`` (a constant image encodes to constant maps: one pixel says it all)."""
    with torch.inference_mode():
        z_b, z_d = _flat_maps(net, level)
        return z_b[0, :, 8, 8].float(), z_d[0, :, 8, 8].float()


def black_codes(net) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(base, detail, keeps_black): the codes [q] (float32) of an all-black image for the
    CSC-IVFN ``net``, and whether the weights decode them, at code gain 1, to <= 1/255 (the
    second-generation weights; the authors' give 14 grey levels)."""
    with torch.inference_mode():
        z_b, z_d = _flat_maps(net, 0.0)
        keeps = float(net.decode(z_b, z_d).max()) <= BLACK_LEVEL
        return z_b[0, :, 8, 8].float(), z_d[0, :, 8, 8].float(), keeps


def gain_pivot(net, code_gain: float, black=None, level: float = MID_GREY
               ) -> torch.Tensor | None:
    """The summed (base + detail) codes [q] that ``code_gain`` scales the fused codes about
    (z_pivot + g (z - z_pivot)), or None for the authors' pivot, the zero codes.

    Weights that decode black to black (black_codes: ours) pivot at the codes of black below
    gain 1 (a fade towards black) and above it at the codes of a flat image at ``level``,
    the scene's mean grey (a contrast stretch about the scene's mean, as PIL's
    ImageEnhance.Contrast: the scene keeps its brightness). The decoder ends in a sigmoid and
    is affine before it, so the result is sigmoid(g logit(f1) - (g - 1) logit(level)), f1 the
    gain-1 fusion (to the pivot's own decoding error): about mid-grey, a bright scene's
    highlights went into the sigmoid's flat end and a dark scene went darker (validation
    and held-out figures: weights/README.md). Zero codes decode to whatever grey the training
    left there, an offset the autoencoder loss does not see (the decoder is affine: only the
    sum of the codes' and the decoder's constants is fixed at gain 1): 0.525 for the first
    generation, 0.54-0.61 for the sparse files, and at gain 2 an image is darkened by that
    much (benchmarks/README.md). The authors' weights (and any that lift black) keep zero
    codes: their results stay exactly the authors'. ``black``: black_codes(net), if already
    known."""
    if code_gain == 1.0:
        return None
    z_b, z_d, keeps_black = black if black is not None else black_codes(net)
    if not keeps_black:
        return None
    return z_b + z_d if code_gain < 1.0 else sum(flat_codes(net, level))


def _by_encoder(black, device: torch.device) -> dict[str, torch.Tensor]:
    """black_codes(net)'s codes by encoder, on ``device`` (the reference rules' reference)."""
    return {"base": black[0].to(device), "detail": black[1].to(device)}


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
    For weights that decode black to black (black_codes), the gain scales the codes'
    distance from a pivot instead (z_pivot + g (z - z_pivot), gain_pivot): below 1 the codes
    of black (a fade towards black rather than towards the grey of zero codes, so black
    stays black at any gain), above 1 the codes of a flat image at the scene's mean grey (a
    contrast stretch about the scene's mean, whatever grey the training left at zero codes;
    black stays black, its codes decode below any scene's mean): a kernel starts at mid-grey
    and ``with_scene_level`` gives it for a plane (where ``uses_scene_level``). The authors'
    weights keep their pivot, the zero codes.

    ``exact``: the reference arithmetic (FoldedIVFN) even where the fast path applies; the
    fast path (engine/fast.py: weights with no negative soft threshold) runs the compiled
    fast form on crops of one shape and fuses the l1 rule into the detail encoder's graph.
    ``path`` says which ran.
    """

    task = "ivf"
    INNER_TILE = INNER_TILE

    def __init__(self, net, names: list[str], base_rule: str, detail_rule: str,
                 device: torch.device, codes: bool = False, weights: bool = True,
                 precision: str | None = None, compile: bool = False,
                 inner: int | None = None, exact_rules: bool = False,
                 code_gain: float = IVF_ALPHA, exact: bool = True):
        self.dtype = precision_dtype(precision)
        self.code_gain = check_code_gain(code_gain)
        # None: the folded decoder's x IVF_ALPHA as it is (bit-identical default results)
        self.code_scale = None if self.code_gain == IVF_ALPHA else self.code_gain / IVF_ALPHA
        # the codes of black (encoded once): the reference of the REFERENCE_RULES, and what
        # gain_pivot tests the weights with
        reference = bool({base_rule, detail_rule} & REFERENCE_RULES)
        black = black_codes(net) if reference or self.code_gain != 1.0 else None
        self.black = _by_encoder(black, device) if reference else None
        self._pivot_of = (net, black)  # what with_scene_level and tensors_to need
        self.pivot_level = MID_GREY
        self.code_offset = self._code_offset(MID_GREY, device)
        # the pivot is a flat image at the scene's mean grey: gains above 1, our weights
        self.uses_scene_level = self.code_gain > 1.0 and self.code_offset is not None
        self.fast = use_fast_path(net, exact)
        self.path = "fast" if self.fast else "exact"
        if self.fast:
            self.net = fast_network("ivf", net, self.dtype, compile=compile)
            if self.net.fallback:
                notices.notify(self.net.fallback, notices.FastPathFallback)
        else:
            self.net = folded("ivf", net, self.dtype, compile)
        self.names, self.S = list(names), len(names)
        self.q = net.hparams["code_channels"]
        self.base_rule, self.detail_rule = base_rule, detail_rule
        self.device, self.codes, self.weights = device, codes, weights
        # encoder pieces: cache-sized on the CPU (see INNER_TILE); None picks by device
        # compiled graphs want crops of one shape (fixed), and cache-sized ones
        self.fixed = self.fast and bool(compile)
        self.net_form = self.net.form if self.fast else "torch"
        sides = FAST_INNER_TILE if self.fixed else INNER_TILE
        if self.net_form == "kernel":
            sides = KERNEL_INNER_TILE
        self.inner = inner_tile(sides, device) if inner is None else inner
        self.exact_rules = exact_rules
        self.enc_radius = self.net.encoder_radius
        self.dec_radius = 3
        self.halo = (self.enc_radius + self.dec_radius
                     + max(RULE_RADIUS[base_rule], RULE_RADIUS[detail_rule]))
        # the encoders whose codes the saliency rule fuses: it needs their whole-image
        # statistics (extremes, histograms), whose channels are those encoders' in this order
        self.stats_encoders = tuple(which for which, rule in (("base", base_rule),
                                                              ("detail", detail_rule))
                                    if rule == "saliency")
        self.needs_stats = bool(self.stats_encoders)
        # per crop pixel, what a crop holds at once (+ small maps; the encoders' transients
        # are bounded by the inner tile): with codes, one encoder's codes of all sources +
        # fused base and detail codes; else, for the saliency rule, one encoder's codes of
        # all sources + their fusion (+ the fused base codes, for the detail rule), or
        # (local rules) the two fused code maps: detail codes, local rules and the decoder
        # run piece by piece
        if codes or detail_rule == "saliency":
            held = self.S + 2
        else:
            held = self.S + 1 if base_rule == "saliency" else 2
        self.bytes_per_pixel = 4 * self.q * held + 16 * self.S + 64
        if self.inner:
            side = self.inner + 2 * self.enc_radius
            # a piece's transients: the PyTorch encoders' few code maps per source; the DCU
            # kernel's output codes of the sources and the l1 rule's fused codes
            per_pixel = (self.S + 1 if self.net_form == "kernel" else 4 * self.S) * self.q
            self.fixed_bytes = 4 * per_pixel * side * side
        else:  # the encoders' transients span the whole crop
            self.fixed_bytes = 0
            self.bytes_per_pixel += 4 * 4 * self.q * self.S

    def _code_offset(self, level: float, device: torch.device) -> torch.Tensor | None:
        """What apply_gain adds to the scaled codes: (1 - g) / 2 * the pivot's codes."""
        net, black = self._pivot_of
        pivot = gain_pivot(net, self.code_gain, black, float(level))
        return None if pivot is None else (
            (1.0 - self.code_gain) / IVF_ALPHA * pivot).view(-1, 1, 1).to(device)

    def with_scene_level(self, scene_level: float) -> IVFKernel:
        """This kernel for a plane of mean grey ``scene_level`` (the pivot of gains above 1):
        itself where the level plays no part, else a shallow copy sharing the networks."""
        if not self.uses_scene_level:
            return self
        kernel = copy.copy(self)
        kernel.__dict__.pop("_cpu_twin", None)  # a twin made for this kernel has its pivot
        kernel.pivot_level = float(scene_level)
        kernel.code_offset = self._code_offset(scene_level, self.device)
        return kernel

    def tensors_to(self, device: torch.device) -> None:
        """Its own tensors (black's codes, the code gain's offset) made again on ``device``
        from the network's: the lazy path's CPU twin of a GPU kernel (lazy._cpu_twin) calls
        it on its copy."""
        if self.black is not None:
            self.black = _by_encoder(self._pivot_of[1], device)
        if self.code_offset is not None:
            self.code_offset = self._code_offset(self.pivot_level, device)

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
                             tick, fixed=self.fixed)

    def _encoder(self, which: str):
        return self.net.encode_base if which == "base" else self.net.encode_detail

    def fuse_in_pieces(self, which: str, rule: str, x: torch.Tensor, window: Box, tick=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused codes [q, window], weights [S, 1, window]) of a local rule (l1, average),
        encoder and rule together inner tile by inner tile (their context: the encoder's
        radius + the rule's), so the [S, q] codes never exist for the whole window."""
        enc = self._encoder(which)

        ref = self.reference(which, rule)

        def fn(piece: torch.Tensor) -> torch.Tensor:
            fused, w = apply_rule(rule, enc(piece).float(), reference=ref)
            return torch.cat((fused, w[:, 0]))[None]

        if self.fast and which == "detail" and rule == "l1" and self.dtype is None:
            fn = self.net.detail_l1  # encoder and rule in one compiled graph
        out = map_in_pieces(fn, x, window, self.inner, self.enc_radius + RULE_RADIUS[rule],
                            tick, fixed=self.fixed)[0]
        return out[:self.q], out[self.q:, None]

    def reference(self, which: str, rule: str) -> torch.Tensor | None:
        """The codes of black of encoder ``which`` for a rule that needs them, else None."""
        return self.black[which] if rule in REFERENCE_RULES else None

    def apply_gain(self, z: torch.Tensor) -> torch.Tensor:
        """The code gain on the summed fused codes z [..., q, h, w], in place (see the class
        docstring); the folded decoder's x IVF_ALPHA does the rest."""
        if self.code_scale is not None:
            z.mul_(self.code_scale)
        if self.code_offset is not None:
            z.add_(self.code_offset.to(z.dtype))
        return z

    def decode(self, z: torch.Tensor, window: Box) -> torch.Tensor:
        """The image [1, window] of the summed fused codes z [q, h, w] (z is scaled in place,
        once: the pieces overlap), decoder piece by piece (context 3 px): no decoder
        transients of the whole crop."""
        self.apply_gain(z)
        return map_in_pieces(self.net.decode_sum, z[None], window, self.inner,
                             self.dec_radius, fixed=self.fixed)[0]

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
            f_b = self._stage_with_codes("base", x, wb, core, dec, stats, tick, res)
            f_d = self._stage_with_codes("detail", x, wd, core, dec, stats, tick, res)
            z = self.apply_gain(f_b[None].to(x.dtype) + f_d[None].to(x.dtype))
            out = self.net.decode_sum(z)
            res["image"] = to_numpy(cut(out[0], core, dec))
        if tick is not None:
            tick()
        return res

    def _stage_with_codes(self, which: str, x: torch.Tensor, window: Box, core: Box,
                          dec: Box, stats: SaliencyStats | None, tick, res: dict
                          ) -> torch.Tensor:
        """Encoder ``which`` and its rule on ``window`` (codes of all sources held): the
        core's codes, fused codes and channel-mean weights go into ``res``; returns the fused
        codes of the decoder's window ``dec``."""
        rule = self.base_rule if which == "base" else self.detail_rule
        z = self.encode(which, x, window, tick).float()
        fused, w = apply_rule(rule, z, stats=self.stats_of(which, stats),
                              exact=self.exact_rules, mean_weights=True,
                              reference=self.reference(which, rule))
        if rule != "saliency":  # (the saliency rule averages its weights itself)
            w = w.mean(1, keepdim=True)
        if self.weights:
            res[f"weights_{which}"] = to_numpy(cut(w, core, window)[:, 0])
        z_core = cut(z, core, window)
        for i, n in enumerate(self.names):
            res[f"{n}_{which}"] = to_numpy(z_core[i])
        res[f"fused_{which}"] = to_numpy(cut(fused, core, window))
        return cut(fused, dec, window).clone()  # not a view: the rest is freed

    def _fuse(self, x: torch.Tensor, core: Box, dec: Box, wb: Box, wd: Box,
              stats: SaliencyStats | None, tick) -> dict[str, np.ndarray]:
        """__call__ without codes, holding less: the saliency rule needs the codes of the whole
        window (its guided filter reaches 90 px), the local rules and the decoder work piece
        by piece. The same values as the staged path (the same operations per pixel)."""
        res: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            f_b, w_b = self.fuse_window("base", x, wb, stats, tick)
            if self.weights:
                res["weights_base"] = to_numpy(cut(w_b, core, wb)[:, 0])
            # the sum of the fused codes goes here, in the networks' precision (a copy where
            # the decoder's window is smaller, so the rest is freed; the rule's own output
            # where it is the whole window)
            f_dec = cut(f_b, dec, wb)
            f_b = f_dec if f_dec.shape == f_b.shape and f_b.dtype == x.dtype else f_dec.to(
                x.dtype, copy=True)
            del w_b
            f_d, w_d = self.fuse_window("detail", x, wd, stats, tick)
            if self.weights:
                res["weights_detail"] = to_numpy(cut(w_d, core, wd)[:, 0])
            f_b.add_(cut(f_d, dec, wd).to(x.dtype))
            del f_d, w_d
            res["image"] = to_numpy(self.decode(f_b, within(core, dec)))
        if tick is not None:
            tick()
        return res

    def fuse_window(self, which: str, x: torch.Tensor, window: Box,
                    stats: SaliencyStats | None, tick) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused codes [q, window], channel-mean weights [S, 1, window]) of encoder
        ``which`` with its rule: the saliency rule on the codes of the whole window with
        the whole image's statistics (``stats``, None: the window is the image), a local
        rule piece by piece."""
        rule = self.base_rule if which == "base" else self.detail_rule
        if rule != "saliency":
            return self.fuse_in_pieces(which, rule, x, window, tick)
        if which == "base" and self._saliency_kernel(window):
            return self._saliency_blocked(x, window, self.stats_of(which, stats), tick)
        z = self.encode(which, x, window, tick).float()
        if which == "detail":
            # not the numba form: its guided filter rounds otherwise, and on the sparse
            # detail codes the weights' normalisation magnifies that (fused codes 0.04 apart
            # on a FLIR pair) past the fast path's tolerance; numpy's, as the exact path
            return apply_rule("saliency", z, stats=self.stats_of(which, stats),
                              exact=self.exact_rules, mean_weights=True)
        return self._saliency(z, self.stats_of(which, stats))

    def stats_of(self, which: str, stats: SaliencyStats | None) -> SaliencyStats | None:
        """The channels of ``stats`` (those of every encoder in ``stats_encoders``) that
        belong to encoder ``which``, on the device; None for None."""
        if stats is None or which not in self.stats_encoders:
            return None
        i = self.stats_encoders.index(which)
        return stats.channels(slice(i * self.q, (i + 1) * self.q)).to(self.device)

    def _saliency_kernel(self, window: Box) -> bool:
        """Whether the saliency rule on codes of ``window`` runs the numba kernel."""
        return (self.net_form == "kernel" and not self.exact_rules
                and min(window[1] - window[0], window[3] - window[2]) > SALIENCY_RADIUS)

    def _saliency_blocked(self, x: torch.Tensor, window: Box, stats: SaliencyStats | None,
                          tick) -> tuple[torch.Tensor, torch.Tensor]:
        """The base encoder and the saliency rule's numba kernel on ``window``, the codes
        channel-blocked between them (written so by the DCU kernel: the rule's kernel reads
        contiguous runs of a block's channels); the codes' extremes (no ``stats``) are the
        rule kernel's own pass."""
        z = map_in_pieces(self.net.encode_base_blocked, x, window, self.inner,
                          self.enc_radius, tick, fixed=self.fixed, blocked=True)
        lo = hi = hist = None
        if stats is not None:
            lo, hi = stats.lo.numpy(), stats.hi.numpy()
            hist = None if stats.hist is None else stats.hist.numpy()
        fused, w = dcu_kernel.saliency_fuse(z.numpy(), lo, hi, hist, SALIENCY_RADIUS,
                                            SALIENCY_EPS, q=self.q)
        return torch.from_numpy(fused), torch.from_numpy(w)

    def _saliency(self, z: torch.Tensor, stats: SaliencyStats | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The saliency rule with channel-mean weights: with the DCU kernel, its numba form
        (blocks of channels in parallel, the guided filter's box means in two sweeps)."""
        if self._saliency_kernel((0, z.shape[-2], 0, z.shape[-1])):
            # no stats: the kernel's own pass takes the codes' extremes
            lo = hi = hist = None
            if stats is not None:
                lo, hi = stats.lo.numpy(), stats.hi.numpy()
                hist = None if stats.hist is None else stats.hist.numpy()
            fused, w = dcu_kernel.saliency_fuse(z.numpy(), lo, hi, hist, SALIENCY_RADIUS,
                                                SALIENCY_EPS)
            return torch.from_numpy(fused), torch.from_numpy(w)
        return apply_rule("saliency", z, stats=stats, exact=self.exact_rules,
                          mean_weights=True)

    # whole-image statistics of the codes the saliency rule fuses, by passes over tiles: the
    # channels of each encoder in ``stats_encoders`` one after the other ([S, q] per encoder)
    def stats_tiles(self, shape: tuple[int, int], tile: int | None) -> list[Tile]:
        return tile_grid(shape, tile, self.enc_radius)

    def stats_codes(self, which: str, crop: np.ndarray, core: Box) -> torch.Tensor:
        x = to_device(crop, self.device, self.dtype)[:, None]
        with torch.inference_mode():
            return self.encode(which, x, core).float()

    def extremes(self, crop: np.ndarray, core: Box) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [SaliencyStats.extremes(self.stats_codes(which, crop, core))
                 for which in self.stats_encoders]  # one encoder's codes at a time
        return tuple(torch.cat(p, 1) for p in zip(*parts, strict=True))

    def counts(self, crop: np.ndarray, core: Box, stats: SaliencyStats) -> torch.Tensor:
        return torch.cat([self.stats_of(which, stats).counts(
            self.stats_codes(which, crop, core)) for which in self.stats_encoders], 1)


# --- infrared + visible (and any N grey sources) with CSC-IVFN ----------------------------

def fuse_grey_sources(images: dict[str, np.ndarray], model: FusionModel, base_rule: str,
                      detail_rule: str, device: torch.device, codes: bool, progress=None, *,
                      tile=None, weights: bool = True, precision: str | None = None,
                      compile: bool | None = None, exact_rules: bool = False,
                      code_gain: float = IVF_ALPHA, exact: bool = False
                      ) -> tuple[np.ndarray, dict, dict]:
    """Fuse S >= 2 registered grey float32 images in [0,1] (name -> (H,W)) with CSC-IVFN.

    All sources go through each encoder as one batch, tile by tile (see ``tile`` in
    fuse_infrared_visible). ``code_gain``: the factor on the fused codes before decoding
    (default 2, the authors'; see fuse_infrared_visible). ``exact``/``compile`` as in
    fuse_infrared_visible. Returns (image (H,W), codes name -> (q,H,W) if ``codes``, weights
    {"base": (S,H,W) channel-mean saliency/l1 weights, "detail": (S,H,W)}, empty when
    ``weights=False``); ``run_path(model, exact)`` says which path ran.
    """
    check_rules(base_rule, detail_rule)
    names = list(images)
    x = np.stack([np.asarray(images[n], dtype=np.float32) for n in names])
    return _fuse_grey_stack(x, names, model, base_rule, detail_rule, device, codes, progress,
                            tile=tile, weights=weights, precision=precision, compile=compile,
                            exact_rules=exact_rules, code_gain=code_gain, exact=exact)


def scene_level(x: np.ndarray | NormalisedStack) -> float:
    """The mean grey of the sources x [S, H, W] in [0, 1] (each source's mean, averaged)."""
    if isinstance(x, NormalisedStack):
        return x.mean_level()
    return float(np.mean(np.mean(x, axis=(1, 2), dtype=np.float64)))


def _fuse_grey_stack(x: np.ndarray | NormalisedStack, names: list[str], model: FusionModel,
                     base_rule: str, detail_rule: str, device: torch.device, codes: bool,
                     progress=None, *, tile=None, weights: bool = True,
                     precision: str | None = None, compile: bool | None = None,
                     exact_rules: bool = False, code_gain: float = IVF_ALPHA,
                     exact: bool = False) -> tuple[np.ndarray, dict, dict]:
    """fuse_grey_sources on sources already stacked: x [S, H, W] float32 in [0,1] (an array or
    a NormalisedStack, which converts the crops the tiles read)."""
    code_gain = check_code_gain(code_gain)
    # the pivot of gains above 1 for our weights (IVFKernel): the plane's mean grey, read once
    plane_level = functools.cache(lambda: scene_level(x))

    def attempt(dev: torch.device) -> dict:
        net = model.network_on(dev)
        fast = use_fast_path(net, exact)
        kernel = IVFKernel(net, names, base_rule, detail_rule, dev, codes=codes,
                           weights=weights, precision=precision,
                           compile=auto_compile("ivf", fast, dev) if compile is None
                           else compile,
                           exact_rules=exact_rules, code_gain=code_gain, exact=exact)
        if kernel.uses_scene_level:
            kernel = kernel.with_scene_level(plane_level())
        side = resolve_tile(tile, x.shape[-2:], kernel, dev,
                            held=result_bytes(kernel, x.shape[-2:]))
        return run_tiled(kernel, x, side, progress)

    outs = notices.on_device_or_cpu(attempt, device)
    code_maps = {k: v for k, v in outs.items() if k not in ("image", "weights_base",
                                                            "weights_detail")}
    w = {"base": outs["weights_base"], "detail": outs["weights_detail"]} if weights else {}
    return outs["image"][0], code_maps, w


def fuse_infrared_visible(ir, vis, model=None, base_rule: str = "saliency",
                          detail_rule: str = "l1", device="auto", codes: bool = False,
                          progress=None, *, tile=None, weights: bool = True,
                          precision: str | None = None, compile: bool | None = None,
                          client=None, scheduler: str | None = None,
                          code_gain: float = IVF_ALPHA, exact: bool = False) -> FusionResult:
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
    itself comes back as it was), as fuse_multimodal does for medical images. For weights that
    decode black to black (the packaged ones) the codes' distance from a pivot is scaled:
    above 1 from the codes of a flat image at the scene's mean grey (the mean of the two
    sources' means, per plane: a contrast stretch about the scene's mean; a flat grey fused
    with itself comes back as it was), below 1 from the codes of an all-black image (a fade
    towards black: black stays black at any gain); the authors' weights are scaled about zero
    codes, as the authors do.
    progress(done, total) is called after every tile step and may raise Cancelled.

    Scale: ``tile`` is the tile side in pixels (None: the whole image when its working set
    fits the available memory, else tiles chosen from it, GPU memory on CUDA; on the CPU the
    tile and the results then share 2 GiB; 0 or False: the whole image at once). Tiles carry
    a halo as wide as the network's and the rules' context (113 px with the saliency rule,
    whose whole-image statistics, of the base or detail codes it fuses, are computed first
    in a separate pass), so tiled and whole-image results agree to float rounding, whatever
    the rules. A tile that runs out of memory is split and
    retried (down to 32 px), and when even that fails on a GPU the run goes on on the CPU;
    either way with an OutOfMemoryRetry warning and a line in ``metadata["notices"]``
    (``metadata["device"]`` is then "cpu").
    ``precision``: None/'fp32' (default), or 'fp16'/'bf16' for the networks on a GPU (the
    rules stay float32; error against fp32 in benchmarks/README.md).
    ``weights=False`` skips the weight maps (two (S,H,W) arrays: memory on huge images).

    Speed: weights whose soft thresholds are all >= 0 run the fast path (batch norm folded;
    on the CPU the encoders, the l1 and saliency rules through numba kernels, engine/
    dcu_kernel.py, else the element-wise chain fused by torch.compile; within 1e-3 max /
    1e-5 mean of the exact path on [0, 1] images, see models/fastpath.py);
    ``exact=True``, or weights with a negative threshold (the authors'), run the exact
    reference arithmetic. ``metadata["path"]`` says which ran. ``compile``: None (default)
    compiles where that measured faster and within the tolerance (``engine.fast.auto_compile``:
    on a CPU nowhere yet — IVF's compiled encoders were no faster than the exact ones, MMF's
    compiled form left the tolerance, MEF's was not measured to the end; on a GPU IVF and MEF,
    unmeasured; benchmarks/README.md); a compiled run's first call compiles (a minute or more;
    torch's on-disk cache shortens later sessions); True/False forces it.

    Dask: with dask inputs the result's image and weights are lazy dask arrays (chunked by
    tile and by plane) that compute the same values; napari displays them directly (always on
    the exact path). With
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
    check_rules(base_rule, detail_rule)
    code_gain = check_code_gain(code_gain)
    model = resolve_model(model, "ivf")
    dev = resolve_device(device)
    names = ["infrared", "visible"]
    if lazy_requested(client, scheduler, ir, vis):
        if codes:
            raise ValueError("codes: not available for dask inputs or cluster runs; fuse a "
                             "numpy plane to look at its codes")
        lazy = fuse_grey_lazy({"infrared": ir, "visible": vis}, model, base_rule, detail_rule,
                              dev, tile=tile, weights=weights, precision=precision,
                              client=client, scheduler=scheduler, code_gain=code_gain)
        meta = base_metadata(model, dev, lazy.notes)
        meta.update(sources=names, base_rule=base_rule, detail_rule=detail_rule,
                    code_gain=code_gain, lazy=lazy.is_lazy, tile=lazy.tile, path="exact",
                    timings={"prepare_s": time.perf_counter() - t0})
        return FusionResult(lazy.image, {}, lazy.weights, meta)
    shape = tuple(np.shape(ir))
    # normalised crop by crop as the tiles need them: no float32 copy of the sources
    parts = [normaliser(ir, "ir"), normaliser(vis, "vis")]
    x = NormalisedStack(parts)
    notes = {"ir": parts[0].note, "vis": parts[1].note}
    t1 = time.perf_counter()
    planes = plane_indices(shape[:-2])
    if codes and len(planes) > 1:
        raise ValueError("codes: only for a single (H, W) plane; fuse planes one at a time to "
                         "look at their codes")
    if len(planes) == 1:
        image, code_maps, w_out = _fuse_grey_stack(
            x, names, model, base_rule, detail_rule, dev, codes, progress, tile=tile,
            weights=weights, precision=precision, compile=compile, code_gain=code_gain,
            exact=exact)
    else:
        image = np.empty(shape, np.float32)
        w_out = {k: np.empty((2, *shape), np.float32) for k in ("base", "detail")} \
            if weights else {}
        code_maps = {}
        for k, idx in enumerate(planes):
            img, code_maps, w = _fuse_grey_stack(
                x.plane(idx), names, model, base_rule, detail_rule, dev, codes,
                plane_progress(progress, k, len(planes)), tile=tile, weights=weights,
                precision=precision, compile=compile, code_gain=code_gain, exact=exact)
            image[idx] = img
            for key, a in w.items():
                w_out[key][(slice(None), *idx)] = a
    del x
    meta = base_metadata(model, dev, notes)
    meta.update(sources=names, base_rule=base_rule, detail_rule=detail_rule,
                code_gain=code_gain, planes=len(planes), tile=tile, precision=precision,
                path=run_path(model, exact),
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, w_out, meta)


def fuse_grey_lazy(images: dict, model, base_rule: str, detail_rule: str, device, *,
                   tile=None, weights: bool = True, precision: str | None = None,
                   client=None, scheduler: str | None = None,
                   code_gain: float = IVF_ALPHA) -> LazyOutcome:
    """CSC-IVFN fusion of S grey sources (name -> (..., H, W), numpy or dask) as a dask graph:
    image (..., H, W) and weights {"base", "detail"} (S, ..., H, W); ``code_gain`` as in
    fuse_infrared_visible."""
    import dask
    import dask.array as da

    from_numpy = not any(is_dask(a) for a in images.values())
    names = list(images)
    arrays = [as_dask(images[n]) for n in names]
    shape = tuple(arrays[0].shape)
    lead, (H, W) = shape[:-2], shape[-2:]
    specs, notes = [], {}
    for n, a in zip(names, arrays, strict=True):
        note, lo, hi = norm_spec(a, n)
        specs.append((lo, hi))
        notes[n] = note
    net = model.network_on(device)
    kernel = IVFKernel(net, names, base_rule, detail_rule, device, weights=weights,
                       precision=precision, code_gain=code_gain)

    def crop_of(idx, t):
        blocks = [a[idx + t.crop_slices] for a in arrays]
        return dask.delayed(normalised_crops)(blocks, specs, names)

    def plane_kernel(idx, key):
        # the pivot of gains above 1 is the plane's mean grey: a lazy value per plane
        means = [a[idx].mean(dtype=np.float64) for a in arrays]
        level = dask.delayed(plane_mean_level)(means, [a.dtype for a in arrays], specs)
        return dask.delayed(IVFKernel.with_scene_level)(key, level)

    out, side = planes_graph(kernel, device, tile, lead, (H, W), crop_of, client=client,
                             scheduler=scheduler,
                             plane_kernel=plane_kernel if kernel.uses_scene_level else None)
    parts = split_outputs(kernel, out, len(lead))
    result = {"image": parts["image"][(slice(None),) * len(lead) + (0,)]}
    if weights:
        for key in ("base", "detail"):
            result[key] = da.moveaxis(parts[f"weights_{key}"], len(lead), 0)
    return outcome(result, notes, side, client, scheduler, from_numpy)
