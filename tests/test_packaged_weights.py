"""The weights shipped in the package: present, small, loadable, and saying what they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import napari_cscfusion
from napari_cscfusion.models import load_network

from ._shared import SAMPLES, grey, read, shared_path

WEIGHTS = Path(napari_cscfusion.__file__).parent / "weights"
EXPECT_DATA = {"ivf": "ivf/flir_train", "mef": "mef/hdr", "mmf": "ivf/flir_train"}

# --- Recorded quality of the packaged weights: the regression guards ------------------------
# Measured with the code of the tests below (CPU, float32) on the weights shipped on
# 2026-12-06/07 (weights/README.md: how they were trained; benchmarks/quality.py: full tables).
# Whoever ships retrained weights re-measures these and updates them in the same commit
# (`pytest tests/test_packaged_weights.py -s` prints every figure): each test fails when a
# figure drops by more than its margin.
IVF_RECORDED = {  # TNO sample pairs (shipped in sample_data), 192x256 centre crops
    # second-generation ivf.pt, STAGE=8 (issue 17, sparse codes, edges kept; contrast gain
    # about mid-grey); the first generation's figures were TNO 1: MI 2.931, SCD 1.865, VIF
    # 0.612, Qabf 0.468; TNO 3: 2.929, 1.946, 0.629, 0.528; the STAGE=5 file's (zero-code
    # pivot): 2.741, 1.875, 0.600, 0.476; 2.976, 1.950, 0.641, 0.533
    1: {"MI": 2.938, "SCD": 1.890, "VIF": 0.612, "Qabf": 0.466},
    3: {"MI": 3.005, "SCD": 1.948, "VIF": 0.643, "Qabf": 0.525},
}
IVF_MARGIN = {"MI": 0.10, "SCD": 0.05, "VIF": 0.02, "Qabf": 0.02}
# second-generation mef.pt (issue 17); the first generation: 0.9245 and 0.9408
MEF_RECORDED = {"memorial-16": 0.9227, "memorial-every3rd": 0.9414}  # MEF-SSIM, Memorial
MEF_MARGIN = 0.005
# how far the packaged CSC-MEFN may stay below Mertens (OpenCV) on each bracket: on all 16
# exposures it trails (0.9227 vs 0.9379, the known gap of weights/README.md, 0.0018 wider than
# the first generation's 0.9245: the price of its sparse codes); on every 3rd it leads (0.9414
# vs 0.9395)
MEF_BELOW_MERTENS = {"memorial-16": 0.02, "memorial-every3rd": 0.0}
MMF_PAIRS = (1, 2, 3, 4, 5)  # FLIR-test (held out from training)
# mmf.pt of the low_res_detail geometry (2026-12-07, issue 17 item 4); the previous file
# (authors' geometry, tests/data/mmf_authors_geometry.pt): +0.494 / +0.156 dB over bicubic
MMF_RECORDED_GAIN_DB = {2: 0.697, 4: 0.664}  # mean PSNR gain over bicubic on MMF_PAIRS
MMF_MARGIN_DB = {2: 0.10, 4: 0.05}
MMF_RECORDED_GUIDE_DB = {2: 0.061, 4: 0.292}  # mean PSNR gain over a flat guide, MMF_PAIRS
MMF_GUIDE_MARGIN_DB = {2: 0.03, 4: 0.05}


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
        # the low_res_detail geometry (issue 17 item 4): the low-res input as it is
        assert tr["lr_input"] == "native" and net.geometry == "low_res_detail"
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


def _memorial() -> np.ndarray:
    files = sorted(shared_path("data/mef/memorial").glob("memorial_*.png"))
    assert len(files) == 16, files
    return np.stack([read(f)[..., :3] for f in files]).astype(np.float32) / 255


def test_packaged_mef_beats_the_naive_mean_and_holds_its_place_against_mertens():
    """Memorial (16 real exposures, never used for training or choosing the epoch), all 16
    and every 3rd: the shipped CSC-MEFN (through fuse_exposures, exposure prior included)
    fuses far better than averaging the exposures, keeps its recorded MEF-SSIM, and stays
    within its recorded distance of Mertens' fusion."""
    from napari_cscfusion import fuse_exposures
    from napari_cscfusion.baselines import mertens_fusion
    from napari_cscfusion.metrics import mef_ssim

    stack = _memorial()
    for name, st in (("memorial-16", stack), ("memorial-every3rd", stack[::3])):
        ours = mef_ssim(st, fuse_exposures(st, device="cpu").image)
        mean = mef_ssim(st, st.mean(0))
        mertens = mef_ssim(st, mertens_fusion(st))
        print(f"{name}: ours {ours:.4f}, Mertens {mertens:.4f}, mean {mean:.4f}")
        assert ours > mean + 0.3 and ours > 0.8, (ours, mean)
        assert ours >= MEF_RECORDED[name] - MEF_MARGIN, (name, ours, MEF_RECORDED[name])
        assert ours >= mertens - MEF_BELOW_MERTENS[name], (name, ours, mertens)


