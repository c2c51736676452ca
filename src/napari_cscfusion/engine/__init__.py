"""The engine: numpy in, numpy out. Normalisation, colour, device choice, fusion rules."""

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
from .registry import FusionModel, load_model

__all__ = ["Cancelled", "FusionModel", "FusionResult", "available_devices", "fuse_exposures",
           "fuse_grey_sources", "fuse_guided", "fuse_infrared_visible", "load_model",
           "resolve_device", "stretch_percentiles"]
