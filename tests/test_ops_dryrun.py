"""The shipped training commands are valid, not only well-formed: every command the scripts print, the
one inside each KubeRay RayJob and the compose trainer's go through OpenRLHF 0.11.2's own parser and
checks plus ours (OPENRLHF_PASSK_DRY_RUN=1), on CPU.

All commands run in ONE child process (importing OpenRLHF costs ~10-30 s on a shared CPU): a driver
runs each with `runpy.run_module(..., run_name="__main__", alter_sys=True)`, which is what
`python -m openrlhf.cli.train_ppo_ray` does, so the import hooks and the dry run see the real thing.
Cluster-only paths are mapped onto a temporary copy: /mnt/shared (the PVC) and /data (compose volume)
to a tree holding a tiny generated maze set, /opt/openrlhf-passk (the image's checkout) to this repo.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
MODULE = ["-m", "openrlhf.cli.train_ppo_ray"]

DRIVER = r"""
import contextlib, io, json, runpy, sys
results = []
for argv in json.load(sys.stdin):
    sys.argv = ["train_ppo_ray.py", *argv]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            err.write(str(exc.code))
    except BaseException as exc:  # OpenRLHF's own checks are asserts
        code = 1
        err.write(f"{type(exc).__name__}: {exc}")
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-3000:]})
print("RESULTS " + json.dumps(results))
"""


def printed_command(script: str, env: dict[str, str], *args: str) -> list[str]:
    """Run a script in DRY_RUN mode and parse back the command it prints ("+ cmd ...")."""
    out = subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"{script} failed: {out.stderr}"
    lines = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, out.stdout
    return shlex.split(lines[0][2:])


def openrlhf_args(argv: list[str]) -> list[str]:
    """The arguments after `python3 -m openrlhf.cli.train_ppo_ray`."""
    assert argv[:3] == ["python3", *MODULE], argv[:3]
    return argv[3:]


def remap(argv: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for token in argv:
        for src, dst in mapping.items():
            if token == src or token.startswith(src + "/"):
                token = dst + token[len(src) :]
        out.append(token)
    return out


def compose_value(value: str) -> str:
    """Compose's `${VAR:-default}` interpolation with an empty host environment."""
    if value.startswith("${") and value.endswith("}"):
        return value[2:-1].partition(":-")[2]
    return value


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory) -> Path:
    """A stand-in for the cluster's shared volume, with data made by the real prepare script."""
    root = tmp_path_factory.mktemp("shared")
    env = {
        "PATH": os.environ["PATH"],
        "OUT_DIR": str(root / "data" / "maze"),
        "N_TRAIN": "4",
        "N_TEST": "1",
        "PASSK_CLI": str(Path(sys.executable).parent / "openrlhf-passk"),
    }
    out = subprocess.run(
        ["bash", str(SCRIPTS / "prepare_maze_data.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return root


def collect(root: Path) -> dict[str, list[str]]:
    data = str(root / "data" / "maze")
    runs = str(root / "runs")
    local = {"DATA_DIR": data, "OUTPUT_ROOT": runs}
    cluster = {"/mnt/shared": str(root), "/opt/openrlhf-passk": str(REPO)}
    commands = {
        "train_passk_maze.sh": printed_command("train_passk_maze.sh", local),
        "train_grpo_maze.sh": printed_command("train_grpo_maze.sh", local),
        "train_passk_maze.sh overrides": printed_command(
            "train_passk_maze.sh", {**local, "ESTIMATOR": "passk_full", "PASSK_K": "4", "N_SAMPLES": "16"}
        ),
    }
    submit = printed_command("submit_rayjob.sh", {"NUM_NODES": "2"}, "passk")
    commands["submit_rayjob.sh"] = remap(submit[submit.index("--") + 1 :], cluster)
    # The Slurm script prints its `ray start` steps, then the recipe's command for the allocation's size.
    slurm = subprocess.run(
        ["bash", str(SCRIPTS / "train_passk_slurm.sh")],
        env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "SLURM_JOB_NODELIST": "n1,n2", **local},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert slurm.returncode == 0, slurm.stderr
    commands["train_passk_slurm.sh (2 nodes)"] = shlex.split(slurm.stdout.splitlines()[-1][2:])
    for path in sorted([*(REPO / "k8s").glob("rayjob-*.yaml"), *(REPO / "k8s").glob("examples/rayjob-*.yaml")]):
        job = yaml.safe_load(path.read_text())
        commands[path.name] = remap(shlex.split(job["spec"]["entrypoint"]), cluster)

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["trainer"]
    env = {k: compose_value(str(v)) for k, v in compose["environment"].items() if v is not None}
    env = {k: v for k, v in env.items() if v and k not in ("USER", "HOME", "HF_TOKEN")}
    assert env["DATA_DIR"] == "/data/maze" and env["OUTPUT_ROOT"] == "/runs"
    env.update(DATA_DIR=data, OUTPUT_ROOT=runs)
    script = compose_value(compose["command"][0])
    commands[f"compose trainer ({script})"] = printed_command(script, env)
    return {name: openrlhf_args(argv) for name, argv in commands.items()}


_CACHE: dict[Path, tuple[dict[str, list[str]], dict[str, dict]]] = {}


@pytest.fixture
def dry_runs(shared_root, subprocess_env) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """(name -> OpenRLHF argv, name -> driver result); computed once per module, reused by each test."""
    if shared_root in _CACHE:
        return _CACHE[shared_root]
    commands = collect(shared_root)
    # A command that must be refused (k > N): proves the dry run can fail, so a pass means something.
    bad = list(commands["rayjob-passk-1x8.yaml"])
    bad[bad.index("--passk_k") + 1] = "64"
    names = [*commands, "refused: k > N"]
    env = {**subprocess_env, "OPENRLHF_PASSK_DRY_RUN": "1"}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps([*commands.values(), bad]),
        env=env,
        cwd=shared_root,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.rsplit("RESULTS ", 1)[1])
    _CACHE[shared_root] = commands, dict(zip(names, results, strict=True))
    return _CACHE[shared_root]


def test_every_shipped_command_passes_the_dry_run(dry_runs):
    commands, results = dry_runs
    assert len(commands) >= 11  # 3 script variants, submit, Slurm, 4 RayJobs + the overlay example, compose
    for name, argv in commands.items():
        result = results[name]
        assert result["code"] == 0, f"{name}: {result['stderr']}"
        report = json.loads(result["stdout"][result["stdout"].index('{\n  "dry_run"') :])
        assert report["dry_run"] == "configuration is valid"
        # The resolved configuration is the one the command asked for (read back from argv, not assumed).
        resolved = report["args"]
        flag = argv.index("--algo.advantage.estimator")
        assert resolved["algo"]["advantage"]["estimator"] == argv[flag + 1], name
        n = int(argv[argv.index("--rollout.n_samples_per_prompt") + 1])
        assert resolved["rollout"]["n_samples_per_prompt"] == n, name
        assert resolved["ckpt"]["load_enable"] is True, f"{name}: a restarted job must resume"
        assert resolved["algo"]["kl"]["init_coef"] == 0, f"{name}: the recipe runs without KL"
        if "--passk_k" in argv:
            assert resolved["passk_k"] == int(argv[argv.index("--passk_k") + 1]) <= n


def test_dry_run_refuses_a_bad_command(dry_runs):
    _, results = dry_runs
    refused = results["refused: k > N"]
    assert refused["code"] != 0
    assert "passk_k" in refused["stderr"]


def flags(argv: list[str]) -> dict[str, tuple[str, ...]]:
    """--flag -> its values, in command order."""
    out: dict[str, list[str]] = {}
    current = None
    for token in argv:
        if token.startswith("--"):
            current = token
            out[current] = []
        else:
            out[current].append(token)
    return {k: tuple(v) for k, v in out.items()}


def test_script_defaults_are_the_paper_recipe(dry_runs):
    commands, _ = dry_runs
    passk = flags(commands["train_passk_maze.sh"])
    assert passk["--algo.advantage.estimator"] == ("passk",)
    assert passk["--rollout.n_samples_per_prompt"] == ("32",)
    assert passk["--passk_k"] == ("8",)
    assert passk["--actor.adam.lr"] == ("1e-6",)
    assert passk["--actor.eps_clip_low_high"] == ("0.2", "0.28")
    assert passk["--algo.kl.init_coef"] == ("0",)
    assert passk["--actor.num_nodes"] == ("1",) and passk["--actor.num_gpus_per_node"] == ("8",)
    # GRPO is the same recipe: only the estimator, k and the run's own output paths differ.
    grpo = flags(commands["train_grpo_maze.sh"])
    assert grpo["--algo.advantage.estimator"] == ("group_norm",)
    differ = {f for f in passk.keys() | grpo.keys() if passk.get(f) != grpo.get(f)}
    assert differ == {
        "--algo.advantage.estimator",
        "--passk_k",
        "--ckpt.path",
        "--ckpt.output_dir",
        "--logger.tensorboard_dir",
    }
    # Environment overrides reach the command.
    override = flags(commands["train_passk_maze.sh overrides"])
    assert override["--algo.advantage.estimator"] == ("passk_full",)
    assert override["--passk_k"] == ("4",) and override["--rollout.n_samples_per_prompt"] == ("16",)
