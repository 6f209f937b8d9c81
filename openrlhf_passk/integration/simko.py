"""SimKO (Peng et al. 2025) in OpenRLHF: the post-import patches, which run in the Ray workers.

The hooks run `patch_experience_maker` and `patch_ppo_actor` (rows of upstream.TABLE) once those upstream
modules have been imported, in whichever process imports them: the experience maker runs in OpenRLHF's
PPOTrainer Ray actor, the policy forward and the loss in the PPO policy Ray actors. SimKO's flags and their
validation are the driver's (flags.add_simko_arguments, flags.validate_simko).
Every wrapper calls the original unchanged unless `--simko` is on (or the estimator takes the rollout
entropy, see below).

Data flow with `--simko`:
1. Experience time, in the policy Ray actor: `PolicyModelActor.forward` runs the usual actor forward
   and, from the logits already in memory, takes each position's top-K ids, entropy and top-1
   probability (in chunks of positions, see `losses.topk_and_entropy`). It returns them next to the
   log-probs; the `RemoteExperienceMaker` (in the PPOTrainer Ray actor) stores on each Experience
   the ids, the per-response entropy gate (tau-quantile), the entropies and correct = (reward >
   --simko_correct_threshold, 0.5 by default, read before length penalties), and logs the
   over-concentration signals in `experience.info`.
2. Those are dataclass fields added to `Experience` (step fields follow the per-token padding,
   trimming, splitting, shuffling and balancing; `simko_correct` is an episode field). The ids are
   stored token-major and flattened, (B, A * K), because OpenRLHF pads step fields along the last
   dimension and trims them along the first.
3. Training: `ActorPPOTrainer.training_step` puts the batch's ids on the trainer; the actor forward
   gathers the current candidate log-probs from the logits at those ids (no K-fold expansion), and
   the policy loss receives SimKO's surrogate log-probs and scaled advantages (`losses.apply_simko`),
   then runs unchanged (PPO clipping, aggregation, IS corrections as configured).

The same rollout-time capture serves estimators that take the rollout entropy (`passk_adaptive`):
for them the policy forward returns the per-token entropies (only those, unless --simko), and
`make_experience` stores each response's mean token entropy in experience.info["passk/entropy"],
which `experience._registry_step` averages per prompt. SimKO's loss and fields stay off.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from openrlhf_passk import env
from openrlhf_passk.integration import resolve, upstream
from openrlhf_passk.integration.experience import ENTROPY_INFO
from openrlhf_passk.losses import (
    SparseGradGather,
    apply_simko,
    candidate_log_probs,
    entropy_gate,
    topk_and_entropy,
)

# Every upstream symbol SimKO patches, calls or reads is a row of upstream.TABLE.
EXPERIENCE_MODULE = upstream.EXPERIENCE_MODULE
EXPERIENCE_MAKER_MODULE = upstream.EXPERIENCE_MAKER_MODULE
PPO_ACTOR_MODULE = upstream.PPO_ACTOR_MODULE
RING_ATTN_MODULE = upstream.RING_ATTN_MODULE

# New Experience fields -> OpenRLHF tensor role ("step": per token, "episode": per response).
EXPERIENCE_FIELDS = {
    "simko_topk_ids": "step",  # (B, A * K) int32, token-major: old policy's top-K ids at each position
    "simko_gate": "step",  # (B, A) float 0/1: entropy above the response's tau-quantile
    "simko_entropy": "step",  # (B, A) float: old policy's entropy at each position
    "simko_correct": "episode",  # (B,) float 0/1: raw reward > --simko_correct_threshold
}


def _config(args: Any) -> dict[str, float] | None:
    if not getattr(args, "simko", False):
        return None
    return {
        "k": int(args.simko_top_k),
        "tau": float(args.simko_tau),
        "alpha": float(args.simko_alpha),
        "lam": float(args.simko_lambda),
        "correct_threshold": float(getattr(args, "simko_correct_threshold", 0.5)),
    }


# ── Experience fields ──


def ensure_experience_fields() -> None:
    """Add EXPERIENCE_FIELDS to OpenRLHF's Experience dataclass, in place and once per process, so
    every helper that walks `dataclasses.fields(Experience)` (split, batch, pad, trim, move, pin,
    concat, balance) carries them. Defaults are None, which those helpers skip."""
    import importlib

    module = importlib.import_module(EXPERIENCE_MODULE)
    cls = module.Experience
    if all(name in cls.__dataclass_fields__ for name in EXPERIENCE_FIELDS):
        return
    # make_dataclass builds properly registered Field objects from OpenRLHF's own tensor_field.
    template = dataclasses.make_dataclass(
        "SimKOFields",
        [(name, Any, module.tensor_field(role, default=None)) for name, role in EXPERIENCE_FIELDS.items()],
    )
    for f in dataclasses.fields(template):
        cls.__dataclass_fields__[f.name] = f
        setattr(cls, f.name, None)
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        extra = {name: kwargs.pop(name, None) for name in EXPERIENCE_FIELDS}
        original_init(self, *args, **kwargs)
        for name, value in extra.items():
            setattr(self, name, value)

    cls.__init__ = __init__


# ── Per-position tensors: model output layout -> action layout ──


def _to_actions(actor, tensors, sequences, attention_mask, ring_attn_group, num_actions) -> list:
    """Map per-position tensors of the model output ((B, S) padded, or (1, nnz) with packed samples)
    to OpenRLHF's action layout (B, A), the way Actor.forward maps its log-probs."""
    if getattr(actor, "packing_samples", False):
        from openrlhf.models.ring_attn_utils import gather_and_pad_tensor, unpad_and_slice_tensor

        batch, seqlen = sequences.shape
        _, _, _, pad_len, indices = unpad_and_slice_tensor(sequences, attention_mask, ring_attn_group)
        group = ring_attn_group
        tensors = [gather_and_pad_tensor(t, group, pad_len, indices, batch, seqlen) for t in tensors]
    return [t[:, :-1][:, -num_actions:] for t in tensors]


