"""The fast path (issue 18): which runs take it, and that it stays within 1e-3 (max) and 1e-5
(mean) of the exact path on real images, compiled as users run it.

Until weights trained with nonnegative thresholds are packaged, the packaged weights with
every threshold clamped at 0 stand in for them (``fastpath.with_clamped_thresholds``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_cscfusion.engine import FusionModel, load_model, mmf_cpu
from napari_cscfusion.models import fastpath

from ._shared import (
    DATA,
    MMF_AUTHORS_GEOMETRY,
    authors_model,
    grey,
    harvard_mri_pet,
    needs_shared,
    read,
)

MAX_DIFF, MEAN_DIFF = 1e-3, 1e-5


def clamped(task: str) -> FusionModel:
    m = load_model(task)
    return FusionModel(task, fastpath.with_clamped_thresholds(m.network),
                       dict(m.info, label=f"packaged {task}.pt, thresholds clamped"))


def weights_for(task: str, which: str) -> FusionModel:
    """The clamped stand-in, or the packaged weights themselves once they qualify (issue 17:
    retrained with nonnegative thresholds); skips while they do not."""
    if which == "clamped":
        return clamped(task)
    model = load_model(task)
    if not fastpath.fast_path_applies(model.network):
        pytest.skip(f"packaged {task}.pt has negative soft thresholds (exact path only)")
    return model


def assert_close(fast: np.ndarray, exact: np.ndarray) -> None:
    d = np.abs(np.asarray(fast, np.float64) - np.asarray(exact, np.float64))
    assert d.max() <= MAX_DIFF and d.mean() <= MEAN_DIFF, (d.max(), d.mean())


# --- the gate ---------------------------------------------------------------------------------

@needs_shared
def test_gate_authors_weights_with_negative_thresholds_take_the_exact_path():
    for task in ("ivf", "mef"):
        net = authors_model(task).network
        assert any(bool((t < 0).any()) for t in fastpath.soft_thresholds(net))
        assert not fastpath.fast_path_applies(net)
        assert fastpath.fast_path_applies(fastpath.with_clamped_thresholds(net))
        assert not fastpath.fast_path_applies(fastpath.with_clamped_thresholds(net),
                                              exact=True)


@needs_shared
def test_gate_mmfn_clamps_its_thresholds_so_the_fast_path_applies():
    # CSC-MMFN's layers clamp theta at 0 themselves (even where the stored value is < 0)
    net = authors_model("mmf").network
    assert fastpath.fast_path_applies(net)
    assert not fastpath.fast_path_applies(net, exact=True)


def test_clamped_copy_leaves_the_network_alone():
    net = load_model("mef").network
    before = [t.clone() for t in fastpath.soft_thresholds(net)]
    copy = fastpath.with_clamped_thresholds(net)
    assert all(bool((t >= 0).all()) for t in fastpath.soft_thresholds(copy))
    assert all(torch.equal(a, b) for a, b in zip(before, fastpath.soft_thresholds(net),
                                                  strict=True))


# --- fast vs exact on real images -----------------------------------------------------------------

def kernel_ran(model: FusionModel) -> bool:
    """Whether the IVF fast path's encoders are the numba DCU kernel (engine/dcu_kernel.py)."""
    from napari_cscfusion.engine.fast import fast_network

    return fast_network("ivf", model.network, None, compile=False).form == "kernel"


# real pairs: (file under ivf/ with {} for IR/VIS, crop, rules checked besides the defaults,
# tile side for tiled = untiled)
IVF_PAIRS = {
    "tno": ("tno/{}1.png", np.s_[200:330, 300:460], [("l1", "l1")], 48),
    # the other rules through the kernel; saliency as the detail rule fuses with whole-image
    # statistics of the detail codes, as of the base codes, so it tiles too
    "flir": ("flir_test/{}3.jpg", np.s_[40:250, 60:330],
             [("l1", "average"), ("average", "saliency")], 96),
}


