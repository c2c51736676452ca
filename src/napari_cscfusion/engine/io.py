"""Reading source images (``read_image``: the one reader, also the napari reader's) and writing
results: TIFF with the run's metadata as JSON (``write_tiff``; ``store_tiff`` streams a lazy
result block by block), ``read_tiff_lazy`` for big inputs, and the one ``jsonable``."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..models.color import luma
from .lazy import is_dask

TIFF_SUFFIXES = (".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """PNG/JPEG/BMP via imageio, TIFF via tifffile; returns the array as stored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            image = np.asarray(tifffile.imread(path))
        else:
            import imageio.v3 as iio

            image = np.asarray(iio.imread(path))
    except Exception as exc:
        raise ValueError(f"cannot read {str(path)!r} as an image ({exc})") from None
    if image.size == 0:  # tifffile returns an empty array for a broken file (and logs)
        raise ValueError(f"cannot read {str(path)!r} as an image (no image data: the file is "
                         f"empty, truncated or corrupt)")
    return image


def to_grey(image: np.ndarray) -> np.ndarray:
    """(H,W,3|4) colour -> (H,W) BT.601 luminance, same value range; grey passes through."""
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = image[..., :3].astype(np.float64)
        grey = luma(rgb)
        if np.issubdtype(image.dtype, np.integer):
            return np.round(grey).astype(image.dtype)
        return grey.astype(image.dtype)
    return image


def jsonable(obj):
    """A copy of ``obj`` made of JSON types, for TIFF descriptions and layer metadata: dict
    keys as strings, tuples and lists as lists (sets sorted), numpy scalars and arrays as
    numbers and lists, paths as strings, anything else as its repr."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v) for v in sorted(obj)]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, exc: OSError) -> OSError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    message = f"cannot write {str(path)!r}: {reason} (no partial file is left)"
    # OSError(errno, text) becomes the matching subclass (PermissionError, ...)
    return OSError(exc.errno, message) if exc.errno is not None else OSError(message)


@contextlib.contextmanager
def replaced_on_success(path: str | Path) -> Iterator[Path]:
    """``with replaced_on_success(path) as tmp:`` write to ``tmp``, a temporary file in the
    same folder; when the block ends without error it gets the usual permissions (0o666 less
    the umask, or those of the file it replaces, not mkstemp's private 0o600) and is renamed
    over ``path``. Any failure, an interruption or cancellation included, removes it: no
    partial file is left and an existing file at ``path`` stays untouched. OSErrors name
    ``path`` and keep their errno."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OSError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {str(path)!r}: it is a folder")
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tiff(path: str | Path, image, metadata: dict | None = None,
               axes: str | None = None) -> Path:
    """Write ``image`` to a TIFF with ``metadata`` as JSON in the image description.

    ``axes`` (tifffile's letters, one per axis of ``image``, e.g. 'ICYX'): the description is
    tifffile's shaped one instead, ``metadata`` with the array's shape and these axes added
    (read_tiff_metadata returns them too), so that tifffile reads the array back in its
    shape rather than as a flat stack of pages.

    Written to a temporary file in the same folder, flushed to disk, then renamed over
    ``path`` (``replaced_on_success``): a failure (unwritable folder, full disk, interruption)
    leaves no partial file behind and an existing file at ``path`` untouched.
    """
    import tifffile

    path = Path(path)
    arr = np.asarray(image)
    if axes is None:
        description, shaped = json.dumps(jsonable(metadata or {})), None
    else:
        if len(axes) != arr.ndim:
            raise ValueError(f"axes: one letter per axis of the {arr.shape} array, got {axes!r}")
        description, shaped = None, {**jsonable(metadata or {}), "axes": axes}
    photometric = "rgb" if arr.ndim == 3 and arr.shape[-1] == 3 else "minisblack"
    with replaced_on_success(path) as tmp, open(tmp, "wb") as fh:
        tifffile.imwrite(fh, arr, description=description, photometric=photometric,
                         bigtiff=arr.nbytes > 2**31, metadata=shaped)
        fh.flush()
        os.fsync(fh.fileno())  # a full disk may only show here
    return path


CODES_AXES = "ICYX"  # (code name, code channel, H, W) in tifffile's letters


def write_codes(path: str | Path, codes: dict, metadata: dict | None = None) -> list[Path]:
    """Write a result's codes (name -> (q, H, W)) to TIFF, the (name, channel) split kept: codes
    of one shape as one (names, q, H, W) array (``CODES_AXES``), the names in the metadata's
    "codes" in the order of the first axis; codes of several shapes (the packaged
    CSC-MMFN's: its low-res codes) one file per name, ``<stem>_<name><suffix>``, each
    (1, q, H, W) with its name. ``metadata`` (the run's) goes with them. Returns the paths
    written."""
    path = Path(path)
    names = sorted(codes)
    meta = dict(metadata or {})
    if len({np.shape(codes[n]) for n in names}) == 1:
        groups = [(path, names)]
    else:
        groups = [(path.with_name(f"{path.stem}_{n}{path.suffix}"), [n]) for n in names]
    return [write_tiff(p, np.stack([np.asarray(codes[n], np.float32) for n in group]),
                       {**meta, "codes": group}, axes=CODES_AXES)
            for p, group in groups]


EIGHT_BIT_SUFFIXES = {"png": ".png", "jpeg": ".jpg"}
METADATA_KEY = "cscfusion"  # the PNG text chunk holding the run's metadata (JSON)


