#!/usr/bin/env bash
# Pass@k evaluation on the maze test set: sample N responses per maze from a trained model (vLLM on a
# GPU, else HF transformers) or re-score a samples file, then write passk.json/.csv/.png.
#
#   scripts/eval_passk.sh runs/passk-maze/model                 # a model directory (or hub id)
#   scripts/eval_passk.sh runs/passk-maze/eval/samples.jsonl    # re-score saved samples
#   scripts/eval_passk.sh compare runs/passk-maze/eval/passk.json runs/grpo-maze/eval/passk.json
#   DRY_RUN=1 scripts/eval_passk.sh runs/passk-maze/model       # print the command only
#
# Environment: DATA=data/maze/test.jsonl  N=32  K="1 8 32" (default: 1, 2, 4, ... up to n)  MAX_NEW_TOKENS=4096  TEMPERATURE=1.0
#   MODE=strict (or reference: the public verifier's rules)  BACKEND=auto  CHAT_TEMPLATE=1  SEED=0
#   OUT_DIR=<model dir>/../eval (compare: runs/compare)  NAME=<run name for the legend>
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

PASSK_CLI=${PASSK_CLI:-openrlhf-passk}
[[ $# -ge 1 ]] || die "usage: eval_passk.sh MODEL_DIR | SAMPLES.jsonl | compare A.json B.json ..."
if [[ ${DRY_RUN:-0} != 1 ]]; then
    command -v "$PASSK_CLI" >/dev/null || die "'$PASSK_CLI' not found: pip install -e '.[eval]' (or set PASSK_CLI)"
fi

if [[ $1 == compare ]]; then
    shift
    [[ $# -ge 2 ]] || die "compare needs at least two passk.json files"
    for f in "$@"; do
        need_file compare "$f"
    done
    OUT_DIR=${OUT_DIR:-runs/compare}
    run_or_print "$PASSK_CLI" eval --compare "$@" --out "$OUT_DIR"
    exit 0
fi

target=$1
MODE=${MODE:-strict}
[[ $MODE == strict || $MODE == reference ]] || die "MODE must be strict or reference, got '$MODE'"
# Without K, eval reports k = 1, 2, 4, ... up to each maze's number of samples.
K=${K:-}
read -r -a k_list <<<"$K"
for k in "${k_list[@]}"; do
    [[ $k =~ ^[1-9][0-9]*$ ]] || die "K: every k must be a positive integer, got '$k'"
done

if [[ $target == *.jsonl ]]; then
    need_file SAMPLES "$target"
    OUT_DIR=${OUT_DIR:-$(dirname "$target")}
    cmd=("$PASSK_CLI" eval --samples "$target")
else
    DATA=${DATA:-data/maze/test.jsonl}
    N=${N:-32}
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-4096}
    TEMPERATURE=${TEMPERATURE:-1.0}
    BACKEND=${BACKEND:-auto}
    SEED=${SEED:-0}
    need_file DATA "$DATA"
    need_int N 1
    need_int MAX_NEW_TOKENS 1
    need_int SEED 0
    need_num TEMPERATURE
    [[ $BACKEND =~ ^(auto|vllm|hf)$ ]] || die "BACKEND must be auto, vllm or hf, got '$BACKEND'"
    for k in "${k_list[@]}"; do
        ((k <= N)) || die "K: k=$k is larger than N=$N samples per maze"
    done
    # A hub id is "org/name"; anything else (absolute, relative with ./ or several levels) is a directory.
    if [[ ! -d $target && ! $target =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]]; then
        die "model directory '$target' does not exist (train first, or pass a hub id like org/name)"
    fi
    OUT_DIR=${OUT_DIR:-$(dirname "$target")/eval}
    cmd=("$PASSK_CLI" eval --model "$target" --data "$DATA" --n "$N" --max-new-tokens "$MAX_NEW_TOKENS"
        --temperature "$TEMPERATURE" --backend "$BACKEND" --seed "$SEED")
    if [[ ${CHAT_TEMPLATE:-1} == 1 ]]; then
        cmd+=(--apply-chat-template)
    fi
fi
NAME=${NAME:-$(basename "$(dirname "$target")")}
cmd+=(--mode "$MODE" --name "$NAME" --out "$OUT_DIR")
if ((${#k_list[@]})); then
    cmd+=(--k "${k_list[@]}")
fi
run_or_print "${cmd[@]}"
