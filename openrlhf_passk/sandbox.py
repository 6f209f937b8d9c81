"""`openrlhf-passk sandbox`: Pass@1 (GRPO) vs Pass@k training on small mazes, on a CPU, over several seeds.

A demonstration and a regression check of the science, not a second trainer. Per seed it reads top to bottom:
  1. data   train and held-out mazes from `tasks.maze` (with loops, so most mazes have several routes). The
            held-out mazes use wall layouts (the grid with S and E blanked) whose whole symmetry class (the 8
            rotations and reflections of the square) never occurs in training;
  2. model  a tiny Llama (HF transformers; head_dim 32, which vLLM's CPU backend runs) and a character-level
            tokenizer, built offline and saved with save_pretrained, so `openrlhf-passk eval --model
            OUT/seed0/passk --data OUT/seed0/test.jsonl` and CPU mode load them;
  3. SFT    supervised training on one shortest solution per maze (saved as `sft/`);
  4. RL     one run per arm, all from the same SFT weights, the same prompts and the same sampling seed (ARMS);
            all use `advantages.compute` and `losses.policy_loss`, the code the OpenRLHF integration runs;
  5. eval   --eval-n samples per held-out maze: per-maze counts, token entropy and distinct correct answers;
            every --curve-every RL steps pass@1 and pass@--curve-k on the first --curve-mazes held-out mazes.
Then the paired statistics of `sandbox_stats` over seeds and mazes, checked against the protocol file.
Outputs: OUT/summary.json, OUT/summary.png, OUT/seedN/{test.jsonl, train.jsonl, sft/, grpo/, ...}; the two
JSONL files hold the held-out and the training mazes in the same rows (prompt, label, ...), in the order the
seed's run uses them.

The prompt is compact (the grid, then a newline) and the answer is `<answer>MOVES</answer>`: a tiny
model cannot read the paper's long instruction prompt, so sandbox numbers are not comparable to the paper's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ARMS = {
    "sft": "no RL: the shared starting point",
    "grpo": "Pass@1 training (GRPO advantage)",
    "passk": "analytic Pass@k training, k = --k, the whole run",
    "passk_then_grpo": "Pass@k (k = --k) for the first --switch-at of the RL steps, then Pass@1: the paper's protocol",
    "passk_linear": "k ramped linearly from --k down to 1 over the RL steps (advantages.k_schedule kind='linear')",
    "passk_simko": "passk plus SimKO's loss (old top-K ids and the entropy gate, taken at rollout time)",
    "passk_adaptive": "per step, the --adaptive-split of prompts with the highest rollout entropy get the Pass@1 "
                      "advantage, the rest Pass@k",
}
RL_ARMS = tuple(a for a in ARMS if a != "sft")
ESTIMATOR = {"grpo": "grpo", "passk": "passk", "passk_then_grpo": "passk", "passk_linear": "passk",
             "passk_simko": "passk", "passk_adaptive": "passk_adaptive"}
SCHEDULE = {"passk_then_grpo": "step", "passk_linear": "linear"}  # the others keep k fixed
# vLLM's CPU attention backend (CpuAttentionBackend.get_supported_head_sizes): CPU mode must be able to roll
# the checkpoints out.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Primary endpoints (the order is the one of PROTOCOL.md); direction: the sign the Pass@k paper predicts.
PRIMARY = (
    {"a": "passk", "b": "grpo", "metric": "pass@16", "alternative": "two-sided", "direction": 1},
    {"a": "passk_then_grpo", "b": "grpo", "metric": "pass@1", "alternative": "greater", "direction": 1},
    {"a": "passk", "b": "grpo", "metric": "entropy", "alternative": "two-sided", "direction": 1},
)
ALPHA = 0.05
# Settings that are not part of the experiment: how fast a run goes, where it writes, and what was merged. The
# device is not among them: CPU and GPU runs of the same settings give different numbers (see `comparable`).
NOT_SETTINGS = {"command", "out", "seeds", "arms", "merge", "report", "threads", "jobs", "protocol", "preset",
                "data", "curve", "merged_from"}
# --merge recomputes every statistic with its own --resamples, so the parts' value does not matter.
RECOMPUTED = {"resamples"}
# `--preset`: what `openrlhf-passk sandbox` runs with no flags (a demo of a few minutes), and the protocol's
# confirmation design. Any flag given explicitly overrides its preset value.
PRESETS = {
    "demo": {"arms": ["sft", "grpo", "passk", "passk_then_grpo"], "rl_steps": 40, "test_mazes": 100,
             "eval_n": 32, "curve_n": 16, "curve_k": 8, "curve_every": 20},
    "protocol": {"arms": list(ARMS), "rl_steps": 160, "test_mazes": 300, "eval_n": 64, "curve_n": 32,
                 "curve_k": 16, "curve_every": 20},
}
DEFAULT_PROTOCOL = Path("docs/sandbox/PROTOCOL.md")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def preset(name: str) -> str:
        return f"default: {PRESETS['demo'][name]} (--preset demo), {PRESETS['protocol'][name]} (--preset protocol)"

    parser.add_argument("--out", type=Path, default=Path("runs/sandbox"), help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="demo: a few minutes on 2 cores; protocol: the settings of docs/sandbox/PROTOCOL.md")
    parser.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                        help="one full run (data split, SFT, every arm) per seed")
    parser.add_argument("--arms", nargs="+", default=None, choices=tuple(ARMS),
                        help="runs to train and evaluate ('sft' is the shared start); " + preset("arms"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                      help="instead of training: combine the summary.json of runs with the same settings (device "
                           "included) but other seeds or arms (for example run apart) into OUT/summary.json, "
                           "summary.png and report.md; the statistics are recomputed with this run's --resamples, so "
                           "parts may differ in it")
    mode.add_argument("--report", type=Path, nargs="+", metavar="DIR",
                      help="instead of training: write DIR/report.md (every arm and metric, every contrast with its "
                           "per-seed values, both intervals, permutation p and smallest detectable effect, the "
                           "update-size check) from DIR/summary.json as it stands: nothing is trained or recomputed. "
                           "Training and --merge write report.md themselves")
    parser.add_argument("--protocol", type=Path, default=None,
                        help=f"protocol file whose settings the run is checked against (default: {DEFAULT_PROTOCOL} "
                             "if it exists)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the same run, faster)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="seeds run in this many processes at once (default: one per CPU core, at most one "
                             "per seed; 1 on cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: the CPU cores divided by --jobs)")
    g = parser.add_argument_group("data")
    g.add_argument("--sizes", type=int, nargs="+", default=[9],
                   help="maze sizes (grid side, odd); 5x5 has 4 wall layouts in one symmetry class, 7x7 132 in 18")
    g.add_argument("--loops", type=float, default=0.3, help="maze generator loop ('braiding') fraction")
    g.add_argument("--train-mazes", type=int, default=10000, help="training mazes per size")
    g.add_argument("--test-mazes", type=int, default=None, help="held-out mazes per size; " + preset("test_mazes"))
    g.add_argument("--test-layouts", type=float, default=0.25,
                   help="fraction of the wall-layout classes held out for the test mazes")
    g.add_argument("--holdout", choices=("symmetry", "layout"), default="symmetry",
                   help="symmetry: no held-out layout is a rotation or reflection of a training one; layout: only "
                        "the exact layouts are held out (for 5x5, whose 4 layouts are one symmetry class)")
    g = parser.add_argument_group("model")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=2, help="attention heads; --dim / --heads must be a head size "
                                                        "vLLM's CPU backend supports (32, 64, ...)")
    g = parser.add_argument_group("SFT")
    g.add_argument("--sft-steps", type=int, default=1000)
    g.add_argument("--sft-batch", type=int, default=64)
    g.add_argument("--sft-lr", type=float, default=2e-3)
    g.add_argument("--sft-curve-every", type=int, default=0,
                   help="if > 0: the curve metrics on the curve mazes every this many SFT steps (for tuning)")
    g = parser.add_argument_group("RL")
    g.add_argument("--rl-steps", type=int, default=None, help=preset("rl_steps"))
    g.add_argument("--switch-at", type=float, default=0.5,
                   help="passk_then_grpo: fraction of the RL steps trained with Pass@k before switching to Pass@1")
    g.add_argument("--prompts-per-step", type=int, default=16)
    g.add_argument("--n-samples", type=int, default=8, help="responses per prompt (N)")
    g.add_argument("--k", type=int, default=4, help="k of Pass@k training (the start of the k schedules)")
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
    g.add_argument("--eval-n", type=int, default=None, help="samples per held-out maze (largest k); "
                                                           + preset("eval_n"))
    g.add_argument("--eval-batch", type=int, default=1024, help="sequences sampled at once in evaluation")
    g.add_argument("--curve-every", type=int, default=None, help="RL steps between learning-curve points; "
                                                                 + preset("curve_every"))
    g.add_argument("--curve-mazes", type=int, default=50, help="held-out mazes (the first ones) for the curve")
    g.add_argument("--curve-n", type=int, default=None, help="samples per curve maze; " + preset("curve_n"))
    g.add_argument("--curve-k", type=int, default=None, help="the mid k of the curve; " + preset("curve_k"))
    g.add_argument("--resamples", type=int, default=10000,
                   help="bootstrap replicates and random sign patterns of the permutation test, per contrast")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left at None from the chosen preset."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    cores = _cores()
    if args.jobs is None:
        args.jobs = 1 if args.device.startswith("cuda") else max(1, min(len(args.seeds), cores))
    if args.threads is None:
        args.threads = max(1, cores // args.jobs)
    return args


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check(args: argparse.Namespace) -> list[str]:
    """The flag problems of a training run, each naming the flag and the fix."""
    problems = []
    if args.k < 1 or args.k > args.n_samples:
        problems.append(f"--k {args.k} must be between 1 and --n-samples {args.n_samples}")
    if args.eval_n < args.k:
        problems.append(f"--eval-n {args.eval_n} must be >= --k {args.k}")
    if not 1 <= args.curve_k <= args.curve_n:
        problems.append(f"--curve-k {args.curve_k} must be between 1 and --curve-n {args.curve_n}")
    if any(s < 5 or s % 2 == 0 for s in args.sizes):
        problems.append(f"--sizes {args.sizes}: every size must be odd and >= 5")
    if not 0 < args.test_layouts < 1:
        problems.append(f"--test-layouts {args.test_layouts} must be a fraction in (0, 1)")
    if not 0 <= args.switch_at <= 1:
        problems.append(f"--switch-at {args.switch_at} must be a fraction of the RL steps in [0, 1]")
    if not 0 <= args.simko_tau < 1:
        problems.append(f"--simko-tau {args.simko_tau} must be in [0, 1) (1 gates no token: SimKO would be off)")
    if not 0 <= args.adaptive_split <= 1:
        problems.append(f"--adaptive-split {args.adaptive_split} must be in [0, 1]")
    if args.temperature <= 0:
        problems.append(f"--temperature {args.temperature} must be > 0")
    if args.curve_every < 1 or args.curve_mazes < 1:
        problems.append("--curve-every and --curve-mazes must be >= 1")
    if args.rl_steps < 1 or args.sft_steps < 1:
        problems.append("--rl-steps and --sft-steps must be >= 1")
    if args.train_mazes < args.prompts_per_step:
        problems.append(f"--train-mazes {args.train_mazes} is below --prompts-per-step {args.prompts_per_step}")
    if args.test_mazes < 1:
        problems.append(f"--test-mazes {args.test_mazes} must be >= 1")
    if args.eval_batch < args.eval_n or args.eval_batch < args.curve_n:
        problems.append(f"--eval-batch {args.eval_batch} must hold one maze's samples (>= --eval-n and --curve-n)")
    problems += resamples_problems(args.resamples)
    if args.jobs < 1 or args.threads < 1:
        problems.append("--jobs and --threads must be >= 1")
    if args.dim % args.heads or args.dim // args.heads not in VLLM_CPU_HEAD_SIZES:
        head = args.dim / args.heads
        problems.append(f"--dim {args.dim} / --heads {args.heads} gives head_dim {head:g}; vLLM's CPU backend (CPU "
                        f"mode rollouts) supports {list(VLLM_CPU_HEAD_SIZES)}: pick --heads so that --dim / --heads "
                        "is one of them (e.g. --dim 64 --heads 2)")
    if len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds {args.seeds}: each seed once")
    if "passk_adaptive" in args.arms:
        from openrlhf_passk import advantages

        if "passk_adaptive" not in advantages.available():
            problems.append("--arms passk_adaptive: this version of openrlhf_passk.advantages has no "
                            "'passk_adaptive' estimator; drop the arm")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    return problems


def resamples_problems(resamples: int) -> list[str]:
    """--resamples checked for training and --merge alike (both compute the statistics)."""
    if resamples >= 100:
        return []
    return [f"--resamples {resamples}: use at least 100 (10000 gives p-values to about 0.001)"]


def run(args: argparse.Namespace) -> int:
    if args.report:
        problems = []
    elif args.merge:  # the merge recomputes the statistics: its resampling is the one training flag it uses
        problems = resamples_problems(args.resamples)
    else:
        problems = check(resolve(args))
    if problems:
        print("openrlhf-passk sandbox: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        if args.report:
            for d in args.report:
                (d / "report.md").write_text(render_report(read_summary(d, "--report")))
                print(f"wrote {d / 'report.md'}")
            return 0
        protocol = load_protocol(args.protocol)
        summary = merge(args.merge, args.out, protocol, args.resamples) if args.merge else train(args, protocol)
    except DataError as e:
        print(f"openrlhf-passk sandbox: error: {e}", file=sys.stderr)
        return 2
    _print_table(summary)
    return 0


class DataError(ValueError):
    """A usage error found after parsing: impossible maze counts, unreadable or unmergeable inputs (exit 2)."""


# ---- the protocol file ---------------------------------------------------------------------------------
def load_protocol(path: Path | None) -> dict | None:
    """The JSON block of the protocol file ({"file", "settings", "arms", "tuning_seeds", "confirmation_seeds",
    "primary"}), or None when no file is given and the default one does not exist."""
    if path is None:
        for candidate in (DEFAULT_PROTOCOL, Path(__file__).resolve().parents[1] / DEFAULT_PROTOCOL):
            if candidate.is_file():
                path = candidate
                break
        else:
            return None
    if not path.is_file():
        raise DataError(f"--protocol {path}: no such file")
    text = path.read_text()
    start = text.find("```json\n")
    end = text.find("\n```", start + 8)
    if start < 0 or end < 0:
        raise DataError(f"--protocol {path}: no ```json block with the frozen settings in it")
    try:
        block = json.loads(text[start + 8 : end])
    except json.JSONDecodeError as e:
        raise DataError(f"--protocol {path}: its ```json block is not valid JSON ({e})") from None
    missing = {"settings", "arms", "confirmation_seeds", "primary"} - set(block)
    if missing:
        raise DataError(f"--protocol {path}: its JSON block lacks {sorted(missing)}")
    return {"file": str(path), **block}


def check_protocol(settings: dict, protocol: dict | None) -> dict:
    """Where a run's settings, arms, seeds and primary endpoints disagree with the protocol."""
    if protocol is None:
        return {"file": None, "matches": None, "note": "no protocol file: not checked"}
    differences = {key: {"run": settings.get(key), "protocol": value} for key, value in protocol["settings"].items()
                   if comparable(key, settings.get(key)) != comparable(key, value)}
    # A setting the protocol does not name (a newer flag) is reported, not guessed at; a protocol that names no
    # device leaves it open.
    extra = sorted(set(settings) - set(protocol["settings"]) - NOT_SETTINGS - {"device"})
    for key in extra:
        differences[key] = {"run": settings[key], "protocol": "(not in the protocol)"}
    if settings["arms"] != protocol["arms"]:
        differences["arms"] = {"run": settings["arms"], "protocol": protocol["arms"]}
    primary = [{k: p[k] for k in ("a", "b", "metric", "alternative")} for p in PRIMARY]
    if primary != protocol["primary"]:
        differences["primary"] = {"run": primary, "protocol": protocol["primary"]}
    seeds = settings["seeds"]
    if seeds == protocol["confirmation_seeds"]:
        role = "confirmation"
    elif set(seeds) <= set(protocol.get("tuning_seeds", [])):
        role = "tuning"
    else:
        role = "other (neither the confirmation seeds nor tuning seeds only)"
    return {"file": protocol["file"], "matches": not differences, "differences": differences, "seeds": role}


