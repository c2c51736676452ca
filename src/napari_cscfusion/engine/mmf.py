"""Guided super-resolution with CSC-MMFN: the public ``fuse_guided``, the per-tile kernel
``MMFKernel`` that tiling.py and lazy.py run (with its own split of a lazy tile task that runs
out of memory, ``guided_in_parts``), and its dask graph builder ``fuse_guided_lazy``."""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from ..models.color import luma
from ..models.folded import folded
from ..models.mmfn import LOW_RES_GEOMETRIES
from . import dcu_kernel, mmf_cpu, notices
from .device import resolve_device
from .fast import auto_compile, fast_network, run_path, use_fast_path
from .inputs import check_frames, check_min_size, check_ndim, normalise
from .lazy import (
    LazyOutcome,
    as_dask,
    halved_tile_task,
    is_dask,
    lazy_requested,
    norm_spec,
    normalise_block,
    outcome,
    planes_graph,
)
from .planes import plane_indices
from .registry import FusionModel, resolve_model
from .resample import (
    align_corners_positions,
    align_corners_span,
    bicubic_resize,
    bicubic_span,
    bicubic_window,
    interp_axis,
)
from .result import FusionResult, base_metadata, plane_progress, report
from .tiling import (
    Box,
    Tile,
    precision_dtype,
    resolve_tile,
    result_bytes,
    run_tiled,
    splittable_oom,
    sub_tiles,
    to_device,
    to_numpy,
)

MMF_MIN_LOW_SIZE = 4  # the fast guided filter (r=1) needs more than 3 px per side
# sides of the fast path's pieces inside a tile, for the stages after the encoders (which
# run on the whole tile: cutting them into pieces measured slower): the float64 statistics of
# the guided filter (128 px: ~270 MB of temporaries for 256 channels) and the fused codes +
# decoder (256 px: ~200 MB); whole-tile stages measured a little faster still, pieces bound
# the memory (benchmarks/README.md, issue 18)
MMF_STATS_PIECE, MMF_PIECE = 128, 256
# output tile side of the numba kernels' runs (``MMFKernel.preferred_tile``)
MMF_CPU_TILE = 384
# exact=None (default) takes the fast path for networks with at least this many code
# channels: measured faster than the naive forward for the authors' 256 (1.46x at 1 Mpx), but
# its PyTorch form 0.74x for the previous packaged 32-code network (authors' geometry);
# one-channel networks (the packaged one, the low_res geometry's) take it on the CPU in numba
# kernels instead (mmf_cpu.py); see ``mmf_form`` (issue 18)
MMF_FAST_MIN_CODES = 128
# exact=None on the CPU without numba: the low_res geometries' PyTorch fast form (True) or
# their exact path (False). Measured (benchmarks/README.md, 2026-12-07): 1.3-2.3x faster on
# one thread; on two, 0.85-1.17x under load 8-21 but 1.23x / 1.38x at 1 / 4 Mpx on the quiet
# rerun (load ~1), so the PyTorch form
LOW_RES_PYTORCH_ON_CPU = True
# metadata["fast_kernel"] of each form (as fuse_exposures names them)
FAST_KERNEL = {"exact": None, "numba": "numba", "pytorch": "pytorch"}


def _box_sum(t: torch.Tensor, r: int) -> torch.Tensor:
    """Sums over (2r+1)^2 windows clipped at the border, by shifted in-place adds (in float64
    several times faster here than avg_pool2d or cumulative sums; keeps channels_last)."""
    for dim in (2, 3):
        s, n = t.clone(), t.shape[dim]
        for d in range(1, min(r, n - 1) + 1):
            s.narrow(dim, d, n - d).add_(t.narrow(dim, 0, n - d))
            s.narrow(dim, 0, n - d).add_(t.narrow(dim, d, n - d))
        t = s
    return t


