"""Advantage estimators against brute-force enumeration of all k-subsets (N up to 12, every k), exact
integer closed forms at N = 4096, and bad-input errors."""

from __future__ import annotations

import importlib.util
import itertools
import math
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from openrlhf_passk import advantages as adv

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- brute force (independent of the library)


def subsets(n: int, k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long).view(-1, k)


def membership(index: torch.Tensor, n: int) -> torch.Tensor:
    """(C, N) 0/1 matrix: row s marks the members of subset s."""
    member = torch.zeros(index.shape[0], n, dtype=torch.float64)
    member[torch.arange(index.shape[0]).unsqueeze(1), index] = 1
    return member


def bf_passk(r: torch.Tensor, k: int) -> torch.Tensor:
    """Definition 1(c): mean over the subsets containing i of (subset max - Rbar) / sigma."""
    index = subsets(r.shape[1], k)
    group_max = r[:, index].amax(dim=2)  # (G, C)
    rbar = group_max.mean(dim=1, keepdim=True)
    sigma = ((group_max - rbar) ** 2).mean(dim=1, keepdim=True).sqrt()
    constant = (group_max == group_max[:, :1]).all(dim=1, keepdim=True)
    d = torch.where(constant, 0.0, (group_max - rbar) / torch.where(constant, 1.0, sigma))
    member = membership(index, r.shape[1])
    return d @ member / member.sum(dim=0)


def bf_grpo(r: torch.Tensor) -> torch.Tensor:
    out = []
    for row in r.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / len(row))
        out.append([0.0 if len(set(row)) == 1 else (x - mean) / std for x in row])
    return torch.tensor(out, dtype=torch.float64).view(r.shape)


def bf_pkpo(r: torch.Tensor, k: int, baseline: str) -> torch.Tensor:
    """ALGORITHMS.md 3 by enumeration: s_i sums the max over k-subsets containing i; the baseline
    averages the max over the m-subsets that do NOT contain i (m = k for loo, k - 1 for loo-1)."""
    n = r.shape[1]
    index = subsets(n, k)
    s = r[:, index].amax(dim=2) @ membership(index, n) / math.comb(n, k)
    if baseline == "none":
        return s
    m, factor = (k, k / (n - 1)) if baseline == "loo" or k == 1 else (k - 1, k / n)
    index = subsets(n, m)
    rho = r[:, index].amax(dim=2) @ (1 - membership(index, n)) / math.comb(n - 1, m)
    return s - factor * rho


def random_groups(n: int, seed: int, binary: bool) -> torch.Tensor:
    """Binary: every N_pos from 0 to N once, shuffled, plus random rows.
    Continuous: ties, a constant row, normal floats."""
    gen = torch.Generator().manual_seed(seed)
    if binary:
        rows = [(torch.arange(n) < c).double()[torch.randperm(n, generator=gen)] for c in range(n + 1)]
        rows.append((torch.rand(4, n, generator=gen) < 0.5).double())
        return torch.cat([row.view(-1, n) for row in rows])
    return torch.cat(
        [
            torch.randint(0, 4, (6, n), generator=gen).double() / 3,  # many ties
            torch.randn(6, n, generator=gen, dtype=torch.float64),
            torch.full((1, n), 0.7, dtype=torch.float64),
        ]
    )


CASES = [(n, k) for n in range(1, 13) for k in range(1, n + 1)]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- every estimator vs brute force


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_passk_and_pkpo_equal_brute_force_for_every_n_and_k(binary: bool) -> None:
    for n, k in CASES:
        r = random_groups(n, seed=100 * n + k, binary=binary)
        assert close(adv.compute("passk", r, k=k), bf_passk(r, k)), (n, k)
        for baseline in ("none", "loo", "loo-1"):
            if baseline != "none" and (k if baseline == "loo" or k == 1 else 0) > n - 1:
                continue
            got = adv.compute("pkpo", r, k=k, baseline=baseline)
            assert close(got, bf_pkpo(r, k, baseline)), (n, k, baseline)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_grpo_and_passk_full_equal_their_definitions(binary: bool) -> None:
    for n, k in CASES:
        r = random_groups(n, seed=n, binary=binary)
        assert close(adv.compute("grpo", r), bf_grpo(r))
        if n % k:
            continue
        # Full sampling written out: groups of k in order, max, standardised over the N/k groups.
        group_max = torch.tensor(
            [[max(row[j : j + k]) for j in range(0, n, k)] for row in r.tolist()], dtype=torch.float64
        )
        expected = bf_grpo(group_max).repeat_interleave(k, dim=1)
        assert close(adv.compute("passk_full", r, k=k), expected), (n, k)


