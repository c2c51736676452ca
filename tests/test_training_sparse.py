"""Training options for the second-generation weights (issue 17): thresholds projected at >= 0,
the L1 sparsity term, the IVF black term, the threshold warm start, the sparsity floor for the
best epoch, training crops with black borders / clipped highlights, the flat-fidelity term,
the edge and tone terms and brightened crops. Tiny networks, a couple of steps (seconds)."""

from __future__ import annotations

import csv
import dataclasses
import importlib

import numpy as np
import pytest
import torch

from napari_cscfusion.models import load_network, save_checkpoint
from napari_cscfusion.models.csc import SoftThreshold
from napari_cscfusion.training import data as D
from napari_cscfusion.training.losses import (
    BLACK_LEVEL,
    FLAT_LEVELS,
    code_l1,
    halo_term,
    ivf_black_term,
    ivf_flat_term,
    ivf_loss,
    ivf_tone_term,
)
from napari_cscfusion.training.train import build, compute_loss, train

ROOT = D.default_data_root()
pytestmark = pytest.mark.skipif(not (ROOT / "ivf" / "flir_train").is_dir()
                                or not (ROOT / "mef" / "hdr").is_dir(),
                                reason=f"training data not found under {ROOT}")
TINY_HP = {"ivf": {"code_channels": 8, "num_dcus": 2}, "mef": None}


def _train(task, out, **kw):
    args = {"epochs": 1, "lr": 1e-3, "seed": 0, "progress": False, "steps_per_epoch": 2,
            "hparams": TINY_HP[task], "val_items": 2, "device": "cpu", "crop": 24,
            "batch_size": 2, **kw}
    return train(task, out, **args)


def _thetas(net):
    return torch.cat([m.theta.detach().flatten() for m in net.modules()
                      if isinstance(m, SoftThreshold)])


def _negative_start(task, path):
    """A tiny network of ``task`` whose soft thresholds are all negative, saved to ``path``."""
    torch.manual_seed(0)
    net = build(task, TINY_HP[task])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, SoftThreshold):
                m.theta.fill_(-0.05)
    save_checkpoint(net, path, task)
    return path


@pytest.mark.parametrize("task", ["ivf", "mef"])
def test_thresholds_are_projected_at_start_and_after_every_step(task, tmp_path):
    start = _negative_start(task, tmp_path / "start.pt")
    free = _train(task, tmp_path / "free.pt", init_weights=start, lr=1e-4)
    assert (_thetas(load_network(task, free)[0]) < 0).all()  # unconstrained: still negative
    out = _train(task, tmp_path / "nn.pt", init_weights=start, lr=1e-2,
                 nonnegative_thresholds=True)
    net, info = load_network(task, out)
    assert (_thetas(net) >= 0).all()
    n = _thetas(net).numel()
    assert info["header"]["training"]["thresholds"].startswith(
        f"nonnegative: clamped at 0 at the start ({n} negative values)")
    rows = list(csv.DictReader(open(tmp_path / "nn.log.csv")))
    assert 0.0 <= float(rows[0]["val_sparsity"]) <= 1.0


def test_zero_epochs_writes_the_projected_start_without_a_step(tmp_path):
    start = _negative_start("ivf", tmp_path / "start.pt")
    out = _train("ivf", tmp_path / "p.pt", init_weights=start, epochs=0,
                 nonnegative_thresholds=True)
    before, after = load_network("ivf", start)[0], load_network("ivf", out)[0]
    for (k, a), b in zip(before.state_dict().items(), after.state_dict().values(), strict=True):
        expected = a.clamp(min=0) if k.endswith("theta") else a
        assert torch.equal(expected, b), k
    assert (tmp_path / "p.best.pt").is_file()
    with pytest.raises(ValueError, match="epochs"):
        _train("ivf", tmp_path / "q.pt", epochs=0)


def test_sparsity_and_black_terms_are_added_to_the_ivf_loss():
    torch.manual_seed(0)
    net = build("ivf", TINY_HP["ivf"]).eval()
    x = torch.rand(2, 1, 24, 24)
    z_b, z_d = net.encode(x)
    plain = ivf_loss(net.decode(z_b, z_d), x)
    assert torch.allclose(compute_loss("ivf", net, {"image": x}), plain)
    with_l1 = compute_loss("ivf", net, {"image": x}, sparsity_weight=0.5)
    assert torch.allclose(with_l1, plain + 0.5 * code_l1(z_d))
    assert code_l1(z_d) > 0
    with_black = compute_loss("ivf", net, {"image": x}, black_weight=2.0)
    assert torch.allclose(with_black, plain + 2.0 * ivf_black_term(net))
    recon = net.decode(z_b, z_d)
    with_edges = compute_loss("ivf", net, {"image": x}, edge_weight=3.0)
    assert torch.allclose(with_edges, plain + 3.0 * halo_term(recon - x))
    assert float(halo_term(recon - x)) > 0


