"""`openrlhf-passk sandbox`: Pass@1 (GRPO) vs Pass@k training on small mazes, on a CPU, over several seeds.

A demonstration and a regression check of the science, not a second trainer. Per seed it reads top to bottom:
  1. data   train and held-out mazes from `tasks.maze` (with loops, so most mazes have several routes). The
            held-out mazes use wall layouts (the grid with S and E blanked) that no training maze uses, so a
            test maze is never a training maze with other or swapped end points;
  2. model  a tiny Llama (HF transformers) and a character-level tokenizer, built offline and saved with
            save_pretrained, so `openrlhf-passk eval --model OUT/seed0/passk --data OUT/seed0/test.jsonl` loads them;
  3. SFT    supervised training on one shortest solution per maze (saved as `sft/`);
  4. RL     one run per arm, all from the same SFT weights, the same prompts and the same sampling seed:
            `grpo` (Pass@1), `passk` (analytic Pass@k, k = --k), `passk_anneal` (k annealed --k -> 1 with
            `advantages.k_schedule`), `passk_simko` (passk with SimKO's loss) and `passk_adaptive` (per
            prompt `grpo` or `passk` by rollout entropy). All use `advantages.compute` and
            `losses.policy_loss`, the code the OpenRLHF integration runs; reward = `maze.score`;
  5. eval   --eval-n samples per held-out maze: per-maze counts, unbiased pass@k for k = 1..eval_n, the mean
            token entropy and the mean number of distinct correct answers per maze; every --curve-every RL
            steps pass@1, pass@eval_n and entropy on the first --curve-mazes held-out mazes.
Outputs: OUT/summary.json ({"runs": [...], "settings": ..., "aggregate": ..., "timings_s": ...}), OUT/summary.png.

The prompt is compact (the grid, then a newline) and the answer is `<answer>MOVES</answer>`: a tiny
model cannot read the paper's long instruction prompt, so sandbox numbers are not comparable to the paper's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

RL_ARMS = ("grpo", "passk", "passk_anneal", "passk_simko", "passk_adaptive")
ESTIMATOR = {"grpo": "grpo", "passk": "passk", "passk_anneal": "passk", "passk_simko": "passk",
             "passk_adaptive": "passk_adaptive"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/sandbox"), help="output directory")
    parser.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                        help="one full run (data split, SFT, every arm) per seed")
    from openrlhf_passk import advantages

    # passk_adaptive joins the default once the estimator exists: it adds about a fifth to the run time.
    arms = ["sft", *(a for a in RL_ARMS if a != "passk_adaptive" or a in advantages.available())]
    parser.add_argument("--arms", nargs="+", default=arms, choices=("sft", *RL_ARMS),
                        help="runs to train and evaluate ('sft' is the shared start)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                        help="instead of training: combine the summary.json of runs with the same settings but other "
                             "seeds or arms (for example run in parallel) into OUT/summary.json and OUT/summary.png")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the same run, faster)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    g = parser.add_argument_group("data")
    g.add_argument("--sizes", type=int, nargs="+", default=[7],
                   help="maze sizes (grid side, odd; 5x5 has only 4 wall layouts, 40 mazes)")
    g.add_argument("--loops", type=float, default=0.3, help="maze generator loop ('braiding') fraction")
    g.add_argument("--train-mazes", type=int, default=1500, help="training mazes per size")
    g.add_argument("--test-mazes", type=int, default=100, help="held-out mazes per size")
    g.add_argument("--test-layouts", type=float, default=0.25,
                   help="fraction of the distinct wall layouts held out for the test mazes")
    g = parser.add_argument_group("model")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g = parser.add_argument_group("SFT")
    g.add_argument("--sft-steps", type=int, default=400)
    g.add_argument("--sft-batch", type=int, default=64)
    g.add_argument("--sft-lr", type=float, default=2e-3)
    g.add_argument("--sft-curve-every", type=int, default=0,
                   help="if > 0: pass@1 / pass@eval_n on the curve mazes every this many SFT steps (for tuning)")
    g = parser.add_argument_group("RL")
    g.add_argument("--rl-steps", type=int, default=80)
    g.add_argument("--prompts-per-step", type=int, default=16)
    g.add_argument("--n-samples", type=int, default=8, help="responses per prompt (N)")
    g.add_argument("--k", type=int, default=4, help="k of Pass@k training (the start of passk_anneal's schedule)")
    g.add_argument("--rl-lr", type=float, default=1e-4)
    g.add_argument("--mini-batches", type=int, default=2,
                   help="policy updates per RL step: the later ones are off-policy, so the clip matters")
    g.add_argument("--clip-low", type=float, default=0.2)
    g.add_argument("--clip-high", type=float, default=0.28)
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (RL and eval)")
    g.add_argument("--simko-topk", type=int, default=3, help="SimKO: old top-K candidates per token")
    g.add_argument("--simko-tau", type=float, default=0.8, help="SimKO: entropy quantile of the gate, in [0, 1)")
    g.add_argument("--simko-alpha", type=float, default=0.01, help="SimKO: top-K mixing weight")
    g.add_argument("--simko-lambda", type=float, default=1.1, help="SimKO: top-1 penalty factor")
    g.add_argument("--adaptive-split", type=float, default=0.5,
                   help="passk_adaptive: fraction of prompts (highest entropy) that get the Pass@1 advantage")
    g = parser.add_argument_group("eval")
    g.add_argument("--eval-n", type=int, default=32, help="samples per held-out maze (largest k)")
    g.add_argument("--curve-every", type=int, default=10, help="RL steps between learning-curve points")
    g.add_argument("--curve-mazes", type=int, default=25, help="held-out mazes (the first ones) for the curve")


def run(args: argparse.Namespace) -> int:
    if args.merge:
        return merge(args.merge, args.out)
    problems = []
    if args.k < 1 or args.k > args.n_samples:
        problems.append(f"--k {args.k} must be between 1 and --n-samples {args.n_samples}")
    if args.eval_n < args.k:
        problems.append(f"--eval-n {args.eval_n} must be >= --k {args.k}")
    if any(s < 5 or s % 2 == 0 for s in args.sizes):
        problems.append(f"--sizes {args.sizes}: every size must be odd and >= 5")
    if not 0 < args.test_layouts < 1:
        problems.append(f"--test-layouts {args.test_layouts} must be a fraction in (0, 1)")
    if not 0 <= args.simko_tau < 1:
        problems.append(f"--simko-tau {args.simko_tau} must be in [0, 1) (1 gates no token: SimKO would be off)")
    if not 0 <= args.adaptive_split <= 1:
        problems.append(f"--adaptive-split {args.adaptive_split} must be in [0, 1]")
    if args.temperature <= 0:
        problems.append(f"--temperature {args.temperature} must be > 0")
    if args.curve_every < 1 or args.curve_mazes < 1:
        problems.append("--curve-every and --curve-mazes must be >= 1")
    if args.train_mazes < args.prompts_per_step:
        problems.append(f"--train-mazes {args.train_mazes} is below --prompts-per-step {args.prompts_per_step}")
    if len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds {args.seeds}: each seed once")
    if "passk_adaptive" in args.arms:
        from openrlhf_passk import advantages

        if "passk_adaptive" not in advantages.available():
            problems.append("--arms passk_adaptive: this version of openrlhf_passk.advantages has no "
                            "'passk_adaptive' estimator; drop the arm")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if problems:
        print("openrlhf-passk sandbox: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        summary = _main(args)
    except DataError as e:
        print(f"openrlhf-passk sandbox: error: {e}", file=sys.stderr)
        return 2
    _print_table(summary)
    return 0


def merge(dirs: list[Path], out: Path) -> int:
    """Concatenate the runs of several summaries whose settings agree (apart from seeds, arms, output, threads)."""
    parts = []
    for d in dirs:
        path = d / "summary.json"
        if not path.is_file():
            print(f"openrlhf-passk sandbox: error: --merge {d}: no summary.json there", file=sys.stderr)
            return 2
        parts.append(json.loads(path.read_text()))
    ignore = {"seeds", "arms", "out", "threads", "data", "merge"}
    ref = {key: v for key, v in parts[0]["settings"].items() if key not in ignore}
    for d, part in zip(dirs, parts, strict=True):
        diff = sorted(key for key in ref.keys() | part["settings"].keys() - ignore
                      if part["settings"].get(key) != ref.get(key))
        if diff:
            print(f"openrlhf-passk sandbox: error: --merge {d}: settings differ from {dirs[0]} in {diff}",
                  file=sys.stderr)
            return 2
    runs = [r for part in parts for r in part["runs"]]
    pairs = [(r["seed"], r["arm"]) for r in runs]
    if len(set(pairs)) != len(pairs):
        print(f"openrlhf-passk sandbox: error: --merge: some (seed, arm) runs occur twice: {sorted(pairs)}",
              file=sys.stderr)
        return 2
    runs.sort(key=lambda r: (r["seed"], ("sft", *RL_ARMS).index(r["arm"])))
    settings = {**parts[0]["settings"], "seeds": sorted({s for s, _ in pairs}), "out": str(out),
                "arms": [a for a in ("sft", *RL_ARMS) if any(arm == a for _, arm in pairs)],
                "merged_from": [str(d) for d in dirs],
                "data": {k: v for part in parts for k, v in part["settings"]["data"].items()}}
    out.mkdir(parents=True, exist_ok=True)
    summary = {"runs": runs, "settings": settings, "aggregate": aggregate(runs, settings["eval_n"]),
               "timings_s": {str(d): part["timings_s"] for d, part in zip(dirs, parts, strict=True)},
               "wall_s": {str(d): part["wall_s"] for d, part in zip(dirs, parts, strict=True)},
               "paths": [str(out / "summary.json"), str(out / "summary.png")]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_summary(summary, out / "summary.png")
    _print_table(summary)
    return 0


class DataError(ValueError):
    """The requested maze counts do not exist for these settings (a usage error, exit 2)."""


# ---- 1. data ------------------------------------------------------------------------------------------
def layout(grid: str) -> str:
    """The wall layout of a maze: its grid with S and E replaced by '.'."""
    return grid.replace("S", ".").replace("E", ".")


def make_data(args: argparse.Namespace, seed: int) -> tuple[list, list, list[dict]]:
    """(train, test, notes): distinct mazes per size; test mazes use layouts no training maze uses.

    The generator's maze space is small (7x7 at loops 0.3: 132 wall layouts, about 5,400 grids; 5x5: 4 layouts,
    40 grids), so it is enumerated with a fixed number of draws rather than sampled until enough are found:
    asking for more than exists is an error that says how many there are, never a hang or a shorter list."""
    from openrlhf_passk.tasks import maze

    train, test, notes = [], [], []
    for size in args.sizes:
        draws = max(20_000, 20 * (args.train_mazes + args.test_mazes))
        by_layout: dict[str, dict[str, object]] = {}
        for s in range(draws):
            m = maze.generate(size, s, loops=args.loops)
            by_layout.setdefault(layout(m.grid), {}).setdefault(m.grid, m)
        layouts = sorted(by_layout)
        random.Random(f"sandbox-split/{seed}/{size}").shuffle(layouts)  # each seed holds out other layouts
        n_test = min(len(layouts) - 1, max(1, round(args.test_layouts * len(layouts))))
        if n_test < 1:
            raise DataError(f"{size}x{size} mazes at --loops {args.loops} have a single wall layout: nothing can be "
                            "held out by layout; use a larger --sizes or higher --loops")
        pools = {"test": layouts[:n_test], "train": layouts[n_test:]}
        note = {"size": size, "draws": draws, "layouts": len(layouts), "grids": sum(map(len, by_layout.values()))}
        rng = random.Random(f"sandbox-mazes/{seed}/{size}")
        for split, want, flag in (("test", args.test_mazes, "--test-mazes"), ("train", args.train_mazes,
                                                                                 "--train-mazes")):
            pool = sorted(g for lay in pools[split] for g in by_layout[lay])
            if len(pool) < want:
                raise DataError(
                    f"only {len(pool)} distinct {size}x{size} {split} mazes exist ({len(pools[split])} of the "
                    f"{len(layouts)} wall layouts at --loops {args.loops}, found in {draws} draws, times their "
                    f"S/E placements); lower {flag} to {len(pool)}, change --test-layouts, or use larger --sizes")
            chosen = [by_layout[layout(g)][g] for g in rng.sample(pool, want)]
            (test if split == "test" else train).extend(chosen)
            note[f"{split}_layouts"], note[f"{split}_pool"] = len(pools[split]), len(pool)
        notes.append(note)
    return train, test, notes


# ---- 2. model pieces: module-level so that tests can check them -------------------------------------
@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, max_new: int, temperature: float, gen: torch.Generator,
           pad: int, eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per row of prompt_ids (B, P), all prompts of one length, so no padding.

    Returns tokens (B, T), mask (B, T) (True up to and including the first eos), the log-prob of each
    sampled token under the sampling distribution softmax(logits / temperature), and that distribution's
    entropy per position (both (B, T), meaningful where mask is True)."""
    out = model(input_ids=prompt_ids, use_cache=True)
    tokens, log_probs, entropies = [], [], []
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new):
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        log_probs.append(logp.gather(-1, nxt[:, None]).squeeze(1))
        entropies.append(-(logp.exp() * logp).sum(-1))
        done |= nxt == eos
        if done.all():
            break
        out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    tokens = torch.stack(tokens, 1)
    is_eos = (tokens == eos).long()
    return tokens, (torch.cumsum(is_eos, 1) - is_eos) == 0, torch.stack(log_probs, 1), torch.stack(entropies, 1)


