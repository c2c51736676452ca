"""Inference copies of the CSC networks (``folded``): batch norm folded into the convolutions
where that is exact enough (scale into the weights, shift into a bias; the residual scale becomes
one ``addcmul``), a two-pass soft threshold, and optional ``torch.compile``. They mirror
csc.py / ivfn.py / mefn.py / mmfn.py operation for operation; the engine's kernels run them.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .csc import DCU, CSCEncoder, SoftThreshold, reflect_pad
from .ivfn import BLUR_SIZE, IVF_ALPHA, box_blur


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


def register_folded_decoder(module: nn.Module, decoder: nn.Module) -> int:
    """Register the IVFN decoder's convolutions with batch norm folded (weights dw{i}, biases
    db{i}) and the authors' code scale IVF_ALPHA folded into the first, on ``module``;
    returns how many."""
    convs = [m for m in decoder.layers if isinstance(m, nn.Conv2d)]
    bns = [m for m in decoder.layers if isinstance(m, nn.BatchNorm2d)]
    for i, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
        s, t = _bn_scale_shift(bn)
        w = conv.weight.detach() * s.view(-1, 1, 1, 1)
        module.register_buffer(f"dw{i}", (w * IVF_ALPHA if i == 0 else w).clone())
        module.register_buffer(f"db{i}", t.clone())
    return len(convs)


class FoldedIVFN(nn.Module):
    """CSC-IVFN for fusion: encoders and the affine decoder with BN folded and the authors'
    code scale (x2, exact in binary floating point) folded into the decoder's first conv."""

    def __init__(self, net):
        super().__init__()
        self.base = FoldedEncoder(net.base)
        self.detail = FoldedEncoder(net.detail)
        self.encoder_radius = BLUR_SIZE // 2 + net.base.receptive_radius
        self.n_dec = register_folded_decoder(self, net.decoder)

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
        self.geometry = net.geometry

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

