"""Benchmark: our analytic `passk` against the published reference approach, measured in the same run.

The reference is a plain Python loop over prompts with float binomials and a per-sample loop with
`.item()` (written here from its formula, ALGORITHMS.md 1c). It runs G = 1024 prompts x N in {8, 32, 128},
prints both times, the speed ratio and the largest difference, then shows the reference failing at
N = 4096 where ours stays finite and exact.

    .venv/bin/python benchmarks/advantages.py [--groups 1024] [--k 8] [--repeats 5] [--threads 1]

One torch thread by default: the reference is single-threaded Python anyway, and on a shared, loaded
machine torch's intra-op threads wait on each other (we measured 100x slower small ops with 2 threads
at load 10 on 2 cores). --threads 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from openrlhf_passk.advantages import passk


def float_comb(n: int, r: int) -> float:
    """C(n, r) as a running float product: what float binomials give (inf once C(n, r) > 1.8e308)."""
    if r < 0 or r > n:
        return 0.0
    out = 1.0
    for i in range(r):
        out = out * (n - i) / (i + 1)
    return out


def reference_passk(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """The reference approach: per prompt, count correct answers, float binomials, per-sample loop."""
    out = torch.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        group = rewards[g]
        n = group.numel()
        n_neg = n - int(group.sum().item())
        rbar = 1 - float_comb(n_neg, k) / float_comb(n, k)
        sigma = math.sqrt(rbar * (1 - rbar))
        if sigma == 0:
            continue
        a_pos = (1 - rbar) / sigma
        a_neg = (1 - rbar - float_comb(n_neg - 1, k - 1) / float_comb(n - 1, k - 1)) / sigma
        for i in range(n):
            out[g, i] = a_pos if group[i].item() == 1 else a_neg
    return out


def best_time(repeats: int, fn, *args, **kwargs) -> tuple[float, torch.Tensor]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1024, help="prompts G")
    parser.add_argument(
        "--k", type=int, default=8, help="k, capped at N/2 (k = N makes almost every group 0)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs (reference: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); G={args.groups}; best of runs")
    header = ("N", "k", "reference s", "passk s", "ratio", "max |diff|", "sort path s")
    print("{:>5} {:>4} {:>12} {:>10} {:>8} {:>11} {:>12}".format(*header))
    for n in (8, 32, 128):
        k = min(args.k, n // 2)
        # Per-prompt accuracy spread over [0, 1] so every N_pos occurs, as in a real batch.
        accuracy = torch.rand(args.groups, 1, generator=gen)
        rewards = (torch.rand(args.groups, n, generator=gen) < accuracy).float()
        ref_time, ref = best_time(min(2, args.repeats), reference_passk, rewards, k)
        our_time, ours = best_time(args.repeats, passk, rewards, k=k)
        both = torch.isfinite(ref) & torch.isfinite(ours)
        diff = (ref - ours)[both].abs().max().item()
        # The same groups as 0.25/0.75 rewards take the general sort-based path (shift/scale-invariant).
        cont_time, cont = best_time(args.repeats, passk, 0.25 + 0.5 * rewards, k=k)
        assert torch.allclose(cont, ours, atol=1e-5)
        ratio = ref_time / our_time
        times = f"{ref_time:>12.4f} {our_time:>10.5f} {ratio:>7.0f}x"
        print(f"{n:>5} {k:>4} {times} {diff:>11.2e} {cont_time:>12.5f}")

    print("\nN = 4096, four prompts with 1, 100, 2048 and 4000 correct answers:")
    n = 4096
    rewards = (torch.arange(n).unsqueeze(0) < torch.tensor([[1], [100], [2048], [4000]])).double()
    for k in (64, 1024, 4095):
        ref, ours = reference_passk(rewards, k), passk(rewards, k=k)
        finite = torch.isfinite(ref)
        wrong = (~finite | ((ref - ours).abs() > 1e-6 * (1 + ours.abs()))).any(dim=1)
        print(
            f"  k={k:>4}: reference {int((~finite).sum())} non-finite of {ref.numel()}, "
            f"{int(wrong.sum())}/4 prompts wrong; ours {int(torch.isfinite(ours).sum())} finite, "
            f"max |sum per prompt| {ours.sum(dim=1).abs().max().item():.1e}"
        )


if __name__ == "__main__":
    main()
