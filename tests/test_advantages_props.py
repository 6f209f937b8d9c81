"""Property-based tests (hypothesis) for the invariants of the advantage estimators."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_passk import advantages as adv

SETTINGS = settings(max_examples=60, deadline=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@st.composite
def groups(draw, binary: bool | None = None) -> tuple[torch.Tensor, int]:
    """A (G, N) reward tensor and a k in 1..N. Continuous values are multiples of 1/8 in [-10, 10], so
    dyadic scalings and shifts below are exact and ties are common."""
    g = draw(st.integers(1, 3))
    n = draw(st.integers(1, 10))
    k = draw(st.integers(1, n))
    is_binary = draw(st.booleans()) if binary is None else binary
    values = st.sampled_from([0.0, 1.0]) if is_binary else st.integers(-80, 80).map(lambda x: x / 8)
    rows = draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=g, max_size=g))
    return torch.tensor(rows, dtype=torch.float64), k


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


@SETTINGS
@given(groups())
def test_passk_is_zero_sum_and_k1_is_grpo(case) -> None:
    r, k = case
    a = adv.compute("passk", r, k=k)
    assert torch.isfinite(a).all()
    assert (a.sum(dim=1).abs() <= 1e-9 * (1 + a.abs().sum(dim=1))).all()
    assert close(adv.compute("passk", r, k=1), adv.compute("grpo", r))


@SETTINGS
@given(groups(binary=True))
def test_binary_signs_and_share_weighted_variants(case) -> None:
    r, k = case
    a = adv.compute("passk", r, k=k)
    assert (a[r == 1] >= 0).all() and (a[r == 0] <= 0).all()  # A_pos >= 0 >= A_neg
    if k >= 2:
        loo1 = adv.compute("pkpo", r, k=k, baseline="loo-1")
        assert (loo1 >= 0).all()
        assert (loo1[r == 0] == 0).all()  # a wrong answer adds nothing to any (k-1)-subset
    exceed = adv.compute("passk_exceed", r, k=k)
    assert (exceed.abs() <= a.abs() + 1e-12).all()  # the default f is in [0, 1]


@SETTINGS
@given(groups(), st.randoms(use_true_random=False))
def test_permutation_equivariance(case, rnd) -> None:
    r, k = case
    perm = list(range(r.shape[1]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    binary = bool(((r == 0) | (r == 1)).all())
    calls = [("grpo", {}), ("passk", {"k": k}), ("pkpo", {"k": k, "baseline": "none"})]
    if k >= 2:
        calls.append(("pkpo", {"k": k, "baseline": "loo-1"}))
    if k <= r.shape[1] - 1:
        calls.append(("pkpo", {"k": k, "baseline": "loo"}))
    if binary:
        calls += [("passk_combination", {"k": k}), ("passk_exceed", {"k": k})]
    for name, params in calls:
        assert close(adv.compute(name, r[:, perm], **params), adv.compute(name, r, **params)[:, perm]), name


@SETTINGS
@given(groups(), st.integers(-4, 4), st.integers(-5, 5))
def test_shift_and_scale(case, log2_scale, shift) -> None:
    """passk, grpo: invariant under r -> a r + b (a > 0). pkpo: s_i -> a s_i + b k/N without a baseline;
    the loo-1 baseline removes the shift. a = 2^j and integer b keep every value exact."""
    r, k = case
    n = r.shape[1]
    a = 2.0**log2_scale
    moved = a * r + shift
    for name, params in [("grpo", {}), ("passk", {"k": k})]:
        assert close(adv.compute(name, moved, **params), adv.compute(name, r, **params)), name
    none = adv.compute("pkpo", r, k=k, baseline="none")
    assert close(adv.compute("pkpo", moved, k=k, baseline="none"), a * none + shift * k / n)
    if k >= 2:
        loo1 = adv.compute("pkpo", r, k=k, baseline="loo-1")
        assert close(adv.compute("pkpo", moved, k=k, baseline="loo-1"), a * loo1)


@SETTINGS
@given(groups(binary=False))
def test_higher_reward_never_gets_lower_advantage(case) -> None:
    r, k = case
    for name, params in [("passk", {"k": k}), ("pkpo", {"k": k, "baseline": "none"})]:
        a = adv.compute(name, r, **params)
        order = r.argsort(dim=1)
        sorted_adv = a.gather(1, order)
        assert (sorted_adv.diff(dim=1) >= -1e-9).all(), name
        # Equal rewards get equal advantages (ties are handled by value, not by position).
        same = r.gather(1, order).diff(dim=1) == 0
        assert (sorted_adv.diff(dim=1)[same].abs() <= 1e-9).all(), name


@SETTINGS
@given(groups())
def test_degenerate_groups_give_zero(case) -> None:
    """sigma = 0 exactly when the k-th smallest reward equals the largest: then passk is 0."""
    r, k = case
    a = adv.compute("passk", r, k=k)
    v = r.sort(dim=1).values
    flat = v[:, k - 1] == v[:, -1]
    assert (a[flat] == 0).all()
    assert (a[~flat].abs().sum(dim=1) > 0).all()
    assert (adv.compute("passk_full", r, k=r.shape[1]) == 0).all()  # one group: nothing to compare


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.data())
def test_k_schedule_is_monotone_and_bounded(total_steps, data) -> None:
    k_start = data.draw(st.integers(1, 64))
    k_end = data.draw(st.integers(1, k_start))
    kind = data.draw(st.sampled_from(["linear", "step", "constant"]))
    ks = [
        adv.k_schedule(s, k_start=k_start, k_end=k_end, total_steps=total_steps, kind=kind)
        for s in range(250)
    ]
    assert ks[0] == k_start
    assert all(k_end <= k <= k_start for k in ks)
    assert all(b <= a for a, b in zip(ks, ks[1:], strict=False))
    assert ks[-1] == (k_start if kind == "constant" else k_end)



@SETTINGS
@given(groups(), st.lists(st.integers(0, 3), min_size=3, max_size=3), st.floats(0, 1), st.randoms())
def test_passk_adaptive_rows_and_prompt_permutation(case, levels, split, rnd) -> None:
    r, k = case
    g = r.shape[0]
    entropy = torch.tensor(levels[:g], dtype=torch.float64)
    out = adv.compute("passk_adaptive", r, k=k, entropy=entropy, split=split)
    a_grpo, a_passk = adv.grpo(r), adv.passk(r, k=k)
    assert all(torch.equal(out[i], a_grpo[i]) or torch.equal(out[i], a_passk[i]) for i in range(g))
    # Among rows whose two candidates differ, no Pass@k row has a higher entropy than a Pass@1 row.
    pass1 = {i for i in range(g) if not torch.equal(a_grpo[i], a_passk[i]) and torch.equal(out[i], a_grpo[i])}
    passk = {i for i in range(g) if not torch.equal(a_grpo[i], a_passk[i]) and torch.equal(out[i], a_passk[i])}
    assert all(entropy[i] <= entropy[j] for i in passk for j in pass1)
    # Permuting prompts with distinct entropies permutes the result.
    if len(set(levels[:g])) == g:
        perm = list(range(g))
        rnd.shuffle(perm)
        permuted = adv.compute("passk_adaptive", r[perm], k=k, entropy=entropy[perm], split=split)
        assert torch.equal(permuted, out[perm])
