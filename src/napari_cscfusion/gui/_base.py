"""The frame every fusion widget shares: inputs on top (from the subclass), then weights, device,
codes, "keep previous", Run / Cancel, a progress bar and a status line.

A subclass sets ``task``/``network``, adds its input widgets in ``make_inputs`` and returns a
FusionJob from ``build_job`` (raising ValueError with a message for the user when the inputs
do not fit). Running, cancelling, progress, errors and output layers are handled here.
"""

from __future__ import annotations

import contextlib
import time

from magicgui.widgets import CheckBox, Container, ProgressBar, PushButton
from napari.utils.notifications import show_error, show_warning

from ._common import WeightsChooser, codes_combo, device_combo, result_layers, status_label
from ._running import PROGRESS_STEPS, RunState
from ._state import CancelToken, FusionJob, OutputTracker, RunOutcome
from ._worker import make_worker


class FusionWidget(RunState, Container):
    task = "ivf"  # which network: load_model(task, ...)
    network = "CSC-IVFN"
    weight_folders = False  # offer a folder chooser for the weights (the authors' CSC-IVFN)

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.make_inputs()
        self.weights = WeightsChooser(self.task, folders=self.weight_folders)
        self.device = device_combo()
        self.codes = codes_combo()
        self.keep_previous = CheckBox(text="keep previous outputs", value=False,
                                      tooltip="off: a rerun with the same inputs replaces this "
                                              "widget's previous output layers")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0, label="progress")
        self.status = status_label()
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.extend([*self.weights.widgets, self.device, self.codes, self.keep_previous, buttons,
                     self.progress, self.status])
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self._tracker = OutputTracker()
        self._init_run_state()
        self._started = 0.0
        self.last_outputs: list = []  # the layers the last run added
        self._job_key: tuple = ()  # the running job's key: holds its source layers' ids
        self.viewer.layers.events.removed.connect(self._on_layer_removed)

    # --- for subclasses ---------------------------------------------------------------------
    def make_inputs(self) -> None:
        raise NotImplementedError

    def build_job(self) -> FusionJob:
        raise NotImplementedError

    # --- actions --------------------------------------------------------------------------------
    def run(self, *_) -> None:
        if self.running:
            return
        try:
            job = self.build_job()
        except Exception as exc:  # the inputs do not fit: say why, change nothing
            self._fail(exc)
            return
        token = CancelToken()
        worker = make_worker(job, token)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(lambda outcome, job=job, token=token:
                                self._on_returned(job, token, outcome))
        worker.errored.connect(lambda exc, token=token: self._on_crashed(token, exc))
        self._worker, self._token = worker, token
        self._job_key = job.key
        self._started = time.perf_counter()
        self.progress.value = 0
        self.status.value = f"running {self.network}…"
        self._set_running(True)
        worker.start()

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
        msg = str(exc) or type(exc).__name__
        show_error(f"{self.network}: {msg}")
        self.status.value = f"error: {msg}"

    # --- worker signals -----------------------------------------------------------------------
    def _on_yielded(self, value) -> None:
        done, total = value
        if total > 1 and self._token is not None:
            self.status.value = f"running {self.network}: slice {done} of {total}"

    def _on_crashed(self, token: CancelToken, exc: BaseException) -> None:
        # run_job returns its errors; this is only reached for a bug in the worker itself,
        # which napari already reports as a notification.
        if token is self._token:
            self._token = None
            self._set_running(False)
            self.status.value = f"error: {exc}"

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
        for line in notes:  # e.g. out of memory: retried with smaller tiles, or on the CPU
            show_warning(f"{self.network}: {line}")
        if notes:
            self.status.value += f" — {notes[-1]}"

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
        self._tracker.record(job.key, added, keep)
        self.viewer.layers.selection.active = added[0]
        self.last_outputs = added
