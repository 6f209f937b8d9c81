"""What the package claims about itself matches its code: the Python floor."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_python_floor_is_3_11_everywhere():
    """The reward server uses asyncio.timeout and `except TimeoutError` for asyncio's timeouts, both 3.11+
    (on 3.10 every POST answered 500). No 3.10 interpreter can be installed here to test on, so the floor is
    3.11: pyproject, its classifiers, ruff's target and the README say so."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["requires-python"].startswith(">=3.11")
    assert not [c for c in project["project"]["classifiers"] if c.endswith(":: 3.10")]
    assert project["tool"]["ruff"]["target-version"] == "py311"
    assert "asyncio.timeout(" in (REPO / "openrlhf_passk" / "rewards" / "server.py").read_text()
    readme = (REPO / "README.md").read_text()
    assert not re.search(r"Python 3\.10", readme) and "Python 3.11-3.12" in readme
