"""Medical multi-modal fusion on the BrainWeb T1/PD pair, and the alignment check, on the real
slices of ../shared/data/medical (ITK examples, Apache-2.0).

    .venv/bin/python benchmarks/medical.py [--data ../shared/data/medical]
        [--checkpoints ../shared/reference-checkpoints] [--device cpu] [--no-alignment]

Fusion table: MI, Qabf, VIF, SSIM (napari_cscfusion.metrics; MI and VIF summed over the two
sources, SSIM averaged, Qabf ceiling 0.9748) of the fused image for CSC-IVFN (packaged
medical.pt and ivf.pt when they exist, the authors' published weights when the checkpoints
folder is there; default rules saliency/l1, and all-average rules), the pixel average, the
classical baselines (Laplacian pyramid, choose-max) and each source taken alone as the "fused"
image (a source scores MI(S, S) = H(S) and VIFp(S, S) = 1 with itself, so it sets a ceiling that
fusion cannot pass on those two).

Alignment table: estimate_misalignment / register_rigid on the shifted (13 px in x, 17 in y) and
the rotated (10 deg + shift) PD slices, against the ground truth (see tests/test_medical.py).
Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from scipy import ndimage as ndi

from napari_cscfusion import baselines, metrics
from napari_cscfusion.engine.alignment import (
    displacement_rms,
    register_rigid,
    transform_matrix,
)
from napari_cscfusion.engine.medical import (
    MEDICAL_BASE_RULE,
    MEDICAL_CODE_GAIN,
    MEDICAL_DETAIL_RULE,
    _recolour,
    fuse_multimodal,
)
from napari_cscfusion.engine.registry import load_model, packaged_weights_path
from napari_cscfusion.models.color import rgb_to_ycbcr

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("MI", "Qabf", "VIF", "SSIM")


def _read(path: Path) -> np.ndarray:
    a = np.asarray(iio.imread(path))
    return a[..., 0] if a.ndim == 3 else a


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fusion_table(data: Path, checkpoints: Path, device: str) -> str:
    t1, pd = _read(data / "BrainT1Slice.png"), _read(data / "BrainProtonDensitySlice.png")
    srcs = [t1 / 255.0, pd / 255.0]
    methods: dict[str, np.ndarray] = {}
    notes = []
    models = {}
    for name in ("medical", "ivf"):  # medical.pt: fuse_multimodal's default since 2026-12-07
        if packaged_weights_path(name).is_file():
            models[f"packaged {name}.pt"] = load_model(name)
        else:
            notes.append(f"packaged {name}.pt: not present in this checkout, no row")
    if checkpoints.is_dir():
        models["authors' weights"] = load_model("ivf", checkpoints)
    else:
        notes.append(f"authors' weights: {checkpoints} not found, no row")
    for label, model in models.items():
        # code gain 1 is fuse_multimodal's default; 2 is the authors' infrared/visible gain
        for base, detail, gain in (("saliency", "l1", 1.0), ("average", "average", 1.0),
                                   ("saliency", "l1", 2.0)):
            t = time.perf_counter()
            res = fuse_multimodal({"T1": t1, "PD": pd}, model=model, base_rule=base,
                                  detail_rule=detail, device=device, code_gain=gain)
            _log(f"CSC-IVFN {label} {base}/{detail} gain {gain}: "
                 f"{time.perf_counter() - t:.1f} s")
            methods[f"CSC-IVFN, {label}, rules {base}/{detail}, code gain {gain:g}"] = res.image
    methods["average (pixel mean)"] = baselines.average_fusion(srcs)
    methods["Laplacian pyramid (4 levels)"] = baselines.laplacian_pyramid_fusion(srcs)
    methods["choose-max (two-scale detail)"] = baselines.max_abs_fusion(srcs)
    methods["T1 alone (source as fused image)"] = srcs[0]
    methods["PD alone (source as fused image)"] = srcs[1]
    lines = ["| method | " + " | ".join(METRICS) + " |", "| --- |" + " ---: |" * len(METRICS)]
    for name, img in methods.items():
        scores = metrics.evaluate("medical", srcs, np.clip(img, 0, 1))
        lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


HARVARD_SETS = {"mri_ct": "CT", "mri_pet": "PET"}  # mri_spect is held out: never read here


def harvard_pairs(data: Path, name: str, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(MRI, other) files of one Harvard set (``HARVARD_SETS``; never mri_spect), by number."""
    if name not in HARVARD_SETS:
        raise ValueError(f"Harvard set must be one of {sorted(HARVARD_SETS)}, got {name!r}")
    folder = data / "harvard" / name
    mris = sorted((folder / "MRI").glob("*.png"), key=lambda p: int(p.stem))
    pairs = [(m, folder / HARVARD_SETS[name] / m.name) for m in mris]
    return [pr for pr in pairs if pr[1].is_file()][:limit]


