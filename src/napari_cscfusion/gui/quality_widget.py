"""Fusion quality: the metrics of a fused layer against its sources, with their units and a
baseline row (the sources' average, or bicubic upsampling for super-resolution), as a table that
can be copied or exported as CSV. The metrics are ``napari_cscfusion.metrics``, the baselines
``napari_cscfusion.baselines``."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, PushButton, Table
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info

from ..engine.planes import plane_indices
from ._common import (
    META_KEY,
    FitLabel,
    extra_shape,
    fit_dock_to_title,
    layer_array,
    layer_combo,
    layer_select,
    plain_message,
    read_plane,
)

TASKS = [("infrared + visible", "ivf"), ("medical / multi-modal", "medical"),
         ("multi-exposure", "mef"), ("super-resolution vs a reference", "mmf")]
MAX_PLANES = 256
# units of metrics.evaluate's values (its conventions: grey values in [0, 1], logs in base 2,
# source-relative scores summed over the sources except SSIM)
UNITS = {"EN": "bits", "MI": "bits summed over sources", "SD": "grey 0-1", "SF": "grey 0-1",
         "AG": "grey 0-1", "SCD": "summed over sources", "VIF": "summed over sources",
         "Qabf": "0-1", "SSIM": "0-1 mean over sources", "MEF-SSIM": "0-1", "PSNR": "dB"}
BASELINE = {"mmf": "bicubic upsampling (baseline)"}
AVERAGE = "average of the sources (baseline)"


def with_unit(name: str) -> str:
    return f"{name} ({UNITS[name]})" if name in UNITS else name


def _metrics(task: str, sources: list[np.ndarray], fused: np.ndarray) -> dict[str, float]:
    from .. import metrics
    if task == "mmf":
        if len(sources) != 1:
            raise ValueError(f"super-resolution is measured against one reference (the "
                             f"full-resolution image); {len(sources)} source layers are selected")
        ref = sources[0]
        if np.shape(ref) != np.shape(fused):
            raise ValueError(f"the reference {np.shape(ref)} and the result {np.shape(fused)} "
                             f"differ in shape")
        return {"PSNR": metrics.psnr(ref, fused), "SSIM": metrics.ssim_fusion([ref], fused)}
    return metrics.evaluate(task, sources, fused)


def _baseline(task: str, srcs: list, fused: np.ndarray, low) -> np.ndarray:
    """The simple method the result is compared with: bicubic upsampling of the low-res input
    (super-resolution), else the average of the sources."""
    from .. import baselines
    if task == "mmf":
        return baselines.bicubic_upsample(low, np.shape(fused)[:2])
    return baselines.average_fusion(srcs)


def compute_table(task: str, fused, sources: list, lead: tuple[int, ...],
                  exposure_axis: int | None = None, low_res=None,
                  ) -> tuple[list[str], list[str], list[list]]:
    """(row labels, metric names, values): one row per plane of the extra axes ``lead``, each
    followed by a baseline row when there is one: the sources' average, or for "mmf" bicubic
    upsampling of ``low_res`` (the low-resolution input, None: no baseline).
    ``exposure_axis``: the sources are one stack layer with exposures along that axis."""
    indices = plane_indices(lead)
    if len(indices) > MAX_PLANES:
        raise ValueError(f"{len(indices)} planes: more than {MAX_PLANES}; crop the layer first")
    rows, labels, names = [], [], None
    baseline_name = BASELINE.get(task, AVERAGE)
    for index in indices:
        f = read_plane(fused, index)
        if exposure_axis is not None:
            stack = np.asarray(sources[0][index[:exposure_axis] + (slice(None),)
                                          + index[exposure_axis:]])
            srcs = list(stack)
        else:
            srcs = [read_plane(s, index) for s in sources]
        values = _metrics(task, srcs, f)
        names = names or list(values)
        rows.append([float(values[n]) for n in names])
        label = "image" if not index else "plane " + ",".join(map(str, index))
        labels.append(label)
        if task == "mmf" and low_res is None:
            continue
        low = read_plane(low_res, index) if low_res is not None else None
        try:
            base = _baseline(task, srcs, f, low)
        except ValueError:  # e.g. a colour and a grey source: no average
            continue
        base_values = _metrics(task, srcs, base)
        rows.append([float(base_values[n]) for n in names])
        labels.append(baseline_name if not index else f"{label}: {baseline_name}")
    return labels, names or [], rows


def _compute_or_error(*args):
    """compute_table, with its error returned (napari would also notify a raised one)."""
    try:
        return compute_table(*args)
    except Exception as exc:
        return exc


class FusionQualityWidget(Container):
    """Choose a fused layer; its task and source layers are filled in from its metadata."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.fused_layer = layer_combo(napari_viewer, "fused", "the fused (or super-resolved) "
                                                              "layer to measure",
                                       inputs_only=False)
        self.task = ComboBox(label="metric set", choices=TASKS, value="ivf")
        self.source_layers = layer_select(napari_viewer, "sources",
                                          "the source layers (for super-resolution: the "
                                          "full-resolution reference)")
        self.compute_button = PushButton(text="Compute")
        self.copy_button = PushButton(text="Copy CSV", enabled=False)
        self.export_button = PushButton(text="Export CSV…", enabled=False)
        buttons = Container(widgets=[self.compute_button, self.copy_button, self.export_button],
                            layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.table = Table(value={"data": [], "index": [], "columns": []})
        self.table.read_only = True
        from qtpy.QtWidgets import QSizePolicy  # the table scrolls rather than widen the dock
        self.table.native.setSizePolicy(QSizePolicy.Policy.Ignored,
                                        QSizePolicy.Policy.Expanding)
        self.status = FitLabel(value="")
        self.extend([self.fused_layer, self.task, self.source_layers, buttons, self.table,
                     self.status])
        fit_dock_to_title(self)
        self.fused_layer.changed.connect(self._from_metadata)
        self.compute_button.changed.connect(self.compute)
        self.copy_button.changed.connect(self.copy_csv)
        self.export_button.changed.connect(self._export_dialog)
        self._worker = None
        self.rows: tuple[list[str], list[str], list[list]] | None = None
        self._prefer_fused()
        self._from_metadata()

    @property
    def running(self) -> bool:
        return self._worker is not None

    def reset_choices(self, *args) -> None:
        before = self.fused_layer.value
        super().reset_choices(*args)
        self._prefer_fused()
        if self.fused_layer.value is not before:
            self._from_metadata()

    def _prefer_fused(self) -> None:
        current = self.fused_layer.value
        if current is not None and current.metadata.get(META_KEY, {}).get("role") == "fused":
            return
        for layer in reversed(self.fused_layer.choices):
            if layer is not None and layer.metadata.get(META_KEY, {}).get("role") == "fused":
                self.fused_layer.value = layer
                return

    def _from_metadata(self, *_) -> None:
        """Task and sources as recorded by the widget that made the fused layer."""
        layer = self.fused_layer.value
        meta = layer.metadata.get(META_KEY, {}) if layer is not None else {}
        task = meta.get("quality_task")
        if task in self.task.choices:
            self.task.value = task
        names = ([meta["reference_layer"]] if task == "mmf" and meta.get("reference_layer")
                 else meta.get("source_layers") or [])
        by_name = {c.name: c for c in self.source_layers.choices}
        chosen = [by_name[n] for n in names if n in by_name]
        if chosen:
            self.source_layers.value = chosen

    # --- compute ------------------------------------------------------------------------------
    def _exposure_axis(self, sources) -> int | None:
        if self.task.value != "mef" or len(sources) != 1:
            return None
        fused_meta = self.fused_layer.value.metadata.get(META_KEY, {})
        src_meta = sources[0].metadata.get(META_KEY, {})
        axis = fused_meta.get("exposure_axis", src_meta.get("exposure_axis", 0))
        return int(axis)

    def _low_res(self, fused):
        """The low-resolution input of a super-resolved layer, for the bicubic baseline: None
        when it was simulated from the full-resolution image or is not in the viewer."""
        meta = fused.metadata.get(META_KEY, {})
        names = meta.get("source_layers") or []
        if meta.get("simulated_downsampling") or not names or names[0] not in self.viewer.layers:
            return None
        return layer_array(self.viewer.layers[names[0]], "low-res")

    def compute(self, *_) -> None:
        if self.running:
            return
        try:
            fused = self.fused_layer.value
            if fused is None:
                raise ValueError("choose the fused layer")
            sources = list(self.source_layers.value)
            if not sources:
                raise ValueError("select the source layers")
            if any(s is fused for s in sources):
                raise ValueError(f"the fused layer {fused.name!r} is also selected as a source")
            task = self.task.value
            axis = self._exposure_axis(sources)
            lead = extra_shape(fused)
            datas = [layer_array(s, "source") for s in sources]
            fdata = layer_array(fused, "fused")
            low = self._low_res(fused) if task == "mmf" else None
        except Exception as exc:
            self._fail(exc)
            return
        worker = create_worker(_compute_or_error, task, fdata, datas, lead, axis, low,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._fail)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.compute_button.enabled = False
        self.status.value = f"computing {dict((v, k) for k, v in TASKS)[task]} metrics…"
        worker.start()

    def _on_finished(self, *_) -> None:
        self._worker = None
        self.compute_button.enabled = True

    def _fail(self, exc: BaseException) -> None:
        msg = plain_message(exc)
        show_error(f"Fusion quality: {msg}")
        self.status.value = f"error: {msg}"

    def _on_done(self, rows) -> None:
        if isinstance(rows, Exception):
            self._fail(rows)
            return
        labels, names, values = rows
        self.rows = rows
        self.table.value = {"data": [[f"{v:.4g}" for v in r] for r in values],
                            "index": labels, "columns": [with_unit(n) for n in names]}
        self.copy_button.enabled = self.export_button.enabled = True
        planes = sum(1 for lab in labels if "baseline" not in lab)
        self.status.value = (f"{len(names)} metrics on {planes} plane(s); baseline rows: "
                             f"the same metrics of a simple method, for comparison")

    # --- CSV ----------------------------------------------------------------------------------
    def csv_text(self) -> str:
        if self.rows is None:
            raise ValueError("compute the metrics first")
        labels, names, values = self.rows
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["plane", *(with_unit(n) for n in names)])
        for label, row in zip(labels, values, strict=True):
            w.writerow([label, *(repr(v) for v in row)])
        return buf.getvalue()

    def copy_csv(self, *_) -> None:
        from qtpy.QtWidgets import QApplication
        try:
            QApplication.clipboard().setText(self.csv_text())
        except Exception as exc:
            self._fail(exc)
            return
        self.status.value = "copied as CSV"

    def export_csv(self, path: str | Path) -> Path:
        """Write the table as CSV (through a temporary file, then renamed)."""
        path = Path(path)
        text = self.csv_text()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def _export_dialog(self, *_) -> None:
        from qtpy.QtWidgets import QFileDialog
        path, _f = QFileDialog.getSaveFileName(self.native, "Export metrics", "metrics.csv",
                                               "CSV (*.csv)")
        if not path:
            return
        try:
            self.export_csv(path)
        except Exception as exc:
            self._fail(exc)
            return
        show_info(f"Fusion quality: metrics written to {path}")
