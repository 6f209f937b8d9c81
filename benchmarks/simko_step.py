"""Step time of SimKO against plain PPO through a causal LM (issue goal on a GPU: SimKO / PPO <= 1.10).

A randomly initialised Qwen2-shaped model (built offline from a config, bf16, SDPA attention) runs the two
phases SimKO touches, the way OpenRLHF's actor runs them (`openrlhf_passk.integration.simko`):
- rollout: a no-grad forward for the old log-probs; SimKO adds `topk_and_entropy` over the fp32 logits;
- train: forward, fp32 logits, sampled-token log-probs as gathered logit - logsumexp, PPO loss over the
  response tokens, backward, AdamW step; SimKO adds the K + 1 sparse-gradient gather, `candidate_log_probs`
  and `apply_simko` before the same PPO loss.
PPO and SimKO steps alternate on the same model and batch after warm-up; medians and their ratios print.

    python benchmarks/simko_step.py --device cuda                       # 0.5B shape, 1 x 4096 tokens
    python benchmarks/simko_step.py --device cuda --preset 1.5b --batch 2
    python benchmarks/simko_step.py --preset tiny --steps 3             # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from simko_memory import label_log_probs  # beside this file

from openrlhf_passk.losses import (
    SparseGradGather,
    apply_simko,
    candidate_log_probs,
    entropy_gate,
    policy_loss,
    topk_and_entropy,
)

# Qwen2.5 shapes (hidden, layers, heads, kv heads, MLP width, vocabulary); "tiny" is for CPU smoke runs.
PRESETS = {
    "tiny": (64, 2, 4, 2, 128, 151_936),
    "0.5b": (896, 24, 14, 2, 4864, 151_936),
    "1.5b": (1536, 28, 12, 2, 8960, 151_936),
}


def build_model(preset: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, layers, heads, kv_heads, mlp, vocab = PRESETS[preset]
    config = Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        vocab_size=vocab,
        max_position_embeddings=32768,
        tie_word_embeddings=preset != "1.5b",
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.5b")
    parser.add_argument("--batch", type=int, default=1, help="responses per micro-batch")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence (prompt + response)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (no loss there)")
    parser.add_argument("--k", type=int, default=3, help="--simko_top_k")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-ups)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if not 0 < args.prompt < args.seq:
        parser.error(f"--prompt must be in (0, --seq = {args.seq}), got {args.prompt}")

    device = args.device
    torch.manual_seed(0)
    model = build_model(args.preset, device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = model.config.vocab_size
    sequences = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    labels = torch.roll(sequences, shifts=-1, dims=1)  # as Actor.forward: position t predicts token t + 1
    actions = args.seq - args.prompt
    act = slice(args.seq - 1 - actions, args.seq - 1)  # Actor.forward's [:, :-1][:, -actions:]
    mask = torch.ones(args.batch, actions, device=device)
    advantages = torch.where(torch.arange(args.batch, device=device) % 2 == 0, 1.0, -1.0)[:, None].expand(-1, actions)

    def sync() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def rollout(simko: bool):
        # Old log-probs (and SimKO's per-token statistics) as the experience maker's actor forward.
        with torch.no_grad():
            logits = model(sequences).logits.float()
            old = label_log_probs(logits, labels)[:, act]
            if not simko:
                return old, None
            ids, entropy, _ = topk_and_entropy(logits, args.k)
            return old, (ids[:, act], entropy_gate(entropy[:, act], mask, 0.8))

    def train(old: torch.Tensor, extra) -> None:
        # The whole fp32 logits tensor (not a slice, which would need a dense gradient) as in the integration.
        logits = model(sequences).logits.float()
        log_probs = label_log_probs(logits, labels)
        if extra is None:
            loss = policy_loss(log_probs[:, act], old, advantages, mask)
        else:
            ids, gate = extra
            full_ids = torch.zeros(*labels.shape, args.k, dtype=torch.long, device=device)
            full_ids[:, act] = ids
            gathered = SparseGradGather.apply(logits, torch.cat([labels.unsqueeze(-1), full_ids], dim=-1))[:, act]
            log_probs = log_probs[:, act]
            cand = candidate_log_probs(gathered[..., 1:], gathered[..., 0], log_probs)
            top1 = labels[:, act] == ids[..., 0]
            lp, adv = apply_simko(log_probs, advantages, cand, gate, top1, advantages[:, 0] > 0)
            loss = policy_loss(lp, old, adv, mask)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {f"{phase} {v}": [] for phase in ("rollout", "train") for v in ("ppo", "simko")}
    peaks: dict[str, int] = {}
    for step in range(args.steps + 2):
        for variant in ("ppo", "simko"):  # alternate, so drift (clocks, other jobs) hits both alike
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = sync()
            old, extra = rollout(variant == "simko")
            t1 = sync()
            train(old, extra)
            t2 = sync()
            if step >= 2:
                times[f"rollout {variant}"].append(t1 - t0)
                times[f"train {variant}"].append(t2 - t1)
            if device == "cuda":
                peaks[variant] = torch.cuda.max_memory_allocated()

    layers = PRESETS[args.preset][1]
    params = sum(p.numel() for p in model.parameters()) / 1e9
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"{name}: Qwen2-shaped {args.preset} ({params:.2f}B params, {layers} layers, V = {vocab}), "
        f"{args.batch} x {args.seq} tokens ({actions} response), K = {args.k}, median of {args.steps}"
    )
    med = {key: statistics.median(values) for key, values in times.items()}
    for phase in ("rollout", "train"):
        ppo, simko = med[f"{phase} ppo"], med[f"{phase} simko"]
        print(f"{phase:>8}: PPO {ppo * 1e3:8.1f} ms  SimKO {simko * 1e3:8.1f} ms  ratio {simko / ppo:.3f}")
    ppo_total, simko_total = med["rollout ppo"] + med["train ppo"], med["rollout simko"] + med["train simko"]
    print(f"{'both':>8}: PPO {ppo_total * 1e3:8.1f} ms  SimKO {simko_total * 1e3:8.1f} ms  "
          f"ratio {simko_total / ppo_total:.3f}  (goal <= 1.10)")  # fmt: skip
    if peaks:
        print(f"peak GPU memory: PPO {peaks['ppo'] / 2**30:.2f} GiB, SimKO {peaks['simko'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
