"""Infrared + visible fusion (CSC-IVFN)."""

from __future__ import annotations

from ..engine import fuse_infrared_visible
from ..engine.ivf import IVF_ALPHA
from ..engine.planes import luminance, recolour
from ._base import FusionWidget
from ._common import (
    KEEP_INTENSITIES,
    check_same_slices,
    code_gain_box,
    extra_shape,
    hint_default,
    layer_array,
    layer_combo,
    pick_distinct,
    read_plane,
    rule_combo,
    rules_preset,
    spatial_shape,
    transform_of,
)
from ._state import FusionJob, OutputSpec

# An infrared layer in colour is fused as its grey (BT.601 luma) and the user is told so: thermal
# cameras often export grey values as RGB files (converted exactly); a false-colour palette is
# not a temperature scale, and its luma is only an approximation of one.
IR_COLOUR_NOTICE = ("the infrared layer {name!r} is a colour (RGB) image: its grey (luma) was "
                    "fused. Right for grey values saved as RGB; a false-colour palette does not "
                    "convert back to temperatures: use the camera's grey export if you have it")


class InfraredVisibleWidget(FusionWidget):
    """Fuse a registered infrared / visible pair (grey, or a colour visible image: its luma is
    fused and its colour kept). nD layers are fused slice by slice."""

    task = "ivf"
    network = "CSC-IVFN"
    title = "infrared + visible fusion"
    weight_folders = True
    PRESETS = {
        "Thermal surveillance": rules_preset("saliency", "l1", IVF_ALPHA),
        "Night driving": rules_preset("l1", "l1", IVF_ALPHA),
        KEEP_INTENSITIES: rules_preset("average", "l1", 1.0),
    }
    PRESET_HELP = ("Thermal surveillance: the authors' setting; warm targets are kept as salient "
                   "regions and the contrast is stretched (gain 2). Night driving: coarse and "
                   "fine structure both from whichever source is stronger there (lit road, "
                   "signs, headlights or warm bodies), contrast stretched. Keep intensities: the "
                   "sources averaged at the coarse scale and no stretch (gain 1), so the values "
                   "stay comparable to the sources'")

    def make_inputs(self) -> None:
        self.ir_layer = layer_combo(self.viewer, "infrared", "the infrared (thermal) image")
        self.vis_layer = layer_combo(self.viewer, "visible", "the visible image, registered to "
                                                             "the infrared one")
        self.base_rule = rule_combo("coarse structure", "saliency",
                                    "how the base (coarse, low-frequency) codes are combined")
        self.detail_rule = rule_combo("fine detail", "l1",
                                      "how the detail (fine, high-frequency) codes are combined")
        self.code_gain = code_gain_box(IVF_ALPHA)  # the authors' 2
        self.extend([self.ir_layer, self.vis_layer])
        self.expert = [self.base_rule, self.detail_rule, self.code_gain]
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
        lead = check_same_slices({f"infrared {ir.name!r}": (ir, extra_shape(ir)),
                                  f"visible {vis.name!r}": (vis, extra_shape(vis))})
        (h, w), (H, W) = spatial_shape(ir), spatial_shape(vis)
        if (h, w) != (H, W):
            raise ValueError(f"infrared {ir.name!r} is {h}x{w} pixels, visible {vis.name!r} "
                             f"{H}x{W}: the two must be registered images of the same size "
                             f"(register or resample one of them first)")
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
        job = FusionJob(task=self.task, weights=self.weights.weights, device=device,
                        codes=self.codes.value, leading_shape=lead, run_plane=run_plane,
                        output=spec, key=("ivf", id(ir), id(vis)))
        if ir_rgb:
            notice = IR_COLOUR_NOTICE.format(name=ir.name)
            job.notices = [notice]
            spec.metadata["infrared_colour"] = "converted to grey (BT.601 luma)"
        return job
