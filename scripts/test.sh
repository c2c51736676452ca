#!/usr/bin/env bash
# Set up, then run the whole test suite (GUI tests in a real napari viewer under Xvfb,
# started by pytest-xvfb). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
unset QT_QPA_PLATFORM  # 'offscreen' breaks napari's OpenGL canvas; Xvfb is used instead
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/npe2 validate napari-cscfusion
exec .venv/bin/python -m pytest "$@"
