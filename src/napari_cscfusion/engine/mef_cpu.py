"""CSC-MEFN exposure fusion on the CPU in one fused kernel per tile (numba), for weights whose
soft thresholds are all >= 0 (the fast path, issue 18).

Why: with one image channel and 24 code channels every element-wise step of the network
streams 24 values per pixel through memory; the network itself is ~1.1K multiply-adds per
pixel and exposure. One compiled loop nest per tile reads the frames as given (uint8, uint16
or float32), computes luma, the stem, the DCUs (batch norm folded, codes channels-last, kept in
cache), the logits, the softmax over exposures with the global exposure prior, the chroma
blend and the RGB output, and writes the image and the weight maps in place: nothing of the
bracket is converted to float32 as a whole. Tiles run on threads (the kernel releases the GIL).

numba is optional: ``available()`` says whether it imports and compiles here; the engine
falls back to the PyTorch fast form (models/fastpath.py) with a notice otherwise.
"""

from __future__ import annotations

import numpy as np

try:  # optional: the PyTorch fast form runs without it
    import numba
except ImportError:  # pragma: no cover - exercised by the fallback test with a patch
    numba = None

_COMPILE_ERROR: Exception | None = None
LANES = 16  # float32 lanes of a 512-bit vector


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")(fn)


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
    """Fill the 1 px border of a padded (h + 2, w + 2[, q]) buffer by reflection (c b | a b c),
    as the network's 3x3 convolutions pad."""
    for i in range(1, h + 1):
        a[i, 0] = a[i, 2]
        a[i, w + 1] = a[i, w - 1]
    for j in range(w + 2):
        a[0, j] = a[2, j]
        a[h + 1, j] = a[h - 1, j]


@_jit
def _blend(stack, scale, lum, logits, ry, rx, oy0, oy1, ox0, ox1, image, weights,
           want_weights):
    """Softmax of the logits (K, oh, ow) over exposures, luminance blended by it, chroma by
    saturation (the authors' rule), RGB out clamped to [0, 1]; writes the core of ``image``
    and, if ``want_weights``, of ``weights``."""
    K = stack.shape[0]
    rgb = stack.shape[3] == 3
    oh, ow = oy1 - oy0, ox1 - ox0
    e = np.empty(K, np.float32)
    for i in range(oh):
        for j in range(ow):
            m = logits[0, i, j]
            for k in range(1, K):
                m = max(m, logits[k, i, j])
            tot = np.float32(0.0)
            for k in range(K):
                e[k] = np.exp(logits[k, i, j] - m)
                tot += e[k]
            inv = np.float32(1.0) / tot
            yf = np.float32(0.0)
            for k in range(K):
                e[k] *= inv
                yf += e[k] * lum[k, ry + i + 1, rx + j + 1]
                if want_weights:
                    weights[k, oy0 + i, ox0 + j] = e[k]
            if not rgb:
                image[oy0 + i, ox0 + j, 0] = min(max(yf, np.float32(0.0)), np.float32(1.0))
                continue
            nb = np.float32(0.0)
            db = np.float32(0.0)
            nr = np.float32(0.0)
            dr = np.float32(0.0)
            for k in range(K):
                px = stack[k, oy0 + i, ox0 + j]
                cr_ = np.float32(px[0]) * scale
                cg_ = np.float32(px[1]) * scale
                cb_ = np.float32(px[2]) * scale
                cb = (np.float32(0.5) - np.float32(0.168736) * cr_
                      - np.float32(0.331264) * cg_ + np.float32(0.5) * cb_)
                cr = (np.float32(0.5) + np.float32(0.5) * cr_ - np.float32(0.418688) * cg_
                      - np.float32(0.081312) * cb_)
                ab = abs(cb - np.float32(0.5)) + np.float32(1e-8)
                ar = abs(cr - np.float32(0.5)) + np.float32(1e-8)
                nb += ab * cb
                db += ab
                nr += ar * cr
                dr += ar
            cbf = nb / db - np.float32(0.5)
            crf = nr / dr - np.float32(0.5)
            out_r = yf + np.float32(1.402) * crf
            out_g = yf - np.float32(0.344136) * cbf - np.float32(0.714136) * crf
            out_b = yf + np.float32(1.772) * cbf
            image[oy0 + i, ox0 + j, 0] = min(max(out_r, np.float32(0.0)), np.float32(1.0))
            image[oy0 + i, ox0 + j, 1] = min(max(out_g, np.float32(0.0)), np.float32(1.0))
            image[oy0 + i, ox0 + j, 2] = min(max(out_b, np.float32(0.0)), np.float32(1.0))


