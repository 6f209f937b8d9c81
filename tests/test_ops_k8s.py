"""k8s/: the rendered manifests are current, parse, validate against Kubernetes 1.33 (strict: unknown
fields fail), every pod template inside the RayJobs validates as a Pod, the RayJobs fit KubeRay v1.2's
and the latest release's RayJob schema (tests/data/kuberay, offline), each entrypoint is exactly the
scripts' command for the same settings, secrets stay out of specs, and the pieces agree with each
other (GPUs, volumes, labels, service names, paths, network policies, storage size)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
K8S_VERSION = "1.33.0"  # the Kubernetes version the manifests are validated against (k8s/README.md)
MANIFESTS = sorted([*K8S.glob("*.yaml"), *K8S.glob("examples/*.yaml")])
RAYJOBS = sorted([*K8S.glob("rayjob-*.yaml"), *K8S.glob("examples/rayjob-*.yaml")])
SHIPPED_RAYJOBS = sorted(K8S.glob("rayjob-*.yaml"))  # the default manifests, without opt-in overlays
CRD_KINDS = {"RayJob", "ServiceMonitor"}  # not in Kubernetes' own schemas
KUBERAY_SCHEMAS = REPO / "tests" / "data" / "kuberay"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # what KubeRay demands of RayJob names
# RayJobSpec fields of KubeRay's ray.io/v1 API (v1.1 - v1.6); anything else is a typo the CRD would drop.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in docs(p)]


def by_kind(kind: str) -> list[dict]:
    """The shipped documents of a kind (k8s/*.yaml), or the examples' for kinds only they have."""
    shipped = [d for p in sorted(K8S.glob("*.yaml")) for d in docs(p) if d["kind"] == kind]
    return shipped or [d for _, d in all_docs() if d["kind"] == kind]


def pod_templates(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[f"worker {group['groupName']}"] = group["template"]
    if "submitterPodTemplate" in job["spec"]:
        templates["submitter"] = job["spec"]["submitterPodTemplate"]
    return templates


def command_flags(job: dict) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    current = None
    for token in shlex.split(job["spec"]["entrypoint"])[3:]:
        if token.startswith("--"):
            current = token
            flags[current] = []
        else:
            flags[current].append(token)
    return flags


def test_rendered_manifests_are_up_to_date():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_renderer_options_reach_the_output(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--out", str(tmp_path)]
        + ["--image-prefix", "registry.example.com/ml", "--tag", "abc", "--model", "/mnt/shared/models/m"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    job = docs(tmp_path / "rayjob-passk-2x8.yaml")[0]
    images = {c["image"] for t in pod_templates(job).values() for c in t["spec"]["containers"]}
    assert images == {"registry.example.com/ml/openrlhf-passk-train:abc"}
    assert command_flags(job)["--actor.model_name_or_path"] == ["/mnt/shared/models/m"]
    rendered = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.yaml")}
    assert rendered == {str(p.relative_to(K8S)) for p in MANIFESTS}
    # --check notices the drift from the default rendering (so the up-to-date test can fail).
    drift = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert drift.returncode == 1 and "out of date" in drift.stderr


def test_size_variants_exist():
    sizes = {p.name for p in RAYJOBS}
    assert {"rayjob-passk-1x8.yaml", "rayjob-passk-2x8.yaml", "rayjob-passk-4x8.yaml"} <= sizes


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses(path):
    loaded = docs(path)
    assert loaded
    for doc in loaded:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        assert DNS_LABEL.match(doc["metadata"]["name"]), doc["metadata"]["name"]


CORE = [(n, d) for n, d in all_docs() if d["kind"] not in CRD_KINDS]


@pytest.mark.parametrize("name,doc", CORE, ids=[f"{n}:{d['kind']}" for n, d in CORE])
def test_core_kinds_validate(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_is_strict():
    """An unknown field fails, so a pass above means something."""
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "a"}]},
    }
    bad["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_pod_templates_validate_as_pods(path):
    job = docs(path)[0]
    for name, template in pod_templates(job).items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name.replace(" ", "-"), **template.get("metadata", {})},
            "spec": template["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_structure(path):
    """The rules KubeRay's ValidateRayJobMetadata / ValidateRayJobSpec / ValidateRayClusterSpec enforce,
    plus the fields a working job needs."""
    (job,) = docs(path)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    name = job["metadata"]["name"]
    assert len(name) <= 47 and DNS_1035.match(name), name  # MaxRayJobNameLength, DNS-1035 label
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert isinstance(spec["entrypoint"], str) and "\n" not in spec["entrypoint"]
    assert spec["submissionMode"] in SUBMISSION_MODES
    # GPUs are released soon after the job (logs are on the volume) and a stuck job ends at a deadline.
    assert spec["shutdownAfterJobFinishes"] is True and 0 <= spec["ttlSecondsAfterFinished"] <= 600
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    # Retries (each on a fresh RayCluster) resume from checkpoints. KubeRay refuses them in InteractiveMode.
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert spec["submissionMode"] != "InteractiveMode"
    if spec["submissionMode"] == "SidecarMode":
        assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.55.0"  # OpenRLHF 0.11.2's ray pin
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    for params in [head.get("rayStartParams", {})] + [g.get("rayStartParams", {}) for g in groups]:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values must be strings"
        assert "labels" not in params
    assert len({g["groupName"] for g in groups}) == len(groups)
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    for group in groups:
        assert DNS_LABEL.match(group["groupName"])
        if not autoscaling:  # then KubeRay requires both bounds
            assert "minReplicas" in group and "maxReplicas" in group
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, template in pod_templates(job).items():
        containers = template["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers), name
        volumes = {v["name"] for v in template["spec"].get("volumes", [])}
        for c in containers + template["spec"].get("initContainers", []):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, (
                f"{name}: mount without a volume"
            )
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == [
                "ALL"
            ]
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= head_ports
    # The input wait runs in the submitter (restartPolicy Never: a failed wait fails the submitter Job,
    # then the RayJob), never in a Ray pod, whose restartPolicy Always would retry it while GPUs are held.
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert [c["name"] for c in submitter["initContainers"]] == ["wait-for-inputs"]
    assert "command" not in submitter["containers"][0]  # KubeRay then fills in `ray job submit`
    for group in [head, *groups]:
        assert "initContainers" not in group["template"]["spec"]
    # Every attempt of the submitter and of the RayJob may wait in full: all of it fits the deadline.
    wait = {e["name"]: e["value"] for e in submitter["initContainers"][0]["env"]}
    attempts = (spec["submitterConfig"]["backoffLimit"] + 1) * (spec["backoffLimit"] + 1)
    assert int(wait["WAIT_SECONDS"]) * attempts < spec["activeDeadlineSeconds"] / 2


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_gpus_match_the_training_command(path):
    (job,) = docs(path)
    nodes, per_node = re.search(r"-(\d+)x(\d+)[.-]", path.name).groups()
    flags = command_flags(job)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    worker_gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in groups
    )
    actor_gpus = int(flags["--actor.num_nodes"][0]) * int(flags["--actor.num_gpus_per_node"][0])
    vllm_gpus = int(flags["--vllm.num_engines"][0]) * int(flags["--vllm.tensor_parallel_size"][0])
    assert worker_gpus == actor_gpus == vllm_gpus == int(nodes) * int(per_node)
    assert flags["--actor.num_nodes"] == [nodes] and flags["--actor.num_gpus_per_node"] == [per_node]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})  # the head only coordinates
    for group in groups:
        shm = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"  # NCCL / vLLM need a large /dev/shm


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_resumes_and_uses_the_shared_volume(path):
    (job,) = docs(path)
    flags = command_flags(job)
    (pvc,) = by_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every node reads data and writes checkpoints
    mounts = {}
    for name, template in pod_templates(job).items():
        if name == "submitter":
            continue
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert pvc["metadata"]["name"] in claims.values(), name
        container = template["spec"]["containers"][0]
        mounts[name] = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    (shared,) = set.union(*mounts.values())
    assert all(m == {shared} for m in mounts.values())
    for flag in ("--ckpt.path", "--ckpt.output_dir", "--logger.tensorboard_dir", "--data.prompt_dataset"):
        assert flags[flag][0].startswith(shared + "/"), flag
    assert "--ckpt.load_enable" in flags and int(flags["--ckpt.save_steps"][0]) > 0
    run = job["metadata"]["name"]
    assert f"/{run}/" in flags["--ckpt.path"][0]  # each size has its own checkpoints (ZeRO layout differs)
    (data_job,) = by_kind("Job")
    out_dir = {e["name"]: e["value"] for e in data_job["spec"]["template"]["spec"]["containers"][0]["env"]}[
        "OUT_DIR"
    ]
    assert flags["--data.prompt_dataset"] == [f"{out_dir}/train.jsonl"]
    assert flags["--eval.dataset"] == [f"{out_dir}/test.jsonl"]


def test_reward_server_is_hardened_and_reachable_only_from_training():
    (deployment,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    (policy,) = [p for p in by_kind("NetworkPolicy") if p["metadata"]["name"] == service["metadata"]["name"]]
    assert "replicas" not in deployment["spec"]  # the HPA owns the scale; a re-apply must not reset it
    pod = deployment["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for c in pod["spec"]["containers"]:
        s = c["securityContext"]
        assert s["readOnlyRootFilesystem"] is True and s["allowPrivilegeEscalation"] is False
        assert s["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys() and {"cpu", "memory"} <= c["resources"][
            "limits"
        ].keys()
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health"
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()

    def admitted(pod_labels: dict) -> bool:
        return admits(policy, pod_labels, None, 5000)

    assert admits(policy, {}, "monitoring", 5000)  # Prometheus scrapes /metrics
    assert not admits(policy, {}, "default", 5000)
    for path in RAYJOBS:
        job = docs(path)[0]
        for name, template in pod_templates(job).items():
            # head (the driver), workers (rollouts) and the submitter (readiness wait): all of a RayJob
            assert admitted(template["metadata"]["labels"]), f"{path.name} {name}"
    assert not admitted(by_kind("Job")[0]["spec"]["template"]["metadata"]["labels"])
    assert not admitted({})
    # The trainers call this Service's name and port.
    port = service["spec"]["ports"][0]["port"]
    for path in RAYJOBS:
        url = command_flags(docs(path)[0])["--reward.remote_url"][0]
        assert url.startswith(f"http://{service['metadata']['name']}:{port}/")


def admits(policy: dict, pod_labels: dict, namespace: str | None, port: int, ip: str | None = None) -> bool:
    """Whether an ingress NetworkPolicy lets a pod (labels; namespace None = the policy's own) reach
    `port`: the rules as Kubernetes reads them (peers are ORed; within a selector, all terms must hold).
    With `ip`, the sender is an address no pod selector matches (a hostNetwork pod, a node)."""

    def selects(selector: dict, labels: dict) -> bool:
        exprs = selector.get("matchExpressions", [])
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
            labels.get(e["key"]) in e["values"] for e in exprs if e["operator"] == "In"
        )

    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
            continue
        for peer in rule["from"]:
            if ip is not None:
                if "ipBlock" in peer and ipaddress.ip_address(ip) in ipaddress.ip_network(peer["ipBlock"]["cidr"]):
                    return True
            elif "ipBlock" in peer:
                continue
            elif "namespaceSelector" in peer:
                if namespace is not None and selects(
                    peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}
                ):
                    return True
            elif namespace is None and selects(peer["podSelector"], pod_labels):
                return True
    return False


def test_data_job_is_hardened():
    (job,) = by_kind("Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("OnFailure", "Never") and spec["securityContext"]["runAsNonRoot"] is True
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["command"] == ["prepare_maze_data.sh"]
    assert (REPO / "scripts" / "prepare_maze_data.sh").exists()


def test_reward_deployment_args_parse_with_the_image_entrypoint():
    """The Deployment sets only `args`: they follow the image ENTRYPOINT `openrlhf-passk serve-reward`."""
    from openrlhf_passk import cli

    (deployment,) = by_kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container
    argv = ["serve-reward", *container["args"]]
    args = cli.build_parser(argv).parse_args(argv)
    assert args.host == "0.0.0.0" and args.task == "maze"
    assert args.port == container["ports"][0]["containerPort"]
    limit = container["resources"]["limits"]["cpu"]
    assert args.workers <= int(limit), "more uvicorn workers than CPUs"


# ------------------------------------------------------------------------------------- KubeRay schemas
def kuberay_schema(version: str) -> dict:
    return json.loads((KUBERAY_SCHEMAS / f"rayjob-{version}.schema.json").read_text())


@pytest.mark.parametrize("version", ["v1.2", "v1.7"])
@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_fits_kuberay_schema(path, version):
    """KubeRay v1.2 (the minimum k8s/README.md states) and the latest release both accept every RayJob."""
    jsonschema.validate(docs(path)[0], kuberay_schema(version))


def test_kuberay_v1_1_would_reject_the_rayjobs():
    """Why the minimum is 1.2: v1.1's RayJob has no backoffLimit or submitterConfig, so a strict apply fails
    (and a lenient one silently drops the retries)."""
    job = docs(SHIPPED_RAYJOBS[0])[0]
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(job, kuberay_schema("v1.1"))
    assert "backoffLimit" in str(err.value.message) or "submitterConfig" in str(err.value.message)
    trimmed = {**job, "spec": {k: v for k, v in job["spec"].items() if k not in ("backoffLimit", "submitterConfig")}}
    jsonschema.validate(trimmed, kuberay_schema("v1.1"))  # ... and nothing else in them is newer than 1.1


@pytest.mark.parametrize("version", ["v1.1", "v1.2", "v1.7"])
def test_kuberay_schema_is_not_a_no_op(version):
    job = docs(SHIPPED_RAYJOBS[0])[0]
    for bad in (
        {**job, "spec": {**job["spec"], "entrypointt": "typo"}},
        {**job, "spec": {**job["spec"], "submissionMode": "ShellMode"}},
        {**job, "spec": {**job["spec"], "activeDeadlineSeconds": "1h"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, kuberay_schema(version))
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    cluster = {**job["spec"]["rayClusterSpec"], "workerGroupSpecs": [{**worker, "replica": 1}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**job, "spec": {**job["spec"], "rayClusterSpec": cluster}}, kuberay_schema(version))


# ------------------------------------------------------------------------- entrypoint = scripts' command
@pytest.mark.parametrize("path", SHIPPED_RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_is_the_scripts_command(path):
    """`scripts/submit_rayjob.sh <recipe>` with the RayJob's size submits exactly the RayJob's entrypoint
    (same run name, so both resume the same checkpoints; same reward server), and so does the training
    script with the cluster's paths."""
    (job,) = docs(path)
    recipe, nodes = re.match(r"rayjob-(\w+)-(\d+)x8\.yaml", path.name).groups()
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "NUM_NODES": nodes, "SUBMISSION_ID": "s"}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "submit_rayjob.sh"), recipe], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.splitlines()[0][2:])
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--") + 1 :] == entrypoint
    assert command_flags(job)["--ckpt.path"] == [f"/mnt/shared/runs/{job['metadata']['name']}/ckpt"]
    script = "train_passk_maze.sh" if recipe == "passk" else "train_grpo_maze.sh"
    env.update(CHECK_LOCAL_PATHS="0", DATA_DIR="/mnt/shared/data/maze", OUTPUT_ROOT="/mnt/shared/runs")
    env["REWARD_URL"] = "http://passk-reward:5000/get_reward"
    out = subprocess.run(["bash", str(REPO / "scripts" / script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout.splitlines()[-1][2:]) == entrypoint


# ------------------------------------------------------------------------------------------------ secrets
@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_secrets_come_from_secrets_not_from_the_spec(path):
    (job,) = docs(path)
    assert "token=" not in path.read_text().lower()
    assert_no_secret_in_the_command(job)
    (deployment,) = by_kind("Deployment")
    reward_env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    reward_ref = reward_env["OPENRLHF_PASSK_REWARD_TOKEN"]["valueFrom"]["secretKeyRef"]
    for name, template in pod_templates(job).items():
        if name == "submitter":
            continue
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for var in ("OPENRLHF_PASSK_REWARD_TOKEN", "WANDB_API_KEY", "HF_TOKEN"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["optional"] is True and "value" not in env[var], f"{name}: {var}"
        # The trainers send the same token the server checks.
        assert env["OPENRLHF_PASSK_REWARD_TOKEN"]["valueFrom"]["secretKeyRef"] == reward_ref


WANDB_PLACEHOLDER = "from-env:WANDB_API_KEY"  # OpenRLHF needs a non-empty key; wandb reads the real one


def assert_no_secret_in_the_command(job: dict) -> None:
    flags = command_flags(job)
    assert flags.get("--logger.wandb.key", [WANDB_PLACEHOLDER]) == [WANDB_PLACEHOLDER], "a wandb key in the spec"


def test_wandb_rendering_keeps_the_key_out_of_the_command(tmp_path):
    """With --wandb-project the logger is switched on by the placeholder, never a key; and the check above
    catches a real key (it is not satisfied by the shipped files' lack of wandb alone)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--out", str(tmp_path), "--wandb-project", "passk"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    jobs = sorted(tmp_path.glob("rayjob-*.yaml"))
    assert len(jobs) == len(SHIPPED_RAYJOBS)
    for path in jobs:
        (job,) = docs(path)
        flags = command_flags(job)
        assert flags["--logger.wandb.key"] == [WANDB_PLACEHOLDER] and flags["--logger.wandb.project"] == ["passk"]
        assert_no_secret_in_the_command(job)
        env = {e["name"]: e for e in pod_templates(job)["head"]["spec"]["containers"][0]["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wandb"
    leaked = job["spec"]["entrypoint"].replace(WANDB_PLACEHOLDER, "0123456789abcdef")
    with pytest.raises(AssertionError, match="a wandb key in the spec"):
        assert_no_secret_in_the_command({"spec": {"entrypoint": leaked}})


def test_renderer_refuses_a_token_in_the_reward_url(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--out", str(tmp_path)]
        + ["--reward-url", "http://passk-reward:5000/get_reward?token=abc"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--reward-url must not carry the token" in out.stderr
    assert not list(tmp_path.iterdir())


def test_renderer_refuses_shell_characters_in_the_entrypoint(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--out", str(tmp_path), "--model", "a;b"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "would be read by a shell" in out.stderr
    # The renderer and scripts/lib/common.sh (submit_rayjob.sh) allow the same characters.
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import render_k8s
    finally:
        sys.path.pop(0)
    common = (REPO / "scripts" / "lib" / "common.sh").read_text()
    assert f"[[ $arg =~ {render_k8s.SHELL_SAFE.pattern} ]]" in common


# ------------------------------------------------------------------------------- Ray pods: shm, logs, net
def quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_object_store_fits_dev_shm_and_logs_reach_the_volume(path):
    """Ray falls back to /tmp (slow) when /dev/shm is smaller than its object store; Ray's logs live in
    /tmp/ray and are copied to the shared volume by a sidecar, so they survive the RayCluster."""
    (job,) = docs(path)
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        spec = group["template"]["spec"]
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
        store = int(group["rayStartParams"]["object-store-memory"])
        assert shm["medium"] == "Memory" and store <= 0.95 * quantity(shm["sizeLimit"])  # Ray's own cap
        ray, *sidecars = spec["containers"]
        memory = quantity(ray["resources"]["limits"]["memory"])
        assert quantity(shm["sizeLimit"]) < memory  # tmpfs pages count against the container
        assert {"name": "ray-tmp", "mountPath": "/tmp/ray"} in ray["volumeMounts"]
        (logs,) = [c for c in sidecars if c["name"] == "ray-logs"]
        assert {"name": "ray-tmp", "mountPath": "/tmp/ray", "readOnly": True} in logs["volumeMounts"]
        root = {e["name"]: e.get("value") for e in logs["env"]}["LOG_ROOT"]
        assert root == f"/mnt/shared/runs/{job['metadata']['name']}/ray-logs"
        assert subprocess.run(["bash", "-n", "-c", logs["command"][2]]).returncode == 0


def test_ray_ports_are_closed_to_other_pods():
    (policy,) = [p for p in by_kind("NetworkPolicy") if p["metadata"]["name"] == "passk-ray"]
    job = docs(SHIPPED_RAYJOBS[0])[0]
    templates = pod_templates(job)
    head_labels = templates["head"]["metadata"]["labels"]
    protected = {**policy["spec"]["podSelector"]}
    for name, template in templates.items():
        labels = template["metadata"]["labels"]
        selected = all(labels.get(e["key"]) in e["values"] for e in protected["matchExpressions"])
        assert selected is (name != "submitter"), name  # head and workers are protected
        for port in (6379, 8265, 10001, 12345):  # GCS, dashboard/Jobs API, client, any worker port
            assert admits(policy, labels, None, port), f"{name} must reach the Ray cluster on {port}"
    assert admits(policy, {}, "kuberay-system", 8265)  # the operator polls the Jobs API
    assert not admits(policy, {}, "kuberay-system", 6379)
    assert admits(policy, {}, "monitoring", 8080) and not admits(policy, {}, "monitoring", 8265)
    (data_job,) = by_kind("Job")
    for outsider in ({}, data_job["spec"]["template"]["metadata"]["labels"], {"app": "x"}):
        for port in (6379, 8265, 10001):
            assert not admits(policy, outsider, None, port)
    assert head_labels["app.kubernetes.io/component"] == "ray-head"


def test_service_monitor_example_scrapes_the_reward_service():
    (monitor,) = by_kind("ServiceMonitor")
    (service,) = by_kind("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"


def test_multinode_network_is_opt_in():
    """The RDMA/hostNetwork overlay is only in k8s/examples/ (rendered with its flags), never by default."""
    (example,) = K8S.glob("examples/rayjob-*.yaml")
    worker = docs(example)[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    ray = worker["containers"][0]
    env = {e["name"]: e.get("value") for e in ray["env"]}
    assert worker["hostNetwork"] is True and worker["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert ray["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert ray["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG"} <= env.keys()
    for path in SHIPPED_RAYJOBS:
        text = path.read_text()
        assert "hostNetwork" not in text and "IPC_LOCK" not in text and "NCCL_" not in text, path.name


def render_to(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--out", str(tmp_path), *flags],
        capture_output=True,
        text=True,
    )


def test_host_network_workers_are_admitted_by_node_address(tmp_path):
    """hostNetwork workers send from node addresses, which no podSelector matches: with --host-network
    both policies admit --node-cidr (Ray: any port; reward server: 5000), and nothing else by address."""
    out = render_to(tmp_path, "--host-network", "--node-cidr", "10.1.0.0/16", "--node-cidr", "192.168.8.0/24")
    assert out.returncode == 0, out.stderr
    (ray,) = docs(tmp_path / "ray-networkpolicy.yaml")
    reward = [d for d in docs(tmp_path / "reward-server.yaml") if d["kind"] == "NetworkPolicy"][0]
    for ip in ("10.1.2.3", "192.168.8.200"):
        for port in (6379, 8265, 10001, 12345):
            assert admits(ray, {}, None, port, ip=ip), (ip, port)
        assert admits(reward, {}, None, 5000, ip=ip)
    for ip in ("10.2.0.1", "192.168.9.1"):
        assert not admits(ray, {}, None, 6379, ip=ip) and not admits(reward, {}, None, 5000, ip=ip)
    worker = docs(tmp_path / "rayjob-passk-2x8.yaml")[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["hostNetwork"] is True
    # The shipped policies (no --host-network) admit no address at all.
    (shipped,) = [p for p in by_kind("NetworkPolicy") if p["metadata"]["name"] == "passk-ray"]
    assert "ipBlock" not in (K8S / "ray-networkpolicy.yaml").read_text() + (K8S / "reward-server.yaml").read_text()
    assert not admits(shipped, {}, None, 6379, ip="10.1.2.3")


def test_host_network_example_policies_match_the_example_rayjob():
    (example,) = K8S.glob("examples/rayjob-*.yaml")
    worker = docs(example)[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["hostNetwork"] is True
    policies = {d["metadata"]["name"]: d for d in docs(K8S / "examples" / "networkpolicies-hostnetwork.yaml")}
    assert policies.keys() == {"passk-ray", "passk-reward"}
    assert admits(policies["passk-ray"], {}, None, 6379, ip="10.0.1.5")
    assert admits(policies["passk-reward"], {}, None, 5000, ip="10.0.1.5")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--host-network"], "--host-network needs --node-cidr"),
        (["--host-network", "--node-cidr", "10.0.0.0/33"], "--node-cidr '10.0.0.0/33' is not a network"),
        (["--node-cidr", "10.0.0.0/16"], "--node-cidr only applies with --host-network"),
        (["--wait-minutes", "400", "--deadline-hours", "72"], "--wait-minutes 400 x 12 attempts leaves no time"),
    ],
)
def test_renderer_refuses_unsafe_network_and_wait_settings(flags, message, tmp_path):
    out = render_to(tmp_path, *flags)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())


def wait_container(job: dict) -> dict:
    (wait,) = job["spec"]["submitterPodTemplate"]["spec"]["initContainers"]
    return wait


def test_wait_expects_the_stamp_the_data_job_writes(tmp_path):
    """Every RayJob waits for exactly the stamp that the data Job, run with its manifest's environment,
    writes: a .done from another parameter set does not count."""
    (data_job,) = by_kind("Job")
    container = data_job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    fake = tmp_path / "fake-cli"  # writes the two files where --out points, as the real generator does
    fake.write_text(
        '#!/usr/bin/env bash\nwhile (($#)); do [[ $1 == --out ]] && out=$2; shift; done\n'
        'echo "{}" >"$out/train.jsonl"; echo "{}" >"$out/test.jsonl"\n'
    )
    fake.chmod(0o755)
    out_dir = tmp_path / "maze"
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / container["command"][0])],
        env={"PATH": os.environ["PATH"], **env, "OUT_DIR": str(out_dir), "PASSK_CLI": str(fake)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    written = (out_dir / ".done").read_text().strip()
    assert "n_train=10000" in written and "seed=0" in written
    for path in RAYJOBS:
        wait = {e["name"]: e["value"] for e in wait_container(docs(path)[0])["env"]}
        assert wait["DATA_STAMP"] == written, path.name


def test_submitter_waits_for_this_stamp_and_the_reward_server(tmp_path):
    """The wait script itself: a stale stamp keeps it waiting and it gives up in time, naming both stamps;
    with the right stamp and a healthy reward server it exits 0 (so `ray job submit` runs)."""
    import http.server
    import threading

    wait = wait_container(docs(SHIPPED_RAYJOBS[0])[0])
    env = {e["name"]: e["value"] for e in wait["env"]}
    script = wait["command"][2]
    assert '"/mnt/shared/data/maze/.done"' in script and "train.jsonl" not in script
    assert {"name": "shared", "mountPath": "/mnt/shared", "readOnly": True} in wait["volumeMounts"]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def run_wait(stamp: str, url: str) -> subprocess.CompletedProcess:
        (tmp_path / ".done").write_text(stamp + "\n")
        local = (
            script.replace("/mnt/shared/data/maze/.done", str(tmp_path / ".done"))
            .replace("http://passk-reward:5000", url)
            .replace("time.sleep(10)", "time.sleep(0.2)")
        )
        return subprocess.run(
            [sys.executable, "-c", local], env={**os.environ, **env, "WAIT_SECONDS": "1"}, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip

    try:
        healthy = f"http://127.0.0.1:{server.server_address[1]}"
        stale = env["DATA_STAMP"].replace("n_train=10000", "n_train=500")
        out = run_wait(stale, healthy)  # an earlier parameter set's .done, server up: still waiting
        assert out.returncode == 1 and "gave up after 1 s: data job: stamp 'sizes=" in out.stderr
        assert "n_train=500" in out.stderr and f"want {env['DATA_STAMP']!r}" in out.stderr
        assert "reward server healthy=True" in out.stderr
        out = run_wait(env["DATA_STAMP"], "http://127.0.0.1:9")  # right data, no server
        assert out.returncode == 1 and "data job: done" in out.stderr and "healthy=False" in out.stderr
        out = run_wait(env["DATA_STAMP"], healthy)
        assert out.returncode == 0, out.stderr
    finally:
        server.shutdown()


def test_storage_fits_the_checkpoints_it_keeps():
    """A 7.6B-parameter ZeRO-3 checkpoint with Adam is ~14 bytes/parameter (bf16 weights 2 + fp32 master
    4 + Adam m, v 4 + 4) = ~107 GB; each variant keeps --ckpt.max_num of them plus a 2-byte/param model."""
    (pvc,) = by_kind("PersistentVolumeClaim")
    size = quantity(pvc["spec"]["resources"]["requests"]["storage"])
    params = 7.62e9  # Qwen2.5-7B-Instruct, the default --model
    need = 0.0
    for path in SHIPPED_RAYJOBS:
        flags = command_flags(docs(path)[0])
        assert flags["--actor.model_name_or_path"] == ["Qwen/Qwen2.5-7B-Instruct"]
        need += int(flags["--ckpt.max_num"][0]) * 14 * params + 2 * params
    assert 14 * params / 1e9 == pytest.approx(107, abs=1)
    assert size >= need * 1.1, f"{size / 2**40:.2f} TiB < {need / 2**40:.2f} TiB needed (+10 %)"


def test_log_sidecar_copies_ray_logs_and_once_more_on_stop(tmp_path):
    """The sidecar's own script, pointed at a temporary Ray session: it copies at start, and again on
    SIGTERM (the pod stopping), so the last lines written before the end are on the volume too."""
    job = docs(SHIPPED_RAYJOBS[0])[0]
    (sidecar,) = [c for c in pod_templates(job)["head"]["spec"]["containers"] if c["name"] == "ray-logs"]
    session = tmp_path / "ray" / "session_2026"
    (session / "logs").mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    (session / "logs" / "raylet.out").write_text("first\n")
    script = sidecar["command"][2].replace("/tmp/ray/", f"{tmp_path}/ray/")
    env = {"PATH": os.environ["PATH"], "LOG_ROOT": str(tmp_path / "volume"), "POD_NAME": "head-abc"}
    proc = subprocess.Popen(["bash", "-c", script], env=env, start_new_session=True)
    copied = tmp_path / "volume" / "head-abc" / "raylet.out"
    try:
        deadline = time.monotonic() + 60
        while not copied.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no first copy"
            time.sleep(0.2)
        (session / "logs" / "raylet.out").write_text("first\nlast words\n")
        (session / "logs" / "worker-1.err").write_text("boom\n")
        time.sleep(1.1)  # cp -u compares modification times (1 s resolution on some file systems)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's group: the loop's pending `sleep 60`
        except ProcessLookupError:
            pass
    assert copied.read_text() == "first\nlast words\n"
    assert (copied.parent / "worker-1.err").read_text() == "boom\n"
