"""Medical / multi-modal fusion (engine.medical) and the alignment check / rigid registration
(engine.alignment) on the BrainWeb T1/PD slices (ITK examples) that ship as sample data, and the
shifted/rotated PD slices kept in tests/data (no shared data needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_cscfusion.engine.alignment import (
    apply_rigid,
    apply_rigid_planes,
    displacement_rms,
    estimate_misalignment,
    register_rigid,
    transform_matrix,
)
from napari_cscfusion.engine.ivf import fuse_grey_sources
from napari_cscfusion.engine.medical import (
    MEDICAL_BASE_RULE,
    MEDICAL_DETAIL_RULE,
    MedicalVolume,
    MultimodalSources,
    fuse_multimodal,
)
from napari_cscfusion.engine.planes import PlaneAssembler, plane_indices
from napari_cscfusion.engine.registry import load_model, packaged_weights_path
from napari_cscfusion.models.color import rgb_to_ycbcr, ycbcr_to_rgb

from ._shared import CKPT, BrainWeb

# The rotated ITK image is the PD slice padded by 20 px ("BrainProtonDensitySliceBorder20"),
# turned 10 deg clockwise about (row, col) = (128.5, 110.5) and moved by (16, 13) px: fitting that
# model to the file leaves grey-level residuals at the 8-bit noise floor, and it equals ITK's own
# published result (ImageRegistration5: 10.0 deg about (x, y) = (110, 128), translation
# (13.0958, 15.9156)) to 0.01 px. In raw-PD pixels the map is preceded by the +20 px padding.
_PAD = np.eye(3)
_PAD[:2, 2] = 20.0
ROTATED_TRUTH_B20 = transform_matrix(10.0, (16.0, 13.0), (128.5, 110.5))
ROTATED_TRUTH = ROTATED_TRUTH_B20 @ _PAD


@pytest.fixture(scope="module")
def model():
    if packaged_weights_path("medical").is_file():
        return load_model("medical")
    if CKPT.is_dir():
        return load_model("ivf", CKPT)
    pytest.skip("no packaged IVFN weights and no reference checkpoints")


@pytest.fixture(scope="module")
def brain():
    return BrainWeb()


def _brain_mask(pd: np.ndarray) -> np.ndarray:
    return ndi.binary_fill_holes(pd > 25)


CROP = (slice(30, 150), slice(25, 135))  # the brain's middle, to keep CPU runs short


def _pseudo_colour(grey: np.ndarray) -> np.ndarray:
    """A PET-like pseudo-coloured copy (napari's 'hot' colormap), float32 RGB in [0, 1]."""
    from napari.utils.colormaps import ensure_colormap

    cmap = ensure_colormap("hot")
    return cmap.map((grey.astype(np.float32) / 255.0).ravel())[:, :3].reshape(
        grey.shape + (3,)).astype(np.float32)


# --- fusion ---------------------------------------------------------------------------------

def test_three_sources(model, brain):
    t1, pd = brain["t1"][CROP], brain["pd"][CROP]
    t2_like = (255 - t1).astype(np.uint8)  # a third, differently contrasted source
    srcs = {"T1": t1, "PD": pd, "T2like": t2_like}
    before = {k: v.copy() for k, v in srcs.items()}
    res = fuse_multimodal(srcs, model=model, device="cpu")
    for k in srcs:
        np.testing.assert_array_equal(srcs[k], before[k])  # inputs unchanged
    assert res.image.shape == t1.shape and res.image.dtype == np.float32
    assert 0.0 <= res.image.min() and res.image.max() <= 1.0
    assert res.metadata["sources"] == ["T1", "PD", "T2like"]
    assert res.weights["base"].shape == res.weights["detail"].shape == (3,) + t1.shape
    np.testing.assert_allclose(res.weights["detail"].sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.weights["base"].sum(0), 1.0, atol=1e-5)
    # every source is preferred (weight above the equal share 1/3) somewhere
    assert (res.weights["detail"].max(axis=(1, 2)) > 0.4).all()
    # identical to the engine's N-source fusion called directly
    direct, _, _ = fuse_grey_sources(
        {k: (v / np.float64(255)).astype(np.float32) for k, v in srcs.items()}, model,
        MEDICAL_BASE_RULE, MEDICAL_DETAIL_RULE, torch.device("cpu"), False, code_gain=1.0)
    np.testing.assert_allclose(res.image, direct, atol=1e-6)
    two = fuse_multimodal([t1, pd], model=model, device="cpu")
    assert np.abs(two.image - res.image).mean() > 1e-3  # the third source changed the result


def _psnr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - ref) ** 2)))


