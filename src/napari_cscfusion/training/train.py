"""Training loop for the three CSC networks (engine layer: torch, no napari).

``train(TrainConfig(task=..., out=..., ...))`` (or ``train(task, out, ...)``) writes, next to
``out``:
- ``out``: the latest weights in the package format (``save_checkpoint``), rewritten every epoch
  (and when a time limit or Ctrl-C stops the run);
- ``<out>.best.pt``: the weights of the epoch with the best validation score (validation split of
  the training data, never the held-out test sets);
- ``<out>.state.pt``: optimizer state + position for ``resume=True``;
- ``<out>.log.csv``: one row per epoch (train loss, validation score, learning rate, time).

Batches are a pure function of (seed, epoch, step) and the network is initialised from
``torch.manual_seed(seed)``: the same arguments give the same weights, and a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.device import resolve_device
from ..models import CSCIVFN, CSCMEFN, CSCMMFN, load_network, save_checkpoint
from ..models.checkpoints import sha256_of
from ..models.color import rgb_to_ycbcr
from ..models.csc import SoftThreshold
from ..models.mmfn import LOW_RES_GEOMETRIES, deepen_guide
from . import data as D
from .losses import (
    BLACK_LEVEL,
    FLAT_LEVELS,
    TONE_SIGMA,
    code_l1,
    halo_term,
    ivf_black_term,
    ivf_flat_term,
    ivf_loss,
    ivf_tone_term,
    mef_loss,
    mefn_fuse_batch,
    mmf_loss,
    psnr,
)

TASKS = D.TASKS

DEFAULT_HPARAMS = {
    "ivf": {"code_channels": 64, "num_dcus": 8},  # the authors' architecture
    "mef": {"code_channels": 24, "num_dcus": 2},  # the authors' architecture
    "mmf": {"lr_channels": 1, "guide_channels": 1, "code_channels": 32, "num_dcus": 3},
}
LOSS_NAMES = {
    "ivf": "MSE + 5*(1 - SSIM 3x3 Gaussian sigma 1.5)/2 (autoencoder reconstruction)",
    "mef": "-MEF-SSIM(fused RGB, bracket) (Ma et al. 2015, window 11)",
    "mmf": "MSE to the full resolution IR",
}
VAL_NAMES = {
    "ivf": "reconstruction PSNR (dB), 128x128 centre crops of the flir_train validation images",
    "mef": "MEF-SSIM (mean), 4 x 8 brackets of K = 3, 5, 9, 16 exposures simulated (default "
           "MEFBrackets camera) from 96x96 crops of the right-hand 20% of the training HDR "
           "panoramas",
    "mmf": "PSNR (dB) at x2, x3, x4 (mean), 96x96 centre crops of the flir_train validation "
           "pairs",
}


def _paths(out: Path) -> dict[str, Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {"best": out.with_name(stem + ".best.pt"), "state": out.with_name(stem + ".state.pt"),
            "log": out.with_name(stem + ".log.csv")}


def build(task: str, hparams: dict | None = None) -> nn.Module:
    hp = {**DEFAULT_HPARAMS[task], **(hparams or {})}
    return {"ivf": CSCIVFN, "mef": CSCMEFN, "mmf": CSCMMFN}[task](**hp)


def set_train_mode(net: nn.Module, freeze_bn: bool = False) -> nn.Module:
    """net.train(), with batch-norm layers left in eval mode (running statistics, not updated)
    when ``freeze_bn``: the network is then trained exactly as it runs at inference."""
    net.train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return net


@torch.no_grad()
def recalibrate_bn(net: nn.Module, src: D.BatchSource, batches: int, task: str) -> None:
    """Recompute every batch-norm layer's running statistics as the plain average over
    ``batches`` training batches (precise BN), with the weights unchanged."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for i in range(batches):
        b = {k: v.to(next(net.parameters()).device) for k, v in src.batch(0, i).items()}
        if task == "ivf":
            net(b["image"])
        elif task == "mef":
            mefn_fuse_batch(net, b["stack"])
        else:
            net(b["lr"], b["guide"])
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def compute_loss(task: str, net: nn.Module, batch: dict, halo_weight: float = 0.0,
                 sparsity_weight: float = 0.0, black_weight: float = 0.0,
                 flat_weight: float = 0.0, black_target: float = BLACK_LEVEL,
                 edge_weight: float = 0.0, tone_weight: float = 0.0):
    """The task's loss, plus ``sparsity_weight`` * mean|codes| (ivf: the detail codes; mef: the
    codes after the last DCU; mmf: both backbones' codes) and, for ivf, ``black_weight`` *
    ``ivf_black_term`` (two black sources must decode to at most ``black_target``, a grey
    level in [0, 1], at code gains >= 1) and
    ``flat_weight`` * ``ivf_flat_term`` (flat greys and white decode to themselves) and
    ``edge_weight`` * mean|grad(recon) - grad(x)| (``halo_term`` of the error: edges kept) and
    ``tone_weight`` * ``ivf_tone_term`` (local means kept)."""
    if task == "ivf":
        x = batch["image"]
        if not (sparsity_weight or black_weight or flat_weight or edge_weight or tone_weight):
            return ivf_loss(net(x), x)
        z_b, z_d = net.encode(x)
        recon = net.decode(z_b, z_d)
        loss = ivf_loss(recon, x)
        if edge_weight:
            loss = loss + edge_weight * halo_term(recon - x)
        if tone_weight:
            loss = loss + tone_weight * ivf_tone_term(recon, x)
        if sparsity_weight:
            loss = loss + sparsity_weight * code_l1(z_d)
        if black_weight:
            loss = loss + black_weight * ivf_black_term(net, level=black_target)
        if flat_weight:
            loss = loss + flat_weight * ivf_flat_term(net)
        return loss
    codes: list[torch.Tensor] = []
    hooks = [enc.register_forward_hook(lambda _m, _i, out: codes.append(out))
             for enc in _code_encoders(task, net)] if sparsity_weight else []
    try:
        if task == "mef":
            loss = mef_loss(net, batch["stack"], halo_weight)
        else:
            loss = mmf_loss(net(batch["lr"], batch["guide"]), batch["target"])
    finally:
        for h in hooks:
            h.remove()
    if codes:
        loss = loss + sparsity_weight * torch.stack([code_l1(c) for c in codes]).mean()
    return loss


