"""CSC-MMFN guided super-resolution on the CPU in numba kernels, for one-channel networks (the
packaged thermal network and the low_res geometry's: 1-band low-res, grey guide), the fast
path's CPU form (issue 18).

Why: with 32 code channels every PyTorch step of the network or of the guided filter streams
32 values per pixel through memory, and its thin 1 <-> 32 convolutions run far below the
CPU's throughput; profiled at 0.25 Mpx, the naive forward spent 31 % in those convolutions
and the rest in element-wise passes, cumulative sums and padding, and the PyTorch fast form
(float64 statistics by shifted adds) was slower still (benchmarks/README.md). Here:

* both encoders run the fused DCU-chain kernel (``dcu_kernel.encode_chain``, as CSC-IVFN's);
* the guide's codes are brought to the low-res grid where the geometry needs it (the
  authors': PyTorch's bilinear gathers; low_res: area means, ``area_means``), and the
  guided filter's coefficients a, b come from one pass per channel with the box statistics
  summed in float64 (``guided_ab``; why float64: engine/mmf.py, ``MMFKernel.fast_image``);
* the coefficients' upsampling, the fused codes a z_G + b and the 32 -> 1 decoder run in one
  pass per output tile (``fused_decode``): each tile's fused codes (channels last, with the
  decoder's 1 px reflection margin) are made in a cache-sized buffer and never stored; the
  decoder is dcu_kernel's q -> 1 row convolution with negated taps, so base + decoder.

numba is optional: ``available()`` says whether it imported, is not switched off
(CSCFUSION_NO_NUMBA) and compiled (engine/numba_jit.py); without it the fast path runs its
PyTorch form (engine/mmf.py, ``mmf_form``), with a notice.
"""

from __future__ import annotations

import numpy as np
import torch

from . import dcu_kernel
from .dcu_kernel import residual_row
from .numba_jit import Kernels, split
from .numba_jit import jit as _jit

# output tile of ``fused_decode`` (rows x columns): its fused codes, (32 + 2) x (128 + 2) x q
# floats, stay in L2 for q = 32
DECODE_ROWS, DECODE_COLS = 32, 128


# --- the kernels ------------------------------------------------------------------------------

@_jit
def _guided_ab_channels(zg, gy0, gx0, zl, ly0, lx0, hb, wb, r, eps, ab, first, step):
    """Coefficients a (ab[c]) and b (ab[q + c]) of the guided filter on an hb x wb window,
    for channels first, step: zg[c, gy0 + y, gx0 + x] and zl[c, ly0 + y, lx0 + x] the guide's
    and the low-res codes there; box means over (2r+1)^2 windows clipped at the window's edge
    (exact border counts), sums and products in float64."""
    q = zl.shape[0]
    sx, sy = np.empty(wb), np.empty(wb)
    sxy, sxx = np.empty(wb), np.empty(wb)
    for c in range(first, q, step):
        for y in range(hb):
            y0, y1 = max(0, y - r), min(hb, y + r + 1)
            for x in range(wb):
                sx[x] = 0.0
                sy[x] = 0.0
                sxy[x] = 0.0
                sxx[x] = 0.0
            for yy in range(y0, y1):
                for x in range(wb):
                    u = np.float64(zg[c, gy0 + yy, gx0 + x])
                    v = np.float64(zl[c, ly0 + yy, lx0 + x])
                    sx[x] += u
                    sy[x] += v
                    sxy[x] += u * v
                    sxx[x] += u * u
            for x in range(wb):
                x0, x1 = max(0, x - r), min(wb, x + r + 1)
                mx = 0.0
                my = 0.0
                mxy = 0.0
                mxx = 0.0
                for xx in range(x0, x1):
                    mx += sx[xx]
                    my += sy[xx]
                    mxy += sxy[xx]
                    mxx += sxx[xx]
                inv = 1.0 / ((y1 - y0) * (x1 - x0))
                mx *= inv
                my *= inv
                a = (mxy * inv - mx * my) / (mxx * inv - mx * mx + eps)
                ab[c, y, x] = np.float32(a)
                ab[q + c, y, x] = np.float32(my - a * mx)


@_jit
def _area_means_channels(z, y0s, y1s, x0s, x1s, out, first, step):
    """out[c, i, j] = the mean of z[c] over rows [y0s[i], y1s[i]) and columns
    [x0s[j], x1s[j]) (adaptive average pooling's spans), summed in float64."""
    q = z.shape[0]
    hb, wb = out.shape[1], out.shape[2]
    row = np.empty(z.shape[2])
    for c in range(first, q, step):
        for i in range(hb):
            for x in range(z.shape[2]):
                row[x] = 0.0
            for y in range(y0s[i], y1s[i]):
                for x in range(z.shape[2]):
                    row[x] += z[c, y, x]
            ny = y1s[i] - y0s[i]
            for j in range(wb):
                acc = 0.0
                for x in range(x0s[j], x1s[j]):
                    acc += row[x]
                out[c, i, j] = np.float32(acc / (ny * (x1s[j] - x0s[j])))


