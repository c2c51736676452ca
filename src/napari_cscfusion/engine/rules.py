"""Fusion rules acting on the sparse codes of S registered sources.

Each rule takes codes [S, q, H, W] and returns (fused codes [q, H, W], weights). The
two-source rules of CSC-IVFN are written for any S >= 2 (weights normalised over sources).

The rules in REFERENCE_RULES measure a source's activity as the distance of its codes from the
codes of an all-black image (``reference``, one value per channel) rather than from zero: the
second-generation weights encode black to nonzero base (PReLU) and detail codes, and in medical
scans black is "nothing here", so the source farthest from black is the one that shows
something.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

RULES = ("saliency", "l1", "average", "choose-max", "l1-black")
REFERENCE_RULES = frozenset({"choose-max", "l1-black"})  # need the codes of black
SALIENCY_RADIUS = 45  # guided-filter refinement of the saliency weights (authors' r1)
SALIENCY_EPS = 0.01  # guided-filter regulariser (authors' eps1)
ACTIVITY_RADIUS = 1  # the l1 rules' activity: a 3x3 mean of sum_c |z - reference|
# Below this a reference rule's activity is 0 (the source shows black): where every source is
# black the activities are rounding residues of black's codes (up to 5.5e-4 measured, Harvard
# MRI/PET 11) that would split the weights at random; one grey level above black is >= 0.28.
SILENT_ACTIVITY = 1e-2
# choose-max's consistency check (Li, Manjunath & Mitra 1995): each pixel takes the choice of
# the majority of its 5x5 neighbours, so that isolated flips do not cut the anatomy
VERIFY_RADIUS = 2
# Each rule's halo: how far (px) a fused code reaches into the codes around it. Tiles add it to
# the encoder's and decoder's context (ivf.IVFKernel). The saliency rule's guided filter is
# applied twice (r = 45 each); l1 and l1-black sum 3x3 windows; choose-max sums 3x3 windows
# and then votes in 5x5 ones; average is per pixel.
RULE_RADIUS = {"saliency": 2 * SALIENCY_RADIUS, "l1": ACTIVITY_RADIUS, "average": 0,
               "choose-max": ACTIVITY_RADIUS + VERIFY_RADIUS, "l1-black": ACTIVITY_RADIUS}


def check_rules(base_rule: str, detail_rule: str) -> None:
    """ValueError naming the argument unless both rules are known."""
    for rule, arg in ((base_rule, "base_rule"), (detail_rule, "detail_rule")):
        if rule not in RULES:
            raise ValueError(f"{arg}: must be one of {RULES}, got {rule!r}")


def average_rule(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = z.shape[0]
    w = z.new_full((s, 1, *z.shape[-2:]), 1.0 / s)
    return z.mean(0), w


def code_activity(z: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """A_s = 3x3 mean (zero border) of sum_c |z_s - reference| (reference [q], None: zero)
    for codes [S,q,H,W] -> [S,1,H,W]; with a reference, values below SILENT_ACTIVITY are 0."""
    ref = None if reference is None else reference.to(z.dtype).view(-1, 1, 1)
    # sum_c |z_s| one source at a time: a [q,H,W] temporary instead of [S,q,H,W], and the
    # same reduction (bit for bit) as z.abs().sum(1)
    act = torch.stack([(z[s] if ref is None else z[s] - ref).abs().sum(0, keepdim=True)
                       for s in range(z.shape[0])])
    # a 1/9 kernel convolution rather than avg_pool: the authors' arithmetic, bit for bit
    k = 2 * ACTIVITY_RADIUS + 1
    act = F.conv2d(act, z.new_full((1, 1, k, k), 1.0 / (k * k)), padding=ACTIVITY_RADIUS)
    # (the authors' l1 rule, without a reference, stays their arithmetic)
    return act if ref is None else act.masked_fill_(act < SILENT_ACTIVITY, 0.0)


def l1_attention_weights(z: torch.Tensor, reference: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """w_s = A_s / sum_s A_s -> [S,1,H,W], A_s = code_activity (from ``reference``)."""
    activity = code_activity(z, reference)
    total = activity.sum(0, keepdim=True)
    # Where every source is silent (0/0) fall back to equal weights instead of NaN.
    return torch.where(total > 0, activity / total.clamp_min(torch.finfo(z.dtype).tiny),
                       torch.full_like(activity, 1.0 / z.shape[0]))


def weighted_sum(w: torch.Tensor, z: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """sum_s w_s z_s for w [S,1,H,W] (or [S,q,H,W]), z [S,q,H,W] -> [q,H,W]: the values of
    (w * z).sum(0) (the same sequential additions) without its [S,q,H,W] product, which is
    the largest temporary of a tile (products made a few channels at a time)."""
    out = torch.mul(w[0], z[0])
    for s in range(1, z.shape[0]):
        for c in range(0, z.shape[1], chunk):
            sl = slice(c, c + chunk)
            out[sl] += w[s, sl] * z[s, sl] if w.shape[1] > 1 else w[s] * z[s, sl]
    return out


def l1_rule(z: torch.Tensor, reference: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' l1 attention rule; with ``reference`` (the codes of black) the l1-black
    rule, whose activity is the codes' distance from black."""
    w = l1_attention_weights(z, reference)
    return weighted_sum(w, z), w


