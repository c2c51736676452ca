"""How far can CSC-MEFN's fusion form go on the real Memorial bracket? (issue 3, MEF target)

    .venv/bin/python benchmarks/mef_ceiling.py [--steps 400] [--network-steps 0]

Prints MEF-SSIM on Memorial (all 16 exposures, every 3rd) for:

- ours: the packaged ``mef.pt`` as shipped; Mertens (OpenCV) for comparison;
- free-weights ceiling, CSC-MEFN form: per-pixel weight logits [K,H,W] optimised (Adam,
  ``--steps``) on the bracket itself, softmax over K, luma = Σ_k w_k Y_k, chroma by the
  authors' saturation rule (``fuse_chroma``) — what *any* weights of this network could reach,
  even ones that see the whole bracket at once;
- free-weights ceiling, RGB form: the same, but the weights blend R, G and B (as Mertens' do);
- with ``--network-steps N``: the packaged network itself fitted to the bracket (all
  parameters, batch norm on its running statistics, −MEF-SSIM): the ceiling of this network's
  size. ~0.5 s per step on a 2-core CPU.

These are oracles computed on test data: an upper bound for the question "could better training
meet the target?", never a way to choose weights (nothing here is shipped or tuned).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from quality import read_rgb  # benchmarks/quality.py: 8-bit RGB file -> [0, 1]

from napari_cscfusion.baselines import mertens_fusion
from napari_cscfusion.metrics import mef_ssim, mef_ssim_torch
from napari_cscfusion.models import load_network
from napari_cscfusion.models.color import fuse_chroma, rgb_to_ycbcr, ycbcr_to_rgb
from napari_cscfusion.training import data as D

PKG_WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_cscfusion" / "weights"


def _score(stack: np.ndarray, fused: torch.Tensor) -> float:
    return mef_ssim(stack, fused.detach().numpy().transpose(1, 2, 0))


def free_weights_ceiling(net, stack: np.ndarray, rgb_form: bool, steps: int) -> float:
    """Best MEF-SSIM of per-pixel softmax weights optimised on ``stack`` (K,H,W,3) itself."""
    x = torch.from_numpy(np.ascontiguousarray(stack.transpose(0, 3, 1, 2)))
    ycc = rgb_to_ycbcr(x, dim=1)
    with torch.no_grad():
        logits = net.weight_logits(ycc[:, :1]).clone()  # start from the network's weights
    logits.requires_grad_(True)
    cb, cr = fuse_chroma(ycc[:, 1], dim=0), fuse_chroma(ycc[:, 2], dim=0)

    def fuse() -> torch.Tensor:
        w = torch.softmax(logits, 0)
        if rgb_form:
            return (w[:, None] * x).sum(0).clamp(0, 1)
        y = (w * ycc[:, 0]).sum(0, keepdim=True)
        return ycbcr_to_rgb(torch.cat((y, cb[None], cr[None]), 0), dim=0).clamp(0, 1)

    opt = torch.optim.Adam([logits], lr=0.05)
    best = _score(stack, fuse())
    for it in range(steps):
        opt.zero_grad()
        (-mef_ssim_torch(x, fuse())).backward()
        opt.step()
        if (it + 1) % 50 == 0 or it + 1 == steps:
            best = max(best, _score(stack, fuse()))
    return best


def network_fit_ceiling(path: Path, stack: np.ndarray, steps: int) -> float:
    """Best MEF-SSIM of the network (architecture and size of ``path``) fitted to ``stack``."""
    net = load_network("mef", path)[0].eval()  # batch norm on running statistics, as deployed
    x = torch.from_numpy(np.ascontiguousarray(stack.transpose(0, 3, 1, 2)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    best = _score(stack, net(x))
    for it in range(steps):
        opt.zero_grad()
        (-mef_ssim_torch(x, net(x))).backward()
        opt.step()
        if (it + 1) % 50 == 0 or it + 1 == steps:
            with torch.no_grad():
                best = max(best, _score(stack, net(x)))
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="default ../shared/data")
    ap.add_argument("--weights", type=Path, default=PKG_WEIGHTS / "mef.pt")
    ap.add_argument("--steps", type=int, default=400, help="Adam steps of the free weights")
    ap.add_argument("--network-steps", type=int, default=0,
                    help="Adam steps fitting the network to the bracket (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = D.resolve_data_root(args.data) / "mef" / "memorial"
    mem = np.stack([read_rgb(f) for f in sorted(folder.glob("memorial_*.png"))])
    mem = mem.astype(np.float32)  # the network's dtype
    net = load_network("mef", args.weights)[0].eval()
    print("| Memorial bracket | ours | Mertens | ceiling, CSC-MEFN form | ceiling, RGB form |"
          + (" network fitted to it |" if args.network_steps else ""))
    print("| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if args.network_steps else ""))
    for name, st in (("all 16 exposures", mem), ("every 3rd (6)", mem[::3])):
        x = torch.from_numpy(np.ascontiguousarray(st.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            ours = _score(st, net(x))
        row = [ours, mef_ssim(st, mertens_fusion(st)),
               free_weights_ceiling(net, st, False, args.steps),
               free_weights_ceiling(net, st, True, args.steps)]
        if args.network_steps:
            row.append(network_fit_ceiling(args.weights, st, args.network_steps))
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
