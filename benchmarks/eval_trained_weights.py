"""Held-out numbers for trained weights (ours vs the authors' reference weights / baselines).

    .venv/bin/python benchmarks/eval_trained_weights.py [--ivf W] [--mef W] [--mmf W] \
        [--reference ../shared/reference-checkpoints] [--pairs 8] [--crop 256]

- ivf: autoencoder reconstruction PSNR (dB) on TNO and FLIR-test (first --pairs pairs, IR and
  visible, centre crops of --crop px; 0 = whole images), ours vs the authors';
- mef: MEF-SSIM on the real Memorial bracket (all 16 exposures and every 3rd) and on three
  brackets simulated from the held-out HDR scene (``SUNRISE_EVS``), ours vs the authors' vs
  OpenCV's Mertens fusion and the naive mean (``--no-baselines`` skips those two);
- mmf: thermal guided SR PSNR on FLIR-test at x2 and x4 (lr = INTER_AREA downsampling of the IR,
  guide = visible; the network gets ``prepare_mmf_lr(lr)`` as its header says), ours vs bicubic
  upsampling (cv2.INTER_CUBIC) of the same lr.

Nothing here is used for training or for choosing settings (that is the flir_train validation
split); nir_country is not read.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from napari_cscfusion.metrics import mef_ssim
from napari_cscfusion.models import load_network
from napari_cscfusion.training import data as D
from napari_cscfusion.training.losses import psnr

PKG_WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_cscfusion" / "weights"


def _pairs(folder: Path, n: int):
    irs = sorted(folder.glob("IR*.*"), key=lambda p: int(re.search(r"\d+", p.stem).group()))
    out = []
    for ir in irs[:n]:
        idx = re.search(r"\d+", ir.stem).group()
        vis = next(folder.glob(f"VIS{idx}.*"))
        out.append((ir, vis))
    return out


def _centre(img, size):
    if not size:
        return img
    h, w = img.shape[:2]
    s = min(size, h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


@torch.no_grad()
def eval_ivf(paths: dict, root: Path, n: int, crop: int) -> None:
    nets = {name: load_network("ivf", p)[0] for name, p in paths.items()}
    for ds in ("tno", "flir_test"):
        imgs = [_centre(D.read_grey(p), crop) for pair in _pairs(root / "ivf" / ds, n)
                for p in pair]
        for name, net in nets.items():
            t = time.time()
            vals = [psnr(net(torch.from_numpy(im)[None, None]), torch.from_numpy(im)[None, None])
                    for im in imgs]
            print(f"ivf  {ds:10s} {name:8s} recon PSNR {np.mean(vals):6.2f} dB "
                  f"(median {np.median(vals):.2f}, min {np.min(vals):.2f}; {len(imgs)} images, "
                  f"{time.time() - t:.0f} s)", flush=True)


SUNRISE_EVS = {"sim4": [-3.0, -1.0, 1.0, 3.0], "sim4-wide": [-6.0, -2.0, 2.0, 6.0],
               "sim5-wide": [-6.0, -3.0, 0.0, 3.0, 6.0]}


@torch.no_grad()
def eval_mef(paths: dict, root: Path, baselines: bool = True) -> None:
    import cv2

    files = sorted((root / "mef" / "memorial").glob("memorial_*.png"))
    mem = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files])
    mem = mem.astype(np.float32) / 255.0
    hdr = D.read_hdr(root / "mef" / "hdr" / f"{D.HELD_OUT_HDR}.exr")[::2, ::2]
    hdr = hdr * np.float32(0.18 / np.median(hdr))
    stacks = {"memorial-16": mem, "memorial-every3rd": mem[::3]}
    for tag, evs in SUNRISE_EVS.items():
        stacks[f"{D.HELD_OUT_HDR}-{tag}"] = D.simulate_bracket(hdr, evs,
                                                               np.random.default_rng(0))
    for name, p in paths.items():
        net = load_network("mef", p)[0]
        for sname, st in stacks.items():
            x = torch.from_numpy(np.ascontiguousarray(st.transpose(0, 3, 1, 2)))
            fused = net(x).numpy().transpose(1, 2, 0)
            score = mef_ssim(st, fused)
            print(f"mef  {sname:18s} {name:8s} MEF-SSIM {score:.4f}", flush=True)
    if baselines:
        from napari_cscfusion.baselines import mertens_fusion

        for sname, st in stacks.items():
            score = mef_ssim(st, mertens_fusion(st))
            print(f"mef  {sname:18s} {'mertens':8s} MEF-SSIM {score:.4f}", flush=True)
            print(f"mef  {sname:18s} {'mean':8s} MEF-SSIM {mef_ssim(st, st.mean(0)):.4f}",
                  flush=True)


@torch.no_grad()
def eval_mmf(path, root: Path, n: int) -> None:
    import cv2

    net, info = load_network("mmf", path)
    for scale in (2, 4):
        ours, bic = [], []
        for ir_p, vis_p in _pairs(root / "ivf" / "flir_test", n):
            ir, vis = D.read_grey(ir_p), D.read_grey(vis_p)
            h, w = (ir.shape[0] // 4) * 4, (ir.shape[1] // 4) * 4
            ir, vis = ir[:h, :w], vis[:h, :w]
            lr = D.area_downsample(ir, scale)
            up = np.clip(cv2.resize(lr, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
            # The network input is prepared as recorded in the header (see
            # training.data.prepare_mmf_lr); the engine must do the same at inference.
            mode = info["header"]["training"].get("lr_input", "align")
            lr_net = D.prepare_mmf_lr(lr, (h, w), mode)
            pred = net(torch.from_numpy(lr_net)[None, None],
                       torch.from_numpy(vis)[None, None]).clamp(0, 1)
            t = torch.from_numpy(ir)[None, None]
            ours.append(psnr(pred, t))
            bic.append(psnr(torch.from_numpy(up)[None, None], t))
        print(f"mmf  flir_test x{scale}  ours {np.mean(ours):6.2f} dB  bicubic {np.mean(bic):6.2f}"
              f" dB  gain {np.mean(ours) - np.mean(bic):+.2f} dB ({len(ours)} pairs)", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ivf", default=None)
    ap.add_argument("--mef", default=None)
    ap.add_argument("--mmf", default=None)
    ap.add_argument("--tasks", default="ivf,mef,mmf")
    ap.add_argument("--reference", default=str(D.default_data_root().parent
                                               / "reference-checkpoints"))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--mmf-pairs", type=int, default=40)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-baselines", action="store_true", help="mef: skip Mertens and mean")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = D.resolve_data_root(a.data_root)
    ref = Path(a.reference)
    tasks = a.tasks.split(",")
    if "ivf" in tasks:
        paths = {"ours": a.ivf or PKG_WEIGHTS / "ivf.pt"}
        if ref.is_dir():
            paths["authors"] = ref
        eval_ivf(paths, root, a.pairs, a.crop)
    if "mef" in tasks:
        paths = {"ours": a.mef or PKG_WEIGHTS / "mef.pt"}
        if (ref / "csc_mefn_authors.pth").is_file():
            paths["authors"] = ref / "csc_mefn_authors.pth"
        eval_mef(paths, root, not a.no_baselines)
    if "mmf" in tasks:
        eval_mmf(a.mmf or PKG_WEIGHTS / "mmf.pt", root, a.mmf_pairs)


if __name__ == "__main__":
    main()
