"""Tiled inference equals whole-image inference (real images, tiny tiles), the saliency rule's
fast path stays within 1e-4 of its float64 reference, progress/cancel per tile, OOM splitting."""

from __future__ import annotations

import sys
from functools import cache

import numpy as np
import pytest
import torch

from napari_cscfusion.engine import (
    Cancelled,
    fuse_exposures,
    fuse_grey_sources,
    fuse_infrared_visible,
    ivf,
    load_model,
    mef,
    notices,
    rules,
    tiling,
)
from napari_cscfusion.models.folded import folded

from ._shared import CKPT, DATA, missing, needs_shared

CPU = torch.device("cpu")


def _read(path) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


def _grey(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.ndim == 3 else a


@cache
def model(task: str):
    path = {"ivf": CKPT, "mef": CKPT / "csc_mefn_authors.pth",
            "mmf": CKPT / "csc_mmfn_authors.pth"}[task]
    return load_model(task, path)


@cache
def tno_pair(h: int = 96, w: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """A crop of TNO pair 1 with structure in both sources (uint8)."""
    ir = _grey(_read(DATA / "ivf" / "tno" / "IR1.png"))
    vis = _grey(_read(DATA / "ivf" / "tno" / "VIS1.png"))
    return ir[200:200 + h, 300:300 + w], vis[200:200 + h, 300:300 + w]


@cache
def memorial(h: int = 72, w: int = 96) -> np.ndarray:
    frames = [_read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[..., :3]
              for i in (2, 7, 12)]
    return np.stack([f[30:30 + h, 10:10 + w] for f in frames])  # Memorial is 176x119


# --- geometry ---------------------------------------------------------------------------------

def test_tile_grid_cores_partition_the_image_and_crops_carry_the_halo():
    shape = (70, 131)
    tiles = tiling.tile_grid(shape, 32, halo=9)
    cover = np.zeros(shape, int)
    for t in tiles:
        cover[t.core_slices] += 1
        y0, y1, x0, x1 = t.crop
        assert (y0, x0) == (max(0, t.core[0] - 9), max(0, t.core[2] - 9))
        assert (y1, x1) == (min(70, t.core[1] + 9), min(131, t.core[3] + 9))
        iy0, iy1, ix0, ix1 = t.inner
        assert (iy1 - iy0, ix1 - ix0) == (t.core[1] - t.core[0], t.core[3] - t.core[2])
        assert max(t.core[1] - t.core[0], t.core[3] - t.core[2]) <= 32
    assert (cover == 1).all()
    assert len(tiles) == 3 * 5
    assert len(tiling.tile_grid(shape, None, 9)) == 1


def test_auto_tile_follows_the_memory_budget():
    small = tiling.auto_tile(1000, 20, CPU, budget=100 * 1000 * 1000)  # 100 MB / 1 kB per px
    assert small == int(np.sqrt(1e5)) - 40
    big = tiling.auto_tile(1000, 20, CPU, budget=4 * 100 * 1000 * 1000)
    assert big > 1.9 * small  # side grows with the square root of the budget
    assert tiling.auto_tile(1000, 20, CPU, budget=10 ** 12, preferred=256) == 256
    assert tiling.auto_tile(10 ** 9, 20, CPU, budget=1) == tiling.MIN_TILE


class _Kernel:
    """What resolve_tile reads of a kernel: 1 kB per crop pixel, 20 px halo, 5 result maps."""
    bytes_per_pixel, fixed_bytes, halo = 1000, 0, 20

    def preferred_tile(self, device):
        return None

    def outputs(self):
        return {"image": 1, "weights": 4}


def test_automatic_tiles_whole_image_when_it_fits_else_within_the_cap(monkeypatch):
    k = _Kernel()
    monkeypatch.setattr(tiling, "available_memory", lambda device: 8 << 30)
    # 2048^2 px x 1 kB = 4.2 GB fits the 8 GiB available: one tile, no halo, no statistics
    assert tiling.resolve_tile(None, (2048, 2048), k, CPU) is None
    # ... but not when 4 dask threads share it: tiles within the cap, shared too
    shared = tiling.resolve_tile(None, (2048, 2048), k, CPU, parallel=4)
    assert shared == int(np.sqrt(tiling.CPU_BUDGET_CAP / 4 / 1000)) - 40
    # 4096^2 x 1 kB = 16.8 GB does not fit: tiles as large as the 2 GiB cap allows
    side = tiling.resolve_tile(None, (4096, 4096), k, CPU)
    assert side == int(np.sqrt(tiling.CPU_BUDGET_CAP / 1000)) - 40
    # results held in memory (5 float32 maps: 336 MB here) share the cap with the tile
    held = tiling.result_bytes(k, (4096, 4096))
    assert held == 20 * 4096 * 4096
    with_results = tiling.resolve_tile(None, (4096, 4096), k, CPU, held=held)
    assert with_results == int(np.sqrt((tiling.CPU_BUDGET_CAP - held) / 1000)) - 40
    assert with_results < side
    # results beyond the cap: the tile keeps the floor
    floor = tiling.resolve_tile(None, (4096, 4096), k, CPU, held=10 << 30)
    assert floor == int(np.sqrt(tiling.CPU_TILE_FLOOR / 1000)) - 40
    # little memory available: it bounds the tile below the cap
    monkeypatch.setattr(tiling, "available_memory", lambda device: 100 * 1000 * 1000)
    assert tiling.resolve_tile(None, (4096, 4096), k, CPU) == int(np.sqrt(1e5)) - 40


def test_tile_argument_is_checked():
    k = mef.MEFKernel(model("mef").network, 3, False, CPU) if CKPT.is_dir() else None
    if k is None:
        pytest.skip(missing("reference-checkpoints/"))
    assert tiling.resolve_tile(0, (100, 100), k, CPU) is None
    assert tiling.resolve_tile(False, (100, 100), k, CPU) is None
    assert tiling.resolve_tile(40, (100, 100), k, CPU) == 40
    assert tiling.resolve_tile(400, (100, 100), k, CPU) is None  # larger than the image
    for bad in (-3, 2.5, "big"):
        with pytest.raises(ValueError, match="tile"):
            tiling.resolve_tile(bad, (100, 100), k, CPU)


# --- the networks: tiled == whole image -------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("base_rule,detail_rule", [("saliency", "l1"), ("l1", "average"),
                                                   ("average", "l1"),
                                                   ("choose-max", "l1-black"),
                                                   ("saliency", "saliency")])
