"""Driver-side cluster logic (openrlhf_passk/integration/cluster.py) in this process, without a cluster: what
reaches the workers' runtime_env (never a secret, never dropping upstream's), how the `ray.init` wrapper
composes with CPU mode's, the refusals (dead address, too few GPUs, a node that differs), the lost-node
watch and message; plus render_k8s's --entrypoint-of and the Slurm script's new inputs. The same paths on a
real 2-node Ray cluster and under real Slurm: tests/test_multinode_ray.py (marked `multinode`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml
from helpers import RAYJOB, RAYJOB_SIZES, free_port, rayjob_render_flags, readme_ray_start
from ray import exceptions as ray_exceptions

from openrlhf_passk.integration import cluster, cpu_mode, upstream

REPO = Path(__file__).resolve().parent.parent
RENDER = REPO / "scripts" / "render_k8s.py"


def _args(**values) -> SimpleNamespace:
    """Parsed 0.11.2 args as the hooks see them (a flat namespace with dotted names), OpenRLHF's defaults."""
    defaults = {dest: None for dest in upstream.LAYOUTS["0.11.2"].dests.values()}
    defaults.update({
        "actor.num_nodes": 2, "actor.num_gpus_per_node": 1, "ref.num_nodes": 1, "ref.num_gpus_per_node": 1,
        "critic.num_nodes": 1, "critic.num_gpus_per_node": 1, "reward.num_nodes": 1, "reward.num_gpus_per_node": 1,
        "vllm.num_engines": 2, "vllm.tensor_parallel_size": 1, "train.colocate_all": True,
        "train.colocate_actor_ref": False, "train.colocate_critic_reward": False, "train.async_enable": False,
        "algo.kl.init_coef": 0, "rollout.batch_size": 2, "train.batch_size": 8, "train.max_epochs": 1,
        "rollout.n_samples_per_prompt": 4, "reward.remote_url": "http://r/get_reward",
        "algo.advantage.estimator": "passk",
    })  # fmt: skip
    defaults.update(values)
    return SimpleNamespace(**defaults)


# ---- what the workers get ------------------------------------------------------------------------------------------
def test_our_switches_are_forwarded_and_secrets_never():
    environ = {name: f"v-{name}" for name in cluster.FORWARDED_ENV}
    environ.update(OPENRLHF_PASSK_REWARD_TOKEN="s3cret", WANDB_API_KEY="k3y", HF_TOKEN="t0k", PATH="/bin")
    forwarded = cluster.forwarded_env(environ)
    assert forwarded == {name: f"v-{name}" for name in cluster.FORWARDED_ENV}
    assert "s3cret" not in json.dumps(forwarded) and "k3y" not in json.dumps(forwarded)
    assert not set(cluster.FORWARDED_ENV) & set(cluster.SECRET_ENV)
    assert cluster.forwarded_env({"OPENRLHF_PASSK_CPU": "1"}) == {"OPENRLHF_PASSK_CPU": "1"}  # only what is set


