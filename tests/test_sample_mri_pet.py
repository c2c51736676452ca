"""The simulated MRI + PET sample shows what medical fusion is for: the fused image keeps the
functional map's colour where it is hot and the anatomy's edges everywhere."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import torch
from scipy import ndimage

from napari_cscfusion.engine.medical import fuse_multimodal
from napari_cscfusion.gui._sample_data import sample_path
from napari_cscfusion.models.color import rgb_to_ycbcr


def _ycbcr(rgb01: np.ndarray) -> np.ndarray:
    return rgb_to_ycbcr(torch.from_numpy(np.asarray(rgb01, np.float32)), dim=-1).numpy()


def _edges(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return np.hypot(ndimage.sobel(a, 0), ndimage.sobel(a, 1))


def _corr(a, b, mask) -> float:
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def test_fusing_the_sample_keeps_the_anatomy_and_the_function():
    t1 = np.asarray(iio.imread(sample_path("mni152_t1.png")))
    pet = np.asarray(iio.imread(sample_path("simulated_pet.png")))
    assert t1.shape == pet.shape[:2] and pet.shape[-1] == 3
    # the widget's and the function's defaults (choose-max / l1-black, code gain 1)
    fused = fuse_multimodal({"T1": t1, "PET": pet}, device="cpu").image
    assert fused.shape == pet.shape
    y_f, y_p = _ycbcr(fused), _ycbcr(pet / 255.0)
    brain = t1 > 20
    hot = y_p[..., 0] > np.percentile(y_p[..., 0], 99)  # the lesion: the hottest 1 %
    assert hot.sum() > 100 and brain[hot].all()

    # function: the fused chroma follows the PET map's over the brain, and in the lesion it
    # keeps the map's hue (yellow-orange) and half its saturation or more. The T1 is brighter
    # than this map's colours (lesion: luma 0.78 vs 0.46), so the fused luminance takes the
    # T1's there and the map's colours, saturated at a low luminance, fit the RGB cube only
    # desaturated: chroma correlation 0.82 / 0.65, lesion saturation 0.51 of the map's (0.95 /
    # 0.92 and 0.67 with the former saliency / l1 defaults, whose luminance was darker and
    # whose edges weaker: 0.84). On the real Harvard MRI/PET pairs, whose colour maps brighten
    # with uptake, the defaults keep more saturation than the average (weights/README.md).
    assert _corr(y_f[..., 1], y_p[..., 1], brain) > 0.75
    assert _corr(y_f[..., 2], y_p[..., 2], brain) > 0.6
    hue_f = np.arctan2(y_f[..., 2] - 0.5, y_f[..., 1] - 0.5)
    hue_p = np.arctan2(y_p[..., 2] - 0.5, y_p[..., 1] - 0.5)
    assert np.degrees(np.abs(hue_f - hue_p)[hot]).mean() < 15
    sat_f = np.hypot(y_f[..., 1] - 0.5, y_f[..., 2] - 0.5)
    sat_p = np.hypot(y_p[..., 1] - 0.5, y_p[..., 2] - 0.5)
    assert sat_f[hot].mean() > 0.45 * sat_p[hot].mean()

    # anatomy: the fused luminance has the T1 slice's edges (the blurred PET map has few)
    e_t1 = _edges(t1 / 255.0)
    # 0.98 with the sparse second-generation ivf.pt and the choose-max / l1-black defaults
    # (#17; 0.84 with saliency / l1, 0.96 with the first generation): far above the PET map's
    # own edges (0.24, bound below)
    assert _corr(e_t1, _edges(y_f[..., 0]), brain) > 0.95
    assert _corr(e_t1, _edges(y_p[..., 0]), brain) < 0.4
    near_lesion = ndimage.binary_dilation(hot, iterations=5)
    assert _corr(e_t1, _edges(y_f[..., 0]), near_lesion) > 0.8  # 0.89 (saliency / l1: 0.60)