def comparable(key: str, value: object) -> object:
    """A setting as runs and protocols are compared on it. The device counts by kind (cpu, cuda): CPU and GPU runs
    of the same settings give different numbers, while cuda:0 and cuda:1 are the same kind of run."""
    return str(value).split(":")[0] if key == "device" and value is not None else value


# ---- 1. data ------------------------------------------------------------------------------------------
def layout(grid: str) -> str:
    """The wall layout of a maze: its grid with S and E replaced by '.'."""
    return grid.replace("S", ".").replace("E", ".")


def symmetry_class(lay: str) -> str:
    """The smallest of the 8 images of a layout under the rotations and reflections of the square."""
    rows = lay.split("\n")
    images = []
    for _ in range(4):
        rows = ["".join(col) for col in zip(*rows[::-1], strict=True)]  # a quarter turn
        images += ["\n".join(rows), "\n".join(r[::-1] for r in rows)]
    return min(images)


def make_data(args: argparse.Namespace, seed: int) -> tuple[list, list, list[int], list[dict]]:
    """(train, test, test clusters, notes): distinct mazes per size, the test ones from held-out layout classes.

    A class is a wall layout's symmetry class (--holdout symmetry) or the layout itself (--holdout layout). The
    test mazes are spread over as many classes as possible (one maze per class before a second one), and each
    test maze's cluster is the index of its class: the unit the bootstrap resamples. The generator is drawn a fixed
    number of times rather than until enough mazes are found: asking for more than exist (for small sizes, the
    whole space) is an error that says how many there are, never a hang or a shorter list."""
    from openrlhf_passk.tasks import maze

    train, test, clusters, notes = [], [], [], []
    key = symmetry_class if args.holdout == "symmetry" else (lambda lay: lay)
    for size in args.sizes:
        draws = max(20_000, 4 * (args.train_mazes + args.test_mazes))
        by_class: dict[str, dict[str, object]] = {}
        layouts = set()
        for s in range(draws):
            m = maze.generate(size, s, loops=args.loops)
            lay = layout(m.grid)
            layouts.add(lay)
            by_class.setdefault(key(lay), {}).setdefault(m.grid, m)
        classes = sorted(by_class)
        if len(classes) < 2:
            raise DataError(
                f"{size}x{size} mazes at --loops {args.loops} have {len(layouts)} wall layout(s) in a single "
                f"{'symmetry class' if args.holdout == 'symmetry' else 'layout'}: nothing can be held out; use "
                f"larger --sizes{', or --holdout layout' if len(layouts) > 1 else ''}")
        random.Random(f"sandbox-split/{seed}/{size}").shuffle(classes)  # each seed holds out other classes
        n_test = min(len(classes) - 1, max(1, round(args.test_layouts * len(classes))))
        pools = {"test": classes[:n_test], "train": classes[n_test:]}
        note = {"size": size, "draws": draws, "layouts": len(layouts), "classes": len(classes),
                "holdout": args.holdout, "grids": sum(map(len, by_class.values()))}
        rng = random.Random(f"sandbox-mazes/{seed}/{size}")
        for split, want, flag in (("test", args.test_mazes, "--test-mazes"),
                                  ("train", args.train_mazes, "--train-mazes")):
            pool = [(c, g) for c in sorted(pools[split]) for g in sorted(by_class[c])]
            if len(pool) < want:
                raise DataError(
                    f"only {len(pool)} distinct {size}x{size} {split} mazes exist ({len(pools[split])} of the "
                    f"{len(classes)} wall-layout classes at --loops {args.loops}, --holdout {args.holdout}, found in "
                    f"{draws} draws, times their S/E placements); lower {flag} to {len(pool)}, change "
                    "--test-layouts, or use larger --sizes")
            if split == "test":  # rank within class first: every class gives one maze before any gives two
                keys = {item: rng.random() for item in pool}
                rank: dict[str, int] = {}
                ordered = []
                for item in sorted(pool, key=keys.get):
                    ordered.append((rank.get(item[0], 0), keys[item], item))
                    rank[item[0]] = rank.get(item[0], 0) + 1
                chosen = [item for _, _, item in sorted(ordered)[:want]]
                index = {c: i for i, c in enumerate(sorted({c for c, _ in chosen}))}
                clusters.extend(len(notes) * 1_000_000 + index[c] for c, _ in chosen)
                note["test_classes_used"] = len(index)
            else:
                chosen = rng.sample(pool, want)
            (test if split == "test" else train).extend(by_class[c][g] for c, g in chosen)
            note[f"{split}_classes"], note[f"{split}_pool"] = len(pools[split]), len(pool)
        notes.append(note)
    return train, test, clusters, notes


