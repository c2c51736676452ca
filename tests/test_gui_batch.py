"""Batch widget in a real napari viewer (Xvfb): folders in, results written in the background,
failures listed, cancel, results opened as one stack layer."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

pytest.importorskip("napari")

from napari_cscfusion.engine.io import read_tiff_metadata  # noqa: E402
from napari_cscfusion.gui.batch_widget import BatchFusionWidget  # noqa: E402

PLUGIN = "napari-cscfusion"
WIDGET = "Batch fusion of folders"


def noise(shape, seed):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def pairs(tmp_path, n, shape=(40, 48)):
    ir, vis = tmp_path / "IR", tmp_path / "VIS"
    ir.mkdir()
    vis.mkdir()
    for i in range(n):
        iio.imwrite(ir / f"p{i}.png", noise(shape, i))
        iio.imwrite(vis / f"p{i}.png", noise(shape, 50 + i))
    return ir, vis


@pytest.fixture
def batch_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)  # via the manifest
    assert isinstance(widget, BatchFusionWidget)
    widget.device.value = "cpu"
    widget.base_rule.value = "l1"  # the saliency rule is slow on a CPU
    return viewer, widget


def run_and_wait(qtbot, widget, timeout=120_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_batch_writes_lists_failures_and_opens_a_stack(qtbot, batch_widget, tmp_path):
    viewer, widget = batch_widget
    ir, vis = pairs(tmp_path, 3)
    (vis / "p1.png").write_bytes(b"broken")  # the middle pair cannot be read
    out = tmp_path / "out"
    widget.set_folders([ir, vis], out)
    assert [e.label for e in widget.folders] == ["infrared folder", "visible folder"]
    n_layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert sorted(p.name for p in out.iterdir()) == ["p0.tif", "p2.tif"]
    assert widget.status.value.startswith("2 written, 0 skipped (exist), 1 failed")
    assert widget.progress.value == widget.progress.max
    assert not widget.failures.native.isHidden()
    assert widget.failures.value.startswith("p1: cannot read") and "p1.png" in \
        widget.failures.value
    meta = read_tiff_metadata(out / "p2.tif")
    assert meta["base_rule"] == "l1" and meta["code_gain"] == 2.0  # CSC-IVFN's default
    # opened when done: one stack layer of the results, in the items' order
    assert len(viewer.layers) == n_layers + 1
    layer = widget.last_layer
    assert layer.name == viewer.layers[-1].name == "batch ivf results (out)"
    assert layer.data.shape == (2, 40, 48)
    np.testing.assert_array_equal(np.asarray(layer.data[1]), tifffile.imread(out / "p2.tif"))
    assert layer.metadata["cscfusion"]["files"] == [str(out / "p0.tif"), str(out / "p2.tif")]

    # a rerun skips what exists and writes the repaired pair
    iio.imwrite(vis / "p1.png", noise((40, 48), 7))
    widget.open_when_done.value = False
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("1 written, 2 skipped (exist), 0 failed")
    assert widget.failures.native.isHidden()
    assert len(viewer.layers) == n_layers + 1
    widget.open_button.native.click()
    assert widget.last_layer.data.shape == (3, 40, 48)


def test_cancel_stops_the_batch_and_keeps_what_was_written(qtbot, batch_widget, tmp_path):
    _viewer, widget = batch_widget
    ir, vis = pairs(tmp_path, 12, shape=(96, 96))
    widget.base_rule.value = "saliency"  # slower items: the cancel lands mid-batch
    widget.open_when_done.value = False
    widget.set_folders([ir, vis], tmp_path / "out")
    widget.run_button.native.click()
    assert widget.running and widget.cancel_button.enabled
    qtbot.waitUntil(lambda: widget._done >= 1, timeout=120_000)
    # listen before cancelling: a worker that stops at once emits 'finished' before a
    # waitSignal entered afterwards is connected (it timed out so on a quiet machine)
    with qtbot.waitSignal(widget.worker.finished, timeout=60_000):
        widget.cancel_button.native.click()
        assert not widget.running and widget.run_button.enabled
        assert widget.status.value == "cancelled: results written so far are kept"
    summary = widget.last_summary
    assert summary.cancelled and summary.error is None
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert 1 <= len(written) < 12
    assert all(p.endswith(".tif") for p in written)  # no half-written file left
    assert len(written) == summary.count("written")
    assert widget.status.value == "cancelled: results written so far are kept"


def test_folders_that_do_not_fit_start_nothing(qtbot, batch_widget, tmp_path):
    _viewer, widget = batch_widget
    widget.run_button.native.click()
    assert not widget.running and widget.status.value == \
        "error: choose the infrared folder, visible folder"
    ir, vis = pairs(tmp_path, 1)
    widget.set_folders([ir, vis], vis)
    widget.run_button.native.click()
    assert not widget.running and "is an input folder" in widget.status.value
    assert sorted(p.name for p in vis.iterdir()) == ["p0.png"]
    # the weights chooser follows the task's network; a missing checkpoint starts nothing
    widget.task.value = "mef"
    assert widget.weights.task == "mef" and [e.label for e in widget.folders] == \
        ["brackets folder"]
    assert widget.code_gain.native.isHidden() and widget.base_rule.native.isHidden()
    widget.set_folders([ir], tmp_path / "out")
    widget.weights.set_path(tmp_path / "missing.pt")
    widget.run_button.native.click()
    assert not widget.running and widget.status.value.startswith("error: weights:")
    assert not (tmp_path / "out").exists()


def test_medical_batch_with_three_modalities_in_png(qtbot, batch_widget, tmp_path):
    viewer, widget = batch_widget
    widget.task.value = "medical"
    assert not widget.add_folder.native.isHidden() and len(widget.folders) == 2
    assert widget.code_gain.value == 1.0  # medical keeps the sources' intensity scale
    assert widget.base_rule.value == "choose-max"  # and its own rules (fuse_multimodal's)
    widget.code_gain.value = 1.5
    dirs = []
    for name, seed in (("T1", 1), ("PD", 2), ("PET", 3)):
        dirs.append(tmp_path / name)
        dirs[-1].mkdir()
        shape = (40, 48, 3) if name == "PET" else (40, 48)
        iio.imwrite(dirs[-1] / "slice.png", noise(shape, seed))
    widget.set_folders(dirs, tmp_path / "out")
    assert [e.label for e in widget.folders][-1] == "modality 3 folder"
    widget.format.value = "png"
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("1 written"), widget.status.value
    fused = iio.imread(tmp_path / "out" / "slice.png")
    assert fused.shape == (40, 48, 3) and fused.dtype == np.uint8
    from napari_cscfusion.engine.io import read_image_metadata

    meta = read_image_metadata(tmp_path / "out" / "slice.png")
    assert meta["code_gain"] == 1.5 and meta["sources"] == ["T1", "PD", "PET"]
    assert (meta["base_rule"], meta["detail_rule"]) == ("choose-max", "l1-black")
    assert widget.last_layer.rgb and widget.last_layer.data.shape == (1, 40, 48, 3)


def test_results_of_another_size_are_named_not_stacked(qtbot, batch_widget, tmp_path):
    viewer, widget = batch_widget
    ir, vis = pairs(tmp_path, 2)
    iio.imwrite(ir / "wide.png", noise((40, 64), 8))
    iio.imwrite(vis / "wide.png", noise((40, 64), 9))
    widget.set_folders([ir, vis], tmp_path / "out")
    run_and_wait(qtbot, widget)
    layer = widget.last_layer
    assert layer.data.shape == (2, 40, 48)  # lazy: each file read when shown
    assert layer.metadata["cscfusion"]["files"] == [str(tmp_path / "out" / f"p{i}.tif")
                                                   for i in range(2)]
    np.testing.assert_array_equal(np.asarray(layer.data[0]),
                                  tifffile.imread(tmp_path / "out" / "p0.tif"))
    assert widget.status.value.endswith("not opened (other sizes): wide.tif")


def test_rules_gain_and_tile_side_are_advanced_settings_and_reach_the_run(qtbot, batch_widget,
                                                                          tmp_path):
    """The options of ``cscfusion batch``: both rules, the gain and the tile side, folded
    under "Advanced settings" with the weights and device, shown per task, and passed on."""
    from napari_cscfusion import fuse_infrared_visible

    _viewer, widget = batch_widget
    expert = [widget.base_rule, widget.detail_rule, widget.code_gain, widget.tile,
              widget.device]
    assert all(w in list(widget.advanced) for w in expert)
    assert widget.advanced.native.isHidden()  # folded until asked for
    widget.show_advanced.value = True
    assert not widget.advanced.native.isHidden()
    # plain labels, as the fusion widgets; the task's own default rules
    assert (widget.base_rule.label, widget.detail_rule.label) == ("coarse structure",
                                                                  "fine detail")
    assert widget.detail_rule.value == "l1"
    widget.task.value = "medical"
    assert (widget.base_rule.value, widget.detail_rule.value) == ("choose-max", "l1-black")
    assert widget.tile.native.isHidden()  # the medical fusion takes no tile side
    widget.task.value = "mef"
    assert widget.detail_rule.native.isHidden() and not widget.tile.native.isHidden()
    assert widget.weights.source in list(widget.advanced)  # remade for CSC-MEFN, still there
    widget.task.value = "ivf"
    assert widget.tile.value == "auto"  # from free memory, as the CLI without --tile

    ir, vis = pairs(tmp_path, 1)
    widget.base_rule.value, widget.detail_rule.value = "l1", "average"
    widget.tile.value = 256
    widget.set_folders([ir, vis], tmp_path / "out")
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("1 written"), widget.status.value
    meta = read_tiff_metadata(tmp_path / "out" / "p0.tif")
    assert (meta["base_rule"], meta["detail_rule"], meta["tile"]) == ("l1", "average", 256)
    want = fuse_infrared_visible(iio.imread(ir / "p0.png"), iio.imread(vis / "p0.png"),
                                 base_rule="l1", detail_rule="average", device="cpu")
    np.testing.assert_allclose(tifffile.imread(tmp_path / "out" / "p0.tif"), want.image,
                               atol=1e-5, rtol=0)
