"""Loading networks: the packaged weights by task name, or any checkpoint file/folder."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..models.checkpoints import load_network

TASK_NAMES = {"ivf": "CSC-IVFN", "mef": "CSC-MEFN", "mmf": "CSC-MMFN", "medical": "CSC-IVFN"}
# The network each name's packaged weights are for. medical.pt is a CSC-IVFN of its own:
# fuse_multimodal runs at code gain 1, where a source fused with itself must come back as it
# was (tones kept), while ivf.pt's slightly dark highlights suit the x2 infrared/visible stretch.
NETWORK_OF = {"ivf": "ivf", "mef": "mef", "mmf": "mmf", "medical": "ivf"}


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
    """The packaged weights of ``task`` ('ivf', 'mef', 'mmf' or 'medical')."""
    return Path(str(resources.files("napari_cscfusion") / "weights" / f"{task}.pt"))


_packaged_cache: dict[str, FusionModel] = {}
_cache_lock = threading.Lock()


def load_model(task: str, weights: str | Path | None = None) -> FusionModel:
    """Load a fusion network.

    task: 'ivf' (infrared + visible), 'medical' (a CSC-IVFN for medical multi-modal fusion:
    packaged medical.pt), 'mef' (multi-exposure) or 'mmf' (guided super-resolution).
    weights: None for the weights shipped with the package; a checkpoint file (ours or the
    authors'); for 'ivf' and 'medical' also a folder holding the authors' base/detail/decoder
    files.
    """
    if task not in NETWORK_OF:
        raise ValueError(f"task must be one of {', '.join(NETWORK_OF)}, got {task!r}")
    network = NETWORK_OF[task]
    if weights is None:
        with _cache_lock:
            if task in _packaged_cache:
                return _packaged_cache[task]
            path = packaged_weights_path(task)
            if not path.is_file():
                raise FileNotFoundError(
                    f"no packaged weights for {task!r} in this installation ({path}); pass a "
                    f"checkpoint with weights=... (e.g. the authors' published file)")
            net, info = load_network(network, path)
            info["label"] = f"packaged {task}.pt"
            model = FusionModel(network, net, info)
            _packaged_cache[task] = model
            return model
    net, info = load_network(network, weights)
    info["label"] = str(weights)
    return FusionModel(network, net, info)


def resolve_model(model, task: str) -> FusionModel:
    """Accept None (``task``'s packaged weights), a FusionModel, or a path to weights."""
    if model is None:
        return load_model(task)
    if isinstance(model, FusionModel):
        if model.task != NETWORK_OF[task]:
            raise ValueError(f"model: this is a {model.name} ({model.task!r}) model; this "
                             f"function needs a {TASK_NAMES[task]} "
                             f"({NETWORK_OF[task]!r}) model")
        return model
    if isinstance(model, (str, Path)):
        return load_model(task, model)
    raise TypeError(f"model: expected None, a FusionModel from load_model() or a weights path, "
                    f"got {type(model).__name__}")
