"""The public engine API: input checking, normalisation, devices, results and metadata."""

import numpy as np
import pytest
import torch

from napari_cscfusion import fuse_exposures, fuse_guided, fuse_infrared_visible, load_model
from napari_cscfusion.engine import available_devices, resolve_device
from napari_cscfusion.engine.inputs import normalise
from napari_cscfusion.models.checkpoints import CheckpointError

from ._shared import CKPT, DATA, authors_model, grey, missing, needs_shared, read

# --- normalisation (no weights needed) ----------------------------------------------------

def test_integer_images_are_scaled_by_their_dtype_maximum():
    a = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_allclose(normalise(a, "x").data, [[0, 128 / 255, 1]], rtol=1e-6)
    b = np.array([[0, 65535]], np.uint16)
    np.testing.assert_allclose(normalise(b, "x").data, [[0, 1]])
    c = np.array([[-1000, 0, 3000]], np.int16)  # CT-like: negative values -> min-max
    n = normalise(c, "x")
    np.testing.assert_allclose(n.data, [[0, 0.25, 1]])
    assert "min-max" in n.note


def test_floats_in_unit_range_pass_unchanged_others_are_min_max_scaled():
    a = np.array([[0.2, 0.7]], np.float64)
    n = normalise(a, "x")
    assert n.data.dtype == np.float32
    np.testing.assert_allclose(n.data, a, rtol=1e-6)
    assert "as is" in n.note
    b = np.array([[10.0, 30.0, 20.0]], np.float32)
    n = normalise(b, "x")
    np.testing.assert_allclose(n.data, [[0, 1, 0.5]])
    assert "min-max" in n.note and "10" in n.note


@pytest.mark.parametrize("bad,exc,words", [
    (np.array([[0.1, np.nan]]), ValueError, "NaN"),
    (np.array([[0.1, np.inf]]), ValueError, "NaN or infinite"),
    (np.zeros((0, 5)), ValueError, "empty"),
    (np.ones((3, 3), bool), TypeError, "boolean"),
    (np.ones((3, 3), complex), TypeError, "complex"),
])
def test_bad_values_raise_naming_the_argument(bad, exc, words):
    with pytest.raises(exc, match=words) as info:
        normalise(bad, "vis")
    assert "vis" in str(info.value)


# --- devices -----------------------------------------------------------------------------

def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert "cpu" in available_devices()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available.*cpu"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu-9000")


# --- fusion calls (authors' weights) -----------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    if not DATA.is_dir():
        pytest.skip(missing("data/"))
    ir = grey(read(DATA / "ivf" / "tno" / "IR3.png"))[100:164, 200:280]
    vis = grey(read(DATA / "ivf" / "tno" / "VIS3.png"))[100:164, 200:280]
    return ir, vis


@needs_shared
def test_ivf_result_codes_weights_and_metadata(pair):
    ir, vis = pair
    ir_before, vis_before = ir.copy(), vis.copy()
    r = fuse_infrared_visible(ir, vis, model=authors_model("ivf"), base_rule="l1",
                              device="cpu", codes=True)
    assert r.image.shape == ir.shape and r.image.dtype == np.float32
    assert 0 <= r.image.min() and r.image.max() <= 1
    assert set(r.codes) == {"infrared_base", "infrared_detail", "visible_base",
                            "visible_detail", "fused_base", "fused_detail"}
    assert all(c.shape == (64, *ir.shape) and c.dtype == np.float32 for c in r.codes.values())
    # detail weights sum to one over the two sources
    np.testing.assert_allclose(r.weights["detail"].sum(0), 1, atol=1e-5)
    assert r.weights["detail"].shape == (2, *ir.shape)
    m = r.metadata
    assert m["task"] == "ivf" and m["device"] == "cpu" and m["base_rule"] == "l1"
    assert len(m["weights_sha256"]) == 3 and all(len(h) == 64 for h in
                                                 m["weights_sha256"].values())
    assert m["timings"]["network_s"] > 0
    np.testing.assert_array_equal(ir, ir_before)
    np.testing.assert_array_equal(vis, vis_before)
    # without codes=True no code maps are kept
    assert fuse_infrared_visible(ir, vis, model=authors_model("ivf"), base_rule="average",
                                 device="cpu").codes == {}