def test_edge_term_sees_lost_edges_not_a_tone_shift(tmp_path):
    x = torch.zeros(1, 1, 16, 16)
    x[..., 8:] = 1.0  # one vertical edge
    assert float(halo_term((x + 0.1) - x)) == pytest.approx(0.0, abs=1e-7)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1,
                                             count_include_pad=False)
    # the error is +1/3, -1/3 on the two columns at the edge: its differences 1/3, 2/3, 1/3
    # per row, over 15 column differences (vertical ones are 0)
    assert float(halo_term(blurred - x)) == pytest.approx((4 / 3) / 15, rel=1e-5)
    out = _train("ivf", tmp_path / "g.pt", edge_weight=0.5)
    tr = load_network("ivf", out)[1]["header"]["training"]
    assert tr["edge_weight"] == 0.5 and "grad" in tr["edge_term"]
    with pytest.raises(ValueError, match="edge_weight"):
        _train("mef", "unused.pt", edge_weight=0.1)


def test_tone_term_sees_a_tone_shift_not_lost_edges(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32)
    # a tone shift: the local means of the error are the shift itself, everywhere
    assert float(ivf_tone_term(x - 0.02, x)) == pytest.approx(0.02, rel=1e-4)
    # fine texture lost (a checkerboard of +-0.1 added): its local means are ~0 (sigma 3 px)
    checker = 0.1 * (1 - 2 * ((torch.arange(32)[:, None] + torch.arange(32)) % 2)).float()
    assert float(ivf_tone_term(x + checker, x)) < 0.002
    assert float(halo_term(checker)) > 0.3  # the edge term sees it instead
    net = build("ivf", TINY_HP["ivf"]).eval()
    z_b, z_d = net.encode(x)
    recon = net.decode(z_b, z_d)
    with_tone = compute_loss("ivf", net, {"image": x}, tone_weight=2.0)
    assert torch.allclose(with_tone, ivf_loss(recon, x) + 2.0 * ivf_tone_term(recon, x))
    out = _train("ivf", tmp_path / "t.pt", tone_weight=0.5)
    tr = load_network("ivf", out)[1]["header"]["training"]
    assert tr["tone_weight"] == 0.5 and "blur" in tr["tone_term"]
    with pytest.raises(ValueError, match="tone_weight"):
        _train("mef", "unused.pt", tone_weight=0.1)


def test_black_term_is_zero_exactly_when_black_decodes_below_the_level():
    torch.manual_seed(0)
    net = build("ivf", TINY_HP["ivf"]).eval()
    last_bn = net.decoder.layers[-1]
    with torch.no_grad():
        net.decoder.layers[-4].weight.zero_()  # the last convolution: the decoder is constant
        last_bn.bias.fill_(-20.0)
    assert float(ivf_black_term(net).detach()) == 0.0
    black = torch.zeros(1, 1, 24, 24)
    assert float(net(black).max()) <= BLACK_LEVEL
    with torch.no_grad():
        last_bn.bias.fill_(0.0)  # black decodes to sigmoid(0) = 0.5 at every gain
    assert float(ivf_black_term(net).detach()) > 5.0


