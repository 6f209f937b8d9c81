"""Every environment variable of openrlhf-passk, and the one on/off rule. Standard library only, and it
imports nothing of ours: the `.pth` bootstrap, the Ray workers, the reward file and the reward server all
read it.

On/off variables (`env_flag`): "", 0, false, no, off (any case, surrounding spaces ignored) mean off; any
other value means on; unset means the variable's default (off, but for CLUSTER_CHECKS).
"""

from __future__ import annotations

import os

# On/off switches.
DISABLE = "OPENRLHF_PASSK_DISABLE"  # the import hooks patch nothing: upstream OpenRLHF, unchanged
DRY_RUN = "OPENRLHF_PASSK_DRY_RUN"  # the training CLI validates and prints the configuration, starts nothing
CPU = "OPENRLHF_PASSK_CPU"  # OpenRLHF's training loop on CPU (integration/cpu_mode.py)
DEBUG = "OPENRLHF_PASSK_DEBUG"  # `openrlhf-passk` commands show the traceback of an unexpected error
SWITCHES = (DISABLE, DRY_RUN, CPU, DEBUG)

# Values.
CPU_ENGINE = "OPENRLHF_PASSK_CPU_ENGINE"  # CPU mode's rollout engine: vllm | hf
REWARD_TOKEN = "OPENRLHF_PASSK_REWARD_TOKEN"  # the reward server's Bearer token (a secret)
MAZE_MODE = "OPENRLHF_PASSK_MAZE_MODE"  # the maze reward file's scoring mode: strict | reference
MAZE_MAX_GRID = "OPENRLHF_PASSK_MAZE_MAX_GRID"  # the largest label grid the reward file scores
# Internal: set by `serve-reward` for its uvicorn worker processes.
SERVE_CONFIG = "OPENRLHF_PASSK_SERVE_CONFIG"
SERVE_HEADER_TIMEOUT = "OPENRLHF_PASSK_SERVE_HEADER_TIMEOUT"
# vLLM's own variables that we set (CPU mode, the dry run) and forward to the Ray workers.
VLLM_KV_CACHE = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache per vLLM-CPU engine
VLLM_LOGGING_STREAM = "VLLM_LOGGING_STREAM"  # where vLLM logs (stdout by default)
VLLM_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"  # 0: the engine's worker in the engine-core process
# Driver, joining a Ray cluster (integration/cluster.py).
CLUSTER_CHECKS = "OPENRLHF_PASSK_CLUSTER_CHECKS"  # on/off, on when unset: GPU-count and per-node checks
GPU_WAIT_S = "OPENRLHF_PASSK_GPU_WAIT_S"  # seconds a joined cluster may take to show enough GPUs


def env_flag(name: str, default: bool = False) -> bool:
    """Whether the on/off variable `name` is on (see the module's rule); `default` when it is unset."""
    if name not in os.environ:
        return default
    return os.environ[name].strip().lower() not in ("", "0", "false", "no", "off")
