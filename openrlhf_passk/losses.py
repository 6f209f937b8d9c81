"""Policy losses over plain tensors: OpenRLHF's PPO clipped loss and SimKO (Peng et al. 2025).

Pure torch (no OpenRLHF, no Ray): the CPU sandbox calls `policy_loss` for plain PPO and the OpenRLHF
integration (`openrlhf_passk.integration.simko`) calls the SimKO helpers below from its patches.

SimKO in one line: the loss value is PPO's, but at high-entropy tokens of correct responses the
gradient also pushes up the old policy's top-K candidates, and at high-entropy tokens of wrong
responses where the sampled token was the old top-1 the (negative) advantage is scaled by lambda.

Shapes: B responses, T action positions (OpenRLHF's action_mask width), V vocabulary, K candidates.
"""

from __future__ import annotations

import torch

__all__ = [
    "SparseGradGather",
    "apply_simko",
    "candidate_log_probs",
    "entropy_gate",
    "policy_loss",
    "simko_advantages",
    "simko_log_probs",
    "topk_and_entropy",
]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    # Same arithmetic as openrlhf.models.utils.masked_mean (0/0 stays NaN there too).
    if mask is None:
        return x.mean(dim=dim)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def simko_log_probs(
    log_probs: torch.Tensor, cand_log_probs: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Surrogate log-probs for SimKO's top-K ratio mixing.

        lp'_t = (1 - w_t) * lp_t + w_t * sg(lp_t) + (w_t / K) * sum_i (c_ti - sg(c_ti))

    with lp the current log-prob of the sampled token, c_ti the current log-prob of the old top-K
    candidate i, w_t = alpha * gate_t * correct (0 elsewhere) and sg = stop-gradient. lp' has the value
    of lp, so exp(lp' - old) has the value of the PPO ratio r_t, and its gradient is
    r_t * ((1 - w_t) grad lp_t + (w_t / K) sum_i grad c_ti): exactly SimKO's mixed ratio
    (1 - w) r + (w / K) sum_i sg(r / r_i) r_i, whose old top-K log-probs cancel. Feeding lp' to an
    unchanged PPO loss therefore gives SimKO with PPO's clipping, dual clip and IS corrections intact.
    """
    k = cand_log_probs.shape[-1]
    cand_delta = (cand_log_probs - cand_log_probs.detach()).sum(dim=-1) / k
    return (1 - weight) * log_probs + weight * log_probs.detach() + weight * cand_delta


def simko_advantages(advantages: torch.Tensor, penalty_mask: torch.Tensor, lam: float) -> torch.Tensor:
    """A'_t = lam * A_t where penalty_mask_t (wrong response, gated token, sampled == old top-1), else A_t."""
    return torch.where(penalty_mask.bool(), advantages * lam, advantages)


def apply_simko(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    cand_log_probs: torch.Tensor,
    gate: torch.Tensor,
    sampled_is_top1: torch.Tensor,
    correct: torch.Tensor,
    *,
    alpha: float = 0.01,
    lam: float = 1.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimKO's change to the PPO inputs: (lp', A') = (`simko_log_probs` with w_t = alpha * gate_t on
    correct responses, `simko_advantages` where gate_t and sampled_is_top1_t and A_t < 0 on wrong responses).

    cand_log_probs (B, T, K): current log-probs at the old top-K ids; gate (B, T): entropy gate in
    {0, 1}; sampled_is_top1 (B, T): the sampled token is the old top-1; correct (B,): per response."""
    shape = tuple(log_probs.shape)
    if tuple(cand_log_probs.shape[:-1]) != shape:
        got = tuple(cand_log_probs.shape)
        raise ValueError(f"cand_log_probs must have shape {shape} + (K,), got {got}")
    for name, value in (("gate", gate), ("sampled_is_top1", sampled_is_top1)):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if tuple(correct.shape) != shape[:1]:
        raise ValueError(f"correct must have shape ({shape[0]},), got {tuple(correct.shape)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (SimKO's top-K mixing weight) must be in [0, 1], got {alpha}")
    if not lam > 0:
        raise ValueError(f"lam (SimKO's top-1 penalty factor) must be > 0, got {lam}; 1 turns the penalty off")
    correct = correct.bool().unsqueeze(-1)
    weight = alpha * gate.to(log_probs.dtype) * correct
    # Only a negative advantage is a penalty to strengthen: some estimators (passk_full, pkpo without a
    # baseline) can give a wrong response a positive advantage, which lambda must not boost.
    penalty = gate.bool() & sampled_is_top1.bool() & ~correct & (advantages < 0)
    return simko_log_probs(log_probs, cand_log_probs, weight), simko_advantages(advantages, penalty, lam)


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    token_level_loss: bool = True,
    cand_log_probs: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    sampled_is_top1: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    alpha: float = 0.01,
    lam: float = 1.1,
) -> torch.Tensor:
    """PPO clipped policy loss (OpenRLHF's `PolicyLoss`, policy_loss_type="ppo"), optionally SimKO.

        r_t = exp(clamp(lp_t - old_t, -20, 20)),
        loss_t = -min(r_t A_t, clamp(r_t, 1 - clip_low, 1 + clip_high) A_t)

    aggregated as OpenRLHF does by default: token mean over all unmasked tokens of the batch
    (token_level_loss=True), or the mean over responses of each response's token mean.

    SimKO inputs, all four or none (see `apply_simko`): cand_log_probs (B, T, K), gate (B, T),
    sampled_is_top1 (B, T), correct (B,); alpha = top-K mixing weight, lam = top-1 penalty factor.
    """
    simko = {
        "cand_log_probs": cand_log_probs,
        "gate": gate,
        "sampled_is_top1": sampled_is_top1,
        "correct": correct,
    }
    if any(value is not None for value in simko.values()):
        missing = [name for name, value in simko.items() if value is None]
        if missing:
            raise ValueError(f"SimKO needs all of {list(simko)}; missing {missing} (pass all four or none)")
        log_probs, advantages = apply_simko(log_probs, advantages, **simko, alpha=alpha, lam=lam)

    ratio = (log_probs - old_log_probs).clamp(min=-20.0, max=20.0).exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.min(surr1, surr2)
    if token_level_loss:
        return _masked_mean(loss, action_mask, dim=None)
    if action_mask is None:
        return loss.mean(dim=-1).mean()
    counts = action_mask.sum(dim=-1)
    seq_loss = (loss * action_mask).sum(dim=-1) / (counts + 1e-8)
    return _masked_mean(seq_loss, (counts > 0).to(seq_loss.dtype), dim=None)


@torch.no_grad()
def topk_and_entropy(
    logits: torch.Tensor, k: int, chunk_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of logits (..., V): the top-k token ids (..., k), the entropy H = lse - sum p * x
    (...), and the top-1 probability (...). Chunks of `chunk_size` positions keep the extra memory at
    O(chunk_size * V) instead of O(T * V): two fp32 buffers (softmax, p * x), 0.6 GiB at V = 152k.

    Per chunk: a softmax, block maxima and p * x. The top-k entries lie in the k blocks (of 2^j ids)
    with the largest maxima, so the top-k search runs over k blocks instead of V ids (torch.topk over
    150k-wide rows took over a third of this function on an H200), and lse = x_1 - log p_1."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    rows_total = flat.shape[0]
    ids = torch.empty(rows_total, k, dtype=torch.long, device=flat.device)
    entropy = torch.empty(rows_total, dtype=torch.float32, device=flat.device)
    top1 = torch.empty_like(entropy)
    block = next((b for b in (256, 128, 64, 32, 16) if vocab % b == 0 and vocab // b >= k), 0)
    offsets = torch.arange(block, device=flat.device)
    for start in range(0, rows_total, chunk_size):
        chunk = flat[start : start + chunk_size].float()
        rows = chunk.shape[0]
        probs = torch.softmax(chunk, dim=-1)
        if block:
            best = chunk.view(rows, vocab // block, block).amax(dim=-1).topk(k, dim=-1).indices
            cand = (best.unsqueeze(-1) * block + offsets).view(rows, k * block)
            chunk_ids = cand.gather(-1, chunk.gather(-1, cand).topk(k, dim=-1).indices)
        else:
            chunk_ids = chunk.topk(k, dim=-1).indices
        p1 = probs.gather(-1, chunk_ids[:, :1]).squeeze(-1)
        lse = chunk.gather(-1, chunk_ids[:, :1]).squeeze(-1) - p1.log()
        mean_x = (probs * chunk).sum(dim=-1)
        # p * x is 0 * -inf = NaN at masked (-inf) logits; those tokens contribute 0 to the entropy.
        bad = mean_x.isnan()
        if bad.any():
            mean_x[bad] = torch.where(probs[bad] > 0, probs[bad] * chunk[bad], 0.0).sum(dim=-1)
        entropy[start : start + chunk_size] = lse - mean_x
        ids[start : start + chunk_size] = chunk_ids
        top1[start : start + chunk_size] = p1
    shape = logits.shape[:-1]
    return ids.view(*shape, k), entropy.view(shape), top1.view(shape)


@torch.no_grad()
def entropy_gate(entropy: torch.Tensor, action_mask: torch.Tensor, tau: float) -> torch.Tensor:
    """w_t = 1 where entropy_t > the tau-quantile (linear interpolation) of the same response's
    action-token entropies, else 0; (B, T) float. A response without action tokens gates nothing."""
    if not 0 <= tau < 1:  # also rejects NaN
        raise ValueError(f"tau must be in [0, 1), got {tau}; tau = 1 gates no token and turns SimKO off")
    gate = torch.zeros_like(entropy, dtype=torch.float32)
    mask = action_mask.bool()
    for row in range(entropy.shape[0]):
        values = entropy[row][mask[row]].float()
        if values.numel() == 0:
            continue
        threshold = torch.quantile(values, tau)
        gate[row] = ((entropy[row].float() > threshold) & mask[row]).float()
    return gate


class SparseGradGather(torch.autograd.Function):
    """x.gather(-1, index) whose gradient w.r.t. x is a sparse COO tensor with index.numel() entries.

    A plain gather's backward scatters into a dense zeros_like(x): with x the (T, V) logits that is a
    second T * V buffer alive next to the logits' own gradient, since autograd runs this late-created
    node first (measured: exactly one extra T * V * 4 bytes at the peak). Autograd adds a sparse
    gradient into the dense one that the sampled-token log-prob sends to the same logits, in place.
    A view's backward (slice, as_strided) rejects sparse gradients, so x that is a view (fp32 model
    logits sliced by the caller) gets the plain dense gradient instead: correct, without the saving."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        ctx.dense = x._is_view()
        return x.gather(-1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors  # (..., C), at least 2-D
        if ctx.dense:
            return grad.new_zeros(ctx.shape).scatter_add_(-1, index, grad), None
        rows = torch.arange(index.numel(), device=index.device) // index.shape[-1]
        coords = torch.cat([torch.stack(torch.unravel_index(rows, index.shape[:-1])), index.reshape(1, -1)])
        # In bounds by construction (the forward gather succeeded), so skip the invariant checks.
        sparse = torch.sparse_coo_tensor(coords, grad.reshape(-1), ctx.shape, check_invariants=False)
        return sparse.coalesce(), None


def candidate_log_probs(
    cand_logits: torch.Tensor, label_logits: torch.Tensor, label_log_probs: torch.Tensor
) -> torch.Tensor:
    """Current log-probs (..., K) of the candidates from their gathered logits (..., K).

    OpenRLHF computes the sampled token's log-prob as logit - logsumexp without keeping a
    log_softmax (or through flash-attn's fused cross-entropy), so the logsumexp is recovered from that
    result: lse = label_logit - label_log_prob. The caller gathers K + 1 logits per position from the
    logits already in memory (with `SparseGradGather`): O(T * K) extra memory, no second pass over the
    vocabulary. Gradients flow into both gathers and into label_log_probs' graph, which together give
    d lse = softmax."""
    return cand_logits - (label_logits - label_log_probs).unsqueeze(-1)