@needs_shared
def test_ivf_fusion_keeps_structure_of_both_sources(pair):
    ir, vis = pair
    fused = fuse_infrared_visible(ir, vis, model=authors_model("ivf"), base_rule="l1",
                                  device="cpu").image
    for src in (ir, vis):
        corr = np.corrcoef(fused.ravel(), src.ravel().astype(float))[0, 1]
        assert corr > 0.3
    assert not np.allclose(fused, ir / 255, atol=0.02)
    assert not np.allclose(fused, vis / 255, atol=0.02)


@needs_shared
@pytest.mark.parametrize("change,words", [
    (lambda ir, vis: ((ir, vis[:-1]), {}), r"ir \(64, 80\).*vis \(63, 80\)"),
    (lambda ir, vis: ((np.dstack([ir] * 3), vis), {}), "ir: expected a grey image"),
    (lambda ir, vis: ((ir[:4, :4], vis[:4, :4]), {}), "at least 6x6"),
    (lambda ir, vis: ((ir, vis), {"base_rule": "max"}), "base_rule"),
    (lambda ir, vis: ((ir, vis), {"device": "cuda:7"}), "device"),
])
def test_ivf_bad_input(pair, change, words):
    args, kwargs = change(*pair)
    if "device" in kwargs and torch.cuda.device_count() > 7:
        pytest.skip("needs CUDA device 7 to be absent (this machine has 8 GPUs)")
    with pytest.raises(ValueError, match=words):
        fuse_infrared_visible(*args, model=authors_model("ivf"), **kwargs)


def test_medical_weights_are_a_csc_ivfn_of_their_own():
    """fuse_multimodal's default is packaged medical.pt, a CSC-IVFN: any CSC-IVFN model is
    accepted for medical fusion, a CSC-MEFN one is refused by name."""
    from napari_cscfusion.engine.medical import fuse_multimodal

    medical, ivf = load_model("medical"), load_model("ivf")
    assert (medical.task, medical.name, medical.weights_label) == \
        ("ivf", "CSC-IVFN", "packaged medical.pt")
    assert any(not torch.equal(a, b) for a, b in zip(medical.network.state_dict().values(),
                                                       ivf.network.state_dict().values(),
                                                       strict=True))
    x = np.random.default_rng(0).random((24, 32), np.float32)
    assert fuse_multimodal([x, x], device="cpu").metadata["weights"] == "packaged medical.pt"
    with_ivf = fuse_multimodal([x, x], model=ivf, device="cpu")
    assert with_ivf.metadata["weights"] == "packaged ivf.pt"
    with pytest.raises(ValueError, match="CSC-MEFN.*needs a CSC-IVFN"):
        fuse_multimodal([x, x], model=load_model("mef"), device="cpu")
    with pytest.raises(ValueError, match="task must be one of ivf, mef, mmf, medical"):
        load_model("medicine")


@needs_shared
def test_model_of_another_task_is_refused(pair):
    ir, vis = pair
    with pytest.raises(ValueError, match="CSC-IVFN"):
        fuse_infrared_visible(ir, vis, model=authors_model("mef"))


