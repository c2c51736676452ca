"""Infrared + visible widget in a real napari viewer (Xvfb): run, codes, nD, errors, cancel."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cscfusion import fuse_infrared_visible, load_model  # noqa: E402

PLUGIN = "napari-cscfusion"
IVF = "Infrared + visible fusion"


def dock(viewer, name):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def run_and_wait(qtbot, widget, timeout=120_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def errors_since(n):
    return [r for r in notification_manager.records[n:] if "error" in str(r.severity).lower()]


@pytest.fixture
def ivf_viewer(make_napari_viewer, fusion_weights):
    """A viewer with the TNO sample cropped to 48x64 and the IVF widget pointed at weights."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "infrared_visible")
    ir, vis = viewer.layers["TNO infrared"], viewer.layers["TNO visible"]
    ir.data = np.ascontiguousarray(ir.data[300:348, 200:264])
    vis.data = np.ascontiguousarray(vis.data[300:348, 200:264])
    widget = dock(viewer, IVF)
    weights = fusion_weights("ivf")
    widget.weights.set_path(weights)
    widget.ir_layer.value, widget.vis_layer.value = ir, vis
    widget.base_rule.value = "l1"  # the saliency rule is slow on a CPU
    return viewer, widget, ir, vis, weights


def test_ivf_widget_adds_fused_codes_and_weights(ivf_viewer, qtbot):
    viewer, widget, ir, vis, weights = ivf_viewer
    ir_before, vis_before = ir.data.copy(), vis.data.copy()
    ir.scale, ir.translate = (0.5, 0.25), (10.0, -3.0)
    widget.codes.value = "summary"
    widget.weight_maps.value = True
    n_layers = len(viewer.layers)
    run_and_wait(qtbot, widget)

    fused_name = "TNO infrared + TNO visible (CSC-IVFN)"
    fused = viewer.layers[fused_name]
    assert fused.data.shape == (48, 64) and fused.data.dtype == np.float32
    meta = fused.metadata["cscfusion"]
    assert meta["network"] == "CSC-IVFN" and meta["task"] == "ivf"
    assert meta["base_rule"] == "l1" and meta["detail_rule"] == "l1"
    assert meta["code_gain"] == 2.0  # the authors' default
    assert meta["device"] == "cpu" and meta["elapsed_s"] > 0
    assert meta["source_layers"] == ["TNO infrared", "TNO visible"]
    assert meta["weights_sha256"]  # per-file hashes (authors' folder) or one hash
    np.testing.assert_allclose(fused.scale, (0.5, 0.25))
    np.testing.assert_allclose(fused.translate, (10.0, -3.0))
    # the widget calls the engine: same numbers as the Python API
    model = load_model("ivf", weights)
    direct = fuse_infrared_visible(ir_before, vis_before, model, base_rule="l1", detail_rule="l1")
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-6)

    codes = [lay for lay in viewer.layers if lay.metadata.get("cscfusion", {}).get("role")
             == "codes"]
    assert sorted(lay.metadata["cscfusion"]["code"] for lay in codes) == sorted(
        ["infrared_base", "infrared_detail", "visible_base", "visible_detail", "fused_base",
         "fused_detail"])
    for lay in codes:
        cm = lay.metadata["cscfusion"]
        assert lay.data.shape == (48, 64)  # summary map: L1 over the 64 code channels
        assert 0.0 <= cm["sparsity"] <= 1.0
        # the share of exact zeros is named where there are any (the sparse detail codes)
        assert (f"{100 * cm['sparsity']:.0f}% zero" in lay.name) == (cm["sparsity"] >= 0.005)
        assert "_" not in lay.name
        # the base encoder is a PReLU by design: named so, never advertised as sparse
        if cm["code"].endswith("_base"):
            assert cm["activation"] == "PReLU" and "PReLU" in lay.name
            assert "sparse" not in lay.name
        assert (lay.data >= 0).all()
        np.testing.assert_allclose(lay.scale, (0.5, 0.25))
    # the detail encoder ends in a soft threshold: its codes have exact zeros
    assert next(lay for lay in codes if lay.metadata["cscfusion"]["code"]
                == "infrared_detail").metadata["cscfusion"]["sparsity"] > 0
    weights_layers = [lay for lay in viewer.layers
                      if lay.metadata.get("cscfusion", {}).get("role") == "weights"]
    # one 2-D map per source and code: no slider
    assert sorted((lay.metadata["cscfusion"]["weights"], lay.metadata["cscfusion"]["source"])
                  for lay in weights_layers) == [("base", "TNO infrared"), ("base", "TNO visible"),
                                                 ("detail", "TNO infrared"),
                                                 ("detail", "TNO visible")]
    for key in ("base", "detail"):
        maps = [lay for lay in weights_layers if lay.metadata["cscfusion"]["weights"] == key]
        assert all(lay.data.shape == (48, 64) for lay in maps)
        np.testing.assert_allclose(maps[0].data + maps[1].data, 1.0, atol=1e-5)
        assert all(tuple(lay.axis_labels) == tuple(ir.axis_labels) for lay in maps)
    assert viewer.dims.ndim == 2
    assert len(viewer.layers) == n_layers + 1 + 6 + 4
    np.testing.assert_array_equal(ir.data, ir_before)
    np.testing.assert_array_equal(vis.data, vis_before)
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_ivf_code_gain_defaults_to_the_authors_and_reaches_the_engine(ivf_viewer, qtbot):
    viewer, widget, ir, vis, weights = ivf_viewer
    assert widget.code_gain.value == 2.0  # the authors' infrared/visible setting
    widget.code_gain.value = 1.0
    run_and_wait(qtbot, widget)
    fused = viewer.layers["TNO infrared + TNO visible (CSC-IVFN)"]
    assert fused.metadata["cscfusion"]["code_gain"] == 1.0
    model = load_model("ivf", weights)
    direct = fuse_infrared_visible(ir.data, vis.data, model, base_rule="l1", code_gain=1.0)
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-6)
    authors = fuse_infrared_visible(ir.data, vis.data, model, base_rule="l1")
    assert np.abs(direct.image - authors.image).mean() > 0.01


