"""``cscfusion train``: the command-line front of ``training.train`` (registered by the main CLI
through ``add_train_parser``; also runnable as ``python -m napari_cscfusion.training.cli``)."""

from __future__ import annotations

import argparse
import json

from ..models.mmfn import GEOMETRIES as MMF_GEOMETRIES
from ..models.mmfn import LOW_RES_GEOMETRIES
from .data import TASKS

# Defaults per task: what produced the shipped weights (see weights/README.md).
TASK_DEFAULTS = {
    "ivf": {"epochs": 6, "batch_size": 8, "lr": 5e-3, "crop": 48},
    "mef": {"epochs": 28, "batch_size": 8, "lr": 5e-3, "crop": 64},  # stage 1
    "mmf": {"epochs": 8, "batch_size": 16, "lr": 1e-3, "crop": 64},
}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train CSC-IVFN / CSC-MEFN / CSC-MMFN weights from scratch or fine-tune",
        description="Train a CSC fusion network on the project's training data and write it in "
                    "the package's weights format (plus <out>.best.pt, <out>.state.pt for "
                    "--resume, <out>.log.csv). Defaults per task: "
                    + "; ".join(f"{t}: {d}" for t, d in TASK_DEFAULTS.items()))
    p.add_argument("task", choices=TASKS, help="ivf (infrared+visible), mef (multi-exposure), "
                                               "mmf (thermal guided super-resolution)")
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak Adam learning rate")
    p.add_argument("--crop", type=int, default=None, help="training crop size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:n]")
    p.add_argument("--init", default=None, help="fine-tune from this weights file (any format "
                                                "the loader reads)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly after this many minutes (resumable)")
    p.add_argument("--data-root", default=None,
                   help="folder holding ivf/flir_train and mef/hdr (default: $CSCFUSION_DATA_ROOT "
                        "or ../shared/data next to the source checkout)")
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--code-channels", type=int, default=None, help="architecture (mmf only)")
    p.add_argument("--num-dcus", type=int, default=None, help="architecture (mmf only)")
    p.add_argument("--guide-dcus", type=int, default=None, metavar="N",
                   help="mmf: DCUs of the guide's backbone (default --num-dcus); with --init, "
                        "the extra units start as copies of the file's last one")
    p.add_argument("--geometry", choices=MMF_GEOMETRIES, default=None,
                   help="mmf: 'low_res' keeps the low-res input at its resolution, fits the "
                        "guided filter there and adds a bicubic base (models.mmfn; the input "
                        "is then the plain low-res crop); 'low_res_detail' adds the input's "
                        "codes that the fit leaves (the packaged mmf.pt); default 'authors' "
                        "(bicubic pre-upsampled input)")
    p.add_argument("--scales", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="mmf: downsampling scale per batch, half the batches an integer in "
                        "LO..HI, half uniform in [LO, HI] (default 2 4)")
    p.add_argument("--flat-guide", action="store_true",
                   help="mmf: every training guide a constant at its crop's mean: the network "
                        "trained without a guide (a baseline for what the guide adds, not a "
                        "guided model)")
    p.add_argument("--halo-weight", type=float, default=0.0, help="mef: weight of mean|grad Y|")
    p.add_argument("--counts", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="mef: exposures per training bracket, random in LO..HI (default 2 16)")
    p.add_argument("--spacing", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="mef: EV between neighbouring exposures (default 0.5 3)")
    p.add_argument("--black-level", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="mef: simulated camera black level in display units (default 0 0.08)")
    p.add_argument("--cover-prob", type=float, default=None,
                   help="mef: share of brackets covering the crop's dynamic range (default 0.5)")
    p.add_argument("--exposure-prior", type=float, default=None, metavar="SIGMA",
                   help="mef: add each exposure's global well-exposedness, "
                        "-(mean - 0.5)^2 / (2 SIGMA^2), to its logits (0.2: MEF-SSIM's sigma_g; "
                        "default: that of --init weights, if any; 0: none)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="train with batch norm on its running statistics (as at inference)")
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="first recompute batch-norm statistics over N training batches")
    p.add_argument("--max-grad-norm", type=float, default=None, metavar="NORM",
                   help="clip the gradients' global norm to NORM before each step (default: "
                        "no clipping); for wide networks whose loss blows up")
    p.add_argument("--nonnegative-thresholds", action="store_true",
                   help="clamp every soft threshold at >= 0 at the start and after every step "
                        "(a true shrinkage: sparse codes by construction)")
    p.add_argument("--sparsity-weight", type=float, default=0.0, metavar="W",
                   help="add W * mean|codes| to the loss (ivf: detail codes; mef: codes after "
                        "the last DCU; mmf: both backbones)")
    p.add_argument("--black-weight", type=float, default=0.0, metavar="W",
                   help="ivf: add W * the black term (two black sources must decode to at "
                        "most --black-target at code gains >= 1)")
    p.add_argument("--black-target", type=float, default=None, metavar="GREY_LEVELS",
                   help="ivf: the black term's hinge in grey levels of 255, i.e. 0.1 means "
                        "black must decode to at most 0.1/255 (default 0.5, recorded in the "
                        "header as a fraction of 1: black_target)")
    p.add_argument("--edge-weight", type=float, default=0.0, metavar="W",
                   help="ivf: add W * mean|grad recon - grad x| (edges and detail kept in the "
                        "reconstruction; the authors' loss has only MSE and SSIM)")
    p.add_argument("--tone-weight", type=float, default=0.0, metavar="W",
                   help="ivf: add W * mean|blur recon - blur x| (local mean tones kept; the "
                        "L1 on the codes otherwise darkens bright areas by a few grey levels)")
    p.add_argument("--flat-weight", type=float, default=0.0, metavar="W",
                   help="ivf: add W * the flat-fidelity term (flat greys 2-98 %% decode to "
                        "themselves at code gain 1, white stays white)")
    p.add_argument("--min-val-sparsity", type=float, default=None, metavar="FRACTION",
                   help="epochs whose validation codes have fewer exact zeros are not "
                        "eligible as <out>.best.pt")
    p.add_argument("--threshold-warm-start", type=float, default=None, metavar="FRACTION",
                   help="first raise the last units' soft thresholds so that about FRACTION "
                        "of the codes are zero (per-channel quantiles on training batches)")
    p.add_argument("--threshold-floor", type=float, default=None, metavar="FRACTION",
                   help="keep the last units' soft thresholds at or above the running "
                        "FRACTION quantile of their inputs after every step")
    p.add_argument("--extremes", type=float, default=None, metavar="P",
                   help="ivf: share of training crops given black borders/masks, clipped "
                        "highlights or flat areas (training.data.add_extremes; default 0)")
    p.add_argument("--photometric", type=float, default=None, metavar="P",
                   help="ivf: share of training crops brightened by a random gamma and gain, "
                        "clipped at 1 (training.data.add_photometric; default 0)")
    p.add_argument("--keep-epochs", action="store_true",
                   help="also write every finished epoch's weights as <out>.e<N>.pt")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    import torch

    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    d = TASK_DEFAULTS[args.task]
    hparams = {}
    if args.code_channels or args.num_dcus:
        if args.task != "mmf":
            raise SystemExit("--code-channels/--num-dcus are only for mmf (ivf and mef keep the "
                             "authors' architecture)")
        if args.code_channels:
            hparams["code_channels"] = args.code_channels
        if args.num_dcus:
            hparams["num_dcus"] = args.num_dcus
    if args.guide_dcus is not None:
        if args.task != "mmf" or args.guide_dcus < 1:
            raise SystemExit(f"--guide-dcus: a number >= 1, for mmf only (got "
                             f"{args.guide_dcus} for {args.task})")
        hparams["guide_num_dcus"] = args.guide_dcus
    source = {}
    if args.geometry is not None:
        if args.task != "mmf":
            raise SystemExit("--geometry is only for mmf")
        hparams["geometry"] = args.geometry
        source["lr_input"] = "native" if args.geometry in LOW_RES_GEOMETRIES else "bicubic"
    if args.scales is not None:
        if args.task != "mmf":
            raise SystemExit("--scales is only for mmf")
        lo, hi = args.scales
        if not 1 < lo <= hi:
            raise SystemExit(f"--scales: expected 1 < LO <= HI, got {lo:g} {hi:g}")
        source["scales"] = (lo, hi)
    if args.flat_guide:
        if args.task != "mmf":
            raise SystemExit("--flat-guide is only for mmf")
        source["flat_guide"] = True
    for opt, key in (("counts", "counts"), ("spacing", "spacing"), ("black_level", "black"),
                     ("cover_prob", "cover_prob")):
        if getattr(args, opt) is not None:
            if args.task != "mef":
                raise SystemExit(f"--{opt.replace('_', '-')} is only for mef")
            source[key] = tuple(v) if isinstance(v := getattr(args, opt), list) else v
    for opt in ("extremes", "photometric"):
        if getattr(args, opt) is not None:
            if args.task != "ivf":
                raise SystemExit(f"--{opt} is only for ivf")
            source[opt] = getattr(args, opt)
    if args.black_target is not None:
        if args.task != "ivf":
            raise SystemExit("--black-target is only for ivf")
        if not 0 < args.black_target < 255:
            raise SystemExit(f"--black-target: grey levels in (0, 255), got {args.black_target}")
    path = train(TrainConfig(
        task=args.task, out=args.out, data_root=args.data_root,
        epochs=d["epochs"] if args.epochs is None else args.epochs,
        batch_size=args.batch_size or d["batch_size"],
        lr=args.lr or d["lr"], crop=args.crop or d["crop"], seed=args.seed, device=args.device,
        init_weights=args.init, resume=args.resume, max_minutes=args.max_minutes,
        progress=not args.no_progress, hparams=hparams or None,
        steps_per_epoch=args.steps_per_epoch, schedule=args.schedule,
        warmup_steps=args.warmup_steps, halo_weight=args.halo_weight,
        freeze_bn=args.freeze_bn, recalibrate_batches=args.recalibrate_bn,
        source_options=source or None, exposure_prior_sigma=args.exposure_prior,
        max_grad_norm=args.max_grad_norm, nonnegative_thresholds=args.nonnegative_thresholds,
        sparsity_weight=args.sparsity_weight, black_weight=args.black_weight,
        flat_weight=args.flat_weight, edge_weight=args.edge_weight,
        tone_weight=args.tone_weight,
        **({"black_target": args.black_target / 255} if args.black_target is not None else {}),
        min_val_sparsity=args.min_val_sparsity, threshold_warm_start=args.threshold_warm_start,
        threshold_floor=args.threshold_floor, keep_epochs=args.keep_epochs,
    ))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    print(f"wrote {path}")
    print(json.dumps(raw["training"], indent=1, default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_cscfusion.training.cli")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
