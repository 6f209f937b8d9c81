#!/usr/bin/env bash
# Every GPU check of this repo in one run, for a lent GPU machine with torch + transformers but without
# this package installed: GPU-marked tests, SimKO step time (0.5B and 1.5B shapes) and memory, the reward
# server on a many-core host, and a short `sandbox --device cuda`. Each part has its own time limit, so
# one failure does not hide the others. Results land in $OUT (default runs/gpu). Needs: torch with CUDA,
# transformers, pytest, hypothesis, matplotlib, tqdm, aiohttp, psutil, and for the reward server the
# `server` extra (fastapi, uvicorn, pydantic; carry them as wheels to a machine without network).
#   bash benchmarks/gpu_checks.sh            (from the repo root; `make install` is not needed)
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

part() {  # part NAME SECONDS CMD...: run CMD with a limit, log to $OUT/NAME.txt, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "== $name: exit $?"
    grep -v pynvml "$OUT/$name.txt" | tail -n 25
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
part gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_advantages.py tests/test_losses.py
part simko_step 150 "$PY" benchmarks/simko_step.py --device cuda --preset 0.5b
part simko_step_1.5b 150 "$PY" benchmarks/simko_step.py --device cuda --preset 1.5b
part simko_memory 120 "$PY" benchmarks/simko_memory.py --device cuda --tokens 1024 4096
part reward_server 150 "$PY" benchmarks/reward_server.py --workers 8 --requests 3000 --soak-seconds 10
part sandbox 150 "$PY" -m openrlhf_passk.cli sandbox --device cuda --sizes 5 --holdout layout --train-mazes 28 --test-mazes 6 \
    --sft-steps 100 --sft-batch 32 --sft-lr 3e-3 --rl-steps 2 --prompts-per-step 4 --n-samples 4 --k 2 \
    --eval-n 4 --out "${TMPDIR:-/tmp}/sandbox-gpu"
cp "${TMPDIR:-/tmp}/sandbox-gpu/summary.json" "$OUT/" 2>/dev/null || true
