#!/usr/bin/env bash
# Pass@k (or GRPO) maze training on a Slurm allocation: one Ray node per Slurm node, then the SAME recipe
# command as train_passk_maze.sh, with NUM_NODES and GPUS_PER_NODE taken from the allocation.
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64 --exclusive \
#       --time=48:00:00 scripts/train_passk_slurm.sh
#   RECIPE=grpo sbatch ... scripts/train_passk_slurm.sh      # the GRPO baseline
#   DRY_RUN=1 SLURM_JOB_NODELIST=gpu1,gpu2 ... scripts/train_passk_slurm.sh  # print the commands only
#     (without Slurm installed, give a plain comma list: only scontrol expands ranges like gpu[1-2])
#
# Runs in the batch step on the first node of the allocation: `ray start --head` there, `ray start
# --address` on every other node (each an `srun` step that blocks), a wait until Ray sees all GPUs,
# then the recipe, whose OpenRLHF driver joins this cluster through RAY_ADDRESS. If any `ray start` step
# ends before or during that wait, the script stops at once and names the node. Needs the same Python
# environment (OpenRLHF 0.11.2, this package) and a shared file system for DATA_DIR and OUTPUT_ROOT on
# every node. All recipe variables of scripts/lib/maze_recipe.sh apply; plus:
#   RECIPE=passk|grpo  RAY_PORT=6379  RAY_WAIT_S=600 (give up if Ray does not see every GPU by then)
#   RAY_POLL_S=10 (seconds between checks of the Ray nodes)
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
RAY_POLL_S=${RAY_POLL_S:-10}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RAY_TMPDIR=${RAY_TMPDIR:-/tmp/ray-${SLURM_JOB_ID:-0}}
need_int RAY_PORT 1
need_int RAY_WAIT_S 1
need_int RAY_POLL_S 1
need_int GPUS_PER_NODE 1

# Host names of the allocation; scontrol expands "gpu[1-2]". Without Slurm (DRY_RUN only) a plain
# comma list is accepted.
if command -v scontrol >/dev/null; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif [[ ${DRY_RUN:-0} == 1 && $SLURM_JOB_NODELIST =~ ^[A-Za-z0-9.,-]+$ ]]; then
    IFS=, read -r -a nodes <<<"$SLURM_JOB_NODELIST"
elif [[ ${DRY_RUN:-0} == 1 ]]; then
    die "SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST': without Slurm (scontrol) give a plain comma list like gpu1,gpu2"
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
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without SRUN_CPUS_PER_TASK each
# `ray start` step would be confined to one CPU. Ray gets the count explicitly too, as in Ray's Slurm example.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    need_int SLURM_CPUS_PER_TASK 1
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    ray_start+=(--num-cpus "$SLURM_CPUS_PER_TASK")
fi
if [[ ${DRY_RUN:-0} != 1 ]]; then
    command -v ray >/dev/null || die "the 'ray' CLI is not installed: pip install 'openrlhf[vllm]==0.11.2'"
    # Ray nodes run as background srun steps; they end with the allocation (or on exit of this script).
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
fi
declare -A step_node=() # pid of each background srun step -> its node
launch() { # launch NODE ARGS...: one blocking `ray start` on NODE as its own srun step
    local node=$1
    shift
    print_cmd srun --nodes=1 --ntasks=1 --overlap -w "$node" "$@"
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        srun --nodes=1 --ntasks=1 --overlap -w "$node" "$@" &
        step_node[$!]=$node
    fi
}
# A `ray start --block` step that ended (bad node, port taken, Ray crashed) never comes back: fail now,
# naming the node, instead of after RAY_WAIT_S or, worse, with a recipe that waits for its GPUs forever.
check_steps() {
    local running pid dead=()
    running=$(jobs -rp)
    for pid in "${!step_node[@]}"; do
        grep -qx "$pid" <<<"$running" || dead+=("${step_node[$pid]}")
    done
    ((${#dead[@]} == 0)) ||
        die "$((${#step_node[@]} - ${#dead[@]})) of ${#step_node[@]} Ray steps running; ended on: ${dead[*]} (see their srun output above)"
}
launch "$head" "${ray_start[@]}" --head --node-ip-address "$head_ip" --port "$RAY_PORT" --dashboard-host 127.0.0.1
if [[ ${DRY_RUN:-0} != 1 ]]; then
    sleep "$RAY_POLL_S"
    check_steps
fi
for node in "${nodes[@]:1}"; do
    launch "$node" "${ray_start[@]}" --address "$RAY_ADDRESS"
done

# OpenRLHF waits on its placement group without a timeout: start only once every GPU has joined.
want=$((NUM_NODES * GPUS_PER_NODE))
if [[ ${DRY_RUN:-0} != 1 ]]; then
    deadline=$((SECONDS + RAY_WAIT_S))
    while :; do
        check_steps
        have=$("$PYTHON" -c 'import ray; ray.init(logging_level="ERROR"); print(int(ray.cluster_resources().get("GPU", 0)))' 2>/dev/null || echo 0)
        ((have >= want)) && break
        ((SECONDS < deadline)) || die "Ray sees $have of $want GPUs after ${RAY_WAIT_S}s: check the srun steps' output"
        echo "waiting for Ray: $have of $want GPUs"
        sleep "$RAY_POLL_S"
    done
fi

CHECK_GPUS=0 bash "$train"
