"""Fast inference form of the CSC networks, for weights whose soft thresholds are all >= 0.

Why only those: with a negative threshold the soft threshold jumps by 2|theta| at 0, so the
last-bit rounding changes of a folded or reordered computation flip code values (measured
0.03 on TNO); with theta >= 0 it is continuous (1-Lipschitz) and rounding stays rounding.

What the fast form does (pure PyTorch; the engine decides when to use it, ``fast_path_applies``):

* batch norm folded into the convolution before it (scale into the weights, shift into a
  bias) and the residual's scale applied to z in the same expression;
* soft threshold with theta >= 0 as ``v - clamp(v, -theta, theta)``;
* the thin convolutions of one-channel DCUs (q -> 1 dictionary, 1 -> q adjoint, 576
  multiply-adds per pixel each for q = 64) written as nine shifted multiply-adds, so that
  ``torch.compile`` (inductor) makes one loop of each: the dictionary as one reduction over
  channels, the adjoint + residual + batch norm + threshold as one element-wise loop. Each DCU
  then reads its codes twice and writes them once; on cache-sized tiles that stays in cache.
* thick convolutions (IVFN decoder, CSC-MMFN's 256-channel units) stay convolutions
  (oneDNN), with the element-wise work around them fused by inductor.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .csc import DCU, CSCEncoder, SoftThreshold
from .folded import FoldedIVFN, register_folded_decoder
from .ivfn import BLUR_SIZE

# --- the gate -----------------------------------------------------------------------------

def soft_thresholds(net: nn.Module) -> list[torch.Tensor]:
    """The thresholds theta the network applies (clamped where the layer clamps them)."""
    out = []
    for m in net.modules():
        if isinstance(m, SoftThreshold):
            t = m.theta.detach()
            out.append(t.clamp(min=0.0) if m.nonnegative else t)
    return out


def thresholds_nonnegative(net: nn.Module) -> bool:
    """Whether every soft threshold the network applies is >= 0."""
    return all(bool((t >= 0).all()) for t in soft_thresholds(net))


def fast_path_applies(net: nn.Module, exact: bool = False) -> bool:
    """The fast form is used unless ``exact`` is asked or a threshold is negative (the
    authors' IVFN/MEFN weights): those run the exact reference arithmetic."""
    return not exact and thresholds_nonnegative(net)


def with_clamped_thresholds(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every threshold clamped at 0: a stand-in for weights trained
    with nonnegative thresholds (development and tests; its outputs differ from ``net``'s)."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, SoftThreshold):
                m.theta.clamp_(min=0.0)
    return net


# --- folding ------------------------------------------------------------------------------

def _bn_scale_shift(bn: nn.Module, q: int, like: torch.Tensor):
    if not isinstance(bn, nn.BatchNorm2d):
        return like.new_ones(q), like.new_zeros(q)
    s = bn.weight.detach() / torch.sqrt(bn.running_var.detach() + bn.eps)
    return s, bn.bias.detach() - bn.running_mean.detach() * s


def _shrink(v: torch.Tensor, kind: str, param: torch.Tensor) -> torch.Tensor:
    if kind == "prelu":
        return F.prelu(v, param.flatten())  # one pass eager, fused when compiled
    return v - torch.clamp(v, -param, param)


def _act_params(act: nn.Module, q: int) -> tuple[str, torch.Tensor]:
    if isinstance(act, nn.PReLU):
        return "prelu", act.weight.detach().clone().view(1, -1, 1, 1).expand(1, q, 1, 1).clone()
    assert isinstance(act, SoftThreshold)
    theta = act.theta.detach().clamp(min=0.0)  # the gate guarantees theta >= 0 already
    return "sst", theta.expand(1, q, 1, 1).clone()


def _pad(x: torch.Tensor) -> torch.Tensor:
    """Reflection padding by 1 (c b | a b c). Under torch.compile written as concatenations:
    inductor turns F.pad's reflection into index arithmetic that stops its loops from
    vectorising (measured: a DCU 1.8-2.8x slower); eager, F.pad is one pass."""
    if not torch.compiler.is_compiling():
        return F.pad(x, (1, 1, 1, 1), mode="reflect")
    x = torch.cat((x[..., 1:2, :], x, x[..., -2:-1, :]), -2)
    return torch.cat((x[..., 1:2], x, x[..., -2:-1]), -1)


def _taps_to_one(zp: torch.Tensor, w: torch.Tensor, h: int, wd: int) -> torch.Tensor:
    """3x3 convolution q -> 1 of the padded zp [N, q, h+2, w+2] with w [1, q, 3, 3], as nine
    shifted products reduced over channels (one reduction loop under inductor)."""
    acc = None
    for dy in range(3):
        for dx in range(3):
            t = zp[:, :, dy:dy + h, dx:dx + wd] * w[:, :, dy, dx, None, None]
            acc = t if acc is None else acc + t
    return acc.sum(1, keepdim=True)


def _taps_from_one(rp: torch.Tensor, w: torch.Tensor, h: int, wd: int) -> torch.Tensor:
    """3x3 convolution 1 -> q of the padded rp [N, 1, h+2, w+2] with w [q, 1, 3, 3], as nine
    shifted broadcasts (element-wise, fuses with what follows)."""
    acc = None
    for dy in range(3):
        for dx in range(3):
            t = rp[:, :, dy:dy + h, dx:dx + wd] * w[None, :, 0, dy, dx, None, None]
            acc = t if acc is None else acc + t
    return acc


class FastDCU(nn.Module):
    """z_next = f(s (z + W1 * (x - W0 * z)) + b) with s, b folded: f(s z + (s W1) * r + b)."""

    def __init__(self, dcu: DCU, form: str):
        super().__init__()
        w0 = dcu.dictionary.weight.detach()
        w1 = dcu.adjoint.weight.detach()
        q = w1.shape[0]
        s, b = _bn_scale_shift(dcu.norm, q, w1)
        self.register_buffer("w0", w0.clone())
        self.register_buffer("w1", (w1 * s.view(-1, 1, 1, 1)).clone())
        self.register_buffer("s", s.view(1, -1, 1, 1).clone())
        self.register_buffer("b", b.view(1, -1, 1, 1).clone())
        self.kind, param = _act_params(dcu.shrink, q)
        self.register_buffer("act", param)
        # the stencil forms only for one-channel images (thin convolutions)
        thin = w0.shape[0] == 1
        self.stencil_dict = thin and form in ("stencil", "dict-stencil")
        self.stencil = thin and form in ("stencil", "adjoint-stencil")

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if z is None:
            if self.stencil:
                v = _taps_from_one(_pad(x), self.w1, h, w) + self.b
            else:
                v = F.conv2d(_pad(x), self.w1, self.b.flatten())
            return _shrink(v, self.kind, self.act)
        if self.stencil_dict:
            r = x - _taps_to_one(_pad(z), self.w0, h, w)
        else:
            r = x - F.conv2d(_pad(z), self.w0)
        if self.stencil:
            v = z * self.s + self.b + _taps_from_one(_pad(r), self.w1, h, w)
        else:
            v = torch.addcmul(F.conv2d(_pad(r), self.w1, self.b.flatten()), z, self.s)
        return _shrink(v, self.kind, self.act)


class FastEncoder(nn.Module):
    """CSCEncoder in the fast form; same call: forward(x, first_input=None)."""

    def __init__(self, enc: CSCEncoder, form: str = "stencil"):
        super().__init__()
        self.radius = enc.receptive_radius
        self.has_stem = enc.stem is not None
        if self.has_stem:
            w = enc.stem.conv.weight.detach()
            q = w.shape[0]
            s, b = _bn_scale_shift(getattr(enc.stem, "norm", None), q, w)
            self.register_buffer("stem_w", (w * s.view(-1, 1, 1, 1)).clone())
            self.register_buffer("stem_b", b.view(1, -1, 1, 1).clone())
            self.stem_kind, param = _act_params(enc.stem.shrink, q)
            self.register_buffer("stem_act", param)
            self.stem_stencil = form in ("stencil", "adjoint-stencil") and w.shape[1] == 1
        self.dcus = nn.ModuleList(FastDCU(d, form) for d in enc.dcus)

    def forward(self, x: torch.Tensor, first_input: torch.Tensor | None = None) -> torch.Tensor:
        z = None
        if self.has_stem:
            h, w = x.shape[-2:]
            if self.stem_stencil:
                v = _taps_from_one(_pad(x), self.stem_w, h, w) + self.stem_b
            else:
                v = F.conv2d(_pad(x), self.stem_w, self.stem_b.flatten())
            z = _shrink(v, self.stem_kind, self.stem_act)
        for i, dcu in enumerate(self.dcus):
            z = dcu(first_input if (i == 0 and first_input is not None) else x, z)
        return z

    def lean(self, x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        """``forward(x)`` eager, in fewer passes over the codes (for thick codes, CSC-MMFN's
        256 channels): results written in place (no fresh page-faulted allocation per
        operation) and the convolutions' inputs in channels_last (oneDNN's thin 3 <-> 256 and
        31 <-> 256 convolutions ran 1.5-3x faster so, measured). The same arithmetic as
        ``forward`` but for the convolutions' summation order."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        z = None
        if self.has_stem:
            v = F.conv2d(_pad(x).contiguous(memory_format=fmt), self.stem_w,
                         self.stem_b.flatten())
            z = _shrink_(v, self.stem_kind, self.stem_act)
        for d in self.dcus:
            if z is None:
                v = F.conv2d(_pad(x).contiguous(memory_format=fmt), d.w1, d.b.flatten())
            else:
                r = x - reflect_conv(z, d.w0)
                v = F.conv2d(_pad(r).contiguous(memory_format=fmt), d.w1, d.b.flatten())
                v.addcmul_(z, d.s)
                del z
            z = _shrink_(v, d.kind, d.act)
        return z


def reflect_conv(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """3x3 convolution of z with reflection padding 1, without a padded copy of z (a pass over
    thick codes): zero padding inside oneDNN, then the border ring corrected by what the
    reflected rows and columns add (the same sum, in another order)."""
    h, wd = z.shape[-2:]
    out = F.conv2d(z, w, padding=1)
    if h < 2 or wd < 2:
        return F.conv2d(F.pad(z, (1, 1, 1, 1), mode="reflect"), w)
    for row, dst, k in ((1, 0, 0), (h - 2, h - 1, 2)):  # padded row -1 = row 1, row h = h - 2
        line = F.pad(z[..., row:row + 1, :], (1, 1, 0, 0), mode="reflect")
        out[..., dst:dst + 1, :] += F.conv2d(line, w[:, :, k:k + 1, :])
    for col, dst, k in ((1, 0, 0), (wd - 2, wd - 1, 2)):  # columns, rows inside only
        out[..., dst:dst + 1] += F.conv2d(z[..., col:col + 1], w[:, :, :, k:k + 1],
                                          padding=(1, 0))
    return out


def _shrink_(v: torch.Tensor, kind: str, param: torch.Tensor) -> torch.Tensor:
    """``_shrink`` computed into v."""
    if kind == "prelu":
        return _shrink(v, kind, param)
    return v.sub_(torch.clamp(v, -param, param))


# --- whole-task fast forms ----------------------------------------------------------------

class FastMEFN(nn.Module):
    """CSC-MEFN exposure fusion of one crop, colour conversion to blending in one graph:
    ``forward(crop, prior)`` with crop [K, h, w, 3] (RGB) or [K, h, w] (grey), uint8 or
    float, already scaled by ``scale`` (1/255 for uint8) inside, and ``prior`` the (K,)
    exposure-prior logits (zeros without one) -> (image [h, w, 3] or [h, w], weights [K, h, w]).
    Under torch.compile it runs as a few loops per crop, so a cache-sized crop never leaves
    the cache (the uint8 input is read once, the float output written once)."""

    def __init__(self, net, form: str = "conv", scale: float = 1.0):
        super().__init__()
        self.encoder = FastEncoder(net.encoder, form)
        self.register_buffer("head_w", net.head.weight.detach().clone())
        self.radius = self.encoder.radius
        self.scale = float(scale)

    def forward(self, crop: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        x = crop.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        rgb = x.ndim == 4
        if rgb:
            r, g, b = x.unbind(-1)
            y = 0.299 * r + 0.587 * g + 0.114 * b
        else:
            y = x
        # the network in its own dtype (half precision if asked), colour in float32
        z = self.encoder(y[:, None].to(self.head_w.dtype))
        logits = (z * self.head_w.view(1, -1, 1, 1)).sum(1).float() + prior.view(-1, 1, 1)
        w = torch.softmax(logits, dim=0)
        y_f = (w * y).sum(0)
        if not rgb:
            return y_f.clamp(0.0, 1.0), w
        cb = 0.5 - 0.168736 * r - 0.331264 * g + 0.5 * b
        cr = 0.5 + 0.5 * r - 0.418688 * g - 0.081312 * b
        ab = (cb - 0.5).abs() + 1e-8
        ar = (cr - 0.5).abs() + 1e-8
        cb_f = (ab * cb).sum(0) / ab.sum(0)
        cr_f = (ar * cr).sum(0) / ar.sum(0)
        out = torch.stack((y_f + 1.402 * (cr_f - 0.5),
                           y_f - 0.344136 * (cb_f - 0.5) - 0.714136 * (cr_f - 0.5),
                           y_f + 1.772 * (cb_f - 0.5)), -1)
        return out.clamp(0.0, 1.0), w


class FastIVFN(FoldedIVFN):
    """CSC-IVFN for fusion in the fast form: the exact path's FoldedIVFN (its methods, which
    the engine's IVF kernel calls, and its folded decoder) with fast-form encoders, plus
    ``detail_l1``: detail codes and the l1 rule in one graph."""

    def __init__(self, net, form: str = "conv"):
        nn.Module.__init__(self)
        self.base = FastEncoder(net.base, form)
        self.detail = FastEncoder(net.detail, form)
        self.encoder_radius = BLUR_SIZE // 2 + net.base.receptive_radius
        self.n_dec = register_folded_decoder(self, net.decoder)

    def composite_decoder(self) -> tuple[torch.Tensor, float]:
        """The folded decoder as ONE convolution: its layers are affine (convolutions with
        batch norm folded, no activation before the sigmoid), so away from the image border
        ``_dec(z) = conv(z, w) + offset`` with w [q, k, k] (k = 2 n_dec + 1, float32, summed
        in float64: the layers' 3x3 kernels composed) and offset = ``_dec`` of zero codes.
        Within n_dec px of a border the layers' reflection paddings differ from it."""
        p = self.dw0
        q, k = p.shape[1], 2 * self.n_dec + 1
        c = k + 2 * self.n_dec  # impulses far enough from the zero-padded border
        with torch.no_grad():
            y = torch.zeros(q, q, c, c, dtype=torch.float64, device=p.device)
            y[torch.arange(q), torch.arange(q), c // 2, c // 2] = 1.0
            for i in range(self.n_dec):
                y = F.conv2d(y, getattr(self, f"dw{i}").double(), padding=1)
            # the response to an impulse at p is w[p - y] (conv2d correlates): flipped
            lo = c // 2 - k // 2
            w = y[:, 0, lo:lo + k, lo:lo + k].flip(-1, -2).float().contiguous()
            offset = float(self._dec(torch.zeros(1, q, 2, 2, dtype=p.dtype,
                                                 device=p.device))[0, 0, 0, 0])
        return w, offset

    def detail_l1(self, x: torch.Tensor) -> torch.Tensor:
        """Detail codes of S sources [S, 1, h, w] fused by the l1 rule -> [1, q + S, h, w]:
        the fused codes then the weights (the engine's ``fuse_in_pieces`` layout)."""
        return self.l1_of_codes(self.encode_detail(x))

    @staticmethod
    def l1_of_codes(z: torch.Tensor) -> torch.Tensor:
        """``detail_l1`` of the detail codes z [S, q, h, w] themselves."""
        act = z.abs().sum(1, keepdim=True)
        activity = F.avg_pool2d(act, 3, stride=1, padding=1, count_include_pad=True)
        total = activity.sum(0, keepdim=True)
        w = torch.where(total > 0, activity / total.clamp_min(torch.finfo(z.dtype).tiny),
                        torch.full_like(activity, 1.0 / z.shape[0]))
        return torch.cat(((w * z).sum(0), w[:, 0]))[None]


class FastMMFN(nn.Module):
    """CSC-MMFN's encoders and decoder in the fast form (its thresholds are clamped at >= 0 by
    design, so the fast path always applies): the pieces the engine calls (``guide_encoder``,
    ``lr_encoder``, ``decode_codes``); the guided filter between them stays the model's."""

    def __init__(self, net, form: str = "conv"):
        super().__init__()
        self.lr_encoder = FastEncoder(net.lr_encoder, form)
        self.guide_encoder = FastEncoder(net.guide_encoder, form)
        self.register_buffer("dec_w", net.decoder.weight.detach().clone())
        self.radius_, self.eps = net.radius, net.eps

    def decode_codes(self, z: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.conv2d(_pad(z), self.dec_w)
        return reflect_conv(z, self.dec_w)