# ---- 2. model pieces: module-level so that tests can check them -------------------------------------
def build_tokenizer():
    """The character-level tokenizer: pad, eos, unk, the two answer tags, newline and the 9 grid/move letters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "<answer>", "</answer>", *"\n.*SELRUD"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("</?answer>|."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, max_new: int, temperature: float, gen: torch.Generator,
           pad: int, eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per row of prompt_ids (B, P), all prompts of one length, so no padding.

    Returns tokens (B, T) (pad after the first eos), mask (B, T) (True up to and including the first eos), the
    log-prob of each sampled token under the sampling distribution softmax(logits / temperature), and that
    distribution's entropy per position (both (B, T), meaningful where mask is True). Finished rows leave the
    batch (and the KV cache), so a batch costs what its unfinished answers need, not B times the longest."""
    b, device = len(prompt_ids), prompt_ids.device
    tokens = torch.full((b, max_new), pad, dtype=torch.long, device=device)
    log_probs = torch.zeros(b, max_new, device=device)
    entropies = torch.zeros(b, max_new, device=device)
    out = model(input_ids=prompt_ids, use_cache=True)
    logits, cache = out.logits[:, -1], out.past_key_values
    active = torch.arange(b, device=device)
    width = 0
    for t in range(max_new):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        probs = logp.exp()
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tokens[active, t] = nxt
        log_probs[active, t] = logp.gather(-1, nxt[:, None]).squeeze(1)
        entropies[active, t] = -(probs * logp).sum(-1)
        width = t + 1
        alive = nxt != eos
        if not alive.any() or t + 1 == max_new:
            break
        if not alive.all():
            keep = alive.nonzero().squeeze(1)
            active, nxt = active[keep], nxt[keep]
            cache.reorder_cache(keep)
        logits = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    tokens, log_probs, entropies = tokens[:, :width], log_probs[:, :width], entropies[:, :width]
    is_eos = (tokens == eos).long()
    return tokens, (torch.cumsum(is_eos, 1) - is_eos) == 0, log_probs, entropies


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