def test_code_gain_one_returns_a_source_fused_with_itself(model, brain):
    """The medical default (code_gain 1) keeps the sources' intensity scale: a slice fused with
    itself comes back (>= 30 dB on the whole BrainWeb T1 slice; 33 dB with the packaged
    weights). The authors' x2 for infrared/visible changes its contrast (about 21 dB)."""
    t1 = brain["t1"]
    ref = t1 / np.float64(255)
    same = fuse_multimodal([t1, t1], model=model, device="cpu", base_rule="l1")
    assert same.metadata["code_gain"] == 1.0
    assert _psnr(same.image, ref) >= 30.0
    authors = fuse_multimodal([t1, t1], model=model, device="cpu", base_rule="l1",
                              code_gain=2.0)
    assert authors.metadata["code_gain"] == 2.0
    assert _psnr(authors.image, ref) < 25.0


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "1", None, True])
def test_bad_code_gain_names_it(bad):
    # checked before the model is loaded, so no weights are needed here
    with pytest.raises(ValueError, match=r"^code_gain"):
        fuse_multimodal([np.zeros((16, 16)), np.zeros((16, 16))], code_gain=bad)


def test_names_and_codes(model, brain):
    crop = (slice(40, 120), slice(40, 120))
    res = fuse_multimodal([brain["t1"][crop], brain["pd"][crop]], names=["T1", "PD"],
                          model=model, device="cpu", codes=True, base_rule="average",
                          detail_rule="average")
    assert res.metadata["sources"] == ["T1", "PD"]
    assert {"T1_base", "T1_detail", "PD_base", "PD_detail", "fused_base",
            "fused_detail"} <= set(res.codes)
    np.testing.assert_allclose(res.codes["fused_detail"],
                               (res.codes["T1_detail"] + res.codes["PD_detail"]) / 2, atol=1e-6)


