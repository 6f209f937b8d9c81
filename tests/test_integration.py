"""OpenRLHF integration against the REAL OpenRLHF installed in .venv (0.11.2, or 0.9.10 when its copy is
first on PYTHONPATH: `make test` runs this file under both). Only flash_attn/vllm are CPU stand-ins.

The CLI checks run `python -m openrlhf.cli.train_ppo_ray` commands one after another in one child process
(see HARNESS: OpenRLHF is imported once, ~13 s of CPU); the experience-maker checks call the real
RemoteExperienceMaker.compute_advantages_and_returns in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import STUB_PATHS
from helpers import free_port

from openrlhf_passk import advantages
from openrlhf_passk.integration import flags, resolve, upstream

REPO = Path(__file__).resolve().parent.parent
VERSION = upstream.openrlhf_version()
LAYOUT = upstream.layout()
V011 = VERSION.startswith("0.11")
MAZE_REWARD = str(REPO / "openrlhf_passk" / "rewards" / "maze.py")


def _flags(**kw) -> list[str]:
    """Per-version spellings of the flags a realistic 4 nodes x 8 GPUs Pass@k maze run uses."""
    names011 = {
        "nodes": "--actor.num_nodes",
        "gpus": "--actor.num_gpus_per_node",
        "ref_nodes": "--ref.num_nodes",
        "ref_gpus": "--ref.num_gpus_per_node",
        "engines": "--vllm.num_engines",
        "tp": "--vllm.tensor_parallel_size",
        "gpu_util": "--vllm.gpu_memory_utilization",
        "model": "--actor.model_name_or_path",
        "reward": "--reward.remote_url",
        "data": "--data.prompt_dataset",
        "input_key": "--data.input_key",
        "label_key": "--data.label_key",
        "rollout_bs": "--rollout.batch_size",
        "n": "--rollout.n_samples_per_prompt",
        "train_bs": "--train.batch_size",
        "micro_rollout": "--rollout.micro_batch_size",
        "micro_train": "--train.micro_batch_size",
        "kl": "--algo.kl.init_coef",
        "clip": "--actor.eps_clip_low_high",
        "max_len": "--data.max_len",
        "max_new": "--rollout.max_new_tokens",
        "zero": "--ds.zero_stage",
    }
    names09 = {
        "nodes": "--actor_num_nodes",
        "gpus": "--actor_num_gpus_per_node",
        "ref_nodes": "--ref_num_nodes",
        "ref_gpus": "--ref_num_gpus_per_node",
        "engines": "--vllm_num_engines",
        "tp": "--vllm_tensor_parallel_size",
        "gpu_util": "--vllm_gpu_memory_utilization",
        "model": "--pretrain",
        "reward": "--remote_rm_url",
        "data": "--prompt_data",
        "input_key": "--input_key",
        "label_key": "--label_key",
        "rollout_bs": "--rollout_batch_size",
        "n": "--n_samples_per_prompt",
        "train_bs": "--train_batch_size",
        "micro_rollout": "--micro_rollout_batch_size",
        "micro_train": "--micro_train_batch_size",
        "kl": "--init_kl_coef",
        "clip": "--eps_clip_low_high",
        "max_len": "--max_len",
        "max_new": "--max_new_tokens",
        "zero": "--zero_stage",
    }
    names = names011 if V011 else names09
    values = {
        "nodes": 4,
        "gpus": 8,
        "ref_nodes": 4,
        "ref_gpus": 8,
        "engines": 16,
        "tp": 2,
        "gpu_util": 0.6,
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "reward": MAZE_REWARD,
        "data": "data/maze_train.jsonl",
        "input_key": "prompt",
        "label_key": "label",
        "rollout_bs": 128,
        "n": 32,
        "train_bs": 1024,
        "micro_rollout": 8,
        "micro_train": 4,
        "kl": 0,
        "clip": "0.2 0.28",
        "max_len": 4096,
        "max_new": 2048,
        "zero": 3,
        **kw,
    }
    out = []
    for key, value in values.items():
        out += [names[key], *str(value).split()]
    colocate = (
        ["--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep"]
        if V011
        else ["--colocate_all_models", "--vllm_enable_sleep", "--deepspeed_enable_sleep"]
    )
    return out + colocate + ["--apply_chat_template" if not V011 else "--data.apply_chat_template"]


# A reward URL where nothing listens (the token must not show up in our messages).
DOWN_URL = f"http://127.0.0.1:{free_port()}/reward?token=tok-123"
# Reward servers that answer 500 (started by the cli_runs fixture): one to the probe sample, one to /health.
PROBE_500_PORT, HEALTH_500_PORT = free_port(), free_port()


def _mission_flags(url: str) -> list[str]:
    """The mission's command, 0.9 spellings verbatim (aliases on 0.11), plus the run's other flags."""
    flags = _flags()
    for flag in (
        ("--rollout.n_samples_per_prompt", "--reward.remote_url")
        if V011
        else ("--n_samples_per_prompt", "--remote_rm_url")
    ):
        i = flags.index(flag)
        del flags[i : i + 2]
    mission = ["--advantage_estimator", "passk", "--passk_k", "8", "--n_samples_per_prompt", "32"]
    return [*mission, "--remote_rm_url", url, *flags]


def _without(flags: list[str], flag: str) -> list[str]:
    i = flags.index(flag)
    return flags[:i] + flags[i + 2 :]


CLI = [sys.executable, "-m", upstream.CLI_MODULE]
RUNS = {
    "help": (CLI + ["--help"], {}),
    "dry_run": (
        CLI + _flags() + ["--advantage_estimator", "passk", "--passk_k", "8"],
        {"OPENRLHF_PASSK_DRY_RUN": "1"},
    ),
    "k_too_big": (CLI + _flags(n=4) + ["--advantage_estimator", "passk", "--passk_k", "8"], {}),
    # The explicit entry point installs the hooks itself, even with the .pth switched off.
    "entry_point": (
        [
            sys.executable,
            "-m",
            "openrlhf_passk.train_ppo_ray",
            *_flags(n=8),
            "--advantage_estimator",
            "passk_full",
            "--passk_k",
            "8",
            "--passk_k_schedule",
            "step",
            "--passk_k_end",
            "2",
            "--passk_k_schedule_steps",
            "100",
        ],
        {"OPENRLHF_PASSK_DRY_RUN": "1", "OPENRLHF_PASSK_DISABLE": "1"},
    ),
    # The mission's example command, with a reward server that is down: a dry run only notes it.
    "mission_dry_run": (CLI + _mission_flags(DOWN_URL), {"OPENRLHF_PASSK_DRY_RUN": "1"}),
    # A real run stops before Ray when the reward server never answers /health.
    "reward_down": (CLI + _mission_flags(DOWN_URL) + ["--passk_reward_wait", "1"], {}),
    # No policy model: upstream would only fail once Ray and the GPUs are up; the dry run must refuse it.
    "no_model": (
        CLI + _without(_flags(), LAYOUT.model_flag) + ["--advantage_estimator", "passk", "--passk_k", "8"],
        {"OPENRLHF_PASSK_DRY_RUN": "1"},
    ),
}
PASSK8 = ["--advantage_estimator", "passk", "--passk_k", "8"]
DRY = {"OPENRLHF_PASSK_DRY_RUN": "1"}
RUNS.update(
    {
        # Local paths are checked; hub ids only warn (nothing can be checked offline).
        "missing_model": (CLI + _flags(model="/models/does-not-exist") + PASSK8, DRY),
        "model_dir_without_config": (CLI + _flags(model="data") + PASSK8, DRY),
        "missing_data": (CLI + _flags(data="data/nope.jsonl") + PASSK8, DRY),
        "wrong_input_key": (CLI + _flags(input_key="question") + PASSK8, DRY),
        "wrong_label_key": (CLI + _flags(label_key="answer") + PASSK8, DRY),
        "json_and_hub_data": (CLI + _flags(data="data/maze_train.json,org/hub-prompts") + PASSK8, DRY),
        # Binary-only estimators with OpenRLHF's length penalties (both versions' spellings via LENGTH).
        "overlong_combination": (
            CLI + _flags() + ["--advantage_estimator", "passk_combination", "--passk_k", "8", "--LEN_BUF", "512"],
            DRY,
        ),
        "stop_properly_exceed": (
            CLI + _flags() + ["--advantage_estimator", "passk_exceed", "--passk_k", "8", "--LEN_STOP", "-0.5"],
            DRY,
        ),
        "overlong_passk": (CLI + _flags() + PASSK8 + ["--LEN_BUF", "512"], DRY),
        "adaptive": (
            CLI
            + _flags()
            + ["--advantage_estimator", "passk_adaptive", "--passk_k", "8"]
            + ["--passk_adaptive_split", "0.25"],
            DRY,
        ),
        # Colocated: actor GPUs (4 x 8) must equal vLLM engines x TP; OpenRLHF checks it only in train().
        "colocate_mismatch": (CLI + _flags(engines=8) + PASSK8, DRY),
        # OpenRLHF drops a critic for every estimator but gae: one warning, and its path is not checked.
        "critic_dropped": (CLI + _flags() + PASSK8 + ["--CRITIC", "/models/no-such-critic"], DRY),
        # The hooks are off: the dry run variable would be dead, and the run real. One warning says so.
        "disabled_dry_run": (CLI + ["--help"], {**DRY, "OPENRLHF_PASSK_DISABLE": "1"}),
        # Schedule flags without a schedule, and k given twice.
        "schedule_flag_alone": (CLI + _flags() + PASSK8 + ["--passk_k_end", "2"], DRY),
        "switch_at_alone": (CLI + _flags() + PASSK8 + ["--passk_k_switch_at", "0.3"], DRY),
        "k_twice": (CLI + _flags() + PASSK8 + ["--passk_param", "k=3"], DRY),
        # An estimator without k and a k schedule: one message, not "add --passk_k" then "grpo takes no k".
        "schedule_without_k": (CLI + _flags() + ["--advantage_estimator", "grpo", "--passk_k_schedule", "linear"], DRY),
        "disabled_cpu": (CLI + ["--help"], {"OPENRLHF_PASSK_CPU": "1", "OPENRLHF_PASSK_DISABLE": "1"}),
        # A reward server that answers 500: a real run stops before Ray with exit 2, as the dry run does.
        "probe_500": (
            CLI + _mission_flags(f"http://127.0.0.1:{PROBE_500_PORT}/reward") + ["--passk_reward_wait", "5"], {}
        ),
        "health_500_dry_run": (CLI + _mission_flags(f"http://127.0.0.1:{HEALTH_500_PORT}/reward"), DRY),
    }
)
for _name, (_cmd, _env) in RUNS.items():
    _cmd[:] = [
        {"--LEN_BUF": f"--{'reward.' if V011 else ''}overlong_buffer_len",
         "--LEN_STOP": f"--{'reward.' if V011 else ''}stop_properly_penalty_coef",
         "--CRITIC": "--critic.model_name_or_path" if V011 else "--critic_pretrain"}.get(a, a)
        for a in _cmd
    ]  # fmt: skip


# Runs every command above in ONE child process, one after another: OpenRLHF is imported once (~13 s of
# CPU) instead of once per command, so the module's CPU need stays small on a loaded 2-core machine.
# Each command runs as `python -m` would run it (runpy, as __main__), with its own argv, environment,
# captured stdout/stderr and exit code; an uncaught exception goes through sys.excepthook, as at exit.
HARNESS = """
import contextlib, io, json, os, runpy, sys
results = {}
for name, argv, env in json.load(sys.stdin):
    saved_env, hook = dict(os.environ), sys.excepthook
    os.environ.update(env)
    sys.argv = [argv[0], *argv[1:]]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
    sys.excepthook = hook
    os.environ.clear()
    os.environ.update(saved_env)
    results[name] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""
