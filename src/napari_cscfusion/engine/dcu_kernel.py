"""A fused CPU kernel for a chain of one-channel DCUs (numba), the fast path's encoder.

What it computes: ``encode_chain(chain, x, x_first)`` is, to float rounding, what the fast
form of a CSC encoder with c = 1 image channel and q code channels (``models.fastpath.
FastEncoder``: batch norm folded, soft thresholds >= 0) computes on x [N, H, W]:

    z_0 = f_0(W1_0 * x_first + b_0)                                   (start, z = 0)
    z_l = f_l(s_l z_{l-1} + W1_l * (x - W0_l * z_{l-1}) + b_l)       l = 1 .. L-1

with 3x3 convolutions W0_l (q -> 1, the dictionary) and W1_l (1 -> q, the adjoint with the
batch-norm scale folded in), REFLECTION padding of 1 at the borders of x (c b | a b c), per-
channel scale s_l and shift b_l (batch norm), and f_l either the soft threshold with
theta >= 0 (v - clip(v, -theta, theta)) or a PReLU. ``x_first`` (None: x) feeds the start
layer only: the CSC-IVFN encoders' filtered image; a stem convolution (CSC-MEFN) is the same
start layer. Output: the codes z_{L-1} [N, q, H, W], or with ``head`` (q,) their projection
sum_c head[c] z[c] [N, H, W] (CSC-MEFN's 1x1 head), never holding the codes of the image.

Why a kernel: both thin convolutions cost 9q multiply-adds per pixel, so in PyTorch each DCU is
a few memory-bound passes over the q-channel codes (benchmarks/README.md, issue 18). Here the
image is cut into tiles; each tile runs ALL layers with a halo that shrinks by 2 px per DCU (so
tiles are independent and the result equals the whole image's), its codes channels-last in a
buffer of its own, and inside a DCU the residual row r = x - W0 * z is computed one row ahead of
the in-place update of z: each DCU streams the tile's codes once. Both convolutions are 9-tap
dot products / axpys over the contiguous q-vector of a pixel (SIMD). Tiles run on a thread
pool (numba ``nogil``), as many threads as torch uses (engine/numba_jit.py).

numba is optional: ``available()`` says whether it imported, is not switched off
(CSCFUSION_NO_NUMBA) and the kernel compiled; callers fall back to the PyTorch fast form
otherwise (engine/fast.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .numba_jit import Kernels, pool, split, wait_all
from .numba_jit import jit as _jit
from .numba_jit import threads as _threads

TILE = 128  # output tile side (px): benchmarks/README.md (issue 18)

# code channels per block of the saliency kernel: its inner loops run over them (vectorised;
# their count is read from the arrays at run time: LLVM unrolls a loop of a constant 16 trips
# into scalar code, which its SLP vectoriser then cannot prove free of aliasing); blocks are
# the parallel jobs
SALIENCY_LANES = 16


@dataclass(frozen=True)
class DCUChain:
    """The folded weights of an encoder of L layers (start + L-1 DCUs) for ``encode_chain``:
    adjoint taps ``w1`` [L, 9, q] (tap = 3 dy + dx, batch-norm scale folded), dictionary taps
    ``w0`` [L, 9, q] (layer 0's unused), residual scale ``scale`` [L, q] (layer 0's unused),
    shift ``bias`` [L, q], activation parameter ``act`` [L, q] (theta >= 0, or the PReLU
    slope) and ``prelu`` [L] (1 where the layer's activation is a PReLU). float32."""

    w1: np.ndarray
    w0: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    act: np.ndarray
    prelu: np.ndarray

    @property
    def q(self) -> int:
        return self.w1.shape[2]

    @property
    def layers(self) -> int:
        return self.w1.shape[0]

    @property
    def halo(self) -> int:
        """Context (px) of an output code beyond the start layer's own 3x3 (read from x)."""
        return 2 * (self.layers - 1)

    def clip_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(k, lo, hi) [L, q]: each layer's activation as v - k clip(v, lo, hi) (``shrink``)."""
        pl = self.prelu.astype(bool)[:, None]
        one = np.float32(1.0)
        k = np.where(pl, one - self.act, one).astype(np.float32)
        lo = np.where(pl, np.finfo(np.float32).min, -self.act).astype(np.float32)
        hi = np.where(pl, np.float32(0.0), self.act).astype(np.float32)
        return k, lo, hi

    @classmethod
    def from_fast_encoder(cls, enc) -> DCUChain:
        """From a ``models.fastpath.FastEncoder`` of a one-channel network (its folding)."""
        layers = []  # (w1 [q, 9], w0 [q, 9] or None, s, b, act, prelu)
        if enc.has_stem:
            layers.append((enc.stem_w, None, None, enc.stem_b, enc.stem_act,
                           enc.stem_kind == "prelu"))
        for i, d in enumerate(enc.dcus):
            start = i == 0 and not enc.has_stem
            layers.append((d.w1, None if start else d.w0, None if start else d.s, d.b, d.act,
                           d.kind == "prelu"))
        q = layers[0][0].shape[0]
        if layers[0][0].shape[1] != 1 or any(w0 is not None and w0.shape[0] != 1
                                             for _, w0, *_ in layers):
            raise ValueError("DCUChain: one-channel networks only (c = 1)")

        def taps(w, k):  # [q, 1, 3, 3] (adjoint) or [1, q, 3, 3] (dictionary) -> [9, q]
            if w is None:
                return np.zeros((9, q), np.float32)
            a = w.detach().float().cpu().numpy()
            a = a[:, 0] if k == "adjoint" else a[0]
            return np.ascontiguousarray(a.reshape(q, 9).T)

        def vec(t, fill):
            if t is None:
                return np.full(q, fill, np.float32)
            return np.ascontiguousarray(t.detach().float().cpu().numpy().reshape(-1)[:q]
                                        * np.ones(q, np.float32))

        return cls(w1=np.stack([taps(w1, "adjoint") for w1, *_ in layers]),
                   w0=np.stack([taps(w0, "dictionary") for _, w0, *_ in layers]),
                   scale=np.stack([vec(s, 1.0) for _, _, s, *_ in layers]),
                   bias=np.stack([vec(b, 0.0) for *_, b, _, _ in layers]),
                   act=np.stack([vec(a, 0.0) for *_, a, _ in layers]),
                   prelu=np.array([p for *_, p in layers], np.int8))


# --- the kernel -------------------------------------------------------------------------------


@_jit
def refl(i, n):
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i

@_jit
def shrink(v, k, lo, hi):
    """The activation in one branch-free form (``DCUChain.clip_form``): v - k clip(v, lo, hi),
    the soft threshold (k = 1, lo = -theta, hi = theta) or a PReLU (k = 1 - slope, lo =
    -FLT_MAX, hi = 0); min/max vectorise where the two activations' branches did not."""
    return v - k * min(max(v, lo), hi)

@_jit
def fill_cols(buf, lr, b0, b1, ix0, W, q):
    """Reflection margins of row ``lr`` of a channels-last buffer where the region's
    columns touch x's border."""
    if b0 == 0:  # ix0 == 0 then
        for c in range(q):
            buf[lr, 0, c] = buf[lr, 2, c]
    if b1 == W:
        for c in range(q):
            buf[lr, W - ix0 + 1, c] = buf[lr, W - 2 - ix0 + 1, c]

@_jit
def residual_row(z, w, xrow, rrow, lr, lc0, lc1, xoff, q):
    """rrow[lc] = xrow[lc + xoff] - (W0 * z)[lr, lc] for local columns [lc0, lc1): the q -> 1
    convolution as a dot product over the 9 taps' q-vectors, four pixels at a time (they
    share the taps' loads and half the codes')."""
    zu, zm, zd = z[lr - 1], z[lr], z[lr + 1]
    lc = lc0
    while lc + 4 <= lc1:
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for c in range(q):
            w0, w1, w2 = w[0, c], w[1, c], w[2, c]
            w3, w4, w5 = w[3, c], w[4, c], w[5, c]
            w6, w7, w8 = w[6, c], w[7, c], w[8, c]
            u0, u1, u2 = zu[lc - 1, c], zu[lc, c], zu[lc + 1, c]
            u3, u4, u5 = zu[lc + 2, c], zu[lc + 3, c], zu[lc + 4, c]
            m0, m1, m2 = zm[lc - 1, c], zm[lc, c], zm[lc + 1, c]
            m3, m4, m5 = zm[lc + 2, c], zm[lc + 3, c], zm[lc + 4, c]
            d0, d1, d2 = zd[lc - 1, c], zd[lc, c], zd[lc + 1, c]
            d3, d4, d5 = zd[lc + 2, c], zd[lc + 3, c], zd[lc + 4, c]
            # three independent partial sums per pixel: a single chain of nine dependent
            # FMAs is latency-bound
            a0 += ((w0 * u0 + w1 * u1 + w2 * u2) + (w3 * m0 + w4 * m1 + w5 * m2)
                   + (w6 * d0 + w7 * d1 + w8 * d2))
            a1 += ((w0 * u1 + w1 * u2 + w2 * u3) + (w3 * m1 + w4 * m2 + w5 * m3)
                   + (w6 * d1 + w7 * d2 + w8 * d3))
            a2 += ((w0 * u2 + w1 * u3 + w2 * u4) + (w3 * m2 + w4 * m3 + w5 * m4)
                   + (w6 * d2 + w7 * d3 + w8 * d4))
            a3 += ((w0 * u3 + w1 * u4 + w2 * u5) + (w3 * m3 + w4 * m4 + w5 * m5)
                   + (w6 * d3 + w7 * d4 + w8 * d5))
        rrow[lc] = xrow[lc + xoff] - a0
        rrow[lc + 1] = xrow[lc + 1 + xoff] - a1
        rrow[lc + 2] = xrow[lc + 2 + xoff] - a2
        rrow[lc + 3] = xrow[lc + 3 + xoff] - a3
        lc += 4
    while lc < lc1:
        a0 = np.float32(0.0)
        for c in range(q):
            a0 += (w[0, c] * zu[lc - 1, c] + w[1, c] * zu[lc, c] + w[2, c] * zu[lc + 1, c]
                   + w[3, c] * zm[lc - 1, c] + w[4, c] * zm[lc, c] + w[5, c] * zm[lc + 1, c]
                   + w[6, c] * zd[lc - 1, c] + w[7, c] * zd[lc, c] + w[8, c] * zd[lc + 1, c])
        rrow[lc] = xrow[lc + xoff] - a0
        lc += 1


@_jit(reassociate=False)
def update_row(zrow, dst, w, sc, bs, ak, alo, ahi, r, lr, lc0, lc1, q):
    """dst[lc] = f(s z[lr, lc] + b + (W1 * r)[lr, lc]) for local columns [lc0, lc1) (dst a
    row buffer of its own): the 1 -> q convolution as nine axpys over the q-vector, two
    pixels at a time (they share the taps' loads)."""
    ru, rm, rd = r[lr - 1], r[lr], r[lr + 1]
    lc = lc0
    while lc + 2 <= lc1:
        p0, p1, p2, p3 = ru[lc - 1], ru[lc], ru[lc + 1], ru[lc + 2]
        m0, m1, m2, m3 = rm[lc - 1], rm[lc], rm[lc + 1], rm[lc + 2]
        d0, d1, d2, d3 = rd[lc - 1], rd[lc], rd[lc + 1], rd[lc + 2]
        for c in range(q):
            w0, w1, w2 = w[0, c], w[1, c], w[2, c]
            w3, w4, w5 = w[3, c], w[4, c], w[5, c]
            w6, w7, w8 = w[6, c], w[7, c], w[8, c]
            s, b = sc[c], bs[c]
            # independent partial sums (one chain of ten dependent FMAs is latency-bound)
            v0 = ((s * zrow[lc, c] + b + w0 * p0) + (w1 * p1 + w2 * p2 + w3 * m0)
                  + (w4 * m1 + w5 * m2 + w6 * d0) + (w7 * d1 + w8 * d2))
            v1 = ((s * zrow[lc + 1, c] + b + w0 * p1) + (w1 * p2 + w2 * p3 + w3 * m1)
                  + (w4 * m2 + w5 * m3 + w6 * d1) + (w7 * d2 + w8 * d3))
            k, lo, hi = ak[c], alo[c], ahi[c]
            dst[lc, c] = shrink(v0, k, lo, hi)
            dst[lc + 1, c] = shrink(v1, k, lo, hi)
        lc += 2
    while lc < lc1:
        p0, p1, p2 = ru[lc - 1], ru[lc], ru[lc + 1]
        m0, m1, m2 = rm[lc - 1], rm[lc], rm[lc + 1]
        d0, d1, d2 = rd[lc - 1], rd[lc], rd[lc + 1]
        for c in range(q):
            v0 = (sc[c] * zrow[lc, c] + bs[c] + w[0, c] * p0 + w[1, c] * p1 + w[2, c] * p2
                  + w[3, c] * m0 + w[4, c] * m1 + w[5, c] * m2 + w[6, c] * d0
                  + w[7, c] * d1 + w[8, c] * d2)
            dst[lc, c] = shrink(v0, ak[c], alo[c], ahi[c])
        lc += 1


@_jit
def tile_job(x, xf, w1, w0, sc, bs, ak, alo, ahi, out, head, use_head, absum, use_absum,
             blocked, n, oy0, oy1, ox0, ox1, z, r, v):
    H, W = x.shape[1], x.shape[2]
    L, _, q = w1.shape
    halo = 2 * (L - 1)
    iy0, iy1 = max(0, oy0 - halo), min(H, oy1 + halo)
    ix0, ix1 = max(0, ox0 - halo), min(W, ox1 + halo)
    # local coordinates: row gy -> gy - iy0 + 1, column gx -> gx - ix0 + 1 (1 px margin)
    a0, a1, b0, b1 = iy0, iy1, ix0, ix1
    # start layer on the whole region (its 3x3 reads x_first itself, reflected at x's
    # border)
    for gy in range(a0, a1):
        lr = gy - iy0 + 1
        y0, y1, y2 = refl(gy - 1, H), gy, refl(gy + 1, H)
        for gx in range(b0, b1):
            lc = gx - ix0 + 1
            x0, x2 = refl(gx - 1, W), refl(gx + 1, W)
            p0, p1, p2 = xf[n, y0, x0], xf[n, y0, gx], xf[n, y0, x2]
            p3, p4, p5 = xf[n, y1, x0], xf[n, y1, gx], xf[n, y1, x2]
            p6, p7, p8 = xf[n, y2, x0], xf[n, y2, gx], xf[n, y2, x2]
            for c in range(q):
                t = (bs[0, c] + w1[0, 0, c] * p0 + w1[0, 1, c] * p1 + w1[0, 2, c] * p2
                     + w1[0, 3, c] * p3 + w1[0, 4, c] * p4 + w1[0, 5, c] * p5
                     + w1[0, 6, c] * p6 + w1[0, 7, c] * p7 + w1[0, 8, c] * p8)
                z[lr, lc, c] = shrink(t, ak[0, c], alo[0, c], ahi[0, c])
        fill_cols(z, lr, b0, b1, ix0, W, q)
    if a0 == 0:
        z[0, :] = z[2, :]
    if a1 == H:
        z[H - iy0 + 1, :] = z[H - 2 - iy0 + 1, :]
    for layer in range(1, L):
        # residual region: one row/column less on each side inside x; update region: two
        ra0 = a0 if a0 == 0 else a0 + 1
        ra1 = a1 if a1 == H else a1 - 1
        rb0 = b0 if b0 == 0 else b0 + 1
        rb1 = b1 if b1 == W else b1 - 1
        va0 = ra0 if ra0 == 0 else ra0 + 1
        va1 = ra1 if ra1 == H else ra1 - 1
        vb0 = rb0 if rb0 == 0 else rb0 + 1
        vb1 = rb1 if rb1 == W else rb1 - 1
        last = layer == L - 1
        for gy in range(ra0, ra1 + 1):
            if gy < ra1:  # the residual row gy: x - W0 * z (reads z rows gy-1..gy+1)
                lr = gy - iy0 + 1
                residual_row(z, w0[layer], x[n, gy], r[lr], lr, rb0 - ix0 + 1, rb1 - ix0 + 1,
                             ix0 - 1, q)
                if rb0 == 0:
                    r[lr, 0] = r[lr, 2]  # ix0 == 0 here
                if rb1 == W:
                    r[lr, W - ix0 + 1] = r[lr, W - 2 - ix0 + 1]
                if gy == 1 and ra0 == 0:
                    r[0, :] = r[2, :]  # iy0 == 0 here
            else:  # past the last residual row: its reflection, if x's border
                if ra1 != H:
                    break
                r[H - iy0 + 1, :] = r[H - 2 - iy0 + 1, :]
            # update row gy - 1 in place (its residual rows gy-2..gy are ready and no
            # later residual row reads it)
            uy = gy - 1
            if uy < va0 or uy >= va1:
                continue
            lr = uy - iy0 + 1
            if not last:
                # into a row buffer, then copied: with z's row as its own destination the
                # compiler's alias check sends the loop down its scalar path (6x slower)
                c0, c1 = vb0 - ix0 + 1, vb1 - ix0 + 1
                update_row(z[lr], v, w1[layer], sc[layer], bs[layer], ak[layer], alo[layer],
                           ahi[layer], r, lr, c0, c1, q)
                for lc in range(c0, c1):
                    for c in range(q):
                        z[lr, lc, c] = v[lc, c]
            elif oy0 <= uy < oy1:
                c0, c1 = ox0 - ix0 + 1, ox1 - ix0 + 1
                update_row(z[lr], v, w1[layer], sc[layer], bs[layer], ak[layer], alo[layer],
                           ahi[layer], r, lr, c0, c1, q)
                if use_head:
                    for lc in range(c0, c1):
                        acc = np.float32(0.0)
                        for c in range(q):
                            acc += head[c] * v[lc, c]
                        out[n, 0, uy, lc + ix0 - 1] = acc
                elif blocked:  # out [N, nb, H, W L]: channel b L + c at x L + c of block b
                    nbk = out.shape[1]
                    lanes = out.shape[3] // W
                    for b in range(nbk):
                        cq = min(lanes, q - b * lanes)
                        orow = out[n, b, uy]
                        for lc in range(c0, c1):
                            o = (lc + ix0 - 1) * lanes
                            for c in range(cq):
                                orow[o + c] = v[lc, b * lanes + c]
                else:  # transposed in blocks of 16 pixels, which stay in L1
                    for b0 in range(c0, c1, 16):
                        b1 = min(b0 + 16, c1)
                        for c in range(q):
                            for lc in range(b0, b1):
                                out[n, c, uy, lc + ix0 - 1] = v[lc, c]
                if use_absum:
                    for lc in range(c0, c1):
                        acc = np.float32(0.0)
                        for c in range(q):
                            acc += abs(v[lc, c])
                        absum[n, uy, lc + ix0 - 1] = acc
            if not last:
                fill_cols(z, lr, vb0, vb1, ix0, W, q)
                if uy == 1 and va0 == 0:
                    z[0, :] = z[2, :]
                if uy == H - 2 and va1 == H:
                    z[H - iy0 + 1, :] = z[H - 2 - iy0 + 1, :]
        a0, a1, b0, b1 = va0, va1, vb0, vb1

@_jit
def run_jobs(x, xf, w1, w0, sc, bs, ak, alo, ahi, out, head, use_head, absum, use_absum,
             blocked, tile, first, step):
    N, H, W = x.shape
    q = w1.shape[2]
    halo = 2 * (w1.shape[0] - 1)
    nty = (H + tile - 1) // tile
    ntx = (W + tile - 1) // tile
    side = tile + 2 * halo + 2
    z = np.empty((side, side, q), np.float32)
    r = np.empty((side, side), np.float32)
    v = np.empty((side, q), np.float32)  # the last layer's row
    for job in range(first, N * nty * ntx, step):
        n = job // (nty * ntx)
        k = job % (nty * ntx)
        oy0 = (k // ntx) * tile
        ox0 = (k % ntx) * tile
        tile_job(x, xf, w1, w0, sc, bs, ak, alo, ahi, out, head, use_head, absum, use_absum,
                 blocked, n, oy0, min(H, oy0 + tile), ox0, min(W, ox0 + tile), z, r, v)


def _smoke() -> None:
    """Compile every kernel for the types the calls use (float32 arrays) on tiny inputs (from
    numba's disk cache after the first session)."""
    q = 2
    x = np.zeros((1, 4, 4), np.float32)
    w = np.zeros((2, 9, q), np.float32)
    v = np.zeros((2, q), np.float32)
    for blocked in (False, True):
        run_jobs(x, x, w, w, v, v, v, v, v, np.zeros((1, q, 4, 4), np.float32),
                 np.zeros(q, np.float32), False, x, False, blocked, 8, 0, 1)
    _box_mean_rows(x, x.copy(), 1, 0, 1)
    _box_mean_cols(x, x.copy(), 1, 0, 1)
    _l1_fuse_rows(np.zeros((2, q, 4, 4), np.float32), np.zeros((2, 4, 4), np.float32),
                  np.zeros((q + 2, 4, 4), np.float32), 0, 1)
    _conv7_rows(np.zeros((q, 8, 8), np.float32), np.zeros((q, 7, 7), np.float32),
                np.zeros((8, 8), np.float32), 0, 1)
    for hist in (np.zeros((1, 1, 1)), np.zeros((2, q, 256))):
        for ext in (False, True):
            _saliency_blocks(np.zeros((2, 1, 4, 4 * 16), np.float32),
                             np.zeros((2, q), np.float32), np.ones((2, q), np.float32), ext,
                             hist, hist.shape[0] == 2, _DISTANCE, 1, 0.01,
                             np.zeros((q, 4, 4), np.float32), np.zeros((2, 4, 4), np.float32),
                             0, 1)


_kernels = Kernels("the DCU kernel", _smoke)


def available() -> bool:
    """Whether the kernel can run here (numba imported, not switched off, compiled)."""
    return _kernels.available()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    return _kernels.why()


def encode_chain(chain: DCUChain, x: np.ndarray, x_first: np.ndarray | None = None, *,
                 head: np.ndarray | None = None, tile: int = TILE,
                 threads: int | None = None, l1: bool = False, blocked: bool = False):
    """The chain's codes of x [N, H, W] (float32; H, W >= 2): [N, q, H, W], or with ``head``
    (q,) the projection [N, H, W]. ``x_first`` [N, H, W] feeds the start layer (None: x).
    ``l1``: also return each pixel's sum_c |z_c| [N, H, W] (the l1 fusion rule's activity),
    as a second value. ``blocked``: the codes channel-blocked for ``saliency_fuse``,
    [N, nb, H, W, L] (L = SALIENCY_LANES, lanes past q zero; what ``to_blocks`` makes of
    [N, q, H, W]), written so directly: contiguous runs of L channels per pixel. See the
    module docstring for what is computed. RuntimeError when the kernel is not available
    (``available()``)."""
    _kernels.check()
    x = np.ascontiguousarray(x, dtype=np.float32)
    xf = x if x_first is None else np.ascontiguousarray(x_first, dtype=np.float32)
    if x.ndim != 3 or xf.shape != x.shape or min(x.shape[1:]) < 2:
        raise ValueError(f"x, x_first: expected equal shapes [N, H, W] with H, W >= 2, got "
                         f"{x.shape} and {xf.shape}")
    N, H, W = x.shape
    use_head = head is not None
    hv = (np.ascontiguousarray(head, dtype=np.float32).reshape(-1) if use_head
          else np.zeros(chain.q, np.float32))
    if hv.shape != (chain.q,):
        raise ValueError(f"head: expected {chain.q} weights, got {hv.shape}")
    blocked = blocked and not use_head
    if blocked:
        lanes, q = SALIENCY_LANES, chain.q
        nb = -(-q // lanes)
        out = (np.empty if q % lanes == 0 else np.zeros)((N, nb, H, W * lanes), np.float32)
    else:
        out = np.empty((N, 1 if use_head else chain.q, H, W), np.float32)
    absum = np.empty((N, H, W) if l1 else (1, 1, 1), np.float32)
    args = (x, xf, chain.w1, chain.w0, chain.scale, chain.bias, *chain.clip_form(), out,
            hv, use_head, absum, bool(l1), blocked, int(tile))
    jobs = N * (-(-H // tile)) * (-(-W // tile))
    split(run_jobs, args, jobs, threads)
    if blocked:
        out = out.reshape(N, nb, H, W, lanes)
    out = out[:, 0] if use_head else out
    return (out, absum) if l1 else out


# --- CSC-IVFN's other per-pixel steps around the kernel ----------------------------------------

@_jit
def _box_mean_rows(x, tmp, r, first, step):
    """Horizontal (2r+1)-sums with reflection borders of x [N, H, W] into tmp, rows first,
    step (one thread's share)."""
    N, H, W = x.shape
    for n in range(N):
        for y in range(first, H, step):
            for gx in range(W):
                acc = np.float32(0.0)
                for d in range(-r, r + 1):
                    acc += x[n, y, refl(gx + d, W)]
                tmp[n, y, gx] = acc


@_jit
def _box_mean_cols(tmp, out, r, first, step):
    """Vertical (2r+1)-sums with reflection borders of tmp, scaled to means, into out."""
    N, H, W = tmp.shape
    inv = np.float32(1.0 / ((2 * r + 1) * (2 * r + 1)))
    for n in range(N):
        for y in range(first, H, step):
            for gx in range(W):
                out[n, y, gx] = 0.0
            for d in range(-r, r + 1):
                yy = refl(y + d, H)
                for gx in range(W):
                    out[n, y, gx] += tmp[n, yy, gx]
            for gx in range(W):
                out[n, y, gx] *= inv


def box_mean(x: np.ndarray, r: int, threads: int | None = None) -> np.ndarray:
    """Mean over (2r+1)^2 windows with reflection borders (c b | a b c) of x [N, H, W]
    (float32, H and W > r): CSC-IVFN's low-pass (r = 5), as models.ivfn.box_blur."""
    _kernels.check()
    x = np.ascontiguousarray(x, dtype=np.float32)
    tmp, out = np.empty_like(x), np.empty_like(x)
    split(_box_mean_rows, (x, tmp, r), x.shape[1], threads)
    split(_box_mean_cols, (tmp, out, r), x.shape[1], threads)
    return out


@_jit
def _l1_fuse_rows(z, absum, out, first, step):
    """CSC-IVFN's l1 rule for rows first, step: A_s = 3x3 mean (zero border) of absum_s,
    w_s = A_s / sum_s A_s (1/S where all are 0); out[:q] = sum_s w_s z_s, out[q:] = w."""
    S, q, H, W = z.shape
    wrow = np.empty((S, W), np.float32)
    for y in range(first, H, step):
        for gx in range(W):
            tot = np.float32(0.0)
            for s in range(S):
                a = np.float32(0.0)
                for yy in range(max(0, y - 1), min(H, y + 2)):
                    for xx in range(max(0, gx - 1), min(W, gx + 2)):
                        a += absum[s, yy, xx]
                a *= np.float32(1.0 / 9.0)
                wrow[s, gx] = a
                tot += a
            for s in range(S):
                wrow[s, gx] = wrow[s, gx] / tot if tot > 0 else np.float32(1.0 / S)
                out[q + s, y, gx] = wrow[s, gx]
        for c in range(q):
            for gx in range(W):
                out[c, y, gx] = wrow[0, gx] * z[0, c, y, gx]
            for s in range(1, S):
                for gx in range(W):
                    out[c, y, gx] += wrow[s, gx] * z[s, c, y, gx]


def l1_fuse(z: np.ndarray, absum: np.ndarray, threads: int | None = None) -> np.ndarray:
    """The l1 rule on codes z [S, q, H, W] given their sum_c |z| [S, H, W] (``encode_chain``
    with ``l1=True``) -> [q + S, H, W]: the fused codes, then the weights (rules.l1_rule's
    values to rounding)."""
    _kernels.check()
    S, q, H, W = z.shape
    out = np.empty((q + S, H, W), np.float32)
    split(_l1_fuse_rows, (z, absum, out), H, threads)
    return out


@_jit
def _conv7_rows(z, w, out, first, step):
    """out[y, x] = sum_c sum_{dy, dx} w[c, dy, dx] z[c, y + dy - 3, x + dx - 3] for the
    interior 3 <= y < H - 3, 3 <= x < W - 3 (no padding), rows first, step: a q -> 1 7x7
    convolution, each (channel, kernel row) one pass over the output row, vectorised along
    it."""
    q, H, W = z.shape
    acc = np.empty(W, np.float32)
    for y in range(3 + first, H - 3, step):
        for x in range(W):
            acc[x] = 0.0
        for c in range(q):
            for dy in range(7):
                row = z[c, y + dy - 3]
                w0, w1, w2, w3 = w[c, dy, 0], w[c, dy, 1], w[c, dy, 2], w[c, dy, 3]
                w4, w5, w6 = w[c, dy, 4], w[c, dy, 5], w[c, dy, 6]
                for x in range(3, W - 3):
                    acc[x] += ((w0 * row[x - 3] + w1 * row[x - 2] + w2 * row[x - 1])
                               + (w3 * row[x] + w4 * row[x + 1])
                               + (w5 * row[x + 2] + w6 * row[x + 3]))
        for x in range(3, W - 3):
            out[y, x] = acc[x]


def conv7_interior(z: np.ndarray, w: np.ndarray, threads: int | None = None) -> np.ndarray:
    """The q -> 1 7x7 convolution of z [q, H, W] (float32) with w [q, 7, 7] on the interior
    (pixels >= 3 px from the border; the border frame of the result is left unset): CSC-IVFN's
    decoder composed into one convolution (models.fastpath.FastIVFN.composite_decoder), a
    seventh of its three layers' multiply-adds."""
    _kernels.check()
    z = np.ascontiguousarray(z, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    q, H, W = z.shape
    if w.shape != (q, 7, 7):
        raise ValueError(f"w: expected [{q}, 7, 7], got {w.shape}")
    out = np.empty((H, W), np.float32)
    split(_conv7_rows, (z, w, out), H, threads)
    return out


# --- the saliency rule (CSC-IVFN's base rule), code channels in the SIMD lanes ---------------

@_jit
def _sym(i, n):
    """BORDER_REFLECT index (d c b a | a b c d), for -n <= i < 2n."""
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - 1 - i
    return i


@_jit
def _sal_levels(zs, lo, span, ok, nrm, lev):
    """One row zs [W L] of one source's block of L = SALIENCY_LANES code channels (channel-
    minor: element x L + c): the normalised map nrm = (z - lo) / span (0 where a channel is
    constant) and its histogram levels lev; lo, span, ok: each lane's values repeated along
    the row (one loop over the row: loops of L trips per pixel vectorise poorly)."""
    for e in range(zs.shape[0]):
        v = (zs[e] - lo[e]) / span[e] * ok[e]
        nrm[e] = v
        lev[e] = min(255, max(0, np.int32(np.floor(v * np.float32(255.0)))))


@_jit
def _sal_row(zb, y, lo, span, ok, lane, table, nrm, pw, lev, tsum):
    """_sal_levels of row y of every source's block zb [S, H, W L], and the saliency weights
    pw [S, W L]: each source's table [256 L] at its level (lane: each element's lane),
    normalised over the sources."""
    S, m = zb.shape[0], zb.shape[2]
    L = table.shape[1] // 256
    for s in range(S):
        _sal_levels(zb[s, y], lo[s], span[s], ok[s], nrm[s], lev[s])
        ts, ls, ps = table[s], lev[s], pw[s]
        for e in range(m):
            ps[e] = ts[ls[e] * L + lane[e]]
    for e in range(m):
        tsum[e] = pw[0, e]
    for s in range(1, S):
        for e in range(m):
            tsum[e] += pw[s, e]
    for s in range(S):
        for e in range(m):
            pw[s, e] /= tsum[e]


@_jit
def _sal_prefix(col, k_n, L, idx, pre):
    """Prefix sums along the row (BORDER_REFLECT through idx, the padded row's source
    columns) of col[:k_n] [k, W L], channel-minor: a pixel's box sum is pre[x + 2r + 1] -
    pre[x], the running sums one per channel lane (vectorised across the lanes)."""
    for k in range(k_n):
        for c in range(L):
            pre[k, c] = 0.0
    for j in range(idx.shape[0]):
        src, d = idx[j] * L, j * L
        for k in range(k_n):
            for c in range(L):
                pre[k, d + L + c] = pre[k, d + c] + col[k, src + c]


@_jit
def _sal_pass1(col, update, ni, pi, no, po, idx, r, inv, eps, pre, fa, fb):
    """The guided filter's first pass on one row of one source: its column sums col [4, W L]
    (double) += (I, p, I p, I I) of the row entering the window (I = ni, p = pi) - (...) of
    the row leaving it (``update``), their box sums along the row as prefix-sum
    differences, and a, b of every pixel of the row into fa, fb [W L]. Loops over whole
    rows: loops of L trips per pixel vectorise poorly (alias checks per call)."""
    m = fa.shape[0]
    L = pre.shape[1] // (idx.shape[0] + 1)
    if update:
        for e in range(m):
            i, p = np.float64(ni[e]), np.float64(pi[e])
            j, u = np.float64(no[e]), np.float64(po[e])
            col[0, e] += i - j
            col[1, e] += p - u
            col[2, e] += i * p - j * u
            col[3, e] += i * i - j * j
    _sal_prefix(col, 4, L, idx, pre)
    off = (2 * r + 1) * L
    # views at both ends of the boxes: indexed by e alone, the loads stay contiguous (e + off
    # with off of unknown sign compiles to gathers)
    i0, i1, p0, p1 = pre[0, :m], pre[0, off:off + m], pre[1, :m], pre[1, off:off + m]
    c0, c1, v0, v1 = pre[2, :m], pre[2, off:off + m], pre[3, :m], pre[3, off:off + m]
    for e in range(m):
        mi = (i1[e] - i0[e]) * inv
        mp = (p1[e] - p0[e]) * inv
        # the covariances in double (differences of near values); their ratio in single
        a = np.float32((c1[e] - c0[e]) * inv - mi * mp) / np.float32(
            (v1[e] - v0[e]) * inv - mi * mi + eps)
        fa[e] = a
        fb[e] = mp - a * mi


@_jit
def _sal_pass2(col, update, ai, bi, ao, bo, g, idx, r, inv, pre, ref):
    """The guided filter's second pass on one row of one source (as _sal_pass1, on a, b;
    ai, bi / ao, bo: the rows entering / leaving the window): its output mean(a) I + mean(b)
    into ref [W L] (float32; I = g, the normalised map)."""
    m = ref.shape[0]
    L = pre.shape[1] // (idx.shape[0] + 1)
    if update:
        for e in range(m):
            col[0, e] += np.float64(ai[e]) - np.float64(ao[e])
            col[1, e] += np.float64(bi[e]) - np.float64(bo[e])
    _sal_prefix(col, 2, L, idx, pre)
    off = (2 * r + 1) * L
    a0, a1, b0, b1 = pre[0, :m], pre[0, off:off + m], pre[1, :m], pre[1, off:off + m]
    for e in range(m):
        ref[e] = np.float32((a1[e] - a0[e]) * inv * g[e] + (b1[e] - b0[e]) * inv)


@_jit
def _saliency_blocks(zb, lo, hi, has_ext, hist, has_hist, dist, r, eps, fused, wsum, first,
                     step):
    """The saliency rule for blocks first, step of codes zb [S, nb, H, W L] (channel-blocked,
    L = SALIENCY_LANES: channel b L + c of pixel x is zb[s, b, y, x L + c]; channels past q
    are padding): fused [q, H, W] and the channel sum of the weights (added to wsum
    [S, H, W], this thread's own). ``has_ext``: each source's and channel's extremes lo, hi
    [S, q] are given, else taken from the block. A block's channels sit in the SIMD lanes,
    so the guided filter's running sums along a row vectorise across channels, and a
    block's rows are contiguous. Streamed row by row: the first pass (a, b from the box
    means of I, p, I p, I I) keeps column sums over the window's rows, the second (box means
    of a, b) runs r rows behind it on a ring of 2r + 2 rows of a, b; each output row is
    fused as soon as it is filtered. Box sums in double (rules.guided_filter_map's values to
    rounding)."""
    S, nb, H, m = zb.shape
    q, W = fused.shape[0], fused.shape[2]
    L = m // W
    R = 2 * r + 2
    inv = 1.0 / ((2 * r + 1) * (2 * r + 1))
    # each row's normalised maps and saliency weights, computed once, on a ring of R rows
    # (the first pass's window and the second pass's row)
    ring_n = np.empty((R, S, m), np.float32)
    ring_p = np.empty((R, S, m), np.float32)
    lev = np.empty((S, m), np.int32)
    nrm1 = np.empty(m, np.float32)
    tsum = np.empty(m, np.float32)
    col1 = np.empty((S, 4, m))
    col2 = np.empty((S, 2, m))
    pre = np.empty((4, (W + 2 * r + 1) * L))
    ring_a = np.empty((S, R, m), np.float32)
    ring_b = np.empty((S, R, m), np.float32)
    ref = np.empty((S, m), np.float32)
    frow = np.empty(m, np.float32)
    idx = np.empty(W + 2 * r, np.uint32)  # unsigned: no wraparound check per access
    for j in range(W + 2 * r):
        idx[j] = _sym(j - r, W)
    table64 = np.empty(256 * L)
    table = np.empty((S, 256 * L), np.float32)
    counts = np.empty(4 * 256 * L)  # four histograms (pixel x mod 4): shorter store chains
    lo_l = np.empty((S, L), np.float32)
    hi_l = np.empty((S, L), np.float32)
    span = np.empty((S, L), np.float32)
    ok = np.empty((S, L), np.float32)
    lo_r = np.empty((S, m), np.float32)  # the lanes' values repeated along a row
    span_r = np.empty((S, m), np.float32)
    ok_r = np.empty((S, m), np.float32)
    lane = np.empty(m, np.int32)
    for e in range(m):
        lane[e] = e % L
    for blk in range(first, nb, step):
        c0 = blk * L
        cb = min(L, q - c0)  # the block's channels (the rest: padding)
        zbk = zb[:, blk]
        for s in range(S):
            if has_ext:
                for c in range(L):
                    lo_l[s, c] = lo[s, c0 + c] if c < cb else np.float32(0.0)
                    hi_l[s, c] = hi[s, c0 + c] if c < cb else np.float32(0.0)
            else:
                lo_l[s] = zbk[s, 0, :L]
                hi_l[s] = zbk[s, 0, :L]
                for y in range(H):
                    zs = zbk[s, y]
                    for x in range(W):
                        for c in range(L):
                            lo_l[s, c] = min(lo_l[s, c], zs[x * L + c])
                            hi_l[s, c] = max(hi_l[s, c], zs[x * L + c])
            for c in range(L):
                sp = hi_l[s, c] - lo_l[s, c]
                span[s, c] = sp if sp > 0 else np.float32(1.0)
                ok[s, c] = np.float32(1.0) if sp > 0 and c < cb else np.float32(0.0)
            for e in range(m):
                lo_r[s, e] = lo_l[s, lane[e]]
                span_r[s, e] = span[s, lane[e]]
                ok_r[s, e] = ok[s, lane[e]]
        # each source's table: sum_i hist[i] |i - j| over the levels j (+ 1e-12)
        for s in range(S):
            counts[:] = 0.0
            n4 = 256 * L
            if has_hist:
                for i in range(256):
                    for c in range(cb):
                        counts[i * L + c] = hist[s, c0 + c, i]
            else:
                lv = lev[0]
                for y in range(H):
                    _sal_levels(zbk[s, y], lo_r[s], span_r[s], ok_r[s], nrm1, lv)
                    for e in range(m):
                        counts[((e // L) & 3) * n4 + lv[e] * L + lane[e]] += 1.0
                tot = np.float64(H * W)
                for e in range(n4):
                    counts[e] = (counts[e] + counts[n4 + e] + counts[2 * n4 + e]
                                 + counts[3 * n4 + e]) / tot
            table64[:] = 0.0
            for i in range(256):
                for j in range(256):
                    dd = dist[i, j]
                    for c in range(L):
                        table64[j * L + c] += counts[i * L + c] * dd
            for e in range(256 * L):
                table[s, e] = np.float32(table64[e] + 1e-12)
        for y in range(H + r):
            if y < H:  # first pass, row y
                if y == 0:  # the window of row 0: rows r .. 1, 0 | 0, 1 .. r
                    col1[:] = 0.0
                    for j in range(r + 1):
                        _sal_row(zbk, j, lo_r, span_r, ok_r, lane, table, ring_n[j % R],
                                 ring_p[j % R], lev, tsum)
                        w = 2.0 if j < r else 1.0
                        for s in range(S):
                            ni, pi, cs = ring_n[j % R, s], ring_p[j % R, s], col1[s]
                            for e in range(m):
                                i, p = np.float64(ni[e]), np.float64(pi[e])
                                cs[0, e] += w * i
                                cs[1, e] += w * p
                                cs[2, e] += w * (i * p)
                                cs[3, e] += w * (i * i)
                    for s in range(S):
                        _sal_pass1(col1[s], False, ring_n[0, s], ring_p[0, s], ring_n[0, s],
                                   ring_p[0, s], idx, r, inv, eps, pre, ring_a[s, 0],
                                   ring_b[s, 0])
                else:
                    if y + r < H:
                        sl = (y + r) % R
                        _sal_row(zbk, y + r, lo_r, span_r, ok_r, lane, table, ring_n[sl],
                                 ring_p[sl], lev, tsum)
                    # the rows entering and leaving the window (reflected at the borders:
                    # rows still on the ring)
                    ji, jo = _sym(y + r, H) % R, _sym(y - r - 1, H) % R
                    for s in range(S):
                        _sal_pass1(col1[s], True, ring_n[ji, s], ring_p[ji, s], ring_n[jo, s],
                                   ring_p[jo, s], idx, r, inv, eps, pre, ring_a[s, y % R],
                                   ring_b[s, y % R])
            y2 = y - r  # second pass, row y2 (its window's rows of a, b are done)
            if y2 < 0:
                continue
            ji, jo = _sym(y2 + r, H) % R, _sym(y2 - r - 1, H) % R
            for s in range(S):
                if y2 == 0:
                    col2[s] = 0.0
                    for j in range(r + 1):
                        w = 2.0 if j < r else 1.0
                        ra, rb = ring_a[s, j % R], ring_b[s, j % R]
                        for e in range(m):
                            col2[s, 0, e] += w * ra[e]
                            col2[s, 1, e] += w * rb[e]
                _sal_pass2(col2[s], y2 > 0, ring_a[s, ji], ring_b[s, ji], ring_a[s, jo],
                           ring_b[s, jo], ring_n[y2 % R, s], idx, r, inv, pre, ref[s])
            # the refined weights normalised over the sources; the fused row
            for e in range(m):
                tsum[e] = ref[0, e] + np.float32(1e-12)
            for s in range(1, S):
                for e in range(m):
                    tsum[e] += ref[s, e] + np.float32(1e-12)
            for e in range(m):
                tsum[e] = np.float32(1.0) / tsum[e]
            frow[:] = 0.0
            for s in range(S):
                rs, zs = ref[s], zbk[s, y2]
                for e in range(m):
                    wv = (rs[e] + np.float32(1e-12)) * tsum[e]
                    frow[e] += wv * zs[e]
                    rs[e] = wv
            for c in range(cb):
                out_row = fused[c0 + c, y2]
                for x in range(W):
                    out_row[x] = frow[x * L + c]
            for s in range(S):
                rs, ws = ref[s], wsum[s, y2]
                if cb == 16 == L:  # written out: a 16-trip loop per pixel is slow
                    for x in range(W):
                        e = x * 16
                        ws[x] += ((((rs[e] + rs[e + 1]) + (rs[e + 2] + rs[e + 3]))
                                   + ((rs[e + 4] + rs[e + 5]) + (rs[e + 6] + rs[e + 7])))
                                  + (((rs[e + 8] + rs[e + 9]) + (rs[e + 10] + rs[e + 11]))
                                     + ((rs[e + 12] + rs[e + 13]) + (rs[e + 14] + rs[e + 15]))))
                else:
                    for x in range(W):
                        acc = np.float32(0.0)
                        for c in range(cb):
                            acc += rs[x * L + c]
                        ws[x] += acc


_DISTANCE = np.abs(np.arange(256.0)[:, None] - np.arange(256.0)[None, :])


def to_blocks(z: np.ndarray) -> np.ndarray:
    """Codes z [S, q, H, W] channel-blocked for ``saliency_fuse``: [S, nb, H, W, L] with
    L = SALIENCY_LANES, the lanes past q zero (``encode_chain(blocked=True)`` writes this
    layout directly)."""
    S, q, H, W = z.shape
    lanes = SALIENCY_LANES
    nb = -(-q // lanes)
    out = np.zeros((S, nb, H, W, lanes), np.float32)
    for b in range(nb):
        c0, c1 = b * lanes, min(q, (b + 1) * lanes)
        out[:, b, :, :, :c1 - c0] = z[:, c0:c1].transpose(0, 2, 3, 1)
    return out


def saliency_fuse(z: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None,
                  hist: np.ndarray | None, radius: int, eps: float, threads: int | None = None,
                  q: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CSC-IVFN's saliency rule (rules.saliency_rule's values to rounding) on base codes
    z [S, q, H, W] or channel-blocked [S, nb, H, W, L] (``to_blocks``; then ``q`` says
    how many channels are codes), float32, min(H, W) > radius, given each source's and
    channel's extremes lo, hi [S, q] (None: the codes' own) and, for tiles, the whole
    image's normalised histograms hist [S, q, 256]: (fused codes [q, H, W], channel-mean
    weights [S, 1, H, W]). Blocks of channels run in parallel."""
    _kernels.check()
    if z.ndim == 4:
        q = z.shape[1]
        z = to_blocks(z)
    S, nb, H, W, lanes = z.shape
    if lanes != SALIENCY_LANES:
        raise ValueError(f"z: expected {SALIENCY_LANES} channels per block, got {lanes}")
    q = nb * lanes if q is None else q
    if min(H, W) <= radius:
        raise ValueError(f"z: the saliency rule needs both sides > {radius} px, got {H}x{W}")
    zb = np.ascontiguousarray(z, dtype=np.float32).reshape(S, nb, H, W * lanes)
    has_ext = lo is not None
    if has_ext:
        lo = np.ascontiguousarray(lo, dtype=np.float32)
        hi = np.ascontiguousarray(hi, dtype=np.float32)
    else:
        lo = hi = np.zeros((1, 1), np.float32)
    has_hist = hist is not None
    h = np.ascontiguousarray(hist, dtype=np.float64) if has_hist else np.zeros((1, 1, 1))
    fused = np.empty((q, H, W), np.float32)
    n = max(1, min(threads or _threads(), nb))
    sums = [np.zeros((S, H, W), np.float32) for _ in range(n)]
    wait_all([pool(n).submit(_saliency_blocks, zb, lo, hi, has_ext, h, has_hist, _DISTANCE,
                             radius, float(eps), fused, sums[i], i, n) for i in range(n)])
    wsum = sums[0]
    for extra in sums[1:]:
        wsum += extra
    wsum /= q
    return fused, wsum[:, None]
