#!/usr/bin/env bash
# LoRA rank x alpha sweep of train_sdxl_lora.py: runs spread over GPUs, resumable, with a record per run.
#
# Usage: ./run_experiments.sh [--ranks "4 8 16"] [--alphas "4 8 16 32"] [--lr 1e-4] [--output_dir output_ghibli]
#                             [--results_dir experiment_results] [--gpus 0,1,2,3] [-- TRAINER FLAGS...]
#        ./run_experiments.sh --slurm [--sbatch_args "--partition=gpu --gres=gpu:1 --time=08:00:00"]
#                             [--dry_run] [--wait] [--requeue] [the flags above but --gpus] [-- TRAINER FLAGS...]
#
# With no arguments it is the original's sweep: ranks 4 8 16 x alphas 4 8 16 32 at learning rate 1e-4,
# each a plain training with the trainer's defaults.
#
#   --ranks, --alphas   the grid (default: the original's 4 8 16 x 4 8 16 32)
#   --lr                learning rate of every run (default: the original's 1e-4)
#   --output_dir        where the trainer makes each run's folder, {ts}_{type}_r{R}_a{A}_lr{LR}/
#                       (default: the trainer's own, output_ghibli)
#   --results_dir       the sweep's records (default experiment_results): experiment_{R}_{A}.json and
#                       summary.json as the original's, plus runs/r{R}_a{A}_lr{LR}/status.json (state, real
#                       start and end times, exit code, the run folder, earlier attempts) and train.log,
#                       loss_curves.png and the lock. One results folder holds one learning rate.
#   --gpus              comma-separated GPU ids; one run per GPU at a time (CUDA_VISIBLE_DEVICES); an id
#                       given twice (0,0,1,1) runs two at a time on that GPU. Without it the runs go one
#                       after another on the default device.
#   --slurm             submit the runs still to do to SLURM as ONE job array (a task per rank and alpha, each
#                       doing what a local run does, into the same folders and records) and a job after it
#                       (afterany) writing loss_curves.png and summary.json; prints the job ids. First the
#                       base model is resolved here (a local folder, or a Hub id fetched once into the
#                       Hugging Face cache) and the dataset checked; the tasks run with HF_HUB_OFFLINE=1.
#                       Scripts, job ids and task output: {results_dir}/slurm/. Watch: squeue --me, the records.
#   --sbatch_args       flags for sbatch, as one string (they win over the scripts' #SBATCH defaults), e.g.
#                       "--partition=gpu --gres=gpu:1 --cpus-per-task=8 --mem=64G --time=08:00:00"
#   --dry_run           print the job scripts and the sbatch command lines; submit nothing
#   --wait              block until the sweep's jobs are done; exit status as a local sweep's
#   --requeue           a task stopped by SLURM (preemption; the time-limit warning, SIGUSR1 sent 300 s
#                       before it by the default --signal=B:USR1@300) goes back in the queue and resumes
#   -- ...              everything after -- goes to train_sdxl_lora.py (e.g. --dataset_dir, --num_train_epochs)
#   Environment: PYTHON (the interpreter, default python), TRAIN_SCRIPT (default train_sdxl_lora.py),
#   TRAIN_LAUNCHER (what starts each training, default $PYTHON; e.g. "accelerate launch --multi_gpu
#   --num_processes 4" for one run on all GPUs, with no --gpus; with --slurm, the launcher of every task).
#
# Run the same command again to resume: finished runs are skipped, the others start again (in the run
# folder of their earlier attempt, from its latest resumable checkpoint, when it saved one with
# --checkpointing_steps). Ctrl-C or SIGTERM stops every running training and records it as interrupted.
# A lock (flock) keeps a second sweep out of a results folder while the first one runs.
# With --slurm, the same command again resumes the same way (it refuses while the jobs it submitted last are
# still queued); scancel or preemption records a run as interrupted, not failed; one run failing does not
# stop the others.
# Before any run starts, the trainer flags of the runs to do are checked as train_sdxl_lora.py checks them
# (not those of a TRAIN_SCRIPT of your own), so that a mistake every run would share is one error here.
# Exit status: 0 when every run finished, 1 when one failed, 2 on bad flags, 130/143 when stopped.
#
# Example: ./run_experiments.sh --gpus 0,1 -- --dataset_dir dataset_ghibli --num_train_epochs 20
set -euo pipefail
set -m  # every run in its own process group, so stopping it reaches the whole tree

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=utils/sweep/common.sh
. "$ROOT/utils/sweep/common.sh"
# shellcheck source=utils/sweep/train_one.sh
. "$ROOT/utils/sweep/train_one.sh"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-$ROOT/train_sdxl_lora.py}"  # the trainer (environment variable), e.g. a fork
read -r -a LAUNCHER <<<"${TRAIN_LAUNCHER:-$PYTHON}"  # e.g. "accelerate launch --multi_gpu": one run on all GPUs
RANKS="4 8 16"
ALPHAS="4 8 16 32"
LR="1e-4"
OUTPUT_DIR="output_ghibli"
RESULTS_DIR="experiment_results"
GPUS=""
SBATCH_ARGS=""
SLURM=0
SLURM_FLAGS=()
START_TIME="$(date '+%Y-%m-%d %H:%M:%S')"  # the sweep's start, recorded before any run

