"""Guided super-resolution (CSC-MMFN)."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, SpinBox

from ..engine import fuse_guided
from ..engine.planes import downsample_area
from ._base import FusionWidget
from ._common import (
    META_KEY,
    FitLabel,
    check_same_slices,
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


class GuidedSRWidget(FusionWidget):
    """Super-resolve a low-resolution image (e.g. thermal) to the size of a registered
    high-resolution guide (e.g. visible). The low-resolution layer is given at its own
    resolution, or at full resolution with "simulate" ticked: it is then area-downsampled by the
    scale factor first (to test the method against the original)."""

    task = "mmf"
    network = "CSC-MMFN"
    title = "guided super-resolution"

    def make_inputs(self) -> None:
        self.low_layer = layer_combo(self.viewer, "low-res", "the image to super-resolve")
        self.guide_layer = layer_combo(self.viewer, "guide", "the high-resolution guide "
                                                             "(grey or RGB), registered")
        self.bands = CheckBox(text="low-res layer has a band axis (C, h, w)", value=False,
                              tooltip="for multi-band networks (e.g. the authors' 31-band "
                                      "hyperspectral model): the axis before the image axes "
                                      "holds the bands")
        self.simulate = CheckBox(text="simulate: downsample the low-res layer first",
                                 value=False, tooltip="the low-res layer is at full resolution: "
                                 "area-downsample it by the scale factor, then super-resolve")
        self.factor = SpinBox(label="scale factor", value=4, min=2, max=16,
                              tooltip="downsampling factor used by 'simulate'")
        self.scale_info = FitLabel(value="")
        self.extend([self.low_layer, self.guide_layer, self.simulate, self.factor,
                     self.scale_info])
        self.expert = [self.bands]
        for w in (self.low_layer, self.guide_layer, self.simulate, self.factor, self.bands):
            w.changed.connect(self._update_info)
        hint_default(self.low_layer, ("low", "lr", "ir", "therm"))
        hint_default(self.guide_layer, ("guide", "vis", "rgb"))
        self._pick()
        self._update_info()

    def reset_choices(self, *args) -> None:
        super().reset_choices(*args)
        self._pick()
        self._update_info()

    def _pick(self) -> None:
        pick_distinct([self.low_layer, self.guide_layer],
                      [("low", "lr", "ir", "therm"), ("guide", "vis", "rgb")])

    def _update_info(self, *_) -> None:
        self.factor.enabled = bool(self.simulate.value)
        low, guide = self.low_layer.value, self.guide_layer.value
        if low is None or guide is None or low is guide:
            self.scale_info.value = ""
            return
        h, w = spatial_shape(low)
        if self.simulate.value:
            f = int(self.factor.value)
            h, w = h // f, w // f
        H, W = spatial_shape(guide)
        if h and w:
            self.scale_info.value = f"{h}x{w} → {H}x{W} (×{H / h:.3g}, ×{W / w:.3g})"

    def build_job(self) -> FusionJob:
        low, guide = self.low_layer.value, self.guide_layer.value
        if low is None or guide is None:
            raise ValueError("choose a low-resolution layer and a guide layer")
        if low is guide:
            raise ValueError(f"low-res and guide are the same layer ({low.name!r})")
        low_data, guide_data = layer_array(low, "low-res"), layer_array(guide, "guide")
        low_rgb, guide_rgb = bool(low.rgb), bool(guide.rgb)
        bands = bool(self.bands.value) and not low_rgb
        if bands and low_data.ndim < 3:
            raise ValueError(f"low-res {low.name!r}: 'band axis' needs a (C, h, w) layer, got "
                             f"shape {tuple(low_data.shape)}")
        low_lead = extra_shape(low, keep=1 if bands else 0)
        lead = check_same_slices({f"low-res {low.name!r}": (low, low_lead),
                                  f"guide {guide.name!r}": (guide, extra_shape(guide))})
        simulate = bool(self.simulate.value)
        factor = int(self.factor.value)
        h, w = spatial_shape(low)
        if simulate and (h // factor < 4 or w // factor < 4):
            raise ValueError(f"low-res {low.name!r}: {h}x{w} downsampled by {factor} leaves "
                             f"fewer than 4x4 pixels")
        device = self.device.value

        def run_plane(index, model, progress, want_codes):
            bands = model.network.lr_channels
            if low_rgb and bands != 3:  # the engine would read the 3 colours as 3 planes
                raise ValueError(
                    f"the low-res layer {low.name!r} is a colour (RGB) image, but these weights "
                    f"super-resolve {bands} band{'s' if bands > 1 else ''} (a grey image for "
                    f"the packaged ones): use a grey layer (e.g. the camera's grey export, or "
                    f"one colour channel), or weights trained on colour images")
            lr = read_plane(low_data, index)
            if low_rgb:
                lr = np.moveaxis(lr[..., :3], -1, 0)  # (3, h, w): channels first
            if simulate:
                lr = downsample_area(lr, factor)
            g = read_plane(guide_data, index)
            if guide_rgb:
                g = g[..., :3]
            res = fuse_guided(lr, g, model, device=device, codes=want_codes, progress=progress)
            if low_rgb:
                res.image = np.moveaxis(res.image, 0, -1)
            return res

        name = f"{low.name} guided by {guide.name} ({self.network})"
        meta = {"source_layers": [low.name, guide.name], "widget": "mmf", "quality_task": "mmf",
                "simulated_downsampling": factor if simulate else None}
        reference = low.name if simulate else low.metadata.get(META_KEY, {}).get("reference")
        if reference:
            meta["reference_layer"] = reference
        spec = OutputSpec(fused_name=name, network=self.network, rgb=low_rgb,
                          channel_axis_first=bands, **transform_of(guide),
                          source_names=[low.name, guide.name], metadata=meta)
        return FusionJob(task=self.task, weights=self.weights.weights, device=device,
                         codes=self.codes.value, leading_shape=lead, run_plane=run_plane,
                         output=spec, key=("mmf", id(low), id(guide), simulate, factor))