@needs_shared
def test_mef_grey_and_rgb_and_bad_stacks():
    stack = np.stack([read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[20:60, 30:80, :3]
                      for i in (3, 8, 12)])
    m = authors_model("mef")
    rgb = fuse_exposures(stack, model=m, device="cpu", codes=True)
    assert rgb.image.shape == (40, 50, 3)
    assert rgb.weights["exposures"].shape == (3, 40, 50)
    np.testing.assert_allclose(rgb.weights["exposures"].sum(0), 1, atol=1e-5)
    assert set(rgb.codes) == {"exposure_0", "exposure_1", "exposure_2"}
    assert rgb.codes["exposure_0"].shape == (24, 40, 50)
    greys = stack.mean(-1).astype(np.uint8)
    g = fuse_exposures(greys, model=m, device="cpu")
    assert g.image.shape == (40, 50) and g.metadata["colour"] == "grey"
    with pytest.raises(ValueError, match="at least 2 exposures"):
        fuse_exposures(stack[:1], model=m)
    with pytest.raises(ValueError, match=r"3 channels last"):
        fuse_exposures(np.zeros((3, 10, 10, 4), np.uint8), model=m)
    with pytest.raises(ValueError, match="stack: expected"):
        fuse_exposures(np.zeros((10, 10)), model=m)


@needs_shared
def test_mmf_shapes_channels_and_errors():
    m = authors_model("mmf")
    rng = np.random.default_rng(0)
    low = rng.random((31, 12, 20), np.float32)
    guide = rng.random((24, 40, 3), np.float32)
    r = fuse_guided(low, guide, model=m, device="cpu", codes=True)
    assert r.image.shape == (31, 24, 40)
    assert r.codes["low_res"].shape == (256, 12, 20) and r.codes["fused"].shape == (256, 24, 40)
    assert r.metadata["scale"] == (2.0, 2.0)
    with pytest.raises(ValueError, match="expects 31 channel"):
        fuse_guided(low[:3], guide, model=m)
    with pytest.raises(ValueError, match="guide: must be at least as large"):
        fuse_guided(low, guide[:10, :10], model=m)
    with pytest.raises(ValueError, match="at least 4x4"):
        fuse_guided(low[:, :3, :3], guide, model=m)


# --- checkpoints ----------------------------------------------------------------------------

@needs_shared
def test_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes((CKPT / "csc_mefn_authors.pth").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_model("mef", bad)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth.*not a readable"):
        load_model("mef", text)
    with pytest.raises(CheckpointError, match="expected CSC-MMFN"):
        load_model("mmf", CKPT / "csc_mefn_authors.pth")
    with pytest.raises(CheckpointError, match="only the ivf-base part"):
        load_model("ivf", CKPT / "csc_ivfn_base_authors.pth")
    with pytest.raises(CheckpointError, match=r"three CSC-IVFN.*unreadable: \['broken.pth'"):
        load_model("ivf", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="three CSC-IVFN.*no .pth"):
        load_model("ivf", tmp_path / "empty")


@needs_shared
def test_checkpoint_shape_mismatch_is_named(tmp_path):
    sd = torch.load(CKPT / "csc_mefn_authors.pth", map_location="cpu", weights_only=True)
    sd["main.3.norm.weight"] = torch.ones(5)
    torch.save(sd, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=r"encoder.dcus.0.norm.weight: file \(5,\)"):
        load_model("mef", tmp_path / "edited.pth")


def test_pickled_code_is_never_executed(tmp_path):
    """Unpickling the payload would create the marker file: the proof that code ran (the
    error alone cannot tell, load_model raises it either way)."""
    import pickle

    marker = tmp_path / "code_ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.pth"
    p.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_model("mef", p)
    assert not marker.exists()


@needs_shared
def test_our_format_round_trip(tmp_path):
    from napari_cscfusion.models import save_checkpoint

    m = authors_model("mef")
    path = save_checkpoint(m.network, tmp_path / "mine.pt", "mef", training={"data": "test"})
    again = load_model("mef", path)
    assert again.info["format"] == "napari-cscfusion"
    assert again.info["header"]["training"] == {"data": "test"}
    for a, b in zip(m.network.state_dict().values(), again.network.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(CheckpointError, match="task 'mef', expected 'mmf'"):
        load_model("mmf", path)