def test_grpo_on_nearly_tied_rewards_is_exact() -> None:
    # Rewards one ulp apart: the exact standardisation of (0, 1, 0, 0) is (-1/sqrt3, sqrt3, ...),
    # whatever the scale; a single rounded mean subtraction loses it (and the zero sum).
    r = torch.tensor([[1.0, 1.0 + 2**-52, 1.0, 1.0]], dtype=torch.float64)
    low = -1 / math.sqrt(3)
    expected = torch.tensor([[low, math.sqrt(3), low, low]], dtype=torch.float64)
    assert close(adv.compute("grpo", r), expected, 1e-12)
    assert close(adv.compute("passk", r, k=1), expected, 1e-12)


def test_combination_and_exceed_equal_brute_force() -> None:
    for n, k in CASES:
        r = random_groups(n, seed=7 * n + k, binary=True)
        share = r.mean(dim=1, keepdim=True)
        a_passk, a_grpo = bf_passk(r, k), bf_grpo(r)
        assert close(adv.compute("passk_combination", r, k=k), share * a_passk + (1 - share) * a_grpo)
        assert close(adv.compute("passk_exceed", r, k=k), (1 - share) * a_passk)
        squared = adv.compute("passk_exceed", r, k=k, f=lambda n_pos, n: (1 - n_pos / n) ** 2)
        assert close(squared, (1 - share) ** 2 * a_passk)


def bf_adaptive(r: torch.Tensor, k: int, entropy: list[float], split: float) -> torch.Tensor:
    """Issue 17 written out: rank by (entropy desc, index asc); the first floor(G*split + 1/2) rows are
    Pass@1, computed row by row from the brute-force definitions (decimal arithmetic for the rounding)."""
    g = r.shape[0]
    ranking = sorted(range(g), key=lambda i: (-entropy[i], i))
    top = set(ranking[: int((g * Decimal(repr(split))).to_integral_value(rounding=ROUND_HALF_UP))])
    rows = [bf_grpo(r[i : i + 1]) if i in top else bf_passk(r[i : i + 1], k) for i in range(g)]
    return torch.cat(rows).view(r.shape)


def test_passk_adaptive_equals_per_prompt_brute_force() -> None:
    gen = torch.Generator().manual_seed(17)
    for trial in range(60):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        r = random_groups(n, seed=trial, binary=trial % 2 == 0)
        # Few distinct entropy values, so ties are common; half the trials use random float splits.
        entropy = torch.randint(0, 3, (r.shape[0],), generator=gen).double() / 2
        split = [0.0, 0.25, 0.5, 1.0][trial % 4] if trial % 3 else float(torch.rand(1, generator=gen))
        got = adv.compute("passk_adaptive", r, k=k, entropy=entropy, split=split)
        assert close(got, bf_adaptive(r, k, entropy.tolist(), split)), (trial, n, k, split)