def test_ivf_tiled_equals_whole_image(base_rule, detail_rule):
    ir, vis = tno_pair()
    whole = fuse_infrared_visible(ir, vis, model("ivf"), base_rule, detail_rule, device="cpu",
                                  tile=0)
    calls = []
    tiled = fuse_infrared_visible(ir, vis, model("ivf"), base_rule, detail_rule, device="cpu",
                                  tile=56, progress=lambda d, t: calls.append((d, t)))
    np.testing.assert_allclose(tiled.image, whole.image, atol=1e-5, rtol=0)
    for key in ("base", "detail"):
        np.testing.assert_allclose(tiled.weights[key], whole.weights[key], atol=1e-5, rtol=0)
    # 2 x 2 tiles, each with several inner steps (+ the statistics passes for saliency)
    assert len(calls) > 4 and calls[-1][0] == calls[-1][1]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # the fusion is not trivial: the sources differ and so do the weights
    key = "detail" if detail_rule != "average" else "base"
    assert whole.weights[key].std() > 0.01


@needs_shared
def test_ivf_code_gain_tiled_equals_whole_and_the_authors_gain_is_the_default():
    ir, vis = tno_pair()
    whole = fuse_infrared_visible(ir, vis, model("ivf"), device="cpu", tile=0, code_gain=1.0)
    tiled = fuse_infrared_visible(ir, vis, model("ivf"), device="cpu", tile=56, code_gain=1.0)
    np.testing.assert_allclose(tiled.image, whole.image, atol=1e-5, rtol=0)
    assert tiled.metadata["code_gain"] == whole.metadata["code_gain"] == 1.0
    default = fuse_infrared_visible(ir, vis, model("ivf"), device="cpu", tile=0)
    two = fuse_infrared_visible(ir, vis, model("ivf"), device="cpu", tile=0, code_gain=2.0)
    np.testing.assert_array_equal(two.image, default.image)  # no extra multiply for 2
    assert default.metadata["code_gain"] == 2.0
    assert np.abs(whole.image - default.image).mean() > 0.01  # the gain reaches the decoder
    # the weights do not depend on the gain (it acts after the rules)
    np.testing.assert_array_equal(whole.weights["detail"], default.weights["detail"])
    # the folded decoder with scale 0.5 is the reference decoder on the codes x 1
    x = torch.from_numpy(ir[:48, :56].astype(np.float32) / 255)[None, None]
    net = model("ivf").network
    f = folded("ivf", net)
    with torch.inference_mode():
        zb, zd = net.encode(x)
        assert (f.decode(zb, zd, 0.5) - net.decode(zb, zd)).abs().max() < 1e-6
    for bad in (0, -1.0, float("nan"), float("inf"), "2", None, True):
        with pytest.raises(ValueError, match="^code_gain"):
            fuse_infrared_visible(ir, vis, model("ivf"), device="cpu", code_gain=bad)


