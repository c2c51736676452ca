"""Batch fusion of whole folders: the same pairing, writing and options as ``cscfusion batch``
(engine.batch), run in the background with progress and cancel, the failures listed, and the
results opened as one stack layer. The expert options (the fusion rules, contrast gain, tile
side, weights, device) are folded under "Advanced settings" as in the fusion widgets.

Folder plumbing only: pairing, fusing and writing are engine.batch's.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    TextEdit,
)
from napari.qt.threading import create_worker

from ..engine import Cancelled
from ..engine.batch import (
    FORMATS,
    BatchOutcome,
    BatchPlan,
    default_code_gain,
    default_rules,
    plan_batch,
    run_batch,
)
from ..engine.io import read_image
from ..engine.notices import recorded_only
from ..engine.registry import NETWORK_OF
from ._common import (
    META_KEY,
    WeightsChooser,
    code_gain_box,
    device_combo,
    narrow_combo,
    rule_combo,
)
from ._running import PROGRESS_STEPS, RunState
from ._state import MODELS, CancelToken
from ._worker import CancelMode

TASK_CHOICES = [("infrared + visible (CSC-IVFN)", "ivf"),
                ("exposure brackets (CSC-MEFN)", "mef"),
                ("guided super-resolution (CSC-MMFN)", "mmf"),
                ("medical / multi-modal (CSC-IVFN)", "medical")]
FOLDER_LABELS = {"ivf": ["infrared folder", "visible folder"],
                 "mef": ["brackets folder"],
                 "mmf": ["low-res folder", "guide folder"],
                 "medical": ["modality 1 folder", "modality 2 folder"]}
FOLDER_HELP = {"ivf": "files are paired by name (IR/scene1.png with VIS/scene1.png)",
               "mef": "one sub-folder per bracket (its exposures in sorted order) or one "
                      "multi-page TIFF per bracket",
               "mmf": "files are paired by name (LOW/x.png with GUIDE/x.png)",
               "medical": "one folder per modality, files paired by name; at most one "
                          "modality pseudo-coloured (PET/SPECT)"}
RULE_TASKS = ("ivf", "medical")  # the CSC-IVFN tasks: fusion rules and a contrast gain
TILE_TASKS = ("ivf", "mef", "mmf")  # the medical fusion takes no tile side (fuse_sources)
TILE_HELP = ("the side (px) of the tiles an image is fused in, each with the context its "
             "pixels need, so the result is the same: smaller tiles take less memory. auto: "
             "from the free memory (the whole image when it fits); whole image: one tile")
# the engine's tile= values (cscfusion batch --tile): "auto" (None), 0 (one tile) or a side
TILE_CHOICES = [("auto", "auto"), ("whole image", 0),
                *((f"{side} px", side) for side in (4096, 2048, 1024, 512, 256))]


@dataclass
class BatchSummary:
    """What the background run hands back."""

    outcomes: list[BatchOutcome] = field(default_factory=list)
    cancelled: bool = False
    error: BaseException | None = None
    elapsed_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def run_plan(plan: BatchPlan, token: CancelToken, weights, overwrite: bool, options: dict):
    """Generator run in the worker thread: yields each BatchOutcome, returns a BatchSummary.
    The cancel mode is entered per item, never held across a yield (it is thread-local)."""
    t0 = time.perf_counter()
    summary = BatchSummary()
    n = max(len(plan), 1)

    def progress(done: int, total: int) -> None:
        if token.cancelled:
            raise Cancelled("cancelled by the user")
        k = len(summary.outcomes)
        token.fraction = (k + (done / total if total else 1.0)) / n

    try:
        with CancelMode(token):
            model = MODELS.get(plan.task, weights)
        outcomes = run_batch(plan, model, overwrite=overwrite, progress=progress, **options)
        while True:
            if token.cancelled:
                raise Cancelled("cancelled by the user")
            with CancelMode(token), recorded_only():
                outcome = next(outcomes, None)
            if outcome is None:
                break
            summary.outcomes.append(outcome)
            token.fraction = len(summary.outcomes) / n
            yield outcome
    except Cancelled:
        summary.cancelled = True
    except Exception as exc:  # shown by the widget
        summary.error = exc
    summary.elapsed_s = time.perf_counter() - t0
    return summary


class BatchFusionWidget(RunState, Container):
    """Fuse every image (set) of whole folders and write the results to an output folder."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.task = ComboBox(label="task", choices=TASK_CHOICES, value="ivf")
        self.folders: list[FileEdit] = []  # one row per input folder, after the task row
        self.add_folder = PushButton(text="Add a modality folder")
        self.output = FileEdit(label="output folder", mode="d",
                               tooltip="results go here (created if missing), one file per "
                                       "item, named as the inputs")
        self.format = ComboBox(label="format", choices=list(FORMATS), value="tiff",
                               tooltip="tiff: 32-bit float with the run's metadata; png, jpeg: "
                                       "8-bit, the metadata as a PNG text / JPEG comment")
        self.overwrite = CheckBox(text="redo results that exist", value=False,
                                  tooltip="off: items whose output file exists are skipped")
        self.open_when_done = CheckBox(text="open the results as a stack when done", value=True)
        # expert options, as the fusion widgets name them; the rules and gain set per task
        self.base_rule = rule_combo("coarse structure", "saliency",
                                    "how the base (coarse, low-frequency) codes are combined")
        self.detail_rule = rule_combo("fine detail", "l1",
                                      "how the detail (fine, high-frequency) codes are combined")
        self.code_gain = code_gain_box(default_code_gain("ivf"))
        self.tile = narrow_combo(ComboBox(label="tiles", choices=TILE_CHOICES, value="auto",
                                          tooltip=TILE_HELP))
        self.weights = WeightsChooser("ivf", folders=True)  # remade for each task
        self.device = device_combo()
        self.show_advanced = CheckBox(text="Advanced settings", value=False,
                                      tooltip="the fusion rules, contrast gain, tile side, "
                                              "weights and device")
        self.advanced = Container(widgets=[self.base_rule, self.detail_rule, self.code_gain,
                                           self.tile, *self.weights.widgets, self.device],
                                  labels=True, visible=False)
        self.advanced.margins = (0, 0, 0, 0)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.open_button = PushButton(text="Open results", enabled=False)
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0, label="progress")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.failures = TextEdit(label="failures", value="")
        self.failures.native.setReadOnly(True)
        self.failures.native.setMaximumHeight(120)
        self.failures.visible = False
        buttons = Container(widgets=[self.run_button, self.cancel_button, self.open_button],
                            layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.extend([self.task, self.add_folder, self.output, self.format,
                     self.overwrite, self.open_when_done, self.show_advanced, self.advanced,
                     buttons, self.progress, self.status, self.failures])
        self.show_advanced.changed.connect(self._sync_advanced)
        self.task.changed.connect(self._task_changed)
        self.add_folder.changed.connect(lambda *_: self._add_folder_edit())
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.open_button.changed.connect(self.open_results)
        self._init_run_state()
        self._plan: BatchPlan | None = None
        self._done = 0  # items reported by the running batch
        self.last_summary: BatchSummary | None = None
        self.last_layer = None  # the stack layer the last "open" added
        self._task_changed()

    # --- inputs -----------------------------------------------------------------------------
    def _add_folder_edit(self, label: str | None = None) -> FileEdit:
        n = len(self.folders)
        edit = FileEdit(mode="d", label=label or f"modality {n + 1} folder",
                        tooltip=FOLDER_HELP[self.task.value])
        self.insert(1 + n, edit)  # rows of this form, so that the labels line up
        self.folders.append(edit)
        return edit

    def _task_changed(self, *_) -> None:
        task = self.task.value
        kept = [self._folder_text(e) for e in self.folders]
        for edit in self.folders:
            self.remove(edit)
        self.folders.clear()
        for i, label in enumerate(FOLDER_LABELS[task]):
            edit = self._add_folder_edit(label)
            if i < len(kept) and kept[i]:
                edit.value = kept[i]
        self.add_folder.visible = task == "medical"
        self.base_rule.visible = self.detail_rule.visible = task in RULE_TASKS
        self.tile.visible = task in TILE_TASKS
        rules = default_rules(task)
        if rules is not None:  # the task's own defaults (ivf saliency / l1, medical
            self.base_rule.value, self.detail_rule.value = rules  # choose-max / l1-black)
        gain = default_code_gain(task)
        self.code_gain.visible = gain is not None
        if gain is not None:
            self.code_gain.value = gain
        if self.weights.task != task:  # the chooser names the task's packaged file
            at = self.advanced.index(self.weights.source)
            for w in self.weights.widgets:
                self.advanced.remove(w)
            self.weights = WeightsChooser(task, folders=NETWORK_OF[task] == "ivf")
            for k, w in enumerate(self.weights.widgets):
                self.advanced.insert(at + k, w)

    def _sync_advanced(self, *_) -> None:
        self.advanced.visible = bool(self.show_advanced.value)

    @staticmethod
    def _folder_text(edit: FileEdit) -> str:
        return str(edit.line_edit.value).strip()

    def set_folders(self, folders, output) -> None:
        """Fill the folder fields (adding modality folders for medical) and the output."""
        folders = [str(f) for f in folders]
        while self.task.value == "medical" and len(self.folders) < len(folders):
            self._add_folder_edit()
        for edit, folder in zip(self.folders, folders, strict=False):
            edit.value = folder
        self.output.value = str(output)

    def build_plan(self) -> BatchPlan:
        """The batch of the chosen folders; ValueError with what to do when they do not fit."""
        folders = [self._folder_text(e) for e in self.folders]
        empty = [e.label for e, f in zip(self.folders, folders, strict=True) if not f]
        if self.task.value == "medical":
            empty = empty if len(folders) - len(empty) < 2 else []
            folders = [f for f in folders if f]
        if empty:
            raise ValueError(f"choose the {', '.join(empty)}")
        output = str(self.output.line_edit.value).strip()
        if not output:
            raise ValueError("choose an output folder")
        plan = plan_batch(self.task.value, folders, output, self.format.value)
        if not plan.items:
            raise ValueError("no images found in the chosen folders")
        return plan

    # --- running ----------------------------------------------------------------------------
    def run(self, *_) -> None:
        if self.running:
            return
        try:
            plan = self.build_plan()
            weights = self.weights.weights
        except Exception as exc:  # the folders do not fit: say why, start nothing
            self.status.value = f"error: {exc}"
            return
        options = {"device": self.device.value}
        if plan.task in RULE_TASKS:
            options.update(base_rule=self.base_rule.value, detail_rule=self.detail_rule.value,
                           code_gain=self.code_gain.value)
        if plan.task in TILE_TASKS and self.tile.value != "auto":
            options["tile"] = self.tile.value
        token = CancelToken()
        worker = create_worker(run_plan, plan, token, weights, bool(self.overwrite.value), options,
                               _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda outcome, token=token: self._on_item(token, outcome))
        worker.returned.connect(lambda summary, token=token: self._on_done(token, summary))
        self._plan = plan
        self._done = 0
        self.failures.value = ""
        self.failures.visible = False
        self.open_button.enabled = False
        self._start_run(worker, token, f"fusing {len(plan)} item(s)…")

    def cancel(self, *_) -> None:
        """Stop after the current network step; results written so far stay."""
        if not self._stop():
            return
        self.status.value = "cancelled: results written so far are kept"
        self.open_button.enabled = self._plan is not None

    def _on_item(self, token: CancelToken, outcome: BatchOutcome) -> None:
        if token is not self._token:
            return
        if outcome.status == "failed":
            self.failures.visible = True
            self.failures.value += f"{outcome.item.name}: {outcome.error}\n"
        self._done += 1
        self._show_running(f"{self._done} of {len(self._plan)}: {outcome.item.name} "
                           f"{outcome.status}")

    def _on_done(self, token: CancelToken, summary: BatchSummary) -> None:
        self.last_summary = summary
        if token is not self._token:
            return  # cancelled: the status says so already
        self._token = None
        self._set_running(False)
        if summary.error is not None:
            self.status.value = f"error: {summary.error}"
            return
        self.progress.value = PROGRESS_STEPS
        self.status.value = (f"{summary.count('written')} written, {summary.count('skipped')} "
                             f"skipped (exist), {summary.count('failed')} failed, in "
                             f"{summary.elapsed_s:.1f} s")
        self.open_button.enabled = True
        if self.open_when_done.value and summary.count("written") + summary.count("skipped"):
            self.open_results()

    # --- results ----------------------------------------------------------------------------
    def open_results(self, *_) -> None:
        """The plan's results that exist, as one lazy stack layer (each file is read when its
        slice is shown, so a large batch opens at once); files of another size than the
        most common one are named in the status, not opened."""
        import dask
        import dask.array as da
        import imageio.v3 as iio

        plan = self._plan
        if plan is None:
            return
        paths = [i.output for i in plan.items if i.output.is_file()]
        if not paths:
            self.status.value = "no results to open"
            return
        props = {p: iio.improps(p) for p in paths}  # shape and dtype from the file's header
        kinds = Counter((tuple(pr.shape), np.dtype(pr.dtype)) for pr in props.values())
        (shape, dtype), _n = kinds.most_common(1)[0]
        kept = [p for p in paths if (tuple(props[p].shape), np.dtype(props[p].dtype))
                == (shape, dtype)]
        left = [p.name for p in paths if p not in kept]
        stack = da.stack([da.from_delayed(dask.delayed(read_image)(p), shape, dtype)
                          for p in kept])
        rgb = len(shape) == 3 and shape[-1] in (3, 4)
        meta = {META_KEY: {"role": "batch_results", "task": plan.task,
                           "files": [str(p) for p in kept], "stack_axis": 0}}
        name = f"batch {plan.task} results ({Path(plan.out_dir).name})"
        kwargs = {"name": name, "rgb": rgb, "metadata": meta}
        if not rgb:
            top = 1.0 if dtype == np.float32 else float(np.iinfo(dtype).max)
            kwargs.update(colormap="gray", contrast_limits=(0.0, top))
        self.last_layer = self.viewer.add_image(stack, **kwargs)
        if left:
            self.status.value += (f" — opened {len(kept)} of one size; not opened (other "
                                  f"sizes): {', '.join(left)}")
