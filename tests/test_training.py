"""Training engine: data from the real training sets, checkpoints, resume, determinism, losses.

Everything runs on tiny crops for a couple of steps (the whole file takes well under a minute).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from napari_cscfusion.models import load_network
from napari_cscfusion.training import data as D
from napari_cscfusion.training.train import build, compute_loss, train

from ._shared import DATA, missing

ROOT = DATA
needs_data = pytest.mark.skipif(not (ROOT / "ivf" / "flir_train").is_dir()
                                or not (ROOT / "mef" / "hdr").is_dir(),
                                reason=missing("data/ivf/flir_train", "data/mef/hdr"))
pytestmark = needs_data


@pytest.fixture(autouse=True)
def _training_data_root(monkeypatch):
    """The training code reads $CSCFUSION_DATA_ROOT, else ../shared/data: point it at the
    tests' data root (tests/_shared.py: $CSCFUSION_SHARED honoured)."""
    monkeypatch.setenv(D.DATA_ENV, str(ROOT))

TINY = {"ivf": {"crop": 24, "batch_size": 2}, "mef": {"crop": 24, "batch_size": 2},
        "mmf": {"crop": 24, "batch_size": 2}}
TINY_HP = {"ivf": {"code_channels": 8, "num_dcus": 2}, "mef": None,
           "mmf": {"code_channels": 8, "num_dcus": 1}}


def _train(task, out, **kw):
    args = {"epochs": 1, "lr": 1e-3, "seed": 0, "progress": False, "steps_per_epoch": 2,
            "hparams": TINY_HP[task], "val_items": 2, "device": "cpu", **TINY[task], **kw}
    return train(task, out, **args)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", D.TASKS)
def test_short_run_writes_loadable_checkpoint(task, tmp_path):
    out = _train(task, tmp_path / f"{task}.pt")
    net, info = load_network(task, out)
    assert info["format"] == "napari-cscfusion"
    hdr = info["header"]
    assert hdr["task"] == task
    tr = hdr["training"]
    assert tr["seed"] == 0 and tr["crop"] == 24 and tr["epochs"] == 1
    assert tr["steps_per_epoch"] == 2 and tr["loss"]
    assert ("mef/hdr" if task == "mef" else "flir_train") in tr["data"]
    if task == "mef":
        assert D.HELD_OUT_HDR in tr["held_out"] and f"'{D.HELD_OUT_HDR}'" not in tr["data"]
    assert np.isfinite(tr["val_score"])
    if TINY_HP[task]:
        for k, v in TINY_HP[task].items():
            assert info["hparams"][k] == v
    assert (tmp_path / f"{task}.best.pt").is_file()
    assert (tmp_path / f"{task}.state.pt").is_file()
    rows = list(csv.DictReader(open(tmp_path / f"{task}.log.csv")))
    assert len(rows) == 1 and float(rows[0]["steps"]) == 2
    assert np.isfinite(float(rows[0]["train_loss"]))