def test_runtime_env_keeps_upstreams_and_merges_with_a_submitted_jobs():
    """Upstream's env_vars stay as they are (its value wins a clash); ours are added. Under `ray job submit`, a
    key the job's runtime_env already sets to the same value is left to it: Ray refuses any key both set."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    upstream = {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN"}, "pip": ["x"]}
    ours = {"OPENRLHF_PASSK_CPU": "1", "NCCL_DEBUG": "INFO", "VLLM_CPU_KVCACHE_SPACE": "1"}
    merged = cluster.merge_runtime_env(upstream, ours, job_env={})
    assert merged == {
        "env_vars": {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "OPENRLHF_PASSK_CPU": "1",
                     "VLLM_CPU_KVCACHE_SPACE": "1"},
        "pip": ["x"],
    }  # fmt: skip
    assert upstream["env_vars"] == {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN"}  # not modified

    job = {"env_vars": {"OPENRLHF_PASSK_CPU": "1", "TOKENIZERS_PARALLELISM": "true"}}
    merged = cluster.merge_runtime_env(upstream, ours, job_env=job["env_vars"])
    assert _merge_runtime_env({"env_vars": job["env_vars"]}, {"env_vars": merged["env_vars"]}) is not None
    assert "OPENRLHF_PASSK_CPU" not in merged["env_vars"] and merged["env_vars"]["NCCL_DEBUG"] == "WARN"
    # without the de-duplication Ray refuses the driver's ray.init (what upstream + a job's NCCL_DEBUG hit)
    assert _merge_runtime_env({"env_vars": job["env_vars"]}, {"env_vars": {"OPENRLHF_PASSK_CPU": "1"}}) is None
    clash = cluster.merge_runtime_env(upstream, {}, job_env={"NCCL_DEBUG": "INFO"})
    assert clash["env_vars"]["NCCL_DEBUG"] == "WARN"  # a real conflict is the user's: Ray says so itself


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init recorded instead of run; the cluster checks stubbed; ray.init and the excepthook restored."""
    calls = []

    def init(*args, **kwargs):
        calls.append((args, kwargs))
        return "context"

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(cluster, "check_address", lambda address, source, connect_s=0: None)
    monkeypatch.setattr(cluster, "_cluster_gpus", lambda: (2.0, 2))
    monkeypatch.setattr(cluster, "_probe_nodes", lambda: {})
    monkeypatch.setattr(cluster, "_start_watch", lambda job_id: None)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: "01000000"))
    for name in (*cluster.FORWARDED_ENV, "RAY_ADDRESS", cluster.JOB_CONFIG_ENV, cluster.GPU_WAIT_ENV):
        monkeypatch.delenv(name, raising=False)
    return calls


UPSTREAM_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "X": "1"}}


@pytest.mark.parametrize("order", ["cpu_mode first", "cluster first"])
def test_the_init_wrapper_composes_with_cpu_modes_either_way(order, fake_ray, monkeypatch):
    args = _args()
    steps = [cpu_mode._declare_logical_gpus, cluster.prepare]
    for step in steps if order == "cpu_mode first" else steps[::-1]:
        step(args)
    for step in steps:  # a second preparation wraps nothing again
        step(args)

    ray.init(runtime_env=UPSTREAM_ENV)  # a local Ray: CPU mode declares the GPUs, nothing is forwarded
    (_, local), = fake_ray
    assert local["num_gpus"] == 2 and local["runtime_env"] == UPSTREAM_ENV

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("OPENRLHF_PASSK_CPU", "1")
    monkeypatch.setenv("OPENRLHF_PASSK_REWARD_TOKEN", "s3cret")
    ray.init(runtime_env=UPSTREAM_ENV)
    _, joined = fake_ray[1]
    assert "num_gpus" not in joined  # Ray refuses resources from a driver that joins a cluster
    assert joined["runtime_env"]["env_vars"] == {**UPSTREAM_ENV["env_vars"], "OPENRLHF_PASSK_CPU": "1"}


