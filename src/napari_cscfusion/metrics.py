"""Fusion-quality metrics (engine layer: numpy / scipy / scikit-image / torch only).

Conventions (state them next to any number you publish):

* Inputs are float arrays in [0, 1] (uint8/uint16 are rescaled). Grey metrics (SD, SF, AG, SCD,
  Qabf, SSIM, PSNR) are computed on those [0, 1] floats, so SD/SF/AG are 1/255 of the values in
  tables that work on 0..255 grey levels (multiply by 255 to compare); SCD, Qabf and SSIM/PSNR
  (data_range=1) do not depend on the scale. VIF scales by 255 internally because its noise
  variance sigma_n^2 = 2 is defined for 0..255 grey levels.
* EN and MI use 256-bin histograms of ``round(255 * clip(x, 0, 1))``; logarithms in base 2 (bits).
  Those are scale-free and directly comparable with published tables.
* Source-relative scores are SUMS over sources (MI, SCD, VIF; the usual IVF convention) except
  SSIM (MEAN over sources) and Qabf (normalised edge-transfer ratio, at most QABF_MAX ~= 0.9748).
* Colour inputs (H, W, 3) are converted to grey (ITU-R BT.601 luma, .299R + .587G + .114B) by the
  grey metrics; MEF-SSIM uses all channels as described in :func:`mef_ssim_torch`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .models.color import luma

__all__ = [
    "IVF_METRICS",
    "MEF_METRICS",
    "QABF_MAX",
    "average_gradient",
    "entropy",
    "evaluate",
    "mef_ssim",
    "mef_ssim_torch",
    "mutual_information",
    "psnr",
    "qabf",
    "scd",
    "spatial_frequency",
    "ssim_fusion",
    "standard_deviation",
    "vif",
]


# --------------------------------------------------------------------------------------------
# MEF-SSIM (Ma, Zeng, Wang 2015), differentiable, in the variant used to train CSC-MEFN
# --------------------------------------------------------------------------------------------
# No maintained library implements MEF-SSIM, so it is written here from the paper and the
# description of the authors' training loss (docs/csc-networks.md).


def _gaussian_kernel_1d(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size // 2)
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _gauss_filter(x: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of [B, 1, H, W] with zero padding ('same' output size).

    Zero padding of half the window on each side, as in the reference implementation
    (``F.conv2d(..., padding=ws // 2)``); separable filtering with zero padding equals the 2-D one.
    """
    ws = g1.numel()
    x = F.conv2d(x, g1.view(1, 1, 1, ws), padding=(0, ws // 2))
    return F.conv2d(x, g1.view(1, 1, ws, 1), padding=(ws // 2, 0))


def mef_ssim_torch(
    stack: torch.Tensor,
    fused: torch.Tensor,
    *,
    window_size: int = 11,
    sigma: float | None = None,
    sigma_g: float = 0.2,
    sigma_l: float = 0.2,
    c1: float = 0.01,
    c2: float = 0.03,
    return_maps: bool = False,
):
    """Differentiable MEF-SSIM of ``fused`` against an exposure ``stack`` (higher is better, <= 1).

    Shapes: ``stack`` [N, K, C, H, W] or [K, C, H, W]; ``fused`` [N, C, H, W] or [C, H, W]
    (K exposures, C channels, values in [0, 1]). Returns a tensor of shape [N] (batched input)
    or a 0-d tensor. Use ``-mef_ssim_torch(stack, fused).mean()`` as a training loss.

    Variant (the one the CSC-MEFN authors trained with; Ma, Zeng & Wang, IEEE TIP 2015):

    * Gaussian window ``window_size`` = 11, sigma = window_size / 6, zero padding, 'same' size.
    * Local statistics are averaged over the C channels: mu = mean_c G*x_c,
      E[x^2] = mean_c G*(x_c^2), cov = mean_c G*(x_c y_c) - mu_x mu_y (i.e. the reference
      filters with a [1, C, ws, ws] window divided by C).
    * Structure/contrast: cs_k = (2 cov(F, X_k) + C2) / (var F + var X_k + C2), C2 = c2**2;
      at each pixel the exposure with the largest local variance is taken (first one on ties).
    * Luminance: the desired local mean is mu_Y = sum_k L_k mu_k / sum_k L_k with
      L_k = exp(-(mean(mu_k) - .5)^2 / (2 sigma_g^2)) * exp(-(mu_k - .5)^2 / (2 sigma_l^2));
      l = (2 mu_F mu_Y + C1) / (mu_F^2 + mu_Y^2 + C1), C1 = c1**2.
    * Score = mean(l_map) * mean(cs_map) (single scale).

    ``return_maps=True`` returns ``(score, l_map, cs_map)`` with maps of shape [N, H, W]
    (or [H, W]).
    """
    if not torch.is_tensor(stack) or not torch.is_tensor(fused):
        raise TypeError("mef_ssim_torch expects torch tensors; use mef_ssim for numpy arrays")
    batched = stack.dim() == 5
    if not batched:
        if stack.dim() != 4 or fused.dim() != 3:
            raise ValueError(
                f"expected stack [K,C,H,W] and fused [C,H,W], got {tuple(stack.shape)} and "
                f"{tuple(fused.shape)}"
            )
        stack = stack.unsqueeze(0)
        fused = fused.unsqueeze(0)
    if stack.dim() != 5 or fused.dim() != 4:
        raise ValueError(
            f"expected stack [N,K,C,H,W] and fused [N,C,H,W], got {tuple(stack.shape)} and "
            f"{tuple(fused.shape)}"
        )
    n, k, c, h, w = stack.shape
    if tuple(fused.shape) != (n, c, h, w):
        raise ValueError(f"fused shape {tuple(fused.shape)} does not match stack {(n, c, h, w)}")
    if not fused.is_floating_point():
        fused = fused.float()
    stack = stack.to(dtype=fused.dtype, device=fused.device)
    g1 = _gaussian_kernel_1d(
        window_size, window_size / 6.0 if sigma is None else sigma, fused.dtype, fused.device
    )

    def filt(x: torch.Tensor) -> torch.Tensor:  # [..., H, W] -> same, Gaussian filtered
        shp = x.shape
        return _gauss_filter(x.reshape(-1, 1, h, w), g1).reshape(shp)

    fx = fused.unsqueeze(1)  # [N,1,C,H,W]
    # channel means first: filtering is linear, so mean_c(G*x_c) == G*(mean_c x_c)
    mu_y = filt(stack.mean(dim=2))  # [N,K,H,W]
    var_y = filt((stack * stack).mean(dim=2)) - mu_y * mu_y
    mu_x = filt(fused.mean(dim=1))  # [N,H,W]
    var_x = filt((fused * fused).mean(dim=1)) - mu_x * mu_x
    cov_xy = filt((fx * stack).mean(dim=2)) - mu_x.unsqueeze(1) * mu_y

    C1 = c1**2
    C2 = c2**2
    cs_seq = (2.0 * cov_xy + C2) / (var_x.unsqueeze(1) + var_y + C2)  # [N,K,H,W]
    idx = torch.argmax(var_y.detach(), dim=1, keepdim=True)  # first max on ties
    cs_map = torch.gather(cs_seq, 1, idx).squeeze(1)  # [N,H,W]

    l_global = mu_y.mean(dim=(2, 3), keepdim=True)  # [N,K,1,1]
    weights = torch.exp(-((l_global - 0.5) ** 2) / (2.0 * sigma_g**2)) * torch.exp(
        -((mu_y - 0.5) ** 2) / (2.0 * sigma_l**2)
    )
    mu_ref = (weights * mu_y).sum(dim=1) / weights.sum(dim=1)
    l_map = (2.0 * mu_x * mu_ref + C1) / (mu_x * mu_x + mu_ref * mu_ref + C1)

    score = l_map.mean(dim=(1, 2)) * cs_map.mean(dim=(1, 2))
    if not batched:
        score, l_map, cs_map = score[0], l_map[0], cs_map[0]
    if return_maps:
        return score, l_map, cs_map
    return score


def mef_ssim(stack, fused, **kwargs) -> float:
    """MEF-SSIM (numpy wrapper of :func:`mef_ssim_torch`, computed in float64).

    ``stack``: (K, H, W) grey or (K, H, W, C) colour exposures; ``fused``: (H, W) or (H, W, C);
    floats in [0, 1] (uint8 is divided by 255). Returns a float <= 1 (1 iff fused matches the
    reference structure and luminance everywhere, e.g. for a stack of identical images).
    """
    s = as_float01(stack)
    f = as_float01(fused)
    if s.ndim == 3 and f.ndim == 2:
        s = s[:, None]  # [K,1,H,W]
        f = f[None]
    elif s.ndim == 4 and f.ndim == 3:
        s = np.moveaxis(s, -1, 1)  # [K,C,H,W]
        f = np.moveaxis(f, -1, 0)
    else:
        raise ValueError(
            f"stack {s.shape} and fused {f.shape}: expected (K,H,W)+(H,W) or (K,H,W,C)+(H,W,C)"
        )
    st = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float64))
    ft = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float64))
    with torch.no_grad():
        return float(mef_ssim_torch(st, ft, **kwargs))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def as_float01(img) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    return a.astype(np.float64, copy=False)


