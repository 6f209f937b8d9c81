"""Imports flow one way: across the layers (tasks -> rewards -> advantages -> integration) and inside the
package, with no cycle, imports inside functions included. Parsed from the source, not imported."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "openrlhf_passk"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The openrlhf_passk modules `path` imports anywhere in its body (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports a module when mod is one; else it imports a name from pkg
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [name if name in MODULES else node.module for name in names]
        else:
            continue
        out |= {name for name in names if name in MODULES}
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle a depth-first walk of `graph` closes, as "a -> b -> a"."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_in_the_package():
    assert _cycles(GRAPH) == []


def test_a_cycle_would_be_found(tmp_path):
    """The detector finds a cycle, and the parser sees the edges that can close one: imports inside functions
    (bootstrap's lazy import of hooks) and `from package import module`."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    hooks, bootstrap = "openrlhf_passk.integration.hooks", "openrlhf_passk.integration.bootstrap"
    assert hooks in GRAPH[bootstrap]
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from openrlhf_passk.integration import hooks\n    import openrlhf_passk.env\n")
    assert _imports(module) == {hooks, "openrlhf_passk.env"}
    # The package's own graph with the edge that once closed a cycle: found.
    assert f"{bootstrap} -> {hooks} -> {bootstrap}" in _cycles({**GRAPH, hooks: GRAPH[hooks] | {bootstrap}})


# What the Ray workers run (the patches, and the per-step resolution) never imports what only the driver runs.
WORKER = ("experience", "simko", "reward", "resolve")
DRIVER_ONLY = ("flags", "preflight", "reward_preflight", "cluster", "doctor")


def test_worker_code_does_not_import_driver_code():
    seen, todo = set(), [f"openrlhf_passk.integration.{name}" for name in WORKER]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(GRAPH[module])
    assert not seen & {f"openrlhf_passk.integration.{name}" for name in DRIVER_ONLY}


def test_the_layers_point_one_way():
    """tasks and advantages never import OpenRLHF, Ray or the integration; only the integration (and the CLI,
    by name) reaches it."""
    for name, path in MODULES.items():
        text = path.read_text()
        tree = ast.parse(text)
        third_party = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        if name.startswith(("openrlhf_passk.tasks", "openrlhf_passk.advantages", "openrlhf_passk.rewards")):
            assert not third_party & {"openrlhf", "ray", "vllm"}, name
        if not name.startswith("openrlhf_passk.integration") and name not in ("openrlhf_passk.train_ppo_ray",):
            assert not any(dep.startswith("openrlhf_passk.integration") for dep in GRAPH[name]), name
    assert GRAPH["openrlhf_passk.env"] == set()  # the stdlib-only home of every variable name


def test_hooks_import_after_openrlhf_without_the_pth():
    """A checkout on PYTHONPATH in an interpreter that never ran the .pth, with OpenRLHF already imported:
    importing the hooks and then installing them works (an import of bootstrap that installed the finder as a
    side effect would re-enter the half-imported hooks: AttributeError)."""
    site = sysconfig.get_paths()["purelib"]
    child = (
        f"import sys; sys.path[:0] = [{str(REPO)!r}, {site!r}]\n"
        "import openrlhf\n"
        "from openrlhf_passk.integration import hooks\n"
        "from openrlhf_passk.integration import bootstrap\n"
        "assert callable(hooks.patch_loaded_modules) and bootstrap.install() and bootstrap.installed()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "PYTHONPATH"))}
    # -S: no site-packages processing, so no .pth runs
    run = subprocess.run([sys.executable, "-S", "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
