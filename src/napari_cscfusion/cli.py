"""The ``cscfusion`` command line: fuse images with the engine (and train, when available).

    cscfusion fuse ivf IR.png VIS.png -o fused.tif
    cscfusion fuse mef exposure1.jpg exposure2.jpg exposure3.jpg -o fused.tif
    cscfusion fuse mmf lowres.tif guide.png -o sr.tif
    cscfusion devices
    cscfusion demo [--out demo_output] [--gui]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ._version import __version__
from .engine import (
    Cancelled,
    OutOfMemoryRetry,
    available_devices,
    fuse_exposures,
    fuse_guided,
    fuse_infrared_visible,
)
from .engine.io import read_image, to_grey, write_tiff
from .engine.registry import load_model
from .engine.rules import RULES
from .models.color import luma


def _model(task: str, weights: str | None):
    return load_model(task, weights) if weights else None


def _write(result, out: Path, codes_out: Path | None, quiet: bool) -> None:
    write_tiff(out, result.image, result.metadata)
    if codes_out is not None:
        names = sorted(result.codes)
        # codes of one shape are stacked (name, q, H, W); the names go in the metadata
        shapes = {result.codes[n].shape for n in names}
        if len(shapes) == 1:
            write_tiff(codes_out, np.stack([result.codes[n] for n in names]),
                       {"codes": names, **result.metadata})
        else:
            for n in names:
                p = codes_out.with_name(f"{codes_out.stem}_{n}{codes_out.suffix}")
                write_tiff(p, result.codes[n], {"codes": [n], **result.metadata})
    if not quiet:
        t = result.metadata.get("timings", {})
        secs = sum(v for v in t.values() if isinstance(v, (int, float)))
        print(f"wrote {out} {result.image.shape} {result.image.dtype} "
              f"({result.metadata.get('network')}, {result.metadata.get('device')}, "
              f"{secs:.1f} s)")


STREAM_BYTES = 1 << 30  # TIFF inputs larger than this are streamed even without --stream


def _streaming(args: argparse.Namespace) -> bool:
    """--stream, or a TIFF input over STREAM_BYTES (ivf and mef only)."""
    if args.task == "mmf":
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


def _ivf_options(args: argparse.Namespace) -> dict:
    """The ivf-only options given on the command line (--code-gain: the function's default
    when not given); an error for the other tasks."""
    if args.code_gain is None:
        return {}
    if args.task != "ivf":
        raise SystemExit(f"cscfusion fuse {args.task}: --code-gain is for ivf only")
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
        result = fuse_infrared_visible(ir, vis, model=model, base_rule=args.base_rule,
                                       detail_rule=args.detail_rule, **_ivf_options(args),
                                       **common)
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
    # --tile; --scheduler below (ivf, mef). No weight maps: nothing writes them, and for IVF
    # they are 16 B per pixel (1 GB of an 8192x8192 pair's memory)
    scale = {"tile": args.tile}
    if args.task == "ivf":
        if len(args.images) != 2:
            raise SystemExit("cscfusion fuse ivf: needs exactly two images, IR then VIS")
        ir, vis = (read_image(p) for p in args.images)
        if ir.ndim == 3 or vis.ndim == 3:
            print("note: colour input converted to luminance (CSC-IVFN fuses grey images)",
                  file=sys.stderr)
            ir, vis = to_grey(ir), to_grey(vis)
        result = fuse_infrared_visible(ir, vis, model=model, base_rule=args.base_rule,
                                       detail_rule=args.detail_rule, device=args.device,
                                       codes=want_codes, scheduler=args.scheduler,
                                       weights=False, **_ivf_options(args), **scale)
    elif args.task == "mef":
        frames = [read_image(p) for p in args.images]
        f0 = frames[0]
        if len(frames) == 1 and (f0.ndim == 4 or (f0.ndim == 3 and f0.shape[-1] not in (3, 4))):
            frames = list(f0)  # one multi-page TIFF: (K, H, W) or (K, H, W, 3)
        if len(frames) < 2:
            raise SystemExit("cscfusion fuse mef: needs at least two exposures (or one "
                             "multi-page TIFF)")
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            listing = ", ".join(f"{p} {f.shape}"
                                for p, f in zip(args.images, frames, strict=True))
            raise SystemExit(f"cscfusion fuse mef: exposures differ in shape: {listing}")
        frames = [f[..., :3] if f.ndim == 3 and f.shape[-1] == 4 else f for f in frames]
        result = fuse_exposures(np.stack(frames), model=model, device=args.device,
                                codes=want_codes, scheduler=args.scheduler, weights=False,
                                **scale)
    else:
        if len(args.images) != 2:
            raise SystemExit("cscfusion fuse mmf: needs exactly two images, LOWRES then GUIDE")
        low, guide = (read_image(p) for p in args.images)
        result = fuse_guided(low, guide, model=model, device=args.device, codes=want_codes,
                             **scale)
    _write(result, Path(args.output), Path(args.codes_out) if want_codes else None, args.quiet)
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
    f.add_argument("task", choices=["ivf", "mef", "mmf"],
                   help="ivf: infrared + visible; mef: exposures; mmf: low-res + guide")
    f.add_argument("images", nargs="+", help="input images (PNG, JPEG, TIFF)")
    f.add_argument("-o", "--output", required=True, help="output TIFF")
    f.add_argument("--weights", help="checkpoint file (or, for ivf, the authors' folder); "
                   "default: the packaged weights")
    f.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    f.add_argument("--base-rule", default="saliency", choices=RULES, help="ivf base codes")
    f.add_argument("--detail-rule", default="l1", choices=RULES, help="ivf detail codes")
    f.add_argument("--code-gain", type=float, default=None, metavar="GAIN",
                   help="ivf: factor on the fused base and detail codes before decoding "
                   "(default 2, the authors' infrared/visible heuristic, which stretches the "
                   "contrast; 1 keeps the sources' intensity scale)")
    f.add_argument("--codes-out", help="also write the sparse codes to this TIFF")
    f.add_argument("-q", "--quiet", action="store_true")
    f.add_argument("--tile", type=int, default=None,
                   help="tile side in pixels (default: from free memory; 0: whole image)")
    f.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address: run the tiles on that cluster "
                   "(ivf, mef)")
    f.add_argument("--stream", action="store_true",
                   help="read TIFF inputs lazily and stream the result to the output TIFF "
                   "with bounded memory (automatic for TIFFs over 1 GiB; ivf, mef)")
    f.set_defaults(func=cmd_fuse)

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
