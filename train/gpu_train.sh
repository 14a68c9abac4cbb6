#!/usr/bin/env bash
# Train the mini FlashPortrait on one GPU in one command (under 9 minutes), from the repo root:
#
#     OUT=/some/dir bash train/gpu_train.sh
#
# Reads the packed training cache (`python -m train.data --pack .minicache/mini_data_128.npz`, carried with the repo),
# trains the autoencoder (VAE_MIN minutes), the DiT stage (DIT_MIN minutes) and, with DECODER_MIN, the decoder alone
# on $DEVICE, and writes
#     $OUT/mini/        the published layout (transformer.pt, portrait_encoder.pt, mini_vae.pt, mini_expression.pt,
#                       mini_clip.pt, mini_context.pt): copy these into weights/mini
#     $OUT/mini_curves.json (+ .png when matplotlib is installed)   the loss curves of every stage run
# Every knob is an environment variable (defaults for one H200); `DEVICE=cpu VAE_MIN=0.2 DIT_MIN=0.2 VAE_BATCH=2
# BATCH=2` is the CPU dry run. The run folder ($RUN) is resumable: running again continues both stages.
# A decoder round alone: `VAE_MIN=0 INIT_VAE=weights/mini/mini_vae.pt INIT_DIT=weights/mini DIT_MIN=0 DECODER_MIN=2.5`
# (the DiT is exported as it was loaded; stop 29 ran its rounds at mouth/eye weights 6/8, then 8/10).
set -euo pipefail
: "${OUT:?set OUT to the folder that receives the checkpoint}"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
CACHE=${CACHE:-.minicache/mini_data_128.npz}
RUN=${RUN:-runs/gpu_mini}
DEVICE=${DEVICE:-cuda}
VAE_MIN=${VAE_MIN:-2}
DIT_MIN=${DIT_MIN:-5.2}
VAE_BATCH=${VAE_BATCH:-32}
VAE_CROP=${VAE_CROP:-128}
BATCH=${BATCH:-128}
LR=${LR:-1e-3}
INIT_VAE=${INIT_VAE:-}      # a trained mini_vae.pt to start the autoencoder from (VAE_MIN=0: keep it as it is)
INIT_DIT=${INIT_DIT:-}      # an exported checkpoint folder to continue the DiT stage from (e.g. weights/mini)
BF16=${BF16:-}              # 1: bf16 autocast in the forward passes
AUGMENT=${AUGMENT:-}        # 1: train the DiT on mirrored and zoomed views too (train/augment.py)
VAL_EVERY=${VAL_EVERY:-250} # DiT steps between held-out losses (0: none)
VAL_CLIPS=${VAL_CLIPS:-64}  # held-out clips of each such loss
LIP_WEIGHT=${LIP_WEIGHT:-1} # loss weight of the mouth box (DiT stage)
EYE_WEIGHT=${EYE_WEIGHT:-1} # loss weight of each eye box
FEATURE_NOISE=${FEATURE_NOISE:-0} # std of the noise on the landmark features (DiT stage)
EMA=${EMA:-0}               # decay of the weights' moving average that is exported (DiT stage; 0: none)
REF_FIRST=${REF_FIRST:-0.1} # share of clips referencing their own first frame (0.5 until weights/mini of 2026-12)
REF_GAP=${REF_GAP:-16}      # frames between a clip and any other reference (at least)
TEACHER=${TEACHER:-}        # packed teacher caches (train/teacher.py), space-separated: the DiT also trains on them
TEACHER_SHARE=${TEACHER_SHARE:-0.5} # share of the DiT's clips drawn from the teacher videos
DECODER_MIN=${DECODER_MIN:-0} # minutes of the decoder stage after the DiT (the encoder and latent space frozen)
DECODER_LIP_WEIGHT=${DECODER_LIP_WEIGHT:-4} # its loss weight of the mouth box
DECODER_EYE_WEIGHT=${DECODER_EYE_WEIGHT:-4} # and of each eye box
BEST=${BEST:-}              # 1: export the DiT at its lowest held-out loss (needs VAL_EVERY > 0), not its last step
THREADS=${THREADS:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "$CACHE" ]; then
    echo "No packed training cache at $CACHE: run \`python -m train.data --pack $CACHE\` where the cache is." >&2
    exit 2
fi
common=(--run "$RUN" --cache "$CACHE" --device "$DEVICE" --threads "$THREADS" --lr-decay --log-every 100
        --save-every 500)
start=$(date +%s)
[ -n "$BF16" ] && common+=(--bf16)
"$PYTHON" -m train.train_mini --stage vae --minutes "$VAE_MIN" --vae-batch "$VAE_BATCH" --vae-crop "$VAE_CROP" \
    ${INIT_VAE:+--init-vae "$INIT_VAE"} "${common[@]}"
echo "vae stage: $(( $(date +%s) - start ))s since start"
"$PYTHON" -m train.train_mini --stage dit --minutes "$DIT_MIN" --batch "$BATCH" --lr "$LR" \
    ${INIT_DIT:+--init-dit "$INIT_DIT"} ${AUGMENT:+--augment} --val-every "$VAL_EVERY" --val-clips "$VAL_CLIPS" \
    --lip-weight "$LIP_WEIGHT" --eye-weight "$EYE_WEIGHT" --feature-noise "$FEATURE_NOISE" --ema "$EMA" \
    --ref-first "$REF_FIRST" --ref-gap "$REF_GAP" ${TEACHER:+--teacher $TEACHER --teacher-share "$TEACHER_SHARE"} \
    "${common[@]}"
echo "dit stage: $(( $(date +%s) - start ))s since start"
if [ "$DECODER_MIN" != "0" ]; then
    "$PYTHON" -m train.train_mini --stage decoder --minutes "$DECODER_MIN" --vae-batch "$VAE_BATCH" \
        --vae-crop "$VAE_CROP" --decoder-lip-weight "$DECODER_LIP_WEIGHT" --decoder-eye-weight "$DECODER_EYE_WEIGHT" \
        "${common[@]}"
    echo "decoder stage: $(( $(date +%s) - start ))s since start"
fi
mkdir -p "$OUT/mini"
"$PYTHON" -m train.train_mini --run "$RUN" --export "$OUT/mini" ${BEST:+--best} --curves "$OUT/mini_curves"
tar -C "$OUT" -cf "$OUT/mini.tar" mini    # one file: the device tool returns a bounded number of files
ls -l "$OUT" "$OUT/mini"
echo "done in $(( $(date +%s) - start ))s"