@needs_shared
def test_ivf_saliency_tiles_use_whole_image_statistics():
    """Without the first pass (each tile's own min/max/histogram) the tiles would differ."""
    ir, vis = tno_pair(80, 96)
    x = np.stack([ir, vis]).astype(np.float32) / 255
    k = ivf.IVFKernel(model("ivf").network, ["ir", "vis"], "saliency", "l1", CPU)
    whole = tiling.run_tiled(k, x, None)["image"]
    t = tiling.tile_grid(x.shape[1:], 56, k.halo)[0]
    crop = x[:, t.crop_slices[0], t.crop_slices[1]]
    stats = tiling.saliency_statistics(k, x, 56)
    good = k(crop, t.inner, stats)["image"][0]
    own = k(crop[:, t.inner[0]:t.inner[1], t.inner[2]:t.inner[3]],
            (0, t.inner[1] - t.inner[0], 0, t.inner[3] - t.inner[2]))["image"][0]
    ref = whole[0][t.core_slices]
    assert np.abs(good - ref).max() < 1e-5
    assert np.abs(own - ref).max() > 1e-3


@needs_shared
def test_ivf_codes_tiled_equal_whole_and_many_sources():
    ir, vis = tno_pair(64, 80)
    third = np.ascontiguousarray(ir[::-1]).astype(np.float32) / 255
    imgs = {"a": ir.astype(np.float32) / 255, "b": vis.astype(np.float32) / 255, "c": third}
    ref = fuse_grey_sources(imgs, model("ivf"), "l1", "l1", CPU, True, tile=0)
    got = fuse_grey_sources(imgs, model("ivf"), "l1", "l1", CPU, True, tile=32)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=0)
    assert set(got[1]) == {"a_base", "a_detail", "b_base", "b_detail", "c_base", "c_detail",
                           "fused_base", "fused_detail"}
    for name in got[1]:
        np.testing.assert_allclose(got[1][name], ref[1][name], atol=1e-5, rtol=0)
    assert got[2]["base"].shape == (3, 64, 80)
    np.testing.assert_allclose(got[2]["base"].sum(0), 1.0, atol=1e-5)


@needs_shared
@pytest.mark.parametrize("base_rule,detail_rule", [("saliency", "l1"), ("l1", "average"),
                                                   ("average", "l1"),
                                                   ("choose-max", "l1-black"),
                                                   ("l1", "saliency")])
