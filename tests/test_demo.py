"""The README's main job: the headless demo fuses every packaged sample with packaged weights."""

import numpy as np
import pytest
import tifffile

from napari_cscfusion.demo import run_demo
from napari_cscfusion.engine.io import read_tiff_metadata
from napari_cscfusion.engine.registry import packaged_weights_path


@pytest.mark.skipif(not all(packaged_weights_path(t).is_file() for t in ("ivf", "mef", "mmf")),
                    reason="packaged weights not installed")
def test_demo_writes_a_fused_image_per_task(tmp_path):
    written = run_demo(tmp_path, device="cpu", base_rule="average")
    stems = {p.stem for p in written}
    assert stems == {"ivf_tno01", "mef_courtyard", "mmf_tno03_x4", "medical_t1_pd",
                     "medical_mri_pet"}
    shapes = {"ivf_tno01": (576, 768), "mef_courtyard": (256, 512, 3),
              "mmf_tno03_x4": (576, 768), "medical_t1_pd": (217, 181),
              "medical_mri_pet": (233, 197, 3)}
    for stem, shape in shapes.items():
        img = tifffile.imread(tmp_path / f"{stem}.tif")
        assert img.shape == shape and np.isfinite(img).all()
        assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.02
        assert read_tiff_metadata(tmp_path / f"{stem}.tif")["weights"].startswith("packaged")
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000