@_jit
def _fused_decode_jobs(zG, gy0, gx0, ab, ry0, ry1, rl, cx0, cx1, cl, wneg, base, out, core,
                       D, H, W, first, step):
    """Output tiles first, step of the core: out = base + decoder(fused codes), the fused
    codes z_f[c] = up(a_c) z_G[c] + up(b_c) made row by row into a tile buffer with the
    decoder's reflection margin. ``ry0, ry1, rl`` (``cx0, cx1, cl``): per row (column) of D
    (core +- 1, clipped to the image; D = (y0, y1, x0, x1) global) the two low-res rows
    (columns) of ``ab`` it interpolates and the second one's weight; zG[c, y - gy0, x - gx0]
    the guide's codes; base and out [core rows, core columns]."""
    q = zG.shape[0]
    nty = (core[1] - core[0] + DECODE_ROWS - 1) // DECODE_ROWS
    ntx = (core[3] - core[2] + DECODE_COLS - 1) // DECODE_COLS
    zf = np.empty((DECODE_ROWS + 2, DECODE_COLS + 2, q), np.float32)
    va = np.empty(ab.shape[2], np.float32)
    vb = np.empty(ab.shape[2], np.float32)
    res = np.empty(DECODE_COLS + 2, np.float32)
    for job in range(first, nty * ntx, step):
        oy0 = core[0] + (job // ntx) * DECODE_ROWS
        ox0 = core[2] + (job % ntx) * DECODE_COLS
        oy1 = min(core[1], oy0 + DECODE_ROWS)
        ox1 = min(core[3], ox0 + DECODE_COLS)
        ya, yb = max(0, oy0 - 1), min(H, oy1 + 1)
        xa, xb = max(0, ox0 - 1), min(W, ox1 + 1)
        ja = cx0[xa - D[2]]
        jb = cx1[xb - 1 - D[2]] + 1
        for gy in range(ya, yb):
            lr = gy - oy0 + 1
            k = gy - D[0]
            i0, i1, ly = ry0[k], ry1[k], rl[k]
            for c in range(q):
                for j in range(ja, jb):
                    a0 = ab[c, i0, j]
                    b0 = ab[q + c, i0, j]
                    va[j] = a0 + ly * (ab[c, i1, j] - a0)
                    vb[j] = b0 + ly * (ab[q + c, i1, j] - b0)
                for gx in range(xa, xb):
                    m = gx - D[2]
                    j0, j1, lx = cx0[m], cx1[m], cl[m]
                    a = va[j0] + lx * (va[j1] - va[j0])
                    b = vb[j0] + lx * (vb[j1] - vb[j0])
                    zf[lr, gx - ox0 + 1, c] = a * zG[c, gy - gy0, gx - gx0] + b
            if ox0 == 0:  # reflection margins at the image's border (c b | a b c)
                zf[lr, 0] = zf[lr, 2]
            if ox1 == W:
                zf[lr, W - ox0 + 1] = zf[lr, W - 2 - ox0 + 1]
        if oy0 == 0:
            zf[0] = zf[2]
        if oy1 == H:
            zf[H - oy0 + 1] = zf[H - 2 - oy0 + 1]
        for y in range(oy0, oy1):
            lr = y - oy0 + 1
            residual_row(zf, wneg, base[y - core[0]], res, lr, 1, ox1 - ox0 + 1,
                         ox0 - 1 - core[2], q)
            for x in range(ox0, ox1):
                out[y - core[0], x - core[2]] = res[x - ox0 + 1]


# --- compiled once ----------------------------------------------------------------------------

def _smoke() -> None:
    """Compile every kernel for the types the calls use, on tiny inputs (the encoders are
    the DCU kernel's: it must be available too)."""
    if not dcu_kernel.available():
        raise RuntimeError(dcu_kernel.unavailable_reason())
    q, z = 2, np.zeros((2, 4, 4), np.float32)
    ab = np.zeros((2 * q, 4, 4), np.float32)
    _guided_ab_channels(z, 0, 0, z, 0, 0, 4, 4, 1, 1e-4, ab, 0, 1)
    i = np.arange(4, dtype=np.int64)
    _area_means_channels(z, i, i + 1, i, i + 1, z.copy(), 0, 1)
    lam = np.zeros(4, np.float32)
    box = np.array([0, 4, 0, 4], np.int64)
    _fused_decode_jobs(z, 0, 0, ab, i, i, lam, i, i, lam, np.zeros((9, q), np.float32),
                       np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), box, box,
                       4, 4, 0, 1)


_kernels = Kernels("the MMF kernels", _smoke)


