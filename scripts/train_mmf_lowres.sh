#!/bin/sh
# CSC-MMFN in the low_res geometry (issue 17 item 4, "a guide that matters"; models/mmfn.py):
# the low-res IR comes in at its own resolution, the guide's codes are area-averaged to it,
# the guided filter's coefficients are fitted there and upsampled (half-pixel), base = bicubic.
# 1-channel IR + 1-channel visible guide, 32 code channels, 3 DCUs, flir_train only.
# Stages (STAGE=1, then STAGE=2), 1 thread at nice 19 (shared 2-core machine):
#   1. from scratch, batch statistics in batch norm, clipped gradients, 20 epochs of 20 steps
#      -> runs/guide/lr1.best.pt (2026-12-06: epoch 20, validation 28.83 dB, 41 min wall;
#      sha256 da427520...; see weights/README.md "A guide that matters")
#   2. batch norm frozen on running statistics recalibrated over 20 training batches (trained
#      as it runs at inference), INIT= a stage-1 file, EPOCHS= (default 15)
#      -> runs/guide/lr2.best.pt (2026-12-06, from stage 1's best file at the time, epoch 11:
#      stopped after 8 epochs at 28.79-28.83 dB, not above stage 1)
#   3. continuation of stage 1 (INIT=, default runs/guide/lr1.best.pt), batch statistics, a
#      fresh cosine from 3e-4 over 20 epochs -> runs/guide/lr3.best.pt (2026-12-06: stopped
#      after 3 epochs at 28.80-28.81 dB, to leave the CPU to benchmarks/mmf_ceiling.py)
#   4. the low_res_detail geometry (models/mmfn.py: low_res plus the low-res codes the guided
#      filter's fit leaves, so the IR's own detail reaches the decoder) from INIT= (default
#      runs/guide/lr1.best.pt: no tensor depends on the geometry), 20 epochs from 5e-4
#      -> runs/guide/lrd1.best.pt (2026-12-07; weights/README.md "A guide that matters, second
#      try"); the same from scratch: STAGE=1 GEOMETRY=low_res_detail OUT=runs/guide/lrd0.pt
#      -> runs/guide/lrd0.best.pt
#   5. a continuation of a stage-4 file (INIT=, default runs/guide/lrd1.best.pt), a fresh
#      cosine from ${LR:-2e-4} over ${EPOCHS:-15} epochs -> runs/guide/lrd2.best.pt
#   6. (2026-12-07, third try) a continuation of a stage-4 file (INIT=, default
#      runs/guide/lrd1.best.pt = mmf.pt) weighted towards the target scale: scales
#      ${SCALES:-3 4} (half the batches an integer in that range, half uniform), crops
#      ${CROP:-64} px, a fresh cosine from ${LR:-2e-4} over ${EPOCHS:-12} epochs, every epoch
#      kept -> ${OUT:-runs/guide/lrd4.pt} (2026-12-07: 12 epochs, 14 min; CROP=96 OUT=runs/guide/lrd5.pt
#      27 min; SCALES="4 4" SEED=14 OUT=runs/guide/lrd9.pt 14 min; x4 flat-guide cost on
#      validation 0.17 / 0.18 / 0.18 dB, as mmf.pt's 0.16: not shipped,
#      weights/README.md "A guide that matters, third try")
#   7. (2026-12-07, third try) a deeper guide backbone: a stage-4 file (INIT=, default
#      runs/guide/lrd1.best.pt = mmf.pt) with ${GUIDE_DCUS:-6} DCUs in the guide's backbone
#      (the extra units start as identities, models.mmfn.deepen_guide), scales ${SCALES:-2 4},
#      a fresh cosine from ${LR:-5e-4} over ${EPOCHS:-12} epochs, every epoch kept
#      -> ${OUT:-runs/guide/lrd6.pt} (2026-12-07: 12 epochs, 23 min; x4 flat-guide cost on
#      validation 0.17 dB: not shipped). The same README section's other two runs:
#      STAGE=6 SCALES="2 4" SEED=13 OUT=runs/guide/lrd8_noguide.pt sh $0 --flat-guide
#      (the guide-free baseline) and STAGE=4 sh $0 --out runs/guide/lrd7.pt --epochs 80
#      --steps-per-epoch 5 --keep-epochs (stage 4 traced every 5 steps; stopped after 150)
set -e
cd "$(dirname "$0")/.."
mkdir -p runs/guide
PY=".venv/bin/python -m napari_cscfusion.training.cli train mmf"
if [ "${STAGE:-1}" = 1 ]; then
  OMP_NUM_THREADS=1 exec nice -n 19 $PY --geometry "${GEOMETRY:-low_res}" \
    --out "${OUT:-runs/guide/lr1.pt}" \
    --epochs 20 --batch-size 16 --crop 64 --lr 1e-3 --schedule cosine --warmup-steps 10 \
    --max-grad-norm 1 --code-channels 32 --num-dcus 3 --nonnegative-thresholds --seed 0 \
    --threads 1 --no-progress "$@"