def test_ivf_without_codes_fuses_piece_by_piece_to_the_same_values(monkeypatch, base_rule,
                                                                    detail_rule):
    """Without codes the local rules and the decoder run on the encoder's pieces (less held
    per crop pixel); with codes every stage holds its whole window. Same images and weights,
    whole or tiled, with pieces smaller than the crops."""
    monkeypatch.setitem(ivf.INNER_TILE, "cpu", 24)
    ir, vis = tno_pair(72, 88)
    imgs = {"ir": ir.astype(np.float32) / 255, "vis": vis.astype(np.float32) / 255}
    for tile in (0, 40):
        kw = dict(tile=tile, code_gain=1.0)
        staged = fuse_grey_sources(imgs, model("ivf"), base_rule, detail_rule, CPU, True, **kw)
        pieces = fuse_grey_sources(imgs, model("ivf"), base_rule, detail_rule, CPU, False, **kw)
        np.testing.assert_allclose(pieces[0], staged[0], atol=1e-6, rtol=0)
        for key in ("base", "detail"):
            np.testing.assert_allclose(pieces[2][key], staged[2][key], atol=1e-6, rtol=0)
        assert pieces[1] == {} and len(staged[1]) == 6
    k = ivf.IVFKernel(model("ivf").network, ["ir", "vis"], base_rule, detail_rule, CPU)
    kc = ivf.IVFKernel(model("ivf").network, ["ir", "vis"], base_rule, detail_rule, CPU,
                          codes=True)
    if detail_rule == "saliency":  # its codes of the whole window are held either way
        assert k.bytes_per_pixel == kc.bytes_per_pixel
    else:
        assert k.bytes_per_pixel < kc.bytes_per_pixel


@needs_shared
@pytest.mark.parametrize("rgb", [True, False])
def test_mef_tiled_equals_whole_image(rgb):
    stack = memorial()
    if not rgb:
        stack = stack.mean(-1).astype(np.uint8)
    whole = fuse_exposures(stack, model("mef"), device="cpu", tile=0)
    tiled = fuse_exposures(stack, model("mef"), device="cpu", tile=24)
    np.testing.assert_allclose(tiled.image, whole.image, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiled.weights["exposures"], whole.weights["exposures"],
                               atol=1e-5, rtol=0)
    assert whole.image.shape == stack.shape[1:]
    assert whole.weights["exposures"].std(0).mean() > 0.01  # exposures weighed differently


@needs_shared
def test_encoders_run_in_cache_sized_pieces_with_the_same_values(monkeypatch):
    """The kernels' inner pieces (INNER_TILE, a speed choice on the CPU) change nothing: tiny
    pieces (16 px, the 20/5 px encoder halos wider than the pieces) give bit-identical
    images, weights and codes to one piece per crop."""
    ir, vis = tno_pair(64, 72)
    stack = memorial(40, 52)

    def run(pieces):
        monkeypatch.setitem(ivf.INNER_TILE, "cpu", pieces)
        monkeypatch.setitem(mef.INNER_TILE, "cpu", pieces)
        a = fuse_infrared_visible(ir, vis, model("ivf"), "l1", "l1", device="cpu", tile=0,
                                  codes=True)
        b = fuse_exposures(stack, model("mef"), device="cpu", tile=0, codes=True)
        return a, b

    (ivf_whole, mef_whole), (ivf_pieces, mef_pieces) = run(None), run(16)
    for whole, pieces in ((ivf_whole, ivf_pieces), (mef_whole, mef_pieces)):
        np.testing.assert_array_equal(pieces.image, whole.image)
        assert whole.codes.keys() == pieces.codes.keys() and whole.codes
        for k in whole.codes:
            np.testing.assert_array_equal(pieces.codes[k], whole.codes[k])
        for k in whole.weights:
            np.testing.assert_array_equal(pieces.weights[k], whole.weights[k])


@needs_shared
def test_inference_network_is_bit_exact_with_the_reference_network():
    ir, _ = tno_pair(48, 56)
    x = torch.from_numpy(ir.astype(np.float32) / 255)[None, None]
    net = model("ivf").network
    f = folded("ivf", net)
    with torch.inference_mode():
        zb, zd = net.encode(x)
        assert torch.equal(f.encode_base(x), zb)
        assert torch.equal(f.encode_detail(x), zd)
        ref = net.decode(2 * zb, 2 * zd)
        assert (f.decode(zb, zd) - ref).abs().max() < 1e-6  # decoder: BN folded


# --- the saliency rule -------------------------------------------------------------------------