def test_resume_continues_and_matches_uninterrupted_run(tmp_path):
    full = _train("mmf", tmp_path / "full.pt", epochs=2, validate=False)
    # max_minutes=0 stops after the first step
    part = _train("mmf", tmp_path / "part.pt", epochs=2, max_minutes=0.0, validate=False)
    state = torch.load(tmp_path / "part.state.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 1)
    assert not _same(_state(full), _state(part))
    _train("mmf", part, epochs=2, resume=True, validate=False)
    assert _same(_state(full), _state(part))
    tr = load_network("mmf", part)[1]["header"]["training"]
    assert tr["epochs"] == 2
    rows = list(csv.DictReader(open(tmp_path / "part.log.csv")))
    assert [float(r["epoch"]) for r in rows] == [0.5, 1.0, 2.0]


def test_seed_makes_runs_identical(tmp_path):
    a = _train("ivf", tmp_path / "a.pt", validate=False)
    b = _train("ivf", tmp_path / "b.pt", validate=False)
    c = _train("ivf", tmp_path / "c.pt", validate=False, seed=1)
    assert _same(_state(a), _state(b))
    assert not _same(_state(a), _state(c))


def test_batches_are_deterministic_and_sane():
    for task in D.TASKS:
        src = D.make_source(task, crop=48, batch_size=3, seed=5)
        b1, b2 = src.batch(1, 2), src.batch(1, 2)
        assert all(torch.equal(b1[k], b2[k]) for k in b1)
        assert not torch.equal(next(iter(b1.values())), next(iter(src.batch(1, 3).values())))
        for v in b1.values():
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
    mmf = D.make_source("mmf", crop=48, batch_size=2, seed=0)
    aligned = D.MMFPairs(crop=48, batch_size=2, seed=0, lr_input="align")
    for step in range(6):
        b, b_al = mmf.batch(0, step), aligned.batch(0, step)
        s = float(b["scale"])
        assert 2.0 <= s <= 4.0
        assert b["target"].shape[-1] == 48 and b_al["lr"].shape[-1] == round(48 / s)
        assert b["lr"].shape == b["guide"].shape == b["target"].shape  # bicubic pre-upsampled
        assert torch.equal(b["target"], b_al["target"])
    mef = D.make_source("mef", crop=32, batch_size=2, seed=0)
    ks = {mef.batch(0, s)["stack"].shape[1] for s in range(12)}
    assert ks <= set(range(D.MEF_COUNTS[0], D.MEF_COUNTS[1] + 1)) and len(ks) > 3
    assert mef.batch(0, 0, count=16)["stack"].shape[1] == 16  # validation fixes K
    short = D.make_source("mef", crop=32, batch_size=2, seed=0, counts=(2, 3))
    assert {short.batch(0, s)["stack"].shape[1] for s in range(8)} <= {2, 3}
    with pytest.raises(ValueError):
        D.MEFBrackets(crop=32, counts=(1, 4))


def test_bracket_exposure_values():
    rng = np.random.default_rng(0)
    for k in (2, 5, 16):
        for _ in range(20):
            evs = np.array(D.random_evs(rng, k, D.MEF_SPACING))
            steps = np.diff(evs)
            assert np.allclose(steps, steps[0]) and D.MEF_SPACING[0] - 1e-9 <= steps[0]
            assert steps[0] <= D.MEF_SPACING[1] + 1e-9 and evs[-1] - evs[0] <= D.MEF_MAX_SPAN + 1e-9
    # covering brackets: the darkest exposure keeps the highlights, the brightest the shadows
    lum = np.geomspace(1e-3, 50.0, 4096).astype(np.float32)  # ~15.6 EV of scene range
    lo, hi = np.percentile(lum, [1.0, 99.9])
    for k in (9, 16):
        evs = np.array(D.covering_evs(np.random.default_rng(k), k, lum))
        assert hi * 2.0 ** evs[0] < 2.0 and lo * 2.0 ** evs[-1] > 0.18 / 2.0
        assert np.all(np.diff(evs) > 0) and evs[-1] - evs[0] <= D.MEF_MAX_SPAN + 1e-9
    evs = np.array(D.covering_evs(np.random.default_rng(0), 4, lum))  # too few to cover it:
    assert np.allclose(np.diff(evs), D.MEF_SPACING[1])  # widest spacing, centred on the range
    assert abs(evs.mean() - 0.5 * (np.log2(0.18 / lo) - np.log2(hi))) <= 1.0 + 1e-9


def test_align_lr_for_mmfn_undoes_the_align_corners_shift():
    import torch.nn.functional as F

    ramp = np.tile(np.linspace(0.1, 0.9, 96, dtype=np.float32), (64, 1))
    for scale in (2, 3, 4):
        lr = D.area_downsample(ramp, scale)

        def up(a):
            t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
            return F.interpolate(t, size=ramp.shape, mode="bilinear", align_corners=True)[0, 0]

        err_raw = (up(lr) - torch.from_numpy(ramp)).abs().max()
        err_aligned = (up(D.align_lr_for_mmfn(lr, ramp.shape)) - torch.from_numpy(ramp)).abs()
        assert err_raw > 2e-3 * scale  # the shift is real
        assert err_aligned[:, 4 * scale:-4 * scale].max() < min(2e-3, 0.3 * err_raw)
    up = D.prepare_mmf_lr(D.area_downsample(ramp, 2), ramp.shape, "bicubic")
    assert up.shape == ramp.shape
    with pytest.raises(ValueError):
        D.prepare_mmf_lr(ramp, ramp.shape, "nearest")


def test_splits_keep_validation_apart():
    train_pairs, val_pairs = D.flir_pairs(split="train"), D.flir_pairs(split="val")
    assert not {a for a, _ in train_pairs} & {a for a, _ in val_pairs}
    assert len(train_pairs) + len(val_pairs) == len(D.flir_pairs(split="all"))
    assert all(p.stem != D.HELD_OUT_HDR for p in D.hdr_scenes())
    assert (ROOT / "mef" / "hdr" / f"{D.HELD_OUT_HDR}.exr").is_file()


def _hdr():
    try:
        return D.read_hdr(D.hdr_scenes()[0])
    except ImportError as exc:
        pytest.skip(str(exc))


def test_simulate_bracket_monotone_from_real_hdr():
    hdr = _hdr()
    assert hdr.ndim == 3 and hdr.shape[2] == 3 and hdr.dtype == np.float32
    assert hdr.max() > 1.0  # a real radiance map, not an LDR image
    patch = hdr[::4, ::4] * (0.18 / np.median(hdr))
    evs = [-3.0, -1.0, 1.0, 3.0]
    clean = D.simulate_bracket(patch, evs, shot_noise=0, read_noise=0)
    assert clean.shape == (4, *patch.shape) and clean.min() >= 0 and clean.max() <= 1
    assert np.all(np.diff(clean, axis=0) >= 0)  # every pixel brightens with exposure
    assert np.allclose(clean * 255, np.round(clean * 255), atol=1e-4)  # 8-bit levels
    lifted = D.simulate_bracket(patch, evs, shot_noise=0, read_noise=0, black=0.06)
    assert lifted.min() >= 0.06 - 1 / 255 and lifted.max() <= 1  # black level: no true black
    assert np.abs(lifted - (0.06 + 0.94 * clean)).max() <= 1 / 255 + 1e-6
    noisy = D.simulate_bracket(patch, evs, np.random.default_rng(0), gamma=2.4, contrast=0.3)
    means = noisy.mean(axis=(1, 2, 3))
    assert np.all(np.diff(means) > 0.02)
    assert (noisy[-1] >= 1.0).mean() > (noisy[0] >= 1.0).mean()  # more clipping when brighter


@pytest.mark.parametrize("task", D.TASKS)
def test_loss_decreases_on_a_fixed_batch(task):
    torch.manual_seed(0)
    net = build(task, TINY_HP[task]).train()
    batch = D.make_source(task, crop=24, batch_size=2, seed=0).batch(0, 0)
    batch.pop("scale", None)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = compute_loss(task, net, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_init_weights_fine_tunes_from_our_file(tmp_path):
    first = _train("mef", tmp_path / "a.pt", validate=False)
    out = _train("mef", tmp_path / "b.pt", init_weights=first, hparams=None,
                 validate=False)
    tr = load_network("mef", out)[1]["header"]["training"]
    assert tr["init_weights"]["path"] == str(first)
    assert tr["init_weights"]["training"]["seed"] == 0  # the parent's whole training record
    assert tr["init_weights"]["training"]["steps_per_epoch"] == 2


def test_cli_parser_registers_train(tmp_path):
    import argparse

    from napari_cscfusion.training.cli import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "mef", "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                              "--batch-size", "2", "--crop", "24", "--lr", "1e-3",
                              "--steps-per-epoch", "1", "--seed", "3", "--device", "cpu",
                              "--max-minutes", "5", "--no-progress", "--counts", "3", "4",
                              "--spacing", "1", "2", "--black-level", "0", "0.05",
                              "--cover-prob", "0.25"])
    assert args.task == "mef" and args.epochs == 1 and args.seed == 3
    assert args.func(args) == 0
    tr = load_network("mef", tmp_path / "m.pt")[1]["header"]["training"]
    assert tr["seed"] == 3 and tr["mef_counts"] == [3, 4] and tr["mef_spacing_ev"] == [1.0, 2.0]
    assert tr["mef_black_level"] == [0.0, 0.05] and tr["mef_cover_prob"] == 0.25
    assert "3-4 exposures" in tr["augment"]


