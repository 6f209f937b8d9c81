"""openrlhf_passk.losses: PPO loss parity with OpenRLHF, SimKO values and gradients, gate, top-K helpers."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

from openrlhf_passk.losses import (
    SparseGradGather,
    apply_simko,
    candidate_log_probs,
    entropy_gate,
    policy_loss,
    topk_and_entropy,
)


def _random_batch(seed: int, b: int = 4, t: int = 7, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    log_probs = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    old = log_probs.detach() + 0.4 * torch.randn(b, t, generator=g)  # some ratios land outside the clip band
    adv = torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[0] = 0.0  # one response without action tokens
    mask[1, 0] = 1.0
    cand = (-torch.rand(b, t, k, generator=g) * 3).requires_grad_()
    gate = (torch.rand(b, t, generator=g) > 0.5).float()
    top1 = torch.rand(b, t, generator=g) > 0.5
    correct = torch.tensor([True, False, True, False])[:b]
    return log_probs, old, adv, mask, cand, gate, top1, correct


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_plain_ppo_matches_openrlhf_policy_loss(token_level_loss):
    from openrlhf.models.loss import PolicyLoss

    log_probs, old, adv, mask, *_ = _random_batch(0)
    if not token_level_loss and importlib.metadata.version("openrlhf").startswith("0.9."):
        mask[0, :3] = 1.0  # 0.9.x's per-response mean is NaN for an empty response; ours follows 0.11
    ref = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, token_level_loss=token_level_loss)
    expected = ref(log_probs, old, adv, action_mask=mask)[0]
    (expected_grad,) = torch.autograd.grad(expected, log_probs)
    got = policy_loss(log_probs, old, adv, mask, token_level_loss=token_level_loss)
    (got_grad,) = torch.autograd.grad(got, log_probs)
    assert torch.equal(got, expected)
    assert torch.equal(got_grad, expected_grad)
    if token_level_loss:  # no mask: plain mean, as OpenRLHF's masked_mean(mask=None)
        assert torch.equal(policy_loss(log_probs, old, adv), ref(log_probs, old, adv)[0])


def test_alpha0_lambda1_is_exactly_openrlhf_ppo():
    from openrlhf.models.loss import PolicyLoss

    log_probs, old, adv, mask, cand, gate, top1, correct = _random_batch(1)
    expected = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)(log_probs, old, adv, action_mask=mask)[0]
    exp_lp, exp_cand = torch.autograd.grad(expected, [log_probs, cand], allow_unused=True)
    got = policy_loss(
        log_probs, old, adv, mask, cand_log_probs=cand, gate=gate, sampled_is_top1=top1, correct=correct,
        alpha=0.0, lam=1.0,
    )  # fmt: skip
    got_lp, got_cand = torch.autograd.grad(got, [log_probs, cand])
    assert torch.equal(got, expected)
    assert torch.equal(got_lp, exp_lp)
    assert exp_cand is None and torch.count_nonzero(got_cand) == 0


def _one_token_grad(logits, sampled, old_log_prob, advantage, **simko):
    """Loss and d loss / d logits for a single token of a single response (vocabulary = len(logits))."""
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(z, dim=-1)
    kwargs = {}
    if simko:
        ids = torch.tensor(simko.pop("cand_ids"))
        kwargs = dict(
            cand_log_probs=log_p[ids].view(1, 1, -1),
            gate=torch.ones(1, 1, dtype=torch.float64),
            sampled_is_top1=torch.tensor([[simko.pop("top1")]]),
            correct=torch.tensor([simko.pop("correct")]),
            **simko,
        )
    loss = policy_loss(
        log_p[sampled].view(1, 1),
        torch.tensor([[old_log_prob]], dtype=torch.float64),
        torch.tensor([[advantage]], dtype=torch.float64),
        **kwargs,
    )
    (grad,) = torch.autograd.grad(loss, z)
    return loss.item(), grad.tolist()


def test_simko_hand_derived_one_token_correct_response():
    # p = (0.5, 0.3, 0.2), sampled token 0, candidates {0, 1}, alpha = 0.5, A = +1, gate = 1.
    # d log p_i / dz = e_i - p.  Surrogate gradient (ratio r):
    #   (1 - a)(e_0 - p) + (a / K) [(e_0 - p) + (e_1 - p)]
    #   = 0.5 (0.5, -0.3, -0.2) + 0.25 (0, 0.4, -0.4) = (0.25, -0.05, -0.2)
    # loss = -r A, so d loss / dz = -r (0.25, -0.05, -0.2).
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    simko = dict(cand_ids=[0, 1], top1=True, correct=True, alpha=0.5)
    # On-policy (old = current): r = 1, loss = -1.
    loss, grad = _one_token_grad(logits, 0, math.log(0.5), 1.0, **dict(simko))
    assert loss == pytest.approx(-1.0, abs=1e-12)
    assert grad == pytest.approx([-0.25, 0.05, 0.2], abs=1e-12)
    # Old p_0 = 0.4: r = 1.25 < 1 + 0.28, unclipped: loss = -1.25, gradient scaled by 1.25.
    loss, grad = _one_token_grad(logits, 0, math.log(0.4), 1.0, **dict(simko))
    assert loss == pytest.approx(-1.25, abs=1e-12)
    assert grad == pytest.approx([-0.3125, 0.0625, 0.25], abs=1e-12)
    # Old p_0 = 0.25: r = 2 > 1.28 and A > 0, so the clipped branch is taken: loss = -1.28, no gradient.
    loss, grad = _one_token_grad(logits, 0, math.log(0.25), 1.0, **dict(simko))
    assert loss == pytest.approx(-1.28, abs=1e-12)
    assert grad == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    # Plain PPO for comparison: gradient -(e_0 - p) = (-0.5, 0.3, 0.2); SimKO moves 0.25 of the push on
    # token 0 to token 1 (the other candidate), and token 1 now rises: -0.05 < 0 vs PPO's +0.3.
    loss, grad = _one_token_grad(logits, 0, math.log(0.5), 1.0)
    assert grad == pytest.approx([-0.5, 0.3, 0.2], abs=1e-12)


def test_simko_hand_derived_one_token_wrong_response():
    # Wrong response, gated, sampled token is the old top-1: A' = lambda A = 1.1 * (-1) = -1.1.
    # r = 1: loss = -r A' = 1.1, d loss / dz = -A' (e_0 - p) = 1.1 (0.5, -0.3, -0.2). No top-K mixing.
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    loss, grad = _one_token_grad(
        logits, 0, math.log(0.5), -1.0, cand_ids=[0, 1], top1=True, correct=False, alpha=0.5, lam=1.1
    )
    assert loss == pytest.approx(1.1, abs=1e-12)
    assert grad == pytest.approx([0.55, -0.33, -0.22], abs=1e-12)
    # Sampled token not the old top-1: no penalty, plain PPO (loss 1, gradient (e_0 - p)).
    loss, grad = _one_token_grad(
        logits, 0, math.log(0.5), -1.0, cand_ids=[0, 1], top1=False, correct=False, alpha=0.5, lam=1.1
    )
    assert loss == pytest.approx(1.0, abs=1e-12)
    assert grad == pytest.approx([0.5, -0.3, -0.2], abs=1e-12)


def test_simko_matches_the_papers_ratio_mixing_formula():
    """Independent form (paper / public code): ratio' = (1 - a w) r + (a w / K) sum_i sg(r / r_i) r_i
    with r_i = p_i / p_old_i using the OLD top-K log-probs, lambda on gated top-1 tokens of wrong
    responses, then PPO clipping and the token mean. Ours never sees the old top-K log-probs."""
    log_probs, old, adv, mask, cand, gate, top1, correct = _random_batch(2)
    old_cand = cand.detach() + 0.3 * torch.randn(cand.shape, generator=torch.Generator().manual_seed(3))
    alpha, lam, k = 0.3, 1.1, cand.shape[-1]

    r = (log_probs - old).exp()
    r_i = (cand - old_cand).exp()
    w = alpha * gate * correct.float().unsqueeze(-1)
    mixed = (1 - w) * r + (w / k) * ((r.detach().unsqueeze(-1) / r_i.detach()) * r_i).sum(-1)
    penal = gate.bool() & top1 & ~correct.unsqueeze(-1)
    a = torch.where(penal, lam * adv, adv)
    per_token = -torch.min(mixed * a, mixed.clamp(0.8, 1.28) * a)
    expected = (per_token * mask).sum() / mask.sum()
    exp_grads = torch.autograd.grad(expected, [log_probs, cand])

    got = policy_loss(
        log_probs, old, adv, mask, cand_log_probs=cand, gate=gate, sampled_is_top1=top1, correct=correct,
        alpha=alpha, lam=lam,
    )  # fmt: skip
    got_grads = torch.autograd.grad(got, [log_probs, cand])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    for g, e in zip(got_grads, exp_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(got_grads[1]) > 0  # candidates do receive gradient


def test_apply_simko_rejects_bad_inputs():
    log_probs, old, adv, mask, cand, gate, top1, correct = _random_batch(4)
    with pytest.raises(ValueError, match="missing \\['gate'"):
        policy_loss(log_probs, old, adv, mask, cand_log_probs=cand, sampled_is_top1=top1, correct=correct)
    with pytest.raises(ValueError, match="cand_log_probs must have shape"):
        apply_simko(log_probs, adv, cand[:, :-1], gate, top1, correct)
    with pytest.raises(ValueError, match="gate must have shape"):
        apply_simko(log_probs, adv, cand, gate[:, :-1], top1, correct)
    with pytest.raises(ValueError, match="correct must have shape"):
        apply_simko(log_probs, adv, cand, gate, top1, correct[:-1])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            apply_simko(log_probs, adv, cand, gate, top1, correct, alpha=bad)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            apply_simko(log_probs, adv, cand, gate, top1, correct, lam=bad)
    for bad in (1.0, -0.1, float("nan")):  # tau = 1 would gate nothing: SimKO silently off
        with pytest.raises(ValueError, match="tau"):
            entropy_gate(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), bad)


def test_lambda_scales_only_negative_advantages_of_wrong_responses():
    # Two wrong responses, every token gated and sampled == old top-1. Estimators such as passk_full
    # can give a wrong response a positive advantage: lambda strengthens penalties, never rewards.
    adv = torch.tensor([[-1.0, -0.5], [1.0, 0.25]])
    lp = torch.zeros(2, 2)
    ones = torch.ones(2, 2)
    _, scaled = apply_simko(
        lp, adv, torch.zeros(2, 2, 3), ones, ones, torch.tensor([False, False]), alpha=0.01, lam=1.5
    )
    assert torch.equal(scaled, torch.tensor([[-1.5, -0.75], [1.0, 0.25]]))


def test_entropy_ignores_masked_minus_inf_logits():
    # Logits (0, 1, -inf): the -inf token has p = 0 and adds nothing; H of softmax(0, 1) by hand.
    p1 = math.exp(1) / (1 + math.exp(1))
    expected = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    _, ent, _ = topk_and_entropy(torch.tensor([[0.0, 1.0, float("-inf")]]), 2)
    assert ent.item() == pytest.approx(expected, abs=1e-6)


def test_entropy_gate_quantile_per_response():
    # Row 0: entropies 0.1 .. 1.0 (10 tokens). tau = 0.8 -> quantile at rank 0.8 * 9 = 7.2 between
    # 0.8 and 0.9: 0.8 + 0.2 * 0.1 = 0.82, so tokens 0.9 and 1.0 are gated.
    # Row 1: only the first 5 are action tokens (0.5, 0.4, 0.3, 0.2, 0.1) -> quantile at rank 3.2:
    # 0.4 + 0.2 * 0.1 = 0.42 -> only 0.5 is gated; the masked high entropies (9.0) never are.
    # Row 2: no action tokens -> nothing gated. Row 3: all equal -> none strictly above -> nothing.
    ent = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            [0.5, 0.4, 0.3, 0.2, 0.1, 9.0, 9.0, 9.0, 9.0, 9.0],
            [1.0] * 10,
            [0.7] * 10,
        ]
    )
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False
    gate = entropy_gate(ent, mask, 0.8)
    expected = torch.zeros(4, 10)
    expected[0, 8:] = 1
    expected[1, 0] = 1
    assert torch.equal(gate, expected)
    # tau = 0: every action token above the response's minimum.
    assert entropy_gate(ent, mask, 0.0)[0].sum().item() == 9


def test_topk_and_entropy_chunks_match_full_computation():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    ids, ent, top1 = topk_and_entropy(logits, 3, chunk_size=3)  # chunks straddle rows
    probs = torch.softmax(logits.double(), dim=-1)
    assert torch.equal(ids, logits.topk(3, dim=-1).indices)
    torch.testing.assert_close(ent.double(), -(probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top1.double(), probs.max(-1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab", [1024, 1000, 48])  # blocks of 256 ids; none (plain topk); blocks of 16
def test_topk_and_entropy_block_search_matches_brute_force(vocab):
    """The block-maxima top-k search gives torch.topk's ids, also when the top entries share a block,
    and the entropy stays exact next to masked (-inf) logits."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 7, vocab, generator=g) * 4
    logits[0, 0, 100 % vocab : 100 % vocab + 3] = 30.0 + torch.arange(3.0)  # top 3 in one block
    logits[1, 2, ::2] = float("-inf")  # half the vocabulary masked
    logits[2, 3, 5] = 50.0  # one dominant token: entropy ~ 0
    ids, ent, top1 = topk_and_entropy(logits, 3, chunk_size=4)
    assert torch.equal(ids, logits.topk(3, dim=-1).indices)
    x = logits.double()
    probs = torch.softmax(x, dim=-1)
    expected = -torch.where(probs > 0, probs * torch.log_softmax(x, -1), 0.0).sum(-1)
    torch.testing.assert_close(ent.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(top1.double(), probs.max(-1).values, rtol=1e-5, atol=1e-6)
    assert ent.isfinite().all()


def test_candidate_log_probs_equal_log_softmax_gather_with_gradients():
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 4, 9, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, 9, (2, 4), generator=g)
    ids = torch.randint(0, 9, (2, 4, 3), generator=g)
    weights = torch.randn(2, 4, 3, generator=g)
    ids[..., 0] = labels  # the sampled token is often a candidate: duplicate indices in one gather
    # As OpenRLHF computes the label log-prob: gathered logit minus logsumexp, no log_softmax kept.
    label_lp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    gathered = SparseGradGather.apply(logits, torch.cat([labels.unsqueeze(-1), ids], dim=-1))
    got = candidate_log_probs(gathered[..., 1:], gathered[..., 0], label_lp)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
    expected = torch.log_softmax(logits, -1).gather(-1, ids)
    (exp_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, exp_grad)