def test_too_few_gpus_and_a_node_that_differs_are_refused_after_connecting(fake_ray, monkeypatch, capsys):
    shutdowns = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv(cluster.GPU_WAIT_ENV, "0")
    cluster.prepare(_args(**{"actor.num_nodes": 4, "vllm.num_engines": 4}))
    with pytest.raises(SystemExit) as exit_info:
        ray.init()
    assert exit_info.value.code == 2 and shutdowns == [1]
    err = capsys.readouterr().err
    assert (
        "[openrlhf-passk] error: the Ray cluster at 10.0.0.1:6379 has 2 GPU(s) on 2 node(s), and this command needs 4: "
        "--actor.num_nodes 4 x --actor.num_gpus_per_node 1 = 4 for the actor; --vllm.num_engines 4 x "
        "--vllm.tensor_parallel_size 1 = 4 for the vLLM engines, on the actor's GPUs (--train.colocate_all)"
    ) in err
    assert f"{cluster.GPU_WAIT_ENV} (now 0 s)" in err

    monkeypatch.setattr(
        cluster, "_probe_nodes", lambda: {"10.0.0.2 (node ab12cd34)": ModuleNotFoundError("No module named 'x'")}
    )
    monkeypatch.setattr(cluster, "_cluster_gpus", lambda: (8.0, 2))
    with pytest.raises(SystemExit):
        ray.init()
    assert "node 10.0.0.2 (node ab12cd34): openrlhf-passk could not run there" in capsys.readouterr().err

    monkeypatch.setenv(cluster.CHECKS_ENV, "0")  # autoscaling clusters: GPUs appear only once OpenRLHF asks
    monkeypatch.setattr(cluster, "_cluster_gpus", lambda: (0.0, 1))
    assert ray.init() == "context"


def test_gpu_count_waits_for_joining_nodes_then_names_the_flags():
    seen = iter([(0.0, 1), (1.0, 1), (4.0, 2)])
    cluster.check_gpus((4, "x"), "the cluster", wait_s=60, cluster_gpus=lambda: next(seen))  # returns once 4 joined
    args = _args(**{"train.colocate_all": False, "algo.kl.init_coef": 0.1, "vllm.num_engines": 1})
    need, flags = cluster.gpu_demand(args)
    assert need == 4  # 2 for the actor, 1 engine, 1 reference model (KL on, not colocated)
    assert flags.startswith("--actor.num_nodes 2 x --actor.num_gpus_per_node 1 = 2 for the actor; ")
    assert "--vllm.num_engines 1 x --vllm.tensor_parallel_size 1 = 1 for the vLLM engines, of their own" in flags
    assert flags.endswith("; 1 for the reference/critic/reward models (their --*.num_nodes x --*.num_gpus_per_node)")
    with pytest.raises(cluster.ClusterError, match=r"has 0 GPU\(s\) on 1 node\(s\), and this command needs 4"):
        cluster.check_gpus((need, flags), "the cluster", wait_s=0, cluster_gpus=lambda: (0.0, 1))
    assert cluster.gpu_demand(_args(**{"vllm.num_engines": 3})) is None  # OpenRLHF's own check reports it


def test_a_bad_wait_value_is_refused(monkeypatch, capsys):
    monkeypatch.setenv(cluster.GPU_WAIT_ENV, "soon")
    with pytest.raises(SystemExit) as exit_info:
        cluster._wait_s()
    assert exit_info.value.code == 2 and "OPENRLHF_PASSK_GPU_WAIT_S='soon' must be a number" in capsys.readouterr().err