def harvard_background(mri: np.ndarray, other_y: np.ndarray, margin: int = 8) -> np.ndarray:
    """The scans' black background: pixels black in both sources and more than ``margin`` px
    from any pixel that is not (so a network's receptive field does not reach tissue)."""
    tissue = (mri > 0) | (other_y > 1.0 / 255)
    return ~ndi.binary_dilation(tissue, iterations=margin)


def harvard_scores(mri: np.ndarray, other: np.ndarray, fused: np.ndarray) -> dict[str, float]:
    """MI, Qabf, VIF, SSIM of a fused image (grey, or RGB: its BT.601 luma) against the MRI and
    the other scan's luma (metrics.evaluate 'medical')."""
    return metrics.evaluate("medical", [mri, other], fused)


def harvard_methods(mri_u8: np.ndarray, other_u8: np.ndarray, models: dict) -> dict:
    """Fused images of one pair: CSC-IVFN with fuse_multimodal's defaults per model, pixel
    average and max of the luminances (the colour source's chroma kept for all, as ours)."""
    mri = mri_u8 / 255.0
    colour = other_u8.ndim == 3
    other = other_u8[..., :3] / 255.0
    if colour:
        ycc = rgb_to_ycbcr(torch.from_numpy(other), dim=-1)
        other_y, chroma = ycc[..., 0].numpy(), ycc[..., 1:]
    else:
        other_y, chroma = other, None
    out = {}
    for label, model in models.items():
        out[f"CSC-IVFN, {label} (fuse_multimodal defaults: {MEDICAL_BASE_RULE} / "
            f"{MEDICAL_DETAIL_RULE}, gain {MEDICAL_CODE_GAIN:g})"] = fuse_multimodal(
            {"MRI": mri_u8, "other": other_u8}, model=model, device="cpu").image
    for label, y in (("average (pixel mean of the luminances)", (mri + other_y) / 2),
                     ("max of the luminances", np.maximum(mri, other_y))):
        y = torch.from_numpy(np.asarray(y, np.float32))
        out[label] = y.numpy() if chroma is None else _recolour(y, chroma)[0]
    return out, mri, other_y


def harvard_table(data: Path, checkpoints: Path, limit: int | None = None) -> str:
    """Mean MI, Qabf, VIF, SSIM over the Harvard MRI/CT and MRI/PET pairs (for choosing the
    medical defaults; the held-out mri_spect is never read)."""
    models = {}
    for name in ("medical", "ivf"):  # medical.pt: fuse_multimodal's default since 2026-12-07
        if packaged_weights_path(name).is_file():
            models[f"packaged {name}.pt"] = load_model(name)
    if checkpoints.is_dir():
        models["authors' weights"] = load_model("ivf", checkpoints)
    lines = []
    for name in HARVARD_SETS:
        pairs = harvard_pairs(data, name, limit)
        if not pairs:
            lines.append(f"- {name}: no pairs found under {data / 'harvard' / name}")
            continue
        sums: dict[str, dict[str, float]] = {}
        black: dict[str, float] = {}
        black_mean: dict[str, float] = {}
        t = time.perf_counter()
        for mri_path, other_path in pairs:
            mri_u8 = _read(mri_path)
            other_u8 = np.asarray(iio.imread(other_path))
            fused, mri, other_y = harvard_methods(mri_u8, other_u8, models)
            background = harvard_background(mri, other_y)
            for label, img in fused.items():
                sc = harvard_scores(mri, other_y, np.clip(img, 0, 1))
                acc = sums.setdefault(label, dict.fromkeys(METRICS, 0.0))
                for m in METRICS:
                    acc[m] += sc[m] / len(pairs)
                if background.any():
                    black[label] = max(black.get(label, 0.0),
                                       float(np.max(np.asarray(img)[background])) * 255)
                    black_mean[label] = black_mean.get(label, 0.0) + float(
                        np.mean(np.asarray(img)[background])) * 255 / len(pairs)
        _log(f"Harvard {name}: {len(pairs)} pairs, {time.perf_counter() - t:.1f} s")
        lines += [f"**{name}** ({len(pairs)} pairs, 256x256; mean over pairs; fused luma vs "
                  f"the MRI and the {HARVARD_SETS[name]}'s luma)", "",
                  "| method | " + " | ".join(METRICS) + " | background mean / max (grey "
                  "levels) |", "| --- |" + " ---: |" * (len(METRICS) + 1)]
        for label, acc in sums.items():
            lines.append(f"| {label} | " + " | ".join(f"{acc[m]:.4f}" for m in METRICS)
                         + f" | {black_mean.get(label, float('nan')):.2f} / "
                         f"{black.get(label, float('nan')):.2f} |")
        lines.append("")
    return "\n".join(lines)


