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
# One Python process loads the pipeline once; the base images are made once and reused for every
# checkpoint, so the columns of the strip differ from each other only by their LoRA.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
RUN_DIR=""
RUNS_DIR="output_ghibli"
OUTPUT_DIR=""
BASE_RESULTS_DIR="output_visualization/base_model_results"
INCLUDE_FINAL=()
SKIP=()
IMAGE_INDEX=0
INFERENCE_ARGS=()

# The original's 25 prompts, verbatim.
PROMPTS=(
    "Draw a beautiful couple and their cat in a park in Ghibli style."
    "A young girl flying on a broomstick over a seaside town, in Ghibli animation style."
    "A quiet forest with a small cottage and a glowing spirit peeking from behind a tree, Ghibli-style."
    "A group of children chasing fireflies at dusk in a peaceful countryside setting, Ghibli-inspired."
    "An old train running through a field of golden wheat under a cloudy sky, in Ghibli art style."
    "A curious fox wearing a small backpack exploring a mossy ancient ruin, drawn in Ghibli style."
    "A calm lake reflecting the stars, with a girl sitting on a dock watching the sky, Ghibli-style."
    "A magical marketplace filled with unusual creatures and lanterns, illustrated in Ghibli animation style."
    "A flying island in the clouds with waterfalls cascading from its edges, in dreamy Ghibli aesthetic."
    "A boy riding a deer through a misty bamboo forest, in Studio Ghibli style."
    "An abandoned greenhouse slowly being taken over by nature, illustrated in warm Ghibli tones."
    "A cozy kitchen where a grandmother is baking bread with help from tiny forest spirits, Ghibli-inspired."
    "A mysterious black cat sitting on a rooftop watching over a rainy town, drawn like a Ghibli scene."
    "A child and a large fluffy creature sitting together under a giant mushroom during the rain, Ghibli-style."
    "A peaceful mountain village during a lantern festival at night, full of warm lights and soft details, Ghibli aesthetic."
    "An elderly couple walking their dog in a snowy forest, in Ghibli style."
    "A couple studying in a Japanese cafe in Ghibli style."
    "A male protagonist who rides a dragon and ascends to the sky in Ghibli style."
    "Japanese girl lying in a field in Ghibli style."
    "A couple's selfie in Ghibli style. The man is wearing glasses and a checkered shirt, and the woman has her hair down and is wearing a one-piece dress."
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
    --run_dir|--runs_dir|--output_dir|--base_results_dir|--image_index) [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --run_dir) RUN_DIR="$2"; shift 2 ;;
    --runs_dir) RUNS_DIR="$2"; shift 2 ;;
    --output_dir) OUTPUT_DIR="$2"; shift 2 ;;
    --base_results_dir) BASE_RESULTS_DIR="$2"; shift 2 ;;
    --include_final) INCLUDE_FINAL=(--include_final); shift ;;
    --skip_existing) SKIP=(--skip_existing); shift ;;
    --image_index) IMAGE_INDEX="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; INFERENCE_ARGS=("$@"); break ;;
    *) die "unknown flag $1 (flags for inference_sdxl_ghibli.py go after --)" ;;
  esac
done
if [ -z "$RUN_DIR" ]; then
  RUN_DIR="$(helper newest-checkpoint-run "$RUNS_DIR")" || exit $?
fi
OUTPUT_DIR="${OUTPUT_DIR:-output_visualization/$(basename "${RUN_DIR%/}")_checkpoints}"

series_text="$(helper checkpoints "$RUN_DIR" "${INCLUDE_FINAL[@]}")" || exit $?
LORAS=()
while IFS=$'\t' read -r label lora; do LORAS+=(--lora "$label=$lora"); done <<<"$series_text"
echo "Images for $((${#LORAS[@]} / 2)) checkpoint(s) of $RUN_DIR into $OUTPUT_DIR" >&2

# One pipeline for all; the flags after -- come last, so they override these defaults.
failed=0
helper generate --output_dir "$OUTPUT_DIR" --base_dir "$BASE_RESULTS_DIR" "${SKIP[@]}" "${LORAS[@]}" -- \
  --prompts "${PROMPTS[@]}" --height 1024 --width 1024 "${INFERENCE_ARGS[@]}" || failed=$?
[ "$failed" != 2 ] || exit 2  # bad flags or files: nothing was generated

helper strip --inference_dir "$OUTPUT_DIR" --image_index "$IMAGE_INDEX" || failed=1
exit "$failed"
