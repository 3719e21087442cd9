# Shared by run_experiments.sh, run_inference_experiments.sh and run_checkpoint_inference.sh (sourced).
# Needs ROOT (the repository) set by the script; sets PYTHON, the interpreter (environment variable,
# default python).

PYTHON="${PYTHON:-python}"

die() { echo "error: $*" >&2; exit 2; }
# The script's header comment, from line 2 to `set -euo`, is its --help text.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
helper() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m utils.sweep_report "$@"; }

# parse_flags SCRIPT "VALUE FLAGS" -- "$@": the script's own flags. --flag=value counts as --flag value;
# -h/--help prints the usage; everything after -- goes to PASSTHROUGH (the flags for SCRIPT, the Python
# script the sweep runs). Each flag goes first to the script's `on_flag FLAG VALUE` (VALUE empty for a
# switch), which returns 1 for a flag it leaves to the default: a flag named in VALUE FLAGS needs a value
# and sets the variable of its name in capitals (--output_dir DIR sets OUTPUT_DIR); any other is unknown.
PASSTHROUGH=()
on_flag() { return 1; }  # a script with only VALUE FLAGS needs no on_flag of its own
parse_flags() {
  local script="$1" valued=" $2 " variable
  shift 3
  while [ $# -gt 0 ]; do
    case "$1" in
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      -h|--help) usage; exit 0 ;;
      --) shift; PASSTHROUGH=("$@"); return ;;
    esac
    if [[ "$valued" != *" $1 "* ]]; then
      on_flag "$1" "" || die "unknown flag $1 (flags for $script go after --)"
      shift
      continue
    fi
    [ $# -ge 2 ] || die "$1 needs a value"
    variable="${1#--}"
    on_flag "$1" "$2" || printf -v "${variable^^}" '%s' "$2"
    shift 2
  done
}

# --slurm for the inference scripts: SLURM_FLAGS collects --slurm, --dry_run, --wait and --sbatch_args VALUE
# (take_slurm_flag FLAG VALUE, from the script's on_flag); submit_self LOG_DIR "$@" then submits the script
# itself, without those flags, as one job writing the same folders, and exits with the submission's status.
SLURM_FLAGS=()
SLURM_WANTED=0
SBATCH_ARGS=""
check_slurm_flags() {
  if [ "$SLURM_WANTED" = 0 ] && { [ ${#SLURM_FLAGS[@]} -gt 0 ] || [ -n "$SBATCH_ARGS" ]; }; then
    die "--sbatch_args, --dry_run and --wait go with --slurm"
  fi
}
take_slurm_flag() {
  case "$1" in
    --slurm) SLURM_WANTED=1 ;;
    --dry_run|--wait) SLURM_FLAGS+=("$1") ;;
    *) return 1 ;;
  esac
}
submit_self() {
  local log_dir="$1" kept=() skip=0 arg
  shift
  for arg in "$@"; do  # the command line without the --slurm flags: what the job runs
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$arg" in
      --slurm|--dry_run|--wait|--sbatch_args=*) ;;
      --sbatch_args) skip=1 ;;
      *) kept+=("$arg") ;;
    esac
  done
  helper slurm-job --name "$(basename "$0" .sh)" --log_dir "$log_dir" --sbatch_args="$SBATCH_ARGS" \
    "${SLURM_FLAGS[@]}" -- bash "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "${kept[@]}"
  exit $?
}
