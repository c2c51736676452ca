"""CSC-MEFN exposure fusion on the CPU in one fused kernel per tile (numba), for weights whose
soft thresholds are all >= 0 (the fast path, issue 18).

Why: with one image channel and 24 code channels every element-wise step of the network
streams 24 values per pixel through memory; the network itself is ~1.1K multiply-adds per
pixel and exposure. One compiled loop nest per tile reads the frames as given (uint8, uint16
or float32), computes luma, the stem, the DCUs (batch norm folded, the codes of a tile kept in
cache), the logits, the softmax over exposures with the global exposure prior, the chroma
blend and the RGB output, and writes the image and the weight maps in place: nothing of the
bracket is converted to float32 as a whole. Tiles run on threads (the kernel releases the GIL).

numba is optional: ``available()`` says whether it imports, is not switched off
(CSCFUSION_NO_NUMBA) and compiles here (engine/numba_jit.py); the engine falls back to the
PyTorch fast form (models/fastpath.py) with a notice otherwise.
"""

from __future__ import annotations

import numpy as np

from .numba_jit import Kernels, pool, wait_all
from .numba_jit import jit as _jit

# --- the network's parameters, folded ---------------------------------------------------------

class MEFParams:
    """CSC-MEFN's weights as the kernel reads them (float32, channels last): the stem's
    folded 3x3 convolution ``stem_w`` (9, q), ``stem_b`` (q,) and threshold ``stem_t`` (q,);
    per DCU the dictionary ``w0`` (n, 9, q), the adjoint scaled by batch norm ``w1`` (n, 9, q),
    batch norm's scale ``s`` and shift ``b`` (n, q), thresholds ``t`` (n, q); the 1x1 head
    ``head`` (q,). Taps are row-major (dy, dx) in 0..2."""

    def __init__(self, net):
        from ..models.fastpath import FastEncoder

        enc = FastEncoder(net.encoder, "conv")
        if not enc.has_stem or enc.stem_kind != "sst":
            raise ValueError("net: expected CSC-MEFN (a soft-threshold stem before the DCUs)")
        q = enc.stem_w.shape[0]

        def taps(w):  # [q, 1, 3, 3] or [1, q, 3, 3] -> (9, q)
            return w.detach().cpu().numpy().reshape(q, 9).T

        def f32(a):
            if not isinstance(a, np.ndarray):
                a = a.detach().cpu().numpy()
            return np.ascontiguousarray(a, np.float32)

        self.q = q
        self.stem_w = f32(taps(enc.stem_w))
        self.stem_b = f32(enc.stem_b.flatten())
        self.stem_t = f32(enc.stem_act.flatten())
        self.w0 = f32(np.stack([taps(d.w0) for d in enc.dcus]))
        self.w1 = f32(np.stack([taps(d.w1) for d in enc.dcus]))
        self.s = f32(np.stack([f32(d.s.flatten()) for d in enc.dcus]))
        self.b = f32(np.stack([f32(d.b.flatten()) for d in enc.dcus]))
        self.t = f32(np.stack([f32(d.act.flatten()) for d in enc.dcus]))
        self.head = f32(net.head.weight.detach().reshape(q))
        self.radius = int(enc.radius)
        if (self.stem_t < 0).any() or (self.t < 0).any():
            raise ValueError("net: a soft threshold is negative (the exact path only)")

    def arrays(self) -> tuple:
        return (self.stem_w, self.stem_b, self.stem_t, self.w0, self.w1, self.s, self.b,
                self.t, self.head)


# --- the kernel -------------------------------------------------------------------------------

@_jit
def _reflect_border(a, h, w):
    """Fill the 1 px border of a padded (h + 2, w + 2) plane by reflection (c b | a b c), as
    the network's 3x3 convolutions pad."""
    for i in range(1, h + 1):
        a[i, 0] = a[i, 2]
        a[i, w + 1] = a[i, w - 1]
    for j in range(w + 2):
        a[0, j] = a[2, j]
        a[h + 1, j] = a[h - 1, j]


