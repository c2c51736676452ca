"""The engine: numpy (or dask) in, the same out. Normalisation, colour, device choice, fusion
rules, tiled inference (tiling.py) and lazy dask graphs (lazy.py)."""

from .device import available_devices, resolve_device
from .fusion import (
    Cancelled,
    FusionResult,
    fuse_exposures,
    fuse_grey_sources,
    fuse_guided,
    fuse_infrared_visible,
    stretch_percentiles,
)
from .lazy import close_clients, read_tiff_lazy, store_tiff
from .notices import OutOfMemoryRetry
from .registry import FusionModel, load_model
from .tiling import auto_tile, tile_grid

__all__ = ["Cancelled", "FusionModel", "FusionResult", "OutOfMemoryRetry", "auto_tile",
           "available_devices", "close_clients", "fuse_exposures", "fuse_grey_sources",
           "fuse_guided", "fuse_infrared_visible", "load_model", "read_tiff_lazy",
           "resolve_device", "store_tiff", "stretch_percentiles", "tile_grid"]
