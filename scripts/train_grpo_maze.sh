#!/usr/bin/env bash
# The GRPO baseline: the same maze recipe as train_passk_maze.sh with OpenRLHF's group_norm
# advantage (Pass@1 objective), for a like-for-like comparison. Same environment variables.
#
#   scripts/train_grpo_maze.sh
#   DRY_RUN=1 scripts/train_grpo_maze.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/common.sh
source "$here/lib/common.sh"
# shellcheck source=scripts/lib/maze_recipe.sh
source "$here/lib/maze_recipe.sh"

[[ ${ESTIMATOR:-group_norm} == group_norm ]] ||
    die "train_grpo_maze.sh always uses ESTIMATOR=group_norm; use train_passk_maze.sh for '$ESTIMATOR'"
ESTIMATOR=group_norm
RUN_NAME=${RUN_NAME:-grpo-maze}  # the recipe appends the cluster size (-NxG)
run_maze_training
