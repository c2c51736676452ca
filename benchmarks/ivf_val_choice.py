"""Validation figures of CSC-IVFN weights files, to choose among a run's epochs (issue 17
items 2 and 5): on the flir_train validation split only, never on TNO / FLIR-test.

    .venv/bin/python benchmarks/ivf_val_choice.py runs/g4/ivf_a.e*.pt [...]

Per file: the reconstruction PSNR of ``train``'s validation crops (128 px; at code gain 1 a
source fused with itself is its reconstruction), the same with the brightest 10 % clipped
(``clip10``) and with black borders added too, the zero detail codes, what two black sources
decode to at code gains 1, 2, 4 (grey levels), and what flat images decode to at gain 1
(dark greys and near-white, grey levels). The choice rule of the 2026-12-07 runs (STAGE=6),
fixed before any held-out figure was read: eligible are files with >= 72 % zero detail codes
and black <= 1/255 at gains 1-4; among them the highest mean of plain and clip10 PSNR.

The rule of the STAGE=7 runs (``--fusion-ref``, written down before any TNO / FLIR-test /
Harvard figure of those runs was read):

1. eligible: >= ``--min-zeros`` (73 %) zero detail codes and black <= ``--max-black`` (0.25
   grey levels) at gains 1-4 (0.5 lifted the Harvard background enough to lose MRI/CT SSIM;
   0.1 kept it), the validation zeros ~1-2 points above TNO's (stage 5, A6, D1);
2. PSNR score: the mean of plain and clip10 PSNR; per run (the file name without
   ``.e<N>.pt``) its ``--fusion-top`` (1) best eligible epoch goes on (2 when written; 1 for
   the CPU time, set before any figure of the finalists was read);
3. item 5 on validation: fuse_infrared_visible's defaults on the 18 flir_train validation
   pairs (whole images), MI / VIF / Qabf / SSIM against ``--fusion-ref`` (the first
   generation); chosen is the file with the fewest of the four more than 1 % below it, then
   the smallest worst loss, then the highest PSNR score (the shipping test of issue 17's item
   5, on validation pairs instead of TNO / FLIR-test).

The rule of the 2026-12-07 morning runs (``--fusion-ref ... --rank-by recon_qabf --fusion-top
2``, written down before any held-out figure of those runs was read): as above, but step 2
ranks a run's eligible epochs by the Qabf of the self-reconstruction of 18 whole flir_train
validation images (9 infrared, 9 visible: ``recon_qabf``), not by PSNR. On the five files
measured before (first generation, stage 5, A6, D1, H1) it orders them as their
validation-pair and their TNO / FLIR-test fusion Qabf do (0.937 > 0.907 > 0.897 > 0.893 ~
0.894); the reconstruction PSNR orders them the other way.

The rule of the 2026-12-07 tone runs (STAGE=9: ``--rank-by border_clip --min-recon-qabf
0.9304 --fusion-top 2``, written down before any figure of those runs): eligible epochs must
also keep the recon Qabf within 0.002 of the packaged file's (0.9324); a run's eligible epochs
are ranked by the PSNR of the validation crops with black borders and 10 % clipped (item 2).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from napari_cscfusion import load_model
from napari_cscfusion import metrics as M
from napari_cscfusion.models import load_network
from napari_cscfusion.models.checkpoints import sha256_of
from napari_cscfusion.training import data as D
from napari_cscfusion.training.train import Validator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivf_weights_compare import KEYS, score_pair  # noqa: E402
from quality import read_grey  # noqa: E402

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
    out["score"] = (out["plain"] + out["clip10"]) / 2
    return out


def validation_images(per_kind: int = 9) -> list[np.ndarray]:
    """The first ``per_kind`` infrared and visible images of the flir_train validation pairs."""
    pairs = D.flir_pairs(D.resolve_data_root(None), "val")[:per_kind]
    return [read_grey(ir) for ir, _ in pairs] + [read_grey(vis) for _, vis in pairs]


@torch.no_grad()
def recon_qabf(net, images: list[np.ndarray]) -> float:
    """Mean Qabf of each image's reconstruction (at code gain 1 a source fused with itself)
    against the image: how well the network keeps edges, which no PSNR figure tells."""
    scores = []
    for a in images:
        r = net(torch.from_numpy(a.astype(np.float32))[None, None])[0, 0].double().numpy()
        scores.append(M.qabf([a], r))
    return float(np.mean(scores))


def val_fusion(path: str, cache: dict, cache_path: Path) -> dict[str, float]:
    """Mean MI / VIF / Qabf / SSIM of fuse_infrared_visible's defaults over the flir_train
    validation pairs, per-pair scores cached by the weights' sha256."""
    digest, model, rows = sha256_of(path), None, []
    for ir_p, vis_p in D.flir_pairs(D.resolve_data_root(None), "val"):
        key = f"{digest}:flir_val:{ir_p.name}"
        if key not in cache:
            model = model or load_model("ivf", path)
            cache[key] = score_pair(model, ir_p, vis_p)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
        rows.append(cache[key])
    return {k: float(np.mean([r[k] for r in rows])) for k in KEYS}


