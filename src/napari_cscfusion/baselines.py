"""Classical fusion / upsampling baselines (engine layer: numpy, scipy, scikit-image, torch).

These are the methods a user would otherwise reach for; benchmarks and tests compare the CSC
networks against them. All take and return float arrays in [0, 1] (uint8 is divided by 255).
``mertens_fusion`` needs OpenCV (``pip install napari-cscfusion[benchmarks]``); cv2 is imported
only when it is called.
"""

from __future__ import annotations

import numpy as np

from .metrics import as_float01
from .models.color import luma

__all__ = [
    "average_fusion",
    "bicubic_upsample",
    "guided_filter",
    "guided_filter_upsample",
    "laplacian_pyramid_fusion",
    "max_abs_fusion",
    "mertens_fusion",
]


def _stack(sources) -> np.ndarray:
    """(K, H, W[, C]) float64 array from a sequence of equally shaped images or an array."""
    srcs = [as_float01(s) for s in sources]
    if len(srcs) < 1:
        raise ValueError("need at least one source image")
    shape = srcs[0].shape
    for s in srcs:
        if s.shape != shape:
            raise ValueError(f"sources must share a shape, got {s.shape} and {shape}")
    if len(shape) not in (2, 3):
        raise ValueError(f"each source must be (H, W) or (H, W, C), got {shape}")
    return np.stack(srcs)


def _spatial(fn, img: np.ndarray) -> np.ndarray:
    """Apply a 2-D filter to every channel of (H, W) or (H, W, C)."""
    if img.ndim == 2:
        return fn(img)
    return np.stack([fn(img[..., c]) for c in range(img.shape[-1])], axis=-1)


def average_fusion(sources) -> np.ndarray:
    """Pixel-wise mean of the sources."""
    return _stack(sources).mean(axis=0)


def max_abs_fusion(sources, mode: str = "detail", sigma: float = 2.0) -> np.ndarray:
    """Choose-max fusion.

    ``mode="detail"`` (default): two-scale choose-max. Each source is split into a base
    (Gaussian blur, ``sigma`` px) and a detail layer (source - base); the fused base is the mean
    of the bases and, at every pixel, the fused detail is the detail of the source whose
    ABSOLUTE detail is largest (first source on ties). ``mode="intensity"``: pixel-wise maximum
    of the intensities (the "max" rule of IVF papers). Result clipped to [0, 1].
    """
    from scipy.ndimage import gaussian_filter

    st = _stack(sources)
    if mode == "intensity":
        return st.max(axis=0)
    if mode != "detail":
        raise ValueError(f"mode must be 'detail' or 'intensity', got {mode!r}")
    base = np.stack([_spatial(lambda x: gaussian_filter(x, sigma, mode="reflect"), s) for s in st])
    detail = st - base
    pick = np.argmax(np.abs(detail), axis=0)[None]
    fused = base.mean(axis=0) + np.take_along_axis(detail, pick, axis=0)[0]
    return np.clip(fused, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Laplacian pyramid (Burt & Adelson 1983; fusion rule of Burt & Kolczynski: average the coarsest
# level, choose the max-abs coefficient in every detail level)
# ----------------------------------------------------------------------------------------------


def _down(x: np.ndarray) -> np.ndarray:
    from skimage.transform import pyramid_reduce

    return pyramid_reduce(x, downscale=2, mode="reflect", preserve_range=True, channel_axis=None)


def _up(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """pyramid_expand to an explicit shape: bilinear resize then Gaussian (sigma = 2*2/6)."""
    from scipy.ndimage import gaussian_filter
    from skimage.transform import resize

    y = resize(x, shape, order=1, mode="reflect", anti_aliasing=False, preserve_range=True)
    return gaussian_filter(y, 2.0 * 2.0 / 6.0, mode="reflect")


def _laplacian_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    pyr = []
    cur = img
    for _ in range(levels - 1):
        if min(cur.shape) < 2:
            break
        nxt = _down(cur)
        pyr.append(cur - _up(nxt, cur.shape))
        cur = nxt
    pyr.append(cur)
    return pyr


def _reconstruct(pyr: list[np.ndarray]) -> np.ndarray:
    cur = pyr[-1]
    for lap in reversed(pyr[:-1]):
        cur = lap + _up(cur, lap.shape)
    return cur


def laplacian_pyramid_fusion(sources, levels: int = 4) -> np.ndarray:
    """Laplacian-pyramid fusion with ``levels`` levels (levels-1 detail levels + a base).

    Pyramids use skimage's ``pyramid_reduce`` (Gaussian sigma = 2*2/6, reflect border) down and
    a bilinear resize + the same Gaussian up, so that reconstruction is exact. Base level: mean;
    detail levels: coefficient with the largest absolute value (first source on ties). Colour
    images are fused channel by channel. Result clipped to [0, 1].
    """
    if levels < 1:
        raise ValueError("levels must be >= 1")
    st = _stack(sources)

    def fuse2d(planes: np.ndarray) -> np.ndarray:
        pyrs = [_laplacian_pyramid(p, levels) for p in planes]
        fused = []
        for lev in range(len(pyrs[0])):
            coeffs = np.stack([p[lev] for p in pyrs])
            if lev == len(pyrs[0]) - 1:
                fused.append(coeffs.mean(axis=0))
            else:
                pick = np.argmax(np.abs(coeffs), axis=0)[None]
                fused.append(np.take_along_axis(coeffs, pick, axis=0)[0])
        return _reconstruct(fused)

    if st.ndim == 3:
        out = fuse2d(st)
    else:
        out = np.stack([fuse2d(st[..., c]) for c in range(st.shape[-1])], axis=-1)
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Multi-exposure: Mertens, Kautz & Van Reeth (2007) exposure fusion via OpenCV
# ----------------------------------------------------------------------------------------------


def mertens_fusion(stack) -> np.ndarray:
    """Mertens exposure fusion (``cv2.createMergeMertens`` with OpenCV's default weights 1/1/1).

    ``stack``: (K, H, W, 3) RGB or (K, H, W) grey exposures in [0, 1]. Returns (H, W, 3) or
    (H, W) float64 clipped to [0, 1] (Mertens' Laplacian blending can overshoot). RGB is passed to
    OpenCV as BGR (its contrast measure uses a BGR->grey conversion); grey stacks are fused as
    single-channel images.
    """
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mertens_fusion needs OpenCV: pip install 'napari-cscfusion[benchmarks]' "
            "(or opencv-python-headless)"
        ) from err
    st = _stack(stack)
    # OpenCV's MergeMertens always scales its input by 1/255 (even float32), so feed 0..255.
    if st.ndim == 4:
        if st.shape[-1] != 3:
            raise ValueError(f"colour exposures must have 3 channels, got {st.shape[-1]}")
        imgs = [np.ascontiguousarray(s[..., ::-1] * 255.0, dtype=np.float32) for s in st]
        out = cv2.createMergeMertens().process(imgs)[..., ::-1]
    else:
        imgs = [np.ascontiguousarray(s * 255.0, dtype=np.float32) for s in st]
        out = cv2.createMergeMertens().process(imgs)
    return np.clip(out.astype(np.float64), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Upsampling (guided super-resolution baselines)
# ----------------------------------------------------------------------------------------------


def bicubic_upsample(low, shape: tuple[int, int], clip: bool = True) -> np.ndarray:
    """Bicubic resize of (h, w) or (h, w, C) ``low`` to ``shape`` (H, W).

    Keys cubic convolution with a = -0.75 and half-pixel centres (``torch.nn.functional.
    interpolate(mode='bicubic', align_corners=False)``, the same kernel as OpenCV's INTER_CUBIC;
    MATLAB's imresize uses a = -0.5). Clipped to [0, 1] unless ``clip=False``.
    """
    import torch
    import torch.nn.functional as F

    a = as_float01(low)
    H, W = int(shape[0]), int(shape[1])
    if a.ndim == 2:
        t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    elif a.ndim == 3:
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0)))[None]
    else:
        raise ValueError(f"low must be (h, w) or (h, w, C), got {a.shape}")
    out = F.interpolate(t, size=(H, W), mode="bicubic", align_corners=False)[0].numpy()
    out = out[0] if a.ndim == 2 else np.moveaxis(out, 0, -1)
    return np.clip(out, 0.0, 1.0) if clip else out


