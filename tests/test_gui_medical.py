"""Medical / multi-modal widget in a real napari viewer (Xvfb): N layers, colour functional
layer, volumes as NIfTI/DICOM reader plugins make them, alignment check and registration."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cscfusion.engine.medical import fuse_multimodal  # noqa: E402
from napari_cscfusion.engine.registry import load_model, packaged_weights_path  # noqa: E402
from napari_cscfusion.gui.medical_widget import MedicalFusionWidget  # noqa: E402

from ._shared import CKPT, BrainWeb  # noqa: E402

CROP = (slice(60, 124), slice(50, 114))  # 64x64 of the brain: short CPU runs


@pytest.fixture(scope="module")
def weights():
    if packaged_weights_path("medical").is_file():
        return None
    if CKPT.is_dir():
        return str(CKPT)
    pytest.skip("no packaged IVFN weights and no reference checkpoints")


@pytest.fixture(scope="module")
def brain():
    return BrainWeb()


PLUGIN = "napari-cscfusion"
WIDGET = "Medical fusion"


@pytest.fixture
def widget_viewer(make_napari_viewer, weights):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)  # via the manifest
    assert isinstance(widget, MedicalFusionWidget)
    widget.weights.set_path(weights)
    widget.base_rule.value = "l1"  # the saliency rule is slow on a CPU
    widget.check_first.value = False
    return viewer, widget


def run_and_wait(qtbot, widget, timeout=180_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def wait_alignment(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def messages_since(n, word):
    return [str(r.message) for r in notification_manager.records[n:]
            if word in str(r.severity).lower()]


def _model(weights):
    return load_model("medical", weights) if weights else load_model("medical")


def test_three_layers_fused_with_the_first_layers_placement(widget_viewer, brain, qtbot,
                                                            weights):
    viewer, widget = widget_viewer
    if weights is None:  # the medical widget's own packaged file, a CSC-IVFN
        assert widget.weights.source.current_choice == "packaged (medical.pt)"
    t1, pd = brain["t1"][CROP], brain["pd"][CROP]
    t2 = (255 - t1).astype(np.uint8)
    layers = [viewer.add_image(a, name=n, scale=(0.9, 0.9), translate=(5.0, -2.0))
              for a, n in ((t1, "T1"), (pd, "PD"), (t2, "T2"))]
    widget.reset_choices()
    widget.sources.value = layers
    widget.weight_maps.value = True
    run_and_wait(qtbot, widget)
    fused = viewer.layers["T1 + PD + T2 (CSC-IVFN)"]
    assert fused.data.shape == t1.shape
    np.testing.assert_allclose(fused.scale, (0.9, 0.9))
    np.testing.assert_allclose(fused.translate, (5.0, -2.0))
    meta = fused.metadata["cscfusion"]
    assert meta["source_layers"] == ["T1", "PD", "T2"] and meta["widget"] == "medical"
    direct = fuse_multimodal({"T1": t1, "PD": pd, "T2": t2}, _model(weights), base_rule="l1",
                             device="cpu")
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-6)
    weights_layers = [lay for lay in viewer.layers
                      if lay.metadata.get("cscfusion", {}).get("role") == "weights"]
    assert sorted((lay.metadata["cscfusion"]["weights"], lay.metadata["cscfusion"]["source"])
                  for lay in weights_layers) == sorted(
        (k, n) for k in ("base", "detail") for n in ("T1", "PD", "T2"))
    assert all(lay.data.shape == t1.shape for lay in weights_layers)  # one 2-D map per source
    np.testing.assert_array_equal(layers[0].data, t1)  # inputs untouched


def test_code_gain_default_one_reaches_the_engine(widget_viewer, brain, qtbot, weights):
    viewer, widget = widget_viewer
    assert widget.code_gain.value == 1.0  # the medical default: the sources' intensity scale
    t1, pd = brain["t1"][CROP], brain["pd"][CROP]
    layers = [viewer.add_image(t1, name="T1"), viewer.add_image(pd, name="PD")]
    widget.reset_choices()
    widget.sources.value = layers
    run_and_wait(qtbot, widget)
    fused = viewer.layers["T1 + PD (CSC-IVFN)"]
    direct = fuse_multimodal({"T1": t1, "PD": pd}, _model(weights), base_rule="l1",
                             device="cpu", code_gain=1.0)
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-6)
    assert fused.metadata["cscfusion"]["code_gain"] == 1.0
    # another gain goes through to the engine too (and changes the result)
    widget.code_gain.value = 2.0
    run_and_wait(qtbot, widget)
    assert fused not in viewer.layers  # the rerun replaced it (napari renames the new one)
    fused2 = next(lay for lay in viewer.layers if lay.name.startswith("T1 + PD (CSC-IVFN)"))
    authors = fuse_multimodal({"T1": t1, "PD": pd}, _model(weights), base_rule="l1",
                              device="cpu", code_gain=2.0)
    np.testing.assert_allclose(fused2.data, authors.image, atol=1e-6)
    assert fused2.metadata["cscfusion"]["code_gain"] == 2.0
    assert np.abs(authors.image - direct.image).mean() > 0.01


def test_colour_functional_layer_gives_rgb(widget_viewer, brain, qtbot, weights):
    from napari.utils.colormaps import ensure_colormap

    viewer, widget = widget_viewer
    t1, pd = brain["t1"][CROP], brain["pd"][CROP]
    pet = ensure_colormap("hot").map((pd / 255.0).ravel())[:, :3].reshape(pd.shape + (3,))
    pet = pet.astype(np.float32)
    a = viewer.add_image(t1, name="MRI")
    b = viewer.add_image(pet, name="PET", rgb=True)
    widget.reset_choices()
    widget.sources.value = [a, b]
    widget.codes.value = "summary"
    run_and_wait(qtbot, widget)
    fused = viewer.layers["MRI + PET (CSC-IVFN)"]
    assert fused.rgb and fused.data.shape == pet.shape
    direct = fuse_multimodal({"MRI": t1, "PET": pet}, _model(weights), base_rule="l1",
                             device="cpu")
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-6)
    codes = [lay for lay in viewer.layers
             if lay.metadata.get("cscfusion", {}).get("role") == "codes"]
    assert len(codes) == 6 and all(lay.data.shape == t1.shape for lay in codes)


def _reader_like_volumes(brain):
    """Two (z, y, x) float64 volumes with voxel size and origin, as napari-nibabel /
    napari-itk-io return NIfTI or DICOM series (get_fdata() is float64)."""
    t1, pd = brain["t1"][60:100, 50:90], brain["pd"][60:100, 50:90]
    v1 = np.stack([t1, np.roll(t1, 3, 0), np.roll(t1, 5, 1)]).astype(np.float64) * 4.0 - 50.0
    v2 = np.stack([pd, np.roll(pd, 3, 0), np.roll(pd, 5, 1)]).astype(np.float64) * 2.5
    return v1, v2


@pytest.mark.parametrize("axis", [0, 2])
def test_reader_like_volume_slice_by_slice(widget_viewer, brain, qtbot, weights, axis):
    viewer, widget = widget_viewer
    v1, v2 = _reader_like_volumes(brain)
    if axis == 2:  # sagittal planes need >= 6 slices along the first axis
        v1, v2 = np.concatenate([v1, v1[::-1]]), np.concatenate([v2, v2[::-1]])
        v1, v2 = v1[:, :, :6], v2[:, :, :6]
    kw = {"scale": (3.0, 0.9, 0.9), "translate": (-40.0, 12.0, -7.5)}
    a = viewer.add_image(v1, name="T1w", **kw)
    b = viewer.add_image(v2, name="PDw", **kw)
    widget.reset_choices()
    widget.sources.value = [a, b]
    widget.slice_axis.value = axis
    widget.weight_maps.value = True
    run_and_wait(qtbot, widget)
    fused = viewer.layers["T1w + PDw (CSC-IVFN)"]
    assert fused.data.shape == v1.shape
    np.testing.assert_allclose(fused.scale, kw["scale"])
    np.testing.assert_allclose(fused.translate, kw["translate"])
    direct = fuse_multimodal({"T1w": v1, "PDw": v2}, _model(weights), base_rule="l1",
                             device="cpu", axis=axis)
    np.testing.assert_allclose(fused.data, direct.image, atol=1e-6)
    maps = {lay.metadata["cscfusion"]["source"]: lay for lay in viewer.layers
            if lay.metadata.get("cscfusion", {}).get("weights") == "detail"}
    # one map per source, on the sources' axes
    for s, name in enumerate(("T1w", "PDw")):
        np.testing.assert_allclose(maps[name].data, direct.weights["detail"][s], atol=1e-6)


def test_alignment_check_warns_and_registration_fixes_it(widget_viewer, brain, qtbot):
    viewer, widget = widget_viewer
    fixed = viewer.add_image(np.pad(brain["t1"], 20), name="T1")
    moving = viewer.add_image(brain["shifted"], name="PD shifted")
    widget.reset_choices()
    widget.sources.value = [fixed, moving]
    widget.reference.value = fixed
    n = len(notification_manager.records)
    widget.check_button.native.click()
    wait_alignment(qtbot, widget)
    est = widget.last_alignment["PD shifted"]
    assert abs(est["shift"][0] - 17) < 1 and abs(est["shift"][1] - 13) < 1
    assert not est["aligned"]
    assert any("misaligned" in m for m in messages_since(n, "warning"))
    assert "MISALIGNED" in widget.alignment_status.value

    widget.register_button.native.click()
    wait_alignment(qtbot, widget)
    reg = viewer.layers["PD shifted registered to T1"]
    assert reg.data.shape == fixed.data.shape and reg.data.dtype == np.uint8
    assert reg.metadata["cscfusion"]["residual_error_px"] < 1.0
    assert list(widget.sources.value) == [fixed, reg]
    np.testing.assert_array_equal(moving.data, brain["shifted"])  # the moving layer is kept
    n = len(notification_manager.records)
    widget.check_button.native.click()
    wait_alignment(qtbot, widget)
    assert widget.last_alignment["PD shifted registered to T1"]["aligned"]
    assert not any("misaligned" in m for m in messages_since(n, "warning"))


def test_translate_counts_in_the_check(widget_viewer, brain, qtbot):
    # the shifted slice drawn 17, 13 px up-left is aligned as displayed
    viewer, widget = widget_viewer
    fixed = viewer.add_image(np.pad(brain["pd"], 20), name="PD")
    moving = viewer.add_image(brain["shifted"], name="shifted", translate=(-17.0, -13.0))
    widget.reset_choices()
    widget.sources.value = [fixed, moving]
    widget.reference.value = fixed
    widget.check_button.native.click()
    wait_alignment(qtbot, widget)
    assert widget.last_alignment["shifted"]["aligned"]


def test_run_checks_alignment_first_then_fuses(widget_viewer, brain, qtbot):
    viewer, widget = widget_viewer
    widget.check_first.value = True
    crop = (slice(40, 120), slice(40, 120))
    a = viewer.add_image(brain["t1"][crop], name="T1")
    b = viewer.add_image(np.roll(brain["pd"], (4, -3), (0, 1))[crop], name="PD moved")
    widget.reset_choices()
    widget.sources.value = [a, b]
    widget.reference.value = a
    n = len(notification_manager.records)
    run_and_wait(qtbot, widget)
    est = widget.last_alignment["PD moved"]
    np.testing.assert_allclose(est["shift"], (4, -3), atol=1.0)
    assert any("misaligned" in m for m in messages_since(n, "warning"))
    assert "T1 + PD moved (CSC-IVFN)" in viewer.layers  # fused anyway, after the warning


def test_sample_pair_is_aligned_and_fuses(widget_viewer, qtbot):
    viewer, widget = widget_viewer
    viewer.open_sample(PLUGIN, "mri_t1_pd")
    t1, pd = viewer.layers["BrainWeb T1"], viewer.layers["BrainWeb PD"]
    widget.reset_choices()
    widget.sources.value = [t1, pd]
    assert widget.reference.value is t1
    widget.check_first.value = True
    n = len(notification_manager.records)
    run_and_wait(qtbot, widget)
    assert widget.last_alignment["BrainWeb PD"]["aligned"]
    assert not any("misaligned" in m for m in messages_since(n, "warning"))
    assert "BrainWeb T1 + BrainWeb PD (CSC-IVFN)" in viewer.layers


def test_input_errors_are_reported(widget_viewer, brain):
    viewer, widget = widget_viewer
    a = viewer.add_image(brain["t1"][CROP], name="A")
    b = viewer.add_image(brain["pd"][CROP], name="B", scale=(2.0, 2.0))
    c = viewer.add_image(brain["pd"][:50, :50], name="C")
    widget.reset_choices()
    n_layers = len(viewer.layers)
    widget.sources.value = [a]
    widget.run_button.native.click()
    assert "at least 2" in widget.status.value
    widget.sources.value = [a, b]
    widget.run_button.native.click()
    assert "pixel sizes" in widget.status.value
    widget.sources.value = [a, c]
    widget.run_button.native.click()
    assert "differ in size" in widget.status.value
    assert len(viewer.layers) == n_layers and not widget.running
