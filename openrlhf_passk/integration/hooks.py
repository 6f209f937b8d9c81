"""Post-import patching of OpenRLHF, driven by the finder that `bootstrap` installs.

Two kinds of hooks:
- modules patched after they execute: the patch functions are the `ours` of the rows of `upstream.TABLE`
  that apply in this process (`patch_table()`); the module spec's loader is wrapped so `exec_module` runs
  them after the module body;
- the training CLI `openrlhf.cli.train_ppo_ray`, which `python -m` runs as `__main__` through runpy
  (no `exec_module`, and its parser is built inside `if __name__ == "__main__":`). While it loads,
  `argparse.ArgumentParser.parse_args` is wrapped; the wrapper acts only on the parser that defines
  OpenRLHF's estimator flag (`preflight.parse_training_args`), then puts the original back.

Modes, set up at the first `openrlhf*` lookup of a process (`_activate_modes`):
- OPENRLHF_PASSK_DRY_RUN: stand-ins for a missing vllm/flash_attn (`standins.install("dry run")`);
- OPENRLHF_PASSK_CPU: stand-ins ("CPU mode"), then `cpu_mode.activate()` once, and the table's CPU rows
  (those of the chosen rollout engine) join the patch table; `cpu_mode.prepare_args(args)` runs on the
  parsed training args. Without the variable, cpu_mode is never imported.
With an OpenRLHF that cannot be patched (unknown or unsupported version), either mode stops the process with
exit status 2 before OpenRLHF runs (see `_supported_layout`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.abc
import os
import sys
from collections.abc import Callable
from types import ModuleType

from openrlhf_passk import env
from openrlhf_passk.integration import standins, upstream

_PATCHED_ATTR = "__openrlhf_passk_patched__"
CPU_MODE_MODULE = "openrlhf_passk.integration.cpu_mode"
PACKAGE = "openrlhf_passk.integration"


def _warn_loudly(message: str) -> None:
    bar = "=" * 78
    print(f"{bar}\n[openrlhf-passk] WARNING: {message}\n{bar}", file=sys.stderr)


@functools.cache
def _supported_layout() -> upstream.Layout | None:
    """Layout of the imported OpenRLHF, or None if it is missing, of unknown version or unsupported (then
    one warning, and nothing is patched).

    A dry run or CPU mode cannot go on unpatched: without our stand-ins and checks the dry run would become
    a real launch, and CPU mode would run CUDA code. So then the process stops (exit 2) before OpenRLHF runs.
    """
    detected = upstream.detect_openrlhf()
    if detected.location is None:
        return None  # `import openrlhf` fails on its own, with Python's usual message
    problem = detected.problem
    if problem is None:
        try:
            return upstream.layout(detected.version)
        except upstream.UnsupportedVersion as exc:
            problem = str(exc)
    cpu, dry_run = env.env_flag(env.CPU), env.env_flag(env.DRY_RUN)
    if cpu or dry_run:  # CPU mode wins when both are set, as in _activate_modes
        mode = f"{env.CPU} is set: CPU mode cannot run" if cpu else f"{env.DRY_RUN} is set: the dry run cannot check"
        print(f"[openrlhf-passk] error: {problem}.", file=sys.stderr)
        print(f"[openrlhf-passk] error: {mode} this OpenRLHF; nothing was started.", file=sys.stderr)
        raise SystemExit(2)
    _warn_loudly(f"{problem}. openrlhf-passk patches NOTHING: the passk estimators are NOT available.")
    return None


_cpu_module: ModuleType | None = None
_cpu_checked = False


def _cpu_mode() -> ModuleType | None:
    """The CPU-mode module, activated once, when OPENRLHF_PASSK_CPU is on; else None (never imported).

    The module is recorded before `activate()` runs, so OpenRLHF modules that activate() imports already get
    CPU mode's patches. cpu_mode must not import OpenRLHF at its own module level: those imports would
    happen before its patches are known and would miss them.
    """
    global _cpu_module, _cpu_checked
    if not _cpu_checked:
        _cpu_checked = True
        if env.env_flag(env.CPU):
            standins.install("CPU mode")
            _cpu_module = importlib.import_module(CPU_MODE_MODULE)
            _cpu_module.activate()
    return _cpu_module


def _activate_modes() -> None:
    """Before any OpenRLHF code runs: stand-ins for the dry run, everything CPU mode needs."""
    if env.env_flag(env.CPU) or env.env_flag(env.DRY_RUN):
        # vLLM logs to stdout by default, and OpenRLHF imports it: the dry run's JSON report owns stdout.
        os.environ.setdefault(env.VLLM_LOGGING_STREAM, "ext://sys.stderr")
    if _cpu_mode() is None and env.env_flag(env.DRY_RUN):
        standins.install("dry run")


def cpu_engine() -> str | None:
    """The rollout engine of this process in CPU mode ("vllm" | "hf"), None outside CPU mode."""
    module = _cpu_mode()
    return None if module is None else module.patch_engine()


def watched_modules() -> frozenset[str]:
    """Modules whose import the finder wraps: those of the table's patching rows that apply here."""
    return upstream.patched_modules(cpu_engine())