def test_colour_functional_keeps_chroma(model, brain):
    crop = CROP
    pet = _pseudo_colour(brain["pd"][crop])
    mri = brain["t1"][crop]
    pet_before = pet.copy()
    res = fuse_multimodal({"MRI": mri, "PET": pet}, model=model, device="cpu")
    np.testing.assert_array_equal(pet, pet_before)
    assert res.image.shape == pet.shape and res.image.dtype == np.float32
    assert res.image.min() >= 0.0 and res.image.max() <= 1.0
    assert res.metadata["colour_source"] == "PET"
    ycc_in = rgb_to_ycbcr(torch.from_numpy(pet), dim=-1).numpy()
    ycc_out = rgb_to_ycbcr(torch.from_numpy(res.image), dim=-1).numpy()
    # the output's luminance is the grey fusion of the MRI with the PET's luminance, everywhere
    y_f = fuse_multimodal({"MRI": mri, "PET": ycc_in[..., 0]}, model=model, device="cpu").image
    np.testing.assert_allclose(ycc_out[..., 0], y_f, atol=1e-5)
    # the anatomy went in: the luminance now follows the MRI (correlation 0.10 here, the
    # PET's own -0.001); a mean difference from the PET would also count a tone shift
    t1 = mri.astype(np.float64).ravel()
    assert np.corrcoef(ycc_out[..., 0].ravel(), t1)[0, 1] \
        > np.corrcoef(ycc_in[..., 0].ravel(), t1)[0, 1] + 0.05
    # where the PET's chroma fits the RGB cube at the new luminance, Cb/Cr survive exactly
    raw = ycbcr_to_rgb(torch.from_numpy(np.stack([y_f, ycc_in[..., 1], ycc_in[..., 2]], -1)),
                       dim=-1).numpy()
    # (pixels within 1e-3 of the cube's faces are ambiguous under float rounding: left out)
    in_gamut = ((raw >= 1e-3) & (raw <= 1 - 1e-3)).all(-1)
    assert in_gamut.mean() > 0.05
    np.testing.assert_allclose(ycc_out[..., 1:][in_gamut], ycc_in[..., 1:][in_gamut], atol=1e-4)
    # elsewhere it is only scaled towards grey: same hue (direction in the CbCr plane)
    c_in, c_out = ycc_in[..., 1:] - 0.5, ycc_out[..., 1:] - 0.5
    strong = np.linalg.norm(c_in, axis=-1) > 0.05
    cos = (c_in * c_out).sum(-1)[strong] / (
        np.linalg.norm(c_in, axis=-1) * np.linalg.norm(c_out, axis=-1) + 1e-12)[strong]
    assert np.percentile(cos, 1) > 0.999
    assert (np.linalg.norm(c_out, axis=-1) <= np.linalg.norm(c_in, axis=-1) + 1e-4).all()
    assert abs(res.metadata["desaturated_fraction"] - (1 - in_gamut.mean())) < 0.05
    # an RGBA functional image (alpha ignored) gives the same result
    rgba = np.concatenate([pet, np.full(pet.shape[:2] + (1,), 0.3, np.float32)], -1)
    res4 = fuse_multimodal({"MRI": mri, "PET": rgba}, model=model, device="cpu")
    np.testing.assert_array_equal(res4.image, res.image)


def _small_volumes(brain, n=3, size=48):
    """Two registered uint8 volumes (n, size, size) cut from the T1 and PD slices."""
    t1, pd = brain["t1"], brain["pd"]
    starts = [(60 + 13 * i, 50 + 11 * i) for i in range(n)]
    v1 = np.stack([t1[r:r + size, c:c + size] for r, c in starts])
    v2 = np.stack([pd[r:r + size, c:c + size] for r, c in starts])
    return v1, v2


def test_volume_plane_by_plane_equals_loop(model, brain):
    v1, v2 = _small_volumes(brain)
    res = fuse_multimodal([v1, v2], model=model, device="cpu")
    assert res.image.shape == v1.shape
    assert res.weights["detail"].shape == (2,) + v1.shape
    assert res.metadata["planes"] == 3 and res.metadata["plane_axes"] == (1, 2)
    for z in range(v1.shape[0]):
        one = fuse_multimodal([v1[z], v2[z]], model=model, device="cpu")
        np.testing.assert_array_equal(res.image[z], one.image)
        np.testing.assert_array_equal(res.weights["detail"][:, z], one.weights["detail"])
    # another slice axis: planes (Z, X) for axis=1
    w1, w2 = (v[:, :8] for v in _small_volumes(brain, n=6, size=24))
    r1 = fuse_multimodal([w1, w2], model=model, device="cpu", axis=1, base_rule="l1")
    assert r1.metadata["plane_axes"] == (0, 2) and r1.image.shape == w1.shape
    for y in range(8):
        one = fuse_multimodal([w1[:, y], w2[:, y]], model=model, device="cpu", base_rule="l1")
        np.testing.assert_array_equal(r1.image[:, y], one.image)


def test_volume_3d_plus_t_and_dask(model, brain):
    import dask.array as da

    v1, v2 = _small_volumes(brain, n=4, size=24)
    t1 = v1.reshape(2, 2, 24, 24)  # (T, Z, Y, X)
    t2 = v2.reshape(2, 2, 24, 24)
    res = fuse_multimodal([t1, t2], model=model, device="cpu", base_rule="l1")
    assert res.image.shape == t1.shape and res.metadata["planes"] == 4
    for t in range(2):
        for z in range(2):
            one = fuse_multimodal([t1[t, z], t2[t, z]], model=model, device="cpu",
                                  base_rule="l1")
            np.testing.assert_array_equal(res.image[t, z], one.image)
    lazy = fuse_multimodal([da.from_array(t1, chunks=(1, 1, 24, 24)),
                            da.from_array(t2, chunks=(1, 1, 24, 24))], model=model,
                           device="cpu", base_rule="l1")
    np.testing.assert_array_equal(lazy.image, res.image)


