#!/usr/bin/env bash
# The checks that need a GPU, in one go, within 10 minutes of wall time on one H100:
#   1. the gpu tests (python -m pytest -m gpu tests/test_gpu.py);
#   2. the training-step benchmark on CUDA (default preset, bf16 autocast)  -> results/bench/train_step-cuda.json;
#   3. the barrier benchmark's target cell on CUDA                          -> results/bench/barrier-target-cuda.json;
#   4. one 20-epoch default run (prob-attention train --lambda-m 0.02) into a scratch folder, summarised beside the
#      committed CPU run of the same configuration                          -> results/bench/train-default-cuda.json.
# Everything printed also goes to results/bench/gpu_check-cuda.log. Each stage runs under `timeout`, the last one
# with whatever is left of GPU_CHECK_BUDGET_S (default 570 s), so the whole check cannot run past it.
# Run it from a clone with the package installed (pip install -e ".[dev]"), from any folder:
#   bash benchmarks/gpu_check.sh
# Without a CUDA device it runs nothing and exits with status 2. Exit status 1: a stage failed or ran out of time.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
SUMMARY_S=30   # kept back for the summary of the training run
KILL_S=5       # a stage that ignores SIGTERM at its limit is killed this much later
BENCH=results/bench
REFERENCE=results/train/margin-lambda0.02

if ! cuda=$(timeout 120 python -c "import torch; print(torch.__version__, torch.cuda.is_available())"); then
    echo "gpu_check: python cannot import torch (above); install the package first: pip install -e \".[dev]\"" >&2
    exit 2
fi
if [[ $cuda != *" True" ]]; then
    echo "gpu_check: no CUDA device (torch ${cuda% *} reports torch.cuda.is_available() = False); nothing was run." >&2
    echo "gpu_check: run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch." >&2
    exit 2
fi
if ! command -v prob-attention >/dev/null; then
    echo "gpu_check: the prob-attention command is missing; install the package first: pip install -e \".[dev]\"" >&2
    exit 2
fi

mkdir -p "$BENCH"
exec > >(tee "$BENCH/gpu_check-cuda.log") 2>&1
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
failed=()
last_status=0
last_seconds=0

# stage NAME CAP_S CMD...: run CMD for at most CAP_S seconds and at most what the budget leaves (less the summary's
# share); sets last_status (124: stopped at its limit) and last_seconds.
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - SECONDS - SUMMARY_S - KILL_S))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        echo "=== $name: skipped, ${left} s of the budget left"
        failed+=("$name (no time left)")
        last_status=124 last_seconds=0
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout -k "$KILL_S" "$limit" "$@"
    last_status=$? last_seconds=$((SECONDS - start))
    echo "=== $name: exit status $last_status after ${last_seconds} s"
    if ((last_status != 0)); then
        failed+=("$name (exit status $last_status)")
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "torch $cuda; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); budget ${BUDGET_S} s"

stage "gpu tests" 120 python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py
stage "train-step benchmark" 90 python -m benchmarks.train_step --device cuda --out "$BENCH/train_step-cuda.json"
stage "barrier benchmark" 60 python -m benchmarks.barrier --device cuda --dims 256 --lengths 512 --ranks 64 \
    --methods sylvester full --batch 16 --budget 2 --max-mem-gb 40 --out "$BENCH/barrier-target-cuda.json"
train=(prob-attention train --lambda-m 0.02 --device cuda --no-progress)
stage "20-epoch default run" "$BUDGET_S" "${train[@]}" --run-dir "$scratch/run"
SUMMARY_S=0
stage "training summary" 25 python -m benchmarks.full_run --run-dir "$scratch/run" \
    --command "${train[*]} --run-dir <scratch folder>" --exit-status "$last_status" --wall-seconds "$last_seconds" \
    --reference "$REFERENCE" --out "$BENCH/train-default-cuda.json"

echo "=== gpu_check finished after ${SECONDS} s"
if ((${#failed[@]})); then
    printf 'gpu_check: not passed: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: every stage passed; results in $BENCH/*-cuda.json"
