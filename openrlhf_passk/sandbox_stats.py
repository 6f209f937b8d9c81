"""Statistics for the sandbox's paired comparisons, in numpy only (scipy is not a runtime dependency).

The design they serve: per seed, every arm is trained from the same SFT weights and evaluated on the same
held-out mazes, so a contrast "arm a - arm b" has one paired difference d per maze. Mazes come in clusters
(wall-layout symmetry classes) within a seed, and seeds are independent replications of the whole pipeline.

- `t_interval`: the seed-level interval, from the per-seed mean differences (S values, S - 1 degrees of freedom):
  the uncertainty of "what this training recipe does", training noise included.
- `two_level_bootstrap`: resample seeds, then clusters within each drawn seed; percentile interval of the mean.
- `paired_permutation_p`: sign-flip test of the per-maze differences, stratified by seed (a maze's two arms
  are swapped, never mazes across seeds): "are these trained models different on these mazes".
- `holm`: Holm's step-down adjustment over a family of p-values.
- `min_detectable_effect`: the smallest true effect the intervals would exclude 0 for with the given power.

Every statistic of a contrast is the mean over seeds of the per-seed mean over mazes (seeds weigh equally).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

__all__ = [
    "holm",
    "min_detectable_effect",
    "paired_permutation_p",
    "t_cdf",
    "t_interval",
    "t_ppf",
    "two_level_bootstrap",
]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (df > 0)."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom, by bisection on `t_cdf`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided `level` interval for the mean of `values` (Student's t); None for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    half = t_ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def _grand_mean(diffs: Sequence[np.ndarray]) -> float:
    return float(np.mean([np.mean(d) for d in diffs]))


def two_level_bootstrap(
    diffs: Sequence[np.ndarray],
    clusters: Sequence[np.ndarray],
    *,
    n_boot: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> dict:
    """Percentile bootstrap of the mean over seeds of the per-seed mean difference.

    One replicate draws S seeds with replacement; for each drawn seed it draws that seed's clusters with
    replacement (as many as it has) and takes the mean of d over the mazes of the drawn clusters. A seed drawn
    twice gets two independent cluster draws. Returns {"interval": [lo, hi], "sd": bootstrap standard error}.
    """
    n_seeds = len(diffs)
    if n_seeds == 0 or len(clusters) != n_seeds:
        raise ValueError("two_level_bootstrap: need one cluster array per seed's differences")
    sums, sizes = [], []
    for d, c in zip(diffs, clusters, strict=True):
        d, c = np.asarray(d, dtype=np.float64), np.asarray(c)
        if d.shape != c.shape or d.size == 0:
            raise ValueError("two_level_bootstrap: each seed needs as many cluster ids as differences, and some")
        _, inverse = np.unique(c, return_inverse=True)
        sums.append(np.bincount(inverse, weights=d))
        sizes.append(np.bincount(inverse).astype(np.float64))
    picks = rng.integers(n_seeds, size=(n_boot, n_seeds))
    seed_means = np.empty((n_boot, n_seeds))
    for s in range(n_seeds):
        where = np.nonzero(picks == s)
        n_clusters = len(sums[s])
        step = max(1, 2_000_000 // n_clusters)  # bounded memory per chunk of draws
        values = []
        for start in range(0, len(where[0]), step):
            count = min(step, len(where[0]) - start)
            draw = rng.integers(n_clusters, size=(count, n_clusters))
            values.append(sums[s][draw].sum(1) / sizes[s][draw].sum(1))
        seed_means[where] = np.concatenate(values) if values else np.empty(0)
    stats = seed_means.mean(1)
    alpha = 1.0 - level
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return {"interval": [float(lo), float(hi)], "sd": float(stats.std(ddof=1))}


def paired_permutation_p(
    diffs: Sequence[np.ndarray],
    *,
    n_perm: int,
    rng: np.random.Generator,
    alternative: str = "two-sided",
    exact_up_to: int = 16,
) -> float:
    """p-value of the paired sign-flip test of T = mean over seeds of the per-seed mean difference.

    Under H0 (the two arms are exchangeable on every maze) each maze's difference keeps or flips its sign with
    probability 1/2, independently; mazes stay in their seed. With at most `exact_up_to` non-zero differences
    the 2^M sign patterns are enumerated (exact p); otherwise p = (1 + #{T* at least as extreme}) / (1 + n_perm)
    over random patterns. alternative: "two-sided", "greater" (H1: T > 0) or "less".
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"paired_permutation_p: alternative must be two-sided, greater or less, not {alternative!r}")
    n_seeds = len(diffs)
    weights = np.concatenate([np.full(len(d), 1.0 / (n_seeds * len(d))) for d in diffs])
    d = np.concatenate([np.asarray(x, dtype=np.float64) for x in diffs]) * weights
    d = d[d != 0]  # a zero difference is the same under either sign
    observed = float(d.sum())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # equal sums that differ only by rounding count as ties

    def extreme(t: np.ndarray) -> np.ndarray:
        if alternative == "greater":
            return t >= observed - tol
        if alternative == "less":
            return t <= observed + tol
        return np.abs(t) >= abs(observed) - tol

    if len(d) <= exact_up_to:
        patterns = ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1) * 2 - 1
        return float(extreme(patterns @ d).mean())
    hits = 0
    step = max(1, 4_000_000 // len(d))
    for start in range(0, n_perm, step):
        count = min(step, n_perm - start)
        signs = rng.integers(0, 2, size=(count, len(d)), dtype=np.int8) * 2 - 1
        hits += int(extreme(signs @ d).sum())
    return (1 + hits) / (1 + n_perm)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]).clip(max=1.0)
    out = np.empty(m)
    out[order] = adjusted
    return [float(x) for x in out]


def min_detectable_effect(
    seed_sd: float | None, n_seeds: int, bootstrap_sd: float, *, level: float = 0.95, power: float = 0.8
) -> float:
    """The smallest true effect that both intervals exclude 0 for with probability about `power`.

    Seed-level t interval: (t_{(1+level)/2, S-1} + t_{power, S-1}) * sd / sqrt(S), with the observed seed sd;
    bootstrap interval: (z_{(1+level)/2} + z_power) * bootstrap sd. The larger of the two binds."""
    z = NormalDist()
    boot = (z.inv_cdf(0.5 + level / 2) + z.inv_cdf(power)) * bootstrap_sd
    if seed_sd is None or n_seeds < 2:
        return float(boot)
    df = n_seeds - 1
    seed = (t_ppf(0.5 + level / 2, df) + t_ppf(power, df)) * seed_sd / math.sqrt(n_seeds)
    return float(max(seed, boot))
