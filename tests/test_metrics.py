"""Tests for napari_cscfusion.metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_cscfusion import metrics as M

from ._shared import SAMPLES, shared_path

# ------------------------------------------------------------------------------------------
# MEF-SSIM
# ------------------------------------------------------------------------------------------


def _mef_ssim_direct(stack, fused, ws=11, sg=0.2, sl=0.2, c1=0.01, c2=0.03):
    """Independent, unoptimised restatement of the reference formula: one 2-D conv with a
    [1, C, ws, ws] Gaussian window divided by C, zero padding, loops over exposures."""
    k, c, h, w = stack.shape
    x = torch.arange(ws, dtype=torch.float64) - ws // 2
    g = torch.exp(-(x**2) / (2 * (ws / 6) ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(1, c, ws, ws) / c

    def conv(t):  # [C,H,W] -> [H,W]
        return F.conv2d(t[None], win, padding=ws // 2)[0, 0]

    mux = conv(fused)
    varx = conv(fused * fused) - mux**2
    mus, vars_, css = [], [], []
    for i in range(k):
        y = stack[i]
        muy = conv(y)
        vary = conv(y * y) - muy**2
        cov = conv(fused * y) - mux * muy
        mus.append(muy)
        vars_.append(vary)
        css.append((2 * cov + c2**2) / (varx + vary + c2**2))
    mus, vars_, css = torch.stack(mus), torch.stack(vars_), torch.stack(css)
    best = vars_.argmax(0)
    cs_map = css.gather(0, best[None])[0]
    lg = torch.exp(-((mus.mean(dim=(1, 2)) - 0.5) ** 2) / (2 * sg**2))[:, None, None]
    ll = torch.exp(-((mus - 0.5) ** 2) / (2 * sl**2))
    wts = lg * ll
    muref = (wts * mus).sum(0) / wts.sum(0)
    l_map = (2 * mux * muref + c1**2) / (mux**2 + muref**2 + c1**2)
    return float(l_map.mean() * cs_map.mean())


def _random_stack(seed=0, k=3, c=3, h=24, w=20):
    rng = np.random.default_rng(seed)
    base = rng.random((c, h, w))
    # exposures: same scene under different gains, clipped
    stack = np.stack([np.clip(base * g, 0, 1) for g in np.linspace(0.4, 1.8, k)])
    fused = np.clip(stack.mean(0) + 0.05 * rng.standard_normal((c, h, w)), 0, 1)
    return torch.from_numpy(stack), torch.from_numpy(fused)


@pytest.mark.parametrize("c", [1, 3])
def test_mef_ssim_torch_matches_direct_formula(c):
    stack, fused = _random_stack(c=c)
    got = float(M.mef_ssim_torch(stack, fused))
    want = _mef_ssim_direct(stack, fused)
    assert got == pytest.approx(want, abs=1e-10)
    assert 0.0 < got < 1.0


def test_mef_ssim_identical_stack_and_fused_is_one():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.random((3, 16, 16)))
    stack = img.expand(4, 3, 16, 16)
    assert float(M.mef_ssim_torch(stack, img)) == pytest.approx(1.0, abs=1e-12)


def test_mef_ssim_prefers_good_fusion_over_a_bad_one():
    stack, fused = _random_stack(seed=2)
    good = float(M.mef_ssim_torch(stack, fused))
    flat = torch.full_like(fused, 0.5)  # no structure at all
    inverted = 1.0 - fused
    assert float(M.mef_ssim_torch(stack, flat)) < good
    assert float(M.mef_ssim_torch(stack, inverted)) < 0.0 < good


def test_mef_ssim_torch_batched_equals_per_sample_and_float32():
    s0, f0 = _random_stack(seed=3)
    s1, f1 = _random_stack(seed=4)
    batch = M.mef_ssim_torch(torch.stack([s0, s1]), torch.stack([f0, f1]))
    assert batch.shape == (2,)
    assert float(batch[0]) == pytest.approx(float(M.mef_ssim_torch(s0, f0)), abs=1e-12)
    assert float(batch[1]) == pytest.approx(float(M.mef_ssim_torch(s1, f1)), abs=1e-12)
    b32 = M.mef_ssim_torch(torch.stack([s0, s1]).float(), torch.stack([f0, f1]).float())
    assert b32.dtype == torch.float32
    assert torch.allclose(b32.double(), batch, atol=1e-5)


def test_mef_ssim_gradient_flows_and_ascent_improves_score():
    stack, fused = _random_stack(seed=5)
    stack, fused = stack.float(), fused.float()
    x = fused.clone().requires_grad_(True)
    loss = -M.mef_ssim_torch(stack, x)
    loss.backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        x2 = x - 0.5 * x.grad / x.grad.abs().max() * 0.05
    assert float(M.mef_ssim_torch(stack, x2)) > float(-loss.detach())


def test_mef_ssim_numpy_wrapper_agrees_with_torch():
    stack, fused = _random_stack(seed=6)
    want = float(M.mef_ssim_torch(stack, fused))
    s_np = np.moveaxis(stack.numpy(), 1, -1)  # (K,H,W,3)
    f_np = np.moveaxis(fused.numpy(), 0, -1)
    assert M.mef_ssim(s_np, f_np) == pytest.approx(want, abs=1e-12)
    # grey path
    sg, fg = _random_stack(seed=7, c=1)
    assert M.mef_ssim(sg[:, 0].numpy(), fg[0].numpy()) == pytest.approx(
        float(M.mef_ssim_torch(sg, fg)), abs=1e-12
    )


def test_mef_ssim_rejects_mismatched_shapes():
    stack, fused = _random_stack()
    with pytest.raises(ValueError):
        M.mef_ssim_torch(stack, fused[:, :-1])
    with pytest.raises(ValueError):
        M.mef_ssim(np.zeros((3, 8, 8)), np.zeros((8, 8, 3)))


# ------------------------------------------------------------------------------------------
# hand-computed values on tiny images
# ------------------------------------------------------------------------------------------

COLS = np.tile([0.0, 1.0, 0.0, 1.0], (4, 1))  # vertical stripes
HALVES = np.repeat([[0.0, 0.0, 1.0, 1.0]], 4, axis=0)  # left half 0, right half 1


def test_entropy_by_hand():
    assert M.entropy(HALVES) == pytest.approx(1.0)
    img = np.array([0.0] * 8 + [0.5] * 4 + [1.0] * 4).reshape(4, 4)
    assert M.entropy(img) == pytest.approx(1.5)  # p = 1/2, 1/4, 1/4
    four = np.array([0, 1 / 3, 2 / 3, 1.0] * 4).reshape(4, 4)
    assert M.entropy(four) == pytest.approx(2.0)
    assert M.entropy(np.full((4, 4), 0.3)) == 0.0
    # 256-bin histogram of round(255 x): values closer than 1/510 share a bin
    assert M.entropy(np.array([[0.5, 0.5 + 1 / 1000], [0.2, 0.2]])) == pytest.approx(1.0)
    # uint8 input is the same as x/255
    assert M.entropy((four * 255).round().astype(np.uint8)) == pytest.approx(2.0)


def test_standard_deviation_by_hand():
    assert M.standard_deviation(HALVES) == pytest.approx(0.5)  # population SD
    assert M.standard_deviation(np.full((3, 3), 0.7)) == pytest.approx(0.0)


def test_spatial_frequency_by_hand():
    # 4 rows x 3 horizontal unit steps, divided by 16 pixels; no vertical change
    assert M.spatial_frequency(COLS) == pytest.approx(np.sqrt(12 / 16))
    assert M.spatial_frequency(COLS.T) == pytest.approx(np.sqrt(12 / 16))
    checker = (np.indices((4, 4)).sum(0) % 2).astype(float)
    assert M.spatial_frequency(checker) == pytest.approx(np.sqrt(24 / 16))
    ramp = np.tile(np.arange(4) / 10.0, (4, 1))
    assert M.spatial_frequency(ramp) == pytest.approx(np.sqrt(12 * 0.01 / 16))


def test_average_gradient_by_hand():
    # every forward difference is 1 horizontally, 0 vertically: sqrt(1/2) at each of 3x3 points
    assert M.average_gradient(COLS) == pytest.approx(np.sqrt(0.5))
    checker = (np.indices((4, 4)).sum(0) % 2).astype(float)
    assert M.average_gradient(checker) == pytest.approx(1.0)
    ramp = np.tile(np.arange(4) / 10.0, (4, 1))
    assert M.average_gradient(ramp) == pytest.approx(0.1 / np.sqrt(2))


def test_mutual_information_by_hand():
    a = HALVES
    assert M.mutual_information([a], a) == pytest.approx(1.0)  # MI(A, A) = H(A)
    assert M.mutual_information([a, a], a) == pytest.approx(2.0)  # summed over sources
    # independent: every (a, f) combination occurs 4 times
    assert M.mutual_information([a], a.T) == pytest.approx(0.0, abs=1e-12)
    # a = 0: f = 0 six times, 1 twice; a = 1: the reverse -> MI = 1 - Hb(1/4)
    a2 = np.array([0.0] * 8 + [1.0] * 8).reshape(4, 4)
    f2 = np.array([0.0] * 6 + [1.0] * 2 + [0.0] * 2 + [1.0] * 6).reshape(4, 4)
    hb = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    assert M.mutual_information([a2], f2) == pytest.approx(1.0 - hb)


def test_scd_by_hand_and_symmetric():
    a = 0.5 + 0.25 * np.tile([1.0, -1.0, 1.0, -1.0], (4, 1))  # orthogonal, zero-mean patterns
    b = 0.5 + 0.25 * np.tile([1.0, -1.0, 1.0, -1.0], (4, 1)).T
    # F = A + B - 0.5: F - B = A - 0.5, F - A = B - 0.5 -> correlations 1 + 1
    assert M.scd([a, b], a + b - 0.5) == pytest.approx(2.0)
    # F = A: r(A - B, A) = 1/sqrt(2), r(0, B) = 0 (constant)
    assert M.scd([a, b], a) == pytest.approx(1 / np.sqrt(2))
    rng = np.random.default_rng(0)
    x, y, f = rng.random((3, 16, 16))
    assert M.scd([x, y], f) == pytest.approx(M.scd([y, x], f), abs=1e-12)
    with pytest.raises(ValueError):
        M.scd([x], f)


def test_qabf_by_hand():
    qa1 = 0.9879 / (1 + np.exp(-22 * (1 - 0.8)))
    qmax = 0.9994 / (1 + np.exp(-15 * (1 - 0.5))) * qa1
    assert M.QABF_MAX == pytest.approx(qmax)
    assert 0.974 < qmax < 0.975  # the published constants do not reach 1
    rng = np.random.default_rng(1)
    a = rng.random((12, 12))
    # perfect transfer (F = A = B): G = A = 1 wherever there is an edge
    assert M.qabf([a, a], a) == pytest.approx(qmax, abs=1e-12)
    assert M.qabf([a], a) == pytest.approx(qmax, abs=1e-12)
    # halved contrast: G = 1/2 everywhere, orientation unchanged -> Qg = Gamma_g / 2
    assert M.qabf([a], 0.5 * a) == pytest.approx(0.9994 / 2 * qa1, abs=1e-12)
    # a black fused image transfers no edges at all (G = 0: Qg = Gamma_g / (1 + e^7.5))
    assert M.qabf([a], np.zeros_like(a)) < 1e-3
    # zero padding ('same', as MATLAB conv2): a constant grey has edges at its border only
    assert 0.01 < M.qabf([a], np.full_like(a, 0.5)) < M.qabf([a], 0.5 * a)


def test_qabf_is_a_strength_weighted_mean_over_sources():
    rng = np.random.default_rng(2)
    a, b, f = rng.random((3, 20, 20))
    b = 0.3 * b  # weaker edges in b
    both = M.qabf([a, b], f)
    qa, qb = M.qabf([a], f), M.qabf([b], f)
    assert min(qa, qb) < both < max(qa, qb)
    assert M.qabf([b, a], f) == pytest.approx(both, abs=1e-12)


def test_vif_identity_stretch_noise_and_sum():
    rng = np.random.default_rng(3)
    from scipy.ndimage import gaussian_filter

    z = gaussian_filter(rng.random((64, 64)), 1.5) - 0.5
    s = 0.5 + 0.35 * z / np.abs(z).max()  # smooth texture in [0.15, 0.85]
    assert M.vif([s], s) == pytest.approx(1.0, abs=1e-8)
    stretched = 0.5 + 1.2 * (s - 0.5)  # contrast enhancement without clipping
    assert stretched.min() >= 0 and stretched.max() <= 1
    assert M.vif([s], stretched) > 1.0
    noisy = np.clip(s + 0.05 * rng.standard_normal(s.shape), 0, 1)
    assert 0.0 < M.vif([s], noisy) < 0.9
    other = rng.random((64, 64))
    assert M.vif([s, other], noisy) == pytest.approx(M.vif([s], noisy) + M.vif([other], noisy))
    with pytest.raises(ValueError):
        M.vif([s[:20, :20]], s[:20, :20])


def test_ssim_fusion_and_psnr():
    rng = np.random.default_rng(4)
    a = rng.random((32, 32))
    assert M.ssim_fusion([a, a], a) == pytest.approx(1.0)
    noisy = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    s1 = M.ssim_fusion([a], noisy)
    assert 0.0 < s1 < 1.0
    # mean over sources: adding an identical source does not change it
    assert M.ssim_fusion([a, noisy], noisy) == pytest.approx((s1 + 1.0) / 2)
    # data_range is 1: uint8 input gives the same as x/255
    a8 = (a * 255).round().astype(np.uint8)
    assert M.ssim_fusion([a8], noisy) == pytest.approx(M.ssim_fusion([a8 / 255.0], noisy))
    assert M.psnr(np.zeros((4, 4)), np.full((4, 4), 0.1)) == pytest.approx(20.0)


def test_evaluate_sets():
    rng = np.random.default_rng(5)
    a, b = rng.random((2, 48, 48))
    f = (a + b) / 2
    r = M.evaluate("ivf", [a, b], f)
    assert tuple(r) == M.IVF_METRICS
    assert r["MI"] == pytest.approx(M.mutual_information([a, b], f))
    assert r["Qabf"] == pytest.approx(M.qabf([a, b], f))
    assert set(M.evaluate("medical", [a, b], f)) == set(M.IVF_METRICS)
    st = rng.random((3, 48, 48, 3))
    r2 = M.evaluate("mef", st, st.mean(0))
    assert tuple(r2) == M.MEF_METRICS
    assert r2["MEF-SSIM"] == pytest.approx(M.mef_ssim(st, st.mean(0)))
    with pytest.raises(ValueError):
        M.evaluate("nope", [a, b], f)


def test_metrics_module_is_engine_layer():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(M))
    names = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    names |= {
        (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    assert not names & {"napari", "qtpy", "PyQt5", "PyQt6", "magicgui"}


# ------------------------------------------------------------------------------------------
# real data (skipped when the shared data is absent; tests/_shared.py finds it)
# ------------------------------------------------------------------------------------------



def _load_grey(path: Path) -> np.ndarray:
    from skimage.io import imread

    a = imread(path)
    if a.ndim == 3:
        a = a[..., 0]
    return a.astype(np.float64) / 255.0


@pytest.fixture(scope="module", params=["sample 1", "shared 5"])
def tno_pair(request):
    """TNO pair 1 (ships as sample data) and pair 5 (shared data)."""
    if request.param == "sample 1":
        return _load_grey(SAMPLES / "tno_01_ir.png"), _load_grey(SAMPLES / "tno_01_vis.png")
    return (_load_grey(shared_path("data/ivf/tno/IR5.png")),
            _load_grey(shared_path("data/ivf/tno/VIS5.png")))


def test_real_tno_pair_metric_orderings(tno_pair):
    from napari_cscfusion.baselines import average_fusion, laplacian_pyramid_fusion

    ir, vis = tno_pair
    avg = average_fusion([ir, vis])
    lap = laplacian_pyramid_fusion([ir, vis])
    q = {n: M.qabf([ir, vis], f) for n, f in [("avg", avg), ("lap", lap), ("ir", ir), ("vis", vis)]}
    # averaging halves every edge that only one source has: it transfers fewer edges than the
    # max-abs Laplacian pyramid and fewer than the better source by itself
    assert q["avg"] < q["lap"]
    assert q["avg"] < max(q["ir"], q["vis"])
    # SCD rewards complementary information: a fusion beats either source alone
    s_avg = M.scd([ir, vis], avg)
    assert s_avg > M.scd([ir, vis], ir) and s_avg > M.scd([ir, vis], vis)
    # a source used as the fused image carries itself exactly: its own VIFp term is 1
    assert M.vif([ir, vis], ir) > 1.0 > M.vif([ir, vis], avg)
    # MI of a source with itself is its entropy
    assert M.mutual_information([ir], ir) == pytest.approx(M.entropy(ir))


@pytest.mark.slow
def test_real_memorial_mef_ssim_orderings():
    files = sorted(shared_path("data/mef/memorial").glob("memorial_*.png"))
    assert len(files) == 16, files
    from skimage.io import imread

    from napari_cscfusion.baselines import mertens_fusion

    pytest.importorskip("cv2")
    stack = np.stack([imread(f)[..., :3] for f in files]).astype(np.float64) / 255.0
    mer = M.mef_ssim(stack, mertens_fusion(stack))
    singles = [M.mef_ssim(stack, s) for s in stack]
    assert mer > max(singles)  # fusion beats the best single exposure
    assert mer > M.mef_ssim(stack, stack.mean(0)) + 0.3  # the naive mean loses structure
