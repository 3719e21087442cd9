# Shared by run_experiments.sh, run_inference_experiments.sh and run_checkpoint_inference.sh (sourced).
# Needs ROOT (the repository) and PYTHON (the interpreter) set by the script.

die() { echo "error: $*" >&2; exit 2; }
# The script's header comment, from line 2 to `set -euo`, is its --help text.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
helper() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m utils.sweep_report "$@"; }