@torch.no_grad()
def evaluate(model, tok, mazes: list, n: int, *, temperature: float, gen: torch.Generator, max_new: int,
             batch: int) -> dict:
    """n samples per maze, as many mazes per forward as fit in `batch` sequences (one maze size per batch).

    Returns per maze, in the order of `mazes`: "counts" [n, correct], "maze_entropy" (mean token entropy of its
    n answers, eos included) and "maze_distinct" (distinct correct answers)."""
    from openrlhf_passk.tasks import maze

    device = next(model.parameters()).device
    result: dict[int, tuple[int, float, int]] = {}
    per_batch = max(1, batch // n)
    for size in sorted({m.size for m in mazes}):
        same = [(i, m) for i, m in enumerate(mazes) if m.size == size]  # one prompt length per batch
        for start in range(0, len(same), per_batch):
            part = same[start : start + per_batch]
            ids = torch.tensor([tok(m.grid + "\n", add_special_tokens=False)["input_ids"]
                                for _, m in part], device=device).repeat_interleave(n, 0)
            tokens, mask, _, ent = sample(model, ids, max_new, temperature, gen, tok.pad_token_id, tok.eos_token_id)
            texts = tok.batch_decode([t[k].tolist() for t, k in zip(tokens, mask, strict=True)],
                                     skip_special_tokens=True)
            ent_sum = (ent * mask).sum(1).view(len(part), n).sum(1)
            ent_count = mask.sum(1).view(len(part), n).sum(1).clamp(min=1)
            for j, (i, m) in enumerate(part):
                right = [a for a in texts[j * n : (j + 1) * n] if maze.score(a, m.grid, mode="strict") >= 1.0]
                result[i] = (len(right), float(ent_sum[j] / ent_count[j]), len(set(right)))
    return {"counts": [[n, result[i][0]] for i in range(len(mazes))],
            "maze_entropy": [round(result[i][1], 6) for i in range(len(mazes))],
            "maze_distinct": [result[i][2] for i in range(len(mazes))]}


def pass_curve(counts: list[list[int]], k_max: int) -> dict[str, float]:
    """Mean unbiased pass@k over mazes, k = 1..k_max."""
    from openrlhf_passk.metrics import pass_at_k

    n = torch.tensor([c[0] for c in counts])
    c = torch.tensor([c[1] for c in counts])
    return {str(k): float(torch.as_tensor(pass_at_k(n, c, k), dtype=torch.float64).mean())
            for k in range(1, k_max + 1)}


# ---- training: seeds in parallel processes ---------------------------------------------------------------
def train(args: argparse.Namespace, protocol: dict | None) -> dict:
    """Every seed (in --jobs processes), then the summary: OUT/summary.json and OUT/summary.png."""
    args.out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    results = {}
    if args.jobs == 1 or len(args.seeds) == 1:
        for seed in args.seeds:
            results[seed] = _seed_worker(vars(args), seed)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child inherits torch's thread pools, which can deadlock.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {seed: pool.submit(_seed_worker, vars(args), seed) for seed in args.seeds}
            results = {seed: f.result() for seed, f in futures.items()}
    settings = {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items() if not key.startswith("_")}
    settings.pop("func", None)
    settings["data"] = {str(s): r["notes"] for s, r in results.items()}
    settings["curve"] = (f"pass@1, pass@{args.curve_k} (n={args.curve_n}) and mean token entropy on the first "
                         f"{args.curve_mazes} held-out mazes, every {args.curve_every} RL steps; step 0 is the SFT "
                         "start")
    own = resource.getrusage(resource.RUSAGE_SELF)
    timing = {
        "wall_s": round(time.time() - t_start, 1),
        "cpu_s": round(sum(r["timing"]["cpu_s"] for r in results.values())
                       + (0 if args.jobs == 1 or len(args.seeds) == 1 else own.ru_utime + own.ru_stime), 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "jobs": args.jobs, "threads": args.threads, "cores": _cores(),
        "per_seed": {str(s): r["timing"] for s, r in results.items()},
    }
    runs = [run for seed in args.seeds for run in results[seed]["runs"]]
    test_sets = {str(s): r["test_set"] for s, r in results.items()}
    return write_summary(runs, test_sets, settings, timing, protocol, args.out)


def _seed_worker(settings: dict, seed: int) -> dict:
    """One seed, in this process: {"runs", "test_set", "notes", "timing"} (timing with this seed's CPU seconds)."""
    args = argparse.Namespace(**settings)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    before = resource.getrusage(resource.RUSAGE_SELF)
    runs, timing, notes, test_set = _one_seed(args, seed, build_tokenizer(), progress=args.jobs == 1)
    after = resource.getrusage(resource.RUSAGE_SELF)
    timing["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    timing["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"runs": runs, "test_set": test_set, "notes": notes, "timing": timing}


# ---- 3-5. one seed: data, SFT, the RL arms, evaluation -----------------------------------------------
def _one_seed(args: argparse.Namespace, seed: int, tok, progress: bool = True):
    """Data, SFT, every RL arm and the evaluations for one seed: (runs, timings, data notes, test set)."""
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_passk import advantages, losses
    from openrlhf_passk.tasks import maze

    def log(text: str) -> None:
        tqdm.write(f"[seed {seed}] {text}", file=sys.stderr)

    device = torch.device(args.device)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    rl_arms = [a for a in RL_ARMS if a in args.arms]
    runs: list[dict] = []
    timing: dict[str, float] = {}
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, test, clusters, notes = make_data(args, seed)
    for note in notes:
        log(f"{note['size']}x{note['size']} at loops {args.loops}: {note['layouts']} wall layouts in "
            f"{note['classes']} classes ({args.holdout}) over {note['draws']} draws; {args.test_mazes} test mazes "
            f"from {note['test_classes_used']} held-out classes, {args.train_mazes} training mazes from "
            f"{note['train_classes']} others")
    # The same rows for both splits, so OpenRLHF (--data.input_key prompt --data.label_key label) can train on
    # train.jsonl and `openrlhf-passk eval` score test.jsonl in the sandbox's own prompt format. layout_class
    # indexes the held-out classes only: None for the training mazes.
    for name, mazes, classes in (("test", test, clusters), ("train", train, [None] * len(train))):
        with (out / f"{name}.jsonl").open("w") as f:
            for m, cluster in zip(mazes, classes, strict=True):
                f.write(json.dumps({"prompt": m.grid + "\n", "label": m.grid, "solution": m.solution,
                                    "size": m.size, "length": m.length, "n_shortest": m.n_shortest,
                                    "layout_class": cluster}) + "\n")
    test_set = {"cluster": clusters, "size": [m.size for m in test], "length": [m.length for m in test]}
    timing["data_s"] = time.time() - t0

    # ---- 2. a tiny Llama; 2048 positions (RoPE: no parameters): CPU mode rolls it out at OpenRLHF's default
    # --data.max_len of 2048 tokens (prompt + answer).
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

    def save(name: str) -> None:
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)

    def prompts_of(mazes: list) -> torch.Tensor:
        return torch.tensor([encode(m.grid + "\n") for m in mazes], device=device)

    def run_eval(mazes: list, n: int, gen_seed: int) -> dict:
        """The same draws for every model of this seed."""
        model.eval()
        gen = torch.Generator(device=device).manual_seed(gen_seed)
        r = evaluate(model, tok, mazes, n, temperature=args.temperature, gen=gen, max_new=max_new,
                     batch=args.eval_batch)
        model.train()
        return r

    curve_mazes = test[: args.curve_mazes]
    curve_keys = ("step", "pass@1", f"pass@{args.curve_k}", "entropy")

    def curve_point(curve: dict, step: int, desc: str) -> None:
        r = run_eval(curve_mazes, args.curve_n, seed + 7)
        p = pass_curve(r["counts"], args.curve_k)
        values = (step, p["1"], p[str(args.curve_k)], sum(r["maze_entropy"]) / len(curve_mazes))
        for key, value in zip(curve_keys, values, strict=True):
            curve[key].append(value)
        if progress or step % (4 * args.curve_every) == 0:
            log(f"{desc} step {step}: pass@1 {values[1]:.3f}, pass@{args.curve_k} {values[2]:.3f}, "
                f"entropy {values[3]:.3f}")

    def summarise(r: dict) -> dict:
        solved = [d for (_, c), d in zip(r["counts"], r["maze_distinct"], strict=True) if c > 0]
        return {**r, "pass_at_k": pass_curve(r["counts"], args.eval_n),
                "entropy": sum(r["maze_entropy"]) / len(r["maze_entropy"]),
                "distinct_per_solved": sum(solved) / len(solved) if solved else None}

    # ---- 3. SFT: next-token loss on the answer only ------------------------------------------------------
    t0 = time.time()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    sft_losses = []
    sft_curve = {key: [] for key in curve_keys}
    for step in tqdm(range(args.sft_steps), desc=f"seed {seed} SFT", unit="step", disable=not progress):
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
            curve_point(sft_curve, step + 1, "curve SFT")
    save("sft")
    sft_state = {k: v.clone() for k, v in model.state_dict().items()}
    timing["sft_s"] = time.time() - t0

    t0 = time.time()
    sft_eval = summarise(run_eval(test, args.eval_n, seed + 1))
    start = {key: [] for key in curve_keys}
    curve_point(start, 0, "curve sft")
    timing["eval_sft_s"] = time.time() - t0
    if "sft" in args.arms:
        for key, values in start.items():  # SFT's last point is the RL start
            sft_curve[key].append(args.sft_steps if key == "step" else values[0])
        runs.append({"seed": seed, "arm": "sft", **sft_eval, "curve": start, "sft_loss": sft_losses,
                     "sft_curve": sft_curve})
    log(f"SFT done in {timing['sft_s']:.0f} s: pass@1 {sft_eval['pass_at_k']['1']:.3f}, pass@{args.eval_n} "
        f"{sft_eval['pass_at_k'][str(args.eval_n)]:.3f} on {len(test)} held-out mazes")

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
        bar = tqdm(range(args.rl_steps), desc=f"seed {seed} RL {arm}", unit="step", disable=not progress)
        for step in bar:
            size = args.sizes[step % len(args.sizes)]  # one size per step: no padding when sampling
            mazes = rng.sample([m for m in train if m.size == size], args.prompts_per_step)
            group = [m for m in mazes for _ in range(args.n_samples)]
            prompt_ids = prompts_of(group)
            tokens, mask, _, _ = sample(model, prompt_ids, max_new, args.temperature, gen, pad, eos)
            texts = tok.batch_decode([t[k].tolist() for t, k in zip(tokens, mask, strict=True)],
                                     skip_special_tokens=True)
            rewards = torch.tensor([maze.score(t, m.grid, mode="strict") for t, m in zip(texts, group,
                                                                                           strict=True)])
            with torch.no_grad():  # the rollout-time (old) policy, at the sampling temperature
                logits = response_logits(model, prompt_ids, tokens, args.temperature)
                old_log_probs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
                top_ids, entropy, _ = losses.topk_and_entropy(logits, args.simko_topk)
            fmask = mask.float()
            params: dict = {}
            k = args.k
            if arm in SCHEDULE:
                k = advantages.k_schedule(step, k_start=args.k, k_end=1, total_steps=args.rl_steps,
                                          kind=SCHEDULE[arm], switch_at=args.switch_at)
            if ESTIMATOR[arm] != "grpo":
                params["k"] = k
            if arm == "passk_adaptive":
                per_response = (entropy * fmask).sum(1) / fmask.sum(1).clamp(min=1)
                params["entropy"] = per_response.view(len(mazes), args.n_samples).mean(1).cpu()
                params["split"] = args.adaptive_split
            adv = advantages.compute(ESTIMATOR[arm], rewards.view(len(mazes), args.n_samples), **params)
            zero_groups = float((adv.abs().sum(1) == 0).double().mean())
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
                            "mean_abs_adv": round(adv.abs().mean().item(), 4),
                            "zero_adv_groups": round(zero_groups, 4),
                            "rollout_entropy": round(((entropy * fmask).sum() / fmask.sum()).item(), 4)})
            bar.set_postfix(reward=f"{rewards.mean().item():.3f}")
            if (step + 1) % args.curve_every == 0 or step + 1 == args.rl_steps:
                curve_point(curve, step + 1, f"curve {arm}")
        save(arm)
        timing[f"rl_{arm}_s"] = time.time() - t0
        t0 = time.time()
        runs.append({"seed": seed, "arm": arm, **summarise(run_eval(test, args.eval_n, seed + 1)),
                     "curve": curve, "history": history})
        timing[f"eval_{arm}_s"] = time.time() - t0
        log(f"{arm} done in {timing[f'rl_{arm}_s']:.0f} s: pass@1 {runs[-1]['pass_at_k']['1']:.3f}, "
            f"pass@{args.eval_n} {runs[-1]['pass_at_k'][str(args.eval_n)]:.3f}")
    timing = {key: round(v, 1) for key, v in timing.items()}
    timing["total_s"] = round(sum(timing.values()), 1)
    log(f"done in {timing['total_s']:.0f} s")
    return runs, timing, notes, test_set


