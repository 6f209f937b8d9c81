"""Version detection of the OpenRLHF that really imports, on fake installs in temp dirs (a checkout on
PYTHONPATH must not borrow the version of the wheel it shadows).

A layout is chosen only when a distribution's file list (RECORD), or its editable-install record, holds
the very package that `import openrlhf` finds. Anything else warns loudly, and the hooks patch nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import HIDE_VLLM

from openrlhf_passk import env
from openrlhf_passk.integration import hooks, upstream

REPO = Path(__file__).resolve().parent.parent


def _package(root: Path) -> Path:
    package = root / "openrlhf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    return package


def _dist_info(root: Path, version: str, record: list[str], direct_url: dict | None = None) -> None:
    info = root / f"openrlhf-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: openrlhf\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in [*record, f"{info.name}/METADATA"]))
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))


def _wheel(root: Path, version: str) -> Path:
    """What pip leaves: the package and a dist-info whose RECORD lists it (site-packages or --target)."""
    package = _package(root)
    _dist_info(root, version, ["openrlhf/__init__.py"])
    return package


@pytest.fixture
def path(monkeypatch):
    """Set sys.path to the given dirs (with openrlhf not yet imported); detection is re-run each time."""
    monkeypatch.delitem(sys.modules, "openrlhf", raising=False)

    def set_path(*dirs: Path) -> upstream.Detected:
        monkeypatch.setattr(sys, "path", [str(d) for d in dirs])
        upstream.detect_openrlhf.cache_clear()
        return upstream.detect_openrlhf()

    yield set_path
    upstream.detect_openrlhf.cache_clear()


def test_the_first_copy_on_the_path_is_the_one_measured(tmp_path, path):
    target = _wheel(tmp_path / "target", "0.9.10")  # the Makefile's `pip install --target` copy
    site = _wheel(tmp_path / "site", "0.11.2")
    assert path(tmp_path / "target", tmp_path / "site") == upstream.Detected(str(target), "0.9.10")
    assert path(tmp_path / "site", tmp_path / "target") == upstream.Detected(str(site), "0.11.2")


def test_a_source_checkout_over_a_wheel_is_a_mismatch(tmp_path, path):
    checkout = _package(tmp_path / "checkout")
    _wheel(tmp_path / "site", "0.11.2")
    detected = path(tmp_path / "checkout", tmp_path / "site")
    assert detected.location == str(checkout) and detected.version is None
    assert "belongs to none of the installed OpenRLHF distributions" in detected.problem
    assert f"0.11.2 at {tmp_path / 'site'}" in detected.problem and str(checkout) in detected.problem


def test_no_metadata_at_all_is_reported(tmp_path, path):
    checkout = _package(tmp_path / "checkout")
    detected = path(tmp_path / "checkout")
    assert detected.version is None and detected.problem.startswith("no package metadata (dist-info) found")
    assert str(checkout) in detected.problem


def test_messages_name_the_path_the_user_set_up(tmp_path, path):
    """A symlinked checkout is reported under its own name; matching a RECORD still compares real paths."""
    target = _package(tmp_path / "elsewhere" / "src")
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "openrlhf").symlink_to(target)
    detected = path(tmp_path / "checkout")
    assert detected.location == str(tmp_path / "checkout" / "openrlhf")
    assert str(tmp_path / "checkout" / "openrlhf") in detected.problem and str(target) not in detected.problem
    _wheel(tmp_path / "real-site", "0.9.10")
    (tmp_path / "site").symlink_to(tmp_path / "real-site")  # e.g. a venv reached through a symlink
    assert path(tmp_path / "site") == upstream.Detected(str(tmp_path / "site" / "openrlhf"), "0.9.10")


def test_not_installed_is_no_problem_of_ours(tmp_path, path):
    assert path(tmp_path) == upstream.Detected(None, None)  # `import openrlhf` fails with Python's own message


def test_an_editable_install_matches_its_checkout(tmp_path, path):
    checkout = _package(tmp_path / "OpenRLHF")
    url = {"url": (tmp_path / "OpenRLHF").as_uri(), "dir_info": {"editable": True}}
    _dist_info(tmp_path / "site", "0.11.2", ["__editable__.openrlhf-0.11.2.pth"], url)
    assert path(tmp_path / "OpenRLHF", tmp_path / "site") == upstream.Detected(str(checkout), "0.11.2")
    # The same record names another checkout: not this package.
    other = {"url": (tmp_path / "elsewhere").as_uri(), "dir_info": {"editable": True}}
    (tmp_path / "site" / "openrlhf-0.11.2.dist-info" / "direct_url.json").write_text(json.dumps(other))
    assert path(tmp_path / "OpenRLHF", tmp_path / "site").version is None


def test_an_imported_package_is_measured_where_it_was_loaded_from(tmp_path, path, monkeypatch):
    _wheel(tmp_path / "site", "0.11.2")
    loaded = _wheel(tmp_path / "target", "0.9.10")
    module = types.ModuleType("openrlhf")
    module.__file__ = str(loaded / "__init__.py")
    monkeypatch.setitem(sys.modules, "openrlhf", module)
    assert path(tmp_path / "site", tmp_path / "target").version == "0.9.10"


MODES = [
    (env.DRY_RUN, "the dry run cannot check this OpenRLHF"),
    (env.CPU, "CPU mode cannot run this OpenRLHF"),
]


@pytest.fixture
def no_modes(monkeypatch):
    for name in (env.DRY_RUN, env.CPU):
        monkeypatch.delenv(name, raising=False)


def test_hooks_patch_nothing_and_warn_loudly_on_an_unknown_version(monkeypatch, capsys, no_modes):
    problem = "the openrlhf package that Python imports (/src/openrlhf) belongs to none of ..."
    monkeypatch.setattr(upstream, "detect_openrlhf", lambda: upstream.Detected("/src/openrlhf", None, problem))
    hooks._supported_layout.cache_clear()
    try:
        assert hooks._supported_layout() is None
        assert hooks.find_spec(object(), upstream.EXPERIENCE_MAKER_MODULE, None, None) is None  # no patch
    finally:
        hooks._supported_layout.cache_clear()
    err = capsys.readouterr().err
    assert err.count("patches NOTHING") == 1 and problem in err and "=" * 78 in err


@pytest.mark.parametrize(("variable", "says"), MODES)
@pytest.mark.parametrize("version", [None, "0.8.0"])  # no metadata for this copy; a version we do not know
def test_a_dry_run_or_cpu_mode_stops_on_an_unknown_openrlhf(variable, says, version, monkeypatch, capsys, no_modes):
    """Unpatched, a dry run would launch for real and CPU mode would run CUDA code: exit 2 before OpenRLHF."""
    problem = None if version else "no package metadata (dist-info) found for the openrlhf package at /src/openrlhf"
    monkeypatch.setattr(upstream, "detect_openrlhf", lambda: upstream.Detected("/src/openrlhf", version, problem))
    monkeypatch.setenv(variable, "1")
    hooks._supported_layout.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_info:
            hooks.find_spec(object(), "openrlhf", None, None)
    finally:
        hooks._supported_layout.cache_clear()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and (problem or "found 0.8.0") in err


# The real packages: the 0.9.10 copy the Makefile puts first on PYTHONPATH matches; the same code without
# its dist-info next to it (a source checkout) over the 0.11.2 wheel does not. `import openrlhf` is cheap;
# with "trainer", the child also imports the modules we patch, as a normal run does, without the test stubs.
CHILD = """
import importlib, json, sys, openrlhf
from openrlhf_passk.integration import hooks, standins, upstream
result = {"detected": upstream.openrlhf_version(), "layout": hooks._supported_layout() is not None}
if sys.argv[1:] == ["trainer"]:
    missing = set()
    for name in sorted(upstream.patched_modules()):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing.add(exc.name)
    result["missing"] = sorted(missing)
    result["standins"] = standins.installed() is not None
    result["loaded"] = sorted(n for n in sys.modules if n.partition(".")[0] in ("vllm", "flash_attn"))
