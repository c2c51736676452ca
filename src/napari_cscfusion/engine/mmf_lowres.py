"""Tiles of CSC-MMFN's low_res geometry (models/mmfn.py): the low-res input at its own
resolution, the guide's codes area-averaged to it, the guided filter's coefficients fitted
there and upsampled with half-pixel centres, plus the bicubic upsampling of the input; in
the exact arithmetic, the numba kernels (mmf_cpu.py) or the PyTorch fast form.

``LowResMMFKernel`` is an MMFKernel (tiling.py's protocol, lazy.py, ``guided_in_parts``) for
that geometry: its own windows and per-tile arithmetic; per output tile it crops both inputs
with just the context its pixels need and resamples at whole-image coordinates, so tiles agree
with the whole-image forward."""

from __future__ import annotations

import numpy as np
import torch

from ..models.folded import folded
from ..models.mmfn import guided_coefficients
from . import mmf, mmf_cpu
from .fast import fast_network
from .mmf import MMF_PIECE, MMFKernel
from .resample import bicubic_span, bicubic_window, interp_axis
from .tiling import Box, precision_dtype, sub_tiles, to_device, to_numpy


def half_pixel_positions(out_range: range, n_in: int, n_out: int,
                         device: torch.device) -> torch.Tensor:
    """Source coordinates (float32, as PyTorch computes them) of output indices
    ``out_range`` for a bilinear resize with half-pixel centres (align_corners=False) from
    n_in to n_out: (i + 0.5) n_in / n_out - 0.5, clamped at 0."""
    scale = float(np.float32(n_in) / np.float32(n_out))
    idx = torch.arange(out_range.start, out_range.stop, dtype=torch.float32, device=device)
    return torch.clamp((idx + 0.5) * scale - 0.5, min=0.0)


