"""An independent, functional re-statement of the authors' three networks, written from
shared/docs/csc-networks.md against their raw state-dict key names (no code shared with the
package). Tests compare the package's modules against it; it is deliberately plain and slow.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def _conv(x, w, pad_mode="reflect"):
    p = (w.shape[-1] - 1) // 2
    if p:
        x = F.pad(x, (p, p, p, p), mode=pad_mode)
    return F.conv2d(x, w)


def _bn(x, sd, p, eps=1e-5):
    # The same kernel as the authors' nn.BatchNorm2d in eval mode: with negative soft
    # thresholds, rounding differences flip signs near 0 and are amplified downstream.
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"],
                        sd[p + "bias"], False, 0.0, eps)


def _sst(x, theta, clamp=False):
    if clamp:
        theta = torch.clamp(theta, min=0.0)
    return torch.sign(x) * torch.relu(torch.abs(x) - theta)


def _prelu(x, a):
    return F.prelu(x, a)


def _dcu(sd, p, data, code, act, clamp=False):
    """The authors' DictConv2dBlock: BN(code + enc(data - dec(code))) then activation."""
    dec_w = sd[p + "conv.conv_decoder.de_conv0.conv2d.weight"]
    enc_w = sd[p + "conv.conv_encoder.en_conv0.conv2d.weight"]
    if code is None:
        code = torch.zeros(data.shape[0], enc_w.shape[0], *data.shape[-2:])
    code = code + _conv(data - _conv(code, dec_w), enc_w)
    code = _bn(code, sd, p + "norm.")
    if act == "prelu":
        return _prelu(code, sd[p + "activation.weight"])
    return _sst(code, sd[p + "activation.theta"], clamp)


# --- MEFN -------------------------------------------------------------------------------

def mefn_weight_logit(sd, y):
    z = _conv(y, sd["main.0.conv2d.weight"])
    z = _sst(_bn(z, sd, "main.1."), sd["main.2.theta"])
    z = _dcu(sd, "main.3.", y, z, "sst")
    z = _dcu(sd, "main.4.", y, z, "sst")
    return F.conv2d(z, sd["main.5.conv2d.weight"])


