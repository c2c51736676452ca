#!/bin/sh
# CSC-MEFN weights shipped as src/napari_cscfusion/weights/mef.pt (see weights/README.md).
# Authors' architecture (q=24, 2 DCUs), unsupervised -MEF-SSIM on brackets simulated from the
# HDR maps in mef/hdr (sunrise held out). Writes runs/mef.pt (+ .best.pt, .state.pt, .log.csv).
set -e
cd "$(dirname "$0")/.."
exec nice -n 5 .venv/bin/python -m napari_cscfusion.training.cli train mef --out runs/mef.pt \
  --epochs 8 --batch-size 8 --crop 64 --lr 5e-3 --schedule cosine \
  --seed 0 --threads "${THREADS:-2}" --max-minutes 30 "$@"
