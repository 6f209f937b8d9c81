"""OpenRLHF integration against the REAL OpenRLHF installed in .venv (0.11.2, or 0.9.10 when its copy is
first on PYTHONPATH: `make test` runs this file under both). Only flash_attn/vllm are CPU stand-ins.

The CLI checks run `python -m openrlhf.cli.train_ppo_ray` in subprocesses (started together, as each
one imports OpenRLHF for ~15 s); the experience-maker checks call the real
RemoteExperienceMaker.compute_advantages_and_returns in this process.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openrlhf_passk import advantages
from openrlhf_passk.integration import config, upstream

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


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A reward URL where nothing listens (the token must not show up in our messages).
DOWN_URL = f"http://127.0.0.1:{_closed_port()}/reward?token=tok-123"


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


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    env = dict(os.environ)
    stubs = str(REPO / "tests" / "stubs")
    # Absolute paths: the children run in a temporary directory (and `make` passes the 0.9.10 copy relative).
    paths = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, stubs])
    for key in ("OPENRLHF_PASSK_DRY_RUN", "OPENRLHF_PASSK_DISABLE"):
        env.pop(key, None)
    cwd = tmp_path_factory.mktemp("cli")
    procs = {
        name: subprocess.Popen(
            cmd, env={**env, **extra}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (cmd, extra) in RUNS.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        out[name] = SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)
    return out


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
    report = json.loads(run.stdout[run.stdout.index("{") :])
    assert report["openrlhf"] == VERSION
    assert report["passk"]["estimator"] == "passk"
    assert report["passk"]["params_at_step_0"] == {"k": 8}
    # N = 32, k = 8: groups with 0 correct, or fewer than 8 wrong (c >= 25), learn nothing.
    zero = [c for c in range(33) if c == 0 or 32 - c < 8]
    assert report["passk"]["zero_advantage_correct_counts"]["8"] == config._ranges(zero)
    args = report["args"]
    n = args["rollout"]["n_samples_per_prompt"] if V011 else args["n_samples_per_prompt"]
    assert n == 32


def test_mission_command_dry_run_notes_unreachable_reward_server(cli_runs):
    run = cli_runs["mission_dry_run"]
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{") :])
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
    report = json.loads(cli_runs["dry_run"].stdout[cli_runs["dry_run"].stdout.index("{") :])
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
    report = json.loads(run.stdout[run.stdout.index("{") :])
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
    config.add_arguments(ours)
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


CASES = [
    ("passk", ["--passk_k", "3"], {"k": 3}),
    ("passk_full", ["--passk_k", "4"], {"k": 4}),
    (
        "passk_bootstrap",
        ["--passk_k", "3", "--passk_num_groups", "16", "--passk_seed", "7"],
        {"k": 3, "num_groups": 16, "seed": 7},
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
    if name not in advantages.available():

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
        config.resolve(_args("_test_sign", passk_argv=["--passk_k", "2"]), LAYOUT)


def test_validation_messages():
    def check(estimator, argv, n=N):
        args = _args(estimator, passk_argv=argv)
        if V011:
            args.rollout.n_samples_per_prompt = n
        else:
            args.n_samples_per_prompt = n
        return config.validate(args, LAYOUT)

    with pytest.raises(ValueError, match="must be a multiple of k=3"):
        check("passk_full", ["--passk_k", "3"])
    with pytest.raises(ValueError, match="needs k: add --passk_k"):
        check("passk", [])
    with pytest.raises(ValueError, match="only apply to openrlhf-passk estimators"):
        check("group_norm", ["--passk_k", "2"])
    with pytest.raises(ValueError, match="needs --passk_k_schedule_steps"):
        check("passk", ["--passk_k", "4", "--passk_k_schedule", "linear"])
    # k == N: every group of passk gets advantage 0 -> a warning, not an error.
    summary, warnings = check("passk", ["--passk_k", str(N)])
    assert len(warnings) == 1 and "EVERY group" in warnings[0]
    summary, warnings = check("passk", ["--passk_k", "2"])
    assert warnings == [] and summary["zero_advantage_correct_counts"]["2"] == f"0, {N - 1}-{N}"


def test_version_detection_matches_the_imported_openrlhf():
    import inspect

    from openrlhf.trainer.ppo_utils import experience_maker as em

    assert f"strategy.args.{LAYOUT.estimator_dest}\n" in inspect.getsource(em)
