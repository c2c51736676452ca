"""Soak test (issue 7, not run in CI): many random fusions in one process, memory watched.

    python benchmarks/soak.py                  # 1000 fusions (all three tasks, CPU)
    python benchmarks/soak.py -n 200 --json soak.json

Each iteration draws a task (ivf / mef / mmf), a small random size, dtype, value range, fusion
rule, number of exposures, grey or colour input; a few iterations on purpose carry a NaN pixel
(must raise ValueError) or are cancelled from the progress callback (must raise Cancelled), so
that the error paths are soaked too. Anything else raised is counted as a failure.

Memory: the resident set size (psutil) is sampled after every fusion. After ``--warmup``
iterations (caches, allocator arenas and torch's thread pools settle) the script reports

* peak RSS growth: the highest RSS seen after warm-up minus the highest RSS seen during
  warm-up (the target is ~0: no growth after warm-up);
* the slope of a least-squares line through the post-warm-up RSS samples (MiB per 1000
  fusions): a leak shows as a steady positive slope, allocator noise as a flat one;
* the growth in the number of Python objects the garbage collector tracks (a leak of results,
  tracebacks or callbacks shows here);

and prints an ASCII figure of RSS against the iteration. Weights: the authors' checkpoints in
../shared/reference-checkpoints (or $CSCFUSION_SHARED/reference-checkpoints) when present,
else the packaged ones (``--weights packaged`` forces those). Exit status 1 on unexpected
exceptions, or with ``--max-growth-mib`` when the peak growth exceeds it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CSCFUSION_SHARED", REPO.parent / "shared"))
AUTHORS = {"ivf": SHARED / "reference-checkpoints",
           "mef": SHARED / "reference-checkpoints" / "csc_mefn_authors.pth",
           "mmf": SHARED / "reference-checkpoints" / "csc_mmfn_authors.pth"}
DTYPES = ("uint8", "uint16", "int16", "float32", "float64")
MIB = 1024 * 1024


def load_models(which: str) -> tuple[dict, str]:
    from napari_cscfusion import load_model

    if which in ("auto", "authors") and all(p.exists() for p in AUTHORS.values()):
        return {t: load_model(t, p) for t, p in AUTHORS.items()}, "authors"
    if which == "authors":
        raise SystemExit(f"soak: the authors' checkpoints are not in {SHARED}")
    return {t: load_model(t) for t in AUTHORS}, "packaged"


def random_image(rng, shape, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return rng.integers(0, 256, shape).astype(np.uint8)
    if dtype == "uint16":
        return rng.integers(0, 4096, shape).astype(np.uint16)
    if dtype == "int16":  # CT-like, negative values
        return rng.integers(-1024, 3000, shape).astype(np.int16)
    scale = rng.choice([1.0, 1.0, 255.0, 1e4])
    return (rng.random(shape) * scale).astype(dtype)


class Cancel(Exception):
    pass


def one_fusion(rng, models, max_side: int, device: str):
    """Draw and run one fusion. Returns (task, outcome) with outcome 'ok', 'nan-refused' or
    'cancelled'; raises on anything unexpected."""
    from napari_cscfusion import fuse_exposures, fuse_guided, fuse_infrared_visible
    from napari_cscfusion.engine import Cancelled

    task = str(rng.choice(["ivf", "mef", "mmf"]))
    dtype = str(rng.choice(DTYPES))
    poison = rng.random() < 0.04 and dtype.startswith("float")
    cancel_at = int(rng.integers(0, 2)) if rng.random() < 0.04 else None

    def progress(done, total):
        if cancel_at is not None and done >= cancel_at:
            raise Cancelled("soak: cancelled on purpose")

    def poisoned(a):
        if poison:
            a = a.copy()
            a.flat[int(rng.integers(a.size))] = np.nan
        return a

    h, w = (int(v) for v in rng.integers(6, max_side + 1, 2))
    if task == "ivf":
        rule = str(rng.choice(["saliency", "l1", "average"]))
        call = lambda: fuse_infrared_visible(  # noqa: E731
            poisoned(random_image(rng, (h, w), dtype)), random_image(rng, (h, w), dtype),
            model=models["ivf"], base_rule=rule, device=device, progress=progress)
        shape = (h, w)
    elif task == "mef":
        k = int(rng.integers(2, 7))
        rgb = bool(rng.random() < 0.5)
        stack = random_image(rng, (k, h, w, 3) if rgb else (k, h, w), dtype)
        call = lambda: fuse_exposures(poisoned(stack), model=models["mef"],  # noqa: E731
                                      device=device, progress=progress)
        shape = (h, w, 3) if rgb else (h, w)
    else:
        c = models["mmf"].network.lr_channels
        lh, lw = max(4, h // 2), max(4, w // 2)
        rgb = bool(rng.random() < 0.5)
        low = random_image(rng, (c, lh, lw) if c > 1 else (lh, lw), dtype)
        guide = random_image(rng, (h, w, 3) if rgb else (h, w), dtype)
        call = lambda: fuse_guided(poisoned(low), guide, model=models["mmf"],  # noqa: E731
                                   device=device, progress=progress)
        shape = (c, h, w) if c > 1 else (h, w)
    try:
        result = call()
    except ValueError as exc:
        if poison and "NaN" in str(exc):
            return task, "nan-refused"
        raise
    except Cancelled:
        if cancel_at is not None:
            return task, "cancelled"
        raise
    if poison or cancel_at is not None:  # every run reports done == total at its end
        raise AssertionError(f"{task}: expected an error (poison={poison}, cancel_at="
                             f"{cancel_at}), got a result")
    img = result.image
    if img.shape != shape or not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
        raise AssertionError(f"{task}: bad result {img.shape} (expected {shape}), range "
                             f"[{img.min()}, {img.max()}]")
    return task, "ok"


def ascii_figure(rss_mib: list[float], warmup: int, width: int = 72, height: int = 12) -> str:
    """RSS (MiB) against the iteration, one column per bucket (its maximum)."""
    n = len(rss_mib)
    buckets = np.array_split(np.asarray(rss_mib), min(width, n))
    cols = np.array([b.max() for b in buckets])
    lo, hi = float(cols.min()), float(cols.max())
    span = max(hi - lo, 1e-9)
    levels = np.round((cols - lo) / span * (height - 1)).astype(int)
    warm_col = int(np.searchsorted(np.cumsum([len(b) for b in buckets]), warmup))
    lines = []
    for row in range(height - 1, -1, -1):
        label = f"{lo + span * row / (height - 1):9.1f} |"
        chars = "".join("#" if lv >= row else ("'" if i == warm_col else " ")
                        for i, lv in enumerate(levels))
        lines.append(label + chars)
    lines.append(" " * 10 + "+" + "-" * len(cols))
    lines.append(" " * 11 + f"iteration 1 .. {n}  (RSS MiB, max per column; ' = end of "
                 f"warm-up at {warmup})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--iterations", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=None,
                   help="iterations before measuring (default: 10%% of n, at least 20)")
    p.add_argument("--max-side", type=int, default=48, help="largest image side (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--weights", choices=("auto", "authors", "packaged"), default="auto")
    p.add_argument("--no-onednn", action="store_true",
                   help="torch.backends.mkldnn.enabled = False: tells growth of oneDNN's "
                        "per-shape primitive cache (bounded, ONEDNN_PRIMITIVE_CACHE_CAPACITY, "
                        "default 1024) apart from a leak")
    p.add_argument("--json", help="also write the summary (and RSS samples) to this file")
    p.add_argument("--max-growth-mib", type=float, default=None,
                   help="exit 1 when the peak RSS growth after warm-up exceeds this")
    args = p.parse_args(argv)

    import psutil
    import torch

    torch.set_num_threads(args.threads)
    if args.no_onednn:
        torch.backends.mkldnn.enabled = False
    n = args.iterations
    warmup = args.warmup if args.warmup is not None else max(20, n // 10)
    if warmup >= n:
        raise SystemExit("soak: --warmup must be smaller than -n")
    models, source = load_models(args.weights)
    proc = psutil.Process()
    rng = np.random.default_rng(args.seed)
    rss, outcomes, failures = [], {}, []
    t0 = time.perf_counter()
    for i in range(n):
        try:
            task, outcome = one_fusion(rng, models, args.max_side, args.device)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            task, outcome = "?", "FAILED"
            failures.append(f"iteration {i}: {type(exc).__name__}: {exc}")
        outcomes[(task, outcome)] = outcomes.get((task, outcome), 0) + 1
        rss.append(proc.memory_info().rss / MIB)
        if i + 1 == warmup:
            gc.collect()
            objects_at_warmup = len(gc.get_objects())
        if (i + 1) % max(1, n // 10) == 0:
            print(f"  {i + 1}/{n}  rss {rss[-1]:.1f} MiB  {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
    elapsed = time.perf_counter() - t0
    gc.collect()
    objects_growth = len(gc.get_objects()) - objects_at_warmup
    warm, after = np.asarray(rss[:warmup]), np.asarray(rss[warmup:])
    growth = float(after.max() - warm.max())
    x = np.arange(warmup, n)
    slope = float(np.polyfit(x, after, 1)[0] * 1000) if len(after) > 1 else 0.0
    summary = {
        "iterations": n, "warmup": warmup, "seed": args.seed, "max_side": args.max_side,
        "device": args.device, "threads": args.threads, "weights": source,
        "torch": torch.__version__, "onednn": not args.no_onednn,
        "onednn_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default"),
        "seconds": round(elapsed, 1),
        "rss_start_mib": round(rss[0], 1), "rss_end_of_warmup_peak_mib": round(warm.max(), 1),
        "rss_after_warmup_peak_mib": round(after.max(), 1), "rss_final_mib": round(rss[-1], 1),
        "peak_growth_after_warmup_mib": round(growth, 2),
        "slope_mib_per_1000": round(slope, 3),
        "python_objects_growth_after_warmup": objects_growth,
        "outcomes": {f"{t}/{o}": c for (t, o), c in sorted(outcomes.items())},
        "failures": failures[:20], "n_failures": len(failures),
    }
    print(ascii_figure(rss, warmup))
    print()
    for k, v in summary.items():
        if k != "failures":
            print(f"{k:32s} {v}")
    for f in failures[:20]:
        print("FAILURE", f)
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "rss_mib": [round(r, 2) for r in rss]},
                                              indent=1))
    bad = bool(failures) or (args.max_growth_mib is not None and growth > args.max_growth_mib)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
