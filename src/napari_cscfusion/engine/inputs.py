"""Input checking and dtype/range normalisation, shared by every fusion entry point.

Rules (documented in the README): unsigned integers are divided by their dtype's maximum;
signed integers too when they hold no negative value, else they are min-max scaled; floats
already in [0, 1] are used as they are; other floats are min-max scaled per image. The
metadata records every image that was rescaled. Inputs are never modified (we copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Normalised:
    data: np.ndarray  # float32, [0, 1], a new array
    note: str  # how the values were mapped to [0, 1]


def normalise(array, name: str) -> Normalised:
    """Return a float32 copy of ``array`` in [0, 1]; raise TypeError/ValueError naming ``name``."""
    a = np.asarray(array)
    if a.dtype == bool:
        raise TypeError(f"{name}: boolean images cannot be fused; convert the mask to a "
                        f"number type (e.g. uint8) first")
    if np.iscomplexobj(a):
        raise TypeError(f"{name}: complex images are not supported; pass the magnitude or the "
                        f"real part (a real-valued array)")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{name}: expected a numeric image, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name}: the image is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        lo = int(a.min())
        if lo >= 0:
            return Normalised((a / np.float64(info.max)).astype(np.float32),
                              f"divided by the {a.dtype} maximum {info.max}")
        return _minmax(a.astype(np.float64), f"{a.dtype} with negative values")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or infinite pixel(s); replace or mask them "
                         f"before fusing")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return Normalised(a.astype(np.float32, copy=True), "float in [0, 1], used as is")
    return _minmax(a.astype(np.float64), f"float range [{lo:.6g}, {hi:.6g}]")


def _minmax(a: np.ndarray, why: str) -> Normalised:
    lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(hi - lo):
        # a span beyond the float64 range (values near +-1.8e308): halve first (exact), or
        # (a - lo) / (hi - lo) would be inf / inf = NaN
        a, lo, hi = a * 0.5, lo * 0.5, hi * 0.5
    if hi > lo:
        data = ((a - lo) / (hi - lo)).astype(np.float32)
        return Normalised(data, f"min-max scaled ({why})")
    return Normalised(np.zeros(a.shape, np.float32), f"constant image set to 0 ({why})")


def check_frames(array, name: str) -> None:
    """A list/tuple of images (e.g. exposures) must hold one shape: name them all if not
    (numpy would only say "inhomogeneous shape"). Call it before np.shape/np.asarray."""
    if not hasattr(array, "ndim") and isinstance(array, (list, tuple)):
        shapes = [tuple(np.shape(x)) for x in array]
        if len(set(shapes)) > 1:
            listing = ", ".join(f"{name}[{i}] {s}" for i, s in enumerate(shapes))
            raise ValueError(f"{name}: the images must all have the same shape (register or "
                             f"resample them first): {listing}")


def check_ndim(array, name: str, allowed: dict[int, str]) -> np.ndarray:
    """``allowed`` maps an ndim to a description of the expected layout."""
    check_frames(array, name)
    a = np.asarray(array) if not hasattr(array, "ndim") else array
    if a.ndim not in allowed:
        want = " or ".join(f"{v}" for v in allowed.values())
        raise ValueError(f"{name}: expected {want}, got an array of shape {tuple(a.shape)}")
    return a


def check_min_size(shape: tuple[int, ...], name: str, minimum: int, why: str) -> None:
    h, w = shape[-2:]
    if h < minimum or w < minimum:
        raise ValueError(f"{name}: images must be at least {minimum}x{minimum} pixels ({why}), "
                         f"got {h}x{w}")


def check_same_shape(shapes: dict[str, tuple[int, ...]]) -> None:
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"sources must have the same shape (register or resample them first): "
                         f"{listing}")