@_jit
def _stencil(a, b_, c_, k0, k1, k2, k3, k4, k5, k6, k7, k8, j):
    """The 3x3 stencil (taps k0..k8, row-major) at j of the rows above (a), at (b_) and below
    (c_) the output, each starting one pixel left of it (non-negative indices only: numba's
    negative-index wraparound would stop the loop from vectorising)."""
    return (k0 * a[j] + k1 * a[j + 1] + k2 * a[j + 2]
            + k3 * b_[j] + k4 * b_[j + 1] + k5 * b_[j + 2]
            + k6 * c_[j] + k7 * c_[j + 1] + k8 * c_[j + 2])


@_jit
def _taps(w, c):
    """The 9 taps of code channel c of a (9, q) weight array."""
    return w[0, c], w[1, c], w[2, c], w[3, c], w[4, c], w[5, c], w[6, c], w[7, c], w[8, c]


@_jit
def _fuse_tile(stack, scale, prior, stem_w, stem_b, stem_t, w0, w1, s, b, t, head,
               cy0, cy1, cx0, cx1, oy0, oy1, ox0, ox1, image, weights, want_weights):
    """Fuse one tile: the crop rows cy0:cy1, cols cx0:cx1 of ``stack`` (K, H, W, C) with C = 3
    (RGB) or 1 (grey), values times ``scale`` in [0, 1]; writes the core oy0:oy1, ox0:ox1 (inside
    the crop, by the network's radius where the crop is not at the image's edge) of ``image``
    (H, W, C) and, if ``want_weights``, of ``weights`` (K, H, W).

    Every plane (luma, each code channel, the residual, the logits) is a flattened padded
    (h + 2, w + 2) crop, and each 3x3 convolution runs one code channel at a time as ONE loop
    over the plane (vectorised over pixels; the border columns it passes are then set by
    reflection). Measured here against the alternatives (benchmarks/README.md): 3.5x faster
    than codes channels-last with the channel loop innermost, 1.15x faster than one loop per
    image row."""
    K = stack.shape[0]
    rgb = stack.shape[3] == 3
    q = head.shape[0]
    n_dcu = w0.shape[0]
    h, w = cy1 - cy0, cx1 - cx0
    oh = oy1 - oy0
    ry, rx = oy0 - cy0, ox0 - cx0
    wa = w + 2
    n = (h + 2) * wa
    p0, p1 = wa + 1, (h + 1) * wa - 1  # first to last interior pixel
    c0, c1 = (ry + 1) * wa + 1, (ry + oh + 1) * wa - 1  # the core's rows
    lum = np.empty((K, n), np.float32)
    z = np.empty((q, n), np.float32)
    r = np.empty(n, np.float32)
    logits = np.empty((K, n), np.float32)
    for k in range(K):
        yk = lum[k]
        y2 = yk.reshape((h + 2, wa))
        for i in range(h):
            for j in range(w):
                if rgb:
                    y2[i + 1, j + 1] = (
                        np.float32(0.299) * np.float32(stack[k, cy0 + i, cx0 + j, 0])
                        + np.float32(0.587) * np.float32(stack[k, cy0 + i, cx0 + j, 1])
                        + np.float32(0.114) * np.float32(stack[k, cy0 + i, cx0 + j, 2])
                    ) * scale
                else:
                    y2[i + 1, j + 1] = np.float32(stack[k, cy0 + i, cx0 + j, 0]) * scale
        _reflect_border(y2, h, w)
        # stem: 3x3 convolution 1 -> q, batch norm folded, soft threshold; code channels in
        # pairs (c, c + 1) here and below: the taps of the plane they share are loaded once
        ya, yb, yc = yk[p0 - wa - 1:], yk[p0 - 1:], yk[p0 + wa - 1:]
        for c in range(0, q, 2):
            c2 = min(c + 1, q - 1)  # q odd: the last channel twice
            k0, k1, k2, k3, k4, k5, k6, k7, k8 = _taps(stem_w, c)
            g0, g1, g2, g3, g4, g5, g6, g7, g8 = _taps(stem_w, c2)
            bc, tc, bd, td = stem_b[c], stem_t[c], stem_b[c2], stem_t[c2]
            zo, zp = z[c, p0:], z[c2, p0:]
            for j in range(p1 - p0):
                v = bc + _stencil(ya, yb, yc, k0, k1, k2, k3, k4, k5, k6, k7, k8, j)
                u = bd + _stencil(ya, yb, yc, g0, g1, g2, g3, g4, g5, g6, g7, g8, j)
                zo[j] = v - min(max(v, -tc), tc)
                zp[j] = u - min(max(u, -td), td)
            _reflect_border(z[c].reshape((h + 2, wa)), h, w)
            _reflect_border(z[c2].reshape((h + 2, wa)), h, w)
        lk = logits[k]
        lk[c0:c1] = prior[k]
        for d in range(n_dcu):
            # residual r = y - Conv0(z): one channel, accumulated over the code channels
            r[p0:p1] = yk[p0:p1]
            ro = r[p0:]
            for c in range(0, q, 2):
                c2 = min(c + 1, q - 1)
                za, zb, zd = z[c, p0 - wa - 1:], z[c, p0 - 1:], z[c, p0 + wa - 1:]
                xa, xb, xd = z[c2, p0 - wa - 1:], z[c2, p0 - 1:], z[c2, p0 + wa - 1:]
                k0, k1, k2, k3, k4, k5, k6, k7, k8 = _taps(w0[d], c)
                g0, g1, g2, g3, g4, g5, g6, g7, g8 = _taps(w0[d], c2)
                if c2 == c:
                    g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = g8 = np.float32(0.0)
                for j in range(p1 - p0):
                    ro[j] -= (_stencil(za, zb, zd, k0, k1, k2, k3, k4, k5, k6, k7, k8, j)
                              + _stencil(xa, xb, xd, g0, g1, g2, g3, g4, g5, g6, g7, g8, j))
            _reflect_border(r.reshape((h + 2, wa)), h, w)
            # z <- sst(s z + Conv1'(r) + b) in place (Conv1 reads r only); the last DCU on
            # the core's rows only, straight into the 1x1 head's logits
            last = d == n_dcu - 1
            u0, u1 = (c0, c1) if last else (p0, p1)
            ra, rb, rc = r[u0 - wa - 1:], r[u0 - 1:], r[u0 + wa - 1:]
            lo = lk[u0:]
            for c in range(0, q, 2):
                c2 = min(c + 1, q - 1)
                k0, k1, k2, k3, k4, k5, k6, k7, k8 = _taps(w1[d], c)
                g0, g1, g2, g3, g4, g5, g6, g7, g8 = _taps(w1[d], c2)
                sc, bc, tc, hc = s[d, c], b[d, c], t[d, c], head[c]
                sd, bd, td, hd = s[d, c2], b[d, c2], t[d, c2], head[c2]
                if c2 == c:
                    hd = np.float32(0.0)
                zo, zp = z[c, u0:], z[c2, u0:]
                if last:
                    for j in range(u1 - u0):
                        v = sc * zo[j] + bc + _stencil(ra, rb, rc, k0, k1, k2, k3, k4, k5,
                                                       k6, k7, k8, j)
                        u = sd * zp[j] + bd + _stencil(ra, rb, rc, g0, g1, g2, g3, g4, g5,
                                                       g6, g7, g8, j)
                        lo[j] += (hc * (v - min(max(v, -tc), tc))
                                  + hd * (u - min(max(u, -td), td)))
                else:
                    for j in range(u1 - u0):
                        v = sc * zo[j] + bc + _stencil(ra, rb, rc, k0, k1, k2, k3, k4, k5,
                                                       k6, k7, k8, j)
                        u = sd * zp[j] + bd + _stencil(ra, rb, rc, g0, g1, g2, g3, g4, g5,
                                                       g6, g7, g8, j)
                        zo[j] = v - min(max(v, -tc), tc)
                        zp[j] = u - min(max(u, -td), td)
                    _reflect_border(z[c].reshape((h + 2, wa)), h, w)
                    _reflect_border(z[c2].reshape((h + 2, wa)), h, w)
    _blend(stack, scale, lum.reshape((K, h + 2, wa)), logits.reshape((K, h + 2, wa)),
           ry + 1, rx + 1, oy0, oy1, ox0, ox1, image, weights, want_weights)


