"""CPU mode (`OPENRLHF_PASSK_CPU=1`): the unmodified OpenRLHF 0.11.2 CLI trains end to end on CPU.

Unit tests of the rollout engine (sampling semantics, weight updates) run without Ray. The end-to-end
tests start real trainings, one at a time (each ~1 minute on 2 cores): a reward file with SimKO, the HTTP
server killed mid-run, and a kill-and-resume with a k schedule.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAZE_REWARD = ROOT / "openrlhf_passk" / "rewards" / "maze.py"
RUN_TIMEOUT_S = 900  # a whole training on a busy 2-core machine; the tests wait on events, not on this


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from openrlhf_passk import tiny_model

    return tiny_model.build(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def mazes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mazes")
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
            "30",
            "--test",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    return out / "train.jsonl"


def _subset(mazes: Path, n: int, out: Path) -> Path:
    out.write_text("".join(mazes.read_text().splitlines(keepends=True)[:n]))
    return out


def _train_cmd(model: Path, data: Path, reward: str, out: Path, *extra: str) -> list[str]:
    """An ordinary 0.11.2 command (2 prompts x 6 samples per step, 16 new tokens) plus `extra`."""
    return [
        sys.executable,
        "-m",
        "openrlhf.cli.train_ppo_ray",
        "--actor.model_name_or_path",
        str(model),
        "--reward.remote_url",
        reward,
        "--data.prompt_dataset",
        str(data),
        "--data.input_key",
        "prompt",
        "--data.label_key",
        "label",
        "--advantage_estimator",
        "passk",
        "--passk_k",
        "2",
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
        "--ref.num_gpus_per_node",
        "1",
        "--algo.kl.init_coef",
        "0",
        "--vllm.num_engines",
        "1",
        "--actor.adam.lr",
        "1e-2",
        "--ckpt.path",
        str(out / "ckpt"),
        "--ckpt.output_dir",
        str(out / "final"),
        "--logger.tensorboard_dir",
        str(out / "tb"),
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "RAY_ADDRESS"))}
    env.update({"OPENRLHF_PASSK_CPU": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # own session: a SIGINT reaches only this run (its driver then shuts its local Ray down)
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
    )


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        raise AssertionError(f"run did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None
    return log.read_text()


def _steps(log_text: str) -> dict[int, dict[str, float]]:
    """OpenRLHF's per-step log line `Global step N: {...}` (the trainer's metrics), by step."""
    steps = {}
    for n, body in re.findall(r"Global step (\d+): (\{[^}]*\})", log_text):
        steps[int(n)] = ast.literal_eval(re.sub(r"\b(nan|inf)\b", "None", body))
    return steps


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the rollout engine, without Ray ------------------------------------------------------------------------
def _engine(model: Path):
    from openrlhf_passk.integration import cpu_engine

    return cpu_engine.CPURolloutEngine(model=str(model), seed=0, remote_rm_url=None)


def test_sampling_logprobs_are_those_of_the_processed_distribution(tiny):
    """vLLM's processed log-probs: log-softmax of logits / T restricted to the top-k, recomputed here by a
    plain forward pass of each prefix."""
    from transformers import AutoModelForCausalLM

    from openrlhf_passk.integration.cpu_engine import SamplingParams

    engine = _engine(tiny)
    prompt = engine.tokenizer("S..E path", add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0.7, top_k=5, top_p=1.0, max_tokens=6, min_tokens=6, logprobs=1)
    out = engine.generate_sync(prompt, params).outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length" and len(out.logprobs) == 6

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = list(prompt)
    for token, logprob in zip(out.token_ids, out.logprobs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1] / 0.7
        top = torch.topk(logits, 5)
        assert token in top.indices.tolist()  # top-k respected
        expected = torch.log_softmax(top.values, -1)[top.indices.tolist().index(token)]
        assert logprob[token].logprob == pytest.approx(float(expected), abs=1e-4)
        ids.append(token)


def test_engine_generates_with_the_weights_the_trainer_sends(tiny, tmp_path):
    """Weights of another model, sent through the engine's update protocol (update_weight waits for the
    tensor that RayObjectGroup.broadcast ships), make its greedy output that model's greedy output."""
    from transformers import AutoModelForCausalLM

    from openrlhf_passk import tiny_model
    from openrlhf_passk.integration.cpu_engine import SamplingParams

    other_dir = tiny_model.build(tmp_path / "other", seed=1)
    other = AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32).eval()
    engine = _engine(tiny)
    prompt = engine.tokenizer("S..E path", add_special_tokens=False)["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)

    def generated(params) -> list[tuple[int, float]]:
        out = engine.generate_sync(prompt, params).outputs[0]
        return [(t, lp[t].logprob) for t, lp in zip(out.token_ids, out.logprobs, strict=True)]

    # the other model's greedy tokens and their log-probs, by plain forward passes
    expected, ids = [], list(prompt)
    for _ in range(8):
        with torch.no_grad():
            logp = torch.log_softmax(other(torch.tensor([ids])).logits[0, -1], -1)
        token = int(logp.argmax())
        expected.append((token, float(logp[token])))
        ids.append(token)
        if token == engine.tokenizer.eos_token_id:
            break
    before = generated(greedy)
    assert max(abs(a[1] - b[1]) for a, b in zip(before, expected, strict=True)) > 1e-3  # models differ

    async def send_all():
        await engine.init_process_group()
        for name, param in other.named_parameters():  # upstream order: update_weight fired, then the tensor
            waiting = asyncio.ensure_future(engine.update_weight(name, dtype=param.dtype, shape=param.shape))
            await engine.receive_weight(param.detach().clone())
            await waiting

    asyncio.run(send_all())
    assert engine.weight_updates == len(list(other.named_parameters()))
    after = generated(greedy)
    assert [t for t, _ in after] == [t for t, _ in expected]
    assert [lp for _, lp in after] == pytest.approx([lp for _, lp in expected], abs=1e-4)


def test_engine_rejects_a_weight_it_does_not_have(tiny):
    engine = _engine(tiny)
    with pytest.raises(KeyError, match="no.such.weight"):
        engine.load_weight("no.such.weight", torch.zeros(1))


# ---- bad input: refused before Ray starts ------------------------------------------------------------------
def _refused(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=RUN_TIMEOUT_S)


def test_flag_cpu_mode_cannot_honour_is_refused_before_ray(tiny, mazes, tmp_path):
    done = _refused(_train_cmd(tiny, mazes, str(MAZE_REWARD), tmp_path, "--ds.packing_samples"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--ds.packing_samples cannot run on CPU" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_model_that_does_not_load_is_refused_before_ray(mazes, tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    done = _refused(_train_cmd(broken, mazes, str(MAZE_REWARD), tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--actor.model_name_or_path {broken}: the model or its tokenizer does not load" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


# ---- end to end ----------------------------------------------------------------------------------------------
def test_maze_reward_file_with_simko_trains_two_steps(tiny, mazes, tmp_path):
    data = _subset(mazes, 4, tmp_path / "four.jsonl")  # 4 prompts / 2 per step = 2 steps
    log = tmp_path / "run.log"
    proc = _start(
        _train_cmd(tiny, data, str(MAZE_REWARD), tmp_path, "--passk_k", "4", "--simko", "--ckpt.save_steps", "2"),
        log,
        _env(),
    )
    text = _finish(proc, log)
    assert proc.returncode == 0, text[-4000:]
    assert sorted(_steps(text)) == [1, 2]
    assert text.count("CPU stand-in engine (HF transformers generate), NOT vLLM") == 1  # one engine, one notice

    scalars = _scalars(tmp_path / "tb")
    for tag in (
        "train/passk/pass@k",
        "train/passk/zero_adv_frac",
        "train/simko_gated_frac",
        "train/maze_format_ok",
    ):  # the last one comes from the maze reward file's extra_logs
        assert [step for step, _ in scalars.get(tag, [])] == [1, 2], tag
    assert (tmp_path / "ckpt" / "_actor" / "global_step2").is_dir()
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_http_reward_server_killed_mid_run_stops_the_run_with_our_error(tiny, mazes, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "openrlhf_passk", "serve-reward", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=_env(OPENRLHF_PASSK_CPU="0"),
    )
    log = tmp_path / "run.log"
    try:  # 30 prompts: 15 steps planned, so the run is still going when the server dies
        proc = _start(_train_cmd(tiny, mazes, f"http://127.0.0.1:{port}/get_reward", tmp_path), log, _env())
        _wait_for(lambda: 1 in _steps(log.read_text()), proc, "step 1")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    killed = time.monotonic()
    text = _finish(proc, log, timeout=120)
    stopped_after = time.monotonic() - killed

    step1 = _steps(text)[1]
    assert "passk/pass@k" in step1 and "maze_format_ok" in step1  # step 1 scored through the HTTP server
    assert proc.returncode != 0 and max(_steps(text)) < 15
    assert f"openrlhf-passk: the reward server http://127.0.0.1:{port}/get_reward failed for a sample" in text
    assert stopped_after < 60, f"the run took {stopped_after:.0f} s to stop after the server died"


PARITY_REWARD = '''
import os, pathlib, time

calls = 0


def reward_func(queries, prompts, labels, **kwargs):
    """1 when the character codes of the text sum to an odd number: about half the samples, so advantages
    are not all 0 (lengths would not do: 16 new tokens of a character-level tokenizer). With
    CPU_TEST_BLOCK_AFTER=N, call N+1 marks a file and hangs (the run is then killed from outside)."""
    global calls
    calls += 1
    block = int(os.environ.get("CPU_TEST_BLOCK_AFTER", "0"))
    if block and calls > block:
        pathlib.Path(os.environ["CPU_TEST_MARKER"]).touch()
        time.sleep(3600)
    rewards = [float(sum(map(ord, q)) % 2) for q in queries]
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
'''


def test_kill_and_resume_continues_the_step_and_the_k_schedule(tiny, mazes, tmp_path):
    """Save at step 2, kill during step 3, resume: the second run starts at step 3, the k schedule
    (linear 4 -> 1 over 4 steps, k = floor(4 - 3 s / 4 + 0.5) at 0-based step s: 4, 3, 3, 2; a schedule that
    restarted would give 4 at step 3) continues, and the saved
    policy differs from the initial one."""
    from safetensors.torch import load_file

    reward = tmp_path / "parity.py"
    reward.write_text(PARITY_REWARD)
    data = _subset(mazes, 8, tmp_path / "eight.jsonl")  # 4 steps
    cmd = _train_cmd(
        tiny,
        data,
        str(reward),
        tmp_path,
        "--passk_k",
        "4",
        "--passk_k_schedule",
        "linear",
        "--passk_k_end",
        "1",
        "--passk_k_schedule_steps",
        "4",
        "--ckpt.save_steps",
        "2",
    )
    marker = tmp_path / "blocked"
    first_log = tmp_path / "first.log"
    first = _start(cmd, first_log, _env(CPU_TEST_BLOCK_AFTER="24", CPU_TEST_MARKER=str(marker)))
    _wait_for(marker.exists, first, "the reward of step 3 (after the step-2 checkpoint)")
    os.killpg(first.pid, signal.SIGINT)
    first_text = _finish(first, first_log, timeout=120)
    assert sorted(_steps(first_text)) == [1, 2]
    first_k = [_steps(first_text)[s]["passk/k"] for s in (1, 2)]

    second_log = tmp_path / "second.log"
    second = _start([*cmd, "--ckpt.load_enable"], second_log, _env())
    text = _finish(second, second_log)
    assert second.returncode == 0, text[-4000:]
    steps = _steps(text)
    assert sorted(steps) == [3, 4]
    assert any(steps[s]["passk/zero_adv_frac"] < 1 for s in (3, 4))  # some advantages were non-zero

    initial = load_file(tiny / "model.safetensors")
    trained = load_file(tmp_path / "final" / "model.safetensors")
    # the checkpoint is bf16 (--ds.param_dtype default): compare with the initial weights in that dtype
    changed = [k for k in initial if not torch.equal(initial[k].to(trained[k].dtype), trained[k])]
    assert changed, "no policy weight changed"

    # linear 4 -> 1 over 4 steps, clocked by the global step: a frozen clock (k = 4 throughout) or a
    # schedule restarted by the resume (k = 4 at step 3) fails here.
    assert first_k == [4, 3]
    assert [steps[s]["passk/k"] for s in (3, 4)] == [3, 2]