fi
if [ "${STAGE:-1}" = 4 ]; then
  OMP_NUM_THREADS=1 exec nice -n 19 $PY --geometry low_res_detail --out runs/guide/lrd1.pt \
    --init "${INIT:-runs/guide/lr1.best.pt}" --epochs 20 --batch-size 16 --crop 64 --lr 5e-4 \
    --schedule cosine --warmup-steps 10 --max-grad-norm 1 --nonnegative-thresholds --seed 5 \
    --threads 1 --no-progress "$@"
fi
if [ "${STAGE:-1}" = 5 ]; then
  OMP_NUM_THREADS=1 exec nice -n 19 $PY --geometry low_res_detail --out "${OUT:-runs/guide/lrd2.pt}" \
    --init "${INIT:-runs/guide/lrd1.best.pt}" --epochs ${EPOCHS:-15} --batch-size 16 --crop 64 \
    --lr ${LR:-2e-4} --schedule cosine --warmup-steps 10 --max-grad-norm 1 \
    --nonnegative-thresholds --seed ${SEED:-9} --threads 1 --no-progress "$@"
fi
if [ "${STAGE:-1}" = 6 ]; then
  OMP_NUM_THREADS=1 exec nice -n 19 $PY --geometry low_res_detail --out "${OUT:-runs/guide/lrd4.pt}" \
    --init "${INIT:-runs/guide/lrd1.best.pt}" --epochs ${EPOCHS:-12} --batch-size 16 \
    --crop ${CROP:-64} --scales ${SCALES:-3 4} --lr ${LR:-2e-4} --schedule cosine \
    --warmup-steps 10 --max-grad-norm 1 --nonnegative-thresholds --seed ${SEED:-11} \
    --threads 1 --keep-epochs --no-progress "$@"
fi
if [ "${STAGE:-1}" = 7 ]; then
  OMP_NUM_THREADS=1 exec nice -n 19 $PY --geometry low_res_detail --out "${OUT:-runs/guide/lrd6.pt}" \
    --init "${INIT:-runs/guide/lrd1.best.pt}" --guide-dcus ${GUIDE_DCUS:-6} --epochs ${EPOCHS:-12} \
    --batch-size 16 --crop ${CROP:-64} --scales ${SCALES:-2 4} --lr ${LR:-5e-4} \
    --schedule cosine --warmup-steps 10 --max-grad-norm 1 --nonnegative-thresholds \
    --seed ${SEED:-12} --threads 1 --keep-epochs --no-progress "$@"
fi
if [ "${STAGE:-1}" = 3 ]; then
  OMP_NUM_THREADS=1 exec nice -n 19 $PY --geometry low_res --out runs/guide/lr3.pt --init "${INIT:-runs/guide/lr1.best.pt}" \
    --epochs 20 --batch-size 16 --crop 64 --lr 3e-4 --schedule cosine --warmup-steps 10 \
    --max-grad-norm 1 --nonnegative-thresholds --seed 3 --threads 1 --no-progress "$@"
fi
OMP_NUM_THREADS=1 exec nice -n 19 $PY --geometry low_res --out runs/guide/lr2.pt --init "${INIT:-runs/guide/lr1.best.pt}" \
  --freeze-bn --recalibrate-bn 20 --epochs ${EPOCHS:-15} --batch-size 16 --crop 64 --lr 5e-4 \
  --schedule cosine --warmup-steps 10 --max-grad-norm 1 --nonnegative-thresholds --seed 1 \
  --threads 1 --no-progress "$@"
