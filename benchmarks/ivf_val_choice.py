"""Validation figures of CSC-IVFN weights files, to choose among a run's epochs (issue 17
items 2 and 5): on the flir_train validation split only, never on TNO / FLIR-test.

    .venv/bin/python benchmarks/ivf_val_choice.py runs/g4/ivf_a.e*.pt [...]

Per file: the reconstruction PSNR of ``train``'s validation crops (128 px; at code gain 1 a
source fused with itself is its reconstruction), the same with the brightest 10 % clipped
(``clip10``) and with black borders added too, the zero detail codes, what two black sources
decode to at code gains 1, 2, 4 (grey levels), and what flat images decode to at gain 1
(dark greys and near-white, grey levels). The choice rule of the 2026-12-07 runs, fixed
before any held-out figure was read: eligible are files with >= 72 % zero detail codes and
black <= 1/255 at gains 1-4; among them the highest mean of plain and clip10 PSNR.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from napari_cscfusion.models import load_network
from napari_cscfusion.training import data as D
from napari_cscfusion.training.train import Validator

FLAT_SHOWN = (0.02, 0.05, 0.1, 0.5, 0.9, 0.95, 1.0)
GAINS = (1.0, 2.0, 4.0)


def clip10(x: torch.Tensor) -> torch.Tensor:
    return (x / torch.quantile(x.flatten(), 0.9)).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / float(((a.double() - b.double()) ** 2).mean()))


@torch.no_grad()
def figures(net, images: torch.Tensor) -> dict[str, float]:
    plain, clipped, bordered, zeros = [], [], [], []
    for x in images:
        x = x[None]
        plain.append(psnr(net(x), x))
        c = clip10(x)
        clipped.append(psnr(net(c), c))
        b = c.clone()
        b[..., :8, :] = 0
        b[..., :, :12] = 0
        bordered.append(psnr(net(b), b))
        zeros.append(float((net.encode(x)[1] == 0).float().mean()))
    z_b, z_d = net.encode(torch.zeros(1, 1, 24, 24))
    offset = net.decoder.offset()
    slope = net.decoder(z_b + z_d) - offset
    black = max(float(torch.sigmoid(g * slope + 2 * offset).max()) * 255 for g in GAINS)
    levels = torch.tensor(FLAT_SHOWN)
    flat = net(levels[:, None, None, None].expand(-1, 1, 16, 16)).mean((1, 2, 3))
    out = {"plain": float(np.mean(plain)), "clip10": float(np.mean(clipped)),
           "border+clip10": float(np.mean(bordered)), "zeros": float(np.mean(zeros)),
           "black": black}
    out |= {f"flat {v:g}": float(f) * 255 for v, f in zip(FLAT_SHOWN, flat, strict=True)}
    out["eligible"] = out["zeros"] >= 0.72 and black <= 1.0
    out["score"] = (out["plain"] + out["clip10"]) / 2
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", nargs="+")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    images = Validator("ivf", D.resolve_data_root(None)).images
    rows = []
    for path in a.weights:
        net = load_network("ivf", path)[0].eval()
        rows.append((path, figures(net, images)))
    keys = list(rows[0][1])
    print("| weights | " + " | ".join(keys) + " |\n| --- |" + " ---: |" * len(keys))
    for path, f in rows:
        cells = [f"{100 * v:.1f} %" if k == "zeros" else str(v) if isinstance(v, bool)
                 else f"{v:.2f}" for k, v in f.items()]
        print(f"| {path} | " + " | ".join(cells) + " |")
    ok = [(f["score"], path) for path, f in rows if f["eligible"]]
    print("\nchosen by the rule:", max(ok)[1] if ok else "none eligible")


if __name__ == "__main__":
    main()