def test_sparse_grad_gather_on_a_view_falls_back_to_a_dense_gradient():
    """A slice of the logits (a view) cannot take a sparse gradient; the gather must still be exact."""
    g = torch.Generator().manual_seed(7)
    full = torch.randn(2, 6, 9, generator=g).requires_grad_()
    index = torch.randint(0, 9, (2, 4, 3), generator=g)
    index[..., 1] = index[..., 0]  # duplicate ids in one row: their gradients must add up
    weights = torch.randn(2, 4, 3, generator=g)
    for x in (full[:, 2:], full[:, 2:].float()):  # both views of `full` (.float() of fp32 is a no-op)
        assert x._is_view()
        (got,) = torch.autograd.grad((SparseGradGather.apply(x, index) * weights).sum(), full)
        (expected,) = torch.autograd.grad((x.gather(-1, index) * weights).sum(), full)
        assert not got.is_sparse
        torch.testing.assert_close(got, expected)
    (sparse,) = torch.autograd.grad((SparseGradGather.apply(full, index[:, :1]) * weights[:, :1]).sum(), full)
    (dense,) = torch.autograd.grad((full.gather(-1, index[:, :1]) * weights[:, :1]).sum(), full)
    torch.testing.assert_close(sparse.to_dense(), dense)


@pytest.mark.gpu
def test_simko_path_on_cuda_matches_cpu():
    """The whole SimKO training path (top-K/entropy, gate, sparse gather, candidate log-probs, loss) on
    CUDA gives the CPU's values and logits gradient (skipped without CUDA)."""
    g = torch.Generator().manual_seed(8)
    b, t, v, k = 3, 40, 50_000, 3
    logits = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    old = -torch.rand(b, t, generator=g) * 5
    adv = torch.tensor([[1.0], [-1.0], [-0.5]]).expand(b, t)
    mask = torch.ones(b, t)

    def run(device: str):
        x = logits.to(device, copy=True).requires_grad_()  # a fresh leaf per device
        ids, entropy, top1 = topk_and_entropy(x.detach(), k, chunk_size=16)
        gate = entropy_gate(entropy, mask.to(device), 0.5)
        label_lp = x.gather(-1, labels.to(device).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)
        gathered = SparseGradGather.apply(x, torch.cat([labels.to(device).unsqueeze(-1), ids], dim=-1))
        cand = candidate_log_probs(gathered[..., 1:], gathered[..., 0], label_lp)
        sampled_top1 = labels.to(device) == ids[..., 0]
        correct = torch.tensor([True, False, False], device=device)
        loss = policy_loss(label_lp, old.to(device), adv.to(device), mask.to(device), cand_log_probs=cand,
                           gate=gate, sampled_is_top1=sampled_top1, correct=correct, alpha=0.5, lam=2.0)  # fmt: skip
        loss.backward()
        return [value.detach().cpu() for value in (ids, entropy, top1, gate, loss, x.grad.to_dense())]

    cpu, cuda = run("cpu"), run("cuda")
    assert torch.equal(cpu[0], cuda[0]) and torch.equal(cpu[3], cuda[3])  # same ids, same gate
    for a, b_ in zip(cpu[1:3] + cpu[4:], cuda[1:3] + cuda[4:], strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)
