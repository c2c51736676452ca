"""Full-range BT.601 YCbCr on [0,1] tensors, exactly as the authors' MEFN code writes it."""

from __future__ import annotations

import torch

LUMA = (0.299, 0.587, 0.114)  # Y = .299 R + .587 G + .114 B


def luma(rgb):
    """BT.601 luma of channels-last colour (..., 3 or more; extra channels such as alpha are
    ignored), for numpy, dask or torch arrays alike; the arithmetic of ``rgb_to_ycbcr``'s Y."""
    return LUMA[0] * rgb[..., 0] + LUMA[1] * rgb[..., 1] + LUMA[2] * rgb[..., 2]


def rgb_to_ycbcr(rgb: torch.Tensor, dim: int = -3) -> torch.Tensor:
    r, g, b = rgb.unbind(dim)
    y = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    cb = 0.5 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack((y, cb, cr), dim)


def ycbcr_to_rgb(ycc: torch.Tensor, dim: int = -3) -> torch.Tensor:
    y, cb, cr = ycc.unbind(dim)
    r = y + 1.402 * (cr - 0.5)
    g = y - 0.344136 * (cb - 0.5) - 0.714136 * (cr - 0.5)
    b = y + 1.772 * (cb - 0.5)
    return torch.stack((r, g, b), dim)


def fuse_chroma(chroma: torch.Tensor, dim: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """Weight each source's Cb (or Cr) by its distance from neutral grey (0.5)."""
    w = (chroma - 0.5).abs() + eps
    return (w * chroma).sum(dim) / w.sum(dim)
