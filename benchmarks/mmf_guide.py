"""Does the guide matter? CSC-MMFN guide ablation (issue 17 item 4): PSNR with the real guide,
with a flat guide (a constant image at the guide's mean) and of bicubic upsampling, at x2, x3,
x4, on thermal and non-thermal guided super-resolution.

    nice -n 10 .venv/bin/python benchmarks/mmf_guide.py [--weights A.pt B.pt ...] \
        [--sets val,flir_test,s2,aloe,motorcycle] [--scales 2 3 4] [--limit N] [--threads 1]

Sets (each image cropped to a multiple of 12 px so that every scale has whole low-res pixels;
low-res = cv2.INTER_AREA downsampling of the target; the network input prepared as the
weights' header says, ``training.data.prepare_mmf_lr``; bicubic = cv2.INTER_CUBIC, clipped;
guided filter = ``baselines.guided_filter_upsample`` with quality.py's settings, r 2, eps 1e-4):

- ``val``: the flir_train validation split (pairs with index % 10 == 0), whole images: the only
  set used to choose weights.
- ``flir_test``: FLIR-test, thermal guided by visible (grey), all 40 pairs (``--limit``).
- ``s2``: spyndex's bundled Sentinel-2 10 m scene (300 x 300, bands B, G, R, NIR), NIR guided
  by the luminance of RGB; each band divided by its maximum (needs ``pip install --no-deps
  spyndex``: only its data file is read).
- ``aloe``: Middlebury 2006 Aloe disparity (../shared/data/guided, at half size, 0 =
  unknown), guided by the luminance of the left view; ``motorcycle``: scikit-image's
  ``stereo_motorcycle`` disparity (inf = unknown) and left view. Disparity divided by its
  largest known value; unknown pixels filled (cv2.inpaint, Navier-Stokes) before
  downsampling and left out of the PSNR.

Prints one markdown table per weights file. An evaluation only: test sets never choose.
"""

from __future__ import annotations

import argparse
import json
from importlib import util
from pathlib import Path

import cv2
import numpy as np
import torch
from quality import GUIDED_EPS, GUIDED_R, ivf_pairs  # benchmarks/quality.py

from napari_cscfusion import baselines as B
from napari_cscfusion.models import load_network
from napari_cscfusion.models.color import luma
from napari_cscfusion.training import data as D

PKG_WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_cscfusion" / "weights"
MULTIPLE = 12  # lcm of 2, 3, 4


def _crop(*arrays):
    h, w = arrays[0].shape[:2]
    h, w = h - h % MULTIPLE, w - w % MULTIPLE
    return [a[:h, :w] for a in arrays]


def _fill(disp: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    return cv2.inpaint(disp.astype(np.float32), unknown.astype(np.uint8), 5, cv2.INPAINT_NS)


def load_set(name: str, root: Path, limit: int | None):
    """[(target (H, W) in [0, 1], guide (H, W) in [0, 1], mask of scored pixels or None)]."""
    if name in ("val", "flir_test"):
        pairs = (D.flir_pairs(root, "val") if name == "val"
                 else ivf_pairs(root / "ivf" / "flir_test"))[:limit]
        return [(*_crop(D.read_grey(a), D.read_grey(b)), None) for a, b in pairs]
    if name == "s2":
        spec = util.find_spec("spyndex")
        if spec is None:
            raise SystemExit("s2: pip install --no-deps spyndex (only its S2_10m.json is read)")
        path = Path(spec.origin).parent / "data" / "S2_10m.json"
        bands = np.asarray(json.loads(path.read_text()), np.float32)  # B, G, R, NIR
        bands = bands / bands.reshape(4, -1).max(1)[:, None, None]
        guide = luma(np.stack([bands[2], bands[1], bands[0]], -1)).astype(np.float32)
        return [(*_crop(bands[3], guide), None)]
    if name == "aloe":
        disp = cv2.imread(str(root / "guided" / "aloeGT.png"), cv2.IMREAD_UNCHANGED)
        rgb = cv2.cvtColor(cv2.imread(str(root / "guided" / "aloeL.jpg")), cv2.COLOR_BGR2RGB)
        h, w = disp.shape[0] // 2, disp.shape[1] // 2
        # a half-size pixel is unknown where any of its 2 x 2 full-size pixels is
        unknown = (disp[:2 * h, :2 * w] == 0).reshape(h, 2, w, 2).any((1, 3))
        disp = cv2.resize(disp.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    elif name == "motorcycle":
        import skimage.data

        rgb, _, disp = skimage.data.stereo_motorcycle()
        unknown = ~np.isfinite(disp)
        disp = np.where(unknown, 0, disp).astype(np.float32)
    else:
        raise SystemExit(f"unknown set {name!r}")
    disp = _fill(disp / disp[~unknown].max(), unknown)
    guide = luma(rgb.astype(np.float32) / 255.0).astype(np.float32)
    t, g, known = _crop(np.clip(disp, 0, 1), guide, ~unknown)
    return [(t, g, known)]


def psnr(pred: np.ndarray, target: np.ndarray, mask) -> float:
    d = (pred - target) ** 2
    mse = float(d[mask].mean() if mask is not None else d.mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(net, lr_input: str, items, scales) -> dict:
    """{scale: (bicubic, guided filter, real guide, flat guide) mean PSNR}."""
    out = {}
    for s in scales:
        rows = []
        for target, guide, mask in items:
            h, w = target.shape
            lr = D.area_downsample(target, s)
            bic = np.clip(cv2.resize(lr, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
            x = torch.from_numpy(D.prepare_mmf_lr(lr, (h, w), lr_input))[None, None]
            gf = B.guided_filter_upsample(lr, guide, (h, w), GUIDED_R, GUIDED_EPS)
            row = [psnr(bic, target, mask), psnr(gf, target, mask)]
            for g in (guide, np.full_like(guide, guide.mean())):
                pred = net(x, torch.from_numpy(np.ascontiguousarray(g))[None, None])
                row.append(psnr(pred.clamp(0, 1)[0, 0].numpy(), target, mask))
            rows.append(row)
        out[s] = np.mean(rows, 0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="+", default=[str(PKG_WEIGHTS / "mmf.pt")])
    ap.add_argument("--sets", default="val,flir_test,s2,aloe,motorcycle")
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--limit", type=int, default=None, help="pairs per FLIR set")
    ap.add_argument("--data", type=Path, default=None, help="default ../shared/data")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = D.resolve_data_root(args.data)
    sets = {name: load_set(name, root, args.limit) for name in args.sets.split(",")}
    for path in args.weights:
        net, info = load_network("mmf", path)
        lr_input = info.get("header", {}).get("training", {}).get("lr_input", "native")
        print(f"\n{path}: geometry {net.geometry}, lr_input {lr_input}, sha256 "
              f"{info['sha256'][:8]}")
        print("| set | scale | bicubic | guided filter | real guide | flat guide "
              "| real - bicubic | real - flat |\n| --- | --- | ---: | ---: | ---: | ---: | ---: "
              "| ---: |")
        for name, items in sets.items():
            for s, (bic, gf, real, flat) in evaluate(net, lr_input, items, args.scales).items():
                print(f"| {name} ({len(items)}) | x{s} | {bic:.2f} | {gf:.2f} | {real:.2f} "
                      f"| {flat:.2f} | {real - bic:+.2f} | {real - flat:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
