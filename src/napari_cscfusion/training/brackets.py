"""Simulated exposure brackets for training and evaluating CSC-MEFN: LDR exposures of an HDR
radiance map through a simple camera (``simulate_bracket``), and the exposure values a
photographer would pick (``random_evs``, ``covering_evs``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MEF_SPACING = (0.5, 3.0)  # EV between neighbouring exposures
MEF_MAX_SPAN = 16.0  # EV from the darkest to the brightest exposure at most


def camera_response(x: np.ndarray, gamma: float = 2.2, contrast: float = 0.0) -> np.ndarray:
    """A simple camera response: gamma then an optional S-curve (contrast in [0,1)).

    Monotone non-decreasing on [0,1], maps 0 -> 0 and 1 -> 1.
    """
    y = np.power(np.clip(x, 0.0, 1.0), 1.0 / gamma)
    if contrast > 0:
        s = 0.5 - 0.5 * np.cos(np.pi * y)  # smooth S-curve on [0,1]
        y = (1.0 - contrast) * y + contrast * s
    return y.astype(np.float32)


def simulate_bracket(hdr: np.ndarray, evs: Sequence[float], rng: np.random.Generator | None = None,
                     *, gamma: float = 2.2, contrast: float = 0.0, read_noise: float = 0.002,
                     shot_noise: float = 0.005, quantise: bool = True,
                     black: float = 0.0) -> np.ndarray:
    """LDR exposures [K,H,W,3] in [0,1] of a radiance map ``hdr`` [H,W,3] (linear, >= 0).

    For each EV: scale by 2^EV, add sensor noise (shot noise with variance shot_noise² · x and
    read noise read_noise², in linear units), clip to [0,1], apply ``camera_response``, lift by
    the black level ``black`` (out = black + (1 − black) · response: real cameras and film
    scans do not map "no light" to 0 — sensor pedestal, veiling glare, film base fog),
    quantise to 8 bit. Exposures come out in the order of ``evs``.
    """
    if rng is None:
        rng = np.random.default_rng(0)
    hdr = np.asarray(hdr, np.float32)
    out = np.empty((len(evs), *hdr.shape), np.float32)
    for i, ev in enumerate(evs):
        lin = hdr * np.float32(2.0 ** ev)
        if shot_noise > 0 or read_noise > 0:
            sigma = np.sqrt(shot_noise ** 2 * np.clip(lin, 0, 1) + read_noise ** 2)
            lin = lin + sigma * rng.standard_normal(lin.shape).astype(np.float32)
        ldr = camera_response(lin, gamma, contrast)
        if black:
            ldr = np.float32(black) + np.float32(1.0 - black) * ldr
        if quantise:
            ldr = np.round(ldr * 255.0) / 255.0
        out[i] = ldr
    return out


def random_evs(rng: np.random.Generator, count: int,
               spacing: tuple[float, float] = (1.0, 3.0),
               max_span: float = MEF_MAX_SPAN) -> list[float]:
    """``count`` exposure values, ascending, spaced ``spacing`` stops (random, at most
    ``max_span`` from first to last), centred near 0 (the scene median)."""
    hi = spacing[1] if count < 2 else min(spacing[1], max(spacing[0], max_span / (count - 1)))
    step = rng.uniform(spacing[0], hi)
    evs = np.arange(count, dtype=np.float64) * step
    evs = evs - evs.mean() + rng.uniform(-1.5, 1.5)
    return [float(e) for e in evs]


def covering_evs(rng: np.random.Generator, count: int, lum: np.ndarray,
                 spacing: tuple[float, float] = MEF_SPACING,
                 max_span: float = MEF_MAX_SPAN) -> list[float]:
    """``count`` exposure values, ascending, that cover the dynamic range of ``lum`` (linear
    luminance at EV 0) as a photographer brackets a scene: the darkest exposure keeps the
    highlights (99.9th percentile) just below clipping, the brightest lifts the shadows (1st
    percentile) to mid-grey, each end jittered by ±1 EV; the spacing is that span / (count − 1)
    kept within ``spacing`` (and the span within ``max_span``), the bracket centred on the
    range."""
    lo, hi = np.percentile(np.maximum(lum, 1e-8), [1.0, 99.9])
    ev_dark = -np.log2(hi) + rng.uniform(-1.0, 1.0)
    ev_bright = np.log2(0.18 / lo) + rng.uniform(-1.0, 1.0)
    if count < 2:
        return [float(0.5 * (ev_dark + ev_bright))]
    step = np.clip((ev_bright - ev_dark) / (count - 1), spacing[0],
                   min(spacing[1], max(spacing[0], max_span / (count - 1))))
    evs = np.arange(count, dtype=np.float64) * step
    evs = evs - evs.mean() + 0.5 * (ev_dark + ev_bright)
    return [float(e) for e in evs]
