"""The frame every fusion widget shares: inputs on top (from the subclass), a preset in plain
words, the expert settings (the subclass's, then weights, device, codes, weight maps, "keep
previous") folded under "Advanced settings", Run / Cancel, a side-by-side comparison button, a
progress bar and a status line.

A subclass sets ``task``/``network``/``title``, adds its input widgets in ``make_inputs`` (and
its expert fields to ``self.expert``), may name ``PRESETS`` (preset name -> {field: value}), and
returns a FusionJob from ``build_job`` (raising ValueError with a message for the user when the
inputs do not fit). Running, cancelling, progress, errors and output layers are handled here.
"""

from __future__ import annotations

import contextlib

from magicgui.widgets import CheckBox, ComboBox, Container, ProgressBar, PushButton
from napari.utils.notifications import show_error, show_warning

from ._common import (
    META_KEY,
    WEIGHTS_LEGEND,
    FitLabel,
    WeightsChooser,
    codes_combo,
    device_combo,
    fit_dock_to_title,
    narrow_combo,
    plain_message,
    result_layers,
    status_label,
    weight_maps_box,
)
from ._running import PROGRESS_STEPS, RunState
from ._state import CancelToken, FusionJob, OutputTracker, RunOutcome
from ._worker import make_worker

CUSTOM = "custom (see Advanced settings)"
COMPARE, UNCOMPARE = "Compare side by side", "Back to the previous view"

