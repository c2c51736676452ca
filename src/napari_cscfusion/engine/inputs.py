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


class Normaliser:
    """How one image maps to float32 in [0, 1], applicable to any crop of it, so that a huge
    image is converted tile by tile instead of copied whole (the crops hold exactly the values
    ``normalise`` gives: the same float64 arithmetic, element by element)."""

    def __init__(self, a: np.ndarray, note: str, kind: str, lo: float = 0.0,
                 span: float = 1.0, halve: bool = False):
        self.array, self.note, self.kind = a, note, kind
        self.lo, self.span, self.halve = lo, span, halve

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __call__(self, index=()) -> np.ndarray:
        """The normalised float32 values of ``array[index]`` (a new array)."""
        return map_values(self.array[index], self.kind, self.lo, self.span, self.halve)

    def mean(self) -> float:
        """The mean of the normalised values, from one float64 pass over the raw ones (no
        float32 copy: the mapping is affine, so it maps the raw mean)."""
        return mapped_mean(np.mean(self.array, dtype=np.float64), self.kind, self.lo,
                           self.span, self.halve)


def value_mapping(dtype, lo, hi) -> tuple[str, float, float, bool]:
    """The normalisation rule (module docstring) for an image of ``dtype`` whose values span
    [lo, hi] (lo None: unsigned integers, which need no extremes): (kind, lo, span, halve)
    for ``map_values``. The in-memory, lazy (dask) and volume paths all map values by it."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and (lo is None or lo >= 0):
        return "divide", 0.0, float(np.iinfo(dtype).max), False
    lo, hi = float(lo), float(hi)
    if np.issubdtype(dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return "as is", 0.0, 1.0, False
    # the extremes of the float64 values (exact: min/max do not round)
    halve = not np.isfinite(hi - lo)
    if halve:
        # a span beyond the float64 range (values near +-1.8e308): halve first (exact), or
        # (a - lo) / (hi - lo) would be inf / inf = NaN
        lo, hi = lo * 0.5, hi * 0.5
    if hi > lo:
        return "minmax", lo, hi - lo, halve
    return "zero", 0.0, 1.0, False


def map_values(a, kind: str, lo: float = 0.0, span: float = 1.0,
               halve: bool = False) -> np.ndarray:
    """Values ``a`` (any part of an image) mapped to float32 [0, 1] as ``value_mapping``
    said for the whole image (a new array)."""
    if kind == "divide":
        return (a / np.float64(span)).astype(np.float32)
    if kind == "as is":
        return np.array(a, dtype=np.float32, copy=True)
    if kind == "zero":
        return np.zeros(np.shape(a), np.float32)
    a = np.asarray(a).astype(np.float64)
    if halve:
        a = a * 0.5
    return ((a - lo) / span).astype(np.float32)


def mapped_mean(raw_mean: float, kind: str, lo: float = 0.0, span: float = 1.0,
                halve: bool = False) -> float:
    """The mean of an image's normalised values from the mean of its raw values (``map_values``
    is affine): the in-memory and lazy paths compute a plane's mean grey by it alike."""
    return float(map_values(np.float64(raw_mean), kind, lo, span, halve))


def normaliser(array, name: str) -> Normaliser:
    """Check ``array`` and say how it maps to [0, 1] (see the module docstring); raise
    TypeError/ValueError naming ``name``. Reads the whole image once (its range; unsigned
    integers not at all), copies nothing."""
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
        lo = 0 if a.dtype.kind == "u" else int(a.min())  # unsigned: no scan needed
        if lo >= 0:
            return Normaliser(a, f"divided by the {a.dtype} maximum {np.iinfo(a.dtype).max}",
                              *value_mapping(a.dtype, lo, None))
        return _minmax(a, f"{a.dtype} with negative values")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or infinite pixel(s); replace or mask them "
                         f"before fusing")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return Normaliser(a, "float in [0, 1], used as is", *value_mapping(a.dtype, lo, hi))
    return _minmax(a, f"float range [{lo:.6g}, {hi:.6g}]")


def normalise(array, name: str) -> Normalised:
    """Return a float32 copy of ``array`` in [0, 1]; raise TypeError/ValueError naming ``name``."""
    n = normaliser(array, name)
    return Normalised(n(), n.note)


def _minmax(a: np.ndarray, why: str) -> Normaliser:
    mapping = value_mapping(np.float64, a.min(), a.max())  # float64: never "as is"
    if mapping[0] == "minmax":
        return Normaliser(a, f"min-max scaled ({why})", *mapping)
    return Normaliser(a, f"constant image set to 0 ({why})", *mapping)


class NormalisedStack:
    """S same-shape images, normalised on demand: ``stack[:, ys, xs]`` (or any index whose
    first element picks sources) is the float32 [S', ...] array of those crops. Stands in for
    the stacked float32 copy of the sources, which for an 8192x8192 pair alone is 512 MB."""

    def __init__(self, parts: list[Normaliser]):
        self.parts = parts
        self.shape = (len(parts), *parts[0].shape)
        self.ndim, self.dtype = len(self.shape), np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        parts = self.parts[first] if isinstance(first, slice) else [self.parts[first]]
        out = np.stack([p(rest) for p in parts])
        return out if isinstance(first, slice) else out[0]

    def mean_level(self) -> float:
        """The mean grey of the sources: each source's mean normalised value, averaged."""
        return float(np.mean([p.mean() for p in self.parts]))

    def plane(self, index: tuple[int, ...]) -> NormalisedStack:
        """The stack of plane ``index`` of every source (still lazy)."""
        return NormalisedStack([Normaliser(p.array[index], p.note, p.kind, p.lo, p.span,
                                           p.halve) for p in self.parts])


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
