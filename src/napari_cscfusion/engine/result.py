"""What every fusion run returns and shares: ``FusionResult``, ``Cancelled`` (raised by a
progress callback to stop a run), the metadata every result carries, progress helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._version import __version__
from . import notices
from .registry import FusionModel


class Cancelled(Exception):
    """Raised by a ``progress`` callback to stop a fusion run between steps (tiles)."""


def report(progress, done: int, total: int) -> None:
    """Call the user's progress(done, total) callback, if any. It may raise Cancelled."""
    if progress is not None:
        progress(done, total)


@dataclass
class FusionResult:
    """image: float32 in [0,1] (a numpy array, or a lazy dask array for dask inputs);
    codes: name -> float32 (q,H,W) when asked for; weights: name -> per-source weight maps
    (sources first); metadata: task, weights, device (the one the run finally used: "cpu" after
    an out-of-memory fallback), tile, timings, notices (what the run had to do differently,
    e.g. out-of-memory retries; also given as OutOfMemoryRetry warnings)."""

    image: np.ndarray  # or a dask array (lazy results)
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def base_metadata(model: FusionModel, device: torch.device, notes: dict) -> dict:
    """The metadata every fuse_* result carries. Called once the run's work is done: it takes
    the notices this run recorded (notices.py) and the device it finally ran on."""
    info = model.info
    lines, used = notices.take(device)
    return {
        "task": model.task,
        "network": model.name,
        "weights": info.get("label"),
        "weights_sha256": info.get("sha256"),
        "weights_format": info.get("format"),
        "device": used,
        "normalisation": notes,
        # what makes each kind of code (PReLU / sparse / soft threshold): the code layers' names
        "code_activation": model.network.code_activations(),
        "package_version": __version__,
        "notices": lines,
    }


def plane_progress(progress, k: int, n: int):
    """Plane k of n's progress(done, total) as a part of the whole run's (None: none)."""
    if progress is None:
        return None
    return lambda done, total: progress(k * total + done, n * total)
