"""Fusion-quality benchmark: the CSC networks (our packaged weights and the authors' published
ones) against classical baselines, on the real data in ../shared/data.

    python benchmarks/quality.py                 # everything (long on a CPU)
    python benchmarks/quality.py --quick         # 2 smallest pairs per set, Memorial only
    python benchmarks/quality.py --tasks ivf,mmf --output results.md

Tasks
-----
ivf  TNO (40 pairs) and FLIR-test (40 pairs): EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM
     (napari_cscfusion.metrics conventions: [0,1] floats, so SD/SF/AG are 1/255 of the 0..255
     values of most papers) for ours, the authors' (reference-checkpoints folder) and the
     average / max (pixel maximum) / choose-max (two-scale detail) / Laplacian-pyramid (4
     levels) baselines.
mef  The Memorial bracket (16 exposures) and, when napari_cscfusion.training.data provides
     simulate_bracket/read_hdr, a 4-exposure bracket (EV -4, -2, 0, +2, seed 0) simulated from
     the held-out HDR scene: MEF-SSIM (+ EN, SD, SF, AG) for ours, the authors', Mertens and the
     naive mean.
mmf  FLIR-test thermal super-resolution at x2 and x4: low-res = area (block-mean) downsampled
     IR (cropped to a multiple of the scale), guide = the visible frame; PSNR / SSIM against the
     full-resolution IR for ours, bicubic and the classical guided filter (r=2, eps=1e-4).
     The authors' CSC-MMFN is a 31-band hyperspectral network and does not apply.

Methods whose weights (or optional packages) are missing are skipped with a printed note.
Data must be at ../shared/data (or --data). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_cscfusion import baselines as B
from napari_cscfusion import metrics as M

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_CKPT = REPO.parent / "shared" / "reference-checkpoints"
IVF_AUTHOR_FILES = (
    "csc_ivfn_base_authors.pth",
    "csc_ivfn_detail_authors.pth",
    "csc_ivfn_decoder_authors.pth",
)
MEF_AUTHOR_FILE = "csc_mefn_authors.pth"
HELD_OUT_EVS = (-4.0, -2.0, 0.0, 2.0)
GUIDED_R, GUIDED_EPS = 2, 1e-4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def read_grey(path: Path) -> np.ndarray:
    """8-bit image file -> float64 grey in [0,1] (BT.601 luma if it has colour channels)."""
    from skimage.io import imread

    a = imread(path)
    if a.ndim == 3:
        a = a[..., :3] @ np.array([0.299, 0.587, 0.114]) if a.shape[-1] >= 3 else a[..., 0]
    return np.asarray(a, np.float64) / (65535.0 if a.dtype == np.uint16 else 255.0)


def read_rgb(path: Path) -> np.ndarray:
    from skimage.io import imread

    return imread(path)[..., :3].astype(np.float64) / 255.0


def ivf_pairs(folder: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for ir in folder.glob("IR*"):
        m = re.fullmatch(r"IR(\d+)\.(png|jpg|jpeg|bmp|tif)", ir.name, flags=re.IGNORECASE)
        if not m:
            continue
        vis = ir.with_name("VIS" + ir.name[2:])
        if vis.exists():
            pairs.append((int(m.group(1)), ir, vis))
    return [(ir, vis) for _, ir, vis in sorted(pairs)]


def smallest(pairs: list[tuple[Path, Path]], n: int) -> list[tuple[Path, Path]]:
    """The n pairs with the fewest pixels (for --quick; deterministic)."""
    sizes = [(read_grey(ir).size, i) for i, (ir, _) in enumerate(pairs)]
    keep = sorted(i for _, i in sorted(sizes)[:n])
    return [pairs[i] for i in keep]


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def try_model(task: str, weights: Path | None, label: str, notes: list[str]):
    """load_model or None with a note (missing weights / engine)."""
    try:
        from napari_cscfusion import load_model
    except ImportError as err:
        notes.append(f"{label}: skipped, the engine is not importable ({err})")
        return None
    if weights is not None and not weights.exists():
        notes.append(f"{label}: skipped, weights not found at {weights}")
        return None
    try:
        return load_model(task) if weights is None else load_model(task, weights)
    except FileNotFoundError as err:
        notes.append(f"{label}: skipped, {err}")
        return None


# ----------------------------------------------------------------------------------------------
# accumulation and rendering
# ----------------------------------------------------------------------------------------------


class Table:
    def __init__(self, title: str, columns: tuple[str, ...]):
        self.title = title
        self.columns = columns
        self.values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.order: list[str] = []

    def add(self, method: str, scores: dict[str, float], seconds: float) -> None:
        if method not in self.order:
            self.order.append(method)
        for k, v in scores.items():
            self.values[method][k].append(float(v))
        self.seconds[method].append(seconds)

    def markdown(self) -> str:
        head = ["method", "n", *self.columns, "s/image"]
        lines = [f"#### {self.title}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for m in self.order:
            vals = self.values[m]
            n = len(self.seconds[m])
            cells = [m, str(n)]
            for c in self.columns:
                cells.append(f"{np.mean(vals[c]):.4f}" if vals.get(c) else "–")
            cells.append(f"{np.mean(self.seconds[m]):.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def timed(fn: Callable[..., np.ndarray], *args) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    out = fn(*args)
    return np.asarray(out, np.float64), time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------


def bench_ivf(args, notes: list[str]) -> list[Table]:
    from napari_cscfusion import fuse_infrared_visible

    ours = try_model("ivf", None, "ours (ivf)", notes)
    ckpt = args.checkpoints
    if all((ckpt / f).exists() for f in IVF_AUTHOR_FILES):
        authors = try_model("ivf", ckpt, "authors (ivf)", notes)
    else:
        authors = None
        notes.append(f"authors (ivf): skipped, {', '.join(IVF_AUTHOR_FILES)} not all in {ckpt}")

    methods: list[tuple[str, Callable]] = []
    for label, model in (("CSC-IVFN ours", ours), ("CSC-IVFN authors", authors)):
        if model is not None:
            methods.append(
                (label, lambda ir, vis, m=model: fuse_infrared_visible(ir, vis, model=m).image)
            )
    methods += [
        ("average", lambda ir, vis: B.average_fusion([ir, vis])),
        # the papers' "max" rule: it beats most deep methods on MI/VIF/Qabf, tables must show it
        ("max (pixel maximum)", lambda ir, vis: B.max_abs_fusion([ir, vis], mode="intensity")),
        ("choose-max (detail)", lambda ir, vis: B.max_abs_fusion([ir, vis])),
        ("Laplacian pyramid", lambda ir, vis: B.laplacian_pyramid_fusion([ir, vis], levels=4)),
    ]
    tables = []
    for name, sub in (("TNO", "tno"), ("FLIR-test", "flir_test")):
        folder = args.data / "ivf" / sub
        pairs = ivf_pairs(folder)
        if not pairs:
            notes.append(f"IVF {name}: skipped, no IRn/VISn pairs in {folder}")
            continue
        if args.quick:
            pairs = smallest(pairs, args.quick_pairs)
        elif args.limit:
            pairs = pairs[: args.limit]
        table = Table(f"IVF, {name} ({len(pairs)} pairs)", M.IVF_METRICS)
        for i, (ir_p, vis_p) in enumerate(pairs):
            ir, vis = read_grey(ir_p), read_grey(vis_p)
            log(f"ivf {name} {i + 1}/{len(pairs)} {ir_p.name} {ir.shape}")
            for label, fn in methods:
                fused, sec = timed(fn, ir.astype(np.float32), vis.astype(np.float32))
                table.add(label, M.evaluate("ivf", [ir, vis], fused), sec)
        tables.append(table)
    return tables


def _mef_methods(args, notes: list[str]) -> list[tuple[str, Callable]]:
    from napari_cscfusion import fuse_exposures

    ours = try_model("mef", None, "ours (mef)", notes)
    authors = try_model("mef", args.checkpoints / MEF_AUTHOR_FILE, "authors (mef)", notes)
    methods: list[tuple[str, Callable]] = []
    for label, model in (("CSC-MEFN ours", ours), ("CSC-MEFN authors", authors)):
        if model is not None:
            methods.append((label, lambda st, m=model: fuse_exposures(st, model=m).image))
    try:
        import cv2  # noqa: F401

        methods.append(("Mertens (OpenCV)", B.mertens_fusion))
    except ImportError:
        notes.append("Mertens: skipped, OpenCV is not installed (the 'benchmarks' extra)")
    methods.append(("naive mean", lambda st: st.mean(axis=0)))
    return methods


def bench_mef(args, notes: list[str]) -> list[Table]:
    methods = _mef_methods(args, notes)
    brackets: list[tuple[str, np.ndarray]] = []
    mem = sorted((args.data / "mef" / "memorial").glob("memorial_*.png"))
    if mem:
        brackets.append((f"Memorial ({len(mem)} exposures)", np.stack([read_rgb(p) for p in mem])))
    else:
        notes.append("MEF Memorial: skipped, no memorial_*.png")
    if args.quick:
        notes.append("MEF held-out HDR bracket: not run in --quick mode")
    else:
        try:
            from napari_cscfusion.training.data import HELD_OUT_HDR, read_hdr, simulate_bracket
        except Exception as err:  # noqa: BLE001 - optional helper, any import failure skips
            notes.append(f"MEF held-out HDR bracket: skipped, helper not available ({err})")
        else:
            exr = args.data / "mef" / "hdr" / f"{HELD_OUT_HDR}.exr"
            if exr.exists():
                hdr = read_hdr(exr)
                st = simulate_bracket(hdr, HELD_OUT_EVS, rng=np.random.default_rng(0))
                brackets.append(
                    (
                        f"held-out HDR '{HELD_OUT_HDR}' (EV {', '.join(map(str, HELD_OUT_EVS))})",
                        np.asarray(st, np.float64),
                    )
                )
            else:
                notes.append(f"MEF held-out HDR bracket: skipped, {exr} missing")
    tables = []
    for name, stack in brackets:
        log(f"mef {name} {stack.shape}")
        table = Table(f"MEF, {name}", M.MEF_METRICS)
        for label, fn in methods:
            fused, sec = timed(fn, stack.astype(np.float32))
            table.add(label, M.evaluate("mef", stack, fused), sec)
        tables.append(table)
    return tables


def _area_down(img: np.ndarray, s: int) -> np.ndarray:
    h, w = img.shape
    return img.reshape(h // s, s, w // s, s).mean(axis=(1, 3))


def bench_mmf(args, notes: list[str]) -> list[Table]:
    ours = try_model("mmf", None, "ours (mmf)", notes)
    notes.append(
        "authors (mmf): not applicable, their CSC-MMFN is a 31-band hyperspectral x2 network"
    )
    if ours is not None and (
        ours.network.lr_channels != 1 or ours.network.guide_channels not in (1, 3)
    ):
        notes.append(
            f"ours (mmf): skipped, packaged model has lr_channels={ours.network.lr_channels}"
        )
        ours = None
    pairs = ivf_pairs(args.data / "ivf" / "flir_test")
    if not pairs:
        notes.append("MMF: skipped, no FLIR-test pairs")
        return []
    if args.quick:
        pairs = smallest(pairs, args.quick_pairs)
    elif args.limit:
        pairs = pairs[: args.limit]
    methods: list[tuple[str, Callable]] = []
    if ours is not None:
        from napari_cscfusion import fuse_guided

        methods.append(("CSC-MMFN ours", lambda low, g: fuse_guided(low, g, model=ours).image))
    methods += [
        ("bicubic", lambda low, g: B.bicubic_upsample(low, g.shape)),
        (
            f"guided filter (r={GUIDED_R}, eps={GUIDED_EPS:g})",
            lambda low, g: B.guided_filter_upsample(low, g, g.shape, GUIDED_R, GUIDED_EPS),
        ),
    ]
    tables = []
    for s in (2, 4):
        table = Table(
            f"MMF, FLIR-test thermal x{s} guided by visible ({len(pairs)} pairs)", ("PSNR", "SSIM")
        )
        for i, (ir_p, vis_p) in enumerate(pairs):
            ir, vis = read_grey(ir_p), read_grey(vis_p)
            h, w = ir.shape[0] // s * s, ir.shape[1] // s * s
            gt, guide = ir[:h, :w], vis[:h, :w]
            low = _area_down(gt, s)
            log(f"mmf x{s} {i + 1}/{len(pairs)} {ir_p.name} {gt.shape}")
            for label, fn in methods:
                out, sec = timed(fn, low.astype(np.float32), guide.astype(np.float32))
                table.add(label, {"PSNR": M.psnr(gt, out), "SSIM": M.ssim_fusion([gt], out)}, sec)
        tables.append(table)
    return tables


# ----------------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    dev = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs (load average at start {load}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), networks on {dev}, Python "
        f"{platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the 2 smallest pairs per set only")
    p.add_argument("--quick-pairs", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help="at most N pairs per set (0: all)")
    p.add_argument("--tasks", default="ivf,mef,mmf", help="comma-separated: ivf, mef, mmf")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--checkpoints", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--output", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = set(tasks) - {"ivf", "mef", "mmf"}
    if bad:
        p.error(f"unknown task(s): {', '.join(sorted(bad))}")
    if not args.data.is_dir():
        print(f"no data folder at {args.data}; nothing to benchmark", file=sys.stderr)
        return 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    machine_line = machine()
    notes: list[str] = []
    tables: list[Table] = []
    runners = {"ivf": bench_ivf, "mef": bench_mef, "mmf": bench_mmf}
    for t in tasks:
        tables += runners[t](args, notes)
    lines = [
        f"### Quality benchmark{' (--quick)' if args.quick else ''}",
        "",
        f"Machine: {machine_line}.",
        f"Total wall time {time.perf_counter() - t0:.0f} s. Conventions: "
        "napari_cscfusion.metrics (inputs in [0,1]; EN/MI in bits; MI, SCD, VIF summed over the "
        "two sources; SSIM = mean over sources; Qabf at most 0.9748). s/image = wall seconds "
        "of the fusion alone.",
        "",
    ]
    for t in tables:
        lines += [t.markdown(), ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    md = "\n".join(lines)
    print(md)
    if args.output:
        args.output.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