def test_passk_adaptive_split_ends_ties_and_half_up_rounding() -> None:
    r = torch.cat([random_groups(6, seed=3, binary=True), random_groups(6, seed=4, binary=False)])
    entropy = torch.rand(r.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv.compute("passk_adaptive", r, k=3, entropy=entropy, split=0.0), adv.passk(r, k=3))
    assert torch.equal(adv.compute("passk_adaptive", r, k=3, entropy=entropy, split=1.0), adv.grpo(r))
    assert adv.available().index("passk_adaptive") > adv.available().index("passk_exceed")

    # Every row (one correct of 4) has different Pass@1 and Pass@2 advantages, so each row shows its arm.
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(5, 1)
    pass1_row, passk_row = bf_grpo(r[:1]), bf_passk(r[:1].double(), 2)
    assert not close(pass1_row, passk_row)

    def pass1_prompts(entropy: list[float], split: float) -> set[int]:
        out = adv.compute("passk_adaptive", r, k=2, entropy=torch.tensor(entropy), split=split)
        return {i for i in range(5) if close(out[i : i + 1], pass1_row, 1e-6)}

    # G*split = 2.5 -> 3 (half up; Python's round would give 2); the three tied 2.0s win by entropy.
    assert pass1_prompts([1.0, 2.0, 2.0, 0.0, 2.0], 0.5) == {1, 2, 4}
    # Two of the three tied top entropies: the lower indices.
    assert pass1_prompts([1.0, 2.0, 2.0, 0.0, 2.0], 0.4) == {1, 2}
    assert pass1_prompts([5.0, 5.0, 5.0, 5.0, 5.0], 0.3) == {0, 1}  # 1.5 -> 2
    assert pass1_prompts([0.0, -1.0, 3.0, 3.0, 9.0], 0.1) == {4}  # 0.5 -> 1
    assert pass1_prompts([0.0, -1.0, 3.0, 3.0, 9.0], 0.09) == set()  # 0.45 -> 0
    # 45 * 0.7 is 31.499999999999996 in floats, 31.5 as written: the decimal value rounds, to 32.
    rows = r[:1].repeat(45, 1)
    out = adv.compute("passk_adaptive", rows, k=2, entropy=torch.arange(45.0), split=0.7)
    assert 45 * 0.7 < 31.5 and (out == pass1_row.float()).all(dim=1).tolist() == [False] * 13 + [True] * 32
    # The output keeps the rewards' dtype; entropy may have another float dtype.
    out = adv.compute("passk_adaptive", r.bfloat16(), k=2, entropy=torch.ones(5, dtype=torch.float16))
    assert out.dtype == torch.bfloat16


def test_passk_binary_closed_form_and_k1_equals_grpo() -> None:
    """The ALGORITHMS.md 1(c) formulas with exact integer binomials, group by group."""
    for n, k in CASES:
        r = random_groups(n, seed=n * k, binary=True)
        got = adv.compute("passk", r, k=k)
        for row, out in zip(r.tolist(), got.tolist(), strict=True):
            n_pos = int(sum(row))
            n_neg = n - n_pos
            rbar = 1 - Fraction(math.comb(n_neg, k), math.comb(n, k))
            sigma = math.sqrt(rbar * (1 - rbar))
            if sigma == 0:
                assert out == [0.0] * n
                continue
            a_pos = float(1 - rbar) / sigma
            a_neg = float(1 - rbar - Fraction(math.comb(n_neg - 1, k - 1), math.comb(n - 1, k - 1))) / sigma
            assert out == pytest.approx([a_pos if x == 1 else a_neg for x in row], rel=1e-12, abs=1e-12)
        if k == 1:
            assert close(got, bf_grpo(r), 1e-12)


def test_binary_table_path_equals_the_general_path() -> None:
    """The cached (N, k) table gives what the order-statistics formulas give on the same 0/1 rewards."""
    for n, k in CASES:
        r = random_groups(n, seed=11 * n + k, binary=True)
        assert close(adv.compute("passk", r, k=k), adv._passk_sorted(r, k), 1e-12), (n, k)
    # Selecting from the table rounded to the rewards' dtype is exact: bit for bit the float64 result,
    # rounded (N = 300 also checks the correct counts of bfloat16 rows, whose integers stop at 256).
    r = torch.cat([random_groups(8, seed=5, binary=True), torch.ones(1, 8)])
    wide = (torch.rand(4, 300, generator=torch.Generator().manual_seed(1)) < 0.9).double()
    for rows, k in ((r, 3), (wide, 16)):
        exact = adv.passk(rows, k=k)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert torch.equal(adv.compute("passk", rows.to(dtype), k=k), exact.to(dtype)), dtype
    grad = r.float().requires_grad_()
    assert torch.equal(adv.passk(grad, k=3), adv.passk(r, k=3).float())


