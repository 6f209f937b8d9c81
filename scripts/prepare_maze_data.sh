#!/usr/bin/env bash
# Generate the maze train/test sets (deterministic from SEED) as JSONL for OpenRLHF.
#
#   scripts/prepare_maze_data.sh                 # -> data/maze/{train,test}.jsonl
#   OUT_DIR=/mnt/shared/data/maze scripts/prepare_maze_data.sh
#
# Environment (defaults = the paper's split: 10,000 mazes per train size 9-15, 100 per test size 7-21):
#   OUT_DIR=data/maze  SIZES=9,11,13,15  TEST_SIZES=7,9,11,13,15,17,19,21  N_TRAIN=10000  N_TEST=100  SEED=0
#   FORCE=1   regenerate even if both files already exist (otherwise an existing set is kept, so a
#             restarted Kubernetes Job does not rewrite data under a running training job)
#   DRY_RUN=1 print the command and exit
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

OUT_DIR=${OUT_DIR:-data/maze}
SIZES=${SIZES:-9,11,13,15}
TEST_SIZES=${TEST_SIZES:-7,9,11,13,15,17,19,21}
N_TRAIN=${N_TRAIN:-10000}
N_TEST=${N_TEST:-100}
SEED=${SEED:-0}
PASSK_CLI=${PASSK_CLI:-openrlhf-passk}

for name in SIZES TEST_SIZES; do
    [[ ${!name} =~ ^[0-9]+(,[0-9]+)*$ ]] || die "$name must be a comma list of odd maze sizes like 9,11,13, got '${!name}'"
    IFS=, read -r -a size_list <<<"${!name}"
    for size in "${size_list[@]}"; do
        ((10#$size >= 5 && 10#$size % 2 == 1)) || die "$name: every maze size must be odd and >= 5, got $size"
    done
done
need_int N_TRAIN 1
need_int N_TEST 0
need_int SEED 0
[[ -n $OUT_DIR ]] || die "OUT_DIR must not be empty"

if [[ ${FORCE:-0} != 1 && -s $OUT_DIR/train.jsonl && -s $OUT_DIR/test.jsonl ]]; then
    echo "data already present in $OUT_DIR (train.jsonl, test.jsonl); set FORCE=1 to regenerate"
    exit 0
fi

if [[ ${DRY_RUN:-0} != 1 ]]; then
    command -v "$PASSK_CLI" >/dev/null || die "'$PASSK_CLI' not found: pip install -e . (or set PASSK_CLI)"
    mkdir -p "$OUT_DIR"
fi
cmd=("$PASSK_CLI" maze generate --sizes "$SIZES" --test-sizes "$TEST_SIZES" --train "$N_TRAIN" --test "$N_TEST"
    --seed "$SEED" --out "$OUT_DIR")
# A progress bar only helps on a terminal; in Job logs it is noise.
[[ -t 2 ]] || cmd+=(--no-progress)
run_or_print "${cmd[@]}"
if [[ ${DRY_RUN:-0} != 1 ]]; then
    echo "wrote $(wc -l <"$OUT_DIR/train.jsonl") train and $(wc -l <"$OUT_DIR/test.jsonl") test rows to $OUT_DIR"
fi
