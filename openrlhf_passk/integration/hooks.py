"""Post-import patching of OpenRLHF, driven by the finder that `bootstrap` installs.

Two kinds of hooks:
- modules patched after they execute (`patch_table()`: ours from `experience` and `reward`, SimKO's
  from `simko.PATCHES`): their spec's loader is wrapped so `exec_module` runs the patch functions after
  the module body;
- the training CLI `openrlhf.cli.train_ppo_ray`, which `python -m` runs as `__main__` through runpy
  (no `exec_module`, and its parser is built inside `if __name__ == "__main__":`). While it loads,
  `argparse.ArgumentParser.parse_args` is wrapped; the wrapper acts only on the parser that defines
  OpenRLHF's estimator flag (see `config.extend_parser`), then puts the original back.
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

from openrlhf_passk.integration import upstream

_PATCHED_ATTR = "__openrlhf_passk_patched__"


@functools.cache
def _supported_layout() -> upstream.Layout | None:
    """Layout of the installed OpenRLHF, or None if it is missing or unsupported (then one warning)."""
    if upstream.openrlhf_version() is None:
        return None  # `import openrlhf` fails on its own, with Python's usual message
    try:
        return upstream.layout()
    except upstream.UnsupportedVersion as exc:
        print(f"[openrlhf-passk] WARNING: {exc}. The passk estimators are NOT available.", file=sys.stderr)
        return None


@functools.cache
def patch_table() -> dict[str, tuple[Callable[[ModuleType], None], ...]]:
    """Upstream module name -> patch functions (ours, then SimKO's)."""
    from openrlhf_passk.integration import experience, reward

    try:
        from openrlhf_passk.integration import simko
    except Exception as exc:  # any failure to import must stop the run, loudly, not drop SimKO silently
        raise ImportError(
            f"openrlhf-passk: the SimKO integration (openrlhf_passk.integration.simko) failed to import: "
            f"{type(exc).__name__}: {exc}. Reinstall openrlhf-passk, or set OPENRLHF_PASSK_DISABLE=1 to run "
            "OpenRLHF without the extension."
        ) from exc
    patches = getattr(simko, "PATCHES", None)
    if not isinstance(patches, dict):
        raise ImportError("openrlhf-passk: openrlhf_passk.integration.simko must define PATCHES: dict[str, callable]")
    table: dict[str, list[Callable[[ModuleType], None]]] = {
        upstream.EXPERIENCE_MAKER_MODULE: [experience.patch_experience_maker],
        upstream.TRAINER_MODULE: [experience.patch_trainer],
        upstream.AGENT_MODULE: [reward.patch_agent],
    }
    for name, fn in patches.items():
        table.setdefault(name, []).append(fn)
    unlisted = set(table) - upstream.PATCHED_MODULES
    if unlisted:  # the finder only looks at PATCHED_MODULES: a patch elsewhere would never run
        raise ImportError(f"openrlhf-passk: patched modules missing from upstream.PATCHED_MODULES: {sorted(unlisted)}")
    return {name: tuple(fns) for name, fns in table.items()}


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
    if name == upstream.CLI_MODULE:
        _wrap_parse_args()
        return None
    if name not in upstream.PATCHED_MODULES or name not in patch_table():
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
        from openrlhf_passk.integration import config

        layout = upstream.layout()
        if layout.estimator_flag not in self._option_string_actions:
            return original(self, args, namespace)
        argparse.ArgumentParser.parse_args = original  # one parser per process: put argparse back
        return config.parse_training_args(self, original, layout, args, namespace)

    parse_args.__openrlhf_passk__ = True
    parse_args.__wrapped__ = original
    argparse.ArgumentParser.parse_args = parse_args
