"""The engine: numpy (or dask) in, the same out; the public API, which the CLI and the napari
layer call.

One module per network: ivf.py (fuse_infrared_visible), mef.py (fuse_exposures), mmf.py
(fuse_guided), medical.py (fuse_multimodal, on ivf.py's core), each with its per-crop kernel
and its dask graph builder, over generic machinery that knows no network: tiling.py (tiles,
memory budget, statistics passes, run_tiled), lazy.py (dask graphs, CPU twins, clusters),
resample.py, rules.py (the IVF fusion rules with their halos), inputs.py (checks and the one
normalisation rule), io.py, notices.py, device.py, registry.py; result.py holds FusionResult.
"""

from .device import available_devices, resolve_device
from .io import read_tiff_lazy, store_tiff
from .ivf import fuse_grey_sources, fuse_infrared_visible
from .lazy import close_clients
from .mef import fuse_exposures, stretch_percentiles
from .mmf import fuse_guided
from .notices import OutOfMemoryRetry
from .registry import FusionModel, load_model
from .result import Cancelled, FusionResult
from .tiling import auto_tile, tile_grid

__all__ = ["Cancelled", "FusionModel", "FusionResult", "OutOfMemoryRetry", "auto_tile",
           "available_devices", "close_clients", "fuse_exposures", "fuse_grey_sources",
           "fuse_guided", "fuse_infrared_visible", "load_model", "read_tiff_lazy",
           "resolve_device", "store_tiff", "stretch_percentiles", "tile_grid"]
