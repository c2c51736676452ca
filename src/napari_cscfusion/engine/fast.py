"""The engine side of the fast path (models/fastpath.py): which runs take it, the compiled
copies of the networks (one per network and device, with an eager fallback), and crops of
one fixed shape, so that a compiled graph is built once per run rather than per tile shape.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch
from torch import nn

from ..models import fastpath
from . import dcu_kernel, notices
from .device import module_on_cpu

_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def use_fast_path(net: nn.Module, exact: bool) -> bool:
    """The fast form unless ``exact`` or a soft threshold is negative (see fastpath)."""
    return fastpath.fast_path_applies(net, exact)


def run_path(model, exact: bool) -> str:
    """"fast" or "exact": the path a run of ``model`` (a FusionModel) takes (metadata)."""
    return "fast" if use_fast_path(model.network, exact) else "exact"


# Where compile=None compiles the fast path, measured on the shared 2-core CPU
# (benchmarks/README.md, issue 18). Nowhere on a CPU: CSC-IVFN's compiled encoders were no
# faster than the exact folded ones on its pieces; CSC-MMFN compiled came out 1.2e-3 from the
# exact path on a FLIR crop (the guided filter, eps 1e-4 on code variances, amplified
# rounding; its statistics are float64 since, compiled MMF not re-measured); CSC-MEFN's
# compiled crop pipeline was not measured to the end, and its first call compiles for
# minutes on a busy machine. (The CPU fast paths of IVF and MEF run numba kernels instead:
# FastIVF, engine/mef_cpu.py.) On a GPU: unmeasured.
AUTO_COMPILE = {"ivf": {"cpu": False, "gpu": True}, "mef": {"cpu": False, "gpu": True},
                "mmf": {"cpu": False, "gpu": False}}


def auto_compile(task: str, fast: bool, device: torch.device) -> bool:
    """Whether a run with ``compile=None`` compiles: the fast path only, where AUTO_COMPILE
    says (GPU entries unmeasured: no GPU was at hand)."""
    if not fast:
        return False
    return AUTO_COMPILE[task]["cpu" if device.type == "cpu" else "gpu"]


class Compiled:
    """``torch.compile`` (inductor, weights frozen into the graph) of a callable, falling back
    to the eager call with a notice when compilation fails (no C++ compiler, an unsupported
    platform): the fast form is still exact to the tolerance, only slower."""

    def __init__(self, fn, dynamic: bool | None = None):
        self.eager = fn
        self.fn = torch.compile(fn, dynamic=dynamic, options={"freezing": True})
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.fn(*args)
            except Exception as exc:  # inductor/dynamo errors have no common public base
                if notices.is_oom(exc):
                    raise
                self.failed = True
                notices.notify(f"torch.compile failed ({type(exc).__name__}); the fast path "
                               f"runs uncompiled (slower)")
        return self.eager(*args)


def _wrap(compile: bool):
    return Compiled if compile else (lambda fn: fn)


class FastIVF:
    """The IVF kernel's network in the fast form: the methods IVFKernel calls on its folded
    network, each compiled (``compile``), plus ``detail_l1`` (detail codes + l1 rule).

    On the CPU in float32 and uncompiled, the encoders run the fused DCU-chain kernel
    (engine/dcu_kernel.py, numba; ``form`` "kernel") and the decoder its composition into one
    convolution (``_composite_decode``); where the kernels are unavailable, the PyTorch fast
    form (``form`` "torch", ``fallback`` says why)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype | None, compile: bool):
        f = _prepared(fastpath.FastIVFN(net), net, dtype)
        wrap = _wrap(compile)
        self.encoder_radius = f.encoder_radius
        self.form, self.fallback = "torch", None
        if not compile and dtype is None and next(net.parameters()).device.type == "cpu":
            if dcu_kernel.available():
                self.form = "kernel"
            else:
                self.fallback = (f"{dcu_kernel.unavailable_reason()}: the fast path ran its "
                                 f"PyTorch form (slower)")
        if self.form == "kernel":
            base = dcu_kernel.DCUChain.from_fast_encoder(f.base)
            detail = dcu_kernel.DCUChain.from_fast_encoder(f.detail)
            self.encode_base = lambda x: torch.from_numpy(_chain_codes(base, x, True))
            # channel-blocked for the saliency kernel (dcu_kernel.saliency_fuse)
            self.encode_base_blocked = lambda x: torch.from_numpy(
                _chain_codes(base, x, True, blocked=True))
            self.encode_detail = lambda x: torch.from_numpy(_chain_codes(detail, x, False))
            self.detail_l1 = lambda x: torch.from_numpy(
                dcu_kernel.l1_fuse(*_chain_codes(detail, x, False, l1=True)))[None]
            self.decode_sum = _composite_decode(f)
        else:
            self.encode_base = wrap(f.encode_base)
            self.encode_detail = wrap(f.encode_detail)
            self.detail_l1 = wrap(f.detail_l1)
            self.decode_sum = wrap(f.decode_sum)

    def decode(self, fused_base, fused_detail, scale=None):
        return self.decode_sum(fused_base + fused_detail, scale)