def half_pixel_span(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Source indices [a, b) that output indices [lo, hi) of that resize read."""
    pos = half_pixel_positions(range(lo, hi), n_in, n_out, torch.device("cpu"))
    i0 = torch.clamp(torch.floor(pos).long(), max=n_in - 1)
    return int(i0.min()), min(n_in, int(i0.max()) + 2)


def area_bounds(i: int, n_low: int, n_high: int) -> tuple[int, int]:
    """High-res indices [a, b) that low-res index i averages (``adaptive_avg_pool2d``'s)."""
    return (i * n_high) // n_low, -((-(i + 1) * n_high) // n_low)


def area_means(z: torch.Tensor, dim: int, low: tuple[int, int], n_low: int, n_high: int,
               offset: int) -> torch.Tensor:
    """z averaged along ``dim`` over the high-res spans (``area_bounds``) of low-res indices
    [low[0], low[1]); z holds high-res indices from ``offset`` on. Summed in float64, one
    gather per position in a span (a span has at most ceil(n_high / n_low) + 1 of them):
    ~one pass over z, where the exact path's dense averaging matrices multiply every row
    by every column (``area_matrix``)."""
    bounds = torch.tensor([area_bounds(i, n_low, n_high) for i in range(*low)]) - offset
    start, stop = bounds[:, 0], bounds[:, 1]
    shape = [1] * z.ndim
    shape[dim] = -1
    at = [slice(None)] * z.ndim
    acc = None
    for k in range(int((stop - start).max())):
        inside = start + k < stop
        at[dim] = torch.minimum(start + k, stop - 1).to(z.device)
        term = z[tuple(at)].to(torch.float64)
        if not bool(inside.all()):
            term.mul_(inside.to(z.device, torch.float64).view(shape))
        acc = term if acc is None else acc.add_(term)
    return acc.div_((stop - start).to(z.device, torch.float64).view(shape))


def area_matrix(low: tuple[int, int], n_low: int, n_high: int, offset: int,
                n_crop: int) -> torch.Tensor:
    """(low rows, crop rows) averaging matrix of low-res indices [low[0], low[1]) over a crop
    of the high-res axis starting at ``offset``."""
    m = torch.zeros(low[1] - low[0], n_crop, dtype=torch.float64)
    for k, i in enumerate(range(*low)):
        a, b = area_bounds(i, n_low, n_high)
        m[k, a - offset:b - offset] = 1.0 / (b - a)
    return m


class LowResMMFKernel(MMFKernel):
    """CSC-MMFN (low_res geometry) on one high-resolution tile; ``net`` is a CSCMMFN whose
    ``geometry`` is 'low_res' or 'low_res_detail', run in the form ``mmf.mmf_form`` names
    (``self.net``: its folded copy, ``models.folded``, or its PyTorch fast form,
    ``fast.FastMMF``). Tiles are cut in the guide's (output) coordinates."""

    def __init__(self, net, lr_shape: tuple[int, int], hr_shape: tuple[int, int],
                 device: torch.device, precision: str | None = None, compile: bool = False,
                 exact: bool = True):
        # not MMFKernel.__init__: that prepares the authors' geometry. ``form`` (mmf.mmf_form):
        # "numba" (mmf_cpu's kernels), "pytorch" (``torch_image``) or "exact"
        self.dtype = precision_dtype(precision)
        self.form = mmf.mmf_form(net, device, self.dtype, compile, exact)
        mmf.form_notice(net, self.form, device, self.dtype, compile)
        self.fast = self.form != "exact"
        self.path = "fast" if self.fast else "exact"
        self.geometry = net.geometry
        self.chains = mmf_cpu.MMFChains(net) if self.form == "numba" else None
        if self.form == "pytorch":  # BN folded, channels_last encoders (engine/fast.py)
            self.net = fast_network("mmf", net, self.dtype, compile=compile)
            self.r_lr, self.r_g = self.net.lr_radius, self.net.guide_radius
        else:
            self.net = folded("mmf", net, self.dtype, compile)
            self.r_lr, self.r_g = self.net.lr_encoder.radius, self.net.guide_encoder.radius
        c, q, g_c = net.lr_channels, net.hparams["code_channels"], net.guide_channels
        self.c, self.q = c, q
        self.lr_shape, self.hr_shape, self.device = tuple(lr_shape), tuple(hr_shape), device
        self.box = self.net.radius_
        scale = max(hr_shape[0] / lr_shape[0], hr_shape[1] / lr_shape[1])
        # context in output pixels (for the tile-size estimate only; crops are exact)
        self.halo = int(np.ceil((self.r_lr + self.box + 2) * scale)) + self.r_g + 2
        self.piece = MMF_PIECE
        if self.form == "numba":  # the guide's codes; z_L, z_g, [a, b] at low resolution
            self.bytes_per_pixel = 4 * (q + g_c + 2 * c) + 4 * (q * 4 + 2 * c) / (scale * scale)
        elif self.form == "pytorch":
            # the guide encoder's working set (three code maps) at full resolution; z_L,
            # z_g and its float64 statistics, [a, b] at low resolution; the fused codes and
            # the decoder in pieces (fixed_bytes)
            self.bytes_per_pixel = 4 * (3 * q + g_c + 2 * c) + 4 * (q * 12 + 2 * c) / (
                scale * scale)
            self.fixed_bytes = 4 * 4 * q * (MMF_PIECE + 2) ** 2
        else:
            self.bytes_per_pixel = 4 * (q * 4 + g_c + 2 * c) + 4 * (q * 6 + 2 * c) / (
                scale * scale)

    def windows(self, core: Box) -> dict[int, tuple[tuple[int, int], ...]]:
        """Per axis (y then x), global: D (core +- 1, the decoder's context), the low-res box
        window (the coefficients D reads, grown by the box radius), the low-res crop (that
        window plus the encoder's context, and the bicubic base's taps of the core) and the
        guide crop (D and the rows the box window averages, plus the encoder's context)."""
        out = {}
        for ax, (lo, hi) in enumerate(((core[0], core[1]), (core[2], core[3]))):
            n_lr, n_hr = self.lr_shape[ax], self.hr_shape[ax]
            d = (max(0, lo - 1), min(n_hr, hi + 1))
            la = half_pixel_span(d[0], d[1], n_lr, n_hr)
            lbox = (max(0, la[0] - self.box), min(n_lr, la[1] + self.box))
            bic = bicubic_span(lo, hi, n_lr, n_hr)
            lcrop = (max(0, min(lbox[0] - self.r_lr, bic[0])),
                     min(n_lr, max(lbox[1] + self.r_lr, bic[1])))
            gneed = (area_bounds(lbox[0], n_lr, n_hr)[0], area_bounds(lbox[1] - 1, n_lr, n_hr)[1])
            gall = (min(gneed[0], d[0]), max(gneed[1], d[1]))
            gcrop = (max(0, gall[0] - self.r_g), min(n_hr, gall[1] + self.r_g))
            out[ax] = (d, lbox, lcrop, gcrop)
        return out

    def __call__(self, crop, core: Box, stats=None, tick=None) -> dict[str, np.ndarray]:
        lr_np, g_np, core = crop
        if self.fast:
            image = (self.cpu_image if self.form == "numba" else self.torch_image)(
                lr_np, g_np, core)
            if tick is not None:
                tick()
            return {"image": image}
        (dy, lby, lcy, gcy), (dx, lbx, lcx, gcx) = self.windows(core).values()
        dev, dt = self.device, self.dtype
        (h, w), (H, W) = self.lr_shape, self.hr_shape
        with torch.inference_mode():
            lr, z_lc, z_gc, work = self.encode_crop(lr_np, g_np)
            z_l = z_lc[..., lby[0] - lcy[0]:lby[1] - lcy[0], lbx[0] - lcx[0]:lbx[1] - lcx[0]]
            # the guide's codes averaged over each low-res pixel of the box window
            my = area_matrix(lby, h, H, gcy[0], z_gc.shape[-2]).to(dev, work)
            mx = area_matrix(lbx, w, W, gcx[0], z_gc.shape[-1]).to(dev, work)
            z_g = torch.matmul(torch.matmul(my, z_gc), mx.T)
            # window means clipped at the crop: right on the rows the coefficients are read
            # at (the box window is grown by the radius), as in the whole image
            a, b = guided_coefficients(z_g, z_l, self.box, self.net.eps)
            if self.geometry == "low_res_detail":  # plus the fit's residual (models/mmfn.py)
                b = z_l - a * z_g
            qy = half_pixel_positions(range(*dy), h, H, dev)
            qx = half_pixel_positions(range(*dx), w, W, dev)

            def up(t):
                return interp_axis(interp_axis(t, 3, qx, lbx[0], w), 2, qy, lby[0], h)

            z_G = z_gc[..., dy[0] - gcy[0]:dy[1] - gcy[0], dx[0] - gcx[0]:dx[1] - gcx[0]]
            z_f = up(a) * z_G + up(b)
            dec = self.net.decode_codes(z_f.to(dt) if dt else z_f).to(work)
            cy = slice(core[0] - dy[0], core[1] - dy[0])
            cx = slice(core[2] - dx[0], core[3] - dx[0])
            base = bicubic_window(lr_np, (lcy[0], lcx[0]), (h, w), (H, W), core)
            out = dec[0, :, cy, cx] + to_device(base, dev, work)
            image = to_numpy(out.clamp(0.0, 1.0))
        if tick is not None:
            tick()
        return {"image": image}

    def torch_image(self, lr_np: np.ndarray, g_np: np.ndarray, core: Box) -> np.ndarray:
        """The fast path's tile in PyTorch (a GPU's, and the CPU's without numba): the
        encoders with batch norm folded (``fastpath.FastMMFN``), the guide's codes
        area-averaged to the low-res box window and the coefficients with float64 sums and
        statistics (why float64: ``MMFKernel.fast_image``), then the coefficients'
        upsampling, the fused codes and the decoder in pieces of ``MMF_PIECE`` px, plus the
        bicubic base."""
        (dy, lby, lcy, gcy), (dx, lbx, lcx, gcx) = self.windows(core).values()
        dev, dt, net, q = self.device, self.dtype, self.net, self.q
        work = torch.float64 if dt == torch.float64 else torch.float32
        (h, w), (H, W) = self.lr_shape, self.hr_shape
        with torch.inference_mode():
            lr = to_device(lr_np, dev, work)[None]
            g = to_device(g_np, dev, dt)[None]
            # NCHW throughout (the resampling gathers give NCHW; mixed formats are slow)
            z_G = net.guide_encoder(g).to(work).contiguous()
            z_l = net.lr_encoder(lr.to(dt) if dt else lr)[
                ..., lby[0] - lcy[0]:lby[1] - lcy[0], lbx[0] - lcx[0]:lbx[1] - lcx[0]].to(work)
            z_g = area_means(area_means(z_G, 2, lby, h, H, gcy[0]), 3, lbx, w, W, gcx[0])
            ab = mmf.guided_coefficients(z_g, z_l, self.box, net.eps)
            if self.geometry == "low_res_detail":  # b plus the fit's residual (models/mmfn.py)
                ab[:, q:] = (z_l - ab[:, :q] * z_g).to(work)
            del z_g, z_l
            out = lr.new_empty((1, self.c, core[1] - core[0], core[3] - core[2]))
            for t in sub_tiles(core, (dy[0], dy[1], dx[0], dx[1]), self.piece, 1):  # decoder: 1 px
                (y0, y1), (x0, x1) = t.crop[:2], t.crop[2:]
                sy, sx = half_pixel_span(y0, y1, h, H), half_pixel_span(x0, x1, w, W)
                c = ab[..., sy[0] - lby[0]:sy[1] - lby[0], sx[0] - lbx[0]:sx[1] - lbx[0]]
                c = interp_axis(c, 3, half_pixel_positions(range(x0, x1), w, W, dev), sx[0], w,
                                lerp=True)
                c = interp_axis(c, 2, half_pixel_positions(range(y0, y1), h, H, dev), sy[0], h,
                                lerp=True)
                z_f = c[:, :q].mul_(z_G[..., y0 - gcy[0]:y1 - gcy[0], x0 - gcx[0]:x1 - gcx[0]])
                z_f.add_(c[:, q:])
                del c
                dec = net.decode_codes(z_f.to(dt) if dt else z_f).to(work)
                iy0, iy1, ix0, ix1 = t.inner
                c0, c1, c2, c3 = t.core
                out[..., c0 - core[0]:c1 - core[0], c2 - core[2]:c3 - core[2]] = \
                    dec[..., iy0:iy1, ix0:ix1]
            del z_G
            base = bicubic_window(lr_np, (lcy[0], lcx[0]), (h, w), (H, W), core)
            out = out[0].add_(to_device(base, dev, work))
            return to_numpy(out.clamp_(0.0, 1.0))

    def cpu_image(self, lr_np: np.ndarray, g_np: np.ndarray, core: Box) -> np.ndarray:
        """The fast path's tile in the numba kernels (mmf_cpu.py): both encoders, the guide's
        codes area-averaged to the low-res box window, the coefficients (float64 statistics),
        then the fused codes and the decoder in one pass, plus the bicubic base."""
        (dy, lby, lcy, gcy), (dx, lbx, lcx, gcx) = self.windows(core).values()
        (h, w), (H, W) = self.lr_shape, self.hr_shape
        z_G, z_L = self.encode_cpu(lr_np, g_np)

        def spans(low, n_low, n_high, offset):
            b = np.array([area_bounds(i, n_low, n_high) for i in range(*low)], np.int64)
            return b[:, 0] - offset, b[:, 1] - offset

        z_g = mmf_cpu.area_means(z_G, spans(lby, h, H, gcy[0]), spans(lbx, w, W, gcx[0]))
        cpu = torch.device("cpu")
        rows = mmf_cpu.interp_table(half_pixel_positions(range(*dy), h, H, cpu), h, lby[0])
        cols = mmf_cpu.interp_table(half_pixel_positions(range(*dx), w, W, cpu), w, lbx[0])
        base = bicubic_window(lr_np, (lcy[0], lcx[0]), (h, w), (H, W), core)[0]
        return self.decode_cpu(z_G, gcy[0], gcx[0], z_g, (0, 0), z_L, (lby, lcy, lbx, lcx),
                               rows, cols, base, core, (dy, dx))
