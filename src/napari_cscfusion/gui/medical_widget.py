"""Medical / multi-modal fusion (CSC-IVFN): 2+ registered layers (MRI, CT, and at most one
pseudo-coloured PET/SPECT layer), 2D or volumes fused slice by slice along a chosen axis, with an
alignment check and an optional rigid registration that adds a new layer.

Layer plumbing only: values are normalised and fused by ``engine.medical``; the alignment check
and the registration are ``engine.alignment``.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info, show_warning

from ..engine.alignment import (
    DEFAULT_TOLERANCE_PX,
    apply_rigid,
    apply_rigid_planes,
    estimate_misalignment,
)
from ..engine.ivf import IVF_ALPHA
from ..engine.medical import (
    MEDICAL_BASE_RULE,
    MEDICAL_CODE_GAIN,
    MEDICAL_DETAIL_RULE,
    MedicalVolume,
)
from ._base import FusionWidget
from ._common import (
    KEEP_INTENSITIES,
    META_KEY,
    FitLabel,
    code_gain_box,
    input_layers,
    join_names,
    jsonable,
    layer_array,
    layer_combo,
    layer_select,
    rule_combo,
    rules_preset,
    transform_of,
)
from ._state import FusionJob, OutputSpec

NO_AXIS = -1  # slice-axis choice for 2D layers


def _spatial_ndim(layer) -> int:
    return layer.data.ndim - (1 if layer.rgb else 0)


class MedicalFusionWidget(FusionWidget):
    """Fuse two or more registered medical layers; check and fix their alignment first."""

    task = "medical"  # packaged medical.pt, a CSC-IVFN
    network = "CSC-IVFN"
    title = "medical fusion"
    weight_folders = True
    PRESETS = {
        "MRI + CT, PET or SPECT": rules_preset(MEDICAL_BASE_RULE, MEDICAL_DETAIL_RULE,
                                               MEDICAL_CODE_GAIN),
        KEEP_INTENSITIES: rules_preset("average", "l1", 1.0),
        "Stretch contrast (as infrared + visible)": rules_preset("saliency", "l1", IVF_ALPHA),
    }
    PRESET_HELP = ("MRI + CT, PET or SPECT: per pixel the coarse structure of the source "
                   "that is not black there, fine detail from the stronger source (bone from "
                   "CT, soft tissue from MRI, uptake from PET), the colour of the functional "
                   "layer kept, intensities on the sources' scale (gain 1). Keep intensities: "
                   "the sources averaged at the coarse scale, gain 1. Stretch contrast: the "
                   "authors' infrared + visible setting (gain 2)")

    def make_inputs(self) -> None:
        self.sources = layer_select(self.viewer, "sources",
                                    "two or more registered layers (a click selects or deselects "
                                    "one): grey images or volumes (MRI, CT) and at most one "
                                    "colour (pseudo-coloured PET/SPECT) layer, whose colour is "
                                    "kept")
        self.base_rule = rule_combo("coarse structure", MEDICAL_BASE_RULE,
                                    "how the base (coarse) codes are combined")
        self.detail_rule = rule_combo("fine detail", MEDICAL_DETAIL_RULE,
                                      "how the detail (fine) codes are combined")
        self.code_gain = code_gain_box(MEDICAL_CODE_GAIN)  # 1: the sources' intensity scale
        self.slice_axis = ComboBox(label="slice axis", choices=self._axis_choices,
                                   tooltip="volumes are fused one 2D plane at a time: the axis "
                                           "the planes are stacked along (e.g. 0 = axial "
                                           "planes of a (z, y, x) volume)")
        self.reference = layer_combo(self.viewer, "reference",
                                     "the fixed layer of the alignment check and registration")
        self.check_first = CheckBox(text="check alignment before fusing", value=True)
        self.tolerance = FloatSpinBox(label="tolerance (px)", value=DEFAULT_TOLERANCE_PX,
                                      min=0.0, max=100.0, step=0.5,
                                      tooltip="warn when a source is further than this from the "
                                              "reference (RMS over the reference's anatomy)")
        self.check_button = PushButton(text="Check alignment")
        self.register_button = PushButton(text="Register to reference")
        self.alignment_status = FitLabel(value="")
        row = Container(widgets=[self.check_button, self.register_button], layout="horizontal",
                        labels=False)
        row.margins = (0, 0, 0, 0)
        self.extend([self.sources, self.slice_axis, self.reference, self.check_first, row,
                     self.alignment_status])
        self.expert = [self.base_rule, self.detail_rule, self.code_gain, self.tolerance]
        self.sources.changed.connect(self._sources_changed)
        self.check_button.changed.connect(self.check_alignment)
        self.register_button.changed.connect(self.register)
        self.alignment_worker = None  # the last check/registration worker
        self._alignment_busy = False  # a check or registration is running
        self.last_alignment: dict = {}  # moving layer name -> estimate of the last check
        self.last_registered: list = []  # layers added by the last registration
        self._preselected = False  # the sources were chosen once (by us or the user)
        self._preselect()
        self._sources_changed()

    @property
    def busy(self) -> bool:
        """True while an alignment check, a registration or a fusion run is under way."""
        return self._alignment_busy or self.running

    # --- choices ----------------------------------------------------------------------------
    def _axis_choices(self, _w=None):
        layers = list(self.sources.value) if hasattr(self, "sources") else []
        if not layers:
            return [("(2D images)", NO_AXIS)]
        lay = layers[0]
        nsp = _spatial_ndim(lay)
        if nsp <= 2:
            return [("(2D images)", NO_AXIS)]
        shape = lay.data.shape
        return [(f"axis {i} ({shape[i]} slices)", i) for i in range(nsp)]

    def _sources_changed(self, *_) -> None:
        self.slice_axis.reset_choices()
        layers = list(self.sources.value)
        if layers and _spatial_ndim(layers[0]) > 2:
            self.slice_axis.value = _spatial_ndim(layers[0]) - 3
        if layers and self.reference.value not in layers:
            self.reference.value = layers[0]

    def _preselect(self) -> None:
        """Until sources are chosen: select every input layer once there are two or more that
        can be fused together (at most one in colour)."""
        if self._preselected:
            return
        if list(self.sources.value):
            self._preselected = True
            return
        layers = input_layers(self.viewer)
        if len(layers) >= 2 and sum(bool(lay.rgb) for lay in layers) <= 1:
            self.sources.value = layers
            self._preselected = True

    def reset_choices(self, *args) -> None:
        super().reset_choices(*args)
        self._preselect()
        self._sources_changed()

    def check_sources(self, layers) -> None:
        """Input problems the user can fix, in plain words, before any check or run."""
        shapes = {lay.name: tuple(int(n) for n in lay.data.shape[:_spatial_ndim(lay)])
                  for lay in layers}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                "the sources differ in size ("
                + ", ".join(f"{n!r} {'x'.join(map(str, s))}" for n, s in shapes.items())
                + "): fusion needs them on one pixel grid. Choose the reference and click "
                  "'Register to reference': it resamples the others onto the reference's grid")
        colour = [lay.name for lay in layers if lay.rgb]
        if len(colour) > 1:
            raise ValueError(f"at most one colour (PET/SPECT) layer can be fused, its colour is "
                             f"kept; {len(colour)} are selected: "
                             + ", ".join(map(repr, colour)))
        if len(colour) == len(layers):
            raise ValueError("select at least one grey (anatomical) layer besides the colour one")

    # --- fusion -------------------------------------------------------------------------------
    def _selected(self) -> list:
        layers = list(self.sources.value)
        if len(layers) < 2:
            raise ValueError(f"sources: select at least 2 layers (selected: {len(layers)})")
        return layers

    def _axis(self, layers):
        axis = self.slice_axis.value
        return None if _spatial_ndim(layers[0]) <= 2 or axis in (None, NO_AXIS) else int(axis)

    def build_job(self) -> FusionJob:
        layers = self._selected()
        scales = {lay.name: tuple(float(s) for s in lay.scale) for lay in layers}
        if len(set(scales.values())) > 1:
            raise ValueError("sources: the layers have different pixel sizes (scale) "
                             + ", ".join(f"{n!r} {s}" for n, s in scales.items())
                             + "; resample them onto one grid first")
        data = {lay.name: layer_array(lay, "source") for lay in layers}
        axis = self._axis(layers)
        volume = MedicalVolume(data, rgb=[bool(lay.rgb) for lay in layers], axis=axis)
        plane_axes = volume.plane_axes
        device = self.device.value
        run_plane = partial(volume.fuse_plane, base_rule=self.base_rule.value,
                            detail_rule=self.detail_rule.value, device=device,
                            code_gain=float(self.code_gain.value))

        names = volume.names
        colour = [lay.name for lay in layers if lay.rgb]
        ref = layers[0]
        spec = OutputSpec(
            fused_name=f"{join_names(names)} ({self.network})", network=self.network,
            rgb=bool(colour), **transform_of(ref), source_names=names,
            metadata={"source_layers": names, "widget": "medical", "quality_task": "medical",
                      "slice_axis": axis, "plane_axes": list(plane_axes)
                      if volume.loop_axes else None, "colour_layer":
                      colour[0] if colour else None})
        job = FusionJob(task=self.task, weights=self.weights.weights, device=device,
                        codes=self.codes.value, leading_shape=volume.loop_shape,
                        run_plane=run_plane, output=spec, finish=volume.source_order,
                        key=("medical", axis) + tuple(id(lay) for lay in layers))
        return job

    def run(self, *_) -> None:
        """Run the fusion; with "check alignment before fusing", check first (in the
        background) and warn about misaligned sources, then fuse anyway."""
        if self.busy:
            return
        try:
            self.check_sources(self._selected())
        except Exception as exc:  # sizes first: a size error is no misalignment
            self._fail(exc)
            return
        if not self.check_first.value:
            super().run()
            return
        try:
            pairs = self._alignment_pairs()
        except Exception:  # build_job reports input problems
            super().run()
            return
        self._start_alignment(pairs, register=False, then_fuse=True)

    # --- alignment ----------------------------------------------------------------------------
    def _plane_of(self, layer, axes_layer):
        """(index, plane axes) of the slice shown in the viewer, in ``layer``'s data."""
        nsp = _spatial_ndim(layer)
        if nsp <= 2:
            return (), (0, 1)
        axis = self._axis(axes_layer)
        if axis is None:
            axis = nsp - 3
        plane = tuple(a for a in range(nsp) if a != axis)[-2:]
        point = layer.world_to_data(self.viewer.dims.point)
        index = []
        for a in range(nsp):
            if a in plane:
                index.append(slice(None))
            else:
                index.append(int(np.clip(round(float(point[a])), 0, layer.data.shape[a] - 1)))
        return tuple(index), plane

    def _alignment_pairs(self) -> list:
        layers = list(self.sources.value)
        ref = self.reference.value
        if ref is None:
            raise ValueError("reference: choose the fixed layer")
        moving = [lay for lay in layers if lay is not ref]
        if not moving:
            raise ValueError("sources: select at least one layer besides the reference")
        ref_index, ref_plane = self._plane_of(ref, [ref])
        pairs = []
        for lay in moving:
            idx, plane = self._plane_of(lay, [ref])
            if _spatial_ndim(lay) != _spatial_ndim(ref):
                raise ValueError(f"{lay.name!r} has {_spatial_ndim(lay)} spatial axes, the "
                                 f"reference {ref.name!r} {_spatial_ndim(ref)}")
            s_ref = np.asarray(ref.scale)[list(ref_plane)]
            s_mov = np.asarray(lay.scale)[list(plane)]
            if not np.allclose(s_ref, s_mov):
                raise ValueError(f"{lay.name!r} has another pixel size than {ref.name!r} "
                                 f"({tuple(s_mov)} vs {tuple(s_ref)}): resample it first")
            offset = ((np.asarray(lay.translate)[list(plane)]
                       - np.asarray(ref.translate)[list(ref_plane)]) / s_ref)
            pairs.append({"fixed": ref, "moving": lay, "fixed_index": ref_index,
                          "moving_index": idx, "plane_axes": plane,
                          "offset": tuple(float(o) for o in offset)})
        return pairs

    def check_alignment(self, *_) -> None:
        try:
            pairs = self._alignment_pairs()
        except Exception as exc:
            self._alignment_failed(exc)
            return
        self._start_alignment(pairs, register=False, then_fuse=False)

    def register(self, *_) -> None:
        try:
            pairs = self._alignment_pairs()
        except Exception as exc:
            self._alignment_failed(exc)
            return
        self._start_alignment(pairs, register=True, then_fuse=False)

    def _start_alignment(self, pairs, register: bool, then_fuse: bool) -> None:
        tol = float(self.tolerance.value)
        jobs = []
        for p in pairs:
            fixed_plane = self._read(p["fixed"], p["fixed_index"], p["plane_axes"])
            moving_plane = self._read(p["moving"], p["moving_index"], p["plane_axes"])
            jobs.append((p, fixed_plane, moving_plane))

        def work():
            out = []
            for p, f, m in jobs:
                est = estimate_misalignment(f, m, tol, moving_offset=p["offset"])
                data = None
                if register:
                    lay = p["moving"]
                    if _spatial_ndim(lay) > 2:
                        data = apply_rigid_planes(lay.data, est, p["plane_axes"],
                                                  rgb=bool(lay.rgb), preserve_dtype=True)
                    else:
                        data = apply_rigid(np.asarray(lay.data), est, f.shape[:2],
                                           preserve_dtype=True)
                    est["residual"] = estimate_misalignment(
                        f, self._read_array(data, p["moving_index"], p["plane_axes"],
                                            bool(lay.rgb)), tol)
                out.append((p, est, data))
            return out

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda out: self._alignment_done(out, register, then_fuse))
        worker.errored.connect(lambda exc: self._alignment_error(exc, then_fuse))
        self.alignment_worker = worker
        self._alignment_busy = True
        self.check_button.enabled = self.register_button.enabled = False
        self.alignment_status.value = ("registering…" if register else "checking alignment…")
        worker.start()

    @staticmethod
    def _read_array(data, index, plane_axes, rgb: bool) -> np.ndarray:
        plane = np.asarray(data[index] if index else data)
        if plane_axes[0] > plane_axes[1]:
            plane = np.swapaxes(plane, 0, 1)
        return plane

    def _read(self, layer, index, plane_axes) -> np.ndarray:
        return self._read_array(layer.data, index, plane_axes, bool(layer.rgb))

    def _alignment_failed(self, exc: BaseException) -> None:
        msg = str(exc) or type(exc).__name__
        show_warning(msg)
        self.alignment_status.value = f"alignment: {msg}"

    def _alignment_error(self, exc: BaseException, then_fuse: bool) -> None:
        self.check_button.enabled = self.register_button.enabled = True
        self._alignment_failed(exc)
        self._alignment_finished(then_fuse)

    def _alignment_finished(self, then_fuse: bool) -> None:
        # fusion (if asked for) starts before the busy flag drops: no idle gap in between
        if then_fuse:
            FusionWidget.run(self)
        self._alignment_busy = False

    def _alignment_done(self, out, register: bool, then_fuse: bool) -> None:
        self.check_button.enabled = self.register_button.enabled = True
        lines, bad = [], []
        self.last_alignment = {}
        for p, est, _data in out:
            name = p["moving"].name
            self.last_alignment[name] = est
            dy, dx = est["shift"]
            state = "aligned" if est["aligned"] else "MISALIGNED"
            lines.append(f"{name}: {est['error_px']:.1f} px off {p['fixed'].name} ({state}; "
                         f"shift {dy:+.1f}, {dx:+.1f} px, rotation {est['rotation_deg']:+.1f}°)")
            if not est["aligned"]:
                bad.append(f"{name!r} ({est['error_px']:.1f} px)")
        if register:
            self._add_registered(out)
            lines.append("registered: " + ", ".join(
                f"{lay.name} (residual {est['residual']['error_px']:.2f} px)"
                for lay, (_p, est, _d) in zip(self.last_registered, out, strict=True)))
        self.alignment_status.value = "\n".join(lines)
        if register and self.status.value.startswith("error"):
            self.status.value = "registered: ready to fuse"  # the old error no longer holds
            self.progress.value = 0
        if bad and not register:
            show_warning(f"{', '.join(bad)} misaligned with "
                         f"{out[0][0]['fixed'].name!r} by more than "
                         f"{float(self.tolerance.value):.1f} px; fusion assumes registered "
                         f"sources: use 'Register to reference' first")
        elif not register:
            show_info(f"sources aligned within "
                      f"{float(self.tolerance.value):.1f} px")
        self._alignment_finished(then_fuse)

    def _add_registered(self, out) -> None:
        added = []
        for p, est, data in out:
            fixed, moving = p["fixed"], p["moving"]
            t = {k: v for k, v in est.items() if k != "residual"}
            meta = {"role": "registered", "fixed_layer": fixed.name,
                    "moving_layer": moving.name, "transform": jsonable(t),
                    "residual_error_px": est["residual"]["error_px"],
                    "plane_axes": list(p["plane_axes"])}
            # the planes now lie on the reference's pixel grid; other axes stay the moving's
            scale, translate = list(moving.scale), list(moving.translate)
            for a in p["plane_axes"]:
                scale[a], translate[a] = fixed.scale[a], fixed.translate[a]
            kwargs = {"name": f"{moving.name} registered to {fixed.name}", "rgb": moving.rgb,
                      "scale": scale, "translate": translate,
                      "metadata": {META_KEY: meta}}
            if not moving.rgb:
                kwargs.update(colormap=moving.colormap, contrast_limits=moving.contrast_limits)
            added.append(self.viewer.add_image(data, **kwargs))
        self.last_registered = added
        # fuse the registered layers instead of the moving ones
        moved = {id(p["moving"]): lay for (p, _e, _d), lay in zip(out, added, strict=True)}
        self.sources.reset_choices()
        self.sources.value = [moved.get(id(lay), lay) for lay in self.sources.value] + [
            lay for lay in added if lay not in self.sources.value]
