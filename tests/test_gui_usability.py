"""The widgets as a scientist meets them (issue 19), in a real napari viewer (Xvfb): the dock
keeps its width, no stray sliders, pickers offer inputs only, plain words, presets, and the
"look before you trust" tools (side-by-side comparison, weight-map legend, elapsed time, units
and baselines in the quality table)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_cscfusion import fuse_infrared_visible, load_model, metrics  # noqa: E402
from napari_cscfusion.baselines import average_fusion  # noqa: E402

PLUGIN = "napari-cscfusion"
IVF, MEF, MMF = "Infrared + visible fusion", "Exposure fusion", "Guided super-resolution"
MEDICAL, QUALITY = "Medical fusion", "Fusion quality"
WINDOW = (1400, 900)


def dock(viewer, name):
    dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return dock_widget, widget


def settle(qtbot, ms=50):
    QApplication.processEvents()
    qtbot.wait(ms)
    QApplication.processEvents()


def run_and_wait(qtbot, widget, timeout=120_000):
    widget.run_button.native.click()
    busy = getattr(type(widget), "busy", None)
    qtbot.waitUntil(lambda: not (widget.busy if busy else widget.running), timeout=timeout)


def notes_since(n, word=""):
    return [(str(r.severity).lower(), str(r.message)) for r in notification_manager.records[n:]
            if word in str(r.severity).lower()]


def shown(widget) -> bool:
    """Not hidden (``visible`` is False for every widget of a viewer that is not shown)."""
    return not widget.native.isHidden()


def dock_fraction(viewer, dock_widget) -> float:
    return dock_widget.width() / viewer.window._qt_window.width()


@pytest.fixture
def shown_viewer(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*WINDOW)
    return viewer


def pair(viewer, names=("ir", "vis"), shape=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    return [viewer.add_image(rng.random(shape, np.float32), name=n) for n in names]


@pytest.fixture
def ivf_setup(make_napari_viewer, fusion_weights):
    """A viewer with two random 40x48 layers 'ir', 'vis' and the infrared + visible widget."""
    viewer = make_napari_viewer()
    ir, vis = pair(viewer)
    _d, widget = ivf_widget(viewer, fusion_weights, ir, vis)
    return viewer, widget, ir, vis


def ivf_widget(viewer, fusion_weights, ir, vis):
    dock_widget, widget = dock(viewer, IVF)
    widget.weights.set_path(fusion_weights("ivf"))
    widget.ir_layer.value, widget.vis_layer.value = ir, vis
    widget.base_rule.value = "l1"
    return dock_widget, widget


# --- 1. the dock keeps its width ------------------------------------------------------------

LONG = "a rather long layer name as microscopes and scanners write them " * 3


def test_dock_stays_narrow_through_long_names_errors_and_medical_status(shown_viewer, qtbot,
                                                                       fusion_weights):
    viewer = shown_viewer
    rng = np.random.default_rng(0)
    viewer.add_image(rng.random((40, 40), np.float32), name="infrared " + LONG)
    viewer.add_image(rng.random((40, 52), np.float32), name="visible " + LONG)
    ivf_dock, widget = dock(viewer, IVF)
    settle(qtbot)
    assert dock_fraction(viewer, ivf_dock) <= 0.4
    widget.run_button.native.click()  # a shape mismatch: a long error naming both layers
    settle(qtbot)
    assert widget.status.value.startswith("error") and LONG.strip() in widget.status.value
    assert LONG.strip() in widget.status.native.toolTip()  # the whole text, in the tooltip
    assert dock_fraction(viewer, ivf_dock) <= 0.4

    # colour channels first in the low-res slot of guided super-resolution
    viewer.add_image(rng.random((3, 20, 26), np.float32), name="low " + LONG)
    viewer.add_image(rng.random((80, 104), np.float32), name="guide " + LONG)
    mmf_dock, mmf = dock(viewer, MMF)
    mmf.low_layer.value = viewer.layers["low " + LONG]
    mmf.guide_layer.value = viewer.layers["guide " + LONG]
    mmf.run_button.native.click()
    settle(qtbot)
    assert mmf.status.value.startswith("error")
    assert dock_fraction(viewer, mmf_dock) <= 0.4
    assert viewer.window._qt_window.width() <= WINDOW[0]

    # the medical widget's alignment status names every layer
    med_dock, med = dock(viewer, MEDICAL)
    t1 = viewer.add_image(rng.random((48, 48), np.float32), name="T1 " + LONG)
    pd = viewer.add_image(np.roll(t1.data, 3, 0), name="PD " + LONG)
    med.reset_choices()
    med.sources.value = [t1, pd]
    med.reference.value = t1
    med.check_button.native.click()
    qtbot.waitUntil(lambda: not med.busy, timeout=60_000)
    settle(qtbot)
    assert "PD " + LONG.strip() in med.alignment_status.value
    assert dock_fraction(viewer, med_dock) <= 0.4
    assert viewer.window._qt_window.width() <= WINDOW[0]


def test_dock_titles_are_not_cut(shown_viewer, qtbot):
    viewer = shown_viewer
    for name in (IVF, MEF, MMF, MEDICAL, QUALITY):
        dock_widget, _w = dock(viewer, name)
        settle(qtbot)
        title = dock_widget.title.title  # napari's title bar label
        needed = title.fontMetrics().horizontalAdvance(title.text())
        assert needed <= title.width(), (title.text(), needed, title.width())


# --- 2. no stray slider ---------------------------------------------------------------------

def test_default_2d_run_adds_no_slider_and_weight_maps_are_per_source(ivf_setup, qtbot):
    viewer, widget, ir, vis = ivf_setup
    run_and_wait(qtbot, widget)
    assert "ir + vis (CSC-IVFN)" in viewer.layers
    assert viewer.dims.ndim == 2  # no slider at all
    assert not shown(widget.legend)

    widget.weight_maps.value = True
    run_and_wait(qtbot, widget)
    assert viewer.dims.ndim == 2
    maps = [lay for lay in viewer.layers
            if lay.metadata.get("cscfusion", {}).get("role") == "weights"]
    assert sorted((m.metadata["cscfusion"]["weights"], m.metadata["cscfusion"]["source"])
                  for m in maps) == [("base", "ir"), ("base", "vis"), ("detail", "ir"),
                                     ("detail", "vis")]
    for key in ("base", "detail"):
        pair_maps = [m.data for m in maps if m.metadata["cscfusion"]["weights"] == key]
        np.testing.assert_allclose(pair_maps[0] + pair_maps[1], 1.0, atol=1e-5)
    # the legend: a colour bar on each map, and a line in the widget
    assert all(m.colorbar.visible for m in maps)
    assert shown(widget.legend) and "0" in widget.legend.value and "1" in widget.legend.value


def test_every_channel_codes_slider_says_code_channel(ivf_setup, qtbot):
    viewer, widget, ir, vis = ivf_setup
    widget.codes.value = "all"
    run_and_wait(qtbot, widget)
    assert viewer.dims.ndim == 3  # the one slider selects a code channel, and says so
    assert viewer.dims.axis_labels[0] == "code channel"
    assert "source" not in viewer.dims.axis_labels
    widget.weight_maps.value = True  # the weight maps add no axis
    run_and_wait(qtbot, widget)
    assert viewer.dims.ndim == 3 and viewer.dims.axis_labels[0] == "code channel"


# --- 3. stack pickers -----------------------------------------------------------------------

def test_stack_picker_offers_only_layers_with_an_exposure_axis(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "infrared_visible")  # 2-D layers only (scripts/demo.sh --gui)
    _d, widget = dock(viewer, MEF)
    assert widget.stack_layer.value is None
    assert not [c for c in widget.stack_layer.choices if c is not None]
    assert shown(widget.stack_hint) and "Exposure bracket" in widget.stack_hint.value
    assert not widget.status.value.startswith("error")
    rng = np.random.default_rng(0)
    stack = viewer.add_image(rng.random((3, 20, 24), np.float32), name="bracket")
    assert widget.stack_layer.value is stack
    assert widget.exposure_axis.value == 0 and not shown(widget.stack_hint)
    viewer.open_sample(PLUGIN, "exposure_bracket")  # marked as an exposure stack: preferred
    assert widget.stack_layer.value is viewer.layers["courtyard exposures"]


def test_launcher_opens_the_exposure_widget_without_an_error(monkeypatch, make_napari_viewer):
    import napari

    from napari_cscfusion.gui import __main__ as launcher
    from napari_cscfusion.gui.mef_widget import MultiExposureWidget

    made = []
    monkeypatch.setattr(napari, "Viewer", lambda **kw: made.append(make_napari_viewer(**kw))
                        or made[-1])
    monkeypatch.setattr(napari, "run", lambda: None)
    launcher.main()
    widgets = [w for w in made[0].window.dock_widgets.values()
               if isinstance(w, MultiExposureWidget)]
    assert len(widgets) == 1
    mef = widgets[0]
    assert mef.stack_layer.value is None and shown(mef.stack_hint)
    assert not mef.status.value  # no error on opening


# --- 4. pickers offer inputs; reruns keep the names -------------------------------------------

def test_pickers_list_inputs_only_and_rerun_keeps_names(ivf_setup, qtbot):
    viewer, widget, ir, vis = ivf_setup
    widget.codes.value = "summary"
    widget.weight_maps.value = True
    run_and_wait(qtbot, widget)
    outputs = [lay for lay in viewer.layers if lay not in (ir, vis)]
    assert len(outputs) == 1 + 6 + 4
    names = sorted(lay.name for lay in outputs)
    _d, mef = dock(viewer, MEF)
    _d, med = dock(viewer, MEDICAL)
    for combo in (widget.ir_layer, widget.vis_layer, med.reference):
        assert [c for c in combo.choices if c is not None] == [ir, vis]
    for select in (mef.exposure_layers, med.sources):
        assert list(select.choices) == [ir, vis]
    # the quality widget measures the result against the inputs
    _d, quality = dock(viewer, QUALITY)
    assert quality.fused_layer.value.name == "ir + vis (CSC-IVFN)"
    assert list(quality.source_layers.choices) == [ir, vis]

    run_and_wait(qtbot, widget)  # a rerun replaces the outputs under the same names
    assert sorted(lay.name for lay in viewer.layers if lay not in (ir, vis)) == names
    assert not any("[1]" in lay.name for lay in viewer.layers)
    assert not any(lay in viewer.layers for lay in outputs)


# --- 5. plain words -------------------------------------------------------------------------

def test_messages_and_names_in_plain_words(ivf_setup, qtbot):
    viewer, widget, ir, vis = ivf_setup
    # rules and options as a scientist reads them; the help says nothing wrong about speed
    labels = [widget.base_rule.native.itemText(i) for i in range(widget.base_rule.native.count())]
    assert labels == ["keep salient regions", "keep the stronger detail", "average the sources",
                      "keep the source that is not black",
                      "keep the stronger detail, black as zero"]
    assert widget.code_gain.label == "contrast gain"
    for combo in (widget.base_rule, widget.detail_rule):
        assert "slow" not in combo.tooltip and "fast" not in combo.tooltip
    widget.codes.value = "summary"
    run_and_wait(qtbot, widget)
    codes = [lay for lay in viewer.layers
             if lay.metadata.get("cscfusion", {}).get("role") == "codes"]
    assert len(codes) == 6
    for lay in codes:
        assert "_" not in lay.name and "0% zero" not in lay.name
        zeros = lay.metadata["cscfusion"]["sparsity"]
        assert (f"{100 * zeros:.0f}% zero" in lay.name) == (zeros >= 0.005)
    # the IVF base encoder is PReLU by design: its layer says so and claims no sparsity
    assert "infrared base activity, PReLU · ir + vis (CSC-IVFN)" in viewer.layers

    # channels first in a low-res layer: says what is wrong and what to do, no jargon
    _d, mmf = dock(viewer, MMF)
    rng = np.random.default_rng(0)
    low = viewer.add_image(rng.random((3, 10, 12), np.float32), name="rgb low-res")
    mmf.low_layer.value, mmf.guide_layer.value = low, vis
    n = len(notification_manager.records)
    mmf.run_button.native.click()
    errors = notes_since(n, "error")
    assert len(errors) == 1
    msg = errors[0][1]
    assert "colour channels" in msg and "3 images of 10x12" in msg
    assert "leading" not in msg and "extra (time/z)" not in msg
    assert not msg.startswith(("CSC-", "images:"))


def test_rgb_low_res_with_grey_weights_says_what_to_do(make_napari_viewer, qtbot):
    from napari_cscfusion.engine.registry import packaged_weights_path

    if not packaged_weights_path("mmf").is_file():
        pytest.skip("no packaged (grey) CSC-MMFN weights")
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    low = viewer.add_image(rng.random((20, 24, 3), np.float32), name="colour low-res", rgb=True)
    guide = viewer.add_image(rng.random((80, 96), np.float32), name="guide")
    _d, mmf = dock(viewer, MMF)
    mmf.weights.set_path(None)
    mmf.low_layer.value, mmf.guide_layer.value = low, guide
    n, n_layers = len(notification_manager.records), len(viewer.layers)
    run_and_wait(qtbot, mmf)
    errors = notes_since(n, "error")
    assert len(errors) == 1
    assert "'colour low-res' is a colour (RGB) image" in errors[0][1]
    assert "grey layer" in errors[0][1] and "leading" not in errors[0][1]
    assert len(viewer.layers) == n_layers and mmf.progress.value == 0


def test_medical_sources_message_without_argument_names(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    a = viewer.add_image(rng.random((30, 30, 3), np.float32), name="PET", rgb=True)
    b = viewer.add_image(rng.random((30, 30, 3), np.float32), name="SPECT", rgb=True)
    _d, med = dock(viewer, MEDICAL)
    med.sources.value = [a, b]
    n = len(notification_manager.records)
    med.run_button.native.click()
    errors = notes_since(n, "error")
    assert len(errors) == 1 and "at most one colour" in errors[0][1]
    assert not errors[0][1].startswith(("images:", "CSC-"))


# --- 6. medical widget ------------------------------------------------------------------------

def test_medical_preselects_and_a_click_toggles_a_source(make_napari_viewer, qtbot):
    from qtpy.QtTest import QTest

    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "mri_t1_pd")
    _d, med = dock(viewer, MEDICAL)
    t1, pd = viewer.layers["BrainWeb T1"], viewer.layers["BrainWeb PD"]
    assert list(med.sources.value) == [t1, pd]  # exactly the two MRI slices: both chosen
    assert med.reference.value is t1
    settle(qtbot)
    extra = viewer.add_image(np.zeros_like(t1.data), name="mask")
    settle(qtbot)
    assert list(med.sources.value) == [t1, pd]  # a new layer does not change the choice
    q = med.sources.native

    def click(row):
        rect = q.visualItemRect(q.item(row))
        QTest.mouseClick(q.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier(0),
                         rect.center())
        settle(qtbot, 10)

    rows = {q.item(i).text(): i for i in range(q.count())}

    def ticked():
        return {q.item(i).text() for i in range(q.count())
                if q.item(i).data(Qt.ItemDataRole.CheckStateRole) == Qt.CheckState.Checked}

    assert ticked() == {"BrainWeb T1", "BrainWeb PD"}  # tick boxes show what is chosen
    click(rows["mask"])  # a plain click adds a layer, no ctrl needed
    assert set(med.sources.value) == {t1, pd, extra}
    click(rows["BrainWeb PD"])  # and removes one
    assert set(med.sources.value) == {t1, extra}
    assert ticked() == {"BrainWeb T1", "mask"}
    med.sources.value = [pd]  # set in code: the boxes follow too
    assert ticked() == {"BrainWeb PD"}


def test_medical_size_error_first_cleared_by_registration(make_napari_viewer, qtbot,
                                                          fusion_weights):
    from napari_cscfusion.gui._sample_data import medical_pair

    viewer = make_napari_viewer()
    (t1, _k1, _t), (pd, _k2, _t2) = medical_pair()
    a = viewer.add_image(np.pad(t1[60:124, 50:114], 8), name="T1")
    b = viewer.add_image(pd[60:124, 50:114], name="PD small")
    _d, med = dock(viewer, MEDICAL)
    med.weights.set_path(fusion_weights("ivf"))
    med.sources.value = [a, b]
    med.reference.value = a
    med.base_rule.value = "l1"
    assert med.check_first.value
    # a successful run first: then the error must not sit beside a full progress bar
    c = viewer.add_image(np.pad(pd[60:124, 50:114], 8), name="PD")
    med.sources.value = [a, c]
    run_and_wait(qtbot, med)
    assert med.progress.value == med.progress.max
    med.sources.value = [a, b]
    n = len(notification_manager.records)
    run_and_wait(qtbot, med)
    notes = notes_since(n)
    assert [sev for sev, _m in notes] == ["error"]  # the size error, no misalignment warning
    assert "differ in size" in notes[0][1] and "Register to reference" in notes[0][1]
    assert med.status.value.startswith("error") and med.progress.value == 0
    med.register_button.native.click()
    qtbot.waitUntil(lambda: not med.busy, timeout=60_000)
    assert "PD small registered to T1" in viewer.layers
    assert not med.status.value.startswith("error")


# --- 7. an infrared layer in colour ------------------------------------------------------------

def test_rgb_infrared_is_converted_with_a_visible_notice(make_napari_viewer, qtbot,
                                                         fusion_weights):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    grey = rng.random((40, 48), np.float32)
    ir = viewer.add_image(np.repeat(grey[..., None], 3, -1), name="thermal rgb", rgb=True)
    vis = viewer.add_image(rng.random((40, 48), np.float32), name="vis")
    _d, widget = ivf_widget(viewer, fusion_weights, ir, vis)
    n = len(notification_manager.records)
    run_and_wait(qtbot, widget)
    warnings = [m for sev, m in notes_since(n, "warning")]
    assert len(warnings) == 1 and "'thermal rgb'" in warnings[0]
    assert "colour" in warnings[0] and "grey" in warnings[0]
    assert "grey" in widget.status.value
    fused = viewer.layers["thermal rgb + vis (CSC-IVFN)"]
    assert fused.metadata["cscfusion"]["infrared_colour"].startswith("converted to grey")
    # grey values saved as RGB: the same result as the grey layer
    direct = fuse_infrared_visible(grey, vis.data, load_model("ivf", fusion_weights("ivf")),
                                   base_rule="l1")
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-5)


# --- presets ----------------------------------------------------------------------------------

def test_presets_set_the_expert_fields_and_a_run_uses_them(ivf_setup, qtbot):
    viewer, widget, ir, vis = ivf_setup
    assert not shown(widget.advanced)  # folded
    widget.show_advanced.value = True
    assert shown(widget.advanced)
    assert widget.base_rule in widget.advanced and widget.code_gain in widget.advanced
    widget.preset.value = "Keep intensities (quantitative)"
    assert (widget.base_rule.value, widget.detail_rule.value, widget.code_gain.value) == (
        "average", "l1", 1.0)
    run_and_wait(qtbot, widget)
    meta = viewer.layers["ir + vis (CSC-IVFN)"].metadata["cscfusion"]
    assert (meta["base_rule"], meta["detail_rule"], meta["code_gain"]) == ("average", "l1", 1.0)
    widget.preset.value = "Thermal surveillance"
    assert (widget.base_rule.value, widget.code_gain.value) == ("saliency", 2.0)
    widget.code_gain.value = 1.5  # by hand: the preset no longer describes the settings
    assert widget.preset.value.startswith("custom")

    _d, med = dock(viewer, MEDICAL)
    assert med.preset.value == "MRI + CT, PET or SPECT"
    assert (med.base_rule.value, med.detail_rule.value, med.code_gain.value) == (
        "choose-max", "l1-black", 1.0)  # fuse_multimodal's defaults
    med.preset.value = "Keep intensities (quantitative)"
    assert (med.base_rule.value, med.detail_rule.value, med.code_gain.value) == (
        "average", "l1", 1.0)


# --- look before you trust --------------------------------------------------------------------

def test_compare_side_by_side_and_back(make_napari_viewer, qtbot, fusion_weights):
    viewer = make_napari_viewer()
    ir, vis = pair(viewer)
    other = viewer.add_image(np.zeros((40, 48), np.float32), name="other")
    _d, widget = ivf_widget(viewer, fusion_weights, ir, vis)
    assert not widget.compare_button.enabled  # nothing to compare yet
    widget.codes.value = "summary"
    run_and_wait(qtbot, widget)
    fused = viewer.layers["ir + vis (CSC-IVFN)"]
    before = [lay.name for lay in viewer.layers]
    visible = {lay.name: lay.visible for lay in viewer.layers}
    widget.compare_button.native.click()
    assert viewer.grid.enabled and widget.comparing
    assert [lay.name for lay in viewer.layers if lay.visible] == [ir.name, vis.name, fused.name]
    assert not other.visible
    # the compared layers fill the grid's cells (sources left, result right)
    assert viewer.grid.shape == (1, 3)
    assert [lay.name for lay in viewer.layers][-3:] == [ir.name, vis.name, fused.name]
    widget.compare_button.native.click()
    assert not viewer.grid.enabled and not widget.comparing
    assert [lay.name for lay in viewer.layers] == before
    assert {lay.name: lay.visible for lay in viewer.layers} == visible


def test_status_shows_elapsed_time_while_running(make_napari_viewer, qtbot, fusion_weights):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    ir = viewer.add_image(rng.random((3, 96, 96), np.float32), name="ir")
    vis = viewer.add_image(rng.random((3, 96, 96), np.float32), name="vis")
    _d, widget = ivf_widget(viewer, fusion_weights, ir, vis)
    seen = []
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: seen.append(widget.status.value) or not widget.running,
                    timeout=120_000)
    running = [s for s in seen if s.startswith("running")]
    # "(2 s)"; past ETA_AFTER_S (a busy machine) "(5 s elapsed)", then with "about 3 s left"
    assert running and all(s.endswith((" s)", " elapsed)", " left)")) for s in running), \
        sorted(set(running))
    assert widget.status.value.startswith("done in ")


def test_quality_table_has_units_and_an_average_baseline(make_napari_viewer, qtbot,
                                                         fusion_weights):
    viewer = make_napari_viewer()
    ir, vis = pair(viewer, shape=(64, 64))  # VIF needs 41x41
    _d, widget = ivf_widget(viewer, fusion_weights, ir, vis)
    run_and_wait(qtbot, widget)
    fused = viewer.layers["ir + vis (CSC-IVFN)"]
    _d, quality = dock(viewer, QUALITY)
    assert quality.fused_layer.value is fused
    quality.compute_button.native.click()
    qtbot.waitUntil(lambda: not quality.running, timeout=120_000)
    headers = list(quality.table.column_headers)
    assert "EN (bits)" in headers and "SSIM (0-1 mean over sources)" in headers
    labels, names, rows = quality.rows
    assert labels == ["image", "average of the sources (baseline)"]
    expected = metrics.evaluate("ivf", [ir.data, vis.data], average_fusion([ir.data, vis.data]))
    np.testing.assert_allclose(rows[1], [expected[n] for n in names], rtol=1e-9)
    assert quality.csv_text().splitlines()[0].startswith("plane,EN (bits),")


def test_quality_super_resolution_baseline_is_bicubic(make_napari_viewer, qtbot):
    from napari_cscfusion.baselines import bicubic_upsample

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "guided_sr")
    low = viewer.layers["TNO infrared low-res x4"]
    ref = viewer.layers["TNO infrared reference"]
    guess = bicubic_upsample(low.data, ref.data.shape)  # stands in for a network result
    viewer.add_image(guess, name="sr", metadata={"cscfusion": {
        "role": "fused", "quality_task": "mmf", "source_layers": [low.name, "guide"],
        "reference_layer": ref.name}})
    _d, quality = dock(viewer, QUALITY)
    quality.compute_button.native.click()
    qtbot.waitUntil(lambda: not quality.running, timeout=120_000)
    labels, names, rows = quality.rows
    assert labels == ["image", "bicubic upsampling (baseline)"] and names == ["PSNR", "SSIM"]
    np.testing.assert_allclose(rows[1], rows[0], rtol=1e-9)  # the same image: the same numbers
    assert "PSNR (dB)" in list(quality.table.column_headers)
