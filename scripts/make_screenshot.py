"""Screenshot of napari with the infrared + visible widget docked and a fused result, for the
README. Needs a display; on a headless machine:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshot.py

Loads the TNO sample, runs CSC-IVFN with the packaged weights (or --weights, by default the
authors' checkpoints in ../shared/reference-checkpoints when the packaged ones are missing),
shows infrared, visible and fused side by side with the widget's "Compare side by side" button
and saves docs/screenshot.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET = "Infrared + visible fusion"


def default_weights() -> str | None:
    from napari_cscfusion.engine.registry import packaged_weights_path
    if packaged_weights_path("ivf").is_file():
        return None
    authors = ROOT.parent / "shared" / "reference-checkpoints"
    if authors.is_dir():
        return str(authors)
    sys.exit("no weights: install the packaged ivf.pt or pass --weights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=ROOT / "docs" / "screenshot.png")
    ap.add_argument("--weights", default=None, help="checkpoint file or folder")
    ap.add_argument("--base-rule", default=None, choices=("saliency", "l1", "average"),
                    help="default: the widget's first preset (Thermal surveillance)")
    ap.add_argument("--size", type=int, nargs=2, default=(1500, 620), metavar=("W", "H"))
    args = ap.parse_args()
    weights = args.weights or default_weights()

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-cscfusion")
    viewer.window.resize(*args.size)
    viewer.open_sample("napari-cscfusion", "infrared_visible")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cscfusion", WIDGET)
    widget.weights.set_path(weights)
    if args.base_rule:
        widget.base_rule.value = args.base_rule
    app = QApplication.instance()
    t0 = time.perf_counter()
    widget.run()
    while widget.running:
        app.processEvents()
        time.sleep(0.05)
    fused = [lay for lay in viewer.layers
             if lay.metadata.get("cscfusion", {}).get("role") == "fused"]
    if not fused:
        sys.exit(f"the run failed: {widget.status.value}")
    print(f"fused in {time.perf_counter() - t0:.1f} s: {fused[0].name}")
    widget.compare_button.native.click()  # sources and result side by side
    viewer.layers.selection.active = fused[0]
    for _ in range(5):
        app.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    app.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    from PIL import Image  # 256-colour palette: the PNG goes into the repository
    Image.open(args.out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
        args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    viewer.close()


if __name__ == "__main__":
    main()