def test_volume_float_normalised_over_the_whole_volume(model, brain):
    v1, v2 = _small_volumes(brain)
    f1 = v1.astype(np.float64) * 7.5 - 100.0  # e.g. CT-like values, far outside [0, 1]
    res = fuse_multimodal([f1, v2], model=model, device="cpu", base_rule="l1")
    expected = fuse_multimodal([(f1 - f1.min()) / (f1.max() - f1.min()), v2], model=model,
                               device="cpu", base_rule="l1")
    np.testing.assert_array_equal(res.image, expected.image)
    assert "whole array" in res.metadata["normalisation"]["source_0"]


def test_progress_counts_planes(model, brain):
    v1, v2 = _small_volumes(brain, n=2, size=16)
    calls = []
    fuse_multimodal([v1, v2], model=model, device="cpu", base_rule="l1",
                    progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (6, 6) and all(t == 6 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"images": [np.zeros((16, 16))]}, "images"),
        ({"images": np.zeros((2, 16, 16))}, "images"),
        ({"images": [np.zeros((16, 16)), np.zeros((16, 17))]}, "images"),
        ({"images": [np.zeros((16, 16, 3)), np.zeros((16, 16, 3)), np.zeros((16, 16))]},
         "images"),
        ({"images": [np.zeros((16, 16, 3)), np.zeros((16, 16, 3))]}, "images"),
        ({"images": [np.zeros((4, 4)), np.zeros((4, 4))]}, "images"),
        ({"images": [np.zeros((16, 16)), np.full((16, 16), np.nan)]}, "images['source_1']"),
        ({"images": [np.zeros((16,)), np.zeros((16,))]}, "images['source_0']"),
        ({"images": [np.zeros((16, 16)), np.zeros((16, 16))], "names": ["a"]}, "names"),
        ({"images": [np.zeros((16, 16)), np.zeros((16, 16))], "names": ["a", "a"]}, "names"),
        ({"images": {"a": np.zeros((16, 16)), "b": np.zeros((16, 16))}, "names": ["x", "y"]},
         "names"),
        ({"images": [np.zeros((3, 16, 16)), np.zeros((3, 16, 16))], "axis": 3}, "axis"),
        ({"images": [np.zeros((3, 16, 16)), np.zeros((3, 16, 16))], "codes": True}, "codes"),
        ({"images": [np.zeros((16, 16)), np.zeros((16, 16))], "rgb": [False]}, "rgb"),
        ({"images": [np.zeros((16, 16)), np.zeros((16, 16))], "rgb": [True, False]},
         "images['source_0']"),
        ({"images": [np.zeros((16, 16)), np.zeros((16, 16))], "base_rule": "max"},
         "base_rule"),
        ({"images": [np.zeros((16, 16)), np.zeros((16, 16))], "detail_rule": "max"},
         "detail_rule"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, argument):
    # every check runs before the model is loaded, so no weights are needed here
    with pytest.raises(ValueError, match=r"^" + __import__("re").escape(argument)):
        fuse_multimodal(**kwargs)


def test_rgb_flags_override_the_guess(model, brain):
    # a (Z, Y, 3) grey volume is not colour when the caller says so
    v1, v2 = _small_volumes(brain, n=2, size=24)
    a, b = np.moveaxis(v1, 0, -1)[..., :2], np.moveaxis(v2, 0, -1)[..., :2]
    a3 = np.concatenate([a, a[..., :1]], -1)  # (24, 24, 3)
    b3 = np.concatenate([b, b[..., :1]], -1)
    res = fuse_multimodal([a3, b3], model=model, device="cpu", rgb=[False, False],
                          base_rule="l1", axis=2)
    assert res.image.shape == a3.shape and res.metadata["colour_source"] is None



