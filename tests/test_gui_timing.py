"""Issue 18: a run over a few seconds shows its elapsed time and an estimate of the time left
(a real napari viewer under Xvfb), and the estimate's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_cscfusion.gui._worker import ETA_AFTER_S, timing_text  # noqa: E402

PLUGIN = "napari-cscfusion"
IVF = "Infrared + visible fusion"


def test_timing_text_extrapolates_the_rate_so_far():
    assert timing_text(1.0, 0.5) == ""  # short runs: nothing
    assert timing_text(10.0, 0.25) == "10 s elapsed, about 30 s left"
    assert timing_text(60.0, 0.4) == "60 s elapsed, about 1 min 30 s left"
    assert timing_text(120.0, 0.5) == "2 min 00 s elapsed, about 2 min 00 s left"
    assert timing_text(5.0, 0.01) == "5 s elapsed"  # too early for an estimate


@pytest.mark.gui
def test_a_long_run_shows_elapsed_and_time_left(make_napari_viewer, qtbot, fusion_weights):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(3)
    ir = viewer.add_image(rng.random((12, 128, 128), np.float32), name="ir")
    vis = viewer.add_image(rng.random((12, 128, 128), np.float32), name="vis")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, IVF)
    widget.weights.set_path(fusion_weights("ivf"))
    widget.ir_layer.value, widget.vis_layer.value = ir, vis
    widget.base_rule.value = "saliency"
    widget.run_button.native.click()
    # a quiet machine may finish before ETA_AFTER_S: start the widget's clock 10 s earlier, so
    # the test waits on the display logic, not on the machine's speed
    widget._started -= 10.0

    def shows_timing() -> bool:
        return "elapsed" in widget.status.value and "left" in widget.status.value

    qtbot.waitUntil(shows_timing, timeout=120_000)
    text = widget.status.value
    assert text.startswith("running")
    elapsed = text.split("(")[-1].split(" elapsed")[0]
    assert elapsed.endswith(" s") and (" min " in elapsed or float(elapsed[:-2]) >= ETA_AFTER_S)
    widget.cancel()
    assert not widget.running
    # after the run: the usual final status, no timing left over by the timer
    qtbot.wait(300)
    assert "elapsed" not in widget.status.value


@pytest.mark.gui
def test_a_long_batch_shows_elapsed_and_time_left(make_napari_viewer, qtbot, tmp_path):
    # the batch widget shares the run state (gui/_running.py): its status too carries the
    # elapsed time and the estimate, item after item
    import imageio.v3 as iio

    from napari_cscfusion.gui.batch_widget import BatchFusionWidget

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Batch fusion of folders")
    assert isinstance(widget, BatchFusionWidget)
    rng = np.random.default_rng(4)
    folders = [tmp_path / "IR", tmp_path / "VIS"]
    for folder in folders:
        folder.mkdir()
        for i in range(8):
            iio.imwrite(folder / f"p{i}.png", (rng.random((96, 96)) * 255).astype(np.uint8))
    widget.set_folders(folders, tmp_path / "out")
    widget.device.value = "cpu"
    widget.base_rule.value = "saliency"  # slower items
    widget.open_when_done.value = False
    widget.run_button.native.click()
    widget._started -= 10.0  # as above: the display logic, not the machine's speed

    def shows_timing() -> bool:
        return "elapsed" in widget.status.value and "left" in widget.status.value

    qtbot.waitUntil(shows_timing, timeout=120_000)
    text = widget.status.value
    assert text.startswith("fusing 8 item(s)") or " of 8: p" in text
    left = text.split("about ")[-1]
    assert left.endswith(" left)") and left[0].isdigit()
    with qtbot.waitSignal(widget.worker.finished, timeout=60_000):
        widget.cancel()
    assert not widget.running
    qtbot.wait(300)
    assert widget.status.value == "cancelled: results written so far are kept"
