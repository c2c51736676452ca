"""Loading networks: the packaged weights by task name, or any checkpoint file/folder."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..models.checkpoints import TASKS, load_network

TASK_NAMES = {"ivf": "CSC-IVFN", "mef": "CSC-MEFN", "mmf": "CSC-MMFN"}


@dataclass
class FusionModel:
    """A loaded network plus where its weights came from. One copy is kept per device."""

    task: str
    network: nn.Module
    info: dict = field(default_factory=dict)
    _per_device: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return TASK_NAMES[self.task]

    @property
    def weights_label(self) -> str:
        return self.info.get("label", str(self.info.get("weights", "?")))

    def network_on(self, device: torch.device) -> nn.Module:
        """The network on ``device`` (eval mode), copied once per device so that runs on
        different devices never move each other's parameters."""
        key = str(device)
        with self._lock:
            if key not in self._per_device:
                # the user's own network only where it already is (the CPU, as loaded): a run
                # elsewhere, or the CPU fallback after out of memory, never moves it
                here = next(self.network.parameters()).device == device
                net = self.network if here else copy.deepcopy(self.network)
                self._per_device[key] = net.to(device).eval()
            return self._per_device[key]


def packaged_weights_path(task: str) -> Path:
    return Path(str(resources.files("napari_cscfusion") / "weights" / f"{task}.pt"))


_packaged_cache: dict[str, FusionModel] = {}
_cache_lock = threading.Lock()


def load_model(task: str, weights: str | Path | None = None) -> FusionModel:
    """Load a fusion network.

    task: 'ivf' (infrared + visible, also used for medical multi-modal fusion), 'mef'
    (multi-exposure) or 'mmf' (guided super-resolution).
    weights: None for the weights shipped with the package; a checkpoint file (ours or the
    authors'); for 'ivf' also a folder holding the authors' base/detail/decoder files.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if weights is None:
        with _cache_lock:
            if task in _packaged_cache:
                return _packaged_cache[task]
            path = packaged_weights_path(task)
            if not path.is_file():
                raise FileNotFoundError(
                    f"no packaged weights for {task!r} in this installation ({path}); pass a "
                    f"checkpoint with weights=... (e.g. the authors' published file)")
            net, info = load_network(task, path)
            info["label"] = f"packaged {task}.pt"
            model = FusionModel(task, net, info)
            _packaged_cache[task] = model
            return model
    net, info = load_network(task, weights)
    info["label"] = str(weights)
    return FusionModel(task, net, info)


def resolve_model(model, task: str) -> FusionModel:
    """Accept None (packaged), a FusionModel, or a path to weights."""
    if model is None:
        return load_model(task)
    if isinstance(model, FusionModel):
        if model.task != task:
            raise ValueError(f"model: this is a {model.name} ({model.task!r}) model; this "
                             f"function needs a {TASK_NAMES[task]} ({task!r}) model")
        return model
    if isinstance(model, (str, Path)):
        return load_model(task, model)
    raise TypeError(f"model: expected None, a FusionModel from load_model() or a weights path, "
                    f"got {type(model).__name__}")