@_jit
def _blend(stack, scale, lum, logits, ly, lx, oy0, oy1, ox0, ox1, image, weights,
           want_weights):
    """Softmax of the logits over exposures, luminance blended by it, chroma by saturation
    (the authors' rule), RGB out clamped to [0, 1]: the core oy0:oy1, ox0:ox1 of ``image``
    (and ``weights``), whose pixel (0, 0) is (ly, lx) of ``lum`` and ``logits`` (K, ., .).
    Row by row, exposures outermost, so the loops over a row's pixels vectorise."""
    K = stack.shape[0]
    rgb = stack.shape[3] == 3
    ow = ox1 - ox0
    f0, f1, half = np.float32(0.0), np.float32(1.0), np.float32(0.5)
    mx = np.empty(ow, np.float32)
    tot = np.empty(ow, np.float32)
    yf = np.empty(ow, np.float32)
    nb = np.empty(ow, np.float32)
    db = np.empty(ow, np.float32)
    nr = np.empty(ow, np.float32)
    dr = np.empty(ow, np.float32)
    for i in range(oy1 - oy0):
        y = oy0 + i
        mx[:] = logits[0, ly + i, lx:lx + ow]
        for k in range(1, K):
            lrow = logits[k, ly + i, lx:lx + ow]
            for j in range(ow):
                mx[j] = max(mx[j], lrow[j])
        tot[:] = f0
        for k in range(K):
            lrow = logits[k, ly + i, lx:lx + ow]
            for j in range(ow):
                e = np.exp(lrow[j] - mx[j])
                lrow[j] = e
                tot[j] += e
        for j in range(ow):
            tot[j] = f1 / tot[j]
        yf[:] = f0
        for k in range(K):
            lrow = logits[k, ly + i, lx:lx + ow]
            yrow = lum[k, ly + i, lx:lx + ow]
            for j in range(ow):
                wk = lrow[j] * tot[j]
                lrow[j] = wk
                yf[j] += wk * yrow[j]
            if want_weights:
                weights[k, y, ox0:ox1] = lrow
        if not rgb:
            for j in range(ow):
                image[y, ox0 + j, 0] = min(max(yf[j], f0), f1)
            continue
        nb[:] = f0
        db[:] = f0
        nr[:] = f0
        dr[:] = f0
        for k in range(K):
            px = stack[k, y, ox0:ox1]
            for j in range(ow):
                cr_ = np.float32(px[j, 0]) * scale
                cg_ = np.float32(px[j, 1]) * scale
                cb_ = np.float32(px[j, 2]) * scale
                cb = (half - np.float32(0.168736) * cr_ - np.float32(0.331264) * cg_
                      + half * cb_)
                cr = (half + half * cr_ - np.float32(0.418688) * cg_
                      - np.float32(0.081312) * cb_)
                ab = abs(cb - half) + np.float32(1e-8)
                ar = abs(cr - half) + np.float32(1e-8)
                nb[j] += ab * cb
                db[j] += ab
                nr[j] += ar * cr
                dr[j] += ar
        for j in range(ow):
            cbf = nb[j] / db[j] - half
            crf = nr[j] / dr[j] - half
            image[y, ox0 + j, 0] = min(max(yf[j] + np.float32(1.402) * crf, f0), f1)
            image[y, ox0 + j, 1] = min(max(yf[j] - np.float32(0.344136) * cbf
                                           - np.float32(0.714136) * crf, f0), f1)
            image[y, ox0 + j, 2] = min(max(yf[j] + np.float32(1.772) * cbf, f0), f1)


