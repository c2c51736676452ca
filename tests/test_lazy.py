"""Dask in gives dask out with the same values; nD stacks are fused plane by plane; the same
graphs run on a dask.distributed LocalCluster."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from napari_cscfusion.engine import fuse_exposures, fuse_guided, fuse_infrared_visible, load_model
from napari_cscfusion.engine.inputs import normalise
from napari_cscfusion.engine.lazy import close_clients, is_dask, normalise_block

da = pytest.importorskip("dask.array")

from ._shared import CKPT, DATA, MMF_AUTHORS_GEOMETRY, needs_shared  # noqa: E402


def _read(path) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


def _grey(a):
    return a[..., 0] if a.ndim == 3 else a


@pytest.fixture(autouse=True)
def _no_leaked_clients():
    """A client opened for ``scheduler=`` becomes dask's default; close it even when a test
    fails, or later computations in other tests are sent to a closed cluster."""
    yield
    close_clients()


@cache
def model(task: str):
    return load_model(task, CKPT if task == "ivf" else CKPT / "csc_mefn_authors.pth")


@cache
def tno_stack() -> tuple[np.ndarray, np.ndarray]:
    """Two real TNO pairs cropped to 56x72, stacked along a leading 'time' axis (uint8)."""
    irs, viss = [], []
    for i, (y, x) in ((1, (220, 320)), (2, (150, 200))):
        irs.append(_grey(_read(DATA / "ivf" / "tno" / f"IR{i}.png"))[y:y + 56, x:x + 72])
        viss.append(_grey(_read(DATA / "ivf" / "tno" / f"VIS{i}.png"))[y:y + 56, x:x + 72])
    return np.stack(irs), np.stack(viss)


@cache
def memorial() -> np.ndarray:
    frames = [_read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[..., :3]
              for i in (3, 9)]
    return np.stack([f[60:108, 20:84] for f in frames])  # Memorial is 176x119


def test_block_normalisation_matches_the_whole_array_rule():
    rng = np.random.default_rng(1)
    cases = [rng.integers(0, 60000, (20, 30)).astype(np.uint16),
             rng.integers(-50, 80, (20, 30)).astype(np.int16),
             rng.integers(0, 90, (20, 30)).astype(np.int32),
             rng.normal(3, 2, (20, 30)),
             rng.random((20, 30)).astype(np.float32)]
    for a in cases:
        ref = normalise(a, "x").data
        lo, hi = (None, None) if a.dtype.kind == "u" else (a.min(), a.max())
        got = normalise_block(a[5:12, 7:20], lo, hi)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref[5:12, 7:20])


@needs_shared
def test_3d_stack_is_fused_plane_by_plane_like_a_loop():
    ir, vis = tno_stack()
    stacked = fuse_infrared_visible(ir, vis, model("ivf"), "l1", "l1", device="cpu")
    assert stacked.image.shape == ir.shape
    assert stacked.weights["base"].shape == (2, *ir.shape)
    for t in range(ir.shape[0]):
        one = fuse_infrared_visible(ir[t], vis[t], model("ivf"), "l1", "l1", device="cpu")
        np.testing.assert_allclose(stacked.image[t], one.image, atol=1e-6, rtol=0)
        np.testing.assert_allclose(stacked.weights["detail"][:, t], one.weights["detail"],
                                   atol=1e-6, rtol=0)
    assert np.abs(stacked.image[0] - stacked.image[1]).mean() > 0.02  # planes really differ


@needs_shared
@pytest.mark.parametrize("as_float", [False, True])
def test_packaged_weights_stretch_each_plane_about_its_own_mean_lazily_too(as_float):
    """With the packaged weights the default code gain pivots at each plane's mean grey: a
    dask stack (tiled) equals the in-memory run, one plane at a third of the other's
    brightness included, and the dark plane keeps its mean; uint8 (divided by 255) and floats
    outside [0, 1] (min-max over the whole stack: the mean is mapped as the pixels are)."""
    ir, vis = tno_stack()
    ir, vis = np.stack([ir[0], ir[1] // 3]), np.stack([vis[0], vis[1] // 3])
    if as_float:
        ir, vis = ir.astype(np.float32) * 3 - 5, vis.astype(np.float32) * 2 + 1
    packaged = load_model("ivf")
    ref = fuse_infrared_visible(ir, vis, packaged, "l1", "l1", device="cpu", exact=True)
    lazy = fuse_infrared_visible(da.from_array(ir, chunks=(1, 28, 36)),
                                 da.from_array(vis, chunks=(1, 28, 36)), packaged, "l1", "l1",
                                 device="cpu", tile=32)
    np.testing.assert_allclose(lazy.image.compute(), ref.image, atol=1e-5, rtol=0)
    if not as_float:  # each plane has its own pivot: fused alone it comes out the same
        one = fuse_infrared_visible(ir[1], vis[1], packaged, "l1", "l1", device="cpu",
                                    exact=True)
        np.testing.assert_allclose(ref.image[1], one.image, atol=1e-6, rtol=0)
        scene = (ir[1].mean() + vis[1].mean()) / 2 / 255
        assert scene < 0.25 and abs(float(ref.image[1].mean()) - scene) < 0.03, \
            (scene, ref.image[1].mean())


@needs_shared
def test_dask_in_dask_out_same_values_tiled_and_by_plane():
    ir, vis = tno_stack()
    ref = fuse_infrared_visible(ir, vis, model("ivf"), "l1", "l1", device="cpu", tile=0)
    lazy = fuse_infrared_visible(da.from_array(ir, chunks=(1, 28, 36)),
                                 da.from_array(vis, chunks=(1, 28, 36)), model("ivf"), "l1",
                                 "l1", device="cpu", tile=32)
    assert is_dask(lazy.image) and is_dask(lazy.weights["base"])
    assert lazy.image.shape == ir.shape and lazy.image.dtype == np.float32
    assert lazy.image.chunks[0] == (1, 1)  # one chunk per plane
    assert max(lazy.image.chunks[1]) <= 32 and len(lazy.image.chunks[2]) == 3  # tiles
    np.testing.assert_allclose(lazy.image.compute(), ref.image, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lazy.weights["base"].compute(), ref.weights["base"], atol=1e-5,
                               rtol=0)
    # a slice computes only its part and still agrees
    np.testing.assert_allclose(lazy.image[1, 10:20, 40:60].compute(),
                               ref.image[1, 10:20, 40:60], atol=1e-5, rtol=0)


@needs_shared
def test_dask_code_gain_same_values_as_in_memory():
    ir, vis = tno_stack()
    ref = fuse_infrared_visible(ir[0], vis[0], model("ivf"), "l1", "l1", device="cpu", tile=0,
                                code_gain=1.0)
    lazy = fuse_infrared_visible(da.from_array(ir[0]), da.from_array(vis[0]), model("ivf"),
                                 "l1", "l1", device="cpu", tile=28, code_gain=1.0)
    assert lazy.metadata["code_gain"] == 1.0
    np.testing.assert_allclose(lazy.image.compute(), ref.image, atol=1e-5, rtol=0)
    authors = fuse_infrared_visible(ir[0], vis[0], model("ivf"), "l1", "l1", device="cpu",
                                    tile=0)
    assert np.abs(ref.image - authors.image).mean() > 0.01


@needs_shared
@pytest.mark.parametrize("base_rule,detail_rule", [("saliency", "l1"), ("l1", "saliency")])
def test_dask_saliency_computes_whole_image_statistics_first(base_rule, detail_rule):
    ir, vis = tno_stack()
    ref = fuse_infrared_visible(ir[0], vis[0], model("ivf"), base_rule, detail_rule,
                                device="cpu", tile=0)
    lazy = fuse_infrared_visible(da.from_array(ir[0]), da.from_array(vis[0]), model("ivf"),
                                 base_rule, detail_rule, device="cpu", tile=28)
    assert len(lazy.image.chunks[0]) == 2 and len(lazy.image.chunks[1]) == 3
    np.testing.assert_allclose(lazy.image.compute(), ref.image, atol=1e-5, rtol=0)


@needs_shared
def test_dask_exposure_stack_rgb():
    stack = memorial()
    ref = fuse_exposures(stack, model("mef"), device="cpu", tile=0)
    series = da.from_array(np.stack([stack, stack[:, ::-1]]), chunks=(1, 2, 24, 64, 3))
    lazy = fuse_exposures(series, model("mef"), device="cpu", tile=16)
    assert is_dask(lazy.image) and lazy.image.shape == (2, 48, 64, 3)
    assert lazy.weights["exposures"].shape == (2, 2, 48, 64)
    out = lazy.image.compute()
    np.testing.assert_allclose(out[0], ref.image, atol=1e-5, rtol=0)
    flipped = fuse_exposures(stack[:, ::-1], model("mef"), device="cpu", tile=0).image
    np.testing.assert_allclose(out[1], flipped, atol=1e-5, rtol=0)


@needs_shared
def test_local_cluster_gives_the_same_values():
    distributed = pytest.importorskip("distributed")
    ir, vis = tno_stack()
    ref = fuse_infrared_visible(ir[1], vis[1], model("ivf"), "l1", "average", device="cpu",
                                tile=0)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            before = cluster.scheduler.transition_counter
            # numpy in, numpy out, computed on the cluster
            res = fuse_infrared_visible(ir[1], vis[1], model("ivf"), "l1", "average",
                                        device="cpu", tile=32, client=client)
            assert isinstance(res.image, np.ndarray)
            np.testing.assert_allclose(res.image, ref.image, atol=1e-5, rtol=0)
            ran = cluster.scheduler.transition_counter
            assert ran - before >= 2 * 6  # the 2 x 3 tile tasks (at least) went through it
            # dask in: persisted on the cluster, by scheduler address
            lazy = fuse_infrared_visible(da.from_array(ir[1], chunks=28),
                                         da.from_array(vis[1], chunks=28), model("ivf"), "l1",
                                         "average", device="cpu", tile=32,
                                         scheduler=cluster.scheduler_address)
            assert is_dask(lazy.image)
            np.testing.assert_allclose(lazy.image.compute(), ref.image, atol=1e-5, rtol=0)
            assert cluster.scheduler.transition_counter > ran
            close_clients()


@needs_shared
def test_cli_streams_big_tiffs_tile_by_tile(tmp_path, capsys):
    import tifffile

    from napari_cscfusion.cli import main
    from napari_cscfusion.engine.io import read_tiff_lazy

    ir, vis = tno_stack()
    tifffile.imwrite(tmp_path / "ir.tif", ir[0])
    tifffile.imwrite(tmp_path / "vis.tif", vis[0])
    lazy_ir = read_tiff_lazy(tmp_path / "ir.tif", chunk=32)
    assert is_dask(lazy_ir) and lazy_ir.chunks == ((32, 24), (32, 32, 8))
    out = tmp_path / "fused.tif"
    rc = main(["fuse", "ivf", str(tmp_path / "ir.tif"), str(tmp_path / "vis.tif"), "-o",
               str(out), "--weights", str(CKPT), "--device", "cpu", "--base-rule", "l1",
               "--stream", "--tile", "32"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "fusing" in err  # the progress bar
    got = tifffile.imread(out)
    ref = fuse_infrared_visible(ir[0], vis[0], model("ivf"), "l1", "l1", device="cpu", tile=0)
    assert got.shape == ir[0].shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.image, atol=1e-5, rtol=0)
    with tifffile.TiffFile(out) as tf:
        assert '"network": "CSC-IVFN"' in tf.pages[0].description


# --- guided super-resolution (CSC-MMFN) ------------------------------------------------------

@cache
def flir_guided() -> tuple[np.ndarray, np.ndarray]:
    """Three real FLIR pairs (T=3): low-res infrared 12x16 (area-downsampled x4 from a 48x64
    crop) and the visible 48x64 guide (uint8)."""
    from napari_cscfusion.engine.planes import downsample_area

    lows, guides = [], []
    for i, (y, x) in ((1, (100, 120)), (2, (150, 200)), (3, (60, 300))):
        ir = _grey(_read(DATA / "ivf" / "flir_test" / f"IR{i}.jpg"))[y:y + 48, x:x + 64]
        lows.append(downsample_area(ir / np.float32(255), 4))
        guides.append(_grey(_read(DATA / "ivf" / "flir_test" / f"VIS{i}.jpg"))[y:y + 48, x:x + 64])
    return np.stack(lows).astype(np.float32), np.stack(guides)


@cache
def bicubic_input_mmf():
    m = load_model("mmf", MMF_AUTHORS_GEOMETRY)  # lr_channels=1, bicubic-upsampled input
    assert m.info["header"]["training"]["lr_input"] == "bicubic"
    return m


@needs_shared
def test_bicubic_window_is_the_whole_image_resize_from_a_crop():
    import torch

    from napari_cscfusion.engine.resample import bicubic_span, bicubic_window

    low = flir_guided()[0][0]
    for h, w, H, W in ((12, 16, 48, 64), (12, 13, 41, 50), (12, 16, 12, 16)):
        x = low[:h, :w]
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(H, W),
                                              mode="bicubic", align_corners=False)[0, 0].numpy()
        for y0, y1, x0, x1 in ((0, H, 0, W), (0, 7, 5, min(23, W)), (H // 2, H, W - 9, W),
                               (3, 4, 0, 1)):
            (a, b), (c, d) = bicubic_span(y0, y1, h, H), bicubic_span(x0, x1, w, W)
            assert b - a <= (y1 - y0) * h / H + 5  # the window's rows and 2 px each side
            got = bicubic_window(x[a:b, c:d], (a, c), (h, w), (H, W), (y0, y1, x0, x1))
            # PyTorch's taps, weights and order of sums; its compiled kernel rounds a few
            # sums differently (fused multiply-adds), by a few float32 ulps
            np.testing.assert_allclose(got, ref[y0:y1, x0:x1], atol=2e-6, rtol=0)


@needs_shared
def test_guided_stack_is_fused_plane_by_plane_like_a_loop():
    low, guide = flir_guided()
    m = bicubic_input_mmf()
    stacked = fuse_guided(low, guide, m, device="cpu", tile=0)
    assert stacked.image.shape == guide.shape and stacked.metadata["planes"] == 3
    for t in range(3):
        one = fuse_guided(low[t], guide[t], m, device="cpu", tile=0)
        np.testing.assert_allclose(stacked.image[t], one.image, atol=1e-6, rtol=0)
    # (1, h, w) stays one channels-first plane, also with an RGB guide
    rgb = np.repeat(guide[0][..., None], 3, -1)
    chw = fuse_guided(low[:1], rgb, m, device="cpu", tile=0).image
    assert chw.shape == (1, 48, 64)
    np.testing.assert_allclose(chw[0], fuse_guided(low[0], rgb, m, device="cpu", tile=0).image,
                               atol=1e-6, rtol=0)
    assert np.abs(stacked.image[0] - stacked.image[1]).mean() > 0.02  # planes really differ
    with pytest.raises(ValueError, match=r"low_res and guide: the leading.*\(3, 12, 16\).*"
                                         r"\(2, 48, 64\)"):
        fuse_guided(low, guide[:2], m, device="cpu")


@needs_shared
def test_dask_guided_equals_the_in_memory_tiled_run():
    low, guide = flir_guided()
    m = bicubic_input_mmf()
    lazy = fuse_guided(da.from_array(low, chunks=(1, 6, 8)),
                       da.from_array(guide, chunks=(1, 24, 32)), m, device="cpu", tile=24)
    assert is_dask(lazy.image) and lazy.image.shape == guide.shape
    assert lazy.image.dtype == np.float32 and lazy.metadata["lazy"]
    assert lazy.image.chunks[0] == (1, 1, 1) and len(lazy.image.chunks[1]) == 2  # planes, tiles
    out = lazy.image.compute()
    tiled = fuse_guided(low, guide, m, device="cpu", tile=24).image
    # the bicubic pre-upsampling is made per tile from the low-res crop it reads
    np.testing.assert_allclose(out, tiled, atol=1e-6, rtol=0)
    whole = fuse_guided(low, guide, m, device="cpu", tile=0).image
    np.testing.assert_allclose(out, whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(lazy.image[2, 30:40, 10:50].compute(), tiled[2, 30:40, 10:50],
                               atol=1e-6, rtol=0)
    # a non-integer scale, numpy low-res with a dask guide
    lz = fuse_guided(low[0, :, :13], da.from_array(guide[0, :, :50]), m, device="cpu", tile=16)
    ref = fuse_guided(low[0, :, :13], guide[0, :, :50], m, device="cpu", tile=16).image
    assert is_dask(lz.image)
    np.testing.assert_allclose(lz.image.compute(), ref, atol=1e-6, rtol=0)


@needs_shared
def test_dask_guided_multiband_with_rgb_guides():
    """The authors' 31-band model (native low-res input): (T, 31, h, w) with (T, H, W, 3)."""
    g = _read(DATA / "guided" / "aloeL.jpg")[300:332, 400:440, :3]
    guides = np.stack([g, g[::-1]])
    bands = np.stack([guides[:, ::2, ::2, i % 3] / np.float32(255)
                      * np.float32(0.5 + 0.5 * np.cos(i)) for i in range(31)], 1)
    m = load_model("mmf", CKPT / "csc_mmfn_authors.pth")
    lazy = fuse_guided(da.from_array(bands, chunks=(1, 31, 8, 10)), da.from_array(guides), m,
                       device="cpu", tile=16)
    assert lazy.image.shape == (2, 31, 32, 40)
    tiled = fuse_guided(bands, guides, m, device="cpu", tile=16).image
    np.testing.assert_allclose(lazy.image.compute(), tiled, atol=1e-6, rtol=0)


