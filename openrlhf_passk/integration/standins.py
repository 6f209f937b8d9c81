"""Labelled stand-ins for `vllm` and `flash_attn`, for machines that have neither (dry runs, CPU mode).

OpenRLHF imports both at module level, so without them not even its argument parser loads. `install`
appends a finder to the END of `sys.meta_path`: every real installation is found first, and the finder
answers only for the modules OpenRLHF imports at module level (`upstream.STANDIN_MODULES`) that no other
finder knows. Any other submodule stays a plain ModuleNotFoundError, so probes such as
`try: from flash_attn.ops.triton.cross_entropy import ... except ImportError` take upstream's fallback.
A stand-in module imports fine, but each of its attributes is a placeholder that raises RuntimeError when
called, instantiated or subclassed, naming the reason (isinstance/issubclass against one just answer False);
dunders stay absent (`from vllm import __version__` is an ImportError).
CPU mode may replace a placeholder with a working object by plain assignment (`sys.modules["vllm"].X = ...`).
The hooks call `install("dry run")` or `install("CPU mode")`, and `openrlhf-passk doctor` installs them in the
child process that resolves the upstream table. Standard library only (upstream is plain data).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

from openrlhf_passk.integration import upstream

MODULES = frozenset(upstream.STANDIN_MODULES)
MARK = "__openrlhf_passk_standin__"


def _message(name: str, reason: str) -> str:
    return (
        f"{name} is a stand-in ({reason}): vLLM/flash-attn is not installed in this environment, and "
        "openrlhf-passk put an empty module in its place so that OpenRLHF can be imported without a GPU. "
        "This code path needs the real package: install vLLM and flash-attn on a CUDA machine to train there."
    )


class Placeholder:
    """Any attribute of a stand-in module: importable and printable, unusable."""

    def __init__(self, name: str, reason: str):
        self._name, self._reason = name, reason

    def __call__(self, *args, **kwargs):
        raise RuntimeError(_message(self._name, self._reason))

    def __mro_entries__(self, bases):  # `class X(vllm.LLM)` asks for this before building the class
        raise RuntimeError(_message(self._name, self._reason))

    def __instancecheck__(self, obj) -> bool:  # nothing is an instance of a package that is not installed
        return False

    def __subclasscheck__(self, cls) -> bool:
        return False

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{self._name}.{attr}", self._reason)

    def __reduce__(self):  # Ray may pickle a module global that holds one
        return Placeholder, (self._name, self._reason)

    def __repr__(self) -> str:
        return f"<openrlhf-passk stand-in {self._name} ({self._reason})>"


class StandinModule(types.ModuleType):
    """A stand-in package: every public attribute is a Placeholder; dunders stay absent."""

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(f"stand-in module {self.__name__!r} has no attribute {attr!r}")
        return Placeholder(f"{self.__name__}.{attr}", getattr(self, MARK))

    def __repr__(self) -> str:
        return f"<openrlhf-passk stand-in module {self.__name__!r} ({getattr(self, MARK)})>"


class StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, reason: str):
        self.reason = reason

    def find_spec(self, name, path=None, target=None):
        if name not in MODULES:
            return None
        # A submodule is ours only under our own top-level package, never inside a real installation.
        top = name.partition(".")[0]
        if name != top and not hasattr(sys.modules.get(top), MARK):
            return None
        package = any(other.startswith(f"{name}.") for other in MODULES)
        return importlib.machinery.ModuleSpec(name, self, origin="openrlhf-passk stand-in", is_package=package)

    def create_module(self, spec):
        module = StandinModule(spec.name, f"openrlhf-passk stand-in for {spec.name} ({self.reason})")
        setattr(module, MARK, self.reason)
        return module

    def exec_module(self, module):
        if "." not in module.__name__:
            print(
                f"[openrlhf-passk] {module.__name__} is not installed: using a stand-in that fails if used "
                f"({self.reason})",
                file=sys.stderr,
            )


def installed() -> StandinFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, StandinFinder)), None)


def install(reason: str) -> None:
    """Serve stand-ins for vllm/flash_attn wherever the real ones are missing (idempotent; first reason wins)."""
    if installed() is None:
        sys.meta_path.append(StandinFinder(reason))
