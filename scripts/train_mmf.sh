#!/bin/sh
# CSC-MMFN weights for thermal guided super-resolution (x2-x4), shipped as
# src/napari_cscfusion/weights/mmf.pt (see weights/README.md). 1-channel IR + 1-channel visible
# guide, 32 code channels, 3 DCUs. Writes runs/mmf.pt (+ .best.pt, .state.pt, .log.csv).
set -e
cd "$(dirname "$0")/.."
exec nice -n 5 .venv/bin/python -m napari_cscfusion.training.cli train mmf --out runs/mmf.pt \
  --epochs 8 --batch-size 16 --crop 64 --lr 1e-3 --schedule cosine --warmup-steps 10 \
  --code-channels 32 --num-dcus 3 --seed 0 --threads "${THREADS:-2}" --max-minutes 14 "$@"
