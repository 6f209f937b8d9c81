"""CPU mode (`OPENRLHF_PASSK_CPU=1`): OpenRLHF 0.11.2's real PPO loop on a machine without CUDA.

Real and unchanged: the CLI, Ray (a local one that OpenRLHF starts; GPUs are only logical resources),
the PPOTrainer, experience maker, actor/ref models and loss, DeepSpeed on its CPU accelerator (gloo),
the reward path (a reward_func file or an HTTP server), checkpoints and our passk patches.
Replaced: vLLM only, by `cpu_engine.CPURolloutActor` (HF generate). Everything else below is a
redirect of one CUDA-only call, listed in `upstream.CPU_REDIRECTS`.

The hooks (contract C2) import this module only when the variable is set, in every process, then call
`activate()` once, run `PATCHES` after the named upstream modules execute, and call `prepare_args(args)`
on the training CLI's parsed arguments.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

ENV = "OPENRLHF_PASSK_CPU"
CPU_VERSIONS = ("0.11.2",)  # the release every redirect below was read on
TAG = "[openrlhf-passk] CPU mode"

# Flags CPU mode cannot honour: (argparse dest, is it set?, why). Checked before Ray starts.
REFUSED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("ds.packing_samples", bool, "packing needs flash-attn varlen kernels (CUDA)"),
    ("train.dynamic_batch_enable", bool, "dynamic batching turns on --ds.packing_samples (flash-attn)"),
    ("ds.ring_attn_size", lambda v: v > 1, "ring attention needs flash-attn (CUDA)"),
    ("ds.tensor_parallel_size", lambda v: v > 1, "DeepSpeed AutoTP is not supported by CPU mode"),
    ("vllm.tensor_parallel_size", lambda v: v > 1, "the CPU rollout engine is a single process"),
    ("ds.load_in_4bit", bool, "bitsandbytes 4-bit needs CUDA"),
    ("ds.use_liger_kernel", bool, "Liger kernels are Triton (GPU)"),
    ("ds.deepcompile", bool, "DeepCompile is not supported on DeepSpeed's CPU accelerator"),
    ("train.enable_ema", bool, "the EMA update moves parameters to 'cuda' (strategy.moving_average)"),
    ("data.max_images_per_prompt", lambda v: bool(v), "the CPU rollout engine does not take images"),
)


# ---- activate: process-wide torch.cuda redirects ----------------------------------------------------
_ACTIVE = False


def activate() -> None:
    """Redirect the torch.cuda calls of upstream.CPU_REDIRECTS (idempotent). CPU-mode processes only."""
    global _ACTIVE
    if _ACTIVE:
        return
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator even where CUDA exists
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda device: None
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: None
    _ACTIVE = True


# ---- PATCHES: run right after the named upstream module executes ---------------------------------------
def _patch_vllm_engine(module: ModuleType) -> None:
    from openrlhf_passk.integration import cpu_engine

    module.create_vllm_engines = cpu_engine.create_cpu_engines


def _patch_samples_generator(module: ModuleType) -> None:
    from openrlhf_passk.integration import cpu_engine

    module.SamplingParams = cpu_engine.SamplingParams


def _patch_deepspeed(module: ModuleType) -> None:
    init_device_mesh = module.init_device_mesh
    get_train_ds_config = module.get_train_ds_config

    @functools.wraps(init_device_mesh)
    def cpu_device_mesh(device_type, *args, **kwargs):
        return init_device_mesh("cpu", *args, **kwargs)

    @functools.wraps(get_train_ds_config)
    def torch_adam_config(*args, **kwargs):
        config = get_train_ds_config(*args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer and optimizer.get("type") == "AdamW" and not kwargs.get("adam_offload"):
            optimizer["params"]["torch_adam"] = True
        return config

    module.init_device_mesh = cpu_device_mesh
    module.get_train_ds_config = torch_adam_config


def _patch_replay_buffer(module: ModuleType) -> None:
    import torch

    init = module.NaiveReplayBuffer.__init__

    @functools.wraps(init)
    def cpu_init(self, *args, **kwargs):
        # upstream formats f"cuda:{torch.cuda.current_device()}": give it an index for that one call
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current
        self.target_device = torch.device("cpu")

    module.NaiveReplayBuffer.__init__ = cpu_init


def _patch_ppo_actor(module: ModuleType) -> None:
    import ray

    from openrlhf_passk.integration import cpu_engine

    def init_cpu_sync_group(self, backend: str) -> None:
        ray.get([engine.init_process_group.remote() for engine in self.vllm_engines])
        self._model_update_group = cpu_engine.RayObjectGroup(self.vllm_engines)

    module.ActorPPOTrainer._init_vllm_sync_group = init_cpu_sync_group


PATCHES: dict[str, list[Callable[[ModuleType], None]]] = {
    "openrlhf.trainer.ray.vllm_engine": [_patch_vllm_engine],
    "openrlhf.trainer.ppo_utils.samples_generator": [_patch_samples_generator],
    "openrlhf.utils.deepspeed.deepspeed": [_patch_deepspeed],
    "openrlhf.trainer.ppo_utils.replay_buffer": [_patch_replay_buffer],
    "openrlhf.trainer.ray.ppo_actor": [_patch_ppo_actor],
}


# ---- prepare_args: after the CLI parsed its flags, before Ray starts ----------------------------------------
def _flag(dest: str) -> str:
    return "--" + dest


def _refuse(message: str) -> None:
    print(f"{TAG}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _warn(message: str) -> None:
    print(f"{TAG}: WARNING: {message}", file=sys.stderr)


def prepare_args(args: Any) -> Any:
    """Refuse flags CPU mode cannot honour (exit 2, flag named), adjust harmless ones with a warning,
    check that the model loads, and make OpenRLHF's own `ray.init()` declare logical GPUs."""
    from openrlhf_passk.integration import upstream

    version = upstream.openrlhf_version()
    if version not in CPU_VERSIONS:
        _refuse(f"CPU mode supports OpenRLHF {', '.join(CPU_VERSIONS)} only (installed: {version}); unset {ENV}.")
    get = functools.partial(getattr, args)
    for dest, is_set, why in REFUSED:
        if hasattr(args, dest) and is_set(get(dest)):
            _refuse(f"{_flag(dest)} cannot run on CPU ({why}). Remove it to run in CPU mode, or unset {ENV}.")

    if (get("vllm.num_engines") or 0) < 1:
        _warn("rollouts need an engine: --vllm.num_engines set to 1 (the CPU stand-in for vLLM)")
        setattr(args, "vllm.num_engines", 1)
    if get("vllm.sync_backend") != "gloo" or get("vllm.sync_with_ray"):
        # no notice for the default (nccl): every GPU command has it, the weights simply travel by Ray
        if get("vllm.sync_backend") not in ("nccl", "gloo") or get("vllm.sync_with_ray"):
            _warn("--vllm.sync_backend/--vllm.sync_with_ray ignored: weights reach the CPU engine through Ray")
        setattr(args, "vllm.sync_backend", "gloo")
        setattr(args, "vllm.sync_with_ray", False)
    attn = get("ds.attn_implementation")
    if attn and ("flash" in attn or "kernels" in attn):
        if attn != "flash_attention_2":  # the default: no need to warn about what the user never chose
            _warn(f"--ds.attn_implementation {attn} needs CUDA: using sdpa")
        setattr(args, "ds.attn_implementation", "sdpa")
    if get("vllm.enable_sleep"):
        _warn("--vllm.enable_sleep ignored: the CPU engine has nothing to release")

    _check_model(get("actor.model_name_or_path"), "--actor.model_name_or_path")
    _declare_logical_gpus(args)
    print(
        f"{TAG}: vLLM is replaced by a CPU stand-in engine (HF generate); DeepSpeed runs on CPU (gloo).",
        file=sys.stderr,
    )
    return args