def choose_max_rule(z: torch.Tensor, reference: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, all codes of the source whose codes are farthest from the codes of black
    (code_activity from ``reference``; where every source shows black, the first), the choices
    verified by a 5x5 majority vote (ties keep the pixel's own choice) -> (fused [q,H,W],
    one-hot weights [S,1,H,W])."""
    choice = code_activity(z, reference).argmax(0, keepdim=True)
    one_hot = torch.zeros((z.shape[0], 1, *z.shape[-2:]), dtype=z.dtype, device=z.device)
    one_hot.scatter_(0, choice, 1.0)
    if VERIFY_RADIUS:
        k = 2 * VERIFY_RADIUS + 1
        # vote counts are small integers (exact in any float type); + 0.5 for the pixel's
        # own choice breaks ties (near the border, where fewer neighbours vote) in its favour
        votes = F.conv2d(one_hot, one_hot.new_ones((1, 1, k, k)), padding=VERIFY_RADIUS)
        choice = (votes + 0.5 * one_hot).argmax(0, keepdim=True)
        one_hot.zero_().scatter_(0, choice, 1.0)
    fused = z.gather(0, choice.expand(1, *z.shape[1:]))[0]
    return fused, one_hot


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

    def counts(self, z: torch.Tensor, channel_chunk: int = 4) -> torch.Tensor:
        """Level counts ([S, q, 256] float64) of codes [S, q, H, W] under these extremes, a
        few channels at a time: the normalised maps and their int64 levels of all channels
        at once would take 5x the codes' own memory."""
        out = torch.empty((*z.shape[:2], 256), dtype=torch.float64, device=z.device)
        for c in range(0, z.shape[1], channel_chunk):
            sl = slice(c, c + channel_chunk)
            n = saliency_normalise(z[:, sl], self.lo[:, sl, None, None],
                                   self.hi[:, sl, None, None])
            out[:, sl] = level_histograms(saliency_levels(n))
        return out


# --- the guided filter on the CPU: float32 maps, box sums accumulated in double --------------

def _cv2():
    try:
        import cv2
    except ImportError:  # opencv is optional: scipy does the same, ~3x slower
        return None
    return cv2


def _box_np(a: np.ndarray, r: int, out: np.ndarray | None = None) -> np.ndarray:
    """(2r+1)^2 box mean with BORDER_REFLECT of one float32 map (H, W > r), summed in double:
    OpenCV's boxFilter when available (as the authors' cv2.ximgproc.guidedFilter), else
    scipy's uniform_filter1d (its mode 'reflect' is the same border)."""
    cv2 = _cv2()
    k = 2 * r + 1
    if cv2 is not None:
        return cv2.boxFilter(a, -1, (k, k), dst=out, normalize=True,
                             borderType=cv2.BORDER_REFLECT)
    from scipy.ndimage import uniform_filter1d

    tmp = uniform_filter1d(a, k, axis=1, mode="reflect")
    return uniform_filter1d(tmp, k, axis=0, mode="reflect", output=out)


def guided_filter_map(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter of one float32 map (grey guide), in place where possible:
    the arithmetic of OpenCV's guidedFilter, within ~1e-6 of the float64 ``guided_filter``.
    One map at a time keeps the dozen intermediates in cache."""
    mean_i, mean_p = _box_np(guide, r), _box_np(src, r)
    t = guide * src
    corr_ip = _box_np(t, r)
    np.multiply(guide, guide, out=t)
    corr_ii = _box_np(t, r)
    np.multiply(mean_i, mean_p, out=t)
    np.subtract(corr_ip, t, out=corr_ip)  # cov
    np.multiply(mean_i, mean_i, out=t)
    np.subtract(corr_ii, t, out=corr_ii)  # var
    corr_ii += np.float32(eps)
    a = np.divide(corr_ip, corr_ii, out=corr_ip)
    np.multiply(a, mean_i, out=t)
    b = np.subtract(mean_p, t, out=mean_p)
    mean_a = _box_np(a, r, out=corr_ii)
    mean_b = _box_np(b, r, out=mean_i)
    np.multiply(mean_a, guide, out=mean_a)
    mean_a += mean_b
    return mean_a


_DISTANCE = np.abs(np.arange(256.0)[:, None] - np.arange(256.0)[None, :])


def saliency_channel_np(z: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                        hist: np.ndarray | None, radius: int = SALIENCY_RADIUS,
                        eps: float = SALIENCY_EPS) -> np.ndarray:
    """Saliency weights [S, H, W] (float32, summing to 1 over S) of one code channel of S
    sources (z [S, H, W] float32), given each source's extremes (lo, hi [S]) and, for tiles,
    the whole image's normalised histograms (hist [S, 256]); the CPU fast path."""
    n = np.empty_like(z)
    w = np.empty(z.shape, np.float64)
    for s in range(z.shape[0]):
        span = np.float32(hi[s]) - np.float32(lo[s])
        if span > 0:
            np.subtract(z[s], np.float32(lo[s]), out=n[s])
            n[s] /= span
        else:
            n[s] = 0
        levels = np.floor(n[s] * np.float32(255))
        np.clip(levels, 0, 255, out=levels)
        levels = levels.astype(np.uint8)
        if hist is None:
            counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
            h = counts / counts.sum()
        else:
            h = np.asarray(hist[s], np.float64)
        w[s] = (h @ _DISTANCE)[levels]
    w += 1e-12
    w /= w.sum(0)
    w32 = w.astype(np.float32)
    out = np.empty_like(w32)
    for s in range(z.shape[0]):
        out[s] = guided_filter_map(n[s], w32[s], radius, eps)
    out += np.float32(1e-12)
    out /= out.sum(0)
    return out


def _fast_cpu(z: torch.Tensor, radius: int, exact: bool) -> bool:
    return not exact and z.device.type == "cpu" and min(z.shape[-2:]) > radius


def saliency_weights(z: torch.Tensor, radius: int = SALIENCY_RADIUS,
                     eps: float = SALIENCY_EPS, stats: SaliencyStats | None = None,
                     exact: bool = False) -> torch.Tensor:
    """The authors' base-code rule: histogram saliency per channel, refined by a guided filter
    whose guide is the normalised map. Returns weights [S, q, H, W] summing to 1 over S.

    ``stats``: the whole image's extremes and histograms when ``z`` is a tile (else they are
    taken from ``z``). On the CPU the maps are filtered one at a time in float32 (OpenCV or
    scipy box sums accumulated in double: the authors' own float32 OpenCV arithmetic, within
    1e-4 of the float64 reference); elsewhere in float64 torch (float32 on MPS).
    ``exact=True`` forces the float64 torch reference everywhere.
    """
    if _fast_cpu(z, radius, exact):
        zn = z.detach().float().numpy()
        lo, hi = (SaliencyStats.extremes(z) if stats is None else (stats.lo, stats.hi))
        lo, hi = lo.numpy(), hi.numpy()
        hist = None if stats is None or stats.hist is None else stats.hist.numpy()
        w = np.stack([saliency_channel_np(np.ascontiguousarray(zn[:, c]), lo[:, c], hi[:, c],
                                          None if hist is None else hist[:, c], radius, eps)
                      for c in range(zn.shape[1])], 1)
        return torch.from_numpy(w).to(z.dtype)
    if stats is None:
        n = saliency_normalise(z)
        hist = None
    else:
        n = saliency_normalise(z, stats.lo[..., None, None], stats.hi[..., None, None])
        hist = stats.hist
    w = histogram_saliency(saliency_levels(n), hist) + 1e-12
    w = w / w.sum(0, keepdim=True)
    work = torch.float32 if z.device.type == "mps" else torch.float64
    w = guided_filter(n.to(work), w.to(work), radius, eps) + 1e-12
    w = w / w.sum(0, keepdim=True)
    return w.to(z.dtype)


def saliency_rule(z: torch.Tensor, channel_chunk: int = 4, stats: SaliencyStats | None = None,
                  exact: bool = False, mean_weights: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse base codes [S, q, H, W] with the saliency rule, a few channels at a time
    (channels are independent; on the CPU one map at a time, which keeps the filter's
    intermediates in cache). Weights are [S, q, H, W], or their channel mean [S, 1, H, W]
    with ``mean_weights`` (then the per-channel maps are never all held at once)."""
    if _fast_cpu(z, SALIENCY_RADIUS, exact):
        return _saliency_rule_np(z, stats, mean_weights)
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


def _saliency_rule_np(z: torch.Tensor, stats: SaliencyStats | None, mean_weights: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """saliency_rule on the CPU in numpy, one map at a time (small torch ops on strided
    slices cost far more than the arithmetic on a busy 2-core machine)."""
    zn = z.detach().float().numpy()
    S, q = zn.shape[:2]
    if stats is None:
        lo, hi = zn.min(axis=(2, 3)), zn.max(axis=(2, 3))
        hist = None
    else:
        lo, hi = stats.lo.numpy(), stats.hi.numpy()
        hist = None if stats.hist is None else stats.hist.numpy()
    fused = np.empty(zn.shape[1:], np.float32)
    w_out = np.zeros((S, 1, *zn.shape[2:]), np.float32) if mean_weights else \
        np.empty(zn.shape, np.float32)
    for c in range(q):
        zc = np.ascontiguousarray(zn[:, c])
        w = saliency_channel_np(zc, lo[:, c], hi[:, c], None if hist is None else hist[:, c])
        np.sum(w * zc, 0, out=fused[c])
        if mean_weights:
            w_out[:, 0] += w
        else:
            w_out[:, c] = w
    if mean_weights:
        w_out /= q
    return torch.from_numpy(fused).to(z.dtype), torch.from_numpy(w_out).to(z.dtype)


def apply_rule(name: str, z: torch.Tensor, stats: SaliencyStats | None = None,
               exact: bool = False, mean_weights: bool = False,
               reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse codes [S, q, H, W] -> (fused [q, H, W], weights [S, q or 1, H, W]).

    ``stats``: whole-image statistics for the saliency rule when ``z`` is a tile;
    ``exact``: the float64 reference saliency path; ``mean_weights``: return the weights
    averaged over channels ([S, 1, H, W], what the engine reports); ``reference``: the codes
    of an all-black image ([q]), which the REFERENCE_RULES need."""
    if name in REFERENCE_RULES and reference is None:
        raise ValueError(f"fusion rule {name!r} needs the codes of black (reference)")
    if name == "saliency":
        return saliency_rule(z, stats=stats, exact=exact, mean_weights=mean_weights)
    if name == "l1":
        return l1_rule(z)
    if name == "l1-black":
        return l1_rule(z, reference)
    if name == "choose-max":
        return choose_max_rule(z, reference)
    if name == "average":
        return average_rule(z)
    raise ValueError(f"fusion rule must be one of {RULES}, got {name!r}")
