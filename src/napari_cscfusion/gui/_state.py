"""Plain state shared by the widgets and the worker (no Qt): what one run does, what it gave,
which layers a widget added, and the networks loaded so far."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import FusionModel, FusionResult, load_model


class CancelToken:
    """Set from the GUI thread, checked from the worker thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.fraction = 0.0  # progress in [0, 1], written by the worker, read by the GUI

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class OutputSpec:
    """How the widget turns a result into layers: names and placement."""

    fused_name: str
    network: str
    # spatial (scale, translate) of the fused image's last two axes and of the extra axes
    spatial_scale: tuple[float, float] = (1.0, 1.0)
    spatial_translate: tuple[float, float] = (0.0, 0.0)
    extra_scale: tuple[float, ...] = ()
    extra_translate: tuple[float, ...] = ()
    rgb: bool = False
    channel_axis_first: bool = False  # (…, C, H, W) output (CSC-MMFN with C > 1 bands)
    source_names: list[str] = field(default_factory=list)  # one weight map layer per source
    source_label: str = "source"  # what a source is called ("exposure" for brackets)
    weight_maps: bool = False  # add the weight maps as layers
    # axis labels of the source layer (None: leave napari's defaults)
    extra_labels: tuple[str, ...] = ()
    spatial_labels: tuple[str, str] | None = None
    metadata: dict = field(default_factory=dict)  # added to the fused layer's metadata


@dataclass
class FusionJob:
    """One background run: ``run_plane(index, model, progress, want_codes)`` calls the engine on
    one plane of the extra axes ``leading_shape`` and returns a FusionResult."""

    task: str
    weights: str | None  # None: the packaged weights
    device: str
    codes: str  # 'none' | 'summary' | 'all'
    leading_shape: tuple[int, ...]
    run_plane: Callable[..., FusionResult]
    output: OutputSpec
    key: tuple = ()  # identifies the inputs: a rerun with the same key replaces the outputs
    # applied to the assembled result (in the worker), e.g. the engine's axis reordering
    finish: Callable[[FusionResult], FusionResult] | None = None


@dataclass
class RunOutcome:
    """What the worker hands back: a result, or why there is none."""

    result: FusionResult | None = None
    error: BaseException | None = None
    cancelled: bool = False
    elapsed_s: float = 0.0


class ModelCache:
    """Networks loaded by the widgets, keyed by task, weights path and file time, so that a
    rerun does not read and hash the checkpoint again."""

    def __init__(self) -> None:
        self._models: dict[tuple, FusionModel] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(task: str, weights: str | None) -> tuple:
        if weights is None:
            return (task, None, None)
        p = Path(weights)
        try:
            stamp = max([p.stat().st_mtime_ns]
                        + ([c.stat().st_mtime_ns for c in p.iterdir()] if p.is_dir() else []))
        except OSError:
            stamp = None
        return (task, str(p.resolve()), stamp)

    def get(self, task: str, weights: str | None) -> FusionModel:
        key = self._key(task, weights)
        with self._lock:
            model = self._models.get(key)
        if model is None:
            model = load_model(task, weights)
            with self._lock:
                self._models[key] = model
        return model


MODELS = ModelCache()


class OutputTracker:
    """The layers a widget added, per input key, so a rerun can replace them."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, list[Any]] = {}

    def previous(self, key: tuple) -> list[Any]:
        return list(self._by_key.get(key, []))

    def record(self, key: tuple, layers: list[Any], keep_previous: bool) -> None:
        if keep_previous:
            self._by_key.setdefault(key, []).extend(layers)
        else:
            self._by_key[key] = list(layers)