def test_only_exact_zeros_and_ones_take_the_table_path(monkeypatch) -> None:
    real_table, real_sorted = adv._passk_binary_table_as, adv._passk_sorted
    taken = []
    monkeypatch.setattr(adv, "_passk_binary_table_as", lambda *a: taken.append("table") or real_table(*a))
    monkeypatch.setattr(adv, "_passk_sorted", lambda *a: taken.append("sorted") or real_sorted(*a))
    tiny32, below_one = 2.0**-149, 1 - 2.0**-24  # smallest float32 subnormal; largest float32 below 1
    for value, dtype in [
        (tiny32, torch.float32),
        (below_one, torch.float32),
        (1 + 2.0**-23, torch.float32),
        (-1.0, torch.float32),
        (2.0, torch.float32),
        (0.5, torch.float64),
        (2.0**-24, torch.float16),  # smallest float16 subnormal
        (60000.0, torch.float16),  # r (r - 1) overflows to inf
        (2.0**-133, torch.bfloat16),
        (5e-324, torch.float64),
    ]:
        taken.clear()
        row = torch.tensor([[1.0, value, 0.0, 0.0]], dtype=dtype)
        assert row[0, 1].item() == value  # the value is representable, so it really is neither 0 nor 1
        adv.compute("passk", row, k=2)
        assert taken == ["sorted"], (value, dtype)
    # r (r - 1) is +2 at r = 2 and -1/4 at r = 1/2: a plain sum would cancel to 0 on this row.
    taken.clear()
    adv.compute("passk", torch.tensor([[2.0] + [0.5] * 8 + [1.0, 0.0]]), k=2)
    assert taken == ["sorted"]
    taken.clear()
    adv.compute("passk", torch.tensor([[1.0, -0.0, 0.0, 1.0]]), k=2)
    assert taken == ["table"]


def test_compute_is_not_slower_than_the_published_approach() -> None:
    """A coarse guard (the benchmark measures the real ratio): >= 10x the numpy/scipy baseline at
    G=1024, N=32, k=8, which is also an independent check of the values."""
    pytest.importorskip("scipy")
    spec = importlib.util.spec_from_file_location("bench_advantages", REPO / "benchmarks" / "advantages.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(1024, 32, generator=gen) < torch.rand(1024, 1, generator=gen)).float()
    base_time, base = bench.best_time(0.2, bench.baseline_passk, rewards, 8)
    our_time, ours = bench.best_time(0.2, adv.compute, "passk", rewards, k=8)
    assert close(ours, base, 1e-6)
    assert our_time * 10 < base_time, (our_time, base_time)


def test_pkpo_binary_special_cases() -> None:
    """ALGORITHMS.md 3: s = k/N (correct), (k/N) rho(N-1, c, k-1) (wrong); loo-1: wrong -> exactly 0,
    correct -> (k/N) C(N-c, k-1) / C(N-1, k-1)."""
    for n, k in CASES:
        r = random_groups(n, seed=3 * n + k, binary=True)
        none = adv.compute("pkpo", r, k=k, baseline="none")
        loo1 = adv.compute("pkpo", r, k=k, baseline="loo-1" if n > 1 else "none")
        for row, s_row, b_row in zip(r.tolist(), none.tolist(), loo1.tolist(), strict=True):
            c = int(sum(row))
            # rho(N-1, c, k-1) among the other N-1 rollouts of a wrong one (only needed when c < N).
            rho = 1 - Fraction(math.comb(n - 1 - c, k - 1), math.comb(n - 1, k - 1)) if c < n else 1
            s_wrong = float(Fraction(k, n) * rho)
            assert s_row == pytest.approx([k / n if x else s_wrong for x in row], rel=1e-12, abs=1e-15)
            if k >= 2:
                right = float(Fraction(k, n) * Fraction(math.comb(n - c, k - 1), math.comb(n - 1, k - 1)))
                assert [v for v, x in zip(b_row, row, strict=True) if not x] == [0.0] * (n - c)
                correct = [v for v, x in zip(b_row, row, strict=True) if x]
                assert correct == pytest.approx([right] * c, rel=1e-12)


@pytest.mark.parametrize("baseline", ["none", "loo", "loo-1"])
@pytest.mark.parametrize("values", [(0.0, 1.0, 0.0), (0.0, 0.3, 1.0)], ids=["binary", "continuous"])
def test_pkpo_is_unbiased(baseline: str, values: tuple[float, ...]) -> None:
    """E[sum_i A_i grad log p(x_i)] = grad E[max of k draws], exactly, for a 3-outcome softmax policy:
    expectation over all 3^N batches, gradient of the objective by autograd over all 3^k draws."""
    g = torch.tensor(values, dtype=torch.float64)
    theta = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64, requires_grad=True)
    for n in (3, 4):
        batches = torch.tensor(list(itertools.product(range(3), repeat=n)))  # (3^n, n)
        for k in range(1, n + 1):
            p = torch.softmax(theta, 0)
            prob = p.detach()[batches].prod(dim=1)
            if baseline == "loo" and k > n - 1:
                continue
            a = adv.compute("pkpo", g[batches], k=k, baseline=baseline)  # (3^n, n)
            score = torch.nn.functional.one_hot(batches, 3).double() - p.detach()  # grad log p(x) wrt theta
            estimate = torch.einsum("b,bi,bij->j", prob, a, score)
            draws = torch.tensor(list(itertools.product(range(3), repeat=k)))
            objective = (p[draws].prod(dim=1) * g[draws].amax(dim=1)).sum()
            (true_grad,) = torch.autograd.grad(objective, theta)
            assert torch.allclose(estimate, true_grad, atol=1e-12), (n, k, baseline)


