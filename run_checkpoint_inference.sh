#!/usr/bin/env bash
# Base-vs-LoRA images for every epoch checkpoint of one training run, then the epoch-by-epoch strip.
#
# Usage: ./run_checkpoint_inference.sh [--run_dir RUN] [--runs_dir output_ghibli] [--output_dir DIR]
#            [--base_results_dir output_visualization/base_model_results] [--include_final]
#            [--skip_existing] [--image_index 0] [-- INFERENCE FLAGS...]
#
# With no arguments, as the original: the run's checkpoints into output_visualization/{run}_checkpoints/
# epoch_{N}/, the original's 25 prompts at 1024 x 1024, base images from (or, when absent, made once
# into) output_visualization/base_model_results. The run is the newest one in output_ghibli/ that has
# checkpoint_epoch_N folders (the original named one run and epochs 1 3 5 7 9 in the script); every
# checkpoint it has is used, in epoch order.
#
#   --run_dir           a run directory (with experiment_config.json); default: the newest in --runs_dir
#   --runs_dir          where to look for the newest run (default output_ghibli)
#   --output_dir        default: output_visualization/{run}_checkpoints; one folder per checkpoint
#                       (epoch_N/), and epoch_strip.png
#   --base_results_dir  default: output_visualization/base_model_results
#   --include_final     add final_model after the last checkpoint
#   --skip_existing     leave out checkpoints whose folder already holds a finished comparison
#   --image_index       which image (seed) of each prompt the strip shows, from 0 (default 0)
#   -- ...              flags for inference_sdxl_ghibli.py: --pretrained_model_name_or_path, --prompts,
#                       --num_images, --height, --width, --num_inference_steps, --seed, ...; they override
#                       the defaults above (--prompts replaces the 25 prompts)
#
#   --slurm             run all of this as one SLURM job (same folders; HF_HUB_OFFLINE=1), with --sbatch_args
#                       "...", --dry_run (print the job script) and --wait (block; the job's exit status), as
#                       run_experiments.sh --slurm; the job's script, id and output go to {output_dir}/slurm/
#
# One Python process loads the pipeline once; the base images are made once and reused for every
# checkpoint, so the columns of the strip differ from each other only by their LoRA.
#
# Example: ./run_checkpoint_inference.sh --run_dir output_ghibli/<run>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=utils/sweep/common.sh
. "$ROOT/utils/sweep/common.sh"

INCLUDE_FINAL=()
SKIP=()
RUN_DIR=""
RUNS_DIR="output_ghibli"
OUTPUT_DIR=""
BASE_RESULTS_DIR="output_visualization/base_model_results"
IMAGE_INDEX=0

# shellcheck disable=SC2329  # called by parse_flags
on_flag() {
  case "$1" in
    --include_final) INCLUDE_FINAL=(--include_final) ;;
    --skip_existing) SKIP=(--skip_existing) ;;
    *) take_slurm_flag "$1" || return 1 ;;
  esac
}
parse_flags inference_sdxl_ghibli.py "--run_dir --runs_dir --output_dir --base_results_dir --image_index --sbatch_args" -- "$@"
INFERENCE_ARGS=("${PASSTHROUGH[@]}")
check_slurm_flags
[ "$SLURM_WANTED" = 0 ] || submit_self "${OUTPUT_DIR:-output_visualization}/slurm" "$@"
if [ -z "$RUN_DIR" ]; then
  RUN_DIR="$(helper newest-checkpoint-run "$RUNS_DIR")" || exit $?
fi
OUTPUT_DIR="${OUTPUT_DIR:-output_visualization/$(basename "${RUN_DIR%/}")_checkpoints}"

series_text="$(helper checkpoints "$RUN_DIR" "${INCLUDE_FINAL[@]}")" || exit $?
LORAS=()
while IFS=$'\t' read -r label lora; do LORAS+=(--lora "$label=$lora"); done <<<"$series_text"
echo "Images for $((${#LORAS[@]} / 2)) checkpoint(s) of $RUN_DIR into $OUTPUT_DIR" >&2

prompts_text="$(helper prompts checkpoint)" || exit $?  # the original's 25 prompts (utils/inference/prompts.py)
mapfile -t PROMPTS <<<"$prompts_text"
# One pipeline for all; the flags after -- come last, so they override these defaults.
failed=0
helper generate --output_dir "$OUTPUT_DIR" --base_dir "$BASE_RESULTS_DIR" "${SKIP[@]}" "${LORAS[@]}" -- \
  --prompts "${PROMPTS[@]}" --height 1024 --width 1024 "${INFERENCE_ARGS[@]}" || failed=$?
[ "$failed" != 2 ] || exit 2  # bad flags or files: nothing was generated

helper strip --inference_dir "$OUTPUT_DIR" --image_index "$IMAGE_INDEX" || failed=1
exit "$failed"