@needs_shared
@pytest.mark.parametrize("which", ["clamped", "packaged"])
@pytest.mark.parametrize("pair", list(IVF_PAIRS))
def test_ivf_fast_path_matches_exact_and_tiles_agree(pair, which):
    """Default rules: the fast path's image and weights within the tolerance of the exact
    path (through the numba kernel where it is available); other rules: the image within it
    too, and tiles (with their halo) equal to the whole image on the fast path."""
    from napari_cscfusion import fuse_infrared_visible
    from napari_cscfusion.engine import dcu_kernel

    pattern, crop, rules, tile = IVF_PAIRS[pair]
    model = weights_for("ivf", which)
    ir, vis = (grey(read(DATA / "ivf" / pattern.format(n)))[crop] for n in ("IR", "VIS"))
    exact = fuse_infrared_visible(ir, vis, model, device="cpu", exact=True)
    fast = fuse_infrared_visible(ir, vis, model, device="cpu")
    assert exact.metadata["path"] == "exact" and fast.metadata["path"] == "fast"
    assert_close(fast.image, exact.image)
    for key in ("base", "detail"):
        assert_close(fast.weights[key], exact.weights[key])
    assert kernel_ran(model) == dcu_kernel.available()
    for base_rule, detail_rule in rules:
        kw = dict(base_rule=base_rule, detail_rule=detail_rule, device="cpu")
        exact = fuse_infrared_visible(ir, vis, model, exact=True, **kw)
        whole = fuse_infrared_visible(ir, vis, model, tile=0, **kw)
        assert_close(whole.image, exact.image)
        tiled = fuse_infrared_visible(ir, vis, model, tile=tile, **kw)
        np.testing.assert_allclose(tiled.image, whole.image, atol=1e-5)


@needs_shared
def test_medical_fast_path_matches_exact_with_the_packaged_medical_weights():
    """medical.pt (nonnegative thresholds) runs fuse_multimodal's defaults on the fast path,
    within the tolerance of the exact path on a real clinical pair (Harvard MRI/PET 11, the PET
    in colour): the image and the weight maps, also where both sources are black (56 % of this
    pair: there the rules' activities are rounding residues, read as silent, so the weights are
    an even split for l1-black and the first source for choose-max on both paths)."""
    from napari_cscfusion.engine.medical import fuse_multimodal

    mri, pet = harvard_mri_pet(11)
    model = load_model("medical")
    exact = fuse_multimodal({"MRI": mri, "PET": pet}, model, device="cpu", exact=True)
    fast = fuse_multimodal({"MRI": mri, "PET": pet}, model, device="cpu")
    assert exact.metadata["path"] == "exact" and fast.metadata["path"] == "fast"
    assert_close(fast.image, exact.image)
    for key in ("base", "detail"):
        assert_close(fast.weights[key], exact.weights[key])
    black = (mri == 0) & (pet.max(-1) == 0)
    black = ~ndi.binary_dilation(~black, iterations=25)  # beyond the codes' reach of content
    assert black.mean() > 0.2
    np.testing.assert_array_equal(fast.weights["detail"][:, black], 0.5)
    base = fast.weights["base"]
    assert (base[0][black] == 1.0).all() and (base[1][black] == 0.0).all()


@needs_shared
def test_ivf_without_the_kernel_runs_the_torch_fast_form_with_a_notice(monkeypatch):
    from napari_cscfusion import fuse_infrared_visible
    from napari_cscfusion.engine import numba_jit
    from napari_cscfusion.engine.notices import FastPathFallback

    monkeypatch.setattr(numba_jit, "numba", None)  # as if numba were missing
    model = clamped("ivf")  # a network of its own: no cached fast form
    ir, vis = (grey(read(DATA / "ivf" / "tno" / f"{n}1.png"))[200:280, 300:400]
               for n in ("IR", "VIS"))
    with pytest.warns(FastPathFallback, match="numba is not installed"):
        fast = fuse_infrared_visible(ir, vis, model, device="cpu")
    assert fast.metadata["path"] == "fast" and not kernel_ran(model)
    assert any("numba is not installed" in n for n in fast.metadata["notices"])
    exact = fuse_infrared_visible(ir, vis, model, device="cpu", exact=True)
    assert_close(fast.image, exact.image)
    assert not exact.metadata["notices"]  # the exact path needs no kernel