def _candidate_inputs(actor, ids, sequences, attention_mask, ring_attn_group):
    """Labels (next tokens) and candidate ids (..., K) in the model output layout."""
    batch, seqlen = sequences.shape
    num_actions, k = ids.shape[1], ids.shape[2]
    # Action a is predicted at position seqlen - 1 - num_actions + a (Actor.forward's [:, :-1][:, -A:]).
    full = torch.zeros(batch, seqlen, k, dtype=torch.long, device=sequences.device)
    full[:, seqlen - 1 - num_actions : seqlen - 1] = ids
    if not getattr(actor, "packing_samples", False):
        return torch.roll(sequences, shifts=-1, dims=1), full
    from openrlhf.models.ring_attn_utils import unpad_and_slice_tensor

    _, _, labels, _, _ = unpad_and_slice_tensor(sequences, attention_mask, ring_attn_group)
    packed = [unpad_and_slice_tensor(full[..., i], attention_mask, ring_attn_group)[0] for i in range(k)]
    return labels, torch.stack(packed, dim=-1)


def _actor_forward(trainer, original, sequences, action_mask=None, attention_mask=None, **kwargs):
    """Actor.forward for the trainer's policy: the original, plus SimKO's per-token side outputs."""
    state = trainer._simko_state
    if state is None or action_mask is None:
        return original(sequences, action_mask, attention_mask, **kwargs)
    return_output = kwargs.pop("return_output", False)
    log_probs, output = original(sequences, action_mask, attention_mask, return_output=True, **kwargs)
    logits = output["logits"]  # fp32, divided by the temperature, packed when packing_samples
    ring = kwargs.get("ring_attn_group")
    num_actions = action_mask.shape[1]
    if state["mode"] == "rollout":
        if trainer._simko is None:  # entropy only (an estimator that takes it); top-1 is the cheapest k
            _, entropy, _ = topk_and_entropy(logits, 1)
            (state["entropy"],) = _to_actions(trainer.actor, [entropy], sequences, attention_mask, ring, num_actions)
            return (log_probs, output) if return_output else log_probs
        k = trainer._simko["k"]
        if k > logits.shape[-1]:
            raise ValueError(f"--simko_top_k ({k}) exceeds the vocabulary size ({logits.shape[-1]})")
        ids, entropy, top1 = topk_and_entropy(logits, k)
        channels = _to_actions(
            trainer.actor, [*ids.unbind(-1), entropy, top1], sequences, attention_mask, ring, num_actions
        )
        state["topk_ids"] = torch.stack(channels[:k], dim=-1)
        state["entropy"], state["top1_prob"] = channels[k], channels[k + 1]
    else:
        labels, ids = _candidate_inputs(trainer.actor, state["ids"], sequences, attention_mask, ring)
        # K + 1 gathers from the logits in memory: the sampled token's logit (for the logsumexp) and K.
        # Sparse gradient: a dense one would be a second (T, V) buffer at the backward's peak.
        gathered = SparseGradGather.apply(logits, torch.cat([labels.unsqueeze(-1), ids], dim=-1))
        label_logits, *cand_logits = _to_actions(
            trainer.actor, gathered.unbind(-1), sequences, attention_mask, ring, num_actions
        )
        cand_logits = torch.stack(cand_logits, dim=-1)
        state["cand_log_probs"] = candidate_log_probs(cand_logits, label_logits, log_probs)
    return (log_probs, output) if return_output else log_probs