def _composite_decode(f):
    """FastIVFN's ``decode_sum`` (z [1, q, h, w] -> image [1, 1, h, w]) on the CPU: its affine
    decoder as one 7x7 convolution in the interior (numba, a seventh of the multiply-adds:
    FastIVFN.composite_decoder), the layers themselves on 9 px strips along the four edges,
    where their reflection paddings differ (benchmarks/README.md, issue 18). Other decoder
    depths: the layers, channels-last (measured 1.2-2x faster than NCHW there)."""
    if f.n_dec != 3:
        return lambda z, scale=None: f.decode_sum(
            z.contiguous(memory_format=torch.channels_last), scale)
    w, offset = f.composite_decoder()
    w = w.numpy()
    edge = 9  # a strip's 3 px at the edge are as in the whole map (the layers' context: 3 px)

    def decode_sum(z: torch.Tensor, scale=None) -> torch.Tensor:
        if scale is not None:
            z.mul_(scale)
        h, wd = z.shape[-2:]
        if min(h, wd) < 2 * edge or z.shape[0] != 1:
            return f.decode_sum(z)
        out = torch.from_numpy(dcu_kernel.conv7_interior(z[0].numpy(), w))
        out += offset  # = the layers' _dec(z) in the interior
        # opposite strips as one batch of one shape (oneDNN prepares each new shape anew)
        rows = f._dec(torch.cat((z[..., :edge, :], z[..., h - edge:, :])).contiguous(
            memory_format=torch.channels_last))[:, 0]
        out[:3], out[h - 3:] = rows[0, :3], rows[1, edge - 3:]
        cols = f._dec(torch.cat((z[..., :edge], z[..., wd - edge:])).contiguous(
            memory_format=torch.channels_last))[:, 0]
        out[:, :3], out[:, wd - 3:] = cols[0, :, :3], cols[1, :, edge - 3:]
        return torch.sigmoid(out.add_(offset))[None, None]

    return decode_sum


def _chain_codes(chain, x: torch.Tensor, low_pass: bool, l1: bool = False,
                 blocked: bool = False):
    """CSC-IVFN encoder codes [S, q, h, w] of x [S, 1, h, w] (CPU, float32) by the DCU kernel
    (numpy; with ``l1`` also their sum_c |z| [S, h, w]; ``blocked``: channel-blocked, see
    dcu_kernel.encode_chain): the first DCU gets the 11x11 box mean (base) or x minus it
    (detail), later ones x."""
    from ..models.ivfn import BLUR_SIZE

    xn = np.ascontiguousarray(x[:, 0].numpy())
    low = dcu_kernel.box_mean(xn, BLUR_SIZE // 2)
    return dcu_kernel.encode_chain(chain, xn, low if low_pass else xn - low, l1=l1,
                                   blocked=blocked)


class FastMEF:
    """CSC-MEFN's whole crop pipeline (colour conversion to blending) in the fast form:
    ``(crop, prior) -> (image, weights)``, see fastpath.FastMEFN; ``scale`` maps the crop's
    values to [0, 1] (1/255 for uint8)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype | None, compile: bool,
                 scale: float = 1.0):
        self.module = _prepared(fastpath.FastMEFN(net, scale=scale), net, dtype)
        self.radius = self.module.radius
        self.run = _wrap(compile)(self.module)


class FastMMF:
    """CSC-MMFN in the fast form: what MMFKernel calls on its folded network (encoders and
    decoder; compiled, or uncompiled in the encoders' ``lean`` form). The guided filter
    between them is the kernel's (float64 statistics: engine/mmf.py)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype | None, compile: bool):
        f = _prepared(fastpath.FastMMFN(net), net, dtype)
        wrap = _wrap(compile)
        self.radius_, self.eps = f.radius_, f.eps
        self.lr_radius, self.guide_radius = f.lr_encoder.radius, f.guide_encoder.radius
        self.lr_encoder = wrap(f.lr_encoder) if compile else f.lr_encoder.lean
        self.guide_encoder = wrap(f.guide_encoder) if compile else f.guide_encoder.lean
        self.decode_codes = wrap(f.decode_codes)


def _prepared(f: nn.Module, net: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    p = next(net.parameters())
    f = f.to(p.device).eval()
    return f.to(dtype) if dtype is not None else f


_FAST = {"ivf": FastIVF, "mef": FastMEF, "mmf": FastMMF}


def fast_network(task: str, net: nn.Module, dtype: torch.dtype | None = None,
                 compile: bool = True, **kw):
    """The fast form of ``net`` for ``task`` (FastIVF, FastMEF or FastMMF), cached per
    network (weights version), device, dtype, compile flag and options: its compiled graphs
    are reused by later runs of the session."""
    p = next(net.parameters())
    key = (task, str(p.device), dtype, bool(compile), p.data_ptr(), p._version,
           tuple(sorted(kw.items())))
    with _lock:
        per_net = _cache.setdefault(net, {})
        if key not in per_net:
            with torch.no_grad():
                form = _FAST[task](net, dtype, compile, **kw)
            form.source = (task, net, dtype, kw)  # for fast_on_cpu
            per_net[key] = form
        return per_net[key]


def fast_on_cpu(form):
    """The fast form ``form`` (from fast_network) built again, uncompiled, from its network
    copied to the CPU: the GPU out-of-memory fallback of lazy tasks (engine/lazy.py)."""
    task, net, dtype, kw = form.source
    return fast_network(task, module_on_cpu(net), dtype, compile=False, **kw)