def _check_model(path: str | None, flag: str) -> None:
    """Fail before Ray starts when the model or its tokenizer does not load (config and tokenizer only)."""
    if not path:
        _refuse(f"{flag} is required")
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(path, trust_remote_code=True)
        AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # any loader error: name the flag and the path, not a Ray traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _refuse(
            f"{flag} {path}: the model or its tokenizer does not load ({first}). "
            "Pass a save_pretrained directory, e.g. one from `openrlhf-passk tiny-model --out DIR`."
        )


def _declare_logical_gpus(args: Any) -> None:
    """Wrap `ray.init` (driver only) so OpenRLHF's call declares as many logical GPUs as its actors ask for."""
    import ray

    groups = ("actor", "ref", "critic", "reward")
    gpus = sum(
        (getattr(args, f"{g}.num_nodes", 1) or 1) * (getattr(args, f"{g}.num_gpus_per_node", 1) or 1) for g in groups
    )
    init = ray.init
    if getattr(init, "__openrlhf_passk_cpu__", False):
        return

    @functools.wraps(init)
    def init_with_logical_gpus(*a, **kwargs):
        if not a and "address" not in kwargs and not os.environ.get("RAY_ADDRESS"):
            kwargs.setdefault("num_gpus", gpus)
            # actors and placement bundles ask for CPUs too; these are logical, the OS shares the cores
            kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, 2 * gpus + 2))
        return init(*a, **kwargs)

    init_with_logical_gpus.__openrlhf_passk_cpu__ = True
    ray.init = init_with_logical_gpus