# ---- statistics ----------------------------------------------------------------------------------------
def metrics_for(k_max: int) -> list[str]:
    """The reported metrics: pass@k at 1, 4, 8, 16 and k_max (those <= k_max), entropy, distinct per solved maze."""
    ks = sorted({k for k in (1, 4, 8, 16, k_max) if k <= k_max})
    return [f"pass@{k}" for k in ks] + ["entropy", "distinct_per_solved"]


def maze_values(run: dict, metric: str) -> np.ndarray:
    """Per held-out maze: unbiased pass@k, mean token entropy, or distinct correct answers (NaN if unsolved)."""
    if metric.startswith("pass@"):
        from openrlhf_passk.metrics import pass_at_k

        counts = torch.tensor(run["counts"])
        return torch.as_tensor(pass_at_k(counts[:, 0], counts[:, 1], int(metric[5:])), dtype=torch.float64).numpy()
    if metric == "entropy":
        return np.asarray(run["maze_entropy"], dtype=np.float64)
    if metric == "distinct_per_solved":
        c = np.asarray(run["counts"])[:, 1]
        return np.where(c > 0, np.asarray(run["maze_distinct"], dtype=np.float64), np.nan)
    raise ValueError(f"unknown metric {metric!r}")


def arm_value(run: dict, metric: str) -> float | None:
    """A run's metric over its held-out mazes (distinct_per_solved: over the solved ones)."""
    v = maze_values(run, metric)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None