def _code_encoders(task: str, net: nn.Module) -> list[nn.Module]:
    """The encoders whose output codes the sparsity term and the validation sparsity see."""
    if task == "ivf":
        return [net.detail]
    if task == "mef":
        return [net.encoder]
    return [net.lr_encoder, net.guide_encoder]


@torch.no_grad()
def warm_start_thresholds(net: nn.Module, task: str, src: D.BatchSource, fraction: float,
                          batches: int = 4) -> list[float]:
    """Raise the soft thresholds of the last unit of every code encoder (``_code_encoders``:
    the codes the plugin shows) to the per-channel ``fraction`` quantile of |input| over
    ``batches`` training batches, so that about that fraction of the codes start as exact
    zeros; thresholds already higher are kept. Returns the mean threshold per encoder."""
    units = [enc.dcus[-1] for enc in _code_encoders(task, net)]
    seen: list[list[torch.Tensor]] = [[] for _ in units]
    hooks = [u.norm.register_forward_hook(
        lambda _m, _i, out, k=k: seen[k].append(out.abs().transpose(0, 1).flatten(1).cpu()))
        for k, u in enumerate(units)]
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    dev = next(net.parameters()).device
    try:
        for i in range(batches):
            b = {k: v.to(dev) for k, v in src.batch(0, i).items()}
            if task == "ivf":
                net.encode(b["image"])
            elif task == "mef":
                mefn_fuse_batch(net, b["stack"])
            else:
                net(b["lr"], b["guide"])
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    means = []
    for u, vals in zip(units, seen, strict=True):
        v = torch.cat(vals, 1)
        idx = torch.randperm(v.shape[1], generator=torch.Generator().manual_seed(0))[:200_000]
        q = torch.quantile(v[:, idx], fraction, dim=1).to(u.shrink.theta)
        theta = u.shrink.theta
        theta.copy_(torch.maximum(theta, q.reshape(theta.shape)))
        means.append(float(theta.mean()))
    return means


