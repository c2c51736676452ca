"""Multi-exposure widget in a real napari viewer (Xvfb): a stack layer or several layers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cscfusion import fuse_exposures, load_model  # noqa: E402

PLUGIN = "napari-cscfusion"
MEF = "Exposure fusion"


def dock(viewer):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, MEF)
    return widget


def run_and_wait(qtbot, widget, timeout=120_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_mef_stack_layer_from_sample(make_napari_viewer, qtbot, fusion_weights):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "exposure_bracket")
    stack = viewer.layers["courtyard exposures"]
    stack.data = np.ascontiguousarray(stack.data[:, 100:148, 200:264])  # (4, 48, 64, 3)
    before = stack.data.copy()
    widget = dock(viewer)
    weights = fusion_weights("mef")
    widget.weights.set_path(weights)
    widget.mode.value = "stack"
    widget.stack_layer.value = stack
    assert widget.exposure_axis.value == 0  # from the layer's metadata
    assert widget.exposure_axis.choices == (0,)  # RGB: only the leading axis can be exposures
    widget.codes.value = "all"
    widget.weight_maps.value = True
    n_layers = len(viewer.layers)
    run_and_wait(qtbot, widget)

    fused = viewer.layers["courtyard exposures fused (CSC-MEFN)"]
    assert fused.rgb and fused.data.shape == (48, 64, 3)
    meta = fused.metadata["cscfusion"]
    assert meta["network"] == "CSC-MEFN" and meta["colour"] == "YCbCr"
    assert meta["exposure_axis"] == 0 and meta["source_layers"] == ["courtyard exposures"]
    direct = fuse_exposures(before, load_model("mef", weights))
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-6)

    codes = [lay for lay in viewer.layers
             if lay.metadata.get("cscfusion", {}).get("role") == "codes"]
    assert sorted(lay.metadata["cscfusion"]["code"] for lay in codes) == [
        f"exposure_{i}" for i in range(4)]
    q = load_model("mef", weights).network.hparams["code_channels"]
    for lay in codes:
        assert lay.data.shape == (q, 48, 64)
        lo, hi = lay.contrast_limits
        assert lo == pytest.approx(-hi)
        assert "_" not in lay.name
    maps = [viewer.layers[f"weight of courtyard exposures[{i}] · courtyard exposures fused "
                          f"(CSC-MEFN)"] for i in range(4)]
    assert all(w.data.shape == (48, 64) for w in maps)  # one per exposure: no slider for them
    assert codes[0].axis_labels[0] == "code channel"
    assert viewer.dims.axis_labels[0] == "code channel"
    np.testing.assert_allclose(sum(w.data for w in maps), 1.0, atol=1e-5)
    assert maps[0].metadata["cscfusion"]["sources"] == [f"courtyard exposures[{i}]"
                                                        for i in range(4)]
    assert len(viewer.layers) == n_layers + 1 + 4 + 4
    np.testing.assert_array_equal(stack.data, before)


def test_mef_several_layers_and_exposure_axis_not_first(make_napari_viewer, qtbot,
                                                        fusion_weights):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    base = rng.random((2, 32, 40), np.float32)  # 2 z-planes
    exposures = [np.clip(base * 2.0 ** ev, 0, 1) for ev in (-1, 0, 1)]
    layers = [viewer.add_image(e, name=f"ev{i}", scale=(3.0, 1.0, 1.0))
              for i, e in enumerate(exposures)]
    widget = dock(viewer)
    weights = fusion_weights("mef")
    widget.weights.set_path(weights)
    widget.mode.value = "layers"
    widget.exposure_layers.value = layers
    run_and_wait(qtbot, widget)
    fused = viewer.layers["ev0 + ev1 + ev2 (CSC-MEFN)"]
    assert fused.data.shape == (2, 32, 40)
    np.testing.assert_allclose(fused.scale, (3.0, 1.0, 1.0))
    model = load_model("mef", weights)
    for z in range(2):
        direct = fuse_exposures(np.stack([e[z] for e in exposures]), model)
        np.testing.assert_allclose(fused.data[z], direct.image, atol=1e-6)

    # the same data as one (z, exposure, y, x) stack: exposure axis 1
    stack = viewer.add_image(np.stack(exposures, 1), name="zstack")
    widget.mode.value = "stack"
    widget.stack_layer.value = stack
    assert widget.exposure_axis.choices == (0, 1)
    widget.exposure_axis.value = 1
    run_and_wait(qtbot, widget)
    fused2 = viewer.layers["zstack fused (CSC-MEFN)"]
    assert fused2.data.shape == (2, 32, 40)
    np.testing.assert_allclose(fused2.data, fused.data, atol=1e-6)


def test_mef_errors_notify_and_add_nothing(make_napari_viewer, qtbot, fusion_weights):
    viewer = make_napari_viewer()
    a = viewer.add_image(np.zeros((20, 20), np.uint8), name="a")
    b = viewer.add_image(np.zeros((20, 24), np.uint8), name="b")
    widget = dock(viewer)
    widget.weights.set_path(fusion_weights("mef"))
    widget.mode.value = "layers"
    n_layers = len(viewer.layers)
    cases = [([a], "at least 2"), ([a, b], "same size")]
    for chosen, expected in cases:
        n_notes = len(notification_manager.records)
        widget.exposure_layers.value = chosen
        widget.run_button.native.click()
        qtbot.wait(20)
        msgs = [r.message for r in notification_manager.records[n_notes:]]
        assert len(msgs) == 1 and expected in msgs[0]
        assert not msgs[0].startswith("CSC-")  # plain words, no network prefix
    assert len(viewer.layers) == n_layers and not widget.running
