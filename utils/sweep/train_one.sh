# One run of a rank x alpha sweep (sourced by run_experiments.sh and utils/sweep/slurm_task.sh).
# Needs helper (common.sh), LAUNCHER (array), TRAIN_SCRIPT, OUTPUT_DIR, LR and TRAIN_ARGS (array) set.

# Bookkeeping that must finish even while the sweep is being stopped: the command ignores INT and TERM.
immune() { ( trap '' INT TERM; "$@" ); }

# run_one RANK ALPHA STATUS_FOLDER NUMBER RESUME_DIR GPU: status "running", the trainer, then how it ended.
# A SIGINT/SIGTERM reaches the trainer from outside (the sweep's stop, scancel): it saves and ends, then the
# end is recorded. A SIGUSR1 (SLURM's warning before a time limit) is passed on to the trainer as SIGTERM.
# Returns the trainer's exit code.
WARNED=0  # set when SLURM's time-limit warning (SIGUSR1) stopped the run
run_one() {
  local rank="$1" alpha="$2" folder="$3" number="$4" resume="$5" gpu="$6"
  local log="$folder/train.log" rc=0 stop=0 pid=""
  trap 'stop=1' INT TERM  # the trainer gets the signal too; let it end, then record how it ended
  trap 'stop=1; WARNED=1; [ -z "$pid" ] || kill -TERM -- "$pid" 2>/dev/null || true' USR1
  local cmd=("${LAUNCHER[@]}" "$TRAIN_SCRIPT" --output_dir "$OUTPUT_DIR" --lora_rank "$rank" --lora_alpha "$alpha"
             --learning_rate "$LR" --run_dir_file "$folder/run_dir.txt")
  if [ -n "$resume" ] && [[ " ${TRAIN_ARGS[*]} " != *" --resume_from_checkpoint"* ]]; then
    cmd+=(--resume_from_checkpoint "$resume")  # continue the earlier attempt's run in its folder
  fi
  cmd+=("${TRAIN_ARGS[@]}")
  # One latent and text-embedding cache per sweep, on disk in $OUTPUT_DIR/.latent_cache (keyed by image,
  # model, bucket and crop): the first run computes it, every later run reads it and starts training at once.
  if [[ " ${TRAIN_ARGS[*]} " != *" --no-cache "* && " ${TRAIN_ARGS[*]} " != *" --cache_latents_to_disk "* ]]; then
    cmd+=(--cache_latents_to_disk)
  fi
  mkdir -p "$folder"
  immune helper status-start --file "$folder/status.json" --rank "$rank" --alpha "$alpha" --lr "$LR" \
    --number "$number" --output_dir "$OUTPUT_DIR" --gpu "$gpu" --log "$log" --process_group "$BASHPID" \
    --command "$(printf '%q ' "${cmd[@]}")" -- "${TRAIN_ARGS[@]}" || true
  if [ "$stop" = 1 ]; then
    rc=143  # stopped before the trainer started
  else
    echo "[$(date +%T)] start r=$rank a=$alpha${gpu:+ on GPU $gpu} -> $folder" >&2
    if [ -n "$gpu" ]; then
      CUDA_VISIBLE_DEVICES="$gpu" "${cmd[@]}" >>"$log" 2>&1 &
    else
      "${cmd[@]}" >>"$log" 2>&1 &
    fi
    pid=$!
    while true; do  # a trapped signal ends `wait` early; wait again until the trainer has ended
      rc=0
      wait "$pid" || rc=$?
      kill -0 "$pid" 2>/dev/null || break
    done
    if [ "$rc" -gt 128 ]; then  # a signal ended the last wait as the trainer ended: its own status, if known
      local again=0
      wait "$pid" 2>/dev/null || again=$?
      [ "$again" = 127 ] || rc="$again"
    fi
  fi
  immune helper status-end --file "$folder/status.json" --exit_code "$rc" || true
  echo "[$(date +%T)] end   r=$rank a=$alpha: exit code $rc (log: $log)" >&2
  return "$rc"
}
