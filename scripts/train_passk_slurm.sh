#!/usr/bin/env bash
# Pass@k (or GRPO) maze training on a Slurm allocation: one Ray node per Slurm node, then the SAME recipe
# command as train_passk_maze.sh, with NUM_NODES and GPUS_PER_NODE taken from the allocation.
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64 --exclusive \
#       --time=48:00:00 scripts/train_passk_slurm.sh
#   RECIPE=grpo sbatch ... scripts/train_passk_slurm.sh      # the GRPO baseline
#   DRY_RUN=1 SLURM_JOB_NODELIST=gpu[1-2] ... scripts/train_passk_slurm.sh   # print the commands only
#
# Runs in the batch step on the first node of the allocation: `ray start --head` there, `ray start
# --address` on every other node (each an `srun` step that blocks), a wait until Ray sees all GPUs,
# then the recipe, whose OpenRLHF driver joins this cluster through RAY_ADDRESS. Needs the same Python
# environment (OpenRLHF 0.11.2, this package) and a shared file system for DATA_DIR and OUTPUT_ROOT on
# every node. All recipe variables of scripts/lib/maze_recipe.sh apply; plus:
#   RECIPE=passk|grpo  RAY_PORT=6379  RAY_WAIT_S=600 (give up if Ray does not see every GPU by then)
#   RAY_TMPDIR=/tmp/ray-$SLURM_JOB_ID  (node-local: Ray's sockets do not work on NFS)
# Secrets (WANDB_API_KEY, OPENRLHF_PASSK_REWARD_TOKEN) are inherited from the environment of sbatch.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/common.sh
source "$here/lib/common.sh"

RECIPE=${RECIPE:-passk}
case $RECIPE in
passk) train=$here/train_passk_maze.sh ;;
grpo) train=$here/train_grpo_maze.sh ;;
*) die "RECIPE must be passk or grpo, got '$RECIPE'" ;;
esac
[[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set: submit this script with sbatch (or set it for DRY_RUN=1)"
PYTHON=${PYTHON:-python3}
RAY_PORT=${RAY_PORT:-6379}
RAY_WAIT_S=${RAY_WAIT_S:-600}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RAY_TMPDIR=${RAY_TMPDIR:-/tmp/ray-${SLURM_JOB_ID:-0}}
need_int RAY_PORT 1
need_int RAY_WAIT_S 1
need_int GPUS_PER_NODE 1

# Host names of the allocation; scontrol expands "gpu[1-2]". Without Slurm (DRY_RUN only) a plain
# comma list is accepted.
if command -v scontrol >/dev/null; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif [[ ${DRY_RUN:-0} == 1 && $SLURM_JOB_NODELIST =~ ^[A-Za-z0-9.,-]+$ ]]; then
    IFS=, read -r -a nodes <<<"$SLURM_JOB_NODELIST"
else
    die "scontrol not found: run this inside a Slurm allocation"
fi
((${#nodes[@]} >= 1)) || die "SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST' names no node"
head=${nodes[0]}
export NUM_NODES=${#nodes[@]} GPUS_PER_NODE

# The head's address as the other nodes reach it (the first address `hostname -I` reports).
if [[ ${DRY_RUN:-0} == 1 ]]; then
    head_ip=$head
else
    head_ip=$(srun --nodes=1 --ntasks=1 --overlap -w "$head" hostname -I | awk '{print $1}')
    [[ -n $head_ip ]] || die "could not read the IP address of $head"
fi
export RAY_ADDRESS=$head_ip:$RAY_PORT

# Validate the recipe before any node is touched: a bad value fails here, not after Ray has started.
DRY_RUN=1 bash "$train" >/dev/null

ray_start=(ray start --block --num-gpus "$GPUS_PER_NODE" --temp-dir "$RAY_TMPDIR" --disable-usage-stats)
if [[ ${DRY_RUN:-0} != 1 ]]; then
    command -v ray >/dev/null || die "the 'ray' CLI is not installed: pip install 'openrlhf[vllm]==0.11.2'"
    # Ray nodes run as background srun steps; they end with the allocation (or on exit of this script).
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
fi
launch() { # launch NODE ARGS...: one blocking `ray start` on NODE as its own srun step
    local node=$1
    shift
    print_cmd srun --nodes=1 --ntasks=1 --overlap -w "$node" "$@"
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        srun --nodes=1 --ntasks=1 --overlap -w "$node" "$@" &
    fi
}
launch "$head" "${ray_start[@]}" --head --node-ip-address "$head_ip" --port "$RAY_PORT" --dashboard-host 127.0.0.1
[[ ${DRY_RUN:-0} == 1 ]] || sleep 10
for node in "${nodes[@]:1}"; do
    launch "$node" "${ray_start[@]}" --address "$RAY_ADDRESS"
done

# OpenRLHF waits on its placement group without a timeout: start only once every GPU has joined.
want=$((NUM_NODES * GPUS_PER_NODE))
if [[ ${DRY_RUN:-0} != 1 ]]; then
    deadline=$((SECONDS + RAY_WAIT_S))
    while :; do
        have=$("$PYTHON" -c 'import ray; ray.init(logging_level="ERROR"); print(int(ray.cluster_resources().get("GPU", 0)))' 2>/dev/null || echo 0)
        ((have >= want)) && break
        ((SECONDS < deadline)) || die "Ray sees $have of $want GPUs after ${RAY_WAIT_S}s: check the srun steps' output"
        echo "waiting for Ray: $have of $want GPUs"
        sleep 10
    done
fi

CHECK_GPUS=0 bash "$train"
