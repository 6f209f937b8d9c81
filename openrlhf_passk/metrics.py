"""Evaluation metrics: the unbiased pass@k estimator (Chen et al. 2021, Codex)."""

from __future__ import annotations

import numbers

import torch


def pass_at_k(n, c, k) -> float | torch.Tensor:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from n samples of which c are correct.

    Vectorised: n, c, k may be ints or integer-valued tensors/lists (broadcast together); all-int input
    gives a float, anything else a float64 tensor (average it over problems yourself). Computed with
    a product of min(c, k) factors in logs and expm1, so it stays accurate for n in the thousands and for
    tiny or near-1 values; the cost is O(number of problems * max min(c, k)).
    """
    scalar = all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (n, c, k))
    values = {}
    for name, x in (("n", n), ("c", c), ("k", k)):
        t = torch.as_tensor(x)
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"pass_at_k: {name} must hold integers, got {t.dtype}")
        t = t.to(torch.float64)
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise ValueError(f"pass_at_k: {name} must hold whole numbers, got {x!r}")
        values[name] = t
    n, c, k = torch.broadcast_tensors(values["n"], values["c"], values["k"])
    checks = (
        (k < 1, "k must be >= 1"),
        (k > n, "k must be <= n (cannot pick k of n samples)"),
        (c < 0, "c must be >= 0"),
        (c > n, "c (correct samples) must be <= n (samples)"),
    )
    for bad, message in checks:
        if bad.any():
            at = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()
            got = f"n={n[at].item():g}, c={c[at].item():g}, k={k[at].item():g}"
            raise ValueError(f"pass_at_k: {message}; got {got}")
    # C(n-c, k) / C(n, k) = prod_{j < min(c,k)} (1 - max(c,k) / (n - j)): a sum of log1p terms, each exact
    # to rounding, keeps tiny pass@k values accurate where log-gamma differences of ~n log n lose them.
    # Summed over j in blocks of columns, vectorised over problems.
    small, big = torch.minimum(c, k), torch.maximum(c, k)
    possible = n - c >= k  # otherwise every k-subset holds a correct sample: pass@k = 1
    log_ratio = torch.zeros_like(n)
    steps = int(small.max()) if small.numel() else 0
    for start in range(0, steps, 256):
        j = torch.arange(start, min(start + 256, steps), dtype=torch.float64)
        live = (j < small.unsqueeze(-1)) & possible.unsqueeze(-1)
        term = torch.log1p(-big.unsqueeze(-1) / (n.unsqueeze(-1) - j).clamp(min=1))
        log_ratio = log_ratio + torch.where(live, term, 0.0).sum(dim=-1)
    log_ratio = torch.where(possible, log_ratio, -torch.inf)
    out = 0.0 - torch.expm1(log_ratio)  # 0.0 - x, not -x: pass@k = 0 prints as 0, not -0
    return float(out) if scalar else out
