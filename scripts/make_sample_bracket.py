"""Make the multi-exposure sample data: an 8-bit exposure bracket simulated from a real CC0 HDR
radiance map (HDRI Haven "courtyard", by Greg Zaal, via Debian's blender-data).

    .venv/bin/python scripts/make_sample_bracket.py [--hdr ../shared/data/mef/hdr/courtyard.exr]

Writes src/napari_cscfusion/sample_data/courtyard_ev{...}.png (darkest first). Uses
napari_cscfusion.training.data.simulate_bracket when it exists (sensor noise, gamma 2.2,
8-bit), otherwise the plain simulation below (scale by 2^EV, clip, gamma 2.2, 8-bit).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "napari_cscfusion" / "sample_data"
EVS = (-4.0, -2.0, 0.0, 2.0)
CROP = (slice(90, 346), slice(200, 712))  # 256 x 512 of the 512 x 1024 panorama: arch and sky
KEY = 0.18  # the median luminance is mapped to this before the EV shifts


def read_exr(path: Path) -> np.ndarray:
    try:  # the training code's reader (OpenCV, else the OpenEXR package)
        from napari_cscfusion.training.data import read_hdr
        return read_hdr(path)
    except ImportError:
        pass
    import cv2
    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise OSError(f"cannot read {path} (OpenCV without OpenEXR support?)")
    return np.clip(cv2.cvtColor(im[..., :3], cv2.COLOR_BGR2RGB).astype(np.float32), 0, None)


def plain_bracket(hdr: np.ndarray, evs) -> np.ndarray:
    out = [np.round(np.clip(hdr * 2.0 ** ev, 0, 1) ** (1 / 2.2) * 255) / 255 for ev in evs]
    return np.stack(out).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hdr", type=Path,
                    default=ROOT.parent / "shared" / "data" / "mef" / "hdr" / "courtyard.exr")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    hdr = read_exr(args.hdr)[CROP]
    lum = hdr @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    hdr = hdr * np.float32(KEY / np.median(lum))
    try:
        from napari_cscfusion.training.data import simulate_bracket
        stack = simulate_bracket(hdr, EVS, np.random.default_rng(0))
        how = "napari_cscfusion.training.data.simulate_bracket (noise, gamma 2.2, 8 bit)"
    except ImportError:
        stack = plain_bracket(hdr, EVS)
        how = "scale by 2^EV, clip, gamma 2.2, 8 bit"
    import imageio.v3 as iio
    args.out.mkdir(parents=True, exist_ok=True)
    for ev, img in zip(EVS, stack, strict=True):
        path = args.out / f"courtyard_ev{ev:+.0f}.png"
        iio.imwrite(path, np.round(img * 255).astype(np.uint8), optimize=True)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: EV {ev:+g}, "
              f"{path.stat().st_size / 1024:.0f} KiB")
    print(f"simulated with {how}")


if __name__ == "__main__":
    main()
