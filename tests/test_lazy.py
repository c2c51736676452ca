"""Dask in gives dask out with the same values; nD stacks are fused plane by plane; the same
graphs run on a dask.distributed LocalCluster."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from napari_cscfusion.engine import fuse_exposures, fuse_infrared_visible, load_model
from napari_cscfusion.engine.inputs import normalise
from napari_cscfusion.engine.lazy import close_clients, is_dask, normalise_block

da = pytest.importorskip("dask.array")

SHARED = Path(os.environ.get("CSCFUSION_SHARED",
                             Path(__file__).resolve().parents[1].parent / "shared"))
DATA, CKPT = SHARED / "data", SHARED / "reference-checkpoints"
needs_shared = pytest.mark.skipif(not (DATA.is_dir() and CKPT.is_dir()),
                                  reason=f"shared data/checkpoints not found at {SHARED}")


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
def test_dask_saliency_computes_whole_image_statistics_first():
    ir, vis = tno_stack()
    ref = fuse_infrared_visible(ir[0], vis[0], model("ivf"), "saliency", "l1", device="cpu",
                                tile=0)
    lazy = fuse_infrared_visible(da.from_array(ir[0]), da.from_array(vis[0]), model("ivf"),
                                 "saliency", "l1", device="cpu", tile=28)
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
    from napari_cscfusion.engine.lazy import read_tiff_lazy

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