def available() -> bool:
    """Whether the kernels run here (numba imported, not switched off, compiled them and the
    DCU kernel)."""
    return _kernels.available()


def unavailable_reason() -> str | None:
    return _kernels.why()


# --- the calls --------------------------------------------------------------------------------

def guided_ab(zg: np.ndarray, g_at: tuple[int, int], zl: np.ndarray, l_at: tuple[int, int],
              shape: tuple[int, int], radius: int, eps: float) -> np.ndarray:
    """The guided filter's coefficients [a; b] (2q, h, w) float32 on an h x w window (``shape``)
    of the guide's codes zg [q, ., .] (from ``g_at``) and the low-res codes zl (from
    ``l_at``), both float32 and on the same grid: box means clipped at the window."""
    q = zl.shape[0]
    ab = np.empty((2 * q, *shape), np.float32)
    split(_guided_ab_channels, (zg, *g_at, zl, *l_at, *shape, int(radius), float(eps), ab), q)
    return ab


def area_means(z: np.ndarray, rows: tuple[np.ndarray, np.ndarray],
               cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """z [q, ., .] float32 averaged over the spans ([start, stop) per output row and column,
    indices into z): the low_res geometry's ``adaptive_avg_pool2d`` of the guide's codes."""
    q = z.shape[0]
    out = np.empty((q, len(rows[0]), len(cols[0])), np.float32)
    split(_area_means_channels, (z, *rows, *cols, out), q)
    return out


def interp_table(pos: torch.Tensor, n_in: int, offset: int):
    """PyTorch's linear-interpolation taps at source coordinates ``pos`` (as
    ``resample.interp_axis``): first and second source index (minus ``offset``) and the
    second one's weight, as numpy arrays for ``fused_decode``."""
    i0 = torch.clamp(torch.floor(pos).long(), max=n_in - 1)
    lam1 = torch.clamp(pos - i0.float(), 0.0, 1.0)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return ((i0 - offset).numpy(), (i1 - offset).numpy(),
            np.ascontiguousarray(lam1.numpy(), np.float32))


def fused_decode(zG: np.ndarray, g_at: tuple[int, int], ab: np.ndarray, rows, cols,
                 dec_taps: np.ndarray, base: np.ndarray, core, d_box,
                 shape: tuple[int, int]) -> np.ndarray:
    """base + decoder(up(a) z_G + up(b)) on the output pixels ``core`` (global (y0, y1, x0,
    x1)) of an image of ``shape``: zG [q, ., .] the guide's codes from global ``g_at``,
    covering ``d_box`` (core +- 1 clipped); ab [2q, ., .] the coefficients; ``rows``/``cols``
    the ``interp_table`` of d_box's rows/columns into ab; ``dec_taps`` [9, q] the decoder's
    3x3 taps (row-major); base [core rows, core columns]. -> [core rows, core columns]."""
    out = np.empty((core[1] - core[0], core[3] - core[2]), np.float32)
    jobs = -(-(core[1] - core[0]) // DECODE_ROWS) * -(-(core[3] - core[2]) // DECODE_COLS)
    wneg = np.ascontiguousarray(-dec_taps, np.float32)
    split(_fused_decode_jobs, (zG, *g_at, ab, *rows, *cols, wneg,
                              np.ascontiguousarray(base, np.float32), out,
                              np.asarray(core, np.int64), np.asarray(d_box, np.int64),
                              int(shape[0]), int(shape[1])), jobs)
    return out


class MMFChains:
    """A one-channel CSC-MMFN's weights as the kernels read them: both encoders as DCU chains
    and the decoder's taps [9, q]."""

    def __init__(self, net):
        from ..models.fastpath import FastEncoder

        self.lr = dcu_kernel.DCUChain.from_fast_encoder(FastEncoder(net.lr_encoder, "conv"))
        self.guide = dcu_kernel.DCUChain.from_fast_encoder(
            FastEncoder(net.guide_encoder, "conv"))
        w = net.decoder.weight.detach().float().cpu().numpy()  # [1, q, 3, 3]
        self.q = w.shape[1]
        self.dec_taps = np.ascontiguousarray(w[0].reshape(self.q, 9).T)
        self.radius, self.eps = int(net.radius), float(net.eps)


def suits(net, dtype, device: torch.device, compile: bool) -> bool:
    """Whether these kernels are the fast path's form for ``net``, numba at hand or not: a
    one-channel network (1-band low-res, grey guide) in float32 on the CPU, uncompiled."""
    return (device.type == "cpu" and dtype is None and not compile
            and net.lr_channels == 1 and net.guide_channels == 1)


def applies(net, dtype, device: torch.device, compile: bool) -> bool:
    """Whether a fast-path run of ``net`` takes these kernels: ``suits`` with numba at hand."""
    return suits(net, dtype, device, compile) and available()
