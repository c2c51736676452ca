"""Reader: a folder of exposure images (or several image files chosen together) or a
multi-page TIFF -> one exposure stack layer; a TIFF written by this plugin -> its layers back;
a codes TIFF of ``cscfusion fuse --codes-out`` (engine.io.write_codes) -> one layer per code.

Single-page TIFFs and folders with fewer than two images are left to other readers (None).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.batch import IMAGE_SUFFIXES
from ..engine.batch import image_files as _image_files
from ..engine.io import CODES_AXES, TIFF_SUFFIXES, read_image
from ..engine.planes import symmetric_limits
from ._common import DIVERGING, META_KEY, plain_key

WRITER_KEY = "napari_cscfusion"  # our entry in the TIFF description written by _writer


def _tiff_kind(path: Path) -> str | None:
    """'ours' (written by this plugin), 'codes' (``--codes-out``), 'stack' (one series
    (K, H, W[, S]), K >= 2) or None."""
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            shaped = tif.shaped_metadata or ()
            if any(isinstance(m, dict) and WRITER_KEY in m for m in shaped):
                return "ours"
            if (len(shaped) == 1 and isinstance(shaped[0], dict)
                    and shaped[0].get("axes") == CODES_AXES and "codes" in shaped[0]):
                return "codes"
            series = tif.series
            if len(series) == 1:
                shape, axes = series[0].shape, series[0].axes
                spatial = 3 if axes.endswith("S") else 2  # S: samples (RGB) last
                if len(shape) == spatial + 1 and shape[0] >= 2:
                    return "stack"
    except Exception:  # not a TIFF we can read: another reader may
        return None
    return None


def get_reader(path):
    """npe2 reader hook: a callable for paths we read, else None."""
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        if len(paths) >= 2 and all(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                   for p in paths):
            return read_exposure_files
        return None
    p = Path(path)
    if p.is_dir():
        return read_exposure_folder if len(_image_files(p)) >= 2 else None
    if p.suffix.lower() in TIFF_SUFFIXES and p.is_file():
        kind = _tiff_kind(p)
        if kind == "ours":
            return read_plugin_tiff
        if kind == "codes":
            return read_codes_tiff
        if kind == "stack":
            return read_exposure_tiff
    return None


def _stack_layer(images: list[np.ndarray], names: list[str], layer_name: str, source: str):
    shapes = {n: a.shape for n, a in zip(names, images, strict=True)}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"{source}: the exposures must all have the same size and channels to "
                         f"form a stack: {listing}")
    stack = np.stack(images)
    rgb = stack.ndim == 4 and stack.shape[-1] in (3, 4)
    meta = {META_KEY: {"role": "exposure_stack", "exposure_axis": 0, "files": names,
                       "source": source}}
    return [(stack, {"name": layer_name, "rgb": rgb, "metadata": meta}, "image")]


def read_exposure_files(paths):
    paths = [Path(p) for p in paths]
    images = [read_image(p) for p in paths]
    return _stack_layer(images, [p.name for p in paths], f"{paths[0].stem} … ({len(paths)})",
                        f"{len(paths)} files")


def read_exposure_folder(path):
    folder = Path(path)
    files = _image_files(folder)
    images = [read_image(p) for p in files]
    return _stack_layer(images, [p.name for p in files], folder.name or str(folder),
                        f"folder {str(folder)!r}")


def read_exposure_tiff(path):
    import tifffile
    p = Path(path)
    stack = tifffile.imread(p)
    rgb = stack.ndim == 4 and stack.shape[-1] in (3, 4)
    meta = {META_KEY: {"role": "exposure_stack", "exposure_axis": 0, "files": [p.name],
                       "source": f"multi-page TIFF {str(p)!r}"}}
    return [(stack, {"name": p.stem, "rgb": rgb, "metadata": meta}, "image")]


def read_plugin_tiff(path):
    """Every series of a TIFF written by this plugin's writer, with its layer settings."""
    import tifffile
    out = []
    with tifffile.TiffFile(path) as tif:
        for series, md in zip(tif.series, tif.shaped_metadata, strict=False):
            info = md.get(WRITER_KEY, {}) if isinstance(md, dict) else {}
            data = series.asarray()
            kwargs = {k: info[k] for k in ("name", "metadata", "scale", "translate", "rgb",
                                           "contrast_limits", "visible") if k in info}
            if "colormap" in info and not info.get("rgb"):
                kwargs["colormap"] = _colormap(info["colormap"])
            out.append((data, kwargs, "image"))
    return out


def read_codes_tiff(path):
    """A ``--codes-out`` TIFF (names, q, H, W): one layer per code name, its q channels on a
    slider, diverging colours centred on zero as the widgets show codes."""
    import tifffile
    p = Path(path)
    with tifffile.TiffFile(p) as tif:
        run = dict(tif.shaped_metadata[0])
        codes = tif.series[0].asarray()
    names = run.pop("codes")
    for key in ("shape", "axes"):
        run.pop(key, None)
    if codes.shape[0] != len(names):
        raise ValueError(f"{str(p)!r}: {len(names)} code names for {codes.shape[0]} codes")
    out = []
    for name, code in zip(names, codes, strict=True):
        meta = {"role": "codes", "code": name, "file": str(p), "run": run}
        out.append((code, {"name": f"{plain_key(name)} codes · {p.stem}",
                           "metadata": {META_KEY: meta}, "colormap": DIVERGING,
                           "contrast_limits": symmetric_limits(code)}, "image"))
    return out


def _colormap(spec):
    """A colormap name, or our {'name', 'colors', 'controls'} description of a custom one."""
    if isinstance(spec, dict):
        from napari.utils import Colormap
        return Colormap(colors=spec["colors"], controls=spec["controls"], name=spec["name"])
    return spec
