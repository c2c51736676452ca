"""Where the shared data and the authors' checkpoints live (../shared beside the repo), and
skip markers for when they are absent."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(os.environ.get("CSCFUSION_SHARED",
                             Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"
CKPT = SHARED / "reference-checkpoints"

needs_shared = pytest.mark.skipif(not (DATA.is_dir() and CKPT.is_dir()),
                                  reason=f"shared data/checkpoints not found at {SHARED}")


def read(path) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


@cache
def authors_model(task: str):
    from napari_cscfusion import load_model

    path = {"ivf": CKPT, "mef": CKPT / "csc_mefn_authors.pth",
            "mmf": CKPT / "csc_mmfn_authors.pth"}[task]
    return load_model(task, path)


def grey(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.ndim == 3 else img