def mefn_fuse_rgb(sd, stack):
    """stack: [K,3,H,W] in [0,1] -> [3,H,W] (the network output the authors clamp)."""
    r, g, b = stack[:, 0:1], stack[:, 1:2], stack[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 0.5 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 + 0.5 * r - 0.418688 * g - 0.081312 * b
    w = torch.softmax(torch.cat([mefn_weight_logit(sd, y[k:k + 1])
                                 for k in range(stack.shape[0])], 0), dim=0)
    yf = (w * y).sum(0)
    wb = (torch.abs(cb - 0.5) + 1e-8) / torch.sum(torch.abs(cb - 0.5) + 1e-8, 0, keepdim=True)
    wr = (torch.abs(cr - 0.5) + 1e-8) / torch.sum(torch.abs(cr - 0.5) + 1e-8, 0, keepdim=True)
    cbf, crf = (wb * cb).sum(0), (wr * cr).sum(0)
    out = torch.cat([yf + 1.402 * (crf - 0.5),
                     yf - 0.344136 * (cbf - 0.5) - 0.714136 * (crf - 0.5),
                     yf + 1.772 * (cbf - 0.5)], 0)
    return torch.clamp(out, 0.0, 1.0)


# --- IVFN -------------------------------------------------------------------------------

def _box11(x):
    k = torch.ones(1, 1, 11, 11) / 121.0
    return F.conv2d(F.pad(x, (5, 5, 5, 5), mode="reflect"), k)


def ivfn_encode(sd, x, kind):
    act = "prelu" if kind == "base" else "sst"
    first = _box11(x) if kind == "base" else x - _box11(x)
    z = _dcu(sd, "convLayer0.", first, None, act)
    i = 0
    while f"convLayer.{i}.norm.weight" in sd:
        z = _dcu(sd, f"convLayer.{i}.", x, z, act)
        i += 1
    return z


def ivfn_decode_one(sd, z):
    z = _bn(_conv(z, sd["decode_last.1.weight"]), sd, "decode_last.2.")
    z = _bn(_conv(z, sd["decode_last.4.weight"]), sd, "decode_last.5.")
    return _bn(_conv(z, sd["decode_last.7.weight"]), sd, "decode_last.8.")


def l1_fuse(zs):
    k = torch.ones(1, 1, 3, 3) / 9.0
    acts = [F.conv2d(z.abs().sum(1, keepdim=True), k, padding=1) for z in zs]
    tot = sum(acts)
    return sum(a / tot * z for a, z in zip(acts, zs, strict=True))


def saliency_fuse(zs):
    """Per channel, in numpy as the authors did: min-max, truncate to 0..255, histogram
    saliency, normalise, OpenCV-contrib guided filter (r=45, eps=0.01), normalise."""
    grid = np.arange(256, dtype=np.float64)
    dist = np.abs(grid[:, None] - grid[None, :])
    out = torch.zeros_like(zs[0])
    for c in range(zs[0].shape[1]):
        maps = [z[0, c].numpy() for z in zs]
        norms = [(m - m.min()) / (m.max() - m.min()) for m in maps]
        sal = []
        for n in norms:
            q = (n * 255).astype(np.int64)
            hist = np.bincount(q.ravel(), minlength=256) / q.size
            sal.append((hist @ dist)[q])
        w = np.dstack(sal) + 1e-12
        w = w / w.sum(2, keepdims=True)
        w = np.dstack([cv2.ximgproc.guidedFilter(n.astype(np.float32),
                                                 w[..., s].astype(np.float32), 45, 0.01)
                       for s, n in enumerate(norms)]) + 1e-12
        w = w / w.sum(2, keepdims=True)
        for s, z in enumerate(zs):
            out[0, c] += torch.from_numpy(w[..., s].astype(np.float32)) * z[0, c]
    return out


def ivfn_fuse(parts, ir, vis, base_rule="saliency"):
    """parts: dict base/detail/decoder state dicts; ir, vis: [1,1,H,W] in [0,1]."""
    zb = [ivfn_encode(parts["base"], x, "base") for x in (ir, vis)]
    zd = [ivfn_encode(parts["detail"], x, "detail") for x in (ir, vis)]
    fb = saliency_fuse(zb) if base_rule == "saliency" else l1_fuse(zb)
    fd = l1_fuse(zd)
    dec = parts["decoder"]
    return torch.sigmoid(ivfn_decode_one(dec, 2 * fb) + ivfn_decode_one(dec, 2 * fd))


# --- MMFN -------------------------------------------------------------------------------

def _mmfn_backbone(sd, p, x):
    z = _sst(_conv(x, sd[p + "conv0.weight"]), sd[p + "relu0.theta"], clamp=True)
    i = 1
    while f"{p}csc{i}.norm.weight" in sd:
        z = _dcu(sd, f"{p}csc{i}.", x, z, "sst", clamp=True)
        i += 1
    return z


def _boxsum_conv(x, r):
    """Window sums clipped at the border, by cumulative sums along H then W, as the authors'
    fast guided filter computes them (E[xy] - E[x]E[y] cancels, so the summation order
    shows in the result): zero-pad, cumsum, difference of shifted cumsums."""
    for dim in (2, 3):
        n = x.shape[dim]
        pad = [0, 0, 0, 0]
        pad[2 * (3 - dim) + 1] = r
        c = F.pad(x, pad).cumsum(dim)  # c[i] = sum of x[0..i] (padded tail repeats the total)
        hi = c.narrow(dim, r, n)  # sums up to i + r
        lo = torch.cat([torch.zeros_like(c.narrow(dim, 0, r + 1)),
                        c.narrow(dim, 0, n - r - 1)], dim)  # sums up to i - r - 1
        x = hi - lo
    return x


def mmfn_forward(sd, lr, guide, r=1, eps=1e-4):
    zg = _mmfn_backbone(sd, "backbone_guide.", guide)
    zl = _mmfn_backbone(sd, "backbone_lr.", lr)
    h, w = lr.shape[-2:]
    H, W = guide.shape[-2:]
    up = lambda t, s: F.interpolate(t, s, mode="bilinear", align_corners=True)  # noqa: E731
    x = up(zg, (h, w))
    n = _boxsum_conv(torch.ones(1, 1, h, w, dtype=x.dtype), r)
    mx, my = _boxsum_conv(x, r) / n, _boxsum_conv(zl, r) / n
    cov = _boxsum_conv(x * zl, r) / n - mx * my
    var = _boxsum_conv(x * x, r) / n - mx * mx
    a = cov / (var + eps)
    b = my - a * mx
    zf = up(a, (H, W)) * zg + up(b, (H, W))
    return _conv(zf, sd["decoder.conv0.weight"]) + up(lr, (H, W))
