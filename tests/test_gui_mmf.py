"""Guided super-resolution widget in a real napari viewer (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cscfusion import fuse_guided, load_model  # noqa: E402
from napari_cscfusion.engine.planes import downsample_area  # noqa: E402
from napari_cscfusion.engine.registry import packaged_weights_path  # noqa: E402

from ._shared import missing  # noqa: E402

PLUGIN = "napari-cscfusion"
MMF = "Guided super-resolution"


@pytest.fixture
def grey_mmf_weights(tmp_path):
    """The packaged thermal model when installed; else a small randomly initialised 1-channel
    CSC-MMFN saved in the package's format (exercises the GUI, not the quality)."""
    if packaged_weights_path("mmf").is_file():
        return None
    import torch

    from napari_cscfusion.models.checkpoints import save_checkpoint
    from napari_cscfusion.models.mmfn import CSCMMFN
    torch.manual_seed(0)
    net = CSCMMFN(lr_channels=1, guide_channels=1, code_channels=8, num_dcus=1)
    return str(save_checkpoint(net, tmp_path / "mmf_small.pt", "mmf"))


def dock(viewer):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, MMF)
    return widget


def run_and_wait(qtbot, widget, timeout=120_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def _sample_crop(viewer):
    viewer.open_sample(PLUGIN, "guided_sr")
    guide = viewer.layers["TNO visible guide"]
    low = viewer.layers["TNO infrared low-res x4"]
    ref = viewer.layers["TNO infrared reference"]
    guide.data = np.ascontiguousarray(guide.data[200:264, 320:400])
    low.data = np.ascontiguousarray(low.data[50:66, 80:100])
    ref.data = np.ascontiguousarray(ref.data[200:264, 320:400])
    return guide, low, ref


def test_mmf_sample_low_res_layer(make_napari_viewer, qtbot, grey_mmf_weights):
    viewer = make_napari_viewer()
    guide, low, ref = _sample_crop(viewer)
    assert tuple(low.scale) == (4.0, 4.0)
    low_before, guide_before = low.data.copy(), guide.data.copy()
    widget = dock(viewer)
    widget.weights.set_path(grey_mmf_weights)
    widget.low_layer.value, widget.guide_layer.value = low, guide
    widget.codes.value = "summary"
    assert "16x20 → 64x80" in widget.scale_info.value
    n_layers = len(viewer.layers)
    run_and_wait(qtbot, widget)

    name = "TNO infrared low-res x4 guided by TNO visible guide (CSC-MMFN)"
    fused = viewer.layers[name]
    assert fused.data.shape == (64, 80)
    meta = fused.metadata["cscfusion"]
    assert meta["network"] == "CSC-MMFN" and meta["scale"] == [4.0, 4.0]
    assert meta["reference_layer"] == "TNO infrared reference"  # from the sample's metadata
    np.testing.assert_allclose(fused.scale, guide.scale)
    model = load_model("mmf", grey_mmf_weights)
    direct = fuse_guided(low_before, guide_before, model)
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-4)  # tiled vs whole, fp32
    codes = {lay.metadata["cscfusion"]["code"]: lay for lay in viewer.layers
             if lay.metadata.get("cscfusion", {}).get("role") == "codes"}
    assert set(codes) == {"guide", "low_res", "fused"}
    # the low-res codes live where the network computed them: at 16x20, or at the guide's
    # 64x80 for weights trained on bicubic-upsampled input (our packaged mmf.pt); either way
    # they are drawn over the guide
    lr_input = model.info.get("header", {}).get("training", {}).get("lr_input")
    expected = (64, 80) if lr_input == "bicubic" else (16, 20)
    assert codes["low_res"].data.shape == expected
    np.testing.assert_allclose(codes["low_res"].scale, (64 / expected[0], 80 / expected[1]))
    assert codes["fused"].data.shape == (64, 80)
    assert len(viewer.layers) == n_layers + 4  # no weight maps for this network
    np.testing.assert_array_equal(low.data, low_before)
    np.testing.assert_array_equal(guide.data, guide_before)


def test_mmf_simulate_downsamples_first(make_napari_viewer, qtbot, grey_mmf_weights):
    viewer = make_napari_viewer()
    guide, _low, ref = _sample_crop(viewer)
    widget = dock(viewer)
    widget.weights.set_path(grey_mmf_weights)
    widget.low_layer.value, widget.guide_layer.value = ref, guide
    widget.simulate.value = True
    widget.factor.value = 4
    assert "16x20 → 64x80" in widget.scale_info.value
    run_and_wait(qtbot, widget)
    fused = viewer.layers["TNO infrared reference guided by TNO visible guide (CSC-MMFN)"]
    meta = fused.metadata["cscfusion"]
    assert meta["simulated_downsampling"] == 4
    assert meta["reference_layer"] == "TNO infrared reference"
    model = load_model("mmf", grey_mmf_weights)
    direct = fuse_guided(downsample_area(ref.data, 4), guide.data, model)
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-4)  # tiled vs whole, fp32


def test_mmf_band_axis_with_the_authors_hyperspectral_model(make_napari_viewer, qtbot,
                                                            fusion_weights):
    weights = fusion_weights("mmf")
    if weights is None:
        pytest.skip(missing("reference-checkpoints/csc_mmfn_authors.pth (31-band)"))
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    bands = viewer.add_image(rng.random((31, 12, 16), np.float32), name="hsi")
    rgb = viewer.add_image(rng.random((24, 32, 3), np.float32), name="rgb", rgb=True)
    widget = dock(viewer)
    widget.weights.set_path(weights)
    widget.low_layer.value, widget.guide_layer.value = bands, rgb
    widget.bands.value = True
    run_and_wait(qtbot, widget)
    fused = viewer.layers["hsi guided by rgb (CSC-MMFN)"]
    assert fused.data.shape == (31, 24, 32)
    direct = fuse_guided(bands.data, rgb.data, load_model("mmf", weights))
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-4)  # tiled vs whole, fp32


def test_mmf_errors_notify_and_add_nothing(make_napari_viewer, qtbot, grey_mmf_weights):
    viewer = make_napari_viewer()
    big = viewer.add_image(np.zeros((40, 40), np.uint8), name="big")
    small = viewer.add_image(np.zeros((20, 20), np.uint8), name="small")
    widget = dock(viewer)
    widget.weights.set_path(grey_mmf_weights)
    widget.low_layer.value, widget.guide_layer.value = big, small  # guide smaller: engine error
    n_layers, n_notes = len(viewer.layers), len(notification_manager.records)
    run_and_wait(qtbot, widget)
    msgs = [r.message for r in notification_manager.records[n_notes:]]
    assert len(msgs) == 1 and "at least as large" in msgs[0]
    widget.low_layer.value, widget.guide_layer.value = small, big
    widget.simulate.value, widget.factor.value = True, 8  # 20 / 8 < 4 px
    n_notes = len(notification_manager.records)
    widget.run_button.native.click()
    qtbot.wait(20)
    msgs = [r.message for r in notification_manager.records[n_notes:]]
    assert len(msgs) == 1 and "fewer than 4x4" in msgs[0]
    assert len(viewer.layers) == n_layers
