"""Fixtures shared by the test files (keep this small)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("CSCFUSION_SHARED",
                             Path(__file__).resolve().parents[1].parent / "shared"))
AUTHORS_WEIGHTS = {"ivf": "reference-checkpoints",
                   "mef": "reference-checkpoints/csc_mefn_authors.pth",
                   "mmf": "reference-checkpoints/csc_mmfn_authors.pth"}


@pytest.fixture
def fusion_weights():
    """fusion_weights(task) -> the authors' checkpoint path (../shared), else None for the
    packaged weights when they are installed; skips the test when neither is available."""
    def get(task: str) -> str | None:
        path = SHARED / AUTHORS_WEIGHTS[task]
        if path.exists():
            return str(path)
        from napari_cscfusion.engine.registry import packaged_weights_path
        if packaged_weights_path(task).is_file():
            return None
        pytest.skip(f"no weights for {task!r}: neither {path} nor packaged {task}.pt")
    return get