@needs_shared
def test_no_numba_switch_turns_both_kernels_off_with_a_notice(monkeypatch):
    # CSCFUSION_NO_NUMBA: one switch (engine/numba_jit.py) for the DCU kernel (IVF), the
    # fused MEF kernel and the MMF kernels, read at each run, not remembered once unset
    from napari_cscfusion import fuse_exposures, fuse_infrared_visible
    from napari_cscfusion.engine import dcu_kernel, mef_cpu
    from napari_cscfusion.engine.notices import FastPathFallback

    ir, vis = (grey(read(DATA / "ivf" / "tno" / f"{n}1.png"))[200:264, 300:380]
               for n in ("IR", "VIS"))
    stack = memorial(3, 8, 13)[:, :48, :64]
    monkeypatch.setenv("CSCFUSION_NO_NUMBA", "1")
    assert not dcu_kernel.available() and not mef_cpu.available(stack.dtype)
    assert not mmf_cpu.available()  # (MMF's kernels: their own tests below)
    for reason in (dcu_kernel.unavailable_reason(), mef_cpu.unavailable_reason(),
                   mmf_cpu.unavailable_reason()):
        assert reason == "CSCFUSION_NO_NUMBA is set"
    with pytest.warns(FastPathFallback, match="CSCFUSION_NO_NUMBA is set"):
        ivf = fuse_infrared_visible(ir, vis, clamped("ivf"), device="cpu")
    with pytest.warns(FastPathFallback, match="CSCFUSION_NO_NUMBA is set"):
        mef = fuse_exposures(stack, clamped("mef"), device="cpu")
    assert mef.metadata["fast_kernel"] == "pytorch"
    for res in (ivf, mef):
        assert res.metadata["path"] == "fast"
        assert any("CSCFUSION_NO_NUMBA is set" in n for n in res.metadata["notices"])
    monkeypatch.delenv("CSCFUSION_NO_NUMBA")
    if numba_installed():
        assert dcu_kernel.available() and mef_cpu.available(stack.dtype)
        assert mmf_cpu.available()
        again = fuse_exposures(stack, clamped("mef"), device="cpu")
        assert again.metadata["fast_kernel"] == "numba" and not again.metadata["notices"]
        assert_close(again.image, mef.image)


def numba_installed() -> bool:
    from napari_cscfusion.engine import numba_jit

    return numba_jit.numba is not None


@needs_shared
def test_ivf_authors_weights_stay_on_the_exact_path():
    from napari_cscfusion import fuse_infrared_visible

    ir, vis = (grey(read(DATA / "ivf" / "tno" / f"{n}1.png"))[:40, :48] for n in ("IR", "VIS"))
    res = fuse_infrared_visible(ir, vis, authors_model("ivf"), device="cpu")
    assert res.metadata["path"] == "exact"


def memorial(*indices: int) -> np.ndarray:
    """Memorial exposures as uint8 RGB (K, H, W, 3), as a camera gives them."""
    return np.stack([read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[..., :3]
                     for i in indices])


@needs_shared
@pytest.mark.parametrize("which", ["clamped", "packaged"])
def test_mef_fast_path_matches_exact_on_the_memorial_bracket(which):
    from napari_cscfusion import fuse_exposures

    model = weights_for("mef", which)
    stack = memorial(2, 5, 8, 11, 14)
    exact = fuse_exposures(stack, model, device="cpu", exact=True)
    fast = fuse_exposures(stack, model, device="cpu", tile=64)  # several tiles
    assert exact.metadata["path"] == "exact" and fast.metadata["path"] == "fast"
    # on the CPU the fused numba kernel (engine/mef_cpu.py) runs it, reading the uint8 frames
    assert fast.metadata["fast_kernel"] == "numba" and exact.metadata["fast_kernel"] is None
    assert_close(fast.image, exact.image)
    assert_close(fast.weights["exposures"], exact.weights["exposures"])
    # float input in [0, 1] and uint16: the same values
    as_float = fuse_exposures(stack.astype(np.float32) / 255, model, device="cpu", tile=64)
    assert_close(as_float.image, exact.image)
    as_uint16 = fuse_exposures(stack.astype(np.uint16) * 257, model, device="cpu")
    assert_close(as_uint16.image, exact.image)