# shellcheck disable=SC2329  # called by parse_flags
on_flag() {
  case "$1" in
    --slurm) SLURM=1 ;;
    --dry_run|--wait|--requeue) SLURM_FLAGS+=("$1") ;;
    *) return 1 ;;
  esac
}
parse_flags train_sdxl_lora.py "--ranks --alphas --lr --output_dir --results_dir --gpus --sbatch_args" -- "$@"
TRAIN_ARGS=("${PASSTHROUGH[@]}")
if [ "$SLURM" = 0 ] && { [ ${#SLURM_FLAGS[@]} -gt 0 ] || [ -n "$SBATCH_ARGS" ]; }; then
  die "--sbatch_args, --dry_run, --wait and --requeue go with --slurm"
fi
[ "$SLURM" = 0 ] || [ -z "$GPUS" ] || die "--gpus is for a local sweep; with --slurm ask for GPUs in --sbatch_args"

for arg in "${TRAIN_ARGS[@]}"; do
  case "${arg%%=*}" in
    --output_dir|--lora_rank|--lora_alpha|--learning_rate)
      die "${arg%%=*} is set by the sweep; use --output_dir, --ranks, --alphas or --lr before --" ;;
  esac
done
[[ "$GPUS" =~ ^([0-9A-Za-z-]+(,[0-9A-Za-z-]+)*)?$ ]] || die "--gpus '$GPUS': expected ids like 0,1,2,3"

read -r -a RANK_LIST <<<"$RANKS"
read -r -a ALPHA_LIST <<<"$ALPHAS"
IFS=',' read -r -a SLOTS <<<"$GPUS"
[ ${#SLOTS[@]} -gt 0 ] || SLOTS=("")  # one slot on the default device
GRID=(--results_dir "$RESULTS_DIR" --ranks "${RANK_LIST[@]}" --alphas "${ALPHA_LIST[@]}" --lr "$LR")

mkdir -p "$RESULTS_DIR" "$OUTPUT_DIR"
if command -v flock >/dev/null; then  # one sweep per folder at a time (the lock lives as long as its runs)
  exec 9>"$RESULTS_DIR/.sweep.lock"
  flock -n 9 || die "another sweep is running with $RESULTS_DIR"
fi
DRY_RUN=0
[[ " ${SLURM_FLAGS[*]} " != *" --dry_run "* ]] || DRY_RUN=1
CHECK=()  # this project's trainer: its flags checked once here, before any run starts (a fork's are its own);
# a dry run only prints, and needs neither the dataset nor the model
if [ "$TRAIN_SCRIPT" -ef "$ROOT/train_sdxl_lora.py" ] && [ "$DRY_RUN" = 0 ]; then
  CHECK=(--check_trainer_flags)
fi
plan_text="$(helper plan "${GRID[@]}" "${CHECK[@]}" -- "${TRAIN_ARGS[@]}")" || exit $?
PLAN=()
[ -z "$plan_text" ] || mapfile -t PLAN <<<"$plan_text"
if [ "$SLURM" = 1 ] && [ ${#PLAN[@]} -gt 0 ]; then  # one job array of the runs to do, then the summary job
  TODO=()
  for line in "${PLAN[@]}"; do IFS=$'\t' read -r rank alpha _ <<<"$line"; TODO+=("$rank:$alpha"); done
  echo "Sweep $START_TIME: ${#PLAN[@]} run(s) to do into $OUTPUT_DIR on SLURM, records in $RESULTS_DIR" >&2
  if [ "$DRY_RUN" = 0 ]; then
    helper prepare -- "${TRAIN_ARGS[@]}" || exit $?
  fi
  helper slurm-sweep "${GRID[@]}" --output_dir "$OUTPUT_DIR" --todo "${TODO[@]}" --start_time "$START_TIME" \
    --train_script "$TRAIN_SCRIPT" --launcher="${TRAIN_LAUNCHER:-}" --sbatch_args="$SBATCH_ARGS" \
    "${SLURM_FLAGS[@]}" -- "${TRAIN_ARGS[@]}"
  exit $?
fi
echo "Sweep started $START_TIME: ${#PLAN[@]} run(s) to do into $OUTPUT_DIR on ${GPUS:-the default device}, records in $RESULTS_DIR" >&2

declare -A SLOT_PID=()

# shellcheck disable=SC2329  # called by the traps below
stop_all() {
  local code="$1" pid tick alive
  trap '' INT TERM
  echo "Stopping the sweep: ending the running trainings..." >&2
  for pid in "${SLOT_PID[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for ((tick = 1; tick <= 300; tick++)); do  # up to 30 s; the signal is repeated each second in case a
    alive=0                                  # trainer started just after the first one
    for pid in "${SLOT_PID[@]}"; do
      if kill -0 -- "-$pid" 2>/dev/null; then
        alive=1
        if [ $((tick % 10)) = 0 ]; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
      fi
    done
    [ "$alive" = 1 ] || break
    sleep 0.1
  done
  for pid in "${SLOT_PID[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  helper summary "${GRID[@]}" --start_time "$START_TIME" --gpus "$GPUS" --stopped -- "${TRAIN_ARGS[@]}" >&2 || true
  exit "$code"
}
trap 'stop_all 130' INT
trap 'stop_all 143' TERM

FREE_SLOT=""
free_slot() {  # sets FREE_SLOT to a slot with no live run, waiting for one when all are busy (no subshell:
  local i pid  # only this shell can wait for its jobs)
  while true; do
    for i in "${!SLOTS[@]}"; do
      pid="${SLOT_PID[$i]:-}"
      if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then FREE_SLOT="$i"; return; fi
    done
    wait -n 2>/dev/null || true
  done
}

for line in "${PLAN[@]}"; do
  IFS=$'\t' read -r rank alpha folder number resume <<<"$line"
  free_slot
  run_one "$rank" "$alpha" "$folder" "$number" "$resume" "${SLOTS[$FREE_SLOT]}" &
  SLOT_PID[$FREE_SLOT]=$!
done
for pid in "${SLOT_PID[@]}"; do wait "$pid" || true; done
SLOT_PID=()

status=0
helper losses --results_dir "$RESULTS_DIR" >/dev/null 2>&1 || echo "warning: no loss plot (no finished run yet)" >&2
helper summary "${GRID[@]}" --start_time "$START_TIME" --gpus "$GPUS" -- "${TRAIN_ARGS[@]}" || status=1
exit "$status"
