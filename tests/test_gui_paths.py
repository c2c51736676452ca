"""Widget paths not covered elsewhere, in a real napari viewer (Xvfb): the quality widget's
guided super-resolution and medical tasks, and the saliency rule's values in an IVF widget run.
Packaged weights and the packaged sample data."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cscfusion import fuse_infrared_visible, load_model, metrics  # noqa: E402

PLUGIN = "napari-cscfusion"
QUALITY = "Fusion quality"

pytestmark = pytest.mark.gui


def dock(viewer, name):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def wait_idle(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_quality_of_a_guided_super_resolution_run(make_napari_viewer, qtbot):
    """The MMF widget's result, measured: the quality widget picks the fused layer, the
    'super-resolution vs a reference' task and the sample's full-resolution reference from
    the result's metadata; PSNR and SSIM against that reference."""
    from .test_gui_mmf import _sample_crop

    viewer = make_napari_viewer()
    guide, low, ref = _sample_crop(viewer)
    mmf = dock(viewer, "Guided super-resolution")
    mmf.low_layer.value, mmf.guide_layer.value = low, guide
    mmf.run_button.native.click()
    wait_idle(qtbot, mmf)
    fused = mmf.last_outputs[0]

    widget = dock(viewer, QUALITY)
    assert widget.fused_layer.value.name == fused.name
    assert widget.task.value == "mmf"
    assert [s.name for s in widget.source_layers.value] == [ref.name]
    widget.compute_button.native.click()
    wait_idle(qtbot, widget)
    labels, names, rows = widget.rows
    # the result's row, then its baseline row (bicubic upsampling of the low-res layer)
    assert labels[0] == "image" and len(labels) == 2 and "baseline" in labels[1]
    assert names == ["PSNR", "SSIM"]
    target = ref.data / 255.0
    mse = np.mean((target - fused.data.astype(np.float64)) ** 2)
    np.testing.assert_allclose(rows[0][0], 10 * np.log10(1 / mse), rtol=1e-6)
    np.testing.assert_allclose(rows[0][1], metrics.ssim_fusion([ref.data], fused.data),
                               rtol=1e-12)
    assert 20 < rows[0][0] < 60 and 0 < rows[0][1] <= 1

    # two layers are not one reference: a clear error, the table unchanged
    widget.source_layers.value = [ref, guide]
    n_notes = len(notification_manager.records)
    widget.compute_button.native.click()
    wait_idle(qtbot, widget)
    msgs = [r.message for r in notification_manager.records[n_notes:]]
    assert len(msgs) == 1 and "one reference" in msgs[0] and "2 source layers" in msgs[0]
    assert widget.rows[2] == rows


def test_quality_of_a_medical_fusion(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "mri_t1_pd")
    t1, pd = viewer.layers[0], viewer.layers[1]
    fused_data = (t1.data / 510.0 + pd.data / 510.0).astype(np.float32)  # a stand-in
    viewer.add_image(fused_data, name="fused", metadata={"cscfusion": {
        "role": "fused", "quality_task": "medical", "source_layers": [t1.name, pd.name]}})
    widget = dock(viewer, QUALITY)
    assert widget.task.value == "medical"
    assert [s.name for s in widget.source_layers.value] == [t1.name, pd.name]
    widget.compute_button.native.click()
    wait_idle(qtbot, widget)
    expected = metrics.evaluate("medical", [t1.data, pd.data], fused_data)
    labels, names, rows = widget.rows
    assert names == list(expected) and {"MI", "Qabf", "VIF"} <= set(names)
    np.testing.assert_allclose(rows[0], [expected[n] for n in names], rtol=1e-12)


def test_ivf_widget_run_with_the_saliency_rule_gives_the_engine_s_values(make_napari_viewer,
                                                                         qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "infrared_visible")
    ir, vis = viewer.layers["TNO infrared"], viewer.layers["TNO visible"]
    ir.data = np.ascontiguousarray(ir.data[300:348, 200:264])
    vis.data = np.ascontiguousarray(vis.data[300:348, 200:264])
    widget = dock(viewer, "Infrared + visible fusion")
    widget.ir_layer.value, widget.vis_layer.value = ir, vis
    widget.base_rule.value = "saliency"
    widget.weight_maps.value = True  # off by default; one layer per source when on
    widget.run_button.native.click()
    wait_idle(qtbot, widget)
    fused = widget.last_outputs[0]
    assert fused.metadata["cscfusion"]["base_rule"] == "saliency"
    model = load_model("ivf")
    want = fuse_infrared_visible(ir.data, vis.data, model, base_rule="saliency")
    np.testing.assert_allclose(fused.data, want.image, atol=1e-5, rtol=0)
    base = sorted((lay for lay in viewer.layers
                   if lay.metadata.get("cscfusion", {}).get("weights") == "base"),
                  key=lambda lay: lay.metadata["cscfusion"]["source_index"])
    assert len(base) == want.weights["base"].shape[0] == 2
    np.testing.assert_allclose(np.stack([lay.data for lay in base]), want.weights["base"],
                               atol=1e-5, rtol=0)
    # the rule matters here: the l1 rule's image is another one
    l1 = fuse_infrared_visible(ir.data, vis.data, model, base_rule="l1").image
    assert np.abs(l1 - want.image).max() > 0.01
