"""Every OpenRLHF symbol this package patches or relies on, in one table (`TABLE`), with the releases it was
read on; the flag spellings of each release (`LAYOUTS`); the version of the OpenRLHF that imports; and the
one accessor of OpenRLHF's args (`arg`, `setting`).

Nothing here imports OpenRLHF or torch (only our stdlib-only `env`): it is plain data, so the import hook can
consult it at interpreter start. When a new OpenRLHF release is supported, re-read each row in that release,
then add a layout entry.
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

from openrlhf_passk import env

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
EXPERIENCE_MAKER_MODULE = "openrlhf.trainer.ppo_utils.experience_maker"
TRAINER_MODULE = "openrlhf.trainer.ppo_trainer"
AGENT_MODULE = "openrlhf.utils.agent"
EXPERIENCE_MODULE = "openrlhf.trainer.ppo_utils.experience"
PPO_ACTOR_MODULE = "openrlhf.trainer.ray.ppo_actor"
RING_ATTN_MODULE = "openrlhf.models.ring_attn_utils"
BOTH = ("0.11.2", "0.9.10")
NEW = ("0.11.2",)

# What we do to an upstream symbol:
#   wrap      replaced by a function that calls the original      } done when its module is imported,
#   rebind    a module global replaced by ours                    } by the patch function `ours`
#   redirect  CPU mode: a CUDA-only call replaced by a CPU one    }
#   mutate    changed in place (a logging filter added), identity kept
#   runtime   changed while a run goes (during the CLI's argument parsing, or per trainer instance)
#   read      only read or called
PATCHING_KINDS = ("wrap", "rebind", "redirect")
IMPORT_TIME_KINDS = (*PATCHING_KINDS, "mutate")  # run by the hooks when the row's module is imported


@dataclass(frozen=True)
class Touch:
    """One upstream symbol we touch. `qualname` is a dotted path from the module (attributes, and the
    fields of a dataclass); `ours` is the function of ours that does it, as "module:function" relative to
    openrlhf_passk.integration; `when` is "always", "cpu" (CPU mode), "cpu:vllm" or "cpu:hf" (CPU mode with
    that rollout engine); `read_on` the OpenRLHF releases the row was checked against."""

    module: str
    qualname: str
    kind: str
    ours: str
    why: str
    when: str = "always"
    read_on: tuple[str, ...] = BOTH


# Every upstream symbol we patch, wrap, rebind, redirect or read: the hooks patch from this table (a patch
# function that is not named here never runs), `openrlhf-passk doctor` checks every row against the installed
# OpenRLHF, and tests check that activating the hooks changes exactly the attributes of the patching rows.
TABLE: tuple[Touch, ...] = (
    # --- the training CLI, in the driver (hooks.py, preflight.py)
    Touch("argparse", "ArgumentParser.parse_args", "runtime", "hooks:_wrap_parse_args",
          "wrapped while the CLI module loads (python -m runs it as __main__, its parser is built under "
          "`if __name__ == '__main__'`); acts only on the parser that defines OpenRLHF's estimator flag: extends "
          "its choices, adds our flags, validates, then puts the original back"),
    Touch(CLI_MODULE, "train", "runtime", "preflight:parse_training_args",
          f"in the __main__ namespace: replaced by the dry run's report ({env.DRY_RUN}), or preceded by "
          "the wait for the reward server's /health (--passk_reward_wait)"),
    Touch("ray", "init", "runtime", "cluster:prepare",
          "driver only: joining a cluster (RAY_ADDRESS) first checks the address answers; our non-secret switches "
          "join the job's runtime_env (upstream's env_vars kept); then the GPU count and every node are checked, and "
          "a lost node or actor is named after Ray's traceback"),
    # --- the estimators (experience.py)
    Touch(EXPERIENCE_MAKER_MODULE, "RemoteExperienceMaker.compute_advantages_and_returns", "wrap",
          "experience:patch_experience_maker",
          "built-in estimators call the original unchanged; ours run the original's group_norm per-token path "
          "with the registry's (G, N) advantages in place of the group_norm step"),
    Touch(EXPERIENCE_MAKER_MODULE, "apply_length_penalties", "rebind", "experience:patch_experience_maker",
          "calls the original, then (only inside one of our estimators' calls) swaps each Experience.rewards "
          "for the registry advantages: the seam between length penalties and the group step"),
    Touch(TRAINER_MODULE, "BasePPOTrainer.train_step", "wrap", "experience:patch_trainer",
          "records its global_step on the experience maker: the k schedule's clock (restored on resume)"),
    Touch(TRAINER_MODULE, "PPOTrainer.__ray_metadata__.modified_class.train_step", "wrap", "experience:patch_trainer",
          "PPOTrainer is a Ray ActorClass: the trainer actor runs the class Ray wrapped at decoration time, "
          "which never sees a patch of BasePPOTrainer"),
    Touch(EXPERIENCE_MAKER_MODULE, "Experience.index", "read", "experience:_registry_step",
          "each sample's position in the rollout batch (experiences are shuffled micro-batches)"),
    Touch(EXPERIENCE_MAKER_MODULE, "Experience.rewards", "read", "experience:_registry_step",
          "the rewards, after length penalties"),
    Touch(EXPERIENCE_MAKER_MODULE, "Experience.info", "read", "experience:_registry_step",
          "per-sample metrics: we add passk/* (logged by the trainer)"),
    # --- the reward (reward.py), in the rollout engines
    Touch(AGENT_MODULE, "SingleTurnAgentExecutor.execute", "wrap", "reward:patch_agent",
          "upstream catches every reward error, logs it at INFO and leaves the reward None: when a reward "
          "source is set and the call failed or gave no reward, we log at ERROR with the source and the cause "
          "and raise RuntimeError"),
    Touch(AGENT_MODULE, "SingleTurnAgentExecutor._fetch_rewards_via_func", "wrap", "reward:patch_agent",
          "records the exception of the user's reward_func, rejects a result that is not a dict with 'rewards'"),
    Touch(AGENT_MODULE, "SingleTurnAgentExecutor._fetch_rewards_via_http", "wrap", "reward:patch_agent",
          "as _fetch_rewards_via_func (upstream's HTTP retries stay: the wrapper sits outside them)"),
    Touch(AGENT_MODULE, "aiohttp", "rebind", "reward:patch_agent",
          f"a copy of aiohttp whose ClientSession adds `Authorization: Bearer ${env.REWARD_TOKEN}` when "
          "the variable is set (the reward POST is upstream's only aiohttp use in this module)"),
    Touch(AGENT_MODULE, "logger", "mutate", "reward:patch_agent",
          "a logging filter (passes every record) keeps the INFO lines of upstream's inner `_post_request`, so "
          "the final error can quote the real cause"),
    Touch(AGENT_MODULE, "SingleTurnAgentExecutor", "read", "reward:patch_agent",
          "its reward_endpoints: the reward sources (a .py file first is used alone, URLs in turn)"),
    # --- SimKO and the rollout-time entropy (simko.py)
    Touch(EXPERIENCE_MAKER_MODULE, "RemoteExperienceMaker.__init__", "wrap", "simko:patch_experience_maker",
          "adds SimKO's Experience fields in the PPOTrainer Ray actor (where the experience maker runs) when "
          "--simko"),
    Touch(EXPERIENCE_MAKER_MODULE, "RemoteExperienceMaker._flatten_results", "wrap", "simko:patch_experience_maker",
          "unpacks the policy actors' dicts (log-probs plus SimKO's / the entropy's per-token outputs)"),
    Touch(EXPERIENCE_MAKER_MODULE, "RemoteExperienceMaker.make_experience", "wrap", "simko:patch_experience_maker",
          "attaches SimKO's ids, gate, entropy, correct and metrics; for estimators with the entropy input, "
          "experience.info['passk/entropy']"),
    Touch(PPO_ACTOR_MODULE, "ActorPPOTrainer.__init__", "wrap", "simko:patch_ppo_actor",
          "with --simko or an estimator taking the entropy: wraps this trainer's actor.forward (and with --simko "
          "actor_loss_fn.forward), as instance attributes, not the classes"),
    Touch(PPO_ACTOR_MODULE, "ActorPPOTrainer.training_step", "wrap", "simko:patch_ppo_actor",
          "hands the batch's SimKO ids / gate / correct to the actor and loss wrappers"),
    Touch(PPO_ACTOR_MODULE, "PolicyModelActor.__ray_metadata__.modified_class.forward", "wrap", "simko:patch_ppo_actor",
          "a Ray ActorClass: Ray ships the wrapped class by value; returns per-token entropies (plus SimKO's "
          "top-K ids and top-1 probs) next to the log-probs"),
    Touch(EXPERIENCE_MODULE, "Experience", "runtime", "simko:ensure_experience_fields",
          "with --simko: SimKO's dataclass fields added in place and __init__ wrapped to accept them"),
    Touch(EXPERIENCE_MODULE, "tensor_field", "read", "simko:ensure_experience_fields",
          "builds the new fields with OpenRLHF's own 'step' / 'episode' roles"),
    Touch("openrlhf.models.actor", "Actor.forward", "runtime", "simko:_trainer_init",
          "wrapped per instance; relies on (action_log_probs, output) with return_output=True, output['logits'] "
          "fp32 and already divided by the temperature"),
    Touch("openrlhf.models.loss", "PolicyLoss.forward", "runtime", "simko:_trainer_init",
          "wrapped per instance with --simko: its log-probs and advantages are replaced by SimKO's"),
    Touch(RING_ATTN_MODULE, "unpad_and_slice_tensor", "read", "simko:_to_actions",
          "maps packed-sample positions (--ds.packing_samples) to padded ones"),
    Touch(RING_ATTN_MODULE, "gather_and_pad_tensor", "read", "simko:_to_actions", "as unpad_and_slice_tensor"),
    # --- CPU mode (cpu_mode.py, only with OPENRLHF_PASSK_CPU=1)
    *(
        Touch("torch.cuda", name, "redirect", "cpu_mode:activate", why, when="cpu", read_on=NEW)
        for name, why in (
            ("current_device", "returns cpu: OpenRLHF moves batches and all_reduce buffers to it"),
            ("set_device", "no-op: DeepspeedStrategy.setup_distributed calls it"),
            ("synchronize", "no-op: torch_dist_barrier_and_cuda_sync, PolicyModelActor.fit, empty_cache"),
            ("current_stream", "returns None: broadcast_to_vllm passes it to the weight broadcast"),
        )
    ),
    Touch("openrlhf.utils.deepspeed.deepspeed", "init_device_mesh", "redirect", "cpu_mode:_patch_deepspeed",
          "setup_distributed builds init_device_mesh('cuda', ...): the same call with 'cpu' (gloo)",
          when="cpu", read_on=NEW),
    Touch("openrlhf.utils.deepspeed.deepspeed", "get_train_ds_config", "redirect", "cpu_mode:_patch_deepspeed",
          "for AdamW DeepSpeed builds FusedAdam (CUDA, a JIT C++ op on CPU): adds torch_adam=True, DeepSpeed then "
          "uses torch.optim.AdamW (--ds.adam_offload keeps DeepSpeedCPUAdam)", when="cpu", read_on=NEW),
    Touch("openrlhf.trainer.ppo_utils.replay_buffer", "NaiveReplayBuffer.__init__", "redirect",
          "cpu_mode:_patch_replay_buffer", "sets target_device = cuda:<index>: cpu instead", when="cpu", read_on=NEW),
    Touch("ray", "init", "runtime", "cpu_mode:_declare_logical_gpus",
          "driver only: train() calls ray.init() without num_gpus, and with no GPU, actors asking num_gpus never "
          "schedule: adds num_gpus (OpenRLHF's own count, vLLM engines included) and logical CPUs",
          when="cpu", read_on=NEW),
    # Rollouts on vLLM-CPU: upstream's create_vllm_engines, RolloutRayActor, WorkerWrap and broadcast_to_vllm run
    # unchanged but for these.
    Touch("openrlhf.utils.distributed_util", "stateless_init_process_group", "redirect",
          "cpu_mode:_patch_distributed_util",
          "always builds a vLLM PyNcclCommunicator (CUDA): vLLM's stateless torch group on gloo instead, with "
          "upstream's broadcast(tensor, src, stream); WorkerWrap imports the name when it is called, so this "
          "reaches the vLLM worker too", when="cpu:vllm", read_on=NEW),
    Touch(PPO_ACTOR_MODULE, "stateless_init_process_group", "redirect", "cpu_mode:_patch_ppo_actor_vllm",
          "the trainer's side of the same group: ppo_actor binds the name by from-import", when="cpu:vllm",
          read_on=NEW),
    Touch("openrlhf.trainer.ray.vllm_worker_wrap", "WorkerWrap.update_weight", "redirect",
          "cpu_mode:_patch_worker_wrap",
          "allocates the buffer on 'cuda', then load_weights: vLLM-CPU has repacked every linear weight into a "
          "oneDNN kernel and left an empty Parameter, so a plain reload fails and an in-place copy would leave "
          "the matmuls on the OLD weights. Ours: buffer on the worker's device, vLLM's layerwise reload per sync "
          "round, then the layers sharing a weight (tied lm_head) repacked", when="cpu:vllm",
          read_on=("0.11.2 (vllm-cpu 0.29.0)",)),
    # The HF-transformers stand-in engine (OPENRLHF_PASSK_CPU_ENGINE=hf, or no vLLM installed).
    Touch("openrlhf.trainer.ray.vllm_engine", "create_vllm_engines", "redirect", "cpu_mode:_patch_vllm_engine_hf",
          "no vLLM: hf_engine.create_hf_engines (same signature), HF-generate Ray actors", when="cpu:hf",
          read_on=NEW),
    Touch("openrlhf.trainer.ppo_utils.samples_generator", "SamplingParams", "redirect",
          "cpu_mode:_patch_samples_generator_hf", "imported from vllm (a stand-in without vLLM): "
          "hf_engine.SamplingParams", when="cpu:hf", read_on=NEW),
    Touch(PPO_ACTOR_MODULE, "ActorPPOTrainer._init_vllm_sync_group", "redirect", "cpu_mode:_patch_ppo_actor_hf",
          "creates a PyNcclCommunicator: hf_engine.RayObjectGroup ships each tensor to the engines through Ray; "
          "upstream's broadcast_to_vllm runs unchanged", when="cpu:hf", read_on=NEW),
    Touch("openrlhf.trainer.ray.vllm_engine", "_load_agent_executor", "read", "hf_engine:HFRolloutEngine",
          "the HF engine builds a user's agent executor as RolloutRayActor does", when="cpu:hf", read_on=NEW),
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


def was_read_on(row: Touch, release: str) -> bool:
    """Whether `row` was checked against OpenRLHF `release` (a `read_on` entry may add a note after the
    release: "0.11.2 (vllm-cpu 0.29.0)")."""
    return any(read.split(" ")[0] == release for read in row.read_on)


def active(row: Touch, cpu_engine: str | None) -> bool:
    """Whether `row` applies in a process in CPU mode with `cpu_engine` ("vllm" | "hf"), or not (None)."""
    if row.when == "always":
        return True
    return cpu_engine is not None and row.when in ("cpu", f"cpu:{cpu_engine}")


def patched_modules(cpu_engine: str | None = None) -> frozenset[str]:
    """Modules whose import runs a patch function (the import hook skips every other `openrlhf.*` import
    without importing torch or our patch code)."""
    rows = (r for r in TABLE if r.kind in IMPORT_TIME_KINDS and active(r, cpu_engine))
    return frozenset(r.module for r in rows if r.module.startswith("openrlhf."))


def resolve(module: Any, qualname: str) -> Any:
    """The object at `qualname` in `module` (AttributeError naming the missing part). A dataclass field without
    a class attribute resolves to its Field."""
    value = module
    for part in qualname.split("."):
        fields = getattr(value, "__dataclass_fields__", None)
        if not hasattr(value, part) and fields and part in fields:
            value = fields[part]
            continue
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class Layout:
    """Flag spellings of one OpenRLHF release: setting -> argparse dest (0.11 groups them with dots); each flag
    is "--" + dest. The settings the integration reads, and nothing else: one table per release."""

    dests: dict[str, str]
    builtin_estimators: tuple[str, ...]
    # (alias, upstream flag): extra spellings we accept. On 0.11 the mission's 0.9-style command
    # (--advantage_estimator, --n_samples_per_prompt, --remote_rm_url) then runs verbatim.
    flag_aliases: tuple[tuple[str, str], ...] = ()

    def flag(self, key: str) -> str:
        return "--" + self.dests[key]

    @property
    def estimator_dest(self) -> str:
        return self.dests["estimator"]

    @property
    def estimator_flag(self) -> str:
        return self.flag("estimator")

    @property
    def n_samples_dest(self) -> str:
        return self.dests["n_samples"]

    @property
    def n_samples_flag(self) -> str:
        return self.flag("n_samples")

    @property
    def reward_dest(self) -> str:
        return self.dests["reward"]

    @property
    def reward_flag(self) -> str:
        return self.flag("reward")

    @property
    def model_dest(self) -> str:
        return self.dests["model"]

    @property
    def model_flag(self) -> str:
        return self.flag("model")


# (0.11.2 dest, 0.9.10 dest) per setting.
_SETTINGS = {
    "estimator": ("algo.advantage.estimator", "advantage_estimator"),
    "n_samples": ("rollout.n_samples_per_prompt", "n_samples_per_prompt"),
    "reward": ("reward.remote_url", "remote_rm_url"),
    "model": ("actor.model_name_or_path", "pretrain"),
    "reward_model": ("reward.model_name_or_path", "reward_pretrain"),
    "critic_model": ("critic.model_name_or_path", "critic_pretrain"),
    "data": ("data.prompt_dataset", "prompt_data"),
    "input_key": ("data.input_key", "input_key"),
    "label_key": ("data.label_key", "label_key"),
    "max_len": ("data.max_len", "max_len"),
    "overlong_buffer_len": ("reward.overlong_buffer_len", "overlong_buffer_len"),
    "overlong_penalty_factor": ("reward.overlong_penalty_factor", "overlong_penalty_factor"),
    "stop_properly_penalty_coef": ("reward.stop_properly_penalty_coef", "stop_properly_penalty_coef"),
    "actor_nodes": ("actor.num_nodes", "actor_num_nodes"),
    "actor_gpus": ("actor.num_gpus_per_node", "actor_num_gpus_per_node"),
    "ref_nodes": ("ref.num_nodes", "ref_num_nodes"),
    "ref_gpus": ("ref.num_gpus_per_node", "ref_num_gpus_per_node"),
    "critic_nodes": ("critic.num_nodes", "critic_num_nodes"),
    "critic_gpus": ("critic.num_gpus_per_node", "critic_num_gpus_per_node"),
    "reward_nodes": ("reward.num_nodes", "reward_num_nodes"),
    "reward_gpus": ("reward.num_gpus_per_node", "reward_num_gpus_per_node"),
    "engines": ("vllm.num_engines", "vllm_num_engines"),
    "tp": ("vllm.tensor_parallel_size", "vllm_tensor_parallel_size"),
    "colocate_all": ("train.colocate_all", "colocate_all_models"),
    "colocate_actor_ref": ("train.colocate_actor_ref", "colocate_actor_ref"),
    "colocate_critic_reward": ("train.colocate_critic_reward", "colocate_critic_reward"),
    "async": ("train.async_enable", "async_train"),
    "kl": ("algo.kl.init_coef", "init_kl_coef"),
    "rollout_batch": ("rollout.batch_size", "rollout_batch_size"),
    "train_batch": ("train.batch_size", "train_batch_size"),
    "epochs": ("train.max_epochs", "max_epochs"),
    "policy_loss_type": ("actor.policy_loss_type", "policy_loss_type"),
    # named in our messages only (how to resume a run that lost a node)
    "ckpt_load": ("ckpt.load_enable", "load_checkpoint"),
    "save_steps": ("ckpt.save_steps", "save_steps"),
}

LAYOUTS: dict[str, Layout] = {
    "0.11.2": Layout(
        dests={key: new for key, (new, _) in _SETTINGS.items()},
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
        dests={key: old for key, (_, old) in _SETTINGS.items()},
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
        f"it off PYTHONPATH. {env.DISABLE}=1 runs OpenRLHF without the extension"
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
            f"or set {env.DISABLE}=1 to run OpenRLHF without the passk extension"
        )
    return LAYOUTS[version]


def arg(args: Any, dest: str) -> Any:
    """Read an argparse dest from a flat Namespace ("algo.advantage.estimator" as one name) or from
    OpenRLHF 0.11's hierarchized args (args.algo.advantage.estimator). The one way we read OpenRLHF's args."""
    if hasattr(args, dest):
        return getattr(args, dest)
    value = args
    for part in dest.split("."):
        value = getattr(value, part)
    return value


def setting(args: Any, key: str, layout: Layout | None = None) -> Any:
    """A setting of `_SETTINGS` under the release's spelling; None when the args do not have it."""
    layout = layout or globals()["layout"]()
    try:
        return arg(args, layout.dests[key])
    except AttributeError:
        return None
