#!/usr/bin/env bash
# The main job: set up, then fuse the packaged sample images with all networks (headless;
# results in demo_output/). Pass --gui to open napari with the plugin instead (needs a display).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--gui" ]; then
  exec .venv/bin/python -m napari_cscfusion.gui   # napari with the widgets and sample data
fi
exec .venv/bin/cscfusion demo "$@"
