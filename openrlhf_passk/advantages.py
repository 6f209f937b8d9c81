"""Advantage estimators for Pass@k Training: a registry of plain functions over a (G, N) reward tensor.

G prompts, N rollouts each. Every estimator is `fn(rewards, *, k, <variant params>) -> (G, N)` advantages
with the dtype and device of `rewards`; the math runs in float64. Formulas and their sources:
`ALGORITHMS.md` (Chen et al. 2025 "Pass@k Training", Walder & Karkhanis 2025 "PKPO").

    from openrlhf_passk import advantages
    adv = advantages.compute("passk", rewards, k=4)
    adv = advantages.compute("passk_adaptive", rewards, k=4, entropy=entropy_per_prompt, split=0.5)

    @advantages.register("my_estimator")
    def my_estimator(rewards, *, k): ...
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

# Per-step inputs a training integration supplies to the estimators that declare them (keyword parameters
# that are not settings): name -> what it is.
INPUTS = {"entropy": "(G,) each prompt's mean response token entropy under the policy at rollout time"}


@dataclass(frozen=True)
class Estimator:
    """A registered estimator and what it declares about itself (see `register`)."""

    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...] = ()
    binary: bool = False
    check: Callable[[int, dict], None] | None = None
    logs: Callable[..., dict[str, torch.Tensor]] | None = None
    probes: Callable[[dict], list[dict]] | None = None


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}


def register(
    name: str,
    *,
    override: bool = False,
    inputs: tuple[str, ...] = (),
    binary: bool = False,
    check: Callable[[int, dict], None] | None = None,
    logs: Callable[..., dict[str, torch.Tensor]] | None = None,
    probes: Callable[[dict], list[dict]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: add an estimator `fn(rewards: Tensor[G, N], **params) -> Tensor[G, N]` under `name`.

    What it declares, so that a training integration treats every estimator, a user's included, alike:
    - inputs: keyword parameters supplied per step rather than set by the user (names from `INPUTS`);
    - binary: defined for 0/1 rewards only (continuous rewards or length penalties are refused up front);
    - check(n, params): raises ValueError for settings that cannot work with n rollouts per prompt, before
      training; the estimator's own checks of its parameters run too, on probe rewards;
    - logs(rewards, advantages, **params): {name: (G, 1) tensor} of extra per-prompt metrics to log;
    - probes(params): parameter variants covering every case the per-step inputs can select (used to
      find the reward patterns that give a zero advantage before training).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ValueError(f"register({name!r}): unknown inputs {unknown}; the per-step inputs are {sorted(INPUTS)}")

    def decorator(fn: Callable) -> Callable:
        if name in ADVANTAGE_ESTIMATORS and not override:
            raise ValueError(
                f"register: an advantage estimator named {name!r} already exists; "
                "pick another name or pass override=True to replace it"
            )
        keywords, takes_any = _keywords(fn)
        missing = [i for i in inputs if i not in keywords and not takes_any]
        if missing:
            raise ValueError(f"register({name!r}): inputs {missing} are not keyword parameters of {fn.__name__}")
        ADVANTAGE_ESTIMATORS[name] = Estimator(fn, tuple(inputs), binary, check, logs, probes)
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove the estimator `name` (ValueError if there is none), e.g. one a test registered."""
    get(name)
    del ADVANTAGE_ESTIMATORS[name]


def available() -> list[str]:
    """Names of the registered estimators, in registration order."""
    return list(ADVANTAGE_ESTIMATORS)


def get(name: str) -> Callable[..., torch.Tensor]:
    """The estimator function registered under `name` (ValueError listing the known names otherwise)."""
    return spec(name).fn


