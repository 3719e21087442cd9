#!/usr/bin/env bash
# Base-vs-LoRA images for every trained run, then the rank x alpha grid, loss curves, CLIP metrics
# and the verdict. With no arguments, as the original: every output_ghibli/*/ run, its 5 prompts.
#
# ./run_inference_experiments.sh --help lists the flags. One Python process does the work
# (utils/sweep_report.py run_inference_experiments, code in utils/sweep/).
# PYTHON is its interpreter (default: python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
export PYTHON
exec "$PYTHON" "$ROOT/utils/sweep_report.py" run_inference_experiments "$@"
