"""Wall time of a 4-step CPU-mode run (`OPENRLHF_PASSK_CPU=1`), by phase. Measures; asserts nothing.

The run: the unmodified `python -m openrlhf.cli.train_ppo_ray`, tiny model (`tiny_model.build`), 8 maze
prompts, 2 prompts x 6 samples per step, 16 new tokens, passk (k=4), the maze reward file, a checkpoint
at steps 2 and 4. Phases come from the driver's output, time-stamped as each line arrives:
- imports + checks: process start -> CPU mode's notice (torch, DeepSpeed, OpenRLHF imported; flags checked);
- Ray start: -> "Started a local Ray instance";
- model init: -> the first rollout (engines, DeepSpeed actor, tokenizer, dataset);
- rollout / training: OpenRLHF's own per-step timings (timing/generation, timing/make_experience +
  timing/ppo_train + timing/broadcast);
- reward: time inside reward_func (a wrapper around openrlhf_passk/rewards/maze.py reports it per sample
  through extra_logs); it runs inside the rollout, so it is part of the rollout time too;
- checkpoint: first to last file write of each global_stepN directory;
- final save + shutdown: last step -> process exit.

    python benchmarks/cpu_mode.py [--workdir DIR] [--steps 4]
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TIMED_REWARD = """
import importlib.util, time
_spec = importlib.util.spec_from_file_location("maze_reward", {maze!r})
_maze = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_maze)


def reward_func(queries, prompts, labels, **kwargs):
    start = time.perf_counter()
    result = _maze.reward_func(queries, prompts, labels, **kwargs)
    result.setdefault("extra_logs", {{}})["bench_reward_s"] = [time.perf_counter() - start] * len(queries)
    return result
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to put model, data and run (default: tmp)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cpu_mode_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    from openrlhf_passk import tiny_model

    model = tiny_model.build(work / "tiny")
    data = work / "data"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "openrlhf_passk",
            "maze",
            "generate",
            "--sizes",
            "5",
            "--train",
            str(2 * args.steps),
            "--test",
            "2",
            "--out",
            str(data),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    reward = work / "timed_maze_reward.py"
    reward.write_text(TIMED_REWARD.format(maze=str(ROOT / "openrlhf_passk" / "rewards" / "maze.py")))
    run = work / "run"
    cmd = [
        sys.executable,
        "-m",
        "openrlhf.cli.train_ppo_ray",
        "--actor.model_name_or_path",
        str(model),
        "--reward.remote_url",
        str(reward),
        "--data.prompt_dataset",
        str(data / "train.jsonl"),
        "--data.input_key",
        "prompt",
        "--data.label_key",
        "label",
        "--advantage_estimator",
        "passk",
        "--passk_k",
        "4",
        "--rollout.n_samples_per_prompt",
        "6",
        "--rollout.batch_size",
        "2",
        "--train.batch_size",
        "12",
        "--train.micro_batch_size",
        "6",
        "--rollout.micro_batch_size",
        "6",
        "--rollout.max_new_tokens",
        "16",
        "--data.max_len",
        "1024",
        "--actor.num_gpus_per_node",
        "1",
        "--algo.kl.init_coef",
        "0",
        "--vllm.num_engines",
        "1",
        "--ckpt.path",
        str(run / "ckpt"),
        "--ckpt.save_steps",
        "2",
        "--ckpt.output_dir",
        str(run / "final"),
        "--logger.tensorboard_dir",
        str(run / "tb"),
    ]
    env = {**os.environ, "OPENRLHF_PASSK_CPU": "1", "PYTHONUNBUFFERED": "1"}

    start = time.monotonic()
    stamps: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) as proc:
        for line in proc.stdout:
            stamps.append((time.monotonic() - start, line))
    total = time.monotonic() - start
    log = "".join(line for _, line in stamps)
    (work / "run.log").write_text(log)
    if proc.returncode != 0:
        print(log[-4000:])
        print(f"run failed ({proc.returncode}); log: {work / 'run.log'}")
        return 1

    def first(pattern: str) -> float:
        return next(t for t, line in stamps if re.search(pattern, line))

    steps = {
        int(n): ast.literal_eval(re.sub(r"\b(nan|inf)\b", "None", body))
        for n, body in re.findall(r"Global step (\d+): (\{[^}]*\})", log)
    }
    args_checked = first(r"CPU mode: vLLM is replaced")
    ray_up = first(r"Started a local Ray instance")
    first_rollout = first(r"Generate samples")
    last_step = first(rf"Global step {max(steps)}:")

    def total_of(key: str) -> float:
        return sum(s.get(key, 0.0) for s in steps.values())

    samples = total_of("rollout/num_samples")
    reward_s = sum(s.get("bench_reward_s", 0.0) * s.get("rollout/num_samples", 0) for s in steps.values())
    ckpts = []
    for directory in sorted((run / "ckpt" / "_actor").glob("global_step*")):
        mtimes = [f.stat().st_mtime for f in directory.iterdir()]
        ckpts.append(max(mtimes) - min(mtimes))

    rows = [
        ("Python imports + flag and model checks", args_checked),
        ("Ray start", ray_up - args_checked),
        ("model init (engine + DeepSpeed actor)", first_rollout - ray_up),
        (f"rollout, {len(steps)} steps (generation incl. reward)", total_of("timing/generation")),
        (f"reward ({samples:.0f} samples, inside the rollout)", reward_s),
        (
            "training (experience + PPO update + weight sync)",
            total_of("timing/make_experience") + total_of("timing/ppo_train") + total_of("timing/broadcast"),
        ),
        (f"checkpoint ({len(ckpts)} saves, file writes)", sum(ckpts)),
        ("final save + shutdown", total - last_step),
        ("TOTAL wall", total),
    ]
    shape = "2 prompts x 6 samples, 16 new tokens"
    print(f"\nCPU mode, {len(steps)} steps x ({shape}), tiny model, {os.cpu_count()} cores")
    for name, seconds in rows:
        print(f"  {name:<52} {seconds:8.2f} s")
    print(f"work dir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
