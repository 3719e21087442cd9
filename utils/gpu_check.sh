#!/usr/bin/env bash
# One command that proves the CUDA paths: installs what the machine lacks from carried wheels, prints
# the versions, then runs every part (step benchmarks, the automatic checkpointing choice, torch.compile,
# 8-bit AdamW, two real training runs, the inference benchmark) each under its own timeout, within one
# budget, and prints one summary table. Results: OUT/gpu_check.json, OUT/gpu_check.txt, OUT/parts/.
#
#   utils/gpu_check.sh                              # CUDA, full-size SDXL with random weights
#   utils/gpu_check.sh --device cpu --model tiny    # every part on a CPU, the tests' tiny SDXL
#   utils/gpu_check.sh --download_wheels            # fetch the wheels of utils/gpu_wheels.txt into .gpu_wheels/
#
# Options: --out DIR (default $OUT, else ./gpu_check_out), --work DIR (model and dataset, default
# ${TMPDIR:-/tmp}/gpu_check_work), --budget_s N (default 530), --parts a,b,... (a subset),
# --python PATH (default $PYTHON, else python3). See docs/gpu-check.md.
#
# Example: utils/gpu_check.sh --device cpu --model tiny
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEVICE=cuda MODEL="" PARTS="" DOWNLOAD=0 BUDGET=""
RESULTS="${OUT:-$ROOT/gpu_check_out}"
WORK="${TMPDIR:-/tmp}/gpu_check_work"
WHEELS="$ROOT/.gpu_wheels"

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --out) RESULTS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --budget_s) BUDGET="$2"; shift 2 ;;
        --parts) PARTS="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --download_wheels) DOWNLOAD=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device is cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac
MODEL="${MODEL:-$([ "$DEVICE" = cpu ] && echo tiny || echo sdxl)}"
BUDGET="${BUDGET:-530}"
cd "$ROOT" || exit 1

if ((DOWNLOAD)); then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --only-binary=:all: -d "$WHEELS" -r utils/gpu_wheels.txt || exit 1
    echo "wheels in $WHEELS: $(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1) bytes"
    exit 0
fi

mkdir -p "$RESULTS/parts" || exit 1
RESULTS="$(cd "$RESULTS" && pwd)"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""
echo "GPU check: model $MODEL on $DEVICE, budget $BUDGET s, results in $RESULTS, model and data in $WORK"

# Install what is missing, from the carried wheels (into .gpu_site/, on PYTHONPATH; nothing else changes).
if missing=$("$PY" utils/gpu_check.py missing --wheel_dir "$WHEELS"); then
    if [ -n "$missing" ]; then
        echo "installing from $WHEELS: $(echo "$missing" | xargs -n1 basename | tr '\n' ' ')"
        if "$PY" -m pip --version >/dev/null 2>&1; then
            # shellcheck disable=SC2086
            "$PY" -m pip install --quiet --no-index --no-deps --target "$ROOT/.gpu_site" $missing
        else
            for wheel in $missing; do "$PY" -m zipfile -e "$wheel" "$ROOT/.gpu_site"; done
        fi
    fi
else
    echo "gpu_check.sh: cannot install the missing packages (see above); the versions part says what lacks"
fi

deadline=$((SECONDS + BUDGET))
plan=$("$PY" utils/gpu_check.py plan --model "$MODEL" --device "$DEVICE" --out "$RESULTS" --work "$WORK" \
    ${PARTS:+--parts "$PARTS"}) || exit 1
rm -f "$RESULTS"/parts/*.status
while IFS=$'\t' read -r name cap command; do
    left=$((deadline - SECONDS - 10))  # 10 s kept for the summary
    limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        printf '{"skipped": "no time left in the %s s budget", "cap_s": %d}\n' "$BUDGET" "$cap" \
            > "$RESULTS/parts/$name.status"
        echo "== $name: skipped, no time left"
        continue
    fi
    echo "== $name (at most $limit s)"
    rm -f "$RESULTS/parts/$name.json"
    start=$SECONDS
    timeout -k 15 "$limit" bash -c "$command" > "$RESULTS/parts/$name.txt" 2>&1 < /dev/null
    rc=$?
    printf '{"rc": %d, "seconds": %d, "cap_s": %d}\n' "$rc" $((SECONDS - start)) "$limit" \
        > "$RESULTS/parts/$name.status"
    echo "   exit $rc after $((SECONDS - start)) s (output: parts/$name.txt)"
    if [ "$name" = versions ]; then grep -v '^[0-9]\{4\}-' "$RESULTS/parts/$name.txt" | head -40; fi
done <<< "$plan"

echo
"$PY" utils/gpu_check.py summary --model "$MODEL" --device "$DEVICE" --out "$RESULTS"
