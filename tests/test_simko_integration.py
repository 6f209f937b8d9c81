"""SimKO through the real OpenRLHF code on CPU: a tiny random Llama in openrlhf.models.actor.Actor, the
real PolicyModelActor.forward / RemoteExperienceMaker.make_experience / ActorPPOTrainer.training_step
(with our patches), the real Experience batching helpers and the real PolicyLoss.

Stand-ins, only for what needs a GPU cluster: Ray's put/get (identity), the Ray actor group (calls the
patched PolicyModelActor.forward in-process), the DeepSpeed strategy (loss.backward + SGD step) and
torch.cuda.current_device ("cpu")."""

from __future__ import annotations

import copy
import importlib.metadata
import random
from types import SimpleNamespace as NS

import pytest
import torch

from openrlhf_passk import losses
from openrlhf_passk.integration import flags, simko

V, PROMPT, K, LR = 48, 4, 3, 0.5
RESPONSE_LENGTHS = (9, 4, 12, 7, 0)  # the last response has no action tokens
REWARDS = (1.0, 0.0, 1.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def up():
    from openrlhf.models.actor import Actor
    from openrlhf.trainer.ppo_utils import experience, experience_maker
    from openrlhf.trainer.ray import ppo_actor

    # The import hook normally applies these; calling them again is a no-op (idempotent).
    simko.patch_experience_maker(experience_maker)
    simko.patch_ppo_actor(ppo_actor)
    return NS(Actor=Actor, exp=experience, maker=experience_maker, ppo_actor=ppo_actor)


OLD = importlib.metadata.version("openrlhf").startswith("0.9.")  # 0.9.x: flat args, no loss_batch_info


def _args(enable: bool, alpha: float = 0.01) -> NS:
    simko_args = dict(simko=enable, simko_top_k=K, simko_tau=0.8, simko_alpha=alpha, simko_lambda=1.1)
    if OLD:
        return NS(
            **simko_args,
            max_epochs=1,
            eps_clip_low_high=(0.2, 0.28),
            dual_clip=None,
            policy_loss_type="ppo",
            enable_vllm_is_correction=False,
            vllm_is_truncated_threshold=None,
            vllm_is_correction_type="tis",
            aux_loss_coef=0.0,
            entropy_loss_coef=None,
            use_kl_loss=False,
            init_kl_coef=0.0,
            kl_estimator="k1",
            use_dynamic_batch=False,
            colocate_all_models=False,
            colocate_actor_ref=False,
            colocate_critic_reward=False,
            async_train=False,
            advantage_estimator="group_norm",
            ring_attn_size=1,
            ds_tensor_parallel_size=1,
            actor_num_nodes=1,
            actor_num_gpus_per_node=2,
            packing_samples=False,
        )
    return NS(
        **simko_args,
        actor=NS(
            eps_clip_low_high=(0.2, 0.28),
            dual_clip=None,
            loss_agg_mode="token-mean",
            policy_loss_type="ppo",
            aux_loss_coef=0.0,
            entropy_coef=None,
            num_nodes=1,
            num_gpus_per_node=2,
        ),
        algo=NS(
            advantage=NS(
                estimator="group_norm",
                is_correction_level="off",
                is_correction_mode="mask",
                is_correction_gating="ratio",
                is_correction_threshold=[0.5, 5.0],
            ),
            kl=NS(use_loss=False, estimator="k1"),
        ),
        train=NS(max_epochs=1, dynamic_batch_enable=False, colocate_all=False, colocate_actor_ref=False,
                 colocate_critic_reward=False, async_enable=False),  # fmt: skip
        ds=NS(packing_samples=False, ring_attn_size=1, tensor_parallel_size=1),
        vllm=NS(sync_backend="nccl"),
    )


def _tiny_actor(up, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    actor = up.Actor(LlamaForCausalLM(config).float())
    actor.packing_samples = False  # set by Actor.__init__ only when it loads from a path
    return actor


def _trainer(up, actor, args, monkeypatch, grads: list | None = None):
    # The real ActorPPOTrainer.__init__ (patched); its replay buffer and barrier need CUDA/torch.distributed.
    monkeypatch.setattr(up.ppo_actor, "NaiveReplayBuffer", lambda *a, **k: None)
    monkeypatch.setattr(up.ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    optim = torch.optim.SGD(actor.parameters(), lr=LR)

    def optimizer_step(opt, model, scheduler, name):
        if grads is not None:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()

    strategy = NS(
        args=args,
        ring_attn_group=None,
        backward=lambda loss, model, opt: loss.backward(),
        optimizer_step=optimizer_step,
        get_grad_norm=lambda model: 0.0,
        is_rank_0=lambda: True,
    )
    trainer = up.ppo_actor.ActorPPOTrainer(
        strategy, actor, ema_model=None, actor_optim=optim, actor_scheduler=NS(get_last_lr=lambda: [LR])
    )
    return trainer, strategy


def _rollout(up, actor):
    """Single-sample Experiences as OpenRLHF's samples generator builds them, responses sampled from the
    actor itself, concatenated (right-padded) as the experience maker does."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for i, (length, reward) in enumerate(zip(RESPONSE_LENGTHS, REWARDS, strict=True)):
        seq = torch.randint(0, V, (PROMPT + i % 2,), generator=g)
        with torch.no_grad():
            for _ in range(length):
                probs = torch.softmax(actor.model(seq[None]).logits[0, -1].float(), -1)
                seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)])
        full_mask = torch.zeros(len(seq), dtype=torch.long)
        full_mask[len(seq) - length :] = 1
        samples.append(
            up.exp.Experience(
                sequences=seq[None],
                attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                action_mask=full_mask[1:][None],
                rewards=torch.tensor([reward]),
                response_length=torch.tensor([length]),
                total_length=torch.tensor([float(len(seq))]),
                prompts=[f"p{i}"],
                labels=[f"s{i}"],
                info={"reward": torch.tensor([reward])},
            )
        )
    return up.exp.Experience.concat_experiences(samples, pad_token_id=0)


def _local_maker(up, actor, trainer, strategy, monkeypatch, maker_strategy=None):
    """The PPOTrainer actor's experience maker with the Ray group replaced by in-process calls of the
    (patched) PolicyModelActor.forward of a policy actor holding `actor` and `trainer`."""
    monkeypatch.setattr(up.maker, "ray", NS(put=lambda x: x, get=lambda x: x))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    worker = NS(actor=actor, trainer=trainer, strategy=strategy)
    forward = up.ppo_actor.PolicyModelActor.__ray_metadata__.modified_class.forward

    def run_batch(method_name, **kwargs):
        assert method_name == "forward"
        n = len(next(iter(kwargs.values())))
        return [[forward(worker, **{key: value[i] for key, value in kwargs.items()}) for i in range(n)]]

    group = NS(async_run_method_batch=run_batch)
    tokenizer = NS(pad_token_id=0)
    return up.maker.RemoteExperienceMaker(
        group, None, None, None, NS(value=0.0), maker_strategy or strategy, tokenizer
    )


def _make_experience(up, actor, trainer, strategy, monkeypatch):
    maker = _local_maker(up, actor, trainer, strategy, monkeypatch)
    (experience,) = maker.make_experience([_rollout(up, actor)])
    return experience


def _per_sample_reference(actor, experience):
    """Independent per-response top-K ids, entropies, gate and log-softmax, from an unpadded forward."""
    refs = []
    for i, label in enumerate(experience.labels):
        n = int(experience.attention_mask[i].sum())
        seq = experience.sequences[i, :n]
        mask = experience.action_mask[i, : n - 1].bool()
        with torch.no_grad():
            logp = torch.log_softmax(actor.model(seq[None]).logits[0, :-1].float(), -1)  # (n - 1, V)
        ent = -(logp.exp() * logp).sum(-1)
        # Gate by brute force: linear-interpolated tau-quantile of this response's action entropies.
        values = sorted(ent[mask].tolist())
        gate = torch.zeros(n - 1)
        if values:
            h = 0.8 * (len(values) - 1)
            lo = int(h)
            q = values[lo] + (h - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])
            gate = ((ent > q) & mask).float()
        refs.append(dict(label=label, n=n, ids=logp.topk(K, -1).indices, ent=ent, gate=gate, mask=mask))
    return refs


def test_experience_time_ids_gate_metrics_and_batching(up, monkeypatch):
    actor = _tiny_actor(up)
    trainer, strategy = _trainer(up, actor, _args(True), monkeypatch)
    experience = _make_experience(up, actor, trainer, strategy, monkeypatch)
    refs = _per_sample_reference(actor, experience)

    assert experience.simko_topk_ids.dtype == torch.int32
    ids = experience.simko_topk_ids.view(len(refs), -1, K)
    assert torch.equal(experience.simko_correct, torch.tensor(REWARDS) > 0.5)
    for i, ref in enumerate(refs):
        m = ref["mask"]
        assert torch.equal(ids[i, : ref["n"] - 1][m].long(), ref["ids"][m])
        torch.testing.assert_close(experience.simko_entropy[i, : ref["n"] - 1][m], ref["ent"][m])
        assert torch.equal(experience.simko_gate[i, : ref["n"] - 1], ref["gate"])
        assert experience.simko_gate[i, ref["n"] - 1 :].sum() == 0
        tokens = max(int(m.sum()), 1)
        gated_frac = experience.info["simko_gated_frac"][i].item()
        assert gated_frac == pytest.approx(ref["gate"].sum().item() / tokens)
    # Over-concentration signals, one value per response; the empty response logs zeros, not NaN.
    for key in ("simko_gated_frac", "simko_top1_prob", "simko_entropy", "simko_penalized_frac"):
        assert experience.info[key].shape == (len(refs),)
        assert torch.isfinite(experience.info[key]).all()
        assert experience.info[key][-1] == 0
    assert 0.1 < experience.info["simko_gated_frac"][:-1].mean() < 0.35  # about the top 20% of tokens
    assert experience.info["simko_top1_prob"][0] > 1.0 / V  # a probability, at least uniform's

    # Carried through the replay buffer's split / trim / shuffle / re-batch and through DP balancing.
    items = up.exp.remove_padding_in_sequences(up.exp.split_experience_batch(copy.deepcopy(experience)))
    random.Random(0).shuffle(items)
    batches = [up.exp.make_experience_batch(items[:2]), up.exp.make_experience_batch(items[2:])]
    # 4 samples: 0.9.x's balancing drops a remainder that does not fill a DP row (upstream behaviour).
    batches += up.exp.balance_experiences([up.exp.make_experience_batch(items[:4])], _args(True))
    by_label = {ref["label"]: ref for ref in refs}
    seen = 0
    for batch in batches:
        num_actions = batch.action_mask.shape[1]
        batch_ids = batch.simko_topk_ids[:, : num_actions * K].view(-1, num_actions, K)
        for j, label in enumerate(batch.labels):
            ref, m = by_label[label], by_label[label]["mask"]
            assert torch.equal(batch_ids[j, : ref["n"] - 1][m].long(), ref["ids"][m])
            assert torch.equal(batch.simko_gate[j, : ref["n"] - 1], ref["gate"])
            assert batch.simko_correct[j] == (REWARDS[int(label[1:])] > 0.5)
            seen += 1
    assert seen == len(refs) + 4


def _train_batch(experience):
    """Advantages +1 on correct, -1 on wrong responses (a GRPO-like sign), on every action token."""
    experience = copy.deepcopy(experience)
    sign = experience.simko_correct * 2 - 1
    experience.advantages = sign.unsqueeze(-1) * experience.action_mask.float()
    return experience


def _step(trainer, experience):
    """One real training_step; 0.11 takes the loss normalisers (one DP rank, token mean of the batch)."""
    if OLD:
        return trainer.training_step(experience, 0.0, 0)
    tokens = experience.action_mask.float().sum().clamp(min=1)
    info = {"dp_size": 1, "batch_num_tokens": tokens, "global_batch_size": torch.tensor(5.0)}
    return trainer.training_step(experience, 0.0, 0, info)


def test_training_step_gradient_matches_pure_simko_loss(up, monkeypatch):
    actor = _tiny_actor(up)
    grads: list = []
    trainer, strategy = _trainer(up, actor, _args(True, alpha=0.2), monkeypatch, grads)
    experience = _train_batch(_make_experience(up, actor, trainer, strategy, monkeypatch))
    refs = _per_sample_reference(actor, experience)
    reference = copy.deepcopy(actor.model)

    status = _step(trainer, experience)

    # Reference: full log_softmax of a padded forward, candidates from the independent top-K ids.
    n_act = experience.action_mask.shape[1]
    pos = (experience.attention_mask.cumsum(-1) - 1).clamp(min=0)
    attention_mask = experience.attention_mask
    logits = reference(experience.sequences, attention_mask=attention_mask, position_ids=pos).logits
    logp = torch.log_softmax(logits.float()[:, :-1], -1)[:, -n_act:]
    ids = torch.zeros(len(refs), n_act, K, dtype=torch.long)
    gate = torch.zeros(len(refs), n_act)
    for i, ref in enumerate(refs):
        ids[i, : ref["n"] - 1] = ref["ids"]
        gate[i, : ref["n"] - 1] = ref["gate"]
    tokens = experience.sequences[:, -n_act:]
    expected = losses.policy_loss(
        logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        experience.action_log_probs,
        experience.advantages,
        experience.action_mask.float(),
        cand_log_probs=logp.gather(-1, ids),
        gate=gate,
        sampled_is_top1=tokens == ids[..., 0],
        correct=torch.tensor(REWARDS) > 0.5,
        alpha=0.2,
        lam=1.1,
    )
    expected.backward()
    assert status["metrics"]["policy_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    (got,) = grads
    for name, param in reference.named_parameters():
        torch.testing.assert_close(got[f"model.{name}"], param.grad, rtol=1e-4, atol=1e-6)


def _topk_mass(model, experience, refs) -> float:
    """Sum over gated tokens of correct responses of the probability of the old top-K candidates."""
    total = 0.0
    for i, ref in enumerate(refs):
        if REWARDS[i] <= 0.5:
            continue
        seq = experience.sequences[i, : ref["n"]]
        with torch.no_grad():
            p = torch.softmax(model(seq[None]).logits[0, :-1].float(), -1)
        total += (p.gather(-1, ref["ids"]).sum(-1) * ref["gate"]).sum().item()
    return total


def test_one_step_simko_raises_topk_mass_more_than_ppo(up, monkeypatch):
    alpha = 0.01  # the default
    actor = _tiny_actor(up)
    plain_actor = copy.deepcopy(actor)
    trainer, strategy = _trainer(up, actor, _args(True, alpha=alpha), monkeypatch)
    experience = _train_batch(_make_experience(up, actor, trainer, strategy, monkeypatch))
    refs = _per_sample_reference(actor, experience)
    assert sum(ref["gate"].sum() for i, ref in enumerate(refs) if REWARDS[i] > 0.5) > 0
    before = _topk_mass(actor.model, experience, refs)

    plain, _ = _trainer(up, plain_actor, _args(False), monkeypatch)
    assert plain._simko is None and "forward" not in vars(plain_actor)  # SimKO off: nothing wrapped
    _step(plain, copy.deepcopy(experience))
    _step(trainer, copy.deepcopy(experience))

    gain_ppo = _topk_mass(plain_actor.model, experience, refs) - before
    gain_simko = _topk_mass(actor.model, experience, refs) - before
    assert gain_simko > gain_ppo, (gain_simko, gain_ppo)


def test_empty_responses_only(up, monkeypatch):
    actor = _tiny_actor(up)
    trainer, strategy = _trainer(up, actor, _args(True), monkeypatch)
    experience = _train_batch(_make_experience(up, actor, trainer, strategy, monkeypatch))
    empty = up.exp.make_experience_batch(
        up.exp.remove_padding_in_sequences(up.exp.split_experience_batch(experience))[-1:]
    )
    assert empty.action_mask.sum() == 0 and empty.simko_gate.sum() == 0
    status = _step(trainer, empty)
    if not OLD:  # 0.9.x takes a plain token mean, 0 / 0 = NaN, with or without SimKO
        assert status["metrics"]["policy_loss"].item() == 0.0


def test_missing_ids_with_simko_on_is_a_clear_error(up, monkeypatch):
    actor = _tiny_actor(up)
    trainer, _ = _trainer(up, actor, _args(True), monkeypatch)
    batch = _rollout(up, actor)
    with pytest.raises(RuntimeError, match="no SimKO top-K ids"):
        _step(trainer, batch)


def test_cli_flags_and_validation():
    import argparse

    parser = argparse.ArgumentParser()
    flags.add_simko_arguments(parser)
    args = parser.parse_args([])
    assert (args.simko, args.simko_top_k, args.simko_tau, args.simko_alpha, args.simko_lambda) == (
        False, 3, 0.8, 0.01, 1.1,
    )  # fmt: skip
    assert args.simko_correct_threshold == 0.5
    flags.validate_simko(args)
    for argv, message in [
        (["--simko", "--simko_tau", "1.0"], "gates no token"),
        (["--simko_tau", "-0.1"], "--simko_tau must be in"),
        (["--simko_top_k", "0"], "--simko_top_k must be >= 1"),
        (["--simko_alpha", "1.5"], "--simko_alpha must be in"),
        (["--simko_lambda", "0"], "--simko_lambda must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            flags.validate_simko(parser.parse_args(argv))
    gspo = parser.parse_args(["--simko"])
    if OLD:
        gspo.policy_loss_type = "gspo"  # 0.9.x: a flat dest
    else:
        gspo.actor = NS(policy_loss_type="gspo")
    with pytest.raises(ValueError, match="policy_loss_type"):
        flags.validate_simko(gspo)


def _cpu_packing(monkeypatch):
    """CPU versions of the flash_attn.bert_padding helpers OpenRLHF packs samples with (the test stubs
    raise instead). Same contracts: unpad to (nnz, ...) with the flat indices, pad back by index."""
    from openrlhf.models import ring_attn_utils

    def unpad_input(hidden, attention_mask):
        seqlens = attention_mask.sum(-1, dtype=torch.int32)
        indices = torch.nonzero(attention_mask.flatten()).flatten()
        cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
        unpadded = hidden.reshape(-1, *hidden.shape[2:])[indices]
        return unpadded, indices, cu_seqlens, int(seqlens.max()), seqlens

    def pad_input(hidden, indices, batch, seqlen):
        out = hidden.new_zeros(batch * seqlen, *hidden.shape[1:])
        out[indices] = hidden
        return out.view(batch, seqlen, *hidden.shape[1:])

    monkeypatch.setattr(ring_attn_utils, "unpad_input", unpad_input)
    monkeypatch.setattr(ring_attn_utils, "pad_input", pad_input)
    monkeypatch.setattr(ring_attn_utils, "index_first_axis", lambda x, indices: x[indices])


def test_packed_samples_ids_and_gradient(up, monkeypatch):
    """--packing_samples: responses are concatenated into one (1, nnz) row with per-sample positions.
    The reference is that packed forward, read at hand-computed offsets."""
    _cpu_packing(monkeypatch)
    actor = _tiny_actor(up)
    grads: list = []
    trainer, strategy = _trainer(up, actor, _args(True, alpha=0.2), monkeypatch, grads)
    actor.packing_samples = True
    experience = _train_batch(_make_experience(up, actor, trainer, strategy, monkeypatch))
    reference = copy.deepcopy(actor.model)

    lengths = experience.attention_mask.sum(-1).tolist()
    packed = torch.cat([experience.sequences[i, :n] for i, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    logits = reference(packed[None], position_ids=positions[None]).logits[0].float()
    logp_packed = torch.log_softmax(logits, -1)
    n_act = experience.action_mask.shape[1]
    logp = torch.zeros(len(lengths), n_act, V)
    offset = 0
    for i, n in enumerate(lengths):
        logp[i, : n - 1] = logp_packed[offset : offset + n - 1]  # action j of response i: row offset + j
        offset += n
    mask = experience.action_mask.bool()
    ids = logp.detach().topk(K, -1).indices
    stored = experience.simko_topk_ids.view(len(lengths), n_act, K).long()
    assert torch.equal(stored[mask], ids[mask])

    status = _step(trainer, experience)
    tokens = experience.sequences[:, -n_act:]
    gate = experience.simko_gate
    expected = losses.policy_loss(
        logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), experience.action_log_probs, experience.advantages,
        mask.float(), cand_log_probs=logp.gather(-1, ids), gate=gate, sampled_is_top1=tokens == ids[..., 0],
        correct=torch.tensor(REWARDS) > 0.5, alpha=0.2, lam=1.1,
    )  # fmt: skip
    expected.backward()
    assert gate[mask].sum() > 0
    assert status["metrics"]["policy_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[0][f"model.{name}"], param.grad, rtol=1e-4, atol=1e-6)


# ── passk_adaptive: the rollout entropy capture without SimKO's loss ──

GA, NA, KA = 4, 3, 2  # prompts, samples per prompt, k


def _adaptive_args(split: float) -> NS:
    """_args(False) plus what split_rollout_samples / compute_advantages_and_returns read, with
    --advantage_estimator passk_adaptive: dynamic batching over 2 DP ranks, so samples are shuffled."""
    import argparse

    from openrlhf_passk.integration import flags

    ours = argparse.ArgumentParser()
    flags.add_arguments(ours)
    args = _args(False)
    vars(args).update(vars(ours.parse_args(["--passk_k", str(KA), "--passk_adaptive_split", str(split)])))
    if OLD:
        vars(args).update(
            advantage_estimator="passk_adaptive", n_samples_per_prompt=NA, micro_rollout_batch_size=2,
            rollout_max_tokens_per_gpu=40, max_new_tokens=16, use_dynamic_batch=True, gamma=1.0, lambd=1.0,
            no_advantage_std_norm=False, reward_clip_range=(-10.0, 10.0), overlong_buffer_len=None,
            overlong_penalty_factor=1.0, stop_properly_penalty_coef=None, max_len=64,
        )  # fmt: skip
        return args
    args.algo.advantage.estimator = "passk_adaptive"
    vars(args.algo.advantage).update(gamma=1.0, lambd=1.0, no_std_norm=False)
    args.algo.kl.init_coef = 0.0
    args.rollout = NS(n_samples_per_prompt=NA, micro_batch_size=2, max_tokens_per_gpu=40, max_new_tokens=16)
    args.train.dynamic_batch_enable = True
    args.reward = NS(clip_range=(-10.0, 10.0), overlong_buffer_len=None, overlong_penalty_factor=1.0,
                     stop_properly_penalty_coef=None)  # fmt: skip
    args.data = NS(max_len=64)
    return args


def _adaptive_rollout(up, rewards: torch.Tensor) -> list:
    """GA * NA single-sample Experiences in prompt order (as the samples generator makes them), each with
    its own random prompt and response; lengths vary so that OpenRLHF's length balancing reorders them."""
    g = torch.Generator().manual_seed(5)
    samples = []
    for i, reward in enumerate(rewards.reshape(-1).tolist()):
        prompt, length = 3 + i % 3, int(torch.randint(2, 12, (1,), generator=g))
        seq = torch.randint(0, V, (prompt + length,), generator=g)
        full_mask = torch.zeros(len(seq), dtype=torch.long)
        full_mask[prompt:] = 1
        samples.append(
            up.exp.Experience(
                sequences=seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                action_mask=full_mask[1:][None], rewards=torch.tensor([reward]),
                response_length=torch.tensor([float(length)]), total_length=torch.tensor([float(len(seq))]),
                prompts=[f"p{i // NA}"], labels=[f"s{i}"], info={"reward": torch.tensor([reward])},
            )
        )  # fmt: skip
    return samples


def test_adaptive_entropies_reach_the_estimator_in_prompt_order(up, monkeypatch):
    """The real make_experience_batch: OpenRLHF's splitter shuffles the samples into micro-batches, the
    patched policy forward captures entropies, compute_advantages_and_returns re-orders them by index."""
    from openrlhf_passk import advantages

    split = 0.5
    args = _adaptive_args(split)
    actor = _tiny_actor(up)
    trainer, strategy = _trainer(up, actor, args, monkeypatch)
    assert trainer._simko is None and trainer._passk_entropy  # capture on, SimKO's loss off
    assert "forward" not in vars(trainer.actor_loss_fn)
    maker = _local_maker(up, actor, trainer, strategy, monkeypatch)
    # Every prompt has 1 of 3 correct: grpo and passk (k=2) advantages differ, so the arm matters.
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    samples = _adaptive_rollout(up, rewards)
    experiences = maker.make_experience_batch(samples)
    order = [i for e in experiences for i in e.index]
    assert sorted(order) == list(range(GA * NA)) and order != sorted(order), "expected shuffled micro-batches"

    # Independent entropies: one unpadded forward per sample, full-vocabulary entropy, mean over its response.
    per_sample = []
    for sample in samples:
        seq, mask = sample.sequences[0], sample.action_mask[0].bool()
        with torch.no_grad():
            logp = torch.log_softmax(actor.model(seq[None]).logits[0, :-1].float(), -1)
        per_sample.append(float(-(logp.exp() * logp).sum(-1)[mask].mean()))
    entropy = torch.tensor(per_sample).view(GA, NA).mean(-1)
    expected = advantages.compute("passk_adaptive", rewards, k=KA, entropy=entropy, split=split)
    # The test can fail: entropies in any other prompt order change the advantages.
    reversed_order = advantages.compute("passk_adaptive", rewards, k=KA, entropy=entropy.flip(0), split=split)
    assert not torch.allclose(expected, reversed_order)

    got = torch.zeros(GA * NA)
    logged = {key: torch.zeros(GA * NA) for key in ("passk/entropy", "passk/adaptive_pass1_frac")}
    for e in experiences:
        for j, idx in enumerate(e.index):
            got[idx] = e.advantages[j][e.action_mask[j].bool()][0]
            for key in logged:
                logged[key][idx] = e.info[key][j]
    torch.testing.assert_close(got, expected.view(-1).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logged["passk/entropy"], torch.tensor(per_sample), atol=1e-4, rtol=0)
    # The top round(4 * 0.5) = 2 prompts by entropy are in the Pass@1 arm; the split point lies between.
    top2 = set(torch.argsort(entropy, descending=True)[:2].tolist())
    assert logged["passk/adaptive_pass1_frac"].view(GA, NA)[:, 0].tolist() == [float(g in top2) for g in range(GA)]
    point = float(experiences[0].info["passk/adaptive_entropy_split"][0])
    assert max(entropy[g] for g in range(GA) if g not in top2) < point < min(entropy[g] for g in top2)


def test_adaptive_without_the_capture_in_the_policy_actors_is_a_clear_error(up, monkeypatch):
    """The experience maker wants entropies but the policy actors run without our patches (here: a
    trainer configured for group_norm, so its forward returns bare log-probs): stop at the first rollout."""
    actor = _tiny_actor(up)
    trainer, strategy = _trainer(up, actor, _args(False), monkeypatch)
    assert not trainer._passk_entropy
    maker_strategy = NS(**{**vars(strategy), "args": _adaptive_args(0.5)})
    maker = _local_maker(up, actor, trainer, strategy, monkeypatch, maker_strategy)
    samples = _adaptive_rollout(up, torch.zeros(GA, NA))
    with pytest.raises(RuntimeError, match="'passk_adaptive' advantage estimator needs each response's token entropy"):
        maker.make_experience_batch(samples)