# Commands that need a fresh interpreter (the .pth switched off at start) run in their own process.
OWN_PROCESS = {"entry_point", "disabled_dry_run", "disabled_cpu"}


class _Broken(BaseHTTPRequestHandler):
    """A reward server that answers 500: to every POST, and to /health too when `server.health_500`."""

    def do_GET(self):
        self.send_response(500 if self.server.health_500 else 200)
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _broken_servers():
    servers = []
    for port, health_500 in ((PROBE_500_PORT, False), (HEALTH_500_PORT, True)):
        server = ThreadingHTTPServer(("127.0.0.1", port), _Broken)
        server.health_500 = health_500
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    env = dict(os.environ)
    # Absolute paths: the children run in a temporary directory (and `make` passes the 0.9.10 copy relative).
    paths = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *STUB_PATHS])
    for key in ("OPENRLHF_PASSK_DRY_RUN", "OPENRLHF_PASSK_DISABLE"):
        env.pop(key, None)
    cwd = tmp_path_factory.mktemp("cli")
    # The prompt data the commands name (relative to cwd), as JSON lines and as a JSON list.
    rows = [{"prompt": f"maze {i}", "label": f"solution {i}"} for i in range(3)]
    (cwd / "data").mkdir()
    (cwd / "data" / "maze_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (cwd / "data" / "maze_train.json").write_text(json.dumps(rows))
    # No tight timeout: the limit only turns a hang into a failure.
    shared = [(name, cmd[2:], extra) for name, (cmd, extra) in RUNS.items() if name not in OWN_PROCESS]
    with _broken_servers():
        proc = subprocess.run(
            [sys.executable, "-c", HARNESS],
            input=json.dumps(shared),
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {name: SimpleNamespace(**run) for name, run in json.loads(proc.stdout.splitlines()[-1]).items()}
    for name in OWN_PROCESS:
        cmd, extra = RUNS[name]
        run = subprocess.run(cmd, env={**env, **extra}, cwd=cwd, capture_output=True, text=True, timeout=1800)
        out[name] = SimpleNamespace(returncode=run.returncode, stdout=run.stdout, stderr=run.stderr)
    return out


def _report(run) -> dict:
    """The dry run's report: strict JSON (no NaN / Infinity), and the last thing on stdout."""
    text = ("\n" + run.stdout)[("\n" + run.stdout).rindex("\n{\n") + 1 :]

    def reject(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=reject)  # trailing output after the report fails here too


def _refused(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr and "configuration is valid" not in run.stdout
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr[-2000:])


def _spelling(dest011: str, dest09: str) -> str:
    return f"--{dest011 if V011 else dest09}"


def test_dry_run_report_sizes_and_strict_json(cli_runs):
    report = _report(cli_runs["dry_run"])
    # 4 nodes x 8 GPUs, all colocated with 16 engines x TP 2; 128 prompts x 32 samples; train batch 1024.
    assert report["sizes"] == {
        "actor_gpus": 32,
        "vllm_engines_x_tp": 32,
        "gpus_requested": 32,
        "samples_per_rollout": 4096,
        "optimizer_steps_per_rollout": 4,
    }
    if V011:
        assert report["args"]["ckpt"]["max_mem"] == "inf"  # float("inf") default, as a string
    model = _spelling("actor.model_name_or_path", "pretrain")
    data = _spelling("data.prompt_dataset", "prompt_data")
    assert {"flag": model, "source": "Qwen/Qwen2.5-7B-Instruct", "check": "hub id, not checked offline"} in (
        report["inputs"]
    )
    assert {"flag": data, "source": "data/maze_train.jsonl", "check": "first 3 rows have the keys"} in report["inputs"]
    assert any("Qwen/Qwen2.5-7B-Instruct" in w and "not checked offline" in w for w in report["warnings"])


def test_dry_run_refuses_missing_local_inputs(cli_runs):
    model = _spelling("actor.model_name_or_path", "pretrain")
    data = _spelling("data.prompt_dataset", "prompt_data")
    _refused(cli_runs["missing_model"], f"{model} '/models/does-not-exist' does not exist")
    _refused(cli_runs["model_dir_without_config"], f"{model} 'data' is a directory without config.json")
    _refused(cli_runs["missing_data"], f"{data} 'data/nope.jsonl' does not exist")
    input_key = _spelling("data.input_key", "input_key")
    label_key = _spelling("data.label_key", "label_key")
    _refused(cli_runs["wrong_input_key"], f"row 0 has no 'question' field ({input_key})", "['label', 'prompt']")
    _refused(cli_runs["wrong_label_key"], f"row 0 has no 'answer' field ({label_key})")


def test_dry_run_reads_json_lists_and_warns_on_hub_datasets(cli_runs):
    run = cli_runs["json_and_hub_data"]
    assert run.returncode == 0, run.stderr[-3000:]
    report = _report(run)
    data = _spelling("data.prompt_dataset", "prompt_data")
    assert {"flag": data, "source": "data/maze_train.json", "check": "first 3 rows have the keys"} in report["inputs"]
    assert {"flag": data, "source": "org/hub-prompts", "check": "hub dataset, not checked offline"} in report["inputs"]


def test_binary_only_estimators_refuse_length_penalties(cli_runs):
    buffer_len = _spelling("reward.overlong_buffer_len", "overlong_buffer_len")
    stop = _spelling("reward.stop_properly_penalty_coef", "stop_properly_penalty_coef")
    _refused(cli_runs["overlong_combination"], "passk_combination needs 0/1 rewards", f"{buffer_len} 512")
    _refused(cli_runs["stop_properly_exceed"], "passk_exceed needs 0/1 rewards", f"{stop} -0.5")
    # passk takes any reward: the same penalty is fine there.
    assert cli_runs["overlong_passk"].returncode == 0, cli_runs["overlong_passk"].stderr[-3000:]


def test_adaptive_dry_run_explains_the_flag(cli_runs):
    run = cli_runs["adaptive"]
    assert run.returncode == 0, run.stderr[-3000:]
    passk = _report(run)["passk"]
    assert passk["estimator"] == "passk_adaptive" and passk["params_at_step_0"] == {"k": 8, "split": 0.25}
    assert "entropy picks Pass@1 or Pass@k per prompt" in passk["description"]  # the estimator's docstring
    assert "rollout time" in passk["inputs_per_step"]["entropy"]
    # N = 32, k = 8: a group learns nothing in both arms only if all its samples agree (c = 0 or 32).
    assert passk["zero_advantage_correct_counts"]["8"] == "0, 32"


def test_a_dropped_critic_gets_one_warning_and_no_path_check(cli_runs):
    run = cli_runs["critic_dropped"]
    assert run.returncode == 0, run.stderr[-3000:]
    critic = _spelling("critic.model_name_or_path", "critic_pretrain")
    warning = f"{critic} /models/no-such-critic is ignored: OpenRLHF trains a critic only with"
    assert run.stderr.count(warning) == 1 and warning in " ".join(_report(run)["warnings"])


def test_disable_with_the_dry_run_variable_says_the_run_is_real(cli_runs):
    run = cli_runs["disabled_dry_run"]
    assert run.returncode == 0  # --help
    line = "OPENRLHF_PASSK_DISABLE is on, so OPENRLHF_PASSK_DRY_RUN has no effect: this is a plain OpenRLHF run"
    assert run.stderr.count(line) == 1 and "--passk_k" not in run.stdout  # and our flags are not there


def test_disable_with_the_cpu_variable_gives_one_warning_line(cli_runs):
    run = cli_runs["disabled_cpu"]
    assert run.returncode == 0  # --help
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line]
    assert warnings == [
        "[openrlhf-passk] WARNING: OPENRLHF_PASSK_DISABLE is on, so OPENRLHF_PASSK_CPU has no effect: this is a "
        "plain OpenRLHF run (a real launch, no dry run, no CPU mode)"
    ]
    assert "--passk_k" not in run.stdout


def test_schedule_flags_without_a_schedule_and_k_twice_are_refused(cli_runs):
    _refused(cli_runs["schedule_flag_alone"], "--passk_k_end set the k schedule, but --passk_k_schedule is constant")
    _refused(cli_runs["switch_at_alone"], "--passk_k_switch_at set the k schedule, but --passk_k_schedule is constant")
    _refused(cli_runs["switch_at_alone"], "add --passk_k_schedule step, or drop --passk_k_switch_at")
    _refused(cli_runs["k_twice"], "--passk_param k=3 sets k a second time: --passk_k already gives 8")
    run = cli_runs["schedule_without_k"]
    _refused(run, "--passk_k_schedule linear: the 'grpo' estimator has no k to schedule", "drop --passk_k_schedule")
    assert "add --passk_k" not in run.stderr


def test_a_reward_server_answering_500_is_refused_before_ray(cli_runs):
    run = cli_runs["probe_500"]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "answered a probe sample with 500: it is up but fails on a request" in run.stderr
    assert "Traceback" not in run.stderr and "Ray instance" not in run.stdout + run.stderr
    _refused(cli_runs["health_500_dry_run"], "answered 5xx: it is up but broken", "/health answered 500")
    assert "not reachable" not in cli_runs["health_500_dry_run"].stderr


def test_dry_run_runs_train_colocation_check(cli_runs):
    engines = _spelling("vllm.num_engines", "vllm_num_engines")
    _refused(cli_runs["colocate_mismatch"], "OpenRLHF's train() would reject this", f"{engines} x ", "= 16")


def test_help_lists_our_estimators_and_flags(cli_runs):
    run = cli_runs["help"]
    assert run.returncode == 0, run.stderr[-3000:]
    choices = run.stdout.split(f"{LAYOUT.estimator_flag} {{", 1)[1].split("}", 1)[0].split(",")
    assert set(advantages.available()) <= set(choices)
    assert set(LAYOUT.builtin_estimators) <= set(choices)
    for flag in (
        "--passk_k",
        "--passk_k_schedule",
        "--passk_estimator_module",
        "--passk_num_groups",
        "--simko",
    ):
        assert flag in run.stdout
    if V011:
        assert "--advantage_estimator" in run.stdout  # the alias the mission writes


def test_realistic_multinode_dry_run_exits_0(cli_runs):
    run = cli_runs["dry_run"]
    assert run.returncode == 0, run.stderr[-3000:]
    report = _report(run)
    assert report["openrlhf"] == VERSION
    assert report["passk"]["estimator"] == "passk"
    assert report["passk"]["params_at_step_0"] == {"k": 8}
    # N = 32, k = 8: groups with 0 correct, or fewer than 8 wrong (c >= 25), learn nothing.
    zero = [c for c in range(33) if c == 0 or 32 - c < 8]
    assert report["passk"]["zero_advantage_correct_counts"]["8"] == flags._ranges(zero)
    args = report["args"]
    n = args["rollout"]["n_samples_per_prompt"] if V011 else args["n_samples_per_prompt"]
    assert n == 32


def test_mission_command_dry_run_notes_unreachable_reward_server(cli_runs):
    run = cli_runs["mission_dry_run"]
    assert run.returncode == 0, run.stderr[-3000:]
    report = _report(run)
    assert report["passk"]["estimator"] == "passk" and report["passk"]["params_at_step_0"] == {"k": 8}
    assert report["passk"]["n_samples_per_prompt"] == 32
    args = report["args"]
    url = args["reward"]["remote_url"] if V011 else args["remote_rm_url"]
    redacted = DOWN_URL.split("?")[0] + "?..."
    assert url == [redacted]  # OpenRLHF splits the comma-separated list; the token is never printed
    assert "tok-123" not in run.stdout + run.stderr
    [entry] = report["reward"]
    assert entry["source"] == redacted and "is not reachable" in entry["health"]
    assert any(f"reward server {redacted} is not reachable" in w for w in report["warnings"])


def test_dry_run_requires_a_model(cli_runs):
    run = cli_runs["no_model"]
    assert run.returncode == 2, run.stdout[-2000:]
    assert f"{LAYOUT.model_flag} is required" in run.stderr and "Traceback" not in run.stderr


def test_reward_server_down_stops_before_ray(cli_runs):
    run = cli_runs["reward_down"]
    assert run.returncode == 1, run.stderr[-3000:]
    redacted = DOWN_URL.split("?")[0] + "?..."
    assert f"[openrlhf-passk] error: the reward server {redacted} (--" in run.stderr
    assert "is not ready after 1 s" in run.stderr and "tok-123" not in run.stderr
    assert "Traceback" not in run.stderr and "Ray instance" not in run.stdout + run.stderr


def test_dry_run_checks_reward_file(cli_runs):
    report = _report(cli_runs["dry_run"])
    assert report["reward"] == [
        {"source": MAZE_REWARD, "kind": "reward_func file", "check": "loads, defines reward_func"}
    ]


def test_k_larger_than_n_exits_nonzero_with_message(cli_runs):
    run = cli_runs["k_too_big"]
    assert run.returncode != 0
    assert "--passk_k must satisfy 1 <= k <=" in run.stderr and "got k=8" in run.stderr
    assert "Traceback" not in run.stderr


def test_explicit_entry_point_works_with_pth_disabled(cli_runs):
    run = cli_runs["entry_point"]
    assert run.returncode == 0, run.stderr[-3000:]
    report = _report(run)
    assert report["passk"]["k_schedule"]["k_values"] == [8, 2]
    assert report["passk"]["estimator"] == "passk_full"


def test_bootstrap_is_lazy_and_switchable(subprocess_env):
    probe = (
        "import json, sys; from openrlhf_passk.integration import bootstrap; "
        "print(json.dumps([bootstrap.installed(), 'torch' in sys.modules, 'openrlhf' in sys.modules, "
        "'openrlhf_passk.integration.bootstrap' in sys.modules]))"
    )
    plain = [
        sys.executable,
        "-c",
        probe.replace("from openrlhf_passk.integration import bootstrap; ", "").replace(
            "bootstrap.installed()", "any(type(f).__name__ == 'PostImportFinder' for f in sys.meta_path)"
        ),
    ]
    out = subprocess.run(plain, env=subprocess_env, capture_output=True, text=True, check=True)
    # Installed by the .pth at interpreter start, without torch or OpenRLHF.
    assert json.loads(out.stdout) == [True, False, False, True]
    off = subprocess.run(
        [sys.executable, "-c", probe],
        env={**subprocess_env, "OPENRLHF_PASSK_DISABLE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(off.stdout) == [False, False, False, True]


def test_unsupported_version_names_supported_ones():
    with pytest.raises(upstream.UnsupportedVersion, match=r"supports OpenRLHF 0\.11\.2 and 0\.9\.10, found 0\.10\.0"):
        upstream.layout("0.10.0")


# ── Experience maker: real OpenRLHF code on real Experience objects ──

G, N, A = 6, 8, 12  # prompts, samples per prompt, max response tokens


def _args(estimator: str, *, kl_coef=0.0, overlong=None, clip=(-10.0, 10.0), passk_argv=()):
    ours = argparse.ArgumentParser()
    flags.add_arguments(ours)
    passk = vars(ours.parse_args(list(passk_argv)))
    if V011:
        args = SimpleNamespace(
            rollout=SimpleNamespace(
                n_samples_per_prompt=N, micro_batch_size=4, max_tokens_per_gpu=40, max_new_tokens=A
            ),
            train=SimpleNamespace(dynamic_batch_enable=True),
            actor=SimpleNamespace(num_nodes=1, num_gpus_per_node=2),
            ds=SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1),
            algo=SimpleNamespace(
                advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False),
                kl=SimpleNamespace(use_loss=False, init_coef=kl_coef, estimator="k1"),
            ),
            reward=SimpleNamespace(
                clip_range=clip,
                overlong_buffer_len=overlong,
                overlong_penalty_factor=1.0,
                stop_properly_penalty_coef=None,
            ),
            data=SimpleNamespace(max_len=64),
        )
    else:
        args = SimpleNamespace(
            n_samples_per_prompt=N,
            micro_rollout_batch_size=4,
            rollout_max_tokens_per_gpu=40,
            max_new_tokens=A,
            use_dynamic_batch=True,
            actor_num_nodes=1,
            actor_num_gpus_per_node=2,
            ring_attn_size=1,
            ds_tensor_parallel_size=1,
            advantage_estimator=estimator,
            gamma=1.0,
            lambd=1.0,
            no_advantage_std_norm=False,
            use_kl_loss=False,
            init_kl_coef=kl_coef,
            kl_estimator="k1",
            reward_clip_range=clip,
            overlong_buffer_len=overlong,
            overlong_penalty_factor=1.0,
            stop_properly_penalty_coef=None,
            max_len=64,
        )
    for key, value in passk.items():
        setattr(args, key, value)
    return args


def _rollout(rewards: torch.Tensor, seed: int = 0):
    """One single-sample Experience per rollout (as the samples generator makes them), G*N in prompt order."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for r in rewards.reshape(-1).tolist():
        prompt_len, resp_len = (
            int(torch.randint(2, 6, (1,), generator=gen)),
            int(torch.randint(1, A + 1, (1,), generator=gen)),
        )
        total = prompt_len + resp_len
        action_mask = torch.zeros(1, resp_len, dtype=torch.bool)
        action_mask[0, :resp_len] = True
        samples.append(
            Experience(
                sequences=torch.randint(3, 100, (1, total), generator=gen),
                attention_mask=torch.ones(1, total, dtype=torch.long),
                action_mask=action_mask,
                kl=torch.rand(1, resp_len, generator=gen) * 0.1,
                rewards=torch.tensor([r], dtype=torch.float32),
                response_length=torch.tensor([float(resp_len)]),
                total_length=torch.tensor([float(total)]),
                truncated=torch.tensor([False]),
                info={"reward": torch.tensor([r], dtype=torch.float32)},
            )
        )
    return samples


def _maker(args):
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    kl_coef = args.algo.kl.init_coef if V011 else args.init_kl_coef
    strategy = SimpleNamespace(args=args)
    return RemoteExperienceMaker(
        None, None, None, None, FixedKLController(kl_coef), strategy, SimpleNamespace(pad_token_id=0)
    )


def _run(args, rewards, *, unpatched=False, step=None):
    """Split the rollout into micro-batches with OpenRLHF's own (seq-length balanced, shuffling) splitter,
    then compute advantages; returns the experiences and the per-sample order they ended up in."""
    from openrlhf.trainer.ppo_utils import experience_maker as em

    maker = _maker(args)
    if step is not None:
        maker._passk_global_step = step
    experiences = maker.split_rollout_samples(_rollout(rewards))
    order = list(itertools.chain.from_iterable(e.index for e in experiences))
    assert order != sorted(order), "the splitter should have shuffled samples across micro-batches"
    if not unpatched:
        return maker.compute_advantages_and_returns(experiences), order
    # Fully unpatched OpenRLHF: the original method with the original module global.
    seam = em.apply_length_penalties
    em.apply_length_penalties = seam.__wrapped__
    try:
        return em.RemoteExperienceMaker.compute_advantages_and_returns.__wrapped__(maker, experiences), order
    finally:
        em.apply_length_penalties = seam


def _binary_rewards(seed=1):
    gen = torch.Generator().manual_seed(seed)
    r = (torch.rand(G, N, generator=gen) < torch.linspace(0.05, 0.95, G).unsqueeze(1)).float()
    r[0] = 0.0  # all wrong
    r[-1] = 1.0  # all right
    return r


def _per_sample(experiences, field):
    """Per-sample rows of a per-token field, with their action masks, in rollout-batch index order."""
    rows = {}
    for e in experiences:
        for j, idx in enumerate(e.index):
            rows[idx] = (getattr(e, field)[j], e.action_mask[j].bool())
    return [rows[i] for i in range(G * N)]


def _info(experiences, key):
    values = {}
    for e in experiences:
        for j, idx in enumerate(e.index):
            values[idx] = float(e.info[key][j])
    return torch.tensor([values[i] for i in range(G * N)], dtype=torch.float64).view(G, N)


def _seed_at(seed: int, step: int) -> int:
    """The per-step seed the integration promises (README): SeedSequence([seed, step]), 63 bits."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]) >> 1


CASES = [
    ("passk", ["--passk_k", "3"], {"k": 3}),
    ("passk_full", ["--passk_k", "4"], {"k": 4}),
    (
        "passk_bootstrap",
        ["--passk_k", "3", "--passk_num_groups", "16", "--passk_seed", "7"],
        {"k": 3, "num_groups": 16, "seed": _seed_at(7, 0)},
    ),
    ("pkpo", ["--passk_k", "4", "--passk_baseline", "loo"], {"k": 4, "baseline": "loo"}),
    ("passk_combination", ["--passk_k", "2"], {"k": 2}),
    ("passk_exceed", ["--passk_k", "2"], {"k": 2}),
    ("grpo", [], {}),
]


@pytest.mark.parametrize("name,argv,params", CASES, ids=[c[0] for c in CASES])
def test_per_token_advantages_equal_registry(name, argv, params):
    rewards = _binary_rewards()
    experiences, _ = _run(_args(name, passk_argv=argv), rewards)
    expected = advantages.compute(name, rewards, **params)
    assert expected.abs().sum() > 0
    for i, (adv, mask) in enumerate(_per_sample(experiences, "advantages")):
        assert torch.allclose(adv[mask], expected.view(-1)[i].expand(int(mask.sum())), atol=1e-6), (name, i)
        assert (adv[~mask] == 0).all()
    # Logged metrics: pass@1, unbiased pass@k (brute force with math.comb), zero-advantage groups, k.
    c = rewards.sum(-1)
    assert torch.allclose(_info(experiences, "passk/pass@1"), (c / N).unsqueeze(1).expand(G, N).double())
    zero = (expected == 0).all(-1).double().unsqueeze(1).expand(G, N)
    assert torch.equal(_info(experiences, "passk/zero_adv_frac"), zero)
    if "k" in params:
        k = params["k"]
        brute = torch.tensor([1 - math.comb(N - int(ci), k) / math.comb(N, k) for ci in c], dtype=torch.float64)
        assert torch.allclose(_info(experiences, "passk/pass@k"), brute.unsqueeze(1).expand(G, N), atol=1e-6)
        assert (_info(experiences, "passk/k") == k).all()
    # group_reward_std is still the std of the rewards (Bessel, as OpenRLHF logs it), rewards are restored.
    std = rewards.std(-1, keepdim=True).expand(G, N).double()
    assert torch.allclose(_info(experiences, "group_reward_std"), std, atol=1e-6)
    assert torch.equal(_info(experiences, "reward"), rewards.double())


def _assert_same(a_list, b_list):
    for a, b in zip(a_list, b_list, strict=True):
        assert a.index == b.index
        for field in ("advantages", "returns", "rewards", "action_mask"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert a.info.keys() >= b.info.keys()
        for key in b.info:
            assert torch.equal(a.info[key], b.info[key]), key


def test_group_norm_is_exactly_upstream():
    rewards = torch.rand(G, N, generator=torch.Generator().manual_seed(3))
    args = _args("group_norm", kl_coef=0.05, overlong=4, clip=(-1.5, 1.5))
    patched, _ = _run(args, rewards)
    unpatched, _ = _run(copy.deepcopy(args), rewards, unpatched=True)
    _assert_same(patched, unpatched)
    assert not any(key.startswith("passk/") for key in patched[0].info)


def test_registry_path_keeps_everything_group_norm_does():
    """A registry estimator that computes group_norm's formula must reproduce upstream group_norm bit for bit,
    with KL shaping, overlong length penalty and reward clipping all active."""
    name = "_test_group_norm_clone"

    @advantages.register(name)
    def clone(rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)

    rewards = torch.rand(G, N, generator=torch.Generator().manual_seed(4))
    ours, _ = _run(_args(name, kl_coef=0.05, overlong=4, clip=(-1.5, 1.5)), rewards)
    upstream_run, _ = _run(_args("group_norm", kl_coef=0.05, overlong=4, clip=(-1.5, 1.5)), rewards, unpatched=True)
    _assert_same(ours, upstream_run)
    assert not torch.allclose(_info(ours, "reward"), rewards.double())  # the overlong penalty did act


def test_k_schedule_follows_global_step():
    argv = [
        "--passk_k",
        "8",
        "--passk_k_schedule",
        "linear",
        "--passk_k_end",
        "2",
        "--passk_k_schedule_steps",
        "6",
    ]
    rewards = _binary_rewards()
    for step in (0, 3, 6, 50):
        experiences, _ = _run(_args("passk", passk_argv=argv), rewards, step=step)
        k = advantages.k_schedule(step, k_start=8, k_end=2, total_steps=6, kind="linear")
        assert (_info(experiences, "passk/k") == k).all()
        expected = advantages.compute("passk", rewards, k=k)
        adv, mask = _per_sample(experiences, "advantages")[N + 1]
        assert torch.allclose(adv[mask], expected.view(-1)[N + 1].expand(int(mask.sum())), atol=1e-6)


def test_bootstrap_seed_differs_per_step_and_reproduces():
    """--passk_seed alone would draw the same subsets at every step; each step derives its own seed."""
    argv = ["--passk_k", "3", "--passk_num_groups", "4", "--passk_seed", "7"]
    rewards = _binary_rewards()

    def advantages_at(step):
        experiences, _ = _run(_args("passk_bootstrap", passk_argv=argv), rewards, step=step)
        return torch.stack([adv[mask][0] for adv, mask in _per_sample(experiences, "advantages")])

    step3 = advantages_at(3)
    assert torch.equal(step3, advantages_at(3))
    assert not torch.equal(step3, advantages_at(4))
    expected = advantages.compute("passk_bootstrap", rewards, k=3, num_groups=4, seed=_seed_at(7, 3))
    assert torch.allclose(step3, expected.view(-1), atol=1e-6)
    with pytest.raises(ValueError, match="--passk_seed must be an integer >= 0"):
        resolve.resolve(_args("passk_bootstrap", passk_argv=["--passk_k", "3", "--passk_seed", "-1"]), LAYOUT)


def _with_entropy(experiences, per_sample: torch.Tensor):
    """What the policy actors' capture leaves on each Experience: its responses' mean token entropy."""
    for e in experiences:
        e.info["passk/entropy"] = per_sample[torch.tensor(e.index)].float()
    return experiences


def test_a_users_estimator_gets_what_it_declares():
    """A user's estimator with the built-in ones' declarations gets their treatment, by declaration, not by
    name: its entropy input from the rollout capture, its extra logs as passk/* metrics, its check and the
    binary-only refusal of length penalties before Ray."""

    def logs(rewards, adv, *, entropy, **params):
        return {"mine_entropy": entropy.double().unsqueeze(1)}

    def check(n, params):
        if params["k"] == n:
            raise ValueError("k must be below N for mine")

    @advantages.register("_test_mine", inputs=("entropy",), binary=True, check=check, logs=logs)
    def mine(rewards, *, k, entropy):
        return advantages.passk(rewards, k=k) * entropy.unsqueeze(1)

    rewards = _binary_rewards()
    per_sample = torch.rand(G * N, generator=torch.Generator().manual_seed(5))
    args = _args("_test_mine", passk_argv=["--passk_k", "2"])
    assert resolve.needs_entropy(args) == "_test_mine"
    maker = _maker(args)
    experiences = maker.compute_advantages_and_returns(
        _with_entropy(maker.split_rollout_samples(_rollout(rewards)), per_sample)
    )
    entropy = per_sample.view(G, N).mean(-1)
    logged = _info(experiences, "passk/mine_entropy")
    assert torch.allclose(logged[:, 0].double(), entropy.double(), atol=1e-6)
    flags.validate(args, LAYOUT)
    with pytest.raises(ValueError, match="k must be below N for mine"):
        flags.validate(_args("_test_mine", passk_argv=["--passk_k", str(N)]), LAYOUT)
    penalised = _args("_test_mine", passk_argv=["--passk_k", "2"], overlong=4)
    with pytest.raises(ValueError, match="_test_mine needs 0/1 rewards"):
        flags.validate(penalised, LAYOUT)


def test_validation_gives_every_declared_input_a_probe_value(monkeypatch):
    """Validation probes an estimator with a value for each per-step input it declares, whatever the input:
    a second input (beside entropy) is checked the same way."""
    monkeypatch.setitem(advantages.INPUTS, "difficulty", "(G,) each prompt's difficulty")
    shapes = []

    @advantages.register("_test_two_inputs", inputs=("entropy", "difficulty"))
    def two_inputs(rewards, *, k, entropy, difficulty):
        shapes.append((tuple(entropy.shape), tuple(difficulty.shape)))
        return advantages.passk(rewards, k=k)

    summary, _ = flags.validate(_args("_test_two_inputs", passk_argv=["--passk_k", "2"]), LAYOUT)
    assert set(summary["inputs_per_step"]) == {"entropy", "difficulty"}
    assert shapes and set(shapes) == {((N + 1,), (N + 1,))}  # one value per probed group (c = 0..N correct)


def test_adaptive_takes_prompt_entropies_in_index_order():
    rewards = _binary_rewards()
    per_sample = torch.rand(G * N, generator=torch.Generator().manual_seed(9))
    args = _args("passk_adaptive", passk_argv=["--passk_k", "3", "--passk_adaptive_split", "0.5"])
    maker = _maker(args)
    experiences = _with_entropy(maker.split_rollout_samples(_rollout(rewards)), per_sample)
    experiences = maker.compute_advantages_and_returns(experiences)
    entropy = per_sample.view(G, N).mean(-1)
    expected = advantages.compute("passk_adaptive", rewards, k=3, entropy=entropy, split=0.5)
    for i, (adv, mask) in enumerate(_per_sample(experiences, "advantages")):
        assert torch.allclose(adv[mask], expected.view(-1)[i].expand(int(mask.sum())), atol=1e-6), i
    # Logged per step: the Pass@1 share (3 of 6 prompts) and a split point between the two arms.
    assert _info(experiences, "passk/adaptive_pass1_frac").mean().item() == pytest.approx(0.5)
    point = _info(experiences, "passk/adaptive_entropy_split")[0, 0].item()
    top = entropy.argsort(descending=True)
    assert entropy[top[3]] < point < entropy[top[2]]


def test_adaptive_without_entropy_is_a_clear_error():
    args = _args("passk_adaptive", passk_argv=["--passk_k", "3"])
    with pytest.raises(RuntimeError, match=r"the 'passk_adaptive' advantage estimator needs each response's token "):
        _run(args, _binary_rewards())
    with pytest.raises(ValueError, match="--passk_param entropy=... is not a setting"):
        resolve.resolve(_args("passk_adaptive", passk_argv=["--passk_k", "3", "--passk_param", "entropy=1"]), LAYOUT)


def test_trainer_hands_global_step_to_experience_maker():
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    class Stop(Exception):
        pass

    class Maker:
        def make_experience_batch(self, samples):
            raise Stop

    trainer = SimpleNamespace(experience_maker=Maker())
    with pytest.raises(Stop):
        BasePPOTrainer.train_step(trainer, [], 17)
    assert trainer.experience_maker._passk_global_step == 17


def test_user_estimator_module(tmp_path):
    module = tmp_path / "my_estimators.py"
    module.write_text(
        "from openrlhf_passk import advantages\n\n"
        "@advantages.register('_test_sign')\n"
        "def sign(rewards, *, scale=1.0):\n"
        "    return (rewards * 2 - 1) * scale\n"
    )
    rewards = _binary_rewards()
    args = _args("_test_sign", passk_argv=["--passk_estimator_module", str(module), "--passk_param", "scale=0.5"])
    experiences, _ = _run(args, rewards)
    adv, mask = _per_sample(experiences, "advantages")[N + 2]
    assert torch.allclose(adv[mask], ((rewards.view(-1)[N + 2] * 2 - 1) * 0.5).expand(int(mask.sum())))
    with pytest.raises(ValueError, match="--passk_k does not apply to the '_test_sign' estimator"):
        resolve.resolve(_args("_test_sign", passk_argv=["--passk_k", "2"]), LAYOUT)


def test_validation_messages():
    def check(estimator, argv, n=N):
        args = _args(estimator, passk_argv=argv)
        if V011:
            args.rollout.n_samples_per_prompt = n
        else:
            args.n_samples_per_prompt = n
        return flags.validate(args, LAYOUT)

    with pytest.raises(ValueError, match=r"--passk_k 3; --\S+ 8\): passk_full splits .* N must be a multiple of k"):
        check("passk_full", ["--passk_k", "3"])
    with pytest.raises(ValueError, match="needs k: add --passk_k"):
        check("passk", [])
    with pytest.raises(ValueError, match="only apply to openrlhf-passk estimators"):
        check("group_norm", ["--passk_k", "2"])
    with pytest.raises(ValueError, match="needs --passk_k_schedule_steps"):
        check("passk", ["--passk_k", "4", "--passk_k_schedule", "linear"])
    # Each refusal names the flag at fault, not the internal parameter or the schedule's k.
    schedule = ["--passk_k", "4", "--passk_k_schedule", "linear", "--passk_k_schedule_steps"]
    with pytest.raises(ValueError, match=r"--passk_k_end must satisfy 1 <= k <= \S+ \(8\); got 10"):
        check("passk", [*schedule, "10", "--passk_k_end", "10"])
    with pytest.raises(ValueError, match="--passk_k_end must be >= 1, got 0"):
        check("passk", [*schedule, "10", "--passk_k_end", "0"])
    with pytest.raises(ValueError, match="--passk_k_schedule_steps must be >= 1, got 0"):
        check("passk", [*schedule, "0"])
    with pytest.raises(ValueError, match="--passk_k_schedule_steps set the k schedule, but --passk_k_schedule is"):
        check("passk", ["--passk_k", "4", "--passk_k_schedule_steps", "5"])
    with pytest.raises(ValueError, match="--passk_param k=3 sets k a second time"):
        check("passk", ["--passk_k", "4", "--passk_param", "k=3"])
    step = ["--passk_k", "4", "--passk_k_schedule", "step", "--passk_k_schedule_steps", "10"]
    with pytest.raises(ValueError, match=r"--passk_k_switch_at must be a fraction of --passk_k_schedule_steps in \["):
        check("passk", [*step, "--passk_k_switch_at", "1.5"])
    with pytest.raises(ValueError, match="--passk_k_switch_at is when the step schedule switches k, but --passk_k_sch"):
        check("passk", [*schedule, "10", "--passk_k_switch_at", "0.3"])
    with pytest.raises(ValueError, match="--passk_k_switch_at set the k schedule, but --passk_k_schedule is constant"):
        check("passk", ["--passk_k", "4", "--passk_k_switch_at", "0.3"])
    summary, _ = check("passk", [*step, "--passk_k_switch_at", "0.3"])
    assert summary["k_schedule"]["k_values"] == [4, 1] and summary["k_schedule"]["switch_at"] == 0.3
    with pytest.raises(ValueError, match="only apply to openrlhf-passk estimators"):
        check("group_norm", ["--passk_k_switch_at", "0.3"])
    with pytest.raises(ValueError, match="--passk_k_schedule linear and --passk_k_end: the 'grpo' estimator has no k"):
        check("grpo", ["--passk_k_schedule", "linear", "--passk_k_end", "2"])
    with pytest.raises(ValueError, match="--passk_k_end: the 'grpo' estimator has no k to schedule"):
        check("grpo", ["--passk_k_end", "2"])
    # k == N: every group of passk gets advantage 0 -> a warning, not an error.
    summary, warnings = check("passk", ["--passk_k", str(N)])
    assert len(warnings) == 1 and "EVERY group" in warnings[0]
    summary, warnings = check("passk", ["--passk_k", "2"])
    assert warnings == [] and summary["zero_advantage_correct_counts"]["2"] == f"0, {N - 1}-{N}"
    with pytest.raises(ValueError, match="--passk_adaptive_split does not apply to the 'passk' estimator"):
        check("passk", ["--passk_k", "2", "--passk_adaptive_split", "0.5"])
    with pytest.raises(ValueError, match=r"split must be a number in \[0, 1\]"):
        check("passk_adaptive", ["--passk_k", "2", "--passk_adaptive_split", "1.5"])


@pytest.mark.parametrize(
    "estimator,coef,refused",
    [("passk_combination", -0.5, True), ("passk_exceed", 0.5, True), ("passk_combination", 0.0, False),
     ("passk_combination", 1.0, False), ("passk", -0.5, False), ("pkpo", 0.5, False)],
)  # fmt: skip
def test_stop_properly_penalty_with_binary_only_estimators(estimator, coef, refused):
    """Coefficient 0 maps a truncated 1 to 0 and 1 changes nothing: rewards stay 0/1, so both pass."""
    args = _args(estimator, passk_argv=["--passk_k", "2"])
    if V011:
        args.reward.stop_properly_penalty_coef = coef
    else:
        args.stop_properly_penalty_coef = coef
    if refused:
        with pytest.raises(ValueError, match=f"{estimator} needs 0/1 rewards, but --.*stop_properly_penalty_coef"):
            flags.validate(args, LAYOUT)
    else:
        flags.validate(args, LAYOUT)


def test_version_detection_matches_the_imported_openrlhf():
    import inspect

    from openrlhf.trainer.ppo_utils import experience_maker as em

    assert f"strategy.args.{LAYOUT.estimator_dest}\n" in inspect.getsource(em)


def test_adaptive_logged_arm_is_the_estimators_arm():
    # G=45, split=0.7: 45 * 0.7 is 31.499999999999996 in floats; the rule is half up on 7/10, so 32 prompts.
    entropy = torch.rand(45, generator=torch.Generator().manual_seed(3))
    rewards = torch.zeros(45, 4)
    logs = advantages.spec("passk_adaptive").logs(rewards, rewards, k=2, entropy=entropy, split=0.7)
    logged = logs["adaptive_pass1_frac"].view(-1)
    top32 = set(sorted(range(45), key=lambda i: -entropy[i].item())[:32])
    assert logged.tolist() == [float(i in top32) for i in range(45)]
