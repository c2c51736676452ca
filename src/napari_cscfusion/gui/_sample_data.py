"""Sample data, one per task, from real images shipped in ``napari_cscfusion/sample_data``
(origin and licences: sample_data/ATTRIBUTION.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from ..engine.planes import downsample_area
from ._common import META_KEY

TNO = "TNO Image Fusion Dataset, A. Toet (CC BY 4.0)"
BRAINWEB = "BrainWeb, via the ITK examples (Apache-2.0)"
MNI152 = ("MNI ICBM152 2009a template via nilearn, Copyright (C) 1993-2004 Louis Collins, "
          "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University; "
          "PET map simulated by scripts/make_sample_pet.py")
HDRI = "HDRI Haven 'courtyard' (CC0), bracket simulated by scripts/make_sample_bracket.py"
BRACKET = ("courtyard_ev-4.png", "courtyard_ev-2.png", "courtyard_ev+0.png",
           "courtyard_ev+2.png")
SR_FACTOR = 4


def sample_path(name: str) -> Path:
    return Path(str(resources.files("napari_cscfusion") / "sample_data" / name))


def _read(name: str, grey: bool = False) -> np.ndarray:
    """A shipped image; ``grey``: decoded as one channel (the BrainWeb PNGs are stored as RGB
    and palette images of grey values)."""
    import imageio.v3 as iio
    return np.asarray(iio.imread(sample_path(name), mode="L" if grey else None))


def _meta(credit: str, **extra) -> dict:
    return {META_KEY: {"role": "sample", "credit": credit, **extra}}


def infrared_visible():
    """TNO image 1: registered infrared / visible pair, 768x576 grey."""
    return [
        (_read("tno_01_ir.png"), {"name": "TNO infrared", "metadata": _meta(TNO)}, "image"),
        (_read("tno_01_vis.png"), {"name": "TNO visible", "metadata": _meta(TNO)}, "image"),
    ]


def exposure_bracket():
    """Four exposures (EV -4, -2, 0, +2) of an HDR courtyard, 512x256 RGB, as one stack."""
    stack = np.stack([_read(n) for n in BRACKET])
    meta = _meta(HDRI, role="exposure_stack", exposure_axis=0, exposures_ev=[-4, -2, 0, 2],
                 files=list(BRACKET))
    return [(stack, {"name": "courtyard exposures", "rgb": True, "metadata": meta}, "image")]


def medical_pair():
    """BrainWeb MRI slices, T1 and proton density, 217 rows x 181 columns, pixel-aligned."""
    return [
        (_read("brainweb_t1.png", grey=True), {"name": "BrainWeb T1",
                                               "metadata": _meta(BRAINWEB)}, "image"),
        (_read("brainweb_pd.png", grey=True), {"name": "BrainWeb PD",
                                               "metadata": _meta(BRAINWEB)}, "image"),
    ]


def mri_pet():
    """SIMULATED anatomy + function: an axial slice of the MNI152 T1 template and an FDG-PET-like
    uptake map simulated from its tissue maps (a hot lesion in the right temporal lobe), in
    the "hot" colours, 233 rows x 197 columns, pixel-aligned. Fusing them keeps the anatomy's
    detail and the map's colour."""
    simulated = "simulated from the template's tissue maps, not a measurement"
    return [
        (_read("mni152_t1.png"), {"name": "MNI152 T1 (anatomy)",
                                  "metadata": _meta(MNI152, modality="MRI T1")}, "image"),
        (_read("simulated_pet.png"), {"name": "simulated PET (hot colours)", "rgb": True,
                                      "metadata": _meta(MNI152, modality="PET (simulated)",
                                                        note=simulated)}, "image"),
    ]


def guided_sr():
    """TNO image 3: the infrared frame area-downsampled x4 (placed over the full-size frame),
    the visible frame as the guide, and the original infrared frame as the reference (hidden)."""
    ir = _read("tno_03_ir.png")
    low = np.round(downsample_area(ir, SR_FACTOR)).astype(np.uint8)
    f = float(SR_FACTOR)
    return [
        (_read("tno_03_vis.png"), {"name": "TNO visible guide", "metadata": _meta(TNO)},
         "image"),
        (low, {"name": f"TNO infrared low-res x{SR_FACTOR}", "scale": (f, f),
               "translate": ((f - 1) / 2, (f - 1) / 2),
               "metadata": _meta(TNO, downsampled=SR_FACTOR, reference="TNO infrared reference")},
         "image"),
        (ir, {"name": "TNO infrared reference", "visible": False, "metadata": _meta(TNO)},
         "image"),
    ]
