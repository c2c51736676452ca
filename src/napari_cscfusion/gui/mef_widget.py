"""Multi-exposure fusion (CSC-MEFN)."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import ComboBox

from ..engine import fuse_exposures
from ._base import FusionWidget
from ._common import (
    META_KEY,
    FitLabel,
    check_same_slices,
    extra_shape,
    join_names,
    layer_array,
    layer_combo,
    layer_select,
    read_plane,
    spatial_shape,
    transform_of,
)
from ._state import FusionJob, OutputSpec

STACK, LAYERS = "stack", "layers"
NO_STACK = ("no layer holds an exposure stack (images along an extra axis). Open one (File › "
            "Open Sample › CSC Fusion › Exposure bracket, or a folder of exposures), or choose "
            "'several layers' above")


def has_stack_axis(layer) -> bool:
    """The layer has an axis besides its image (and colour) axes with 2 or more planes."""
    return any(n >= 2 for n in extra_shape(layer))


class MultiExposureWidget(FusionWidget):
    """Fuse an exposure bracket, given as one stack layer (choose its exposure axis) or as
    several selected layers (grey or RGB). Further axes are fused slice by slice."""

    task = "mef"
    network = "CSC-MEFN"
    title = "exposure fusion"

    def make_inputs(self) -> None:
        self.mode = ComboBox(label="exposures from",
                             choices=[("one stack layer", STACK), ("several layers", LAYERS)],
                             value=STACK)
        self.stack_layer = layer_combo(self.viewer, "stack", "one layer holding the exposures "
                                                             "along one axis",
                                       accept=has_stack_axis)
        self.exposure_axis = ComboBox(label="exposure axis", choices=self._axis_choices,
                                      tooltip="the axis of the stack that indexes exposures")
        self.stack_hint = FitLabel(value=NO_STACK, visible=False)
        self.exposure_layers = layer_select(self.viewer, "exposures",
                                            "two or more registered exposures (a click selects "
                                            "or deselects one)")
        self.extend([self.mode, self.stack_layer, self.exposure_axis, self.stack_hint,
                     self.exposure_layers])
        self.mode.changed.connect(self._sync_mode)
        self.stack_layer.changed.connect(self._stack_changed)
        self._stack_changed()
        self._sync_mode()

    def _axis_choices(self, _w=None):
        layer = self.stack_layer.value
        if layer is None:
            return []
        shape = layer.data.shape
        n = len(shape) - (3 if layer.rgb else 2)
        return [(f"axis {i} ({shape[i]} planes)", i) for i in range(n)]

    def _stack_changed(self, *_) -> None:
        self._prefer_marked_stack()
        self.exposure_axis.reset_choices()
        layer = self.stack_layer.value
        axis = (layer.metadata.get(META_KEY, {}).get("exposure_axis")
                if layer is not None else None)
        if axis is not None and axis in self.exposure_axis.choices:
            self.exposure_axis.value = axis
        self._sync_mode()

    def _prefer_marked_stack(self) -> None:
        """A layer marked as an exposure stack (reader, sample) over any other stack."""
        current = self.stack_layer.value
        if current is not None and "exposure_axis" in current.metadata.get(META_KEY, {}):
            return
        for layer in self.stack_layer.choices:
            if layer is not None and "exposure_axis" in layer.metadata.get(META_KEY, {}):
                if layer is not current:
                    self.stack_layer.value = layer  # calls _stack_changed again
                return

    def _sync_mode(self, *_) -> None:
        stack = self.mode.value == STACK
        empty = not any(c is not None for c in self.stack_layer.choices)
        self.stack_layer.visible = stack and not empty
        self.exposure_axis.visible = stack and not empty
        self.stack_hint.visible = stack and empty
        self.exposure_layers.visible = not stack

    def reset_choices(self, *args) -> None:
        super().reset_choices(*args)
        self._stack_changed()

    def build_job(self) -> FusionJob:
        if self.mode.value == STACK:
            return self._stack_job()
        return self._layers_job()

    def _job(self, lead, read, names, ref, drop, rgb, name, meta, key) -> FusionJob:
        device = self.device.value

        def run_plane(index, model, progress, want_codes):
            stack = read(index)
            if rgb and stack.shape[-1] == 4:
                stack = stack[..., :3]  # RGBA: the alpha channel is not an exposure
            return fuse_exposures(stack, model, device=device, codes=want_codes,
                                  progress=progress)

        spec = OutputSpec(fused_name=name, network=self.network, rgb=rgb,
                          **transform_of(ref, drop), source_names=names,
                          source_label="exposure",
                          metadata={**meta, "widget": "mef", "quality_task": "mef"})
        return FusionJob(task=self.task, weights=self.weights.weights, device=device,
                         codes=self.codes.value, leading_shape=lead, run_plane=run_plane,
                         output=spec, key=key)

    def _stack_job(self) -> FusionJob:
        layer = self.stack_layer.value
        if layer is None:
            raise ValueError(NO_STACK)
        axis = self.exposure_axis.value
        if axis is None:
            raise ValueError(f"stack {layer.name!r}: a stack needs an exposure axis besides the "
                             f"image axes; its shape is {tuple(layer.data.shape)}")
        data = layer_array(layer, "stack")
        k = int(data.shape[axis])
        if k < 2:
            raise ValueError(f"stack {layer.name!r}: axis {axis} holds {k} exposure; at least 2 "
                             f"are needed")
        lead = tuple(n for i, n in enumerate(extra_shape(layer)) if i != axis)

        def read(index):
            full = index[:axis] + (slice(None),) + index[axis:]
            return np.asarray(data[full])  # (K, H, W[, 3])

        names = [f"{layer.name}[{i}]" for i in range(k)]
        meta = {"source_layers": [layer.name], "exposure_axis": int(axis)}
        return self._job(lead, read, names, layer, (axis,), bool(layer.rgb),
                         f"{layer.name} fused ({self.network})", meta, ("mef", id(layer), axis))

    def _layers_job(self) -> FusionJob:
        layers = list(self.exposure_layers.value)
        if len(layers) < 2:
            raise ValueError(f"select at least 2 exposure layers (selected: {len(layers)})")
        if len({bool(lay.rgb) for lay in layers}) > 1:
            raise ValueError("the exposures mix grey and RGB layers: "
                             + ", ".join(f"{lay.name!r} ({'RGB' if lay.rgb else 'grey'})"
                                         for lay in layers))
        datas = [layer_array(lay, "exposure") for lay in layers]
        lead = check_same_slices({repr(lay.name): (lay, extra_shape(lay)) for lay in layers})
        shapes = {lay.name: spatial_shape(lay) for lay in layers}
        if len(set(shapes.values())) > 1:
            raise ValueError("the exposures must have the same size (register them first): "
                             + ", ".join(f"{n!r} {s}" for n, s in shapes.items()))

        def read(index):
            return np.stack([read_plane(d, index) for d in datas])

        names = [lay.name for lay in layers]
        meta = {"source_layers": names}
        return self._job(lead, read, names, layers[0], (), bool(layers[0].rgb),
                         f"{join_names(names)} ({self.network})", meta,
                         ("mef",) + tuple(id(lay) for lay in layers))