def _grey(img) -> np.ndarray:
    """float64 grey image in [0,1]-scale; (H,W,3|4) colour -> BT.601 luma."""
    a = as_float01(img)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = luma(a)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grey or (H,W,3) colour image, got shape {a.shape}")
    return a


def _sources(sources, fused: np.ndarray | None = None) -> list[np.ndarray]:
    """List of grey float64 source images (a sequence of images, or an array whose first axis
    indexes the sources: (K,H,W) grey or (K,H,W,3) colour)."""
    srcs = [_grey(s) for s in sources]
    if len(srcs) < 1:
        raise ValueError("need at least one source image")
    shape = srcs[0].shape if fused is None else fused.shape
    for s in srcs:
        if s.shape != shape:
            raise ValueError(f"source shape {s.shape} differs from {shape}")
    return srcs


def _hist_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log2(p)).sum())


def _levels(img: np.ndarray) -> np.ndarray:
    """Integer grey levels 0..255: round(255 * clip(x, 0, 1))."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.int64)


# --------------------------------------------------------------------------------------------
# reference-free statistics of one image (EN, SD, SF, AG)
# --------------------------------------------------------------------------------------------
# Simple published formulas; written by hand (no maintained library offers the fusion versions).


def entropy(img) -> float:
    """EN: Shannon entropy in bits of the 256-bin histogram of round(255 * x); in [0, 8]."""
    return _hist_entropy(np.bincount(_levels(_grey(img)).ravel(), minlength=256))


def standard_deviation(img) -> float:
    """SD: population standard deviation (ddof=0) of the [0,1] grey values (x255 for tables)."""
    return float(np.std(_grey(img)))


def spatial_frequency(img) -> float:
    """SF = sqrt(RF^2 + CF^2) on [0,1] values (x255 for 0..255 tables).

    RF^2 = sum_{i, j>=1} (F[i,j] - F[i,j-1])^2 / (M N), CF^2 likewise along columns: the sums run
    over the M(N-1) resp. (M-1)N neighbour differences and are divided by the pixel count M N
    (Eskicioglu & Fisher 1995, as in the usual IVF toolboxes).
    """
    a = _grey(img)
    rf2 = np.sum(np.diff(a, axis=1) ** 2) / a.size
    cf2 = np.sum(np.diff(a, axis=0) ** 2) / a.size
    return float(np.sqrt(rf2 + cf2))


def average_gradient(img) -> float:
    """AG on [0,1] values (x255 for 0..255 tables), forward differences:

    AG = 1/((M-1)(N-1)) sum_{i<M-1, j<N-1} sqrt(((F[i+1,j]-F[i,j])^2 + (F[i,j+1]-F[i,j])^2) / 2).
    """
    a = _grey(img)
    dx = a[:-1, 1:] - a[:-1, :-1]
    dy = a[1:, :-1] - a[:-1, :-1]
    return float(np.mean(np.sqrt((dx * dx + dy * dy) / 2.0)))


# --------------------------------------------------------------------------------------------
# metrics relating the fused image to its sources
# --------------------------------------------------------------------------------------------


def _mi_pair(a: np.ndarray, b: np.ndarray) -> float:
    joint = np.bincount((_levels(a) * 256 + _levels(b)).ravel(), minlength=256 * 256)
    joint = joint.reshape(256, 256)
    return _hist_entropy(joint.sum(1)) + _hist_entropy(joint.sum(0)) - _hist_entropy(joint)


def mutual_information(sources, fused) -> float:
    """Fusion MI = sum_s MI(S_s, F) in bits (no normalisation), MI = H(S) + H(F) - H(S, F) from
    the 256x256 joint histogram of round(255 * x). Written by hand: the fusion sum is not in any
    library (sklearn's mutual_info_score uses nats and needs the labels built anyway)."""
    f = _grey(fused)
    return float(sum(_mi_pair(s, f) for s in _sources(sources, f)))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else 0.0


def scd(sources, fused) -> float:
    """SCD, the sum of the correlations of differences (Aslantas & Bendes 2015), in [-2, 2]:

    SCD = r(F - B, A) + r(F - A, B), r = Pearson correlation (0 if a signal is constant).
    Defined for exactly two sources; symmetric in them. Hand-written (no library has it).
    """
    f = _grey(fused)
    srcs = _sources(sources, f)
    if len(srcs) != 2:
        raise ValueError(f"SCD is defined for two sources, got {len(srcs)}")
    a, b = srcs
    return _corr(f - b, a) + _corr(f - a, b)


def _gauss2d_valid(img: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """MATLAB filter2(fspecial('gaussian', n, sigma), img, 'valid') (separable)."""
    from scipy.signal import convolve

    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    g /= g.sum()
    out = convolve(img, g[None, :], mode="valid")
    return convolve(out, g[:, None], mode="valid")


def _vifp(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0) -> float:
    ref = ref * 255.0
    dist = dist * 255.0
    num = 0.0
    den = 0.0
    eps = 1e-10
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        if scale > 1:
            ref = _gauss2d_valid(ref, n, n / 5.0)[::2, ::2]
            dist = _gauss2d_valid(dist, n, n / 5.0)[::2, ::2]
        if min(ref.shape) < n or min(dist.shape) < n:
            raise ValueError("image too small for the 4-scale VIF (needs about 41x41 pixels)")
        mu1 = _gauss2d_valid(ref, n, n / 5.0)
        mu2 = _gauss2d_valid(dist, n, n / 5.0)
        s1 = np.maximum(_gauss2d_valid(ref * ref, n, n / 5.0) - mu1 * mu1, 0.0)
        s2 = np.maximum(_gauss2d_valid(dist * dist, n, n / 5.0) - mu2 * mu2, 0.0)
        s12 = _gauss2d_valid(ref * dist, n, n / 5.0) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        low1 = s1 < eps
        g[low1] = 0.0
        sv[low1] = s2[low1]
        s1[low1] = 0.0
        low2 = s2 < eps
        g[low2] = 0.0
        sv[low2] = 0.0
        neg = g < 0
        sv[neg] = s2[neg]
        g[neg] = 0.0
        sv = np.maximum(sv, eps)
        num += np.sum(np.log10(1.0 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1.0 + s1 / sigma_nsq))
    return float(num / den) if den > 0 else 0.0


def vif(sources, fused) -> float:
    """Fusion VIF = sum_s VIFp(S_s, F): Sheikh & Bovik's pixel-domain, 4-scale VIF
    (vifp_mscale.m: Gaussian windows 17/9/5/3 with sigma = N/5, 'valid' filtering, dyadic
    subsampling, sigma_n^2 = 2). sigma_n^2 = 2 refers to 0..255 grey levels, so images are scaled
    by 255 internally; the result is scale-consistent with published IVF tables (VIFB-style sum
    over the two sources). Hand-written: no maintained library ships VIFp. Needs >= ~41x41 px.
    VIFp(S, S) = 1; a linear contrast stretch of S gives > 1.
    """
    f = _grey(fused)
    return float(sum(_vifp(s, f) for s in _sources(sources, f)))


_SOBEL_Y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _sobel_strength_angle(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.signal import convolve2d

    sx = convolve2d(img, _SOBEL_X, mode="same")  # zero padding, as MATLAB conv2(.., 'same')
    sy = convolve2d(img, _SOBEL_Y, mode="same")
    g = np.sqrt(sx * sx + sy * sy)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(sx == 0, np.pi / 2, np.arctan(sy / np.where(sx == 0, 1.0, sx)))
    return g, a


# Xydeas & Petrovic (2000) constants.
_QABF_GAMMA_G, _QABF_KAPPA_G, _QABF_SIGMA_G = 0.9994, -15.0, 0.5
_QABF_GAMMA_A, _QABF_KAPPA_A, _QABF_SIGMA_A = 0.9879, -22.0, 0.8
#: Largest value Q^{AB/F} can take with the standard constants (reached when every edge of the
#: sources is reproduced exactly): Qg(1) * Qa(1) ~= 0.9748, not 1.
QABF_MAX = (_QABF_GAMMA_G / (1.0 + np.exp(_QABF_KAPPA_G * (1.0 - _QABF_SIGMA_G)))) * (
    _QABF_GAMMA_A / (1.0 + np.exp(_QABF_KAPPA_A * (1.0 - _QABF_SIGMA_A)))
)


def qabf(sources, fused, L: float = 1.0) -> float:
    """Q^{AB/F} edge-transfer metric (Xydeas & Petrovic 2000), generalised to N sources:

    Q = sum_s sum_p Q^{S_s F}(p) w_s(p) / sum_s sum_p w_s(p),  w_s = g_s^L.

    Sobel strength g and orientation alpha = atan(s_y / s_x) (pi/2 where s_x = 0), zero padding
    ('same', as MATLAB conv2 in the reference code, so image borders count as edges);
    G^{SF} = g_F/g_S if g_S > g_F else g_S/g_F (1 where equal, as in the paper; some MATLAB
    copies put g_F there instead); A^{SF} = 1 - |alpha_S - alpha_F| / (pi/2);
    Q^{SF} = Gamma_g/(1+e^{kappa_g(G-sigma_g)}) * Gamma_a/(1+e^{kappa_a(A-sigma_a)}) with
    Gamma_g=.9994, kappa_g=-15, sigma_g=.5, Gamma_a=.9879, kappa_a=-22, sigma_a=.8, L=1.
    Note: with these published constants the maximum is QABF_MAX ~= 0.9748 (not 1); published
    tables use the same constants, so values are comparable. Scale of x does not matter.
    Hand-written: no maintained library implements Q^{AB/F}.
    """
    f = _grey(fused)
    gf, af = _sobel_strength_angle(f)
    num = 0.0
    den = 0.0
    for s in _sources(sources, f):
        gs, as_ = _sobel_strength_angle(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            G = np.where(gs > gf, gf / gs, np.where(gs == gf, 1.0, gs / gf))
        A = 1.0 - np.abs(as_ - af) / (np.pi / 2)
        qg = _QABF_GAMMA_G / (1.0 + np.exp(_QABF_KAPPA_G * (G - _QABF_SIGMA_G)))
        qa = _QABF_GAMMA_A / (1.0 + np.exp(_QABF_KAPPA_A * (A - _QABF_SIGMA_A)))
        w = gs**L
        num += float(np.sum(qg * qa * w))
        den += float(np.sum(w))
    return num / den if den > 0 else 0.0


def ssim_fusion(sources, fused) -> float:
    """Mean over sources of SSIM(S_s, F) (skimage.metrics.structural_similarity, data_range=1.0,
    Wang et al. 2004 settings: Gaussian window sigma=1.5, population covariance, K1=.01, K2=.03).
    Note: some IVF tables report the SUM over the two sources; multiply by 2 to compare."""
    from skimage.metrics import structural_similarity

    f = _grey(fused)
    vals = [
        structural_similarity(
            s, f, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for s in _sources(sources, f)
    ]
    return float(np.mean(vals))


def psnr(reference, img, data_range: float = 1.0) -> float:
    """PSNR in dB of ``img`` against ``reference`` (skimage), data_range 1.0 for [0,1] floats.
    Colour images are compared on all channels (no grey conversion)."""
    from skimage.metrics import peak_signal_noise_ratio

    return float(
        peak_signal_noise_ratio(as_float01(reference), as_float01(img), data_range=data_range)
    )


IVF_METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")
MEF_METRICS = ("MEF-SSIM", "EN", "SD", "SF", "AG")


def evaluate(task: str, sources, fused) -> dict[str, float]:
    """The metric set used for ``task``:

    * 'ivf' / 'medical': EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM (conventions as above; SCD
      needs exactly two sources and is omitted otherwise).
    * 'mef': MEF-SSIM (on the colour stack if given colour) plus EN, SD, SF, AG of the fused
      image's grey (BT.601 luma).
    """
    task = task.lower()
    if task in ("ivf", "medical"):
        f = _grey(fused)
        srcs = _sources(sources, f)
        out = {
            "EN": entropy(f),
            "SD": standard_deviation(f),
            "SF": spatial_frequency(f),
            "AG": average_gradient(f),
            "MI": mutual_information(srcs, f),
        }
        if len(srcs) == 2:
            out["SCD"] = scd(srcs, f)
        out["VIF"] = vif(srcs, f)
        out["Qabf"] = qabf(srcs, f)
        out["SSIM"] = ssim_fusion(srcs, f)
        return out
    if task == "mef":
        stack = np.stack([as_float01(s) for s in sources])
        f = as_float01(fused)
        return {
            "MEF-SSIM": mef_ssim(stack, f),
            "EN": entropy(f),
            "SD": standard_deviation(f),
            "SF": spatial_frequency(f),
            "AG": average_gradient(f),
        }
    raise ValueError(f"unknown task {task!r}: expected 'ivf', 'medical' or 'mef'")