def test_training_with_the_exposure_prior_fuses_as_the_network_and_records_it(tmp_path):
    from napari_cscfusion.training.losses import mefn_fuse_batch

    torch.manual_seed(0)
    net = build("mef").eval()
    stack = D.make_source("mef", crop=24, batch_size=2, seed=0).batch(0, 0)["stack"]
    with torch.no_grad():
        plain, _ = mefn_fuse_batch(net, stack)
        net.prior_sigma = 0.2
        fused, _ = mefn_fuse_batch(net, stack)
        for b in range(2):  # the training batch computes what the model's forward does
            torch.testing.assert_close(fused[b], net(stack[b]), atol=1e-6, rtol=0)
    assert (fused - plain).abs().max() > 1e-3
    out = _train("mef", tmp_path / "prior.pt", exposure_prior_sigma=0.2)
    loaded, info = load_network("mef", out)
    tr = info["header"]["training"]
    assert tr["exposure_prior_sigma"] == 0.2 and "exposure_prior" in tr["exposure_prior"]
    assert loaded.prior_sigma == 0.2
    # fine-tuning keeps the parent's prior unless told otherwise (0: none)
    child = _train("mef", tmp_path / "child.pt", init_weights=out)
    assert load_network("mef", child)[1]["header"]["training"]["exposure_prior_sigma"] == 0.2
    for plain in (_train("mef", tmp_path / "plain.pt"),
                  _train("mef", tmp_path / "off.pt", init_weights=out, exposure_prior_sigma=0)):
        assert "exposure_prior_sigma" not in load_network("mef", plain)[1]["header"]["training"]
    from napari_cscfusion.models import save_checkpoint
    from napari_cscfusion.models.checkpoints import CheckpointError

    save_checkpoint(net, tmp_path / "bad.pt", "mef", {"exposure_prior_sigma": -1})
    with pytest.raises(CheckpointError, match="exposure_prior_sigma -1"):
        load_network("mef", tmp_path / "bad.pt")
    for task, sigma in (("ivf", 0.2), ("mef", -1.0)):
        with pytest.raises(ValueError, match="exposure_prior_sigma"):
            _train(task, tmp_path / "bad.pt", exposure_prior_sigma=sigma)