@needs_shared
def test_guided_on_a_local_cluster_gives_the_same_values():
    distributed = pytest.importorskip("distributed")
    low, guide = flir_guided()
    m = bicubic_input_mmf()
    ref = fuse_guided(low[1], guide[1], m, device="cpu", tile=24).image
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            res = fuse_guided(low[1], guide[1], m, device="cpu", tile=24, client=client)
            assert isinstance(res.image, np.ndarray)
            np.testing.assert_allclose(res.image, ref, atol=1e-6, rtol=0)


@cache
def mef_with_prior(tmp_root: str, sigma: float = 0.2):
    """The authors' CSC-MEFN weights saved in our format as if trained with the global
    exposure prior (header ``exposure_prior_sigma``)."""
    from napari_cscfusion.models import save_checkpoint

    path = Path(tmp_root) / "mef_prior.pt"
    save_checkpoint(model("mef").network, path, "mef", {"exposure_prior_sigma": sigma})
    return load_model("mef", path)


@needs_shared
def test_exposure_prior_weights_add_each_exposures_global_prior_everywhere(tmp_path_factory):
    import torch

    from napari_cscfusion.models.mefn import exposure_prior

    stack = memorial()  # 2 real exposures (uint8 RGB), 48x64
    m = mef_with_prior(str(tmp_path_factory.mktemp("prior")))
    whole = fuse_exposures(stack, m, device="cpu", tile=0)
    # the network's own forward with the prior: the reference
    x = torch.from_numpy(np.moveaxis(stack, -1, 1).astype(np.float32) / 255)
    assert m.network.prior_sigma == 0.2  # set by the loader from the header
    with torch.no_grad():
        ref = m.network(x).numpy()
    np.testing.assert_allclose(np.moveaxis(whole.image, -1, 0), ref, atol=2e-6, rtol=0)
    plain = fuse_exposures(stack, model("mef"), device="cpu", tile=0)
    assert np.abs(whole.image - plain.image).max() > 0.02  # the prior changes the weights
    # one logit per exposure, everywhere: -(mean Y - 0.5)^2 / (2 sigma^2) of the whole
    # exposure, so the weights' log-ratio moves by the difference of the two, at every pixel
    y = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    expect = exposure_prior(y.mean((1, 2)).double(), 0.2)
    ratio = np.log(whole.weights["exposures"][0] / whole.weights["exposures"][1]) \
        - np.log(plain.weights["exposures"][0] / plain.weights["exposures"][1])
    assert abs(float(expect[0] - expect[1])) > 0.1
    np.testing.assert_allclose(ratio, float(expect[0] - expect[1]), atol=1e-3, rtol=0)
    # tiles, dask (chunks that split the exposures and colours) and a stack of brackets
    tiled = fuse_exposures(stack, m, device="cpu", tile=16)
    np.testing.assert_allclose(tiled.image, whole.image, atol=1e-5, rtol=0)
    series = da.from_array(np.stack([stack, stack[:, ::-1, ::-1]]), chunks=(1, 1, 24, 40, 2))
    lazy = fuse_exposures(series, m, device="cpu", tile=16)
    out = lazy.image.compute()
    np.testing.assert_allclose(out[0], whole.image, atol=1e-5, rtol=0)
    flipped = fuse_exposures(stack[:, ::-1, ::-1], m, device="cpu", tile=0).image
    np.testing.assert_allclose(out[1], flipped, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lazy.weights["exposures"][:, 0].compute(),
                               whole.weights["exposures"], atol=1e-5, rtol=0)
