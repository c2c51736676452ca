"""Fusion-quality metrics (engine layer: numpy / scipy / scikit-image / torch only).

Conventions (state them next to any number you publish):

* Inputs are float arrays in [0, 1]. Grey metrics (SD, SF, AG, SCD, VIF, Qabf, SSIM, PSNR) are
  computed on those [0, 1] floats, so SD/SF/AG are 1/255 of the values in tables that work on
  0..255 grey levels (multiply by 255 to compare).
* EN and MI use 256-bin histograms of ``round(255 * clip(x, 0, 1))``; logarithms in base 2 (bits).
  Those are scale-free and directly comparable with published tables.
* Colour inputs (H, W, 3) are converted to grey (ITU-R BT.601 luma, .299R + .587G + .114B) by the
  grey metrics; MEF-SSIM uses all channels as described in :func:`mef_ssim_torch`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["mef_ssim", "mef_ssim_torch"]


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
    s = _as_float01(stack)
    f = _as_float01(fused)
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


def _as_float01(img) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    return a.astype(np.float64, copy=False)


def _grey(img) -> np.ndarray:
    """float64 grey image in [0,1]-scale; (H,W,3|4) colour -> BT.601 luma."""
    a = _as_float01(img)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grey or (H,W,3) colour image, got shape {a.shape}")
    return a