@needs_shared
def test_mef_numba_kernel_grey_tiles_threads_and_no_weights():
    import torch

    from napari_cscfusion import fuse_exposures

    model = weights_for("mef", "clamped")
    grey_stack = memorial(3, 8, 13)[..., 1]  # (K, H, W) uint8
    exact = fuse_exposures(grey_stack, model, device="cpu", exact=True)
    whole = fuse_exposures(grey_stack, model, device="cpu", tile=0)
    assert whole.metadata["fast_kernel"] == "numba" and whole.image.ndim == 2
    assert_close(whole.image, exact.image)
    assert_close(whole.weights["exposures"], exact.weights["exposures"])
    # tiled = untiled (odd tiles: partial vectors, crops at and away from the edges)
    tiled = fuse_exposures(grey_stack, model, device="cpu", tile=37)
    np.testing.assert_allclose(tiled.image, whole.image, atol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fuse_exposures(grey_stack, model, device="cpu", tile=37, weights=False)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one.image, tiled.image)
    assert one.weights == {}


def test_mef_numba_kernel_is_generic_over_code_channels_and_dcus():
    # an odd number of code channels (the kernel runs them in pairs) and three DCUs, random
    # weights with nonnegative thresholds and batch-norm statistics, a prior sigma
    from napari_cscfusion import fuse_exposures
    from napari_cscfusion.models.mefn import CSCMEFN

    torch.manual_seed(3)
    net = CSCMEFN(code_channels=5, num_dcus=3, prior_sigma=0.3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    net = fastpath.with_clamped_thresholds(net).eval()
    for m in net.modules():
        if hasattr(m, "theta"):
            m.theta.data.uniform_(0.0, 0.05)
    model = FusionModel("mef", net, {"label": "random q=5, 3 DCUs"})
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (4, 45, 70, 3), dtype=np.uint8)
    exact = fuse_exposures(stack, model, device="cpu", exact=True)
    fast = fuse_exposures(stack, model, device="cpu", tile=16)
    assert fast.metadata["fast_kernel"] == "numba"
    assert_close(fast.image, exact.image)
    assert_close(fast.weights["exposures"], exact.weights["exposures"])


@needs_shared
def test_mef_without_numba_falls_back_to_pytorch_with_a_notice(monkeypatch):
    from napari_cscfusion import fuse_exposures
    from napari_cscfusion.engine import numba_jit

    monkeypatch.setattr(numba_jit, "numba", None)  # as if numba were missing
    model = weights_for("mef", "clamped")
    stack = memorial(3, 8, 13)
    exact = fuse_exposures(stack, model, device="cpu", exact=True)
    with pytest.warns(RuntimeWarning, match="numba is not installed"):
        fast = fuse_exposures(stack, model, device="cpu")
    assert fast.metadata["path"] == "fast" and fast.metadata["fast_kernel"] == "pytorch"
    assert any("numba is not installed" in n for n in fast.metadata["notices"])
    assert_close(fast.image, exact.image)