def _tno_sample(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A TNO pair that ships as sample data, 192x256 centre crop."""
    ir = grey(read(SAMPLES / f"tno_{index:02d}_ir.png"))
    vis = grey(read(SAMPLES / f"tno_{index:02d}_vis.png"))
    h, w = ir.shape
    crop = (slice(h // 2 - 96, h // 2 + 96), slice(w // 2 - 128, w // 2 + 128))
    return ir[crop], vis[crop]


@pytest.mark.parametrize("index", sorted(IVF_RECORDED))
def test_packaged_ivf_beats_single_sources_and_simple_fusions_on_real_held_out_pairs(index):
    """TNO pairs 1 and 3 (never used for training or choosing the epoch): the shipped
    CSC-IVFN keeps more of both sources than averaging them (MI, VIF, Qabf), and more
    complementary information (SCD) and contrast and detail (EN, SD, SF, AG) than the better
    single source or max fusion (pixel-wise maximum, or two-scale choose-max): a network
    that copied one source or took the maximum would fail. MI and VIF are above two-scale
    choose-max too; there a source scores itself (its own term is its entropy / 1), and on
    Qabf the visible image and max fusion lead, so those are guarded against the recorded
    figures."""
    from napari_cscfusion import baselines, fuse_infrared_visible, metrics

    ir, vis = _tno_sample(index)
    fused = fuse_infrared_visible(ir, vis, device="cpu").image
    sources = [ir / 255.0, vis / 255.0]
    ours = metrics.evaluate("ivf", sources, fused)
    mean = metrics.evaluate("ivf", sources, baselines.average_fusion(sources))
    others = {"infrared": sources[0], "visible": sources[1],
              "max": baselines.max_abs_fusion(sources, mode="intensity"),
              "choose-max": baselines.max_abs_fusion(sources)}
    others = {name: metrics.evaluate("ivf", sources, img) for name, img in others.items()}
    print(f"TNO {index}: ours", {k: round(v, 4) for k, v in ours.items()})
    for name, m in others.items():
        print(f"TNO {index}: {name}", {k: round(v, 4) for k, v in m.items()})
    for key in ("MI", "VIF", "Qabf"):
        assert ours[key] > mean[key], (key, ours[key], mean[key])
    for key in ("MI", "VIF"):
        assert ours[key] > others["choose-max"][key], (key, ours[key])
    for key in ("SCD", "EN", "SD", "SF", "AG"):
        for name, m in others.items():
            assert ours[key] > m[key], (key, name, ours[key], m[key])
    for key, recorded in IVF_RECORDED[index].items():
        assert ours[key] >= recorded - IVF_MARGIN[key], (key, ours[key], recorded)


def test_packaged_mmf_beats_bicubic_on_real_held_out_pairs():
    """FLIR-test pairs (held out), x2 and x4: thermal super-resolved with the visible guide is
    closer to the full-resolution thermal image than bicubic upsampling of the same low-res
    input on every pair, by the recorded mean gain (less a margin); and the guide matters: a
    flat guide (a constant at the guide's mean) loses the recorded mean (less a margin)."""
    cv2 = pytest.importorskip("cv2")
    from napari_cscfusion import fuse_guided, metrics

    folder = shared_path("data/ivf/flir_test")
    gains, guide_gains = {2: [], 4: []}, {2: [], 4: []}
    for index in MMF_PAIRS:
        ir = grey(read(folder / f"IR{index}.jpg"))
        vis = grey(read(folder / f"VIS{index}.jpg"))
        h = min(ir.shape[0], vis.shape[0]) // 4 * 4
        w = min(ir.shape[1], vis.shape[1]) // 4 * 4
        target = (ir[:h, :w] / 255.0).astype(np.float32)
        guide = (vis[:h, :w] / 255.0).astype(np.float32)
        for scale in gains:
            low = cv2.resize(target, (w // scale, h // scale), interpolation=cv2.INTER_AREA)
            ours = fuse_guided(low, guide, device="cpu").image
            flat = fuse_guided(low, np.full_like(guide, guide.mean()), device="cpu").image
            bicubic = np.clip(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
            assert metrics.psnr(target, ours) > metrics.psnr(target, bicubic), (index, scale)
            gains[scale].append(metrics.psnr(target, ours) - metrics.psnr(target, bicubic))
            guide_gains[scale].append(metrics.psnr(target, ours) - metrics.psnr(target, flat))
    for scale, g in gains.items():
        gg = guide_gains[scale]
        print(f"x{scale}: gain per pair {np.round(g, 3)}, mean {np.mean(g):.3f} dB; over a "
              f"flat guide {np.round(gg, 3)}, mean {np.mean(gg):.3f} dB")
        assert np.mean(g) >= MMF_RECORDED_GAIN_DB[scale] - MMF_MARGIN_DB[scale], (scale, g)
        assert np.mean(gg) >= MMF_RECORDED_GUIDE_DB[scale] - MMF_GUIDE_MARGIN_DB[scale], \
            (scale, gg)