# ---------------------------------------------------------------- bootstrap converges to passk


def test_bootstrap_converges_to_passk_within_its_sampling_error() -> None:
    """Tolerance from the sample size: with M groups, element i is in about M k / N of them, so its mean
    has standard error sd_i / sqrt(M k / N); the estimated mean and std of the group maxima add
    1/sqrt(M) and |A_i| sqrt((kurtosis - 1) / (4 M)) (delta method). Six of those, summed, bound it."""
    n = 8
    r = torch.cat([random_groups(n, seed=5, binary=True)[2:7], random_groups(n, seed=6, binary=False)[4:8]])
    for k in (2, 3):
        index = subsets(n, k)
        group_max = r[:, index].amax(dim=2)
        centred = group_max - group_max.mean(1, keepdim=True)
        std = group_max.std(1, correction=0, keepdim=True)
        # A constant group max gives passk 0 and bootstrap 0 (checked exactly below).
        d = torch.where(std > 0, centred / std.clamp(min=1e-300), 0.0)
        member = membership(index, n).bool()
        exact = bf_passk(r, k)
        sd = torch.stack([d[:, member[:, i]].std(dim=1, correction=0) for i in range(n)], dim=1)
        excess = ((d**4).mean(dim=1, keepdim=True) - 1).clamp(min=0)  # kurtosis - 1
        for m in (2_000, 50_000):
            got = adv.compute("passk_bootstrap", r, k=k, num_groups=m, seed=m + k)
            tol = 6 * (sd / math.sqrt(m * k / n) + 1 / math.sqrt(m) + exact.abs() * (excess / (4 * m)).sqrt())
            assert torch.isfinite(tol).all()
            assert ((got - exact).abs() <= tol).all(), (k, m, (got - exact).abs().max())
        assert torch.equal(got[exact == 0], exact[exact == 0])


def test_bootstrap_seed_reduce_and_zero_cases() -> None:
    r = torch.tensor([[1.0, 0, 0, 1, 0, 1], [0.2, 0.9, 0.4, 0.4, 0.1, 0.8], [1, 1, 1, 1, 1, 1]])
    a = adv.compute("passk_bootstrap", r, k=2, seed=3)
    assert torch.equal(a, adv.compute("passk_bootstrap", r, k=2, seed=3))
    assert not torch.equal(a, adv.compute("passk_bootstrap", r, k=2, seed=4))
    torch.manual_seed(0)
    b = adv.compute("passk_bootstrap", r, k=2)
    torch.manual_seed(0)
    assert torch.equal(b, adv.compute("passk_bootstrap", r, k=2))
    assert torch.equal(a[2], torch.zeros(6))  # every group max is 1
    # sum = mean * (number of groups containing i): the ratio is a count, and counts add up to M * k.
    m = 40
    mean = adv.compute("passk_bootstrap", r[:2], k=2, num_groups=m, seed=1, reduce="mean").double()
    total = adv.compute("passk_bootstrap", r[:2], k=2, num_groups=m, seed=1, reduce="sum").double()
    counts = torch.where(mean != 0, total / mean, 0.0)
    assert torch.allclose(counts, counts.round(), atol=1e-4)
    assert (mean != 0).all()
    assert counts.round().sum(dim=1).tolist() == [m * 2, m * 2]
    # k = N: every group is the whole set, so the group max never varies.
    assert torch.equal(adv.compute("passk_bootstrap", r, k=6, seed=0), torch.zeros(3, 6))


# ---------------------------------------------------------------- large N: finite and exact