def guided_coefficients(z_g: torch.Tensor, z_l: torch.Tensor, radius: int,
                        eps: float) -> torch.Tensor:
    """The fast guided filter's coefficients [a, b] (channels concatenated) of guide codes
    z_g and low-res codes z_l: box means with exact border counts, statistics in float64
    (see ``MMFKernel.fast_image``), returned in z_l's dtype."""
    x, y = z_g.to(torch.float64), z_l.to(torch.float64)
    n = _box_sum(x.new_ones(1, 1, *x.shape[-2:]), radius)

    def mean(t):
        return _box_sum(t, radius).div_(n)

    mean_x, mean_y = mean(x), mean(y)
    a = (mean(x * y) - mean_x * mean_y) / (mean(x * x) - mean_x * mean_x + eps)
    return torch.cat((a, mean_y - a * mean_x), 1).to(z_l.dtype)


def resampled(x: torch.Tensor, at: tuple[int, int], rows: range, cols: range,
              src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Output ``rows`` x ``cols`` of the bilinear (align_corners=True) resize src -> dst
    of an image of which x [N, C, ., .] holds the rows and columns from ``at`` on (the fast
    path's resampling): PyTorch's one-pass kernel where x is the whole image and the whole
    output is asked for, else per axis two gathers and one ``lerp`` (three passes instead
    of five: the same positions and weights, rounded in another order)."""
    dev = x.device
    if at == (0, 0) and tuple(x.shape[-2:]) == tuple(src) and \
            (rows.start, rows.stop, cols.start, cols.stop) == (0, dst[0], 0, dst[1]):
        return F.interpolate(x, size=dst, mode="bilinear", align_corners=True)
    out = x
    for dim, rng, off, n_in, n_out in ((3, cols, at[1], src[1], dst[1]),
                                       (2, rows, at[0], src[0], dst[0])):
        out = interp_axis(out, dim, align_corners_positions(rng, n_in, n_out, dev), off, n_in,
                          lerp=True)
    return out


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
                 device: torch.device, precision: str | None = None, compile: bool = False,
                 exact: bool = True):
        self.dtype = precision_dtype(precision)
        self.form = mmf_form(net, device, self.dtype, compile, exact)
        form_notice(net, self.form, device, self.dtype, compile)
        self.fast = self.form != "exact"
        self.path = "fast" if self.fast else "exact"
        self.geometry = "authors"
        # one-channel networks on the CPU: the numba kernels (mmf_cpu.py)
        self.chains = mmf_cpu.MMFChains(net) if self.form == "numba" else None
        if self.fast:  # encoders and decoder in the fast form, compiled or lean (fast.py)
            self.net = fast_network("mmf", net, self.dtype, compile=compile)
            self.r_lr, self.r_g = self.net.lr_radius, self.net.guide_radius
        else:
            self.net = folded("mmf", net, self.dtype, compile)
            self.r_lr = self.net.lr_encoder.radius
            self.r_g = self.net.guide_encoder.radius
        self.c = net.lr_channels
        self.q = net.hparams["code_channels"]
        self.lr_shape, self.hr_shape, self.device = tuple(lr_shape), tuple(hr_shape), device
        self.box = self.net.radius_
        scale = max(hr_shape[0] / lr_shape[0], hr_shape[1] / lr_shape[1])
        # context in output pixels (for the tile-size estimate only; crops are exact)
        self.halo = int(math.ceil((self.r_lr + self.box + 2) * scale)) + self.r_g + 2
        g_c = net.guide_channels
        self.piece = MMF_PIECE
        if self.chains is not None:
            # the guide's codes at full resolution, z_L, z_g and [a, b] at low resolution
            self.bytes_per_pixel = 4 * (self.q + 4 * self.q / scale ** 2 + g_c + 3 * self.c)
        elif self.fast:
            # the tile holds the guide encoder's working set (z and two more code maps at
            # full resolution), then the guide codes at full and z_g, z_L, [a, b] at low
            # resolution; the later stages' temporaries live in pieces (fixed_bytes)
            self.bytes_per_pixel = 4 * (max(3 * self.q, self.q + 4 * self.q / scale ** 2)
                                        + g_c + 3 * self.c)
            self.fixed_bytes = 8 * 8 * self.q * (MMF_STATS_PIECE + 2) ** 2 \
                + 4 * 4 * self.q * (MMF_PIECE + 2) ** 2
        else:
            self.bytes_per_pixel = 4 * (self.q * 5 + g_c + 2 * self.c) \
                + 4 * (self.q * 4 + self.c) / (scale * scale)

    def preferred_tile(self, device: torch.device) -> int | None:
        # the numba kernels: tiles whose code maps stay in the last-level cache between the
        # stages measured faster than the whole image (1 Mpx: 4.1-4.5 s at 256-512 px vs 6.5 s)
        return MMF_CPU_TILE if self.chains is not None else None

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
            la = align_corners_span(d[0], d[1], n_lr, n_hr)
            lbox = (max(0, la[0] - self.box), min(n_lr, la[1] + self.box))
            lcrop = (max(0, lbox[0] - self.r_lr), min(n_lr, lbox[1] + self.r_lr))
            gall = self.guide_span(ax, d, lbox)
            gcrop = (max(0, gall[0] - self.r_g), min(n_hr, gall[1] + self.r_g))
            out[ax] = (d, lbox, lcrop, gcrop)
        return out

    def guide_span(self, ax: int, d: tuple[int, int], lbox: tuple[int, int]) -> tuple[int, int]:
        """Guide rows (ax 0) or columns whose codes a tile reads: those the downsampled codes
        interpolate at the low-res box window ``lbox``, and the decoder's context ``d``."""
        gneed = align_corners_span(lbox[0], lbox[1], self.hr_shape[ax], self.lr_shape[ax])
        return min(gneed[0], d[0]), max(gneed[1], d[1])

    def crop(self, x, t: Tile):
        lr, guide = x
        win = self.windows(t.core)
        (_, _, ly, gy), (_, _, lx, gx) = win[0], win[1]
        return ((lr[:, ly[0]:ly[1], lx[0]:lx[1]], guide[:, gy[0]:gy[1], gx[0]:gx[1]], t.core),
                t.core)

    def encode_crop(self, lr_np, g_np):
        """(low-res crop [1, c, h, w], its codes, the guide crop's codes, the working dtype)
        on the exact path: half precision for the networks only, the guided filter in float32
        (or float64). Call under inference_mode."""
        dev, dt = self.device, self.dtype
        work = torch.float64 if dt == torch.float64 else torch.float32
        lr = to_device(lr_np, dev, work)[None]
        g = to_device(g_np, dev, dt)[None]
        z_gc = self.net.guide_encoder(g).to(work)
        z_lc = self.net.lr_encoder(lr.to(dt) if dt else lr).to(work)
        return lr, z_lc, z_gc, work

    def __call__(self, crop, core: Box, stats=None, tick=None) -> dict[str, np.ndarray]:
        lr_np, g_np, core = crop
        if self.fast:
            image = (self.fast_image if self.chains is None else self.cpu_image)(
                lr_np, g_np, core)
            if tick is not None:
                tick()
            return {"image": image}
        win = self.windows(core)
        dev, dt = self.device, self.dtype
        with torch.inference_mode():
            lr, z_lc, z_gc, work = self.encode_crop(lr_np, g_np)
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

    def cpu_image(self, lr_np: np.ndarray, g_np: np.ndarray, core: Box) -> np.ndarray:
        """The fast path's tile in the numba kernels (mmf_cpu.py): both encoders, the guide's
        codes resampled to the low-res box window (none where the grids are the same: the
        packaged network's bicubic-prepared input), the coefficients with float64 statistics,
        then the fused codes and the decoder in one pass."""
        (dy, lby, lcy, gcy), (dx, lbx, lcx, gcx) = self.windows(core).values()
        (h, w), (H, W) = self.lr_shape, self.hr_shape
        z_G, z_L = self.encode_cpu(lr_np, g_np)
        if (h, w) == (H, W):  # align_corners resampling between equal grids is the identity
            z_g, g_at = z_G, (lby[0] - gcy[0], lbx[0] - gcx[0])
            base = lr_np[0, core[0] - lcy[0]:core[1] - lcy[0], core[2] - lcx[0]:core[3] - lcx[0]]
        else:
            cpu = torch.device("cpu")
            py = align_corners_positions(range(*lby), H, h, cpu)
            px = align_corners_positions(range(*lbx), W, w, cpu)
            z_g = interp_axis(interp_axis(torch.from_numpy(z_G), 2, px, gcx[0], W), 1, py,
                              gcy[0], H).contiguous().numpy()
            g_at = (0, 0)
            qy = align_corners_positions(range(core[0], core[1]), h, H, cpu)
            qx = align_corners_positions(range(core[2], core[3]), w, W, cpu)
            base = interp_axis(interp_axis(torch.from_numpy(lr_np[0]), 1, qx, lcx[0], w), 0,
                               qy, lcy[0], h).numpy()
        rows = mmf_cpu.interp_table(align_corners_positions(range(*dy), h, H,
                                                            torch.device("cpu")), h, lby[0])
        cols = mmf_cpu.interp_table(align_corners_positions(range(*dx), w, W,
                                                            torch.device("cpu")), w, lbx[0])
        return self.decode_cpu(z_G, gcy[0], gcx[0], z_g, g_at, z_L, (lby, lcy, lbx, lcx),
                               rows, cols, base, core, (dy, dx))

    def encode_cpu(self, lr_np: np.ndarray, g_np: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The guide crop's and the low-res crop's codes [q, ., .] by the DCU-chain kernel."""
        return (dcu_kernel.encode_chain(self.chains.guide, g_np[:1])[0],
                dcu_kernel.encode_chain(self.chains.lr, lr_np[:1])[0])

    def decode_cpu(self, z_G, gy0, gx0, z_g, g_at, z_L, lwin, rows, cols, base, core,
                   d) -> np.ndarray:
        """The coefficients on the low-res box window (``lwin``: its rows, the low-res crop's
        rows, its columns, the crop's columns), then base + decoder of the fused codes on the
        core (``d``: the decoder's rows and columns), clipped to [0, 1] -> [1, H', W']."""
        lby, lcy, lbx, lcx = lwin
        ch = self.chains
        l_at, shape = (lby[0] - lcy[0], lbx[0] - lcx[0]), (lby[1] - lby[0], lbx[1] - lbx[0])
        ab = mmf_cpu.guided_ab(z_g, g_at, z_L, l_at, shape, ch.radius, ch.eps)
        if self.geometry == "low_res_detail":
            # b plus the fit's residual: b = z_L - a z_g (models/mmfn.py)
            q = ch.q
            win = (slice(None), slice(l_at[0], l_at[0] + shape[0]),
                   slice(l_at[1], l_at[1] + shape[1]))
            z_gw = z_g[:, g_at[0]:g_at[0] + shape[0], g_at[1]:g_at[1] + shape[1]]
            np.subtract(z_L[win], ab[:q] * z_gw, out=ab[q:])
        out = mmf_cpu.fused_decode(z_G, (gy0, gx0), ab, rows, cols, ch.dec_taps, base, core,
                                   (*d[0], *d[1]), self.hr_shape)
        return np.clip(out, 0.0, 1.0, out=out)[None]

    def fast_image(self, lr_np: np.ndarray, g_np: np.ndarray, core: Box) -> np.ndarray:
        """The fast path's tile: every 256-channel stage in cache-sized pieces (encoders with
        their halo, the guided filter's coefficients with its box radius, the fused codes
        with the decoder's pixel), the guided filter's statistics in float64.

        Why float64: cov / (var + 1e-4) of E[xy] - E[x]E[y] amplifies rounding in flat code
        regions (var ~ 0) by up to 1e4, so float32 statistics put any reordered arithmetic
        (pieces, folded batch norm, channels_last) up to ~1e-3 from the float32 reference,
        and the model's own cumulative sums up to ~1 on a 1 Mpx image (benchmarks/README.md,
        issue 18). In float64 the coefficients are the same whatever the order (~1e-10)."""
        win = self.windows(core)
        dev, dt, piece = self.device, self.dtype, self.piece
        work = torch.float64 if dt == torch.float64 else torch.float32
        (dy, lby, lcy, gcy), (dx, lbx, lcx, gcx) = win[0], win[1]
        gy, gx = self.guide_span(0, dy, lby), self.guide_span(1, dx, lbx)
        (h, w), (H, W) = self.lr_shape, self.hr_shape
        net = self.net
        with torch.inference_mode():
            lr = to_device(lr_np, dev, work)[None]
            g = to_device(g_np, dev, dt)[None]
            # guide codes on the rows/columns the tile reads; low-res codes on the box window
            # (whole crops: cutting the encoders into pieces measured slower here)
            z_G = net.guide_encoder(g)[..., gy[0] - gcy[0]:gy[1] - gcy[0],
                                       gx[0] - gcx[0]:gx[1] - gcx[0]].to(work)
            # one memory format throughout (mixed formats make element-wise passes slow):
            # the encoders' channels_last where the tile is the whole image (PyTorch's
            # resize keeps it), else NCHW (the gathers of a tile's resampling give NCHW)
            fmt = torch.channels_last if (gy, gx, lby, lbx) == ((0, H), (0, W), (0, h), (0, w)) \
                else torch.contiguous_format
            z_G = z_G.contiguous(memory_format=fmt)
            z_l = net.lr_encoder(lr.to(dt) if dt else lr)[
                ..., lby[0] - lcy[0]:lby[1] - lcy[0], lbx[0] - lcx[0]:lbx[1] - lcx[0]].to(work)
            z_g = resampled(z_G, (gy[0], gx[0]), range(*lby), range(*lbx), (H, W), (h, w))
            # coefficients a (first q channels) and b on the box window, piece by piece
            ab = torch.empty((1, 2 * self.q, *z_l.shape[-2:]), dtype=z_l.dtype, device=dev,
                             memory_format=fmt)
            for t in sub_tiles((0, *z_l.shape[-2:-1], 0, z_l.shape[-1]),
                               (0, *z_l.shape[-2:-1], 0, z_l.shape[-1]), MMF_STATS_PIECE,
                               self.box):
                iy0, iy1, ix0, ix1 = t.inner
                (cy0, cy1), (cx0, cx1) = t.crop[:2], t.crop[2:]
                ab[..., t.core[0]:t.core[1], t.core[2]:t.core[3]] = guided_coefficients(
                    z_g[..., cy0:cy1, cx0:cx1], z_l[..., cy0:cy1, cx0:cx1], self.box,
                    net.eps)[..., iy0:iy1, ix0:ix1]
            del z_g, z_l
            out = lr.new_empty((1, self.c, core[1] - core[0], core[3] - core[2]))
            for t in sub_tiles(core, (dy[0], dy[1], dx[0], dx[1]), piece, 1):  # decoder: 1 px
                (y0, y1), (x0, x1) = t.crop[:2], t.crop[2:]
                sy, sx = align_corners_span(y0, y1, h, H), align_corners_span(x0, x1, w, W)
                c = resampled(ab[..., sy[0] - lby[0]:sy[1] - lby[0], sx[0] - lbx[0]:sx[1] - lbx[0]],
                              (sy[0], sx[0]), range(y0, y1), range(x0, x1), (h, w), (H, W))
                z_f = c[:, :self.q].mul_(z_G[..., y0 - gy[0]:y1 - gy[0], x0 - gx[0]:x1 - gx[0]])
                dec = net.decode_codes(z_f.add_(c[:, self.q:]).to(dt) if dt
                                       else z_f.add_(c[:, self.q:])).to(work)
                del c, z_f
                c0, c1, c2, c3 = t.core
                up = resampled(lr, (lcy[0], lcx[0]), range(c0, c1), range(c2, c3), (h, w),
                               (H, W))
                iy0, iy1, ix0, ix1 = t.inner
                out[..., c0 - core[0]:c1 - core[0], c2 - core[2]:c3 - core[2]] = \
                    dec[..., iy0:iy1, ix0:ix1].add_(up)
            return to_numpy(out[0].clamp_(0.0, 1.0))

    def plane_shape(self, x) -> tuple[int, int]:
        return self.hr_shape

    def in_parts(self, crop, core: Box) -> dict[str, np.ndarray]:
        """A lazy tile task's outputs, split further if it runs out of memory (its crop is a
        low-res and a guide crop, not one array: see ``guided_in_parts``)."""
        return {"image": guided_in_parts(self, crop)}


def mmf_form(net, device: torch.device, dtype: torch.dtype | None, compile: bool,
             exact: bool | None) -> str:
    """The form a CSC-MMFN run of ``net`` takes on ``device`` (``exact`` as fuse_guided's):
    "exact" (the reference arithmetic), "numba" (mmf_cpu.py: one-channel networks on the CPU
    in float32, uncompiled, numba at hand) or "pytorch" (the PyTorch fast form: the authors'
    geometry ``MMFKernel.fast_image``, the low_res ones ``LowResMMFKernel.torch_image``).

    ``exact=False`` takes the fast path in the first of numba and PyTorch that applies.
    ``exact=None`` (the default) too, except where the PyTorch form is not measured the
    better: thin networks of the authors' geometry (0.74x the naive forward on the CPU), and
    the low_res geometries on any device but CUDA and the CPU (MPS has no float64 for the
    statistics; the CPU without numba as ``LOW_RES_PYTORCH_ON_CPU`` says). On CUDA the low_res
    geometries (the packaged network) take the PyTorch form: GPU speed unmeasured (no
    device at hand), its arithmetic tested on the CPU."""
    if not use_fast_path(net, bool(exact)):
        return "exact"
    if mmf_cpu.applies(net, dtype, device, compile):
        return "numba"
    if exact is False or net.hparams["code_channels"] >= MMF_FAST_MIN_CODES:
        return "pytorch"
    if getattr(net, "geometry", "authors") in LOW_RES_GEOMETRIES and (
            device.type == "cuda" or (device.type == "cpu" and LOW_RES_PYTORCH_ON_CPU)):
        return "pytorch"
    return "exact"


def form_notice(net, form: str, device: torch.device, dtype: torch.dtype | None,
                compile: bool) -> None:
    """A FastPathFallback notice when the PyTorch form runs where the numba kernels would
    (numba missing, switched off or failing)."""
    if form == "pytorch" and mmf_cpu.suits(net, dtype, device, compile) \
            and not mmf_cpu.available():
        notices.notify(f"the MMF numba kernels are unavailable "
                       f"({mmf_cpu.unavailable_reason()}); the fast path runs in PyTorch "
                       f"(slower)", notices.FastPathFallback)


def mmf_kernel(net, lr_shape: tuple[int, int], hr_shape: tuple[int, int],
               device: torch.device, precision: str | None = None, compile: bool = False,
               exact: bool = True):
    """The tile kernel of ``net``'s geometry: MMFKernel (the authors'), or LowResMMFKernel
    (low_res, low_res_detail); each runs the form ``mmf_form`` names."""
    if getattr(net, "geometry", "authors") in LOW_RES_GEOMETRIES:
        from .mmf_lowres import LowResMMFKernel  # (it subclasses MMFKernel)

        return LowResMMFKernel(net, lr_shape, hr_shape, device, precision=precision,
                               compile=compile, exact=exact)
    return MMFKernel(net, lr_shape, hr_shape, device, precision=precision, compile=compile,
                     exact=exact)


def guided_in_parts(kernel: MMFKernel, crop) -> np.ndarray:
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
    half = halved_tile_task(kernel, core)
    (_, _, ly, gy), (_, _, lx, gx) = (kernel.windows(core)[ax] for ax in (0, 1))
    out = np.empty((kernel.c, core[1] - core[0], core[3] - core[2]), np.float32)
    for t in sub_tiles(core, core, half, 0):
        (_, _, sly, sgy), (_, _, slx, sgx) = (kernel.windows(t.core)[ax] for ax in (0, 1))
        sub = (lr[:, sly[0] - ly[0]:sly[1] - ly[0], slx[0] - lx[0]:slx[1] - lx[0]],
               g[:, sgy[0] - gy[0]:sgy[1] - gy[0], sgx[0] - gx[0]:sgx[1] - gx[0]], t.core)
        out[:, t.core[0] - core[0]:t.core[1] - core[0], t.core[2] - core[2]:t.core[3] - core[2]] \
            = guided_in_parts(kernel, sub)
    return out


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
                compile: bool | None = None, client=None, scheduler: str | None = None,
                exact: bool | None = None) -> FusionResult:
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
    ``precision``, ``compile`` and the fast path as in fuse_infrared_visible (CSC-MMFN clamps
    its thresholds at >= 0, so the fast path applies to every CSC-MMFN): folded encoders in
    place and channels_last, and the guided filter's statistics in float64, which makes it
    closer to float64 arithmetic (~5e-6) than the exact path itself: that runs the network's
    own cumulative-sum box filter in float32 on a whole image, whose E[xy] - E[x]E[y] over
    the eps = 1e-4 of code variances is up to ~4e-3 from float64 on a 100x130 crop, more on
    larger images (benchmarks/README.md, issue 18). ``exact=True`` (or ``codes=True``): the
    reference arithmetic. ``exact=False``: the fast path, in numba kernels for one-channel
    networks (1-band low-res, grey guide: the packaged one) on the CPU in float32
    uncompiled (mmf_cpu.py; ``metadata['fast_kernel']`` "numba"), else in PyTorch
    ("pytorch"); float64 statistics in both. ``exact=None`` (default): the same, but the
    exact path where the PyTorch form is not measured the better (``mmf_form``: thin
    networks of the authors' geometry; the low_res geometries on an MPS device, or on a
    CPU without numba if ``LOW_RES_PYTORCH_ON_CPU`` is off). Dask runs take the same path.
    ``codes=True`` returns the guide, low-resolution and fused codes and needs one plane,
    whole (no tiling; exact path).
    Weights of the low_res geometry (``hparams['geometry']`` in their header; models/mmfn.py)
    take ``low_res`` as it is (tiles: ``mmf_lowres.LowResMMFKernel``); their low-resolution
    codes are at the input's resolution. Their fast path: the numba kernels' (one-channel
    networks on the CPU), else the PyTorch form (CUDA by default; the CPU with exact=False).
    progress(done, total) is called after every tile and may raise Cancelled.

    Dask: dask inputs (or ``client``/``scheduler``, as in fuse_infrared_visible) give a lazy
    image (..., [C,] H, W), chunked by plane and tile, each task reading only its crops of
    both inputs; the values are those of the in-memory run with the same tile (on the exact
    path the whole image at once, tile=0, runs the network's own forward instead: up to ~1e-4
    apart in fp32; on the fast path tiles and the whole image agree to ~2e-6).
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
    dev = resolve_device(device)
    form = "exact" if codes else mmf_form(model.network, dev, precision_dtype(precision),
                                          bool(compile), exact)
    exact = form == "exact"
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
    if not chan:  # one channel axis for every layout: (..., C, h, w)
        lr_arr = lr_arr[..., None, :, :]
    if lazy_requested(client, scheduler, low_res, guide):
        if codes:
            raise ValueError("codes: not available for dask inputs or cluster runs; fuse a "
                             "numpy plane to look at its codes")
        lazy = fuse_guided_lazy(lr_arr, g_arr, model, dev, prepare_guide,
                                bicubic=lr_input == "bicubic", squeeze=not chan, tile=tile,
                                precision=precision, client=client, scheduler=scheduler,
                                exact=exact)
        meta = base_metadata(model, dev, lazy.notes)
        meta.update(sources=["low_res", "guide"], scale=(H / h, W / w), lazy=lazy.is_lazy,
                    tile=lazy.tile, precision=precision, path=run_path(model, exact),
                    fast_kernel=FAST_KERNEL[form],
                    timings={"prepare_s": time.perf_counter() - t0})
        return FusionResult(lazy.image, {}, {}, meta)
    n_lr, n_g = normalise(lr_arr, "low_res"), normalise(g_arr, "guide")
    planes = plane_indices(lr_shape[:nl])
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
            lr = np.clip(bicubic_resize(lr, (H, W)), 0.0, 1.0)
        image[idx], code_maps = _guided_plane(
            model, lr, prepare_guide(n_g.data[idx]), dev, codes,
            plane_progress(progress, k, len(planes)), tile=tile, precision=precision,
            compile=compile, exact=exact)
    if not chan:
        image = image[..., 0, :, :]
    meta = base_metadata(model, dev, {"low_res": n_lr.note, "guide": n_g.note})
    meta.update(sources=["low_res", "guide"], scale=(H / h, W / w), planes=len(planes),
                tile=tile, precision=precision, path="exact" if codes else run_path(model, exact),
                fast_kernel=FAST_KERNEL[form],
                timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1})
    return FusionResult(image, code_maps, {}, meta)


def _guided_plane(model: FusionModel, lr: np.ndarray, g: np.ndarray, dev: torch.device,
                  codes: bool, progress=None, *, tile=None, precision: str | None = None,
                  compile: bool | None = None, exact: bool = False
                  ) -> tuple[np.ndarray, dict]:
    """One plane of fuse_guided: lr (C, h_in, w_in) and g (G, H, W) float32 in [0,1], as the
    network takes them -> (image (C, H, W), codes)."""
    h_in, w_in = lr.shape[-2:]
    H, W = g.shape[-2:]
    exact = exact or codes

    def attempt(d: torch.device) -> tuple[np.ndarray, dict]:
        net = model.network_on(d)
        fast = use_fast_path(net, exact)
        kernel = mmf_kernel(net, (h_in, w_in), (H, W), d, precision=precision,
                            compile=auto_compile("mmf", fast, d) if compile is None
                            else compile, exact=exact)
        side = resolve_tile(tile, (H, W), kernel, d, held=result_bytes(kernel, (H, W)))
        if codes or (side is None and precision in (None, "fp32") and not fast):
            # One pass through the whole image: on the exact path the network's own forward,
            # the authors' arithmetic exactly (the fast guided filter's E[xy] - E[x]E[y]
            # cancels, so summation order shows in fp32). The fast path runs its kernel on
            # one tile (pieces inside, float64 statistics).
            try:
                with torch.inference_mode():
                    lr_t = torch.from_numpy(np.ascontiguousarray(lr))[None].to(d)
                    g_t = torch.from_numpy(np.ascontiguousarray(g))[None].to(d)
                    report(progress, 0, 1)
                    z = net.encode(lr_t, g_t)
                    out = net.decode(z["fused"], lr_t).clamp(0.0, 1.0)[0]
                    code_maps = {k: to_numpy(v[0]) for k, v in z.items()} if codes else {}
                report(progress, 1, 1)
                return to_numpy(out), code_maps
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
                     exact: bool = False,
                     scheduler: str | None = None) -> LazyOutcome:
    """CSC-MMFN guided super-resolution as a dask graph: low_res (..., C, h, w) and guide
    (..., H, W) or (..., H, W, 3) (numpy or dask, same leading shape) -> image
    (..., C, H, W), or (..., H, W) with ``squeeze``. Tiles are cut in the guide's
    coordinates; each task reads the MMFKernel's crops of both inputs (with ``bicubic``, the
    low-res rows and columns the bicubic pre-upsampling of the kernel's crop reads) and
    ``prepare_guide`` maps a normalised guide crop to (G, h', w')."""
    import dask

    from_numpy = not (is_dask(low_res) or is_dask(guide))
    lr, g = as_dask(low_res), as_dask(guide)
    nl = lr.ndim - 3
    lead, (h, w), (H, W) = tuple(lr.shape[:nl]), tuple(lr.shape[-2:]), tuple(g.shape[nl:nl + 2])
    note_l, *spec_l = norm_spec(lr, "low_res")
    note_g, *spec_g = norm_spec(g, "guide")
    net = model.network_on(device)
    # the path of an in-memory tiled run (uncompiled), so that both give the same values
    kernel = mmf_kernel(net, (H, W) if bicubic else (h, w), (H, W), device, precision=precision,
                        exact=exact)

    def crop_of(idx, t):
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

    out, side = planes_graph(kernel, device, tile, lead, (H, W), crop_of, client=client,
                             scheduler=scheduler)
    if squeeze:
        out = out[(slice(None),) * nl + (0,)]
    return outcome({"image": out}, {"low_res": note_l, "guide": note_g}, side, client,
                   scheduler, from_numpy)