def _loss_forward(trainer, original, log_probs, old_log_probs, advantages, *args, **kwargs):
    """PolicyLoss.forward with SimKO's log-probs and advantages during a SimKO training step."""
    state = trainer._simko_state
    if state is None or state.get("cand_log_probs") is None:
        return original(log_probs, old_log_probs, advantages, *args, **kwargs)
    cfg = trainer._simko
    log_probs, advantages = apply_simko(
        log_probs,
        advantages,
        state["cand_log_probs"],
        state["gate"],
        state["sampled_is_top1"],
        state["correct"],
        alpha=cfg["alpha"],
        lam=cfg["lam"],
    )
    return original(log_probs, old_log_probs, advantages, *args, **kwargs)


# ── Wrappers of upstream methods (each calls the original unchanged unless SimKO is on) ──


def _trainer_init(original, self, *args, **kwargs):
    original(self, *args, **kwargs)
    self._simko = _config(self.args)
    self._passk_entropy = resolve.needs_entropy(self.args) is not None
    self._simko_state = None
    if self._simko is None and not self._passk_entropy:
        return
    # Instance attributes: only this trainer's policy and loss change, not the reference model.
    self.actor.forward = functools.partial(_actor_forward, self, self.actor.forward)
    if self._simko is not None:
        ensure_experience_fields()
        self.actor_loss_fn.forward = functools.partial(_loss_forward, self, self.actor_loss_fn.forward)


def _training_step(original, self, experience, *args, **kwargs):
    if getattr(self, "_simko", None) is None:
        return original(self, experience, *args, **kwargs)
    flat_ids = getattr(experience, "simko_topk_ids", None)
    if flat_ids is None:
        raise RuntimeError(
            "--simko is on but this batch has no SimKO top-K ids: the experience maker (in OpenRLHF's "
            "PPOTrainer Ray actor) ran without the openrlhf-passk patches. Install openrlhf-passk in the Ray "
            f"workers' environment too, and leave {env.DISABLE} unset there."
        )
    k = self._simko["k"]
    batch, num_actions = experience.action_mask.shape
    if flat_ids.shape[1] < num_actions * k:
        raise RuntimeError(
            f"SimKO ids have {flat_ids.shape[1]} entries per response, need {num_actions} x {k}: were they "
            f"made with another --simko_top_k?"
        )
    ids = flat_ids[:, : num_actions * k].long().view(batch, num_actions, k)
    self._simko_state = {
        "mode": "train",
        "ids": ids,
        "gate": experience.simko_gate,
        "sampled_is_top1": experience.sequences[:, -num_actions:] == ids[..., 0],
        "correct": experience.simko_correct,
    }
    try:
        return original(self, experience, *args, **kwargs)
    finally:
        self._simko_state = None


def _policy_actor_forward(original, self, *args, **kwargs):
    trainer = getattr(self, "trainer", None)
    if getattr(trainer, "_simko", None) is None and not getattr(trainer, "_passk_entropy", False):
        return original(self, *args, **kwargs)
    trainer._simko_state = {"mode": "rollout"}
    try:
        action_log_probs = original(self, *args, **kwargs)
        state = trainer._simko_state
    finally:
        trainer._simko_state = None
    out = {"action_log_probs": action_log_probs, "simko_entropy": state["entropy"].to("cpu")}
    if "topk_ids" in state:
        out["simko_topk_ids"] = state["topk_ids"].to("cpu", torch.int32)
        out["simko_top1_prob"] = state["top1_prob"].to("cpu")
    return out