def exact_binary_passk(n: int, k: int, n_pos: int) -> tuple[float, float]:
    """A_pos, A_neg from the ALGORITHMS.md 1(c) formulas in exact rationals, sqrt in 40-digit decimals."""
    n_neg = n - n_pos
    rbar = 1 - Fraction(math.comb(n_neg, k), math.comb(n, k))
    var = rbar * (1 - rbar)
    if var == 0:
        return 0.0, 0.0
    neg = 1 - rbar - Fraction(math.comb(n_neg - 1, k - 1) if n_neg else 0, math.comb(n - 1, k - 1))
    with localcontext() as ctx:
        ctx.prec = 40
        sigma = (Decimal(var.numerator) / Decimal(var.denominator)).sqrt()
        return tuple(float(Decimal(x.numerator) / Decimal(x.denominator) / sigma) for x in (1 - rbar, neg))


@pytest.mark.parametrize("k", [1, 2, 64, 1024, 4095])
def test_passk_at_n4096_is_finite_exact_and_zero_sum(k: int) -> None:
    n = 4096
    edges = {c for e in (0, k, n - k, n) for c in range(e - 3, e + 4)}
    n_pos_values = sorted(c for c in edges | set(range(0, n + 1, 41)) if 0 <= c <= n)
    r = (torch.arange(n).unsqueeze(0) < torch.tensor(n_pos_values).unsqueeze(1)).double()
    got = adv.compute("passk", r, k=k)
    assert torch.isfinite(got).all()
    assert (got.sum(dim=1).abs() <= 1e-9 * (1 + got.abs().sum(dim=1))).all()
    for row, n_pos in zip(got.tolist(), n_pos_values, strict=True):
        a_pos, a_neg = exact_binary_passk(n, k, n_pos)
        for value, exact, present in ((row[0], a_pos, n_pos > 0), (row[-1], a_neg, n_pos < n)):
            if present:
                assert abs(value - exact) <= 1e-9 * abs(exact) + 1e-300, (n_pos, value, exact)
    if k >= 2:  # PKPO loo-1 (binary): correct -> (k/N) C(N-c, k-1) / C(N-1, k-1), wrong -> 0
        loo1 = adv.compute("pkpo", r, k=k)
        assert torch.isfinite(loo1).all() and (loo1[r == 0] == 0).all()
        for value, c in zip(loo1[:, 0].tolist(), n_pos_values, strict=True):
            if c > 0:
                right = Fraction(k, n) * Fraction(math.comb(n - c, k - 1), math.comb(n - 1, k - 1))
                assert abs(value - float(right)) <= 1e-9 * float(right) + 1e-300, (c, value, float(right))
    # The continuous (order-statistics) path on the same groups, shifted and scaled: same values.
    cont = adv.compute("passk", 0.25 + 0.5 * r[::8], k=k)
    assert torch.isfinite(cont).all()
    assert torch.allclose(cont, got[::8], atol=1e-9 * (1 + got.abs().max()))
    noisy = adv.compute("passk", torch.rand(3, n, generator=torch.Generator().manual_seed(k)), k=k)
    assert torch.isfinite(noisy).all()
    assert (noisy.double().sum(dim=1).abs() <= 1e-4 * (1 + noisy.abs().sum(dim=1))).all()  # float32 output


def test_dtype_device_and_empty_batch() -> None:
    r = torch.tensor([[1.0, 0, 0.5, 1]], dtype=torch.bfloat16)
    for name, params in [("grpo", {}), ("passk", {"k": 2}), ("pkpo", {"k": 2}), ("passk_full", {"k": 2})]:
        out = adv.compute(name, r, **params)
        assert out.dtype == torch.bfloat16 and out.device == r.device and out.shape == r.shape
        assert adv.compute(name, torch.zeros(0, 4), **params).shape == (0, 4)
    assert adv.compute("passk_bootstrap", torch.zeros(0, 4), k=2).shape == (0, 4)


# ---------------------------------------------------------------- registry


