#!/usr/bin/env bash
# The GPU measurements, in parts that each fit a 10-minute call; JSON lines to
# bench/results/DATE_gpu_PART.jsonl (or $RESULTS_DIR), each part under its own time limit.
#   bash bench/gpu.sh train_step   # the shapes stages' trainer step alone, float32 and bf16
#   bash bench/gpu.sh sd15         # SD 1.5 sampling, batch 1 and 8: ours, diffusers eager,
#                                  # torch.compile, torch.compile(mode="reduce-overhead")
#   bash bench/gpu.sh sdxl1        # the same for SDXL at 1024 px, batch 1
#   bash bench/gpu.sh sdxl8        # SDXL at 1024 px, batch 8
#   bash bench/gpu.sh mfu          # bf16 train-step MFU of the paper-width base, two attentions
#   bash bench/gpu.sh train_loop   # train.py's loop against its step alone, host time by phase
#   bash bench/gpu.sh train_loop_latent   # the same for the latent stages, from a text cache
# train_step tells a training run's step time apart from its loop (data, text, host): the
# shapes stages trained at ~1,300 / ~700 images/s on an H100 through train.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python3}
DIR=${RESULTS_DIR:-bench/results}
DATE=$(date +%F)
mkdir -p "$DIR"

run() {  # run SECONDS PART COMMAND...: stdout's JSON lines appended, phases on stderr
  local seconds=$1 part=$2
  shift 2
  echo "== $part ($seconds s): $*" >&2
  timeout "$seconds" "$@" | tee -a "$DIR/${DATE}_gpu_${part}.jsonl"
  echo "== $part: exit ${PIPESTATUS[0]}" >&2
}

case "${1:-}" in
  train_step)
    for dtype in float32 bfloat16; do
      run 140 train_step "$PY" bench/train_step.py --configs=shapes_base --batch=256 --dtype=$dtype --steps=20
      run 140 train_step "$PY" bench/train_step.py --configs=shapes_sr --batch=64 --dtype=$dtype --steps=20
    done
    ;;
  sd15)  # each side in its own process, under its own limit
    run 580 sampling "$PY" bench/sampling_sides.py --unet sd15 --batch 1,8 --steps 20 \
      --repeats 5 --side_timeout 130
    ;;
  sdxl1)
    run 580 sampling "$PY" bench/sampling_sides.py --unet sdxl --batch 1 --steps 20 \
      --repeats 5 --side_timeout 120
    ;;
  sdxl8)
    run 580 sampling "$PY" bench/sampling_sides.py --unet sdxl --batch 8 --steps 20 \
      --repeats 2 --side_timeout 120
    ;;
  mfu)  # cuDNN's fused attention (auto) and the one-piece path; each compiles in ~160 s
    for att in auto xla; do
      run 280 mfu "$PY" bench/unet_train_step.py --variant=imagen_base_2b --channels=256 \
        --batch=64 --res=64 --dtype=bfloat16 --peak_tflops=989 --attention=$att
    done
    ;;
  train_loop)  # data workers by the host's cores (data.worker_count=-1), then 0 for the A/B
    run 280 train_loop "$PY" bench/train_loop.py --configs=shapes_base,shapes_sr --batch=128 \
      --steps=300 --log_every=50
    run 280 train_loop "$PY" bench/train_loop.py --configs=shapes_base --batch=128 \
      --steps=300 --log_every=50 --worker_count=0 --note="threads only"
    ;;
  train_loop_latent)  # the VAE's encoding in both sides; the captions of 16,384 scenes cached
    run 280 train_loop "$PY" bench/train_loop.py --configs=shapes_latent --batch=128 \
      --steps=300 --log_every=50 --text_cache=16384
    run 280 train_loop "$PY" bench/train_loop.py --configs=shapes_mmdit --batch=128 \
      --steps=300 --log_every=50 --text_cache=16384
    ;;
  *)
    echo "usage: bash bench/gpu.sh train_step|sd15|sdxl1|sdxl8|mfu|train_loop|train_loop_latent" >&2
    exit 2
    ;;
esac