def test_ivf_every_channel_codes_and_rerun_replaces(ivf_viewer, qtbot):
    viewer, widget, ir, vis, _w = ivf_viewer
    widget.codes.value = "all"
    n0 = len(viewer.layers)
    run_and_wait(qtbot, widget)
    added = len(viewer.layers) - n0
    assert added == 1 + 6  # weight maps are off by default
    code = next(lay for lay in viewer.layers
                if lay.metadata.get("cscfusion", {}).get("code") == "visible_detail")
    assert code.data.shape == (64, 48, 64)  # the code channel is the slider axis
    assert code.axis_labels[0] == "code channel"
    lo, hi = code.contrast_limits
    assert lo == pytest.approx(-hi) and hi > 0
    assert code.colormap.name == "cscfusion_diverging"
    assert code.metadata["cscfusion"]["channel_axis"] == 0
    first_fused = viewer.layers["TNO infrared + TNO visible (CSC-IVFN)"]

    run_and_wait(qtbot, widget)  # same inputs: replaces
    assert len(viewer.layers) == n0 + added
    assert first_fused not in viewer.layers

    widget.codes.value = "none"
    widget.keep_previous.value = True
    run_and_wait(qtbot, widget)  # kept: adds the fused image
    assert len(viewer.layers) == n0 + added + 1


def test_ivf_nd_layers_fused_slice_by_slice_with_colour_visible(make_napari_viewer, qtbot,
                                                                fusion_weights):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    ir = rng.integers(0, 255, (3, 40, 44), dtype=np.uint8)
    vis = rng.integers(0, 255, (3, 40, 44, 3), dtype=np.uint8)
    lir = viewer.add_image(ir, name="ir", scale=(2.0, 1.0, 1.0))
    lvis = viewer.add_image(vis, name="vis", rgb=True)
    widget = dock(viewer, IVF)
    weights = fusion_weights("ivf")
    widget.weights.set_path(weights)
    widget.ir_layer.value, widget.vis_layer.value = lir, lvis
    widget.base_rule.value = widget.detail_rule.value = "average"
    widget.weight_maps.value = True
    run_and_wait(qtbot, widget)
    fused = viewer.layers["ir + vis (CSC-IVFN)"]
    assert fused.rgb and fused.data.shape == (3, 40, 44, 3)
    np.testing.assert_allclose(fused.scale, (2.0, 1.0, 1.0))
    assert fused.metadata["cscfusion"]["planes"] == 3
    weights_layer = viewer.layers["detail weight of ir · ir + vis (CSC-IVFN)"]
    assert weights_layer.data.shape == (3, 40, 44)  # one per source, the source's own axes
    assert tuple(weights_layer.axis_labels) == tuple(lir.axis_labels)
    np.testing.assert_allclose(viewer.layers["detail weight of vis · ir + vis (CSC-IVFN)"].data
                               + weights_layer.data, 1.0, atol=1e-5)
    # plane 1 equals the engine on that plane (luma fused; the visible chroma is kept)
    model = load_model("ivf", weights)
    y = vis[1].astype(np.float32) / 255 @ np.array([0.299, 0.587, 0.114], np.float32)
    direct = fuse_infrared_visible(ir[1], y, model, base_rule="average", detail_rule="average")
    fused_y = fused.data[1] @ np.array([0.299, 0.587, 0.114], np.float32)
    unclipped = (fused.data[1] > 0.01).all(-1) & (fused.data[1] < 0.99).all(-1)
    np.testing.assert_allclose(fused_y[unclipped], direct.image[unclipped], atol=2e-3)
    np.testing.assert_array_equal(lir.data, ir)