# ---- the address ---------------------------------------------------------------------------------------------------
def test_an_address_nothing_answers_at_is_refused_in_seconds():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(cluster.ClusterError) as err:
        cluster.check_address(f"127.0.0.1:{port}", f"RAY_ADDRESS=127.0.0.1:{port}", connect_s=1.5)
    assert time.monotonic() - started < 10
    assert f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there (Connection refused" in str(err.value)
    assert f"`ray start --head --port {port}` on 127.0.0.1" in str(err.value)
    with socket.socket() as listening:  # something answers: Ray's own connection (bounded) takes over
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        cluster.check_address(f"127.0.0.1:{listening.getsockname()[1]}", "RAY_ADDRESS", connect_s=1.5)


@pytest.mark.parametrize(
    "address,message",
    [
        ("http://head:8265", "is a dashboard (Jobs API) address, which `ray job submit` takes"),
        ("head", "is not a host:port address like 10.0.0.1:6379"),
        ("no-such-host.invalid:6379", "the host 'no-such-host.invalid' does not resolve"),
    ],
)
def test_a_malformed_address_is_refused_naming_it(address, message):
    with pytest.raises(cluster.ClusterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cluster.check_address(address, f"RAY_ADDRESS={address}", connect_s=1)


def test_joined_address_comes_from_the_call_or_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.joined_address((), {}) is None
    assert cluster.joined_address((), {"address": "local"}) is None
    assert cluster.joined_address(("10.0.0.1:6379",), {}) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert cluster.joined_address((), {}) == "auto"
    assert cluster._source("auto", {}) == "RAY_ADDRESS=auto"


# ---- every node ----------------------------------------------------------------------------------------------------
def test_node_problems_name_the_node_and_the_fix():
    driver = cluster._node_report()
    assert driver["hook"] is True and driver["openrlhf"] == "0.11.2"
    same = {**driver, "secrets": dict(driver["secrets"])}
    assert cluster.node_problems({"10.0.0.2 (node a)": same}, driver) == []
    digest = "0" * 64
    with_token = {**driver, "secrets": {"OPENRLHF_PASSK_REWARD_TOKEN": digest}}
    reports = {
        "10.0.0.2 (node a)": {**driver, "secrets": {"OPENRLHF_PASSK_REWARD_TOKEN": None}},
        "10.0.0.3 (node b)": {**driver, "secrets": {"OPENRLHF_PASSK_REWARD_TOKEN": "1" * 64}},
        "10.0.0.4 (node c)": {**with_token, "openrlhf": "0.9.10", "hook": False},
        "10.0.0.5 (node d)": RuntimeError("boom\nModuleNotFoundError: No module named 'openrlhf_passk'"),
    }
    problems = cluster.node_problems(reports, with_token)
    assert problems[0].startswith("node 10.0.0.2 (node a): OPENRLHF_PASSK_REWARD_TOKEN is not set there, but set")
    assert "export OPENRLHF_PASSK_REWARD_TOKEN on every node before `ray start`" in problems[0]
    assert problems[1].startswith("node 10.0.0.3 (node b): OPENRLHF_PASSK_REWARD_TOKEN is set to another value")
    assert "node 10.0.0.4 (node c): the openrlhf-passk import hook is not active" in problems[2]
    assert problems[3] == "node 10.0.0.4 (node c): OpenRLHF 0.9.10 is installed, the driver has 0.11.2"
    assert "node 10.0.0.5 (node d): openrlhf-passk could not run there (ModuleNotFoundError: No module" in problems[4]
    assert all(digest not in p for p in problems)  # not even the hash is printed


def test_the_node_report_holds_a_secret_only_as_a_hash(monkeypatch):
    monkeypatch.setenv("OPENRLHF_PASSK_REWARD_TOKEN", "s3cret")
    report = cluster._node_report()
    assert "s3cret" not in json.dumps(report) and len(report["secrets"]["OPENRLHF_PASSK_REWARD_TOKEN"]) == 64


# ---- a node lost mid-run -------------------------------------------------------------------------------------------
class _DiedWithItsNode(ray_exceptions.ActorDiedError):
    def __str__(self):
        return (
            "The actor died unexpectedly before finishing this task.\n\tclass_name: PolicyModelActor\n\tpid: 7\n"
            "The actor died because its node has died. Node Id: c5ce895e\n\tthe actor's node was terminated"
        )


def test_a_lost_actor_gets_one_line_after_rays_traceback(monkeypatch, capsys):
    wrapped = ray_exceptions.RayTaskError("fit", "Traceback ...", _DiedWithItsNode()).as_instanceof_cause()
    assert isinstance(cluster.lost_actor_error(wrapped), _DiedWithItsNode)  # the innermost: it names the actor
    assert cluster.lost_actor_error(ValueError("x")) is None
    unavailable = ray_exceptions.ActorUnavailableError("RpcError: Socket closed", None)
    assert cluster.lost_actor_error(RuntimeError("wrapped")) is None
    wrapper = RuntimeError("outer")
    wrapper.__cause__ = unavailable
    assert cluster.lost_actor_error(wrapper) is unavailable

    monkeypatch.setattr(sys, "excepthook", lambda *a: print("TRACEBACK", file=sys.stderr))
    cluster._install_excepthook()
    cluster._install_excepthook()  # once
    sys.excepthook(type(wrapped), wrapped, None)
    err = capsys.readouterr().err
    assert err.count("[openrlhf-passk]") == 1 and err.index("TRACEBACK") < err.index("[openrlhf-passk]")
    assert (
        "[openrlhf-passk] error: Ray lost PolicyModelActor of this run (_DiedWithItsNode: its Ray node c5ce895e "
        "died). OpenRLHF does not restart its actors, so the run cannot continue: start it again on a healthy cluster "
        "with --ckpt.load_enable to resume from the last checkpoint (--ckpt.save_steps)"
    ) in err
    summary = cluster.lost_actor_summary(ray_exceptions.ActorDiedError(), {"10.0.0.2"})
    assert "(ActorDiedError: Ray node 10.0.0.2 was lost)" in summary


def test_an_actor_whose_constructor_failed_is_not_called_lost():
    """An actor that never started (a missing module on the node, say) was not lost: no advice to resume."""
    import_error = ray_exceptions.RayTaskError("__init__", "Traceback ...", ModuleNotFoundError("No module named 'x'"))
    assert cluster.lost_actor_error(ray_exceptions.ActorDiedError(import_error)) is None


@pytest.mark.parametrize("release", upstream.SUPPORTED_VERSIONS)
def test_the_lost_node_messages_name_the_installed_releases_resume_flags(release, monkeypatch):
    load, save = upstream.layout(release).flag("ckpt_load"), upstream.layout(release).flag("save_steps")
    if release == upstream.openrlhf_version():
        parser_source = Path(importlib.util.find_spec("openrlhf").origin).parent / "cli" / "train_ppo_ray.py"
    else:  # the other release's copy that `make install` puts next to the venv's OpenRLHF
        parser_source = REPO / ".venv" / f"openrlhf-{release}" / "openrlhf" / "cli" / "train_ppo_ray.py"
    if not parser_source.is_file():
        pytest.fail(f"OpenRLHF {release}'s training CLI is missing at {parser_source} (`make install`)")
    defined = re.findall(r'add_argument\(\s*"(--[\w.]+)"', parser_source.read_text())
    assert load in defined and save in defined  # the release's own flags
    monkeypatch.setattr(upstream, "openrlhf_version", lambda: release)
    summary = cluster.lost_actor_summary(ray_exceptions.ActorDiedError(), {"10.0.0.2"})
    assert summary.endswith(f"with {load} to resume from the last checkpoint ({save})")


def test_the_watch_ends_a_run_that_hangs_after_its_node_died(monkeypatch, capsys):
    """A rank that waits in a collective for its lost peer would keep the driver waiting (NCCL/gloo time out
    after 30 min): once a node that hosts this job's actors is dead, the run gets LOST_NODE_GRACE_S more."""
    alive = iter([True, True, False])
    monkeypatch.setattr(cluster, "LOST_NODE_POLL_S", 0.01)
    monkeypatch.setattr(cluster, "_our_actor_nodes", lambda job_id: {"n1": "10.0.0.1", "n2": "10.0.0.2"})
    monkeypatch.setattr(
        ray, "nodes", lambda: [{"NodeID": "n1", "Alive": True}, {"NodeID": "n2", "Alive": next(alive, False)},
                               {"NodeID": "old", "Alive": False}]
    )  # fmt: skip
    exits = []

    def exit_(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cluster.os, "_exit", exit_)
    monkeypatch.setattr(cluster, "_lost_nodes", set())
    with pytest.raises(SystemExit):
        cluster._watch_nodes("01000000", __import__("threading").Event(), grace_s=0.05)
    err = capsys.readouterr().err
    assert exits == [1] and cluster._lost_nodes == {"10.0.0.2"}  # an old dead node not of this job is ignored
    assert "[openrlhf-passk] error: Ray node 10.0.0.2 was lost during training" in err
    assert "the run did not stop by itself after its node was lost; exiting" in err

    stop = __import__("threading").Event()
    stop.set()  # the run ended by itself: nothing to do
    monkeypatch.setattr(cluster, "_our_actor_nodes", lambda job_id: {})
    cluster._watch_nodes("01000000", stop, grace_s=0.05)


# ---- the README's cluster, render_k8s --entrypoint-of, the Slurm script --------------------------------------------
def test_the_readme_shows_the_ray_start_commands_the_multinode_tests_run():
    head, other = readme_ray_start()
    assert head[:3] == ["ray", "start", "--head"] and "--port" in head and "--num-gpus" in head
    assert other[:3] == ["ray", "start", "--address"] and other[3].endswith(":" + head[head.index("--port") + 1])


def test_the_readme_renders_the_entrypoint_the_multinode_tests_submit():
    """The README's render_k8s example is the command the 2-node test submits, sizes included, so that what the
    README says CI runs stays what CI runs."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("python scripts/render_k8s.py --entrypoint-of")
    command = readme[start : readme.index("\n# ->", start)].replace("\\\n", " ")
    shown = shlex.split(command.replace("--size ", "--size="))[2:]
    assert shown == rayjob_render_flags("tiny", "mazes", "runs", "http://127.0.0.1:5000/get_reward")


def _render(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), *flags], capture_output=True, text=True, timeout=120)


def _flags(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for token in argv[3:]:
        if token.startswith("--"):
            out[token] = []
            current = out[token]
        else:
            current.append(token)
    return out


# The flag each recipe size sets (scripts/lib/maze_recipe.sh).
SIZE_FLAGS = {
    "N_SAMPLES": "--rollout.n_samples_per_prompt", "PASSK_K": "--passk_k", "ROLLOUT_BATCH_SIZE": "--rollout.batch_size",
    "MICRO_ROLLOUT_BATCH_SIZE": "--rollout.micro_batch_size", "TRAIN_BATCH_SIZE": "--train.batch_size",
    "MICRO_TRAIN_BATCH_SIZE": "--train.micro_batch_size", "MAX_LEN": "--data.max_len",
    "MAX_NEW_TOKENS": "--rollout.max_new_tokens", "SAVE_STEPS": "--ckpt.save_steps",
}  # fmt: skip


def test_entrypoint_of_changes_only_what_it_is_told():
    """The RayJob's entrypoint as the multi-node tests render it: every switch they use changes exactly its own
    flags, to exactly its value, and, in CPU mode, the GPU-only switches CPU mode refuses are left out. Every
    other token is the manifest's."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import render_k8s
    finally:
        sys.path.pop(0)
    manifest = yaml.safe_load((REPO / "k8s" / "rayjob-passk-2x8.yaml").read_text())["spec"]["entrypoint"]
    out = _render(*rayjob_render_flags("/m", "/d", "/r", "http://127.0.0.1:9/get_reward"))
    assert out.returncode == 0, out.stderr
    local = json.loads(out.stdout)
    assert local["runtime_env"] == {"env_vars": {"OPENRLHF_PASSK_CPU": "1"}}  # --cpu-mode
    theirs, ours = _flags(shlex.split(manifest)), _flags(shlex.split(local["entrypoint"]))
    assert shlex.split(local["entrypoint"])[:3] == shlex.split(manifest)[:3]
    assert set(theirs) - set(ours) == set(render_k8s.CPU_MODE_DROPS)  # --cpu-mode
    refused = {f"--{dest}" for dest, is_set, _ in cpu_mode.REFUSED if is_set is bool}
    assert refused & set(theirs) <= set(render_k8s.CPU_MODE_DROPS)  # nothing CPU mode refuses stays in

    assert set(RAYJOB_SIZES) == set(SIZE_FLAGS)  # every --size the multi-node tests give is checked here
    told = {SIZE_FLAGS[name]: [value] for name, value in RAYJOB_SIZES.items()}
    told |= {
        "--actor.model_name_or_path": ["/m"],  # --model
        "--data.prompt_dataset": ["/d/train.jsonl"], "--eval.dataset": ["/d/test.jsonl"],  # --data-dir
        "--reward.remote_url": ["http://127.0.0.1:9/get_reward"],  # --reward-url
        "--actor.num_gpus_per_node": ["1"], "--vllm.num_engines": ["2"],  # --gpus-per-node 1 on 2 nodes
        # --runs-dir, under the run name of 2 nodes x 1 GPU
        "--ckpt.path": ["/r/passk-maze-2x1/ckpt"], "--ckpt.output_dir": ["/r/passk-maze-2x1/model"],
        "--logger.tensorboard_dir": ["/r/passk-maze-2x1/tensorboard"],
    }  # fmt: skip
    assert all(theirs[flag] != value for flag, value in told.items())  # each override differs from the manifest
    assert {flag: value for flag, value in ours.items() if value != theirs[flag]} == told
    assert list(ours) == [flag for flag in theirs if flag in ours]  # same order

    plain = json.loads(_render("--entrypoint-of", RAYJOB).stdout)
    assert plain == {"entrypoint": manifest, "runtime_env": {}}  # no override: the manifest's string itself


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--data-dir", "/d"], "--data-dir only apply with --entrypoint-of"),
        (["--cpu-mode", "--size", "N_SAMPLES=4"], "--size, --cpu-mode only apply with --entrypoint-of"),
        (["--entrypoint-of", "passk-maze-3x8"], "--entrypoint-of 'passk-maze-3x8': choose one of passk-maze-1x8"),
        (["--entrypoint-of", "passk-maze-2x8", "--size", "LR=1"], "--size 'LR=1': give NAME=VALUE with NAME one of"),
        (["--entrypoint-of", "passk-maze-2x8", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    ],
)
def test_entrypoint_of_refuses_bad_input(flags, message, tmp_path):
    out = _render("--out", str(tmp_path), *flags)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())


def _slurm_dry_run(*command: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu1,gpu2", "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "train_passk_slurm.sh"), *command],
        env={**base, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_slurm_script_runs_a_command_of_ones_own_on_the_cluster():
    out = _slurm_dry_run("echo", "my", "command", RAY_START_ARGS="--object-store-memory 1000", RAY_HEAD_ARGS="--x 1")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    head, worker, command = lines
    assert command == ["echo", "my", "command"]
    assert head[-2:] == ["--x", "1"] and "--x" not in worker
    for argv in (head, worker):
        assert argv[argv.index("--object-store-memory") + 1] == "1000"


def test_slurm_script_dry_runs_an_openrlhf_command_before_touching_a_node(tmp_path):
    """An OpenRLHF command of one's own goes through the openrlhf-passk dry run first: a bad flag value stops
    the script before any `srun`."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "label": "S.E"}\n')
    command = [sys.executable, "-m", "openrlhf.cli.train_ppo_ray", "--actor.model_name_or_path", "m",
               "--data.prompt_dataset", str(data), "--reward.remote_url", "http://r:5000/get_reward",
               "--advantage_estimator", "passk", "--passk_k", "9", "--rollout.n_samples_per_prompt", "4"]  # fmt: skip
    out = _slurm_dry_run(*command)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--passk_k must satisfy 1 <= k <= --rollout.n_samples_per_prompt (4); got k=9" in out.stderr
    assert "error: the command failed its dry run (above): fix it before Slurm starts Ray" in out.stderr
    assert "+ srun" not in out.stdout
