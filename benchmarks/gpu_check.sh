#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the CUDA tests, then the benchmarks at published sizes,
# in under 8 minutes in all. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh [path/to/diffusers-*.whl] [output directory]
#
# diffusers is installed from the wheel given (or the first diffusers wheel under wheels/) with
# --no-deps when it is not importable. Results: <output>/cuda_tests.log, combine.jsonl,
# overhead.jsonl, overhead.md and gpu_check.log (default output: $OUT if set, else gpu_check_out/).
# Every step has its own time limit; a step that fails or runs out of time is reported and the
# next one runs.
#
# GPU_CHECK_DEVICE=cpu rehearses the same steps on the CPU (float32, the reduced `cpu` preset, one
# timed forward per mode; the CUDA tests skip), so that the script itself is known to work before a
# GPU runs it; GPU_CHECK_FAMILIES narrows the overhead families (default: flux sd3 sdxl pixart sana wan).
set -u

WHEEL="${1:-}"
DEST="${2:-${OUT:-gpu_check_out}}"
TOTAL=${GPU_CHECK_SECONDS:-460}   # the whole script, leaving margin under 8 minutes
PY=${PYTHON:-python}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
START=$SECONDS
exec 3>&1  # the console, also inside steps whose output goes to a file

say() { local line="[gpu_check $((SECONDS - START))s] $*"; echo "$line" >&3; echo "$line" >> "$LOG"; }
left() { echo $((TOTAL - (SECONDS - START))); }
# step NAME LIMIT COMMAND...: run COMMAND with at most LIMIT seconds (and never past the total)
step() {
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    if [ "$remaining" -lt 20 ]; then say "$name: skipped (time is up)"; return 1; fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    say "$name: start (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "$name: stopped at its time limit"; else say "$name: exit $rc"; fi
    return $rc
}

say "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")' 2>&1)"
if ! $PY -c 'import diffusers' 2>/dev/null; then
    [ -z "$WHEEL" ] && WHEEL=$(ls wheels/diffusers-*.whl 2>/dev/null | head -n 1)
    if [ -n "$WHEEL" ]; then
        step "install $WHEEL" 120 $PY -m pip install --no-deps --no-index -q "$WHEEL" 2>&1 | tee -a "$LOG"
    else
        say "diffusers is not installed and no wheel was given or found under wheels/: the benchmarks will fail"
    fi
fi
if ! $PY -c 'import pytest' 2>/dev/null; then
    PYTEST_WHEEL=$(ls wheels/pytest-*.whl 2>/dev/null | head -n 1)
    [ -n "$PYTEST_WHEEL" ] && $PY -m pip install --no-index --find-links wheels -q pytest 2>&1 | tee -a "$LOG"
fi

# 1. CUDA tests: the compiled (Triton) combine and merge against eager, the log-sum-exp kernels against the math.
step "CUDA tests" 150 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$DEST/cuda_tests.log"

DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    if ! $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        say "no CUDA device: the benchmarks are skipped (GPU_CHECK_DEVICE=cpu rehearses them on the CPU)"; exit 1
    fi
    SIZES=(--dtype bfloat16 --preset full --repeats 3 --warmup 1)
    TOKENS=4096
else
    say "rehearsal on $DEVICE: reduced sizes, one timed forward per mode"
    SIZES=(--dtype float32 --preset cpu --repeats 1 --warmup 0)
    TOKENS=256
fi

# 2. The combine per call at FLUX.1 1024x1024 (4096 image tokens, 24 x 128), compiled against eager.
step "combine benchmark" 60 $PY benchmarks/combine.py --device "$DEVICE" "${SIZES[@]:0:2}" --tokens "$TOKENS" \
    > "$DEST/combine.jsonl" 2>> "$LOG"

# 3. Per-forward overhead at published sizes, one family per run so that one slow or failing family costs only
#    its own time. Most telling first; Wan last, with what time is left (its 14B case at 32,760 video tokens takes
#    a few seconds a forward), after its 1.3B case.
FAMILIES=${GPU_CHECK_FAMILIES:-flux sd3 sdxl pixart sana wan}
for family in $FAMILIES; do
    limit=90; [ "$family" = wan ] && limit=240
    step "overhead $family" $limit $PY benchmarks/overhead.py --device "$DEVICE" "${SIZES[@]}" \
        --families "$family" --modes cfg,nag,nag_step,nag_eager,floor --jsonl "$DEST/overhead.jsonl" >> "$LOG" 2>&1
done
if [ -s "$DEST/overhead.jsonl" ]; then
    $PY benchmarks/overhead.py --render "$DEST/overhead.jsonl" --markdown "$DEST/overhead.md" \
        --section "full-$DEVICE" >> "$LOG" 2>&1
fi
say "done in $((SECONDS - START))s; results in $DEST"
