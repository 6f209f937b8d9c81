"""`openrlhf-passk sandbox`: Pass@1 (GRPO) vs Pass@k training on small mazes, on a CPU, in minutes.

A demonstration and a regression check of the science, not a second trainer. It reads top to bottom:
  1. data   train and held-out mazes from `tasks.maze` (with loops, so most mazes have several routes);
  2. model  a tiny Llama (HF transformers) and a character-level tokenizer, built offline and saved with
            save_pretrained, so `openrlhf-passk eval --model OUT/passk --data OUT/test.jsonl` loads them;
  3. SFT    a deliberately brief supervised phase on one shortest solution per maze: an imperfect policy,
            so that there is something left for exploration to find;
  4. RL     two runs from the same SFT weights, identical except for the advantage: `grpo` (Pass@1
            training) and `passk` (analytic Pass@k training). Both use `advantages.compute` and
            `losses.policy_loss`, the code the OpenRLHF integration runs; reward = `maze.score`;
  5. eval   n samples per held-out maze for the SFT start and both runs; unbiased pass@k curves on one plot
            (sandbox.png) and a JSON summary (sandbox.json) with per-maze counts, settings and timings.

The prompt is compact (the grid, then a newline) and the answer is `<answer>MOVES</answer>`: a tiny
model cannot read the paper's long instruction prompt, so sandbox numbers are not comparable to the paper's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/sandbox"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the same run, faster)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    g = parser.add_argument_group("data")
    g.add_argument("--sizes", type=int, nargs="+", default=[7],
                   help="maze sizes (grid side, odd; 5x5 has only ~40 distinct mazes)")
    g.add_argument("--loops", type=float, default=0.3, help="maze generator loop ('braiding') fraction")
    g.add_argument("--train-mazes", type=int, default=1500, help="training mazes per size")
    g.add_argument("--test-mazes", type=int, default=100, help="held-out mazes per size")
    g = parser.add_argument_group("model")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g = parser.add_argument_group("SFT")
    g.add_argument("--sft-steps", type=int, default=200)
    g.add_argument("--sft-batch", type=int, default=64)
    g.add_argument("--sft-lr", type=float, default=2e-3)
    g = parser.add_argument_group("RL")
    g.add_argument("--rl-steps", type=int, default=40)
    g.add_argument("--prompts-per-step", type=int, default=16)
    g.add_argument("--n-samples", type=int, default=8, help="responses per prompt (N)")
    g.add_argument("--k", type=int, default=4, help="k of Pass@k training (the passk run)")
    g.add_argument("--rl-lr", type=float, default=5e-4)
    g.add_argument("--mini-batches", type=int, default=2,
                   help="policy updates per RL step: the later ones are off-policy, so the clip matters")
    g.add_argument("--clip-low", type=float, default=0.2)
    g.add_argument("--clip-high", type=float, default=0.28)
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (RL and eval)")
    g = parser.add_argument_group("eval")
    g.add_argument("--eval-n", type=int, default=32, help="samples per held-out maze (largest k)")


def run(args: argparse.Namespace) -> int:
    problems = []
    if args.k < 1 or args.k > args.n_samples:
        problems.append(f"--k {args.k} must be between 1 and --n-samples {args.n_samples}")
    if args.eval_n < args.k:
        problems.append(f"--eval-n {args.eval_n} must be >= --k {args.k}")
    if any(s < 5 or s % 2 == 0 for s in args.sizes):
        problems.append(f"--sizes {args.sizes}: every size must be odd and >= 5")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if problems:
        print("openrlhf-passk sandbox: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    _main(args)
    return 0


def _main(args: argparse.Namespace) -> None:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from openrlhf_passk import advantages, losses
    from openrlhf_passk.eval import plot_curves, summarize
    from openrlhf_passk.tasks import maze

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # ---- 1. data: distinct grids; held-out grids never appear in training --------------------------------
    t0 = time.time()
    seen: set[str] = set()
    test: list = []
    train: list = []
    seed = args.seed * 1_000_003  # maze seeds of different --seed values do not overlap for small runs
    for size in args.sizes:
        for split, count in ((test, args.test_mazes), (train, args.train_mazes)):
            found = 0
            for _ in range(count * 20):  # small sizes have few distinct mazes: stop rather than loop forever
                m = maze.generate(size, seed, loops=args.loops)
                seed += 1
                if m.grid not in seen:
                    seen.add(m.grid)
                    split.append(m)
                    found += 1
                    if found == count:
                        break
            if found < count:
                print(f"note: only {found} distinct {size}x{size} mazes found (asked for {count})", file=sys.stderr)
        if sum(m.size == size for m in train) < args.prompts_per_step:
            sys.exit(f"openrlhf-passk sandbox: error: fewer {size}x{size} training mazes than "
                     f"--prompts-per-step {args.prompts_per_step}; raise --train-mazes or lower --prompts-per-step")
    with (args.out / "test.jsonl").open("w") as f:
        for m in test:
            f.write(json.dumps({"prompt": m.grid + "\n", "label": m.grid, "solution": m.solution,
                                "size": m.size, "length": m.length, "n_shortest": m.n_shortest}) + "\n")
    timings["data_s"] = time.time() - t0

    # ---- 2. tokenizer (one token per character, plus the two answer tags) and a tiny Llama ---------------
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "<answer>", "</answer>", *"\n.*SELRUD"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("</?answer>|."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join back without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    pad, eos = tok.pad_token_id, tok.eos_token_id
    max_len = max(args.sizes) * (max(args.sizes) + 1) + 1 + max(m.length for m in train + test) * 2 + 8
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=args.dim, intermediate_size=4 * args.dim,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max_len + 64,
                         pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    # Long enough for the longest training answer with detours; an unfinished answer scores 0.
    max_new = 2 + 2 * max(m.length for m in train + test) + 4

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def save(name: str) -> None:
        model.save_pretrained(args.out / name)
        tok.save_pretrained(args.out / name)

    @torch.no_grad()
    def sample(prompt_ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one response per row of prompt_ids (B, P), all prompts of one length, so no padding.

        Returns response tokens (B, T) and their mask (B, T): True up to and including the first </s>.
        """
        out = model(input_ids=prompt_ids, use_cache=True)
        tokens, done = [], torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
        for _ in range(max_new):
            probs = torch.softmax(out.logits[:, -1].float() / args.temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            done |= nxt == eos
            if done.all():
                break
            out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
        tokens = torch.stack(tokens, 1)
        is_eos = (tokens == eos).long()
        return tokens, (torch.cumsum(is_eos, 1) - is_eos) == 0

    def rewards_of(mazes: list, tokens: torch.Tensor, mask: torch.Tensor) -> list[float]:
        texts = tok.batch_decode([t[m].tolist() for t, m in zip(tokens, mask, strict=True)], skip_special_tokens=True)
        return [maze.score(text, m.grid, mode="strict") for text, m in zip(texts, mazes, strict=True)]

    def prompts_of(mazes: list) -> torch.Tensor:
        return torch.tensor([encode(m.grid + "\n") for m in mazes], device=device)

    def response_log_probs(prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=torch.cat([prompt_ids, tokens], 1)).logits[:, prompt_ids.shape[1] - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)

    # ---- 3. SFT: next-token loss on the answer only, deliberately brief ----------------------------------
    t0 = time.time()
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    sft_losses = []
    for step in tqdm(range(args.sft_steps), desc="SFT", unit="step"):
        batch = rng.sample(train, min(args.sft_batch, len(train)))
        seqs, labels = [], []
        for m in batch:
            p, a = encode(m.grid + "\n"), encode(f"<answer>{m.solution}</answer>") + [eos]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))  # right padding is harmless for a causal LM: pads come after the text
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=device)
        lr = args.sft_lr * min(1.0, (step + 1) / 20)  # short warm-up: Adam's first steps are large
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sft_losses.append(round(loss.item(), 4))
    save("sft")
    sft_state = {k: v.clone() for k, v in model.state_dict().items()}
    timings["sft_s"] = time.time() - t0

    # ---- 5 (defined before 4, used for all three models): pass@k on held-out mazes ---------------------
    def evaluate(desc: str) -> list[dict]:
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)  # same draws for every model
        counts = []
        by_size = {s: [m for m in test if m.size == s] for s in args.sizes}
        chunk = max(1, 512 // args.eval_n)
        bar = tqdm(total=len(test), desc=f"eval {desc}", unit="maze")
        for mazes in by_size.values():
            for i in range(0, len(mazes), chunk):
                group = [m for m in mazes[i : i + chunk] for _ in range(args.eval_n)]
                tokens, mask = sample(prompts_of(group), gen)
                r = rewards_of(group, tokens, mask)
                for j, m in enumerate(mazes[i : i + chunk]):
                    c = sum(x >= 1.0 for x in r[j * args.eval_n : (j + 1) * args.eval_n])
                    counts.append({"size": m.size, "n": args.eval_n, "c": c})
                bar.update(len(mazes[i : i + chunk]))
        bar.close()
        return counts

    # ---- 4. RL: the same loop twice; only the advantage estimator differs -------------------------------
    runs: dict[str, dict] = {}
    t0 = time.time()
    runs["sft"] = {"counts": evaluate("SFT start")}
    timings["eval_sft_s"] = time.time() - t0
    for name in ("grpo", "passk"):
        t0 = time.time()
        model.load_state_dict(sft_state)
        opt = torch.optim.AdamW(model.parameters(), lr=args.rl_lr, weight_decay=0.0)
        rng = random.Random(args.seed + 2)  # both runs see the same prompts in the same order
        gen = torch.Generator(device=device).manual_seed(args.seed + 3)
        params = {"k": args.k} if name == "passk" else {}
        history = []
        bar = tqdm(range(args.rl_steps), desc=f"RL {name}", unit="step")
        for step in bar:
            # One maze size per step: equal prompt lengths, so sampling needs no padding.
            size = args.sizes[step % len(args.sizes)]
            mazes = rng.sample([m for m in train if m.size == size], args.prompts_per_step)
            group = [m for m in mazes for _ in range(args.n_samples)]
            prompt_ids = prompts_of(group)
            tokens, mask = sample(prompt_ids, gen)
            rewards = torch.tensor(rewards_of(group, tokens, mask)).view(len(mazes), args.n_samples)
            adv = advantages.compute(name, rewards, **params).reshape(-1).to(device)
            with torch.no_grad():
                old_log_probs = response_log_probs(prompt_ids, tokens)
            order = torch.randperm(len(group), generator=torch.Generator().manual_seed(args.seed + step))
            for idx in order.chunk(args.mini_batches):
                idx = idx.to(device)
                log_probs = response_log_probs(prompt_ids[idx], tokens[idx])
                adv_tok = adv[idx, None].expand_as(log_probs)
                loss = losses.policy_loss(log_probs, old_log_probs[idx], adv_tok, mask[idx].float(),
                                          clip_low=args.clip_low, clip_high=args.clip_high)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            solved = (rewards.max(1).values >= 1.0).float().mean().item()
            history.append({"step": step, "size": size, "mean_reward": round(rewards.mean().item(), 4),
                            "solved_any": round(solved, 4)})
            bar.set_postfix(reward=f"{rewards.mean().item():.3f}")
        save(name)
        timings[f"rl_{name}_s"] = time.time() - t0
        t0 = time.time()
        runs[name] = {"counts": evaluate(name), "history": history}
        timings[f"eval_{name}_s"] = time.time() - t0

    # ---- summary: curves, plot, JSON -------------------------------------------------------------------
    for r in runs.values():
        r.update(summarize(r["counts"]))  # k = 1, 2, 4, ... up to eval_n, and eval_n
    labels = {"sft": "SFT start", "grpo": "Pass@1 training (GRPO)", "passk": f"Pass@k training (k={args.k})"}
    plot_curves({labels[n]: r["overall"] for n, r in runs.items()}, args.out / "sandbox.png",
                f"held-out mazes {'/'.join(f'{s}x{s}' for s in args.sizes)}, n={args.eval_n}")
    k_max = runs["passk"]["ks"][-1]
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
        "seed": args.seed,
        "num_train_mazes": len(train),
        "num_test_mazes": len(test),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "sft_loss": sft_losses,
        "runs": runs,
        "comparison": {
            "k_max": k_max,
            "pass@1": {n: runs[n]["overall"][1] for n in runs},
            f"pass@{k_max}": {n: runs[n]["overall"][k_max] for n in runs},
            "passk_ge_grpo_at_k_max": runs["passk"]["overall"][k_max] >= runs["grpo"]["overall"][k_max],
        },
    }
    timings["total_s"] = sum(timings.values())
    summary["timings_s"]["total_s"] = round(timings["total_s"], 1)
    (args.out / "sandbox.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{'run':<8}" + "".join(f"{'pass@' + str(k):>10}" for k in runs["sft"]["ks"]))
    for n, r in runs.items():
        print(f"{n:<8}" + "".join(f"{v:>10.3f}" for v in r["overall"].values()))
    print(f"wrote {args.out / 'sandbox.png'} and {args.out / 'sandbox.json'} ({timings['total_s']:.0f} s)")
