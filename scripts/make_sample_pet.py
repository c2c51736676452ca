"""Make the simulated MRI + PET sample (src/napari_cscfusion/sample_data/mni152_t1.png and
simulated_pet.png) from nilearn's copy of the MNI152 2009 template and its tissue maps.

Run once, by hand: the package ships the two small PNGs and never needs nilearn.

    .venv/bin/pip install nilearn     # in a development venv only
    .venv/bin/python scripts/make_sample_pet.py

Anatomy: one axial slice of the T1 template (1 mm). Function: a SIMULATED FDG-PET-like uptake
map, not a measurement: grey matter 0.35, white matter 0.1, cerebrospinal fluid and outside the
brain 0, plus a hot lesion (a 3-D Gaussian, peak 1.0, sigma 6 mm) in the right temporal lobe,
blurred to PET resolution (Gaussian, 7 mm FWHM), with 1 % noise, shown with the usual "hot"
colour map (black, red, yellow; the peak at 70 % of the map, yellow rather than white, so that
it keeps a colour) as an 8-bit RGB image, as PET viewers export it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "napari_cscfusion" / "sample_data"
LESION_MM = (40.0, -20.0, 4.0)  # MNI coordinates (x right, y anterior, z up) of the hot lesion
SLICE_Z_MM = 4.0  # the axial slice shown: through the lesion, the thalami and the ventricles
LESION_SIGMA_MM = 6.0
PET_FWHM_MM = 7.0
NOISE = 0.01
PEAK_ON_MAP = 0.7  # where the hottest voxel falls on the colour map: yellow
SEED = 19


def hot(x: np.ndarray) -> np.ndarray:
    """The "hot" colour map (as matplotlib's): black -> red -> yellow -> white, (..., 3)."""
    x = np.clip(x, 0.0, 1.0)
    return np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)],
                    axis=-1)


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Slice k of an (x, y, z) RAS volume as an image: anterior up, the subject's right on
    the image's left (the radiological convention)."""
    return volume[:, :, k].T[::-1, :]


def main(argv=None) -> None:
    from nilearn import datasets, image
    from scipy import ndimage

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    t1 = datasets.load_mni152_template(resolution=1)
    gm = image.resample_to_img(datasets.load_mni152_gm_template(resolution=1), t1)
    wm = image.resample_to_img(datasets.load_mni152_wm_template(resolution=1), t1)
    affine = t1.affine
    t1_data = np.asarray(t1.get_fdata(), np.float64)
    gm_data = np.clip(np.asarray(gm.get_fdata(), np.float64), 0, 1)
    wm_data = np.clip(np.asarray(wm.get_fdata(), np.float64), 0, 1)

    voxel_mm = float(abs(affine[0, 0]))
    ijk = np.indices(t1_data.shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3, *t1_data.shape))
    d2 = sum((xyz[a] - LESION_MM[a]) ** 2 for a in range(3))
    lesion = np.exp(-d2 / (2 * LESION_SIGMA_MM ** 2)) * (gm_data + wm_data > 0.2)
    uptake = 0.35 * gm_data + 0.1 * wm_data + 1.0 * lesion
    sigma = PET_FWHM_MM / (2 * np.sqrt(2 * np.log(2))) / voxel_mm
    uptake = ndimage.gaussian_filter(uptake, sigma)
    uptake += np.random.default_rng(SEED).normal(0, NOISE, uptake.shape) * (uptake > 0.02)

    k = int(round(np.linalg.solve(affine, [0, 0, SLICE_Z_MM, 1])[2]))
    anatomy = axial(t1_data, k)
    anatomy = np.round(255 * anatomy / np.percentile(anatomy, 99.9)).clip(0, 255)
    function = PEAK_ON_MAP * axial(uptake, k) / axial(uptake, k).max()
    pet = np.round(255 * hot(function)).astype(np.uint8)

    import imageio.v3 as iio

    args.out.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out / "mni152_t1.png", anatomy.astype(np.uint8))
    iio.imwrite(args.out / "simulated_pet.png", pet)
    print(f"wrote {args.out / 'mni152_t1.png'} {anatomy.shape} and "
          f"{args.out / 'simulated_pet.png'} {pet.shape} (axial slice z = {SLICE_Z_MM} mm, "
          f"voxel {k})")


if __name__ == "__main__":
    main()