def test_max_grad_norm_clips_every_step_and_is_recorded(tmp_path, monkeypatch):
    norms = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):  # the gradients' global norm as the optimiser sees it
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    _train("mmf", tmp_path / "free.pt", validate=False)
    free = list(norms)
    norms.clear()
    out = _train("mmf", tmp_path / "clipped.pt", validate=False, max_grad_norm=1e-4)
    assert max(free) > 1e-3  # so the limit below is a real one
    assert len(norms) == 2 and max(norms) <= 1e-4 * (1 + 1e-4)
    assert load_network("mmf", out)[1]["header"]["training"]["max_grad_norm"] == 1e-4
    assert "max_grad_norm" not in load_network(
        "mmf", tmp_path / "free.pt")[1]["header"]["training"]
    with pytest.raises(ValueError, match="max_grad_norm"):
        _train("mmf", tmp_path / "bad.pt", validate=False, max_grad_norm=0)


def test_a_loss_that_is_not_finite_stops_the_run_and_keeps_the_last_epoch(tmp_path,
                                                                          monkeypatch):
    import importlib

    T = importlib.import_module("napari_cscfusion.training.train")  # the module, not train()
    # a constant learning rate: epoch 1 of two is then the same as a one-epoch run
    one = _train("mmf", tmp_path / "one.pt", validate=False, schedule="constant")
    real, calls = T.compute_loss, []

    def compute_loss(*args, **kwargs):  # epoch 2, step 2 diverges
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(T, "compute_loss", compute_loss)
    out = tmp_path / "two.pt"
    with pytest.raises(FloatingPointError, match=r"nan at epoch 2, step 2.*--max-grad-norm"):
        _train("mmf", out, epochs=2, validate=False, schedule="constant")
    assert _same(_state(one), _state(out))  # epoch 1's weights, untouched by the bad step
    state = torch.load(tmp_path / "two.state.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    rows = list(csv.DictReader(open(tmp_path / "two.log.csv")))
    assert [float(r["epoch"]) for r in rows] == [1.0]
