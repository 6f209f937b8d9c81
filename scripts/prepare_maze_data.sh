#!/usr/bin/env bash
# Generate the maze train/test sets (deterministic from SEED) as JSONL for OpenRLHF.
#
#   scripts/prepare_maze_data.sh                 # -> data/maze/{train,test}.jsonl
#   OUT_DIR=/mnt/shared/data/maze scripts/prepare_maze_data.sh
#
# Environment (defaults = the paper's split: 10,000 mazes per train size 9-15, 100 per test size 7-21):
#   OUT_DIR=data/maze  SIZES=9,11,13,15  TEST_SIZES=7,9,11,13,15,17,19,21  N_TRAIN=10000  N_TEST=100  SEED=0
#   FORCE=1   regenerate even if the set on disk was made with the same parameters
#   DRY_RUN=1 print the command and exit
#   PRINT_STAMP=1 print the .done stamp these parameters give, and exit (scripts/render_k8s.py uses it)
#
# $OUT_DIR/.done is written LAST and holds the parameters: a set is reused only when .done matches the
# current parameters (otherwise it is regenerated, stale or half-written), and readers such as the
# RayJob's wait-for-inputs container wait until .done holds exactly these parameters, not for the data
# files or any .done, so they never read a partial set or one left by an earlier parameter set.
# The files are generated in $OUT_DIR/.partial and moved into place, so a reader never sees half a file.
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

stamp="sizes=$SIZES test_sizes=$TEST_SIZES n_train=$N_TRAIN n_test=$N_TEST seed=$SEED format=1"
if [[ ${PRINT_STAMP:-0} == 1 ]]; then
    echo "$stamp"
    exit 0
fi
if [[ ${FORCE:-0} != 1 && -f $OUT_DIR/.done && $(<"$OUT_DIR/.done") == "$stamp" ]]; then
    echo "data in $OUT_DIR already made with these parameters ($stamp); set FORCE=1 to regenerate"
    exit 0
fi
if [[ -f $OUT_DIR/.done ]]; then
    echo "regenerating $OUT_DIR: made with '$(<"$OUT_DIR/.done")', asked for '$stamp'"
fi

partial=$OUT_DIR/.partial
if [[ ${DRY_RUN:-0} != 1 ]]; then
    command -v "$PASSK_CLI" >/dev/null || die "'$PASSK_CLI' not found: pip install -e . (or set PASSK_CLI)"
    rm -f "$OUT_DIR/.done"
    rm -rf "$partial"
    mkdir -p "$partial"
fi
cmd=("$PASSK_CLI" maze generate --sizes "$SIZES" --test-sizes "$TEST_SIZES" --train "$N_TRAIN" --test "$N_TEST"
    --seed "$SEED" --out "$partial")
# A progress bar only helps on a terminal; in Job logs it is noise.
[[ -t 2 ]] || cmd+=(--no-progress)
run_or_print "${cmd[@]}"
if [[ ${DRY_RUN:-0} != 1 ]]; then
    for name in train.jsonl test.jsonl; do
        [[ -f $partial/$name ]] || die "the generator wrote no $name into $partial"
        mv -f "$partial/$name" "$OUT_DIR/$name"
    done
    rmdir "$partial"
    echo "$stamp" >"$OUT_DIR/.done.tmp" && mv -f "$OUT_DIR/.done.tmp" "$OUT_DIR/.done"
    echo "wrote $(wc -l <"$OUT_DIR/train.jsonl") train and $(wc -l <"$OUT_DIR/test.jsonl") test rows to $OUT_DIR"
fi