@needs_shared
def test_fast_saliency_rule_within_1e4_of_float64_reference():
    ir, vis = tno_pair(96, 128)
    x = torch.from_numpy(np.stack([ir, vis]).astype(np.float32) / 255)[:, None]
    with torch.inference_mode():
        zb, _ = model("ivf").network.encode(x)
        f_ref, w_ref = rules.saliency_rule(zb, exact=True)
        f_fast, w_fast = rules.saliency_rule(zb)
    assert (w_fast - w_ref).abs().max() < 1e-4
    assert (f_fast - f_ref).abs().max() < 1e-4
    assert (w_ref - 0.5).abs().max() > 0.05  # weights are not trivially equal


@pytest.mark.parametrize("sources", [2, 3, 5])
@pytest.mark.parametrize("weight_channels", [1, 64])
def test_weighted_sum_is_bit_identical_to_the_product_summed(sources, weight_channels):
    """The l1 rule's sum_s w_s z_s made a few channels at a time (no [S, q, H, W] product)
    gives exactly the values of (w * z).sum(0): tiled == whole and the authors' match rest
    on the same roundings."""
    g = torch.Generator().manual_seed(sources)
    z = torch.randn(sources, 64, 23, 31, generator=g)
    w = torch.rand(sources, weight_channels, 23, 31, generator=g)
    got = rules.weighted_sum(w, z, chunk=5)  # a chunk that does not divide q
    assert got.shape == (64, 23, 31)
    assert torch.equal(got, (w * z).sum(0))


def test_saliency_statistics_of_tiles_add_up_to_the_whole_image():
    z = torch.randn(2, 3, 40, 50)
    lo, hi = rules.SaliencyStats.extremes(z)
    parts = [rules.SaliencyStats.extremes(z[..., :, :20]),
             rules.SaliencyStats.extremes(z[..., :, 20:])]
    stats = tiling.combine_extremes(parts)
    assert torch.equal(stats.lo, lo) and torch.equal(stats.hi, hi)
    counts = [stats.counts(z[..., :, :20]), stats.counts(z[..., :, 20:])]
    full = tiling.with_histogram(stats, counts)
    n = rules.saliency_normalise(z)
    direct = rules.level_histograms(rules.saliency_levels(n))
    torch.testing.assert_close(full.hist, direct / direct.sum(-1, keepdim=True))
    f1, _ = rules.saliency_rule(z)
    f2, _ = rules.saliency_rule(z, stats=full)
    torch.testing.assert_close(f1, f2)


# --- progress, cancel, out of memory, precision ------------------------------------------------

@needs_shared
def test_cancel_stops_at_the_next_tile():
    stack = memorial()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done >= 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        fuse_exposures(stack, model("mef"), device="cpu", tile=16, progress=progress)
    assert seen == [0, 1, 2]  # 5 x 6 tiles were planned; it stopped after the second


@needs_shared
def test_out_of_memory_tile_is_split_and_result_unchanged(monkeypatch):
    stack = memorial(48, 64)
    ref = fuse_exposures(stack, model("mef"), device="cpu", tile=0).image
    real_call = mef.MEFKernel.__call__
    sizes = []

    def limited(self, crop, core, stats=None, tick=None):
        sizes.append(crop.shape[1] * crop.shape[2])
        if crop.shape[1] * crop.shape[2] > 30 * 40:
            raise torch.OutOfMemoryError("fake: tile too large")
        return real_call(self, crop, core, stats, tick)

    monkeypatch.setattr(mef.MEFKernel, "__call__", limited)
    with pytest.warns(RuntimeWarning, match="out of memory on cpu with the whole 48x64 image"):
        got = fuse_exposures(stack, model("mef"), device="cpu", tile=0).image
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert sizes[0] == 48 * 64 and max(sizes[1:]) <= 30 * 40