def alignment_table(data: Path) -> str:
    pd = _read(data / "BrainProtonDensitySlice.png")
    t1 = _read(data / "BrainT1Slice.png")
    shifted = _read(data / "BrainProtonDensitySliceShifted13x17y.png")
    rotated = _read(data / "BrainProtonDensitySliceR10X13Y17.png")
    mask = ndi.binary_fill_holes(pd > 25)
    pad = np.eye(3)
    pad[:2, 2] = 20.0
    truth_rot = transform_matrix(10.0, (16.0, 13.0), (128.5, 110.5)) @ pad
    rows = ["| case (fixed <- moving) | estimated shift (dy, dx) px | rotation deg | "
            "misalignment before (RMS px) | after registration (RMS px) | "
            "error vs truth (RMS px, brain mask) | time s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    cases = [
        ("PD + 20 px border <- shifted PD", np.pad(pd, 20), shifted, None, None),
        ("T1 + 20 px border <- shifted PD", np.pad(t1, 20), shifted, None, None),
        ("PD <- rotated PD", pd, rotated, truth_rot, mask),
        ("T1 <- rotated PD", t1, rotated, truth_rot, mask),
    ]
    for name, fixed, moving, truth, msk in cases:
        t = time.perf_counter()
        _, tf = register_rigid(fixed, moving)
        dt = time.perf_counter() - t
        if truth is None:  # pure translation: truth is (17, 13) in the bordered frame
            truth = transform_matrix(0.0, (17.0, 13.0), tf["center"])
            msk = np.pad(mask, 20)
        err = displacement_rms(tf["matrix"], msk, truth)
        dy, dx = tf["shift"]
        rows.append(f"| {name} | ({dy:.2f}, {dx:.2f}) | {tf['rotation_deg']:.3f} | "
                    f"{tf['error_px']:.2f} | {tf['residual']['error_px']:.3f} | {err:.3f} | "
                    f"{dt:.1f} |")
        _log(f"{name}: {dt:.1f} s")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "medical")
    p.add_argument("--checkpoints", type=Path,
                   default=ROOT.parent / "shared" / "reference-checkpoints")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-alignment", action="store_true")
    p.add_argument("--harvard-only", action="store_true",
                   help="only the Harvard MRI/CT and MRI/PET table")
    p.add_argument("--harvard-pairs", type=int, default=None,
                   help="first N pairs of each Harvard set (default: all)")
    a = p.parse_args(argv)
    if not a.data.is_dir():
        sys.exit(f"no medical data at {a.data}")
    if (a.data / "harvard").is_dir():
        print("### Harvard MRI/CT and MRI/PET (real clinical pairs; for choosing settings)\n")
        print(harvard_table(a.data, a.checkpoints, a.harvard_pairs))
    if a.harvard_only:
        return
    print("### BrainWeb T1/PD, 217x181 (fused image vs the two sources)\n")
    print(fusion_table(a.data, a.checkpoints, a.device))
    if not a.no_alignment:
        print("\n### Alignment check and rigid registration\n")
        print(alignment_table(a.data))


if __name__ == "__main__":
    main()
