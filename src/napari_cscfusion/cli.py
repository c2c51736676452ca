"""The ``cscfusion`` command line: fuse images with the engine (and train, when available).

    cscfusion fuse ivf IR.png VIS.png -o fused.tif
    cscfusion fuse mef exposure1.jpg exposure2.jpg exposure3.jpg -o fused.tif
    cscfusion fuse mmf lowres.tif guide.png -o sr.tif
    cscfusion fuse medical t1.png pet_rgb.png -o fused.tif
    cscfusion batch ivf IR_DIR VIS_DIR -o OUT_DIR [--format png] [--overwrite]
    cscfusion batch mef BRACKETS_DIR -o OUT_DIR
    cscfusion devices
    cscfusion demo [--out demo_output] [--gui]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

import torch

from ._version import __version__
from .engine import (
    Cancelled,
    OutOfMemoryRetry,
    available_devices,
    fuse_exposures,
    fuse_infrared_visible,
)
from .engine.batch import (
    FORMATS,
    TASKS,
    WrongInputs,
    fuse_sources,
    plan_batch,
    read_inputs,
    run_batch,
)
from .engine.io import write_codes, write_tiff
from .engine.registry import load_model
from .engine.rules import RULES
from .models.color import luma


def _model(task: str, weights: str | None):
    return load_model(task, weights) if weights else None


def _write(result, out: Path, codes_out: Path | None, quiet: bool) -> None:
    write_tiff(out, result.image, result.metadata)
    if codes_out is not None:
        write_codes(codes_out, result.codes, result.metadata)
    if not quiet:
        t = result.metadata.get("timings", {})
        secs = sum(v for v in t.values() if isinstance(v, (int, float)))
        print(f"wrote {out} {result.image.shape} {result.image.dtype} "
              f"({result.metadata.get('network')}, {result.metadata.get('device')}, "
              f"{secs:.1f} s)")


STREAM_BYTES = 1 << 30  # TIFF inputs larger than this are streamed even without --stream


def _streaming(args: argparse.Namespace) -> bool:
    """--stream, or a TIFF input over STREAM_BYTES (ivf and mef only)."""
    if args.task in ("mmf", "medical"):
        return False
    tiffs = [Path(p) for p in args.images if Path(p).suffix.lower() in (".tif", ".tiff")]
    if args.stream:
        if len(tiffs) != len(args.images):
            raise SystemExit("cscfusion fuse: --stream needs TIFF inputs")
        return True
    if len(tiffs) != len(args.images):
        return False
    import tifffile

    def nbytes(p):
        with tifffile.TiffFile(p) as tf:
            return sum(s.size * s.dtype.itemsize for s in tf.series)

    return any(nbytes(p) > STREAM_BYTES for p in tiffs)


def _lazy_grey(a):
    """Luminance of a lazy (H, W, 3|4) image; grey images unchanged."""
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return luma(a)
    return a


def _rule_options(args: argparse.Namespace) -> dict:
    """The fusion rules given on the command line (the function's defaults when not given)."""
    return {k: v for k, v in (("base_rule", args.base_rule), ("detail_rule", args.detail_rule))
            if v is not None}


def _ivf_options(args: argparse.Namespace) -> dict:
    """The ivf/medical-only options given on the command line (--code-gain: the function's
    default when not given); an error for the other tasks."""
    if args.code_gain is None:
        return {}
    if args.task not in ("ivf", "medical"):
        raise SystemExit(f"cscfusion {args.command} {args.task}: --code-gain is for ivf and "
                         f"medical only")
    return {"code_gain": args.code_gain}


def cmd_fuse_stream(args: argparse.Namespace, model) -> int:
    """Big TIFFs: read lazily, fuse as a dask graph tile by tile, stream the result to the
    output TIFF with a progress bar; memory stays bounded by the tile size."""
    import dask.array as da
    from tqdm import tqdm

    from .engine.io import read_tiff_lazy, store_tiff

    tile = args.tile if args.tile is not None else 1024
    inputs = [read_tiff_lazy(p, chunk=max(tile, 256)) for p in args.images]
    common = {"device": args.device, "tile": tile, "weights": False,
              "scheduler": args.scheduler}
    if args.task == "ivf":
        if len(inputs) != 2:
            raise SystemExit("cscfusion fuse ivf: needs exactly two images, IR then VIS")
        ir, vis = (_lazy_grey(a) for a in inputs)
        result = fuse_infrared_visible(ir, vis, model=model, **_rule_options(args),
                                       **_ivf_options(args), **common)
    else:
        stack = inputs[0] if len(inputs) == 1 else da.stack(inputs)
        if stack.ndim >= 4 and stack.shape[-1] == 4:
            stack = stack[..., :3]
        result = fuse_exposures(stack, model=model, **common)
    bar = None if args.quiet else tqdm(unit="block", desc="fusing", file=sys.stderr)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        store_tiff(Path(args.output), result.image, result.metadata, progress)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(f"wrote {args.output} {result.image.shape} float32 (streamed, tile {tile})")
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    _ivf_options(args)  # --code-gain with another task: an error before any work
    model = _model(args.task, args.weights)
    want_codes = args.codes_out is not None
    if not want_codes and _streaming(args):
        return cmd_fuse_stream(args, model)
    try:
        sources, notes = read_inputs(args.task, args.images)
    except WrongInputs as exc:
        raise SystemExit(f"cscfusion fuse {args.task}: {exc}") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    # No weight maps (fuse_sources asks for none): nothing writes them, and for IVF they are
    # 16 B per pixel (1 GB of an 8192x8192 pair's memory)
    result = fuse_sources(args.task, sources, model, device=args.device,
                          base_rule=args.base_rule, detail_rule=args.detail_rule,
                          tile=args.tile, scheduler=args.scheduler, codes=want_codes,
                          exact=True if args.exact else None, **_ivf_options(args))
    _write(result, Path(args.output), Path(args.codes_out) if want_codes else None, args.quiet)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Fuse every input set of the folders; a progress bar on stderr, the failures listed at
    the end; exit status 1 if any item failed."""
    from tqdm import tqdm

    options = _ivf_options(args)
    plan = plan_batch(args.task, args.folders, args.output, args.format)
    if not plan.items:
        print(f"cscfusion batch {args.task}: no input images found in "
              f"{', '.join(str(d) for d in plan.in_dirs)}", file=sys.stderr)
        return 1
    outcomes = run_batch(plan, _model(args.task, args.weights), overwrite=args.overwrite,
                         device=args.device, base_rule=args.base_rule,
                         detail_rule=args.detail_rule, tile=args.tile, **options)
    counts = {"written": 0, "skipped": 0, "failed": 0}
    failures = []
    with tqdm(total=len(plan), unit="image", desc=f"batch {args.task}", file=sys.stderr,
              disable=args.quiet) as bar:
        for outcome in outcomes:
            counts[outcome.status] += 1
            if outcome.status == "failed":
                failures.append(outcome)
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
    print(f"{counts['written']} written, {counts['skipped']} skipped (output exists; "
          f"--overwrite to redo), {counts['failed']} failed, in {plan.out_dir}")
    if failures:
        print(f"cscfusion batch {args.task}: {len(failures)} failed:", file=sys.stderr)
        for outcome in failures:
            files = ", ".join(str(p) for p in outcome.item.inputs) or outcome.item.name
            print(f"  {outcome.item.name} ({files}): {outcome.error}", file=sys.stderr)
        return 1
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    print("\n".join(available_devices()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cscfusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"napari-cscfusion {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fuse", help="fuse images with a CSC network, write a TIFF")
    f.add_argument("task", choices=TASKS,
                   help="ivf: infrared + visible; mef: exposures; mmf: low-res + guide; "
                   "medical: two or more registered modalities (at most one pseudo-coloured)")
    f.add_argument("images", nargs="+", help="input images (PNG, JPEG, TIFF)")
    f.add_argument("-o", "--output", required=True, help="output TIFF")
    _fusion_options(f)
    f.add_argument("--codes-out", help="also write the sparse codes to this TIFF")
    f.add_argument("--exact", action="store_true",
                   help="the exact reference arithmetic even where the fast path applies "
                   "(weights with no negative soft threshold; within 1e-3 of it); streamed "
                   "and cluster runs are always exact")
    f.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address: run the tiles on that cluster "
                   "(ivf, mef)")
    f.add_argument("--stream", action="store_true",
                   help="read TIFF inputs lazily and stream the result to the output TIFF "
                   "with bounded memory (automatic for TIFFs over 1 GiB; ivf, mef)")
    f.set_defaults(func=cmd_fuse)

    b = sub.add_parser(
        "batch", help="fuse every image (set) of whole folders, paired by file name",
        description="ivf, mmf, medical: one folder per source (ivf: IR_DIR VIS_DIR; mmf: "
        "LOWRES_DIR GUIDE_DIR; medical: one folder per modality), files paired by name "
        "without extension. mef: one folder with one sub-folder per bracket (exposures in "
        "sorted order) or one multi-page TIFF per bracket. Outputs that exist are skipped; a "
        "bad item is listed at the end and the others are written (exit status 1 if any "
        "failed).")
    b.add_argument("task", choices=TASKS)
    b.add_argument("folders", nargs="+", metavar="IN_DIR", help="input folders")
    b.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                   help="output folder (created if missing); one file per item, named as "
                   "the inputs")
    b.add_argument("--format", choices=FORMATS, default="tiff",
                   help="tiff (default): float32 with the run's metadata; png, jpeg: 8-bit, "
                   "the metadata as a PNG text chunk / JPEG comment")
    b.add_argument("--overwrite", action="store_true", help="redo outputs that exist")
    _fusion_options(b)
    b.set_defaults(func=cmd_batch)

    d = sub.add_parser("devices", help="list the devices this machine offers")
    d.set_defaults(func=cmd_devices)

    from .demo import add_demo_parser

    add_demo_parser(sub)

    try:
        from .training.cli import add_train_parser
    except ImportError:  # training extras not installed
        pass
    else:
        add_train_parser(sub)
    return p


def _fusion_options(p: argparse.ArgumentParser) -> None:
    """The options `fuse` and `batch` share."""
    p.add_argument("--weights", help="checkpoint file (or, for ivf and medical, the authors' "
                   "folder); default: the packaged weights")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--base-rule", default=None, choices=RULES,
                   help="ivf, medical: base codes (default: ivf saliency, medical choose-max)")
    p.add_argument("--detail-rule", default=None, choices=RULES,
                   help="ivf, medical: detail codes (default: ivf l1, medical l1-black)")
    p.add_argument("--code-gain", type=float, default=None, metavar="GAIN",
                   help="ivf, medical: factor on the fused base and detail codes before "
                   "decoding (default: ivf 2, the authors' infrared/visible heuristic, which "
                   "stretches the contrast; medical 1, which keeps the sources' intensity "
                   "scale)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in pixels (default: from free memory; 0: whole image; "
                   "not medical)")


@contextlib.contextmanager
def _notices_on_stderr():
    """The engine's notices (OutOfMemoryRetry: smaller tiles, or the CPU instead of the GPU)
    as ``cscfusion: warning: ...`` lines on stderr, each time (not once per session as
    Python's default filter would); other warnings as Python shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", OutOfMemoryRetry)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, OutOfMemoryRetry):
                print(f"cscfusion: warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _notices_on_stderr():
            return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        print(f"cscfusion: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as exc:
        print(f"cscfusion: error: out of memory ({type(exc).__name__}); use smaller tiles "
              f"(--tile 512) or another --device", file=sys.stderr)
        return 3
    except Cancelled:
        print("cscfusion: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
