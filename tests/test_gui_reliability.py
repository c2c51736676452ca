"""Reliability (issue 7), GUI rows, in a real napari viewer (Xvfb): a source layer deleted or the
viewer closed while a run is in flight, Cancel followed at once by another Run, and two runs
started at once from two widgets.

Already covered elsewhere and not repeated: mismatched shapes -> one notification and no layer
(test_gui_ivf/mef/mmf/medical), Cancel mid-run adds nothing (test_gui_ivf).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cscfusion import fuse_exposures, fuse_infrared_visible, load_model  # noqa: E402

PLUGIN = "napari-cscfusion"
IVF = "Infrared + visible fusion"
MEF = "Exposure fusion"

pytestmark = pytest.mark.gui


def dock(viewer, name=IVF):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def errors_since(n):
    return [r for r in notification_manager.records[n:] if "error" in str(r.severity).lower()]


def fusion_layers(viewer):
    return [lay for lay in viewer.layers if "cscfusion" in lay.metadata]


@pytest.fixture
def escaped(monkeypatch):
    """Exceptions that reach a thread's excepthook (pytest-qt already fails a test on an
    exception in the Qt event loop)."""
    caught = []
    monkeypatch.setattr(threading, "excepthook", lambda args: caught.append(args.exc_value))
    return caught


def slow_ivf(viewer, weights, planes=4, size=128, seed=1):
    """An IVF job that takes a few seconds on a CPU: saliency rule, several planes."""
    rng = np.random.default_rng(seed)
    ir = viewer.add_image(rng.random((planes, size, size), np.float32), name="ir")
    vis = viewer.add_image(rng.random((planes, size, size), np.float32), name="vis")
    widget = dock(viewer)
    widget.weights.set_path(weights)
    widget.ir_layer.value, widget.vis_layer.value = ir, vis
    widget.base_rule.value = "saliency"
    return widget, ir, vis


def start_and_wait_for_progress(qtbot, widget):
    widget.run_button.native.click()
    worker = widget.worker
    finished = []
    worker.finished.connect(lambda: finished.append(time.perf_counter()))
    qtbot.waitUntil(lambda: widget._token is not None and widget._token.fraction > 0,
                    timeout=60_000)
    return worker, finished


def test_deleting_a_source_layer_mid_run_stops_it_and_adds_nothing(make_napari_viewer, qtbot,
                                                                  fusion_weights, escaped):
    viewer = make_napari_viewer()
    widget, ir, _vis = slow_ivf(viewer, fusion_weights("ivf"))
    n_notes = len(notification_manager.records)
    with qtbot.capture_exceptions() as qt_exceptions:
        worker, finished = start_and_wait_for_progress(qtbot, widget)
        token = widget._token
        viewer.layers.remove(ir)
        qtbot.waitUntil(lambda: bool(finished), timeout=30_000)  # the worker ends
        qtbot.wait(200)
    # stopped, not run to the end (how fast: benchmarks/gui_bounds.py)
    assert token.cancelled and token.fraction < 1.0
    assert fusion_layers(viewer) == []  # nothing half-made
    assert [lay.name for lay in viewer.layers] == ["vis"]
    assert not widget.running and widget.run_button.enabled
    assert "cancelled" in widget.status.value and "ir" in widget.status.value
    assert errors_since(n_notes) == []
    assert qt_exceptions == [] and escaped == []


def test_deleting_an_unrelated_layer_mid_run_changes_nothing(make_napari_viewer, qtbot,
                                                             fusion_weights, escaped):
    viewer = make_napari_viewer()
    widget, ir, vis = slow_ivf(viewer, fusion_weights("ivf"), planes=2, size=64)
    other = viewer.add_image(np.zeros((8, 8), np.float32), name="unrelated")
    widget.base_rule.value = "l1"
    worker, finished = start_and_wait_for_progress(qtbot, widget)
    viewer.layers.remove(other)
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    fused = viewer.layers["ir + vis (CSC-IVFN)"]
    direct = fuse_infrared_visible(ir.data[1], vis.data[1], load_model("ivf", fusion_weights(
        "ivf")), base_rule="l1")
    np.testing.assert_allclose(fused.data[1], direct.image, atol=1e-6)
    assert escaped == []


def test_closing_the_viewer_mid_run_stops_the_run_quietly(qtbot, fusion_weights, escaped):
    import napari

    viewer = napari.Viewer(show=False)
    widget, _ir, _vis = slow_ivf(viewer, fusion_weights("ivf"))
    outcomes, shown = [], []
    show_result = widget._show_result
    widget._show_result = lambda *args: shown.append(args) or show_result(*args)
    n_notes = len(notification_manager.records)
    with qtbot.capture_exceptions() as qt_exceptions:
        worker, finished = start_and_wait_for_progress(qtbot, widget)
        token = widget._token
        worker.returned.connect(outcomes.append)
        worker.aborted.connect(lambda: outcomes.append("aborted"))  # napari quits workers
        viewer.close()
        qtbot.waitUntil(lambda: bool(finished), timeout=30_000)  # the worker ends
        qtbot.wait(200)
    # stopped, not run to the end (how fast: benchmarks/gui_bounds.py)
    assert token.cancelled and token.fraction < 1.0
    # closing removes the layers (the run is cancelled at its next torch operation) and napari
    # quits its workers (then the worker emits 'aborted' or nothing): never a result, and
    # nothing reaches the step that adds layers (outcomes may be empty, shown may not be)
    assert all(o == "aborted" or (o.cancelled and o.result is None) for o in outcomes)
    assert shown == []
    assert widget._token is None or widget._token.cancelled
    assert errors_since(n_notes) == []
    assert qt_exceptions == [] and escaped == []


def test_cancel_then_run_again_keeps_only_the_second_result(make_napari_viewer, qtbot,
                                                            fusion_weights, escaped):
    viewer = make_napari_viewer()
    weights = fusion_weights("ivf")
    widget, ir, vis = slow_ivf(viewer, weights, planes=3, size=96)
    first_worker, first_finished = start_and_wait_for_progress(qtbot, widget)
    widget.cancel_button.native.click()
    widget.base_rule.value = "average"  # the second run differs from the first
    widget.run_button.native.click()  # while the first worker may still be stopping
    widget.run_button.native.click()  # a second click during a run is ignored
    second_worker = widget.worker
    assert second_worker is not first_worker
    qtbot.waitUntil(lambda: not widget.running and bool(first_finished), timeout=120_000)
    qtbot.wait(200)
    fused = [lay for lay in fusion_layers(viewer) if lay.metadata["cscfusion"].get("role")
             not in ("codes", "weights")]
    assert len(fused) == 1
    meta = fused[0].metadata["cscfusion"]
    assert meta["base_rule"] == "average"
    model = load_model("ivf", weights)
    for k in range(3):
        direct = fuse_infrared_visible(ir.data[k], vis.data[k], model, base_rule="average")
        np.testing.assert_allclose(fused[0].data[k], direct.image, atol=1e-6)
    assert escaped == []


def test_two_widgets_running_at_once_both_finish_correctly(make_napari_viewer, qtbot,
                                                           fusion_weights, escaped):
    """Two IVF widgets (same network, shared model cache) and a MEF widget started together."""
    from napari_cscfusion.gui.ivf_widget import InfraredVisibleWidget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(5)
    ivf_weights, mef_weights = fusion_weights("ivf"), fusion_weights("mef")
    layers = {n: viewer.add_image(rng.random((2, 72, 80), np.float32), name=n)
              for n in ("ir1", "vis1", "ir2", "vis2")}
    stack = viewer.add_image(rng.random((3, 64, 48), np.float32), name="bracket")
    first = dock(viewer)
    second = InfraredVisibleWidget(viewer)
    viewer.window.add_dock_widget(second, name="second IVF")
    for w, a, b, rule in ((first, "ir1", "vis1", "l1"), (second, "ir2", "vis2", "average")):
        w.weights.set_path(ivf_weights)
        w.ir_layer.value, w.vis_layer.value = layers[a], layers[b]
        w.base_rule.value = rule
    mef = dock(viewer, MEF)
    mef.weights.set_path(mef_weights)
    from napari_cscfusion.gui.mef_widget import STACK

    mef.mode.value = STACK
    mef.stack_layer.value = stack
    n_notes = len(notification_manager.records)
    with qtbot.capture_exceptions() as qt_exceptions:
        for w in (first, second, mef):
            w.run_button.native.click()
        assert first.running and second.running and mef.running  # truly concurrent
        qtbot.waitUntil(lambda: not (first.running or second.running or mef.running),
                        timeout=180_000)
    assert qt_exceptions == [] and escaped == [] and errors_since(n_notes) == []
    ivf_model = load_model("ivf", ivf_weights)
    for w, a, b, rule in ((first, "ir1", "vis1", "l1"), (second, "ir2", "vis2", "average")):
        fused = w.last_outputs[0]
        assert fused.name.startswith(f"{a} + {b}")
        for k in range(2):
            direct = fuse_infrared_visible(layers[a].data[k], layers[b].data[k], ivf_model,
                                           base_rule=rule)
            np.testing.assert_allclose(fused.data[k], direct.image, atol=1e-6)
    direct = fuse_exposures(stack.data, load_model("mef", mef_weights))
    np.testing.assert_allclose(mef.last_outputs[0].data, direct.image, atol=1e-6)


def test_out_of_memory_retry_is_shown_as_a_warning_each_run(make_napari_viewer, qtbot,
                                                             fusion_weights, monkeypatch,
                                                             escaped):
    """The engine's notice (out of memory: smaller tiles) reaches the user as a napari warning
    and in the status line — on every run, although it is raised in the worker thread."""
    import torch
    import torch.nn.functional as F

    from napari_cscfusion.gui.mef_widget import STACK

    real = F.conv2d

    def conv2d(x, *args, **kwargs):  # the whole 64x48 image does not fit, half of it does
        if x.shape[-2] * x.shape[-1] >= 64 * 48:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, *args, **kwargs)

    viewer = make_napari_viewer()
    stack = viewer.add_image(np.random.default_rng(2).random((3, 64, 48), np.float32),
                             name="bracket")
    mef = dock(viewer, MEF)
    mef.weights.set_path(fusion_weights("mef"))
    mef.mode.value = STACK
    mef.stack_layer.value = stack
    monkeypatch.setattr(F, "conv2d", conv2d)
    for _ in range(2):
        n_notes = len(notification_manager.records)
        mef.run_button.native.click()
        qtbot.waitUntil(lambda: not mef.running, timeout=60_000)
        shown = [str(r.message) for r in notification_manager.records[n_notes:]]
        assert any("out of memory on cpu with the whole 64x48 image; retried with tiles "
                   "of 32 px" in m for m in shown), shown
        assert errors_since(n_notes) == []
        assert "out of memory" in mef.status.value and mef.status.value.startswith("done")
    assert "out of memory" in " ".join(mef.last_outputs[0].metadata["cscfusion"]["notices"])
    assert escaped == []