def response_logits(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits (B, T, V) of the distribution each response token was sampled from: the model's logits
    divided by the sampling temperature. PPO's old and new log-probs must both come from these, or the
    ratio compares the policy with something that never generated the data."""
    logits = model(input_ids=torch.cat([prompt_ids, tokens], 1)).logits[:, prompt_ids.shape[1] - 1 : -1]
    return logits.float() / temperature


def response_log_probs(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs (B, T) of the response tokens under softmax(logits / temperature)."""
    logits = response_logits(model, prompt_ids, tokens, temperature)
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


def _std_err(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None  # one seed has no spread to report (JSON null)
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def aggregate(runs: list[dict], k_max: int) -> dict:
    """Mean and standard error over seeds per arm (pass@1, pass@k_max, entropy, distinct correct), and the
    paired differences arm - grpo, seed by seed (the arms of one seed share SFT weights, data and prompts)."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    metrics = {"pass@1": lambda r: r["pass_at_k"]["1"], f"pass@{k_max}": lambda r: r["pass_at_k"][str(k_max)],
               "entropy": lambda r: r["entropy"], "distinct_correct": lambda r: r["distinct_correct"]}
    out: dict = {"per_arm": {}, "paired_vs_grpo": {}, "paired_vs_sft": {}}
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        out["per_arm"][arm] = {name: {"mean": sum(map(f, rows)) / len(rows), "se": _std_err(list(map(f, rows))),
                                      "n_seeds": len(rows)} for name, f in metrics.items()}
        for ref in ("grpo", "sft"):
            if arm == ref:
                continue
            pairs = [(r, by[(ref, r["seed"])]) for r in rows if (ref, r["seed"]) in by]
            if pairs:
                out[f"paired_vs_{ref}"][arm] = {
                    name: {"mean": sum(f(a) - f(b) for a, b in pairs) / len(pairs),
                           "se": _std_err([f(a) - f(b) for a, b in pairs]), "n_seeds": len(pairs)}
                    for name, f in metrics.items()}
    return out


def plot_summary(summary: dict, path: Path) -> None:
    """Three panels: pass@k against k (mean over seeds, band = min..max over seeds), then pass@k_max and
    the mean token entropy on the curve mazes against RL step (mean over seeds, same band)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    k_max = summary["settings"]["eval_n"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, arm in enumerate(arms):
        rows = [r for r in runs if r["arm"] == arm]
        color = f"C{i}"
        ks = sorted(int(k) for k in rows[0]["pass_at_k"])
        ys = torch.tensor([[r["pass_at_k"][str(k)] for k in ks] for r in rows])
        axes[0].plot(ks, ys.mean(0), color=color, marker=".", label=arm)
        axes[0].fill_between(ks, ys.min(0).values, ys.max(0).values, color=color, alpha=0.15)
        for ax, key in ((axes[1], f"pass@{k_max}"), (axes[2], "entropy")):
            steps = rows[0]["curve"]["step"]
            ys = torch.tensor([r["curve"][key] for r in rows])
            ax.plot(steps, ys.mean(0), color=color, marker=".", label=arm)
            ax.fill_between(steps, ys.min(0).values, ys.max(0).values, color=color, alpha=0.15)
    axes[0].set_xscale("log", base=2)
    ks = sorted(int(k) for k in runs[0]["pass_at_k"])
    ticks = [k for k in ks if k & (k - 1) == 0]
    axes[0].set_xticks(ticks, [str(k) for k in ticks])
    axes[0].set(xlabel="k", ylabel="pass@k", ylim=(0, 1.02),
                title=f"held-out mazes, n={k_max}, {len(seeds)} seed(s) (band: min..max)")
    axes[1].set(xlabel="RL step", ylabel=f"pass@{k_max}", title=f"pass@{k_max} on the curve mazes")
    axes[2].set(xlabel="RL step", ylabel="mean token entropy (nats)", title="entropy on the curve mazes")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _se(cell: dict) -> str:
    return "    -" if cell["se"] is None else f"{cell['se']:>5.3f}"


def _print_table(summary: dict) -> None:
    k_max = summary["settings"]["eval_n"]
    agg = summary["aggregate"]
    print(f"\n{'arm':<15}{'pass@1':>16}{f'pass@{k_max}':>16}{'entropy':>16}{'distinct':>16}")
    for arm, m in agg["per_arm"].items():
        cells = [m[name] for name in ("pass@1", f"pass@{k_max}", "entropy", "distinct_correct")]
        print(f"{arm:<15}" + "".join(f"{c['mean']:>9.3f} ±{_se(c)}" for c in cells))
    for arm, m in agg["paired_vs_grpo"].items():
        cells = [m[name] for name in ("pass@1", f"pass@{k_max}", "entropy", "distinct_correct")]
        print(f"{arm + '-grpo':<15}" + "".join(f"{c['mean']:>+9.3f} ±{_se(c)}" for c in cells))
    print(f"(mean ± standard error over seeds {summary['settings']['seeds']}; wrote {summary['paths']})")


def _main(args: argparse.Namespace) -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "<answer>", "</answer>", *"\n.*SELRUD"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("</?answer>|."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join back without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    k_max = args.eval_n
    runs: list[dict] = []
    timings: dict[str, dict[str, float]] = {}
    data_notes: dict[int, list[dict]] = {}

    for seed in args.seeds:
        seed_runs, timings[str(seed)], data_notes[seed] = _one_seed(args, seed, tok)
        runs.extend(seed_runs)

    settings = {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items() if not key.startswith("_")}
    settings.pop("func", None)
    settings["data"] = {str(seed): notes for seed, notes in data_notes.items()}
    settings["curve"] = (f"pass@1, pass@{k_max} (n={k_max}) and mean token entropy on the first {args.curve_mazes} "
                         f"held-out mazes, every {args.curve_every} RL steps; step 0 is the SFT start")
    summary = {
        "runs": runs,
        "settings": settings,
        "aggregate": aggregate(runs, k_max),
        "timings_s": {s: {k: round(v, 1) for k, v in t.items()} for s, t in timings.items()},
        "wall_s": round(time.time() - t_start, 1),
        "paths": [str(args.out / "summary.json"), str(args.out / "summary.png")],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_summary(summary, args.out / "summary.png")
    return summary



# ---- 3-5. one seed: data, SFT, the RL arms, evaluation -----------------------------------------------
def _one_seed(args: argparse.Namespace, seed: int, tok) -> tuple[list[dict], dict[str, float], list[dict]]:
    """Data, SFT, every RL arm and the evaluations for one seed: (runs, timings, data notes)."""
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_passk import advantages, losses
    from openrlhf_passk.metrics import pass_at_k
    from openrlhf_passk.tasks import maze

    device = torch.device(args.device)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    rl_arms = [a for a in RL_ARMS if a in args.arms]
    k_max = args.eval_n
    runs: list[dict] = []
    timing: dict[str, float] = {}
    out = args.out / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, test, notes = make_data(args, seed)
    for note in notes:
        print(f"seed {seed}: {note['size']}x{note['size']} at loops {args.loops}: {note['layouts']} wall layouts, "
              f"{note['grids']} mazes; held out {note['test_layouts']} layouts for {args.test_mazes} test mazes, "
              f"{note['train_layouts']} layouts for {args.train_mazes} training mazes", file=sys.stderr)
    with (out / "test.jsonl").open("w") as f:
        for m in test:
            f.write(json.dumps({"prompt": m.grid + "\n", "label": m.grid, "solution": m.solution,
                                "size": m.size, "length": m.length, "n_shortest": m.n_shortest}) + "\n")
    timing["data_s"] = time.time() - t0

    # ---- 2. a tiny Llama; 2048 positions (RoPE: no parameters) so CPU mode can roll it out (C6) ----------
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.dim, intermediate_size=4 * args.dim,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=2048,
                         pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device)
    # Long enough for the longest answer with detours; an unfinished answer scores 0.
    max_new = 2 + 2 * max(m.length for m in train + test) + 4

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def save(name: str, out: Path = out) -> None:
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)

    def prompts_of(mazes: list) -> torch.Tensor:
        return torch.tensor([encode(m.grid + "\n") for m in mazes], device=device)

    def decode(tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return tok.batch_decode([t[m].tolist() for t, m in zip(tokens, mask, strict=True)],
                                skip_special_tokens=True)

    def evaluate(mazes: list, gen_seed: int, desc: str) -> dict:
        """n = eval_n samples per maze; the same draws for every model of this seed."""
        gen = torch.Generator(device=device).manual_seed(gen_seed)
        counts, distinct, ent_sum, ent_count = [], [], 0.0, 0
        chunk = max(1, 512 // args.eval_n)
        bar = tqdm(total=len(mazes), desc=desc, unit="maze", leave=False)
        for size in args.sizes:
            same = [m for m in mazes if m.size == size]  # one prompt length per batch
            for i in range(0, len(same), chunk):
                part = same[i : i + chunk]
                group = [m for m in part for _ in range(args.eval_n)]
                tokens, mask, _, ent = sample(model, prompts_of(group), max_new, args.temperature, gen, pad, eos)
                texts = decode(tokens, mask)
                ent_sum += ent[mask].sum().item()
                ent_count += int(mask.sum())
                for j, m in enumerate(part):
                    answers = texts[j * args.eval_n : (j + 1) * args.eval_n]
                    right = [a for a in answers if maze.score(a, m.grid, mode="strict") >= 1.0]
                    counts.append([args.eval_n, len(right)])
                    distinct.append(len(set(right)))
                bar.update(len(part))
        bar.close()
        n = torch.tensor([c[0] for c in counts])
        c = torch.tensor([c[1] for c in counts])
        curve = {str(k): float(torch.as_tensor(pass_at_k(n, c, k), dtype=torch.float64).mean())
                 for k in range(1, args.eval_n + 1)}
        return {"counts": counts, "pass_at_k": curve, "entropy": ent_sum / max(ent_count, 1),
                "distinct_correct": sum(distinct) / len(distinct)}

    curve_mazes = test[: args.curve_mazes]

    def curve_point(curve: dict, step: int, desc: str) -> None:
        """pass@1, pass@eval_n and entropy on the curve mazes, appended to curve."""
        r = evaluate(curve_mazes, seed + 7, desc)
        curve["step"].append(step)
        curve["pass@1"].append(r["pass_at_k"]["1"])
        curve[f"pass@{k_max}"].append(r["pass_at_k"][str(k_max)])
        curve["entropy"].append(r["entropy"])
        tqdm.write(f"{desc} step {step}: pass@1 {r['pass_at_k']['1']:.3f}, pass@{k_max} "
                   f"{r['pass_at_k'][str(k_max)]:.3f}, entropy {r['entropy']:.3f}", file=sys.stderr)

    # ---- 3. SFT: next-token loss on the answer only ------------------------------------------------------
    t0 = time.time()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    sft_losses = []
    sft_curve = {"step": [], "pass@1": [], f"pass@{k_max}": [], "entropy": []}
    for step in tqdm(range(args.sft_steps), desc=f"seed {seed} SFT", unit="step"):
        batch = rng.sample(train, min(args.sft_batch, len(train)))
        seqs, labels = [], []
        for m in batch:
            p, a = encode(m.grid + "\n"), encode(f"<answer>{m.solution}</answer>") + [eos]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))  # right padding is harmless for a causal LM: pads come after the text
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=device)
        for group in opt.param_groups:  # short warm-up: Adam's first steps are large
            group["lr"] = args.sft_lr * min(1.0, (step + 1) / 20)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sft_losses.append(round(loss.item(), 4))
        if args.sft_curve_every and (step + 1) % args.sft_curve_every == 0 and step + 1 < args.sft_steps:
            curve_point(sft_curve, step + 1, f"seed {seed} curve SFT")
    save("sft")
    sft_state = {k: v.clone() for k, v in model.state_dict().items()}
    timing["sft_s"] = time.time() - t0

    t0 = time.time()
    sft_eval = evaluate(test, seed + 1, f"seed {seed} eval sft")
    start = {"step": [], "pass@1": [], f"pass@{k_max}": [], "entropy": []}
    curve_point(start, 0, f"seed {seed} curve sft")
    timing["eval_sft_s"] = time.time() - t0
    if "sft" in args.arms:
        for key, values in start.items():  # SFT's last point is the RL start
            sft_curve[key].append(args.sft_steps if key == "step" else values[0])
        runs.append({"seed": seed, "arm": "sft", **sft_eval, "curve": start, "sft_loss": sft_losses,
                     "sft_curve": sft_curve})

    # ---- 4. RL: the same loop per arm; only the advantage (and SimKO's loss inputs) differ ---------------
    for arm in rl_arms:
        t0 = time.time()
        model.load_state_dict(sft_state)
        opt = torch.optim.AdamW(model.parameters(), lr=args.rl_lr, weight_decay=0.0)
        rng = random.Random(seed + 2)  # every arm sees the same prompts in the same order
        gen = torch.Generator(device=device).manual_seed(seed + 3)
        curve = {key: list(v) for key, v in start.items()}
        history = []
        simko = arm == "passk_simko"
        bar = tqdm(range(args.rl_steps), desc=f"seed {seed} RL {arm}", unit="step")
        for step in bar:
            size = args.sizes[step % len(args.sizes)]  # one size per step: no padding when sampling
            mazes = rng.sample([m for m in train if m.size == size], args.prompts_per_step)
            group = [m for m in mazes for _ in range(args.n_samples)]
            prompt_ids = prompts_of(group)
            tokens, mask, _, _ = sample(model, prompt_ids, max_new, args.temperature, gen, pad, eos)
            texts = decode(tokens, mask)
            rewards = torch.tensor([maze.score(t, m.grid, mode="strict") for t, m in zip(texts, group,
                                                                                           strict=True)])
            with torch.no_grad():  # the rollout-time (old) policy, at the sampling temperature
                logits = response_logits(model, prompt_ids, tokens, args.temperature)
                old_log_probs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
                top_ids, entropy, _ = losses.topk_and_entropy(logits, args.simko_topk)
            fmask = mask.float()
            params: dict = {}
            k = args.k
            if arm == "passk_anneal":
                k = advantages.k_schedule(step, k_start=args.k, k_end=1, total_steps=args.rl_steps)
            if ESTIMATOR[arm] != "grpo":
                params["k"] = k
            if arm == "passk_adaptive":
                per_response = (entropy * fmask).sum(1) / fmask.sum(1).clamp(min=1)
                params["entropy"] = per_response.view(len(mazes), args.n_samples).mean(1).cpu()
                params["split"] = args.adaptive_split
            adv = advantages.compute(ESTIMATOR[arm], rewards.view(len(mazes), args.n_samples), **params)
            adv = adv.reshape(-1).to(device)
            if simko:
                gate = losses.entropy_gate(entropy, mask, args.simko_tau)
                is_top1 = top_ids[..., 0] == tokens
                correct = (rewards >= 1.0).to(device)
            order = torch.randperm(len(group), generator=torch.Generator().manual_seed(seed + step))
            for idx in order.chunk(args.mini_batches):
                idx = idx.to(device)
                log_all = torch.log_softmax(response_logits(model, prompt_ids[idx], tokens[idx],
                                                            args.temperature), -1)
                extra = {}
                if simko:
                    extra = {"cand_log_probs": log_all.gather(-1, top_ids[idx]), "gate": gate[idx],
                             "sampled_is_top1": is_top1[idx], "correct": correct[idx],
                             "alpha": args.simko_alpha, "lam": args.simko_lambda}
                log_probs = log_all.gather(-1, tokens[idx, :, None]).squeeze(-1)
                loss = losses.policy_loss(log_probs, old_log_probs[idx], adv[idx, None].expand_as(log_probs),
                                          fmask[idx], clip_low=args.clip_low, clip_high=args.clip_high, **extra)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            history.append({"step": step, "k": k if ESTIMATOR[arm] != "grpo" else 1,
                            "mean_reward": round(rewards.mean().item(), 4),
                            "rollout_entropy": round(((entropy * fmask).sum() / fmask.sum()).item(), 4)})
            bar.set_postfix(reward=f"{rewards.mean().item():.3f}")
            if (step + 1) % args.curve_every == 0 or step + 1 == args.rl_steps:
                curve_point(curve, step + 1, f"seed {seed} curve {arm}")
        save(arm)
        timing[f"rl_{arm}_s"] = time.time() - t0
        t0 = time.time()
        runs.append({"seed": seed, "arm": arm, **evaluate(test, seed + 1, f"seed {seed} eval {arm}"),
                     "curve": curve, "history": history})
        timing[f"eval_{arm}_s"] = time.time() - t0
    timing["total_s"] = sum(v for key, v in timing.items() if key != "total_s")
    print(f"seed {seed} done in {timing['total_s']:.0f} s", file=sys.stderr)
    return runs, timing, notes
