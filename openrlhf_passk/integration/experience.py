"""Patches of OpenRLHF's experience maker and trainer (applied by `hooks` when those modules load).

For our estimators, `compute_advantages_and_returns` runs OpenRLHF's own code on its `group_norm`
per-token path (KL shaping, reward clipping, cumulative returns, no final whitening), with one change:
right after the length penalties, each sample's reward is swapped for the registry's advantage of its
(G, N) group. Afterwards the rewards are put back and `group_reward_std` is recomputed from them, so
everything that is not the advantage matches what `group_norm` would produce. Built-in estimators call
the original method untouched.
"""

from __future__ import annotations

import functools
import itertools
import threading
from types import ModuleType

import torch

from openrlhf_passk import advantages, env, metrics
from openrlhf_passk.integration import resolve, upstream

# The estimator call in progress in this thread (set only inside one of our estimators' calls).
_current = threading.local()
# Per-response mean token entropy, written by simko._make_experience for estimators that take `entropy`.
ENTROPY_INFO = "passk/entropy"


def _prompt_entropy(experiences: list, grouped, name: str) -> torch.Tensor:
    """Each prompt's entropy: the mean over its responses of their mean token entropy, (G,)."""
    missing = [i for i, e in enumerate(experiences) if ENTROPY_INFO not in e.info]
    if missing:
        raise RuntimeError(
            f"the {name!r} advantage estimator needs each response's token entropy from the policy's "
            f"rollout-time forward (experience.info[{ENTROPY_INFO!r}]), and {len(missing)} of "
            f"{len(experiences)} micro-batches have none: the openrlhf-passk capture did not run. It runs "
            "in the PPO policy Ray actors and the PPOTrainer Ray actor: install openrlhf-passk in the Ray "
            f"workers' environment and leave {env.DISABLE} unset there. It never falls back to passk."
        )
    return grouped(torch.cat([e.info[ENTROPY_INFO].float() for e in experiences])).mean(-1)


def _registry_step(experiences: list, job: dict) -> None:
    """Registry advantages of the (G, N) rewards, written into each Experience.rewards (see module doc)."""
    n = job["n"]
    exp_len = [len(e.index) for e in experiences]
    # Experiences are shuffled micro-batches; `index` is each sample's position in the rollout batch.
    indices = torch.tensor(list(itertools.chain.from_iterable(e.index for e in experiences)))

    def grouped(flat: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(flat)
        out[indices] = flat
        return out.reshape(-1, n)

    def per_sample(values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return values.reshape(-1)[indices].split(exp_len)

    rewards = grouped(torch.cat([e.rewards for e in experiences]))
    params = dict(job["params"])
    if "entropy" in job["inputs"]:
        params["entropy"] = _prompt_entropy(experiences, grouped, job["estimator"])
    adv = advantages.compute(job["estimator"], rewards, **params)  # validates the inputs first
    logs = advantages.spec(job["estimator"]).logs
    extra_info = {f"passk/{key}": value for key, value in (logs(rewards, adv, **params) if logs else {}).items()}
    correct = (grouped(torch.cat(job["before_penalties"])) >= job["threshold"]).sum(-1, keepdim=True)
    info = {
        "passk/pass@1": (correct / n).double(),
        "passk/zero_adv_frac": (adv == 0).all(-1, keepdim=True).double(),
        **extra_info,
    }
    k = job["params"].get("k")
    if k is not None:
        info["passk/pass@k"] = metrics.pass_at_k(n, correct, k)
        info["passk/k"] = torch.full_like(info["passk/pass@1"], float(k))
    info = {key: per_sample(value.expand(-1, n).float()) for key, value in info.items()}
    stds = per_sample(rewards.std(-1, keepdim=True).repeat(1, n))  # OpenRLHF's group_reward_std, on rewards

    for i, experience in enumerate(experiences):
        job["restore"].append((experience.rewards, stds[i], {key: value[i] for key, value in info.items()}))
    for experience, a in zip(experiences, per_sample(adv), strict=True):
        experience.rewards = a.to(experience.rewards.dtype)


def patch_experience_maker(module: ModuleType) -> None:
    cls = module.RemoteExperienceMaker
    original = cls.compute_advantages_and_returns
    original_penalties = module.apply_length_penalties

    @functools.wraps(original_penalties)
    def apply_length_penalties(experiences, args):
        job = getattr(_current, "job", None)
        if job is not None:
            job["before_penalties"] = [e.rewards.clone() for e in experiences]
        original_penalties(experiences, args)
        if job is not None:
            _registry_step(experiences, job)

    @functools.wraps(original)
    def compute_advantages_and_returns(self, experiences):
        args = self.strategy.args
        layout = upstream.layout()
        resolved = resolve.resolve(args, layout, getattr(self, "_passk_global_step", 0))
        if resolved is None:
            return original(self, experiences)
        # The per-token branch reads self.advantage_estimator: ours take group_norm's (gamma = 1, returns).
        self.advantage_estimator = "group_norm"
        job = {
            **resolved,
            "n": upstream.arg(args, layout.n_samples_dest),
            "threshold": getattr(args, "passk_success_threshold", 1.0),
            "restore": [],
        }
        _current.job = job
        try:
            experiences = original(self, experiences)
        finally:
            _current.job = None
        for experience, (rewards, std, info) in zip(experiences, job["restore"], strict=True):
            experience.rewards = rewards
            experience.info["group_reward_std"] = std
            experience.info.update(info)
        return experiences

    module.apply_length_penalties = apply_length_penalties
    cls.compute_advantages_and_returns = compute_advantages_and_returns


def patch_trainer(module: ModuleType) -> None:
    """Record OpenRLHF's global_step where the experience maker can read it (the k schedule's clock)."""
    cls = module.BasePPOTrainer
    original = cls.train_step

    @functools.wraps(original)
    def train_step(self, rollout_samples, global_step, *args, **kwargs):
        self.experience_maker._passk_global_step = global_step
        return original(self, rollout_samples, global_step, *args, **kwargs)

    cls.train_step = train_step
    # PPOTrainer is a Ray ActorClass: the trainer actor runs the class Ray wrapped at decoration time
    # (shipped by value), which did not see the patch above, so the step clock froze inside Ray.
    actor = getattr(getattr(module, "PPOTrainer", None), "__ray_metadata__", None)
    if actor is not None:
        actor.modified_class.train_step = train_step
