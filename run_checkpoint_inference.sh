#!/usr/bin/env bash
# Base-vs-LoRA images for every epoch checkpoint of one training run, then the epoch-by-epoch strip.
#
# Usage: ./run_checkpoint_inference.sh --run_dir RUN [--output_dir DIR] [--include_final] [--skip_existing]
#            [--image_index 0] [-- INFERENCE FLAGS...]
#
#   --run_dir         a run directory (with experiment_config.json) or a sweep run folder (r4_a8_lr1e-4/)
#   --output_dir      default: {run_dir}/checkpoint_inference; one folder per checkpoint, epoch_strip.png
#   --include_final   add final_model after the last checkpoint
#   --skip_existing   leave out checkpoints whose folder already holds a finished comparison
#   --image_index     which image (seed) of each prompt the strip shows (default 0)
#   -- ...            flags for inference_sdxl_ghibli.py: --pretrained_model_name_or_path, --prompts,
#                     --num_images, --height, --width, --num_inference_steps, --seed, ...
#
# The checkpoints (checkpoint_epoch_N/, written every --save_steps epochs) are found in the run
# directory and taken in epoch order. One Python process loads the pipeline once; the base images are
# made once, in the first checkpoint's folder, and reused for every later one, so the columns of the
# strip differ from each other only by their LoRA.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
RUN_DIR=""
OUTPUT_DIR=""
INCLUDE_FINAL=()
SKIP=()
IMAGE_INDEX=0
INFERENCE_ARGS=()

# shellcheck source=utils/sweep_common.sh
. "$ROOT/utils/sweep_common.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case "$1" in
    --run_dir|--output_dir|--image_index) [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --run_dir) RUN_DIR="$2"; shift 2 ;;
    --output_dir) OUTPUT_DIR="$2"; shift 2 ;;
    --include_final) INCLUDE_FINAL=(--include_final); shift ;;
    --skip_existing) SKIP=(--skip_existing); shift ;;
    --image_index) IMAGE_INDEX="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; INFERENCE_ARGS=("$@"); break ;;
    *) die "unknown flag $1 (flags for inference_sdxl_ghibli.py go after --)" ;;
  esac
done
[ -n "$RUN_DIR" ] || die "--run_dir is required"
OUTPUT_DIR="${OUTPUT_DIR:-$RUN_DIR/checkpoint_inference}"

series_text="$(helper checkpoints "$RUN_DIR" "${INCLUDE_FINAL[@]}")" || exit $?
LORAS=()
while IFS=$'\t' read -r label lora; do LORAS+=(--lora "$label=$lora"); done <<<"$series_text"
echo "Images for $((${#LORAS[@]} / 2)) checkpoint(s) of $RUN_DIR into $OUTPUT_DIR" >&2

# One pipeline for all: the first LoRA's folder gets the base images, every later LoRA reuses them.
failed=0
helper generate --output_dir "$OUTPUT_DIR" "${SKIP[@]}" "${LORAS[@]}" -- "${INFERENCE_ARGS[@]}" || failed=$?
[ "$failed" != 2 ] || exit 2  # bad flags or files: nothing was generated

helper strip --inference_dir "$OUTPUT_DIR" --image_index "$IMAGE_INDEX" || failed=1
exit "$failed"
