"""Fusion rules acting on the sparse codes of S registered sources.

Each rule takes codes [S, q, H, W] and returns (fused codes [q, H, W], weights). The
two-source rules of CSC-IVFN are written for any S >= 2 (weights normalised over sources).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

RULES = ("saliency", "l1", "average")
SALIENCY_RADIUS = 45  # guided-filter refinement of the saliency weights (authors' r1)
SALIENCY_EPS = 0.01  # guided-filter regulariser (authors' eps1)


def average_rule(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = z.shape[0]
    w = z.new_full((s, 1, *z.shape[-2:]), 1.0 / s)
    return z.mean(0), w


def l1_attention_weights(z: torch.Tensor) -> torch.Tensor:
    """A_s = 3x3 mean (zero border) of sum_c |z_s|; w_s = A_s / sum_s A_s -> [S,1,H,W]."""
    # a 1/9 kernel convolution rather than avg_pool: the authors' arithmetic, bit for bit
    activity = F.conv2d(z.abs().sum(1, keepdim=True), z.new_full((1, 1, 3, 3), 1.0 / 9),
                        padding=1)
    total = activity.sum(0, keepdim=True)
    # Where every source is silent (0/0) fall back to equal weights instead of NaN.
    return torch.where(total > 0, activity / total.clamp_min(torch.finfo(z.dtype).tiny),
                       torch.full_like(activity, 1.0 / z.shape[0]))


def l1_rule(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = l1_attention_weights(z)
    return (w * z).sum(0), w


def symmetric_index(n: int, pad: int, device=None) -> torch.Tensor:
    """Indices of a length-n axis padded by ``pad`` with edge-repeating reflection
    (d c b a | a b c d ... — OpenCV BORDER_REFLECT, scipy 'reflect'), valid for pad > n."""
    i = np.arange(-pad, n + pad) % (2 * n)
    return torch.from_numpy(np.where(i < n, i, 2 * n - 1 - i)).to(device)


def box_mean_reflect(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over (2r+1)^2 windows with BORDER_REFLECT borders, on [..., H, W], via cumsums.

    Written by hand because no torch/kornia border mode repeats the edge pixel and OpenCV's
    guided filter (which the authors used) does.
    """
    k = 2 * r + 1
    for dim in (-2, -1):
        n = x.shape[dim]
        x = x.index_select(dim, symmetric_index(n, r, x.device))
        c = F.pad(x.cumsum(dim).movedim(dim, -1), (1, 0)).movedim(-1, dim)
        x = (c.narrow(dim, k, n) - c.narrow(dim, 0, n)) / k
    return x


def guided_filter(guide: torch.Tensor, src: torch.Tensor, r: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter (grey guide), channel-wise on [..., H, W]."""
    mean_i = box_mean_reflect(guide, r)
    mean_p = box_mean_reflect(src, r)
    cov_ip = box_mean_reflect(guide * src, r) - mean_i * mean_p
    var_i = box_mean_reflect(guide * guide, r) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_mean_reflect(a, r) * guide + box_mean_reflect(b, r)


def saliency_normalise(z: torch.Tensor) -> torch.Tensor:
    """Per source and channel min-max to [0,1] (float32 as the authors' numpy code); a
    constant map becomes 0."""
    z = z.float()
    lo = z.amin(dim=(-2, -1), keepdim=True)
    hi = z.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (z - lo) / torch.where(span > 0, span, 1.0),
                       torch.zeros_like(z))


def histogram_saliency(levels: torch.Tensor) -> torch.Tensor:
    """Global-contrast saliency of integer maps [..., H, W] with values 0..255:
    sal(p) = sum_j hist(j) |q(p) - j| with hist the normalised histogram of each map."""
    flat = levels.flatten(-2)
    hist = torch.zeros(*flat.shape[:-1], 256, dtype=torch.float64, device=levels.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.float64))
    hist /= flat.shape[-1]
    grid = torch.arange(256, dtype=torch.float64, device=levels.device)
    table = hist @ (grid[:, None] - grid[None, :]).abs()
    return table.gather(-1, flat).reshape(levels.shape)


def saliency_weights(z: torch.Tensor, radius: int = SALIENCY_RADIUS,
                     eps: float = SALIENCY_EPS) -> torch.Tensor:
    """The authors' base-code rule: histogram saliency per channel, refined by a guided filter
    whose guide is the normalised map. Returns weights [S, q, H, W] summing to 1 over S.
    Computed in float64 (the authors' numpy path) except on MPS, which has no float64.
    """
    work = torch.float32 if z.device.type == "mps" else torch.float64
    n = saliency_normalise(z)
    levels = (n * 255).floor().long().clamp_(0, 255)
    w = histogram_saliency(levels).to(work) + 1e-12
    w = w / w.sum(0, keepdim=True)
    w = guided_filter(n.to(work), w, radius, eps) + 1e-12
    w = w / w.sum(0, keepdim=True)
    return w.to(z.dtype)


def saliency_rule(z: torch.Tensor, channel_chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    # Channels are independent: chunk them so the float64 filter buffers stay small.
    w = torch.cat([saliency_weights(z[:, c:c + channel_chunk])
                   for c in range(0, z.shape[1], channel_chunk)], 1)
    return (w * z).sum(0), w


def apply_rule(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "saliency":
        return saliency_rule(z)
    if name == "l1":
        return l1_rule(z)
    if name == "average":
        return average_rule(z)
    raise ValueError(f"fusion rule must be one of {RULES}, got {name!r}")
