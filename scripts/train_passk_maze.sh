#!/usr/bin/env bash
# Pass@k Training on the maze task, one node of 8 GPUs (OpenRLHF 0.11.2 + openrlhf-passk).
#
#   scripts/prepare_maze_data.sh && scripts/train_passk_maze.sh
#   PASSK_K=4 N_SAMPLES=16 MODEL=/models/qwen2.5-7b scripts/train_passk_maze.sh
#   DRY_RUN=1 scripts/train_passk_maze.sh           # print the command only
#
# Paper defaults: N_SAMPLES=32 PASSK_K=8 LR=1e-6 CLIP_LOW=0.2 CLIP_HIGH=0.28, no KL.
# ESTIMATOR=passk (analytic); passk_full, passk_bootstrap, pkpo, ... also work. All variables are
# listed in scripts/lib/maze_recipe.sh. RUN_NAME (default passk-maze) always ends in the cluster size
# (passk-maze-1x8); rerunning it at the same size resumes from its last checkpoint.
# On a Ray cluster started by hand: RAY_ADDRESS=<head-ip>:6379 NUM_NODES=2 scripts/train_passk_maze.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/common.sh
source "$here/lib/common.sh"
# shellcheck source=scripts/lib/maze_recipe.sh
source "$here/lib/maze_recipe.sh"

ESTIMATOR=${ESTIMATOR:-passk}
run_maze_training
