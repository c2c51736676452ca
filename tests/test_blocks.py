"""The DCU and SST against hand-written ISTA arithmetic on small tensors."""

import numpy as np
import pytest
import torch

from napari_cscfusion.models.csc import DCU, CSCEncoder, SoftThreshold


def test_soft_threshold_values():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5]).view(1, 5, 1, 1)
    sst = SoftThreshold(5)
    with torch.no_grad():
        sst.theta.fill_(0.5)
    assert sst(v).flatten().tolist() == pytest.approx([-1.5, 0.0, 0.0, 0.0, 1.0])
    with torch.no_grad():
        sst.theta.fill_(-0.1)  # negative thresholds (in the IVFN/MEFN checkpoints) expand
    assert sst(v).flatten().tolist() == pytest.approx([-2.1, -0.6, 0.0, 0.4, 1.6])
    clamped = SoftThreshold(5, nonnegative=True)
    with torch.no_grad():
        clamped.theta.fill_(-0.1)  # MMFN clamps theta at 0: identity
    assert clamped(v).flatten().tolist() == pytest.approx(v.flatten().tolist())


def _reflect(a, p=1):
    return np.pad(a, ((0, 0), (p, p), (p, p)), mode="reflect")


def _correlate(x, w):
    """Hand-written 'same' cross-correlation with reflection border: x (cin,H,W),
    w (cout,cin,3,3) -> (cout,H,W)."""
    cout, cin = w.shape[:2]
    _, h, wd = x.shape
    xp = _reflect(x)
    out = np.zeros((cout, h, wd))
    for o in range(cout):
        for i in range(cin):
            for dy in range(3):
                for dx in range(3):
                    out[o] += w[o, i, dy, dx] * xp[i, dy:dy + h, dx:dx + wd]
    return out


def _identity_bn(dcu):
    with torch.no_grad():
        dcu.norm.running_mean.zero_()
        dcu.norm.running_var.fill_(1.0 - dcu.norm.eps)
        dcu.norm.weight.fill_(1.0)
        dcu.norm.bias.zero_()


def test_dcu_is_one_ista_step():
    rng = np.random.default_rng(0)
    c, q, h, w = 2, 3, 6, 7
    dcu = DCU(c, q).eval()
    _identity_bn(dcu)
    d = rng.normal(size=(c, q, 3, 3)) * 0.3  # dictionary: codes -> image
    adj = rng.normal(size=(q, c, 3, 3)) * 0.3  # learned adjoint: image -> codes
    theta = np.array([0.05, 0.2, -0.03])
    with torch.no_grad():
        dcu.dictionary.weight.copy_(torch.from_numpy(d))
        dcu.adjoint.weight.copy_(torch.from_numpy(adj))
        dcu.shrink.theta.copy_(torch.from_numpy(theta).view(1, q, 1, 1))
    x = rng.random((c, h, w))
    z = rng.normal(size=(q, h, w))
    v = z + _correlate(x - _correlate(z, d), adj)
    expected = np.sign(v) * np.maximum(np.abs(v) - theta[:, None, None], 0)
    got = dcu(torch.from_numpy(x)[None].float(), torch.from_numpy(z)[None].float())[0]
    np.testing.assert_allclose(got.detach().numpy(), expected, atol=1e-5)
    # z = None means z = 0: the first step is the thresholded adjoint of x
    v0 = _correlate(x, adj)
    expected0 = np.sign(v0) * np.maximum(np.abs(v0) - theta[:, None, None], 0)
    got0 = dcu(torch.from_numpy(x)[None].float(), None)[0]
    np.testing.assert_allclose(got0.detach().numpy(), expected0, atol=1e-5)


def test_encoder_feeds_first_input_only_to_first_unit():
    torch.manual_seed(0)
    enc = CSCEncoder(1, 4, 3).eval()
    x = torch.rand(1, 1, 8, 9)
    first = torch.rand(1, 1, 8, 9)
    z = enc.dcus[0](first, None)
    z = enc.dcus[1](x, z)
    z = enc.dcus[2](x, z)
    torch.testing.assert_close(enc(x, first_input=first), z)
    assert not torch.allclose(enc(x, first_input=first), enc(x))


def test_receptive_radius_bounds_the_influence_of_a_pixel():
    torch.manual_seed(1)
    enc = CSCEncoder(1, 4, 3, stem=True).eval()
    r = enc.receptive_radius
    x = torch.rand(1, 1, 41, 41)
    y = x.clone()
    y[0, 0, 20, 20] += 1.0
    diff = (enc(x) - enc(y)).abs().sum(1)[0] > 0
    rows, cols = torch.nonzero(diff, as_tuple=True)
    assert diff[20, 20]
    assert (rows - 20).abs().max().item() == r
    assert (cols - 20).abs().max().item() == r