def test_release_freed_memory_asks_the_c_library_to_trim_the_heap(monkeypatch):
    """glibc's malloc_trim(0) is called (how much it returns, on a pinned heap, is measured
    in benchmarks/memory_release.py); without it, nothing is called and False says so."""
    calls = []

    def trim(pad):
        calls.append(pad)
        return 1

    monkeypatch.setattr(notices, "_malloc_trim", lambda: trim)
    assert notices.release_freed_memory() is True
    assert calls == [0]
    monkeypatch.setattr(notices, "_malloc_trim", lambda: None)
    assert notices.release_freed_memory() is False
    assert calls == [0]


def test_malloc_trim_is_found_on_linux_only():
    trim = notices._malloc_trim()
    if sys.platform.startswith("linux"):  # glibc (the function exists, returns 0 or 1)
        assert trim is not None and trim(0) in (0, 1)
    else:
        assert trim is None


@needs_shared
def test_freed_memory_is_released_after_every_tile(monkeypatch):
    calls = []
    monkeypatch.setattr(tiling, "release_freed_memory", lambda: calls.append(1) or True)
    ir, vis = tno_pair()
    fuse_infrared_visible(ir, vis, model("ivf"), device="cpu", tile=56)
    tiles = len(tiling.tile_grid(ir.shape, 56, 0))
    assert tiles == 4 and len(calls) == 3 * tiles  # extremes, histogram and fusion passes


@needs_shared
def test_bf16_runs_and_its_error_against_fp32_is_reported():
    """Half precision is meant for GPUs; on the CPU bf16 runs too, which checks the path."""
    ir, vis = tno_pair(64, 64)
    ref = fuse_infrared_visible(ir, vis, model("ivf"), "l1", "l1", device="cpu", tile=0)
    half = fuse_infrared_visible(ir, vis, model("ivf"), "l1", "l1", device="cpu", tile=0,
                                 precision="bf16")
    err = np.abs(half.image - ref.image)
    print(f"bf16 vs fp32 on CPU: max {err.max():.4f}, mean {err.mean():.5f}")
    assert half.image.dtype == np.float32 and np.isfinite(half.image).all()
    assert 0 < err.mean() < 0.05  # different (really bf16) but close
    with pytest.raises(ValueError, match="precision"):
        fuse_infrared_visible(ir, vis, model("ivf"), device="cpu", precision="fp8")


@needs_shared
def test_mmf_tiled_equals_whole_image_including_non_integer_scales():
    from napari_cscfusion.engine import fuse_guided

    g = _read(DATA / "guided" / "aloeL.jpg")[300:350, 400:464, :3]
    lr = np.stack([g[::2, ::2, i % 3] / np.float32(255) * np.float32(0.5 + 0.5 * np.cos(i))
                   for i in range(31)]).astype(np.float32)
    net = model("mmf").network
    for low, guide in ((lr, g), (lr[:, :, :28], g[:, :61])):  # x2, and x2 by 61/28
        # float64: no rounding to hide behind, so this checks every crop window exactly
        w64 = fuse_guided(low, guide, model("mmf"), device="cpu", tile=0, precision="fp64",
                          exact=True)
        t64 = fuse_guided(low, guide, model("mmf"), device="cpu", tile=24, precision="fp64",
                          exact=True)
        assert np.abs(t64.image - w64.image).max() < 1e-6
        # float32: the fast guided filter's eps = 1e-4 on code variances amplifies rounding.
        # The whole image runs the network's own forward (the authors' cumulative-sum
        # arithmetic, bit for bit); tiles use direct box means, which are closer to float64.
        whole = fuse_guided(low, guide, model("mmf"), device="cpu", tile=0,
                            exact=True).image
        tiled = fuse_guided(low, guide, model("mmf"), device="cpu", tile=24,
                            exact=True).image
        assert np.abs(tiled - w64.image).max() < 1e-4
        err = np.abs(whole - w64.image)
        assert err.max() < 1e-3 and err.mean() < 1e-5  # the authors' own fp32 rounding
        with torch.inference_mode():
            ref = net(torch.from_numpy(np.ascontiguousarray(low))[None],
                      torch.from_numpy(np.moveaxis(guide, -1, 0) / np.float32(255))[None])
        assert np.abs(whole - ref.clamp(0, 1)[0].numpy()).max() < 1e-6
        assert whole.shape == (31, *guide.shape[:2])
