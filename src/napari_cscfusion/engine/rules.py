"""Fusion rules acting on the sparse codes of S registered sources.

Each rule takes codes [S, q, H, W] and returns (fused codes [q, H, W], weights). The
two-source rules of CSC-IVFN are written for any S >= 2 (weights normalised over sources).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def saliency_normalise(z: torch.Tensor, lo: torch.Tensor | None = None,
                       hi: torch.Tensor | None = None) -> torch.Tensor:
    """Per source and channel min-max to [0,1] (float32 as the authors' numpy code); a
    constant map becomes 0. ``lo``/``hi`` ([S, q, 1, 1]) are the whole image's extremes when
    ``z`` is only a tile of it (values of a tile's halo may fall outside [0,1]: they are
    discarded by the caller)."""
    z = z.float()
    if lo is None:
        lo = z.amin(dim=(-2, -1), keepdim=True)
    if hi is None:
        hi = z.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (z - lo) / torch.where(span > 0, span, 1.0),
                       torch.zeros_like(z))


def saliency_levels(n: torch.Tensor) -> torch.Tensor:
    """Quantise normalised maps by truncation to the integers 0..255 (int64)."""
    return (n * 255).floor().long().clamp_(0, 255)


def level_histograms(levels: torch.Tensor) -> torch.Tensor:
    """Counts of each level 0..255 per map: levels [..., H, W] -> float64 [..., 256]."""
    lead = levels.shape[:-2]
    maps = int(np.prod(lead)) if lead else 1
    offsets = torch.arange(maps, device=levels.device).view(*lead, 1, 1) * 256
    counts = torch.bincount((levels + offsets).flatten(), minlength=maps * 256)
    return counts.view(*lead, 256).to(torch.float64)


def histogram_saliency(levels: torch.Tensor, hist: torch.Tensor | None = None) -> torch.Tensor:
    """Global-contrast saliency of integer maps [..., H, W] with values 0..255:
    sal(p) = sum_j hist(j) |q(p) - j| with hist the normalised histogram of each map.
    ``hist`` ([..., 256], normalised to sum 1) is given when ``levels`` is a tile and the
    histogram has to be the whole image's; float64 [..., H, W]."""
    if hist is None:
        counts = level_histograms(levels)
        hist = counts / counts.sum(-1, keepdim=True)
    grid = torch.arange(256, dtype=torch.float64, device=levels.device)
    table = hist.to(torch.float64) @ (grid[:, None] - grid[None, :]).abs()
    return table.gather(-1, levels.flatten(-2)).reshape(levels.shape)


@dataclass
class SaliencyStats:
    """Whole-image statistics of the base codes that the saliency rule needs, so that tiles
    can be fused independently: per source and channel extremes ([S, q]) and the normalised
    256-bin histogram of the quantised maps ([S, q, 256], float64)."""

    lo: torch.Tensor
    hi: torch.Tensor
    hist: torch.Tensor | None = None

    def channels(self, sl: slice) -> SaliencyStats:
        return SaliencyStats(self.lo[:, sl], self.hi[:, sl],
                             None if self.hist is None else self.hist[:, sl])

    def to(self, device) -> SaliencyStats:
        return SaliencyStats(self.lo.to(device), self.hi.to(device),
                             None if self.hist is None else self.hist.to(device))

    @staticmethod
    def extremes(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over the pixels of codes [S, q, H, W] -> two [S, q] float32 tensors."""
        z = z.float()
        return z.amin(dim=(-2, -1)), z.amax(dim=(-2, -1))

    def counts(self, z: torch.Tensor) -> torch.Tensor:
        """Level counts ([S, q, 256] float64) of codes [S, q, H, W] under these extremes."""
        n = saliency_normalise(z, self.lo[..., None, None], self.hi[..., None, None])
        return level_histograms(saliency_levels(n))


# --- the guided filter on the CPU: float32 maps, box sums accumulated in double --------------

def _cv2():
    try:
        import cv2
    except ImportError:  # opencv is optional: scipy does the same, ~3x slower
        return None
    return cv2


def box_mean_reflect_np(a: np.ndarray, r: int) -> np.ndarray:
    """(2r+1)^2 box mean with BORDER_REFLECT of float32 maps [..., H, W] (H, W > r).

    OpenCV's boxFilter when available (as the authors' cv2.ximgproc.guidedFilter), else
    scipy's uniform_filter1d (mode 'reflect' is the same border); both sum in double."""
    cv2 = _cv2()
    k = 2 * r + 1
    flat = a.reshape(-1, *a.shape[-2:])
    out = np.empty_like(flat)
    if cv2 is not None:
        for i, m in enumerate(flat):
            cv2.boxFilter(m, -1, (k, k), dst=out[i], normalize=True,
                          borderType=cv2.BORDER_REFLECT)
    else:
        from scipy.ndimage import uniform_filter1d

        uniform_filter1d(flat, k, axis=-1, mode="reflect", output=out)
        uniform_filter1d(out, k, axis=-2, mode="reflect", output=out)
    return out.reshape(a.shape)


def guided_filter_cpu(guide: torch.Tensor, src: torch.Tensor, r: int,
                      eps: float) -> torch.Tensor:
    """float32 guided filter of CPU tensors [..., H, W] (grey guide per map), the arithmetic
    of OpenCV's guidedFilter; within ~1e-6 of the float64 ``guided_filter``."""
    g = guide.float().contiguous()
    p = src.float().contiguous()
    stacked = torch.stack((g, p, g * p, g * g))  # one call for the four first-level means
    m = torch.from_numpy(box_mean_reflect_np(stacked.numpy(), r))
    mean_i, mean_p, corr_ip, corr_ii = m.unbind(0)
    a = (corr_ip - mean_i * mean_p) / (corr_ii - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    ab = torch.from_numpy(box_mean_reflect_np(torch.stack((a, b)).numpy(), r))
    return ab[0] * g + ab[1]


def saliency_weights(z: torch.Tensor, radius: int = SALIENCY_RADIUS,
                     eps: float = SALIENCY_EPS, stats: SaliencyStats | None = None,
                     exact: bool = False) -> torch.Tensor:
    """The authors' base-code rule: histogram saliency per channel, refined by a guided filter
    whose guide is the normalised map. Returns weights [S, q, H, W] summing to 1 over S.

    ``stats``: the whole image's extremes and histograms when ``z`` is a tile (else they are
    taken from ``z``). The guided filter runs in float32 on the CPU (OpenCV/scipy box sums
    accumulated in double: the authors' own float32 OpenCV arithmetic, within 1e-4 of the
    float64 reference) and in float64 torch elsewhere (float32 on MPS); ``exact=True``
    forces the float64 torch reference everywhere.
    """
    if stats is None:
        n = saliency_normalise(z)
        levels = saliency_levels(n)
        hist = None
    else:
        n = saliency_normalise(z, stats.lo[..., None, None], stats.hi[..., None, None])
        levels = saliency_levels(n)
        hist = stats.hist
    w = histogram_saliency(levels, hist) + 1e-12
    w = w / w.sum(0, keepdim=True)
    fast = (not exact and z.device.type == "cpu" and min(z.shape[-2:]) > radius)
    if fast:
        w = guided_filter_cpu(n, w.float(), radius, eps) + 1e-12
    else:
        work = torch.float32 if z.device.type == "mps" else torch.float64
        w = guided_filter(n.to(work), w.to(work), radius, eps) + 1e-12
    w = w / w.sum(0, keepdim=True)
    return w.to(z.dtype)


def saliency_rule(z: torch.Tensor, channel_chunk: int = 8, stats: SaliencyStats | None = None,
                  exact: bool = False, mean_weights: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse base codes [S, q, H, W] with the saliency rule, ``channel_chunk`` channels at a
    time (channels are independent; small chunks keep the filter buffers in memory and
    cache). Weights are [S, q, H, W], or their channel mean [S, 1, H, W] with
    ``mean_weights`` (then the per-channel maps are never all held at once)."""
    fused = torch.empty(z.shape[1:], dtype=z.dtype, device=z.device)
    w_all = None if mean_weights else torch.empty_like(z)
    w_sum = z.new_zeros((z.shape[0], 1, *z.shape[-2:])) if mean_weights else None
    for c in range(0, z.shape[1], channel_chunk):
        sl = slice(c, c + channel_chunk)
        w = saliency_weights(z[:, sl], stats=None if stats is None else stats.channels(sl),
                             exact=exact)
        torch.sum(w * z[:, sl], 0, out=fused[sl])
        if mean_weights:
            w_sum += w.sum(1, keepdim=True)
        else:
            w_all[:, sl] = w
    return fused, (w_sum / z.shape[1] if mean_weights else w_all)


def apply_rule(name: str, z: torch.Tensor, stats: SaliencyStats | None = None,
               exact: bool = False, mean_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse codes [S, q, H, W] -> (fused [q, H, W], weights [S, q or 1, H, W]).

    ``stats``: whole-image statistics for the saliency rule when ``z`` is a tile;
    ``exact``: the float64 reference saliency path; ``mean_weights``: return the weights
    averaged over channels ([S, 1, H, W], what the engine reports)."""
    if name == "saliency":
        return saliency_rule(z, stats=stats, exact=exact, mean_weights=mean_weights)
    if name == "l1":
        return l1_rule(z)
    if name == "average":
        return average_rule(z)
    raise ValueError(f"fusion rule must be one of {RULES}, got {name!r}")
