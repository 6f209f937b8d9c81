"""pass_at_k against exact rationals and its definition (the share of k-subsets with a correct sample)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_passk.metrics import pass_at_k


def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_equals_the_fraction_of_k_subsets_that_contain_a_correct_sample() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                hits = [any(s) for s in itertools.combinations(samples, k)]
                assert pass_at_k(n, c, k) == pytest.approx(sum(hits) / len(hits), rel=1e-12, abs=1e-15)


def test_vectorised_and_exact_for_large_n() -> None:
    n = torch.tensor([10, 10, 200, 4096, 4096, 100_000])
    c = torch.tensor([0, 10, 3, 1, 2000, 7])
    k = torch.tensor([3, 3, 100, 1, 1024, 50_000])
    got = pass_at_k(n, c, k)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == (6,)
    for value, args in zip(got.tolist(), zip(n.tolist(), c.tolist(), k.tolist(), strict=True), strict=True):
        assert value == pytest.approx(float(exact(*args)), rel=1e-9, abs=1e-300)
    # Broadcasting: a tensor of correct counts against one n and k; lists work too.
    counts = torch.arange(0, 17)
    assert torch.allclose(
        pass_at_k(16, counts, 4), torch.tensor([float(exact(16, x, 4)) for x in range(17)]).double()
    )
    assert pass_at_k([5, 5], [0, 5], 2).tolist() == [0.0, 1.0]
    assert isinstance(pass_at_k(16, 3, 4), float)
    # Tiny values keep their relative precision (1 - C(n-1, 1)/C(n, 1) = 1/n).
    assert pass_at_k(10**9, 1, 1) == pytest.approx(1e-9, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_bounded_and_monotone(n, data) -> None:
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    value = pass_at_k(n, c, k)
    assert value == pytest.approx(float(exact(n, c, k)), rel=1e-9, abs=1e-300)
    assert 0.0 <= value <= 1.0
    if c < n:
        assert pass_at_k(n, c + 1, k) >= value - 1e-12
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12
    if n - c < k:
        assert value == 1.0
    if c == 0:
        assert value == 0.0


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [
        (10, 11, 1, r"c \(correct samples\) must be <= n"),
        (10, -1, 1, r"c must be >= 0"),
        (10, 3, 11, r"k must be <= n"),
        (10, 3, 0, r"k must be >= 1"),
        (10.5, 3, 1, r"n must hold whole numbers"),
        (
            torch.tensor([4, 4]),
            torch.tensor([1, 5]),
            2,
            r"c \(correct samples\) must be <= n \(samples\); got n=4, c=5, k=2",
        ),
        (torch.tensor([True]), 0, 1, r"n must hold integers"),
        (10, float("nan"), 1, r"c must hold whole numbers"),
    ],
)
def test_bad_input(n, c, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)