class ThresholdFloor:
    """Keeps the soft thresholds of the last unit of every code encoder at or above the
    per-channel ``fraction`` quantile of their input's magnitude on the latest training batch
    (``momentum`` > 0: a running mean of those quantiles): about that fraction of the shown
    codes stay exact zeros while the rest of the network trains (sparse by construction).
    Why no running mean by default: the network answers the floor by scaling its inputs up
    by a few % per step, and a floor that lags by ~10 steps then lets a third of the zeros go
    (MEF: 93 % floor, 67 % zeros after 25 steps with momentum 0.9)."""

    def __init__(self, net: nn.Module, task: str, fraction: float, momentum: float = 0.0,
                 max_samples: int = 100_000):
        self.units = [enc.dcus[-1] for enc in _code_encoders(task, net)]
        self.fraction, self.momentum, self.max_samples = fraction, momentum, max_samples
        self.floors: list[torch.Tensor | None] = [None] * len(self.units)
        self.seen: list[torch.Tensor | None] = [None] * len(self.units)
        self.hooks = [u.norm.register_forward_hook(self._hook(k))
                      for k, u in enumerate(self.units)]

    def _hook(self, k: int):
        def keep(_m, _i, out):
            v = out.detach().abs().transpose(0, 1).flatten(1)
            if v.shape[1] > self.max_samples:
                v = v[:, torch.randperm(v.shape[1], device=v.device)[:self.max_samples]]
            self.seen[k] = torch.quantile(v.float(), self.fraction, dim=1)
        return keep

    @torch.no_grad()
    def apply(self) -> None:
        """After an optimiser step: update the floors with this step's quantiles, raise."""
        for k, u in enumerate(self.units):
            q = self.seen[k]
            if q is None:
                continue
            f = self.floors[k]
            self.floors[k] = q if f is None else self.momentum * f + (1 - self.momentum) * q
            theta = u.shrink.theta
            theta.copy_(torch.maximum(theta, self.floors[k].to(theta).reshape(theta.shape)))
            self.seen[k] = None

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def project_thresholds(net: nn.Module) -> int:
    """Clamp every soft threshold at >= 0 in place (a true shrinkage, continuous at zero);
    returns how many threshold values were negative."""
    n = 0
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, SoftThreshold):
                n += int((m.theta < 0).sum())
                m.theta.clamp_(min=0.0)
    return n


# --- validation ---------------------------------------------------------------------------

MEF_VAL_COUNTS = (3, 5, 9, 16)