def contrast(runs: list[dict], test_sets: dict, a: str, b: str, metric: str, *, alternative: str = "two-sided",
             resamples: int = 10000) -> dict | None:
    """a - b on `metric`, paired by seed and maze: per-seed values, the seed-level t interval, the two-level
    bootstrap interval (seeds, then layout classes), the stratified paired permutation p, and the smallest
    effect both intervals would detect (80% power). None if no seed has both arms."""
    from openrlhf_passk import sandbox_stats as st

    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted(s for arm, s in by if arm == a and (b, s) in by)
    if not seeds:
        return None
    diffs, clusters, per_seed = [], [], {}
    for s in seeds:
        d = maze_values(by[(a, s)], metric) - maze_values(by[(b, s)], metric)
        keep = ~np.isnan(d)  # distinct_per_solved: the mazes both arms solved
        if not keep.any():
            continue
        diffs.append(d[keep])
        clusters.append(np.asarray(test_sets[str(s)]["cluster"])[keep])
        per_seed[str(s)] = float(d[keep].mean())
    if not diffs:
        return None
    name = f"{a}-{b}/{metric}"
    rng = np.random.default_rng([zlib.crc32(name.encode()), 0])  # reproducible per contrast, in any order
    values = list(per_seed.values())
    t_int = st.t_interval(values, 1 - ALPHA)
    boot = st.two_level_bootstrap(diffs, clusters, n_boot=resamples, rng=rng, level=1 - ALPHA)
    p = st.paired_permutation_p(diffs, n_perm=resamples, rng=rng, alternative=alternative)
    seed_sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"a": a, "b": b, "metric": metric, "alternative": alternative, "per_seed": per_seed,
            "mean": float(np.mean(values)), "seed_sd": seed_sd, "t_interval": list(t_int) if t_int else None,
            "bootstrap_interval": boot["interval"], "bootstrap_sd": boot["sd"], "permutation_p": p,
            "n_mazes": int(sum(len(d) for d in diffs)),
            "mde": st.min_detectable_effect(seed_sd, len(values), boot["sd"], level=1 - ALPHA)}


def _excludes_zero(c: dict, direction: int) -> bool:
    intervals = [c["bootstrap_interval"]] + ([c["t_interval"]] if c["t_interval"] else [])
    if c["t_interval"] is None:
        return False  # one seed: no seed-level interval, so no claim
    return all(lo > 0 for lo, _ in intervals) if direction > 0 else all(hi < 0 for _, hi in intervals)


def statistics(runs: list[dict], test_sets: dict, k_max: int, resamples: int) -> dict:
    """Primary endpoints (Holm over their p-values, a verdict each), secondary contrasts, the pass@k gap of
    passk - grpo at every k, and the equal-footing check of the update sizes."""
    from openrlhf_passk import sandbox_stats as st

    arms = list(dict.fromkeys(r["arm"] for r in runs))
    primary = []
    for spec in PRIMARY:
        c = None
        if int(spec["metric"][5:] if spec["metric"].startswith("pass@") else 0) <= k_max:
            c = contrast(runs, test_sets, spec["a"], spec["b"], spec["metric"], alternative=spec["alternative"],
                         resamples=resamples)
        primary.append(c or {**{k: spec[k] for k in ("a", "b", "metric", "alternative")}, "missing": True})
    live = [c for c in primary if not c.get("missing")]
    for c, adjusted in zip(live, st.holm([c["permutation_p"] for c in live]), strict=True):
        c["holm_p"] = adjusted
    for c, spec in zip(primary, PRIMARY, strict=True):
        if c.get("missing"):
            c["verdict"] = "not run (an arm or the metric is missing)"
            continue
        up = _excludes_zero(c, spec["direction"])
        down = _excludes_zero(c, -spec["direction"])
        if up and c["holm_p"] <= ALPHA:
            c["verdict"] = "reproduced"
        elif down and c["holm_p"] <= ALPHA and spec["alternative"] == "two-sided":
            c["verdict"] = "opposite of the prediction"
        elif c["t_interval"] is None:
            c["verdict"] = "not detected (one seed: no seed-level interval, so no claim)"
        else:
            c["verdict"] = f"not detected (smallest detectable effect {c['mde']:.3f})"
    secondary = []
    pairs = [(a, "grpo") for a in arms if a not in ("grpo", "sft")] + [(a, "sft") for a in arms if a != "sft"]
    pairs += [(a, b) for a, b in (("passk_simko", "passk"), ("passk_then_grpo", "passk"),
                                  ("passk_linear", "passk_then_grpo")) if a in arms and b in arms]
    for a, b in pairs:
        for metric in metrics_for(k_max):
            c = contrast(runs, test_sets, a, b, metric, resamples=resamples)
            if c:
                c["intervals_exclude_0"] = _excludes_zero(c, 1) or _excludes_zero(c, -1)
                secondary.append(c)
    by = {(r["arm"], r["seed"]): r for r in runs}
    gap = {}
    if "passk" in arms and "grpo" in arms:
        seeds = sorted(s for arm, s in by if arm == "passk" and ("grpo", s) in by)
        gap = {k: float(np.mean([by[("passk", s)]["pass_at_k"][k] - by[("grpo", s)]["pass_at_k"][k]
                                 for s in seeds])) for k in by[("passk", seeds[0])]["pass_at_k"]}
    return {"alpha": ALPHA, "resamples": resamples, "primary": primary, "secondary": secondary,
            "passk_minus_grpo_by_k": gap, "equal_footing": equal_footing(runs)}


