"""How far can the packaged CSC-MMFN go on FLIR-test? (issue 3, MMF target: +1 dB over bicubic)

    .venv/bin/python benchmarks/mmf_ceiling.py [--pairs 10] [--scale 4] [--steps 600]

Fits the packaged ``mmf.pt`` (its architecture and size; batch norm on its running statistics,
as deployed) to the first ``--pairs`` FLIR-test pairs themselves — random 96 px crops, batch 16,
Adam 1e-3, MSE to the full-resolution IR — and prints every 200 steps the mean PSNR gain over
bicubic on those same whole images (low-res = INTER_AREA downsampling; the network input is
the bicubic image, as the packaged weights' header says: ``lr_input='bicubic'``; for weights of
the low_res geometry, ``lr_input='native'``, the low-res image itself, cropped at whole low-res
pixels with its guide and target crops). An
overfitting oracle on test data: an upper bound for "could better training of this network
meet the target?", never a way to choose weights.
~1 s per step on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from quality import ivf_pairs  # benchmarks/quality.py: FLIR-test pairs in index order

from napari_cscfusion.models import load_network
from napari_cscfusion.training import data as D
from napari_cscfusion.training.losses import psnr

PKG_WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_cscfusion" / "weights"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="default ../shared/data")
    ap.add_argument("--weights", type=Path, default=PKG_WEIGHTS / "mmf.pt")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-every", type=int, default=200, help="steps between reports")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net, info = load_network("mmf", args.weights)
    lr_input = info.get("header", {}).get("training", {}).get("lr_input")
    if lr_input not in ("bicubic", "native"):
        raise SystemExit("weights trained with lr_input='bicubic' (the packaged mmf.pt) or "
                         "'native' (the low_res geometry) only")
    step = args.scale if lr_input == "native" else 1  # crops start at whole low-res pixels
    folder = D.resolve_data_root(args.data) / "ivf" / "flir_test"
    data = []
    for ir_path, vis_path in ivf_pairs(folder)[:args.pairs]:
        ir, vis = D.read_grey(ir_path), D.read_grey(vis_path)
        h, w = (s - s % args.scale for s in ir.shape)  # whole low-res pixels
        lr = D.area_downsample(ir[:h, :w], args.scale)
        # bicubic: the network's input is the bicubic image itself; native: the low-res image
        data.append((ir[:h, :w], D.prepare_mmf_lr(lr, (h, w), lr_input), vis[:h, :w],
                     D.prepare_mmf_lr(lr, (h, w), "bicubic")))

    def as_t(a):
        return torch.from_numpy(np.ascontiguousarray(a))[None, None]

    @torch.no_grad()
    def mean_gain() -> float:
        net.eval()
        gains = [float(psnr(net(as_t(lr), as_t(v)).clamp(0, 1), as_t(t))
                       - psnr(as_t(bic).clamp(0, 1), as_t(t))) for t, lr, v, bic in data]
        return float(np.mean(gains))

    print(f"x{args.scale}, {len(data)} FLIR-test pairs: gain over bicubic {mean_gain():+.3f} dB "
          f"({args.weights}, geometry {net.geometry})", flush=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng, crop, t0 = np.random.default_rng(0), 96, time.time()
    for it in range(args.steps):
        batch = []
        for _ in range(16):
            t, lr, v, _ = data[int(rng.integers(len(data)))]
            y = int(rng.integers((t.shape[0] - crop) // step)) * step
            x = int(rng.integers((t.shape[1] - crop) // step)) * step
            batch.append([t[y:y + crop, x:x + crop], v[y:y + crop, x:x + crop],
                          lr[y // step:(y + crop) // step, x // step:(x + crop) // step]])
        t, v, lr = (torch.from_numpy(np.stack(a))[:, None] for a in zip(*batch, strict=True))
        net.eval()  # batch norm on running statistics; gradients still flow
        loss = ((net(lr, v) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % args.report_every == 0:
            print(f"step {it + 1} ({time.time() - t0:.0f} s): gain over bicubic "
                  f"{mean_gain():+.3f} dB", flush=True)


if __name__ == "__main__":
    main()