@needs_shared
@pytest.mark.parametrize("precision, bound", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_mef_half_precision_runs_the_pytorch_fast_form(precision, bound):
    # the numba kernel is float32 only; half precision runs the network of the PyTorch form
    # in that dtype, its colour in float32 (bf16 crashed there before: a float32 input met
    # bf16 weights)
    from napari_cscfusion import fuse_exposures

    model = weights_for("mef", "clamped")
    stack = memorial(3, 8, 13)[:, :64, :80]
    exact = fuse_exposures(stack, model, device="cpu", exact=True)
    half = fuse_exposures(stack, model, device="cpu", precision=precision)
    assert half.metadata["fast_kernel"] == "pytorch"
    assert np.abs(half.image - exact.image).max() <= bound


@needs_shared
def test_mef_numba_kernel_can_be_cancelled_between_tiles():
    from napari_cscfusion import fuse_exposures
    from napari_cscfusion.engine import Cancelled

    model = weights_for("mef", "clamped")
    stack = memorial(3, 8, 13)
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        fuse_exposures(stack, model, device="cpu", tile=32, progress=progress)
    assert seen[0][0] == 0 and seen[-1][0] == 2 and seen[-1][1] > 2


@needs_shared
def test_mmf_fast_path_matches_exact_on_a_flir_pair():
    import cv2

    from napari_cscfusion import fuse_guided

    # the authors' geometry (the fast form is written for it); CSC-MMFN clamps its
    # thresholds: the fast path applies
    model = load_model("mmf", MMF_AUTHORS_GEOMETRY)
    ir = grey(read(DATA / "ivf" / "flir_test" / "IR1.jpg"))[:96, :128]
    vis = grey(read(DATA / "ivf" / "flir_test" / "VIS1.jpg"))[:96, :128]
    low = cv2.resize(ir, (64, 48), interpolation=cv2.INTER_AREA)
    exact = fuse_guided(low, vis, model, device="cpu", exact=True)
    # the default: the numba kernels where numba is at hand (mmf_cpu), else the exact path
    default = fuse_guided(low, vis, model, device="cpu")
    with pytest.MonkeyPatch.context() as mp:  # the PyTorch fast form (no numba kernels)
        mp.setattr(mmf_cpu, "applies", lambda *a: False)
        fast = fuse_guided(low, vis, model, device="cpu", exact=False)
    assert exact.metadata["path"] == "exact" and fast.metadata["path"] == "fast"
    assert default.metadata["path"] == ("fast" if mmf_cpu.available() else "exact")
    assert_close(fast.image, exact.image)
    assert_close(default.image, exact.image)


@needs_shared
def test_mmf_numba_kernels_match_float64_on_a_flir_pair_tiled_or_whole():
    """The packaged network (one channel, 32 codes) in the numba kernels (mmf_cpu.py, the
    CPU default): within 1e-6 of the float64 reference on a 192x256 FLIR crop, tiles equal to
    the whole image, and as close to the PyTorch fast form as both are to float64. The exact
    path's whole-image forward is the inaccurate one there (its float32 cumulative-sum box
    filter: ~2e-2 from float64 on this crop), so the comparison is with float64."""
    import cv2

    from napari_cscfusion import fuse_guided

    if not mmf_cpu.available():
        pytest.skip(f"numba kernels unavailable: {mmf_cpu.unavailable_reason()}")
    model = load_model("mmf")
    ir = grey(read(DATA / "ivf" / "flir_test" / "IR1.jpg"))[:192, :256]
    vis = grey(read(DATA / "ivf" / "flir_test" / "VIS1.jpg"))[:192, :256]
    low = cv2.resize(ir, (128, 96), interpolation=cv2.INTER_AREA)
    ref = fuse_guided(low, vis, model, device="cpu", exact=True, precision="fp64",
                      tile=0).image
    whole = fuse_guided(low, vis, model, device="cpu", tile=0)
    tiled = fuse_guided(low, vis, model, device="cpu", tile=40).image
    assert whole.metadata["path"] == "fast" and whole.metadata["fast_kernel"] == "numba"
    for img in (whole.image, tiled):
        err = np.abs(img.astype(np.float64) - ref)
        assert err.max() < 1e-6 and err.mean() < 1e-7, (err.max(), err.mean())
    assert np.abs(whole.image - tiled).max() < 1e-6
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmf_cpu, "applies", lambda *a: False)
        torch_form = fuse_guided(low, vis, model, device="cpu", tile=0, exact=False).image
    assert np.abs(torch_form - whole.image).max() < 1e-5
    # the exact path's tiles (window means in float32) are within the tolerance of float64
    exact_tiled = fuse_guided(low, vis, model, device="cpu", exact=True, tile=64).image
    assert_close(whole.image, exact_tiled)


