#!/usr/bin/env bash
# Base-vs-LoRA images for every epoch checkpoint of a training run (--all_runs: of every run),
# then the epoch-by-epoch strip. With no arguments, as the original: the newest run's checkpoints.
#
# ./run_checkpoint_inference.sh --help lists the flags. One Python process does the work
# (utils/sweep_report.py run_checkpoint_inference, code in utils/sweep/).
# PYTHON is its interpreter (default: python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
export PYTHON
exec "$PYTHON" "$ROOT/utils/sweep_report.py" run_checkpoint_inference "$@"
