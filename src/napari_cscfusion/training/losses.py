"""Training losses (torch): the IVFN autoencoder loss, the MEFN unsupervised MEF-SSIM loss and
the MMFN reconstruction loss, plus a batched CSC-MEFN fusion that keeps gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.color import fuse_chroma, rgb_to_ycbcr, ycbcr_to_rgb

SSIM_WEIGHT = 5.0  # the authors' IVFN loss: MSE + 5 * (1 - SSIM) / 2


def gaussian_window(size: int, sigma: float, channels: int = 1,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """A normalised 2-D Gaussian [channels,1,size,size] for depthwise convolution."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).to(device=device, dtype=dtype)
    return w.expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 3, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of [N,C,H,W] images with a Gaussian window (zero padding, as the widely used
    ``pytorch_ssim`` the authors trained with)."""
    c = x.shape[1]
    w = gaussian_window(window_size, sigma, c, x.device, x.dtype)
    pad = window_size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, padding=pad, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean()


def ivf_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE + 5 · (1 − SSIM₃ₓ₃) / 2 (the authors' autoencoder loss)."""
    return F.mse_loss(recon, target) + SSIM_WEIGHT * (1.0 - ssim(recon, target, 3)) / 2.0


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    mse = F.mse_loss(x.double(), y.double()).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def mefn_fuse_batch(net, stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSC-MEFN fusion of a batch of brackets [N,K,3,H,W] in [0,1], differentiable.

    Returns (fused RGB [N,3,H,W] clamped to [0,1], fused luminance [N,1,H,W]); the same
    computation as ``CSCMEFN.forward`` for each bracket (with the network's exposure prior).
    """
    ycc = rgb_to_ycbcr(stack, dim=2)  # [N,K,3,H,W]
    y = ycc[:, :, :1]
    weights = torch.softmax(net.weight_logits(y), dim=1)
    y_f = (weights * y[:, :, 0]).sum(1)  # [N,H,W]
    cb = fuse_chroma(ycc[:, :, 1], dim=1)
    cr = fuse_chroma(ycc[:, :, 2], dim=1)
    fused = ycbcr_to_rgb(torch.stack((y_f, cb, cr), 1), dim=1).clamp(0.0, 1.0)
    return fused, y_f[:, None]


def halo_term(y: torch.Tensor) -> torch.Tensor:
    """mean |∇Y| (the authors' optional halo/smoothness term)."""
    return ((y[..., 1:, :] - y[..., :-1, :]).abs().mean()
            + (y[..., :, 1:] - y[..., :, :-1]).abs().mean())


# Local means the tone term compares: a Gaussian of this sigma (px), window 4 sigma + 1.
TONE_SIGMA = 3.0


def ivf_tone_term(recon: torch.Tensor, target: torch.Tensor,
                  sigma: float = TONE_SIGMA) -> torch.Tensor:
    """mean |blur(recon) - blur(target)|: the local mean tone kept. The SSIM term hardly sees a
    few grey levels of offset in bright areas and the L1 on the codes pulls every tone towards
    what zero codes decode to (measured: the sparse files decode TNO mid-tones 2-6 grey levels
    dark, the cause of their clipped self-fusion PSNR). Reflection padding: borders have no
    made-up black."""
    size = int(4 * sigma) | 1
    w = gaussian_window(size, sigma, recon.shape[1], recon.device, recon.dtype)
    pad = size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), w, groups=t.shape[1])

    return (blur(recon) - blur(target)).abs().mean()


def mef_loss(net, stack: torch.Tensor, halo_weight: float = 0.0) -> torch.Tensor:
    """−MEF-SSIM(fused, stack) (+ halo_weight · mean|∇Y_F|)."""
    from ..metrics import mef_ssim_torch  # written alongside; imported when MEF is trained

    fused, y_f = mefn_fuse_batch(net, stack)
    score = mef_ssim_torch(stack, fused)
    loss = -score.mean()
    if halo_weight:
        loss = loss + halo_weight * halo_term(y_f)
    return loss


def mmf_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


# --- second-generation terms (issue 17): sparse codes, black stays black -----------------

BLACK_LEVEL = 0.5 / 255  # default hinge of the black term (half a grey level; --black-target)
# Code gains the black term checks: 1 (medical, a source fused with itself) and up. Below 1
# the code gain stretches contrast towards the pivot 2 dec(0) (mid-grey for the authors' look
# at gain 2): holding black there needs codes of black so strong that they dominate every
# averaged code (measured with gains down to 0.1: flat 5 % grey decoded to -19.6 logits and
# fused MRI/PET came out as the PET alone), so gains below 1 are not constrained.
BLACK_GAINS = (1.0, 2.0, 4.0)


def ivf_black_term(net, size: int = 24, level: float = BLACK_LEVEL) -> torch.Tensor:
    """How far two all-black sources fused at code gain g decode above ``level`` (a grey
    level in [0, 1], default ``BLACK_LEVEL``), in logits, for g in ``BLACK_GAINS`` (mean
    hinge). The decoded logit of black is affine in g:
    g * L(z_black) + 2 dec(0), so it holds for every g >= 1 once it holds at 1 with
    L(z_black) < 0. The pivot 2 dec(0), around which the code gain stretches the contrast of
    every image (the look of the authors' gain 2), is detached: this term moves the codes of
    black, not the pivot."""
    p = next(net.parameters())
    z_b, z_d = net.encode(torch.zeros(1, 1, size, size, device=p.device, dtype=p.dtype))
    if not 0.0 < level < 1.0:
        raise ValueError(f"ivf_black_term: level must be a grey level in (0, 1), got {level!r}")
    limit = math.log(level / (1.0 - level))
    offset = net.decoder.offset().detach()
    slope = net.decoder(z_b + z_d) - offset  # L(z_black): the decoder without its constant
    terms = [F.relu(g * slope + 2.0 * offset - limit).mean() for g in BLACK_GAINS]
    return torch.stack(terms).mean()


def code_l1(codes: torch.Tensor) -> torch.Tensor:
    """Sparsity term: mean absolute code value (with nonnegative soft thresholds it drives
    codes to exact zeros)."""
    return codes.abs().mean()


# Flat levels the flat-fidelity term checks: dark greys (where the black term alone pulled
# 5 % grey down to ~1 grey level, crushing dark scenes at the default gain 2), mid-tones and
# near-white, each a flat image that must decode to itself at code gain 1.
FLAT_LEVELS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98)
WHITE_LEVEL = 1.0 - 0.5 / 255  # what an all-white (saturated) input must decode to at least


def ivf_flat_term(net, size: int = 16) -> torch.Tensor:
    """How far flat images of ``FLAT_LEVELS`` decode from themselves at code gain 1, as the
    mean squared error in logits (errors of dark and bright levels count as much as those of
    mid-grey), plus the hinge of an all-white image below ``WHITE_LEVEL`` (saturated stays
    saturated). Logits: the decoder's output before the sigmoid, so a level never saturates
    the gradient. Reflection padding keeps a flat input flat through every layer, so a small
    image is the whole plane."""
    p = next(net.parameters())
    levels = torch.tensor((*FLAT_LEVELS, 1.0), device=p.device, dtype=p.dtype)
    x = levels[:, None, None, None].expand(-1, 1, size, size)
    z_b, z_d = net.encode(x)
    logits = (net.decoder(z_b + z_d) + net.decoder.offset()).mean((1, 2, 3))
    target = torch.logit(levels[:-1])
    fidelity = ((logits[:-1] - target) ** 2).mean()
    white = F.relu(math.log(WHITE_LEVEL / (1.0 - WHITE_LEVEL)) - logits[-1])
    return fidelity + white
