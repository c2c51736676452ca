#!/usr/bin/env bash
# Set up everything on a fresh Debian/Ubuntu machine: Xvfb and the Qt/OpenGL libraries napari
# needs (see shared/docs/headless-napari.md), then a virtual environment with the package.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 \
libxcb-image0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 \
libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libfontconfig1 libdbus-1-3"
  missing=$(dpkg-query -W -f='${Status} ${Package}\n' $pkgs 2>/dev/null \
            | grep -v "install ok installed" | wc -l || true)
  if ! dpkg-query -W $pkgs >/dev/null 2>&1 || [ "$missing" -gt 0 ]; then
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Pin torch in the same command: alone, a bare torch requirement pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[testing]"
