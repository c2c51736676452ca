"""Fusion quality widget in a real napari viewer (Xvfb): table, copy and export as CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cscfusion import metrics  # noqa: E402
from napari_cscfusion.gui.quality_widget import with_unit  # noqa: E402

PLUGIN = "napari-cscfusion"
QUALITY = "Fusion quality"


def dock(viewer):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, QUALITY)
    return widget


def compute_and_wait(qtbot, widget):
    widget.compute_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)


def _fused_meta(task, sources, **extra):
    return {"cscfusion": {"role": "fused", "quality_task": task, "source_layers": sources,
                          **extra}}


def test_quality_ivf_table_copy_and_export(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "infrared_visible")
    ir, vis = viewer.layers["TNO infrared"], viewer.layers["TNO visible"]
    ir.data, vis.data = ir.data[200:264, 300:380].copy(), vis.data[200:264, 300:380].copy()
    # a stand-in fused image: the metrics widget measures whatever layer it is given
    fused_data = (ir.data / 510.0 + vis.data / 510.0).astype(np.float32)
    viewer.add_image(fused_data, name="fused",
                     metadata=_fused_meta("ivf", ["TNO infrared", "TNO visible"]))
    widget = dock(viewer)
    # filled in from the fused layer's metadata
    assert widget.fused_layer.value.name == "fused"
    assert widget.task.value == "ivf"
    assert [s.name for s in widget.source_layers.value] == ["TNO infrared", "TNO visible"]
    compute_and_wait(qtbot, widget)

    expected = metrics.evaluate("ivf", [ir.data, vis.data], fused_data)
    headers = [with_unit(n) for n in expected]  # e.g. "EN (bits)"
    assert list(widget.table.column_headers) == headers
    assert widget.table.shape == (2, len(expected))  # the result, then the baseline
    labels, names, rows = widget.rows
    assert labels == ["image", "average of the sources (baseline)"]
    np.testing.assert_allclose(rows[0], [expected[n] for n in names], rtol=1e-12)

    widget.copy_button.native.click()
    from qtpy.QtWidgets import QApplication
    text = QApplication.clipboard().text()
    assert text.splitlines()[0] == ",".join(["plane", *headers])
    out = widget.export_csv(tmp_path / "metrics.csv")
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["plane", *headers]
    assert table[1][0] == "image"
    np.testing.assert_allclose([float(v) for v in table[1][1:]], list(expected.values()),
                               rtol=1e-12)
    assert not list(tmp_path.glob(".*.part"))  # the temporary file was renamed


def test_quality_mef_stack_per_plane_rows(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    base = rng.random((2, 40, 48)).astype(np.float32)  # two z-planes
    stack = np.stack([np.clip(base * 2.0 ** ev, 0, 1) for ev in (-1, 0, 1)], 1)  # (z, K, y, x)
    viewer.add_image(stack, name="bracket")
    fused = stack.mean(1)
    viewer.add_image(fused, name="fused",
                     metadata=_fused_meta("mef", ["bracket"], exposure_axis=1))
    widget = dock(viewer)
    assert widget.task.value == "mef"
    compute_and_wait(qtbot, widget)
    labels, names, rows = widget.rows
    baseline = "average of the sources (baseline)"
    assert labels == ["plane 0", f"plane 0: {baseline}", "plane 1", f"plane 1: {baseline}"]
    assert names[0] == "MEF-SSIM"
    for z in range(2):
        expected = metrics.evaluate("mef", list(stack[z]), fused[z])
        np.testing.assert_allclose(rows[2 * z], [expected[n] for n in names], rtol=1e-12)
        # the stand-in result is the average: the baseline row measures the same image
        np.testing.assert_allclose(rows[2 * z + 1], rows[2 * z], rtol=1e-6)


def test_quality_errors_notify(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((20, 20), np.float32), name="a")
    viewer.add_image(np.zeros((20, 24), np.float32), name="fused",
                     metadata=_fused_meta("ivf", ["a"]))
    widget = dock(viewer)
    n_notes = len(notification_manager.records)
    compute_and_wait(qtbot, widget)
    msgs = [r.message for r in notification_manager.records[n_notes:]]
    assert len(msgs) == 1 and msgs[0].startswith("Fusion quality:") and "shape" in msgs[0]
    assert widget.rows is None and not widget.export_button.enabled
