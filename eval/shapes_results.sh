#!/usr/bin/env bash
# The results tables of the shipped shapes cascade (its card, checkpoints/shapes/README.md):
# one JSON line per setting appended to docs/results/shapes_cascade.jsonl, images under
# runs/eval/; then the table of the whole file (eval/shapes_table.py).
#   bash eval/shapes_results.sh                  # the model table on all 60 prompts a task
#   PER_TASK=20 SWEEP_PER_TASK=20 bash eval/shapes_results.sh   # a quicker, noisier table
#   SWEEPS=0 bash eval/shapes_results.sh          # the model table alone
# The shipped stages were chosen on the `validation` prompts, none of which is scored here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/eval}
RESULTS=${RESULTS:-docs/results/shapes_cascade.jsonl}
N=${PER_TASK:-60}
S=${SWEEP_PER_TASK:-5}
SWEEPS=${SWEEPS:-1}

run() {
  local name=$1
  shift
  "$PY" eval/shapes_cascade.py --name="$name" --outdir="$OUT/$name" --results="$RESULTS" "$@"
}

# The model table: the full cascade with its shipped settings on the held-out combinations
# in the grammar's wordings and in held-out wordings, and on the training split; the base
# stage alone on the held-out combinations.
run cascade_heldout --split=heldout --prompts_per_task="$N"
run cascade_heldout_wording --split=heldout_wording --prompts_per_task="$N"
run cascade_train --split=train --prompts_per_task="$N"
run base_heldout --split=heldout --prompts_per_task="$N" --base_only
if [[ $SWEEPS == 0 ]]; then
  exec "$PY" eval/shapes_table.py "$RESULTS"
fi
# Guidance scale of the base stage.
for g in 1 3 5 7.5 10; do
  run "guidance_$g" --base_only --prompts_per_task="$S" --set=0.guidance_scale="$g"
done
# Sampler and steps of the base stage.
for s in ddim:10 ddim:25 ddim:50 dpmpp_2m:10 dpmpp_2m:20 dpmpp_3m:10 unipc:10 ddpm:100; do
  run "sampler_${s/:/_}" --base_only --prompts_per_task="$S" \
    --set=0.sampler="${s%:*}" --set=0.steps="${s#*:}"
done
# The layout head's gain (`sample.layout_scale`), when the base stage has a head.
if "$PY" -c "import json, sys
sys.exit(not json.load(open('checkpoints/shapes/base/stage.json'))['unet'].get('layout_grid'))"; then
  for l in 0 1 1.5 2 3; do
    run "layout_scale_$l" --base_only --prompts_per_task="$S" --set=0.layout_scale="$l"
  done
fi
# Settings of the super-resolution stage, the base's images being the same (sr_shipped:
# the shipped settings on these prompts, the sweep's reference).
run sr_shipped --prompts_per_task="$S"
for s in aug_level:0 aug_level:0.25 guidance_scale:1 guidance_scale:4; do
  run "sr_${s/:/_}" --prompts_per_task="$S" --set=1."${s%:*}"="${s#*:}"
done
# The README's table of every line in the results file.
"$PY" eval/shapes_table.py "$RESULTS"