def test_ivf_mismatched_shapes_notify_and_add_nothing(make_napari_viewer, qtbot,
                                                     fusion_weights):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 40), np.uint8), name="ir")
    viewer.add_image(np.zeros((40, 52), np.uint8), name="vis")
    widget = dock(viewer, IVF)
    widget.weights.set_path(fusion_weights("ivf"))
    n_layers, n_notes = len(viewer.layers), len(notification_manager.records)
    widget.run_button.native.click()
    qtbot.wait(50)
    errs = errors_since(n_notes)
    assert len(errs) == 1
    assert "same size" in errs[0].message and "'ir'" in errs[0].message
    assert "40x52" in errs[0].message
    assert len(viewer.layers) == n_layers and not widget.running
    assert widget.run_button.enabled


def test_ivf_bad_weights_notify_and_add_nothing(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 40), np.uint8), name="ir")
    viewer.add_image(np.ones((40, 40), np.uint8), name="vis")
    widget = dock(viewer, IVF)
    bad = tmp_path / "not_a_checkpoint.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    widget.weights.set_path(bad)
    n_layers, n_notes = len(viewer.layers), len(notification_manager.records)
    run_and_wait(qtbot, widget)  # fails in the worker (loading), reported on return
    errs = errors_since(n_notes)
    assert len(errs) == 1 and "not_a_checkpoint.pt" in errs[0].message
    assert len(viewer.layers) == n_layers


def _slow_job_viewer(make_napari_viewer, fusion_weights, planes=6, size=160):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    lir = viewer.add_image(rng.random((planes, size, size), np.float32), name="ir")
    lvis = viewer.add_image(rng.random((planes, size, size), np.float32), name="vis")
    widget = dock(viewer, IVF)
    widget.weights.set_path(fusion_weights("ivf"))
    widget.ir_layer.value, widget.vis_layer.value = lir, lvis
    widget.base_rule.value = "saliency"
    return viewer, widget


def test_ivf_cancel_mid_run_adds_nothing_and_stops_quickly(make_napari_viewer, qtbot,
                                                          fusion_weights):
    viewer, widget = _slow_job_viewer(make_napari_viewer, fusion_weights)
    n_layers = len(viewer.layers)
    widget.run_button.native.click()
    worker = widget.worker
    finished = []
    worker.finished.connect(lambda: finished.append(time.perf_counter()))
    qtbot.waitUntil(lambda: widget._token is not None and 0 < widget._token.fraction,
                    timeout=60_000)
    assert not widget.run_button.enabled and widget.cancel_button.enabled
    token = widget._token
    widget.cancel_button.native.click()
    assert widget.run_button.enabled and not widget.running  # ready again at once
    qtbot.waitUntil(lambda: bool(finished), timeout=20_000)  # the worker ends
    # the worker thread itself stops at its next torch operation, mid engine step, not at the
    # end of the job (the latency is measured in benchmarks/gui_bounds.py)
    assert token.cancelled and token.fraction < 1.0
    qtbot.wait(100)
    assert len(viewer.layers) == n_layers
    assert "cancelled" in widget.status.value


def test_ivf_event_loop_keeps_running_during_a_run(make_napari_viewer, qtbot, fusion_weights,
                                                  monkeypatch):
    from qtpy.QtCore import QTimer

    from napari_cscfusion.gui._state import MODELS

    viewer, widget = _slow_job_viewer(make_napari_viewer, fusion_weights, planes=2, size=96)
    widget.base_rule.value = "l1"
    # the worker waits, before it starts fusing, for a timer event that only the GUI thread's
    # event loop can deliver while the run is on: a run that blocked the loop never gets it
    ticked_while_running = threading.Event()
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(widget.running)
                          or (widget.running and ticked_while_running.set()))
    get_model = MODELS.get

    def get_after_a_tick(*args, **kwargs):
        if not ticked_while_running.wait(timeout=30):
            raise RuntimeError("the GUI event loop did not run while the worker was busy")
        return get_model(*args, **kwargs)

    monkeypatch.setattr(MODELS, "get", get_after_a_tick)
    timer.start()
    try:
        run_and_wait(qtbot, widget)
    finally:
        timer.stop()
    assert ticked_while_running.is_set() and any(ticks)
    assert widget.status.value.startswith("done")  # not the RuntimeError above
    assert widget.progress.value == widget.progress.max
    assert "ir + vis (CSC-IVFN)" in viewer.layers