@_jit
def _channel_sums(stack, out, zero):
    """Per exposure and channel (C = 3 or 1), the sum of the raw values of (K, H, W, C) added
    into out (K, C) float64; each row summed in the type of ``zero`` first (uint64 for integer
    frames: exact; float64 for float ones), three scalar accumulators so the loop vectorises."""
    K, H, W, C = stack.shape
    for k in range(K):
        for i in range(H):
            a0, a1, a2 = zero, zero, zero
            if C == 3:
                for j in range(W):
                    a0 += stack[k, i, j, 0]
                    a1 += stack[k, i, j, 1]
                    a2 += stack[k, i, j, 2]
            else:
                for j in range(W):
                    a0 += stack[k, i, j, 0]
            out[k, 0] += a0
            if C == 3:
                out[k, 1] += a1
                out[k, 2] += a2


# --- the driver -------------------------------------------------------------------------------

def _compile_for(dtype: str, rgb: bool) -> None:
    """Run the kernels once on a tiny bracket of ``dtype``: compiles them (or loads them from
    numba's cache) for that input."""
    q = 2
    stack = np.zeros((2, 4, 4, 3 if rgb else 1), dtype)
    image = np.empty((4, 4, stack.shape[3]), np.float32)
    weights = np.empty((2, 4, 4), np.float32)
    taps, per_channel = np.zeros((9, q), np.float32), np.zeros(q, np.float32)
    per_dcu = np.zeros((1, q), np.float32)
    _fuse_tile(stack, np.float32(1.0), np.zeros(2, np.float32), taps, per_channel,
               per_channel, taps[None], taps[None], per_dcu, per_dcu, per_dcu, per_channel,
               0, 4, 0, 4, 0, 4, 0, 4, image, weights, True)
    channel_sums(stack)