def test_black_target_moves_the_hinge_from_the_command_line_to_the_loss_and_header(
        tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = build("ivf", TINY_HP["ivf"]).eval()
    black = float(torch.logit(torch.tensor(0.3 / 255, dtype=torch.float64)))
    _constant_decoder(net, black)  # black decodes to 0.3/255 at every gain
    assert float(ivf_black_term(net).detach()) == 0.0  # default hinge 0.5/255: below it
    low = float(torch.logit(torch.tensor(0.1 / 255, dtype=torch.float64)))
    assert float(ivf_black_term(net, level=0.1 / 255).detach()) == pytest.approx(
        black - low, rel=1e-4)  # the mean hinge in logits, the same at gains 1, 2, 4
    x = torch.rand(2, 1, 24, 24)
    plain = compute_loss("ivf", net, {"image": x})
    lowered = compute_loss("ivf", net, {"image": x}, black_weight=2.0, black_target=0.1 / 255)
    assert float(lowered - plain) == pytest.approx(2.0 * (black - low), rel=1e-4)

    # cscfusion train ivf --black-target 0.1 (grey levels): the run's black term and header
    from napari_cscfusion.training import cli

    T = importlib.import_module("napari_cscfusion.training.train")  # the module, not train()

    levels = []
    real_term, real_train = T.ivf_black_term, T.train
    monkeypatch.setattr(T, "ivf_black_term",
                        lambda n, **kw: levels.append(kw.get("level")) or real_term(n, **kw))
    monkeypatch.setattr(T, "train", lambda config: real_train(dataclasses.replace(
        config, hparams=TINY_HP["ivf"], val_items=2, device="cpu")))
    out = tmp_path / "b.pt"
    argv = ["train", "ivf", "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "2", "--crop", "24", "--black-weight", "0.1", "--no-progress"]
    assert cli.main([*argv, "--black-target", "0.1"]) == 0
    assert levels == [0.1 / 255] * 2
    tr = load_network("ivf", out)[1]["header"]["training"]
    assert tr["black_target"] == 0.1 / 255 and "at most 0.1/255" in tr["black_term"]
    levels.clear()
    assert cli.main(argv) == 0  # the default: today's 0.5/255
    assert levels == [BLACK_LEVEL] * 2
    tr = load_network("ivf", out)[1]["header"]["training"]
    assert tr["black_target"] == BLACK_LEVEL and "at most 0.5/255" in tr["black_term"]
    with pytest.raises(SystemExit, match="black-target"):
        cli.main(["train", "mef", "--out", str(out), "--black-target", "0.1"])
    with pytest.raises(ValueError, match="black_target"):
        _train("ivf", tmp_path / "x.pt", black_target=1.5)


@pytest.mark.parametrize("task", ["ivf", "mef"])
def test_mef_and_ivf_sparsity_term_reaches_the_codes(task):
    torch.manual_seed(0)
    net = build(task, TINY_HP[task]).eval()
    batch = D.make_source(task, ROOT, crop=24, batch_size=2, seed=0).batch(0, 0)
    batch.pop("scale", None)
    plain = compute_loss(task, net, batch)
    sparse = compute_loss(task, net, batch, sparsity_weight=1.0)
    assert float(sparse) > float(plain)
    grad = torch.autograd.grad(sparse - plain, net.encoder.dcus[-1].shrink.theta
                               if task == "mef" else net.detail.dcus[-1].shrink.theta)[0]
    assert (grad <= 0).all() and (grad < 0).any()  # a higher threshold shrinks the codes


def test_warm_start_and_sparsity_floor(tmp_path):
    start = _negative_start("ivf", tmp_path / "start.pt")
    out = _train("ivf", tmp_path / "w.pt", init_weights=start, epochs=0,
                 nonnegative_thresholds=True, threshold_warm_start=0.9)
    tr = load_network("ivf", out)[1]["header"]["training"]
    assert tr["threshold_warm_start"] == 0.9 and tr["val_sparsity"] > 0.6
    # no epoch reaches a sparsity of 1: no best file, the latest still written
    out = _train("ivf", tmp_path / "f.pt", init_weights=start, nonnegative_thresholds=True,
                 min_val_sparsity=1.0)
    assert out.is_file() and not (tmp_path / "f.best.pt").exists()


def test_extremes_put_black_borders_masks_clipped_and_flat_crops_in_the_batches():
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).uniform(0.1, 0.9, (48, 48)).astype(np.float32)
    kinds = set()
    for _ in range(60):
        out = D.add_extremes(img, rng)
        assert out.shape == img.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        if np.ptp(out) == 0:
            kinds.add("flat")
        elif (out == 1.0).any():
            kinds.add("clip")
        elif (out == 0.0).any():
            kinds.add("black")
    assert kinds == {"flat", "clip", "black"}
    assert np.array_equal(img, np.random.default_rng(1).uniform(0.1, 0.9, (48, 48))
                          .astype(np.float32))  # input not modified
    plain = D.IVFCrops(ROOT, crop=32, batch_size=8, seed=3).batch(0, 0)["image"]
    same = D.IVFCrops(ROOT, crop=32, batch_size=8, seed=3, extremes=0.0).batch(0, 0)["image"]
    assert torch.equal(plain, same)
    src = D.IVFCrops(ROOT, crop=32, batch_size=8, seed=3, extremes=1.0)
    extreme = src.batch(0, 0)["image"]
    assert not torch.equal(plain, extreme) and "extremes" in src.describe()["augment"]
    with pytest.raises(ValueError, match="extremes"):
        D.IVFCrops(ROOT, crop=32, batch_size=8, extremes=1.5)


def test_threshold_floor_keeps_the_codes_sparse_while_training(tmp_path):
    start = _negative_start("ivf", tmp_path / "start.pt")
    out = _train("ivf", tmp_path / "fl.pt", init_weights=start, nonnegative_thresholds=True,
                 threshold_floor=0.9, lr=1e-2, epochs=2)
    tr = load_network("ivf", out)[1]["header"]["training"]
    free = _train("ivf", tmp_path / "free.pt", init_weights=start, nonnegative_thresholds=True,
                  lr=1e-2, epochs=2)
    assert tr["threshold_floor"] == 0.9 and tr["val_sparsity"] > 0.6
    assert load_network("ivf", free)[1]["header"]["training"]["val_sparsity"] < 0.5


def _constant_decoder(net, logit: float):
    """Make ``net`` decode every input to sigmoid(logit) (the last convolution zeroed)."""
    with torch.no_grad():
        net.decoder.layers[-4].weight.zero_()
        net.decoder.layers[-1].bias.fill_(logit / 2)  # dec(z) + dec(0): the bias counts twice


def test_flat_term_measures_flat_levels_in_logits_and_white_below_white():
    torch.manual_seed(0)
    net = build("ivf", TINY_HP["ivf"]).eval()
    _constant_decoder(net, 0.0)  # every flat level decodes to 0.5
    targets = torch.logit(torch.tensor(FLAT_LEVELS))
    white = float(torch.logit(torch.tensor(1 - BLACK_LEVEL, dtype=torch.float64)))
    expected = float((targets ** 2).mean()) + white
    assert float(ivf_flat_term(net).detach()) == pytest.approx(expected, rel=1e-5)
    _constant_decoder(net, 20.0)  # white is white: only the levels' errors remain
    assert float(ivf_flat_term(net).detach()) == pytest.approx(
        float(((targets - 20.0) ** 2).mean()), rel=1e-5)
    x = torch.rand(2, 1, 24, 24)
    plain = compute_loss("ivf", net, {"image": x})
    with_flat = compute_loss("ivf", net, {"image": x}, flat_weight=0.5)
    assert torch.allclose(with_flat, plain + 0.5 * ivf_flat_term(net))
    with pytest.raises(ValueError, match="flat_weight"):
        _train("mef", "unused.pt", flat_weight=0.1)


def test_photometric_crops_are_brighter_and_clipped_and_off_by_default(tmp_path):
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).uniform(0.0, 0.9, (48, 48)).astype(np.float32)
    outs = [D.add_photometric(img, rng) for _ in range(40)]
    for out in outs:
        assert out.shape == img.shape and out.dtype == np.float32
        assert (out >= img - 1e-6).all() and out.max() <= 1.0  # gamma <= 1, gain >= 1
    assert np.mean([(o > 0.8).mean() for o in outs]) > 2 * (img > 0.8).mean()
    assert any((o == 1.0).mean() > 0.05 for o in outs)
    plain = D.IVFCrops(ROOT, crop=32, batch_size=8, seed=3, extremes=0.3).batch(0, 0)["image"]
    same = D.IVFCrops(ROOT, crop=32, batch_size=8, seed=3, extremes=0.3,
                      photometric=0.0).batch(0, 0)["image"]
    assert torch.equal(plain, same)  # runs without it keep their batches
    src = D.IVFCrops(ROOT, crop=32, batch_size=8, seed=3, photometric=1.0)
    bright = src.batch(0, 0)["image"]
    assert float((bright > 0.8).float().mean()) > float((plain > 0.8).float().mean())
    assert "photometric" in src.describe()["augment"]
    with pytest.raises(ValueError, match="photometric"):
        D.IVFCrops(ROOT, crop=32, batch_size=8, photometric=-0.1)
    out = _train("ivf", tmp_path / "k.pt", epochs=2, flat_weight=0.1, keep_epochs=True,
                 source_options={"photometric": 0.5})
    tr = load_network("ivf", out)[1]["header"]["training"]
    assert tr["flat_weight"] == 0.1 and "photometric" in tr["augment"]
    e1, e2 = (load_network("ivf", tmp_path / f"k.e{n}.pt")[0].state_dict() for n in (1, 2))
    last = load_network("ivf", out)[0].state_dict()
    assert all(torch.equal(e2[k], last[k]) for k in last)
    assert not all(torch.equal(e1[k], last[k]) for k in last)
