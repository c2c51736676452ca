"""Infrared + visible fusion (CSC-IVFN)."""

from __future__ import annotations

from magicgui.widgets import ComboBox

from ..engine import fuse_infrared_visible
from ..engine.inputs import check_same_shape
from ..engine.ivf import IVF_ALPHA
from ..engine.planes import check_leading, luminance, recolour
from ..engine.rules import RULE_HELP, RULES
from ._base import FusionWidget
from ._common import (
    code_gain_box,
    extra_shape,
    hint_default,
    layer_array,
    layer_combo,
    pick_distinct,
    read_plane,
    spatial_shape,
    transform_of,
)
from ._state import FusionJob, OutputSpec


class InfraredVisibleWidget(FusionWidget):
    """Fuse a registered infrared / visible pair (grey, or a colour visible image: its luma is
    fused and its colour kept). nD layers are fused slice by slice."""

    task = "ivf"
    network = "CSC-IVFN"
    weight_folders = True

    def make_inputs(self) -> None:
        self.ir_layer = layer_combo(self.viewer, "infrared", "the infrared (thermal) image")
        self.vis_layer = layer_combo(self.viewer, "visible", "the visible image, registered to "
                                                             "the infrared one")
        self.base_rule = ComboBox(label="base rule", choices=list(RULES), value="saliency",
                                  tooltip="fusion rule for the base (low-frequency) codes. "
                                          + RULE_HELP)
        self.detail_rule = ComboBox(label="detail rule", choices=list(RULES), value="l1",
                                    tooltip="fusion rule for the detail codes. " + RULE_HELP)
        self.code_gain = code_gain_box(IVF_ALPHA)  # the authors' 2
        self.extend([self.ir_layer, self.vis_layer, self.base_rule, self.detail_rule,
                     self.code_gain])
        hint_default(self.ir_layer, ("ir", "infra", "therm"))
        hint_default(self.vis_layer, ("vis", "rgb", "optical"))
        self._pick()

    def reset_choices(self, *args) -> None:
        super().reset_choices(*args)
        self._pick()

    def _pick(self) -> None:
        pick_distinct([self.ir_layer, self.vis_layer],
                      [("ir", "infra", "therm"), ("vis", "rgb", "optical")])

    def build_job(self) -> FusionJob:
        ir, vis = self.ir_layer.value, self.vis_layer.value
        if ir is None or vis is None:
            raise ValueError("choose an infrared and a visible image layer")
        if ir is vis:
            raise ValueError(f"infrared and visible are the same layer ({ir.name!r}); choose two "
                             f"layers")
        ir_data, vis_data = layer_array(ir, "infrared"), layer_array(vis, "visible")
        lead = check_leading({f"infrared {ir.name!r}": extra_shape(ir),
                              f"visible {vis.name!r}": extra_shape(vis)})
        check_same_shape({f"infrared {ir.name!r}": spatial_shape(ir),
                          f"visible {vis.name!r}": spatial_shape(vis)})
        ir_rgb, vis_rgb = bool(ir.rgb), bool(vis.rgb)
        base, detail, device = self.base_rule.value, self.detail_rule.value, self.device.value
        gain = float(self.code_gain.value)

        def run_plane(index, model, progress, want_codes):
            a = read_plane(ir_data, index)
            b = read_plane(vis_data, index)
            a_grey = luminance(a, "infrared") if ir_rgb else a
            b_grey = luminance(b, "visible") if vis_rgb else b
            res = fuse_infrared_visible(a_grey, b_grey, model, base_rule=base, detail_rule=detail,
                                        device=device, codes=want_codes, progress=progress,
                                        code_gain=gain)
            if vis_rgb:
                res.image = recolour(b, res.image, "visible")
                res.metadata["colour"] = "visible chroma kept (BT.601 YCbCr)"
            return res

        name = f"{ir.name} + {vis.name} ({self.network})"
        spec = OutputSpec(
            fused_name=name, network=self.network, rgb=vis_rgb, **transform_of(ir),
            source_names=[ir.name, vis.name],
            metadata={"source_layers": [ir.name, vis.name], "widget": "ivf",
                      "quality_task": "ivf"})
        return FusionJob(task=self.task, weights=self.weights.weights, device=device,
                         codes=self.codes.value, leading_shape=lead, run_plane=run_plane,
                         output=spec, key=("ivf", id(ir), id(vis)))