def _maker_init(original, self, *args, **kwargs):
    original(self, *args, **kwargs)
    self._simko = _config(self.strategy.args)
    self._passk_entropy = resolve.needs_entropy(self.strategy.args)
    self._simko_rollout = None
    if self._simko is not None:
        ensure_experience_fields()


def _flatten_results(original, self, refs, duplicate_factor):
    results = original(self, refs, duplicate_factor)
    if results and isinstance(results[0], dict) and "simko_entropy" in results[0]:
        self._simko_rollout = results
        return [r["action_log_probs"] for r in results]
    return results


def _make_experience(original, self, samples_list):
    entropy_for = getattr(self, "_passk_entropy", None)
    if getattr(self, "_simko", None) is None and entropy_for is None:
        return original(self, samples_list)
    self._simko_rollout = None
    experiences = original(self, samples_list)
    rollout, self._simko_rollout = self._simko_rollout, None
    if rollout is None or len(rollout) != len(experiences):
        needs = (
            "--simko needs the old policy's top-K ids"
            if entropy_for is None
            else (f"the {entropy_for!r} advantage estimator needs each response's token entropy")
        )
        raise RuntimeError(
            f"{needs} from the policy's rollout-time forward, but the policy Ray actors returned none: the "
            "openrlhf-passk patches are not active in the Ray workers (is openrlhf-passk installed in the "
            f"workers' environment, and {env.DISABLE} unset there?)"
        )
    for experience, out in zip(experiences, rollout, strict=True):
        if entropy_for is not None:
            mask = experience.action_mask.bool()
            # Mean over the response's tokens; an empty response (no action tokens) gets 0, not NaN.
            entropy = (out["simko_entropy"].float() * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
            experience.info[ENTROPY_INFO] = entropy
    if self._simko is None:
        return experiences
    cfg = self._simko
    for experience, out in zip(experiences, rollout, strict=True):
        mask = experience.action_mask.bool()
        ids, entropy = out["simko_topk_ids"], out["simko_entropy"].float()
        gate = entropy_gate(entropy, mask, cfg["tau"])
        # One reward per response; an HTTP reward server's JSON list arrives as (B, 1), a reward_func's tensor as (B,).
        rewards = experience.rewards.float().reshape(mask.shape[0])
        correct = (rewards > cfg["correct_threshold"]).float()
        experience.simko_topk_ids = ids.reshape(ids.shape[0], -1)
        experience.simko_gate = gate
        experience.simko_entropy = entropy
        experience.simko_correct = correct
        # Over-concentration signals (SimKO paper): one value per response, logged by the trainer.
        tokens = mask.sum(dim=-1).clamp(min=1)
        top1_hit = experience.sequences[:, -mask.shape[1] :] == ids[..., 0].long()
        penalized = gate.bool() & top1_hit & (correct == 0).unsqueeze(-1)
        experience.info["simko_gated_frac"] = gate.sum(dim=-1) / tokens
        experience.info["simko_top1_prob"] = (out["simko_top1_prob"] * mask).sum(dim=-1) / tokens
        experience.info["simko_entropy"] = (entropy * mask).sum(dim=-1) / tokens
        experience.info["simko_penalized_frac"] = (penalized & mask).sum(dim=-1) / tokens
    return experiences


# ── Patches (upstream module name -> function run once the module is imported) ──


def _wrap(cls: type, name: str, wrapper: Callable) -> None:
    """cls.name = wrapper(original, self, ...); idempotent."""
    original = cls.__dict__.get(name, getattr(cls, name))
    if getattr(original, "__openrlhf_passk_simko__", False):
        return

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    patched.__openrlhf_passk_simko__ = True
    setattr(cls, name, patched)


def patch_experience_maker(module: ModuleType) -> None:
    cls = module.RemoteExperienceMaker
    _wrap(cls, "__init__", _maker_init)
    _wrap(cls, "_flatten_results", _flatten_results)
    _wrap(cls, "make_experience", _make_experience)


def patch_ppo_actor(module: ModuleType) -> None:
    _wrap(module.ActorPPOTrainer, "__init__", _trainer_init)
    _wrap(module.ActorPPOTrainer, "training_step", _training_step)
    # PolicyModelActor is a Ray ActorClass; Ray ships the class it wraps (modified_class) to the
    # worker by value, so the wrapped method travels with it.
    _wrap(module.PolicyModelActor.__ray_metadata__.modified_class, "forward", _policy_actor_forward)