@needs_shared
def test_mmf_fast_path_is_float64_accurate_where_the_guided_filter_amplifies_rounding():
    """CSC-MMFN's guided filter divides code covariances E[xy] - E[x]E[y] by variances +
    1e-4: in flat code regions that amplifies float32 rounding of the statistics by up to 1e4
    (the model's own cumulative-sum box filter, which the exact path runs on whole images, is
    ~4e-3 from float64 on this crop and ~1 on a 1 Mpx image: issue 18's unexplained
    |engine - naive|). The fast path's statistics are float64: whole image and tiles stay
    within a few 1e-6 of the float64 reference, whatever order its arithmetic takes."""
    from napari_cscfusion import fuse_guided

    g = read(DATA / "guided" / "aloeL.jpg")[300:400, 400:530, :3]
    low = np.stack([g[::2, ::2, i % 3] / np.float32(255) * np.float32(0.5 + 0.5 * np.cos(i))
                    for i in range(31)]).astype(np.float32)
    model = authors_model("mmf")
    ref = fuse_guided(low, g, model, device="cpu", tile=0, precision="fp64", exact=True).image
    whole = fuse_guided(low, g, model, device="cpu", tile=0)
    tiled = fuse_guided(low, g, model, device="cpu", tile=24).image
    assert whole.metadata["path"] == "fast"  # 256 codes: the default is the fast path
    for img in (whole.image, tiled):
        err = np.abs(img - ref)
        assert err.max() < 2e-5 and err.mean() < 2e-6
    assert np.abs(whole.image - tiled).max() < 1e-5


@needs_shared
def test_cli_exact_flag_is_recorded(tmp_path):
    import imageio.v3 as iio

    from napari_cscfusion.cli import main
    from napari_cscfusion.engine.io import read_tiff_metadata
    from napari_cscfusion.models.checkpoints import save_checkpoint

    weights = save_checkpoint(clamped("mef").network, tmp_path / "mef_clamped.pt", "mef")
    paths = []
    for i in (2, 7, 12):
        p = tmp_path / f"e{i}.png"
        iio.imwrite(p, read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[:48, :40, :3])
        paths.append(str(p))
    for flag, path in (([], "fast"), (["--exact"], "exact")):
        out = tmp_path / f"fused_{path}.tif"
        assert main(["fuse", "mef", *paths, "-o", str(out), "--weights", str(weights),
                     "--device", "cpu", "-q", "--tile", "0", *flag]) == 0
        assert read_tiff_metadata(out)["path"] == path


@needs_shared
@pytest.mark.slow
def test_ivf_compiled_fast_path_matches_exact_on_a_tno_crop():
    # compile=True: what a GPU runs by default (engine.fast.auto_compile); crops of one shape
    from napari_cscfusion import fuse_infrared_visible

    model = clamped("ivf")
    ir, vis = (grey(read(DATA / "ivf" / "tno" / f"{n}1.png"))[100:260, 200:420]
               for n in ("IR", "VIS"))
    exact = fuse_infrared_visible(ir, vis, model, device="cpu", exact=True)
    fast = fuse_infrared_visible(ir, vis, model, device="cpu", compile=True)
    assert fast.metadata["path"] == "fast"
    assert_close(fast.image, exact.image)


# --- CSC-MMFN's low_res geometries (the packaged network) in PyTorch: a GPU's fast path ------