def to_uint8(image) -> np.ndarray:
    """A fused image (floats in [0, 1]) as 8-bit, rounded; values outside [0, 1] clipped."""
    arr = np.asarray(image, dtype=np.float32)
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_image8(path: str | Path, image, metadata: dict | None = None) -> Path:
    """Write a fused image (floats in [0, 1], grey (H, W) or RGB (H, W, 3)) as an 8-bit PNG or
    JPEG (by ``path``'s suffix), with ``metadata`` as JSON: a PNG text chunk "cscfusion" or the
    JPEG comment. Atomic like write_tiff (replaced_on_success)."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    arr = to_uint8(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"cannot write {str(path)!r} as an 8-bit image: expected a grey "
                         f"(H, W) or RGB (H, W, 3) image, got shape {arr.shape} (use TIFF)")
    text = json.dumps(jsonable(metadata or {}))
    suffix = path.suffix.lower()
    if suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, text)
        options = {"format": "PNG", "pnginfo": info}
    elif suffix in (".jpg", ".jpeg"):
        options = {"format": "JPEG", "quality": 95, "comment": text.encode()}
    else:
        raise ValueError(f"cannot write {str(path)!r} as an 8-bit image: use .png, .jpg or "
                         f".jpeg")
    with replaced_on_success(path) as tmp, open(tmp, "wb") as fh:
        Image.fromarray(arr).save(fh, **options)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read_image_metadata(path: str | Path) -> dict:
    """The JSON metadata written by write_tiff or write_image8 (empty dict if there is none)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return read_tiff_metadata(path)
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get(METADATA_KEY, im.info.get("comment"))
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {}


def read_tiff_metadata(path: str | Path) -> dict:
    """The JSON metadata written by write_tiff (empty dict if there is none)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        desc = tif.pages[0].description
    try:
        return json.loads(desc)
    except (TypeError, ValueError):
        return {}


# --- big TIFFs: lazy reading, streamed writing ---------------------------------------------

def read_tiff_lazy(path, chunk: int = 1024):
    """A TIFF as a dask array without reading it: via zarr when installed
    (``tifffile.imread(aszarr=True)``), else a memory map (uncompressed, contiguous files —
    what ``store_tiff`` writes), else read whole (compressed files without zarr)."""
    import dask.array as da
    import tifffile

    try:
        import zarr  # noqa: F401
    except ImportError:
        zarr = None
    if zarr is not None:
        store = tifffile.imread(path, aszarr=True)
        return da.from_zarr(store)
    try:
        arr = tifffile.memmap(path, mode="r")
    except (ValueError, OSError):
        arr = tifffile.imread(path)
    spatial = 2 if arr.ndim == 2 or arr.shape[-1] not in (3, 4) else 3
    chunks = tuple([1] * (arr.ndim - spatial) + [chunk, chunk] + [-1] * (spatial - 2))
    return da.from_array(arr, chunks=chunks)


def store_tiff(path, image, metadata: dict | None = None, progress=None) -> None:
    """Compute the dask array ``image`` block by block into an uncompressed TIFF at ``path``
    (BigTIFF when over 2 GB) with bounded memory: the blocks go into a memory map of the file
    as they finish, and the graph is computed once (shared statistics tasks run once).
    ``progress(done, total)`` after every block. The map is of a temporary file beside
    ``path``, renamed over it at the end: a failure, Ctrl-C or a ``Cancelled`` from
    ``progress`` mid-stream leaves no partial file and an existing ``path`` untouched."""
    import dask.array as da
    import tifffile

    arr = image if is_dask(image) else da.from_array(np.asarray(image))
    rgb = arr.ndim >= 3 and arr.shape[-1] == 3
    with replaced_on_success(path) as tmp:
        _store_into(tifffile.memmap(tmp, shape=arr.shape, dtype=arr.dtype,
                                    bigtiff=arr.nbytes > 2 ** 31 - 2 ** 25,
                                    photometric="rgb" if rgb else "minisblack",
                                    description=json.dumps(jsonable(metadata or {})),
                                    metadata=None), arr, rgb, progress)


def _store_into(mm, arr, rgb: bool, progress) -> None:
    """store_tiff's computation of ``arr`` into the memory map ``mm``, flushed and closed."""
    import dask.array as da
    from dask.callbacks import Callback

    class _Ticks(Callback):
        def _start_state(self, dsk, state):
            self.total = len(state["ready"]) + len(state["waiting"])
            self.done = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            self.done += 1
            if progress is not None:
                progress(self.done, self.total)

    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    try:
        if client is None:
            with _Ticks():
                da.store(arr, mm, lock=True, scheduler="threads")
        else:
            # a cluster (results persisted there by the fuse_* call): gather row bands here
            row = arr.ndim - (3 if rgb else 2)
            edges = np.cumsum((0,) + arr.chunks[row])
            lead = list(np.ndindex(*arr.shape[:row]))
            total, done = len(lead) * (len(edges) - 1), 0
            for idx in lead:
                for y0, y1 in zip(edges[:-1], edges[1:], strict=True):
                    sl = idx + (slice(int(y0), int(y1)),)
                    mm[sl] = arr[sl].compute()
                    done += 1
                    if progress is not None:
                        progress(done, total)
        mm.flush()
    finally:
        del mm
