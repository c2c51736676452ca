"""Headless demo: fuse the packaged sample images with every network and write the results
(TIFF with metadata, plus PNG previews) to a folder. ``cscfusion demo`` runs it.

(``bash scripts/demo.sh --gui`` opens napari instead: ``python -m napari_cscfusion.gui``.)
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np

from .engine import fuse_exposures, fuse_guided, fuse_infrared_visible
from .engine.io import read_image, to_grey, write_tiff
from .engine.planes import downsample_area
from .engine.registry import load_model, packaged_weights_path

AUTHORS_FALLBACK = {"ivf": "", "medical": "", "mef": "csc_mefn_authors.pth", "mmf": None}


def sample(name: str) -> np.ndarray:
    return read_image(Path(str(resources.files("napari_cscfusion") / "sample_data" / name)))


def _png(path: Path, image: np.ndarray) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))


def run_demo(out: Path, device: str = "auto", weights_dir: Path | None = None,
             base_rule: str = "saliency") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def model(task):
        if packaged_weights_path(task).is_file() or weights_dir is None:
            return load_model(task)
        fallback = AUTHORS_FALLBACK[task]
        if fallback is None:
            return None
        print(f"  (no packaged {task} weights: using {weights_dir / fallback})")
        return load_model(task, weights_dir / fallback)

    def save(stem, result):
        write_tiff(out / f"{stem}.tif", result.image, result.metadata)
        _png(out / f"{stem}.png", result.image)
        written.extend([out / f"{stem}.tif", out / f"{stem}.png"])
        print(f"  wrote {out / stem}.tif/.png  {result.image.shape}  "
              f"{sum(result.metadata['timings'].values()):.1f} s on {result.metadata['device']}")

    t = time.perf_counter()
    print("infrared + visible (TNO 1, CSC-IVFN):")
    save("ivf_tno01", fuse_infrared_visible(sample("tno_01_ir.png"), sample("tno_01_vis.png"),
                                            model=model("ivf"), base_rule=base_rule,
                                            device=device))
    print("multi-exposure (courtyard bracket, CSC-MEFN):")
    bracket = np.stack([sample(f"courtyard_ev{ev}.png")[..., :3]
                        for ev in ("-4", "-2", "+0", "+2")])
    save("mef_courtyard", fuse_exposures(bracket, model=model("mef"), device=device))
    mmf = model("mmf")
    if mmf is not None:
        print("guided super-resolution x4 (TNO 3 infrared guided by visible, CSC-MMFN):")
        ir = sample("tno_03_ir.png").astype(np.float32) / 255
        save("mmf_tno03_x4", fuse_guided(downsample_area(ir, 4), sample("tno_03_vis.png"),
                                         model=mmf, device=device))
    try:
        from .engine.medical import fuse_multimodal
    except ImportError:
        fuse_multimodal = None
    if fuse_multimodal is not None:
        print("medical (BrainWeb T1 + PD, CSC-IVFN):")
        # the BrainWeb PNGs are stored as grey-valued RGB: fuse their luminance
        save("medical_t1_pd", fuse_multimodal([to_grey(sample("brainweb_t1.png")),
                                               to_grey(sample("brainweb_pd.png"))],
                                              model=model("medical"), base_rule=base_rule,
                                              device=device))
        print("medical, simulated (MNI152 T1 + a PET map in hot colours, CSC-IVFN):")
        save("medical_mri_pet", fuse_multimodal({"T1": sample("mni152_t1.png"),
                                                 "PET": sample("simulated_pet.png")},
                                                model=model("medical"), base_rule=base_rule,
                                                device=device))
    print(f"done in {time.perf_counter() - t:.0f} s: {len(written)} files in {out}")
    return written


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="fuse the packaged sample images (headless)")
    d.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    d.add_argument("--device", default="auto")
    d.add_argument("--base-rule", default="saliency")
    d.add_argument("--authors-weights", type=Path, default=None,
                   help="folder of the authors' checkpoints, used where no packaged weights")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), args.device, args.authors_weights, args.base_rule)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m napari_cscfusion.demo")
    sub = p.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    args = p.parse_args(["demo", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