print(json.dumps(result))
"""
OLD_COPY = REPO / ".venv" / "openrlhf-0.9.10"


def _child_env(first: Path) -> dict[str, str]:
    """Only what the user's venv has: `first` on PYTHONPATH, no test stubs, none of our variables."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("OPENRLHF_PASSK_")}
    env["PYTHONPATH"] = str(first)
    return env


def _checkout(tmp_path: Path) -> Path:
    """The 0.9.10 code as a source checkout: a symlink to it in a directory without its dist-info."""
    if not (OLD_COPY / "openrlhf").is_dir():
        pytest.skip("the OpenRLHF 0.9.10 copy of `make install` is missing")
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "openrlhf").symlink_to(OLD_COPY / "openrlhf")
    return tmp_path / "checkout"


def test_a_normal_run_never_gets_stand_ins():
    """Without OPENRLHF_PASSK_DRY_RUN/CPU a missing vllm/flash_attn fails as it would without us."""
    if not (OLD_COPY / "openrlhf").is_dir():
        pytest.skip("the OpenRLHF 0.9.10 copy of `make install` is missing")
    run = subprocess.run(
        [sys.executable, "-c", CHILD, "trainer"],
        env={**_child_env(OLD_COPY), "PYTHONPATH": os.pathsep.join([str(HIDE_VLLM), str(OLD_COPY)])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {
        "detected": "0.9.10",
        "layout": True,
        "missing": ["flash_attn", "vllm"],
        "standins": False,
        "loaded": [],
    }
    assert "WARNING" not in run.stderr


def test_a_checkout_without_metadata_is_detected_and_patched_nothing(tmp_path):
    first = _checkout(tmp_path)
    env = _child_env(first)
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"detected": None, "layout": False}
    assert "belongs to none of the installed OpenRLHF distributions" in run.stderr
    assert "patches NOTHING" in run.stderr
    assert str(first / "openrlhf") in run.stderr and str(OLD_COPY) not in run.stderr  # the path the user set


@pytest.mark.parametrize(("variable", "says"), MODES)
def test_the_training_cli_stops_on_a_checkout_without_metadata(variable, says, tmp_path):
    first = _checkout(tmp_path)
    env = {**_child_env(first), variable: "1"}
    cli = [sys.executable, "-m", "openrlhf.cli.train_ppo_ray", "--pretrain", "m", "--advantage_estimator", "passk"]
    run = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert says in run.stderr and str(first / "openrlhf") in run.stderr
    assert "Traceback" not in run.stderr
