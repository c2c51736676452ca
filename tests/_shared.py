"""The one place the tests find the shared data and the authors' checkpoints.

The data root is ``$CSCFUSION_SHARED`` when set, else ``../shared`` beside the repository.
A test that needs a part of it skips with a reason starting with ``NEEDS_SHARED`` (naming
the part and the root) when that part is absent; under ``CI=true`` conftest.py turns such a
skip into a failure. The BrainWeb T1/PD slices also ship in the package (``SAMPLES``) and the
shifted/rotated PD slices are in tests/data, so the tests that need only those never skip.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(os.environ.get("CSCFUSION_SHARED") or
              Path(__file__).resolve().parents[1].parent / "shared")
DATA = SHARED / "data"
CKPT = SHARED / "reference-checkpoints"
SAMPLES = Path(__file__).resolve().parents[1] / "src" / "napari_cscfusion" / "sample_data"
AUTHORS_WEIGHTS = {"ivf": "reference-checkpoints",
                   "mef": "reference-checkpoints/csc_mefn_authors.pth",
                   "mmf": "reference-checkpoints/csc_mmfn_authors.pth"}
BRAINWEB_SAMPLES = {"BrainT1Slice.png": "brainweb_t1.png",
                    "BrainProtonDensitySlice.png": "brainweb_pd.png"}
# the registration tests' moving slices, kept in the repository (tests/data/README.md: the
# shared data's README marks them shippable), so those tests run in a bare clone
TEST_DATA = Path(__file__).resolve().parent / "data"
BRAINWEB_TEST_DATA = ("BrainProtonDensitySliceShifted13x17y.png",
                      "BrainProtonDensitySliceR10X13Y17.png")

# The packaged mmf.pt until 2026-12-07 (weights/README.md "mmf.pt"): CSC-MMFN in the authors'
# geometry, trained on bicubic pre-upsampled input; the engine's fast path and bicubic-input
# paths are tested with it (the packaged file is now of the low_res_detail geometry).
MMF_AUTHORS_GEOMETRY = Path(__file__).resolve().parent / "data" / "mmf_authors_geometry.pt"

NEEDS_SHARED = "needs the shared data"


def missing(*parts: str) -> str:
    """The skip reason for absent shared ``parts`` (paths relative to the data root)."""
    return (f"{NEEDS_SHARED} {', '.join(parts)} under {SHARED} (set CSCFUSION_SHARED or "
            f"place the data at ../shared)")


def shared_path(relative: str) -> Path:
    """``SHARED / relative``; the test skips (naming it) when it does not exist."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(missing(relative))
    return path


needs_shared = pytest.mark.skipif(not (DATA.is_dir() and CKPT.is_dir()),
                                  reason=missing("data/", "reference-checkpoints/"))


def medical_image(name: str) -> Path:
    """A BrainWeb slice (``BrainT1Slice.png``, ...): the packaged copy where one ships, else
    from the shared data (skipping when absent)."""
    if name in BRAINWEB_SAMPLES:
        return SAMPLES / BRAINWEB_SAMPLES[name]
    if name in BRAINWEB_TEST_DATA:
        return TEST_DATA / name
    return shared_path(f"data/medical/{name}")


BRAINWEB_FILES = {"t1": "BrainT1Slice.png", "pd": "BrainProtonDensitySlice.png",
                  "shifted": "BrainProtonDensitySliceShifted13x17y.png",
                  "rotated": "BrainProtonDensitySliceR10X13Y17.png"}


class BrainWeb(dict):
    """The BrainWeb slices by short name (``BRAINWEB_FILES``), grey, read on first use: T1
    and PD from the package's sample data, the shifted and rotated PD from tests/data."""

    def __missing__(self, key: str) -> np.ndarray:
        image = grey(read(medical_image(BRAINWEB_FILES[key])))
        self[key] = image
        return image


def read(path) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


@cache
def authors_model(task: str):
    from napari_cscfusion import load_model

    return load_model(task, SHARED / AUTHORS_WEIGHTS[task])


def grey(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.ndim == 3 else img


def harvard_mri_pet(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Harvard MRI/PET pair ``index``: the MRI (grey uint8) and the PET (RGB uint8); the test
    skips (naming them) when the files are absent."""
    folder = "data/medical/harvard/mri_pet"
    mri = read(shared_path(f"{folder}/MRI/{index}.png"))
    pet = read(shared_path(f"{folder}/PET/{index}.png"))
    return grey(mri), pet[..., :3]