def spec(name: str) -> Estimator:
    """The estimator registered under `name` with its declarations (ValueError listing the known names)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; available: {', '.join(available())}")
    return ADVANTAGE_ESTIMATORS[name]


def compute(name: str, rewards: torch.Tensor, **params) -> torch.Tensor:
    """Advantages of `rewards` (G, N) by the estimator `name`, with its keyword parameters checked first.

    Unknown or missing parameters, a bad `k` and bad rewards raise ValueError before anything is computed;
    users' estimators added with `register` get the same checks as the built-in ones, once per call.
    """
    fn = get(name)
    keywords, takes_any = _keywords(fn)
    unknown = sorted(set(params) - set(keywords))
    if unknown and not takes_any:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for advantage estimator {name!r}; "
            f"it accepts: {', '.join(keywords) or 'no parameters'}"
        )
    missing = [p for p, required in keywords.items() if required and p not in params]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs parameter(s): {', '.join(missing)}")
    if keywords.get("k") and params["k"] is None:  # the checks below read k=None as "no k to check"
        raise ValueError(f"advantage estimator {name!r} needs an integer k, got k=None")
    # The estimators of this module validate their input themselves: checking here too would pass over
    # the rewards twice, which costs more than the binary `passk` itself (ALGORITHMS.md section 6).
    if getattr(fn, "__module__", None) != __name__:
        _check(rewards, params.get("k"))
    out = fn(rewards, **params)
    if not isinstance(out, torch.Tensor) or out.shape != rewards.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"advantage estimator {name!r} returned {got}, expected shape {tuple(rewards.shape)}"
        )
    return out


@functools.lru_cache(maxsize=256)
def _keywords(fn: Callable) -> tuple[dict[str, bool], bool]:
    """({keyword parameter after rewards: required?}, takes **kwargs) of an estimator; cached per function."""
    parameters = list(inspect.signature(fn).parameters.values())
    keywords = {
        p.name: p.default is p.empty for p in parameters[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    return keywords, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _check(rewards: torch.Tensor, k: int | None = None, *, binary: str = "") -> torch.Tensor:
    """Validate a (G, N) reward tensor (and k, if given); return it as float64.

    `binary` names an estimator that is only defined for 0/1 rewards.
    """
    _check_shape(rewards, k)
    r = rewards.detach().to(torch.float64)
    if not torch.isfinite(r).all():
        g, i = (int(x) for x in (~torch.isfinite(r)).nonzero()[0])
        raise ValueError(f"rewards must be finite; rewards[{g}, {i}] = {r[g, i].item()} (NaN or inf)")
    if binary:
        not01 = (r != 0) & (r != 1)
        if not01.any():
            g, i = (int(x) for x in not01.nonzero()[0])
            raise ValueError(
                f"rewards must be binary (0 or 1) for {binary!r}, got rewards[{g}, {i}] = {r[g, i].item()}; "
                "use 'passk' or 'pkpo', which also take continuous rewards"
            )
    return r


def _check_shape(rewards: torch.Tensor, k: int | None = None) -> None:
    """The checks of `_check` that do not read the values: type, shape, dtype and k."""
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape (G, N), got {type(rewards).__name__}")
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(
            f"rewards must have shape (G, N) = (prompts, rollouts per prompt) with N >= 1, got "
            f"{tuple(rewards.shape)}; reshape flat rewards with rewards.view(-1, n_samples_per_prompt)"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}; use rewards.float()")
    n = rewards.shape[1]
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(f"k must be an integer, got {k!r}")
        if not 1 <= k <= n:
            raise ValueError(
                f"k must satisfy 1 <= k <= N, got k={k} with N={n} rollouts per prompt; "
                "lower k or raise n_samples_per_prompt"
            )


def _log_comb(n, r) -> torch.Tensor:
    """log C(n, r) in float64, broadcasting; -inf where C(n, r) = 0 (r < 0 or r > n)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    r = torch.as_tensor(r, dtype=torch.float64)
    n0, r0 = n.clamp(min=0), r.clamp(min=0)
    out = torch.lgamma(n0 + 1) - torch.lgamma(r0 + 1) - torch.lgamma((n0 - r0).clamp(min=0) + 1)
    return torch.where((r >= 0) & (r <= n), out, torch.full_like(out, -math.inf))


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per row, population std; rows whose values are all equal give 0."""
    # Scale first so huge rewards cannot overflow the squares; the result is scale-free anyway.
    x = x / x.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    centred = x - x.mean(dim=1, keepdim=True)
    # Centre twice: for nearly tied values the rounded mean is off by an ulp that is as large as the
    # spread itself; the second pass removes it (the result then sums to zero, as it must).
    centred = centred - centred.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    # Test constancy exactly: a rounded mean can leave a tiny non-zero std for equal values.
    constant = (x == x[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, 0.0, centred / torch.where(constant, 1.0, std))


def _contains_max_mean(v: torch.Tensor, k: int) -> torch.Tensor:
    """For rows `v` sorted ascending: at position p, the mean over the k-subsets containing p of their max.

    Of the C(N-1, k-1) subsets containing p, C(p-1, k-1) have p itself as the max and C(j-2, k-2) have
    the larger position j as the max (positions 1-based), so the mean is
    (C(p-1, k-1) v_p + sum_{j > p} C(j-2, k-2) v_j) / C(N-1, k-1): one suffix sum per row.
    """
    n = v.shape[1]
    j = torch.arange(1, n + 1, dtype=torch.float64, device=v.device)
    log_norm = _log_comb(n - 1, k - 1)
    self_max = torch.exp(_log_comb(j - 1, k - 1) - log_norm)
    other_max = torch.exp(_log_comb(j - 2, k - 2) - log_norm)
    suffix = (other_max * v).flip(1).cumsum(1).flip(1)
    above = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)
    return self_max * v + above


def _loo_max_mean(v: torch.Tensor, m: int) -> torch.Tensor:
    """For rows `v` sorted ascending: at position p, the mean max over the m-subsets of the OTHER N-1 values.

    Without p, position j < p keeps rank j and j > p becomes rank j-1, so the mean is
    (sum_{j < p} C(j-1, m-1) v_j + sum_{j > p} C(j-2, m-1) v_j) / C(N-1, m).
    """
    n = v.shape[1]
    j = torch.arange(1, n + 1, dtype=torch.float64, device=v.device)
    log_norm = _log_comb(n - 1, m)
    below_w = torch.exp(_log_comb(j - 1, m - 1) - log_norm)
    above_w = torch.exp(_log_comb(j - 2, m - 1) - log_norm)
    prefix = (below_w * v).cumsum(1)
    below = torch.cat([torch.zeros_like(prefix[:, :1]), prefix[:, :-1]], dim=1)
    suffix = (above_w * v).flip(1).cumsum(1).flip(1)
    above = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)
    return below + above


@functools.lru_cache(maxsize=256)
def _passk_binary_table(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A_pos and A_neg of `passk` for N_pos = 0..n correct answers (CPU float64, cached per (n, k)).

    With q = C(N_neg, k)/C(N, k) the formulas reduce to A_pos = sqrt(q / (1 - q)) and
    A_neg = -(N_pos / N_neg) A_pos, because C(N_neg-1, k-1)/C(N-1, k-1) = q N / N_neg.
    """
    n_pos = torch.arange(n + 1, dtype=torch.float64)
    n_neg = n - n_pos
    # log q by the running product q(N_pos) = q(N_pos - 1) (N_neg + 1 - k) / (N_neg + 1): each factor is
    # exact to rounding, and logs keep q meaningful far below float64's range (N = 4096, k = 1024).
    factor = torch.log1p(-k / (n - n_pos[1:] + 1).clamp(min=k + 1))
    log_q = torch.cat([torch.zeros(1, dtype=torch.float64), factor.cumsum(0)])
    log_q = torch.where(n_neg >= k, log_q, -math.inf)
    # 1 - q = -expm1(log q) stays accurate when q is close to 1 (one correct answer among many).
    live = (n_pos > 0) & (n_neg >= k)  # sigma = 0 otherwise: all advantages 0
    safe_log_q = torch.where(live, log_q, -1.0)
    a_pos = torch.where(live, torch.exp(0.5 * (safe_log_q - torch.log(-torch.expm1(safe_log_q)))), 0.0)
    a_neg = -n_pos / n_neg.clamp(min=1) * a_pos + 0.0  # + 0.0 turns -0.0 into 0.0
    return a_pos, a_neg


