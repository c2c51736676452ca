"""Writer: image layers (a fused layer and its code / weight layers) -> one TIFF, one series per
layer, with each layer's name, placement and metadata (the run's metadata: network, weights
sha256, rules, device, timings) embedded as JSON in the TIFF description. The file is written to
a temporary name beside the target, then renamed, so a failed save never leaves a half file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._common import jsonable
from ._reader import TIFF_SUFFIXES, WRITER_KEY

LAYER_KEYS = ("name", "metadata", "scale", "translate", "rgb", "contrast_limits", "visible")


def _colormap_spec(name) -> dict | None:
    try:
        from napari.utils.colormaps import ensure_colormap
        cmap = ensure_colormap(name)
    except Exception:
        return None
    return {"name": cmap.name, "colors": np.asarray(cmap.colors).tolist(),
            "controls": np.asarray(cmap.controls).tolist()}


def _layer_info(meta: dict) -> dict:
    info = {k: meta[k] for k in LAYER_KEYS if k in meta}
    if "colormap" in meta and not meta.get("rgb"):
        info["colormap"] = _colormap_spec(meta["colormap"]) or meta["colormap"]
    return jsonable(info)


def write_tiff(path: str, layers: list[tuple[Any, dict, str]]) -> list[str]:
    """npe2 writer for one or more image layers: returns [path]."""
    import tifffile
    target = Path(path)
    if target.suffix.lower() not in TIFF_SUFFIXES:
        target = target.with_suffix(".tif")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(layers)) as tif:
            for data, meta, _kind in layers:
                arr = np.asarray(data)
                if arr.dtype == np.float64:
                    arr = arr.astype(np.float32)
                rgb = bool(meta.get("rgb")) and arr.shape[-1] in (3, 4)
                tif.write(arr, photometric="rgb" if rgb else "minisblack",
                          metadata={WRITER_KEY: _layer_info(meta)},
                          extrasamples=("unassalpha",) if rgb and arr.shape[-1] == 4 else None,
                          compression="zlib")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return [str(target)]


def _needs_bigtiff(layers) -> bool:
    return sum(int(getattr(d, "nbytes", 0)) for d, _m, _k in layers) > 2**31