class FusionWidget(RunState, Container):
    task = "ivf"  # which network: load_model(task, ...)
    network = "CSC-IVFN"
    title = "fusion"  # what the user calls it, in messages
    weight_folders = False  # offer a folder chooser for the weights (the authors' CSC-IVFN)
    PRESETS: dict[str, dict] = {}  # preset name -> {attribute of an expert field: value}
    PRESET_HELP = ""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.expert: list = []  # the subclass's expert fields, shown under Advanced settings
        self.make_inputs()
        self.weights = WeightsChooser(self.task, folders=self.weight_folders)
        self.device = device_combo()
        self.codes = codes_combo()
        self.weight_maps = weight_maps_box()
        self.keep_previous = CheckBox(text="keep previous outputs", value=False,
                                      tooltip="off: a rerun with the same inputs replaces this "
                                              "widget's previous output layers")
        self.preset = None
        if self.PRESETS:
            self.preset = narrow_combo(ComboBox(
                label="preset", choices=[*self.PRESETS, CUSTOM], value=next(iter(self.PRESETS)),
                tooltip=self.PRESET_HELP))
            self.append(self.preset)
        self.show_advanced = CheckBox(text="Advanced settings", value=False,
                                      tooltip="the fusion rules, contrast gain, weights, device "
                                              "and what else to show")
        self.advanced = Container(widgets=[*self.expert, *self.weights.widgets, self.device,
                                           self.codes, self.weight_maps, self.keep_previous],
                                  labels=True, visible=False)
        self.advanced.margins = (0, 0, 0, 0)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.compare_button = PushButton(
            text=COMPARE, enabled=False,
            tooltip="show the sources and the last result side by side (napari's grid mode, "
                    "other layers hidden); click again to go back")
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0, label="progress")
        self.status = status_label()
        self.legend = FitLabel(value=WEIGHTS_LEGEND, visible=False)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.extend([self.show_advanced, self.advanced, buttons, self.compare_button,
                     self.progress, self.status, self.legend])
        fit_dock_to_title(self)
        self.show_advanced.changed.connect(self._sync_advanced)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.compare_button.changed.connect(self.toggle_compare)
        self._compare_saved: dict | None = None  # the view before "compare"
        self._compare_layers: list = []  # sources and result of the last run
        if self.preset is not None:
            self.preset.changed.connect(self._apply_preset)
            for name in {k for p in self.PRESETS.values() for k in p}:
                getattr(self, name).changed.connect(self._field_changed)
            self._applying = False
            self._apply_preset()
        self._tracker = OutputTracker()
        self._init_run_state()
        self.last_outputs: list = []  # the layers the last run added
        self._job_key: tuple = ()  # the running job's key: holds its source layers' ids
        self.viewer.layers.events.removed.connect(self._on_layer_removed)

    # --- for subclasses ---------------------------------------------------------------------
    def make_inputs(self) -> None:
        raise NotImplementedError

    def build_job(self) -> FusionJob:
        raise NotImplementedError

    # --- presets and advanced settings --------------------------------------------------------
    def _sync_advanced(self, *_) -> None:
        self.advanced.visible = bool(self.show_advanced.value)

    def _apply_preset(self, *_) -> None:
        values = self.PRESETS.get(self.preset.value)
        if values is None:  # custom: the fields stay as they are
            return
        self._applying = True
        try:
            for name, value in values.items():
                getattr(self, name).value = value
        finally:
            self._applying = False

    def _field_changed(self, *_) -> None:
        """An expert field changed by hand: the preset no longer describes the settings."""
        if self._applying:
            return
        values = self.PRESETS.get(self.preset.value)
        if values is not None and any(getattr(self, k).value != v for k, v in values.items()):
            self.preset.value = CUSTOM

    # --- actions --------------------------------------------------------------------------------
    def run(self, *_) -> None:
        if self.running:
            return
        try:
            job = self.build_job()
        except Exception as exc:  # the inputs do not fit: say why, change nothing
            self._fail(exc)
            return
        job.output.weight_maps = bool(self.weight_maps.value)
        token = CancelToken()
        worker = make_worker(job, token)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(lambda outcome, job=job, token=token:
                                self._on_returned(job, token, outcome))
        worker.errored.connect(lambda exc, token=token: self._on_crashed(token, exc))
        self._job_key = job.key
        self._start_run(worker, token, f"running {self.title}…")

    def cancel(self, *_) -> None:
        """Stop the run: the worker stops at its next cancellation point (about one network
        layer) and its result, if any, is dropped. The widget is ready again at once."""
        if not self._stop():
            return
        self.progress.value = 0
        self.status.value = "cancelled: no layer was added"

    def _on_layer_removed(self, event) -> None:
        """A source layer of the running job was deleted: stop the run, add nothing."""
        token, layer = self._token, event.value
        if token is None or token.cancelled or id(layer) not in self._job_key:
            return
        self.cancel()
        self.status.value = (f"cancelled: source layer {layer.name!r} was removed; no layer was "
                             f"added")

    def _fail(self, exc: BaseException) -> None:
        msg = plain_message(exc)
        show_error(msg)
        self.progress.value = 0  # no full bar beside an error
        self.status.value = f"error: {msg}"

    # --- worker signals -----------------------------------------------------------------------
    def _on_yielded(self, value) -> None:
        done, total = value
        if total > 1 and self._token is not None:
            self._show_running(f"running {self.title}: slice {done} of {total} done")

    def _on_crashed(self, token: CancelToken, exc: BaseException) -> None:
        # run_job returns its errors; this is only reached for a bug in the worker itself,
        # which napari already reports as a notification.
        if token is self._token:
            self._token = None
            self._set_running(False)
            self.progress.value = 0
            self.status.value = f"error: {plain_message(exc)}"

    def _on_returned(self, job: FusionJob, token: CancelToken, outcome: RunOutcome) -> None:
        if token is not self._token or token.cancelled:
            return  # cancelled (or superseded): add nothing
        self._token = None
        self._set_running(False)
        if outcome.cancelled:
            self.status.value = "cancelled: no layer was added"
            return
        if outcome.error is not None:
            self.progress.value = 0
            self._fail(outcome.error)
            return
        try:
            self._show_result(job, outcome)
        except Exception as exc:
            self._fail(exc)
            return
        self.progress.value = PROGRESS_STEPS
        self.status.value = f"done in {outcome.elapsed_s:.1f} s"
        notes = (outcome.result.metadata.get("notices") or []) if outcome.result else []
        notes = [*notes, *getattr(job, "notices", [])]
        for line in notes:  # e.g. out of memory: retried with smaller tiles, or on the CPU
            show_warning(line)
        if notes:
            self.status.value += " — " + "; ".join(notes)

    def _show_result(self, job: FusionJob, outcome: RunOutcome) -> None:
        data = result_layers(outcome.result, job.output)
        keep = bool(self.keep_previous.value)
        old = [] if keep else self._tracker.previous(job.key)
        added = []
        try:
            for arr, kwargs, _kind in data:
                added.append(self.viewer.add_image(arr, **kwargs))
        except Exception:
            for layer in added:  # leave the viewer as it was
                with contextlib.suppress(ValueError, KeyError):
                    self.viewer.layers.remove(layer)
            raise
        for layer in old:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        # added beside the old layers, napari named them "... [1]": now the names are free
        for layer, (_arr, kwargs, _kind) in zip(added, data, strict=True):
            layer.name = kwargs["name"]
            if layer.metadata.get(META_KEY, {}).get("role") == "weights":
                layer.colorbar.visible = True  # the legend, shown with the layer
        self._tracker.record(job.key, added, keep)
        self.viewer.layers.selection.active = added[0]
        self.last_outputs = added
        self.legend.visible = any(lay.metadata.get(META_KEY, {}).get("role") == "weights"
                                  for lay in added)
        sources = [lay for lay in self.viewer.layers if id(lay) in job.key]
        self._compare_layers = [_unwrap(lay) for lay in (*sources, added[0])]
        self.compare_button.enabled = True

    # --- look before you trust ----------------------------------------------------------------
    @property
    def comparing(self) -> bool:
        return self._compare_saved is not None

    def toggle_compare(self, *_) -> None:
        """Sources and the last result side by side in napari's grid mode, every other layer
        hidden; a second click restores the grid, the visibility and the layer order."""
        if self.comparing:
            self._end_compare()
            return
        all_layers = [_unwrap(lay) for lay in self.viewer.layers]
        layers = [lay for lay in self._compare_layers if any(lay is a for a in all_layers)]
        if len(layers) < 2:
            self.status.value = "compare: run a fusion first (its sources and result are shown)"
            return
        grid = self.viewer.grid
        self._compare_saved = {
            "enabled": grid.enabled, "shape": tuple(grid.shape), "stride": grid.stride,
            "visible": {id(lay): lay.visible for lay in all_layers},
            "order": [id(lay) for lay in all_layers]}
        for lay in all_layers:
            lay.visible = any(lay is c for c in layers)
        # grid cells are filled from the top of the layer list: the compared layers go there,
        # sources first (left), result last
        for lay in layers:
            index = next(k for k, a in enumerate(self.viewer.layers) if _unwrap(a) is lay)
            self.viewer.layers.move(index, len(self.viewer.layers))
        grid.stride = 1
        grid.shape = (1, len(layers)) if len(layers) <= 3 else (-1, -1)
        grid.enabled = True
        self.compare_button.text = UNCOMPARE

    def _end_compare(self) -> None:
        saved, self._compare_saved = self._compare_saved, None
        self.compare_button.text = COMPARE
        grid, layers = self.viewer.grid, self.viewer.layers
        grid.enabled = saved["enabled"]
        grid.shape, grid.stride = saved["shape"], saved["stride"]
        for lay in map(_unwrap, list(layers)):
            if id(lay) in saved["visible"]:
                lay.visible = saved["visible"][id(lay)]
        order = [i for i in saved["order"] if any(id(_unwrap(lay)) == i for lay in layers)]
        for target, ident in enumerate(order):
            current = next(k for k, lay in enumerate(layers) if id(_unwrap(lay)) == ident)
            if current != target:
                layers.move(current, target)


def _unwrap(layer):
    """The layer itself: napari hands plugins proxies of its objects, a new one at each access,
    so that identity (``is``, ``id``) holds only between unwrapped layers."""
    return getattr(layer, "__wrapped__", layer)
