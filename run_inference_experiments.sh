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
# One Python process loads the SDXL pipeline once and, for every run, loads its LoRA, generates and
# deletes it again; the flags after -- are read by inference_sdxl_ghibli.py's own parser, so every run
# gets the same prompts, seeds and settings. The report compares the runs of this call; of two runs
# with the same rank and alpha it uses the newer.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
SWEEP_DIR="output_ghibli"
OUTPUT_DIR="output_visualization_additional_2"
MODEL="final_model"
SKIP=()
REPORT=1
REPORT_ARGS=()
INFERENCE_ARGS=()

# The original's 5 prompts, verbatim.
PROMPTS=(
    "The image is a full shot of Kiki from Kiki's Delivery Service, standing in a field wearing her signature red dress and bow with her messenger bag. The image is in the style of Studio Ghibli, with soft colors and a focus on nature."
    "The image is a Ghibli-style illustration of a young girl with a red bow in her hair, riding on a broomstick with a black cat in her satchel, accompanied by a large seagull and another bird in the background. The scene is set against a backdrop of a coastal town and blue water."
    "The image is a Ghibli-style illustration of a young woman with dark hair and a white hat with a lavender ribbon. She is wearing a light yellow dress with a blue collar, and the background features a blue sky with fluffy white clouds and green trees."
    "The image is a portrait of a young woman in Ghibli style, with black hair and a striped shirt, set against a backdrop of a room with various decorations. The overall aesthetic is reminiscent of classic anime films."
    "The image is an animation in Ghibli style, featuring two characters sitting at a desk. On the left is a smiling boy, and on the right is a man with a stern expression, wearing a watch."
)

# shellcheck source=utils/sweep/common.sh
. "$ROOT/utils/sweep/common.sh"

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

runs_text="$(helper runs "$SWEEP_DIR" --model "$MODEL")" || exit $?
LORAS=()
FOLDERS=()
while IFS=$'\t' read -r label lora; do LORAS+=(--lora "$label=$lora"); FOLDERS+=("$label"); done <<<"$runs_text"
echo "Images for ${#FOLDERS[@]} run(s) of $SWEEP_DIR into $OUTPUT_DIR" >&2

# One pipeline for all; the flags after -- come last, so they override these defaults.
failed=0
helper generate --output_dir "$OUTPUT_DIR" --base_dir "$OUTPUT_DIR/base_model_results" "${SKIP[@]}" \
  "${LORAS[@]}" -- --prompts "${PROMPTS[@]}" --height 1024 --width 1024 "${INFERENCE_ARGS[@]}" || failed=$?
[ "$failed" != 2 ] || exit 2  # bad flags or files: nothing was generated

if [ "$REPORT" = 1 ]; then
  helper report --inference_dir "$OUTPUT_DIR" --folders "${FOLDERS[@]}" "${REPORT_ARGS[@]}" || failed=1
fi
exit "$failed"
