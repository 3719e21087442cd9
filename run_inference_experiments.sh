#!/usr/bin/env bash
# Base-vs-LoRA images for every finished run of a sweep, then the rank x alpha grid, loss curves,
# CLIP metrics and the verdict.
#
# Usage: ./run_inference_experiments.sh [--sweep_dir output_ghibli/sweep] [--output_dir DIR]
#            [--model final_model|best_model] [--skip_existing] [--no_report] [--no_metrics]
#            [--clip_model ID] [--style_images DIR] [--alignment_tolerance 2.0] [-- INFERENCE FLAGS...]
#
#   --sweep_dir       where run_experiments.sh trained (any folder holding run directories also works)
#   --output_dir      default: {sweep_dir}/inference; one folder per run (r{R}_a{A}_lr{LR}/), report/
#   --model           which LoRA folder of each run to use (default final_model)
#   --skip_existing   leave out runs whose folder already holds a finished comparison
#   --no_report       images only; --no_metrics: pictures without CLIP metrics
#   --clip_model, --style_images, --alignment_tolerance   passed to `utils/sweep_report.py report`
#   -- ...            flags for inference_sdxl_ghibli.py: --pretrained_model_name_or_path, --prompts,
#                     --num_images, --height, --width, --num_inference_steps, --seed, --guidance_scale, ...
#
# The runs are found from the sweep's status files (or the run directories themselves); nothing is
# hard-coded. One Python process loads the SDXL pipeline once and, for every run, loads its LoRA,
# generates and deletes it again; the flags after -- are read by inference_sdxl_ghibli.py's own parser,
# so every run gets the same prompts, seeds and settings. The base images are made once, in the first
# run's folder, and reused from there by every later run (the --base_results_dir mechanism), also by a
# later call with the same settings.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
SWEEP_DIR="output_ghibli/sweep"
OUTPUT_DIR=""
MODEL="final_model"
SKIP=()
REPORT=1
REPORT_ARGS=()
INFERENCE_ARGS=()

# shellcheck source=utils/sweep_common.sh
. "$ROOT/utils/sweep_common.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case "$1" in
    --sweep_dir|--output_dir|--model|--clip_model|--style_images|--alignment_tolerance)
      [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --sweep_dir) SWEEP_DIR="$2"; shift 2 ;;
    --output_dir) OUTPUT_DIR="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --skip_existing) SKIP=(--skip_existing); shift ;;
    --no_report) REPORT=0; shift ;;
    --no_metrics) REPORT_ARGS+=(--no_metrics); shift ;;
    --clip_model|--style_images|--alignment_tolerance) REPORT_ARGS+=("$1" "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; INFERENCE_ARGS=("$@"); break ;;
    *) die "unknown flag $1 (flags for inference_sdxl_ghibli.py go after --)" ;;
  esac
done
OUTPUT_DIR="${OUTPUT_DIR:-$SWEEP_DIR/inference}"

runs_text="$(helper runs "$SWEEP_DIR" --model "$MODEL")" || exit $?
LORAS=()
while IFS=$'\t' read -r label lora; do LORAS+=(--lora "$label=$lora"); done <<<"$runs_text"
echo "Images for $((${#LORAS[@]} / 2)) run(s) of $SWEEP_DIR into $OUTPUT_DIR" >&2

# One pipeline for all: the first LoRA's folder gets the base images, every later LoRA reuses them.
failed=0
helper generate --output_dir "$OUTPUT_DIR" "${SKIP[@]}" "${LORAS[@]}" -- "${INFERENCE_ARGS[@]}" || failed=$?
[ "$failed" != 2 ] || exit 2  # bad flags or files: nothing was generated

if [ "$REPORT" = 1 ]; then
  helper report --inference_dir "$OUTPUT_DIR" "${REPORT_ARGS[@]}" || failed=1
fi
exit "$failed"
