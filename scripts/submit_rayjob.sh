#!/usr/bin/env bash
# Submit the maze recipe to an existing Ray cluster with `ray job submit`.
#
#   RAY_ADDRESS=http://<head>:8265 scripts/submit_rayjob.sh passk      # or: grpo
#   NUM_NODES=2 RAY_ADDRESS=... scripts/submit_rayjob.sh passk          # 2 nodes x 8 GPUs
#   DRY_RUN=1 scripts/submit_rayjob.sh passk                            # print the command only
#
# The command is the one the RayJob in k8s/ runs for the same size: same run name (passk-maze-2x8, so
# both resume the same checkpoints), scored by the reward server. DATA_DIR, OUTPUT_ROOT and REWARD_URL
# must be valid on the cluster; the defaults are the k8s/ layout (shared volume at /mnt/shared, Service
# passk-reward) and are not checked here. Same recipe variables as train_passk_maze.sh, plus:
#   RAY_ADDRESS=http://127.0.0.1:8265  SUBMISSION_ID=<RUN_NAME>-<UTC time>  WAIT=0 (1: follow logs)
#   RUNTIME_ENV_JSON='{"env_vars": {...}}' (optional; no secrets: Ray stores and shows it)
# The reward token and WANDB_API_KEY are read from the Ray nodes' environment, never put in the command.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/common.sh
source "$here/lib/common.sh"
# shellcheck source=scripts/lib/maze_recipe.sh
source "$here/lib/maze_recipe.sh"

recipe=${1:-passk}
case $recipe in
passk) ESTIMATOR=${ESTIMATOR:-passk} ;;
grpo)
    [[ ${ESTIMATOR:-group_norm} == group_norm ]] ||
        die "submit_rayjob.sh grpo always uses ESTIMATOR=group_norm; use 'passk' for '$ESTIMATOR'"
    ESTIMATOR=group_norm
    RUN_NAME=${RUN_NAME:-grpo-maze}
    ;;
*) die "usage: submit_rayjob.sh passk|grpo (got '$recipe')" ;;
esac
CHECK_LOCAL_PATHS=0
DATA_DIR=${DATA_DIR:-/mnt/shared/data/maze}
OUTPUT_ROOT=${OUTPUT_ROOT:-/mnt/shared/runs}
REWARD_URL=${REWARD_URL:-http://passk-reward:5000/get_reward}
build_maze_recipe
need_shell_safe "the training command" "${TRAIN_CMD[@]}"

RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
[[ $RAY_ADDRESS =~ ^https?://[^/]+ ]] || die "RAY_ADDRESS must be the dashboard URL like http://<head>:8265, got '$RAY_ADDRESS'"
SUBMISSION_ID=${SUBMISSION_ID:-$RUN_NAME-$(date -u +%Y%m%d-%H%M%S)}
[[ $SUBMISSION_ID =~ ^[A-Za-z0-9._-]+$ ]] || die "SUBMISSION_ID may hold only letters, digits, '.', '_' and '-'"

submit=(ray job submit --address "$RAY_ADDRESS" --submission-id "$SUBMISSION_ID")
if [[ -n ${RUNTIME_ENV_JSON:-} ]]; then
    "${PYTHON}" -c 'import json, sys; json.loads(sys.argv[1])' "$RUNTIME_ENV_JSON" 2>/dev/null ||
        die "RUNTIME_ENV_JSON is not valid JSON: $RUNTIME_ENV_JSON"
    submit+=(--runtime-env-json "$RUNTIME_ENV_JSON")
fi
[[ ${WAIT:-0} == 1 ]] || submit+=(--no-wait)
if [[ ${DRY_RUN:-0} != 1 ]]; then
    command -v ray >/dev/null || die "the 'ray' CLI is not installed here: pip install 'ray[default]==2.55.0'"
fi
run_or_print "${submit[@]}" -- "${TRAIN_CMD[@]}"
if [[ ${DRY_RUN:-0} != 1 && ${WAIT:-0} != 1 ]]; then
    echo "follow:  ray job logs --address $RAY_ADDRESS --follow $SUBMISSION_ID"
    echo "status:  ray job status --address $RAY_ADDRESS $SUBMISSION_ID"
    echo "stop:    ray job stop --address $RAY_ADDRESS $SUBMISSION_ID"
fi
