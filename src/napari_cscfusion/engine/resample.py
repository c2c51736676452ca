"""Resampling at whole-image coordinates, so that a tile (or a dask task) computes exactly the
pixels the whole-image resize would: the sampling positions and weights of an output window
depend only on the image sizes, never on the crop.

* Bilinear, align_corners=True (CSC-MMFN's own up/downsampling of codes and of its low-res
  input): ``align_corners_positions``, ``interp_axis``, ``align_corners_span``.
* Bicubic, half-pixel centres, Keys a = -0.75 (PyTorch's ``interpolate(mode="bicubic")`` and
  OpenCV's INTER_CUBIC): the preparation of CSC-MMFN's low-res input for weights trained on
  it. ``bicubic_taps`` holds the taps and weights; ``bicubic_window`` applies them to any
  window of the output; ``bicubic_resize`` is the whole image through PyTorch's kernel. The
  two agree to float rounding (~1e-7; they sum in another order), and each path keeps the
  values it has always had: the in-memory engine resizes whole planes, the lazy one windows.
"""

from __future__ import annotations

import numpy as np
import torch


def align_corners_positions(n_out_range: range, n_in: int, n_out: int,
                            device: torch.device) -> torch.Tensor:
    """Source coordinates (float32, as PyTorch computes them) of output indices
    ``n_out_range`` for a bilinear resize with align_corners=True from n_in to n_out."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    idx = torch.arange(n_out_range.start, n_out_range.stop, dtype=torch.float32, device=device)
    return idx * float(scale)


def interp_axis(x: torch.Tensor, dim: int, pos: torch.Tensor, offset: int,
                n_in: int, *, lerp: bool = False) -> torch.Tensor:
    """Linear interpolation of x along ``dim`` at global source coordinates ``pos``; x holds
    global indices [offset, offset + x.shape[dim]). PyTorch's bilinear arithmetic (index
    floor clamped to n_in - 1, neighbour + 1 unless at the end, lambdas clamped to [0, 1]).
    ``lerp``: the two taps blended by one in-place ``lerp`` (three passes instead of five,
    rounded in another order: the MMF fast path)."""
    i0 = torch.clamp(torch.floor(pos).long(), max=n_in - 1)
    lam1 = torch.clamp(pos - i0.float(), 0.0, 1.0)
    lam0 = 1.0 - lam1
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    shape = [1] * x.ndim
    shape[dim] = -1
    # advanced indexing, not index_select: the same values, and along the last axis ~50x
    # faster on the CPU (index_select there was half of a tiled CSC-MMFN run, profiled)
    at = [slice(None)] * x.ndim
    at[dim] = i0 - offset
    a = x[tuple(at)]
    at[dim] = i1 - offset
    b = x[tuple(at)]
    if lerp:
        return a.lerp_(b, lam1.view(shape).to(x.dtype))
    return a * lam0.view(shape).to(x.dtype) + b * lam1.view(shape).to(x.dtype)


def align_corners_span(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Source indices [a, b) that output indices [lo, hi) of an align_corners resize read."""
    pos = align_corners_positions(range(lo, hi), n_in, n_out, torch.device("cpu"))
    i0 = torch.clamp(torch.floor(pos).long(), max=n_in - 1)
    return int(i0.min()), min(n_in, int(i0.max()) + 2)


_KEYS_A = np.float32(-0.75)  # PyTorch's (and OpenCV's INTER_CUBIC) Keys parameter


def _keys1(x):
    return ((_KEYS_A + np.float32(2)) * x - (_KEYS_A + np.float32(3))) * x * x + np.float32(1)


def _keys2(x):
    return ((_KEYS_A * x - np.float32(5) * _KEYS_A) * x + np.float32(8) * _KEYS_A) * x \
        - np.float32(4) * _KEYS_A


def bicubic_taps(lo: int, hi: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (n, 4) and Keys weights (n, 4) of output indices [lo, hi) of a bicubic
    resize n_in -> n_out (half-pixel centres, border samples repeated), in PyTorch's float32
    arithmetic (``interpolate(mode="bicubic", align_corners=False)``)."""
    scale = np.float32(n_in) / np.float32(n_out)
    real = scale * (np.arange(lo, hi).astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    i0 = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    t = np.clip(real - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    u = np.float32(1) - t
    weights = np.stack([_keys2(t + np.float32(1)), _keys1(t), _keys1(u),
                        _keys2(u + np.float32(1))], 1).astype(np.float32)
    return np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1), weights


def bicubic_span(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Source indices [a, b) that output indices [lo, hi) of the bicubic resize read (their
    2-sample Keys support, clamped to the image)."""
    idx, _ = bicubic_taps(lo, hi, n_in, n_out)
    return int(idx.min()), int(idx.max()) + 1


def bicubic_window(x: np.ndarray, origin: tuple[int, int], full: tuple[int, int],
                   out_shape: tuple[int, int], window) -> np.ndarray:
    """Rows window[0]:window[1], columns window[2]:window[3] of the bicubic resize of a whole
    (..., h, w) image (``full``) to ``out_shape``, from ``x``, its crop starting at ``origin``
    that covers ``bicubic_span`` on both axes. Separable, columns first, float32: the same
    taps, weights and order of sums as the whole-image resize, at whole-image coordinates."""
    iy, wy = bicubic_taps(window[0], window[1], full[0], out_shape[0])
    ix, wx = bicubic_taps(window[2], window[3], full[1], out_shape[1])
    iy, ix = iy - origin[0], ix - origin[1]
    x = np.asarray(x, np.float32)
    rows = x[..., ix[:, 0]] * wx[:, 0]
    for k in range(1, 4):
        rows = rows + x[..., ix[:, k]] * wx[:, k]
    out = rows[..., iy[:, 0], :] * wy[:, 0, None]
    for k in range(1, 4):
        out = out + rows[..., iy[:, k], :] * wy[:, k, None]
    return out.astype(np.float32, copy=False)


def bicubic_resize(x: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """The bicubic resize of a whole (C, h, w) float32 image to ``out_shape`` (H, W): the
    same taps and weights as ``bicubic_window`` (PyTorch's kernel, half-pixel centres,
    border samples repeated; not clipped)."""
    out = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=tuple(out_shape),
                                          mode="bicubic", align_corners=False)[0]
    return out.numpy()
