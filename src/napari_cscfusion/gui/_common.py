"""Parts shared by the fusion widgets: layer pickers, option widgets (weights, device, codes),
reading planes out of layers, and turning a FusionResult into napari layers.

Pure layer plumbing: every computation on pixel values lives in the engine
(``napari_cscfusion.engine`` and ``engine.planes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    Select,
)
from napari.layers import Image
from napari.utils import Colormap

from ..engine import FusionResult, available_devices
from ..engine.io import jsonable
from ..engine.planes import symmetric_limits, value_limits
from ..engine.registry import TASK_NAMES, packaged_weights_path
from ._state import OutputSpec

META_KEY = "cscfusion"  # our entry in a layer's metadata

CODE_CHOICES = [("none", "none"), ("summary map (L1 over channels)", "summary"),
                ("every channel", "all")]

# Diverging map centred on zero, dark in the middle so that the zeros of a sparse code read as
# background on napari's dark canvas: negative blue, positive orange.
DIVERGING = Colormap(
    colors=[[0.25, 0.65, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.55, 0.1, 1.0]],
    controls=[0.0, 0.5, 1.0], name="cscfusion_diverging", display_name="CSC codes (diverging)")


# --- layer pickers --------------------------------------------------------------------------

def image_layers(viewer) -> list[Image]:
    return [lay for lay in viewer.layers if isinstance(lay, Image)]


def layer_combo(viewer, label: str, tooltip: str = "") -> ComboBox:
    """A ComboBox of the viewer's image layers. Its choices follow layers added, removed and
    renamed: napari calls ``reset_choices`` of docked magicgui widgets on those events."""
    return ComboBox(label=label, tooltip=tooltip, nullable=False,
                    choices=lambda _w: [(lay.name, lay) for lay in image_layers(viewer)])


def layer_select(viewer, label: str, tooltip: str = "") -> Select:
    return Select(label=label, tooltip=tooltip,
                  choices=lambda _w: [(lay.name, lay) for lay in image_layers(viewer)])


CODE_GAIN_HELP = ("factor applied to the fused base and detail codes before decoding. 2: the "
                  "authors' infrared/visible setting, which stretches the contrast; 1: the fused "
                  "image keeps the sources' intensity scale (an image fused with itself comes "
                  "back unchanged), for quantitative images such as MRI, CT or PET")


def code_gain_box(value: float) -> FloatSpinBox:
    """The "code gain" option of the CSC-IVFN widgets (passed to the engine as code_gain)."""
    return FloatSpinBox(label="code gain", value=value, min=0.1, max=4.0, step=0.1,
                        tooltip=CODE_GAIN_HELP)


def pick_distinct(combos: Sequence[ComboBox], hints: Sequence[Sequence[str]]) -> None:
    """After the choices change, give combos that share a layer different layers, preferring
    layers whose names contain one of the ``hints`` (case-insensitive)."""
    used: list[Any] = []
    for combo, words in zip(combos, hints, strict=True):
        choices = [c for c in combo.choices if c is not None]
        if not choices:
            continue
        current = combo.value
        if current is not None and all(current is not u for u in used):
            used.append(current)
            continue
        free = [c for c in choices if all(c is not u for u in used)]
        hinted = [c for c in free if any(w in c.name.lower() for w in words)]
        pick = (hinted or free or choices)[0]
        combo.value = pick
        used.append(pick)


def hint_default(combo: ComboBox, words: Sequence[str]) -> None:
    """Select the first layer whose name contains one of ``words`` (for first display)."""
    for c in combo.choices:
        if c is not None and any(w in c.name.lower() for w in words):
            combo.value = c
            return


# --- option widgets -------------------------------------------------------------------------

class WeightsChooser:
    """Packaged weights, or a checkpoint file (ours or the authors'), or for CSC-IVFN a folder
    with the authors' three files. ``weights`` is None for packaged, else the path.
    ``widgets``: the two rows (choice, path) to add to a form."""

    PACKAGED = "packaged"
    CUSTOM = "file or folder"

    def __init__(self, task: str, folders: bool = False):
        self.task = task
        have = packaged_weights_path(task).is_file()
        packaged_label = f"packaged ({task}.pt)" if have else f"packaged ({task}.pt: not installed)"
        self.source = ComboBox(label="weights", choices=[(packaged_label, self.PACKAGED),
                                                         ("file or folder…", self.CUSTOM)],
                               value=self.PACKAGED if have else self.CUSTOM,
                               tooltip="the network's weights: the packaged ones, or a "
                                       "checkpoint (ours or the authors' published files)")
        self.path = LineEdit(tooltip="a checkpoint file (.pt/.pth)"
                             + (" or the folder holding the authors' three CSC-IVFN files"
                                if folders else ""))
        self.file_button = PushButton(text="File…")
        self.folder_button = PushButton(text="Folder…", visible=folders)
        self.row = Container(widgets=[self.path, self.file_button, self.folder_button],
                             layout="horizontal", labels=False, label="weights path")
        self.row.margins = (0, 0, 0, 0)
        self.widgets = [self.source, self.row]
        self.file_button.changed.connect(self._choose_file)
        self.folder_button.changed.connect(self._choose_folder)
        self.source.changed.connect(self._sync)
        self._sync()

    @property
    def native(self):
        return self.row.native

    def _sync(self, *_):
        custom = self.source.value == self.CUSTOM
        for w in (self.path, self.file_button, self.folder_button):
            w.enabled = custom

    def _choose_file(self, *_):
        from qtpy.QtWidgets import QFileDialog
        path, _f = QFileDialog.getOpenFileName(
            self.native, f"{TASK_NAMES[self.task]} weights", self.path.value or "",
            "PyTorch checkpoints (*.pt *.pth *.ckpt *.model);;All files (*)")
        if path:
            self.set_path(path)

    def _choose_folder(self, *_):
        from qtpy.QtWidgets import QFileDialog
        path = QFileDialog.getExistingDirectory(
            self.native, f"Folder with the authors' {TASK_NAMES[self.task]} files",
            self.path.value or "")
        if path:
            self.set_path(path)

    def set_path(self, path: str | Path | None) -> None:
        """Use ``path`` (None: the packaged weights)."""
        if path is None:
            self.source.value = self.PACKAGED
        else:
            self.source.value = self.CUSTOM
            self.path.value = str(path)

    @property
    def weights(self) -> str | None:
        if self.source.value == self.PACKAGED:
            return None
        p = self.path.value.strip()
        if not p:
            raise ValueError("weights: choose a checkpoint file or folder, or the packaged weights")
        if not Path(p).exists():
            raise ValueError(f"weights: {p!r} does not exist")
        return p


def device_combo() -> ComboBox:
    """'auto' plus the devices that exist on this machine."""
    return ComboBox(label="device", choices=["auto", *available_devices()], value="auto",
                    tooltip="auto: CUDA, then Apple MPS, then the CPU")


def codes_combo() -> ComboBox:
    return ComboBox(label="sparse codes", choices=CODE_CHOICES, value="none",
                    tooltip="add the sparse codes after the last DCU as layers: none, one summary "
                            "map per code (per-pixel L1 over channels), or every channel (the "
                            "channel is a slider axis; memory-hungry)")


def status_label() -> Label:
    return Label(value="")


# --- reading layers -------------------------------------------------------------------------

def layer_array(layer: Image, what: str):
    """The layer's data (never copied); multiscale layers are refused."""
    if layer.multiscale:
        raise ValueError(f"{what} {layer.name!r}: multiscale (pyramid) layers are not supported; "
                         f"add its full-resolution level as a layer")
    return layer.data


def extra_shape(layer: Image, keep: int = 0) -> tuple[int, ...]:
    """The extra (time, z, ...) axes of a layer: everything before its two spatial axes (and
    the colour axis of an RGB layer), minus ``keep`` axes kept inside each plane."""
    data = layer.data
    shape = tuple(int(n) for n in data.shape)
    spatial = 3 if layer.rgb else 2
    return shape[: len(shape) - spatial - keep]


def spatial_shape(layer: Image) -> tuple[int, int]:
    shape = layer.data.shape
    return tuple(int(n) for n in (shape[-3:-1] if layer.rgb else shape[-2:]))


def read_plane(data, index: tuple[int, ...]) -> np.ndarray:
    """One plane (everything after the extra axes) as a numpy array (dask/zarr computed)."""
    return np.asarray(data[index] if index else data)


def transform_of(layer: Image, drop_axes: Sequence[int] = ()) -> dict:
    """Scale and translate of a layer's extra and spatial axes (``drop_axes`` removed, e.g.
    the exposure axis of a stack): {'extra_scale', 'extra_translate', 'spatial_scale',
    'spatial_translate'} for an OutputSpec."""
    scale = [float(s) for i, s in enumerate(layer.scale) if i not in drop_axes]
    translate = [float(t) for i, t in enumerate(layer.translate) if i not in drop_axes]
    out = {"extra_scale": tuple(scale[:-2]), "extra_translate": tuple(translate[:-2]),
           "spatial_scale": tuple(scale[-2:]), "spatial_translate": tuple(translate[-2:])}
    labels = getattr(layer, "axis_labels", None)  # napari layers have them since 0.6
    if labels is not None and len(labels) == len(layer.scale):
        kept = [str(a) for i, a in enumerate(labels) if i not in drop_axes]
        out.update(extra_labels=tuple(kept[:-2]), spatial_labels=tuple(kept[-2:]))
    return out


def join_names(names: Sequence[str], limit: int = 3) -> str:
    names = list(names)
    if len(names) <= limit:
        return " + ".join(names)
    return f"{names[0]} + … + {names[-1]} ({len(names)})"


# --- results -> layers ------------------------------------------------------------------------

def _layer_transform(spec: OutputSpec, n_inner: int, ratio: tuple[float, float] = (1.0, 1.0),
                     inner_label: str = "channel") -> dict:
    """scale/translate for a layer of extra axes + ``n_inner`` unit axes (e.g. a code channel)
    + 2 spatial axes sampled ``ratio`` times coarser than the fused image; and axis labels
    (the source layer's, with ``inner_label`` for the unit axes) so that the viewer's slider
    of such an axis says what it selects."""
    sy, sx = spec.spatial_scale
    ty, tx = spec.spatial_translate
    ry, rx = ratio
    scale = (*spec.extra_scale, *([1.0] * n_inner), sy * ry, sx * rx)
    translate = (*spec.extra_translate, *([0.0] * n_inner),
                 ty + sy * (ry - 1) / 2, tx + sx * (rx - 1) / 2)
    out = {"scale": scale, "translate": translate}
    if spec.spatial_labels is not None:
        inner = [inner_label] if n_inner == 1 else [f"{inner_label} {i}" for i in range(n_inner)]
        labels = (*spec.extra_labels, *inner, *spec.spatial_labels)
        if len(set(labels)) == len(labels):  # napari wants distinct labels
            out["axis_labels"] = labels
    return out


def result_layers(result: FusionResult, spec: OutputSpec) -> list[tuple[Any, dict, str]]:
    """LayerData tuples for the fused image, its code layers and its weight maps."""
    meta = dict(jsonable(result.metadata))
    meta.update(jsonable(spec.metadata))
    meta["role"] = "fused"
    n_extra = len(spec.extra_scale)
    image = result.image
    fused_inner = image.ndim - n_extra - (3 if spec.rgb else 2)
    fused_kwargs = {"name": spec.fused_name, "rgb": spec.rgb, "metadata": {META_KEY: meta},
                    **_layer_transform(spec, fused_inner, inner_label="band")}
    if not spec.rgb:
        fused_kwargs.update(colormap="gray", contrast_limits=(0.0, 1.0))
    out: list[tuple[Any, dict, str]] = [(image, fused_kwargs, "image")]
    sparsity = result.metadata.get("code_sparsity", {})
    mode = result.metadata.get("codes_mode", "all")
    fused_hw = image.shape[n_extra + fused_inner: n_extra + fused_inner + 2]
    for key, code in result.codes.items():
        hw = code.shape[-2:]
        ratio = (fused_hw[0] / hw[0], fused_hw[1] / hw[1])
        inner = code.ndim - n_extra - 2
        zeros = sparsity.get(key)
        label = f" ({100 * zeros:.0f}% zeros)" if zeros is not None else ""
        kind = "code summary" if mode == "summary" else "codes"
        cmeta = {"role": "codes", "code": key, "mode": mode, "sparsity": zeros,
                 "network": spec.network, "fused_layer": spec.fused_name,
                 "channel_axis": n_extra if mode == "all" else None}
        kwargs = {"name": f"{key} {kind}{label} · {spec.fused_name}",
                  "metadata": {META_KEY: jsonable(cmeta)}, "visible": False,
                  "blending": "additive",
                  **_layer_transform(spec, inner, ratio, inner_label="code channel")}
        if mode == "summary":  # a non-negative map: sequential colours from zero
            kwargs.update(colormap="magma", contrast_limits=value_limits(code))
        else:  # signed codes: diverging colours centred on zero
            kwargs.update(colormap=DIVERGING, contrast_limits=symmetric_limits(code))
        out.append((code, kwargs, "image"))
    for key, w in result.weights.items():
        inner = w.ndim - n_extra - 2
        wmeta = {"role": "weights", "weights": key, "sources": list(spec.source_names),
                 "source_axis": n_extra, "network": spec.network,
                 "fused_layer": spec.fused_name}
        out.append((w, {"name": f"{key} weights · {spec.fused_name}",
                        "metadata": {META_KEY: jsonable(wmeta)}, "visible": False,
                        "colormap": "viridis", "contrast_limits": (0.0, 1.0),
                        **_layer_transform(spec, inner, inner_label=spec.source_label)},
                    "image"))
    return out
