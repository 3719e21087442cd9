#!/usr/bin/env bash
# Base-vs-LoRA images for every trained run, then the rank x alpha grid, loss curves, CLIP metrics
# and the verdict.
#
# Usage: ./run_inference_experiments.sh [--sweep_dir output_ghibli] [--output_dir output_visualization_additional_2]
#            [--model final_model|best_model] [--skip_existing] [--no_report] [--no_metrics]
#            [--clip_model ID] [--style_images DIR] [--alignment_tolerance 2.0] [-- INFERENCE FLAGS...]
#
# With no arguments, as the original: every output_ghibli/*/ run with a final_model, the original's 5
# prompts at 1024 x 1024, base images and comparison grids, into output_visualization_additional_2/{run}/.
# The base images are made once, into output_visualization_additional_2/base_model_results/, and reused
# for every run (the original generated the same images again for each run). The report (grid of runs,
# loss curves, metrics, verdict) goes to output_visualization_additional_2/report/.
#
#   --sweep_dir       the folder holding the run folders (default output_ghibli)
#   --output_dir      default output_visualization_additional_2; one folder per run, base_model_results/,
#                     report/
#   --model           which LoRA folder of each run to use (default final_model)
#   --skip_existing   leave out runs whose folder already holds a finished comparison
#   --no_report       images only; --no_metrics: pictures without CLIP metrics
#   --clip_model, --style_images, --alignment_tolerance   passed to `utils/sweep_report.py report`
#   -- ...            flags for inference_sdxl_ghibli.py: --pretrained_model_name_or_path, --prompts,
#                     --num_images, --height, --width, --num_inference_steps, --seed, --guidance_scale, ...;
#                     they override the defaults above (--prompts replaces the 5 prompts)
#
#   --slurm             run all of this as one SLURM job (same folders; HF_HUB_OFFLINE=1), with --sbatch_args
#                       "...", --dry_run (print the job script) and --wait (block; the job's exit status), as
#                       run_experiments.sh --slurm; the job's script, id and output go to {output_dir}/slurm/
#
# One Python process loads the SDXL pipeline once and, for every run, loads its LoRA, generates and
# deletes it again; the flags after -- are read by inference_sdxl_ghibli.py's own parser, so every run
# gets the same prompts, seeds and settings. The report compares the runs of this call; of two runs
# with the same rank and alpha it uses the newer.
#
# Example: ./run_inference_experiments.sh --sweep_dir output_ghibli -- --num_images 3
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=utils/sweep/common.sh
. "$ROOT/utils/sweep/common.sh"

SKIP=()
REPORT_ARGS=()
REPORT=1
SWEEP_DIR="output_ghibli"
OUTPUT_DIR="output_visualization_additional_2"
MODEL="final_model"

# shellcheck disable=SC2329  # called by parse_flags
on_flag() {
  case "$1" in
    --skip_existing) SKIP=(--skip_existing) ;;
    --no_report) REPORT=0 ;;
    --no_metrics) REPORT_ARGS+=(--no_metrics) ;;
    --clip_model|--style_images|--alignment_tolerance) REPORT_ARGS+=("$1" "$2") ;;
    *) take_slurm_flag "$1" || return 1 ;;
  esac
}
parse_flags inference_sdxl_ghibli.py \
  "--sweep_dir --output_dir --model --clip_model --style_images --alignment_tolerance --sbatch_args" -- "$@"
INFERENCE_ARGS=("${PASSTHROUGH[@]}")
check_slurm_flags
[ "$SLURM_WANTED" = 0 ] || submit_self "$OUTPUT_DIR/slurm" "$@"

runs_text="$(helper runs "$SWEEP_DIR" --model "$MODEL")" || exit $?
LORAS=()
FOLDERS=()
while IFS=$'\t' read -r label lora; do LORAS+=(--lora "$label=$lora"); FOLDERS+=("$label"); done <<<"$runs_text"
echo "Images for ${#FOLDERS[@]} run(s) of $SWEEP_DIR into $OUTPUT_DIR" >&2

prompts_text="$(helper prompts sweep)" || exit $?  # the original's 5 prompts (utils/inference/prompts.py)
mapfile -t PROMPTS <<<"$prompts_text"
# One pipeline for all; the flags after -- come last, so they override these defaults.
failed=0
helper generate --output_dir "$OUTPUT_DIR" --base_dir "$OUTPUT_DIR/base_model_results" "${SKIP[@]}" \
  "${LORAS[@]}" -- --prompts "${PROMPTS[@]}" --height 1024 --width 1024 "${INFERENCE_ARGS[@]}" || failed=$?
[ "$failed" != 2 ] || exit 2  # bad flags or files: nothing was generated

if [ "$REPORT" = 1 ]; then
  helper report --inference_dir "$OUTPUT_DIR" --folders "${FOLDERS[@]}" "${REPORT_ARGS[@]}" || failed=1
fi
exit "$failed"