def guided_filter(guide, src, r: int, eps: float) -> np.ndarray:
    """He, Sun & Tang (2010) grey-guide guided filter: box means over (2r+1)^2 windows with a
    reflected border (edge pixel repeated, as OpenCV's BORDER_REFLECT). ``src`` may have
    channels (H, W, C); a colour ``guide`` is reduced to BT.601 luma."""
    from scipy.ndimage import uniform_filter

    g = as_float01(guide)
    if g.ndim == 3:
        g = luma(g)
    p = as_float01(src)
    if p.shape[:2] != g.shape:
        raise ValueError(f"guide {g.shape} and input {p.shape[:2]} must have the same size")
    size = 2 * int(r) + 1

    def box(x):
        return uniform_filter(x, size=size, mode="reflect")

    mean_i = box(g)
    var_i = box(g * g) - mean_i * mean_i

    def one(pc: np.ndarray) -> np.ndarray:
        mean_p = box(pc)
        cov = box(g * pc) - mean_i * mean_p
        a = cov / (var_i + eps)
        b = mean_p - a * mean_i
        return box(a) * g + box(b)

    return _spatial(one, p)


def guided_filter_upsample(
    low, guide, shape: tuple[int, int] | None = None, r: int = 2, eps: float = 1e-4
) -> np.ndarray:
    """Classical guided-filter super-resolution: bicubic upsample ``low`` to ``shape`` (default:
    the guide's size), then guided-filter it with the high-resolution ``guide`` (radius ``r``,
    regulariser ``eps`` for [0,1] data). Returns float64 clipped to [0, 1].

    Defaults r=2, eps=1e-4 are a generic choice (not tuned on any benchmark set). It only helps
    where the guide shares the target's edges: on thermal guided by visible (FLIR-train, x2/x4)
    every setting tried scored below plain bicubic in PSNR."""
    g = as_float01(guide)
    if shape is None:
        shape = g.shape[:2]
    if tuple(g.shape[:2]) != tuple(shape):
        raise ValueError(f"guide size {g.shape[:2]} must equal the target shape {tuple(shape)}")
    up = bicubic_upsample(low, shape, clip=False)
    return np.clip(guided_filter(g, up, r, eps), 0.0, 1.0)
