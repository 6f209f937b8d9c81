"""`sandbox_stats` against independent values: scipy's t distribution, closed forms, exact enumeration of sign
patterns and of bootstrap resamples, and a simulation of the power the detectable-effect formula promises."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from openrlhf_passk import sandbox_stats as st


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 30])
def test_t_quantiles_and_cdf_match_scipy(df):
    for p in (0.001, 0.025, 0.2, 0.5, 0.8, 0.9, 0.975, 0.999):
        assert st.t_ppf(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
    for t in (-40.0, -3.0, -0.5, 0.0, 0.7, 2.5, 12.0):
        assert st.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-10, abs=1e-14)


def test_t_quantiles_match_closed_forms():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert st.t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
        assert st.t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_t_interval_matches_scipy():
    x = [0.12, 0.03, -0.05, 0.2, 0.08]
    want = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert st.t_interval(x) == pytest.approx(want, rel=1e-9)
    assert st.t_interval([0.1]) is None


def brute_force_p(diffs, alternative):
    """Every sign pattern of every maze, written out: the statistic is the mean over seeds of per-seed means."""
    flat = [(s, x) for s, d in enumerate(diffs) for x in d]
    observed = np.mean([np.mean(d) for d in diffs])
    hits = 0
    patterns = list(itertools.product((1, -1), repeat=len(flat)))
    for signs in patterns:
        per_seed = [[] for _ in diffs]
        for sign, (s, x) in zip(signs, flat, strict=True):
            per_seed[s].append(sign * x)
        t = np.mean([np.mean(v) for v in per_seed])
        if alternative == "greater":
            hits += t >= observed - 1e-12
        else:
            hits += abs(t) >= abs(observed) - 1e-12
    return hits / len(patterns)


@pytest.mark.parametrize("alternative", ["two-sided", "greater"])
def test_permutation_p_matches_exact_enumeration(alternative):
    # Two seeds of unequal size (so per-seed weighting matters), one zero difference, one tie in magnitude.
    diffs = [np.array([0.3, 0.1, -0.05, 0.0]), np.array([0.2, 0.2, -0.1, 0.4, 0.15, -0.3])]
    want = brute_force_p(diffs, alternative)
    assert 0.01 < want < 0.6  # not a trivial case
    rng = np.random.default_rng(0)
    assert st.paired_permutation_p(diffs, n_perm=1, rng=rng, alternative=alternative) == pytest.approx(want)
    # The Monte Carlo path (forced), within 4 standard errors of the exact value.
    n = 200_000
    got = st.paired_permutation_p(diffs, n_perm=n, rng=rng, alternative=alternative, exact_up_to=0)
    assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n) + 1 / n


def test_permutation_p_of_a_large_clear_effect_is_small_and_of_noise_is_not():
    rng = np.random.default_rng(1)
    shifted = [rng.normal(0.3, 1, 300) for _ in range(3)]
    assert st.paired_permutation_p(shifted, n_perm=2000, rng=rng) == pytest.approx(1 / 2001)
    noise = [rng.normal(0, 1, 300) for _ in range(3)]
    assert st.paired_permutation_p(noise, n_perm=2000, rng=rng) > 0.01


def test_two_level_bootstrap_sd_matches_its_closed_form():
    """Equal cluster sizes: Var(T*) = (1/S) [mean_s v_s / L_s + mean_s (m_s - m)^2], v_s the population variance
    of seed s's cluster means, m_s their mean and m the mean of the m_s (law of total variance)."""
    rng = np.random.default_rng(2)
    diffs, clusters, within, means = [], [], [], []
    for shift, n_clusters in ((0.0, 40), (0.2, 25), (-0.1, 60)):
        d = rng.normal(shift, 0.5, (n_clusters, 3))  # 3 mazes per cluster
        diffs.append(d.ravel())
        clusters.append(np.repeat(np.arange(n_clusters), 3))
        cm = d.mean(1)
        within.append(cm.var() / n_clusters)
        means.append(cm.mean())
    want = math.sqrt((np.mean(within) + np.var(means)) / 3)
    got = st.two_level_bootstrap(diffs, clusters, n_boot=40_000, rng=rng)
    assert got["sd"] == pytest.approx(want, rel=0.03)
    lo, hi = got["interval"]
    assert lo < np.mean(means) < hi


def test_two_level_bootstrap_matches_exact_enumeration_with_unequal_clusters():
    """One seed, three clusters of sizes 1, 2 and 3: all 27 cluster resamples, each with probability 1/27."""
    d = np.array([1.0, 0.0, 2.0, -1.0, 0.5, 4.0])
    c = np.array([0, 1, 1, 2, 2, 2])
    groups = [d[c == i] for i in range(3)]
    values = []
    for draw in itertools.product(range(3), repeat=3):
        picked = np.concatenate([groups[i] for i in draw])
        values.append(picked.mean())
    got = st.two_level_bootstrap([d], [c], n_boot=60_000, rng=np.random.default_rng(3))
    assert got["sd"] == pytest.approx(np.std(values), rel=0.02)
    # The 2.5% and 97.5% points of the exact distribution bracket the Monte Carlo interval's ends closely.
    assert got["interval"][0] == pytest.approx(np.quantile(values, 0.025), abs=0.05)
    assert got["interval"][1] == pytest.approx(np.quantile(values, 0.975), abs=0.05)


def test_holm_matches_the_step_down_procedure():
    p = [0.01, 0.04, 0.03, 0.5]
    # By hand: sorted 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08 -> 0.09 (monotone); 0.5 x 1 = 0.5.
    assert st.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    # Rejections at alpha agree with Holm's sequential rule: reject p_(j) while p_(j) <= alpha / (m - j + 1).
    rng = np.random.default_rng(4)
    for _ in range(200):
        p = rng.uniform(0, 0.1, 5)
        adjusted = st.holm(p)
        rejected, m = set(), len(p)
        for j, i in enumerate(np.argsort(p)):
            if p[i] > 0.05 / (m - j):
                break
            rejected.add(int(i))
        assert {i for i in range(m) if adjusted[i] <= 0.05} == rejected


def test_min_detectable_effect_has_the_promised_power():
    """At the detectable effect, a 5-seed t interval excludes 0 about 80% of the time (noncentral t)."""
    sd, n = 1.0, 5
    mde = st.min_detectable_effect(sd, n, bootstrap_sd=0.0)
    power = 1 - stats.nct.cdf(stats.t.ppf(0.975, n - 1), n - 1, mde / (sd / math.sqrt(n)))
    assert 0.75 < power < 0.85
    # With one seed only the bootstrap part counts: (1.96 + 0.84) * its sd.
    assert st.min_detectable_effect(None, 1, 0.01) == pytest.approx((1.959964 + 0.841621) * 0.01, rel=1e-5)
