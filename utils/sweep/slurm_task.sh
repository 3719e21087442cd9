#!/usr/bin/env bash
# A task of a rank x alpha sweep on SLURM, run by the job scripts that `run_experiments.sh --slurm` submits:
#
#   slurm_task.sh train  --results_dir D --output_dir D --ranks "R..." --alphas "A..." --lr LR
#                        --tasks "R:A ..." --start_time T [--requeue] -- TRAINER FLAGS
#   slurm_task.sh finish (the same flags)
#
# train: array task $SLURM_ARRAY_TASK_ID trains the pair at that place of --tasks exactly as a local run of
# the sweep does (status start, the trainer, status end, experiment_{R}_{A}.json); a pair that finished
# meanwhile is skipped, an interrupted one continues in its run folder. SIGTERM (scancel, preemption)
# reaches the trainer, which saves and stops: the run is recorded as interrupted. SIGUSR1 (SLURM's warning
# before the time limit, --signal) is passed to the trainer as SIGTERM; with --requeue the task then
# goes back in the queue and resumes. finish: the loss curves and summary.json of the whole grid.
# Environment: PYTHON, TRAIN_SCRIPT, TRAIN_LAUNCHER as for run_experiments.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=utils/sweep/common.sh
. "$ROOT/utils/sweep/common.sh"
# shellcheck source=utils/sweep/train_one.sh
. "$ROOT/utils/sweep/train_one.sh"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-$ROOT/train_sdxl_lora.py}"
read -r -a LAUNCHER <<<"${TRAIN_LAUNCHER:-$PYTHON}"

MODE="${1:-}"
shift || true
REQUEUE=0
# shellcheck disable=SC2329  # called by parse_flags
on_flag() { case "$1" in --requeue) REQUEUE=1 ;; *) return 1 ;; esac; }
parse_flags train_sdxl_lora.py "--results_dir --output_dir --ranks --alphas --lr --tasks --start_time" -- "$@"
TRAIN_ARGS=("${PASSTHROUGH[@]}")
read -r -a RANK_LIST <<<"$RANKS"
read -r -a ALPHA_LIST <<<"$ALPHAS"
read -r -a TASK_LIST <<<"$TASKS"
GRID=(--results_dir "$RESULTS_DIR" --ranks "${RANK_LIST[@]}" --alphas "${ALPHA_LIST[@]}" --lr "$LR")

if [ "$MODE" = finish ]; then
  helper losses --results_dir "$RESULTS_DIR" >/dev/null 2>&1 || echo "warning: no loss plot (no finished run yet)" >&2
  helper summary "${GRID[@]}" --start_time "$START_TIME" -- "${TRAIN_ARGS[@]}"
  exit $?
fi
[ "$MODE" = train ] || die "expected train or finish, got '$MODE'"

pair="${TASK_LIST[${SLURM_ARRAY_TASK_ID:?not inside a SLURM job array}]}"
rank="${pair%%:*}"
alpha="${pair#*:}"
line=""
while IFS= read -r planned; do
  [[ "$planned" == "$rank"$'\t'"$alpha"$'\t'* ]] && line="$planned"
done <<<"$(helper plan "${GRID[@]}" -- "${TRAIN_ARGS[@]}")"
if [ -z "$line" ]; then
  echo "r$rank a$alpha: finished already, nothing to do" >&2
  exit 0
fi
IFS=$'\t' read -r rank alpha folder number resume <<<"$line"
rc=0
run_one "$rank" "$alpha" "$folder" "$number" "$resume" "" || rc=$?
if [ "$REQUEUE" = 1 ] && [ "$WARNED" = 1 ] && [ "$rc" != 0 ]; then
  echo "r$rank a$alpha: stopped before the time limit; back in the queue to resume" >&2
  scontrol requeue "${SLURM_JOB_ID}" || true
fi
exit "$rc"