def test_medical_volume_colour_along_another_axis_matches_fuse_multimodal(model, brain):
    # the widget's path (MedicalVolume plane by plane, then source_order) on a colour volume
    # whose planes are not its last axes gives fuse_multimodal's result in the sources' order
    v1, v2 = _small_volumes(brain, n=6, size=24)
    pet = np.stack([v2, v2 // 2, 255 - v2], -1)  # (Z, Y, X, 3)
    volume = MedicalVolume([v1, pet], rgb=[False, True], axis=2)
    assembler = PlaneAssembler(volume.loop_shape)
    for index in plane_indices(volume.loop_shape):
        assembler.add(index, volume.fuse_plane(index, model, device="cpu", base_rule="l1"))
    res = volume.source_order(assembler.result())
    direct = fuse_multimodal([v1, pet], model=model, device="cpu", rgb=[False, True], axis=2,
                             base_rule="l1")
    assert res.image.shape == direct.image.shape == pet.shape
    np.testing.assert_allclose(res.image, direct.image, atol=1e-6)
    np.testing.assert_allclose(res.weights["detail"], np.moveaxis(direct.weights["detail"], 0, 1),
                               atol=1e-6)

# --- alignment ------------------------------------------------------------------------------

def test_shifted_slice_detected_same_and_cross_modality(brain):
    # ITK's translation example registers the shifted slice onto the PD slice with a 20 px
    # border (BrainProtonDensitySliceBorder20.png): the content moved 13 px right, 17 px down
    for fixed in (np.pad(brain["pd"], 20), np.pad(brain["t1"], 20)):
        before = fixed.copy()
        est = estimate_misalignment(fixed, brain["shifted"])
        np.testing.assert_array_equal(fixed, before)
        dy, dx = est["shift"]
        assert abs(dy - 17.0) < 1.0 and abs(dx - 13.0) < 1.0, est["shift"]
        assert abs(est["rotation_deg"]) < 0.5
        assert not est["aligned"] and est["error_px"] > 2.0
    # without the border, the images share their first pixel (napari's layout): 20 px more
    est = estimate_misalignment(brain["pd"], brain["shifted"])
    np.testing.assert_allclose(est["shift"], (37.0, 33.0), atol=1.0)


def test_registration_makes_the_check_pass(brain):
    fixed = np.pad(brain["pd"], 20)
    registered, tf = register_rigid(fixed, brain["shifted"])
    assert registered.shape == fixed.shape and registered.dtype == np.float32
    assert tf["residual"]["aligned"] and tf["residual"]["error_px"] < 1.0
    assert estimate_misalignment(fixed, registered)["aligned"]
    mask = np.pad(_brain_mask(brain["pd"]), 20)
    assert np.abs(registered - fixed)[mask].mean() < 5.0  # grey levels (8-bit)
    assert np.abs(brain["shifted"][:fixed.shape[0], :fixed.shape[1]] - fixed.astype(float))[
        mask].mean() > 30.0


@pytest.mark.parametrize("fixed_name", ["pd", "t1"])
def test_rotated_case_under_one_pixel(brain, fixed_name):
    moving = brain["rotated"]
    moving_before = moving.copy()
    registered, tf = register_rigid(brain[fixed_name], moving)
    np.testing.assert_array_equal(moving, moving_before)
    mask = _brain_mask(brain["pd"])
    rms = displacement_rms(tf["matrix"], mask, ROTATED_TRUTH)
    assert rms < 1.0, rms
    assert abs(tf["rotation_deg"] - 10.0) < 0.5
    assert tf["residual"]["aligned"]
    if fixed_name == "pd":  # same contrast: the registered slice matches the aligned one
        assert np.abs(registered - brain["pd"])[mask].mean() < 8.0


def test_offset_measures_the_misalignment_as_displayed(brain):
    # napari draws the shifted slice 17, 13 px up-left (translate): aligned as displayed, while
    # shift/matrix stay in array indices for resampling
    est = estimate_misalignment(np.pad(brain["pd"], 20), brain["shifted"],
                                moving_offset=(-17.0, -13.0))
    assert est["aligned"] and est["error_px"] < 1.0
    np.testing.assert_allclose(est["shift"], (17.0, 13.0), atol=1.0)
    with pytest.raises(ValueError, match="^moving_offset"):
        estimate_misalignment(brain["pd"], brain["pd"], moving_offset=(1.0,))


def test_transform_applied_to_every_plane(brain):
    fixed = np.pad(brain["pd"], 20)
    est = estimate_misalignment(fixed, brain["shifted"])
    vol = np.stack([brain["shifted"], brain["shifted"] // 2, 255 - brain["shifted"]])
    out = apply_rigid_planes(vol, est, preserve_dtype=True)
    assert out.shape == (3,) + fixed.shape and out.dtype == np.uint8
    for z in range(3):
        np.testing.assert_array_equal(out[z], apply_rigid(vol[z], est, fixed.shape,
                                                          preserve_dtype=True))
    # planes on other axes: (y, z, x) layout, planes along (0, 2)
    out_t = apply_rigid_planes(np.moveaxis(vol, 0, 1), est, plane_axes=(0, 2))
    np.testing.assert_allclose(np.moveaxis(out_t, 1, 0), out.astype(np.float32), atol=0.5)
    # colour planes keep their channels
    rgb = np.repeat(brain["shifted"][..., None], 3, -1)
    reg = apply_rigid(rgb, est, fixed.shape)
    assert reg.shape == fixed.shape + (3,) and reg.dtype == np.float32
    mask = np.pad(_brain_mask(brain["pd"]), 20)
    assert np.abs(reg[..., 1] - fixed)[mask].mean() < 5.0


def test_multimodal_sources_layout(brain):
    vol = np.zeros((4, 8, 30, 40), np.uint8)
    src = MultimodalSources({"a": vol, "b": vol}, rgb=[False, False])
    lay = src.layout()
    assert lay["plane_axes"] == (2, 3) and lay["loop_axes"] == (0, 1) and lay["planes"] == 32
    lay = src.layout(axis=2)
    assert lay["plane_axes"] == (1, 3) and lay["loop_shape"] == (4, 30)
    assert src.names == ["a", "b"] and src.rgb == [False, False]
    small = MultimodalSources([vol[:, :5], vol[:, :5]])
    with pytest.raises(ValueError, match="^images"):
        small.layout(axis=2)  # planes (5, 40): too small for the 11x11 blur


def test_synthetic_large_rotation_cross_modality(brain):
    f = np.pad(brain["pd"], 30).astype(np.float64)
    m_src = np.pad(brain["t1"], 30).astype(np.float64)
    center = (np.asarray(f.shape) - 1) / 2
    truth = transform_matrix(-60.0, (-12.0, 20.0), center)
    moving = ndi.affine_transform(m_src, np.linalg.inv(truth), order=1)
    est = estimate_misalignment(f, moving)
    assert displacement_rms(est["matrix"], f > 30, truth) < 1.0


def test_identical_images_are_aligned(brain):
    est = estimate_misalignment(brain["t1"], brain["t1"])
    assert est["aligned"] and est["error_px"] < 0.1
    rgb = np.repeat(brain["pd"][..., None], 3, -1)
    assert estimate_misalignment(brain["t1"], rgb)["aligned"]


@pytest.mark.parametrize(
    ("fixed", "moving", "kwargs", "argument"),
    [
        (np.zeros((3, 32, 32)), np.zeros((32, 32)), {}, "fixed"),
        (np.zeros((32, 32)), np.zeros((8, 8)), {}, "moving"),
        (np.zeros((32, 32)), np.zeros((32, 32)), {"tolerance_px": -1}, "tolerance_px"),
    ],
)
def test_alignment_bad_inputs(fixed, moving, kwargs, argument):
    with pytest.raises(ValueError, match=r"^" + argument):
        estimate_misalignment(fixed, moving, **kwargs)
