#!/usr/bin/env bash
# A shapes latent stage trained further on a lent GPU in one call of at most 10 minutes:
# train.py from an exported stage (train.init_from: its MMDiT; its vae/ copy frozen) at a
# larger batch, checkpoints every 250 steps, then the last checkpoint exported as a stage
# directory OUTDIR/latent, which a CPU session continues from the same way
# (`--config.train.init_from=OUTDIR/latent`) or ships as checkpoints/shapes/latent.
#   bash tools/shapes_latent_gpu.sh STAGE_DIR OUTDIR [SECONDS=420] [BATCH=256]
# STAGE_DIR is an export of configs/shapes_mmdit.py (python -m imagen_jax.training.export);
# carry it to the device with the call. The optimizer state is not carried over (a fresh
# AdamW with a 100-step warm-up). STAGE_DIR "scratch" starts a new MMDiT on the committed
# VAE (checkpoints/shapes/latent/vae) instead, with the config's warm-up.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: bash tools/shapes_latent_gpu.sh STAGE_DIR OUTDIR [SECONDS] [BATCH]" >&2
  exit 2
fi
PY=${PY:-python3}
STAGE=$1
OUT=$2
LIMIT=${3:-420}
BATCH=${4:-256}
WORK=runs/shapes_mmdit_gpu
if [[ $STAGE == scratch ]]; then
  CONFIG="--config=configs/shapes_mmdit.py:vae=checkpoints/shapes/latent/vae,batch=$BATCH"
  INIT=()
else
  CONFIG="--config=configs/shapes_mmdit.py:vae=$STAGE/vae,batch=$BATCH"
  INIT=(--config.train.init_from="$STAGE" --config.optim.warmup_steps=100)
fi
timeout --signal=TERM "$LIMIT" "$PY" train.py "$CONFIG" "${INIT[@]}" \
  --config.train.checkpoint_every=250 --config.train.sample_every=0 --workdir=$WORK
echo "train.py: exit $? (124: stopped at the time limit, checkpointed)" >&2
"$PY" -m imagen_jax.training.export "$CONFIG" "${INIT[@]}" \
  --workdir=$WORK --outdir="$OUT/latent"
