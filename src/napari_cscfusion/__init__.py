"""napari-cscfusion: image fusion with deep convolutional sparse coding networks.

    from napari_cscfusion import load_model, fuse_infrared_visible, fuse_exposures, fuse_guided
"""

__version__ = "0.1.0"

from .engine import (  # noqa: E402
    FusionModel,
    FusionResult,
    available_devices,
    fuse_exposures,
    fuse_guided,
    fuse_infrared_visible,
    load_model,
)

__all__ = ["__version__", "FusionModel", "FusionResult", "available_devices", "fuse_exposures",
           "fuse_guided", "fuse_infrared_visible", "load_model"]
