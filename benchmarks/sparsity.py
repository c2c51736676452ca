"""Sparsity and black-in/black-out of CSC-IVFN and CSC-MEFN weights (issue 17), with the engine's
default settings, on real images.

    .venv/bin/python benchmarks/sparsity.py [--ivf W ...] [--mef W ...] [--pairs 4]

For every IVF weights file (default: packaged ivf.pt and medical.pt, the authors'): the
fraction of exact zeros of the infrared / visible / fused detail codes and of the base codes on
the first ``--pairs`` TNO pairs (fuse_infrared_visible, default rules and code gain 2); the
largest value (grey levels) two all-black 64x64 sources fuse to at code gains 1, 2, 4, at 0.5
and 0.1, and through fuse_multimodal; the PSNR of a TNO infrared image with black borders and
clipped highlights fused with itself (fuse_multimodal, gain 1). For every MEF weights file: the
zeros of the codes of the 16 Memorial exposures (fuse_exposures; also split into dark
exposures, mean luma < 0.2, and the others) and the black-in value. Markdown to stdout.
Nothing here chooses weights (that is the validation split, see weights/README.md).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from napari_cscfusion import fuse_exposures, fuse_infrared_visible, load_model
from napari_cscfusion.engine.medical import fuse_multimodal

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CKPT = ROOT.parent / "shared" / "reference-checkpoints"
GAINS = (1.0, 2.0, 4.0)  # black is held from gain 1 up (weights/README.md)
LOW_GAINS = (0.5, 0.1)
INTENSITY_BANDS = ((0.0, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 0.9), (0.9, 1.0), (1.0, 1.01))
DARK_EXPOSURE = 0.2  # mean luma (0-1) below which an exposure counts as dark


def _read(path: Path) -> np.ndarray:
    a = np.asarray(iio.imread(path))
    return a[..., 0] if a.ndim == 3 else a


def _pairs(n: int) -> list[tuple[Path, Path]]:
    folder = DATA / "ivf" / "tno"
    irs = sorted(folder.glob("IR*.png"), key=lambda p: int(re.search(r"\d+", p.stem).group()))
    return [(p, folder / p.name.replace("IR", "VIS")) for p in irs][:n]


def with_extremes(img: np.ndarray) -> np.ndarray:
    """Black borders (12 px top, 20 px left) and the brightest 10 % clipped (as the tests)."""
    out = np.clip(img / np.quantile(img, 0.9), 0.0, 1.0).astype(np.float32)
    out[:12] = 0.0
    out[:, :20] = 0.0
    return out


def self_fusion_row(label: str, weights, ir_path: Path) -> str:
    """Where a source fused with itself (fuse_multimodal, gain 1) loses: PSNR of the plain
    image, with the black borders only, with the brightest 10 % clipped only, with both; and
    the mean error (fused − source, grey levels) of the clipped image by source intensity."""
    model = _ivf_model(weights)
    plain = _read(ir_path).astype(np.float32) / 255
    borders = plain.copy()
    borders[:12] = 0.0
    borders[:, :20] = 0.0
    clipped = np.clip(plain / np.quantile(plain, 0.9), 0.0, 1.0).astype(np.float32)
    cells = [f"{_psnr(fuse_multimodal([img, img], model=model, device='cpu').image, img):.2f}"
             for img in (plain, borders, clipped, with_extremes(plain))]
    err = fuse_multimodal([clipped, clipped], model=model, device="cpu").image - clipped
    for lo, hi in INTENSITY_BANDS:
        band = (clipped >= lo) & (clipped < hi)
        cells.append(f"{255 * float(err[band].mean()):+.1f}" if band.any() else "–")
    print(f"self-fusion {label}: done", file=sys.stderr, flush=True)
    return f"| {label} | " + " | ".join(cells) + " |"


def _ivf_model(weights):
    """A CSC-IVFN: 'ivf' / 'medical' for the packaged ivf.pt / medical.pt, else a path."""
    return load_model(weights) if weights in ("ivf", "medical") else load_model("ivf", weights)


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ivf_row(label: str, weights, pairs) -> str:
    model = _ivf_model(weights)
    zeros: dict[str, list[float]] = {}
    for ir_p, vis_p in pairs:
        res = fuse_infrared_visible(_read(ir_p), _read(vis_p), model=model, codes=True,
                                    device="cpu")
        for key, code in res.codes.items():
            zeros.setdefault(key, []).append(float(np.mean(code == 0)))
    black = np.zeros((64, 64), np.float32)
    worst = max(float(fuse_infrared_visible(black, black, model=model, code_gain=g,
                                            device="cpu").image.max()) for g in GAINS)
    low = [255 * float(fuse_infrared_visible(black, black, model=model, code_gain=g,
                                             device="cpu").image.max()) for g in LOW_GAINS]
    medical = float(fuse_multimodal([black, black], model=model, device="cpu").image.max())
    x = with_extremes(_read(pairs[0][0]).astype(np.float32) / 255)
    self_psnr = _psnr(fuse_multimodal([x, x], model=model, device="cpu").image, x)
    z = {k: 100 * float(np.mean(v)) for k, v in zeros.items()}
    print(f"ivf {label}: done", file=sys.stderr, flush=True)
    return (f"| {label} | {z['infrared_detail']:.1f} | {z['visible_detail']:.1f} | "
            f"{z['fused_detail']:.1f} | {z['fused_base']:.1f} | {255 * worst:.3f} | "
            f"{low[0]:.2f} / {low[1]:.2f} | "
            f"{255 * medical:.3f} | {self_psnr:.2f} |")


def mef_row(label: str, weights) -> str:
    model = load_model("mef", weights) if weights is not None else load_model("mef")
    files = sorted((DATA / "mef" / "memorial").glob("*.png"))
    stack = np.stack([np.asarray(iio.imread(f))[..., :3] for f in files])
    res = fuse_exposures(stack, model=model, codes=True, device="cpu")
    per = np.array([np.mean(res.codes[f"exposure_{i}"] == 0) for i in range(len(stack))])
    zeros = float(per.mean())
    # why Memorial has fewer zeros than the validation brackets: most of its 16 exposures are
    # dark and flat (the camera's floor), where several channels answer the flat level itself
    dark = stack.astype(np.float64) @ [0.299, 0.587, 0.114] / 255
    dark = dark.mean((1, 2)) < DARK_EXPOSURE
    black = float(fuse_exposures(np.zeros((3, 64, 64, 3), np.float32), model=model,
                                 device="cpu").image.max())
    print(f"mef {label}: done", file=sys.stderr, flush=True)
    return (f"| {label} | {100 * zeros:.1f} | {100 * per[dark].mean():.1f} ({dark.sum()}) | "
            f"{100 * per[~dark].mean():.1f} ({(~dark).sum()}) | {255 * black:.3f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ivf", nargs="*", default=None, help="IVF weights (default: packaged "
                                                          "ivf.pt and medical.pt, authors')")
    p.add_argument("--mef", nargs="*", default=None, help="MEF weights (default: packaged, "
                                                          "authors'; --mef alone: none)")
    p.add_argument("--pairs", type=int, default=4, help="TNO pairs (first N)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    ivf = {w: w for w in a.ivf} if a.ivf else {"packaged ivf.pt": "ivf",
                                                "packaged medical.pt": "medical", "authors'": CKPT}
    mef = {w: w for w in a.mef} if a.mef is not None else {"packaged mef.pt": None,
                                                "authors'": CKPT / "csc_mefn_authors.pth"}
    pairs = _pairs(a.pairs)
    print(f"### CSC-IVFN: zeros of the codes (%), first {len(pairs)} TNO pairs, default "
          f"settings; black in, black out; self-fusion\n")
    print("| weights | IR detail | VIS detail | fused detail | fused base | black, gains "
          "1-4 (max, grey levels) | black, gain 0.5 / 0.1 | black, medical | self-fusion PSNR "
          "(dB, borders + clipping) |")
    print("| --- |" + " ---: |" * 8)
    for label, w in ivf.items():
        print(ivf_row(label, w, pairs))
    bands = " | ".join(f"error at {lo:g}–{min(hi, 1):g}" if hi <= 1 else "error at 1 (clipped)"
                       for lo, hi in INTENSITY_BANDS)
    print(f"\n### CSC-IVFN: a source fused with itself (medical defaults, gain 1), "
          f"{pairs[0][0].name}: PSNR (dB) and mean error (grey levels)\n")
    print(f"| weights | plain | black borders | 10 % clipped | both | {bands} |")
    print("| --- |" + " ---: |" * (4 + len(INTENSITY_BANDS)))
    for label, w in ivf.items():
        print(self_fusion_row(label, w, pairs[0][0]))
    if not mef:
        return
    print("\n### CSC-MEFN: zeros of the codes (%), Memorial (16 exposures); black in\n")
    print(f"| weights | codes zeros | dark exposures (mean luma < {DARK_EXPOSURE}, count) | "
          "the others | black (max, grey levels) |\n| --- | ---: | ---: | ---: | ---: |")
    for label, w in mef.items():
        print(mef_row(label, w))


if __name__ == "__main__":
    main()
