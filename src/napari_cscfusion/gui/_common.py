"""Parts shared by the fusion widgets: layer pickers, option widgets (weights, device, codes),
reading planes out of layers, and turning a FusionResult into napari layers.

Pure layer plumbing: every computation on pixel values lives in the engine
(``napari_cscfusion.engine`` and ``engine.planes``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
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

CODE_CHOICES = [("don't show", "none"), ("one activity map per code", "summary"),
                ("every code channel", "all")]

# The fusion rules (engine.rules.RULES) as a scientist reads them. They cost about the same
# time: the network, not the rule, takes most of a run (a TNO pair on a quiet CPU: saliency
# 8.0 s, l1 6.7 s, average 6.5 s, issue 19), so the help says nothing about speed.
RULE_CHOICES = [("keep salient regions", "saliency"), ("keep the stronger detail", "l1"),
                ("average the sources", "average"),
                ("keep the source that is not black", "choose-max"),
                ("keep the stronger detail, black as zero", "l1-black")]
RULE_HELP = ("how the sources' codes are combined. keep salient regions: the authors' rule for "
             "the base (coarse) codes, weights from a saliency map smoothed by a guided filter; "
             "keep the stronger detail: each source weighed by its local code activity (the "
             "authors' rule for the detail codes); average the sources: equal weights; keep "
             "the source that is not black: per pixel the source whose codes are farthest from "
             "those of a black image (the medical default for the coarse codes: in a scan black "
             "is 'nothing here'); keep the stronger detail, black as zero: activity measured "
             "from a black image's codes (the medical default for the fine codes). They take "
             "about the same time")

# Roles of the layers this plugin adds: not offered as inputs of a fusion
OUTPUT_ROLES = frozenset({"fused", "codes", "weights"})
STATUS_CHARS = 300  # longer status text is cut (the whole text is in the tooltip)

# Diverging map centred on zero, dark in the middle so that the zeros of a sparse code read as
# background on napari's dark canvas: negative blue, positive orange.
DIVERGING = Colormap(
    colors=[[0.25, 0.65, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.55, 0.1, 1.0]],
    controls=[0.0, 0.5, 1.0], name="cscfusion_diverging", display_name="CSC codes (diverging)")


# --- layer pickers --------------------------------------------------------------------------

def image_layers(viewer) -> list[Image]:
    return [lay for lay in viewer.layers if isinstance(lay, Image)]


def is_output(layer) -> bool:
    """A layer this plugin added as a result (fused image, codes, weight maps)."""
    return layer.metadata.get(META_KEY, {}).get("role") in OUTPUT_ROLES


def input_layers(viewer) -> list[Image]:
    """The image layers a fusion may take as sources: not the plugin's own outputs."""
    return [lay for lay in image_layers(viewer) if not is_output(lay)]


def narrow_combo(combo: ComboBox, chars: int = 14) -> ComboBox:
    """Keep a ComboBox from widening the dock to its longest item (the list that drops down
    shows the whole names; the current one is also the tooltip)."""
    from qtpy.QtWidgets import QComboBox, QSizePolicy

    q = combo.native
    q.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    q.setMinimumContentsLength(chars)
    q.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
    base = combo.tooltip or ""

    def tip(*_):
        q.setToolTip(f"{q.currentText()}\n\n{base}" if q.currentText() else base)

    q.currentTextChanged.connect(tip)
    tip()
    return combo


