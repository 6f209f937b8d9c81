"""`openrlhf-passk doctor`: versions, whether the OpenRLHF hook is active, GPU/vLLM, supported verdict,
and in plain words whether this machine can train.

Exit status 0 when the installation works (a supported OpenRLHF is the one that imports, the hook is
active, SimKO loads), whether or not this machine can train (no GPU or no vLLM: dry runs and CPU mode
only); 1 when the installation is broken.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import site
import sys
from pathlib import Path

PTH_NAME = "openrlhf_passk_hook.pth"
PACKAGES = ("torch", "openrlhf", "ray", "deepspeed", "transformers", "vllm", "flash-attn")


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
        from openrlhf_passk.integration import simko

        simko_status = {
            "ok": True,
            "patches": sorted(simko.PATCHES),
        }
    except Exception as exc:
        simko_status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    from openrlhf_passk import advantages

    # Only an installed vLLM counts: a stand-in (tests/stubs, or ours in a dry run) has no package metadata.
    real_vllm = versions["vllm"] is not None and vllm_spec is not None
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
            "is_cpu_stand_in": versions["vllm"] is None and vllm_spec is not None,
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
                f"this machine can train ({gpu['device_count']} GPU(s), vLLM {versions['vllm']})"
                if not missing
                else f"this machine cannot train ({', '.join(missing)}): dry runs and CPU mode only"
            ),
        },
        "estimators": advantages.available(),
        "simko": simko_status,
        "patched_symbols": list(upstream.PATCHED_SYMBOLS),
        "env": {
            key: os.environ[key]
            for key in ("OPENRLHF_PASSK_DISABLE", "OPENRLHF_PASSK_DRY_RUN", "OPENRLHF_PASSK_CPU")
            if key in os.environ
        },
        "executable": sys.executable,
    }


def run(args: argparse.Namespace) -> int:
    data = report()
    ok = data["openrlhf"]["supported"] and data["hook"]["active"] and data["simko"]["ok"]
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
        print("  disabled by OPENRLHF_PASSK_DISABLE")
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
    print(f"training: {data['can_train']['verdict']}")
    return 0 if ok else 1
