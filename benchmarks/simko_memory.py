"""Peak extra memory of SimKO's candidate log-probs: gather from the logits in memory (ours) against an
implementation that expands the logits K times (the public SimKO code), over plain PPO as the baseline.

Each variant runs one loss forward + backward on a (T, V) fp32 logits tensor, the way OpenRLHF's actor
holds it (log-probs as gathered logit - chunked logsumexp, then the PPO loss):
- baseline: PPO only;
- gather:   + SimKO with K + 1 gathered logits per token, sparse gradient (openrlhf_passk.losses);
- expanded: + SimKO with log_softmax over logits expanded to (T, K, V), then gathered.
Extra memory = peak(variant) - peak(baseline), measured in the same run.

CPU: every (variant, T) runs in its own subprocess and the peak is the process's max RSS (large
tensors are mmap-backed, so RSS follows live tensor bytes). CUDA: torch.cuda.max_memory_allocated,
reset between variants, in one process.

    python benchmarks/simko_memory.py                          # CPU, V = 150k, T = 256, 512, 1024
    python benchmarks/simko_memory.py --device cuda --tokens 4096
    python benchmarks/simko_memory.py --tokens 2048 --variants gather   # skip the 12 GiB expanded run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from openrlhf_passk.losses import SparseGradGather, apply_simko, candidate_log_probs, policy_loss

VARIANTS = ("baseline", "gather", "expanded")


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    # As openrlhf.models.utils.log_probs_from_logits (fp32 path): gathered logit - chunked logsumexp.
    flat = logits.reshape(-1, logits.shape[-1])
    lse = torch.cat([torch.logsumexp(flat[i : i + chunk], dim=-1) for i in range(0, len(flat), chunk)])
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse.view(labels.shape)


def run_variant(variant: str, tokens: int, vocab: int, k: int, device: str) -> float:
    """One forward + backward; returns the step time in seconds (memory is read by the caller)."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1, tokens, vocab, device=device, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device=device, generator=g)
    ids = torch.randint(0, vocab, (1, tokens, k), device=device, generator=g)
    old = torch.full((1, tokens), -10.0, device=device)
    adv = torch.randn(1, tokens, device=device, generator=g)
    mask = torch.ones(1, tokens, device=device)
    gate = (torch.rand(1, tokens, device=device, generator=g) > 0.8).float()
    top1 = labels == ids[..., 0]
    correct = torch.tensor([True], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()

    log_probs = label_log_probs(logits[0], labels[0]).unsqueeze(0)
    if variant == "baseline":
        loss = policy_loss(log_probs, old, adv, mask)
    else:
        if variant == "gather":  # as openrlhf_passk.integration.simko: one gather of K + 1 logits
            gathered = SparseGradGather.apply(logits, torch.cat([labels.unsqueeze(-1), ids], dim=-1))
            cand = candidate_log_probs(gathered[..., 1:], gathered[..., 0], log_probs)
        else:  # the public code's way: K copies of the logits through log_softmax
            expanded = logits.unsqueeze(2).expand(-1, -1, k, -1)
            cand = torch.log_softmax(expanded, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        lp, a = apply_simko(log_probs, adv, cand, gate, top1, correct)
        loss = policy_loss(lp, old, a, mask)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _child(args: argparse.Namespace) -> None:
    seconds = run_variant(args.child, args.tokens[0], args.vocab, args.k, "cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:]), help="(baseline always runs)"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")

    mib = 2**20
    print(f"V = {args.vocab}, K = {args.k}, device = {args.device}, fp32 logits; extra = peak - PPO peak")
    print(f"{'T':>6} {'variant':>9} {'peak MiB':>10} {'extra MiB':>10} {'T*K*V*4 MiB':>12} {'step s':>8}")
    for tokens in args.tokens:
        results = {}
        for variant in ["baseline", *args.variants]:
            if args.device == "cuda":
                seconds = run_variant(variant, tokens, args.vocab, args.k, "cuda")
                results[variant] = (torch.cuda.max_memory_allocated(), seconds)
                torch.cuda.empty_cache()
            else:
                cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens),
                       "--vocab", str(args.vocab), "--k", str(args.k)]  # fmt: skip
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                results[variant] = (out["peak"], out["seconds"])
        base = results["baseline"][0]
        for variant, (peak, seconds) in results.items():
            expanded_bytes = tokens * args.k * args.vocab * 4 / mib
            print(
                f"{tokens:>6} {variant:>9} {peak / mib:>10.1f} {(peak - base) / mib:>10.1f} "
                f"{expanded_bytes:>12.1f} {seconds:>8.3f}"
            )


if __name__ == "__main__":
    main()