@_jit
def _conv_from_one(src, w, c, h, wd, out, bias, theta):
    """out[i, j] = sst(bias + sum_taps w[tap, c] src[i + dy, j + dx], theta) for the h x wd
    interior, src padded (h + 2, wd + 2): one code channel of a 3x3 convolution 1 -> q,
    vectorised along rows."""
    w00, w01, w02 = w[0, c], w[1, c], w[2, c]
    w10, w11, w12 = w[3, c], w[4, c], w[5, c]
    w20, w21, w22 = w[6, c], w[7, c], w[8, c]
    for i in range(h):
        s0, s1, s2 = src[i], src[i + 1], src[i + 2]
        o = out[i + 1]
        for j in range(wd):
            v = (bias + w00 * s0[j] + w01 * s0[j + 1] + w02 * s0[j + 2]
                 + w10 * s1[j] + w11 * s1[j + 1] + w12 * s1[j + 2]
                 + w20 * s2[j] + w21 * s2[j + 1] + w22 * s2[j + 2])
            o[j + 1] = v - min(max(v, -theta), theta)


@_jit
def _fuse_tile(stack, scale, prior, stem_w, stem_b, stem_t, w0, w1, s, b, t, head,
               cy0, cy1, cx0, cx1, oy0, oy1, ox0, ox1, image, weights, want_weights):
    """Fuse one tile: the crop rows cy0:cy1, cols cx0:cx1 of ``stack`` (K, H, W, C) with C = 3
    (RGB) or 1 (grey), values times ``scale`` in [0, 1]; writes the core oy0:oy1, ox0:ox1 (inside
    the crop, by the network's radius where the crop is not at the image's edge) of ``image``
    (H, W, C) and, if ``want_weights``, of ``weights`` (K, H, W).

    Codes are planar (q, h + 2, w + 2) and every 3x3 convolution runs one code channel at a
    time along image rows (vectorised over pixels): measured 2.8x faster here than codes
    channels-last with the channel loop innermost (benchmarks/README.md)."""
    K = stack.shape[0]
    rgb = stack.shape[3] == 3
    q = head.shape[0]
    n_dcu = w0.shape[0]
    h, w = cy1 - cy0, cx1 - cx0
    oh, ow = oy1 - oy0, ox1 - ox0
    ry, rx = oy0 - cy0, ox0 - cx0
    # rows computed in whole vectors: a scalar remainder loop of 9-tap stencils costs as
    # much as the vector part on narrow tiles; the extra columns are never read back
    wv = (w + LANES - 1) // LANES * LANES
    owv = (ow + LANES - 1) // LANES * LANES
    wa = max(wv, rx + owv) + 2
    lum = np.zeros((K, h + 2, wa), np.float32)
    z = np.zeros((q, h + 2, wa), np.float32)
    r = np.zeros((h + 2, wa), np.float32)
    logits = np.empty((K, oh, owv), np.float32)
    for k in range(K):
        yk = lum[k]
        for i in range(h):
            for j in range(w):
                if rgb:
                    yk[i + 1, j + 1] = (
                        np.float32(0.299) * np.float32(stack[k, cy0 + i, cx0 + j, 0])
                        + np.float32(0.587) * np.float32(stack[k, cy0 + i, cx0 + j, 1])
                        + np.float32(0.114) * np.float32(stack[k, cy0 + i, cx0 + j, 2])
                    ) * scale
                else:
                    yk[i + 1, j + 1] = np.float32(stack[k, cy0 + i, cx0 + j, 0]) * scale
        _reflect_border(yk, h, w)
        for c in range(q):
            _conv_from_one(yk, stem_w, c, h, wv, z[c], stem_b[c], stem_t[c])
            _reflect_border(z[c], h, w)
        lk = logits[k]
        lk[:, :] = prior[k]
        for d in range(n_dcu):
            for i in range(h):
                for j in range(wv):
                    r[i + 1, j + 1] = yk[i + 1, j + 1]
            for c in range(q):
                zc = z[c]
                a00, a01, a02 = w0[d, 0, c], w0[d, 1, c], w0[d, 2, c]
                a10, a11, a12 = w0[d, 3, c], w0[d, 4, c], w0[d, 5, c]
                a20, a21, a22 = w0[d, 6, c], w0[d, 7, c], w0[d, 8, c]
                for i in range(h):
                    s0, s1, s2 = zc[i], zc[i + 1], zc[i + 2]
                    ro = r[i + 1]
                    for j in range(wv):
                        ro[j + 1] -= (a00 * s0[j] + a01 * s0[j + 1] + a02 * s0[j + 2]
                                      + a10 * s1[j] + a11 * s1[j + 1] + a12 * s1[j + 2]
                                      + a20 * s2[j] + a21 * s2[j + 1] + a22 * s2[j + 2])
            _reflect_border(r, h, w)
            last = d == n_dcu - 1
            for c in range(q):
                zc = z[c]
                a00, a01, a02 = w1[d, 0, c], w1[d, 1, c], w1[d, 2, c]
                a10, a11, a12 = w1[d, 3, c], w1[d, 4, c], w1[d, 5, c]
                a20, a21, a22 = w1[d, 6, c], w1[d, 7, c], w1[d, 8, c]
                sc, bc, tc, hc = s[d, c], b[d, c], t[d, c], head[c]
                if last:
                    for i in range(oh):
                        s0, s1, s2 = r[ry + i, rx:], r[ry + i + 1, rx:], r[ry + i + 2, rx:]
                        zi = zc[ry + i + 1, rx:]
                        li = lk[i]
                        for j in range(owv):
                            v = (sc * zi[j + 1] + bc
                                 + a00 * s0[j] + a01 * s0[j + 1] + a02 * s0[j + 2]
                                 + a10 * s1[j] + a11 * s1[j + 1] + a12 * s1[j + 2]
                                 + a20 * s2[j] + a21 * s2[j + 1] + a22 * s2[j + 2])
                            li[j] += hc * (v - min(max(v, -tc), tc))
                else:
                    for i in range(h):
                        s0, s1, s2 = r[i], r[i + 1], r[i + 2]
                        zi = zc[i + 1]
                        for j in range(wv):
                            v = (sc * zi[j + 1] + bc
                                 + a00 * s0[j] + a01 * s0[j + 1] + a02 * s0[j + 2]
                                 + a10 * s1[j] + a11 * s1[j + 1] + a12 * s1[j + 2]
                                 + a20 * s2[j] + a21 * s2[j + 1] + a22 * s2[j + 2])
                            zi[j + 1] = v - min(max(v, -tc), tc)
                    _reflect_border(zc, h, w)
    _blend(stack, scale, lum, logits, ry, rx, oy0, oy1, ox0, ox1, image, weights, want_weights)


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

def available(dtype=np.float32, rgb: bool = True) -> bool:
    """Whether the fused kernel runs here for frames of ``dtype`` (grey or ``rgb``): numba
    imports and the kernels compile, or load from numba's cache, for that input (once per
    process; a failure is remembered, its reason in ``failure()``)."""
    global _COMPILE_ERROR
    if numba is None or _COMPILE_ERROR is not None:
        return False
    key = (np.dtype(dtype).str, bool(rgb))
    if key in _compiled:
        return True
    try:
        _compile_for(np.dtype(dtype), rgb)
    except Exception as exc:  # numba's errors have no common public base
        _COMPILE_ERROR = exc
        return False
    _compiled.add(key)
    return True


def failure() -> str:
    """Why ``available()`` is False, in a few words."""
    if numba is None:
        return "numba is not installed"
    return f"{type(_COMPILE_ERROR).__name__}: {_COMPILE_ERROR}"


_compiled: set = set()


def _compile_for(dtype: np.dtype, rgb: bool) -> None:
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
    from concurrent.futures import ThreadPoolExecutor

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
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(run, t) for t in tiles]
            try:
                for f in futures:
                    f.result()
                    if tick is not None:
                        tick()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return (image if rgb else image[..., 0]), (w_out if weights else None)