def narrow_select(select: Select, theme: str = "dark") -> Select:
    """A Select where a click toggles a layer (no ctrl needed) and each layer shows a tick box
    of its state, that elides long names (whole name in each item's tooltip) instead of
    widening the dock. The boxes only show the selection (they are not user-checkable
    themselves: a click on one toggles the selection like a click on the name)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QAbstractItemView, QSizePolicy

    q = select.native
    q.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
    q.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    q.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    q.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    q.setMaximumHeight(110)

    def ticks(*_):
        for i in range(q.count()):
            item = q.item(i)
            item.setToolTip(item.text())
            state = Qt.CheckState.Checked if item.isSelected() else Qt.CheckState.Unchecked
            if item.data(Qt.ItemDataRole.CheckStateRole) != state:
                item.setData(Qt.ItemDataRole.CheckStateRole, state)

    q.model().rowsInserted.connect(ticks)
    q.itemSelectionChanged.connect(ticks)
    select.changed.connect(ticks)  # a value set in code may select with signals blocked
    ticks()
    # napari's style sheet draws ticks for check boxes only: the same for these boxes
    from napari.utils.theme import get_theme
    check = f"theme_{get_theme(theme).id}:/check.svg"
    q.setStyleSheet(f'QListWidget::indicator:checked {{ image: url("{check}"); }}')
    return select


def layer_combo(viewer, label: str, tooltip: str = "", *, inputs_only: bool = True,
                accept: Callable[[Image], bool] | None = None) -> ComboBox:
    """A ComboBox of the viewer's image layers (``inputs_only``: not the plugin's outputs;
    ``accept``: only layers it accepts). Its choices follow layers added, removed and renamed:
    napari calls ``reset_choices`` of docked magicgui widgets on those events."""
    def choices(_w):
        layers = input_layers(viewer) if inputs_only else image_layers(viewer)
        return [(lay.name, lay) for lay in layers if accept is None or accept(lay)]

    return narrow_combo(ComboBox(label=label, tooltip=tooltip, nullable=False, choices=choices))


def layer_select(viewer, label: str, tooltip: str = "") -> Select:
    """Several input layers: a click selects or deselects one."""
    return narrow_select(Select(label=label, tooltip=tooltip,
                                choices=lambda _w: [(lay.name, lay)
                                                    for lay in input_layers(viewer)]),
                         theme=getattr(viewer, "theme", "dark"))


def rule_combo(label: str, value: str, what: str) -> ComboBox:
    return narrow_combo(ComboBox(label=label, choices=RULE_CHOICES, value=value,
                                 tooltip=f"{what}: {RULE_HELP}"))


CODE_GAIN_HELP = ("how strongly the fused image is drawn from the network's codes. 2: the "
                  "authors' infrared/visible setting, which stretches the contrast (packaged "
                  "weights: about the scene's mean grey); 1: the fused "
                  "image keeps the sources' intensity scale (an image fused with itself comes "
                  "back unchanged), for quantitative images such as MRI, CT or PET; below 1 "
                  "(packaged weights): the image fades towards black, black stays black")


def code_gain_box(value: float) -> FloatSpinBox:
    """The contrast gain of the CSC-IVFN widgets (passed to the engine as code_gain)."""
    return FloatSpinBox(label="contrast gain", value=value, min=0.1, max=4.0, step=0.1,
                        tooltip=CODE_GAIN_HELP)


def rules_preset(base_rule: str, detail_rule: str, code_gain: float) -> dict:
    """The expert fields a preset of the CSC-IVFN widgets sets (attribute -> value)."""
    return {"base_rule": base_rule, "detail_rule": detail_rule, "code_gain": code_gain}


# the same in every CSC-IVFN widget: an image fused with itself comes back unchanged
KEEP_INTENSITIES = "Keep intensities (quantitative)"


def weight_maps_box() -> CheckBox:
    return CheckBox(text="show weight maps", value=False,
                    tooltip="add, for each source, a map of how much of it went into each pixel "
                            "of the result (0: none, 1: all of it; one pixel's maps add up to 1)")


WEIGHTS_LEGEND = ("weight maps (hidden layers, with a colour bar): dark 0 = none of this source, "
                  "bright 1 = all of it")


# --- messages ---------------------------------------------------------------------------------

# argument names the engine starts its messages with: they mean nothing in the GUI
_ARGUMENT_PREFIX = re.compile(r"^(images|stack|low_res|guide|ir|vis|sources): ")


def plain_message(exc: BaseException | str) -> str:
    """An exception's text for a user of the GUI (without the API's argument names)."""
    msg = str(exc) or type(exc).__name__
    return _ARGUMENT_PREFIX.sub("", msg)


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def layer_shape_text(layer) -> str:
    """How a layer looks to its user: '85x128 colour image', 'stack of 3 images of 85x128'."""
    shape = tuple(int(n) for n in layer.data.shape)
    hw = shape[-3:-1] if layer.rgb else shape[-2:]
    extra = shape[: len(shape) - (3 if layer.rgb else 2)]
    kind = "colour image" if layer.rgb else "image"
    if not extra:
        return f"one {hw[0]}x{hw[1]} {kind}"
    return f"{' x '.join(map(str, extra))} {kind}s of {hw[0]}x{hw[1]} (shape {shape})"


def check_same_slices(named: dict[str, tuple[Image, tuple[int, ...]]]) -> tuple[int, ...]:
    """The common extra (time, z, ...) axes of the sources (name -> (layer, extra shape)), or a
    ValueError saying in plain words what differs and what to do."""
    shapes = {n: tuple(extra) for n, (_l, extra) in named.items()}
    if len(set(shapes.values())) <= 1:
        return next(iter(shapes.values())) if shapes else ()
    listing = "; ".join(f"{n} is {layer_shape_text(lay)}" for n, (lay, _e) in named.items())
    hint = ""
    if any(len(e) == 1 and e[0] in (3, 4) for e in shapes.values()):
        hint = (" A first axis of 3 or 4 may be colour channels stored first: napari shows "
                "colour only when they are last (move the axis, e.g. np.moveaxis(data, 0, -1)).")
    raise ValueError(f"the sources do not match: {listing}. Choose layers with the same number "
                     f"of slices (or single images).{hint}")


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
    return narrow_combo(ComboBox(label="device", choices=["auto", *available_devices()],
                                 value="auto", tooltip="auto: CUDA, then Apple MPS, then the "
                                                       "CPU"))


def codes_combo() -> ComboBox:
    return narrow_combo(ComboBox(
        label="network codes", choices=CODE_CHOICES, value="none",
        tooltip="add what the network computed from each source as hidden layers: nothing, one "
                "activity map per code (per pixel, the sum of the code channels' magnitudes), "
                "or every code channel (a slider picks the channel; memory-hungry)"))


class FitLabel(Label):
    """A label for text of any length that never widens its dock: the text wraps (a very long
    one is cut) and the whole text is its tooltip."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QSizePolicy

        q = self.native
        q.setWordWrap(True)
        q.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        q.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.value = kwargs.get("value", "")

    @property
    def value(self) -> str:
        return self._full_text

    @value.setter
    def value(self, text) -> None:
        self._full_text = str(text)
        shown = self._full_text
        if len(shown) > STATUS_CHARS:
            shown = shown[: STATUS_CHARS - 1] + "…"
        self.native.setText(shown)
        self.native.setToolTip(self._full_text)