def patch_table() -> dict[str, tuple[Callable[[ModuleType], None], ...]]:
    """Upstream module name -> the patch functions of the table rows that apply here, in table order."""
    return _patch_table(cpu_engine())


@functools.cache
def _patch_table(engine: str | None) -> dict[str, tuple[Callable[[ModuleType], None], ...]]:
    names: dict[str, list[str]] = {}
    for row in upstream.TABLE:
        if row.kind in upstream.IMPORT_TIME_KINDS and row.module in upstream.patched_modules(engine):
            if upstream.active(row, engine) and row.ours not in names.setdefault(row.module, []):
                names[row.module].append(row.ours)
    return {module: tuple(_ours(name) for name in ours) for module, ours in names.items()}


def _ours(name: str) -> Callable:
    """The function "module:function" of this package that a table row names."""
    module_name, _, function = name.partition(":")
    try:
        module = importlib.import_module(f"{PACKAGE}.{module_name}")
    except Exception as exc:  # any failure to import must stop the run, loudly, not drop a patch silently
        raise ImportError(
            f"openrlhf-passk: {PACKAGE}.{module_name} failed to import: {type(exc).__name__}: {exc}. "
            f"Reinstall openrlhf-passk, or set {env.DISABLE}=1 to run OpenRLHF without the extension."
        ) from exc
    return getattr(module, function)


def apply_patches(module: ModuleType) -> None:
    """Run the patch functions for `module` once (a reload or a second install does not re-patch)."""
    if getattr(module, _PATCHED_ATTR, False):
        return
    for fn in patch_table().get(module.__name__, ()):
        fn(module)
    setattr(module, _PATCHED_ATTR, True)


def patch_loaded_modules() -> None:
    """Patch target modules that were imported before the hooks were installed."""
    if _supported_layout() is None:
        return
    _activate_modes()
    for name in patch_table():
        if name in sys.modules:
            apply_patches(sys.modules[name])


class _PatchingLoader(importlib.abc.Loader):
    """Wraps a module's real loader: runs the module, then our patches. Everything else is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        apply_patches(module)

    def __getattr__(self, name):  # get_source, get_code, get_resource_reader, ...
        return getattr(self._loader, name)


def find_spec(finder, name: str, path, target):
    """Called by bootstrap.PostImportFinder for every `openrlhf*` lookup."""
    if _supported_layout() is None:
        return None
    _activate_modes()
    if name == upstream.CLI_MODULE:
        _wrap_parse_args()
        return None
    if name not in watched_modules():
        return None
    # Find the real spec with the finders that come after ours, then wrap its loader.
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(name, path, target)
        if spec is not None:
            if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                spec.loader = _PatchingLoader(spec.loader)
            return spec
    return None


def _wrap_parse_args() -> None:
    original = argparse.ArgumentParser.parse_args
    if getattr(original, "__openrlhf_passk__", False):
        return

    def parse_args(self, args=None, namespace=None):
        from openrlhf_passk.integration import cluster, preflight

        layout = upstream.layout()
        if layout.estimator_flag not in self._option_string_actions:
            return original(self, args, namespace)
        argparse.ArgumentParser.parse_args = original  # one parser per process: put argparse back
        parsed = preflight.parse_training_args(self, original, layout, args, namespace)
        cpu_mode = _cpu_mode()
        if cpu_mode is not None:
            cpu_mode.prepare_args(parsed)
        cluster.prepare(parsed)
        return parsed

    parse_args.__openrlhf_passk__ = True
    parse_args.__wrapped__ = original
    argparse.ArgumentParser.parse_args = parse_args
