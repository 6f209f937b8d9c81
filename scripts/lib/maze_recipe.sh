# shellcheck shell=bash
# The maze Pass@k / GRPO training recipe for OpenRLHF 0.11.2 (sourced by train_*_maze.sh,
# submit_rayjob.sh and, through train_passk_maze.sh, by scripts/render_k8s.py for the RayJob).
# build_maze_recipe validates the environment and fills the array TRAIN_CMD.
#
# Defaults follow Chen et al. 2025 (N = 32 samples per prompt, k = 8, lr 1e-6, clip 0.2 / 0.28,
# no KL) on one node of 8 GPUs. Every value below is an environment variable of the same name.

build_maze_recipe() {
    local repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

    PYTHON=${PYTHON:-python3}
    ESTIMATOR=${ESTIMATOR:-passk}
    NUM_NODES=${NUM_NODES:-1}
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    need_int NUM_NODES 1
    need_int GPUS_PER_NODE 1
    # A ZeRO-3 checkpoint only loads at the world size that wrote it, so the run name (and with it the
    # checkpoint folder) always ends in the cluster size: a rerun at another size starts its own run.
    local size="${NUM_NODES}x${GPUS_PER_NODE}"
    RUN_NAME=${RUN_NAME:-$ESTIMATOR-maze}
    [[ $RUN_NAME == *-"$size" ]] || RUN_NAME+="-$size"
    MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
    DATA_DIR=${DATA_DIR:-data/maze}
    # A .py path runs the reward in-process on the rollout workers; an http(s) URL uses the reward server.
    REWARD_URL=${REWARD_URL:-$repo/openrlhf_passk/rewards/maze.py}
    OUTPUT_ROOT=${OUTPUT_ROOT:-runs}
    CKPT_DIR=${CKPT_DIR:-$OUTPUT_ROOT/$RUN_NAME/ckpt}
    SAVE_DIR=${SAVE_DIR:-$OUTPUT_ROOT/$RUN_NAME/model}
    LOG_DIR=${LOG_DIR:-$OUTPUT_ROOT/$RUN_NAME/tensorboard}

    N_SAMPLES=${N_SAMPLES:-32}
    PASSK_K=${PASSK_K:-8}
    LR=${LR:-1e-6}
    CLIP_LOW=${CLIP_LOW:-0.2}
    CLIP_HIGH=${CLIP_HIGH:-0.28}
    TEMPERATURE=${TEMPERATURE:-1.0}
    ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-64}
    MICRO_ROLLOUT_BATCH_SIZE=${MICRO_ROLLOUT_BATCH_SIZE:-8}
    TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-512}
    MICRO_TRAIN_BATCH_SIZE=${MICRO_TRAIN_BATCH_SIZE:-4}
    NUM_EPISODES=${NUM_EPISODES:-1}
    MAX_LEN=${MAX_LEN:-5120}
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-4096}
    SEED=${SEED:-42}
    VLLM_TP=${VLLM_TP:-1}
    VLLM_GPU_MEM=${VLLM_GPU_MEM:-0.6}
    ZERO_STAGE=${ZERO_STAGE:-3}
    SAVE_STEPS=${SAVE_STEPS:-20}
    CKPT_MAX_NUM=${CKPT_MAX_NUM:-3}
    EVAL_STEPS=${EVAL_STEPS:-20}
    EVAL_N_SAMPLES=${EVAL_N_SAMPLES:-8}
    EVAL_TEMPERATURE=${EVAL_TEMPERATURE:-1.0}
    # Weights & Biases: set WANDB_PROJECT to log there too. The key is read from WANDB_API_KEY by wandb
    # itself; the flag only switches OpenRLHF's logger on (it needs a non-empty value, which OpenRLHF
    # prints with its args, so the flag carries a placeholder, never the key).
    WANDB_PROJECT=${WANDB_PROJECT:-}

    [[ $ESTIMATOR =~ ^[a-z0-9_]+$ ]] || die "ESTIMATOR must be an estimator name like passk or group_norm, got '$ESTIMATOR'"
    [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME may hold only letters, digits, '.', '_' and '-', got '$RUN_NAME'"
    [[ -n $MODEL ]] || die "MODEL must name a Hugging Face model id or a local model directory"
    local name
    for name in N_SAMPLES PASSK_K ROLLOUT_BATCH_SIZE MICRO_ROLLOUT_BATCH_SIZE TRAIN_BATCH_SIZE \
        MICRO_TRAIN_BATCH_SIZE NUM_EPISODES MAX_LEN MAX_NEW_TOKENS NUM_NODES GPUS_PER_NODE VLLM_TP CKPT_MAX_NUM \
        EVAL_N_SAMPLES; do
        need_int "$name" 1
    done
    need_int SEED 0
    need_int ZERO_STAGE 0
    for name in LR CLIP_LOW CLIP_HIGH TEMPERATURE VLLM_GPU_MEM EVAL_TEMPERATURE; do
        need_num "$name"
    done
    # -1 disables periodic checkpoints / evaluation (OpenRLHF's own convention).
    [[ $SAVE_STEPS == -1 ]] || need_int SAVE_STEPS 1
    [[ $EVAL_STEPS == -1 ]] || need_int EVAL_STEPS 1

    ((N_SAMPLES >= 2)) || die "N_SAMPLES must be >= 2: group estimators need several samples per prompt"
    ((PASSK_K <= N_SAMPLES)) || die "PASSK_K ($PASSK_K) must be <= N_SAMPLES ($N_SAMPLES)"
    ((MAX_NEW_TOKENS < MAX_LEN)) || die "MAX_NEW_TOKENS ($MAX_NEW_TOKENS) must be < MAX_LEN ($MAX_LEN), which also holds the prompt"
    local gpus=$((NUM_NODES * GPUS_PER_NODE))
    ((gpus % VLLM_TP == 0)) || die "VLLM_TP ($VLLM_TP) must divide NUM_NODES * GPUS_PER_NODE ($gpus)"
    local samples=$((ROLLOUT_BATCH_SIZE * N_SAMPLES))
    ((samples % TRAIN_BATCH_SIZE == 0)) ||
        die "TRAIN_BATCH_SIZE ($TRAIN_BATCH_SIZE) must divide ROLLOUT_BATCH_SIZE * N_SAMPLES ($samples)"
    ((TRAIN_BATCH_SIZE % (MICRO_TRAIN_BATCH_SIZE * gpus) == 0)) ||
        die "TRAIN_BATCH_SIZE ($TRAIN_BATCH_SIZE) must be a multiple of MICRO_TRAIN_BATCH_SIZE * GPUs ($((MICRO_TRAIN_BATCH_SIZE * gpus)))"

    [[ $REWARD_URL != *token=* ]] ||
        die "REWARD_URL must not carry the token (it would be printed and stored with the job): set OPENRLHF_PASSK_REWARD_TOKEN where the trainer runs instead"
    [[ -z $WANDB_PROJECT || $WANDB_PROJECT =~ ^[A-Za-z0-9._-]+$ ]] ||
        die "WANDB_PROJECT may hold only letters, digits, '.', '_' and '-', got '$WANDB_PROJECT'"
    [[ $REWARD_URL =~ ^https?:// || $REWARD_URL == *.py ]] ||
        die "REWARD_URL must be an http(s):// URL of the reward server or a path to a .py reward file, got '$REWARD_URL'"
    # Paths are checked where they are used; a submission to a remote cluster sets CHECK_LOCAL_PATHS=0
    # because the files live on the cluster's shared volume, not on the submitting machine.
    if [[ ${CHECK_LOCAL_PATHS:-1} == 1 ]]; then
        need_file DATA_DIR "$DATA_DIR/train.jsonl"
        ((EVAL_STEPS == -1)) || need_file DATA_DIR "$DATA_DIR/test.jsonl"
        if [[ ! $REWARD_URL =~ ^https?:// ]]; then
            need_file REWARD_URL "$REWARD_URL"
        fi
    fi

    TRAIN_CMD=(
        "$PYTHON" -m openrlhf.cli.train_ppo_ray
        --actor.model_name_or_path "$MODEL"
        --data.prompt_dataset "$DATA_DIR/train.jsonl"
        --data.input_key prompt
        --data.label_key label
        --data.apply_chat_template
        --reward.remote_url "$REWARD_URL"
        --algo.advantage.estimator "$ESTIMATOR"
    )
    # Only our estimators take k; OpenRLHF's built-in ones (group_norm, ...) reject the flag.
    if [[ $ESTIMATOR == passk* || $ESTIMATOR == pkpo ]]; then
        TRAIN_CMD+=(--passk_k "$PASSK_K")
    fi
    TRAIN_CMD+=(
        --rollout.n_samples_per_prompt "$N_SAMPLES"
        --rollout.batch_size "$ROLLOUT_BATCH_SIZE"
        --rollout.micro_batch_size "$MICRO_ROLLOUT_BATCH_SIZE"
        --rollout.max_new_tokens "$MAX_NEW_TOKENS"
        --rollout.temperature "$TEMPERATURE"
        --data.max_len "$MAX_LEN"
        --train.batch_size "$TRAIN_BATCH_SIZE"
        --train.micro_batch_size "$MICRO_TRAIN_BATCH_SIZE"
        --train.num_episodes "$NUM_EPISODES"
        --train.max_epochs 1
        --train.seed "$SEED"
        --actor.adam.lr "$LR"
        --actor.eps_clip_low_high "$CLIP_LOW" "$CLIP_HIGH"
        --algo.kl.init_coef 0
        --actor.num_nodes "$NUM_NODES"
        --actor.num_gpus_per_node "$GPUS_PER_NODE"
        --vllm.num_engines "$((gpus / VLLM_TP))"
        --vllm.tensor_parallel_size "$VLLM_TP"
        --vllm.gpu_memory_utilization "$VLLM_GPU_MEM"
        --train.colocate_all
        --vllm.enable_sleep
        --ds.enable_sleep
        --ds.zero_stage "$ZERO_STAGE"
        --ds.param_dtype bf16
        --ds.packing_samples
        --actor.gradient_checkpointing_enable
        --ckpt.path "$CKPT_DIR"
        --ckpt.save_steps "$SAVE_STEPS"
        --ckpt.max_num "$CKPT_MAX_NUM"
        --ckpt.load_enable
        --ckpt.output_dir "$SAVE_DIR"
        --logger.tensorboard_dir "$LOG_DIR"
    )
    if ((EVAL_STEPS != -1)); then
        TRAIN_CMD+=(
            --eval.dataset "$DATA_DIR/test.jsonl"
            --eval.steps "$EVAL_STEPS"
            --eval.n_samples_per_prompt "$EVAL_N_SAMPLES"
            --eval.temperature "$EVAL_TEMPERATURE"
        )
    fi
    if [[ -n $WANDB_PROJECT ]]; then
        TRAIN_CMD+=(--logger.wandb.key from-env:WANDB_API_KEY --logger.wandb.project "$WANDB_PROJECT"
            --logger.wandb.run_name "$RUN_NAME")
    fi
    # EXTRA_ARGS: any further OpenRLHF flags, split on whitespace (e.g. "--data.max_samples 1000").
    local extra=()
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    TRAIN_CMD+=("${extra[@]}")
}

# The recipe uses OpenRLHF 0.11's dotted flag names; an older install would fail on the first flag, after
# Ray has started. Checked only where the command runs locally (not for DRY_RUN or remote submission).
require_openrlhf_011() {
    local version
    version=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("openrlhf"))' 2>/dev/null) ||
        die "OpenRLHF is not installed for $PYTHON: pip install 'openrlhf[vllm]==0.11.2' (or use docker/train.Dockerfile)"
    [[ $version == 0.11.* ]] ||
        die "these scripts use OpenRLHF 0.11 flag names, but $PYTHON has openrlhf $version: pip install 'openrlhf[vllm]==0.11.2'"
}

# OpenRLHF places all GPU actors before it starts and waits on the placement group without a timeout, so
# a single machine with fewer GPUs than GPUS_PER_NODE would hang forever: count them first. Runs on a
# Ray cluster (NUM_NODES > 1 or RAY_ADDRESS set) check the cluster instead (train_passk_slurm.sh waits
# for every GPU; KubeRay starts a fixed number of GPU workers).
require_local_gpus() {
    if ((NUM_NODES > 1)) || [[ -n ${RAY_ADDRESS:-} || ${CHECK_GPUS:-1} != 1 ]]; then
        return 0
    fi
    local count
    if command -v nvidia-smi >/dev/null; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    else
        count=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || count=0
    fi
    ((count >= GPUS_PER_NODE)) ||
        die "GPUS_PER_NODE=$GPUS_PER_NODE but this machine shows $count GPU(s): set GPUS_PER_NODE=$count (and a TRAIN_BATCH_SIZE that fits), or CHECK_GPUS=0 to skip this check"
}

# The tail of both train scripts: check the installed OpenRLHF, build the command, then run it (or only
# print it with DRY_RUN=1). Kept here so that passk and grpo runs can never drift apart.
run_maze_training() {
    PYTHON=${PYTHON:-python3}
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        require_openrlhf_011
    fi
    build_maze_recipe
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        require_local_gpus
        if [[ -n $WANDB_PROJECT && -z ${WANDB_API_KEY:-} ]]; then
            die "WANDB_PROJECT is set but WANDB_API_KEY is not: export WANDB_API_KEY (never pass the key as a flag)"
        fi
        mkdir -p "$CKPT_DIR" "$LOG_DIR"
    fi
    run_or_print "${TRAIN_CMD[@]}"
}
