"""Reading source images and writing results (TIFF with the run's metadata as JSON)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """PNG/JPEG/BMP via imageio, TIFF via tifffile; returns the array as stored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio

    try:
        return np.asarray(iio.imread(path))
    except Exception as exc:
        raise ValueError(f"cannot read {str(path)!r} as an image ({exc})") from None


def to_grey(image: np.ndarray) -> np.ndarray:
    """(H,W,3|4) colour -> (H,W) BT.601 luminance, same value range; grey passes through."""
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = image[..., :3].astype(np.float64)
        grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        if np.issubdtype(image.dtype, np.integer):
            return np.round(grey).astype(image.dtype)
        return grey.astype(image.dtype)
    return image


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_tiff(path: str | Path, image, metadata: dict | None = None) -> Path:
    """Write ``image`` to a TIFF with ``metadata`` as JSON in the image description.

    Written to a temporary file in the same folder, then renamed: a failure (unwritable
    folder, full disk) leaves no partial file behind.
    """
    import tifffile

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OSError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    description = json.dumps(_jsonable(metadata or {}))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    os.close(fd)
    try:
        arr = np.asarray(image)
        photometric = "rgb" if arr.ndim == 3 and arr.shape[-1] == 3 else "minisblack"
        tifffile.imwrite(tmp, arr, description=description, photometric=photometric,
                         bigtiff=arr.nbytes > 2**31, metadata=None)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_tiff_metadata(path: str | Path) -> dict:
    """The JSON metadata written by write_tiff (empty dict if there is none)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        desc = tif.pages[0].description
    try:
        return json.loads(desc)
    except (TypeError, ValueError):
        return {}