def status_label() -> FitLabel:
    return FitLabel(value="")


def fit_dock_to_title(widget: Container) -> None:
    """Once ``widget`` is shown in a dock, make the dock at least as wide as its title bar
    needs: the widget itself asks for little width (long texts wrap or elide), which would
    leave napari's dock title cut."""
    from qtpy.QtCore import QEvent, QObject
    from qtpy.QtWidgets import QDockWidget

    class _Fit(QObject):
        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.Show:
                dock = obj.parentWidget()
                while dock is not None and not isinstance(dock, QDockWidget):
                    dock = dock.parentWidget()
                bar = dock.titleBarWidget() if dock is not None else None
                if bar is not None:  # napari's title bar is a QLabel holding a layout
                    need = max(bar.sizeHint().width(),
                               bar.layout().sizeHint().width() if bar.layout() else 0)
                    dock.setMinimumWidth(max(dock.minimumWidth(), need))
            return False

    widget.native.installEventFilter(_Fit(widget.native))  # the filter lives with the widget


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


def _code_activation(key: str, kinds: dict) -> str | None:
    """The activation (metadata 'code_activation': 'PReLU', 'sparse', ...) of the code named
    ``key`` ('infrared_base' -> kind 'base', 'exposure_2' -> 'exposure', 'fused' -> 'fused')."""
    for kind, activation in kinds.items():
        if key == kind or key.endswith("_" + kind) or key.startswith(kind + "_"):
            return activation
    return None


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
    fused_name = spec.fused_name
    mode = result.metadata.get("codes_mode", "all")
    fused_hw = image.shape[n_extra + fused_inner: n_extra + fused_inner + 2]
    for key, code in result.codes.items():
        hw = code.shape[-2:]
        ratio = (fused_hw[0] / hw[0], fused_hw[1] / hw[1])
        inner = code.ndim - n_extra - 2
        zeros = sparsity.get(key)
        # what makes the codes (PReLU: the IVF base encoder, dense by design; sparse: soft
        # thresholds >= 0) and, for the codes that are sparse, how sparse
        activation = _code_activation(key, result.metadata.get("code_activation") or {})
        label = f", {activation}" if activation else ""
        label += f", {100 * zeros:.0f}% zero" if zeros is not None and zeros >= 0.005 else ""
        kind = "activity" if mode == "summary" else "codes"
        cmeta = {"role": "codes", "code": key, "mode": mode, "sparsity": zeros,
                 "activation": activation,
                 "network": spec.network, "fused_layer": fused_name,
                 "channel_axis": n_extra if mode == "all" else None}
        kwargs = {"name": f"{plain_key(key)} {kind}{label} · {fused_name}",
                  "metadata": {META_KEY: jsonable(cmeta)}, "visible": False,
                  "blending": "additive",
                  **_layer_transform(spec, inner, ratio, inner_label="code channel")}
        if mode == "summary":  # a non-negative map: sequential colours from zero
            kwargs.update(colormap="magma", contrast_limits=value_limits(code))
        else:  # signed codes: diverging colours centred on zero
            kwargs.update(colormap=DIVERGING, contrast_limits=symmetric_limits(code))
        out.append((code, kwargs, "image"))
    if not spec.weight_maps:
        return out
    for key, w in result.weights.items():
        # one layer per source: a source axis would add a slider to every 2-D run
        names = list(spec.source_names) or [f"{spec.source_label} {i}"
                                             for i in range(w.shape[n_extra])]
        for s, source in enumerate(names):
            ws = np.take(w, s, axis=n_extra)
            inner = ws.ndim - n_extra - 2
            wmeta = {"role": "weights", "weights": key, "source": source, "source_index": s,
                     "sources": list(names), "network": spec.network, "fused_layer": fused_name}
            what = f"{key} weight" if key in ("base", "detail") else "weight"
            out.append((ws, {"name": f"{what} of {source} · {fused_name}",
                             "metadata": {META_KEY: jsonable(wmeta)}, "visible": False,
                             "colormap": "viridis", "contrast_limits": (0.0, 1.0),
                             **_layer_transform(spec, inner, inner_label="band")},
                        "image"))
    return out


def plain_key(key: str) -> str:
    """An engine key as a name: 'infrared_base' -> 'infrared base', 'exposures' kept."""
    return key.replace("_", " ")