def test_registry_register_get_available_and_user_estimator_checks() -> None:
    assert adv.available()[:7] == [
        "grpo",
        "passk",
        "passk_full",
        "passk_bootstrap",
        "pkpo",
        "passk_combination",
        "passk_exceed",
    ]
    assert adv.get("passk") is adv.passk

    @adv.register("test_user_mean")
    def user(rewards: torch.Tensor, *, k: int, scale: float = 1.0) -> torch.Tensor:
        return scale * (rewards - rewards.mean(dim=1, keepdim=True))

    try:
        out = adv.compute("test_user_mean", torch.tensor([[1.0, 3.0]]), k=1, scale=2.0)
        assert out.tolist() == [[-2.0, 2.0]]
        with pytest.raises(ValueError, match="k must satisfy"):
            adv.compute("test_user_mean", torch.tensor([[1.0, 3.0]]), k=3)
        with pytest.raises(ValueError, match="finite"):
            adv.compute("test_user_mean", torch.tensor([[1.0, math.nan]]), k=1)
        with pytest.raises(ValueError, match="already exists"):
            adv.register("test_user_mean")(user)
        adv.register("test_user_mean", override=True)(lambda rewards, *, k: rewards[:, :1])
        with pytest.raises(ValueError, match=r"returned \(1, 1\), expected shape \(1, 2\)"):
            adv.compute("test_user_mean", torch.tensor([[1.0, 3.0]]), k=1)
    finally:
        adv.ADVANTAGE_ESTIMATORS.pop("test_user_mean", None)


# ---------------------------------------------------------------- bad input