def _centre(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(size, h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return img[y0:y0 + s, x0:x0 + s]


class Validator:
    """A fixed validation set for ``task`` and a score (higher is better)."""

    def __init__(self, task: str, data_root, seed: int = 0, max_items: int | None = None,
                 lr_input: str = "bicubic"):
        self.task = task
        if task == "ivf":
            pairs = D.flir_pairs(data_root, "val")
            imgs = [_centre(D.read_grey(p), 128) for pair in pairs for p in pair]
            self.images = torch.from_numpy(np.stack(imgs[:max_items])[:, None])
        elif task == "mmf":
            pairs = D.flir_pairs(data_root, "val")[:max_items]
            self.targets = torch.from_numpy(np.stack(
                [_centre(D.read_grey(a), 96) for a, _ in pairs])[:, None])
            self.guides = torch.from_numpy(np.stack(
                [_centre(D.read_grey(b), 96) for _, b in pairs])[:, None])
            self.lrs = {s: torch.from_numpy(np.stack(
                [D.prepare_mmf_lr(D.area_downsample(t[0].numpy(), s), t.shape[-2:], lr_input)
                 for t in self.targets])[:, None]) for s in (2, 3, 4)}
        else:
            # Fixed whatever the training options: short and long brackets (up to 16 exposures,
            # as real ones), the default (most varied) simulated camera.
            src = D.MEFBrackets(data_root, crop=96, batch_size=max_items or 8, seed=10_000 + seed,
                                split="val")
            self.stacks = [src.batch(0, i, count=k)["stack"]
                           for i, k in enumerate(MEF_VAL_COUNTS)]

    @torch.no_grad()
    def code_sparsity(self, net: nn.Module, device: torch.device) -> float:
        """Fraction of exact zeros in the codes ``_code_encoders`` gives on the validation set
        (ivf: detail codes of the images; mef: codes of every exposure's luminance)."""
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        zeros = total = 0
        try:
            if self.task == "ivf":
                for x in self.images:
                    _, z = net.encode(x[None].to(device))
                    zeros, total = zeros + int((z == 0).sum()), total + z.numel()
            elif self.task == "mef":
                for st in self.stacks:
                    y = rgb_to_ycbcr(st.to(device), dim=2)[:, :, :1].flatten(0, 1)
                    z = net.codes(y)
                    zeros, total = zeros + int((z == 0).sum()), total + z.numel()
            else:
                for enc, xs in ((net.lr_encoder, self.lrs[2]), (net.guide_encoder, self.guides)):
                    z = enc(xs.to(device))
                    zeros, total = zeros + int((z == 0).sum()), total + z.numel()
        finally:
            for m, mode in modes:
                m.training = mode
        return zeros / max(total, 1)

    @torch.no_grad()
    def score(self, net: nn.Module, device: torch.device) -> float:
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        try:
            if self.task == "ivf":
                vals = [psnr(net(x[None].to(device)).cpu(), x[None]) for x in self.images]
                return float(np.mean(vals))
            if self.task == "mmf":
                vals = []
                for s, lr in self.lrs.items():
                    pred = net(lr.to(device), self.guides.to(device)).clamp(0, 1).cpu()
                    vals += [psnr(p[None], t[None]) for p, t in zip(pred, self.targets,
                                                                     strict=True)]
                    del s
                return float(np.mean(vals))
            from ..metrics import mef_ssim_torch

            vals = []
            for st in self.stacks:
                fused, _ = mefn_fuse_batch(net, st.to(device))
                vals += mef_ssim_torch(st.to(device), fused).cpu().tolist()
            return float(np.mean(vals))
        finally:
            for m, mode in modes:
                m.training = mode


# --- the loop ---------------------------------------------------------------------------

def lr_at(step: int, total: int, base: float, schedule: str, warmup: int = 0) -> float:
    """Learning rate at a global step: 'cosine' (to 2% of base), 'step' (x0.1 at half, the
    authors' IVFN schedule) or 'constant'; optional linear warm-up."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= 1:
        return base
    t = min(1.0, step / max(1, total - 1))
    if schedule == "step":
        return base * (0.1 if t >= 0.5 else 1.0)
    if schedule == "cosine":
        return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run takes (``train``'s arguments; the CLI fills one), and the one
    place of their defaults. What each option does: ``_train``'s docstring."""

    task: str
    out: str | Path
    data_root: str | Path | None = None
    epochs: int
    batch_size: int
    lr: float
    crop: int
    seed: int = 0
    device: str = "auto"
    init_weights: str | Path | None = None
    resume: bool = False
    max_minutes: float | None = None
    progress: bool = True
    hparams: dict | None = None
    steps_per_epoch: int | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    halo_weight: float = 0.0
    validate: bool = True
    val_items: int | None = None
    freeze_bn: bool = False
    recalibrate_batches: int = 0
    source_options: dict | None = None
    exposure_prior_sigma: float | None = None
    max_grad_norm: float | None = None
    # second generation (issue 17): sparse codes by construction, black stays black
    nonnegative_thresholds: bool = False
    sparsity_weight: float = 0.0
    black_weight: float = 0.0
    flat_weight: float = 0.0
    black_target: float = BLACK_LEVEL
    edge_weight: float = 0.0
    tone_weight: float = 0.0
    min_val_sparsity: float | None = None
    threshold_warm_start: float | None = None
    threshold_floor: float | None = None
    keep_epochs: bool = False


def train(config: TrainConfig | str, out: str | Path | None = None, **options) -> Path:
    """Train as ``config`` says: a TrainConfig, or (the same fields as arguments)
    ``train(task, out, epochs=..., ...)``. See ``_train`` for what the run does."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig(task=config, out=out, **options)
    elif out is not None or options:
        raise TypeError("train: give a TrainConfig alone, or the task, out and options")
    return _train(**{f.name: getattr(config, f.name) for f in fields(config)})


def _train(  # the fields of a TrainConfig, all given (the defaults are TrainConfig's)
    task: str,
    out: str | Path,
    *,
    data_root: str | Path | None,
    epochs: int,
    batch_size: int,
    lr: float,
    crop: int,
    seed: int,
    device: str,
    init_weights: str | Path | None,
    resume: bool,
    max_minutes: float | None,
    progress: bool,
    hparams: dict | None,
    steps_per_epoch: int | None,
    schedule: str,
    warmup_steps: int,
    halo_weight: float,
    validate: bool,
    val_items: int | None,
    freeze_bn: bool,
    recalibrate_batches: int,
    source_options: dict | None,
    exposure_prior_sigma: float | None,
    max_grad_norm: float | None,
    nonnegative_thresholds: bool,
    sparsity_weight: float,
    black_weight: float,
    flat_weight: float,
    black_target: float,
    edge_weight: float,
    tone_weight: float,
    min_val_sparsity: float | None,
    threshold_warm_start: float | None,
    threshold_floor: float | None,
    keep_epochs: bool,
) -> Path:
    """Train the network for ``task`` ('ivf', 'mef' or 'mmf') and write it to ``out``.

    ``init_weights``: fine-tune from any weights file ``load_network`` reads (its architecture
    is kept). ``resume``: continue from ``<out>.state.pt`` (same arguments expected).
    ``epochs=0`` (with ``init_weights``): no training step; the start-up changes alone
    (``nonnegative_thresholds``, ``threshold_warm_start``, ``recalibrate_batches``) are
    validated and written. ``max_minutes``: stop cleanly (checkpoint + state written) once
    that much time has passed.
    ``freeze_bn``: batch norm uses (and keeps) its running statistics while training, i.e. the
    network is optimised as it runs at inference; with ``recalibrate_batches`` > 0 those
    statistics are first recomputed over that many training batches (fresh runs only).
    ``source_options``: extra keyword arguments of the training batch source (mef: ``counts``,
    ``spacing``, ``black``, ``cover_prob``; see ``training.data.MEFBrackets``), recorded in
    the header through its ``describe()``. ``exposure_prior_sigma`` (mef): train with
    ``models.mefn.exposure_prior`` added to the logits (recorded in the header; the engine
    adds it at inference); None keeps the prior of ``init_weights`` (if any), 0 trains
    without one. ``max_grad_norm``: clip the gradients' global norm to this before each step
    (None: no clipping; recorded in the header); wider networks (mmf ``code_channels`` 64)
    otherwise can blow up after some epochs.
    ``nonnegative_thresholds``: clamp every soft threshold at >= 0 when the run starts (the
    authors' and earlier weights have negative ones) and after every step (projected
    gradient): the codes are a true shrinkage, sparse by construction. ``sparsity_weight``:
    add that times mean|codes| to the loss (see ``compute_loss``); ``black_weight`` (ivf):
    add that times ``losses.ivf_black_term`` with its hinge at ``black_target`` (a grey level
    in [0, 1]; default 0.5/255; recorded in the header); ``edge_weight`` (ivf): that times
    the mean absolute error of the reconstruction's finite differences; ``flat_weight``
    (ivf): that times ``losses.ivf_flat_term``; ``tone_weight`` (ivf): that times
    ``losses.ivf_tone_term`` (local means of the reconstruction kept). ``min_val_sparsity``: an
    epoch whose validation codes have fewer exact zeros than this fraction is not eligible as
    ``<out>.best.pt``.
    ``threshold_warm_start`` (a fraction): before training, ``warm_start_thresholds`` raises
    the last units' thresholds so that about that fraction of the codes are zero.
    ``threshold_floor`` (a fraction): ``ThresholdFloor`` keeps them there after every step.
    The log gains a ``val_sparsity`` column whenever one of these options is used.
    ``keep_epochs``: also write every finished epoch's weights as ``<out>.e<N>.pt`` (to choose
    among epochs on more validation figures than the log's).
    A loss that is not finite stops the run with ``FloatingPointError`` before that step
    changes anything: the files of the last finished epoch stay as they were.
    Returns ``out`` (the latest weights; ``<out>.best.pt`` holds the best validated epoch).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if epochs < 0 or (epochs == 0 and init_weights is None):
        raise ValueError(f"epochs: a number >= 1, or 0 with init_weights (only the start-up "
                         f"changes, e.g. projected thresholds), got {epochs!r}")
    if exposure_prior_sigma is not None and (task != "mef" or not exposure_prior_sigma >= 0):
        raise ValueError(f"exposure_prior_sigma: a number >= 0 (0: none) for 'mef' only, got "
                         f"{exposure_prior_sigma!r} for {task!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm: a number > 0 or None, got {max_grad_norm!r}")
    for name, value in (("sparsity_weight", sparsity_weight), ("black_weight", black_weight),
                        ("flat_weight", flat_weight), ("edge_weight", edge_weight),
                        ("tone_weight", tone_weight)):
        if not value >= 0:
            raise ValueError(f"{name}: a number >= 0, got {value!r}")
    for name, value in (("black_weight", black_weight), ("flat_weight", flat_weight),
                        ("edge_weight", edge_weight), ("tone_weight", tone_weight)):
        if value and task != "ivf":
            raise ValueError(f"{name}: for 'ivf' only (got {value!r} for {task!r})")
    if not 0 < black_target < 1 or black_target != BLACK_LEVEL and task != "ivf":
        raise ValueError(f"black_target: a grey level in (0, 1) for 'ivf' only (default "
                         f"{BLACK_LEVEL!r}), got {black_target!r} for {task!r}")
    if min_val_sparsity is not None and not 0 <= min_val_sparsity <= 1:
        raise ValueError(f"min_val_sparsity: a fraction in [0, 1] or None, got "
                         f"{min_val_sparsity!r}")
    if threshold_warm_start is not None and not 0 < threshold_warm_start < 1:
        raise ValueError(f"threshold_warm_start: a fraction in (0, 1) or None, got "
                         f"{threshold_warm_start!r}")
    if threshold_floor is not None and not 0 < threshold_floor < 1:
        raise ValueError(f"threshold_floor: a fraction in (0, 1) or None, got "
                         f"{threshold_floor!r}")
    second_gen = bool(nonnegative_thresholds or sparsity_weight or black_weight or flat_weight
                      or edge_weight or tone_weight or min_val_sparsity is not None
                      or threshold_warm_start or threshold_floor)
    out = Path(out)
    side = _paths(out)
    dev = resolve_device(device)  # the engine's choice: CUDA, then MPS, then the CPU
    root = D.resolve_data_root(data_root)
    t_start = time.monotonic()

    src = D.make_source(task, root, crop=crop, batch_size=batch_size, seed=seed,
                        steps_per_epoch=steps_per_epoch, **(source_options or {}))
    spe = src.steps_per_epoch
    total_steps = epochs * spe

    torch.manual_seed(seed)
    init_info = None
    if init_weights is not None:
        net, info = load_network(task, init_weights)
        init_info = {"path": str(init_weights), "format": info.get("format"),
                     "sha256": info.get("sha256")}
        parent = (info.get("header") or {}).get("training")
        if info.get("format") == "napari-cscfusion" and isinstance(parent, dict):
            # The whole record of how the starting weights were trained (stage 1 of a
            # two-stage run), so the final file says everything that produced it.
            init_info["training"] = parent
    else:
        net = build(task, hparams)
        if task == "mmf":
            # Start as the network's own bilinear upsampling (decoder residual = 0): the
            # randomly initialised residual otherwise costs more than it ever recovers.
            with torch.no_grad():
                net.decoder.weight.zero_()
    if task == "mmf":
        geometry = (hparams or {}).get("geometry")
        if init_info is not None and geometry is not None and geometry != net.geometry:
            # the starting weights' tensors in another geometry (no tensor depends on it)
            net.geometry = geometry
            net.hparams.pop("geometry", None)
            if geometry != "authors":
                net.hparams["geometry"] = geometry
        guide_dcus = (hparams or {}).get("guide_num_dcus")
        if init_info is not None and guide_dcus not in (None, len(net.guide_encoder.dcus)):
            net = deepen_guide(net, guide_dcus, src.batch(0, 0)["guide"])
        wanted = "native" if net.geometry in LOW_RES_GEOMETRIES else None
        if wanted and src.lr_input != wanted or not wanted and src.lr_input == "native":
            raise ValueError(f"mmf: the {net.geometry!r} geometry needs lr_input "
                             f"{wanted or 'bicubic'!r}, got {src.lr_input!r}")
    if task == "mef":
        # None: fine-tuning keeps the starting weights' fusion rule (load_network set it)
        if exposure_prior_sigma is not None:
            net.prior_sigma = exposure_prior_sigma or None  # 0: none
        exposure_prior_sigma = net.prior_sigma
    net = net.to(dev)
    if recalibrate_batches and not resume:
        cal = D.make_source(task, root, crop=crop, batch_size=batch_size, seed=seed + 7919,
                            **(source_options or {}))
        recalibrate_bn(net, cal, recalibrate_batches, task)
    negative_at_start = project_thresholds(net) if nonnegative_thresholds else None
    warm_thresholds = None
    if threshold_warm_start and not resume:
        cal = D.make_source(task, root, crop=crop, batch_size=batch_size, seed=seed + 104_729,
                            **(source_options or {}))
        warm_thresholds = warm_start_thresholds(net, task, cal, threshold_warm_start)
    set_train_mode(net, freeze_bn)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    start_epoch, start_step, best, best_epoch, elapsed_before = 0, 0, -math.inf, None, 0.0
    if resume:
        if not side["state"].is_file():
            raise FileNotFoundError(f"resume=True but {str(side['state'])!r} does not exist")
        state = torch.load(side["state"], map_location="cpu", weights_only=True)
        if state.get("task") != task:
            raise ValueError(f"{side['state']} is a {state.get('task')!r} run, not {task!r}")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        best = float(state.get("best", -math.inf))
        best_epoch = state.get("best_epoch")
        elapsed_before = float(state.get("elapsed_s", 0.0))
    elif side["log"].exists():
        side["log"].unlink()

    validator = Validator(task, root, seed, val_items,
                          **({"lr_input": src.lr_input} if task == "mmf" else {})) \
        if validate else None
    hp = dict(getattr(net, "hparams", {}))

    val_sparsity = None

    def header(epoch_done: float, val: float | None) -> dict:
        return {
            "task": task, **src.describe(),
            "held_out": ("TNO, FLIR-test, nir_country (never read); flir_train validation "
                         "split for choosing the epoch" if task != "mef" else
                         f"HDR scene {D.HELD_OUT_HDR!r} (never read); right-hand "
                         f"{D.MEF_VAL_FRACTION:.0%} of the others for validation"),
            "epochs": epoch_done, "epochs_planned": epochs, "steps_per_epoch": spe,
            "batch_size": batch_size, "crop": crop, "lr": lr, "schedule": schedule,
            "warmup_steps": warmup_steps, "seed": seed, "loss": LOSS_NAMES[task],
            "halo_weight": halo_weight, "optimizer": "Adam",
            **({"max_grad_norm": max_grad_norm} if max_grad_norm else {}),
            **({"thresholds": "nonnegative: clamped at 0 at the start ("
                              f"{negative_at_start} negative values) and after every step"
                if nonnegative_thresholds else "unconstrained",
                "sparsity_weight": sparsity_weight,
                "sparsity_term": "mean |codes| (" + {"ivf": "detail codes", "mef": "codes after "
                                 "the last DCU", "mmf": "both backbones' codes"}[task] + ")",
                "black_weight": black_weight,
                **({"flat_weight": flat_weight,
                    "flat_term": "losses.ivf_flat_term (flat images of levels "
                                 f"{FLAT_LEVELS} decode to themselves at code gain 1, "
                                 "squared logit error; all-white to at least 1 - 0.5/255)"}
                   if flat_weight else {}),
                **({"edge_weight": edge_weight,
                    "edge_term": "mean |grad recon - grad x| (horizontal and vertical "
                                 "differences, losses.halo_term of the error)"}
                   if edge_weight else {}),
                **({"tone_weight": tone_weight,
                    "tone_term": "mean |blur recon - blur x| (Gaussian sigma "
                                 f"{TONE_SIGMA:g} px, losses.ivf_tone_term)"}
                   if tone_weight else {}),
                "min_val_sparsity": min_val_sparsity, "val_sparsity": val_sparsity,
                "threshold_warm_start": threshold_warm_start,
                "threshold_floor": threshold_floor,
                "warm_start_mean_thresholds": warm_thresholds,
                **({"black_target": black_target,
                    "black_term": "losses.ivf_black_term (two black sources decode to at most "
                                  f"{black_target * 255:g}/255 at code gains 1, 2, 4; the pivot "
                                  "2 dec(0) detached)"} if task == "ivf" else {})}
               if second_gen else {}),
            **({"exposure_prior_sigma": exposure_prior_sigma,
                "exposure_prior": "models.mefn.exposure_prior(mean luminance of each exposure "
                                  "over the whole image, sigma) added to the logits"}
               if exposure_prior_sigma else {}),
            "batch_norm": ("running statistics frozen during training"
                           + (f" (recalibrated over {recalibrate_batches} batches first)"
                              if recalibrate_batches else "") if freeze_bn
                           else "batch statistics during training"),
            "validation": VAL_NAMES[task], "val_score": val,
            "best_val_score": None if best == -math.inf else best, "best_epoch": best_epoch,
            "init_weights": init_info,
            "init": ("torch.manual_seed(seed) default init" + (", decoder zeroed"
                     if task == "mmf" else "")) if init_info is None else "init_weights",
            "device": str(dev), "torch": str(torch.__version__),
            "wall_time_s": round(elapsed_before + time.monotonic() - t_start, 1),
        }

    def save_state(epoch: int, step: int) -> None:
        tmp = side["state"].with_name(side["state"].name + ".part")
        torch.save({"task": task, "epoch": epoch, "step": step, "model": net.state_dict(),
                    "optimizer": opt.state_dict(), "best": best, "best_epoch": best_epoch,
                    "elapsed_s": elapsed_before + time.monotonic() - t_start,
                    "hparams": hp}, tmp)
        tmp.replace(side["state"])

    def log_row(row: dict) -> None:
        new = not side["log"].exists()
        with open(side["log"], "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    if epochs == 0:
        # no step: the start-up changes alone (projected thresholds, warm start, recalibrated
        # batch norm), validated and written as the run's latest and best file
        val = validator.score(net, dev) if validator is not None else None
        if second_gen and validator is not None:
            val_sparsity = validator.code_sparsity(net, dev)
        best, best_epoch = (-math.inf, None) if val is None else (val, 0)
        save_checkpoint(net, side["best"], task, header(0, val))
        return save_checkpoint(net, out, task, header(0, val))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_epoch * spe + start_step,
                   desc=f"train {task}", unit="step", dynamic_ncols=True)

    floor = ThresholdFloor(net, task, threshold_floor) if threshold_floor else None
    deadline = None if max_minutes is None else t_start + 60.0 * max_minutes
    stopped = False
    epoch, step = start_epoch, start_step
    try:
        for epoch in range(start_epoch, epochs):
            losses = []
            t_epoch = time.monotonic()
            step = start_step if epoch == start_epoch else 0
            while step < spe:
                gstep = epoch * spe + step
                cur_lr = lr_at(gstep, total_steps, lr, schedule, warmup_steps)
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                batch = _to(src.batch(epoch, step), dev)
                batch.pop("scale", None)
                loss = compute_loss(task, net, batch, halo_weight, sparsity_weight,
                                    black_weight, flat_weight, black_target, edge_weight,
                                    tone_weight)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training {task}: the loss is {float(loss.detach())} at epoch "
                        f"{epoch + 1}, step {step + 1}; the run diverged. {out} and "
                        f"{side['best']} hold the last finished epoch (or none yet); train "
                        f"again with a lower --lr or with --max-grad-norm (e.g. 1)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
                opt.step()
                if nonnegative_thresholds:
                    project_thresholds(net)
                if floor is not None:
                    floor.apply()
                losses.append(float(loss.detach()))
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}", lr=f"{cur_lr:.2e}")
                if deadline is not None and time.monotonic() > deadline and step < spe:
                    stopped = True
                    break
            epoch_done = epoch + (step / spe if stopped else 1)
            val = validator.score(net, dev) if validator is not None else None
            if second_gen and validator is not None:
                val_sparsity = validator.code_sparsity(net, dev)
            eligible = min_val_sparsity is None or (val_sparsity or 0.0) >= min_val_sparsity
            if val is not None and val > best and not stopped and eligible:
                best, best_epoch = val, epoch + 1
                save_checkpoint(net, side["best"], task, header(epoch + 1, val))
            save_checkpoint(net, out, task, header(epoch_done, val))
            if keep_epochs and not stopped:
                save_checkpoint(net, side["best"].with_name(
                    side["best"].name.replace(".best.pt", f".e{epoch + 1}.pt")), task,
                    header(epoch + 1, val))
            if stopped:
                save_state(epoch, step)
            else:
                save_state(epoch + 1, 0)
            log_row({"epoch": round(epoch_done, 4), "steps": len(losses),
                     "train_loss": float(np.mean(losses)) if losses else "",
                     "val_score": "" if val is None else val,
                     **({"val_sparsity": "" if val_sparsity is None else round(val_sparsity, 5)}
                        if second_gen else {}),
                     "lr": cur_lr if losses else "",
                     "epoch_s": round(time.monotonic() - t_epoch, 1),
                     "wall_s": round(elapsed_before + time.monotonic() - t_start, 1)})
            if bar is not None:
                mean_loss = float(np.mean(losses)) if losses else float("nan")
                bar.write(f"epoch {epoch_done:g}/{epochs}: loss {mean_loss:.5f}"
                          + (f", val {val:.4f}" if val is not None else ""))
            if stopped:
                break
            if deadline is not None and time.monotonic() > deadline and epoch + 1 < epochs:
                stopped = True
                break
    except KeyboardInterrupt:
        save_checkpoint(net, out, task, header(epoch + step / spe, None))
        save_state(epoch, step)
        raise
    finally:
        if bar is not None:
            bar.close()
        if floor is not None:
            floor.remove()
    return out


def checkpoint_summary(path: str | Path) -> dict:
    """The header of one of our checkpoints (for reports)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in raw.items() if k != "state_dict"} | {"sha256": sha256_of(path)}
