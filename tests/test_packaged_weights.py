"""The weights shipped in the package: present, small, loadable, and saying what they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import napari_cscfusion
from napari_cscfusion.models import load_network

WEIGHTS = Path(napari_cscfusion.__file__).parent / "weights"
EXPECT_DATA = {"ivf": "ivf/flir_train", "mef": "mef/hdr", "mmf": "ivf/flir_train"}


@pytest.mark.parametrize("task", ["ivf", "mef", "mmf"])
def test_packaged_weights_load_and_name_their_training(task):
    path = WEIGHTS / f"{task}.pt"
    assert path.is_file(), f"packaged weights {path} missing"
    assert path.stat().st_size < 5 * 1024 * 1024
    net, info = load_network(task, path)
    assert info["format"] == "napari-cscfusion"
    header = info["header"]
    assert header["task"] == task
    tr = header["training"]
    assert EXPECT_DATA[task] in tr["data"]
    for key in ("epochs", "seed", "crop", "batch_size", "lr", "loss", "held_out"):
        assert key in tr, key
    assert "nir_country" not in tr["data"] and "tno" not in tr["data"].lower()
    if task == "mef":
        from napari_cscfusion.training.data import HELD_OUT_HDR

        assert HELD_OUT_HDR in tr["held_out"] and f"'{HELD_OUT_HDR}'" not in tr["data"]
    if task == "ivf":  # the authors' architecture
        assert info["hparams"] == {"code_channels": 64, "num_dcus": 8}
    if task == "mef":
        assert info["hparams"] == {"code_channels": 24, "num_dcus": 2}
    if task == "mmf":
        assert info["hparams"]["lr_channels"] == 1 and info["hparams"]["guide_channels"] == 1
        assert tr["lr_input"] in ("bicubic", "align")
    assert all(torch.isfinite(v).all() for v in net.state_dict().values()
               if v.is_floating_point())


def test_packaged_weights_run():
    x = torch.rand(1, 1, 40, 48)
    with torch.no_grad():
        ivf = load_network("ivf", WEIGHTS / "ivf.pt")[0]
        assert ivf(x).shape == x.shape
        mef = load_network("mef", WEIGHTS / "mef.pt")[0]
        out = mef(torch.stack([torch.full((3, 40, 48), v) for v in (0.2, 0.5, 0.8)]))
        assert out.shape == (3, 40, 48) and torch.isfinite(out).all()
        mmf = load_network("mmf", WEIGHTS / "mmf.pt")[0]
        y = mmf(torch.rand(1, 1, 20, 24), x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_packaged_mef_beats_the_naive_mean_on_a_real_held_out_bracket():
    """Memorial (16 real exposures, never used for training or choosing the epoch): the
    shipped CSC-MEFN must fuse it far better than averaging the exposures."""
    from napari_cscfusion.metrics import mef_ssim
    from napari_cscfusion.training.data import default_data_root

    files = sorted((default_data_root() / "mef" / "memorial").glob("memorial_*.png"))
    if len(files) != 16:
        pytest.skip("Memorial bracket not found")
    cv2 = pytest.importorskip("cv2")
    stack = np.stack([cv2.imread(str(f))[..., ::-1] for f in files]).astype(np.float32) / 255
    net = load_network("mef", WEIGHTS / "mef.pt")[0]
    for st in (stack, stack[::3]):
        with torch.no_grad():
            fused = net(torch.from_numpy(np.ascontiguousarray(st.transpose(0, 3, 1, 2))))
        ours = mef_ssim(st, fused.numpy().transpose(1, 2, 0))
        mean = mef_ssim(st, st.mean(0))
        assert ours > mean + 0.3 and ours > 0.8, (ours, mean)


def _held_out_pair(folder: str, index: int = 1):
    from ._shared import DATA, grey, read

    ir_path = next(iter(sorted((DATA / "ivf" / folder).glob(f"IR{index}.*"))), None)
    vis_path = next(iter(sorted((DATA / "ivf" / folder).glob(f"VIS{index}.*"))), None)
    if ir_path is None or vis_path is None:
        pytest.skip(f"ivf/{folder} pair {index} not found")
    return grey(read(ir_path)), grey(read(vis_path))


def test_packaged_ivf_beats_average_fusion_on_a_real_held_out_pair():
    """TNO pair 1 (never used for training or choosing the epoch), a 192x256 centre crop: the
    shipped CSC-IVFN keeps more of both sources than averaging them (MI, VIF, Qabf)."""
    from napari_cscfusion import baselines, fuse_infrared_visible, metrics

    ir, vis = _held_out_pair("tno")
    h, w = ir.shape
    crop = (slice(h // 2 - 96, h // 2 + 96), slice(w // 2 - 128, w // 2 + 128))
    ir, vis = ir[crop], vis[crop]
    fused = fuse_infrared_visible(ir, vis, device="cpu").image
    sources = [ir / 255.0, vis / 255.0]
    ours = metrics.evaluate("ivf", sources, fused)
    mean = metrics.evaluate("ivf", sources, baselines.average_fusion(sources))
    for key in ("MI", "VIF", "Qabf"):
        assert ours[key] > mean[key], (key, ours[key], mean[key])


@pytest.mark.parametrize("scale", [2, 4])
def test_packaged_mmf_beats_bicubic_on_a_real_held_out_pair(scale):
    """FLIR-test pair 1 (held out): thermal super-resolved with the visible guide is closer to
    the full-resolution thermal image than bicubic upsampling of the same low-res input."""
    cv2 = pytest.importorskip("cv2")
    from napari_cscfusion import fuse_guided, metrics

    ir, vis = _held_out_pair("flir_test")
    h = min(ir.shape[0], vis.shape[0]) // scale * scale
    w = min(ir.shape[1], vis.shape[1]) // scale * scale
    target = (ir[:h, :w] / 255.0).astype(np.float32)
    guide = (vis[:h, :w] / 255.0).astype(np.float32)
    low = cv2.resize(target, (w // scale, h // scale), interpolation=cv2.INTER_AREA)
    ours = fuse_guided(low, guide, device="cpu").image
    bicubic = np.clip(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
    assert metrics.psnr(target, ours) > metrics.psnr(target, bicubic)
