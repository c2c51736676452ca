"""napari-cscfusion: image fusion with deep convolutional sparse coding networks.

    from napari_cscfusion import load_model, fuse_infrared_visible, fuse_exposures, fuse_guided
    from napari_cscfusion import fuse_multimodal, estimate_misalignment, register_rigid
"""

import os

from ._version import __version__

# oneDNN caches compiled kernels per input shape (1024 by default: ~200 MiB in a long session of
# differently sized images, benchmarks/README.md "soak.py"); 64 bounds that at no measured cost.
# oneDNN reads it at its first convolution: it counts if torch was imported but not yet used.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from .engine import (  # noqa: E402
    FusionModel,
    FusionResult,
    OutOfMemoryRetry,
    available_devices,
    fuse_exposures,
    fuse_guided,
    fuse_infrared_visible,
    load_model,
)
from .engine.alignment import estimate_misalignment, register_rigid  # noqa: E402
from .engine.medical import fuse_multimodal  # noqa: E402

__all__ = ["__version__", "FusionModel", "FusionResult", "OutOfMemoryRetry", "available_devices",
           "estimate_misalignment", "fuse_exposures", "fuse_guided", "fuse_infrared_visible",
           "fuse_multimodal", "load_model", "register_rigid"]