_kernels = Kernels("the fused MEF kernel", _compile_for)


def available(dtype=np.float32, rgb: bool = True) -> bool:
    """Whether the fused kernel runs here for frames of ``dtype`` (grey or ``rgb``): numba
    imports, is not switched off, and the kernels compile, or load from numba's cache, for
    that input (once per process; a failure is remembered, its reason in
    ``unavailable_reason()``)."""
    return _kernels.available(np.dtype(dtype).str, bool(rgb))


def unavailable_reason() -> str | None:
    """Why ``available()`` is False, in a few words (None where it is True)."""
    return _kernels.why()


def channel_sums(stack: np.ndarray) -> np.ndarray:
    """Float64 sums of each exposure's channels of (K, H, W) or (K, H, W, 3) raw values ->
    (K,) or (K, 3), in one pass over the frames (no float copy)."""
    s4 = stack if stack.ndim == 4 else stack[..., None]
    out = np.zeros((s4.shape[0], s4.shape[3]), np.float64)
    _channel_sums(s4, out, np.uint64(0) if s4.dtype.kind == "u" else np.float64(0.0))
    return out if stack.ndim == 4 else out[:, 0]


def fuse_bracket(stack: np.ndarray, scale: float, params: MEFParams, prior: np.ndarray,
                 tiles, weights: bool = True, threads: int = 1, tick=None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """One bracket (K, H, W) grey or (K, H, W, 3) RGB, values as given (uint8, uint16 or
    float32; times ``scale`` in [0, 1]) -> (image (H, W[, 3]) float32, weights (K, H, W) or
    None). ``prior``: the (K,) exposure-prior logits (zeros without one); ``tiles``:
    tiling.Tile list (cores partitioning the image, crops = cores + the network's radius);
    ``tick()`` after each tile (it may raise to cancel: the tiles not yet started are
    dropped)."""
    K, H, W = stack.shape[:3]
    rgb = stack.ndim == 4
    src = np.ascontiguousarray(stack if rgb else stack[..., None])
    image = np.empty((H, W, 3 if rgb else 1), np.float32)
    w_out = np.empty((K, H, W), np.float32) if weights else np.empty((K, 1, 1), np.float32)
    prior = np.ascontiguousarray(prior, np.float32)
    args = params.arrays()
    sc = np.float32(scale)

    def run(t) -> None:
        (cy0, cy1, cx0, cx1), (oy0, oy1, ox0, ox1) = t.crop, t.core
        _fuse_tile(src, sc, prior, *args, cy0, cy1, cx0, cx1, oy0, oy1, ox0, ox1, image,
                   w_out, weights)

    if threads <= 1 or len(tiles) == 1:
        for t in tiles:
            run(t)
            if tick is not None:
                tick()
    else:
        wait_all([pool(threads).submit(run, t) for t in tiles], tick)
    return (image if rgb else image[..., 0]), (w_out if weights else None)
