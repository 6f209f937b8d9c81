"""The `openrlhf-passk` dispatcher: every subcommand has --help, and a missing extra is a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from openrlhf_passk import cli


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    assert cli.COMMANDS[name][1] in " ".join(capsys.readouterr().out.split())


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
    assert run.returncode == 2
    assert "pip install 'openrlhf-passk[server]'" in run.stderr and "Traceback" not in run.stderr
