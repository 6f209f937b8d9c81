"""Time OpenRLHF's RemoteExperienceMaker.compute_advantages_and_returns with `passk` vs `group_norm`.

Real OpenRLHF code (CPU; flash_attn/vllm stand-ins from tests/stubs), a realistic batch: 1024 prompts x 16
samples x 1024 response tokens, in micro-batches of 128 samples. Both estimators run in this process,
alternating, on fresh copies of the same batch; prints the median times and their ratio (goal <= 1.05).

    .venv/bin/python benchmarks/experience_maker.py [--prompts 1024 --samples 16 --tokens 1024 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "stubs"))

from openrlhf_passk.integration import bootstrap, upstream  # noqa: E402

bootstrap.install(force=True)  # in case the .pth is not installed or is disabled


def make_args(estimator: str, n: int, tokens: int, v011: bool):
    passk = {"passk_k": 4, "passk_k_schedule": "constant", "passk_success_threshold": 1.0}
    if v011:
        return SimpleNamespace(
            rollout=SimpleNamespace(n_samples_per_prompt=n, max_new_tokens=tokens),
            algo=SimpleNamespace(
                advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False)
            ),
            reward=SimpleNamespace(
                clip_range=(-10, 10), overlong_buffer_len=None, stop_properly_penalty_coef=None
            ),
            data=SimpleNamespace(max_len=2 * tokens),
            **passk,
        )
    return SimpleNamespace(
        n_samples_per_prompt=n,
        advantage_estimator=estimator,
        gamma=1.0,
        lambd=1.0,
        no_advantage_std_norm=False,
        reward_clip_range=(-10, 10),
        overlong_buffer_len=None,
        stop_properly_penalty_coef=None,
        max_len=2 * tokens,
        **passk,
    )


def make_batch(prompts: int, n: int, tokens: int, micro: int, seed: int = 0):
    from openrlhf.trainer.ppo_utils.experience import Experience

    gen = torch.Generator().manual_seed(seed)
    total = prompts * n
    rewards = (torch.rand(total, generator=gen) < 0.3).float()
    lengths = torch.randint(tokens // 4, tokens + 1, (total,), generator=gen)
    order = torch.randperm(total, generator=gen)  # samples shuffled across micro-batches
    batch = []
    for start in range(0, total, micro):
        idx = order[start : start + micro]
        mask = torch.arange(tokens).unsqueeze(0) < lengths[idx].unsqueeze(1)
        batch.append(
            Experience(
                action_mask=mask,
                kl=torch.rand(len(idx), tokens, generator=gen) * 0.01,
                rewards=rewards[idx].clone(),
                response_length=lengths[idx].float(),
                index=idx.tolist(),
                info={"reward": rewards[idx].clone()},
            )
        )
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=128, help="samples per micro-batch (Experience)")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    torch.set_num_threads(1)
    v011 = upstream.openrlhf_version().startswith("0.11")
    times: dict[str, list[float]] = {"group_norm": [], "passk": []}
    # Round 0 is a small untimed warm-up (first-call costs: lazy imports, cached binomial tables).
    for round_ in range(opts.repeats + 1):
        for name in times:
            args = make_args(name, opts.samples, opts.tokens, v011)
            maker = RemoteExperienceMaker(
                None, None, None, None, FixedKLController(0.01), SimpleNamespace(args=args), None
            )
            prompts = opts.prompts if round_ else max(1, opts.micro // opts.samples)
            batch = make_batch(prompts, opts.samples, opts.tokens, opts.micro)
            start = time.perf_counter()
            maker.compute_advantages_and_returns(batch)
            if round_:
                times[name].append(time.perf_counter() - start)
            del batch
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"OpenRLHF {upstream.openrlhf_version()}, {opts.prompts} prompts x {opts.samples} samples x "
        f"{opts.tokens} tokens, micro-batches of {opts.micro}, {opts.repeats} runs each (1 thread)"
    )
    for name, t in times.items():
        print(f"  {name:10s} median {median[name]:.3f} s  runs {', '.join(f'{x:.3f}' for x in t)}")
    ratio = median["passk"] / median["group_norm"]
    print(f"ratio passk / group_norm = {ratio:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
