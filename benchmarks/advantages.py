"""Benchmark: `advantages.compute("passk")` against the published code's approach, measured in the same run.

The baseline follows the published `calc_adv` approach (Chen et al.'s code, ALGORITHMS.md 1c): a Python
loop over prompts, and within a prompt numpy arrays and float binomials from `scipy.special.comb`. It
is written here from the formula, vectorised within each group (no per-sample loop, no prints), so it
is the fastest form of that approach. For G = 1024 prompts x N in {8, 32, 128} the script prints both
times (best of repeated runs), the ratio and the largest difference, then shows float binomials failing
at N = 4096 where ours stays finite and exact.

    .venv/bin/python benchmarks/advantages.py [--groups 1024] [--k 8] [--seconds 0.5] [--threads 1]

Needs scipy (benchmark only: `.venv/bin/pip install scipy`). One torch thread by default: the baseline
is single-threaded, and on a shared, loaded machine torch's intra-op threads wait on each other.
--threads 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from openrlhf_passk import advantages


def baseline_passk(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """The published approach: per prompt, count the correct answers, float binomials, numpy select."""
    from scipy.special import comb

    scores = rewards.numpy()
    out = np.zeros(scores.shape, dtype=np.float64)
    for g, group in enumerate(scores):
        n = group.shape[0]
        n_neg = n - int((group == 1).sum())
        rbar = 1 - comb(n_neg, k) / comb(n, k)
        sigma = np.sqrt(rbar * (1 - rbar))
        if sigma == 0:
            continue
        a_pos = (1 - rbar) / sigma
        a_neg = (1 - rbar - comb(n_neg - 1, k - 1) / comb(n - 1, k - 1)) / sigma
        out[g] = np.where(group == 1, a_pos, a_neg)
    return torch.from_numpy(out).to(rewards.dtype)


def best_time(seconds: float, fn, *args, **kwargs) -> tuple[float, torch.Tensor]:
    """Fastest of as many runs as fit in `seconds` (at least 3): the least disturbed by other load."""
    best, result, runs, stop = math.inf, None, 0, time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < stop:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
        runs += 1
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1024, help="prompts G")
    parser.add_argument("--k", type=int, default=8, help="k, capped at N/2 (k = N makes almost every group 0)")
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent on each measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    try:
        import scipy
    except ModuleNotFoundError:
        print(
            "benchmarks/advantages.py: error: the published-code baseline needs scipy "
            "(a benchmark-only dependency): .venv/bin/pip install scipy",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"{torch.get_num_threads()} torch thread(s); load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs; G={args.groups}; best of {args.seconds:g} s of runs"
    )
    header = ("N", "k", "baseline ms", "compute ms", "ratio", "max |diff|", "general path ms", "ratio")
    print("{:>5} {:>4} {:>12} {:>11} {:>7} {:>11} {:>16} {:>6}".format(*header))
    for n in (8, 32, 128):
        k = min(args.k, n // 2)
        # Per-prompt accuracy spread over [0, 1] so every N_pos occurs, as in a real batch.
        accuracy = torch.rand(args.groups, 1, generator=gen)
        rewards = (torch.rand(args.groups, n, generator=gen) < accuracy).float()
        base_time, base = best_time(args.seconds, baseline_passk, rewards, k)
        our_time, ours = best_time(args.seconds, advantages.compute, "passk", rewards, k=k)
        diff = (base - ours).abs().max().item()
        # The same groups as 0.25/0.75 rewards take the general sort-based path (shift/scale-invariant).
        general_time, general = best_time(args.seconds, advantages.compute, "passk", 0.25 + 0.5 * rewards, k=k)
        if not torch.allclose(general, ours, atol=1e-5):
            print(f"error: the general path differs from the binary path at N={n}", file=sys.stderr)
            return 1
        print(
            f"{n:>5} {k:>4} {base_time * 1e3:>12.3f} {our_time * 1e3:>11.4f} {base_time / our_time:>6.0f}x "
            f"{diff:>11.2e} {general_time * 1e3:>16.3f} {base_time / general_time:>5.1f}x"
        )

    print("\nN = 4096, four prompts with 1, 100, 2048 and 4000 correct answers:")
    n = 4096
    rewards = (torch.arange(n).unsqueeze(0) < torch.tensor([[1], [100], [2048], [4000]])).double()
    for k in (64, 1024, 4095):
        with np.errstate(all="ignore"):
            base = baseline_passk(rewards, k)
        ours = advantages.compute("passk", rewards, k=k)
        finite = torch.isfinite(base)
        wrong = (~finite | ((base - ours).abs() > 1e-6 * (1 + ours.abs()))).any(dim=1)
        print(
            f"  k={k:>4}: baseline {int((~finite).sum())} non-finite of {base.numel()}, "
            f"{int(wrong.sum())}/4 prompts wrong; ours {int(torch.isfinite(ours).sum())} finite, "
            f"max |sum per prompt| {ours.sum(dim=1).abs().max().item():.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
