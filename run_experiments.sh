#!/usr/bin/env bash
# LoRA rank x alpha sweep of train_sdxl_lora.py: runs spread over GPUs, resumable, with a record per run.
# With no arguments it is the original's sweep: ranks 4 8 16 x alphas 4 8 16 32 at learning rate 1e-4.
#
# ./run_experiments.sh --help lists the flags. One Python process does the work
# (utils/sweep_report.py run_experiments, code in utils/sweep/).
# PYTHON is its interpreter (default: python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
export PYTHON
exec "$PYTHON" "$ROOT/utils/sweep_report.py" run_experiments "$@"