GOOD = torch.tensor([[1.0, 0.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    ("name", "rewards", "params", "match"),
    [
        ("passk", GOOD, {"k": 5}, r"k must satisfy 1 <= k <= N, got k=5 with N=4"),
        ("passk", GOOD, {"k": 0}, r"k=0 with N=4"),
        ("pkpo", GOOD, {"k": 2.0}, r"k must be an integer"),
        ("passk", GOOD[0], {"k": 1}, r"rewards must have shape \(G, N\).*\(4,\)"),
        ("grpo", GOOD.view(1, 2, 2), {}, r"rewards must have shape"),
        ("grpo", torch.zeros(3, 0), {}, r"N >= 1"),
        ("passk", torch.tensor([[1.0, math.nan]]), {"k": 1}, r"must be finite; rewards\[0, 1\] = nan"),
        ("grpo", torch.tensor([[1.0, math.inf]]), {}, r"rewards must be finite"),
        ("grpo", torch.tensor([[1, 0]]), {}, r"rewards must be a floating-point tensor, got torch.int64"),
        ("grpo", [[1.0, 0.0]], {}, r"rewards must be a torch.Tensor"),
        ("passk_combination", torch.tensor([[1.0, 0.5]]), {"k": 1}, r"must be binary .*'passk_combination'"),
        ("passk_exceed", torch.tensor([[2.0, 0.0]]), {"k": 1}, r"rewards must be binary .*\[0, 0\] = 2.0"),
        ("passk_full", torch.ones(1, 6), {"k": 4}, r"N=6 .* k=4, so N must be a multiple of k"),
        ("passk_bootstrap", GOOD, {"k": 2, "num_groups": 0}, r"num_groups must be a positive integer"),
        ("passk_bootstrap", GOOD, {"k": 2, "reduce": "max"}, r"reduce must be 'mean' or 'sum'"),
        ("passk_bootstrap", GOOD, {"k": 2, "seed": "x"}, r"seed must be an integer"),
        ("pkpo", GOOD, {"k": 2, "baseline": "mean"}, r"baseline must be one of"),
        ("pkpo", GOOD, {"k": 4, "baseline": "loo"}, r"baseline='loo' with k=4 .* needs k <= N-1; got N=4"),
        ("pkpo", torch.ones(2, 1), {"k": 1}, r"baseline='loo-1' with k=1 .* needs k <= N-1; got N=1"),
        ("passk_exceed", GOOD, {"k": 1, "f": "cubic"}, r"f must be 'linear' or a callable"),
        ("passk_exceed", GOOD, {"k": 1, "f": lambda n_pos, n: n_pos}, r"f must map N_pos = 0..4 to 5 finite"),
        ("passk_adaptive", GOOD, {"k": 2}, r"'passk_adaptive' needs parameter\(s\): entropy"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": None}, r"entropy must be a .* shape \(G,\) = \(1,\).*NoneType"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(1, 1)}, r"entropy must be .*shape \(1, 1\)"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(2)}, r"entropy must be .*shape \(2,\)"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(1, dtype=torch.long)}, r"entropy .*torch.int64"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.tensor([math.nan])}, r"entropy must be finite; .*= nan"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(1), "split": 1.5}, r"split must be a number in \[0, 1"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(1), "split": -0.1}, r"split must be .*-0.1"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(1), "split": math.nan}, r"split must be .*nan"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(1), "split": True}, r"split must be .*True"),
        ("passk_adaptive", GOOD, {"k": 2, "entropy": torch.ones(1), "split": "half"}, r"split must be .*'half'"),
        ("passk_adaptive", GOOD, {"k": 5, "entropy": torch.ones(1)}, r"k=5 with N=4"),
        ("passk", GOOD, {"k": 1, "kk": 2}, r"unknown parameter\(s\) kk for advantage estimator 'passk'"),
        ("grpo", GOOD, {"k": 2}, r"unknown parameter\(s\) k .*'grpo'; it accepts: no parameters"),
        ("passk", GOOD, {}, r"'passk' needs parameter\(s\): k"),
        ("pkpo", GOOD, {"k": None}, r"'pkpo' needs an integer k, got k=None"),
        ("nope", GOOD, {}, r"unknown advantage estimator 'nope'; available: grpo, passk"),
    ],
)
def test_bad_input_is_a_clear_value_error(name, rewards, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        adv.compute(name, rewards, **params)


def test_direct_calls_validate_too() -> None:
    with pytest.raises(ValueError, match="k=9 with N=4"):
        adv.passk(GOOD, k=9)
    with pytest.raises(ValueError, match="rewards must be binary"):
        adv.passk_combination(torch.tensor([[0.3, 1.0]]), k=1)


# ---------------------------------------------------------------- k schedule


def test_k_schedule() -> None:
    linear = [adv.k_schedule(s, k_start=8, k_end=1, total_steps=7) for s in range(10)]
    assert linear == [8, 7, 6, 5, 4, 3, 2, 1, 1, 1]
    assert [adv.k_schedule(s, k_start=8, total_steps=4, kind="step") for s in range(6)] == [8, 8, 1, 1, 1, 1]
    steps = [
        adv.k_schedule(s, k_start=4, k_end=2, total_steps=10, kind="step", switch_at=0.8) for s in range(11)
    ]
    assert steps == [4] * 8 + [2] * 3
    assert {adv.k_schedule(s, k_start=6, total_steps=3, kind="constant") for s in range(5)} == {6}
    assert [adv.k_schedule(s, k_start=1, k_end=5, total_steps=4) for s in range(5)] == [1, 2, 3, 4, 5]
    for kwargs, match in [
        ({"k_start": 0}, "k_start must be an integer >= 1"),
        ({"k_end": 0}, "k_end must be an integer >= 1"),
        ({"total_steps": 0}, "total_steps must be an integer >= 1"),
        ({"step": -1}, "step must be an integer >= 0"),
        ({"kind": "cosine"}, "kind must be 'constant', 'linear' or 'step'"),
        ({"kind": "step", "switch_at": 1.5}, r"switch_at must be a fraction of total_steps in \[0, 1\]"),
    ]:
        args = {"step": 0, "k_start": 8, "total_steps": 10, **kwargs}
        with pytest.raises(ValueError, match=match):
            adv.k_schedule(args.pop("step"), **args)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    """Same values on the GPU, output on the input's device (skipped without CUDA)."""
    cpu = torch.cat([random_groups(8, seed=1, binary=True), random_groups(8, seed=2, binary=False)]).float()
    for name, params in [("grpo", {}), ("passk", {"k": 3}), ("pkpo", {"k": 3}), ("passk_full", {"k": 4})]:
        out = adv.compute(name, cpu.cuda(), **params)
        assert out.is_cuda and torch.allclose(out.cpu(), adv.compute(name, cpu, **params), atol=1e-6), name
    entropy = torch.rand(cpu.shape[0], generator=torch.Generator().manual_seed(0))
    adaptive = adv.compute("passk_adaptive", cpu.cuda(), k=3, entropy=entropy.cuda())
    assert adaptive.is_cuda and torch.allclose(
        adaptive.cpu(), adv.compute("passk_adaptive", cpu, k=3, entropy=entropy), atol=1e-6
    )
    boot = adv.compute("passk_bootstrap", cpu.cuda(), k=3, seed=0)
    assert boot.is_cuda and torch.allclose(
        boot.cpu(), adv.compute("passk_bootstrap", cpu, k=3, seed=0), atol=1e-6
    )