def equal_footing(runs: list[dict]) -> dict:
    """Mean |advantage| per response over the first and the last tenth of the RL steps, mean over seeds, per arm,
    and its ratio to grpo's; `flag` lists the arms whose ratio is outside [1/2, 2] at the start or the end."""
    out: dict = {"per_arm": {}, "flag": []}
    for arm in dict.fromkeys(r["arm"] for r in runs if "history" in r):
        rows = [r["history"] for r in runs if r["arm"] == arm]
        w = max(1, len(rows[0]) // 10)
        out["per_arm"][arm] = {
            "start": float(np.mean([np.mean([h["mean_abs_adv"] for h in hist[:w]]) for hist in rows])),
            "end": float(np.mean([np.mean([h["mean_abs_adv"] for h in hist[-w:]]) for hist in rows])),
            "zero_adv_groups_start": float(np.mean([np.mean([h["zero_adv_groups"] for h in hist[:w]])
                                                    for hist in rows])),
            "zero_adv_groups_end": float(np.mean([np.mean([h["zero_adv_groups"] for h in hist[-w:]])
                                                  for hist in rows])),
            "steps_averaged": w}
    ref = out["per_arm"].get("grpo")
    if ref:
        for arm, m in out["per_arm"].items():
            m["ratio_to_grpo"] = {when: m[when] / ref[when] if ref[when] else None for when in ("start", "end")}
            if any(r is not None and not 0.5 <= r <= 2 for r in m["ratio_to_grpo"].values()):
                out["flag"].append(arm)
    return out


def aggregate(runs: list[dict], k_max: int) -> dict:
    """Per arm: mean, standard deviation and standard error over seeds of every reported metric."""
    out: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rows = [r for r in runs if r["arm"] == arm]
        out[arm] = {}
        for metric in metrics_for(k_max):
            xs = np.array([v for v in (arm_value(r, metric) for r in rows) if v is not None])
            sd = float(xs.std(ddof=1)) if len(xs) > 1 else None
            out[arm][metric] = {"mean": float(xs.mean()) if len(xs) else None, "sd": sd,
                                "se": sd / math.sqrt(len(xs)) if sd is not None else None, "n_seeds": len(xs)}
    return out


def write_summary(runs: list[dict], test_sets: dict, settings: dict, timing: dict, protocol: dict | None,
                  out: Path) -> dict:
    k_max = settings["eval_n"]
    t0 = time.time()
    summary = {
        "runs": runs,
        "test_sets": test_sets,
        "settings": settings,
        "protocol": check_protocol(settings, protocol),
        "aggregate": aggregate(runs, k_max),
        "statistics": statistics(runs, test_sets, k_max, settings.get("resamples", 10000)),
        "timing": timing,
        "paths": [str(out / "summary.json"), str(out / "summary.png"), str(out / "report.md")],
    }
    summary["timing"]["statistics_s"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_summary(summary, out / "summary.png")
    (out / "report.md").write_text(render_report(summary))
    return summary


def read_summary(d: Path, flag: str) -> dict:
    """DIR/summary.json of a sandbox run, or a DataError naming the flag, the folder and the fix."""
    path = d / "summary.json"
    if not path.is_file():
        raise DataError(f"{flag} {d}: no summary.json there")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{flag} {path}: not valid JSON ({e})") from None
    missing = [key for key in ("runs", "test_sets", "settings", "protocol", "aggregate", "statistics", "timing")
               if key not in summary]
    if missing:
        raise DataError(f"{flag} {d}: its summary.json was written by an older sandbox (it has no "
                        f"{', '.join(missing)}); rerun it")
    return summary


def merge(dirs: list[Path], out: Path, protocol: dict | None, resamples: int) -> dict:
    """Combine the runs of several summaries whose settings agree (apart from seeds, arms, how fast they ran and
    the resampling that the merge redoes), recompute every statistic, and write the merged summary."""
    parts = [read_summary(d, "--merge") for d in dirs]
    ref = parts[0]["settings"]
    for d, part in zip(dirs, parts, strict=True):
        keys = sorted((ref.keys() | part["settings"].keys()) - NOT_SETTINGS - RECOMPUTED)
        diff = [f"{key} ({part['settings'].get(key)!r} here, {ref.get(key)!r} in {dirs[0]})" for key in keys
                if comparable(key, part["settings"].get(key)) != comparable(key, ref.get(key))]
        if diff:
            raise DataError(f"--merge {d}: settings differ from {dirs[0]} in {'; '.join(diff)}; runs with other "
                            "settings (a CPU and a GPU run included) cannot be merged")
    runs = [r for part in parts for r in part["runs"]]
    pairs = [(r["seed"], r["arm"]) for r in runs]
    if len(set(pairs)) != len(pairs):
        raise DataError(f"--merge: some (seed, arm) runs occur twice: {sorted(pairs)}")
    test_sets: dict = {}
    for d, part in zip(dirs, parts, strict=True):
        for seed, ts in part["test_sets"].items():
            if test_sets.setdefault(seed, ts) != ts:
                raise DataError(f"--merge {d}: seed {seed}'s held-out mazes differ from another part's")
    used = sorted({part["statistics"]["resamples"] for part in parts})
    if used != [resamples]:
        print(f"note: the parts' statistics used --resamples {', '.join(map(str, used))}; the merged statistics are "
              f"recomputed with --resamples {resamples}")
    runs.sort(key=lambda r: (r["seed"], tuple(ARMS).index(r["arm"])))
    settings = {**ref, "seeds": sorted({s for s, _ in pairs}), "out": str(out),
                "arms": [a for a in ARMS if any(arm == a for _, arm in pairs)],
                "merged_from": [str(d) for d in dirs], "resamples": resamples,
                "data": {k: v for part in parts for k, v in part["settings"]["data"].items()}}
    timing = {"merged": {str(d): part["timing"] for d, part in zip(dirs, parts, strict=True)},
              "wall_s": None, "cpu_s": round(sum(part["timing"]["cpu_s"] for part in parts), 1)}
    out.mkdir(parents=True, exist_ok=True)
    return write_summary(runs, test_sets, settings, timing, protocol, out)


# ---- outputs -----------------------------------------------------------------------------------------------
def plot_summary(summary: dict, path: Path) -> None:
    """Four panels: pass@k against k (mean over seeds, band = min..max over seeds), then pass@1, pass@curve_k
    and the mean token entropy on the curve mazes against RL step (mean over seeds, same band)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    settings = summary["settings"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    k_mid = settings["curve_k"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [(axes[0, 1], "pass@1"), (axes[1, 0], f"pass@{k_mid}"), (axes[1, 1], "entropy")]
    for i, arm in enumerate(arms):
        rows = [r for r in runs if r["arm"] == arm]
        color = f"C{i}"
        ks = sorted(int(k) for k in rows[0]["pass_at_k"])
        ys = np.array([[r["pass_at_k"][str(k)] for k in ks] for r in rows])
        axes[0, 0].plot(ks, ys.mean(0), color=color, marker=".", label=arm)
        axes[0, 0].fill_between(ks, ys.min(0), ys.max(0), color=color, alpha=0.12)
        for ax, key in panels:
            steps = rows[0]["curve"]["step"]
            ys = np.array([r["curve"][key] for r in rows])
            ax.plot(steps, ys.mean(0), color=color, marker=".", label=arm)
            ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.12)
    axes[0, 0].set_xscale("log", base=2)
    ks = sorted(int(k) for k in runs[0]["pass_at_k"])
    ticks = [k for k in ks if k & (k - 1) == 0]
    axes[0, 0].set_xticks(ticks, [str(k) for k in ticks])
    n_mazes = len(runs[0]["counts"])
    axes[0, 0].set(xlabel="k", ylabel="pass@k", ylim=(0, 1.02),
                   title=f"{n_mazes} held-out mazes, n={settings['eval_n']}, {len(seeds)} seed(s) (band: min..max)")
    where = f"{settings['curve_mazes']} curve mazes, n={settings['curve_n']}"
    axes[0, 1].set(xlabel="RL step", ylabel="pass@1", title=f"pass@1 on the {where}")
    axes[1, 0].set(xlabel="RL step", ylabel=f"pass@{k_mid}", title=f"pass@{k_mid} on the {where}")
    axes[1, 1].set(xlabel="RL step", ylabel="mean token entropy (nats)", title=f"entropy on the {where}")
    if "passk_then_grpo" in arms:
        for ax, _ in panels:
            ax.axvline(settings["switch_at"] * settings["rl_steps"], color="grey", ls=":", lw=1)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render_report(summary: dict) -> str:
    """A summary as markdown: every arm's metrics (mean and sd over seeds, and per seed), every contrast with its
    per-seed values, t and bootstrap intervals, permutation p and, where not detected, the smallest detectable
    effect; the pass@k gap by k and the update-size check. It formats what the summary holds and recomputes nothing,
    so the report of a committed summary.json can be written again without touching it."""
    settings, stats = summary["settings"], summary["statistics"]
    arms = list(summary["aggregate"])
    metrics = list(next(iter(summary["aggregate"].values()), {}))
    seeds = sorted({r["seed"] for r in summary["runs"]})

    def interval(pair: list[float] | None) -> str:
        return "-" if pair is None else f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"

    def pvalue(p: float | None) -> str:
        return "-" if p is None else f"{p:.4f}" if p >= 1e-3 else f"{p:.2g}"  # 1 / 10,001 shows as 0.0001

    def contrast_cells(c: dict) -> list[str]:
        per_seed = ", ".join(f"{seed}: {v:+.3f}" for seed, v in c["per_seed"].items())
        return [f"{c['mean']:+.3f}", per_seed, interval(c["t_interval"]), interval(c["bootstrap_interval"]),
                pvalue(c["permutation_p"])]

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
            "| " + " | ".join(row) + " |" for row in rows] + [""]

    p = summary["protocol"]
    if p["matches"] is None:
        protocol = "not checked (no protocol file)"
    elif p["matches"]:
        protocol = f"every setting matches `{p['file']}`; seeds: {p['seeds']}"
    else:
        differences = "; ".join(f"{key} (run {v['run']!r}, protocol {v['protocol']!r})"
                                for key, v in p["differences"].items())
        protocol = f"**the settings differ from `{p['file']}`** in {differences}; seeds: {p['seeds']}"
    resamples = stats["resamples"]
    lines = [
        f"# Sandbox results: {len(seeds)} seed(s), {len(arms)} arm(s)", "",
        "Written by `openrlhf-passk sandbox` from the `summary.json` beside it (`openrlhf-passk sandbox --report "
        "DIR` writes it again from that file alone). Every number below is in that file.", "",
        f"- Seeds: {', '.join(map(str, seeds))}. Device: {settings.get('device')}. Arms: "
        + ", ".join(f"`{a}`" for a in arms) + ".",
        f"- {settings['rl_steps']} RL steps (k = {settings['k']}, switch at {settings['switch_at']}); "
        f"{len(summary['runs'][0]['counts'])} held-out mazes per seed, n = {settings['eval_n']} samples each.",
        f"- Protocol: {protocol}.",
        f"- Statistics: a contrast a - b is paired by seed and maze; its estimate is the mean over seeds of the "
        f"per-seed mean over mazes. t: {1 - stats['alpha']:.0%} Student's t interval of the per-seed values. "
        f"Bootstrap: {1 - stats['alpha']:.0%} two-level percentile interval ({resamples:,} replicates: seeds, then "
        f"layout classes within a seed). p: paired sign-flip permutation p within seeds ({resamples:,} random sign "
        f"patterns, so at least {1 / (resamples + 1):.4f} unless all patterns were enumerated). Smallest detectable "
        "effect: the true effect at which both intervals would exclude 0 with 80% power.", "",
        "## Every arm: mean +- standard deviation over seeds", ""]
    lines += table(["arm", *metrics], [
        [f"`{arm}`"] + [f"{_fmt(m['mean'])} +- {_fmt(m['sd'])}" if m["sd"] is not None else _fmt(m["mean"])
                        for m in summary["aggregate"][arm].values()] for arm in arms])
    lines += ["## Every arm, per seed", ""]
    lines += table(["arm", "seed", *metrics], [
        [f"`{r['arm']}`", str(r["seed"])] + [_fmt(r["pass_at_k"][m[5:]] if m.startswith("pass@") else r[m])
                                             for m in metrics]
        for arm in arms for r in summary["runs"] if r["arm"] == arm])
    lines += ["## Primary endpoints", "",
              "Holm's correction over the permutation p-values of the endpoints that ran; the verdict needs Holm p "
              f"<= {stats['alpha']} and both intervals excluding 0 on the predicted side.", ""]
    rows = []
    for c in stats["primary"]:
        label = f"`{c['a']}` - `{c['b']}`, {c['metric']} ({c['alternative']})"
        if c.get("missing"):
            rows.append([label, "-", "-", "-", "-", "-", "-", c["verdict"]])
        else:
            rows.append([label, *contrast_cells(c), pvalue(c["holm_p"]), c["verdict"]])
    lines += table(["endpoint", "estimate", "per seed", "t", "bootstrap", "permutation p", "Holm p", "verdict"], rows)
    lines += ["## Secondary contrasts", "",
              "Descriptive: two-sided permutation p without correction, never called reproduced. Every contrast and "
              "metric the run has, including those that go the wrong way.", ""]
    rows = []
    for c in stats["secondary"]:
        if c["t_interval"] is None:
            result = "one seed: no seed-level interval, so no claim"
        elif c["intervals_exclude_0"]:
            result = "both intervals exclude 0"
        else:
            result = f"not detected (smallest detectable effect {c['mde']:.3f})"
        rows.append([f"`{c['a']}` - `{c['b']}`", c["metric"], *contrast_cells(c), result])
    lines += table(["contrast", "metric", "estimate", "per seed", "t", "bootstrap", "permutation p", "result"], rows)
    if stats["passk_minus_grpo_by_k"]:
        lines += ["## `passk` - `grpo` at every k (mean over seeds)", ""]
        lines += table(["k", "pass@k difference"],
                       [[k, f"{v:+.3f}"] for k, v in stats["passk_minus_grpo_by_k"].items()])
    footing = stats["equal_footing"]
    if footing["per_arm"]:
        steps = next(iter(footing["per_arm"].values()))["steps_averaged"]
        lines += ["## Update sizes (equal footing)", "",
                  f"Mean |advantage| per response over the first and the last {steps} RL steps, mean over seeds; the "
                  "ratio to `grpo`'s; the fraction of groups whose advantages are all zero.", ""]
        rows = []
        for arm, m in footing["per_arm"].items():
            ratio = m.get("ratio_to_grpo", {})
            rows.append([f"`{arm}`", f"{m['start']:.3f}", f"{m['end']:.3f}", _fmt(ratio.get("start"), ".2f"),
                         _fmt(ratio.get("end"), ".2f"), f"{m['zero_adv_groups_start']:.2f}",
                         f"{m['zero_adv_groups_end']:.2f}"])
        lines += table(["arm", "start", "end", "start / grpo", "end / grpo", "zero-advantage groups, start",
                        "zero-advantage groups, end"], rows)
        if "grpo" not in footing["per_arm"]:
            lines += ["No `grpo` arm: no ratio to compare.", ""]
        elif footing["flag"]:
            lines += ["**Update sizes differ from `grpo`'s by more than a factor of 2** (a ratio outside [1/2, 2]) "
                      "for " + ", ".join(f"`{a}`" for a in footing["flag"]) + ".", ""]
        else:
            lines += ["Every ratio is within [1/2, 2].", ""]
    timing = summary["timing"]
    if timing.get("wall_s") is not None:
        load = f"; load average {timing['loadavg_start'][0]} at the start, {timing['loadavg_end'][0]} at the end" \
            if "loadavg_start" in timing else ""
        lines += ["## Time", "", f"{timing['wall_s']} s wall, {timing['cpu_s']} CPU s summed over processes "
                  f"(--jobs {timing.get('jobs')}, --threads {timing.get('threads')}){load}.", ""]
    else:
        lines += ["## Time", "", f"Merged from {len(timing.get('merged', {}))} run(s): {timing['cpu_s']} CPU s summed "
                  "over them; their wall times are in `summary.json` (`timing.merged`).", ""]
    return "\n".join(lines)


def _print_table(summary: dict) -> None:
    settings = summary["settings"]
    metrics = metrics_for(settings["eval_n"])
    print(f"\n{'arm':<16}" + "".join(f"{m:>14}" for m in metrics))
    for arm, m in summary["aggregate"].items():
        print(f"{arm:<16}" + "".join(f"{_fmt(m[k]['mean']):>8} ±{_fmt(m[k]['se']):>5}" for k in metrics))
    print("(mean ± standard error over seeds; distinct_per_solved: distinct correct answers per solved maze)")
    print("\nprimary endpoints (t and bootstrap 95% intervals, permutation p, Holm):")
    for c in summary["statistics"]["primary"]:
        label = f"{c['a']} - {c['b']} {c['metric']} ({c['alternative']})"
        if c.get("missing"):
            print(f"  {label}: {c['verdict']}")
            continue
        t = c["t_interval"]
        print(f"  {label}: {c['mean']:+.3f}, t [{_fmt(t and t[0], '+.3f')}, {_fmt(t and t[1], '+.3f')}], bootstrap "
              f"[{c['bootstrap_interval'][0]:+.3f}, {c['bootstrap_interval'][1]:+.3f}], p {c['permutation_p']:.4f}, "
              f"Holm {c['holm_p']:.4f}: {c['verdict']}")
    flag = summary["statistics"]["equal_footing"]["flag"]
    if flag:
        print(f"update sizes: mean |advantage| differs from grpo's by more than 2x for {flag}")
    p = summary["protocol"]
    if p["matches"] is False:
        print(f"NOTE: these settings differ from {p['file']} in {sorted(p['differences'])}")
    elif p["matches"]:
        print(f"settings match {p['file']}; seeds: {p['seeds']}")
    print(f"wrote {summary['paths']}")
