#!/bin/sh
# CSC-IVFN weights shipped as src/napari_cscfusion/weights/ivf.pt (see weights/README.md).
# Authors' architecture (q=64, 8 DCUs); smaller crops/batch than the authors' (128, 16) to fit a
# 2-core CPU budget. Writes runs/ivf.pt (+ .best.pt, .state.pt, .log.csv).
set -e
cd "$(dirname "$0")/.."
exec nice -n 5 .venv/bin/python -m napari_cscfusion.training.cli train ivf --out runs/ivf.pt \
  --epochs 6 --batch-size 8 --crop 48 --lr 5e-3 --schedule cosine --warmup-steps 10 \
  --seed 0 --threads 2 --max-minutes 60 "$@"
