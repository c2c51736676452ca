"""Tests for napari_cscfusion.metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_cscfusion import metrics as M

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
