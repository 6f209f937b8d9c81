#!/usr/bin/env bash
# Pass@k (or GRPO) maze training on a Slurm allocation: one Ray node per Slurm node, then the SAME recipe
# command as train_passk_maze.sh, with NUM_NODES and GPUS_PER_NODE taken from the allocation.
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64 --exclusive \
#       --time=48:00:00 scripts/train_passk_slurm.sh
#   RECIPE=grpo sbatch ... scripts/train_passk_slurm.sh      # the GRPO baseline
#   sbatch ... scripts/train_passk_slurm.sh python -m openrlhf.cli.train_ppo_ray --actor.num_nodes 2 ...
#       # with arguments: run that command on the Ray cluster instead of the recipe (your own flags)
#   DRY_RUN=1 SLURM_JOB_NODELIST=gpu1,gpu2 ... scripts/train_passk_slurm.sh  # print the commands only
#     (without Slurm installed, give a plain comma list: only scontrol expands ranges like gpu[1-2])
#
# Runs in the batch step on the first node of the allocation: `ray start --head` there, `ray start
# --address` on every other node (each an `srun` step that blocks), a wait until Ray sees all GPUs,
# then the recipe (or the given command), whose OpenRLHF driver joins this cluster through RAY_ADDRESS.
# If any `ray start` step ends before or during that wait, the script stops at once and names the node.
# Needs the same Python environment (OpenRLHF 0.11.2, this package) and a shared file system for DATA_DIR
# and OUTPUT_ROOT on every node. All recipe variables of scripts/lib/maze_recipe.sh apply; plus:
#   RECIPE=passk|grpo  RAY_PORT=6379  RAY_WAIT_S=600 (give up if Ray does not see every GPU by then)
#   RAY_POLL_S=10 (seconds between checks of the Ray nodes)
#   RAY_TMPDIR=/tmp/ray-$SLURM_JOB_ID  (node-local: Ray's sockets do not work on NFS)
#   RAY_START_ARGS (more `ray start` options for every node), RAY_HEAD_ARGS (for the head only)
#   NUM_NODES, if set, must equal the allocation's node count (the script refuses before touching a node)
# Secrets (WANDB_API_KEY, OPENRLHF_PASSK_REWARD_TOKEN) are inherited from the environment of sbatch.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# sbatch runs a copy of this script from slurmd's spool directory: find the original, next to lib/ and the
# recipes, through the job's Command.
if [[ ! -f $here/lib/common.sh && -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null; then
    original=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    here=$(dirname "${original:-$here}")
fi
if [[ ! -f $here/lib/common.sh ]]; then
    echo "error: scripts/lib/common.sh not found next to this script ($here): submit scripts/train_passk_slurm.sh of a checkout (sbatch keeps its path)" >&2
    exit 2
fi
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

# Host names of the allocation; scontrol expands "gpu[1-2]". Without a working Slurm (DRY_RUN only: no
# scontrol, or one without a cluster configuration) a plain comma list is accepted.
nodes=()
if command -v scontrol >/dev/null && expanded=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null); then
    read -r -d '' -a nodes <<<"$expanded" || true
elif [[ ${DRY_RUN:-0} == 1 && $SLURM_JOB_NODELIST =~ ^[A-Za-z0-9.,-]+$ ]]; then
    IFS=, read -r -a nodes <<<"$SLURM_JOB_NODELIST"
elif [[ ${DRY_RUN:-0} == 1 ]]; then
    die "SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST': without Slurm (scontrol) give a plain comma list like gpu1,gpu2"
elif command -v scontrol >/dev/null; then
    die "scontrol cannot expand SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST': $(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>&1 | tail -n 1)"
else
    die "scontrol not found: run this inside a Slurm allocation"
fi
((${#nodes[@]} >= 1)) || die "SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST' names no node"
head=${nodes[0]}
# A NUM_NODES from the caller that the allocation does not match would train at another size than meant
# (and under another run name, so without its checkpoints): refuse it rather than silently follow Slurm.
if [[ -n ${NUM_NODES:-} && $NUM_NODES != "${#nodes[@]}" ]]; then
    die "NUM_NODES=$NUM_NODES but the allocation has ${#nodes[@]} node(s) ($SLURM_JOB_NODELIST): submit with --nodes=$NUM_NODES, or unset NUM_NODES to use the allocation's count"
fi
export NUM_NODES=${#nodes[@]} GPUS_PER_NODE

# The head's address as the other nodes reach it (the first address `hostname -I` reports).
if [[ ${DRY_RUN:-0} == 1 ]]; then
    head_ip=$head
else
    head_ip=$(srun --nodes=1 --ntasks=1 --overlap -w "$head" hostname -I | awk '{print $1}')
    [[ -n $head_ip ]] || die "could not read the IP address of $head"
fi
export RAY_ADDRESS=$head_ip:$RAY_PORT

# Validate the command before any node is touched: a bad value fails here, not after Ray has started.
# An OpenRLHF training command of one's own goes through the openrlhf-passk dry run (OpenRLHF's parser
# and our checks, nothing started); any other command runs as given.
if (($# == 0)); then
    DRY_RUN=1 bash "$train" >/dev/null
elif [[ " $* " == *" openrlhf.cli.train_ppo_ray "* ]]; then
    OPENRLHF_PASSK_DRY_RUN=1 RAY_ADDRESS='' "$@" >/dev/null || die "the command failed its dry run (above): fix it before Slurm starts Ray"
fi

ray_start=(ray start --block --num-gpus "$GPUS_PER_NODE" --temp-dir "$RAY_TMPDIR" --disable-usage-stats)
read -r -a start_args <<<"${RAY_START_ARGS:-}"
read -r -a head_args <<<"${RAY_HEAD_ARGS:-}"
ray_start+=("${start_args[@]}")
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
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -f "${counted:-}"' EXIT
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
launch "$head" "${ray_start[@]}" --head --node-ip-address "$head_ip" --port "$RAY_PORT" --dashboard-host 127.0.0.1 \
    "${head_args[@]}"
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
    # ray.init retries an address nobody answers at yet (the head still starting) for many minutes: each look
    # is bounded, and runs in the background while the steps are checked every second, so a step that ends
    # is reported at once.
    count='import ray; ray.init(logging_level="ERROR"); r = ray.cluster_resources()
print(int(r.get("GPU", 0)), int(r.get("CPU", 0)))'
    counted=$(mktemp)
    while :; do
        timeout "$((RAY_POLL_S + 60))" "$PYTHON" -c "$count" >"$counted" 2>/dev/null &
        counter=$!
        while kill -0 "$counter" 2>/dev/null; do
            check_steps
            sleep 1
        done
        wait "$counter" || true
        read -r have cpus <"$counted" || true
        have=${have:-0} cpus=${cpus:-0}
        ((have >= want)) && break
        ((SECONDS < deadline)) || die "Ray sees $have of $want GPUs after ${RAY_WAIT_S}s: check the srun steps' output"
        echo "waiting for Ray: $have of $want GPUs"
        sleep "$RAY_POLL_S"
    done
    rm -f "$counted"
    echo "Ray sees $have of $want GPUs ($cpus CPUs) on $NUM_NODES node(s): starting the training"
fi

if (($# > 0)); then
    run_or_print "$@"
else
    CHECK_GPUS=0 bash "$train"
fi
