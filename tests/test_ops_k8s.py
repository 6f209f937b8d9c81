"""k8s/: the rendered manifests are current, parse, validate against Kubernetes 1.33 (strict: unknown
fields fail), every pod template inside the RayJobs validates as a Pod, the RayJobs have what KubeRay
requires, and the pieces agree with each other (GPUs, volumes, labels, service names, paths)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
K8S_VERSION = "1.33.0"  # the Kubernetes version the manifests are validated against (k8s/README.md)
MANIFESTS = sorted(K8S.glob("*.yaml"))
RAYJOBS = sorted(K8S.glob("rayjob-*.yaml"))
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
    return [d for _, d in all_docs() if d["kind"] == kind]


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
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in MANIFESTS}
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


CORE = [(n, d) for n, d in all_docs() if d["kind"] != "RayJob"]


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
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
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
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_gpus_match_the_training_command(path):
    (job,) = docs(path)
    nodes, per_node = re.search(r"-(\d+)x(\d+)\.yaml$", path.name).groups()
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
    (policy,) = by_kind("NetworkPolicy")
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
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                exprs = peer["podSelector"].get("matchExpressions", [])
                if all(pod_labels.get(e["key"]) in e["values"] for e in exprs if e["operator"] == "In"):
                    return True
        return False

    for path in RAYJOBS:
        job = docs(path)[0]
        for name, template in pod_templates(job).items():
            expected = name != "submitter"  # head (readiness wait) and workers (rollouts) score; others not
            assert admitted(template["metadata"]["labels"]) is expected, f"{path.name} {name}"
    assert not admitted(by_kind("Job")[0]["spec"]["template"]["metadata"]["labels"])
    assert not admitted({})
    # The trainers call this Service's name and port.
    port = service["spec"]["ports"][0]["port"]
    for path in RAYJOBS:
        url = command_flags(docs(path)[0])["--reward.remote_url"][0]
        assert url.startswith(f"http://{service['metadata']['name']}:{port}/")


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
