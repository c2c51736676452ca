"""CSC-MMFN's low_res geometry (issue 17 item 4): recorded in the weights header, absent for
the authors' and older files (which run as before); the engine's tiles equal the whole-image
forward; trained by ``train mmf --geometry low_res`` on the plain low-res crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from napari_cscfusion.engine import fuse_guided, mmf_cpu
from napari_cscfusion.engine import mmf as engine_mmf
from napari_cscfusion.engine.registry import load_model, packaged_weights_path
from napari_cscfusion.models import load_network, save_checkpoint
from napari_cscfusion.models.checkpoints import CheckpointError
from napari_cscfusion.models.mmfn import CSCMMFN

from ._shared import CKPT, DATA, MMF_AUTHORS_GEOMETRY, missing


def _low_res_net(lr_channels=1, guide_channels=1, seed=0, geometry="low_res",
                 guide_num_dcus=None) -> CSCMMFN:
    torch.manual_seed(seed)
    net = CSCMMFN(lr_channels, guide_channels, code_channels=8, num_dcus=2,
                  geometry=geometry, guide_num_dcus=guide_num_dcus).eval()
    with torch.no_grad():  # visible residuals, codes with structure (not all thresholded)
        net.decoder.weight.mul_(5)
    return net


def _saved(net, path):
    save_checkpoint(net, path, "mmf", {"lr_input": "native"})
    return load_model("mmf", path)


def _scene(h, w, seed=0):
    """A smooth random image with edges, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.random((h // 6 + 2, w // 6 + 2)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    img[h // 3:, w // 2:] += 0.4
    return np.clip(img / img.max(), 0, 1).astype(np.float32)


def test_geometry_is_a_header_field_and_older_files_keep_the_authors(tmp_path):
    model = _saved(_low_res_net(), tmp_path / "low.pt")
    assert model.network.geometry == "low_res"
    assert model.info["header"]["hparams"]["geometry"] == "low_res"
    previous, _ = load_network("mmf", MMF_AUTHORS_GEOMETRY)  # a file of before the field
    assert previous.geometry == "authors" and "geometry" not in previous.hparams
    packaged, info = load_network("mmf", packaged_weights_path("mmf"))
    assert packaged.geometry == "low_res_detail" == info["hparams"]["geometry"]
    authors = CKPT / "csc_mmfn_authors.pth"
    if authors.is_file():
        net, info = load_network("mmf", authors)
        assert net.geometry == "authors" and "geometry" not in info["hparams"]
    raw = torch.load(tmp_path / "low.pt", weights_only=True)
    raw["hparams"]["geometry"] = "sideways"
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="geometry 'sideways'"):
        load_network("mmf", tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="geometry"):
        CSCMMFN(1, 1, 8, 1, geometry="sideways")


def test_low_res_base_is_bicubic_of_the_low_res_input():
    """With a zero decoder the output is the bicubic upsampling of the low-res input, with
    half-pixel centres as cv2.INTER_CUBIC (the baseline the benchmarks compare with): the
    low-res pixels sit where area downsampling put them."""
    net = _low_res_net()
    with torch.no_grad():
        net.decoder.weight.zero_()
    target = _scene(60, 84)
    for s in (2, 3, 4):
        lr = cv2.resize(target, (84 // s, 60 // s), interpolation=cv2.INTER_AREA)
        with torch.no_grad():
            out = net(torch.from_numpy(lr)[None, None], torch.from_numpy(target)[None, None])
        ref = cv2.resize(lr, (84, 60), interpolation=cv2.INTER_CUBIC)
        assert np.abs(out[0, 0].numpy() - ref).max() < 1e-5


# (geometry, DCUs of the guide's backbone: None = as the low-res one's, 2; 4 = deeper, whose
# tiles need the guide's larger context)
@pytest.mark.parametrize("geometry", [("low_res", None), ("low_res_detail", None),
                                      ("low_res_detail", 4)])
@pytest.mark.parametrize("channels", [(1, 1), (3, 3)])
def test_low_res_tiles_equal_the_whole_image(channels, geometry, tmp_path):
    c, g_c = channels
    geometry, guide_dcus = geometry
    model = _saved(_low_res_net(c, g_c, geometry=geometry, guide_num_dcus=guide_dcus),
                   tmp_path / "low.pt")
    assert model.network.geometry == geometry
    assert len(model.network.guide_encoder.dcus) == (guide_dcus or 2)
    guide = _scene(61, 77, 1)
    guide_in = guide if g_c == 1 else np.stack([guide, guide ** 2, 1 - guide], -1)
    for size in ((30, 38), (20, 25), (23, 31)):  # x2 (rounded), ~x3, non-integer x2.65/2.48
        lr = cv2.resize(guide, size[::-1], interpolation=cv2.INTER_AREA)
        lr = lr if c == 1 else np.stack([lr, lr ** 0.5, 1 - lr])
        w64 = fuse_guided(lr, guide_in, model, device="cpu", tile=0, precision="fp64",
                          exact=True).image
        t64 = fuse_guided(lr, guide_in, model, device="cpu", tile=17, precision="fp64",
                          exact=True).image
        assert np.abs(t64 - w64).max() < 1e-9  # every crop window exact
        whole = fuse_guided(lr, guide_in, model, device="cpu", tile=0, exact=True)
        tiled = fuse_guided(lr, guide_in, model, device="cpu", tile=17, exact=True).image
        assert whole.metadata["path"] == "exact"
        # the fast path: one-channel networks in the numba kernels (mmf_cpu.py) where numba
        # is at hand, else (and multi-band ones) the PyTorch form; float64 statistics either
        # way: within float32 rounding of fp64, tiles = whole
        fast = fuse_guided(lr, guide_in, model, device="cpu", tile=0, exact=False)
        fast_tiled = fuse_guided(lr, guide_in, model, device="cpu", tile=17, exact=False).image
        numba = c == 1 and mmf_cpu.available()
        assert fast.metadata["path"] == "fast"
        assert fast.metadata["fast_kernel"] == ("numba" if numba else "pytorch")
        assert np.abs(fast.image - w64).max() < 1e-5
        # (the PyTorch form's float32 convolutions round per crop shape, which the 5x
        # decoder amplifies: 1.5e-6 for three channels; the numba kernels' do not)
        assert np.abs(fast_tiled - fast.image).max() < (1e-6 if numba else 1e-5)
        # the default on the CPU: the numba kernels, else the PyTorch form where
        # LOW_RES_PYTORCH_ON_CPU (measured faster than exact on 2 threads), else exact
        default = fuse_guided(lr, guide_in, model, device="cpu", tile=0)
        assert default.metadata["path"] == (
            "fast" if numba or engine_mmf.LOW_RES_PYTORCH_ON_CPU else "exact")
        # float32: window means and area averages of another crop round differently; the
        # 5x decoder amplifies that (a trained file: ~5e-6 on a FLIR crop)
        assert np.abs(tiled - whole.image).max() < 1e-4
        assert np.abs(whole.image - w64).max() < 1e-3  # the forward's own fp32 rounding
        with torch.inference_mode():
            g_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(guide_in, -1, 0)
                                                        if g_c == 3 else guide_in[None]))
            ref = model.network(torch.from_numpy(lr if c > 1 else lr[None])[None],
                                g_t[None]).clamp(0, 1)[0]
        assert np.abs(whole.image - (ref.numpy() if c > 1 else ref[0].numpy())).max() < 1e-6
        if c == 1:  # the guided residual is there: not just the bicubic base
            base = cv2.resize(lr, guide.shape[::-1], interpolation=cv2.INTER_CUBIC)
            assert np.abs(whole.image - np.clip(base, 0, 1)).max() > 1e-2


def test_low_res_detail_keeps_the_inputs_own_codes_under_a_flat_guide():
    """low_res_detail adds what the guided filter's fit leaves of the low-res codes: with a
    flat guide (coefficient a = 0) the fused codes are the input's codes upsampled, where
    low_res keeps only their 3x3 window mean; with a real guide the two differ by exactly
    that residual, upsampled."""
    import torch.nn.functional as F

    from napari_cscfusion.models.mmfn import guided_coefficients, window_mean

    target = _scene(48, 60)
    lr = torch.from_numpy(cv2.resize(target, (20, 16), interpolation=cv2.INTER_AREA))[None, None]
    flat = torch.full((1, 1, 48, 60), float(target.mean()))
    real = torch.from_numpy(target)[None, None]
    detail, plain = _low_res_net(geometry="low_res_detail"), _low_res_net()
    with torch.no_grad():
        z_lr = detail.lr_encoder(lr)
        assert z_lr.std() > 1e-3  # codes with structure
        up = F.interpolate(z_lr, size=(48, 60), mode="bilinear", align_corners=False)
        z_d = detail.encode(lr, flat)["fused"]
        z_p = plain.encode(lr, flat)["fused"]
        assert torch.allclose(z_d, up, atol=1e-5)
        smooth = F.interpolate(window_mean(z_lr, 1), size=(48, 60), mode="bilinear",
                               align_corners=False)
        assert torch.allclose(z_p, smooth, atol=1e-5)
        assert (z_d - z_p).abs().max() > 1e-2
        z_g = F.adaptive_avg_pool2d(plain.guide_encoder(real), (16, 20))
        a, b = guided_coefficients(z_g, z_lr, 1, plain.eps)
        residual = F.interpolate(z_lr - (a * z_g + b), size=(48, 60), mode="bilinear",
                                 align_corners=False)
        diff = detail.encode(lr, real)["fused"] - plain.encode(lr, real)["fused"]
        assert torch.allclose(diff, residual, atol=1e-5)


@pytest.mark.parametrize("geometry", ["low_res", "low_res_detail"])
def test_low_res_lazy_equals_in_memory_tiles(geometry, tmp_path):
    da = pytest.importorskip("dask.array")
    model = _saved(_low_res_net(geometry=geometry), tmp_path / "low.pt")
    guide = _scene(64, 80, 2)
    lr = cv2.resize(guide, (27, 22), interpolation=cv2.INTER_AREA)
    tiled = fuse_guided(lr, guide, model, device="cpu", tile=24).image
    lazy = fuse_guided(da.from_array(lr, chunks=10), da.from_array(guide, chunks=30), model,
                       device="cpu", tile=24)
    assert lazy.metadata["lazy"]
    assert np.array_equal(np.asarray(lazy.image), tiled)


@pytest.mark.skipif(not (DATA / "ivf" / "flir_train").is_dir(),
                    reason=missing("data/ivf/flir_train"))
def test_train_low_res_geometry_writes_it_and_feeds_plain_low_res_crops(tmp_path, monkeypatch):
    from napari_cscfusion.training import data as D
    from napari_cscfusion.training.cli import main

    monkeypatch.setenv(D.DATA_ENV, str(DATA))
    out = tmp_path / "m.pt"
    assert main(["train", "mmf", "--geometry", "low_res", "--out", str(out), "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "24",
                 "--code-channels", "8", "--num-dcus", "1", "--no-progress"]) == 0
    net, info = load_network("mmf", out)
    assert net.geometry == "low_res" and info["header"]["training"]["lr_input"] == "native"
    src = D.MMFPairs(DATA, crop=24, batch_size=2, lr_input="native")
    b = src.batch(0, 0)
    assert b["lr"].shape[-1] == round(24 / float(b["scale"]))  # low-res, not upsampled
    from napari_cscfusion.training.train import train

    with pytest.raises(ValueError, match="low_res.*native"):
        train("mmf", tmp_path / "x.pt", epochs=1, steps_per_epoch=1, batch_size=2, crop=24, lr=1e-3,
              hparams={"code_channels": 8, "num_dcus": 1, "geometry": "low_res"},
              progress=False, device="cpu")


@pytest.mark.skipif(not (DATA / "ivf" / "flir_train").is_dir(),
                    reason=missing("data/ivf/flir_train"))
def test_train_scales_flat_guide_and_guide_dcus_options(tmp_path, monkeypatch):
    from napari_cscfusion.training import data as D
    from napari_cscfusion.training.cli import main

    monkeypatch.setenv(D.DATA_ENV, str(DATA))
    src = D.MMFPairs(DATA, crop=24, batch_size=2, lr_input="native", scales=(3.0, 4.0))
    scales = [float(src.batch(0, i)["scale"]) for i in range(12)]
    assert all(3.0 <= s <= 4.0 for s in scales) and 3.0 in scales and 4.0 in scales
    # --flat-guide: the same crops, every guide a constant at its crop's mean
    flat = D.MMFPairs(DATA, crop=24, batch_size=2, lr_input="native", scales=(3.0, 4.0),
                      flat_guide=True).batch(0, 1)
    real = src.batch(0, 1)
    assert torch.equal(flat["lr"], real["lr"]) and torch.equal(flat["target"], real["target"])
    assert torch.equal(flat["guide"].amin((2, 3)), flat["guide"].amax((2, 3)))
    torch.testing.assert_close(flat["guide"].mean((2, 3)), real["guide"].mean((2, 3)))
    out = tmp_path / "m.pt"
    assert main(["train", "mmf", "--geometry", "low_res_detail", "--out", str(out),
                 "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "24",
                 "--code-channels", "8", "--num-dcus", "1", "--scales", "4", "4",
                 "--flat-guide", "--no-progress"]) == 0
    tr = load_network("mmf", out)[1]["header"]["training"]
    assert "scale 4.0-4.0" in tr["augment"] and tr["guide"].startswith("flat")
    # from that file with a deeper guide backbone (models.mmfn.deepen_guide)
    deep = tmp_path / "deep.pt"
    assert main(["train", "mmf", "--geometry", "low_res_detail", "--init", str(out),
                 "--guide-dcus", "3", "--out", str(deep), "--epochs", "1", "--steps-per-epoch",
                 "1", "--batch-size", "2", "--crop", "24", "--no-progress"]) == 0
    net, info = load_network("mmf", deep)
    assert len(net.guide_encoder.dcus) == 3 and len(net.lr_encoder.dcus) == 1
    assert info["header"]["hparams"]["guide_num_dcus"] == 3
    for bad in (["mmf", "--scales", "1", "4"], ["mmf", "--scales", "4", "3"],
                ["mef", "--scales", "2", "4"], ["mmf", "--guide-dcus", "0"],
                ["ivf", "--guide-dcus", "4"], ["ivf", "--flat-guide"]):
        with pytest.raises(SystemExit, match=bad[1]):
            main(["train", bad[0], "--out", str(tmp_path / "x.pt"), *bad[1:], "--no-progress"])


def test_deeper_guide_starts_as_the_shallower_network_and_loads_from_its_tensors(tmp_path):
    from napari_cscfusion.models.mmfn import deepen_guide

    net = _low_res_net(geometry="low_res_detail")
    guides = torch.from_numpy(np.stack([_scene(48, 48, s) for s in range(4)])[:, None])
    deeper = deepen_guide(net, 4, guides)
    assert len(deeper.guide_encoder.dcus) == 4 and len(deeper.lr_encoder.dcus) == 2
    assert deeper.hparams["guide_num_dcus"] == 4 and not deeper.training
    lr = torch.from_numpy(cv2.resize(_scene(48, 48, 7), (16, 16),
                                     interpolation=cv2.INTER_AREA))[None, None]
    g = torch.from_numpy(_scene(48, 48, 7))[None, None]
    with torch.no_grad():  # the extra units are identities at inference
        assert (deeper(lr, g) - net(lr, g)).abs().max() < 1e-5
        deeper.guide_encoder.dcus[3].adjoint.weight.add_(0.1)  # trainable: they can change it
        assert (deeper(lr, g) - net(lr, g)).abs().max() > 1e-3
    model = _saved(deeper, tmp_path / "deep.pt")  # the unit count is read off the tensors
    assert model.network.hparams["guide_num_dcus"] == 4
    assert len(model.network.guide_encoder.dcus) == 4
    assert "guide_num_dcus" not in _saved(net, tmp_path / "plain.pt").network.hparams
    with pytest.raises(ValueError, match="at least the network's 2"):
        deepen_guide(net, 1, guides)


def test_cli_runs_low_res_weights_as_the_api_does(tmp_path):
    import tifffile

    from napari_cscfusion.cli import main

    model = _saved(_low_res_net(), tmp_path / "low.pt")
    guide = (_scene(48, 64, 3) * 255).astype(np.uint8)
    lr = cv2.resize(guide, (21, 16), interpolation=cv2.INTER_AREA)  # x3 by 64/21
    cv2.imwrite(str(tmp_path / "lr.png"), lr)
    cv2.imwrite(str(tmp_path / "guide.png"), guide)
    out = tmp_path / "sr.tif"
    assert main(["fuse", "mmf", str(tmp_path / "lr.png"), str(tmp_path / "guide.png"), "-o",
                 str(out), "--weights", str(tmp_path / "low.pt"), "--device", "cpu", "-q"]) == 0
    got = tifffile.imread(out)
    ref = fuse_guided(lr, guide, model, device="cpu").image
    assert got.shape == (48, 64)
    assert np.abs(got.astype(np.float32) - ref).max() < 1e-6
