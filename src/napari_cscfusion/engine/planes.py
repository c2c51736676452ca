"""Running the 2-D fusion functions over nD data plane by plane, and summarising results.

numpy only (no napari, no Qt): the napari layer calls these so that it holds no numerics.

* ``plane_indices`` / ``check_leading``: the extra (time, z, ...) axes that are iterated.
* ``PlaneAssembler``: collects one :class:`FusionResult` per plane into one nD result, reducing
  the sparse codes to a summary map (per-pixel L1 over code channels) or keeping every channel,
  and recording each code's sparsity (fraction of exact zeros).
* ``symmetric_limits``, ``code_summary``, ``sparsity``: display helpers for code layers.
* ``downsample_area``: box (area) downsampling by an integer factor, to simulate a low-resolution
  input for guided super-resolution.
* ``luminance`` / ``recolour``: fuse the BT.601 luma of a colour visible image and put its
  chroma back (CSC-IVFN works on grey images).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..models.color import LUMA
from .inputs import normalise
from .result import FusionResult

CODE_MODES = ("none", "summary", "all")


def plane_indices(leading_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Every index tuple over ``leading_shape`` in C order; [()] for no extra axes."""
    return list(itertools.product(*(range(int(n)) for n in leading_shape)))


def check_leading(shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The common extra-axis shape of several sources, or a ValueError naming them."""
    items = {k: tuple(int(n) for n in v) for k, v in shapes.items()}
    if len(set(items.values())) > 1:
        listing = ", ".join(f"{k} {v}" for k, v in items.items())
        raise ValueError(f"the sources must have the same extra (time/z) axes to be fused slice by "
                         f"slice: {listing}")
    return next(iter(items.values())) if items else ()


def code_summary(code: np.ndarray) -> np.ndarray:
    """Per-pixel L1 norm over the code channels: (q, H, W) -> (H, W) float32."""
    return np.abs(np.asarray(code, np.float32)).sum(0, dtype=np.float32)


def sparsity(code: np.ndarray) -> float:
    """Fraction of exact zeros."""
    a = np.asarray(code)
    return float(np.count_nonzero(a == 0) / a.size) if a.size else 0.0


def symmetric_limits(array: np.ndarray, percentile: float = 99.5) -> tuple[float, float]:
    """(-m, m) with m the ``percentile`` of |array| (the maximum if that is 0); (-1, 1) for an
    all-zero array. Centres a diverging colormap on zero."""
    a = np.abs(np.asarray(array, np.float32))
    m = float(np.percentile(a, percentile)) if a.size else 0.0
    if m <= 0:
        m = float(a.max()) if a.size else 0.0
    if not np.isfinite(m) or m <= 0:
        m = 1.0
    return (-m, m)


def value_limits(array: np.ndarray, percentile: float = 99.5) -> tuple[float, float]:
    """(0, m) for a non-negative map (m: ``percentile``, the maximum if that is 0, else 1)."""
    a = np.asarray(array, np.float32)
    m = float(np.percentile(a, percentile)) if a.size else 0.0
    if m <= 0:
        m = float(a.max()) if a.size else 0.0
    if not np.isfinite(m) or m <= 0:
        m = 1.0
    return (0.0, m)


def downsample_area(image: np.ndarray, factor: int, rgb: bool = False) -> np.ndarray:
    """Box-average ``image`` (H, W) or (H, W, C) if ``rgb`` (or (C, H, W) otherwise when 3-D)
    by an integer ``factor``; the border that does not fill a whole box is cropped.
    Returns float32 in the input's value scale."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"scale factor must be a positive integer, got {factor}")
    a = np.asarray(image, np.float32)
    if rgb:
        a = np.moveaxis(a, -1, 0)
    h, w = a.shape[-2:]
    hh, ww = h // factor, w // factor
    if hh < 1 or ww < 1:
        raise ValueError(f"scale factor {factor} is larger than the image ({h}x{w})")
    a = a[..., : hh * factor, : ww * factor]
    a = a.reshape(*a.shape[:-2], hh, factor, ww, factor).mean(axis=(-3, -1), dtype=np.float32)
    return np.moveaxis(a, 0, -1) if rgb else a


_Y = np.array(LUMA, np.float32)


def luminance(rgb: np.ndarray, name: str = "image") -> np.ndarray:
    """BT.601 luma (H, W) in [0, 1] of a colour image (H, W, 3|4) (normalised like the engine)."""
    a = normalise(np.asarray(rgb)[..., :3], name).data
    return a @ _Y


def recolour(rgb: np.ndarray, luma: np.ndarray, name: str = "image") -> np.ndarray:
    """Replace the luma of colour image ``rgb`` (H, W, 3|4) by ``luma`` (H, W) in [0, 1], keeping
    its chroma (full-range BT.601 YCbCr, as CSC-MEFN's colour path). Returns (H, W, 3) in [0, 1]."""
    a = normalise(np.asarray(rgb)[..., :3], name).data
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    y = np.asarray(luma, np.float32)
    out = np.stack((y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb), -1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class PlaneAssembler:
    """Collect per-plane FusionResults into one result over the extra axes ``leading_shape``.

    codes: 'none' (drop), 'summary' (per-pixel L1 over channels: (…, H, W)) or 'all'
    (every channel: (…, q, H, W)). Sparsity is measured on the full codes in both cases.
    Weight maps keep their source axis: (…, S, H, W).
    """

    def __init__(self, leading_shape: Sequence[int], codes: str = "none"):
        if codes not in CODE_MODES:
            raise ValueError(f"codes must be one of {CODE_MODES}, got {codes!r}")
        self.leading = tuple(int(n) for n in leading_shape)
        self.mode = codes
        self.n_planes = math.prod(self.leading)
        self.image: np.ndarray | None = None
        self.codes: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}
        self._zeros: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self.metadata: dict = {}
        self._notes: list = []
        self._notices: list[str] = []
        self._devices: list[str] = []
        self._timings: dict[str, float] = {}
        self.done = 0

    def _put(self, store: dict, key: str, index: tuple, value: np.ndarray) -> None:
        if key not in store:
            store[key] = np.zeros(self.leading + value.shape, np.float32)
        store[key][index] = value

    def add(self, index: tuple[int, ...], result: FusionResult) -> None:
        index = tuple(index)
        img = np.asarray(result.image, np.float32)
        if self.image is None:
            self.image = np.zeros(self.leading + img.shape, np.float32)
            self.metadata = dict(result.metadata)
        self.image[index] = img
        for key, code in result.codes.items():
            self._zeros[key] = self._zeros.get(key, 0) + int(np.count_nonzero(code == 0))
            self._sizes[key] = self._sizes.get(key, 0) + int(np.size(code))
            if self.mode == "summary":
                self._put(self.codes, key, index, code_summary(code))
            elif self.mode == "all":
                self._put(self.codes, key, index, np.asarray(code, np.float32))
        for key, w in result.weights.items():
            self._put(self.weights, key, index, np.asarray(w, np.float32))
        self._notes.append(result.metadata.get("normalisation"))
        for line in result.metadata.get("notices") or []:
            if line not in self._notices:
                self._notices.append(line)
        dev = result.metadata.get("device")
        if dev is not None and dev not in self._devices:
            self._devices.append(dev)
        for k, v in (result.metadata.get("timings") or {}).items():
            self._timings[k] = self._timings.get(k, 0.0) + float(v)
        self.done += 1

    def code_sparsity(self) -> dict[str, float]:
        return {k: self._zeros[k] / self._sizes[k] for k in self._zeros if self._sizes[k]}

    def result(self) -> FusionResult:
        if self.image is None or self.done != self.n_planes:
            raise RuntimeError(f"{self.done} of {self.n_planes} planes were fused")
        meta = dict(self.metadata)
        meta["timings"] = self._timings
        meta["planes"] = self.n_planes
        meta["extra_axes_shape"] = list(self.leading)
        meta["codes_mode"] = self.mode
        if self.n_planes > 1 and any(n != self._notes[0] for n in self._notes):
            meta["normalisation"] = {"per_plane": self._notes}
        meta["code_sparsity"] = self.code_sparsity()
        if "notices" in meta or self._notices:
            meta["notices"] = list(self._notices)  # every plane's, each once
        if len(self._devices) > 1:  # e.g. some planes on the CPU after out of memory
            meta["device"] = ", ".join(self._devices)
        return FusionResult(self.image, dict(self.codes), dict(self.weights), meta)