@functools.lru_cache(maxsize=256)
def _passk_binary_table_as(
    n: int, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_passk_binary_table` rounded once to the rewards' dtype and moved to their device."""
    return tuple(t.to(device=device, dtype=dtype) for t in _passk_binary_table(n, k))


@register("grpo")
def grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Pass@1 (GRPO): A_i = (r_i - mean(r)) / std(r), population std; 0 where std == 0.

    OpenRLHF's `group_norm` divides by the Bessel-corrected std (+1e-9) instead, a factor sqrt((N-1)/N)
    apart; the population std makes passk with k = 1 equal this exactly.
    """
    return _standardise(_check(rewards)).to(rewards.dtype)


@register("passk")
def passk(rewards: torch.Tensor, *, k: int) -> torch.Tensor:
    """Analytic Pass@k (default): the exact expectation of full-sampling advantages over all k-subsets.

    Binary: Rbar = 1 - C(N_neg,k)/C(N,k), sigma = sqrt(Rbar (1 - Rbar)), A_pos = (1 - Rbar)/sigma,
    A_neg = (1 - Rbar - C(N_neg-1,k-1)/C(N-1,k-1))/sigma; 0 when sigma = 0.
    Continuous (order statistics, r sorted ascending): w_j = C(j-1,k-1)/C(N,k) = P(subset max is r_j),
    Rbar = sum_j w_j r_j, sigma^2 = sum_j w_j (r_j - Rbar)^2, d_j = (r_j - Rbar)/sigma and
    A_p = (C(p-1,k-1) d_p + sum_{j>p} C(j-2,k-2) d_j) / C(N-1,k-1). Exact, O(N log N) per group.
    """
    _check_shape(rewards, k)
    r = rewards.detach()
    # Binary fast path: one table gather per row (ALGORITHMS.md section 6). r (r - 1) is exactly 0 for
    # r in {0, 1} and non-zero for any other float, NaN and inf included (it cannot underflow: |r - 1|
    # >= 1/2 when r is tiny), so the sum of its absolute values is 0 only for 0/1 rewards. Float
    # arithmetic costs far less here than comparisons with ==, which build bool tensors.
    if not (r * (r - 1)).abs().sum():
        a_pos, a_neg = _passk_binary_table_as(r.shape[1], k, r.dtype, r.device)
        n_pos = r.sum(dim=1, dtype=torch.float64).long()
        # Products with exact 0s and 1s select a_pos or a_neg without rounding.
        return r * a_pos[n_pos].unsqueeze(1) + (1 - r) * a_neg[n_pos].unsqueeze(1)
    return _passk_sorted(_check(rewards, k), k).to(rewards.dtype)


def _passk_sorted(r: torch.Tensor, k: int) -> torch.Tensor:
    """The general `passk` for checked float64 rewards (any values): the order-statistics formulas."""
    n = r.shape[1]
    v, order = r.sort(dim=1)
    # Work in units of the group's range, measured down from its top value: then top - Rbar is a sum of
    # non-negative terms and stays accurate when sigma is tiny. The advantage is shift/scale-free.
    v = v / v.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    span = v[:, -1:] - v[:, :1]
    x = (v - v[:, -1:]) / torch.where(span > 0, span, 1.0)
    j = torch.arange(1, n + 1, dtype=torch.float64, device=r.device)
    w = torch.exp(_log_comb(j - 1, k - 1) - _log_comb(n, k))
    dev = x - (w * x).sum(dim=1, keepdim=True)  # r_j - Rbar
    sigma = (w * dev.pow(2)).sum(dim=1, keepdim=True).sqrt()
    # The subset max is constant exactly when the k-th smallest equals the largest (w_j = 0 for j < k).
    constant = (v[:, k - 1 : k] == v[:, -1:]) | (sigma == 0)
    adv = _contains_max_mean(dev / torch.where(constant, 1.0, sigma), k)
    adv = torch.where(constant, 0.0, adv)
    return torch.empty_like(adv).scatter_(1, order, adv)


def _check_passk_full(n: int, params: dict) -> None:
    k = params.get("k")
    if isinstance(k, int) and k >= 1 and n % k:
        raise ValueError(
            f"passk_full splits the N={n} rollouts of a prompt into groups of k={k}, so N must be a multiple of k; "
            f"choose k among {[d for d in range(1, n + 1) if n % d == 0]} or use 'passk'"
        )


@register("passk_full", check=_check_passk_full)
def passk_full(rewards: torch.Tensor, *, k: int) -> torch.Tensor:
    """Full sampling: disjoint groups of k rollouts, in order; each gets its group's standardised max.

    R_g = max of group g; A_g = (R_g - mean R) / std R over the N/k groups (population std, 0 if
    std == 0); every response gets its group's A_g. N % k != 0 is an error.
    """
    r = _check(rewards, k)
    g, n = r.shape
    _check_passk_full(n, {"k": k})
    group_max = r.view(g, n // k, k).amax(dim=2)
    return _standardise(group_max).repeat_interleave(k, dim=1).to(rewards.dtype)


@register("passk_bootstrap")
def passk_bootstrap(
    rewards: torch.Tensor,
    *,
    k: int,
    num_groups: int | None = None,
    seed: int | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Bootstrap sampling: M random k-subsets per prompt; each rollout averages its subsets' advantages.

    Draw M = num_groups (default N) groups of k distinct rollouts per prompt (independent groups);
    A_g = (R_g - mean R) / std R over the M group maxima R_g (population std, 0 if std == 0);
    A_i = mean (reduce="mean") or sum (reduce="sum", the paper's literal form) of A_g over the groups
    containing i, 0 if none. Converges to `passk` as M grows. seed=None draws from torch's global RNG.
    """
    r = _check(rewards, k)
    g, n = r.shape
    m = n if num_groups is None else num_groups
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"num_groups must be a positive integer (default N), got {num_groups!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    # k distinct indices per group = the k smallest of N uniform keys. Keys are drawn in chunks of
    # prompts so that memory stays bounded (G * M * N keys would not fit for N in the thousands).
    rows = max(1, 2**22 // (m * n))
    chunks = [torch.zeros(0, m, k, dtype=torch.long)]
    for start in range(0, g, rows):
        keys = torch.rand(min(rows, g - start), m, n, generator=generator, dtype=torch.float64)
        chunks.append(keys.topk(k, dim=2, largest=False).indices)
    idx = torch.cat(chunks).to(r.device)
    group_max = r.gather(1, idx.view(g, m * k)).view(g, m, k).amax(dim=2)
    group_adv = _standardise(group_max).repeat_interleave(k, dim=1)
    flat = idx.view(g, m * k)
    total = torch.zeros_like(r).scatter_add_(1, flat, group_adv)
    if reduce == "mean":
        count = torch.zeros_like(r).scatter_add_(1, flat, torch.ones_like(group_adv))
        total = total / count.clamp(min=1)
    return total.to(rewards.dtype)


@register("pkpo")
def pkpo(rewards: torch.Tensor, *, k: int, baseline: str = "loo-1") -> torch.Tensor:
    """PKPO transformed rewards (unbiased gradient weights for max@k; pass@k for 0/1 rewards).

    s_i = (1/C(N,k)) sum over the k-subsets containing i of the subset max; binary: k/N if correct,
    (k/N) (1 - C(N-1-c,k-1)/C(N-1,k-1)) if wrong (c correct). Baselines from the other N-1 rewards g_-i,
    with rho(g; m) = mean over m-subsets of g of the subset max:
    "none": s_i; "loo": s_i - k/(N-1) rho(g_-i; k) (needs k <= N-1);
    "loo-1" (default): s_i - (k/N) rho(g_-i; k-1) = (k/N) mean over (k-1)-subsets T of the others of
    max(r_i - max T, 0); binary: wrong -> 0, correct -> (k/N) C(N-c,k-1)/C(N-1,k-1).
    At k = 1 there are no (k-1)-subsets to compare with, so "loo-1" uses the "loo" baseline there.
    """
    r = _check(rewards, k)
    n = r.shape[1]
    if baseline not in ("none", "loo", "loo-1"):
        raise ValueError(f"baseline must be one of 'none', 'loo', 'loo-1', got {baseline!r}")
    requested = baseline
    if baseline == "loo-1" and k == 1:
        baseline = "loo"
    if baseline == "loo" and k > n - 1:
        raise ValueError(
            f"baseline={requested!r} with k={k} averages over k-subsets of the other N-1 rollouts, so it "
            f"needs k <= N-1; got N={n}; use baseline='loo-1' (k >= 2), 'none', or more rollouts"
        )
    v, order = r.sort(dim=1)
    if baseline == "loo-1":
        # The marginal form: only the C(L, k-1) subsets T of the L values strictly below r_i count, and
        # sum_T max T = sum_{j <= L} C(j-1, k-2) v_j. Unlike s_i minus a baseline, for 0/1 rewards this
        # subtracts nothing: tiny advantages keep their precision and wrong answers get exactly 0.
        v = v - v[:, :1]
        below = torch.searchsorted(v, v)  # L per position: ties are not below
        j = torch.arange(1, n + 1, dtype=torch.float64, device=r.device)
        log_norm = _log_comb(n - 1, k - 1)
        prefix = torch.cat(
            [torch.zeros_like(v[:, :1]), (torch.exp(_log_comb(j - 1, k - 2) - log_norm) * v).cumsum(1)], 1
        )
        adv = k / n * (torch.exp(_log_comb(below, k - 1) - log_norm) * v - prefix.gather(1, below))
    else:
        adv = k / n * _contains_max_mean(v, k)
        if baseline == "loo":
            adv = adv - k / (n - 1) * _loo_max_mean(v, k)
    return torch.empty_like(adv).scatter_(1, order, adv).to(rewards.dtype)


@register("passk_combination", binary=True)
def passk_combination(rewards: torch.Tensor, *, k: int) -> torch.Tensor:
    """Combination (binary): A = (N_pos/N) A_passk + (1 - N_pos/N) A_grpo.

    Easy prompts (many correct) lean on Pass@k, hard ones on Pass@1."""
    r = _check(rewards, k, binary="passk_combination")
    share = r.mean(dim=1, keepdim=True)
    return (share * passk(r, k=k) + (1 - share) * grpo(r)).to(rewards.dtype)


@register("passk_exceed", binary=True)
def passk_exceed(
    rewards: torch.Tensor, *, k: int, f: str | Callable[[torch.Tensor, int], torch.Tensor] = "linear"
) -> torch.Tensor:
    """Exceeding (binary): A = f(N_pos) A_passk, f non-increasing in N_pos so hard prompts weigh more.

    f="linear" (default): f(N_pos) = 1 - N_pos/N, the share of wrong rollouts (the paper's f is garbled
    in public copies). Or a callable f(n_pos: Tensor of 0..N, N) -> Tensor of N+1 finite weights.
    """
    r = _check(rewards, k, binary="passk_exceed")
    n = r.shape[1]
    n_pos = torch.arange(n + 1, dtype=torch.float64, device=r.device)
    if f == "linear":
        weight = 1 - n_pos / n
    elif callable(f):
        weight = torch.as_tensor(f(n_pos, n), dtype=torch.float64, device=r.device)
        if weight.shape != n_pos.shape or not torch.isfinite(weight).all() or (weight.diff() > 0).any():
            raise ValueError(
                f"f must map N_pos = 0..{n} to {n + 1} finite, non-increasing weights; got {weight.tolist()}"
            )
    else:
        raise ValueError(f"f must be 'linear' or a callable f(n_pos, N), got {f!r}")
    return (weight[r.sum(dim=1).long()].unsqueeze(1) * passk(r, k=k)).to(rewards.dtype)


def _adaptive_logs(
    rewards: torch.Tensor, advantages: torch.Tensor, *, entropy: torch.Tensor, split: float = 0.5, **_
) -> dict[str, torch.Tensor]:
    """Per prompt: in the Pass@1 arm (1/0), and the step's entropy split point (the same for all prompts),
    midway between the last Pass@1 and the first Pass@k prompt's entropy."""
    g = entropy.shape[0]
    mask = adaptive_pass1_mask(entropy.double(), split)
    n_pass1 = int(mask.sum())
    values = torch.sort(entropy.double(), descending=True).values
    if n_pass1 == 0:
        point = values[0]
    elif n_pass1 == g:
        point = values[-1]
    else:
        point = (values[n_pass1 - 1] + values[n_pass1]) / 2
    return {"adaptive_pass1_frac": mask.double().unsqueeze(1), "adaptive_entropy_split": point.expand(g, 1)}


@register(
    "passk_adaptive",
    inputs=("entropy",),
    logs=_adaptive_logs,
    # All prompts in one arm or the other: a reward pattern learns nothing only if both arms give it 0.
    probes=lambda params: [{**params, "split": 0.0}, {**params, "split": 1.0}],
)
def passk_adaptive(rewards: torch.Tensor, *, k: int, entropy: torch.Tensor, split: float = 0.5) -> torch.Tensor:
    """Adaptive (Chen et al. 2025, "implicit reward design"): entropy picks Pass@1 or Pass@k per prompt.

    entropy: (G,), each prompt's mean response token entropy. Rank prompts by entropy, highest first,
    ties by prompt index (lower index ranks higher); the top P = floor(G * split + 1/2) prompts (round
    half up on split's decimal value, not Python's round-half-even: G=5, split=0.5 gives 3) get A_grpo,
    the other G - P get A_passk. split=0 is `passk`, split=1 is `grpo`, exactly.
    """
    r = _check(rewards, k)
    g = r.shape[0]
    if not isinstance(entropy, torch.Tensor) or entropy.shape != (g,) or not entropy.is_floating_point():
        got = (
            f"{entropy.dtype} tensor of shape {tuple(entropy.shape)}"
            if isinstance(entropy, torch.Tensor)
            else type(entropy).__name__
        )
        raise ValueError(
            f"passk_adaptive: entropy must be a floating-point tensor of shape (G,) = ({g},), one mean "
            f"response token entropy per prompt in the rewards' row order, got {got}; average per-token "
            "entropies over each prompt's responses (e.g. entropy.view(G, N).mean(dim=1))"
        )
    ent = entropy.detach().to(device=r.device, dtype=torch.float64)
    if not torch.isfinite(ent).all():
        i = int((~torch.isfinite(ent)).nonzero()[0])
        raise ValueError(
            f"passk_adaptive: entropy must be finite; entropy[{i}] = {ent[i].item()}; check the rollout's "
            "entropy capture (masked or empty responses give NaN means)"
        )
    if isinstance(split, bool) or not isinstance(split, numbers.Real) or not 0 <= split <= 1:
        raise ValueError(
            f"passk_adaptive: split must be a number in [0, 1] (the share of prompts, by highest entropy, "
            f"that get the Pass@1 advantage), got {split!r}"
        )
    pass1 = adaptive_pass1_mask(ent, split)
    return torch.where(pass1.unsqueeze(1), grpo(r), passk(r, k=k)).to(rewards.dtype)


def adaptive_pass1_mask(entropy: torch.Tensor, split: float) -> torch.Tensor:
    """(G,) bool: the prompts `passk_adaptive` gives the Pass@1 advantage (inputs validated by it).

    The top floor(G * split + 1/2) prompts by entropy, ties to the lower index. Public so that loggers
    (the OpenRLHF integration) report exactly the arm the estimator used.
    """
    g = entropy.shape[0]
    # Round half up on the decimal value the user wrote (0.7 is 7/10): in floats 45 * 0.7 is
    # 31.499999999999996 and would round down, where 31.5 rounds up.
    n_pass1 = math.floor(g * Fraction(str(split)) + Fraction(1, 2))
    # A stable descending sort keeps equal entropies in index order: the lower index ranks higher.
    order = torch.sort(entropy, descending=True, stable=True).indices
    pass1 = torch.zeros(g, dtype=torch.bool, device=entropy.device)
    pass1[order[:n_pass1]] = True
    return pass1


def k_schedule(
    step: int, *, k_start: int, k_end: int = 1, total_steps: int, kind: str = "linear", switch_at: float = 0.5
) -> int:
    """k for training step `step` (0-based), annealing k_start -> k_end over total_steps.

    "constant": k_start. "linear": k_start + (k_end - k_start) * min(step / total_steps, 1), rounded half up.
    "step": k_start while step < switch_at * total_steps, then k_end (Pass@k, then Pass@1).
    """
    for name, value, low in (
        ("step", step, 0),
        ("k_start", k_start, 1),
        ("k_end", k_end, 1),
        ("total_steps", total_steps, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"k_schedule: {name} must be an integer >= {low}, got {value!r}")
    if kind == "constant":
        return int(k_start)
    if kind == "linear":
        progress = min(step / total_steps, 1.0)
        return int(math.floor(k_start + (k_end - k_start) * progress + 0.5))
    if kind == "step":
        if isinstance(switch_at, bool) or not isinstance(switch_at, numbers.Real) or not 0 <= switch_at <= 1:
            raise ValueError(
                f"k_schedule: switch_at must be a fraction of total_steps in [0, 1], not {switch_at!r}"
            )
        return int(k_start if step < switch_at * total_steps else k_end)
    raise ValueError(f"k_schedule: kind must be 'constant', 'linear' or 'step', got {kind!r}")