def run_of(path: str) -> str:
    return re.sub(r"\.e\d+\.pt$", "", path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", nargs="+")
    p.add_argument("--fusion-ref", default=None,
                   help="the STAGE=7 rule: the file the validation fusion figures are held "
                        "against (the first generation); without it, the STAGE=6 rule")
    p.add_argument("--min-zeros", type=float, default=0.73)
    p.add_argument("--max-black", type=float, default=0.25, help="grey levels")
    p.add_argument("--fusion-top", type=int, default=1)
    p.add_argument("--rank-by", choices=("psnr", "recon_qabf", "border_clip"), default="psnr",
                   help="step 2's ranking: the PSNR score (STAGE=7 runs), the "
                        "self-reconstruction Qabf of whole validation images (STAGE=8) or the "
                        "border+clip10 PSNR (STAGE=9)")
    p.add_argument("--min-recon-qabf", type=float, default=None,
                   help="eligible only with at least this self-reconstruction Qabf")
    p.add_argument("--cache", type=Path, default=Path("runs/ivf_val_fusion.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    images = Validator("ivf", D.resolve_data_root(None)).images
    whole = (validation_images() if a.rank_by != "psnr" or a.min_recon_qabf is not None
             else [])
    rows = []
    for path in a.weights:
        net = load_network("ivf", path)[0].eval()
        f = figures(net, images)
        if whole:
            f["recon_qabf"] = recon_qabf(net, whole)
        f["eligible"] = (f["zeros"] >= 0.72 and f["black"] <= 1.0 if a.fusion_ref is None
                         else f["zeros"] >= a.min_zeros and f["black"] <= a.max_black
                         and (a.min_recon_qabf is None or f["recon_qabf"] >= a.min_recon_qabf))
        rows.append((path, f))
    keys = list(rows[0][1])
    print("| weights | " + " | ".join(keys) + " |\n| --- |" + " ---: |" * len(keys))
    for path, f in rows:
        cells = [f"{100 * v:.1f} %" if k == "zeros" else str(v) if isinstance(v, bool)
                 else f"{v:.4f}" if k == "recon_qabf" else f"{v:.2f}" for k, v in f.items()]
        print(f"| {path} | " + " | ".join(cells) + " |")
    rank = {"psnr": "score", "recon_qabf": "recon_qabf", "border_clip": "border+clip10"}[
        a.rank_by]
    ok = [(f[rank], path) for path, f in rows if f["eligible"]]
    if a.fusion_ref is None or not ok:
        print("\nchosen by the rule:", max(ok)[1] if ok else "none eligible")
        return
    runs: dict[str, list] = {}
    for score, path in sorted(ok, reverse=True):
        runs.setdefault(run_of(path), []).append((score, path))
    finalists = [sp for best in runs.values() for sp in best[:a.fusion_top]]
    cache = json.loads(a.cache.read_text()) if a.cache.is_file() else {}
    ref = val_fusion(a.fusion_ref, cache, a.cache)
    print(f"\n#### flir_train validation pairs, fuse_infrared_visible defaults "
          f"(change against {a.fusion_ref})\n")
    print("| weights | " + " | ".join(KEYS) + f" | > 1 % below | worst | {rank} |\n| --- |"
          + " ---: |" * (len(KEYS) + 3))
    print(f"| {a.fusion_ref} | " + " | ".join(f"{ref[k]:.4f}" for k in KEYS) + " | | | |")
    ranked = []
    for score, path in finalists:
        m = val_fusion(path, cache, a.cache)
        change = {k: 100 * (m[k] / ref[k] - 1) for k in KEYS}
        below, worst = sum(c < -1 for c in change.values()), min(change.values())
        ranked.append(((below, -worst, -score), path))
        print(f"| {path} | " + " | ".join(f"{m[k]:.4f} ({change[k]:+.1f} %)" for k in KEYS)
              + f" | {below} | {worst:+.1f} % | {score:.4f} |")
    print("\nchosen by the rule:", min(ranked)[1])


if __name__ == "__main__":
    main()