@needs_shared
@pytest.mark.parametrize("scale", [2, 4])
def test_mmf_low_res_pytorch_form_matches_exact_on_a_flir_crop(monkeypatch, scale):
    """On CUDA, and with exact=False where numba is missing or switched off, the packaged
    network (low_res_detail geometry) runs the PyTorch fast form: batch norm folded, float64
    statistics. On a real FLIR-test crop at x2 and x4 it is within the tolerance of the exact
    path, closer than that to float64 arithmetic, and tiled = whole image; a notice says why
    numba did not run."""
    import cv2

    from napari_cscfusion import fuse_guided
    from napari_cscfusion.engine import mmf
    from napari_cscfusion.engine.notices import FastPathFallback

    model = load_model("mmf")
    assert model.network.geometry == "low_res_detail"
    ir = grey(read(DATA / "ivf" / "flir_test" / "IR3.jpg"))[:192, :256]
    vis = grey(read(DATA / "ivf" / "flir_test" / "VIS3.jpg"))[:192, :256]
    low = cv2.resize(ir, (256 // scale, 192 // scale), interpolation=cv2.INTER_AREA)
    exact = fuse_guided(low, vis, model, device="cpu", exact=True, tile=0).image
    ref = fuse_guided(low, vis, model, device="cpu", exact=True, precision="fp64",
                      tile=0).image
    monkeypatch.setenv("CSCFUSION_NO_NUMBA", "1")
    with pytest.warns(FastPathFallback, match="CSCFUSION_NO_NUMBA is set"):
        whole = fuse_guided(low, vis, model, device="cpu", tile=0, exact=False)
    tiles = []
    tiled = fuse_guided(low, vis, model, device="cpu", tile=64, exact=False,
                        progress=lambda done, total: tiles.append(total)).image
    assert tiles[-1] == 12  # 192x256 in 64 px tiles
    assert whole.metadata["path"] == "fast" and whole.metadata["fast_kernel"] == "pytorch"
    # the default without numba on the CPU: the PyTorch form (measured faster on 2 threads)
    assert mmf.LOW_RES_PYTORCH_ON_CPU
    assert mmf.mmf_form(model.network, torch.device("cpu"), None, False, None) == "pytorch"
    for img in (whole.image, tiled):
        assert_close(img, exact)
        err = np.abs(img.astype(np.float64) - ref)
        assert err.max() < 1e-6 and err.mean() < 1e-7, (err.max(), err.mean())
    assert np.abs(whole.image - tiled).max() < 1e-6


def test_mmf_form_on_cuda_is_the_pytorch_fast_form_for_the_packaged_network(monkeypatch):
    """The path choice on a GPU, without one: ``mmf_form`` itself, the kernel it builds for a
    CUDA device, and fuse_guided's wiring with the device resolved to CUDA (the plane's run
    replaced by a recorder: nothing runs on the device)."""
    from napari_cscfusion import fuse_guided
    from napari_cscfusion.engine import mmf
    from napari_cscfusion.engine.mmf_lowres import LowResMMFKernel

    cuda, mps, cpu = (torch.device(d) for d in ("cuda", "mps", "cpu"))
    packaged = load_model("mmf").network  # low_res_detail, one channel, 32 codes
    thin_authors = load_model("mmf", MMF_AUTHORS_GEOMETRY).network  # authors' geometry, 32
    for exact, want in ((None, "pytorch"), (False, "pytorch"), (True, "exact")):
        assert mmf.mmf_form(packaged, cuda, None, False, exact) == want
        assert mmf.mmf_form(packaged, cuda, torch.float16, True, exact) == want
    assert mmf.mmf_form(packaged, mps, None, False, None) == "exact"  # no float64 on MPS
    assert mmf.mmf_form(thin_authors, cuda, None, False, None) == "exact"  # measured slower
    assert mmf.mmf_form(thin_authors, cuda, None, False, False) == "pytorch"
    if mmf_cpu.available():
        assert mmf.mmf_form(packaged, cpu, None, False, None) == "numba"
    monkeypatch.setenv("CSCFUSION_NO_NUMBA", "1")
    assert mmf.mmf_form(packaged, cpu, None, False, False) == "pytorch"
    assert mmf.mmf_form(packaged, cpu, None, False, None) == "pytorch"
    monkeypatch.setattr(mmf, "LOW_RES_PYTORCH_ON_CPU", False)  # the switch back to exact
    assert mmf.mmf_form(packaged, cpu, None, False, None) == "exact"
    monkeypatch.delenv("CSCFUSION_NO_NUMBA")

    kernel = mmf.mmf_kernel(packaged, (48, 64), (96, 128), cuda, exact=False)
    assert isinstance(kernel, LowResMMFKernel)
    assert kernel.form == "pytorch" and kernel.chains is None and kernel.path == "fast"

    seen = {}

    def plane(model, lr, g, dev, codes, progress=None, *, exact=False, **kw):
        seen.update(device=dev, exact=exact, form=mmf.mmf_kernel(
            model.network, lr.shape[-2:], g.shape[-2:], dev, exact=exact).form)
        return np.zeros((1, *g.shape[-2:]), np.float32), {}

    monkeypatch.setattr(mmf, "resolve_device", lambda device: cuda)
    monkeypatch.setattr(mmf, "_guided_plane", plane)
    rng = np.random.default_rng(0)
    res = fuse_guided(rng.random((24, 32), np.float32), rng.random((96, 128), np.float32),
                      device="cuda")
    assert seen == {"device": cuda, "exact": False, "form": "pytorch"}
    assert res.metadata["path"] == "fast" and res.metadata["fast_kernel"] == "pytorch"
